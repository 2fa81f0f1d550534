"""The command line of every entry point (s2match.cli, s2match.config): --help, one-line configuration errors with
the nearest valid names, the debug switch, --params, and two images given as plain paths."""

from __future__ import annotations

import ast
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from omegaconf import OmegaConf

from s2match import bench, cli
from s2match.config import PARAMS_FILE, PROJECT_ROOT, ConfigError, literal, load_config

ENTRY_POINTS = {  # script -> the config group whose keys its --help shows
    "pipeline/download.py": "download", "pipeline/bands.py": "bands", "pipeline/tile.py": "tile",
    "pipeline/pairs.py": "pairs", "pipeline/features.py": "features", "src/train.py": "train",
    "src/evaluate.py": "evaluate", "src/infer.py": "infer",
}
FAST = ["features=sift", "matcher=ratio"]
STRIP = PROJECT_ROOT / "data" / "sample" / "ukraine" / "T35UNQ" / "summer.tif"


def run_script(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run an entry script in this process as `python SCRIPT ARGS` would: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(PROJECT_ROOT / script), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(PROJECT_ROOT / script), run_name="__main__")
    out, err = capsys.readouterr()
    return exit_.value.code or 0, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    lines = err.strip("\n").splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_of_every_entry_point(script, monkeypatch, capsys):
    status, out, err = run_script(script, ["--help"], monkeypatch, capsys)
    group = ENTRY_POINTS[script]
    assert status == 0 and err == ""
    assert out.startswith(f"usage: python {script} ") and "--params params.yaml" in out
    assert "config groups" in out and "train         *default, long, smoke" in out
    assert f"keys of {group} (conf/{group}/" in out
    doc = ast.get_docstring(ast.parse((PROJECT_ROOT / script).read_text()))
    assert doc.splitlines()[0] in out


def test_help_of_infer_from_the_shell(monkeypatch, capsys):
    """The issue's row: `python src/infer.py --help` (and -h) gave a 32-line Hydra traceback."""
    done = subprocess.run([sys.executable, "src/infer.py", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "usage: python src/infer.py [IMAGE0 IMAGE1] " in done.stdout and "keys of infer" in done.stdout
    status, out, _ = run_script("src/infer.py", ["-h", "features=nonsense"], monkeypatch, capsys)
    assert status == 0 and "[IMAGE0 IMAGE1]" in out


def test_help_of_the_benchmark_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["-h"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: python -m s2match.bench [OPTIONS]") and "--pairs" in out and "keys of evaluate" in out


@pytest.mark.parametrize(("args", "fragments"), [
    (["infer.tile_sise=256"], ["infer.tile_sise=256", "did you mean registration.tile_size?"]),
    (["train=smok"], ["conf/train/smok.yaml", "did you mean train=smoke", "options of train: default, long, smoke"]),
    (["+pair=demoo"], ["conf/pair/demoo.yaml", "did you mean +pair=demo?"]),
    (["infer.coarse_size=abc"], ["no key infer.coarse_size", "did you mean registration.coarse_size?"]),
    (["registration.coarse_size=abc"], ["registration.coarse_size takes an integer (default 1024)"]),
    (["registration.refine=maybe"], ["registration.refine takes true or false"]),
    (["+pair.image0=a(1).tif"], ["+pair.image0=a(1).tif: not a valid override", "KEY='VALUE'"]),
    (["+pair.image0=a,b.tif"], ["quote it"]),
    (["pair=demo"], ["To append to your default list use +pair=demo"]),
    (["one.tif"], ["two images are needed (IMAGE0 IMAGE1), got 1"]),
    (["--params"], ["--params needs a file name"]),
    (["--params", "nowhere.yaml"], ["nowhere.yaml: parameters file not found"]),
    ([], ["no pair to match", "python src/infer.py IMAGE0 IMAGE1"]),
])
def test_configuration_errors_are_one_line_with_the_nearest_names(args, fragments, tmp_path, monkeypatch, capsys):
    status, out, err = run_script("src/infer.py", [f"infer.output_dir={tmp_path / 'run'}", *args], monkeypatch,
                                  capsys)
    assert_one_line_error(status, err, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_missing_mandatory_value_is_one_line(tmp_path, monkeypatch, capsys):
    """`download=local` needs download.folder (???): one line naming the key, no catalogue written."""
    catalogue = tmp_path / "catalogue.csv"
    status, _, err = run_script("pipeline/download.py", ["download=local", f"paths.catalogue={catalogue}"],
                                monkeypatch, capsys)
    assert_one_line_error(status, err, "download.folder: no value given", "download.folder=VALUE")
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_of_the_benchmark_is_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--pairs", "two"])
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, "--pairs: invalid int value: 'two'")


def test_debug_switch_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    monkeypatch.setattr(sys, "argv", ["src/infer.py", "train=smok"])
    with pytest.raises(ConfigError, match="did you mean train=smoke"):
        runpy.run_path(str(PROJECT_ROOT / "src/infer.py"), run_name="__main__")


def test_params_file_gives_the_demo_stage_its_pair():
    """params.yaml holds `pair` (conf/pipeline.yaml), so the DVC demo stage needs no +pair=; the scripts'
    conf/config.yaml has none, so +pair=NAME stays the plain Hydra form."""
    params = OmegaConf.load(PARAMS_FILE)
    demo = OmegaConf.load(PROJECT_ROOT / "conf" / "pair" / "demo.yaml")
    assert params.pair == demo
    cfg = load_config(["infer.output_dir=outputs/demo"], PARAMS_FILE)
    assert cfg.pair == demo and cfg.infer.output_dir == "outputs/demo"
    assert "pair" not in load_config([]) and load_config(["+pair=demo"]).pair == demo


def test_paths_are_literal_strings():
    for text in ["a b.tif", "${x}.tif", "\\${x}", "a\\\\${x}", "é東京 (1), [2].tif", "a=b.tif"]:
        assert OmegaConf.create({"p": literal(text)}).p == text


@pytest.fixture(scope="module")
def awkward_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A real 256 x 256 crop and its copy, under names a shell and Hydra both find awkward."""
    folder = tmp_path_factory.mktemp("awkward") / "scènes (été), [2016]"
    folder.mkdir()
    with rasterio.open(STRIP) as src:
        window = Window(128, 2000, 256, 256)
        profile = {**src.profile, "width": 256, "height": 256, "transform": src.window_transform(window)}
        data = src.read(window=window)
    paths = [folder / "pisa_é東京 winter, 1 [a=b] ${x}.tif", folder / "(summer) 2.tif"]
    for path in paths:
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return paths[0], paths[1]


def test_two_images_as_plain_paths(awkward_pair, tmp_path):
    """`python src/infer.py IMAGE0 IMAGE1 [overrides]` for any path: spaces, brackets, commas, '=', '${', any
    script."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "src/infer.py", *map(str, awkward_pair), *FAST,
                           f"infer.output_dir={out}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert [image["path"] for image in result["images"]] == list(map(str, awkward_pair))
    assert np.allclose(np.array(result["homography"]), np.eye(3), atol=1e-2)


def test_quoted_paths_in_the_hydra_form(awkward_pair, tmp_path, monkeypatch, capsys):
    image1 = awkward_pair[1]
    out = tmp_path / "run"
    status, _, err = run_script("src/infer.py", [f"+pair.image0='{image1}'", f"+pair.image1='{image1}'", *FAST,
                                                 f"infer.output_dir={out}"], monkeypatch, capsys)
    assert status == 0, err
    assert json.loads((out / "result.json").read_text())["images"][0]["path"] == str(image1)
