"""The shift between two dates of one tile, which a pair's ground truth must include.

The tiles of an AOI lie on one grid by their georeference, but two dates' georeferences can disagree by a fraction
of a pixel to a few pixels (Sentinel-2 products before the global reference image; strips from other sources):
the sample's two T33UUU dates are 1.9 px apart. A pair's ground truth is therefore the synthetic warp composed
with the measured shift between its dates, not the warp alone.

The shift is measured on the two unwarped tiles, over a grid of half-overlapping windows, by scikit-image's
phase correlation with an upsampled DFT (an estimator of its own: the registration being evaluated finds peaks
differently), on the gradient orientation field, which a contrast inversion between seasons leaves alike. The
windows vote: the tile's shift is the median of those within `agree_px` of the median of all, and it is measured
only when at least `min_windows` windows, and half of them, agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.registration import phase_cross_correlation

from s2match.orientation import orientation_field


@dataclass(frozen=True)
class DateShiftSpec:
    """window: side of the correlated windows (px); sigma: Gaussian smoothing (px) before the gradients;
    upsample: the correlation peak is found to 1/upsample px; agree_px, min_windows: the vote (module docstring)."""

    window: int
    sigma: float
    upsample: int
    agree_px: float
    min_windows: int


@dataclass(frozen=True)
class DateShift:
    """shift: (x, y) px, the ground at p in tile0 lies at p + shift in tile1; None when not measured.
    windows: windows with data and edges on both dates; agreeing: those that voted for the shift."""

    shift: np.ndarray | None
    windows: int
    agreeing: int

    @property
    def reason(self) -> str:
        if self.shift is not None:
            return ""
        if self.windows == 0:
            return "no window has data and edges on both dates"
        return f"only {self.agreeing} of {self.windows} windows agree on the shift between the dates"


def measure_date_shift(tile0: np.ndarray, tile1: np.ndarray, spec: DateShiftSpec) -> DateShift:
    """The shift of `tile1`'s ground against `tile0`'s: both (C, H, W) on one grid, NaN = no data."""
    field0, valid0 = orientation_field(tile0, spec.sigma)
    field1, valid1 = orientation_field(tile1, spec.sigma)
    z0, z1 = field0[0] + 1j * field0[1], field1[0] + 1j * field1[1]
    valid = valid0 & valid1
    size, stride = spec.window, spec.window // 2
    taper = np.outer(np.hanning(size), np.hanning(size))  # no wrap-around edge to pull the peak to zero
    shifts = []
    for y in range(0, valid.shape[0] - size + 1, stride):
        for x in range(0, valid.shape[1] - size + 1, stride):
            window0, window1 = z0[y:y + size, x:x + size] * taper, z1[y:y + size, x:x + size] * taper
            if not (valid[y:y + size, x:x + size].all() and np.any(window0) and np.any(window1)):
                continue
            # The shift that registers the window of tile1 onto tile0's is minus the displacement of its ground.
            offset, _, _ = phase_cross_correlation(window0, window1, upsample_factor=spec.upsample, normalization=None)
            shifts.append(-offset[::-1])
    if not shifts:
        return DateShift(None, 0, 0)
    shifts = np.asarray(shifts)
    agree = np.all(np.abs(shifts - np.median(shifts, axis=0)) <= spec.agree_px, axis=1)
    count = int(agree.sum())
    if count < spec.min_windows or 2 * count < len(shifts):
        return DateShift(None, len(shifts), count)
    return DateShift(np.median(shifts[agree], axis=0), len(shifts), count)
