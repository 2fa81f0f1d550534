"""Benchmark: ``python -m s2match.bench [--pairs N] [--runs R] [--methods a,b] [--out FILE] [overrides]``.

Speed and accuracy of every method of `evaluate.methods` in one run (s2match.evaluation.bench), printed as a
markdown table, so the figures of the README come from one command. Other arguments are Hydra overrides of
conf/ (e.g. ``evaluate=smoke``, ``device=cpu``), or ``--params params.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from s2match.cli import USER_ERRORS
from s2match.config import load_config
from s2match.evaluation.bench import run_bench
from s2match.fileio import write_text


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
