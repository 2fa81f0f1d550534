"""`src/coregister.py`: co-register every date of a stack onto one reference date (see s2match.timeseries).

The run, each step a set of tasks on the executor (s2match.timeseries.cluster):
1. survey every date on the AOI's overview (clear share, picture); skip the too cloudy; pick the reference;
2. register the pairs of the graph (s2match.timeseries.graph): the star and the neighbours in time;
3. route each date to the reference (direct, or the most reliable chain), or report it failed;
4. write each date's COG on the reference grid and its pictures; then the tables, plot, report, MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from s2match.config import PROJECT_ROOT
from s2match.fileio import atomic_path
from s2match.inference.scenes import Scene, SceneImage
from s2match.s2.masks import MaskClasses
from s2match.timeseries.cluster import WorkerContext, open_executor
from s2match.timeseries.graph import CHAIN, DIRECT, FAILED, Edge, EdgeResult, Reliability, Route, \
    plan_edges, solve
from s2match.timeseries.matching import MatcherSpec
from s2match.timeseries.outputs import REPORT_DIR, SKIPPED, edges_table, pixel_metres, plot_shifts, shifts_table, \
    write_date, write_html
from s2match.timeseries.stack import StackDate, Survey, clearness, find_date, open_stack, resolve, skip_reason, \
    stack_sources, survey_date
from s2match.tracking import flat_params, log_run
from s2match.twoview.pipeline import pipeline_config

log = logging.getLogger(__name__)

# Matcher weights that name no file.
WEIGHTS_KEYWORDS = (None, "pretrained", "random")


def survey_task(context: WorkerContext, item: StackDate, aoi, overview_px: int, classes: MaskClasses) -> Survey:
    return survey_date(item, aoi, overview_px, classes)


def match_task(context: WorkerContext, edge: Edge, image0: Scene, image1: Scene) -> EdgeResult:
    return context.matcher(edge, image0, image1, context.worker)


def write_task(context: WorkerContext, reference: SceneImage, item: StackDate, H: np.ndarray | None, folder: Path,
               cfg: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, str]:
    return write_date(reference, item, H, folder, cfg, tags)


def matcher_spec(cfg: DictConfig) -> MatcherSpec:
    """The pipeline's config for the workers, with the matcher's weights file made absolute (workers may run in
    another folder, or on another machine that shares the file system)."""
    pipeline = pipeline_config(cfg)
    weights = pipeline["matcher"].get("weights")
    if weights not in WEIGHTS_KEYWORDS:
        pipeline["matcher"] = {**pipeline["matcher"], "weights": str(resolve(weights))}
    return MatcherSpec(pipeline, int(cfg.coregister.cache_entries))


def coregister(cfg: DictConfig) -> int:
    """The `coregister` entry point (see the module docstring). Returns 0: dates that could not be registered are
    reported in the outputs, not a failure of the run."""
    if "stack" not in cfg or not cfg.stack.get("name"):
        raise ValueError("no stack to co-register: pass +stack=NAME (conf/stack/), or +stack.name=NAME with "
                       "+stack.files=[...], +stack.folder=PATH or +stack.aoi=AOI")
    start = time.perf_counter()
    co, name = cfg.coregister, str(cfg.stack.name)
    classes = MaskClasses.from_config(co.masks)
    rules = Reliability.from_config(co)
    dates = open_stack(stack_sources(cfg.stack, cfg.paths.catalogue), cfg.bands, co.resolution)
    by_name = {item.name: item for item in dates}
    configured = find_date(dates, co.reference) if co.reference else None
    aoi = (configured or dates[0]).scene.grid
    folder = PROJECT_ROOT / (co.output_dir or Path("outputs", "coregister", name))
    settings = OmegaConf.to_container(co, resolve=True)
    spec = matcher_spec(cfg)
    with open_executor(co, spec, cfg.threads) as executor, atomic_path(folder) as tmp:
        tmp.mkdir()
        surveyed = executor.map(survey_task, {d.name: (d, aoi, co.overview_px, classes) for d in dates}, "survey")
        surveys = {key: outcome.value for key, outcome in surveyed.items() if not outcome.error}
        failed = {key: f"survey {outcome.error}" for key, outcome in surveyed.items() if outcome.error}
        skipped = {d.name: reason for d in dates if d.name in surveys
                   for reason in [skip_reason(surveys[d.name], d.mask, co.min_clear)] if reason}
        kept = [d.name for d in dates if d.name not in failed and d.name not in skipped]
        for key, reason in {**failed, **skipped}.items():
            log.warning("%s left out: %s", key, reason)
        if not kept:
            raise ValueError(f"stack {name}: no date has coregister.min_clear={co.min_clear} clear ground over "
                             "the AOI (see the warnings above)")
        scores = clearness({key: surveys[key] for key in kept})
        if configured is not None:
            if configured.name not in kept:
                raise ValueError(f"coregister.reference={co.reference}: {(failed | skipped)[configured.name]}")
            reference, choice = configured.name, "configured"
        else:
            reference = max(kept, key=lambda key: scores[key])
            choice = f"the clearest date: clearness {scores[reference]:.2f}"
        log.info("reference %s (%s); %d of %d dates to register", reference, choice, len(kept), len(dates))

        edges = plan_edges(kept, reference, int(co.neighbours))
        matched = executor.map(match_task, {e.key: (e, by_name[e.source].for_matching(classes),
                                                    by_name[e.target].for_matching(classes)) for e in edges},
                               "register")
        results = [matched[e.key].value or EdgeResult(e, False, f"task {matched[e.key].error}") for e in edges]
        ref_scene = by_name[reference].scene
        centre = np.array([[ref_scene.grid.width / 2 - 0.5, ref_scene.grid.height / 2 - 0.5]])
        routes: dict[str, Route] = {key: Route(FAILED, reason=reason) for key, reason in failed.items()}
        routes.update(solve(kept, reference, results, rules, centre))

        jobs = {}
        for item in dates:
            route = routes.get(item.name)
            H = route.H if route is not None else None
            tags = {"DATE": item.day.isoformat(), "REFERENCE": reference,
                    "ROUTE": " > ".join(route.path) if route is not None else ""}
            jobs[item.name] = (ref_scene, item, H, tmp, settings, tags)
        written_outcomes = executor.map(write_task, jobs, "write")
        written = {}
        for key, outcome in written_outcomes.items():
            if outcome.error and routes.get(key) is not None and routes[key].H is not None:
                routes[key] = Route(FAILED, reason=f"writing its file {outcome.error}")
            written[key] = outcome.value or {}
        table = shifts_table(dates, ref_scene, routes, skipped, surveys, scores, written)
        report = tmp / REPORT_DIR
        report.mkdir(exist_ok=True)
        table.to_csv(report / "shifts.csv", index=False)
        edges_table(results, rules).to_csv(report / "edges.csv", index=False)
        plot_shifts(table, pixel_metres(ref_scene.grid), f"{name}: shifts at the centre of the reference "
                    f"{reference} (+- sigma)", report / "shifts.png")
        summary = summarise(name, table, reference, choice, results, time.perf_counter() - start)
        if len(summary["weights"]) > 1:  # a worker without the weights file falls back to the pretrained matcher
            log.warning("the workers matched with different weights: %s", summary["weights"])
        write_html(table, summary, written, report / "index.html")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    run_id = log_run(OmegaConf.to_container(cfg.mlflow, resolve=True), cfg.mlflow.experiments.coregister, name,
                     flat_params({"stack": OmegaConf.to_container(cfg.stack, resolve=True), "coregister": settings,
                                  **spec.pipeline}),
                     {key: value for key, value in summary.items() if isinstance(value, (int, float))},
                     {"stack": name, "reference": reference}, folder / REPORT_DIR)
    log.info("%s: %d dates, %d direct, %d through a chain, %d failed, %d skipped in %.0f s; wrote %s (MLflow run "
             "%s)", name, summary["dates"], summary["dates_direct"], summary["dates_chain"], summary["dates_failed"],
             summary["dates_skipped"], summary["wall_s"], folder, run_id)
    return 0


def summarise(name: str, table, reference: str, choice: str, results: list[EdgeResult], seconds: float) -> dict:
    """summary.json: counts per status, the shares of the registered dates (reference aside) reached directly and
    through a chain, the median shift, the weights the workers used, and the wall time."""
    counts = {status: int((table["status"] == status).sum()) for status in (DIRECT, CHAIN, FAILED, SKIPPED)}
    registered = counts[DIRECT] + counts[CHAIN]
    others = len(table) - 1
    shifts = table.loc[table["status"].isin([DIRECT, CHAIN]), ["shift_east_m", "shift_north_m"]].astype(float)
    return {"stack": name, "reference": reference, "reference_choice": choice, "dates": int(len(table)),
            **{f"dates_{status}": count for status, count in counts.items()},
            "share_direct": round(counts[DIRECT] / others, 3) if others else 0.0,
            "share_chain": round(counts[CHAIN] / others, 3) if others else 0.0,
            "share_registered": round(registered / others, 3) if others else 0.0,
            "median_shift_m": round(float(np.median(np.hypot(shifts.iloc[:, 0], shifts.iloc[:, 1]))), 3)
            if registered else None,
            "pairs": len(results), "pairs_failed": sum(not r.success for r in results),
            "weights": sorted({r.weights for r in results if r.weights}), "wall_s": round(seconds, 1)}
