"""One pair of dates registered by a worker: the project's one registration path (`register`), with the pipeline
built once per worker and the features of recently seen views kept, so that the reference's views, in every star
pair a worker runs, are extracted once."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from s2match.geo.homography import warp_points
from s2match.inference.registration import FeatureCache, Registration, RegistrationSettings, register
from s2match.inference.scenes import Scene
from s2match.timeseries.graph import Edge, EdgeResult
from s2match.twoview.pipeline import TwoViewPipeline


# The entries of H (row-major, H[2, 2] = 1) each model of the last fit leaves free: a homography's eight, an
# affine map's first six, a shift's translation.
FREE_ENTRIES = {"homography": (0, 1, 2, 3, 4, 5, 6, 7), "affine": (0, 1, 2, 3, 4, 5), "shift": (2, 5)}


def support_points(registration: Registration) -> tuple[np.ndarray, np.ndarray]:
    """The tie points the final transform was fitted on (refined ones, or the matcher's inliers)."""
    if registration.report.get("fitted_on") == "refined tie points":
        kept = registration.tie_points.status == "ok"
        return registration.tie_points.pts0[kept], registration.tie_points.pts1[kept]
    return registration.matches.pts0[registration.inliers], registration.matches.pts1[registration.inliers]


def _jacobian(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2, 8) derivatives of H(p) with respect to the 8 entries of H (H[2, 2] = 1)."""
    x, y = pts[:, 0], pts[:, 1]
    w = H[2, 0] * x + H[2, 1] * y + 1.0
    u = (H[0, 0] * x + H[0, 1] * y + H[0, 2]) / w
    v = (H[1, 0] * x + H[1, 1] * y + H[1, 2]) / w
    zero, one = np.zeros_like(x), np.ones_like(x)
    du = np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], axis=1) / w[:, None]
    dv = np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], axis=1) / w[:, None]
    return np.stack([du, dv], axis=1)


def fitted_model(registration: Registration) -> str:
    """The model of the last fit: the one chosen on the refined tie points (a shift, an affine map or a homography),
    else the matcher's homography."""
    if registration.report.get("fitted_on") == "refined tie points":
        return registration.report["refinement"]["model"]
    return "homography"


def frame_sigma(H: np.ndarray, pts0: np.ndarray, pts1: np.ndarray, size: tuple[int, int],
                model: str = "homography") -> float:
    """Precision of a fitted transform over image0's frame: the standard error (px of image1) of where it puts the
    frame's corners and centre, from the fit's residuals and the tie points' number and spread (least-squares
    covariance, linearised in the entries of H the last fit's `model` left free: FREE_ENTRIES). Tie points bunched
    in one part of the frame leave the rest poorly known, which the residuals alone do not show. Computed in
    coordinates centred on the frame and scaled by its size."""
    free = list(FREE_ENTRIES[model])
    dof = len(free)
    if len(pts0) <= dof // 2:
        return math.inf
    width, height = size
    to_unit = np.array([[2.0 / width, 0.0, -1.0], [0.0, 2.0 / height, -1.0], [0.0, 0.0, 1.0]])
    H_unit = H @ np.linalg.inv(to_unit)
    H_unit = H_unit / H_unit[2, 2]
    unit0 = warp_points(to_unit, pts0)
    jacobian = _jacobian(H_unit, unit0)[:, :, free].reshape(-1, dof)
    variance = float(np.sum((warp_points(H_unit, unit0) - pts1) ** 2)) / (2 * len(pts0) - dof)
    normal = jacobian.T @ jacobian
    if np.linalg.cond(normal) > 1e12:
        return math.inf
    covariance = variance * np.linalg.inv(normal)
    probes = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])
    spread = [np.trace(j @ covariance @ j.T) for j in _jacobian(H_unit, probes)[:, :, free]]
    return float(math.sqrt(max(spread)))


class RecentFeatures(FeatureCache):
    """A FeatureCache that keeps the `entries` most recently used views' features (a worker's memory stays bounded
    over a long stack; the reference's views, used by every star pair, stay)."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self.entries = int(entries)

    def __getitem__(self, key):
        value = super().pop(key)
        super().__setitem__(key, value)  # most recent last
        return value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        while len(self) > self.entries:
            del self[next(iter(self))]


@dataclass(frozen=True)
class MatcherSpec:
    """What a worker builds its PairMatcher from: the pipeline's config groups (s2match.twoview.pipeline_config,
    the registration group among them) and how many views' features it keeps."""

    pipeline: Mapping[str, Any]
    cache_entries: int


class PairMatcher:
    """The registration pipeline of one worker process, built once and used by every pair it registers."""

    def __init__(self, spec: MatcherSpec) -> None:
        self.pipeline = TwoViewPipeline.from_config(spec.pipeline)
        self.settings = RegistrationSettings.from_config(spec.pipeline["registration"])
        self.cache = RecentFeatures(spec.cache_entries)
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{id(self.pipeline):x}"
        weights = self.pipeline.weights()
        self.weights = f"{weights['weights']} {weights['file'] or ''}".strip()

    def __call__(self, edge: Edge, image0: Scene, image1: Scene, worker: str) -> EdgeResult:
        """Register image1 (the edge's target) onto image0 (its source): H source px -> target px."""
        start = time.perf_counter()
        registration = register(image0, image1, self.pipeline, self.settings, self.cache)
        report = registration.report
        shift = report.get("shift_px", {}).get("median", [np.nan, np.nan])
        sigma = (frame_sigma(registration.H, *support_points(registration), image0.size, fitted_model(registration))
                 if registration.H is not None else math.inf)
        return EdgeResult(edge, bool(report["success"]), report["reason"], registration.H,
                          int(report.get("inliers", 0)), float(report.get("residuals_px", {}).get("rmse", np.nan)),
                          sigma, (float(shift[0]), float(shift[1])), time.perf_counter() - start, worker,
                          self.identity, self.weights)
