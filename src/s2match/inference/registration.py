"""Register two scenes: the homography image0 px -> image1 px, coarse to fine, refined to a fraction of a pixel.

The one registration path: `src/infer.py`, the `evaluate` stage, the benchmark and the time-series
co-registration all call `register`, so what the evaluation measures is what users get.

1. Prior: with both images georeferenced, pixel of image0 -> map -> image1's CRS -> pixel of image1 (a homography
   fitted to it), which also gives the overlap and the orientation. Without, none.
2. Coarse: image0's overlap and image1 (resampled into image0's frame by the prior) at ~`coarse_size` px, matched
   by the two-view pipeline and robustly fitted. When that fit is weak, image1 is also tried with its contrast
   inverted (snow-covered fields can turn dark against their hedges) and, without a prior to fix the
   orientation, at the other right angles; the candidate with most inliers is kept.
3. Second pass (`second_pass`; `auto`: where the coarse overview is coarser than the image): up to
   `max_tiles` full-resolution tiles of image0 (spread over the overlap, most coarse inliers then most texture);
   for each, image1 is resampled into the tile's frame by the coarse transform (only the window it needs is
   read), so the matcher sees two nearly aligned views at equal scale and orientation; matches go back to
   full-resolution pixels of both images and one robust fit takes them all.
4. Refinement (`refine`): image1 is resampled into each tile by that fit, and each inlier tie point is refined
   by area correlation (s2match.twoview.refinement); a robust affine correction of that fit says which refined
   shifts agree. The final H is fitted to those inlier tie points alone, by least squares: the simplest transform
   they support, a shift (two dates of one Sentinel-2 grid), an affine map, or a homography. The matcher's fit
   only places the windows, so its own errors (a perspective a correction would have to undo) do not reach the
   result; `refine_passes` - 1 more passes place them by the refined fit. Where the matcher ties too few points
   for a fit (clouds, snow, coarse overviews), or its tie points do not correlate under its fit (`grid_windows`),
   two georeferenced scenes get windows on a regular grid over the overlap instead, placed by the georeference, as
   AROSICS places its windows. Where the coarse match failed and the fine tiles followed the georeference, a fit
   of their matches that area correlation does not confirm is no registration.

Steps 2-4 are tried in turn (RegistrationSettings.attempts) until area correlation confirms a fit: an image the
coarse overview holds whole is matched first at `quick_scale` of its resolution (half the time: the refinement
brings the fit to full resolution; kept on `quick_min_tie_points` tie points), then at full resolution, then
(second_pass=auto) with the second pass on the pair rectified by that fit. Whole scenes are tried once. The result
is the first try kept, else the confirmed one on most tie points; the report's `attempts` lists the tries.

Pixel convention (OpenCV): (x, y), (0, 0) the centre of the top-left pixel; boxes (x0, y0, x1, y1) in pixel edges.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from s2match.geo.georef import frame_corners, map_shift_metres, overlap_box, prior_homography
from s2match.geo.homography import residuals, warp_image, warp_points
from s2match.inference.scenes import Box, Scene, box_to_pixels, overview_factor
from s2match.twoview.estimators import FitResult, failure
from s2match.twoview.pipeline import Timings, TwoViewPipeline, ViewMatches, grey, normalise, view_size
from s2match.twoview.refinement import REASONS, STATUS_DTYPE

log = logging.getLogger(__name__)

# Image1 windows are padded by this many pixels so bilinear resampling has both neighbours at the edge.
WINDOW_PAD_PX = 2
# A tile narrower than this share of tile_size (at the overlap's edge) has too little content to match.
MIN_TILE_FRACTION = 0.25
QUARTER_TURNS = (0, 1, 2, 3)
# Image1 is read coarser than native for a view only from this many image1 px per view px (guided_view).
READ_COARSER_ABOVE = 1.5
# Windows on a grid placed by the georeference: the share of those with data that must agree on the correction.
# Under a wrong placement a few smooth windows still correlate by chance (20 of 2704 on a whole upsampled tile);
# a right one is confirmed by several percent of them even under clouds.
GRID_MIN_SHARE = 0.02
# second_pass=auto: coarse matches coarser than this (image0 px per overview px: whole scenes) are brought to full
# resolution by the second pass; finer ones (small images, matched whole) are within the refinement's reach.
AUTO_SECOND_PASS_SCALE = 1.5


class Try(NamedTuple):
    """One try of a registration: the coarse overviews' size (px), whether the second pass runs, and the tie points
    the refined fit needs for the try to be kept."""

    overview_px: int
    second_pass: bool
    min_tie_points: int = 0


@dataclass(frozen=True)
class RegistrationSettings:
    """conf/registration/: see the module docstring. `search_accept`: inliers of the upright, same-contrast coarse
    fit above which no other orientation (`search_orientation`) or contrast (`search_contrast`) is tried;
    `refined_threshold`: inlier threshold (px) of the correction fitted to the refined tie points; `refine_passes`:
    refinements in a row, each with image1 placed by the fit of the one before; `quick_scale`,
    `quick_min_tie_points`: see `attempts`."""

    coarse_size: int
    tile_size: int
    max_tiles: int
    guide_tolerance: float
    min_valid: float
    second_pass: bool | str  # true | false | "auto"
    refine: bool
    grid_windows: bool
    search_orientation: bool
    search_contrast: bool
    search_accept: int
    refined_threshold: float
    refine_passes: int
    quick_scale: float | None
    quick_min_tie_points: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RegistrationSettings:
        if cfg["second_pass"] not in (True, False, "auto"):
            raise ValueError(f"registration.second_pass={cfg['second_pass']}: expected true, false or auto")
        if int(cfg["refine_passes"]) < 1:
            raise ValueError(f"registration.refine_passes={cfg['refine_passes']}: expected 1 or more")
        quick = cfg["quick_scale"]
        number = isinstance(quick, int | float) and not isinstance(quick, bool)
        if quick is not None and not (number and 0 < quick < 1):
            raise ValueError(f"registration.quick_scale={cfg['quick_scale']}: expected a number in (0, 1) or null")
        least = cfg["quick_min_tie_points"]
        if not isinstance(least, int) or isinstance(least, bool) or least < 0:
            raise ValueError(f"registration.quick_min_tie_points={least}: expected an integer >= 0")
        return cls(**{name: cfg[name] for name in cls.__dataclass_fields__})

    def attempts(self, box0: Box) -> list[Try]:
        """The tries of a registration of the overlap `box0`, in turn until area correlation confirms one (the
        refinement's fit is used, on at least `min_tie_points`). With the refinement on, an overlap the coarse
        overview holds about whole (no second pass) is first matched at `quick_scale` of its resolution: at about
        half the cost, and the refinement brings that fit to full resolution; it is kept only on
        `quick_min_tie_points` tie points (thinner support the full resolution widens: 22 against 68 tie points on
        a winter date of T36UYA). Then at `coarse_size`; with second_pass=auto, whole scenes (an overview coarser
        than the image) get the second pass, and a smaller image gets it too as the last try, with image1
        rectified by the whole-image fit."""
        factor = overview_factor(box0, self.coarse_size)
        second = self.second_pass is True or (self.second_pass == "auto" and factor > AUTO_SECOND_PASS_SCALE)
        tries = [Try(self.coarse_size, second)]
        if self.refine and not second:
            if self.quick_scale is not None:
                quick_px = max(1, round(self.quick_scale * max(box0[2] - box0[0], box0[3] - box0[1]) / factor))
                tries.insert(0, Try(quick_px, False, self.quick_min_tie_points))
            if self.second_pass == "auto":
                tries.append(Try(self.coarse_size, True))
        return tries


@dataclass
class TiePoints:
    """Refined tie points in full-resolution px of both images, their correlation quality and status."""

    pts0: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    pts1: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    quality: np.ndarray = field(default_factory=lambda: np.zeros(0))
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=STATUS_DTYPE))

    @property
    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """The tie points still "ok" (reliable, and not rejected as outliers of a fit): what a fit rests on."""
        kept = self.status == "ok"
        return self.pts0[kept], self.pts1[kept]

    @staticmethod
    def concat(parts: list[TiePoints]) -> TiePoints:
        if not parts:
            return TiePoints()
        return TiePoints(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                           ("pts0", "pts1", "quality", "status")))


@dataclass
class Registration:
    """Everything a registration produced; `report` is what result.json holds. `matches` are the matcher's (full-res
    px), `inliers` their mask under the matcher fit; `tie_points` the refined ones (all windows, with status)."""

    report: dict
    matches: ViewMatches
    inliers: np.ndarray
    H: np.ndarray | None
    tie_points: TiePoints
    tiles: list[Box]
    timings: dict[str, float]

    @property
    def success(self) -> bool:
        return bool(self.report["success"])


class FeatureCache(dict):
    """Features of views already extracted, keyed by (scene name, box, size, how the view was made), and matches of
    two such views by one matcher: the second pass on a scene no larger than the coarse overview reuses image0's
    features, and evaluation methods that share an extractor (and a matcher) share them. Each entry keeps the
    seconds it took, charged again on every reuse (as `reused_s` too, so that a registration's total is what it
    would have cost alone)."""

    def features(self, pipeline: TwoViewPipeline, key: tuple, view: np.ndarray, timings: Timings) -> dict:
        full_key = ("features", pipeline.extractor.name, id(pipeline.extractor), *key)
        return self._reused(full_key, lambda: pipeline.extractor(view), "extract_s", timings)

    def matches(self, pipeline: TwoViewPipeline, key0: tuple, key1: tuple, feats0: dict, feats1: dict,
                sizes: tuple[tuple[int, int], tuple[int, int]], timings: Timings) -> ViewMatches:
        full_key = ("matches", id(pipeline.extractor), id(pipeline.matcher), key0, key1)
        return self._reused(full_key, lambda: pipeline.match(feats0, feats1, *sizes), "match_s", timings)

    def _reused(self, key: tuple, compute, phase: str, timings: Timings):
        if key in self:
            value, seconds = self[key]
            timings["reused_s"] = timings.get("reused_s", 0.0) + seconds
        else:
            start = time.perf_counter()
            value = compute()
            seconds = time.perf_counter() - start
            self[key] = (value, seconds)
        timings[phase] = timings.get(phase, 0.0) + seconds
        return value


def area_scale(H: np.ndarray, point: np.ndarray) -> float:
    """Local linear scale of H at a point: sqrt |det J| (det J = det H / w^3)."""
    w = np.r_[point, 1.0] @ H[2]
    return math.sqrt(abs(np.linalg.det(H) / w**3))


def guided_view(image1: Scene, guide: np.ndarray, box0: Box, out_size: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Image1 resampled into the frame of image0's `box0` at `out_size` (w, h), following `guide` (image0 px ->
    image1 px): only the window of image1 the frame maps to is read, at about the frame's resolution. Returns the
    view and its 3x3 map from view pixels to image1 pixels, or None when the frame misses image1."""
    view_to_image1 = guide @ box_to_pixels(box0, out_size)
    corners = warp_points(view_to_image1, frame_corners(*out_size))
    if not np.all(np.isfinite(corners)):
        return None
    width1, height1 = image1.size
    x0, y0 = np.floor(corners.min(axis=0) + 0.5) - WINDOW_PAD_PX
    x1, y1 = np.ceil(corners.max(axis=0) + 0.5) + WINDOW_PAD_PX
    box1 = (int(max(x0, 0)), int(max(y0, 0)), int(min(x1, width1)), int(min(y1, height1)))
    if box1[2] <= box1[0] or box1[3] <= box1[1]:
        return None
    # Image1 pixels per view pixel: read coarser only when image1 is much finer than the view (against aliasing);
    # near-equal grids are resampled once, from native pixels, which keeps the finest detail for the refinement.
    scale = area_scale(view_to_image1, np.array(out_size) / 2.0)
    factor = scale if scale >= READ_COARSER_ABOVE else 1.0
    read_size = (max(1, math.ceil((box1[2] - box1[0]) / factor)), max(1, math.ceil((box1[3] - box1[1]) / factor)))
    window = image1.read(box1, read_size)
    window_to_view = np.linalg.inv(view_to_image1) @ box_to_pixels(box1, read_size)
    view = warp_image(np.moveaxis(window, 0, -1), window_to_view, out_size)
    view = view.reshape(out_size[1], out_size[0], -1)
    return np.moveaxis(view, -1, 0), view_to_image1


