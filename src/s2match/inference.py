"""Match two whole scenes and estimate the homography image0 px -> image1 px, coarse to fine.

1. Inputs: a GeoTIFF / JP2 (single or multi-band, or one ESA-named band file of a loose product), a `.SAFE`
   folder, or a PNG / JPEG (no georeference), read through s2match.bands with the configured composite.
2. Prior: with both images georeferenced, pixel of image0 -> map -> image1's CRS -> pixel of image1 (a homography
   fitted to it), which also gives the overlap. Without, none: the overviews are matched as they are.
3. Coarse: image0's overlap and image1 (resampled into image0's frame by the prior) at ~`coarse_size` px, matched;
   a robust fit gives the coarse homography.
4. Fine: up to `max_tiles` full-resolution tiles of image0 (spread over the overlap, most textured first); for each,
   the window of image1 predicted by the coarse homography is read (rasterio windows) and resampled into the tile's
   frame, so the matcher sees two nearly aligned images; matches go back to full-resolution pixels of both images.
5. Final: USAC MAGSAC on all fine matches; success only with at least `min_inliers` inliers.

Pixel convention (OpenCV): (x, y), (0, 0) the centre of the top-left pixel; a box (x0, y0, x1, y1) is in pixel
edges (x0 = 0 is the left edge of the first column). Pixels are those of each image's grid as read (its finest
native band grid unless `infer.resolution` resamples it).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import rasterio
import torch
from omegaconf import DictConfig, OmegaConf
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.transform import Affine
from rasterio.windows import Window
from tqdm import tqdm

from s2match.bands import Grid, choose_composite, composite_block, target_grid
from s2match.config import PROJECT_ROOT
from s2match.features import LocalFeatures, build_features
from s2match.fileio import atomic_path
from s2match.geometry import fit_homography, residuals, warp_image, warp_points
from s2match.georef import (
    WGS84,
    Georef,
    frame_corners,
    map_shift_metres,
    overlap_box,
    pixel_to_map,
    prior_homography,
    reproject_points,
)
from s2match.matcher import PRETRAINED_LIGHTGLUE, build_matcher
from s2match.pairs import normalise
from s2match.products import (
    BAND_FILE,
    RASTER_SUFFIXES,
    Product,
    ProductError,
    band_names,
    group_loose_band_files,
    open_loose,
    open_raster,
    open_safe,
)
from s2match.viz import draw_keypoints, draw_matches, stretch
from s2match.weights import resolve_weights

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = RASTER_SUFFIXES | {".png", ".jpg", ".jpeg"}
# Exit status of a run that found no reliable transform (1 is a bad input or configuration, see s2match.cli).
EXIT_NO_TRANSFORM = 2
# Image1 windows are padded by this many pixels so bilinear resampling has both neighbours at the edge.
WINDOW_PAD_PX = 2
# A tile narrower than this share of tile_size (at the overlap's edge) has too little content to match.
MIN_TILE_FRACTION = 0.25


# ---------------------------------------------------------------- inputs


def open_product(path: Path) -> Product:
    """The product an input path names: a SAFE-layout folder, one band file of a loose ESA-named product (its
    sibling bands join it), or one raster or picture whose bands are named by their descriptions."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: input image not found")
    if path.is_dir():
        return open_safe(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        known = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ProductError(f"{path}: unsupported image format (use {known} or a .SAFE folder)")
    try:
        with warnings.catch_warnings(), rasterio.open(path) as src:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            tags, descriptions, georeferenced = src.tags(), src.descriptions, src.crs is not None
    except RasterioIOError as err:
        raise ProductError(f"{path}: unreadable image ({str(err).splitlines()[0]})") from err
    if georeferenced and BAND_FILE.match(path.stem):
        siblings = [p for p in sorted(path.parent.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES]
        key, files = next((key, files) for key, files in group_loose_band_files(siblings) if path in files)
        return open_loose(key, files, tags)
    return open_raster(path, band_names(descriptions), tags, descriptions)


def box_to_pixels(box: tuple[float, float, float, float], out_size: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixels of `box` (edges, full-resolution px) resampled to `out_size` = (w, h) to full-resolution
    pixels. Pixel edges line up, so centres map as x = x0 + (u + 0.5) * sx - 0.5."""
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / out_size[0], (y1 - y0) / out_size[1]
    return np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)


@dataclass
class SceneImage:
    """One input image, read through the pipeline's band logic: reflectance (or [0, 1] for 8-bit pictures),
    NaN = no data, any window at any decimation."""

    path: Path
    product: Product
    composite: str
    bands: list[str]
    grid: Grid
    georef: Georef | None

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.width, self.grid.height

    def read(self, box: tuple[float, float, float, float], out_size: tuple[int, int]) -> np.ndarray:
        """(C, h, w) float32 of the box (pixel edges, inside the frame) resampled to out_size = (w, h)."""
        x0, y0, x1, y1 = box
        transform = self.grid.transform @ Affine.translation(x0, y0) @ Affine.scale(
            (x1 - x0) / out_size[0], (y1 - y0) / out_size[1])
        grid = Grid(self.grid.crs, transform, int(out_size[0]), int(out_size[1]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return composite_block(self.product, self.composite, self.bands, grid,
                                       Window(0, 0, int(out_size[0]), int(out_size[1])))
        except RasterioIOError as err:
            raise ProductError(f"{self.path}: image data unreadable ({str(err).splitlines()[0]})") from err

    def overview(self, box: tuple[int, int, int, int], longest_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The box decimated to at most `longest_side` px (never enlarged), and its 3x3 map to full-res pixels."""
        width, height = box[2] - box[0], box[3] - box[1]
        factor = max(1.0, max(width, height) / longest_side)
        out_size = (max(1, round(width / factor)), max(1, round(height / factor)))
        return self.read(box, out_size), box_to_pixels(box, out_size)

    def describe(self) -> dict:
        return {
            "path": str(self.path), "width": self.grid.width, "height": self.grid.height,
            "composite": self.composite, "bands": self.bands,
            "crs": self.grid.crs.to_string() if self.georef else None,
            "transform": list(self.grid.transform)[:6] if self.georef else None,
        }


def open_image(path: str | Path, composite: str, composites, fallback: str, resolution: float | None) -> SceneImage:
    """Open an input for matching; bad input raises ProductError / FileNotFoundError naming the file."""
    path = Path(path)
    product = open_product(path)
    composite, bands = choose_composite(product, composite, composites, fallback)
    first, _ = product.bands[bands[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(first) as src:
                crs, width, height = src.crs, src.width, src.height
        except RasterioIOError as err:
            raise ProductError(f"{first}: unreadable band file ({str(err).splitlines()[0]})") from err
    if crs is None:
        grid = Grid(None, Affine.identity(), width, height)
        return SceneImage(path, product, composite, bands, grid, None)
    grid = target_grid(product, bands, resolution)
    return SceneImage(path, product, composite, bands, grid, Georef(grid.crs, grid.transform, grid.width, grid.height))


# ---------------------------------------------------------------- matching


@dataclass
class Matches:
    """Correspondences in full-resolution pixels (pts0 in image0, pts1 in image1) and the keypoints detected."""

    pts0: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    pts1: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    keypoints0: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    keypoints1: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @staticmethod
    def concat(parts: list[Matches]) -> Matches:
        if not parts:
            return Matches()
        return Matches(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                         ("pts0", "pts1", "scores", "keypoints0", "keypoints1")))


def _matcher_input(image: np.ndarray) -> torch.Tensor:
    """(C, H, W) reflectance -> (1, C', H, W) in [0, 1] as the pipeline normalises it (C' = 1 or 3)."""
    if image.shape[0] not in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
            image = np.nanmean(image, axis=0, keepdims=True)
    return torch.from_numpy(normalise(image))[None]


class PairMatcher:
    """Local features + matcher on two views; keypoints on or near no-data (scene edges, the border of a resampled
    footprint) are dropped first: their contrast is an artefact that would match across images."""

    def __init__(self, features: LocalFeatures, matcher, border_px: int) -> None:
        self.features, self.matcher, self.border_px = features, matcher, int(border_px)

    def _features(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        found = self.features(_matcher_input(image))
        valid = np.all(np.isfinite(image), axis=0).astype(np.uint8)
        if self.border_px > 0:
            valid = cv2.erode(valid, np.ones((2 * self.border_px + 1,) * 2, np.uint8), borderValue=0)
        xy = found["keypoints"].round().long().numpy()
        height, width = valid.shape
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        keep = inside.copy()
        keep[inside] = valid[xy[inside, 1], xy[inside, 0]] > 0
        keep = torch.from_numpy(keep)
        return {key: value[keep] for key, value in found.items()}

    def __call__(self, view0: np.ndarray, view1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray, np.ndarray]:
        """(kpts0, kpts1, scores) of the matches and all kept keypoints of each view, in view pixels."""
        feats0, feats1 = self._features(view0), self._features(view1)
        kp0, kp1 = feats0["keypoints"].numpy().astype(np.float64), feats1["keypoints"].numpy().astype(np.float64)
        if len(kp0) == 0 or len(kp1) == 0:
            return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), kp0, kp1
        size0, size1 = (view0.shape[2], view0.shape[1]), (view1.shape[2], view1.shape[1])
        result = self.matcher.match(feats0, feats1, size0, size1)
        pairs = result["matches"].numpy()
        return kp0[pairs[:, 0]], kp1[pairs[:, 1]], result["scores"].numpy().astype(np.float64), kp0, kp1


def _area_scale(H: np.ndarray, point: np.ndarray) -> float:
    """Local linear scale of H at a point: sqrt |det J| (det J = det H / w^3)."""
    w = np.r_[point, 1.0] @ H[2]
    return math.sqrt(abs(np.linalg.det(H) / w**3))


def guided_view(image1: SceneImage, guide: np.ndarray, box0: tuple, out_size: tuple[int, int]
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
    # Image1 pixels per view pixel: read coarser when image1 is finer than the view, never finer than native.
    factor = max(1.0, _area_scale(view_to_image1, np.array(out_size) / 2.0))
    read_size = (max(1, math.ceil((box1[2] - box1[0]) / factor)), max(1, math.ceil((box1[3] - box1[1]) / factor)))
    window = image1.read(box1, read_size)
    window_to_view = np.linalg.inv(view_to_image1) @ box_to_pixels(box1, read_size)
    view = warp_image(np.moveaxis(window, 0, -1), window_to_view, out_size)
    view = view.reshape(out_size[1], out_size[0], -1)
    return np.moveaxis(view, -1, 0), view_to_image1


def coarse_matches(image0: SceneImage, image1: SceneImage, box0: tuple, prior: np.ndarray | None,
                   pair_matcher: PairMatcher, coarse_size: int) -> tuple[Matches, np.ndarray, float]:
    """Match image0's `box0` and image1 at ~coarse_size px. Returns the matches (full-res pixels), image0's
    overview and the image1 pixels per overview pixel (to scale the fit threshold)."""
    view0, to_image0 = image0.overview(box0, coarse_size)
    out_size = (view0.shape[2], view0.shape[1])
    if prior is not None:
        guided = guided_view(image1, prior, box0, out_size)
        if guided is None:
            return Matches(), view0, 1.0
        view1, to_image1 = guided
    else:
        view1, to_image1 = image1.overview((0, 0, *image1.size), coarse_size)
    k0, k1, scores, kp0, kp1 = pair_matcher(view0, view1)
    scale = _area_scale(to_image1, np.array(out_size) / 2.0)
    return (Matches(warp_points(to_image0, k0), warp_points(to_image1, k1), scores,
                    warp_points(to_image0, kp0), warp_points(to_image1, kp1)), view0, scale)


def candidate_tiles(box0: tuple[int, int, int, int], tile_size: int) -> list[tuple[int, int, int, int]]:
    """Full-resolution tiles (pixel-edge boxes) covering box0; slivers narrower than a quarter tile are left out."""
    x0, y0, x1, y1 = box0
    minimum = max(1, int(tile_size * MIN_TILE_FRACTION))
    tiles = []
    for ty in range(y0, y1, tile_size):
        for tx in range(x0, x1, tile_size):
            tile = (tx, ty, min(tx + tile_size, x1), min(ty + tile_size, y1))
            if tile[2] - tile[0] >= minimum and tile[3] - tile[1] >= minimum:
                tiles.append(tile)
    return tiles


def tile_scores(tiles: list[tuple], overview0: np.ndarray, overview_box: tuple, guide: np.ndarray,
                size1: tuple[int, int], support_pts0: np.ndarray) -> dict[str, np.ndarray]:
    """Per tile, from image0's overview and the coarse stage: `valid` share (image0 has data and the guide maps the
    pixel into image1), `texture` (mean gradient magnitude of the normalised overview over valid pixels) and
    `support` (coarse inliers inside: ground that matched across the dates, where texture alone would also pick
    clouds)."""
    height, width = overview0.shape[1:]
    to_image0 = box_to_pixels(overview_box, (width, height))
    grey = _matcher_input(overview0)[0].mean(0).numpy()
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
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
        inside = ((support_pts0[:, 0] + 0.5 >= tile[0]) & (support_pts0[:, 0] + 0.5 < tile[2])
                  & (support_pts0[:, 1] + 0.5 >= tile[1]) & (support_pts0[:, 1] + 0.5 < tile[3]))
        scores["support"].append(float(inside.sum()))
    return {key: np.array(values) for key, values in scores.items()}


def select_tiles(tiles: list[tuple], scores: dict[str, np.ndarray], box0: tuple, max_tiles: int,
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


def fine_matches(image0: SceneImage, image1: SceneImage, tiles: list[tuple], guide: np.ndarray,
                 pair_matcher: PairMatcher, radius_px: float) -> tuple[Matches, list[dict]]:
    """Match each full-resolution tile of image0 with image1 resampled into its frame by `guide`. The guide is
    right to about a coarse pixel, so a match whose two ends lie more than `radius_px` apart in the tile's frame
    is wrong (clouds, repeated patterns) and is dropped before the fit."""
    parts, report = [], []
    for tile in tqdm(tiles, desc="fine tiles", unit="tile"):
        out_size = (tile[2] - tile[0], tile[3] - tile[1])
        guided = guided_view(image1, guide, tile, out_size)
        if guided is None:
            report.append({"box": list(tile), "matches": 0, "near_guide": 0})
            continue
        view1, to_image1 = guided
        view0 = image0.read(tile, out_size)
        to_image0 = box_to_pixels(tile, out_size)
        k0, k1, scores, kp0, kp1 = pair_matcher(view0, view1)
        near = np.linalg.norm(k1 - k0, axis=1) <= radius_px
        parts.append(Matches(warp_points(to_image0, k0[near]), warp_points(to_image1, k1[near]), scores[near],
                             warp_points(to_image0, kp0), warp_points(to_image1, kp1)))
        report.append({"box": list(tile), "matches": len(k0), "near_guide": int(near.sum())})
    return Matches.concat(parts), report


# ---------------------------------------------------------------- the run


def resolve_path(path: str | Path) -> Path:
    """A path as given when it exists there, else relative to the project root (configs name files from it)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def build_pair_matcher(cfg: DictConfig) -> tuple[PairMatcher, dict]:
    """Features and matcher of the inference config; the trained checkpoint when it exists, else pretrained."""
    features_cfg = OmegaConf.to_container(cfg.features, resolve=True)
    matcher_cfg = OmegaConf.to_container(cfg.matcher, resolve=True)
    features = build_features(features_cfg)
    model = {"features": features_cfg["name"], "matcher": matcher_cfg["name"], "weights": None, "weights_file": None}
    if matcher_cfg["name"] == "lightglue":
        checkpoint = resolve_path(cfg.checkpoint) if cfg.checkpoint else None
        if checkpoint is not None and checkpoint.is_file():
            matcher_cfg.update(weights=str(checkpoint), pretrained=False)
            model.update(weights="trained", weights_file=str(checkpoint))
        else:
            if features_cfg["name"] not in PRETRAINED_LIGHTGLUE:
                raise FileNotFoundError(f"{checkpoint}: no trained LightGlue checkpoint, and features "
                                        f"{features_cfg['name']!r} have no pretrained one")
            pretrained = resolve_weights(PRETRAINED_LIGHTGLUE[features_cfg["name"]])
            model.update(weights="pretrained", weights_file=str(pretrained))
        log.info("matcher weights: %s (%s)", model["weights"], model["weights_file"])
    return PairMatcher(features, build_matcher(matcher_cfg, features_cfg["name"]), cfg.border_px), model


@dataclass
class Outcome:
    """Everything a run produced; `result` is what result.json holds."""

    result: dict
    matches: Matches
    inliers: np.ndarray
    H: np.ndarray | None


def match_scenes(image0: SceneImage, image1: SceneImage, pair_matcher: PairMatcher, cfg: DictConfig) -> Outcome:
    """Coarse-to-fine matching of two opened images and the robust final fit (see the module docstring)."""
    timings: dict[str, float] = {}
    result: dict = {"success": False, "reason": "", "images": [image0.describe(), image1.describe()]}
    start = time.perf_counter()

    prior = None
    if image0.georef and image1.georef:
        fitted = prior_homography(image0.georef, image1.georef)
        prior = fitted.H
        result["prior"] = {"homography": prior.tolist(), "max_error_px": fitted.max_error_px}
        box0 = overlap_box(prior, image0.size, image1.size)
        if box0 is None:
            result["reason"] = "the two images do not overlap (by their georeference)"
            return Outcome(result, Matches(), np.zeros(0, bool), None)
    else:
        box0 = (0, 0, *image0.size)
    result["overlap_box0"] = list(box0)

    coarse, overview0, coarse_scale = coarse_matches(image0, image1, box0, prior, pair_matcher, cfg.coarse_size)
    fit = fit_homography(coarse.pts0, coarse.pts1, cfg.ransac_method, cfg.ransac_threshold * max(coarse_scale, 1.0),
                         min_inliers=cfg.min_inliers)
    timings["coarse_s"] = time.perf_counter() - start
    result["coarse"] = {"matches": len(coarse.pts0), "inliers": fit.n_inliers, "success": fit.success,
                        "reason": fit.reason, "homography": fit.H.tolist() if fit.success else None}
    single_stage = max(box0[2] - box0[0], box0[3] - box0[1]) <= cfg.coarse_size
    if single_stage:  # the coarse stage already ran at full resolution
        final, tiles_report = coarse, []
    else:
        if fit.success:
            guide = fit.H
        elif prior is not None:
            log.warning("coarse matching failed (%s); the fine stage follows the georeference", fit.reason)
            guide = prior
        else:
            result["reason"] = f"coarse matching failed: {fit.reason}"
            return Outcome(result, coarse, np.zeros(len(coarse.pts0), bool), None)
        tiles = candidate_tiles(box0, cfg.tile_size)
        scores = tile_scores(tiles, overview0, box0, guide, image1.size, coarse.pts0[fit.inliers])
        chosen = [tiles[i] for i in select_tiles(tiles, scores, box0, cfg.max_tiles, cfg.min_valid)]
        # image0 pixels per coarse overview pixel: the guide's accuracy is a few of them
        radius = cfg.guide_tolerance * (box0[2] - box0[0]) / overview0.shape[2]
        fine_start = time.perf_counter()
        final, tiles_report = fine_matches(image0, image1, chosen, guide, pair_matcher, radius)
        timings["fine_s"] = time.perf_counter() - fine_start
        result["tiles"] = {"candidates": len(tiles), "used": len(chosen), "guide_radius_px": radius,
                           "per_tile": tiles_report}
        fit = fit_homography(final.pts0, final.pts1, cfg.ransac_method, cfg.ransac_threshold,
                             min_inliers=cfg.min_inliers)
    result.update(matches=len(final.pts0), inliers=fit.n_inliers, success=fit.success, reason=fit.reason)
    if fit.success:
        errors = residuals(fit.H, final.pts0[fit.inliers], final.pts1[fit.inliers])
        result["homography"] = fit.H.tolist()
        result["residuals_px"] = {"mean": float(errors.mean()), "median": float(np.median(errors)),
                                  "rmse": float(np.sqrt(np.mean(errors**2))), "p90": float(np.percentile(errors, 90)),
                                  "max": float(errors.max())}
        if prior is not None:
            centre = np.array([[(box0[0] + box0[2]) / 2 - 0.5, (box0[1] + box0[3]) / 2 - 0.5]])
            result["correction_px_at_centre"] = (warp_points(fit.H, centre) - warp_points(prior, centre))[0].tolist()
    else:
        result["reason"] = f"no reliable transform: {fit.reason}"
    timings["match_total_s"] = time.perf_counter() - start
    result["timings"] = timings
    return Outcome(result, final, fit.inliers, fit.H)


# ---------------------------------------------------------------- outputs


def region_table(image0: SceneImage, pts0: np.ndarray, shift_m: np.ndarray, regions: int) -> pd.DataFrame:
    """Tie-point shifts per cell of a regions x regions grid over image0: count, mean dx/dy and RMSE in metres."""
    width, height = image0.size
    rows = []
    for r in range(regions):
        for c in range(regions):
            x0, x1 = c * width / regions, (c + 1) * width / regions
            y0, y1 = r * height / regions, (r + 1) * height / regions
            x, y = pts0[:, 0] + 0.5, pts0[:, 1] + 0.5  # pixel centres -> edge coordinates of the cells
            inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
            cell = shift_m[inside]
            rows.append({"row": r, "col": c, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "count": int(inside.sum()),
                         "dx_m": float(cell[:, 0].mean()) if len(cell) else None,
                         "dy_m": float(cell[:, 1].mean()) if len(cell) else None,
                         "rmse_m": float(np.sqrt(np.mean(np.sum(cell**2, axis=1)))) if len(cell) else None})
    return pd.DataFrame(rows)


def match_table(image0: SceneImage, image1: SceneImage, matches: Matches, inliers: np.ndarray) -> pd.DataFrame:
    """One row per match: pixels, score, inlier flag; with georeference also map coords of both points (each in
    its image's CRS), lon/lat and the east/north shift in metres."""
    table = pd.DataFrame({"x0": matches.pts0[:, 0], "y0": matches.pts0[:, 1], "x1": matches.pts1[:, 0],
                          "y1": matches.pts1[:, 1], "score": matches.scores, "inlier": inliers.astype(bool)})
    if image0.georef and image1.georef:
        map0, map1 = pixel_to_map(image0.georef, matches.pts0), pixel_to_map(image1.georef, matches.pts1)
        lonlat0 = reproject_points(image0.georef.crs, WGS84, map0)
        lonlat1 = reproject_points(image1.georef.crs, WGS84, map1)
        shift = map_shift_metres(image0.georef, image1.georef, matches.pts0, matches.pts1)
        table = table.assign(map_x0=map0[:, 0], map_y0=map0[:, 1], map_x1=map1[:, 0], map_y1=map1[:, 1],
                             lon0=lonlat0[:, 0], lat0=lonlat0[:, 1], lon1=lonlat1[:, 0], lat1=lonlat1[:, 1],
                             dx_m=shift[:, 0], dy_m=shift[:, 1])
    return table


def write_geojson(table: pd.DataFrame, path: Path) -> None:
    """Matches as EPSG:4326 points at image0's keypoints (RFC 7946: [lon, lat]), other columns as properties."""
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [row["lon0"], row["lat0"]]},
                 "properties": {k: (bool(v) if k == "inlier" else float(v)) for k, v in row.items()}}
                for row in table.to_dict("records")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def _display(image: SceneImage, longest_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole image decimated for display, as (H, W) or (H, W, 3), and the map from display to full pixels."""
    view, to_full = image.overview((0, 0, *image.size), longest_side)
    if view.shape[0] != 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            view = np.nanmean(view, axis=0, keepdims=True)
    return np.moveaxis(view, 0, -1).squeeze(-1) if view.shape[0] == 1 else np.moveaxis(view, 0, -1), to_full


def write_figures(image0: SceneImage, image1: SceneImage, outcome: Outcome, cfg: DictConfig, folder: Path) -> None:
    """matches.png (side by side, lines coloured by confidence) and keypoints.png (both images' keypoints)."""
    show0, full0 = _display(image0, cfg.plot.display_size)
    show1, full1 = _display(image1, cfg.plot.display_size)
    to0, to1 = np.linalg.inv(full0), np.linalg.inv(full1)
    m = outcome.matches
    subset = cfg.plot.subset
    draw_matches(show0, show1, warp_points(to0, m.pts0), warp_points(to1, m.pts1), m.scores, folder / "matches.png",
                 max_lines=None if subset == "all" else cfg.plot.max_lines, subset=subset, seed=0,
                 inliers=outcome.inliers if len(outcome.inliers) == len(m.pts0) else None,
                 title=f"{image0.path.name} | {image1.path.name}")
    # Each side stretched on its own (a snowy and a summer scene share no useful percentiles), then side by side.
    shown0, shown1 = stretch(show0), stretch(show1)
    shown0, shown1 = (s if s.ndim == 3 else np.repeat(s[..., None], 3, axis=2) for s in (shown0, shown1))
    canvas = np.full((max(shown0.shape[0], shown1.shape[0]), shown0.shape[1] + shown1.shape[1], 3), 255, np.uint8)
    canvas[: shown0.shape[0], : shown0.shape[1]] = shown0
    canvas[: shown1.shape[0], shown0.shape[1]:] = shown1
    points = np.concatenate([warp_points(to0, m.keypoints0), warp_points(to1, m.keypoints1) + (shown0.shape[1], 0)])
    draw_keypoints(canvas, points, folder / "keypoints.png",
                   title=f"keypoints: {len(m.keypoints0)} in image0 | {len(m.keypoints1)} in image1")


def write_coregistered(image0: SceneImage, image1: SceneImage, H: np.ndarray, path: Path, block: int) -> None:
    """Image1 resampled onto image0's grid (out(p) = image1(H(p)), bilinear), block by block: each block reads only
    the window of image1 it maps to. Float32 GeoTIFF with image0's CRS and transform, NaN = no data."""
    width, height = image0.size
    channels = len(image1.bands) if image1.composite not in ("gray", "ndvi") else 1
    profile = dict(driver="GTiff", dtype="float32", count=channels, width=width, height=height, nodata=np.nan,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=3, BIGTIFF="IF_SAFER")
    if image0.georef:
        profile.update(crs=image0.grid.crs, transform=image0.grid.transform)
    with warnings.catch_warnings(), rasterio.open(path, "w", **profile) as dst:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst.update_tags(SOURCE=str(image1.path), HOMOGRAPHY=json.dumps(H.tolist()), COMPOSITE=image1.composite)
        for row in range(0, height, block):
            for col in range(0, width, block):
                w, h = min(block, width - col), min(block, height - row)
                u, v = np.meshgrid(np.arange(col, col + w, dtype=np.float64), np.arange(row, row + h, dtype=np.float64))
                mapped = warp_points(H, np.c_[u.ravel(), v.ravel()]).reshape(h, w, 2)
                out = np.full((channels, h, w), np.nan, np.float32)
                finite = mapped[np.all(np.isfinite(mapped), axis=-1)]
                if len(finite):
                    x0, y0 = np.maximum(np.floor(finite.min(axis=0)) - 1, 0).astype(int)
                    x1 = int(min(np.ceil(finite[:, 0].max()) + 2, image1.size[0]))
                    y1 = int(min(np.ceil(finite[:, 1].max()) + 2, image1.size[1]))
                    if x1 > x0 and y1 > y0:
                        source = image1.read((x0, y0, x1, y1), (x1 - x0, y1 - y0))
                        map_x = (mapped[..., 0] - x0).astype(np.float32)
                        map_y = (mapped[..., 1] - y0).astype(np.float32)
                        for c in range(channels):
                            out[c] = cv2.remap(source[c], map_x, map_y, cv2.INTER_LINEAR,
                                               borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
                dst.write(out, window=Window(col, row, w, h))


def write_outputs(image0: SceneImage, image1: SceneImage, outcome: Outcome, cfg: DictConfig, folder: Path) -> None:
    """Every output of a run into `folder` (a fresh folder: the caller moves it into place as a whole)."""
    start = time.perf_counter()
    result = outcome.result
    table = match_table(image0, image1, outcome.matches, outcome.inliers)
    table.to_csv(folder / "matches.csv", index=False)
    georeferenced = image0.georef is not None and image1.georef is not None
    if georeferenced:
        write_geojson(table, folder / "matches.geojson")
        inlier_rows = table[table["inlier"]]
        if len(inlier_rows):
            shift = inlier_rows[["dx_m", "dy_m"]].to_numpy()
            regions = region_table(image0, inlier_rows[["x0", "y0"]].to_numpy(), shift, cfg.regions)
            regions.to_csv(folder / "shifts_by_region.csv", index=False)
            result["shift_m"] = {"count": len(shift), "dx_mean": float(shift[:, 0].mean()),
                                 "dy_mean": float(shift[:, 1].mean()),
                                 "rmse": float(np.sqrt(np.mean(np.sum(shift**2, axis=1))))}
            result["shift_m_by_region"] = regions.replace({np.nan: None}).to_dict("records")
    if len(outcome.matches.keypoints0) or len(outcome.matches.pts0):
        write_figures(image0, image1, outcome, cfg, folder)
    if cfg.write_coregistered and outcome.H is not None:
        write_coregistered(image0, image1, outcome.H, folder / "coregistered.tif", cfg.coregister_block)
    result["timings"]["outputs_s"] = time.perf_counter() - start


def pair_name(pair: DictConfig) -> str:
    return pair.get("name") or f"{Path(str(pair.image0)).stem}__{Path(str(pair.image1)).stem}"


def run_inference(cfg: DictConfig) -> int:
    """The `infer` entry point: match cfg.pair.image0 against cfg.pair.image1 and write the run folder.
    Returns 0 on success, EXIT_NO_TRANSFORM when no reliable transform was found."""
    if "infer" not in cfg:
        raise KeyError("no `infer` config: keep `- infer: default` in the defaults of conf/config.yaml")
    if "pair" not in cfg or not cfg.pair.get("image0") or not cfg.pair.get("image1"):
        raise KeyError("no pair to match: pass +pair=NAME (conf/pair/) or +pair.image0=PATH +pair.image1=PATH")
    infer, bands = cfg.infer, cfg.bands
    # GDAL's block cache defaults to 5 % of RAM; on big scenes it would dominate the memory of a run.
    with rasterio.Env(GDAL_CACHEMAX=int(infer.gdal_cache_mb)):
        return _run(cfg, infer, bands)


def _run(cfg: DictConfig, infer: DictConfig, bands: DictConfig) -> int:
    start = time.perf_counter()
    images = [open_image(resolve_path(cfg.pair[key]), bands.composite, bands.composites, bands.fallback,
                         infer.resolution) for key in ("image0", "image1")]
    pair_matcher, model = build_pair_matcher(infer)
    opened_s = time.perf_counter() - start
    outcome = match_scenes(*images, pair_matcher, infer)
    outcome.result.setdefault("timings", {})["open_s"] = opened_s
    outcome.result["model"] = model
    outcome.result["config"] = OmegaConf.to_container(
        OmegaConf.create({"pair": cfg.pair, "infer": infer, "bands": bands}), resolve=True)
    folder = PROJECT_ROOT / (infer.output_dir or Path("outputs", "infer", pair_name(cfg.pair)))
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        write_outputs(*images, outcome, infer, tmp)
        outcome.result["timings"]["total_s"] = time.perf_counter() - start
        (tmp / "result.json").write_text(json.dumps(outcome.result, indent=2))
    result = outcome.result
    if result["success"]:
        log.info("%d inliers of %d matches, residual RMSE %.2f px; wrote %s", result["inliers"], result["matches"],
                 result["residuals_px"]["rmse"], folder)
        return 0
    log.error("%s (wrote %s)", result["reason"], folder)
    return EXIT_NO_TRANSFORM
