"""Pictures for inspection and the reports: matches, keypoints, the co-registration overlay, error curves, AUC bars.

Figures are drawn with matplotlib's object API (Agg canvas, no pyplot state) and written as PNG atomically. Image
figures are laid out in pixels: a drawn image keeps its size in the PNG (one picture pixel, one PNG pixel), so a
figure's size follows from its images. Each image is normalised on its own (`display_image`): a snowy winter scene
and a summer scene share no useful brightness range.
Pixel convention (OpenCV): (x, y) with (0, 0) the centre of the top-left pixel.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

from s2match.evaluation.metrics import auc
from s2match.fileio import atomic_path

DPI = 100
# Each image of a pair is drawn at least this large on its short side: a 1:10 strip is drawn long, not thin.
MIN_SHORT_SIDE_PX = 300
# Long side an image is drawn at by default (small images are enlarged to it, large ones reduced).
LONG_SIDE_PX = 800
# Full-resolution windows of the overlay are enlarged (nearest neighbour, whole factors) to about this side.
WINDOW_SIDE_PX = 360
MARGIN_PX = 16
GAP_PX = 16
FONT_SIZE = 11
TITLE_LINE_PX = 22
PANEL_TITLE_PX = 20  # per line of a panel's title
TITLE_CHAR_PX = 6.5  # mean width of a title character
INLIER_COLOUR = "#39ff14"
OUTLIER_COLOUR = "#ff2020"
MATCH_COLOUR = "#ffd400"  # matches without a fit to split them
KEYPOINT_COLOUR = "#ffd400"
TILE_COLOUR = "#00e5ff"
MARK_COLOUR = "#ffd400"  # swipe seams, window frames, residual arrows
# Stacked one above the other when the pair is this much wider than tall; side by side otherwise.
STACK_ASPECT = 1.3
# Local contrast of the display (OpenCV CLAHE): clip limit, and tiles along the short side.
CLAHE_CLIP = 2.0
CLAHE_TILES = 8
# Residual field: about this many tie points per cell, at most this many cells along the short side.
POINTS_PER_CELL = 5
MAX_CELLS_SHORT = 8


def stretch(img: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0) -> np.ndarray:
    """Contrast-stretch a grey (H, W) / (H, W, 1) or RGB (H, W, 3) image to uint8 for display.

    Each channel maps its [low_pct, high_pct] percentiles (over finite pixels) to [0, 255] and clips, so a
    few very bright pixels (snow, cloud) saturate instead of squeezing everything else into the dark end. NaN / inf
    pixels become 0. Works on float reflectance, uint16 DN and uint8 alike. Returns (H, W) for grey input,
    (H, W, 3) for RGB.
    """
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.size == 0:
        raise ValueError(f"stretch needs a non-empty grey (H, W) or RGB (H, W, 3) image, got shape {img.shape}")
    channels = img.reshape(img.shape[0] * img.shape[1], -1).astype(np.float32)
    out = np.zeros(channels.shape, dtype=np.uint8)
    for c in range(channels.shape[1]):
        values = channels[:, c]
        finite = np.isfinite(values)
        if not finite.any():
            continue
        low, high = np.percentile(values[finite], [low_pct, high_pct])
        scaled = (values - low) / max(high - low, np.finfo(np.float32).eps)
        out[:, c] = np.clip(np.where(finite, scaled, 0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out.reshape(img.shape)


def display_image(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of a grey or RGB image, normalised on its own: a 0.5-99.5 % stretch, then local contrast
    (CLAHE on the lightness), so that snow and dark summer fields both show their detail. No data (NaN) is black."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    nodata = ~np.isfinite(img) if img.ndim == 2 else ~np.all(np.isfinite(img), axis=2)
    shown = stretch(img, 0.5, 99.5)
    height, width = img.shape[:2]
    tile = max(8.0, min(height, width) / CLAHE_TILES)  # square tiles, also on long strips
    clahe = cv2.createCLAHE(CLAHE_CLIP, (max(1, round(width / tile)), max(1, round(height / tile))))
    if shown.ndim == 2:
        shown = np.repeat(clahe.apply(shown)[..., None], 3, axis=2)
    else:
        lab = cv2.cvtColor(shown, cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        shown = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    shown[nodata] = 0
    return shown


def display_scale(size: tuple[int, int], long_side: int = LONG_SIDE_PX) -> float:
    """Drawn px per image px for an image of `size` (w, h): the long side at `long_side`, unless that leaves the
    short side under MIN_SHORT_SIDE_PX."""
    width, height = size
    return max(long_side / max(width, height), MIN_SHORT_SIDE_PX / max(min(width, height), 1))


def resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """img resized to size (w, h): area averaging when reducing, bilinear (or nearest) when enlarging."""
    img = np.asarray(img, dtype=np.float32) if np.asarray(img).dtype != np.uint8 else np.asarray(img)
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    reducing = size[0] < img.shape[1]
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if reducing else cv2.INTER_LINEAR)
    return cv2.resize(img, tuple(int(s) for s in size), interpolation=interpolation)


def to_display_coords(pts: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Map (N, 2) pixel coords of an image to those of its resized copy (factors: (fx, fy) drawn px per px).

    With pixel centres at integers, pixel edges sit at -0.5, so the scaling is about (-0.5, -0.5).
    """
    return (np.asarray(pts, dtype=np.float64).reshape(-1, 2) + 0.5) * factors - 0.5


