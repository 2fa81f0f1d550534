"""Feature cache: entries written once per pair, re-used while their inputs and config stay the same."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.windows import Window

from s2match.data.datamodule import FeatureDataModule, collate_pairs
from s2match.data.featurecache import build_cache, cache_dir, pairs_to_cache, read_index
from s2match.geo.homography import random_homography

ALIKED_SMALL = {"name": "aliked", "max_keypoints": 128}
BORDER_PX = 8


def write_tiny_pairs(sample_dir: Path, out: Path, splits: dict[str, int], size: int = 128) -> Path:
    """pairs.csv of small winter / summer crops of the Ukrainian sample strips, with seeded homographies.

    Real cross-season imagery, small enough for ALIKED to take a fraction of a second per image."""
    rng = np.random.default_rng(0)
    tiles = out / "tiles"
    tiles.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in splits.items():
        for i in range(count):
            paths = {}
            for season in ("winter", "summer"):
                with rasterio.open(sample_dir / "ukraine" / "T36UUA" / f"{season}.tif") as src:
                    crop = src.read(window=Window(64, 300 + 400 * len(rows), size, size)).mean(0, keepdims=True)
                paths[season] = tiles / f"{split}{i}_{season}.tif"
                with rasterio.open(paths[season], "w", driver="GTiff", width=size, height=size, count=1,
                                   dtype="float32") as dst:
                    dst.write(crop.astype(np.float32))
            H = random_homography(rng, (size, size), 10.0, (0.9, 1.1), 0.05, 0.02, 0.5)
            rows.append({"pair_id": f"{split}{i}", "split": split, "aoi": "ua-T36UUA", "location": "ua-T36UUA",
                         "tile_id": f"r{i}", "season_kind": "winter-summer", "scene0": "ua-T36UUA-winter",
                         "scene1": "ua-T36UUA-summer", "date0": "", "date1": "", "season0": "winter",
                         "season1": "summer", "path0": str(paths["winter"]),
                         "path1": str(paths["summer"]), "width": size, "height": size,
                         "warp": json.dumps(H.ravel().tolist()), "date_shift_x": 0.0, "date_shift_y": 0.0,
                         "date_shift_from": "georeference"})
    pairs_dir = out / "pairs"
    pairs_dir.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(pairs_dir / "pairs.csv", index=False)
    return pairs_dir


@pytest.fixture(scope="module")
def pairs(sample_dir, tmp_path_factory) -> pd.DataFrame:
    pairs_dir = write_tiny_pairs(sample_dir, tmp_path_factory.mktemp("tiny"), {"train": 2, "val": 1})
    return pd.read_csv(pairs_dir / "pairs.csv")


@pytest.fixture(scope="module")
def cached(pairs, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("cache")
    return build_cache(pairs, ALIKED_SMALL, BORDER_PX, root), cache_dir(root, ALIKED_SMALL)


def test_select_pairs_limits_each_split(pairs):
    chosen = pairs_to_cache(pairs, ["train", "val"], {"train": 1})
    assert list(chosen.pair_id) == ["train0", "val0"]
    with pytest.raises(ValueError, match="test"):
        pairs_to_cache(pairs, ["test"])


def test_cache_writes_then_reuses_entries(pairs, cached):
    index, folder = cached
    assert list(index.pair_id) == ["train0", "train1", "val0"]
    assert read_index(folder, ["val"]).pair_id.tolist() == ["val0"]
    entry = torch.load(folder / "train0.pt", weights_only=True)
    assert entry["keypoints0"].shape[1] == 2 and 0 < len(entry["keypoints0"]) <= 128
    assert entry["descriptors1"].shape == (len(entry["keypoints1"]), 128)
    assert torch.equal(entry["image_size0"], torch.tensor([128.0, 128.0]))
    assert entry["H"].dtype == torch.float64 and entry["H"].shape == (3, 3)
    # scores come sorted, so cutting to the first k keeps the strongest keypoints
    assert torch.all(entry["scores0"][:-1] >= entry["scores0"][1:])

    mtimes = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.pt")}
    build_cache(pairs, ALIKED_SMALL, BORDER_PX, folder.parent)
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.pt")} == mtimes, "re-run re-extracted"


def test_changed_config_invalidates_entries(pairs, cached, tmp_path):
    _, folder = cached
    shutil.copytree(folder, tmp_path / "aliked")
    smaller = {**ALIKED_SMALL, "max_keypoints": 16}
    build_cache(pairs.iloc[[0]], smaller, BORDER_PX, tmp_path)
    assert len(torch.load(tmp_path / "aliked" / "train0.pt", weights_only=True)["keypoints0"]) <= 16
    assert read_index(tmp_path / "aliked").pair_id.tolist() == ["train0"]


def test_an_entry_is_the_same_file_whichever_process_writes_it(pairs, tmp_path, monkeypatch):
    # Byte for byte: DVC hashes the files, and a re-extraction of equal features must not look like a new output.
    one = pairs.iloc[[0]]
    build_cache(one, ALIKED_SMALL, BORDER_PX, tmp_path / "a")
    monkeypatch.setattr(os, "getpid", lambda: 1)  # another process: other temporary file names
    build_cache(one, ALIKED_SMALL, BORDER_PX, tmp_path / "b")
    written = [(tmp_path / run / "aliked" / "train0.pt").read_bytes() for run in ("a", "b")]
    assert written[0] == written[1]


def test_augmentation_is_seeded(pairs, cached, tmp_path):
    augment = {"brightness": 0.3, "contrast": 0.3, "gamma": [0.7, 1.4]}
    one = pairs.iloc[[0]]
    build_cache(one, ALIKED_SMALL, BORDER_PX, tmp_path / "a", augment, seed=1)
    build_cache(one, ALIKED_SMALL, BORDER_PX, tmp_path / "b", augment, seed=1)
    load = lambda folder: torch.load(folder / "train0.pt", weights_only=True)["descriptors0"]  # noqa: E731
    assert torch.equal(load(tmp_path / "a" / "aliked"), load(tmp_path / "b" / "aliked"))
    assert not torch.equal(load(tmp_path / "a" / "aliked"), load(cached[1]))
    # validation pairs are never jittered: the checkpoint is chosen on the images as they are
    val = pairs[pairs.split == "val"]
    build_cache(val, ALIKED_SMALL, BORDER_PX, tmp_path / "v", augment, seed=1)
    load_val = lambda folder: torch.load(folder / "val0.pt", weights_only=True)["descriptors0"]  # noqa: E731
    assert torch.equal(load_val(tmp_path / "v" / "aliked"), load_val(cached[1]))
    with pytest.raises(ValueError, match="hue"):
        build_cache(one, ALIKED_SMALL, BORDER_PX, tmp_path / "c", {"hue": 0.1})


def test_datamodule_batches_cached_pairs(cached):
    folder = cached[1]
    data = FeatureDataModule(folder, max_keypoints=32, seed=3)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    count = data.train_set.index.set_index("pair_id").at[batch["pair_id"][0], "num_keypoints1"]
    assert batch["keypoints0"].shape == (1, 32, 2) and batch["descriptors1"].shape == (1, min(32, count), 128)
    assert batch["image_size0"].shape == (1, 2) and batch["H"].shape == (1, 3, 3)
    assert [b["pair_id"] for b in data.val_dataloader()] == [["val0"]]
    # the shuffled order is a function of the seed
    again = FeatureDataModule(folder, max_keypoints=32, seed=3)
    again.setup("fit")
    assert [b["pair_id"] for b in again.train_dataloader()] == [b["pair_id"] for b in data.train_dataloader()]
    # unequal keypoint counts in one batch are cut to the smallest
    short = {**data.train_set[1], "keypoints0": data.train_set[1]["keypoints0"][:5],
             "descriptors0": data.train_set[1]["descriptors0"][:5]}
    assert collate_pairs([data.train_set[0], short])["descriptors0"].shape == (2, 5, 128)
