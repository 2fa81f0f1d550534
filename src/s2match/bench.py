"""Benchmark: ``python -m s2match.bench [--pairs N] [--runs R] [--methods a,b] [--out FILE] [overrides]``.

Speed and accuracy of every method of `evaluate.methods` in one run (s2match.evaluation.bench), printed as a
markdown table, so the figures of the README come from one command. Other arguments are Hydra overrides of
conf/ (e.g. ``evaluate=smoke``, ``device=cpu``), or ``--params params.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig

from s2match.cli import OptionParser, run
from s2match.evaluation.bench import run_bench
from s2match.fileio import write_text


def build_parser() -> OptionParser:
    parser = OptionParser(prog="python -m s2match.bench")
    parser.add_argument("--pairs", type=int, help="number of test pairs (default: evaluate.bench.pairs)")
    parser.add_argument("--runs", type=int, help="timed runs per pair, median kept (default: evaluate.bench.runs)")
    parser.add_argument("--methods", help="comma-separated method names (default: every method of evaluate.methods)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    return parser


def benchmark(cfg: DictConfig, options: argparse.Namespace) -> None:
    text = run_bench(cfg, options.pairs, options.runs, options.methods)
    if options.out is not None:
        write_text(options.out, text)
    print(text, end="")


def main(argv: list[str] | None = None) -> None:
    run(benchmark, __doc__, ("evaluate",), options=build_parser(), argv=argv)


if __name__ == "__main__":
    main()
