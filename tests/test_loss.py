from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from s2match.features import build_features
from s2match.geometry import warp_image
from s2match.groundtruth import match_labels
from s2match.head import LightGlueHead
from s2match.loss import assignment_nll, assignment_targets, deep_supervision_loss
from s2match.matcher import build_lightglue

SUMMER = Path(__file__).resolve().parents[1] / "data/sample/ukraine/T35UNQ/summer.tif"
H_TRUE = np.array([[0.95, -0.08, 14.0], [0.07, 0.97, -6.0], [2e-5, -1e-5, 1.0]])


@pytest.fixture(scope="module")
def real_pair():
    """ALIKED features (256 keypoints) of a 256 px crop of a summer strip and of its copy warped by H_TRUE."""
    with rasterio.open(SUMMER) as src:
        crop = src.read(window=rasterio.windows.Window(0, 2000, 256, 256)).transpose(1, 2, 0)
    warped = warp_image(crop, H_TRUE, (256, 256))
    extractor = build_features({"name": "aliked", "max_keypoints": 256})
    feats = [extractor(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255) for img in (crop, warped)]
    size = torch.tensor([[256.0, 256.0]])
    data = {f"image{i}": {**{k: v[None] for k, v in f.items()}, "image_size": size} for i, f in enumerate(feats)}
    gt0, gt1 = match_labels(feats[0]["keypoints"], feats[1]["keypoints"], torch.from_numpy(H_TRUE), size[0], size[0])
    return data, gt0[None], gt1[None]


def test_targets_select_matches_and_dustbins():
    gt0 = torch.tensor([[1, -1, -2]])
    gt1 = torch.tensor([[-2, 0, -1, -1]])
    targets = assignment_targets(gt0, gt1)
    assert targets.shape == (1, 4, 5)
    assert targets[0, 0, 1] == 1 and targets[0, 1, 4] == 1  # match (0, 1), dustbin of keypoint 1 of image0
    assert targets[0, 3, 2] == 1 and targets[0, 3, 3] == 1  # dustbins of keypoints 2, 3 of image1
    assert targets.sum() == 4  # the ignored keypoints select nothing


def test_nll_balances_matches_against_dustbins():
    gt0, gt1 = torch.tensor([[0, -1]]), torch.tensor([[0, -1]])
    log_assignment = torch.full((1, 3, 3), -7.0)
    log_assignment[0, 0, 0] = -1.0  # the match
    log_assignment[0, 1, 2] = -3.0  # dustbin of keypoint 1 of image0
    log_assignment[0, 2, 1] = -5.0  # dustbin of keypoint 1 of image1
    targets = assignment_targets(gt0, gt1)
    assert assignment_nll(log_assignment, targets, 0.5).item() == pytest.approx(0.5 * 1.0 + 0.5 * (3.0 + 5.0) / 2)
    assert assignment_nll(log_assignment, targets, 1.0).item() == pytest.approx(1.0)


def test_loss_averages_every_layer():
    gt0, gt1 = torch.tensor([[0]]), torch.tensor([[0]])
    layers = [torch.full((1, 2, 2), -v) for v in (1.0, 2.0, 6.0)]
    loss, stats = deep_supervision_loss(layers, gt0, gt1)
    # every layer: 0.5 * v (one match, no dustbin entry)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 2.0 + 6.0) / 3)
    assert stats["last"].item() == pytest.approx(3.0)


def test_loss_trains_the_head_on_a_real_pair(real_pair):
    data, gt0, gt1 = real_pair
    assert (gt0 >= 0).sum() >= 30, "the pair has too few ground-truth matches to train on"
    torch.manual_seed(0)
    lightglue = build_lightglue("aliked", pretrained=False, n_layers=2, depth_confidence=-1, width_confidence=-1)
    head = LightGlueHead(lightglue.train())
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    losses = []
    for step in range(10):
        loss, _ = deep_supervision_loss(head(data)["log_assignments"], gt0, gt1)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            trained = [p for name, p in head.named_parameters() if not name.startswith("lightglue.token_confidence")]
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
            assert any(p.grad.abs().sum() > 0 for p in lightglue.transformers[0].parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
