"""Evaluation of matching methods on seasonal pairs: per-pair records, a summary overall and per season kind,
the report files (metrics.json, errors.csv, error_cdf.csv, report.md, PNGs) and their MLflow run.

A method is a feature extractor, a matcher and, optionally, LightGlue weights (``MethodSpec``). On each pair it
extracts both images, matches, and fits a homography with OpenCV USAC (``s2match.geometry.fit_homography``); the
fit is scored by the mean corner error against the pair's true homography (``s2match.metrics``), so a method
that finds no usable homography counts as a failure (infinite error) rather than being left out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf

from s2match.features import build_features
from s2match.fileio import atomic_path
from s2match.geometry import FitResult, fit_homography
from s2match.matcher import build_matcher
from s2match.metrics import AUC_THRESHOLDS, match_precision, mean_corner_error, summarise
from s2match.pairs import load_pair, read_pairs, season_priority
from s2match.tracking import resolve_tracking_uri
from s2match.viz import draw_bars, draw_error_cdf, draw_matches

log = logging.getLogger(__name__)

OVERALL = "all"  # the group of every pair, as metrics.summarise names it
GROUP_KEY = "season_kind"
METHOD_KEYS = {"name", "features", "matcher", "weights"}
PHASES = ("extract_s", "match_s", "fit_s")
CDF_STEP_PX = 0.05
SUMMARY_HEADER = ["method", "pairs", *(f"AUC@{t:g}" for t in AUC_THRESHOLDS), "precision %", "matches", "inliers",
                  "failures %", "extract s", "match s", "fit s", "total s"]
FILES = {
    "metrics": "metrics.json",
    "errors": "errors.csv",
    "cdf": "error_cdf.csv",
    "cdf_png": "error_cdf.png",
    "bars_png": "auc3_per_season.png",
    "report": "report.md",
    "best_png": "matches_best.png",
    "worst_png": "matches_worst.png",
}


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: ``features`` for build_features, ``matcher`` for build_matcher, LightGlue ``weights``."""

    name: str
    features: dict[str, Any]
    matcher: dict[str, Any]
    weights: str | None = None

    def unavailable(self) -> str:
        """Why the method cannot run here ('' when it can)."""
        if self.weights is not None and not Path(self.weights).is_file():
            return f"weights file {self.weights} not found (train the matcher first: `dvc repro train`)"
        return ""

    @property
    def features_key(self) -> str:
        """Equal for methods with the same extractor config, which then share one extraction per pair."""
        return json.dumps(self.features, sort_keys=True)


def method_specs(cfg: DictConfig) -> list[MethodSpec]:
    """The `evaluate.methods` list with each method's features completed from `evaluate.feature_defaults`."""
    defaults = OmegaConf.to_container(cfg.feature_defaults, resolve=True)
    specs = []
    for index, entry in enumerate(OmegaConf.to_container(cfg.methods, resolve=True)):
        where = f"evaluate.methods[{index}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{where}: a method is a mapping with a name, got {entry!r}")
        unknown = sorted(set(entry) - METHOD_KEYS)
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown keys {unknown}; allowed: {sorted(METHOD_KEYS)}")
        features = dict(entry.get("features") or {})
        if features.get("name") not in defaults:
            raise ValueError(f"{where} ({entry['name']}): features.name must be one of {sorted(defaults)}, "
                             f"got {features.get('name')!r}")
        matcher = dict(entry.get("matcher") or {})
        if "weights" in matcher:
            raise ValueError(f"{where} ({entry['name']}): give LightGlue weights as the method's `weights`, "
                             "not matcher.weights")
        specs.append(MethodSpec(str(entry["name"]), {**defaults[features["name"]], **features}, matcher,
                                entry.get("weights")))
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"evaluate.methods: duplicated method names {duplicated}")
    if not specs:
        raise ValueError("evaluate.methods is empty: nothing to evaluate")
    return specs


@dataclass(frozen=True)
class Matched:
    """One method's output on one pair: matched points, the homography fit and the time of each phase."""

    pts0: np.ndarray  # (M, 2) image0 px
    pts1: np.ndarray  # (M, 2) image1 px
    scores: np.ndarray  # (M,)
    fit: FitResult
    n_keypoints: tuple[int, int]
    seconds: dict[str, float]  # PHASES


