"""The `evaluate` stage: every configured method registers every test pair through the one registration path
(s2match.inference.registration), so the evaluation measures what `src/infer.py` gives users.

A method is the project's configuration (conf/features, matcher, estimator, refinement, registration) with some
of its groups overridden (`evaluate.methods`): SIFT, the pretrained LightGlues, and the trained head with and
without the second pass and the refinement, so that the report shows what each step adds. Its registration is
scored by the mean corner error against the pair's true homography (a failure counts as infinite error), its
matches by their precision. The shift-consistency protocol measures, on real cross-season pairs on one grid,
how well a known shift of one date is recovered (see SHIFT_NOTE).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import rasterio
import torch
from omegaconf import DictConfig, OmegaConf

from s2match.data.pairs import load_pair, read_pairs, read_tile, season_priority
from s2match.evaluation.metrics import AUC_THRESHOLDS, match_precision, mean_corner_error
from s2match.evaluation.report import FILES, GROUP_KEY, metrics_dict, summary_table, write_report
from s2match.geo.georef import Grid
from s2match.inference.registration import FeatureCache, Registration, RegistrationSettings, register
from s2match.inference.scenes import ArrayScene
from s2match.models.features import features_config
from s2match.models.matchers import LightGlueMatcher, RatioTestMatcher
from s2match.presets import override_group
from s2match.tracking import flat_params, log_run, mlflow_metrics
from s2match.twoview.pipeline import PHASES, KeypointExtractor, TwoViewPipeline, pipeline_config

log = logging.getLogger(__name__)

METHOD_KEYS = {"name", "features", "matcher", "registration"}


@dataclass(frozen=True)
class MethodSpec:
    """A method: its name and its complete pipeline config (PIPELINE_GROUPS and `device`)."""

    name: str
    config: dict[str, Any]


def method_specs(cfg: DictConfig) -> list[MethodSpec]:
    """The `evaluate.methods` list, each completed from the project's configuration."""
    base = pipeline_config(cfg)
    specs = []
    for index, entry in enumerate(OmegaConf.to_container(cfg.evaluate.methods, resolve=True)):
        where = f"evaluate.methods[{index}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{where}: a method is a mapping with a name, got {entry!r}")
        unknown = sorted(set(entry) - METHOD_KEYS)
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown keys {unknown}; allowed: {sorted(METHOD_KEYS)}")
        config = {**base, **{group: override_group(base[group], entry.get(group)) for group in METHOD_KEYS - {"name"}}}
        config["features"] = features_config(config["features"])
        specs.append(MethodSpec(str(entry["name"]), config))
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"evaluate.methods: duplicated method names {duplicated}")
    if not specs:
        raise ValueError("evaluate.methods is empty: nothing to evaluate")
    return specs


class Method:
    """A runnable method: its pipeline and registration settings, built once."""

    def __init__(self, spec: MethodSpec, extractor: KeypointExtractor | None = None,
                 matcher: LightGlueMatcher | RatioTestMatcher | None = None) -> None:
        self.spec = spec
        self.pipeline = TwoViewPipeline.from_config(spec.config, extractor, matcher)
        self.settings = RegistrationSettings.from_config(spec.config["registration"])

    @property
    def name(self) -> str:
        return self.spec.name

    def register(self, scene0: ArrayScene, scene1: ArrayScene, cache: FeatureCache | None = None) -> Registration:
        return register(scene0, scene1, self.pipeline, self.settings, cache)


def build_methods(specs: Sequence[MethodSpec]) -> list[Method]:
    """Methods with equal extractor settings share one extractor, and with equal matcher settings too one matcher,
    so that they share its features and matches on a pair (the steps of the trained method run once)."""
    extractors: dict[str, KeypointExtractor] = {}
    matchers: dict[str, LightGlueMatcher | RatioTestMatcher] = {}
    methods = []
    for spec in specs:
        extractor_key = json.dumps([spec.config["features"], spec.config["registration"]["border_px"],
                                    spec.config["device"]], sort_keys=True)
        matcher_key = json.dumps([extractor_key, spec.config["matcher"]], sort_keys=True)
        method = Method(spec, extractors.get(extractor_key), matchers.get(matcher_key))
        extractors.setdefault(extractor_key, method.pipeline.extractor)
        matchers.setdefault(matcher_key, method.pipeline.matcher)
        methods.append(method)
    return methods