@dataclass(frozen=True)
class Panel:
    """A picture of `width` x `height` px in a figure, with an optional title line above it."""

    width: int
    height: int
    title: str = ""


def _wrapped(panel: Panel) -> str:
    """A panel's title broken into lines that fit its width."""
    return "\n".join(textwrap.wrap(panel.title, max(12, int(panel.width / TITLE_CHAR_PX))))


def _figure(rows: Sequence[Sequence[Panel]], title: str) -> tuple[Figure, list[list[Axes]]]:
    """A figure laid out in pixels: `title` lines on top, then `rows` of panels, each row centred; one axes per
    panel covering exactly its width x height px, its title (wrapped to its width) above it."""
    title_px = (title.count("\n") + 1) * TITLE_LINE_PX if title else 0
    titles = [[_wrapped(panel) for panel in row] for row in rows]
    title_heights = [max((t.count("\n") + 1) * PANEL_TITLE_PX if t else 0 for t in row) for row in titles]
    heights = [max(p.height for p in row) + extra for row, extra in zip(rows, title_heights)]
    widths = [sum(p.width for p in row) + GAP_PX * (len(row) - 1) for row in rows]
    fig_w = max(widths) + 2 * MARGIN_PX
    fig_h = 2 * MARGIN_PX + title_px + sum(heights) + GAP_PX * (len(rows) - 1)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    if title:
        fig.text(0.5, 1 - MARGIN_PX / fig_h, title, ha="center", va="top", fontsize=FONT_SIZE, linespacing=1.35)
    axes, top = [], MARGIN_PX + title_px
    for row, row_titles, height, width, title_height in zip(rows, titles, heights, widths, title_heights):
        left, row_axes = (fig_w - width) / 2, []
        for panel, panel_title in zip(row, row_titles):
            bottom = top + title_height + panel.height
            ax = fig.add_axes((left / fig_w, 1 - bottom / fig_h, panel.width / fig_w, panel.height / fig_h))
            ax.set_axis_off()
            if panel_title:
                ax.set_title(panel_title, fontsize=FONT_SIZE - 1, pad=5, linespacing=1.2)
            row_axes.append(ax)
            left += panel.width + GAP_PX
        axes.append(row_axes)
        top += height + GAP_PX
    return fig, axes


def _show(ax: Axes, picture: np.ndarray) -> None:
    """Draw a uint8 picture filling its axes, in pixel coordinates (centre of the top-left pixel at 0, 0)."""
    ax.imshow(picture, interpolation="nearest", aspect="auto")
    ax.set_xlim(-0.5, picture.shape[1] - 0.5)
    ax.set_ylim(picture.shape[0] - 0.5, -0.5)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _as_points(pts, name: str) -> np.ndarray:
    array = np.asarray(pts, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) of (x, y) pixel coords, got {array.shape}")
    return array


