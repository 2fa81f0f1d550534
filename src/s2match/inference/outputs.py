"""What a registration run writes into its folder: tables, GIS layers, GCPs, pictures, report.html, the
co-registered image.

The transform's support (what it was fitted on: the refined tie points, or the matcher's inliers when refinement
was not used) is what the residuals, the region table, the residual field and the GCPs show; matches.csv,
matches.geojson and the match picture show every matcher match, split into the matcher fit's inliers and outliers.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import rasterio
from omegaconf import DictConfig
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from s2match.geo.georef import WGS84, map_shift_metres, metres_per_unit, pixel_to_map, reproject_points
from s2match.geo.homography import warp_points
from s2match.inference import gis
from s2match.inference.registration import Registration, guided_view
from s2match.inference.report import run_warnings, write_report
from s2match.inference.scenes import Box, Scene, SceneImage
from s2match.viz import OverlayWindow, ResidualField, display_scale, draw_keypoints, draw_matches, draw_overlay

FEATURE_NAMES = {"aliked": "ALIKED", "disk": "DISK", "sift": "SIFT", "xfeat": "XFeat"}
MATCHER_NAMES = {"lightglue": "LightGlue", "ratio": "ratio test"}


@dataclass
class Support:
    """The correspondences the final transform was fitted on, in full-resolution px of both images."""

    pts0: np.ndarray
    pts1: np.ndarray
    source: str  # "refined tie points" | "matches"


def support_of(registration: Registration) -> Support:
    if registration.report.get("fitted_on") == "refined tie points":
        used = registration.tie_points.status == "ok"
        return Support(registration.tie_points.pts0[used], registration.tie_points.pts1[used], "refined tie points")
    inliers = registration.inliers if len(registration.inliers) == len(registration.matches.pts0) else \
        np.zeros(len(registration.matches.pts0), bool)
    return Support(registration.matches.pts0[inliers], registration.matches.pts1[inliers], "matches")


def residual_px(H: np.ndarray | None, pts0: np.ndarray, pts1: np.ndarray) -> np.ndarray:
    """|H(p0) - p1| in image1 px (NaN without a transform)."""
    if H is None or len(pts0) == 0:
        return np.full(len(pts0), np.nan)
    return np.linalg.norm(warp_points(H, pts0) - pts1, axis=1)


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


def correspondence_table(image0: Scene, image1: Scene, pts0: np.ndarray, pts1: np.ndarray,
                         H: np.ndarray | None) -> pd.DataFrame:
    """Pixels of both images and the residual under H; with georeference also map coords of both points (each in
    its image's CRS, named in result.json), lon/lat and the east/north shift in metres."""
    table = pd.DataFrame({"x0": pts0[:, 0], "y0": pts0[:, 1], "x1": pts1[:, 0], "y1": pts1[:, 1],
                          "residual_px": residual_px(H, pts0, pts1)})
    if image0.grid.georeferenced and image1.grid.georeferenced:
        map0, map1 = pixel_to_map(image0.grid, pts0), pixel_to_map(image1.grid, pts1)
        lonlat0 = reproject_points(image0.grid.crs, WGS84, map0)
        lonlat1 = reproject_points(image1.grid.crs, WGS84, map1)
        shift = map_shift_metres(image0.grid, image1.grid, pts0, pts1)
        table = table.assign(map_x0=map0[:, 0], map_y0=map0[:, 1], map_x1=map1[:, 0], map_y1=map1[:, 1],
                             lon0=lonlat0[:, 0], lat0=lonlat0[:, 1], lon1=lonlat1[:, 0], lat1=lonlat1[:, 1],
                             dx_m=shift[:, 0], dy_m=shift[:, 1])
    return table


def acquired(image: Scene) -> str | None:
    """The acquisition date of a scene read from a product that states it."""
    date = image.product.acquired if isinstance(image, SceneImage) else None
    return date.isoformat() if date else None


def method_name(model: dict) -> str:
    """'ALIKED + LightGlue, trained weights' from result.json's `model`."""
    features, matcher = model.get("features", "?"), model.get("matcher", "?")
    name = f"{FEATURE_NAMES.get(features, features)} + {MATCHER_NAMES.get(matcher, matcher)}"
    weights = model.get("weights")
    return f"{name}, {weights} weights" if weights not in (None, "none") else name


def run_title(result: dict) -> str:
    """Title lines of the run's pictures: the two images and dates, the method and weights, the fit."""
    images = [f"image{i} {Path(image['name']).name}" + (f" ({image['date']})" if image.get("date") else "")
              for i, image in enumerate(result["images"])]
    lines = [" vs ".join(images), method_name(result.get("model", {}))]
    if result["success"]:
        lines.append(f"fitted on {result['inliers']} {result['fitted_on']}, residual RMSE "
                     f"{result['residuals_px']['rmse']:.2f} px")
    else:
        lines.append(f"no transform: {result['reason']}")
    return "\n".join(lines)


def _as_picture(view: np.ndarray) -> np.ndarray:
    """(C, H, W) view -> (H, W, 3) when it has three bands, else the (H, W) mean of its bands."""
    if view.shape[0] == 3:
        return np.moveaxis(view, 0, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels (no data)
        return np.nanmean(view, axis=0)


def display_view(image: Scene, box: Box, long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The box of the image read at about the size it is drawn at (never finer than native), and its 3x3 map from
    view px to full-resolution px."""
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, display_scale((width, height), long_side))
    view, to_full = image.overview(box, max(1, math.ceil(max(width, height) * scale)))
    return _as_picture(view), to_full


def tile_outline(box: Box) -> np.ndarray:
    """Corners of a pixel-edge box in pixel coords."""
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64) - 0.5


def window_boxes(support: Support, overlap: Box, count: int, side: int) -> list[Box]:
    """Up to `count` boxes of side `side` px in image0, centred on support points far apart (the one nearest the
    median first, then each farthest from those chosen), inside the overlap."""
    if count == 0 or len(support.pts0) == 0:
        return []
    x0, y0, x1, y1 = overlap
    side = min(side, x1 - x0, y1 - y0)
    pts = support.pts0
    chosen = [int(np.argmin(np.linalg.norm(pts - np.median(pts, axis=0), axis=1)))]
    while len(chosen) < min(count, len(pts)):
        distance = np.min(np.linalg.norm(pts[:, None] - pts[chosen][None], axis=2), axis=1)
        chosen.append(int(np.argmax(distance)))
    boxes = []
    for cx, cy in pts[chosen]:
        bx = int(np.clip(round(cx + 0.5 - side / 2), x0, x1 - side))
        by = int(np.clip(round(cy + 0.5 - side / 2), y0, y1 - side))
        if (bx, by, bx + side, by + side) not in boxes:
            boxes.append((bx, by, bx + side, by + side))
    return sorted(boxes, key=lambda box: (box[1], box[0]))  # numbered top to bottom


def pixel_size_m(image: Scene) -> np.ndarray:
    """Ground size (m) of a pixel of the image along its x and y axes."""
    a, b, _, d, e, _ = tuple(image.grid.transform)[:6]
    centre = np.array([[image.size[0] / 2, image.size[1] / 2]])
    latitude = float(reproject_points(image.grid.crs, WGS84, pixel_to_map(image.grid, centre))[0, 1])
    mx, my = metres_per_unit(image.grid.crs, latitude)
    return np.array([math.hypot(a * mx, d * my), math.hypot(b * mx, e * my)])


def write_figures(image0: Scene, image1: Scene, registration: Registration, plot: DictConfig, folder: Path) -> None:
    """matches.png, keypoints.png and (with a transform) overlay.png; see s2match.viz."""
    result, H = registration.report, registration.H
    title = run_title(result)
    show0, full0 = display_view(image0, (0, 0, *image0.size), plot.display_size)
    show1, full1 = display_view(image1, (0, 0, *image1.size), plot.display_size)
    to0, to1 = np.linalg.inv(full0), np.linalg.inv(full1)
    m = registration.matches
    draw_matches(show0, show1, warp_points(to0, m.pts0), warp_points(to1, m.pts1), m.scores, folder / "matches.png",
                 max_lines=None if plot.subset == "all" else plot.max_lines, subset=plot.subset, seed=0,
                 inliers=registration.inliers if len(registration.inliers) == len(m.pts0) else None,
                 title=title, long_side=plot.display_size)
    outlines0 = [warp_points(to0, tile_outline(tile)) for tile in registration.tiles]
    outlines1 = [] if H is None else [warp_points(to1 @ H, tile_outline(tile)) for tile in registration.tiles]
    draw_keypoints(show0, show1, warp_points(to0, m.keypoints0), warp_points(to1, m.keypoints1),
                   folder / "keypoints.png", outlines0, outlines1, title=title, max_points=plot.max_keypoints,
                   long_side=plot.display_size)
    if H is not None:
        write_overlay(image0, image1, registration, plot, folder / "overlay.png", title)


def write_overlay(image0: Scene, image1: Scene, registration: Registration, plot: DictConfig, path: Path,
                  title: str) -> None:
    """overlay.png: image0's overlap with image1 resampled onto it by H, whole and in full-resolution windows
    around tie points, and the residual field of the support (metres when georeferenced)."""
    H, result = registration.H, registration.report
    overlap = tuple(result["overlap_box0"])
    view0, view_to_full = display_view(image0, overlap, plot.overlay_size)
    out_size = (view0.shape[1], view0.shape[0])
    resampled = guided_view(image1, H, overlap, out_size)
    view1 = np.full_like(view0, np.nan) if resampled is None else _as_picture(resampled[0])
    if view1.shape != view0.shape:  # one image grey, the other RGB: compare lightness
        view0, view1 = (v if v.ndim == 2 else v.mean(axis=-1) for v in (view0, view1))
    full_to_view = np.linalg.inv(view_to_full)
    support = support_of(registration)
    windows = []
    for box in window_boxes(support, overlap, plot.windows, plot.window_px):
        size = (box[2] - box[0], box[3] - box[1])
        seen = guided_view(image1, H, box, size)
        window0 = _as_picture(image0.read(box, size))
        window1 = np.full_like(window0, np.nan) if seen is None else _as_picture(seen[0])
        if window1.shape != window0.shape:
            window0, window1 = (v if v.ndim == 2 else v.mean(axis=-1) for v in (window0, window1))
        corners = warp_points(full_to_view, np.array([box[:2], box[2:]], float) - 0.5) + 0.5
        windows.append(OverlayWindow(window0, window1, tuple(corners.ravel()),
                                     f"window {len(windows) + 1}: {size[0]} x {size[1]} px at ({box[0]}, {box[1]})"))
    residual = warp_points(np.linalg.inv(H), support.pts1) - support.pts0  # image0 px the fit leaves
    georeferenced = image0.grid.georeferenced
    vectors = residual * pixel_size_m(image0) if georeferenced else residual
    rmse = float(np.sqrt(np.mean(np.sum(vectors**2, axis=1)))) if len(vectors) else float("nan")
    unit = "m" if georeferenced else "px"
    field = ResidualField(warp_points(full_to_view, support.pts0), vectors, unit,
                          f"residuals of {len(vectors)} {support.source} (RMSE {rmse:.2f} {unit})")
    draw_overlay(view0, view1, path, windows, field, title=title, long_side=plot.overlay_size)


def write_tables(image0: Scene, image1: Scene, registration: Registration, regions: int, folder: Path) -> None:
    """matches.csv, tie_points.csv; with both images georeferenced their GeoJSON lines and the region table
    (CSV, GeoJSON, result.json); with image0 georeferenced and a support, the GCPs."""
    result, H, m = registration.report, registration.H, registration.matches
    inliers = registration.inliers if len(registration.inliers) == len(m.pts0) else np.zeros(len(m.pts0), bool)
    matches = correspondence_table(image0, image1, m.pts0, m.pts1, H).assign(score=m.scores, inlier=inliers)
    matches.to_csv(folder / "matches.csv", index=False)
    tie = registration.tie_points
    tie_points = correspondence_table(image0, image1, tie.pts0, tie.pts1, H).assign(
        quality=tie.quality, status=tie.status, used=(tie.status == "ok") & (result.get("fitted_on") ==
                                                                             "refined tie points"))
    tie_points.to_csv(folder / "tie_points.csv", index=False)
    support = support_of(registration)
    grid0, grid1 = image0.grid, image1.grid
    if grid0.georeferenced and grid1.georeferenced:
        about = {"image0": image0.name, "image1": image1.name}
        pixel_columns = ["x0", "y0", "x1", "y1", "residual_px", "dx_m", "dy_m"]
        gis.write_lines(folder / "matches.geojson", grid0, grid1, m.pts0, m.pts1,
                        matches[pixel_columns + ["score", "inlier"]], {**about, "layer": "matcher matches"})
        gis.write_lines(folder / "tie_points.geojson", grid0, grid1, tie.pts0, tie.pts1,
                        tie_points[pixel_columns + ["quality", "status", "used"]],
                        {**about, "layer": "refined tie points"})
        if len(support.pts0):
            shift = map_shift_metres(grid0, grid1, support.pts0, support.pts1)
            table = region_table(image0, support.pts0, shift, regions)
            table.to_csv(folder / "shifts_by_region.csv", index=False)
            gis.write_regions(folder / "regions.geojson", grid0, table,
                              {**about, "layer": f"shift of image1 per region, from the {support.source}"})
            result["shift_m_by_region"] = table.replace({np.nan: None}).to_dict("records")
    if grid0.georeferenced and isinstance(image1, SceneImage) and len(support.pts0) >= 3:
        source = gis.GCPSource.open(image1.product.bands[image1.bands[0]][0], grid1)
        map0 = pixel_to_map(grid0, support.pts0)
        gis.write_gcp_vrt(folder / "gcps.vrt", source, support.pts1, map0, grid0.crs)
        gis.write_qgis_points(folder / "gcps.points", source, support.pts1, map0, grid0.crs)
        result["gcps"] = {"count": len(map0), "source": support.source, "raster": str(source.path),
                          "crs": grid0.crs.to_string()}


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
    """Every output of a run into `folder` (a fresh folder: the caller moves it into place as a whole); adds the
    dates, the warnings and the output timing to the report (result.json)."""
    start = time.perf_counter()
    result = registration.report
    for image, described in zip((image0, image1), result["images"]):
        described["date"] = acquired(image)
    result["warnings"] = run_warnings(result)
    write_tables(image0, image1, registration, cfg.regions, folder)
    if len(registration.matches.keypoints0) or len(registration.matches.pts0):
        write_figures(image0, image1, registration, cfg.plot, folder)
    if cfg.write_coregistered and registration.H is not None:
        write_coregistered(image0, image1, registration.H, folder / "coregistered.tif", cfg.coregister_block)
    result["timings"]["outputs_s"] = time.perf_counter() - start
    write_report(folder, result)
