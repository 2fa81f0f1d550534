"""The evaluation's report: summary tables overall and per season kind, metrics.json, the error CDF, the
shift-consistency table, pictures of the best and worst pair, report.md; written as a whole."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from s2match.data.pairs import load_pair, season_priority
from s2match.evaluation.metrics import AUC_THRESHOLDS, summarise
from s2match.fileio import atomic_path
from s2match.inference.registration import Registration
from s2match.twoview.pipeline import PHASES
from s2match.viz import draw_bars, draw_error_cdf, draw_matches

OVERALL = "all"  # the group of every pair, as metrics.summarise names it
GROUP_KEY = "season_kind"
CDF_STEP_PX = 0.05
SUMMARY_HEADER = ["method", "pairs", *(f"AUC@{t:g}" for t in AUC_THRESHOLDS), "precision %", "matches", "inliers",
                  "failures %", "extract s", "match s", "fit s", "refine s", "total s"]
SHIFT_HEADER = ["method", "registrations", "success %", "median error px", "p90 error px"]
SHIFT_NOTE = ("Real cross-season pairs on one grid (A, B) and B displaced by known shifts s: the error is "
              "|(r(A, B_s) - r(A, B)) - s|, r the robust shift of the refined tie points; the unknown true "
              "misregistration of the two dates cancels.")
FILES = {
    "metrics": "metrics.json",
    "errors": "errors.csv",
    "shifts": "shift_consistency.csv",
    "cdf": "error_cdf.csv",
    "cdf_png": "error_cdf.png",
    "bars_png": "auc3_per_season.png",
    "report": "report.md",
    "best_png": "matches_best.png",
    "worst_png": "matches_worst.png",
}


def kind_order(kinds) -> list[str]:
    """Season kinds as reports list them: 'all' first, then winter-summer, ..., same-season last."""
    named = sorted({k for k in kinds if k != OVERALL}, key=lambda kind: (season_priority(kind), kind))
    return [OVERALL, *named]


def summary_table(records: pd.DataFrame, method_order: Sequence[str]) -> pd.DataFrame:
    """metrics.summarise per method and season kind (plus 'all'), with median_extract_s / _match_s / _fit_s.
    Indexed by (method, season_kind), methods in `method_order`, kinds in `kind_order`."""
    table = summarise(records.to_dict("records"), GROUP_KEY, by="method")
    by_kind = records.groupby(["method", GROUP_KEY])[list(PHASES)].median()
    overall = records.groupby("method")[list(PHASES)].median()
    overall.index = pd.MultiIndex.from_product([overall.index, [OVERALL]], names=["method", GROUP_KEY])
    table = table.join(pd.concat([by_kind, overall]).rename(columns=lambda phase: f"median_{phase}"))
    order = [(m, k) for m in method_order for k in kind_order(table.index.get_level_values(GROUP_KEY))
             if (m, k) in table.index]
    return table.loc[order]


def metrics_dict(table: pd.DataFrame, shifts: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {season_kind: {metric: value}}}: flat enough that `dvc metrics diff` reads sift.all.auc@3; the
    shift-consistency summary of a method is its kind `shift_consistency`."""
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for (method, kind), row in table.iterrows():
        metrics.setdefault(method, {})[kind] = {
            name: int(value) if name == "n_pairs" else round(float(value), 4) for name, value in row.items()
        }
    for method, summary in shift_summary(shifts).items():
        metrics.setdefault(method, {})["shift_consistency"] = summary
    return metrics


