"""Property-based tests (hypothesis): random bytes, TIFF-looking files and random small rasters fed to the readers
and to the inference entry point end in success or a one-line error naming the file, never a traceback or a hang.

Examples are bounded and derandomised (the same ones on every run), each under a deadline.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import warnings
from contextlib import redirect_stderr
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from omegaconf import DictConfig
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window

from s2match import cli
from s2match.config import PROJECT_ROOT, compose_config
from s2match.data.catalogue import local_rows
from s2match.inference.run import run_inference
from s2match.inference.scenes import open_image

FAST = ["features=sift", "matcher=ratio"]
STRIP = PROJECT_ROOT / "data" / "sample" / "ukraine" / "T35UNQ" / "summer.tif"  # 512 x 5120, EPSG:32635
READERS = settings(max_examples=60, deadline=timedelta(seconds=5), derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
ENTRY = settings(max_examples=20, deadline=timedelta(seconds=20), derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = [".tif", ".jp2", ".png", ".jpg"]
# Named as ESA names a band file, so that the catalogue scanner takes it for a Sentinel-2 band.
BAND_FILE = "T33UUU_20160608T101032_B08"


def tiff_bytes(data: np.ndarray, georeferenced: bool, transform: Affine = from_origin(500000, 5500000, 10, 10)
               ) -> bytes:
    profile = dict(driver="GTiff", dtype=data.dtype, count=data.shape[0], height=data.shape[1], width=data.shape[2])
    if georeferenced:
        profile.update(crs="EPSG:32635", transform=transform)
    with warnings.catch_warnings(), rasterio.MemoryFile() as memory:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memory.open(**profile) as dst:
            dst.write(data)
        return memory.read()


VALID_TIFF = tiff_bytes(np.arange(1, 16 * 16 + 1, dtype=np.uint16).reshape(1, 16, 16), georeferenced=True)


@st.composite
def tiff_looking(draw) -> bytes:
    """A TIFF header (either byte order) before random bytes, or a real small GeoTIFF with bytes changed or cut."""
    if draw(st.booleans()):
        header = draw(st.sampled_from([b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"]))
        return header + draw(st.binary(max_size=512))
    data = bytearray(VALID_TIFF)
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                         max_size=8)):
        data[position] = value
    return bytes(data[: draw(st.integers(8, len(data)))])


file_contents = st.one_of(st.binary(max_size=1024), tiff_looking())


@st.composite
def small_raster(draw) -> bytes:
    """A GeoTIFF of 1-4 bands, 1-48 px a side, uint8 / uint16 / float32 (random, constant, zero or NaN-riddled), or a
    crop of a real scene of 8-96 px, georeferenced or not."""
    kind = draw(st.sampled_from(["real", "random", "real", "constant", "real", "zeros", "nan"]))
    if kind == "real":
        width, height = draw(st.integers(8, 96)), draw(st.integers(8, 96))
        window = Window(draw(st.integers(0, 512 - width)), draw(st.integers(0, 5120 - height)), width, height)
        with rasterio.open(STRIP) as src:
            return tiff_bytes(src.read(window=window), draw(st.booleans()), src.window_transform(window))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    if kind == "random":
        data = draw(arrays(dtype, shape, elements=st.integers(0, 255) if dtype != np.float32 else
                           st.floats(0, 1, width=32)))
    elif kind == "nan" and dtype == np.float32:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        data = rng.random(shape, dtype=np.float32)
        data[rng.random(shape) < draw(st.floats(0.5, 1.0))] = np.nan
    else:
        data = np.full(shape, 0 if kind == "zeros" else draw(st.integers(1, 200)), dtype)
    return tiff_bytes(data, draw(st.booleans()))


def assert_user_error_naming(err: BaseException, path: Path) -> None:
    """A one-line error of the kinds the command line reports, naming the file."""
    assert isinstance(err, cli.USER_ERRORS), f"{type(err).__name__}: {err}"
    assert path.name in cli.one_line(err), cli.one_line(err)


@READERS
@given(contents=file_contents, suffix=st.sampled_from(SUFFIXES))
def test_readers_take_any_bytes(contents, suffix):
    """Inference's reader and the catalogue's scanner either read a file or say, in one line, what is wrong."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{BAND_FILE}{suffix}"
        path.write_bytes(contents)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                image = open_image(path, "nir", {"nir": ["B08"]}, "gray", None)
                image.overview((0, 0, *image.size), 32)
        except BaseException as err:  # noqa: BLE001 - the property is about which errors come out
            assert_user_error_naming(err, path)
        for row in local_rows(Path(folder), Path(folder)):  # never raises: unreadable files are recorded
            assert row["status"] in ("ok", "skipped") and (row["status"] == "ok" or row["reason"])


@pytest.fixture(scope="module")
def composed_once():
    """conf/ composed once with the fast matcher: the command line is what is exercised here (its composition is
    tested in test_cli.py), and composing for each example would cost most of the time."""
    fast = compose_config(FAST)

    def load_config(overrides: list[str], params_file) -> DictConfig:
        cfg = copy.deepcopy(fast)
        cfg.merge_with_dotlist(overrides)
        return cfg

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "load_config", load_config)
        yield


@ENTRY
@given(image0=small_raster(), image1=st.one_of(st.none(), small_raster(), file_contents))
def test_inference_entry_point_ends_cleanly(image0, image1, composed_once):
    """`python src/infer.py IMAGE0 IMAGE1` (image1 None: image0 again): exit 0 or 2 with a result, or 1 with one
    line on stderr."""
    image1 = image0 if image1 is None else image1
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / "image0.tif", Path(folder) / "image1.tif"]
        for path, contents in zip(paths, (image0, image1)):
            path.write_bytes(contents)
        out = Path(folder) / "run"
        stderr = io.StringIO()
        with warnings.catch_warnings(), redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
            warnings.simplefilter("ignore")
            cli.run(run_inference, images=True, argv=[*map(str, paths), f"infer.output_dir={out}"])
        lines = stderr.getvalue().splitlines()
        status = exit_.value.code or 0
        if status == 1:
            assert len(lines) == 1 and lines[0].startswith("error: "), lines
            assert not out.exists()
        else:
            assert status in (0, 2) and json.loads((out / "result.json").read_text())["success"] == (status == 0)
