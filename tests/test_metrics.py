import math

import numpy as np
import pytest

from s2match.geo.homography import random_homography
from s2match.evaluation.metrics import auc, match_precision, mean_corner_error, summarise

WIDTH, HEIGHT = 320, 256
SHIFT_2PX = np.array([[1.0, 0, 2], [0, 1, 0], [0, 0, 1]])


def _gt_homographies(n):
    return [random_homography(np.random.default_rng(seed), (WIDTH, HEIGHT)) for seed in range(n)]


def test_exact_homography_scores_100_at_every_threshold():
    errors = [mean_corner_error(H, H, WIDTH, HEIGHT) for H in _gt_homographies(5)]

    assert errors == pytest.approx([0.0] * 5, abs=1e-9)
    assert auc(errors) == pytest.approx({"auc@1": 100.0, "auc@3": 100.0, "auc@5": 100.0, "auc@10": 100.0})


def test_constant_2px_shift_gives_the_hand_computed_aucs():
    # Every estimate is the truth followed by a 2 px shift in x, so each corner error is exactly 2.
    errors = [mean_corner_error(SHIFT_2PX @ H, H, WIDTH, HEIGHT) for H in _gt_homographies(4)]
    assert errors == pytest.approx([2.0] * 4)

    # cal_error_auc with N = 4: curve points (0,0), (2,1/4), (2,2/4), (2,3/4), (2,1), then held at 1 up to t.
    #   t=1:  nothing below 1 -> curve (0,0)-(1,0): area 0                          -> AUC 0
    #   t=3:  ramp 0..2 under (0 + 1/4)/2 * 2 = 0.25, vertical steps 0, flat 2..3 = 1 -> 1.25/3  = 41.667
    #   t=5:  0.25 + flat 2..5 = 3                                                  -> 3.25/5  = 65
    #   t=10: 0.25 + flat 2..10 = 8                                                 -> 8.25/10 = 82.5
    assert auc(errors) == pytest.approx({"auc@1": 0.0, "auc@3": 125 / 3, "auc@5": 65.0, "auc@10": 82.5})


def test_failed_estimation_counts_as_never_recalled():
    H_gts = _gt_homographies(4)
    errors = [mean_corner_error(H, H, WIDTH, HEIGHT) for H in H_gts[:3]]
    errors.append(mean_corner_error(None, H_gts[3], WIDTH, HEIGHT))
    assert errors[3] == math.inf

    # Three exact pairs (recall 3/4 at error 0) and one never recalled: 0.75 over [0, t] -> 75 at every t.
    assert auc(errors) == pytest.approx({"auc@1": 75.0, "auc@3": 75.0, "auc@5": 75.0, "auc@10": 75.0})


def test_non_finite_estimate_counts_as_failure():
    assert mean_corner_error(np.full((3, 3), np.nan), np.eye(3), WIDTH, HEIGHT) == math.inf


def test_auc_edge_cases():
    assert all(math.isnan(value) for value in auc([]).values())
    assert list(auc([1.0], thresholds=(0.5, 2)).keys()) == ["auc@0.5", "auc@2"]
    with pytest.raises(ValueError, match="NaN or negatives"):
        auc([1.0, np.nan])
    with pytest.raises(ValueError, match="NaN or negatives"):
        auc([-1.0])


def test_match_precision_on_a_hand_made_set():
    H_gt = np.array([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]])
    kpts0 = np.array([[0.0, 0], [5, 5], [20, 30], [40, 40], [60, 10]])
    projected = kpts0 + [10, 0]
    # Reprojection errors 0, 0, 2.9, 3.0, 50: the strict "< 3" test keeps the first three.
    kpts1 = projected + [[0, 0], [0, 0], [0, 2.9], [3.0, 0], [30, 40]]

    assert match_precision(kpts0, kpts1, H_gt) == pytest.approx(3 / 5)
    assert match_precision(kpts0, kpts1, H_gt, threshold=3.5) == pytest.approx(4 / 5)
    assert match_precision(np.zeros((0, 2)), np.zeros((0, 2)), H_gt) == 0.0


def _record(method, kind, corner_error, precision, n_matches, n_inliers, seconds):
    return dict(
        method=method,
        season_kind=kind,
        corner_error=corner_error,
        precision=precision,
        n_matches=n_matches,
        n_inliers=n_inliers,
        seconds=seconds,
    )


def test_summarise_per_group_and_overall():
    records = [
        _record("lg", "summer-summer", 0.0, 1.0, 100, 80, 0.1),
        _record("lg", "summer-summer", 0.0, 0.8, 200, 120, 0.3),
        _record("lg", "winter-summer", 0.0, 0.5, 50, 10, 0.2),
        _record("lg", "winter-summer", math.inf, 0.0, 0, 0, 0.4),
        _record("sift", "winter-summer", math.inf, 0.0, 4, 0, 1.0),
    ]

    table = summarise(records, "season_kind", by="method")

    assert list(table.index) == [
        ("lg", "summer-summer"),
        ("lg", "winter-summer"),
        ("lg", "all"),
        ("sift", "winter-summer"),
        ("sift", "all"),
    ]
    summer, winter, overall = (table.loc[("lg", kind)] for kind in ("summer-summer", "winter-summer", "all"))
    assert summer["auc@3"] == pytest.approx(100.0) and summer["failure_rate"] == 0.0
    assert winter["auc@3"] == pytest.approx(50.0) and winter["failure_rate"] == 0.5
    assert overall["auc@10"] == pytest.approx(75.0) and overall["failure_rate"] == 0.25
    assert overall["n_pairs"] == 4
    assert overall["precision"] == pytest.approx(2.3 / 4)
    assert overall["mean_matches"] == pytest.approx(87.5)
    assert overall["mean_inliers"] == pytest.approx(52.5)
    assert overall["median_seconds"] == pytest.approx(0.25)
    assert table.loc[("sift", "all"), "auc@1"] == 0.0

    flat = summarise(records, "season_kind")
    assert list(flat.index) == ["summer-summer", "winter-summer", "all"]
    assert flat.loc["all", "n_pairs"] == 5


def test_summarise_names_missing_keys():
    record = _record("lg", "summer-summer", 0.0, 1.0, 1, 1, 0.1)
    del record["seconds"]
    with pytest.raises(ValueError, match="seconds"):
        summarise([record], "season_kind")
