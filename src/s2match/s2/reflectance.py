"""A Sentinel-2 product's bands as the image the matcher sees: reflectance, one grid, nodata as NaN.

(DN + offset) / quantification with the offset of the product's metadata or the baseline >= 04.00 rule; 8-bit
display products (TCI, stretched RGB) scaled to [0, 1]; bands resampled onto one grid; a composite (one band,
RGB, NDVI, or grey) of any window. Used by the bands stage and by inference, which read windows of it.
"""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import from_origin
from rasterio.windows import Window, from_bounds

from s2match.geo.georef import Grid
from s2match.s2.products import Product, ProductError

# Bands whose mean stands in for a grey image when a product lacks the configured composite.
VISIBLE = ["B04", "B03", "B02"]
EIGHT_BIT_SCALE = 255.0
# Sentinel-2 bands are 10, 20 or 60 m; a coarser product is an overview and keeps its own grid.
COARSEST_NATIVE_RESOLUTION = 60.0


def choose_composite(product: Product, composite: str, composites: dict, fallback: str) -> tuple[str, list[str]]:
    """(composite name, bands it needs) for a product; falls back to grey when allowed and needed."""
    if composite != "gray" and composite not in composites:
        raise ValueError(f"bands.composite={composite}: unknown composite; known: gray, {', '.join(composites)}")
    wanted = list(composites[composite]) if composite != "gray" else []
    if wanted and all(band in product.bands for band in wanted):
        return composite, wanted
    if composite != "gray" and fallback != "gray":
        missing = [band for band in wanted if band not in product.bands]
        raise ProductError(f"{product.path}: product has no band {','.join(missing)} (has {','.join(product.bands)})")
    visible = [band for band in VISIBLE if band in product.bands]
    if visible:
        return "gray", visible
    if len(product.bands) == 1:
        return "gray", list(product.bands)
    raise ProductError(f"{product.path}: no grey image can be made from bands {','.join(product.bands)}")


def target_grid(product: Product, bands: list[str], resolution: float | None) -> Grid:
    """The finest grid among the bands used, resampled to `resolution` metres for projected CRSs
    (overviews coarser than any Sentinel-2 band are left as they are)."""
    grids = []
    for band in bands:
        path, _ = product.bands[band]
        try:
            with rasterio.open(path) as src:
                grids.append(Grid(src.crs, src.transform, src.width, src.height))
        except RasterioIOError as err:
            raise ProductError(f"{path}: unreadable band {band} ({str(err).splitlines()[0]})") from err
    grid = min(grids, key=lambda g: abs(g.transform.a))
    native = abs(grid.transform.a)
    if resolution and grid.crs.is_projected and native <= COARSEST_NATIVE_RESOLUTION and not np.isclose(native, resolution):
        scale = native / resolution
        return Grid(grid.crs, from_origin(grid.transform.c, grid.transform.f, resolution, resolution),
                    round(grid.width * scale), round(grid.height * scale))
    return grid


def read_band(product: Product, band: str, grid: Grid, window: Window) -> np.ndarray:
    """Reflectance of one band over a window of the target grid (NaN where the DN is 0 = no data)."""
    path, index = product.bands[band]
    with rasterio.open(path) as src:
        bounds = rasterio.windows.bounds(window, grid.transform)
        source_window = from_bounds(*bounds, transform=src.transform)
        ratio = abs(src.transform.a) / abs(grid.transform.a)
        resampling = Resampling.nearest if np.isclose(ratio, 1) else (
            Resampling.bilinear if ratio > 1 else Resampling.average)
        dn = src.read(index, window=source_window, out_shape=(int(window.height), int(window.width)),
                      resampling=resampling).astype(np.float32)
        eight_bit = src.dtypes[index - 1] == "uint8"
    if eight_bit:  # display products (TCI, stretched RGB): reflectance is not recoverable, keep [0, 1]
        values = dn / EIGHT_BIT_SCALE
    else:
        values = (dn + product.offset(band)) / product.quantification
    values[dn == 0] = np.nan
    return values


def composite_block(product: Product, composite: str, bands: list[str], grid: Grid, window: Window) -> np.ndarray:
    """(C, rows, cols) float32 image of a composite over one window."""
    layers = [read_band(product, band, grid, window) for band in bands]
    if composite == "ndvi":
        nir, red = layers
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((nir - red) / (nir + red))[None]
    if composite == "gray":
        stack = np.stack(layers)
        # Display products mark no data as 0 in every band; a dark pixel in one band is still data.
        gray = np.nanmean(np.where(np.isnan(stack), 0, stack), axis=0)
        gray[np.all(np.isnan(stack), axis=0)] = np.nan
        return gray[None].astype(np.float32)
    return np.stack(layers).astype(np.float32)
