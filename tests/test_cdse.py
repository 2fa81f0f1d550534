"""CDSE client against the local fake server: search, SAFE subsets, auth, retries, resume, integrity."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

import pytest
import urllib3
from omegaconf import OmegaConf

from fake_cdse import PASSWORD, USERNAME, FakeCopernicus
from s2match.config import compose_config
from s2match.data.sources import choose_scenes
from s2match.data.sources import cdse
from s2match.data.sources.aoi import parse_aoi
from s2match.data.sources.http import (
    Checksum, FileJob, HttpError, IntegrityError, RetryPolicy, carries_auth, download, download_all,
)

GRANULE = "L2A_T36UYA_A018000_20190115T090321"


def _blob(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, distinct per file)."""
    out, block = bytearray(), hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def l2a_files(stamp: str, size: int = 40_000) -> dict[str, bytes]:
    g = f"GRANULE/{GRANULE}"
    names = {
        "MTD_MSIL2A.xml": 3_000,
        "manifest.safe": 2_000,
        f"{g}/MTD_TL.xml": 2_000,
        f"{g}/QI_DATA/MSK_CLDPRB_20m.jp2": 5_000,
        f"{g}/IMG_DATA/R10m/T36UYA_{stamp}_B04_10m.jp2": size,
        f"{g}/IMG_DATA/R10m/T36UYA_{stamp}_B08_10m.jp2": size,
        f"{g}/IMG_DATA/R10m/T36UYA_{stamp}_TCI_10m.jp2": size,
        f"{g}/IMG_DATA/R20m/T36UYA_{stamp}_B04_20m.jp2": size // 4,
        f"{g}/IMG_DATA/R20m/T36UYA_{stamp}_B8A_20m.jp2": size // 4,
        f"{g}/IMG_DATA/R20m/T36UYA_{stamp}_SCL_20m.jp2": size // 4,
        f"{g}/IMG_DATA/R60m/T36UYA_{stamp}_B8A_60m.jp2": size // 36,
    }
    return {path: _blob(stamp + path, n) for path, n in names.items()}


def l2a_name(stamp: str, orbit: int, baseline: str = "0211") -> str:
    return f"S2A_MSIL2A_{stamp}_N{baseline}_R{orbit:03d}_T36UYA_{stamp[:8]}T120000.SAFE"


# season -> (uuid, stamp, orbit, cloud); R007 is the orbit present in both seasons with lowest total cloud
PRODUCTS = [
    ("a0000000-0000-0000-0000-000000000001", "20190105T090321", 7, 12.0),
    ("a0000000-0000-0000-0000-000000000002", "20190115T090321", 7, 5.0),
    ("a0000000-0000-0000-0000-000000000003", "20190118T085311", 107, 2.0),  # clearer, other orbit
    ("a0000000-0000-0000-0000-000000000004", "20190201T090321", 7, 45.0),  # over max_cloud
    ("a0000000-0000-0000-0000-000000000005", "20190310T090321", 7, 1.0),  # outside both windows
    ("a0000000-0000-0000-0000-000000000006", "20190704T090321", 7, 3.0),
    ("a0000000-0000-0000-0000-000000000007", "20190712T085311", 107, 20.0),
]
WINTER_ID, SUMMER_ID = PRODUCTS[1][0], PRODUCTS[5][0]


@pytest.fixture
def fake():
    server = FakeCopernicus().start()
    for uuid, stamp, orbit, cloud in PRODUCTS:
        start = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}.024Z"
        server.add_product(uuid, l2a_name(stamp, orbit), start, cloud, l2a_files(stamp))
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no real ~/.netrc leaks in
    monkeypatch.setenv("CDSE_USERNAME", USERNAME)
    monkeypatch.setenv("CDSE_PASSWORD", PASSWORD)