def set_threads(threads: int) -> None:
    """Torch and OpenCV on `threads` CPU threads, so that timings compare across runs and machines."""
    torch.set_num_threads(int(threads))
    cv2.setNumThreads(int(threads))


def pairs_by_kind(pairs: pd.DataFrame, max_pairs: int | None) -> pd.DataFrame:
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


def pair_scenes(row: Mapping[str, Any]) -> tuple[ArrayScene, ArrayScene, np.ndarray]:
    """The two images of a pair row as scenes (image1 = the second date warped by H) and the true H."""
    image0, image1, H = load_pair(row)
    return ArrayScene.of(image0, f"{row['pair_id']}/0"), ArrayScene.of(image1, f"{row['pair_id']}/1"), H


def pair_record(method: str, row: Mapping[str, Any], registration: Registration, H_gt: np.ndarray,
                precision_th: float) -> dict[str, Any]:
    """The errors.csv row of one method on one pair (the keys metrics.summarise reads, and more)."""
    report, matches = registration.report, registration.matches
    refinement = report.get("refinement", {})
    return {
        "method": method,
        "pair_id": row["pair_id"],
        "aoi": row["aoi"],
        GROUP_KEY: row[GROUP_KEY],
        "corner_error": mean_corner_error(registration.H, H_gt, int(row["width"]), int(row["height"])),
        "failed": not registration.success,
        "reason": report["reason"],
        "precision": match_precision(matches.pts0, matches.pts1, H_gt, threshold=precision_th),
        "n_keypoints0": len(matches.keypoints0),
        "n_keypoints1": len(matches.keypoints1),
        "n_matches": len(matches.pts0),
        "n_inliers": int(report.get("matcher", {}).get("inliers", 0)),
        "n_refined": int(refinement.get("reliable", 0)),
        "n_refined_inliers": int(refinement.get("inliers", 0)),
        "quarter_turns": report.get("coarse", {}).get("quarter_turns"),
        **{phase: registration.timings.get(phase, 0.0) for phase in PHASES},
        "seconds": registration.timings["total_s"],
    }


def evaluate(methods: Sequence[Method], pairs: pd.DataFrame, precision_th: float
             ) -> tuple[pd.DataFrame, dict[tuple[str, str], Registration]]:
    """Run every method on every pair. Returns the records (one row per pair and method, pair order) and each
    method's registration keyed by (method, pair_id). Methods sharing an extractor share its features on a pair
    (each is charged the extraction time)."""
    records, outputs = [], {}
    for number, row in enumerate(pairs.to_dict("records"), start=1):
        scene0, scene1, H_gt = pair_scenes(row)
        cache = FeatureCache()
        summary = []
        for method in methods:
            registration = method.register(scene0, scene1, cache)
            record = pair_record(method.name, row, registration, H_gt, precision_th)
            records.append(record)
            outputs[(method.name, row["pair_id"])] = registration
            summary.append(f"{method.name} {record['corner_error']:.2f} px")
        log.info("pair %d/%d %s (%s): %s", number, len(pairs), row["pair_id"], row[GROUP_KEY], ", ".join(summary))
    return pd.DataFrame.from_records(records), outputs


def tile_scene(path: str, name: str, data: np.ndarray | None = None) -> ArrayScene:
    """A tile as a georeferenced scene (its own grid), with `data` standing in for its pixels when given."""
    with rasterio.open(path) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height)
    return ArrayScene(read_tile(path) if data is None else data, grid, name)


