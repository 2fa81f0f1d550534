"""Every bad input and fault of issue 12 gets one clear line, and leaves nothing partial or foreign behind: the
dataset stages on awkward folders of products, and src/infer.py on unwritable, foreign or interrupted outputs,
images without data and elongated images. Scripts run as from the shell (in this process, or as a subprocess
where signals are the point)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from s2match.config import PROJECT_ROOT, compose_config
from s2match.data.catalogue import local_rows, write_catalogue
from s2match.data.pairs import read_pairs
from s2match.data.tables import CATALOGUE, SCENES, make_table
from s2match.inference import run as inference_run
from test_cli import FAST, assert_one_line_error, run_script

JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160608.jp2"
STRIP = PROJECT_ROOT / "data" / "sample" / "ukraine" / "T35UNQ" / "summer.tif"
OVERVIEW = PROJECT_ROOT / "data" / "sample" / "t36uya_overview" / "20190830.tif"


def write_crop(source: Path, window: Window, path: Path, **tags) -> Path:
    """A georeferenced crop of a sample raster, as a GeoTIFF (tags: e.g. PROCESSING_BASELINE)."""
    with rasterio.open(source) as src:
        data = src.read(window=window)
        profile = dict(driver="GTiff", dtype=data.dtype, count=data.shape[0], width=data.shape[2],
                       height=data.shape[1], crs=src.crs, transform=src.window_transform(window))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(**tags)
    return path


def write_array(path: Path, data: np.ndarray) -> Path:
    """A GeoTIFF without georeference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", dtype=data.dtype, count=data.shape[0], width=data.shape[2],
                           height=data.shape[1]) as dst:
            dst.write(data)
    return path


def stage_paths(tmp_path: Path) -> list[str]:
    out = tmp_path / "outputs"
    return [f"paths.catalogue={out / 'catalogue.csv'}", f"paths.bands={out / 'bands'}",
            f"paths.tiles={out / 'tiles'}", f"paths.pairs={out / 'pairs'}"]


# --- the dataset stages ------------------------------------------------------------------------------------------

def test_scene_off_its_aoi_keeps_every_table_typed(tmp_path, monkeypatch, capsys):
    """Three dates of T33UUU, one far from the others: `tile` records it as skipped, and `pairs` still reads the
    tables (the skipped row's empty cells used to turn the size column into '512.0')."""
    folder = tmp_path / "products"
    for day, (col, row) in {"20160529": (1400, 100), "20160608": (1420, 110), "20160618": (2000, 2800)}.items():
        write_crop(JP2, Window(col, row, 256, 256), folder / f"T33UUU_{day}T101032_B08.tif")
    args = ["download=local", f"download.folder={folder}", "tile.size=128", "tile.min_size=64",
            "pairs.split.val=[]", "pairs.split.test=[]", *stage_paths(tmp_path)]
    for script in ("pipeline/download.py", "pipeline/bands.py", "pipeline/tile.py", "pipeline/pairs.py"):
        status, out, err = run_script(script, args, monkeypatch, capsys)
        assert status == 0, err
    tiles = pd.read_csv(tmp_path / "outputs/tiles/tiles.csv", dtype=str, keep_default_na=False)
    off = tiles[tiles.scene_id == "T33UUU-20160618"]
    assert len(off) == 1 and off.kept.iloc[0] == "False" and off.reason.iloc[0].startswith("no overlap with AOI")
    assert all("." not in size for size in tiles.width)
    pairs_file = tmp_path / "outputs/pairs/pairs.csv"
    assert all(size == "128" for size in pd.read_csv(pairs_file, dtype=str).width)
    table = read_pairs(pairs_file)
    assert len(table) > 0 and str(table.width.dtype) == "Int64"


def test_empty_folder_stops_the_download_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    args = ["download=local", f"download.folder={tmp_path / 'empty'}", *stage_paths(tmp_path)]
    status, _, err = run_script("pipeline/download.py", args, monkeypatch, capsys)
    assert_one_line_error(status, err, "catalogue.csv: no scene found", "download.folder")
    assert not (tmp_path / "outputs").exists()
    status, _, err = run_script("pipeline/bands.py", args, monkeypatch, capsys)
    assert_one_line_error(status, err, "catalogue.csv: table not found (run the download stage)")


