"""Pictures for inspection and the evaluation report: keypoints, matches, error curves, AUC bars.

Figures are drawn with matplotlib's object API (Agg canvas, no pyplot state) and written as PNG atomically.
Pixel convention (OpenCV): (x, y) with (0, 0) the centre of the top-left pixel.
"""

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from s2match.fileio import atomic_path
from s2match.evaluation.metrics import auc

DPI = 100
# Scenes larger than this (px, longest side of what is drawn) are downsampled for display: a 10980 px tile
# drawn 1:1 makes an unreadable, huge PNG.
DISPLAY_MAX_SIDE = 2000
# Small crops are drawn enlarged so markers, lines and the title stay legible.
DISPLAY_MIN_SIDE = 800
MARGIN_PX = 30
TITLE_PX = 50
MIN_FIGURE_WIDTH_PX = 700  # room for the title over narrow strips
COLORBAR_PX = 110
GAP_PX = 10  # white gap between the two images of a match figure
MATCH_CMAP = "turbo"
OUTLIER_COLOUR = "magenta"


def stretch(img: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0) -> np.ndarray:
    """Contrast-stretch a grey (H, W) / (H, W, 1) or RGB (H, W, 3) image to uint8 for display.

    Each channel maps its [low_pct, high_pct] percentiles (over finite pixels) to [0, 255] and clips, so a
    few very bright pixels (snow, cloud) saturate instead of squeezing everything else into the dark end. NaN / inf pixels become 0. Works on float
    reflectance, uint16 DN and uint8 alike. Returns (H, W) for grey input, (H, W, 3) for RGB.
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


def display_factor(sizes: list[tuple[int, int]], max_side: int = DISPLAY_MAX_SIDE) -> float:
    """Common scale (<= 1) that fits a layout of these (width, height) images side by side in max_side."""
    total_width = sum(width for width, _ in sizes) + GAP_PX * (len(sizes) - 1)
    tallest = max(height for _, height in sizes)
    return min(1.0, max_side / max(total_width, tallest))


def downsample_for_display(img: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize img by `factor` (<= 1, area averaging). Returns the image and the exact (fx, fy) applied."""
    height, width = img.shape[:2]
    if factor >= 1.0:
        return img, np.ones(2)
    new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
    small = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_AREA)
    return small, np.array([new_width / width, new_height / height])


