
import pytest
import torch

from s2match.training.groundtruth import match_labels
from s2match.training.layerwise import LightGlueHead
from s2match.training.loss import assignment_nll, assignment_targets, deep_supervision_loss
from s2match.models.lightglue import build_lightglue
from s2match.training.module import lightglue_inputs



@pytest.fixture(scope="module")
def real_pair(warped_pair):
    """LightGlue input and ground-truth labels of the shared warped real pair."""
    batch = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in warped_pair.items()}
    size = warped_pair["image_size0"]
    gt0, gt1 = match_labels(warped_pair["keypoints0"], warped_pair["keypoints1"], warped_pair["H"].double(), size, size)
    return lightglue_inputs(batch), gt0[None], gt1[None]


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
    lightglue = build_lightglue("aliked", weights="random", n_layers=2, filter_threshold=0.1, depth_confidence=-1, width_confidence=-1)
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