def test_later_stages_on_empty_or_broken_tables_are_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "outputs"
    (out / "bands").mkdir(parents=True)
    make_table([], CATALOGUE).to_csv(out / "catalogue.csv", index=False)
    status, _, err = run_script("pipeline/bands.py", stage_paths(tmp_path), monkeypatch, capsys)
    assert_one_line_error(status, err, "catalogue.csv: no scene (the table is empty)")
    make_table([{"scene_id": "a", "status": "skipped", "reason": "unreadable image"}], SCENES).to_csv(
        out / "bands" / "scenes.csv", index=False)
    status, _, err = run_script("pipeline/tile.py", stage_paths(tmp_path), monkeypatch, capsys)
    assert_one_line_error(status, err, "scenes.csv: no usable scene of 1 (1 x unreadable image)")
    (out / "bands" / "scenes.csv").write_text("")
    status, _, err = run_script("pipeline/tile.py", stage_paths(tmp_path), monkeypatch, capsys)
    assert_one_line_error(status, err, "scenes.csv: not a bands table")
    assert sorted(p.name for p in out.rglob("*")) == ["bands", "catalogue.csv", "scenes.csv"]


def test_two_products_of_one_acquisition_keep_the_newer_baseline(tmp_path, caplog):
    folder = tmp_path / "products"
    names = {"N0204": "S2A_MSIL1C_20160608T101032_N0204_R022_T33UUU_20160608T101031.SAFE",
             "N0500": "S2A_MSIL1C_20160608T101032_N0500_R022_T33UUU_20230412T130245.SAFE"}
    for name in names.values():
        granule = folder / name / "GRANULE" / "L1C_T33UUU_A005011_20160608T101031" / "IMG_DATA"
        write_crop(JP2, Window(1500, 300, 64, 64), granule / "T33UUU_20160608T101032_B08.tif")
    with caplog.at_level(logging.WARNING):
        catalogue = write_catalogue(local_rows(folder, tmp_path), tmp_path / "catalogue.csv").set_index("scene_id")
    assert catalogue.loc["T33UUU-20160608", "status"] == "ok"
    assert catalogue.loc["T33UUU-20160608", "path"].endswith(names["N0500"])
    old = catalogue.loc[names["N0204"].removesuffix(".SAFE")]
    assert old.status == "skipped" and names["N0500"] in old.reason and "N0204 is an older" in old.reason
    assert f"skipped {names['N0204'].removesuffix('.SAFE')}" in caplog.text


def test_tiny_scenes_are_dropped_with_a_reason(tmp_path, monkeypatch, capsys, caplog):
    """Georeferenced 16 x 16 scenes: `tile` records why each is dropped and logs it; `pairs` then stops in one
    line with that reason."""
    folder = tmp_path / "products"
    for day in ("20160529", "20160608"):
        write_crop(JP2, Window(1500, 300, 16, 16), folder / f"T33UUU_{day}T101032_B08.tif")
    args = ["download=local", f"download.folder={folder}", *stage_paths(tmp_path)]
    for script in ("pipeline/download.py", "pipeline/bands.py"):
        assert run_script(script, args, monkeypatch, capsys)[0] == 0
    with caplog.at_level(logging.WARNING):
        assert run_script("pipeline/tile.py", args, monkeypatch, capsys)[0] == 0
    tiles = pd.read_csv(tmp_path / "outputs/tiles/tiles.csv", dtype=str, keep_default_na=False)
    assert len(tiles) == 2 and set(tiles.kept) == {"False"}
    assert set(tiles.reason) == {"AOI grid 16 x 16 px is smaller than tile.min_size=256 px"}
    assert "skipped AOI T33UUU (2 scenes): AOI grid 16 x 16 px" in caplog.text
    status, _, err = run_script("pipeline/pairs.py", args, monkeypatch, capsys)
    assert_one_line_error(status, err, "tiles.csv: no usable tile of 2 (2 x AOI grid 16 x 16 px is smaller")
    assert not (tmp_path / "outputs/pairs").exists()


# --- inference -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> dict[str, Path]:
    """Real 256 x 256 crops of one summer strip under the stems of the issue's example: paris/ holds both dates,
    bercy/ and valencia/ one each."""
    root = tmp_path_factory.mktemp("crops")
    files = {"paris0": root / "paris/20161130.tif", "paris1": root / "paris/20171107.tif",
             "bercy0": root / "bercy/20161130.tif", "valencia1": root / "valencia/20171107.tif"}
    for i, path in enumerate(files.values()):
        write_crop(STRIP, Window(128, 1000 + 300 * (i % 2), 256, 256), path)
    return files


@pytest.fixture
def no_matching(monkeypatch):
    """Registration must not start: the checks come first."""
    def fail(*args, **kwargs):
        raise AssertionError("matching started before the checks")
    monkeypatch.setattr(inference_run, "register", fail)


