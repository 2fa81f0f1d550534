"""What a co-registration writes: the stack of Cloud-Optimised GeoTIFFs on the reference grid, the tables, the plot
of the shifts over time and the HTML report with a picture of each date before and after.

    <output>/stack/<date>.tif      every registered date resampled onto the reference grid (COG, float32, NaN nodata)
    <output>/report/shifts.csv     one row per date: status, route, transform, shift at the centre, tie points...
    <output>/report/edges.csv      one row per registered pair of dates (the graph)
    <output>/report/shifts.png     east / north shift of each date over time
    <output>/report/index.html     the report: each date before (as its georeference places it) and after
    <output>/summary.json          counts, shares direct / chain, wall time (the DVC metrics)
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import rasterio
import rasterio.shutil
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from rasterio.enums import Resampling
from rasterio.windows import Window

from s2match.geo.georef import map_shift_metres, metres_per_unit, pixel_to_map, prior_homography
from s2match.geo.homography import warp_points
from s2match.inference.outputs import write_coregistered
from s2match.inference.registration import guided_view
from s2match.inference.scenes import SceneImage
from s2match.timeseries.graph import CHAIN, DIRECT, FAILED, REFERENCE, EdgeResult, Reliability, Route
from s2match.timeseries.stack import StackDate, Survey, overview_size
from s2match.viz import stretch

SKIPPED = "skipped"
STACK_DIR, REPORT_DIR, THUMBS_DIR = "stack", "report", "thumbs"
# COG layout (GDAL's COG driver): deflate with the floating-point predictor, overviews averaged.
COG_OPTIONS = {"COMPRESS": "DEFLATE", "PREDICTOR": "YES", "OVERVIEW_RESAMPLING": "AVERAGE", "BIGTIFF": "IF_SAFER"}
CHECKER_BLOCKS = 6  # squares per side of the before / after checkerboard of reference and date
MARKERS = {REFERENCE: ("*", "black"), DIRECT: ("o", "tab:blue"), CHAIN: ("^", "tab:orange")}


def write_cog(reference: SceneImage, item: StackDate, H: np.ndarray, path: Path, block_px: int, tile_px: int,
              tags: Mapping[str, str]) -> None:
    """The date resampled onto the reference grid block by block (s2match.inference.outputs.write_coregistered),
    then laid out as a COG by GDAL's COG driver (streamed, with overviews)."""
    staging = path.with_name(f".{path.stem}.staging.tif")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_coregistered(reference, item.scene, H, staging, block_px)
        with rasterio.open(staging, "r+") as src:
            src.update_tags(**tags)
        rasterio.shutil.copy(staging, path, driver="COG", BLOCKSIZE=str(tile_px), **COG_OPTIONS)
    finally:
        staging.unlink(missing_ok=True)


