"""Homography evaluation metrics as LightGlue / SuperGlue report them on HPatches.

Pixel convention (OpenCV): (0, 0) is the centre of the top-left pixel; H maps image0 to image1 pixel coords.
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd

from s2match.geo.homography import corner_pixels, residuals, warp_points

AUC_THRESHOLDS = (1, 3, 5, 10)

# Keys every per-pair record passed to `summarise` must carry (besides the grouping keys).
RECORD_KEYS = ("corner_error", "precision", "n_matches", "n_inliers", "seconds")


def mean_corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, width: int, height: int) -> float:
    """Mean distance (image1 px) between the 4 corner-pixel centres of image0 mapped by H_est and by H_gt.

    inf when H_est is None or maps a corner to a non-finite point (the estimation failed).
    """
    if H_est is None:
        return float("inf")
    corners = corner_pixels(width, height)
    error = np.linalg.norm(warp_points(H_est, corners) - warp_points(H_gt, corners), axis=1).mean()
    return float(error) if np.isfinite(error) else float("inf")


def auc(errors, thresholds: Sequence[float] = AUC_THRESHOLDS) -> dict[str, float]:
    """Area under the cumulative error curve up to each threshold, in [0, 100], keyed 'auc@<t>'.

    SuperGlue / LightGlue `cal_error_auc`: sort the errors, recall i/N at the i-th error, prepend (0, 0),
    integrate with trapezoids up to t (the curve held flat from the last error below t), divide by t.
    Failures (inf) are never recalled, so they lower every AUC. No errors at all gives NaN.
    """
    errors = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    if np.any(np.isnan(errors)) or np.any(errors < 0):
        raise ValueError("errors must be non-negative numbers or inf (for failures), got NaN or negatives")
    if len(errors) == 0:
        return {f"auc@{t:g}": float("nan") for t in thresholds}
    recall = np.r_[0.0, np.arange(1, len(errors) + 1) / len(errors)]
    errors = np.r_[0.0, errors]
    result = {}
    for t in thresholds:
        below = np.searchsorted(errors, t)
        curve_recall = np.r_[recall[:below], recall[below - 1]]
        curve_error = np.r_[errors[:below], t]
        result[f"auc@{t:g}"] = float(100.0 * np.trapezoid(curve_recall, x=curve_error) / t)
    return result


def match_precision(kpts0, kpts1, H_gt: np.ndarray, threshold: float = 3.0) -> float:
    """Fraction of matches (kpts0[i], kpts1[i]) with ||H_gt(kpts0[i]) - kpts1[i]|| < threshold (image1 px).

    No matches gives 0.0, not NaN: as in LightGlue's evaluation, a method that returns nothing earns no
    precision, so averages over pairs penalise empty outputs instead of skipping them.
    """
    errors = residuals(H_gt, kpts0, kpts1)
    if len(errors) == 0:
        return 0.0
    return float(np.mean(errors < threshold))


def _aggregate(frame: pd.DataFrame, thresholds: Sequence[float]) -> dict[str, float]:
    corner_error = frame["corner_error"].to_numpy(dtype=np.float64)
    return {
        "n_pairs": len(frame),
        **auc(corner_error, thresholds),
        "precision": frame["precision"].mean(),
        "mean_matches": frame["n_matches"].mean(),
        "mean_inliers": frame["n_inliers"].mean(),
        "failure_rate": float(np.mean(~np.isfinite(corner_error))),
        "median_seconds": frame["seconds"].median(),
    }


def summarise(
    records: Sequence[dict],
    group_key: str,
    by: str | None = None,
    thresholds: Sequence[float] = AUC_THRESHOLDS,
) -> pd.DataFrame:
    """Aggregate per-pair records per `group_key` value plus an overall group named 'all'.

    Each record is a dict with `group_key`, `by` (when given) and RECORD_KEYS: corner_error (inf for a failed
    estimation), precision, n_matches, n_inliers, seconds. With `by` (e.g. 'method') the groups are formed
    within each `by` value, so 'all' never mixes methods. Returns one row per group, indexed by
    [by,] group_key, with columns n_pairs, auc@<t>..., precision, mean_matches, mean_inliers, failure_rate,
    median_seconds.
    """
    if len(records) == 0:
        raise ValueError("summarise needs at least one record")
    frame = pd.DataFrame.from_records(records)
    keys = [by, group_key] if by is not None else [group_key]
    missing = [key for key in (*keys, *RECORD_KEYS) if key not in frame.columns]
    if missing:
        raise ValueError(f"records lack keys {missing}; each record needs {[*keys, *RECORD_KEYS]}")
    outer_groups = frame.groupby(by, sort=True) if by is not None else [(None, frame)]
    rows = []
    for outer, outer_frame in outer_groups:
        prefix = {by: outer} if by is not None else {}
        for group, group_frame in outer_frame.groupby(group_key, sort=True):
            rows.append({**prefix, group_key: group, **_aggregate(group_frame, thresholds)})
        rows.append({**prefix, group_key: "all", **_aggregate(outer_frame, thresholds)})
    return pd.DataFrame(rows).set_index(keys)
