"""The two-view pipeline: local features -> matcher -> robust estimator, on two views held in memory.

One pipeline, built from config (conf/features/, conf/matcher/, conf/estimator/, conf/refinement/ and the device),
serves scene inference, the evaluation, the benchmark and the feature cache of training; glue-factory's
`two_view_pipeline` is the model. Scene registration (s2match.inference.registration) calls it on overviews and
full-resolution tiles; the refiner it carries sharpens the tie points of the final fit.

A view is a (C, H, W) float array (reflectance or [0, 1]; NaN = no data), normalised here for the network.
Keypoints on or next to no data (a scene edge, the border of a resampled footprint) are dropped: their contrast is
an artefact that would match across the two images. Pixel convention (OpenCV): (0, 0) is the centre of the
top-left pixel.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from s2match.geo.homography import warp_points
from s2match.models.features import LocalFeatures, build_features
from s2match.models.matchers import LightGlueMatcher, RatioTestMatcher, build_matcher
from s2match.twoview.estimators import FitResult, RobustEstimator
from s2match.twoview.refinement import TiePointRefiner

log = logging.getLogger(__name__)

PHASES = ("extract_s", "match_s", "fit_s", "refine_s")
# The groups of the composed config a pipeline is built from.
PIPELINE_GROUPS = ("features", "matcher", "estimator", "refinement", "registration", "device")


def pipeline_config(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline's groups of a composed config, resolved (the other groups need not resolve)."""
    return {group: OmegaConf.to_container(cfg[group], resolve=True) if OmegaConf.is_config(cfg[group])
            else cfg[group] for group in PIPELINE_GROUPS}


def resolve_device(name: str) -> torch.device:
    """`auto`: a CUDA GPU when one is present, else the CPU; `cpu` / `cuda` as asked (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: no CUDA GPU is available here (use device=auto or device=cpu)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def normalise(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """(C, H, W) float image -> [0, 1] by a robust per-image stretch (percentiles over valid pixels); NaN -> 0.

    Per image, so that a snowy winter scene and a dark summer scene both use the full range the features see."""
    valid = image[np.isfinite(image)]
    if valid.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    lo, hi = np.percentile(valid, [low, high])
    scaled = (image - lo) / max(hi - lo, 1e-6)
    return np.nan_to_num(np.clip(scaled, 0, 1), nan=0.0).astype(np.float32)


def grey(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C', H, W) with C' 1 or 3 (the channels a feature network takes): other counts are averaged."""
    if image.shape[0] in (1, 3):
        return image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        return np.nanmean(image, axis=0, keepdims=True)


def view_size(view: np.ndarray) -> tuple[int, int]:
    """(width, height) of a (C, H, W) view."""
    return int(view.shape[2]), int(view.shape[1])


class Timings(dict):
    """Seconds per phase (PHASES), summed over every call timed into it."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@dataclass
class ViewMatches:
    """Matches of two views (pts0 in view0 px, pts1 in view1 px), their scores and every kept keypoint."""

    pts0: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    pts1: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    keypoints0: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    keypoints1: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    layers: int = 0  # matcher layers run (adaptive depth stops early)

    def mapped(self, to_image0: np.ndarray, to_image1: np.ndarray) -> ViewMatches:
        """The same matches in the pixels of the images the views were cut from (3x3 maps view px -> image px)."""
        return ViewMatches(warp_points(to_image0, self.pts0), warp_points(to_image1, self.pts1), self.scores,
                           warp_points(to_image0, self.keypoints0), warp_points(to_image1, self.keypoints1),
                           self.layers)

    def subset(self, keep: np.ndarray) -> ViewMatches:
        return ViewMatches(self.pts0[keep], self.pts1[keep], self.scores[keep], self.keypoints0, self.keypoints1,
                           self.layers)

    @staticmethod
    def concat(parts: list[ViewMatches]) -> ViewMatches:
        if not parts:
            return ViewMatches()
        arrays = (np.concatenate([getattr(p, name) for p in parts]) for name in
                  ("pts0", "pts1", "scores", "keypoints0", "keypoints1"))
        return ViewMatches(*arrays, layers=max(p.layers for p in parts))


@dataclass(frozen=True)
class TwoViewResult:
    """What the pipeline found on two views: the matches, the robust fit (H view0 px -> view1 px) and the time
    of each phase."""

    matches: ViewMatches
    fit: FitResult
    seconds: dict[str, float]


class KeypointExtractor:
    """A frozen local-feature network on normalised views, keeping only keypoints on valid data."""

    def __init__(self, features: LocalFeatures, border_px: int, device: torch.device) -> None:
        self.features = features.to(device)
        self.border_px = int(border_px)
        self.device = device

    @property
    def name(self) -> str:
        return self.features.name

    def __call__(self, view: np.ndarray, augmentation: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Keypoints (view px), descriptors, scores (and SIFT's scales / oris) of a (C, H, W) view; `augmentation`
        (training's photometric jitter) acts on the normalised image."""
        image = grey(view)
        tensor = torch.from_numpy(normalise(image))[None].to(self.device)
        if augmentation is not None:
            tensor = augmentation(tensor).clamp(0, 1)
        found = self.features(tensor)
        valid = np.all(np.isfinite(image), axis=0).astype(np.uint8)
        if self.border_px > 0:
            valid = cv2.erode(valid, np.ones((2 * self.border_px + 1,) * 2, np.uint8), borderValue=0)
        xy = found["keypoints"].round().long().cpu().numpy()
        height, width = valid.shape
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        keep = inside.copy()
        keep[inside] = valid[xy[inside, 1], xy[inside, 0]] > 0
        keep = torch.from_numpy(keep).to(found["keypoints"].device)
        return {key: value[keep] for key, value in found.items()}


