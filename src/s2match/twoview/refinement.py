"""Sub-pixel refinement of tie points by area correlation in the rectified frame (conf/refinement/).

Once a robust fit H is known, image1 resampled by H lies on image0's frame to within a pixel or two. Around each
tie point, a window of image0 and the same window of the rectified image1 are cross-correlated (FFT, all windows
of a view at once), the peak located to a fraction of a pixel by a parabola through it and its neighbours, and the
window of image1 resampled at the estimate and correlated again (`iterations` times): the residual shift then
sits at the centre of the peak, where a parabola has no bias towards whole pixels.

What is correlated is not the brightness but the gradient orientation field (s2match.orientation), which a
contrast inversion under snow leaves alike.

A window is used only when its correlation is unambiguous: both windows hold data, the normalised correlation of
the two fields at the found shift reaches `min_quality` (a featureless, cloud-covered or changed patch does not),
and the shift stays within `max_shift` px. Rejected windows are counted by reason, never used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import scipy.fft

from s2match.orientation import orientation_field

REASONS = ("ok", "no data", "low correlation", "shift too large")
STATUS_DTYPE = "<U16"  # room for every status, "outlier" of the final fit included


def _windows(planes: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) complex windows of a field centred at `centres` (x, y), bicubic between pixels. The windows are
    stacked into few remaps (each output pixel depends only on its own map entry, so this equals a remap per window);
    a remap's maps must have fewer than SHRT_MAX rows."""
    grid = np.arange(size, dtype=np.float32) - (size - 1) / 2
    centres = centres.astype(np.float32)
    windows = np.empty((len(centres), size, size), np.complex128)
    per_remap = (np.iinfo(np.int16).max - 1) // size
    for start in range(0, len(centres), per_remap):
        chunk = centres[start:start + per_remap]
        shape = (len(chunk), size, size)
        map_x = np.broadcast_to(grid[None, None, :] + chunk[:, 0, None, None], shape).reshape(-1, size)
        map_y = np.broadcast_to(grid[None, :, None] + chunk[:, 1, None, None], shape).reshape(-1, size)
        part = windows[start:start + per_remap]
        part.real, part.imag = (cv2.remap(plane, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
                                .reshape(shape) for plane in planes)
    return windows


def _parabola_vertex(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
    """Offset of the vertex of the parabola through (-1, minus), (0, centre), (1, plus); 0 where it is no peak."""
    curvature = minus - 2 * centre + plus
    peaked = curvature < 0
    return np.where(peaked, 0.5 * (minus - plus) / np.where(peaked, curvature, -1.0), 0.0)


def peak_offsets(reference_spectrum: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """(N, 2) (x, y) offsets of the cross-correlation peaks of N window pairs, given the 2-D FFT of the reference
    windows (N, W, W) and the moving windows: the ground at a pixel of the reference lies that much earlier in
    `moving` (moving(p) ~ reference(p + offset)), to a fraction of a pixel."""
    count, size = moving.shape[0], moving.shape[-1]
    if count == 0:  # every window rejected already (no data)
        return np.zeros((0, 2))
    surface = np.abs(scipy.fft.ifft2(reference_spectrum * np.conj(scipy.fft.fft2(moving))))
    rows, cols = np.divmod(surface.reshape(count, -1).argmax(axis=1), size)
    index = np.arange(count)
    peak = surface[index, rows, cols]
    dy = _parabola_vertex(surface[index, (rows - 1) % size, cols], peak, surface[index, (rows + 1) % size, cols])
    dx = _parabola_vertex(surface[index, rows, (cols - 1) % size], peak, surface[index, rows, (cols + 1) % size])
    cols, rows = (np.where(v >= size / 2, v - size, v) for v in (cols, rows))  # circular: the upper half is negative
    return np.stack([cols + dx, rows + dy], axis=1)


@dataclass(frozen=True)
class RefinedPoints:
    """Per tie point: the window centre in view0 px (a pixel corner-free position: integer pixels of view0 are
    sampled exactly), its shift into the rectified view1, the correlation quality and the status (REASONS)."""

    points0: np.ndarray  # (N, 2)
    shifts: np.ndarray  # (N, 2): the ground at points0 in view0 lies at points0 + shift in the rectified view1
    quality: np.ndarray  # (N,)
    status: np.ndarray  # (N,) str

    @property
    def reliable(self) -> np.ndarray:
        return self.status == "ok"

    def counts(self) -> dict[str, int]:
        return {reason: int(np.sum(self.status == reason)) for reason in REASONS}


@dataclass(frozen=True)
class TiePointRefiner:
    """Area-based sub-pixel refinement of tie points (see the module docstring).

    window: side of the correlated windows (px of the view); iterations: correlations per window, each on the
    window resampled at the estimate so far; min_quality: normalised correlation of the orientation fields needed to use a window; max_shift: px; sigma:
    Gaussian smoothing (px) before the gradients; max_points: windows per view at most, spread over it.
    """

    window: int
    iterations: int
    min_quality: float
    max_shift: float
    sigma: float
    max_points: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TiePointRefiner:
        return cls(int(cfg["window"]), int(cfg["iterations"]), float(cfg["min_quality"]), float(cfg["max_shift"]),
                   float(cfg["sigma"]), int(cfg["max_points"]))

    def spread(self, points: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Indices of at most max_points points inside the view with a whole window around them, the best scored
        per cell of a grid of half-window cells (windows barely overlap, so each adds its own evidence)."""
        half = self.window / 2 + 1
        inside = np.flatnonzero((points[:, 0] >= half) & (points[:, 0] <= size[0] - 1 - half)
                                & (points[:, 1] >= half) & (points[:, 1] <= size[1] - 1 - half))
        order = inside[np.argsort(-scores[inside], kind="stable")]
        if len(order) == 0:
            return order
        cells = np.floor(points[order] / (self.window / 2)).astype(np.int64)
        _, first = np.unique(cells, axis=0, return_index=True)  # first in `order`: the best scored of its cell
        return order[np.sort(first)][: self.max_points]

    def refine(self, view0: np.ndarray, view1: np.ndarray, points: np.ndarray) -> RefinedPoints:
        """Shifts that bring the rectified `view1` onto `view0` at each of `points` (view px; both views (C, H, W)
        on one frame)."""
        field0, valid0 = orientation_field(view0, self.sigma)
        field1, valid1 = orientation_field(view1, self.sigma)
        valid = cv2.erode((valid0 & valid1).astype(np.uint8), np.ones((self.window + 3,) * 2, np.uint8),
                          borderValue=0).astype(bool)
        taper = np.outer(np.hanning(self.window), np.hanning(self.window))
        # Window centres at pixel centres + 0.5: an even window of view0 is then cut from whole pixels.
        centres = np.floor(points) + 0.5
        shifts = np.zeros_like(centres)
        quality = np.zeros(len(centres))
        status = np.full(len(centres), "ok", dtype=STATUS_DTYPE)
        status[~valid[centres[:, 1].astype(int), centres[:, 0].astype(int)]] = "no data"
        active = np.flatnonzero(status == "ok")
        reference = _windows(field0, centres[active], self.window) * taper
        spectrum = scipy.fft.fft2(reference)  # the reference windows stay put: one FFT for every iteration
        for _ in range(self.iterations):
            moving = _windows(field1, centres[active] + shifts[active], self.window) * taper
            shifts[active] -= peak_offsets(spectrum, moving)
            within = np.all(np.abs(shifts[active]) <= self.max_shift, axis=1)
            status[active[~within]] = "shift too large"
            active, reference, spectrum = active[within], reference[within], spectrum[within]
        moving = _windows(field1, centres[active] + shifts[active], self.window) * taper
        norms = np.sqrt(np.sum(np.abs(reference) ** 2, axis=(1, 2)) * np.sum(np.abs(moving) ** 2, axis=(1, 2)))
        correlation = np.abs(np.sum(np.conj(moving) * reference, axis=(1, 2)))
        quality[active] = np.where(norms > 0, correlation / np.where(norms > 0, norms, 1.0), 0.0)
        status[active[quality[active] < self.min_quality]] = "low correlation"
        return RefinedPoints(centres, shifts, quality, status)