def to_display_coords(pts: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Map (N, 2) pixel coords of an image to those of its resized copy.

    With pixel centres at integers, pixel edges sit at -0.5, so the scaling is about (-0.5, -0.5).
    """
    return (np.asarray(pts, dtype=np.float64) + 0.5) * factors - 0.5


def _display_rgb(img: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Downsample, then stretch: percentiles of a full 10980 px tile would cost gigabytes for no visible gain."""
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        img = img.astype(np.float32)  # dtypes cv2.resize cannot take
    small, factors = downsample_for_display(img, factor)
    shown = stretch(small)
    if shown.ndim == 2:
        shown = np.repeat(shown[..., None], 3, axis=2)
    return shown, factors


def _image_figure(width: int, height: int, colorbar: bool, title: str) -> tuple[Figure, Axes, Axes | None]:
    """Figure whose image axes shows a (width x height) canvas, enlarged if small; optional colorbar axes."""
    zoom = max(1.0, DISPLAY_MIN_SIDE / max(width, height))
    shown_w, shown_h = width * zoom, height * zoom
    content_w = shown_w + (COLORBAR_PX if colorbar else 0)
    fig_w = max(content_w + 2 * MARGIN_PX, MIN_FIGURE_WIDTH_PX)
    fig_h = shown_h + MARGIN_PX + TITLE_PX
    left = (fig_w - content_w) / 2
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    ax = fig.add_axes((left / fig_w, MARGIN_PX / fig_h, shown_w / fig_w, shown_h / fig_h))
    ax.set_axis_off()
    cax = None
    if colorbar:
        cax = fig.add_axes(((left + shown_w + 20) / fig_w, MARGIN_PX / fig_h, 20 / fig_w, shown_h / fig_h))
    fig.suptitle(title, y=1.0 - TITLE_PX / 2 / fig_h, va="center", fontsize=10, wrap=True)
    return fig, ax, cax


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


def draw_keypoints(img: np.ndarray, kpts, path: str | Path, title: str = "") -> Path:
    """Write a PNG of the contrast-stretched image with its keypoints (N, 2) marked."""
    kpts = _as_points(kpts, "kpts")
    height, width = img.shape[:2]
    shown, factors = _display_rgb(img, display_factor([(width, height)]))
    fig, ax, _ = _image_figure(
        shown.shape[1], shown.shape[0], colorbar=False, title=f"{title}\n{len(kpts)} keypoints".strip()
    )
    ax.imshow(shown, interpolation="nearest")
    pts = to_display_coords(kpts, factors)
    ax.scatter(pts[:, 0], pts[:, 1], s=12, c="lime", edgecolors="black", linewidths=0.5)
    ax.set_xlim(-0.5, shown.shape[1] - 0.5)
    ax.set_ylim(shown.shape[0] - 0.5, -0.5)
    return _save(fig, path)


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
) -> Path:
    """Write a PNG of img0 | img1 side by side with a line per match (kpts0[i] <-> kpts1[i]).

    Lines are coloured by `scores` (confidence, colour bar on the right); with `inliers` (bool per match)
    outliers are drawn thin in magenta. subset='all' draws every match; 'first' or 'random' (seeded) draw
    `max_lines` of them. Images whose side-by-side layout exceeds DISPLAY_MAX_SIDE px are downsampled for
    display and the coordinates scaled to match.
    """
    kpts0, kpts1 = _as_points(kpts0, "kpts0"), _as_points(kpts1, "kpts1")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not len(kpts0) == len(kpts1) == len(scores):
        raise ValueError(f"kpts0, kpts1, scores differ in length: {len(kpts0)}, {len(kpts1)}, {len(scores)}")
    inlier_mask = None if inliers is None else np.asarray(inliers, dtype=bool).ravel()
    if inlier_mask is not None and len(inlier_mask) != len(kpts0):
        raise ValueError(f"inliers has {len(inlier_mask)} entries for {len(kpts0)} matches")
    chosen = _select(len(kpts0), max_lines, subset, seed)

    sizes = [(img0.shape[1], img0.shape[0]), (img1.shape[1], img1.shape[0])]
    factor = display_factor(sizes)
    shown0, factors0 = _display_rgb(img0, factor)
    shown1, factors1 = _display_rgb(img1, factor)
    offset = shown0.shape[1] + GAP_PX
    canvas = np.full((max(shown0.shape[0], shown1.shape[0]), offset + shown1.shape[1], 3), 255, np.uint8)
    canvas[: shown0.shape[0], : shown0.shape[1]] = shown0
    canvas[: shown1.shape[0], offset:] = shown1

    counts = f"{len(kpts0)} matches, {len(chosen)} drawn"
    if inlier_mask is not None:
        n_inliers = int(inlier_mask.sum())
        counts += f", {n_inliers} inliers ({100.0 * n_inliers / max(len(kpts0), 1):.0f}%, outliers magenta)"
    fig, ax, cax = _image_figure(
        canvas.shape[1], canvas.shape[0], colorbar=True, title=f"{title}\n{counts}".strip()
    )
    ax.imshow(canvas, interpolation="nearest")
    pts0 = to_display_coords(kpts0[chosen], factors0)
    pts1 = to_display_coords(kpts1[chosen], factors1) + (offset, 0.0)
    segments = np.stack([pts0, pts1], axis=1)
    in_range = len(scores) == 0 or (scores.min() >= 0.0 and scores.max() <= 1.0)
    norm = Normalize(0.0, 1.0) if in_range else Normalize(scores.min(), scores.max())
    is_inlier = np.ones(len(chosen), bool) if inlier_mask is None else inlier_mask[chosen]
    lines = LineCollection(
        segments[is_inlier], cmap=colormaps[MATCH_CMAP], norm=norm, linewidths=0.7, alpha=0.85
    )
    lines.set_array(scores[chosen][is_inlier])
    ax.add_collection(lines)
    ax.add_collection(LineCollection(segments[~is_inlier], colors=OUTLIER_COLOUR, linewidths=0.4, alpha=0.6))
    ends = np.concatenate([pts0, pts1])
    ax.scatter(ends[:, 0], ends[:, 1], s=2, c="white", edgecolors="none")
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    fig.colorbar(lines, cax=cax, label="match confidence")
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
