"""Robust estimation of the homography between two views (conf/estimator/), as glue-factory's robust_estimators.

One estimator serves every fit of the project: the coarse and fine stages of scene registration, the evaluation,
the benchmark and training's validation. It wraps OpenCV's USAC / RANSAC and refuses degenerate results, so a
caller never has to second-guess an H it is given.

Pixel convention (OpenCV): (x, y), (0, 0) the centre of the top-left pixel; H maps image0 px to image1 px.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy.stats import f as f_distribution

from s2match.geo.homography import as_points, residuals, warp_points

ROBUST_METHODS = {
    "usac_magsac": cv2.USAC_MAGSAC,
    "usac_accurate": cv2.USAC_ACCURATE,
    "ransac": cv2.RANSAC,
}

# A minimal sample of 4 correspondences always fits exactly, so a fit needs support beyond it to mean anything.
MIN_SAMPLE = 4

# Bounds on the local area scale |det J| of a fitted H at the inlier centroid: outside them the fit has
# collapsed (near-singular) or blown up, which real image pairs never do.
MIN_AREA_SCALE = 1e-4
MAX_AREA_SCALE = 1e4

# simplest: a homography's further parameters are kept only when they explain the residuals at this significance
# (F-test of nested least-squares fits): what chance alone would explain is left to the simpler model...
SIMPLER_MODEL_SIGNIFICANCE = 0.01
# ...and only when they move some tie point by more than this (px): on a same-date pair the noise is so low that
# differences far below what any use can see (0.005 px over a 512 px tile) are significant.
SIMPLER_MODEL_TOLERANCE_PX = 0.02


@dataclass(frozen=True)
class FitResult:
    """Outcome of a robust homography fit.

    H: 3x3 float64 mapping image0 -> image1 pixel coords, or None when the fit failed.
    inliers: bool mask of shape (N,) over the input correspondences (all False on failure).
    reason: why the fit failed; empty on success.
    """

    H: np.ndarray | None
    inliers: np.ndarray
    n_inliers: int
    success: bool
    reason: str = ""


def failure(n_points: int, reason: str) -> FitResult:
    return FitResult(H=None, inliers=np.zeros(n_points, dtype=bool), n_inliers=0, success=False, reason=reason)


def degeneracy(H: np.ndarray, inlier_pts0: np.ndarray) -> str:
    """Why an estimated H is unusable on these inlier points, or '' when it is fine."""
    if not np.all(np.isfinite(H)):
        return "estimated homography is not finite"
    homogeneous = np.c_[inlier_pts0, np.ones(len(inlier_pts0))]
    w = homogeneous @ H[2]
    w_centroid = np.r_[inlier_pts0.mean(axis=0), 1.0] @ H[2]
    if w_centroid == 0 or np.any(np.sign(w) != np.sign(w_centroid)):
        return "estimated homography sends inliers through the line at infinity"
    # Jacobian determinant of a homography at p is det(H) / w(p)^3.
    area_scale = abs(np.linalg.det(H) / w_centroid**3)
    if not MIN_AREA_SCALE <= area_scale <= MAX_AREA_SCALE:
        return f"estimated homography is near-singular (local area scale {area_scale:.3g})"
    return ""


@dataclass(frozen=True)
class RobustEstimator:
    """Robust homography fit with pts1 ~ H(pts0) (conf/estimator/: OpenCV USAC MAGSAC++ by default).

    threshold: inlier reprojection threshold in image1 px; min_inliers: fewer inliers is no reliable transform.
    """

    method: str
    threshold: float
    confidence: float
    max_iters: int
    min_inliers: int

    def __post_init__(self) -> None:
        if self.method not in ROBUST_METHODS:
            raise ValueError(f"estimator.method: unknown {self.method!r}, expected one of {sorted(ROBUST_METHODS)}")
        if self.threshold <= 0:
            raise ValueError(f"estimator.threshold must be > 0 px, got {self.threshold}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RobustEstimator:
        return cls(str(cfg["method"]), float(cfg["threshold"]), float(cfg["confidence"]), int(cfg["max_iters"]),
                   int(cfg["min_inliers"]))

    def fit(self, pts0, pts1, threshold: float | None = None) -> FitResult:
        """Robust fit with the configured inlier threshold, or `threshold` px (e.g. wider for coarse overviews).

        Degenerate data (too few points, non-finite coords, collinear points, an H that is not finite or
        near-singular) never raises: it returns a FitResult with success False and a reason. Malformed arguments
        (wrong shapes) raise ValueError.
        """
        pts0, pts1 = _pair(pts0, pts1)
        unusable = self._unusable(pts0, pts1)
        if unusable:
            return unusable
        try:
            H, mask = cv2.findHomography(pts0, pts1, ROBUST_METHODS[self.method], threshold or self.threshold,
                                         maxIters=self.max_iters, confidence=self.confidence)
        except cv2.error as error:
            return failure(len(pts0), f"OpenCV findHomography failed: {str(error).strip().splitlines()[-1]}")
        if H is None or mask is None:
            return failure(len(pts0), "no homography found (degenerate configuration, e.g. collinear points)")
        return self._checked(np.asarray(H, np.float64), mask.ravel().astype(bool), pts0)

    @staticmethod
    def simplest(pts0, pts1) -> tuple[np.ndarray, str]:
        """The simplest transform that explains inlier correspondences pts1 ~ T(pts0) as well as a homography, fitted
        by least squares: a shift, else an affine map, unless a homography's further parameters are significant
        (F-test of the nested fits at SIMPLER_MODEL_SIGNIFICANCE) and move some tie point by more than
        SIMPLER_MODEL_TOLERANCE_PX. Returns the transform and 'shift', 'affine' or 'homography'. Two dates of one
        Sentinel-2 grid differ by a shift, and two parameters are known far better than eight from the same few,
        noisy tie points of two seasons (the corners are where the other parameters' noise shows). The
        correspondences are inliers already (a robust fit chose them), so least squares uses every one of them."""
        pts0, pts1 = _pair(pts0, pts1)
        design = np.c_[pts0, np.ones(len(pts0))]
        affine = np.vstack([np.linalg.lstsq(design, pts1, rcond=None)[0].T, [0.0, 0.0, 1.0]])
        shift = np.eye(3)
        shift[:2, 2] = np.mean(pts1 - pts0, axis=0)
        free = 2 * len(pts0) - 8
        homography, _ = cv2.findHomography(pts0, pts1, 0)
        if free <= 0 or homography is None or degeneracy(homography, pts0):
            return affine, "affine"  # too few or degenerate points for eight parameters
        homography = np.asarray(homography, np.float64)
        full_squares = float(np.sum(residuals(homography, pts0, pts1) ** 2))
        fitted = warp_points(homography, pts0)
        for name, simple, parameters in (("shift", shift, 2), ("affine", affine, 6)):
            squares = float(np.sum(residuals(simple, pts0, pts1) ** 2))
            f_statistic = (squares - full_squares) / (8 - parameters) / max(full_squares / free, 1e-300)
            difference = np.max(np.linalg.norm(warp_points(simple, pts0) - fitted, axis=1))
            if (f_statistic < f_distribution.ppf(1 - SIMPLER_MODEL_SIGNIFICANCE, 8 - parameters, free)
                    or difference <= SIMPLER_MODEL_TOLERANCE_PX):
                return simple, name
        return homography, "homography"

    def fit_affine(self, pts0, pts1, threshold: float | None = None) -> FitResult:
        """Robust affine fit pts1 ~ A(pts0) (RANSAC, then Levenberg-Marquardt on the inliers) as a 3x3 matrix, with
        the same minimum support and failure rules as `fit`."""
        pts0, pts1 = _pair(pts0, pts1)
        unusable = self._unusable(pts0, pts1)
        if unusable:
            return unusable
        A, mask = cv2.estimateAffine2D(pts0, pts1, method=cv2.RANSAC, ransacReprojThreshold=threshold or self.threshold,
                                       maxIters=self.max_iters, confidence=self.confidence, refineIters=10)
        if A is None or mask is None:
            return failure(len(pts0), "no affine transform found (degenerate configuration, e.g. collinear points)")
        return self._checked(np.vstack([A, [0.0, 0.0, 1.0]]), mask.ravel().astype(bool), pts0)

    def _unusable(self, pts0: np.ndarray, pts1: np.ndarray) -> FitResult | None:
        """The failure of a fit on correspondences too few or not finite, or None when they can be fitted."""
        needed = max(MIN_SAMPLE, self.min_inliers)
        if len(pts0) < needed:
            return failure(len(pts0), f"{len(pts0)} correspondences, need at least {needed}")
        if not (np.all(np.isfinite(pts0)) and np.all(np.isfinite(pts1))):
            return failure(len(pts0), "correspondences contain non-finite coordinates")
        return None

    def _checked(self, H: np.ndarray, inliers: np.ndarray, pts0: np.ndarray) -> FitResult:
        needed = max(MIN_SAMPLE, self.min_inliers)
        n_inliers = int(inliers.sum())
        if n_inliers < needed:
            return failure(len(pts0), f"{n_inliers} inliers, need at least {needed}")
        reason = degeneracy(H, pts0[inliers])
        if reason:
            return failure(len(pts0), reason)
        return FitResult(H=H, inliers=inliers, n_inliers=n_inliers, success=True)


def _pair(pts0, pts1) -> tuple[np.ndarray, np.ndarray]:
    pts0, pts1 = as_points(pts0, "pts0"), as_points(pts1, "pts1")
    if len(pts0) != len(pts1):
        raise ValueError(f"pts0 and pts1 differ in length: {len(pts0)} vs {len(pts1)}")
    return pts0, pts1