def turned(view: np.ndarray, quarter_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """The (C, H, W) view turned by quarter_turns x 90 degrees counter-clockwise (np.rot90, exact) and the 3x3 map
    from pixels of the turned view to pixels of the view."""
    height, width = view.shape[1:]
    if quarter_turns % 4 == 0:
        return view, np.eye(3)
    # Where three pixels of the view land once turned gives the affine map exactly.
    index = np.arange(width * height, dtype=np.int64).reshape(height, width)
    moved = np.rot90(index, quarter_turns)
    samples = np.array([[0, 0], [moved.shape[1] - 1, 0], [0, moved.shape[0] - 1]])
    source = np.array([[moved[y, x] % width, moved[y, x] // width] for x, y in samples], dtype=np.float32)
    to_view = cv2.getAffineTransform(samples.astype(np.float32), source)
    return np.ascontiguousarray(np.rot90(view, quarter_turns, axes=(1, 2))), np.r_[to_view, [[0, 0, 1]]]


def candidate_tiles(box0: Box, tile_size: int) -> list[Box]:
    """Full-resolution tiles (pixel-edge boxes) covering box0; slivers narrower than a quarter tile are left out
    (a box0 narrower than that gives tiles of its whole width)."""
    x0, y0, x1, y1 = box0
    quarter = max(1, int(tile_size * MIN_TILE_FRACTION))
    min_width, min_height = min(quarter, x1 - x0), min(quarter, y1 - y0)
    tiles = []
    for ty in range(y0, y1, tile_size):
        for tx in range(x0, x1, tile_size):
            tile = (tx, ty, min(tx + tile_size, x1), min(ty + tile_size, y1))
            if tile[2] - tile[0] >= min_width and tile[3] - tile[1] >= min_height:
                tiles.append(tile)
    return tiles


def tile_scores(tiles: list[Box], overview0: np.ndarray, overview_box: Box, guide: np.ndarray,
                size1: tuple[int, int], support_pts0: np.ndarray) -> dict[str, np.ndarray]:
    """Per tile, from image0's overview and the coarse stage: `valid` share (image0 has data and the guide maps the
    pixel into image1), `texture` (mean gradient magnitude of the normalised overview over valid pixels) and
    `support` (coarse inliers inside: ground that matched across the dates, where texture alone would also pick
    clouds)."""
    height, width = overview0.shape[1:]
    to_image0 = box_to_pixels(overview_box, (width, height))
    flat = normalise(grey(overview0))[0] if overview0.shape[0] == 1 else normalise(grey(overview0)).mean(0)
    gradient = np.hypot(cv2.Sobel(flat, cv2.CV_32F, 1, 0), cv2.Sobel(flat, cv2.CV_32F, 0, 1))
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    in1 = warp_points(guide @ to_image0, np.c_[u.ravel(), v.ravel()]).reshape(height, width, 2)
    valid = (np.all(np.isfinite(overview0), axis=0) & (in1[..., 0] >= -0.5) & (in1[..., 0] <= size1[0] - 0.5)
             & (in1[..., 1] >= -0.5) & (in1[..., 1] <= size1[1] - 0.5))
    to_overview = np.linalg.inv(to_image0)
    scores: dict[str, list[float]] = {"valid": [], "texture": [], "support": []}
    for tile in tiles:
        (c0, r0), (c1, r1) = warp_points(to_overview, np.array([tile[:2], tile[2:]], float) - 0.5) + 0.5
        rows = slice(int(np.clip(round(r0), 0, height - 1)), int(np.clip(round(r1), 1, height)))
        cols = slice(int(np.clip(round(c0), 0, width - 1)), int(np.clip(round(c1), 1, width)))
        cell = valid[rows, cols]
        scores["valid"].append(float(cell.mean()) if cell.size else 0.0)
        scores["texture"].append(float(gradient[rows, cols][cell].mean()) if cell.any() else 0.0)
        scores["support"].append(float(np.sum(inside_box(support_pts0, tile))))
    return {key: np.array(values) for key, values in scores.items()}


def inside_box(pts: np.ndarray, box: Box) -> np.ndarray:
    """Mask of the points (pixel centres) that lie in a pixel-edge box."""
    x, y = pts[:, 0] + 0.5, pts[:, 1] + 0.5
    return (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])


def select_tiles(tiles: list[Box], scores: dict[str, np.ndarray], box0: Box, max_tiles: int,
                 min_valid: float) -> list[int]:
    """Indices of at most max_tiles tiles: the overlap is cut into a near-square grid of max_tiles cells and each
    cell gives its best tile with enough valid data (spread), then the best of the rest fill up. Best = most coarse
    inliers, then most textured."""
    rank = {i: (scores["support"][i], scores["texture"][i]) for i in range(len(tiles))}
    eligible = sorted((i for i in rank if scores["valid"][i] >= min_valid), key=lambda i: rank[i], reverse=True)
    if len(eligible) <= max_tiles:
        return eligible
    x0, y0, x1, y1 = box0
    aspect = (x1 - x0) / max(y1 - y0, 1)
    cols = max(1, min(max_tiles, round(math.sqrt(max_tiles * aspect))))
    rows = max(1, max_tiles // cols)
    best: dict[tuple[int, int], int] = {}
    for i in eligible:  # best first: a cell keeps the first tile it sees
        cx, cy = (tiles[i][0] + tiles[i][2]) / 2, (tiles[i][1] + tiles[i][3]) / 2
        best.setdefault((min(int((cy - y0) / (y1 - y0) * rows), rows - 1),
                         min(int((cx - x0) / (x1 - x0) * cols), cols - 1)), i)
    chosen = sorted(best.values(), key=lambda i: rank[i], reverse=True)[:max_tiles]
    rest = [i for i in eligible if i not in chosen]
    return chosen + rest[: max_tiles - len(chosen)]


@dataclass(frozen=True)
class ViewOfImage1:
    """How a coarse candidate shows image1: turned by quarter_turns x 90 degrees (None: resampled by the prior)
    and with its contrast inverted or not."""

    quarter_turns: int | None
    inverted: bool

    def apply(self, view: np.ndarray) -> np.ndarray:
        return -view if self.inverted else view


@dataclass
class _Coarse:
    matches: ViewMatches  # full-res px
    fit: FitResult
    overview0: np.ndarray
    threshold: float  # px of image1 the fit used
    how: ViewOfImage1


@dataclass
class _Refined:
    """One refinement pass: the tie points (status "outlier" where the correction rejects them), the robust
    correction that chose them, and the simplest transform fitted to its inliers."""

    tie_points: TiePoints
    correction: FitResult
    summary: dict
    H: np.ndarray | None = None
    model: str = ""


class _Registrar:
    """One registration: the two scenes, the pipeline, the settings, the timings and the feature cache."""

    def __init__(self, image0: Scene, image1: Scene, pipeline: TwoViewPipeline, settings: RegistrationSettings,
                 cache: FeatureCache | None) -> None:
        self.image0, self.image1, self.pipeline, self.settings = image0, image1, pipeline, settings
        self.cache = cache if cache is not None else FeatureCache()
        self.timings = Timings()

    def view_key(self, side: int, box: Box, view: np.ndarray, how: ViewOfImage1 | None = None,
                 guide: np.ndarray | None = None) -> tuple:
        """What identifies a view: its scene, box, size and how it was made (turned, inverted, resampled by)."""
        scene = self.image0 if side == 0 else self.image1
        return scene.name, box, view_size(view), how, None if guide is None else guide.round(9).tobytes()

    def features(self, key: tuple, view: np.ndarray) -> dict:
        return self.cache.features(self.pipeline, key, view, self.timings)

    def match(self, key0: tuple, feats0: dict, key1: tuple, feats1: dict) -> ViewMatches:
        return self.cache.matches(self.pipeline, key0, key1, feats0, feats1, (key0[2], key1[2]), self.timings)

    def fit(self, pts0: np.ndarray, pts1: np.ndarray, threshold: float | None = None) -> FitResult:
        with self.timings.phase("fit_s"):
            return self.pipeline.estimator.fit(pts0, pts1, threshold)

    def fit_affine(self, pts0: np.ndarray, pts1: np.ndarray, threshold: float) -> FitResult:
        with self.timings.phase("fit_s"):
            return self.pipeline.estimator.fit_affine(pts0, pts1, threshold)

    def coarse(self, box0: Box, prior: np.ndarray | None, overview_size: int) -> _Coarse:
        """Match image0's `box0` and image1 at ~overview_size px; see the module docstring."""
        settings, estimator = self.settings, self.pipeline.estimator
        view0, to_image0 = self.image0.overview(box0, overview_size)
        out_size = view_size(view0)
        key0 = self.view_key(0, box0, view0)
        feats0 = self.features(key0, view0)
        polarities = (False, True) if settings.search_contrast else (False,)
        if prior is not None:
            guided = guided_view(self.image1, prior, box0, out_size)
            if guided is None:
                return _Coarse(ViewMatches(), failure(0, "image1 has no data where the prior maps image0"), view0,
                               estimator.threshold, ViewOfImage1(None, False))
            candidates = [(ViewOfImage1(None, inverted), *guided) for inverted in polarities]
        else:
            overview1, overview_to_image1 = self.image1.overview((0, 0, *self.image1.size), overview_size)
            turns = QUARTER_TURNS if settings.search_orientation else (0,)
            candidates = [(ViewOfImage1(k, inverted), *_turned_with_map(overview1, overview_to_image1, k))
                          for k in turns for inverted in polarities]
        best = None
        for how, view1, to_image1 in candidates:
            view1 = how.apply(view1)
            key1 = self.view_key(1, (0, 0, *self.image1.size), view1, how,
                                 guide=prior if how.quarter_turns is None else None)
            feats1 = self.features(key1, view1)
            matches = self.match(key0, feats0, key1, feats1).mapped(to_image0, to_image1)
            # image1 px per overview px: the fit threshold scales with the overview's coarseness
            threshold = estimator.threshold * max(area_scale(to_image1, np.array(out_size) / 2.0), 1.0)
            fit = self.fit(matches.pts0, matches.pts1, threshold)
            if best is None or fit.n_inliers > best.fit.n_inliers:
                best = _Coarse(matches, fit, view0, threshold, how)
            if fit.n_inliers >= settings.search_accept:
                break  # strong enough: the other candidates would only cost time
        return best

    def second_pass(self, tiles: list[Box], guide: np.ndarray, radius_px: float, inverted: bool
                    ) -> tuple[ViewMatches, list[dict]]:
        """Match each full-resolution tile of image0 with image1 resampled into its frame by `guide` (its contrast
        inverted as the coarse stage chose). The guide is right to a few coarse pixels, so a match whose two ends
        lie more than `radius_px` apart in the tile's frame is wrong (clouds, repeated patterns) and is dropped
        before the fit."""
        how = ViewOfImage1(None, inverted)
        parts, report = [], []
        for tile in tqdm(tiles, desc="fine tiles", unit="tile", disable=len(tiles) < 2):
            out_size = (tile[2] - tile[0], tile[3] - tile[1])
            guided = guided_view(self.image1, guide, tile, out_size)
            if guided is None:
                report.append({"box": list(tile), "matches": 0, "near_guide": 0})
                continue
            view1, to_image1 = guided
            view1 = how.apply(view1)
            view0 = self.image0.read(tile, out_size)
            key0, key1 = self.view_key(0, tile, view0), self.view_key(1, tile, view1, how, guide=guide)
            matches = self.match(key0, self.features(key0, view0), key1, self.features(key1, view1))
            near = np.linalg.norm(matches.pts1 - matches.pts0, axis=1) <= radius_px
            parts.append(matches.subset(near).mapped(box_to_pixels(tile, out_size), to_image1))
            report.append({"box": list(tile), "matches": len(matches.pts0), "near_guide": int(near.sum())})
        return ViewMatches.concat(parts), report

    def refine(self, tiles: list[Box], H: np.ndarray, points: np.ndarray, scores: np.ndarray) -> TiePoints:
        """Refined tie points of each tile around `points` (image0 px, the best `scores` first where they crowd),
        image1 placed by H; see s2match.twoview.refinement."""
        refiner, parts = self.pipeline.refiner, []
        with self.timings.phase("refine_s"):
            for tile in tiles:
                out_size = (tile[2] - tile[0], tile[3] - tile[1])
                here = inside_box(points, tile)
                if not here.any():
                    continue
                guided = guided_view(self.image1, H, tile, out_size)
                if guided is None:
                    continue
                view1, to_image1 = guided
                in_view = points[here] - np.array(tile[:2], float)  # full res: view px = px - tile origin
                chosen = refiner.spread(in_view, scores[here], out_size)
                if len(chosen) == 0:
                    continue
                refined = refiner.refine(self.image0.read(tile, out_size), view1, in_view[chosen])
                parts.append(TiePoints(refined.points0 + np.array(tile[:2], float),
                                       warp_points(to_image1, refined.points0 + refined.shifts),
                                       refined.quality, refined.status))
        return TiePoints.concat(parts)

    def refined_fit(self, tiles: list[Box], base: np.ndarray, points: np.ndarray, scores: np.ndarray,
                    chance_share: float) -> _Refined:
        """Refine the tie points around `points` with image1 placed by `base`, find those that agree (a robust
        affine correction of `base`: it is right to a pixel or two, so six parameters take out what is left of it
        everywhere) and fit the final transform to them alone, by least squares (RobustEstimator.simplest). Fewer
        agreeing windows than `chance_share` of those with data is no fit (chance correlations of smooth ground)."""
        tie_points = self.refine(tiles, base, points, scores)
        reliable = tie_points.status == "ok"
        correction = self.fit_affine(tie_points.pts0[reliable],
                                     warp_points(np.linalg.inv(base), tie_points.pts1[reliable]),
                                     self.settings.refined_threshold)
        with_data = int(np.sum(tie_points.status != "no data"))
        if correction.success and correction.n_inliers < chance_share * with_data:
            correction = failure(int(reliable.sum()), f"only {correction.n_inliers} of {with_data} windows agree "
                                 f"(fewer than {chance_share:.0%}: chance correlations of smooth ground)")
        summary = {"windows": int(len(tie_points.status)), "reliable": int(reliable.sum()),
                   "rejected": {reason: int(np.sum(tie_points.status == reason))
                                for reason in REASONS if reason != "ok"},
                   "inliers": correction.n_inliers, "used": correction.success, "reason": correction.reason}
        if not correction.success:
            return _Refined(tie_points, correction, summary)
        tie_points.status[np.flatnonzero(reliable)[~correction.inliers]] = "outlier"
        return _Refined(tie_points, correction, summary, *self.pipeline.estimator.simplest(*tie_points.support))


def window_grid(box: Box, spacing: float) -> np.ndarray:
    """(N, 2) pixel centres of a regular grid over a pixel-edge box, `spacing` px apart (a window every half window:
    AROSICS's grid of matching windows)."""
    xs = np.arange(box[0] + spacing, box[2] - spacing + 1, spacing) - 0.5
    ys = np.arange(box[1] + spacing, box[3] - spacing + 1, spacing) - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return np.c_[grid_x.ravel(), grid_y.ravel()]


def _turned_with_map(overview: np.ndarray, to_image: np.ndarray, quarter_turns: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    view, to_overview = turned(overview, quarter_turns)
    return view, to_image @ to_overview


def residual_stats(errors: np.ndarray) -> dict[str, float]:
    return {"count": int(len(errors)), "mean": float(errors.mean()), "median": float(np.median(errors)),
            "rmse": float(np.sqrt(np.mean(errors**2))), "p90": float(np.percentile(errors, 90)),
            "max": float(errors.max())}


@dataclass
class _Attempt:
    """One try of the coarse-to-fine registration (RegistrationSettings.attempts): its matches, their fit, the final
    H (None: none) and what it was fitted on, the refined tie points and the tiles."""

    matches: ViewMatches
    fit: FitResult
    H: np.ndarray | None = None
    used: str = "matches"
    tie_points: TiePoints = field(default_factory=TiePoints)
    tiles: list[Box] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        """Whether area correlation confirmed the fit (the final H rests on refined tie points)."""
        return self.used == "refined tie points"

    @property
    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """The correspondences H rests on: the refined tie points kept, else the matcher's inliers."""
        if self.confirmed:
            return self.tie_points.support
        return self.matches.pts0[self.fit.inliers], self.matches.pts1[self.fit.inliers]


def _attempt(run: _Registrar, box0: Box, prior: np.ndarray | None, overview_size: int, second_pass: bool,
             report: dict) -> _Attempt:
    """Steps 2-4 of the module docstring with the overviews at `overview_size` px; fills `report`."""
    settings, pipeline, image1 = run.settings, run.pipeline, run.image1
    with run.timings.phase("coarse_s"):
        coarse = run.coarse(box0, prior, overview_size)
    report["coarse"] = {"overview_px": max(view_size(coarse.overview0)), "matches": len(coarse.matches.pts0),
                        "inliers": coarse.fit.n_inliers,
                        "success": coarse.fit.success, "reason": coarse.fit.reason,
                        "homography": coarse.fit.H.tolist() if coarse.fit.success else None,
                        "quarter_turns": coarse.how.quarter_turns, "contrast_inverted": coarse.how.inverted}
    if coarse.fit.success:
        guide = coarse.fit.H
    elif prior is not None:
        log.warning("coarse matching failed (%s); the fine stage follows the georeference", coarse.fit.reason)
        guide = prior
    else:
        report["reason"] = f"no reliable transform: coarse matching failed ({coarse.fit.reason})"
        return _Attempt(coarse.matches, coarse.fit)

    candidates = candidate_tiles(box0, settings.tile_size)
    scores = tile_scores(candidates, coarse.overview0, box0, guide, image1.size, coarse.matches.pts0[coarse.fit.inliers])
    tiles = [candidates[i] for i in select_tiles(candidates, scores, box0, settings.max_tiles, settings.min_valid)]
    report["tiles"] = {"candidates": len(candidates), "used": len(tiles)}
    report["second_pass"] = second_pass
    if second_pass:
        # image0 pixels per coarse overview pixel: the guide's accuracy is a few of them
        radius = settings.guide_tolerance * max(1.0, (box0[2] - box0[0]) / coarse.overview0.shape[2])
        with run.timings.phase("fine_s"):
            matches, per_tile = run.second_pass(tiles, guide, radius, coarse.how.inverted)
        report["tiles"].update(guide_radius_px=radius, per_tile=per_tile)
        fit = run.fit(matches.pts0, matches.pts1)
    else:
        matches, fit = coarse.matches, coarse.fit
    report["matcher"] = {"matches": len(matches.pts0), "inliers": fit.n_inliers, "success": fit.success,
                         "reason": fit.reason, "layers": matches.layers}
    result = _Attempt(matches, fit, fit.H, tiles=tiles)
    if not settings.refine:
        report["reason"] = "" if fit.success else f"no reliable transform: {fit.reason}"
        return result
    # Windows around the matcher's inliers, placed by its fit. Where the matcher ties too few points (clouds,
    # snow, coarse overviews), or its tie points do not correlate under its fit, the georeference still places
    # image1 to a few px: windows on a regular grid over the overlap, as AROSICS places them, then measure the
    # shift without any match. Never the coarse fit: one the second pass could not confirm may be wrong, and
    # smooth windows can correlate under a wrong placement.
    attempts = [("the matcher's inliers", fit.H, matches.pts0[fit.inliers], matches.scores[fit.inliers])
                ] if fit.success else []
    if settings.grid_windows and prior is not None:
        grid = window_grid(box0, pipeline.refiner.window / 2)
        attempts.append(("a grid over the overlap placed by the georeference", prior, grid, np.zeros(len(grid))))
    refusals = []
    for windows_at, base, points, scores in attempts:
        chance_share = GRID_MIN_SHARE if base is prior else 0.0
        refined = run.refined_fit(tiles, base, points, scores, chance_share)
        result.tie_points = refined.tie_points
        report["refinement"] = {"windows_at": windows_at, **refined.summary, "passes": 1}
        if refined.correction.success:
            # Again with image1 placed by the refined fit: its windows then lie on image0's to a fraction of a
            # pixel in shape too (scale, rotation, perspective), not only in position, so their correlation
            # peaks are sharper and less biased.
            for _ in range(settings.refine_passes - 1):
                again = run.refined_fit(tiles, refined.H, points, scores, chance_share=0.0)
                if not again.correction.success:
                    break
                refined = again
                report["refinement"].update(refined.summary, passes=report["refinement"]["passes"] + 1)
            result.tie_points, result.H = refined.tie_points, refined.H
            result.used = "refined tie points"
            report["refinement"]["model"] = refined.model
            if base is not fit.H:
                log.warning("the matcher's transform %s: fitted on %d windows of %s instead",
                            "was not confirmed by area correlation" if fit.success else f"failed ({fit.reason})",
                            len(result.support[0]), windows_at)
            report["reason"] = ""
            return result
        log.warning("refinement on windows at %s not used: %s", windows_at, refined.correction.reason)
        refusals.append(f"windows at {windows_at}: {refined.correction.reason}")
    if fit.success and guide is prior:
        # The fine tiles were matched only near where the georeference puts them (the coarse match failed), so
        # matches there fit whatever the georeference says; unless area correlation confirms that fit, it may be
        # tens of px off (64 px on the whole-tile seasons pair, content moved off its georeference).
        result.H = None
        report["reason"] = (f"no reliable transform: the matcher's fit ({fit.n_inliers} inliers) is not confirmed"
                            f" by area correlation ({'; '.join(refusals)})")
    elif not fit.success:
        windows = f"; windows on a grid: {report['refinement']['reason']}" if "refinement" in report else ""
        report["reason"] = f"no reliable transform: {fit.reason}{windows}"
    else:
        report["reason"] = ""
    return result


def register(image0: Scene, image1: Scene, pipeline: TwoViewPipeline, settings: RegistrationSettings,
             cache: FeatureCache | None = None) -> Registration:
    """Register image1 onto image0 (see the module docstring). Never raises for images that do not match: the
    report then has `success` false and a `reason`."""
    run = _Registrar(image0, image1, pipeline, settings, cache)
    start = time.perf_counter()
    report: dict = {"success": False, "reason": "", "images": [image0.describe(), image1.describe()]}

    def finished(result: _Attempt) -> Registration:
        timings = {**dict(run.timings), "total_s": time.perf_counter() - start + run.timings.get("reused_s", 0.0)}
        report["timings"] = timings
        inliers = result.fit.inliers if result.fit.success else np.zeros(len(result.matches.pts0), bool)
        return Registration(report, result.matches, inliers, result.H, result.tie_points, result.tiles, timings)

    prior = None
    if image0.grid.georeferenced and image1.grid.georeferenced:
        fitted = prior_homography(image0.grid, image1.grid)
        prior = fitted.H
        report["prior"] = {"homography": prior.tolist(), "max_error_px": fitted.max_error_px}
        box0 = overlap_box(prior, image0.size, image1.size)
        if box0 is None:
            report["reason"] = "the two images do not overlap (by their georeference)"
            return finished(_Attempt(ViewMatches(), failure(0, report["reason"])))
    else:
        box0 = (0, 0, *image0.size)
    report["overlap_box0"] = list(box0)

    report["attempts"] = []
    best: tuple[_Attempt, dict, int] | None = None  # the confirmed try on most tie points, and their number
    for attempt in settings.attempts(box0):
        attempt_report: dict = {}
        result = _attempt(run, box0, prior, attempt.overview_px, attempt.second_pass, attempt_report)
        tie_points = len(result.support[0]) if result.confirmed else 0
        report["attempts"].append({"overview_px": attempt_report["coarse"]["overview_px"],
                                   "second_pass": attempt.second_pass, "confirmed": result.confirmed,
                                   "tie_points": tie_points, "reason": attempt_report["reason"]})
        if result.confirmed and (best is None or tie_points > best[2]):
            best = result, attempt_report, tie_points
        if result.confirmed and tie_points >= attempt.min_tie_points:
            break
    if best is not None:
        result, attempt_report, _ = best
    report.update(attempt_report)
    H = result.H
    if H is None:
        return finished(result)
    matches, fit = result.matches, result.fit
    support0, support1 = result.support
    report.update(success=True, homography=H.tolist(), fitted_on=result.used, inliers=int(len(support0)),
                  matches=len(matches.pts0), residuals_px=residual_stats(residuals(H, support0, support1)))
    if prior is not None:
        centre = np.array([[(box0[0] + box0[2]) / 2 - 0.5, (box0[1] + box0[3]) / 2 - 0.5]])
        report["correction_px_at_centre"] = (warp_points(H, centre) - warp_points(prior, centre))[0].tolist()
        # the robust local estimate of the misregistration: where the tie points are, not where H extrapolates
        offsets = support1 - warp_points(prior, support0)
        report["shift_px"] = {"source": result.used, "median": np.median(offsets, axis=0).tolist(),
                              "mad": np.median(np.abs(offsets - np.median(offsets, axis=0)), axis=0).tolist()}
        shift = map_shift_metres(image0.grid, image1.grid, support0, support1)
        report["shift_m"] = {"source": result.used, "count": int(len(shift)),
                             "dx_median": float(np.median(shift[:, 0])), "dy_median": float(np.median(shift[:, 1])),
                             "dx_mad": float(np.median(np.abs(shift[:, 0] - np.median(shift[:, 0])))),
                             "dy_mad": float(np.median(np.abs(shift[:, 1] - np.median(shift[:, 1]))))}
    return finished(result)
