"""Stacks with a known answer, for the tests and benchmarks/coregister_shifts.py: real dates on one grid, each date's
content moved by a known shift while its georeference stays, so the georeference says "aligned" and the content
says "shifted by this much"; the co-registration must find the shift.

The T36UYA overview dates of the sample are co-registered by Sentinel-2's processing to a few metres, under 0.05 px
of their 107 m pixels, so there the synthetic shifts are the truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.windows import Window

from s2match.geo.homography import warp_points


def shifted(data: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """(H, W) float32 content moved by `shift` = (x, y) px: out(p + shift) = data(p), bicubic."""
    H = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0.0, 0.0, 1.0]])
    return cv2.warpPerspective(data.astype(np.float32), H, (data.shape[1], data.shape[0]), flags=cv2.INTER_CUBIC)


def write_dated(path: Path, data: np.ndarray, transform, crs, day: str) -> Path:
    """(H, W) data as a float32 GeoTIFF (values clipped to 1..255: 0 is no data) with the DATE tag YYYYMMDD."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", dtype="float32", count=1, width=data.shape[1],
                       height=data.shape[0], crs=crs, transform=transform, tiled=True, blockxsize=128,
                       blockysize=128, compress="deflate") as dst:
        dst.write(np.clip(data, 1, 255).astype(np.float32)[None])
        dst.update_tags(DATE=day)
    return path


def shifted_date(source: Path, window: Window, shift: tuple[float, float], path: Path, day: str) -> Path:
    """The first band of `source` (shifted as a whole, so no edge enters the window) cropped to `window`."""
    with rasterio.open(source) as src:
        whole = src.read(1).astype(np.float32)
        transform, crs = src.window_transform(window), src.crs
    rows = slice(int(window.row_off), int(window.row_off + window.height))
    cols = slice(int(window.col_off), int(window.col_off + window.width))
    return write_dated(path, shifted(whole, shift)[rows, cols], transform, crs, day)


def centre_error(homography: str | np.ndarray, truth: tuple[float, float], size: tuple[int, int]) -> float:
    """Distance (px) at the centre of a `size` = (w, h) reference between where a transform (reference px -> date
    px, as shifts.csv writes it) and the true shift put the reference's centre."""
    H = np.array(json.loads(homography) if isinstance(homography, str) else homography)
    centre = np.array([[size[0] / 2 - 0.5, size[1] / 2 - 0.5]])
    return float(np.linalg.norm(warp_points(H, centre) - (centre + np.asarray(truth))))