def make_cfg(server: FakeCopernicus | str, **overrides):
    """The cdse config pointed at `server` (the fake, or a base URL that nothing answers)."""
    base = server if isinstance(server, str) else server.url
    cfg = compose_config(["download=cdse"]).download
    cfg.api.odata_url = cfg.api.download_url = f"{base}/odata/v1"
    cfg.api.token_url = f"{base}/auth/token"
    cfg.api.netrc_machine = "127.0.0.1"
    cfg.api.auth_domains = []
    cfg.merge_with({"retries": 4, "backoff_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 5, "page_size": 2})
    cfg.merge_with(overrides)
    return cfg


def value_requests(fake: FakeCopernicus) -> list[str]:
    return [path for method, path in fake.requests if path.startswith("/zipper/")]


def band_path(dest: Path, product: int, folder: str, band: str) -> Path:
    uuid, stamp, orbit, _ = PRODUCTS[product]
    return dest / l2a_name(stamp, orbit) / "GRANULE" / GRANULE / "IMG_DATA" / folder / f"T36UYA_{stamp}_{band}.jp2"


def test_search_follows_paging_and_keeps_one_orbit(fake):
    cfg = make_cfg(fake)
    policy = RetryPolicy.from_cfg(cfg)
    candidates = cdse.search(cfg, parse_aoi(cfg.aoi), policy.session(), policy)
    assert {s.id for s in candidates["winter"]} == {p[0] for p in PRODUCTS[:3]}
    assert {s.id for s in candidates["summer"]} == {PRODUCTS[5][0], PRODUCTS[6][0]}
    assert sum("%24skip" in path for _, path in fake.requests) >= 1, "second page never requested"
    winter = next(s for s in candidates["winter"] if s.id == WINTER_ID)
    assert (winter.tile, winter.relative_orbit, winter.processing_baseline) == ("36UYA", 7, 2.11)
    chosen = choose_scenes(candidates)
    # The clearest winter scene is on orbit 107, but only orbit 7 is clear in both seasons.
    assert (chosen["winter"].id, chosen["summer"].id) == (WINTER_ID, SUMMER_ID)


def test_fetch_writes_only_the_needed_files_in_safe_layout(fake, credentials, tmp_path):
    dest = tmp_path / "raw"
    folders = cdse.fetch(make_cfg(fake), dest)
    assert [f.name for f in folders] == [l2a_name(PRODUCTS[1][1], 7), l2a_name(PRODUCTS[5][1], 7)]
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert len(written) == 10  # per product: MTD + B04 10 m + B08 10 m + B8A 20 m + SCL 20 m
    for folder, band in [("R10m", "B04_10m"), ("R10m", "B08_10m"), ("R20m", "B8A_20m"), ("R20m", "SCL_20m")]:
        path = band_path(dest, 1, folder, band)
        assert path.read_bytes() == fake.trees[WINTER_ID][f"{path.relative_to(dest).as_posix()}"]
    assert (folders[0] / "MTD_MSIL2A.xml").read_bytes() == fake.trees[WINTER_ID][f"{folders[0].name}/MTD_MSIL2A.xml"]
    assert not any(p.name.endswith(".part") for p in dest.rglob("*"))
    assert not (folders[0] / "manifest.safe").exists()


def test_rerun_skips_complete_files(fake, credentials, tmp_path):
    cfg = make_cfg(fake)
    cdse.fetch(cfg, tmp_path)
    first = len(value_requests(fake))
    assert first == 10
    cdse.fetch(cfg, tmp_path)
    assert len(value_requests(fake)) == first, "a complete file was downloaded again"


def test_token_expiring_mid_download_is_refreshed(fake, credentials, tmp_path):
    fake.token_max_uses = 10  # listings + downloads need ~34 uses: several 401s along the way
    folders = cdse.fetch(make_cfg(fake), tmp_path)
    assert "refresh_token" in fake.grants
    assert fake.grants.count("password") == 1, "a refresh token was at hand; no new login was needed"
    assert band_path(tmp_path, 5, "R20m", "SCL_20m").exists() and len(folders) == 2


def test_refused_refresh_token_falls_back_to_login(fake, credentials, tmp_path):
    fake.token_max_uses = 10
    original = fake.issue_token

    def refuse_refresh(form):
        if form.get("grant_type") == "refresh_token":
            fake.grants.append("refresh_token")
            return 400, {"error": "invalid_grant", "error_description": "Token is not active"}
        return original(form)

    fake.issue_token = refuse_refresh
    cdse.fetch(make_cfg(fake), tmp_path)
    assert fake.grants.count("password") > 1


def test_429_and_503_are_retried(fake, credentials, tmp_path):
    b04 = f"T36UYA_{PRODUCTS[1][1]}_B04_10m.jp2"
    fake.faults[b04].extend(["429", "503", "429"])
    cdse.fetch(make_cfg(fake), tmp_path)
    assert band_path(tmp_path, 1, "R10m", "B04_10m").stat().st_size == 40_000
    assert sum(b04 in p for p in value_requests(fake)) == 4


def test_dropped_and_stalled_requests_are_retried(fake, credentials, tmp_path):
    b04 = f"T36UYA_{PRODUCTS[1][1]}_B04_10m.jp2"
    fake.faults[b04].extend(["drop", "stall", "drop"])
    fake.stall_s = 1.0
    cdse.fetch(make_cfg(fake, timeout_s=0.3), tmp_path)
    path = band_path(tmp_path, 1, "R10m", "B04_10m")
    assert path.read_bytes() == fake.trees[WINTER_ID][path.relative_to(tmp_path).as_posix()]
    assert sum(b04 in p for p in value_requests(fake)) == 4


def closed_port() -> int:
    """A localhost port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("base, problem", [
    ("http://catalogue.s2match.invalid", "the host name does not resolve; check the network connection"),
    ("closed port", "cannot connect (connection refused); check the network connection"),
    ("no answer", "no connection within 15 s; check the network connection, a firewall"),
])
def test_unreachable_host_fails_at_the_first_try(base, problem, credentials, monkeypatch, tmp_path):
    connects = []
    real_connect = urllib3.util.connection.create_connection

    def counting_connect(address, *args, **kwargs):
        connects.append(address)
        if base == "no answer":  # what a host that drops packets looks like once the connect timeout is over
            raise socket.timeout("timed out")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting_connect)
    url = base if base.startswith("http") else f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(HttpError) as error:
        cdse.fetch(make_cfg(url, retries=6, backoff_s=30.0, connect_timeout_s=15), tmp_path)
    assert len(connects) == 1, "a connection that could not be opened was retried"
    assert str(error.value).startswith(f"GET {url.removeprefix('http://')}: {problem}")
    assert "\n" not in str(error.value)


def test_truncated_download_resumes_with_range(fake, credentials, tmp_path):
    b08 = f"T36UYA_{PRODUCTS[1][1]}_B08_10m.jp2"
    fake.faults[b08].append("truncate")
    cdse.fetch(make_cfg(fake), tmp_path)
    path = band_path(tmp_path, 1, "R10m", "B08_10m")
    assert path.read_bytes() == fake.trees[WINTER_ID][path.relative_to(tmp_path).as_posix()]
    assert f"{b08} bytes=20000-" in fake.range_requests, fake.range_requests
    assert fake.bytes_served[b08] == 40_000, "the resumed request sent more than the missing half"


def test_size_mismatch_is_rejected_and_removed(fake, credentials, tmp_path):
    b8a = f"T36UYA_{PRODUCTS[1][1]}_B8A_20m.jp2"
    fake.listed_size[b8a] = 10_007  # the catalogue announces 7 bytes more than the server sends
    with pytest.raises(HttpError, match="size 10000 bytes, the catalogue announced 10007"):
        cdse.fetch(make_cfg(fake), tmp_path)
    path = band_path(tmp_path, 1, "R20m", "B8A_20m")
    assert not path.exists() and not path.with_name(path.name + ".part").exists()
    assert band_path(tmp_path, 1, "R10m", "B04_10m").exists(), "the other files still completed"


def test_checksum_mismatch_is_rejected_and_file_removed(fake, tmp_path):
    data = _blob("checksum", 5_000)
    fake.static["granule_metadata.xml"] = data
    policy = RetryPolicy(retries=2, backoff_s=0.001, backoff_max_s=0.01, connect_timeout_s=5, timeout_s=5)
    wrong = FileJob(f"{fake.url}/files/granule_metadata.xml", tmp_path / "bad.xml",
                    checksum=Checksum("md5", hashlib.md5(b"other").hexdigest()))
    with pytest.raises(IntegrityError, match="md5 checksum differs"):
        download(policy.session(), wrong, policy)
    assert list(tmp_path.iterdir()) == []
    multihash = "1220" + hashlib.sha256(data).hexdigest()  # STAC file:checksum, sha2-256
    right = FileJob(wrong.url, tmp_path / "good.xml", size=len(data), checksum=Checksum.from_multihash(multihash))
    assert download(policy.session(), right, policy).read_bytes() == data


def test_missing_credentials_name_what_to_set(fake, monkeypatch, tmp_path):
    monkeypatch.delenv("CDSE_USERNAME", raising=False)
    monkeypatch.delenv("CDSE_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(cdse.CdseAuthError) as error:
        cdse.fetch(make_cfg(fake), tmp_path / "raw")
    message = str(error.value)
    assert "CDSE_USERNAME" in message and "CDSE_PASSWORD" in message and "machine 127.0.0.1" in message
    assert fake.requests == [], "nothing should be searched before credentials are known"


def test_netrc_supplies_credentials(fake, monkeypatch, tmp_path):
    monkeypatch.delenv("CDSE_USERNAME", raising=False)
    monkeypatch.delenv("CDSE_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login {USERNAME} password {PASSWORD}\n")
    netrc_file.chmod(0o600)
    assert len(cdse.fetch(make_cfg(fake), tmp_path / "raw")) == 2


def test_refused_login_error_and_logs_hold_no_secret(fake, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CDSE_USERNAME", USERNAME)
    monkeypatch.setenv("CDSE_PASSWORD", "wrong-" + PASSWORD)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(cdse.CdseAuthError) as error:
        cdse.fetch(make_cfg(fake), tmp_path / "raw")
    text = str(error.value) + repr(error.value) + caplog.text
    assert "invalid_grant" in str(error.value)
    assert PASSWORD not in text and USERNAME not in text


def test_credentials_and_tokens_never_logged(fake, credentials, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake.token_max_uses = 10
    fake.faults[f"T36UYA_{PRODUCTS[1][1]}_B04_10m.jp2"].extend(["429", "truncate"])
    cdse.fetch(make_cfg(fake), tmp_path)
    secrets = [USERNAME, PASSWORD, *fake._tokens, *fake._refresh_tokens]
    assert len(secrets) > 4 and "renewing the access token" in caplog.text
    assert not [s for s in secrets if s in caplog.text]
    assert USERNAME not in repr(cdse.load_credentials("127.0.0.1"))


def test_at_most_four_parallel_connections(fake, credentials, tmp_path):
    fake.value_delay_s = 0.05
    cdse.fetch(make_cfg(fake, bands=["B04", "B08", "B8A", "B04_20m", "B8A_60m", "TCI"]), tmp_path)
    assert len(value_requests(fake)) == 16  # 7 bands (SCL added) + MTD, 2 products
    assert 2 <= fake.max_active <= 4
    with pytest.raises(ValueError, match="max_workers=5"):
        download_all([], RetryPolicy.from_cfg(make_cfg(fake)), max_workers=5)


def test_l1c_takes_img_data_and_old_cloud_mask(fake, credentials, tmp_path):
    name = "S2B_MSIL1C_20190120T090259_N0207_R007_T36UYA_20190120T111111.SAFE"
    granule = "L1C_T36UYA_A009000_20190120T090259"
    files = {
        "MTD_MSIL1C.xml": b"<xml/>",
        f"GRANULE/{granule}/IMG_DATA/T36UYA_20190120T090259_B04.jp2": b"b04" * 100,
        f"GRANULE/{granule}/IMG_DATA/T36UYA_20190120T090259_B08.jp2": b"b08" * 100,
        f"GRANULE/{granule}/QI_DATA/MSK_CLOUDS_B00.gml": b"<gml/>",
        f"GRANULE/{granule}/QI_DATA/MSK_DEFECT_B04.gml": b"<gml/>",
    }
    fake.add_product("b0000000-0000-0000-0000-000000000001", name, "2019-01-20T09:02:59.024Z", 4.0, files,
                     product_type="S2MSI1C")
    fake.add_product("b0000000-0000-0000-0000-000000000002", name.replace("20190120", "20190720"),
                     "2019-07-20T09:02:59.024Z", 4.0,
                     {k.replace("20190120", "20190720"): v for k, v in files.items()}, product_type="S2MSI1C")
    folders = cdse.fetch(make_cfg(fake, level="L1C", bands=["B04"]), tmp_path)
    got = sorted(p.relative_to(folders[0]).as_posix() for p in folders[0].rglob("*") if p.is_file())
    assert got == ["GRANULE/L1C_T36UYA_A009000_20190120T090259/IMG_DATA/T36UYA_20190120T090259_B04.jp2",
                   "GRANULE/L1C_T36UYA_A009000_20190120T090259/QI_DATA/MSK_CLOUDS_B00.gml",
                   "MTD_MSIL1C.xml"]


def test_unknown_band_is_a_clear_error(fake, credentials, tmp_path):
    with pytest.raises(ValueError, match="'B13' is not an L2A band"):
        cdse.fetch(make_cfg(fake, bands=["B13"]), tmp_path)
    with pytest.raises(ValueError, match=r"B02 exists at \[10, 20, 60\] m"):
        cdse.fetch(make_cfg(fake, bands=["B02_15m"]), tmp_path)


def test_token_follows_redirects_only_to_trusted_hosts():
    origin = "https://download.dataspace.copernicus.eu/odata/v1/Products(x)/$value"
    assert carries_auth(origin, "https://zipper.dataspace.copernicus.eu/x", ["dataspace.copernicus.eu"])
    assert carries_auth(origin, "https://download.dataspace.copernicus.eu/y", [])
    assert not carries_auth(origin, "https://evil-dataspace.copernicus.eu.example.com/x", ["dataspace.copernicus.eu"])
    assert not carries_auth(origin, "https://s3.amazonaws.com/x", ["dataspace.copernicus.eu"])


def test_config_has_no_credential_keys():
    flat = repr(OmegaConf.to_container(compose_config(["download=cdse"]).download)).lower()
    assert "password" not in flat and "username" not in flat


def test_part_file_left_by_an_interrupted_run_is_resumed(fake, credentials, tmp_path):
    path = band_path(tmp_path, 1, "R10m", "B04_10m")
    data = fake.trees[WINTER_ID][path.relative_to(tmp_path).as_posix()]
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".part").write_bytes(data[:12_345])
    cdse.fetch(make_cfg(fake), tmp_path)
    assert path.read_bytes() == data
    assert f"{path.name} bytes=12345-" in fake.range_requests
