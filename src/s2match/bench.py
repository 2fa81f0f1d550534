"""Benchmark: ``python -m s2match.bench [--pairs N] [--runs R] [--methods a,b] [--out FILE] [overrides]``.

Times extraction (both images), matching and homography fitting of each method of `evaluate.methods`
separately, on a fixed set of N test pairs (taken in turn from each season kind, as the evaluation's max_pairs
takes them), as the median of R runs per pair after one warm-up run, on `evaluate.threads` CPU threads; prints a
markdown table with the mean over pairs of those medians and the AUCs on the same set, so the figures of the
README come from one command. Unlike the evaluation, methods never share an extraction here.
Other arguments are Hydra overrides of conf/ (e.g. ``evaluate=smoke``, ``features=disk``), or
``--params params.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from s2match.cli import USER_ERRORS
from s2match.config import load_config
from s2match.evaluation import (
    PHASES,
    Method,
    MethodSpec,
    evaluate_config,
    markdown_table,
    method_specs,
    select_pairs,
    set_threads,
)
from s2match.fileio import write_text
from s2match.metrics import AUC_THRESHOLDS, auc, mean_corner_error
from s2match.pairs import load_pair, read_pairs

log = logging.getLogger(__name__)

HEADER = ["method", "extract s", "match s", "fit s", "total s", *(f"AUC@{t:g}" for t in AUC_THRESHOLDS)]


def bench_method(method: Method, pairs: Sequence[tuple[dict, np.ndarray, np.ndarray, np.ndarray]], runs: int,
                 homography: Mapping[str, Any]) -> dict[str, float]:
    """Mean over `pairs` (row, image0, image1, H) of the median seconds of each phase over `runs` runs, the
    total, and the AUCs of the corner errors."""
    _, image0, image1, _ = pairs[0]
    method.run(image0, image1, homography)  # warm-up: lazy initialisation and caches stay out of the timings
    medians, errors = [], []
    for row, image0, image1, H_gt in pairs:
        timed = [method.run(image0, image1, homography) for _ in range(runs)]
        medians.append([np.median([m.seconds[phase] for m in timed]) for phase in PHASES])
        errors.append(mean_corner_error(timed[-1].fit.H, H_gt, int(row["width"]), int(row["height"])))
    seconds = dict(zip(PHASES, np.mean(medians, axis=0), strict=True))
    return {**seconds, "total_s": sum(seconds.values()), **auc(errors, AUC_THRESHOLDS)}


def bench_table(results: Mapping[str, Mapping[str, float]]) -> str:
    rows = [[name, *(f"{r[key]:.3f}" for key in (*PHASES, "total_s")),
             *(f"{r[f'auc@{t:g}']:.1f}" for t in AUC_THRESHOLDS)] for name, r in results.items()]
    return markdown_table(HEADER, rows)


def chosen_specs(specs: Sequence[MethodSpec], names: str | None) -> list[MethodSpec]:
    """The specs named in the comma-separated `names` (all when None), without those that cannot run."""
    if names:
        wanted = [name.strip() for name in names.split(",") if name.strip()]
        known = {spec.name: spec for spec in specs}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"--methods: unknown methods {unknown}; configured: {sorted(known)}")
        specs = [known[name] for name in wanted]
    available = []
    for spec in specs:
        reason = spec.unavailable()
        if reason:
            log.warning("method %s skipped: %s", spec.name, reason)
        else:
            available.append(spec)
    if not available:
        raise ValueError("no method to benchmark")
    return available


def run_bench(cfg: DictConfig, n_pairs: int | None = None, runs: int | None = None, names: str | None = None
              ) -> str:
    """The benchmark table (markdown, with a line on the setup) for a composed config with `evaluate`."""
    ecfg = evaluate_config(cfg)
    n_pairs = int(n_pairs if n_pairs is not None else ecfg.bench.pairs)
    runs = int(runs if runs is not None else ecfg.bench.runs)
    if n_pairs < 1 or runs < 1:
        raise ValueError(f"--pairs and --runs must be >= 1, got {n_pairs} and {runs}")
    set_threads(ecfg.threads)
    specs = chosen_specs(method_specs(ecfg), names)
    pairs_file = Path(cfg.paths.pairs) / "pairs.csv"
    table = select_pairs(read_pairs(pairs_file, ecfg.split), n_pairs)
    if table.empty:
        raise ValueError(f"{pairs_file}: no pairs in split {ecfg.split!r}")
    loaded = [(row, *load_pair(row)) for row in table.to_dict("records")]
    homography = OmegaConf.to_container(ecfg.homography, resolve=True)
    results = {}
    for spec in specs:
        log.info("benchmarking %s on %d pairs x %d runs", spec.name, len(loaded), runs)
        results[spec.name] = bench_method(Method(spec), loaded, runs, homography)
    kinds = ", ".join(f"{kind} {count}" for kind, count in table["season_kind"].value_counts().items())
    setup = (f"{len(loaded)} `{ecfg.split}` pairs of `{pairs_file}` ({kinds}); seconds per pair: mean over pairs of "
             f"the median of {runs} runs, on {ecfg.threads} CPU threads; homography {homography['method']} "
             f"{homography['threshold']:g} px.")
    return f"{setup}\n\n{bench_table(results)}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s2match.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help="number of test pairs (default: evaluate.bench.pairs)")
    parser.add_argument("--runs", type=int, help="timed runs per pair, median kept (default: evaluate.bench.runs)")
    parser.add_argument("--methods", help="comma-separated method names (default: every method of evaluate.methods)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        text = run_bench(load_config(overrides), args.pairs, args.runs, args.methods)
        if args.out is not None:
            write_text(args.out, text)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    print(text, end="")


if __name__ == "__main__":
    main()
