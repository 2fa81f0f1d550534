"""What a registration run writes into its folder: tables, GIS layers, pictures, the co-registered image."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import rasterio
from omegaconf import DictConfig
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from s2match.geo.georef import WGS84, map_shift_metres, pixel_to_map, reproject_points
from s2match.geo.homography import warp_points
from s2match.inference.registration import Registration
from s2match.inference.scenes import Scene
from s2match.twoview.pipeline import ViewMatches
from s2match.viz import draw_keypoints, draw_matches, stretch


def region_table(image0: Scene, pts0: np.ndarray, shift_m: np.ndarray, regions: int) -> pd.DataFrame:
    """Tie-point shifts per cell of a regions x regions grid over image0: count, mean dx/dy and RMSE in metres."""
    width, height = image0.size
    rows = []
    for r in range(regions):
        for c in range(regions):
            x0, x1 = c * width / regions, (c + 1) * width / regions
            y0, y1 = r * height / regions, (r + 1) * height / regions
            x, y = pts0[:, 0] + 0.5, pts0[:, 1] + 0.5  # pixel centres -> edge coordinates of the cells
            inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
            cell = shift_m[inside]
            rows.append({"row": r, "col": c, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "count": int(inside.sum()),
                         "dx_m": float(cell[:, 0].mean()) if len(cell) else None,
                         "dy_m": float(cell[:, 1].mean()) if len(cell) else None,
                         "rmse_m": float(np.sqrt(np.mean(np.sum(cell**2, axis=1)))) if len(cell) else None})
    return pd.DataFrame(rows)


def match_table(image0: Scene, image1: Scene, matches: ViewMatches, inliers: np.ndarray) -> pd.DataFrame:
    """One row per match: pixels, score, inlier flag; with georeference also map coords of both points (each in
    its image's CRS), lon/lat and the east/north shift in metres."""
    table = pd.DataFrame({"x0": matches.pts0[:, 0], "y0": matches.pts0[:, 1], "x1": matches.pts1[:, 0],
                          "y1": matches.pts1[:, 1], "score": matches.scores, "inlier": inliers.astype(bool)})
    if image0.grid.georeferenced and image1.grid.georeferenced:
        map0, map1 = pixel_to_map(image0.grid, matches.pts0), pixel_to_map(image1.grid, matches.pts1)
        lonlat0 = reproject_points(image0.grid.crs, WGS84, map0)
        lonlat1 = reproject_points(image1.grid.crs, WGS84, map1)
        shift = map_shift_metres(image0.grid, image1.grid, matches.pts0, matches.pts1)
        table = table.assign(map_x0=map0[:, 0], map_y0=map0[:, 1], map_x1=map1[:, 0], map_y1=map1[:, 1],
                             lon0=lonlat0[:, 0], lat0=lonlat0[:, 1], lon1=lonlat1[:, 0], lat1=lonlat1[:, 1],
                             dx_m=shift[:, 0], dy_m=shift[:, 1])
    return table


def write_geojson(table: pd.DataFrame, path: Path) -> None:
    """Matches as EPSG:4326 points at image0's keypoints (RFC 7946: [lon, lat]), other columns as properties."""
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [row["lon0"], row["lat0"]]},
                 "properties": {k: (bool(v) if k == "inlier" else float(v)) for k, v in row.items()}}
                for row in table.to_dict("records")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def _display(image: Scene, longest_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole image decimated for display, as (H, W) or (H, W, 3), and the map from display to full pixels."""
    view, to_full = image.overview((0, 0, *image.size), longest_side)
    if view.shape[0] != 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            view = np.nanmean(view, axis=0, keepdims=True)
    return np.moveaxis(view, 0, -1).squeeze(-1) if view.shape[0] == 1 else np.moveaxis(view, 0, -1), to_full


def write_figures(image0: Scene, image1: Scene, registration: Registration, cfg: DictConfig, folder: Path) -> None:
    """matches.png (side by side, lines coloured by confidence) and keypoints.png (both images' keypoints)."""
    show0, full0 = _display(image0, cfg.plot.display_size)
    show1, full1 = _display(image1, cfg.plot.display_size)
    to0, to1 = np.linalg.inv(full0), np.linalg.inv(full1)
    m = registration.matches
    subset = cfg.plot.subset
    draw_matches(show0, show1, warp_points(to0, m.pts0), warp_points(to1, m.pts1), m.scores, folder / "matches.png",
                 max_lines=None if subset == "all" else cfg.plot.max_lines, subset=subset, seed=0,
                 inliers=registration.inliers if len(registration.inliers) == len(m.pts0) else None,
                 title=f"{Path(image0.name).name} | {Path(image1.name).name}")
    # Each side stretched on its own (a snowy and a summer scene share no useful percentiles), then side by side.
    shown0, shown1 = stretch(show0), stretch(show1)
    shown0, shown1 = (s if s.ndim == 3 else np.repeat(s[..., None], 3, axis=2) for s in (shown0, shown1))
    canvas = np.full((max(shown0.shape[0], shown1.shape[0]), shown0.shape[1] + shown1.shape[1], 3), 255, np.uint8)
    canvas[: shown0.shape[0], : shown0.shape[1]] = shown0
    canvas[: shown1.shape[0], shown0.shape[1]:] = shown1
    points = np.concatenate([warp_points(to0, m.keypoints0), warp_points(to1, m.keypoints1) + (shown0.shape[1], 0)])
    draw_keypoints(canvas, points, folder / "keypoints.png",
                   title=f"keypoints: {len(m.keypoints0)} in image0 | {len(m.keypoints1)} in image1")


def write_coregistered(image0: Scene, image1: Scene, H: np.ndarray, path: Path, block: int) -> None:
    """Image1 resampled onto image0's grid (out(p) = image1(H(p)), bilinear), block by block: each block reads only
    the window of image1 it maps to. Float32 GeoTIFF with image0's CRS and transform, NaN = no data."""
    width, height = image0.size
    channels = image1.read((0, 0, 1, 1), (1, 1)).shape[0]
    profile = dict(driver="GTiff", dtype="float32", count=channels, width=width, height=height, nodata=np.nan,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", predictor=3, BIGTIFF="IF_SAFER")
    if image0.grid.georeferenced:
        profile.update(crs=image0.grid.crs, transform=image0.grid.transform)
    with warnings.catch_warnings(), rasterio.open(path, "w", **profile) as dst:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst.update_tags(SOURCE=image1.name, HOMOGRAPHY=json.dumps(H.tolist()))
        for row in range(0, height, block):
            for col in range(0, width, block):
                w, h = min(block, width - col), min(block, height - row)
                u, v = np.meshgrid(np.arange(col, col + w, dtype=np.float64), np.arange(row, row + h, dtype=np.float64))
                mapped = warp_points(H, np.c_[u.ravel(), v.ravel()]).reshape(h, w, 2)
                out = np.full((channels, h, w), np.nan, np.float32)
                finite = mapped[np.all(np.isfinite(mapped), axis=-1)]
                if len(finite):
                    x0, y0 = np.maximum(np.floor(finite.min(axis=0)) - 1, 0).astype(int)
                    x1 = int(min(np.ceil(finite[:, 0].max()) + 2, image1.size[0]))
                    y1 = int(min(np.ceil(finite[:, 1].max()) + 2, image1.size[1]))
                    if x1 > x0 and y1 > y0:
                        source = image1.read((x0, y0, x1, y1), (x1 - x0, y1 - y0))
                        map_x = (mapped[..., 0] - x0).astype(np.float32)
                        map_y = (mapped[..., 1] - y0).astype(np.float32)
                        for c in range(channels):
                            out[c] = cv2.remap(source[c], map_x, map_y, cv2.INTER_LINEAR,
                                               borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
                dst.write(out, window=Window(col, row, w, h))


def write_outputs(image0: Scene, image1: Scene, registration: Registration, cfg: DictConfig, folder: Path) -> None:
    """Every output of a run into `folder` (a fresh folder: the caller moves it into place as a whole)."""
    start = time.perf_counter()
    result = registration.report
    table = match_table(image0, image1, registration.matches, registration.inliers)
    table.to_csv(folder / "matches.csv", index=False)
    tie = registration.tie_points
    pd.DataFrame({"x0": tie.pts0[:, 0], "y0": tie.pts0[:, 1], "x1": tie.pts1[:, 0], "y1": tie.pts1[:, 1],
                  "quality": tie.quality, "status": tie.status}).to_csv(folder / "tie_points.csv", index=False)
    georeferenced = image0.grid.georeferenced and image1.grid.georeferenced
    if georeferenced:
        write_geojson(table, folder / "matches.geojson")
        inlier_rows = table[table["inlier"]]
        if len(inlier_rows):
            shift = inlier_rows[["dx_m", "dy_m"]].to_numpy()
            regions = region_table(image0, inlier_rows[["x0", "y0"]].to_numpy(), shift, cfg.regions)
            regions.to_csv(folder / "shifts_by_region.csv", index=False)
            result["shift_m_by_region"] = regions.replace({np.nan: None}).to_dict("records")
    if len(registration.matches.keypoints0) or len(registration.matches.pts0):
        write_figures(image0, image1, registration, cfg, folder)
    if cfg.write_coregistered and registration.H is not None:
        write_coregistered(image0, image1, registration.H, folder / "coregistered.tif", cfg.coregister_block)
    result["timings"]["outputs_s"] = time.perf_counter() - start
