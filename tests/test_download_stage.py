"""The download stage with a remote source, end to end: fake CDSE serving real rasters -> catalogue -> bands;
and what a user sees when the network, the host or the account fails (the stage script in a subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile

from fake_cdse import PASSWORD, USERNAME, FakeCopernicus
from s2match.config import PROJECT_ROOT, compose_config
from s2match.data import composites as bands
from s2match.data.catalogue import build_catalogue, write_catalogue
from test_cdse import GRANULE, credentials, fake, l2a_name  # noqa: F401  (fixtures)

WINDOW = ((1000, 1256), (600, 856))
STAMPS = {"winter": ("b0000000-0000-0000-0000-000000000001", "20230115T090321", 10.0),
          "summer": ("b0000000-0000-0000-0000-000000000002", "20230704T090321", 5.0)}


def raster_bytes(array: np.ndarray, src, scale: int, tmp_path) -> bytes:
    """A lossless georeferenced JP2 of `array`, as CDSE serves band files (the JP2 driver only copies)."""
    transform = rasterio.windows.transform(WINDOW, src.transform) @ rasterio.Affine.scale(scale)
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                         dtype="uint16", crs=src.crs, transform=transform) as dst:
            dst.write(array, 1)
        with memory.open() as tif:
            rasterio.shutil.copy(tif, tmp_path / "band.jp2", driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE=True)
    return (tmp_path / "band.jp2").read_bytes()


def test_cdse_source_feeds_the_catalogue_and_bands(sample_dir, credentials, tmp_path, monkeypatch):  # noqa: F811
    server = FakeCopernicus().start()
    try:
        with rasterio.open(sample_dir / "jp2/T33UUU/20160608.jp2") as src:
            dn = src.read(1, window=WINDOW)
            for uuid, stamp, cloud in STAMPS.values():
                files = {
                    "MTD_MSIL2A.xml": b"<Level-2A_User_Product><PROCESSING_BASELINE>05.09</PROCESSING_BASELINE>"
                                      b"<BOA_QUANTIFICATION_VALUE>10000</BOA_QUANTIFICATION_VALUE>"
                                      b'<BOA_ADD_OFFSET band_id="7">-1000</BOA_ADD_OFFSET></Level-2A_User_Product>',
                    f"GRANULE/{GRANULE}/IMG_DATA/R10m/T36UYA_{stamp}_B08_10m.jp2": raster_bytes(np.where(dn == 0, 0, dn + 1000), src, 1, tmp_path),
                    f"GRANULE/{GRANULE}/IMG_DATA/R20m/T36UYA_{stamp}_SCL_20m.jp2": raster_bytes(dn[::2, ::2] * 0 + 4, src, 2, tmp_path),
                }
                start = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T09:03:21.024Z"
                server.add_product(uuid, l2a_name(stamp, 7, "0509"), start, cloud, files)
        cfg = compose_config(["download=cdse", f"download.dest={tmp_path / 'raw'}", "download.bands=[B08]",
                              "download.seasons.winter=[2023-01-01,2023-02-28]",
                              "download.seasons.summer=[2023-06-01,2023-08-31]"])
        cfg.download.api.odata_url = cfg.download.api.download_url = f"{server.url}/odata/v1"
        cfg.download.api.token_url = f"{server.url}/auth/token"
        cfg.download.api.netrc_machine, cfg.download.api.auth_domains = "127.0.0.1", []
        cfg.download.backoff_s = 0.001
        catalogue = write_catalogue(build_catalogue(cfg.download, tmp_path), tmp_path / "catalogue.csv")
    finally:
        server.stop()
    assert list(catalogue.status) == ["ok", "ok"], catalogue.reason.tolist()
    assert list(catalogue.season) == ["winter", "summer"] and set(catalogue.aoi) == {"T36UYA"}
    assert set(catalogue.source) == {"cdse"} and list(catalogue.bands) == ["B08", "B08"]  # SCL is a mask, not a band
    scenes = bands.write_bands(cfg.bands, pd.read_csv(tmp_path / "catalogue.csv", dtype={"date": str}),
                             tmp_path / "bands", tmp_path)
    with rasterio.open(scenes.image[0]) as out:
        # DN carry the +1000 offset of baseline 05.09 (no data stays 0); BOA_ADD_OFFSET from the metadata removes it.
        expected = np.where(dn == 0, np.nan, dn.astype(np.float32) / 10000)
        np.testing.assert_allclose(out.read(1), expected, rtol=1e-5)


def run_download(tmp_path, base_url: str, username: str | None, password: str | None):
    """`pipeline/download.py download=cdse` against `base_url`, as a user runs it; credentials from the env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSE_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(PROJECT_ROOT / "src"))
    env.update({"CDSE_USERNAME": username, "CDSE_PASSWORD": password} if username else {})
    overrides = [
        "download=cdse", f"download.api.odata_url={base_url}/odata/v1",
        f"download.api.download_url={base_url}/odata/v1", f"download.api.token_url={base_url}/auth/token",
        "download.api.netrc_machine=127.0.0.1", "download.api.auth_domains=[]",
        f"download.dest={tmp_path / 'raw'}", f"paths.catalogue={tmp_path / 'catalogue.csv'}",
    ]
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "pipeline" / "download.py"), *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as probe:  # bound, then released: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", ["unresolvable host", "closed port", "wrong password", "no credentials"])
def test_network_and_account_failures_are_one_line(case, fake, tmp_path):  # noqa: F811
    base, expected = {
        "unresolvable host": ("http://catalogue.s2match.invalid",
                              "GET catalogue.s2match.invalid: the host name does not resolve; check the network"),
        "closed port": (f"http://127.0.0.1:{closed_port()}",
                        ": cannot connect (connection refused); check the network"),
        "wrong password": (fake.url, "refused the CDSE login (HTTP 401, invalid_grant): check CDSE_USERNAME"),
        "no credentials": (fake.url, "CDSE credentials missing: set CDSE_USERNAME and CDSE_PASSWORD"),
    }[case]
    password = {"wrong password": "wrong-" + PASSWORD, "no credentials": None}.get(case, PASSWORD)
    result = run_download(tmp_path, base, USERNAME if password else None, password)
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in lines if not line.startswith("INFO ")] == lines[-1:], "retries or extra lines"
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
    assert USERNAME not in result.stdout + result.stderr and PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "catalogue.csv").exists() and not (tmp_path / "raw").exists()
    if case == "wrong password":
        assert fake.grants == ["password"], "a refused login is not retried"
    if case == "no credentials":
        assert fake.requests == [], "nothing is searched before the credentials are known"