def displaced(image: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """(C, H, W) image with its content moved by `shift` (x, y) px (Lanczos resampling; NaN where it left)."""
    moved = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    size = (image.shape[2], image.shape[1])
    return np.stack([cv2.warpAffine(band, moved, size, flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_CONSTANT,
                                    borderValue=float("nan")) for band in image])


def robust_shift(registration: Registration) -> np.ndarray:
    """The shift (px, image1 - image0) the registration measures between two images on one grid, or NaN."""
    if not registration.success:
        return np.full(2, np.nan)
    return np.asarray(registration.report["shift_px"]["median"], dtype=np.float64)


def shift_consistency(methods: Sequence[Method], pairs: pd.DataFrame, shifts: Sequence[Sequence[float]]
                      ) -> pd.DataFrame:
    """The shift-consistency protocol (see s2match.evaluation.report.SHIFT_NOTE) on the cross-season pairs:
    one row per method, pair and shift with the error in px (inf when a registration failed)."""
    rows = []
    cross = pairs[pairs["season0"] != pairs["season1"]]
    for number, row in enumerate(cross.to_dict("records"), start=1):
        log.info("shift consistency: pair %d/%d %s", number, len(cross), row["pair_id"])
        scene_a = tile_scene(row["path0"], f"{row['pair_id']}/A")
        tile_b = read_tile(row["path1"])
        scenes_b = [tile_scene(row["path1"], f"{row['pair_id']}/B", tile_b)]
        scenes_b += [tile_scene(row["path1"], f"{row['pair_id']}/B{s}", displaced(tile_b, s)) for s in shifts]
        cache = FeatureCache()
        for method in methods:
            found = [robust_shift(method.register(scene_a, scene, cache)) for scene in scenes_b]
            for shift, estimate in zip(shifts, found[1:], strict=True):
                error = float(np.linalg.norm(estimate - found[0] - np.asarray(shift, float)))
                rows.append({"method": method.name, "pair_id": row["pair_id"], GROUP_KEY: row[GROUP_KEY],
                             "shift_x": shift[0], "shift_y": shift[1], "base_x": found[0][0], "base_y": found[0][1],
                             "error_px": error if np.isfinite(error) else float("inf")})
    return pd.DataFrame(rows, columns=["method", "pair_id", GROUP_KEY, "shift_x", "shift_y", "base_x", "base_y",
                                       "error_px"])


@dataclass(frozen=True)
class Evaluation:
    table: pd.DataFrame  # summary_table
    records: pd.DataFrame  # errors.csv
    shifts: pd.DataFrame  # shift_consistency.csv
    weights: dict[str, str]  # method -> the matcher weights it ran with
    out_dir: Path
    run_id: str  # MLflow


def weights_used(method: Method) -> str:
    used = method.pipeline.weights()
    return used["weights"] if used["file"] is None else f"{used['weights']} ({used['file']})"


def evaluate_methods(cfg: DictConfig) -> Evaluation:
    """The `evaluate` stage: every method of `cfg.evaluate.methods` on the `cfg.evaluate.split` pairs of
    `cfg.paths.pairs`/pairs.csv; writes cfg.paths.evaluate (atomically, as a whole) and logs it to MLflow."""
    settings = cfg.evaluate
    set_threads(cfg.threads)
    specs = method_specs(cfg)
    pairs_file = Path(cfg.paths.pairs) / "pairs.csv"
    pairs = pairs_by_kind(read_pairs(pairs_file, settings.split), settings.max_pairs)
    if pairs.empty:
        raise ValueError(f"{pairs_file}: no pairs in split {settings.split!r}")
    methods = build_methods(specs)
    weights = {method.name: weights_used(method) for method in methods}
    log.info("evaluating %s on %d %s pairs", ", ".join(weights), len(pairs), settings.split)
    records, outputs = evaluate(methods, pairs, settings.precision_th)
    protocol = settings.shift_consistency
    shifts = shift_consistency([m for m in methods if m.name in protocol.methods], pairs,
                               OmegaConf.to_container(protocol.shifts, resolve=True))

    estimator = cfg.estimator
    setup = (f"{len(pairs)} `{settings.split}` pairs of `{pairs_file}`. Homography: {estimator.method}, "
             f"{estimator.threshold:g} px. AUC of the mean corner error at {'/'.join(map(str, AUC_THRESHOLDS))} "
             f"px (HPatches style), failures count as infinite error; precision: matches within "
             f"{settings.precision_th:g} px of the true homography; matches, inliers: means per pair; seconds: median "
             f"per pair (extraction + matching + fitting + refinement, and the rest of the registration) on "
             f"{cfg.threads} CPU threads.")
    out_dir = Path(cfg.paths.evaluate)
    table = write_report(out_dir, settings, records, outputs, pairs, weights, shifts, setup)
    params = flat_params({spec.name: spec.config for spec in specs}, "method")
    params.update(split=settings.split, n_pairs=str(len(pairs)), pairs_file=str(pairs_file),
                  precision_th=str(settings.precision_th))
    run_id = log_run(OmegaConf.to_container(cfg.mlflow, resolve=True), cfg.mlflow.experiments.evaluate, "evaluate",
                     params, mlflow_metrics(metrics_dict(table, shifts)),
                     {f"weights.{name}": which for name, which in weights.items()}, out_dir)
    return Evaluation(table, records, shifts, weights, out_dir, run_id)

