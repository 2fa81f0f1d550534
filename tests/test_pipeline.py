"""The DVC pipeline end to end in a scratch copy of the project, and params.yaml kept in sync with conf/."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from dvc.repo import Repo

from s2match.config import PARAMS_FILE, PIPELINE_CONFIG, PROJECT_ROOT, ConfigError, compose_config, load_config, render_params

PROJECT_FILES = ["conf", "pipeline", "src", "dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", ".dvcignore",
                 ".gitignore"]


def test_params_yaml_is_conf_composed():
    expected = render_params(compose_config(config_name=PIPELINE_CONFIG))
    assert PARAMS_FILE.read_text() == expected, "run `make params` after editing conf/"


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
    # Python writes bytecode caches beside the sources a stage depends on (a folder dep: src/s2match/geo)
    bytecode = project / "src/s2match/geo/__pycache__/georef.cpython-311.pyc"
    bytecode.parent.mkdir(exist_ok=True)
    bytecode.write_bytes(b"\x00")
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
    """--params composes the file with Hydra beside conf/: keys checked as on conf/, groups merged over it."""
    cfg = load_config(["tile.size=256", "pair.image1=other.tif"], PARAMS_FILE)
    assert cfg.tile.size == 256 and cfg.pair.name == "demo" and cfg.pair.image1 == "other.tif"
    cfg = load_config(["+pair=t33uuu_jp2", "+train=smoke"], PARAMS_FILE)
    assert cfg.pair.name == "t33uuu_jp2" and cfg.trainer.max_steps == compose_config(["train=smoke"]).trainer.max_steps
    with pytest.raises(ConfigError, match="did you mean tile.size"):
        load_config(["tile.sise=256"], PARAMS_FILE)
    with pytest.raises(ConfigError, match="not found"):
        load_config([], "missing.yaml")


def imported_modules(script: Path) -> set[Path]:
    """The s2match module files a script imports, transitively (static: every `import` in every module, and
    `import_module("s2match.x.")` prefixes as their whole package)."""
    src = PROJECT_ROOT / "src"

    def module_file(name: str) -> Path | None:
        path = src.joinpath(*name.rstrip(".").split("."))
        if (path / "__init__.py").is_file():
            return path / "__init__.py"
        return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None

    def names(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("s2match")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("s2match"):
                found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("s2match."):
                package = src.joinpath(*node.value.rstrip(".").split("."))
                found |= {f"{node.value.rstrip('.')}.{p.stem}" for p in package.glob("*.py")} if package.is_dir() else set()
        return found

    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in names(todo.pop()):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                path = module_file(".".join(parts[:end]))
                if path is not None and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return seen


def test_dvc_stage_deps_cover_every_imported_module():
    """A change to any module a stage imports reruns the stage: `dvc repro` cannot report stale results."""
    stages = [stage for stage in Repo(str(PROJECT_ROOT)).index.stages if stage.cmd]  # ${...} resolved as DVC does
    assert {stage.addressing for stage in stages} >= {"download", "pairs", "train", "evaluate", "demo"}
    for stage in stages:
        name = stage.addressing
        script = next(PROJECT_ROOT / word for word in stage.cmd.split() if word.endswith(".py"))
        deps = [PROJECT_ROOT / dep.def_path for dep in stage.deps]
        assert script in deps, f"stage {name}: its script {script} is not a dep"
        for dep in deps:
            assert dep.exists() or dep.is_relative_to(PROJECT_ROOT / "outputs"), f"stage {name}: dep {dep} missing"
        missing = sorted(str(module.relative_to(PROJECT_ROOT)) for module in imported_modules(script)
                         if not any(module == dep or module.is_relative_to(dep) for dep in deps))
        assert not missing, f"stage {name} imports modules that are not its deps: {missing}"
