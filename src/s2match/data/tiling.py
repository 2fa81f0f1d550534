"""Cut each AOI's scenes into tiles on one common grid, so that a tile covers the same ground on every date.

Scenes of an AOI that are not on one grid (different extents, CRSs or resolutions) are aligned by their
georeference: each is read through a WarpedVRT onto the AOI's reference grid (the finest resolution, the CRS of
the first scene, the union of the footprints), window by window, so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from tqdm import tqdm

from s2match.data.tables import TILES, TILES_FILE, make_table
from s2match.fileio import atomic_path
from s2match.geo.georef import Grid, boxes_intersect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileSpec:
    size: int
    overlap: int
    min_size: int
    min_valid: float
    min_texture: float


def reference_grid(image_paths: list[Path]) -> Grid:
    """Grid covering every scene of an AOI: the first scene's CRS, the finest resolution, the union of footprints."""
    with rasterio.open(image_paths[0]) as first:
        crs = first.crs
    lefts, bottoms, rights, tops, resolutions = [], [], [], [], []
    for path in image_paths:
        with rasterio.open(path) as src:
            left, bottom, right, top = transform_bounds(src.crs, crs, *src.bounds) if src.crs != crs else src.bounds
            lefts.append(left), bottoms.append(bottom), rights.append(right), tops.append(top)
            resolutions.append(abs(src.transform.a) if src.crs == crs else abs(first.transform.a))
    res = min(resolutions)
    left, top = min(lefts), max(tops)
    width, height = round((max(rights) - left) / res), round((top - min(bottoms)) / res)
    return Grid(crs, from_origin(left, top, res, res), width, height)


def tile_windows(width: int, height: int, spec: TileSpec) -> list[Window]:
    """Windows covering the whole grid: a regular stride, the last row/column shifted to end at the edge.
    A side shorter than the tile gives one tile of that side (when at least `min_size`)."""

    def starts(length: int) -> list[int]:
        if length < spec.min_size:
            return []
        if length <= spec.size:
            return [0]
        stride = spec.size - spec.overlap
        positions = list(range(0, length - spec.size + 1, stride))
        return positions if positions[-1] + spec.size == length else [*positions, length - spec.size]

    tile_w, tile_h = min(spec.size, width), min(spec.size, height)
    return [Window(x, y, tile_w, tile_h) for y in starts(height) for x in starts(width)]


def texture(image: np.ndarray) -> float:
    """Mean gradient magnitude relative to the image's spread: low for cloud, open water, plain snow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels without data in any band: filled with the median
        gray = np.nan_to_num(np.nanmean(image, axis=0), nan=float(np.nanmedian(image)))
    spread = np.percentile(gray, 98) - np.percentile(gray, 2)
    if spread <= 0:
        return 0.0
    gy, gx = np.gradient(gray / spread)
    return float(np.mean(np.hypot(gx, gy)))


def open_on_grid(path: Path, grid: Grid):
    """The image as seen on the reference grid (a VRT: nothing is read until a window is asked for)."""
    src = rasterio.open(path)
    if src.crs == grid.crs and src.transform == grid.transform and (src.width, src.height) == (grid.width, grid.height):
        return src
    return WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                     resampling=Resampling.bilinear, src_nodata=np.nan, nodata=np.nan)


def write_tile(image: np.ndarray, grid: Grid, window: Window, path: Path) -> None:
    profile = dict(driver="GTiff", dtype="float32", count=image.shape[0], width=image.shape[2],
                   height=image.shape[1], crs=grid.crs, transform=rasterio.windows.transform(window, grid.transform),
                   nodata=np.nan, compress="deflate", predictor=3)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(image)


def tile_aoi(aoi: str, scenes: list[dict], spec: TileSpec, out_dir: Path) -> list[dict]:
    """Tiles of every scene of one AOI; rows of the tile table (kept and dropped, with the reason)."""
    grid = reference_grid([Path(s["image"]) for s in scenes])
    windows = tile_windows(grid.width, grid.height, spec)
    if not windows:
        reason = f"AOI grid {grid.width} x {grid.height} px is smaller than tile.min_size={spec.min_size} px"
        log.warning("skipped AOI %s (%d scenes): %s", aoi, len(scenes), reason)
        return [{"aoi": aoi, "scene_id": s["scene_id"], "date": s["date"], "season": s["season"],
                 "width": grid.width, "height": grid.height, "crs": grid.crs.to_string(), "kept": False,
                 "reason": reason} for s in scenes]
    rows = []
    for scene in scenes:
        with open_on_grid(Path(scene["image"]), grid) as src:
            for window in windows:
                tile_id = f"{aoi}_r{int(window.row_off):05d}_c{int(window.col_off):05d}"
                image = src.read(window=window).astype(np.float32)
                valid = float(np.mean(np.all(np.isfinite(image), axis=0)))
                detail = texture(image) if valid > 0 else 0.0
                path = out_dir / aoi / tile_id / f"{scene['scene_id']}.tif"
                keep = valid >= spec.min_valid and detail >= spec.min_texture
                reason = "" if keep else ("mostly nodata" if valid < spec.min_valid else "featureless")
                if keep:
                    write_tile(image, grid, window, path)
                rows.append({
                    "tile_id": tile_id, "aoi": aoi, "scene_id": scene["scene_id"], "date": scene["date"],
                    "season": scene["season"], "path": str(path) if keep else "", "row": int(window.row_off),
                    "col": int(window.col_off), "width": int(window.width), "height": int(window.height),
                    "crs": grid.crs.to_string(), "transform": list(rasterio.windows.transform(window, grid.transform))[:6],
                    "valid_fraction": round(valid, 4), "texture": round(detail, 5), "kept": keep, "reason": reason,
                })
    dropped = pd.Series([row["reason"] for row in rows if not row["kept"]], dtype=str).value_counts()
    if len(dropped):
        log.info("AOI %s: %d of %d tiles dropped (%s)", aoi, dropped.sum(), len(rows),
                 ", ".join(f"{reason} {count}" for reason, count in dropped.items()))
    return rows


def write_tiles(cfg, scenes: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Tile every AOI (atomically, as a whole); the tile table lists kept and dropped tiles and skipped scenes."""
    rows = []
    usable = scenes[scenes["status"] == "ok"]
    spec = TileSpec(cfg.size, cfg.overlap, cfg.min_size, cfg.min_valid, cfg.min_texture)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for aoi, group in tqdm(list(usable.groupby("aoi", sort=True)), desc="tile", unit="aoi"):
            members = group.to_dict("records")
            reference = json.loads(members[0]["bounds_lonlat"])
            overlapping = [s for s in members if boxes_intersect(json.loads(s["bounds_lonlat"]), reference)]
            for scene in members:
                if scene not in overlapping:
                    log.warning("skipped %s: does not overlap the other scenes of AOI %s (%s)",
                                scene["scene_id"], aoi, scene["crs"])
                    rows.append({"aoi": aoi, "scene_id": scene["scene_id"], "kept": False,
                                 "reason": f"no overlap with AOI {aoi} ({scene['crs']})"})
            for row in tile_aoi(aoi, overlapping, spec, tmp):
                rows.append({**row, "path": row.get("path", "").replace(str(tmp), str(out_dir), 1)})
        table = make_table(rows, TILES)
        table.to_csv(tmp / TILES_FILE, index=False)
    return table
