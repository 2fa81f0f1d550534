"""Ground-truth correspondences between two keypoint sets related by a known homography.

Labels use glue-factory's index form, one entry per keypoint:
    gt_matches0[i] = j >= 0   keypoint i of image0 matches keypoint j of image1
    gt_matches0[i] = -1       UNMATCHABLE: it belongs to the dustbin
    gt_matches0[i] = -2       IGNORE: ambiguous, left out of the loss
and the same for gt_matches1 (indices into image0).
"""

from __future__ import annotations

import torch
from kornia.geometry.linalg import transform_points

UNMATCHABLE = -1
IGNORE = -2


def _inside(pts: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(B, N) whether points lie in an image of size (w, h); pixel centres at integers, so edges at -0.5."""
    w, h = size[:, 0:1], size[:, 1:2]
    x, y = pts[..., 0], pts[..., 1]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def match_labels(
    kpts0: torch.Tensor,
    kpts1: torch.Tensor,
    H: torch.Tensor,
    size0: torch.Tensor,
    size1: torch.Tensor,
    pos_th: float = 3.0,
    neg_th: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label keypoints of two images as matches, unmatchable or ignored.

    Args:
        kpts0, kpts1: (N, 2) / (M, 2) pixel (x, y), or batched (B, N, 2) / (B, M, 2).
        H: (3, 3) or (B, 3, 3), maps image0 pixels to image1 pixels.
        size0, size1: (2,) or (B, 2) image sizes as (w, h).
        pos_th: a mutual nearest neighbour closer than this (px) is a match.
        neg_th: a keypoint whose nearest neighbour is farther than this (px) is unmatchable.

    The distance of a pair is the larger of the two reprojection errors (kpts0 by H against kpts1, kpts1 by H^-1
    against kpts0), as in glue-factory. A keypoint whose reprojection leaves the other image is unmatchable unless
    it forms a match (a point a fraction of a pixel outside the border can still have its true partner inside).

    Returns:
        gt_matches0 (N,) or (B, N) and gt_matches1 (M,) or (B, M), int64, in the index form of the module doc.
    """
    batched = kpts0.dim() == 3
    if not batched:
        kpts0, kpts1, H, size0, size1 = kpts0[None], kpts1[None], H[None], size0[None], size1[None]
    if kpts0.shape[-1] != 2 or kpts1.shape[-1] != 2 or H.shape[-2:] != (3, 3):
        raise ValueError(f"match_labels: expected keypoints (..., 2) and H (..., 3, 3), got {tuple(kpts0.shape)}, "
                         f"{tuple(kpts1.shape)}, {tuple(H.shape)}")
    b, n, m = kpts0.shape[0], kpts0.shape[1], kpts1.shape[1]
    device = kpts0.device
    if n == 0 or m == 0:
        # nothing to match against: every keypoint goes to the dustbin
        gt0 = torch.full((b, n), UNMATCHABLE, dtype=torch.long, device=device)
        gt1 = torch.full((b, m), UNMATCHABLE, dtype=torch.long, device=device)
    else:
        # float64: a 10000 px image leaves float32 only ~1e-3 px of precision after the projective division
        H64 = H.to(device, torch.float64)
        k0, k1 = kpts0.to(torch.float64), kpts1.to(torch.float64)
        k0_in_1 = transform_points(H64, k0)
        k1_in_0 = transform_points(torch.linalg.inv(H64), k1)
        dist = torch.maximum(torch.cdist(k0_in_1, k1), torch.cdist(k0, k1_in_0))
        dist = torch.nan_to_num(dist, nan=torch.inf)  # a point sent to infinity by H gives NaN

        min0, nn0 = dist.min(-1)
        min1, nn1 = dist.min(-2)
        mutual0 = torch.gather(nn1, 1, nn0) == torch.arange(n, device=device)
        mutual1 = torch.gather(nn0, 1, nn1) == torch.arange(m, device=device)
        positive0 = mutual0 & (min0 < pos_th)
        positive1 = mutual1 & (min1 < pos_th)
        negative0 = ~positive0 & ((min0 > neg_th) | ~_inside(k0_in_1, size1.to(device)))
        negative1 = ~positive1 & ((min1 > neg_th) | ~_inside(k1_in_0, size0.to(device)))

        gt0 = torch.where(positive0, nn0, IGNORE).masked_fill(negative0, UNMATCHABLE)
        gt1 = torch.where(positive1, nn1, IGNORE).masked_fill(negative1, UNMATCHABLE)
    return (gt0, gt1) if batched else (gt0[0], gt1[0])
