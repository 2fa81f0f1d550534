"""LightGlue training losses: NLL of the partial assignment with dustbins, deeply supervised over every layer;
binary cross-entropy of the token-confidence classifiers of adaptive depth and width."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s2match.training.groundtruth import UNMATCHABLE


def assignment_targets(gt_matches0: torch.Tensor, gt_matches1: torch.Tensor) -> torch.Tensor:
    """(B, N+1, M+1) 0/1 weights of the log-assignment entries that the ground truth selects.

    A match (i, j) selects [i, j]; an unmatchable keypoint selects its dustbin entry ([i, M] or [N, j]); ignored
    keypoints (-2) select nothing.
    """
    b, n = gt_matches0.shape
    m = gt_matches1.shape[1]
    targets = gt_matches0.new_zeros((b, n + 1, m + 1), dtype=torch.float32)
    pair, kpt0 = torch.nonzero(gt_matches0 >= 0, as_tuple=True)
    targets[pair, kpt0, gt_matches0[pair, kpt0]] = 1.0
    targets[:, :n, m] = (gt_matches0 == UNMATCHABLE).float()
    targets[:, n, :m] = (gt_matches1 == UNMATCHABLE).float()
    return targets


def assignment_nll(log_assignment: torch.Tensor, targets: torch.Tensor, nll_balancing: float = 0.5) -> torch.Tensor:
    """(B,) balanced NLL of one layer's (B, N+1, M+1) log assignment under `assignment_targets`.

    The mean NLL over matches and the mean NLL over dustbin entries (both images pooled) are mixed as
    `nll_balancing * pos + (1 - nll_balancing) * neg`, as glue-factory does, so that the ratio of matchable to
    unmatchable keypoints in a pair does not set how much each side is trained.
    """
    n, m = log_assignment.shape[1] - 1, log_assignment.shape[2] - 1
    weighted = log_assignment * targets
    num_pos = targets[:, :n, :m].sum((-1, -2)).clamp(min=1.0)
    num_neg = (targets[:, :n, m].sum(-1) + targets[:, n, :m].sum(-1)).clamp(min=1.0)
    nll_pos = -weighted[:, :n, :m].sum((-1, -2)) / num_pos
    nll_neg = -(weighted[:, :n, m].sum(-1) + weighted[:, n, :m].sum(-1)) / num_neg
    return nll_balancing * nll_pos + (1.0 - nll_balancing) * nll_neg


def deep_supervision_loss(
    log_assignments: list[torch.Tensor],
    gt_matches0: torch.Tensor,
    gt_matches1: torch.Tensor,
    nll_balancing: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss: the assignment NLL of every layer, averaged over layers and pairs.

    Every layer has the same weight (glue-factory's default, loss.gamma = 1). Returns the loss and detached
    diagnostics: the last layer's NLL and the number of matchable / unmatchable keypoints per pair.
    """
    if not log_assignments:
        raise ValueError("deep_supervision_loss: no layer outputs given")
    targets = assignment_targets(gt_matches0, gt_matches1)
    per_layer = torch.stack([assignment_nll(la, targets, nll_balancing) for la in log_assignments])  # (L, B)
    loss = per_layer.mean()
    num_unmatchable = (gt_matches0 == UNMATCHABLE).sum(-1) + (gt_matches1 == UNMATCHABLE).sum(-1)
    stats = {
        "last": per_layer[-1].mean().detach(),
        "num_matchable": (gt_matches0 >= 0).sum(-1).float().mean(),
        "num_unmatchable": num_unmatchable.float().mean() / 2,
    }
    return loss, stats


def confidence_targets(log_assignment: torch.Tensor, final_log_assignment: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each keypoint's prediction at one layer already is the final one: its best entry (a keypoint of the
    other image or the dustbin) in this layer's (B, N+1, M+1) log assignment is the same as in the last layer's.
    Returns (B, N) and (B, M) float 0/1 targets of the token-confidence classifiers, as glue-factory trains them."""
    now, final = log_assignment.detach(), final_log_assignment.detach()
    agree0 = now[:, :-1, :].argmax(-1) == final[:, :-1, :].argmax(-1)
    agree1 = now[:, :, :-1].argmax(-2) == final[:, :, :-1].argmax(-2)
    return agree0.float(), agree1.float()


def confidence_loss(confidence_logits: list[tuple[torch.Tensor, torch.Tensor]],
                    log_assignments: list[torch.Tensor]) -> torch.Tensor:
    """Scalar loss of the token-confidence classifiers: binary cross-entropy of each layer's logits against
    `confidence_targets` of that layer, the mean over the keypoints of each image, the two images averaged, then
    averaged over the layers that have a classifier (all but the last) and over the pairs."""
    if len(confidence_logits) != len(log_assignments) - 1 or not confidence_logits:
        raise ValueError(f"confidence_loss: expected one pair of logits per layer but the last, got "
                         f"{len(confidence_logits)} for {len(log_assignments)} layers")
    per_layer = []
    for (logits0, logits1), log_assignment in zip(confidence_logits, log_assignments):
        target0, target1 = confidence_targets(log_assignment, log_assignments[-1])
        bce0 = F.binary_cross_entropy_with_logits(logits0, target0, reduction="none").mean(-1)
        bce1 = F.binary_cross_entropy_with_logits(logits1, target1, reduction="none").mean(-1)
        per_layer.append((bce0 + bce1) / 2)
    return torch.stack(per_layer).mean()