class Method:
    """A runnable method: the extractor and matcher of a MethodSpec, built once."""

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        self.features = build_features(spec.features)
        matcher_cfg = {**spec.matcher, **({"weights": spec.weights} if spec.weights is not None else {})}
        self.matcher = build_matcher(matcher_cfg, spec.features["name"])

    @property
    def name(self) -> str:
        return self.spec.name

    def extract(self, image0: np.ndarray, image1: np.ndarray) -> tuple[dict, dict, float]:
        """Features of two (C, H, W) [0, 1] images and the seconds both took."""
        start = time.perf_counter()
        feats0 = self.features(torch.from_numpy(image0)[None])
        feats1 = self.features(torch.from_numpy(image1)[None])
        return feats0, feats1, time.perf_counter() - start

    def match_and_fit(self, feats0: dict, feats1: dict, extract_s: float, size: tuple[int, int],
                      homography: Mapping[str, Any]) -> Matched:
        """Match two feature sets of images of `size` (width, height) and fit H with `homography` options."""
        start = time.perf_counter()
        result = self.matcher.match(feats0, feats1, size, size)
        matches = result["matches"].cpu().numpy()
        pts0 = feats0["keypoints"][matches[:, 0]].double().cpu().numpy().reshape(-1, 2)
        pts1 = feats1["keypoints"][matches[:, 1]].double().cpu().numpy().reshape(-1, 2)
        matched_at = time.perf_counter()
        fit = fit_homography(pts0, pts1, **homography)
        fitted_at = time.perf_counter()
        return Matched(pts0, pts1, result["scores"].cpu().numpy(), fit,
                       (len(feats0["keypoints"]), len(feats1["keypoints"])),
                       {"extract_s": extract_s, "match_s": matched_at - start, "fit_s": fitted_at - matched_at})

    def run(self, image0: np.ndarray, image1: np.ndarray, homography: Mapping[str, Any]) -> Matched:
        """Extract, match and fit on one pair of (C, H, W) images of equal size."""
        feats0, feats1, extract_s = self.extract(image0, image1)
        return self.match_and_fit(feats0, feats1, extract_s, image_size(image0), homography)


def image_size(image: np.ndarray) -> tuple[int, int]:
    """(width, height) of a (C, H, W) image."""
    return int(image.shape[2]), int(image.shape[1])


def evaluate_config(cfg: DictConfig) -> DictConfig:
    """The `evaluate` group of a composed config, or a one-line error saying how to get it."""
    if "evaluate" not in cfg:
        raise ValueError("no `evaluate` config: keep `- evaluate: default` in the defaults of conf/config.yaml")
    return cfg.evaluate


def set_threads(threads: int) -> None:
    """Torch and OpenCV on `threads` CPU threads, so that timings compare across runs and machines."""
    torch.set_num_threads(int(threads))
    cv2.setNumThreads(int(threads))


def select_pairs(pairs: pd.DataFrame, max_pairs: int | None) -> pd.DataFrame:
    """All pairs, or `max_pairs` of them taken in turn from each season kind (winter-summer first), so a small
    set still covers the kinds. Deterministic: within a kind, pairs keep their table order."""
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs.reset_index(drop=True)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or null, got {max_pairs}")
    kinds = sorted(pairs[GROUP_KEY].unique(), key=lambda kind: (season_priority(kind), kind))
    turn = pairs.groupby(GROUP_KEY).cumcount()
    kind_rank = pairs[GROUP_KEY].map({kind: rank for rank, kind in enumerate(kinds)})
    order = np.lexsort((kind_rank.to_numpy(), turn.to_numpy()))
    return pairs.iloc[order[:max_pairs]].reset_index(drop=True)


def pair_record(method: str, row: Mapping[str, Any], matched: Matched, H_gt: np.ndarray,
                precision_th: float) -> dict[str, Any]:
    """The errors.csv row of one method on one pair (the keys metrics.summarise reads, and more)."""
    width, height = int(row["width"]), int(row["height"])
    return {
        "method": method,
        "pair_id": row["pair_id"],
        "aoi": row["aoi"],
        GROUP_KEY: row[GROUP_KEY],
        "corner_error": mean_corner_error(matched.fit.H, H_gt, width, height),
        "failed": not matched.fit.success,
        "reason": matched.fit.reason,
        "precision": match_precision(matched.pts0, matched.pts1, H_gt, threshold=precision_th),
        "n_keypoints0": matched.n_keypoints[0],
        "n_keypoints1": matched.n_keypoints[1],
        "n_matches": len(matched.pts0),
        "n_inliers": matched.fit.n_inliers,
        **matched.seconds,
        "seconds": sum(matched.seconds.values()),
    }


