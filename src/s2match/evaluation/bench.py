"""Speed and accuracy of every method in one run: `python -m s2match.bench` (see s2match.bench for the command).

Each method registers a fixed set of N test pairs (taken in turn from each season kind, as the evaluation's
max_pairs takes them) R times after one warm-up run, through the same registration path as `src/infer.py`;
the table gives the mean over pairs of the median seconds of each phase (extraction, matching, robust fits,
refinement) and of the whole registration, the AUCs of the corner errors, and the shift-consistency error of
the methods the evaluation checks it for. Methods never share an extraction here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from s2match.data.pairs import read_pairs
from s2match.evaluation.metrics import AUC_THRESHOLDS, auc, mean_corner_error
from s2match.evaluation.report import markdown_table, shift_summary
from s2match.evaluation.runner import (
    Method,
    MethodSpec,
    method_specs,
    pair_scenes,
    pairs_by_kind,
    set_threads,
    shift_consistency,
)
from s2match.twoview.pipeline import PHASES

log = logging.getLogger(__name__)

HEADER = ["method", "extract s", "match s", "fit s", "refine s", "total s", *(f"AUC@{t:g}" for t in AUC_THRESHOLDS),
          "shift err median px", "shift err p90 px"]


def bench_method(method: Method, pairs: Sequence[tuple[dict, object, object, np.ndarray]], runs: int
                 ) -> dict[str, float]:
    """Mean over `pairs` (row, scene0, scene1, H) of the median seconds of each phase over `runs` runs, the
    total, and the AUCs of the corner errors."""
    _, scene0, scene1, _ = pairs[0]
    method.register(scene0, scene1)  # warm-up: lazy initialisation and caches stay out of the timings
    medians, errors = [], []
    for row, scene0, scene1, H_gt in pairs:
        timed = [method.register(scene0, scene1) for _ in range(runs)]
        medians.append([np.median([r.timings.get(phase, 0.0) for r in timed]) for phase in (*PHASES, "total_s")])
        errors.append(mean_corner_error(timed[-1].H, H_gt, int(row["width"]), int(row["height"])))
    seconds = dict(zip((*PHASES, "total_s"), np.mean(medians, axis=0), strict=True))
    return {**seconds, **auc(errors, AUC_THRESHOLDS)}


def bench_table(results: Mapping[str, Mapping[str, float]]) -> str:
    rows = [[name, *(f"{r[key]:.3f}" for key in (*PHASES, "total_s")),
             *(f"{r[f'auc@{t:g}']:.1f}" for t in AUC_THRESHOLDS),
             *(f"{r[key]:.3f}" if key in r else "-" for key in ("median_px", "p90_px"))]
            for name, r in results.items()]
    return markdown_table(HEADER, rows)


def chosen_specs(specs: Sequence[MethodSpec], names: str | None) -> list[MethodSpec]:
    """The specs named in the comma-separated `names` (all when None)."""
    if not names:
        return list(specs)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = {spec.name: spec for spec in specs}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"--methods: unknown methods {unknown}; configured: {sorted(known)}")
    return [known[name] for name in wanted]


def run_bench(cfg: DictConfig, n_pairs: int | None = None, runs: int | None = None, names: str | None = None
              ) -> str:
    """The benchmark table (markdown, with a line on the setup) for a composed config."""
    settings = cfg.evaluate
    n_pairs = int(n_pairs if n_pairs is not None else settings.bench.pairs)
    runs = int(runs if runs is not None else settings.bench.runs)
    if n_pairs < 1 or runs < 1:
        raise ValueError(f"--pairs and --runs must be >= 1, got {n_pairs} and {runs}")
    set_threads(cfg.threads)
    specs = chosen_specs(method_specs(cfg), names)
    pairs_file = Path(cfg.paths.pairs) / "pairs.csv"
    table = pairs_by_kind(read_pairs(pairs_file, settings.split), n_pairs)
    if table.empty:
        raise ValueError(f"{pairs_file}: no pairs in split {settings.split!r}")
    loaded = [(row, *pair_scenes(row)) for row in table.to_dict("records")]
    protocol = settings.shift_consistency
    results = {}
    for spec in specs:
        log.info("benchmarking %s on %d pairs x %d runs", spec.name, len(loaded), runs)
        method = Method(spec)
        results[spec.name] = bench_method(method, loaded, runs)
        if spec.name in protocol.methods:
            shifts = shift_consistency([method], table, OmegaConf.to_container(protocol.shifts, resolve=True))
            results[spec.name].update(shift_summary(shifts).get(spec.name, {}))
    kinds = ", ".join(f"{kind} {count}" for kind, count in table["season_kind"].value_counts().items())
    setup = (f"{len(loaded)} `{settings.split}` pairs of `{pairs_file}` ({kinds}); seconds per pair: mean over pairs "
             f"of the median of {runs} runs, on {cfg.threads} CPU threads, device {cfg.device}; homography "
             f"{cfg.estimator.method} {cfg.estimator.threshold:g} px; shift error: the shift-consistency protocol "
             f"on the cross-season pairs of the set.")
    return f"{setup}\n\n{bench_table(results)}\n"

