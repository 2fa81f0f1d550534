"""Benchmark: known shifts recovered by the time-series co-registration on stacks built from real sample scenes.

Each stack is real T36UYA overview dates (the sample's grey TCI, 107 m), cropped to --size px, each
date's content shifted by a known amount, sub-pixel or a few pixels (s2match.timeseries.synthetic); the reference
date is left unshifted, so the shifts are the answer (Sentinel-2 co-registers these dates to under 0.05 px). The run
is `python src/coregister.py` as a child process, with the project's configuration (ALIKED + the trained LightGlue
by default) on a LocalCluster; it prints, per date, the true and the recovered shift at the reference's centre.

    python benchmarks/coregister_shifts.py [--workdir /tmp/s2match_coregister_bench] [--size 512] [override ...]

Extra arguments are Hydra overrides of the run, e.g. `features=sift matcher=ratio coregister.workers=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from s2match.timeseries.synthetic import centre_error, shifted_date  # noqa: E402

OVERVIEWS = ROOT / "data" / "sample" / "t36uya_overview"
REFERENCE = "20190830"
# Two stacks of real dates: one summer, and four years' seasons with snow; the reference (first) stays put.
STACKS = {"summer_2019": [REFERENCE, "20190606", "20190611", "20190626", "20190815", "20190825", "20190904",
                          "20190909"],
          "seasons_2016_2019": [REFERENCE, "20160212", "20160621", "20160830", "20190313", "20190427"]}
SEED = 14


def known_shifts(dates: list[str], rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """The reference unshifted; the others alternately sub-pixel (|s| < 1) and a few pixels (1 to 4), any sign."""
    shifts = {dates[0]: (0.0, 0.0)}
    for i, day in enumerate(dates[1:]):
        size = rng.uniform(0.1, 0.9) if i % 2 == 0 else rng.uniform(1.0, 4.0)
        angle = rng.uniform(0, 2 * np.pi)
        shifts[day] = (round(size * np.cos(angle), 3), round(size * np.sin(angle), 3))
    return shifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2match_coregister_bench"))
    parser.add_argument("--size", type=int, default=512, help="px, side of the crop of each date (centred)")
    args, overrides = parser.parse_known_args()
    rng = np.random.default_rng(SEED)
    offset = (1024 - args.size) // 2
    window = Window(offset, offset, args.size, args.size)
    report = {}
    for name, dates in STACKS.items():
        shifts = known_shifts(dates, rng)
        folder = args.workdir / name
        files = [shifted_date(OVERVIEWS / f"{day}.tif", window, shift, folder / "in" / f"{day}.tif", day)
                 for day, shift in shifts.items()]
        out = folder / "out"
        command = [sys.executable, str(ROOT / "src" / "coregister.py"), f"+stack.name={name}",
                   f"+stack.files=[{','.join(str(f) for f in files)}]", f"coregister.reference={REFERENCE}",
                   f"coregister.output_dir={out}", f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
                   f"mlflow.artifact_location={folder / 'mlruns'}", *overrides]
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        status = subprocess.run(command, cwd=ROOT).returncode
        wall = time.perf_counter() - start
        table = pd.read_csv(out / "report" / "shifts.csv")
        rows = []
        for row in table.to_dict("records"):
            truth = shifts[row["day"].replace("-", "")]
            registered = isinstance(row["homography"], str) and row["homography"]
            rows.append({"date": row["date"], "status": row["status"], "route": row["route"], "true_px": truth,
                         "found_px": [round(row["shift_x_px"], 3), round(row["shift_y_px"], 3)] if registered else None,
                         "error_px": round(centre_error(row["homography"], truth, (args.size, args.size)), 3)
                         if registered else None})
        errors = [r["error_px"] for r in rows if r["error_px"] is not None]
        report[name] = {"exit_status": status, "wall_s": round(wall, 1), "size_px": args.size,
                        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                        "registered": f"{len(errors) - 1} of {len(rows) - 1}",
                        "max_error_px": max(errors), "dates": rows}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