def evaluate(methods: Sequence[Method], pairs: pd.DataFrame, homography: Mapping[str, Any],
             precision_th: float) -> tuple[pd.DataFrame, dict[tuple[str, str], Matched]]:
    """Run every method on every pair. Returns the records (one row per pair and method, pair order) and each
    method's output keyed by (method, pair_id). Methods with the same extractor config share its extraction
    (and its time) on each pair."""
    records, outputs = [], {}
    for number, row in enumerate(pairs.to_dict("records"), start=1):
        image0, image1, H_gt = load_pair(row)
        extracted: dict[str, tuple[dict, dict, float]] = {}
        summary = []
        for method in methods:
            key = method.spec.features_key
            if key not in extracted:
                extracted[key] = method.extract(image0, image1)
            matched = method.match_and_fit(*extracted[key], image_size(image0), homography)
            record = pair_record(method.name, row, matched, H_gt, precision_th)
            records.append(record)
            outputs[(method.name, row["pair_id"])] = matched
            summary.append(f"{method.name} {record['corner_error']:.2f} px")
        log.info("pair %d/%d %s (%s): %s", number, len(pairs), row["pair_id"], row[GROUP_KEY], ", ".join(summary))
    return pd.DataFrame.from_records(records), outputs


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


def metrics_dict(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {season_kind: {metric: value}}}: flat enough that `dvc metrics diff` reads sift.all.auc@3."""
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for (method, kind), row in table.iterrows():
        metrics.setdefault(method, {})[kind] = {
            name: int(value) if name == "n_pairs" else round(float(value), 4) for name, value in row.items()
        }
    return metrics


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


def report_markdown(table: pd.DataFrame, skipped: Mapping[str, str], setup: str, pictures: str) -> str:
    """report.md: one table for all pairs, one per season kind, the skipped methods, the figures."""
    parts = ["# Matcher evaluation", "", setup, "", "## All pairs", "",
             markdown_table(SUMMARY_HEADER, _summary_rows(table, OVERALL)), ""]
    for kind in kind_order(table.index.get_level_values(GROUP_KEY))[1:]:
        parts += [f"## {kind}", "", markdown_table(SUMMARY_HEADER, _summary_rows(table, kind)), ""]
    if skipped:
        parts += ["## Skipped methods", "", *(f"- {name}: {reason}" for name, reason in skipped.items()), ""]
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


def draw_pair(row: Mapping[str, Any], matched: Matched, record: Mapping[str, Any], path: Path, method: str,
              max_lines: int) -> Path:
    image0, image1, _ = load_pair(row)
    title = (f"{method}: {row['pair_id']} ({row[GROUP_KEY]}), corner error {record['corner_error']:.2f} px, "
             f"precision {100 * record['precision']:.0f}%")
    hwc0, hwc1 = np.moveaxis(image0, 0, -1), np.moveaxis(image1, 0, -1)  # viz takes (H, W, C) images
    return draw_matches(hwc0, hwc1, matched.pts0, matched.pts1, matched.scores, path, max_lines=max_lines,
                        subset="random", inliers=matched.fit.inliers, title=title)


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} (lists indexed), the shape MLflow params take."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: str(value)}
    flat: dict[str, str] = {}
    for key, item in items:
        flat.update(flat_params(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def mlflow_metrics(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """'<method>/<kind>/<metric>' with '@' dropped (MLflow refuses it; the training logger does the same)."""
    return {f"{method}/{kind}/{name.replace('@', '')}": value
            for method, kinds in metrics.items() for kind, values in kinds.items() for name, value in values.items()}


def log_to_mlflow(cfg: Mapping[str, Any], params: Mapping[str, str], metrics: Mapping[str, float],
                  tags: Mapping[str, str], folder: Path) -> str:
    """One MLflow run in experiment `cfg['experiment']` with params, metrics, tags and `folder` as artifacts.
    Returns the run id."""
    client = MlflowClient(resolve_tracking_uri(cfg.get("tracking_uri")))
    experiment = client.get_experiment_by_name(cfg["experiment"])
    if experiment is None:
        try:
            experiment_id = client.create_experiment(cfg["experiment"], artifact_location=cfg.get("artifact_location"))
        except MlflowException as err:  # created meanwhile by another process
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(cfg["experiment"]).experiment_id
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, tags=dict(tags), run_name="evaluate")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                         params=[Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()])
        client.log_artifacts(run_id, str(folder))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


@dataclass(frozen=True)
class Evaluation:
    table: pd.DataFrame  # summary_table
    records: pd.DataFrame  # errors.csv
    skipped: dict[str, str]  # method -> reason
    out_dir: Path
    run_id: str  # MLflow


def draw_extremes(folder: Path, records: pd.DataFrame, outputs: Mapping[tuple[str, str], Matched],
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


def write_outputs(out_dir: Path, ecfg: DictConfig, records: pd.DataFrame, outputs: Mapping[tuple[str, str], Matched],
                  pairs: pd.DataFrame, skipped: Mapping[str, str], setup: str) -> pd.DataFrame:
    """Every file of FILES in `out_dir`, written as a whole (atomically); returns the summary table."""
    names = list(pd.unique(records["method"]))
    table = summary_table(records, names)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / FILES["metrics"]).write_text(json.dumps(metrics_dict(table), indent=2) + "\n")
        records.to_csv(tmp / FILES["errors"], index=False, float_format="%.6g")
        error_cdf_table(records, names, ecfg.cdf_max_error).to_csv(tmp / FILES["cdf"], index=False)
        draw_error_cdf({name: records.loc[records["method"] == name, "corner_error"].to_numpy() for name in names},
                       tmp / FILES["cdf_png"], max_error=ecfg.cdf_max_error)
        draw_bars(table, tmp / FILES["bars_png"], metric="auc@3", group_key=GROUP_KEY, by="method")
        pictures = draw_extremes(tmp, records, outputs, pairs, pictured_method(table, ecfg.pictures.method),
                                 ecfg.pictures.max_lines)
        (tmp / FILES["report"]).write_text(report_markdown(table, skipped, setup, pictures))
    return table


def mlflow_params(ecfg: DictConfig, specs: Sequence[MethodSpec], pairs_file: Path, n_pairs: int) -> dict[str, str]:
    """The evaluation settings and every configured method (skipped ones too), flat."""
    settings = {key: value for key, value in OmegaConf.to_container(ecfg, resolve=True).items()
                if key not in ("methods", "feature_defaults", "mlflow", "bench")}
    params = flat_params(settings)
    for spec in specs:
        params.update(flat_params({"features": spec.features, "matcher": spec.matcher, "weights": spec.weights},
                                  f"method.{spec.name}"))
    return {**params, "pairs_file": str(pairs_file), "n_pairs": str(n_pairs)}


def run_stage(cfg: DictConfig) -> Evaluation:
    """The `evaluate` stage: every available method of `cfg.evaluate.methods` on the `cfg.evaluate.split` pairs
    of `cfg.paths.pairs`/pairs.csv; writes cfg.paths.evaluate (atomically, as a whole) and logs it to MLflow."""
    ecfg = evaluate_config(cfg)
    set_threads(ecfg.threads)
    specs = method_specs(ecfg)
    skipped = {spec.name: spec.unavailable() for spec in specs if spec.unavailable()}
    for name, reason in skipped.items():
        log.warning("method %s skipped: %s", name, reason)
    available = [spec for spec in specs if spec.name not in skipped]
    if not available:
        raise ValueError(f"no method can run: {'; '.join(f'{n}: {r}' for n, r in skipped.items())}")
    pairs_file = Path(cfg.paths.pairs) / "pairs.csv"
    pairs = select_pairs(read_pairs(pairs_file, ecfg.split), ecfg.max_pairs)
    if pairs.empty:
        raise ValueError(f"{pairs_file}: no pairs in split {ecfg.split!r}")
    homography = OmegaConf.to_container(ecfg.homography, resolve=True)
    log.info("evaluating %s on %d %s pairs", ", ".join(spec.name for spec in available), len(pairs), ecfg.split)
    records, outputs = evaluate([Method(spec) for spec in available], pairs, homography, ecfg.precision_th)

    setup = (f"{len(pairs)} `{ecfg.split}` pairs of `{pairs_file}`. Homography: {homography['method']}, "
             f"{homography['threshold']:g} px. AUC of the mean corner error at {'/'.join(map(str, AUC_THRESHOLDS))} "
             f"px (HPatches style), failures count as infinite error; precision: matches within "
             f"{ecfg.precision_th:g} px of the true homography; matches, inliers: means per pair; seconds: median "
             f"per pair (extraction of both images + matching + fitting) on {ecfg.threads} CPU threads.")
    out_dir = Path(cfg.paths.evaluate)
    table = write_outputs(out_dir, ecfg, records, outputs, pairs, skipped, setup)
    run_id = log_to_mlflow(OmegaConf.to_container(ecfg.mlflow, resolve=True),
                           mlflow_params(ecfg, specs, pairs_file, len(pairs)), mlflow_metrics(metrics_dict(table)),
                           {f"skipped.{name}": reason for name, reason in skipped.items()}, out_dir)
    return Evaluation(table, records, skipped, out_dir, run_id)