def shift_summary(shifts: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method: registrations tried, share that succeeded, median and p90 of the shift-consistency error (px)."""
    summary = {}
    for method, rows in shifts.groupby("method", sort=False):
        errors = rows["error_px"].to_numpy(np.float64)
        found = errors[np.isfinite(errors)]
        summary[method] = {"n": int(len(rows)), "success": round(float(np.isfinite(errors).mean()), 4),
                           "median_px": round(float(np.median(found)), 4) if len(found) else float("nan"),
                           "p90_px": round(float(np.percentile(found, 90)), 4) if len(found) else float("nan")}
    return summary


def _shift_rows(shifts: pd.DataFrame) -> list[list[str]]:
    return [[method, s["n"], f"{100 * s['success']:.0f}", f"{s['median_px']:.3f}", f"{s['p90_px']:.3f}"]
            for method, s in shift_summary(shifts).items()]


def error_cdf_table(records: pd.DataFrame, method_order: Sequence[str], max_error: float) -> pd.DataFrame:
    """Share of pairs (%) with mean corner error <= threshold_px, one column per method, on a fixed grid: the
    wide layout DVC plots draw as one line per column."""
    thresholds = np.round(np.arange(0.0, max_error + CDF_STEP_PX / 2, CDF_STEP_PX), 4)
    table = {"threshold_px": thresholds}
    for method in method_order:
        errors = np.sort(records.loc[records["method"] == method, "corner_error"].to_numpy(np.float64))
        table[method] = np.round(100.0 * np.searchsorted(errors, thresholds, side="right") / len(errors), 3)
    return pd.DataFrame(table)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_rows(table: pd.DataFrame, kind: str) -> list[list[str]]:
    rows = []
    for method in table.index.get_level_values("method").unique():
        if (method, kind) not in table.index:
            continue
        r = table.loc[(method, kind)]
        rows.append([method, int(r["n_pairs"]), *(f"{r[f'auc@{t:g}']:.1f}" for t in AUC_THRESHOLDS),
                     f"{100 * r['precision']:.1f}", f"{r['mean_matches']:.0f}", f"{r['mean_inliers']:.0f}",
                     f"{100 * r['failure_rate']:.0f}", *(f"{r[f'median_{phase}']:.3f}" for phase in PHASES),
                     f"{r['median_seconds']:.3f}"])
    return rows


def report_markdown(table: pd.DataFrame, weights: Mapping[str, str], shifts: pd.DataFrame, setup: str,
                    pictures: str) -> str:
    """report.md: one table for all pairs, one per season kind, the shift consistency, the weights each method
    ran with, the figures."""
    parts = ["# Matcher evaluation", "", setup, "", "## All pairs", "",
             markdown_table(SUMMARY_HEADER, _summary_rows(table, OVERALL)), ""]
    for kind in kind_order(table.index.get_level_values(GROUP_KEY))[1:]:
        parts += [f"## {kind}", "", markdown_table(SUMMARY_HEADER, _summary_rows(table, kind)), ""]
    if len(shifts):
        parts += ["## Shift consistency", "", SHIFT_NOTE, "",
                  markdown_table(SHIFT_HEADER, _shift_rows(shifts)), ""]
    parts += ["## Matcher weights", "", *(f"- {name}: {which}" for name, which in weights.items()), ""]
    parts += ["## Figures", "", f"![error CDF]({FILES['cdf_png']})", "",
              f"![AUC@3 per season kind]({FILES['bars_png']})", "", pictures, ""]
    return "\n".join(parts)


def pictured_method(table: pd.DataFrame, preferred: str) -> str:
    """`preferred` if it was evaluated, else the method with the best AUC@3 over all pairs."""
    methods = table.index.get_level_values("method").unique()
    if preferred in methods:
        return preferred
    overall = table.xs(OVERALL, level=GROUP_KEY)
    return str(overall["auc@3"].idxmax())


def extreme_pairs(records: pd.DataFrame, method: str) -> dict[str, str]:
    """pair_id of the lowest and the highest corner error of `method` (first in pair order on ties)."""
    errors = records.loc[records["method"] == method].set_index("pair_id")["corner_error"]
    return {"best": str(errors.idxmin()), "worst": str(errors.idxmax())}


def draw_pair(row: Mapping[str, Any], registration: Registration, record: Mapping[str, Any], path: Path,
              method: str, max_lines: int) -> Path:
    image0, image1, _ = load_pair(row)
    title = (f"{method}: {row['pair_id']} ({row[GROUP_KEY]}), corner error {record['corner_error']:.2f} px, "
             f"precision {100 * record['precision']:.0f}%")
    hwc0, hwc1 = np.moveaxis(image0, 0, -1), np.moveaxis(image1, 0, -1)  # viz takes (H, W, C) images
    matches = registration.matches
    inliers = registration.inliers if len(registration.inliers) == len(matches.pts0) else None
    return draw_matches(hwc0, hwc1, matches.pts0, matches.pts1, matches.scores, path, max_lines=max_lines,
                        subset="random", inliers=inliers, title=title)


def draw_extremes(folder: Path, records: pd.DataFrame, outputs: Mapping[tuple[str, str], Registration],
                  pairs: pd.DataFrame, method: str, max_lines: int) -> str:
    """Match pictures of the best and the worst pair of `method` in `folder`; returns their report section."""
    rows = pairs.set_index("pair_id", drop=False)
    lines = []
    for which, pair_id in extreme_pairs(records, method).items():
        record = records[(records["method"] == method) & (records["pair_id"] == pair_id)].iloc[0]
        draw_pair(rows.loc[pair_id].to_dict(), outputs[(method, pair_id)], record.to_dict(),
                  folder / FILES[f"{which}_png"], method, max_lines)
        lines += [f"{which.capitalize()} pair of {method}: {pair_id} ({record[GROUP_KEY]}, corner error "
                  f"{record['corner_error']:.2f} px)", "", f"![{which} pair]({FILES[f'{which}_png']})", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, settings: DictConfig, records: pd.DataFrame,
                 outputs: Mapping[tuple[str, str], Registration], pairs: pd.DataFrame, weights: Mapping[str, str],
                 shifts: pd.DataFrame, setup: str) -> pd.DataFrame:
    """Every file of FILES in `out_dir`, written as a whole (atomically); returns the summary table."""
    names = list(pd.unique(records["method"]))
    table = summary_table(records, names)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / FILES["metrics"]).write_text(json.dumps(metrics_dict(table, shifts), indent=2) + "\n")
        shifts.to_csv(tmp / FILES["shifts"], index=False, float_format="%.6g")
        records.to_csv(tmp / FILES["errors"], index=False, float_format="%.6g")
        error_cdf_table(records, names, settings.cdf_max_error).to_csv(tmp / FILES["cdf"], index=False)
        draw_error_cdf({name: records.loc[records["method"] == name, "corner_error"].to_numpy() for name in names},
                       tmp / FILES["cdf_png"], max_error=settings.cdf_max_error)
        draw_bars(table, tmp / FILES["bars_png"], metric="auc@3", group_key=GROUP_KEY, by="method")
        pictures = draw_extremes(tmp, records, outputs, pairs, pictured_method(table, settings.pictures.method),
                                 settings.pictures.max_lines)
        (tmp / FILES["report"]).write_text(report_markdown(table, weights, shifts, setup, pictures))
    return table
