"""Benchmark: inference on a pair of 10980 x 10980 bands (a full Sentinel-2 10 m tile) built from real data.

Two scenes (--scene), each written as two GeoTIFFs on one grid, image1's content then warped by a known homography,
so the answer is known:
- `jp2`: the L1C JP2 crops of T33UUU (uint16) cut to the ground they share and mirror-tiled to the tile size; one
  clear date in both images, or with --cross-date the other, partly cloudy date in image0.
- `seasons`: a real cross-season pair of the whole tile T36UYA, the grey overviews (~107 m) of a late-winter date
  (snow in the north, ice on the reservoir) and of a summer date, upsampled to 10 m (uint8): the coarse pass sees
  the real seasonal change at the overviews' own resolution, the full-resolution tiles their smooth upsampling.
The inference runs as a child process (`python src/infer.py`), which gives its wall time and its own peak RSS.

    python benchmarks/infer_large.py [--scene jp2|seasons] [--workdir /tmp/s2match_bench] [--overviews] [override ...]
    python benchmarks/infer_large.py --scene seasons preset=fast       # the fast preset (conf/presets/)

Extra arguments are Hydra overrides for the run, e.g. `preset=fast` or `registration.max_tiles=9`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import from_bounds

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT / "data" / "sample" / "jp2" / "T33UUU"
OVERVIEWS = ROOT / "data" / "sample" / "t36uya_overview"
SEASON_DATES = ("20190313", "20190904")  # late winter (image0), summer (image1)
SIDE = 10980
PIXEL_M = 10.0
# Image0 px -> image1 px: 0.2 degrees of rotation, 0.1 % scale and a shift, about the tile centre.
ANGLE_DEG, SCALE, SHIFT = 0.2, 1.001, (14.3, -9.7)


def true_homography() -> np.ndarray:
    centre = (SIDE - 1) / 2
    rotation = cv2.getRotationMatrix2D((centre, centre), ANGLE_DEG, SCALE)
    rotation[:, 2] += SHIFT
    return np.vstack([rotation, [0, 0, 1]])


def shared_ground(cross_date: bool) -> tuple[np.ndarray, np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    """The ground both crops cover on one 10 m grid: (image0 source, image1 source). By default both are the clear
    date, so the warp is the exact answer; cross_date puts the cloudy 20160529 in image0, and the answer then also
    holds the real misregistration of the two products (AROSICS' test pair), unknown here."""
    with rasterio.open(CROPS / "20160529.jp2") as a, rasterio.open(CROPS / "20160608.jp2") as b:
        left, top = max(a.bounds.left, b.bounds.left), min(a.bounds.top, b.bounds.top)
        right, bottom = min(a.bounds.right, b.bounds.right), max(a.bounds.bottom, b.bounds.bottom)
        first = a.read(1, window=from_bounds(left, bottom, right, top, a.transform).round_offsets().round_lengths())
        second = b.read(1, window=from_bounds(left, bottom, right, top, b.transform).round_offsets().round_lengths())
        rows, cols = min(first.shape[0], second.shape[0]), min(first.shape[1], second.shape[1])
        source0 = first if cross_date else second
        return source0[:rows, :cols], second[:rows, :cols], from_origin(left, top, PIXEL_M, PIXEL_M), a.crs


def mirror_tiled(band: np.ndarray) -> np.ndarray:
    """The band repeated by mirroring to SIDE x SIDE; its own grid is where the first copy lies."""
    return np.pad(band, ((0, SIDE - band.shape[0]), (0, SIDE - band.shape[1])), mode="symmetric")


def season_tiles() -> tuple[np.ndarray, np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    """The two dates of SEASON_DATES, each overview of the whole tile upsampled (bicubic) to SIDE x SIDE at 10 m."""
    bands = []
    for date in SEASON_DATES:
        with rasterio.open(OVERVIEWS / f"{date}.tif") as src:
            bands.append(cv2.resize(src.read(1), (SIDE, SIDE), interpolation=cv2.INTER_CUBIC))
            left, top, crs = src.bounds.left, src.bounds.top, src.crs
    return bands[0], bands[1], from_origin(left, top, PIXEL_M, PIXEL_M), crs


def write_band(path: Path, data: np.ndarray, transform, crs, overviews: bool) -> None:
    profile = dict(driver="GTiff", dtype=data.dtype, count=1, width=SIDE, height=SIDE, crs=crs, transform=transform,
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate", nodata=0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        if overviews:  # as Sentinel-2 JP2 / COG products carry them
            dst.build_overviews([2, 4, 8, 16], Resampling.average)


def build_inputs(workdir: Path, scene: str, overviews: bool, cross_date: bool) -> tuple[Path, Path]:
    suffix = f"_{scene}" + ("_ovr" if overviews else "") + ("_xdate" if cross_date else "")
    paths = workdir / f"tile0{suffix}.tif", workdir / f"tile1{suffix}.tif"
    if all(p.is_file() for p in paths):
        return paths
    workdir.mkdir(parents=True, exist_ok=True)
    if scene == "jp2":
        first, second, transform, crs = shared_ground(cross_date)
        first, second = mirror_tiled(first), mirror_tiled(second)
    else:
        first, second, transform, crs = season_tiles()
    write_band(paths[0], first, transform, crs, overviews)
    warped = cv2.warpPerspective(second, true_homography(), (SIDE, SIDE), flags=cv2.INTER_LINEAR)
    write_band(paths[1], warped, transform, crs, overviews)
    return paths


def mean_corner_error(H: np.ndarray, H_true: np.ndarray) -> float:
    corners = np.array([[0, 0, 1], [SIDE - 1, 0, 1], [SIDE - 1, SIDE - 1, 1], [0, SIDE - 1, 1]], float)
    a, b = corners @ H.T, corners @ H_true.T
    return float(np.linalg.norm(a[:, :2] / a[:, 2:] - b[:, :2] / b[:, 2:], axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", choices=("jp2", "seasons"), default="jp2",
                        help="jp2: mirror-tiled JP2 crops; seasons: T36UYA late winter vs summer, upsampled")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2match_bench"))
    parser.add_argument("--overviews", action="store_true", help="give the GeoTIFFs internal overviews")
    parser.add_argument("--cross-date", action="store_true", help="jp2: image0 from the other (cloudy) date")
    args, overrides = parser.parse_known_args()
    if args.cross_date and args.scene != "jp2":
        parser.error("--cross-date is for --scene jp2 (the seasons scene has two dates already)")
    image0, image1 = build_inputs(args.workdir, args.scene, args.overviews, args.cross_date)
    out = args.workdir / "run"
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own folder: a former run (another scene) is replaced
    command = [sys.executable, str(ROOT / "src" / "infer.py"), f"+pair.image0={image0}",
               f"+pair.image1={image1}", "+pair.name=bench", f"infer.output_dir={out}", *overrides]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gib = usage.ru_maxrss / 2**20  # KiB on Linux
    if not (out / "result.json").is_file():
        sys.exit(f"error: src/infer.py exited with status {status} and wrote no result (its message is above)")
    result = json.loads((out / "result.json").read_text())
    dates = {"jp2": "two dates" if args.cross_date else "one date", "seasons": " vs ".join(SEASON_DATES)}
    report = {"input": f"{args.scene}: 2 x {SIDE}x{SIDE} GeoTIFF" + (" with overviews" if args.overviews else "")
              + f", {dates[args.scene]}",
              "exit_status": status, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2),
              # CPU seconds and the machine's load: wall time on a shared machine depends on what else runs
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "cores": os.cpu_count(),
              "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "model": result["model"], "success": result["success"], "inliers": result.get("inliers"),
              "matches": result.get("matches"), "layers": result.get("matcher", {}).get("layers"),
              "tiles_used": result.get("tiles", {}).get("used"), "timings": result["timings"]}
    if result["success"]:
        report["mean_corner_error_px"] = round(mean_corner_error(np.array(result["homography"]), true_homography()), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