class TwoViewPipeline:
    """extractor -> matcher -> robust estimator, with the tie-point refiner for registration's last step."""

    def __init__(self, extractor: KeypointExtractor, matcher, estimator: RobustEstimator,
                 refiner: TiePointRefiner) -> None:
        self.extractor, self.matcher, self.estimator, self.refiner = extractor, matcher, estimator, refiner

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], extractor: KeypointExtractor | None = None,
                    matcher: LightGlueMatcher | RatioTestMatcher | None = None) -> TwoViewPipeline:
        """Build from a mapping with `features`, `matcher`, `estimator`, `refinement`, `registration` (its
        `border_px`) and `device`: the composed config's groups, or an evaluation method's overrides of them.
        `extractor`, `matcher`: ones already built for these settings (methods that share them share their
        features and matches)."""
        device = resolve_device(str(cfg["device"]))
        if extractor is None:
            extractor = KeypointExtractor(build_features(cfg["features"]), cfg["registration"]["border_px"], device)
        if matcher is None:
            matcher = build_matcher(cfg["matcher"], extractor.name).to(device)
        return cls(extractor, matcher, RobustEstimator.from_config(cfg["estimator"]),
                   TiePointRefiner.from_config(cfg["refinement"]))

    def weights(self) -> dict[str, str | None]:
        """Which matcher weights run: {'weights': trained | pretrained | random | none, 'file': path}."""
        lightglue = getattr(self.matcher, "lightglue", None)
        if lightglue is None:
            return {"weights": "none", "file": None}
        choice = lightglue.weights_choice
        return {"weights": choice.kind, "file": choice.file}

    def describe(self) -> dict[str, Any]:
        return {"features": self.extractor.name, "matcher": self.matcher.name, **self.weights(),
                "device": str(self.extractor.device)}

    def match(self, feats0: dict, feats1: dict, size0: tuple[int, int], size1: tuple[int, int]) -> ViewMatches:
        """Matches of two feature sets of views of `size0` / `size1` (width, height)."""
        kp0 = feats0["keypoints"].double().cpu().numpy().reshape(-1, 2)
        kp1 = feats1["keypoints"].double().cpu().numpy().reshape(-1, 2)
        if len(kp0) == 0 or len(kp1) == 0:
            return ViewMatches(keypoints0=kp0, keypoints1=kp1)
        result = self.matcher.match(feats0, feats1, size0, size1)
        pairs = result["matches"].cpu().numpy()
        return ViewMatches(kp0[pairs[:, 0]], kp1[pairs[:, 1]], result["scores"].cpu().numpy().astype(np.float64),
                           kp0, kp1, int(result["layers"]))

    def __call__(self, view0: np.ndarray, view1: np.ndarray) -> TwoViewResult:
        """Extract, match and fit H (view0 px -> view1 px) on two (C, H, W) views."""
        timings = Timings()
        with timings.phase("extract_s"):
            feats0, feats1 = self.extractor(view0), self.extractor(view1)
        with timings.phase("match_s"):
            matches = self.match(feats0, feats1, view_size(view0), view_size(view1))
        with timings.phase("fit_s"):
            fit = self.estimator.fit(matches.pts0, matches.pts1)
        return TwoViewResult(matches, fit, dict(timings))