def infer(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    status, _, err = run_script("src/infer.py", [*args, *FAST], monkeypatch, capsys)
    return status, err


def test_output_below_a_regular_file_fails_before_matching(crops, tmp_path, no_matching, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    status, err = infer([str(crops["paris0"]), str(crops["paris1"]), f"infer.output_dir={tmp_path / 'a_file/run'}"],
                        monkeypatch, capsys)
    assert_one_line_error(status, err, f"{tmp_path / 'a_file'} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unwritable_output_fails_before_matching(crops, no_matching, monkeypatch, capsys):
    """A folder the process may not write (sysfs here: read-only for everyone, root included)."""
    target = Path("/sys/s2match-run")
    try:
        Path(tempfile.mkdtemp(dir="/sys")).rmdir()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    status, err = infer([str(crops["paris0"]), str(crops["paris1"]), f"infer.output_dir={target}"], monkeypatch,
                        capsys)
    assert_one_line_error(status, err, "cannot write in /sys", "choose another infer.output_dir")


def test_pairs_sharing_stems_get_their_own_folders(crops):
    pair = compose_config(["+pair.image0=x", "+pair.image1=y"]).pair
    first = inference_run.default_folder(pair, [crops["paris0"], crops["paris1"]])
    second = inference_run.default_folder(pair, [crops["bercy0"], crops["valencia1"]])
    assert first.parent == second.parent == PROJECT_ROOT / "outputs" / "infer"
    assert first.name.startswith("20161130__20171107-") and second.name.startswith("20161130__20171107-")
    assert first != second


def test_a_run_never_replaces_another_pairs_result(crops, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    status, err = infer([str(crops["paris0"]), str(crops["paris1"]), f"infer.output_dir={out}"], monkeypatch, capsys)
    assert status in (0, 2), err
    result = (out / "result.json").read_bytes()
    status, err = infer([str(crops["bercy0"]), str(crops["valencia1"]), f"infer.output_dir={out}"], monkeypatch,
                        capsys)
    assert_one_line_error(status, err, "the folder holds the result of another pair", str(crops["paris0"]))
    assert (out / "result.json").read_bytes() == result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    status, err = infer([str(crops["paris0"]), str(crops["paris1"]), f"infer.output_dir={out}"], monkeypatch, capsys)
    assert status in (0, 2), err  # the same pair again replaces its own result
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    status, err = infer([str(crops["paris0"]), str(crops["paris1"]), f"infer.output_dir={notes}"], monkeypatch, capsys)
    assert_one_line_error(status, err, "the folder holds other files")
    assert [p.name for p in notes.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_leaves_nothing_behind(tmp_path, signum, status):
    """The signal arrives while the outputs are written (co-registration block by block): the temporary folder
    goes, nothing else is left."""
    image = write_crop(OVERVIEW, Window(256, 256, 512, 512), tmp_path / "scene.tif")
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "src/infer.py", str(image), str(image), *FAST, f"infer.output_dir={out / 'run'}",
         "registration.second_pass=false", "registration.refine=false", "infer.write_coregistered=true",
         "infer.coregister_block=8"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob(".run.tmp*/matches.csv")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, err
    assert err.strip().splitlines()[-1] == f"interrupted ({signal.Signals(signum).name}): stopped, temporary files removed"
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_elongated_image_matches_itself(tmp_path, monkeypatch, capsys):
    """A 64 x 4000 strip against itself: its overview keeps a usable width, and tiles as narrow as the image count."""
    image = write_crop(STRIP, Window(200, 500, 64, 4000), tmp_path / "strip.tif")
    out = tmp_path / "run"
    status, err = infer([str(image), str(image), f"infer.output_dir={out}"], monkeypatch, capsys)
    assert status == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["tiles"]["candidates"] >= 7 and np.allclose(result["homography"], np.eye(3), atol=1e-3)


@pytest.mark.parametrize(("fill", "message"), [(0, "image1 has no valid pixels"), (np.nan, "image1 has no valid pixels"),
                                               (7, "image1 is uniform")])
def test_images_without_data_say_so(crops, tmp_path, fill, message, no_matching, monkeypatch, capsys):
    dtype = np.float32 if fill is np.nan else np.uint16
    image1 = write_array(tmp_path / "blank.tif", np.full((1, 128, 128), fill, dtype))
    status, err = infer([str(crops["paris0"]), str(image1), f"infer.output_dir={tmp_path / 'run'}"], monkeypatch,
                        capsys)
    assert_one_line_error(status, err, f"{image1}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.tif"]
