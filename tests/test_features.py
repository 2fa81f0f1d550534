"""Local features on a real Sentinel-2 crop: output contract, grey input, frozen training-time use, bad input."""

import math
import pathlib

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from s2match.models.features import FEATURES, build_features
from s2match.models.lightglue import build_lightglue

SUMMER = pathlib.Path(__file__).parents[1] / "data/sample/ukraine/T35UNQ/summer.tif"
SIZE = 256


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    """A textured 256 x 256 RGB crop, (1, 3, H, W) in [0, 1]."""
    with rasterio.open(SUMMER) as src:
        rgb = src.read(window=Window(128, 1024, SIZE, SIZE))
    return torch.from_numpy(rgb.astype(np.float32) / 255)[None]


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_output_contract(name, crop):
    features = build_features({"name": name, "max_keypoints": 256, "weights": None})
    assert features.name == name
    with torch.inference_mode():
        found = features(crop)
        grey = features(crop.mean(1, keepdim=True))
    n = found["keypoints"].shape[0]
    assert 50 <= n <= 256
    assert found["keypoints"].shape == (n, 2)
    assert found["descriptors"].shape == (n, features.descriptor_dim)
    assert found["scores"].shape == (n,)
    assert all(value.dtype == torch.float32 for value in found.values())
    assert ((found["keypoints"] >= 0) & (found["keypoints"] <= SIZE - 1)).all()
    assert (found["scores"][:-1] >= found["scores"][1:]).all()  # strongest first
    assert torch.allclose(found["descriptors"].norm(dim=1), torch.ones(n), atol=1e-4)
    if name == "sift":
        assert (found["scales"] > 0).all()
        assert ((found["oris"] >= 0) & (found["oris"] < 2 * math.pi)).all()
    assert grey["keypoints"].shape[0] >= 50


def test_keypoint_cap():
    image = torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    assert build_features({"name": "xfeat", "max_keypoints": 17})(image)["keypoints"].shape == (17, 2)


def test_frozen_features_feed_a_trainable_matcher(crop):
    """Outside inference mode the (frozen) features are ordinary tensors LightGlue can backpropagate from."""
    features = build_features({"name": "xfeat", "max_keypoints": 64})
    features.train()
    assert not features.training
    assert not any(p.requires_grad for p in features.parameters())
    found = [features(crop), features(crop.flip(-1))]
    assert not found[0]["keypoints"].is_inference()
    matcher = build_lightglue("xfeat", weights="random", filter_threshold=0.1, depth_confidence=-1, width_confidence=-1).train()
    size = torch.tensor([[256.0, 256.0]])
    views = [
        {"keypoints": f["keypoints"][None], "descriptors": f["descriptors"][None], "image_size": size} for f in found
    ]
    out = matcher({"image0": views[0], "image1": views[1]})
    out["log_assignment"].logsumexp((1, 2)).sum().backward()
    assert matcher.input_proj.weight.grad is not None


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(3, 64, 64), "shape"),
        (torch.rand(1, 4, 64, 64), "shape"),
        (torch.randint(0, 255, (1, 3, 64, 64)), "float"),
        (torch.rand(1, 3, 64, 64) * 255, r"\[0, 1\]"),
    ],
)
def test_bad_image_raises(image, message):
    with pytest.raises(ValueError, match=message):
        build_features({"name": "sift", "max_keypoints": 10})(image)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "superpoint", "max_keypoints": 10}, "unknown features"),
        ({"name": "disk", "max_keypoints": 10, "nms": 3}, r"unknown options \['nms'\]"),
        ({"name": "sift", "max_keypoints": 10, "weights": "x.pth"}, "no pretrained weights"),
        ({"name": "xfeat", "max_keypoints": 0}, "max_keypoints must be >= 1"),
    ],
)
def test_bad_config_raises(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_features(cfg)
