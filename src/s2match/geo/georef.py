"""Georeference helpers: pixel <-> map coordinates, the prior transform between two grids, their overlap.

Pixel convention (OpenCV): (x, y) with (0, 0) the centre of the top-left pixel, so pixel (x, y) sits at the affine
coordinates (x + 0.5, y + 0.5) of a rasterio transform (which address pixel corners).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform as transform_coords

WGS84 = CRS.from_epsg(4326)
# Metres per degree of latitude and of longitude at the equator (WGS84 mean values): geographic grids only.
METRES_PER_DEGREE_LAT = 110_574.0
METRES_PER_DEGREE_LON = 111_320.0
# Points per side of the image0 grid the prior homography is fitted to.
PRIOR_GRID_POINTS = 11


@dataclass(frozen=True)
class Grid:
    """Where an image's pixels lie: CRS, affine transform (pixel corners, as rasterio) and size in pixels.
    `crs` None: a picture without georeference (identity transform)."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None


def pixel_to_map(grid: Grid, pts) -> np.ndarray:
    """(N, 2) pixel coords -> (N, 2) map coords in the grid's CRS."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    a, b, c, d, e, f = tuple(grid.transform)[:6]
    x, y = pts[:, 0] + 0.5, pts[:, 1] + 0.5
    return np.c_[a * x + b * y + c, d * x + e * y + f]


def map_to_pixel(grid: Grid, xy) -> np.ndarray:
    """(N, 2) map coords in the grid's CRS -> (N, 2) pixel coords."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    a, b, c, d, e, f = tuple(~grid.transform)[:6]
    return np.c_[a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f] - 0.5


def reproject_points(src_crs: CRS, dst_crs: CRS, xy) -> np.ndarray:
    """(N, 2) map coords from one CRS to another (identity when they are equal)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if CRS.from_user_input(src_crs) == CRS.from_user_input(dst_crs) or len(xy) == 0:
        return xy.copy()
    xs, ys = transform_coords(src_crs, dst_crs, xy[:, 0].tolist(), xy[:, 1].tolist())
    return np.c_[xs, ys]


def pixel_to_pixel(grid0: Grid, grid1: Grid, pts) -> np.ndarray:
    """Pixel of image0 -> map coords -> image1's CRS -> pixel of image1, exactly (no homography approximation)."""
    return map_to_pixel(grid1, reproject_points(grid0.crs, grid1.crs, pixel_to_map(grid0, pts)))


@dataclass(frozen=True)
class Prior:
    """The homography image0 px -> image1 px implied by the two georeferences, and how well a homography
    represents it (max error in image1 px over a grid: non-zero only across CRSs, e.g. two UTM zones)."""

    H: np.ndarray
    max_error_px: float


def prior_homography(grid0: Grid, grid1: Grid) -> Prior:
    """Fit the georeference mapping image0 px -> image1 px with a homography (least squares on a grid of image0)."""
    xs = np.linspace(0, grid0.width - 1, PRIOR_GRID_POINTS)
    ys = np.linspace(0, grid0.height - 1, PRIOR_GRID_POINTS)
    samples = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    mapped = pixel_to_pixel(grid0, grid1, samples)
    if not np.all(np.isfinite(mapped)):
        raise ValueError("the georeference of image0 cannot be expressed in the CRS of image1")
    H, _ = cv2.findHomography(samples, mapped, 0)
    if H is None:
        raise ValueError("the georeferences of the two images give no usable pixel mapping")
    projected = np.c_[samples, np.ones(len(samples))] @ H.T
    error = np.linalg.norm(projected[:, :2] / projected[:, 2:] - mapped, axis=1)
    return Prior(H=np.asarray(H, dtype=np.float64), max_error_px=float(error.max()))


def frame_corners(width: int, height: int) -> np.ndarray:
    """Outer corners of a frame in pixel coords (pixel edges are at -0.5 and size - 0.5), clockwise."""
    return np.array([[-0.5, -0.5], [width - 0.5, -0.5], [width - 0.5, height - 0.5], [-0.5, height - 0.5]])


def overlap_box(H: np.ndarray, size0: tuple[int, int], size1: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), integer pixel edges in image0, of the part of image0 that H maps into image1;
    None when they do not overlap. size0, size1: (width, height)."""
    frame1_in_0 = np.c_[frame_corners(*size1), np.ones(4)] @ np.linalg.inv(H).T
    if np.any(frame1_in_0[:, 2] * frame1_in_0[0, 2] <= 0):  # image1's frame crosses image0's horizon
        return None
    quad = (frame1_in_0[:, :2] / frame1_in_0[:, 2:]).astype(np.float32)
    frame0 = frame_corners(*size0).astype(np.float32)
    if not cv2.isContourConvex(quad[:, None]):
        return None
    area, polygon = cv2.intersectConvexConvex(frame0, quad)
    if area <= 0 or polygon is None:
        return None
    polygon = polygon.reshape(-1, 2)
    x0, y0 = np.floor(polygon.min(axis=0) + 0.5).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0) + 0.5).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, size0[0]), min(y1, size0[1])
    return (int(x0), int(y0), int(x1), int(y1)) if x1 > x0 and y1 > y0 else None


def metres_per_unit(crs: CRS, latitude: float) -> tuple[float, float]:
    """Metres per map unit along x and y: 1 for projected CRSs in metres; for geographic ones, at `latitude`."""
    if crs.is_geographic:
        return METRES_PER_DEGREE_LON * float(np.cos(np.radians(latitude))), METRES_PER_DEGREE_LAT
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return float(factor), float(factor)


def map_shift_metres(grid0: Grid, grid1: Grid, pts0, pts1) -> np.ndarray:
    """(N, 2) east/north shift in metres from where image0 places each point to where image1 places its match
    (both in image0's CRS): the misregistration of image1 relative to image0 at the tie points."""
    map0 = pixel_to_map(grid0, pts0)
    map1 = reproject_points(grid1.crs, grid0.crs, pixel_to_map(grid1, pts1))
    latitude = float(np.mean(reproject_points(grid0.crs, WGS84, map0)[:, 1])) if len(map0) else 0.0
    mx, my = metres_per_unit(grid0.crs, latitude)
    return (map1 - map0) * (mx, my)


def boxes_intersect(a, b) -> bool:
    """Whether two (west, south, east, north) boxes overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
