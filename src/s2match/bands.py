"""Turn a product's bands into the image the matcher sees: reflectance, one grid, nodata as NaN.

The output keeps the dynamic range (float32 reflectance, no 8-bit clipping that would flatten snow) and is
written block by block (windowed rasterio I/O), so a 10980 x 10980 band never needs the whole band in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import from_origin
from rasterio.windows import Window, from_bounds
from tqdm import tqdm

from s2match.catalogue import product_of
from s2match.fileio import atomic_path
from s2match.products import Product, ProductError

log = logging.getLogger(__name__)

# Bands whose mean stands in for a grey image when a product lacks the configured composite.
VISIBLE = ["B04", "B03", "B02"]
EIGHT_BIT_SCALE = 255.0
# Sentinel-2 bands are 10, 20 or 60 m; a coarser product is an overview and keeps its own grid.
COARSEST_NATIVE_RESOLUTION = 60.0


@dataclass(frozen=True)
class Grid:
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    width: int
    height: int


def choose_composite(product: Product, composite: str, composites: dict, fallback: str) -> tuple[str, list[str]]:
    """(composite name, bands it needs) for a product; falls back to grey when allowed and needed."""
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


def write_composite(product: Product, composite: str, bands: list[str], out_path: Path,
                    resolution: float | None, block_rows: int) -> Grid:
    """Write the composite as a float32 GeoTIFF, `block_rows` rows at a time; atomic."""
    grid = target_grid(product, bands, resolution)
    channels = len(bands) if composite not in ("gray", "ndvi") else 1
    profile = dict(driver="GTiff", dtype="float32", count=channels, width=grid.width, height=grid.height,
                   crs=grid.crs, transform=grid.transform, nodata=np.nan, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", predictor=3, BIGTIFF="IF_SAFER")
    with atomic_path(out_path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.update_tags(COMPOSITE=composite, BANDS=",".join(bands))
        for row in range(0, grid.height, block_rows):
            window = Window(0, row, grid.width, min(block_rows, grid.height - row))
            try:
                dst.write(composite_block(product, composite, bands, grid, window), window=window)
            except RasterioIOError as err:
                raise ProductError(f"{product.path}: band data unreadable ({str(err).splitlines()[0]})") from err
    return grid


def run_stage(cfg, catalogue: pd.DataFrame, out_dir: Path, root: Path) -> pd.DataFrame:
    """Write every scene's composite under `out_dir` (atomically, as a whole) and return the scene table:
    the catalogue plus `image` and `composite`, skipped scenes recorded with their reason. Catalogue paths are
    relative to `root`."""
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for scene in tqdm(catalogue.to_dict("records"), desc="bands", unit="scene"):
            if scene["status"] != "ok":
                rows.append(scene)
                continue
            try:
                product = product_of(scene, root)
                composite, bands = choose_composite(product, cfg.composite, cfg.composites, cfg.fallback)
                if composite != cfg.composite:
                    log.info("%s: no %s bands, using %s of %s", scene["scene_id"], cfg.composite, composite, bands)
                write_composite(product, composite, bands, tmp / f"{scene['scene_id']}.tif", cfg.resolution,
                                cfg.block_rows)
            except ProductError as err:
                log.warning("skipped %s: %s", scene["scene_id"], err)
                rows.append({**scene, "status": "skipped", "reason": str(err)})
                continue
            rows.append({**scene, "image": str(out_dir / f"{scene['scene_id']}.tif"), "composite": composite})
        table = pd.DataFrame(rows)
        table.to_csv(tmp / "scenes.csv", index=False)
    return table
