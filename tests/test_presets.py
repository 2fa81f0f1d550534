"""Presets (s2match.presets, conf/presets/): what `preset=` changes, the same from conf/ and from params.yaml, and
both presets end to end through src/infer.py on a real pair of two dates of the sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from s2match.config import PARAMS_FILE, PIPELINE_CONFIG, PROJECT_ROOT, compose_config, load_config
from s2match.evaluation.runner import method_specs
from s2match.models.lightglue import build_lightglue
from s2match.presets import with_preset

STRIPS = PROJECT_ROOT / "data" / "sample" / "ukraine" / "T35UNQ"
SIZE = 320


def test_accurate_is_the_configuration_as_it_is():
    cfg = compose_config()
    assert cfg.preset == "accurate"
    applied = with_preset(cfg)
    for group in ("features", "matcher", "registration", "paths", "model", "train"):
        assert applied[group] == cfg[group]
    # group overrides keep working under the default preset
    assert with_preset(compose_config(["features=disk"])).features.name == "disk"


def test_fast_replaces_features_and_picks_its_weights_and_folders():
    fast = with_preset(compose_config(["preset=fast"]))
    assert fast.features == compose_config(["features=xfeat"]).features  # XFeat with its own defaults
    assert fast.matcher.weights == "outputs/train_fast/matcher.pt"
    assert fast.paths.train == "outputs/train_fast" and fast.paths.features == "outputs/features_fast"
    assert fast.matcher.depth_confidence == -1 and fast.matcher.width_confidence == 0.95  # LighterGlue's own
    # DVC stages read params.yaml, resolved: the preset gives the same configuration there
    assert with_preset(load_config(["preset=fast"], PARAMS_FILE)) == with_preset(
        compose_config(["preset=fast"], PIPELINE_CONFIG))
    moved = with_preset(compose_config(["preset=fast", "presets.fast.paths.train=/tmp/elsewhere"]))
    assert moved.matcher.weights == "/tmp/elsewhere/matcher.pt"


def test_presets_are_evaluation_methods():
    cfg = compose_config()
    specs = {spec.name: spec.config for spec in method_specs(cfg)}
    for name in ("accurate", "fast"):
        applied = with_preset(compose_config([f"preset={name}"]))
        for group in ("features", "matcher", "registration"):
            assert specs[name][group] == applied[group]
    assert specs["trained"]["matcher"]["depth_confidence"] == -1  # the reference: full depth and width


def test_unknown_preset_is_one_line_error():
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "infer.py"), "+pair=demo", "preset=fastest"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: preset=fastest: no such preset; known: accurate, fast "
                                                "(conf/presets/)"]


@pytest.fixture(scope="module")
def two_dates(tmp_path_factory) -> tuple[Path, Path]:
    """Crops of one place of the T35UNQ strips in two summers a year apart, on their grid (aligned to ~1 px)."""
    folder = tmp_path_factory.mktemp("dates")
    paths = []
    for season in ("summer_prev", "summer"):
        with rasterio.open(STRIPS / f"{season}.tif") as src:
            window = Window(96, 1800, SIZE, SIZE)
            profile = {**src.profile, "width": SIZE, "height": SIZE, "transform": src.window_transform(window)}
            path = folder / f"{season}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.parametrize("preset, feature, adaptive", [("accurate", "aliked", (0.95, 0.99)),
                                                       ("fast", "xfeat", (-1, 0.95))])
def test_preset_end_to_end_through_infer(two_dates, tmp_path, preset, feature, adaptive):
    """src/infer.py preset=NAME: the preset's features, its weights file (here the release's head, exported as
    training exports it) and its adaptive depth and width; a transform within 2 px of the identity (the grid's)."""
    weights = tmp_path / "matcher.pt"
    torch.save(build_lightglue(feature, filter_threshold=0.1, depth_confidence=-1, width_confidence=-1).state_dict(),
               weights)
    weights_key = "matcher.weights" if preset == "accurate" else "presets.fast.matcher.weights"
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "infer.py"), f"+pair.image0={two_dates[0]}",
         f"+pair.image1={two_dates[1]}", f"preset={preset}", f"{weights_key}={weights}",
         f"infer.output_dir={out}", "device=auto"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == {"preset": preset, "features": feature, "matcher": "lightglue", "weights": "trained",
                               "file": str(weights), "device": "cpu"}
    matcher = result["config"]["matcher"]
    assert (matcher["depth_confidence"], matcher["width_confidence"]) == adaptive
    assert result["success"] and 1 <= result["matcher"]["layers"] <= (9 if feature == "aliked" else 6)
    H = np.array(result["homography"])
    corners = np.array([[0, 0, 1], [SIZE - 1, 0, 1], [SIZE - 1, SIZE - 1, 1], [0, SIZE - 1, 1]], float)
    mapped = corners @ H.T
    assert np.linalg.norm(mapped[:, :2] / mapped[:, 2:] - corners[:, :2], axis=1).mean() < 2.0
