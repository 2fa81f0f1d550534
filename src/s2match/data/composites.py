"""The `bands` stage: each scene's composite (s2match.s2.reflectance) written as a float32 GeoTIFF.

The output keeps the dynamic range (float32 reflectance, no 8-bit clipping that would flatten snow) and is
written block by block (windowed rasterio I/O), so a 10980 x 10980 band never needs the whole band in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm import tqdm

from s2match.data.catalogue import product_of
from s2match.data.tables import SCENES, SCENES_FILE, make_table
from s2match.fileio import atomic_path
from s2match.geo.georef import Grid
from s2match.s2.products import Product, ProductError
from s2match.s2.reflectance import choose_composite, composite_block, target_grid

log = logging.getLogger(__name__)


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
            except RasterioError as err:
                raise ProductError(f"{product.path}: band data unreadable ({str(err).splitlines()[0]})") from err
    return grid


def write_bands(cfg, catalogue: pd.DataFrame, out_dir: Path, root: Path) -> pd.DataFrame:
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
        table = make_table(rows, SCENES)
        table.to_csv(tmp / SCENES_FILE, index=False)
    return table