def grey_picture(data: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        return np.nanmean(data, axis=0) if data.shape[0] > 1 else data[0]


def checkerboard(reference: np.ndarray, date: np.ndarray) -> np.ndarray:
    """Squares of the reference and of the date, alternating: where they meet, ground runs on unbroken when the
    two are aligned (each stretched on its own: seasons share no brightness)."""
    shown0, shown1 = stretch(reference), stretch(date)
    rows, cols = np.indices(reference.shape)
    side = max(1, math.ceil(max(reference.shape) / CHECKER_BLOCKS))
    return np.where(((rows // side) + (cols // side)) % 2 == 0, shown0, shown1)


def picture_panel(overview: np.ndarray, crop: np.ndarray, height: int) -> np.ndarray:
    """The whole frame (stretched) beside the centre crop checkerboard enlarged to the same height, grey uint8."""
    whole = stretch(overview)
    whole = cv2.resize(whole, (max(1, round(whole.shape[1] * height / whole.shape[0])), height),
                       interpolation=cv2.INTER_AREA if whole.shape[0] > height else cv2.INTER_NEAREST)
    zoom = cv2.resize(crop, (max(1, round(crop.shape[1] * height / crop.shape[0])), height),
                      interpolation=cv2.INTER_NEAREST)
    gap = np.full((height, 6), 255, np.uint8)
    return np.hstack([whole, gap, zoom])


def centre_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    side = min(side, width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def write_date(reference: SceneImage, item: StackDate, H: np.ndarray | None, folder: Path,
               cfg: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, str]:
    """A task: the date's COG (when it is registered) and its before / after pictures; returns their paths
    relative to `folder`. `cfg`: the coregister group (block_px, cog_block_px, overview_px, crop_px)."""
    grid = reference.grid
    size = overview_size(grid, cfg["overview_px"])
    frame = (0, 0, grid.width, grid.height)
    crop = centre_box(grid.width, grid.height, cfg["crop_px"])
    crop_size = (crop[2] - crop[0], crop[3] - crop[1])
    reference_crop = grey_picture(reference.read(crop, crop_size))
    written = {}
    prior = prior_homography(grid, item.scene.grid).H
    before = guided_view(item.scene, prior, frame, size)
    before_crop = guided_view(item.scene, prior, crop, crop_size)
    if before is not None and before_crop is not None:
        panel = picture_panel(grey_picture(before[0]), checkerboard(reference_crop, grey_picture(before_crop[0])),
                              size[1])
        written["before"] = _write_png(panel, folder / REPORT_DIR / THUMBS_DIR / f"{item.name}_before.png", folder)
    if H is not None:
        cog = folder / STACK_DIR / f"{item.name}.tif"
        write_cog(reference, item, H, cog, cfg["block_px"], cfg["cog_block_px"], tags)
        written["cog"] = str(cog.relative_to(folder))
        with rasterio.open(cog) as src:  # the pictures come from the file written: its overviews and a window
            after = src.read(out_shape=(src.count, size[1], size[0]), resampling=Resampling.average)
            after_crop = src.read(window=Window(crop[0], crop[1], *crop_size))
        panel = picture_panel(grey_picture(after), checkerboard(reference_crop, grey_picture(after_crop)), size[1])
        written["after"] = _write_png(panel, folder / REPORT_DIR / THUMBS_DIR / f"{item.name}_after.png", folder)
    return written


def _write_png(image: np.ndarray, path: Path, folder: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write the picture")
    return str(path.relative_to(folder / REPORT_DIR))


def centre_shift(reference: SceneImage, item: StackDate, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At the reference's centre: the shift in the date's pixels from where its georeference puts the ground to
    where the registration finds it, and the same in metres east / north."""
    grid = reference.grid
    centre = np.array([[grid.width / 2 - 0.5, grid.height / 2 - 0.5]])
    found = warp_points(H, centre)
    prior = warp_points(prior_homography(grid, item.scene.grid).H, centre)
    return (found - prior)[0], map_shift_metres(grid, item.scene.grid, centre, found)[0]


def shifts_table(dates: Sequence[StackDate], reference: SceneImage, routes: Mapping[str, Route],
                 skipped: Mapping[str, str], surveys: Mapping[str, Survey], scores: Mapping[str, float],
                 written: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """One row per date (see the module docstring)."""
    rows = []
    for item in dates:
        route = routes.get(item.name)
        status = SKIPPED if item.name in skipped else route.status
        survey = surveys.get(item.name)
        row = {"date": item.name, "day": item.day.isoformat(), "status": status,
               "route": " > ".join(route.path) if route is not None and route.path else "",
               "hops": len(route.path) - 1 if route is not None and route.path else None,
               "reason": skipped.get(item.name) or (route.reason if route is not None else ""),
               "shift_east_m": None, "shift_north_m": None, "shift_x_px": None, "shift_y_px": None,
               "sigma_px": route.sigma_px if route is not None and route.H is not None else None,
               "closure_px": route.closure_px if route is not None else None,
               "inliers": min((e.inliers for e in route.edges), default=None) if route is not None else None,
               "rmse_px": max((e.rmse_px for e in route.edges), default=None) if route is not None else None,
               "clear": survey.clear if survey else None, "cloud": survey.cloud if survey else None,
               "no_data": survey.no_data if survey else None, "clearness": scores.get(item.name),
               "cloud_mask": str(item.mask.path) if item.mask else "",
               "homography": json.dumps(route.H.tolist()) if route is not None and route.H is not None else "",
               "input": str(item.scene.path), "output": written.get(item.name, {}).get("cog", "")}
        if route is not None and route.H is not None:
            shift_px, shift_m = centre_shift(reference, item, route.H)
            row.update(shift_x_px=shift_px[0], shift_y_px=shift_px[1], shift_east_m=shift_m[0],
                       shift_north_m=shift_m[1])
        rows.append(row)
    return pd.DataFrame(rows)


def edges_table(results: Sequence[EdgeResult], rules: Reliability) -> pd.DataFrame:
    return pd.DataFrame([{"source": r.edge.source, "target": r.edge.target, "kind": r.edge.kind,
                          "success": r.success, "reliable": not r.weakness(rules), "why_not": r.weakness(rules),
                          "inliers": r.inliers, "rmse_px": r.rmse_px, "sigma_px": r.sigma_px,
                          "shift_x_px": r.shift_px[0], "shift_y_px": r.shift_px[1], "seconds": r.seconds,
                          "worker": r.worker, "pipeline": r.pipeline, "weights": r.weights} for r in results])


def plot_shifts(table: pd.DataFrame, pixel_m: float, title: str, path: Path) -> None:
    """East and north shift (m) at the reference's centre of every registered date over time, marked by how it
    was registered, with +-sigma bars; dates left out are ticks along the bottom."""
    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    days = pd.to_datetime(table["day"])
    for ax, column, label in ((axes[0], "shift_east_m", "east shift (m)"), (axes[1], "shift_north_m",
                                                                           "north shift (m)")):
        for status, (marker, colour) in MARKERS.items():
            rows = table["status"] == status
            if rows.any():
                ax.errorbar(days[rows], table.loc[rows, column].astype(float),
                            yerr=table.loc[rows, "sigma_px"].astype(float) * pixel_m, fmt=marker, color=colour,
                            ecolor="grey", capsize=2, label=f"{status} ({int(rows.sum())})")
        left_out = table["status"].isin([FAILED, SKIPPED])
        if left_out.any():
            ax.plot(days[left_out], np.zeros(int(left_out.sum())), "|", color="crimson", markersize=12,
                    transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"failed or skipped ({int(left_out.sum())})")
        ax.axhline(0, color="lightgrey", linewidth=0.8, zorder=0)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    locator = AutoDateLocator()
    axes[1].xaxis.set_major_locator(locator)
    axes[1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")


def write_html(table: pd.DataFrame, summary: Mapping, written: Mapping[str, Mapping[str, str]], path: Path) -> None:
    """index.html: the summary, the shift plot and one row per date with its pictures before and after."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return ""
        return html.escape(f"{value:.2f}" if isinstance(value, float) else str(value))

    def picture(name: str, when: str) -> str:
        src = written.get(name, {}).get(when)
        return f'<img src="{html.escape(src)}" alt="{html.escape(name)} {when}">' if src else ""

    rows = "\n".join(
        f"<tr class=\"{cell(r['status'])}\"><td>{cell(r['date'])}</td><td>{cell(r['status'])}</td>"
        f"<td>{cell(r['route'])}</td><td>{cell(r['shift_east_m'])}</td><td>{cell(r['shift_north_m'])}</td>"
        f"<td>{cell(r['inliers'])}</td><td>{cell(r['sigma_px'])}</td><td>{cell(r['reason'])}</td>"
        f"<td>{picture(r['date'], 'before')}</td><td>{picture(r['date'], 'after')}</td></tr>"
        for r in table.to_dict("records"))
    counts = ", ".join(f"{cell(summary[key])} {key.removeprefix('dates_')}" for key in
                       ("dates_direct", "dates_chain", "dates_failed", "dates_skipped"))
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Co-registration of {cell(summary['stack'])}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}} img{{display:block}}
tr.failed,tr.skipped{{background:#fbeaea}} tr.chain{{background:#fff5e6}}</style></head><body>
<h1>Co-registration of {cell(summary['stack'])}</h1>
<p>{cell(summary['dates'])} dates onto the reference <b>{cell(summary['reference'])}</b>
({cell(summary['reference_choice'])}): {counts}. Wall time {cell(summary['wall_s'])} s.
Tables: <a href="shifts.csv">shifts.csv</a>, <a href="edges.csv">edges.csv</a>.</p>
<p>Each picture: the whole frame on the reference grid, then its centre at full resolution as a checkerboard of the
reference and the date: aligned ground runs on across the squares' edges. Before: as the date's georeference places
it; after: the co-registered file.</p>
<img src="shifts.png" alt="shifts over time">
<table><tr><th>date</th><th>status</th><th>route</th><th>east (m)</th><th>north (m)</th><th>tie points</th>
<th>sigma (px)</th><th>why</th><th>before</th><th>after</th></tr>
{rows}
</table></body></html>
""")


def pixel_metres(grid) -> float:
    """Metres per pixel along x of a grid (at its centre's latitude for geographic CRSs)."""
    centre = pixel_to_map(grid, [[grid.width / 2 - 0.5, grid.height / 2 - 0.5]])[0]
    mx, _ = metres_per_unit(grid.crs, float(centre[1]) if grid.crs.is_geographic else 0.0)
    return abs(grid.transform.a) * mx
