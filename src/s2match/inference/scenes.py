"""The images registration works on: a scene file read window by window, or an array already in memory.

Both read any box of the image at any output size, so registration never holds more than a view at a time:
`SceneImage` reads a product (GeoTIFF, JP2, a .SAFE folder, loose band files, PNG / JPEG) through the pipeline's
band logic (reflectance, offsets, NaN = no data); `ArrayScene` wraps a (C, H, W) array (the evaluation's tiles).

Pixel convention (OpenCV): (x, y), (0, 0) the centre of the top-left pixel; a box (x0, y0, x1, y1) is in pixel
edges (x0 = 0 is the left edge of the first column).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from s2match.geo.georef import Grid
from s2match.s2.products import Product, ProductError, open_product
from s2match.s2.reflectance import choose_composite, composite_block, target_grid

Box = tuple[int, int, int, int]
# px: the short side an overview keeps at least (local features need room around them)
MIN_OVERVIEW_SIDE = 64


def box_to_pixels(box: tuple[float, float, float, float], out_size: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixels of `box` (edges, full-resolution px) resampled to `out_size` = (w, h) to full-resolution
    pixels. Pixel edges line up, so centres map as x = x0 + (u + 0.5) * sx - 0.5."""
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / out_size[0], (y1 - y0) / out_size[1]
    return np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)


def overview_factor(box: Box, longest_side: int) -> float:
    """Box pixels per overview pixel of Scene.overview(box, longest_side): at most `longest_side` px, never
    enlarged, never narrower than MIN_OVERVIEW_SIDE px."""
    width, height = box[2] - box[0], box[3] - box[1]
    return max(1.0, min(max(width, height) / longest_side, min(width, height) / MIN_OVERVIEW_SIDE))


class Scene:
    """An image registration can read: `grid` (crs None without georeference), `read(box, out_size)`."""

    grid: Grid
    name: str

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.width, self.grid.height

    def read(self, box: Box, out_size: tuple[int, int]) -> np.ndarray:
        """(C, h, w) float32 of the box (pixel edges, inside the frame) resampled to out_size = (w, h)."""
        raise NotImplementedError

    def overview(self, box: Box, longest_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The box decimated to at most `longest_side` px, and its 3x3 map to full-res pixels. Never enlarged, and
        never narrower than MIN_OVERVIEW_SIDE px: an elongated image (64 x 4000) keeps a width features can use."""
        width, height = box[2] - box[0], box[3] - box[1]
        factor = overview_factor(box, longest_side)
        out_size = (max(1, round(width / factor)), max(1, round(height / factor)))
        return self.read(box, out_size), box_to_pixels(box, out_size)

    def describe(self) -> dict:
        return {"name": self.name, "width": self.grid.width, "height": self.grid.height,
                "crs": self.grid.crs.to_string() if self.grid.georeferenced else None,
                "transform": list(self.grid.transform)[:6] if self.grid.georeferenced else None}


@dataclass
class SceneImage(Scene):
    """One input file, read through the pipeline's band logic: reflectance (or [0, 1] for 8-bit pictures),
    NaN = no data, any window at any decimation."""

    path: Path
    product: Product
    composite: str
    bands: list[str]
    grid: Grid

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self, box: Box, out_size: tuple[int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        transform = self.grid.transform @ Affine.translation(x0, y0) @ Affine.scale(
            (x1 - x0) / out_size[0], (y1 - y0) / out_size[1])
        grid = Grid(self.grid.crs, transform, int(out_size[0]), int(out_size[1]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return composite_block(self.product, self.composite, self.bands, grid,
                                       Window(0, 0, int(out_size[0]), int(out_size[1])))
        except RasterioError as err:
            raise ProductError(f"{self.path}: image data unreadable ({str(err).splitlines()[0]})") from err

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "composite": self.composite, "bands": self.bands}


@dataclass
class ArrayScene(Scene):
    """A (C, H, W) float array (NaN = no data) on `grid` (Grid(None, identity, W, H) when not georeferenced)."""

    data: np.ndarray
    grid: Grid
    name: str

    @classmethod
    def of(cls, data: np.ndarray, name: str, grid: Grid | None = None) -> ArrayScene:
        return cls(data, grid or Grid(None, Affine.identity(), data.shape[2], data.shape[1]), name)

    def read(self, box: Box, out_size: tuple[int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        crop = self.data[:, y0:y1, x0:x1].astype(np.float32)
        if (x1 - x0, y1 - y0) == tuple(out_size):
            return crop
        # INTER_AREA averages whole source pixels when decimating: pixel edges line up, as in box_to_pixels
        shrinking = out_size[0] < x1 - x0
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return np.stack([cv2.resize(band, tuple(out_size), interpolation=interpolation) for band in crop])


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
        except RasterioError as err:
            raise ProductError(f"{first}: unreadable band file ({str(err).splitlines()[0]})") from err
    grid = Grid(None, Affine.identity(), width, height) if crs is None else target_grid(product, bands, resolution)
    if grid.transform.determinant == 0:
        raise ProductError(f"{path}: unusable georeference (a pixel size of 0 in its transform {grid.transform[:6]})")
    return SceneImage(path, product, composite, bands, grid)