@dataclass(frozen=True)
class PairCanvas:
    """Two images drawn on one canvas: side by side, or one above the other when the pair is wide. `factors[i]`:
    (fx, fy) canvas px per px of image i, `offsets[i]`: where image i's top-left corner lies on the canvas."""

    picture: np.ndarray
    factors: tuple[np.ndarray, np.ndarray]
    offsets: tuple[np.ndarray, np.ndarray]
    stacked: bool

    def points(self, side: int, pts: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coords of image `side` -> canvas coords."""
        return to_display_coords(pts, self.factors[side]) + self.offsets[side]


def pair_canvas(img0: np.ndarray, img1: np.ndarray, long_side: int = LONG_SIDE_PX) -> PairCanvas:
    """img0 and img1, each sized by display_scale and normalised on its own, on a white canvas."""
    shown, factors = [], []
    for img in (img0, img1):
        height, width = img.shape[:2]
        scale = display_scale((width, height), long_side)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        shown.append(display_image(resize(img, size)))
        factors.append(np.array([size[0] / width, size[1] / height]))
    (h0, w0), (h1, w1) = shown[0].shape[:2], shown[1].shape[:2]
    stacked = w0 + w1 > STACK_ASPECT * (h0 + h1)
    offset1 = np.array([0, h0 + GAP_PX]) if stacked else np.array([w0 + GAP_PX, 0])
    size = (max(w0, w1), h0 + GAP_PX + h1) if stacked else (w0 + GAP_PX + w1, max(h0, h1))
    picture = np.full((size[1], size[0], 3), 255, np.uint8)
    picture[:h0, :w0] = shown[0]
    picture[offset1[1]:offset1[1] + h1, offset1[0]:offset1[0] + w1] = shown[1]
    return PairCanvas(picture, (factors[0], factors[1]), (np.zeros(2), offset1.astype(float)), stacked)


def _select(n_matches: int, max_lines: int | None, subset: str, seed: int) -> np.ndarray:
    if subset == "all":
        if max_lines is not None:
            raise ValueError("max_lines needs subset='first' or 'random'; subset='all' draws every match")
        return np.arange(n_matches)
    if subset not in ("first", "random"):
        raise ValueError(f"subset must be 'all', 'first' or 'random', got {subset!r}")
    if max_lines is None or max_lines < 0:
        raise ValueError(f"subset={subset!r} needs max_lines >= 0, got {max_lines}")
    if subset == "first" or n_matches <= max_lines:
        return np.arange(min(n_matches, max_lines))
    return np.sort(np.random.default_rng(seed).choice(n_matches, size=max_lines, replace=False))


def draw_matches(
    img0: np.ndarray,
    img1: np.ndarray,
    kpts0,
    kpts1,
    scores,
    path: str | Path,
    max_lines: int | None = None,
    subset: str = "all",
    seed: int = 0,
    inliers=None,
    title: str = "",
    long_side: int = LONG_SIDE_PX,
) -> Path:
    """Write a PNG of img0 and img1 (grey (H, W) or RGB (H, W, 3)) with a line per match (kpts0[i] <-> kpts1[i],
    pixel coords of each image).

    Side by side, or one above the other for wide images (pair_canvas). With `inliers` (bool per match) inliers
    are green and outliers red, without them every line is yellow; the more confident a match (`scores`), the
    more opaque its line. subset='all' draws every match; 'first' or 'random' (seeded) draw `max_lines` of them.
    """
    kpts0, kpts1 = _as_points(kpts0, "kpts0"), _as_points(kpts1, "kpts1")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not len(kpts0) == len(kpts1) == len(scores):
        raise ValueError(f"kpts0, kpts1, scores differ in length: {len(kpts0)}, {len(kpts1)}, {len(scores)}")
    inlier_mask = None if inliers is None else np.asarray(inliers, dtype=bool).ravel()
    if inlier_mask is not None and len(inlier_mask) != len(kpts0):
        raise ValueError(f"inliers has {len(inlier_mask)} entries for {len(kpts0)} matches")
    chosen = _select(len(kpts0), max_lines, subset, seed)

    canvas = pair_canvas(img0, img1, long_side)
    if inlier_mask is None:
        legend = f"{len(kpts0)} matches (yellow), {len(chosen)} drawn"
    else:
        drawn_in = int(inlier_mask[chosen].sum())
        legend = (f"green: inliers ({int(inlier_mask.sum())}, {drawn_in} drawn), red: outliers "
                  f"({int((~inlier_mask).sum())}, {len(chosen) - drawn_in} drawn)")
    picture = canvas.picture
    fig, axes = _figure([[Panel(picture.shape[1], picture.shape[0])]], f"{title}\n{legend}".strip())
    ax = axes[0][0]
    _show(ax, picture)
    segments = np.stack([canvas.points(0, kpts0[chosen]), canvas.points(1, kpts1[chosen])], axis=1)
    span = np.ptp(scores) if len(scores) else 0.0
    confidence = (scores[chosen] - scores.min()) / span if span > 0 else np.ones(len(chosen))
    is_inlier = np.ones(len(chosen), bool) if inlier_mask is None else inlier_mask[chosen]
    # Outliers first, so that the inliers' lines stay on top.
    for mask, colour in ((~is_inlier, OUTLIER_COLOUR), (is_inlier, MATCH_COLOUR if inlier_mask is None
                                                        else INLIER_COLOUR)):
        if not mask.any():
            continue
        colours = np.tile(to_rgba(colour), (int(mask.sum()), 1))
        colours[:, 3] = 0.3 + 0.5 * confidence[mask]
        ax.add_collection(LineCollection(segments[mask], colors=colours, linewidths=0.8))
        ends = segments[mask].reshape(-1, 2)
        ax.scatter(ends[:, 0], ends[:, 1], s=7, c=colour, edgecolors="black", linewidths=0.3)
    return _save(fig, path)


def draw_keypoints(
    img0: np.ndarray,
    img1: np.ndarray,
    kpts0,
    kpts1,
    path: str | Path,
    outlines0: Sequence[np.ndarray] = (),
    outlines1: Sequence[np.ndarray] = (),
    title: str = "",
    max_points: int | None = None,
    seed: int = 0,
    long_side: int = LONG_SIDE_PX,
) -> Path:
    """Write a PNG of both images (laid out as in draw_matches) with their keypoints as small dots and the
    `outlines` (polygons (N, 2) in pixel coords of each image, e.g. the tiles matched at full resolution) in cyan.
    More than `max_points` keypoints of an image are thinned to a seeded random `max_points`."""
    kpts = [_as_points(kpts0, "kpts0"), _as_points(kpts1, "kpts1")]
    canvas = pair_canvas(img0, img1, long_side)
    picture = canvas.picture
    counts = []
    for side, points in enumerate(kpts):
        if max_points is not None and len(points) > max_points:
            kpts[side] = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
            counts.append(f"image{side}: {len(points)} keypoints ({max_points} drawn)")
        else:
            counts.append(f"image{side}: {len(points)} keypoints")
    legend = ", ".join(counts) + (", cyan: tiles matched at full resolution" if len(outlines0) else "")
    fig, axes = _figure([[Panel(picture.shape[1], picture.shape[0])]], f"{title}\n{legend}".strip())
    ax = axes[0][0]
    _show(ax, picture)
    for side, (points, outlines) in enumerate(zip(kpts, (outlines0, outlines1))):
        shown = canvas.points(side, points)
        ax.scatter(shown[:, 0], shown[:, 1], s=4, c=KEYPOINT_COLOUR, edgecolors="none", alpha=0.8)
        for outline in outlines:
            ax.add_patch(Polygon(canvas.points(side, _as_points(outline, "outline")), closed=True, fill=False,
                                 edgecolor=TILE_COLOUR, linewidth=1.2))
    return _save(fig, path)


def checkerboard(a: np.ndarray, b: np.ndarray, side: int) -> np.ndarray:
    """a and b (same shape) in alternate squares of `side` px."""
    rows, cols = np.indices(a.shape[:2])
    first = ((rows // side + cols // side) % 2 == 0)[..., None]
    return np.where(first, a, b)


def swipe(a: np.ndarray, b: np.ndarray, stacked: bool) -> np.ndarray:
    """a before the middle, b after it: left | right, or top / bottom when `stacked`."""
    out = b.copy()
    if stacked:
        out[: a.shape[0] // 2] = a[: a.shape[0] // 2]
    else:
        out[:, : a.shape[1] // 2] = a[:, : a.shape[1] // 2]
    return out


def red_cyan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a's lightness in red, b's in green and blue: where they agree the picture is grey, offsets show as red and
    cyan fringes."""
    grey_a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    grey_b = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    return np.stack([grey_a, grey_b, grey_b], axis=-1)


@dataclass(frozen=True)
class OverlayWindow:
    """A full-resolution window: image0's pixels and image1's resampled onto them (same shape), and where it lies
    in the whole view (box (x0, y0, x1, y1) in pixel edges of the view)."""

    image0: np.ndarray
    image1: np.ndarray
    box_in_view: tuple[float, float, float, float]
    label: str


@dataclass(frozen=True)
class ResidualField:
    """What the fit leaves at each tie point: `points` (N, 2) in pixel coords of the view, `vectors` (N, 2) along
    the view's x and y, in `unit`."""

    points: np.ndarray
    vectors: np.ndarray
    unit: str
    label: str


def nice_number(value: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above value (for a scale key)."""
    exponent = math.floor(math.log10(value))
    return max(step * 10.0**exponent for step in (1, 2, 5) if step * 10.0**exponent <= value)


def cell_means(points: np.ndarray, vectors: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean vector per square cell of a grid over a view of `size` (w, h), for cells with at least 2 points:
    (centres (M, 2), means (M, 2), cell side in px). About POINTS_PER_CELL points per cell."""
    width, height = size
    short, long = min(width, height), max(width, height)
    per_short = int(np.clip(round(math.sqrt(len(points) * short / long / POINTS_PER_CELL)), 1, MAX_CELLS_SHORT))
    cell = short / per_short
    col = np.clip(((points[:, 0] + 0.5) // cell).astype(int), 0, math.ceil(width / cell) - 1)
    row = np.clip(((points[:, 1] + 0.5) // cell).astype(int), 0, math.ceil(height / cell) - 1)
    table = pd.DataFrame({"row": row, "col": col, "dx": vectors[:, 0], "dy": vectors[:, 1]})
    grouped = table.groupby(["row", "col"]).agg(count=("dx", "size"), dx=("dx", "mean"), dy=("dy", "mean"))
    grouped = grouped[grouped["count"] >= 2].reset_index()
    centres = np.c_[(grouped["col"] + 0.5) * cell - 0.5, (grouped["row"] + 0.5) * cell - 0.5]
    centres = np.minimum(centres, [width - 1, height - 1])
    return centres, grouped[["dx", "dy"]].to_numpy(), cell


def _draw_residuals(ax: Axes, background: np.ndarray, field: ResidualField, factors: np.ndarray) -> None:
    """Mean residual arrows per cell over a dimmed background, with a scale key."""
    _show(ax, (background * 0.6).astype(np.uint8))
    points = to_display_coords(field.points, factors)
    vectors = field.vectors * factors / factors.mean()  # keep directions on a resized view
    ax.scatter(points[:, 0], points[:, 1], s=3, c=TILE_COLOUR, edgecolors="none", alpha=0.7)
    centres, means, cell = cell_means(points, vectors, (background.shape[1], background.shape[0]))
    lengths = np.hypot(means[:, 0], means[:, 1])
    if not len(means) or lengths.max() <= 0:
        ax.text(0.5, 0.5, "too few tie points per cell for arrows", transform=ax.transAxes, ha="center",
                color="white", fontsize=FONT_SIZE, wrap=True)
        return
    # the longest mean arrow spans most of a cell, and at most a quarter of the view's short side
    magnify = min(0.8 * cell, 0.25 * min(background.shape[:2])) / lengths.max()
    arrows = ax.quiver(centres[:, 0], centres[:, 1], means[:, 0], means[:, 1], angles="xy", scale_units="xy",
                       scale=1.0 / magnify, units="dots", width=2.5, headwidth=4, headlength=5, headaxislength=4.5,
                       color=MARK_COLOUR, edgecolor="black", linewidth=0.4, pivot="middle")
    key = nice_number(float(lengths.max()))
    width = background.shape[1]
    box_px = key * magnify + 90  # the key arrow and its label on a dark box at the bottom left
    ax.add_patch(Rectangle((0.0, 0.0), box_px / width, 28 / background.shape[0], transform=ax.transAxes,
                           facecolor="black", alpha=0.7))
    ax.quiverkey(arrows, (8 + key * magnify / 2) / width, 14 / background.shape[0], key, f"{key:g} {field.unit}", labelpos="E",
                 coordinates="axes", labelcolor="white", fontproperties={"size": FONT_SIZE - 1})


def draw_overlay(
    view0: np.ndarray,
    view1: np.ndarray,
    path: str | Path,
    windows: Sequence[OverlayWindow] = (),
    residuals: ResidualField | None = None,
    title: str = "",
    long_side: int = LONG_SIDE_PX,
) -> Path:
    """Write a PNG that shows by eye whether image1, resampled onto image0 (`view1`, same shape as `view0`), lies
    on it: a checkerboard and a swipe of the two over the whole view (edges run on across the squares and the seam
    where they agree), the residual field, and for each full-resolution window a checkerboard, a swipe and a
    red/cyan overlay. Each image is normalised on its own; no data (NaN) is black."""
    height, width = view0.shape[:2]
    scale = display_scale((width, height), long_side)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    factors = np.array([size[0] / width, size[1] / height])
    shown0, shown1 = display_image(resize(view0, size)), display_image(resize(view1, size))
    stacked = size[0] > STACK_ASPECT * size[1]
    whole = [(checkerboard(shown0, shown1, max(8, min(size) // 5)), "checkerboard: image0 | image1 resampled"),
             (swipe(shown0, shown1, stacked), "swipe: image0 " + ("above" if stacked else "left")
              + ", image1 " + ("below" if stacked else "right"))]
    panels = [Panel(size[0], size[1], text) for _, text in whole]
    if residuals is not None:
        panels.append(Panel(size[0], size[1], f"{residuals.label}: mean per cell, arrows magnified"))
    rows: list[list[Panel]] = [[panel] for panel in panels] if stacked else [panels]
    zooms = []
    for window in windows:
        side = max(window.image0.shape[:2])
        zoom = max(1, round(WINDOW_SIDE_PX / side))
        zooms.append(zoom)
        w, h = window.image0.shape[1] * zoom, window.image0.shape[0] * zoom
        rows.append([Panel(w, h, f"{window.label} (x{zoom}): checkerboard"), Panel(w, h, "swipe"),
                     Panel(w, h, "red: image0, cyan: image1")])
    fig, axes = _figure(rows, title)
    flat = [ax for row in axes for ax in row]
    for ax, (picture, _) in zip(flat, whole):
        _show(ax, picture)
    seam = (size[1] / 2 - 0.5) if stacked else (size[0] / 2 - 0.5)
    (flat[1].axhline if stacked else flat[1].axvline)(seam, color=MARK_COLOUR, linewidth=1.0)
    for number, window in enumerate(windows, start=1):
        x0, y0 = to_display_coords(np.array(window.box_in_view[:2]) - 0.5, factors)[0] + 0.5
        x1, y1 = to_display_coords(np.array(window.box_in_view[2:]) - 0.5, factors)[0] + 0.5
        flat[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=MARK_COLOUR,
                                    linewidth=1.5))
        flat[0].text(x0, y0 - 2, str(number), color=MARK_COLOUR, fontsize=FONT_SIZE, fontweight="bold",
                     va="bottom", ha="left")
    if residuals is not None:
        _draw_residuals(flat[2], shown0, residuals, factors)
    first_window = len(whole) + (residuals is not None)
    for index, (window, zoom) in enumerate(zip(windows, zooms)):
        h, w = window.image0.shape[:2]
        a = display_image(resize(window.image0, (w * zoom, h * zoom), nearest=True))
        b = display_image(resize(window.image1, (w * zoom, h * zoom), nearest=True))
        cb, sw, rc = flat[first_window + 3 * index: first_window + 3 * index + 3]
        _show(cb, checkerboard(a, b, max(4, min(a.shape[:2]) // 4)))
        _show(sw, swipe(a, b, stacked=False))
        sw.axvline(a.shape[1] / 2 - 0.5, color=MARK_COLOUR, linewidth=1.0)
        _show(rc, red_cyan(a, b))
    return _save(fig, path)


def draw_error_cdf(
    errors_by_method: Mapping[str, np.ndarray], path: str | Path, max_error: float = 10.0
) -> Path:
    """Write a PNG of the share of pairs with mean corner error <= x, per method (failures are inf)."""
    if not errors_by_method:
        raise ValueError("draw_error_cdf needs errors for at least one method")
    fig = Figure(figsize=(8.0, 5.5), dpi=DPI)
    ax = fig.add_subplot()
    for method, errors in errors_by_method.items():
        errors = np.sort(np.asarray(errors, dtype=np.float64).ravel())
        recall = 100.0 * np.arange(1, len(errors) + 1) / max(len(errors), 1)
        shown = errors <= max_error
        x = np.r_[0.0, errors[shown], max_error]
        y = np.r_[0.0, recall[shown], recall[shown][-1] if shown.any() else 0.0]
        label = f"{method} (AUC@3 {auc(errors, (3,))['auc@3']:.1f}, {int(np.sum(~np.isfinite(errors)))} failed)"
        ax.step(x, y, where="post", label=label, linewidth=1.5)
    ax.set_xlim(0.0, max_error)
    ax.set_ylim(0.0, 100.0)
    ax.set_xlabel("mean corner error (px)")
    ax.set_ylabel("pairs with error <= x (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def draw_bars(
    table: pd.DataFrame,
    path: str | Path,
    metric: str = "auc@3",
    group_key: str = "season_kind",
    by: str = "method",
) -> Path:
    """Write a PNG of grouped bars: `metric` per `group_key` value, one bar per `by` value.

    `table` is the output of metrics.summarise(records, group_key, by=by) (or a flat frame with those
    columns); the overall group 'all' is drawn last.
    """
    flat = table.reset_index() if {group_key, by} - set(table.columns) else table
    missing = [key for key in (group_key, by, metric) if key not in flat.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing} needed to draw {metric} bars")
    groups = [g for g in pd.unique(flat[group_key]) if g != "all"]
    if (flat[group_key] == "all").any():
        groups.append("all")
    methods = list(pd.unique(flat[by]))
    values = flat.pivot_table(index=group_key, columns=by, values=metric, aggfunc="first").reindex(
        index=groups, columns=methods
    )
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(8.0, 1.2 * len(groups) * max(1, len(methods) / 2)), 5.0), dpi=DPI)
    ax = fig.add_subplot()
    positions = np.arange(len(groups))
    for i, method in enumerate(methods):
        centres = positions + (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(centres, values[method].to_numpy(), width, label=str(method))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(positions, [str(g) for g in groups])
    ax.set_xlabel(group_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per {group_key}")
    # AUCs share a fixed 0-100 axis so figures compare at a glance; other metrics scale to their data.
    if metric.startswith("auc"):
        ax.set_ylim(0.0, 105.0)
    else:
        ax.set_ylim(bottom=0.0)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
