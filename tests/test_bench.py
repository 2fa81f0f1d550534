"""`python -m s2match.bench` on real test pairs of the sample: the table it prints and writes, bad arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2match import bench
from s2match.config import PROJECT_ROOT


def bench_args(stages) -> list[str]:
    return ["evaluate=smoke", f"paths.pairs={stages['dir'] / 'pairs'}"]


def test_bench_prints_and_writes_a_table(stages, tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-m", "s2match.bench", "--pairs", "1", "--runs", "1", "--methods", "sift", "--out", str(out),
         *bench_args(stages)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ("| method | extract s | match s | fit s | refine s | total s | AUC@1 | AUC@3 | AUC@5 | AUC@10 | "
              "shift err median px | shift err p90 px |")
    assert header in lines
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and line != header}
    assert rows.keys() == {"sift"}
    for row in rows.values():
        cells = [float(cell) for cell in row.strip("| ").split(" | ")[1:-2]]
        extract, match, fit, refine, total, *aucs = cells
        assert extract > 0 and refine == 0 and total >= extract + match + fit
        assert all(0.0 <= value <= 100.0 for value in aucs)
    assert "1 `test` pairs" in result.stdout
    assert out.read_text() == result.stdout


def test_bench_rejects_an_unknown_method(stages, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--pairs", "1", "--methods", "sift,nope", *bench_args(stages)])
    assert exit_info.value.code == 1
    assert "unknown methods ['nope']" in capsys.readouterr().err
