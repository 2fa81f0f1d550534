"""The DVC pipeline end to end in a scratch copy of the project, and params.yaml kept in sync with conf/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from s2match.config import PARAMS_FILE, PROJECT_ROOT, compose_config, load_config, render_params

PROJECT_FILES = ["conf", "pipeline", "src", "dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", ".dvcignore",
                 ".gitignore"]


def test_params_yaml_is_conf_composed():
    assert PARAMS_FILE.read_text() == render_params(compose_config()), "run `make params` after editing conf/"


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, sample_dir) -> Path:
    """A git + DVC copy of the project whose data/ is the restored sample."""
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    (root / "data").mkdir()
    (root / "data" / "sample").symlink_to(sample_dir)
    run(["git", "init", "-q"], root)
    run(["git", "add", "."], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    return root


@pytest.mark.slow
def test_dvc_repro_pairs_end_to_end(project):
    run(["dvc", "repro", "pairs"], project)
    table = pd.read_csv(project / "outputs/pairs/pairs.csv")
    assert {"train", "val", "test"} == set(table.split) and len(table) > 100
    assert (project / "outputs/catalogue.csv").is_file() and (project / "outputs/tiles/tiles.csv").is_file()
    assert "download" in run(["dvc", "dag"], project) and "pairs" in run(["dvc", "dag"], project)
    again = run(["dvc", "repro", "pairs"], project)
    assert "Running stage" not in again and "up to date" in again
    assert "per_split" in run(["dvc", "metrics", "show", "--json"], project)


@pytest.mark.slow
def test_dvc_exp_run_set_param(project):
    """`dvc exp run -S` composes conf/ with the override into params.yaml and reruns only what depends on it."""
    before = pd.read_csv(project / "outputs/pairs/pairs.csv") if (project / "outputs/pairs/pairs.csv").exists() else None
    out = run(["dvc", "exp", "run", "-S", "pairs.max_per_tile.test=1", "pairs"], project)
    assert "Running stage 'bands'" not in out and "Running stage 'pairs'" in out
    table = pd.read_csv(project / "outputs/pairs/pairs.csv")
    per_tile = table[table.split == "test"].groupby("tile_id").size()
    assert (per_tile == 1).all()
    if before is not None:
        assert len(table) < len(before)


def test_stage_config_from_params_file_takes_overrides_and_groups():
    cfg = load_config(["--params", str(PARAMS_FILE), "+pair=demo", "tile.size=256", "+pair.image1=other.tif"])
    assert cfg.tile.size == 256 and cfg.pair.name == "demo" and cfg.pair.image1 == "other.tif"
    with pytest.raises(SystemExit, match="not found"):
        load_config(["--params", "missing.yaml"])
