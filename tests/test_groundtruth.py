import numpy as np
import pytest
import torch

from s2match.geo.homography import warp_points
from s2match.training.groundtruth import IGNORE, UNMATCHABLE, match_labels

SIZE = torch.tensor([200.0, 100.0])  # (w, h) of both images
# a shift by (+20, +10) plus a slight scale: hand-made keypoints can be placed exactly in image1
H = np.array([[1.05, 0.0, 20.0], [0.0, 1.05, 10.0], [0.0, 0.0, 1.0]])


def _labels(kpts0, kpts1, **kwargs):
    return match_labels(
        torch.tensor(kpts0, dtype=torch.float32),
        torch.tensor(kpts1, dtype=torch.float32),
        torch.from_numpy(H),
        SIZE,
        SIZE,
        **kwargs,
    )


def test_hand_made_keypoints_get_match_ignore_and_dustbin_labels():
    kpts0 = np.array([[10.0, 10.0], [50.0, 40.0], [100.0, 20.0], [190.0, 90.0], [30.0, 70.0]])
    projected = warp_points(H, kpts0)
    assert projected[3, 0] > 199.5  # keypoint 3 falls out of image1
    kpts1 = np.array(
        [
            projected[0] + [1.0, -1.0],  # 1.4 px: a match
            projected[1] + [4.0, 0.0],  # 4 px: between pos_th and neg_th, ignored
            projected[2] + [0.0, 8.0],  # 8 px: unmatchable
            [5.0, 5.0],  # nothing of image0 maps near it (its preimage is outside image0)
        ]
    )
    gt0, gt1 = _labels(kpts0, kpts1)
    assert gt0.dtype == torch.int64
    # keypoint 4 maps to (51.5, 83.5), 30+ px from any keypoint of image1
    assert gt0.tolist() == [0, IGNORE, UNMATCHABLE, UNMATCHABLE, UNMATCHABLE]
    assert gt1.tolist() == [0, IGNORE, UNMATCHABLE, UNMATCHABLE]


def test_only_mutual_nearest_neighbours_match():
    kpts0 = np.array([[50.0, 40.0], [51.0, 40.0]])  # both map within 3 px of the one keypoint of image1
    kpts1 = warp_points(H, kpts0[:1]) + [0.5, 0.0]
    gt0, gt1 = _labels(kpts0, kpts1)
    assert gt0.tolist() == [0, IGNORE]  # the second is close but not the mutual nearest neighbour
    assert gt1.tolist() == [0]


def test_distance_is_symmetric_reprojection_error():
    # under a 2x zoom a 2 px error in image1 is 1 px in image0: the larger of the two decides
    zoom = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    kpts0 = torch.tensor([[20.0, 20.0]])
    kpts1 = torch.tensor([[42.5, 40.0]])  # 2.5 px from H(kpts0) in image1, 1.25 px in image0
    size = torch.tensor([200.0, 200.0])
    assert match_labels(kpts0, kpts1, zoom, size, size, pos_th=3.0)[0].tolist() == [0]
    assert match_labels(kpts0, kpts1, zoom, size, size, pos_th=2.0, neg_th=5.0)[0].tolist() == [IGNORE]


def test_batched_labels_equal_per_pair_labels():
    generator = torch.Generator().manual_seed(0)
    kpts0 = torch.rand(2, 30, 2, generator=generator) * SIZE
    kpts1 = torch.cat([torch.from_numpy(warp_points(H, kpts0[0])).float()[None], kpts0[1:] + 1.0])
    kpts1 = kpts1.clamp(max=SIZE - 1)
    Hs = torch.stack([torch.from_numpy(H), torch.eye(3, dtype=torch.float64)])
    sizes = torch.stack([SIZE, SIZE])
    gt0, gt1 = match_labels(kpts0, kpts1, Hs, sizes, sizes)
    assert gt0.shape == (2, 30) and gt1.shape == (2, 30)
    for b in range(2):
        single0, single1 = match_labels(kpts0[b], kpts1[b], Hs[b], SIZE, SIZE)
        assert torch.equal(gt0[b], single0) and torch.equal(gt1[b], single1)
    assert (gt0[1] >= 0).sum() >= 25  # a 1.4 px shift under the identity: nearly all match


def test_no_keypoints_in_one_image_sends_all_to_dustbin():
    gt0, gt1 = match_labels(torch.rand(5, 2) * 50, torch.zeros(0, 2), torch.eye(3), SIZE, SIZE)
    assert gt0.tolist() == [UNMATCHABLE] * 5 and gt1.shape == (0,)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="match_labels"):
        match_labels(torch.zeros(5, 3), torch.zeros(5, 2), torch.eye(3), SIZE, SIZE)
