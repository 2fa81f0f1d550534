"""Earth Search client against the local fake server: STAC paging, season choice, COG windows; AOI parsing."""

from __future__ import annotations

import hashlib
import json
import socket
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from omegaconf import OmegaConf
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from fake_cdse import FakeCopernicus
from s2match.config import compose_config
from s2match.data.sources import DownloadError, Scene
from s2match.data.sources import earth_search
from s2match.data.sources.aoi import parse_aoi
from s2match.data.sources.http import HttpError, RetryPolicy

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160608.jp2"
CROP = Window(400, 600, 1024, 1024)  # 10.24 km of real L1C DN at 10 m
METADATA = b"<n1:Level-2A_Tile_ID>sun and view angles</n1:Level-2A_Tile_ID>"


def _write_tiff(path: Path, data: np.ndarray, transform: Affine, crs) -> None:
    profile = {"driver": "GTiff", "dtype": data.dtype.name, "count": 1, "width": data.shape[1],
               "height": data.shape[0], "crs": crs, "transform": transform, "tiled": True,
               "blockxsize": 256, "blockysize": 256, "nodata": 0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    """B04 at 10 m (a real crop), B8A at 20 m (its 2x2 mean), SCL at 20 m (classes from brightness)."""
    folder = tmp_path_factory.mktemp("cogs")
    with rasterio.open(SAMPLE) as src:
        b04 = src.read(1, window=CROP)
        transform, crs = src.window_transform(CROP), src.crs
    coarse = transform @ Affine.scale(2)
    b8a = b04.reshape(512, 2, 512, 2).mean(axis=(1, 3)).astype(np.uint16)
    scl = np.where(b8a > np.percentile(b8a, 80), 8, 4).astype(np.uint8)  # "cloud" vs "vegetation"
    for name, data, tr in [("B04", b04, transform), ("B8A", b8a, coarse), ("SCL", scl, coarse)]:
        _write_tiff(folder / f"{name}.tif", data, tr, crs)
    bounds = transform_bounds(crs, "EPSG:4326", *rasterio.transform.array_bounds(1024, 1024, transform))
    return {"folder": folder, "bounds": bounds, "crs": crs, "transform": transform}


def stac_item(fake: FakeCopernicus, item_id: str, when: str, cloud: float, orbit: int, baseline: str,
              bounds, offset_applied: bool | None = None) -> dict:
    files = f"{fake.url}/files"
    assets = {
        key: {"href": f"{files}/{band}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
              "roles": ["data"], "raster:bands": [{"nodata": 0, "scale": 0.0001, "offset": -0.1}]}
        for key, band in [("red", "B04"), ("nir08", "B8A"), ("scl", "SCL")]
    }
    assets["granule_metadata"] = {"href": f"{files}/granule_metadata.xml", "type": "application/xml",
                                  "roles": ["metadata"], "file:size": len(METADATA),
                                  "file:checksum": "1220" + hashlib.sha256(METADATA).hexdigest()}
    x0, y0, x1, y1 = bounds
    props = {"datetime": when, "eo:cloud_cover": cloud, "grid:code": "MGRS-33UUU", "mgrs:utm_zone": 33,
             "s2:product_type": "S2MSI2A", "s2:processing_baseline": baseline,
             "s2:product_uri": f"S2A_MSIL2A_{when[:4]}0101T000000_N0{baseline.replace('.', '')[-3:]}"
                               f"_R{orbit:03d}_T33UUU_{when[:4]}0101T000000.SAFE"}
    if offset_applied is not None:
        props["earthsearch:boa_offset_applied"] = offset_applied
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "sentinel-2-l2a",
            "bbox": [x0, y0, x1, y1], "properties": props, "assets": assets, "links": [],
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}


@pytest.fixture
def fake(cogs):
    server = FakeCopernicus().start()
    for name in ("B04", "B8A", "SCL"):
        server.static[f"{name}.tif"] = (cogs["folder"] / f"{name}.tif").read_bytes()
    server.static["granule_metadata.xml"] = METADATA
    b = cogs["bounds"]
    server.stac_items = [
        stac_item(server, "S2A_33UUU_20190105_0_L2A", "2019-01-05T10:10:21.024000Z", 30.0, 22, "02.07", b),
        stac_item(server, "S2A_33UUU_20190115_0_L2A", "2019-01-15T10:10:21.024000Z", 8.0, 22, "02.07", b),
        stac_item(server, "S2B_33UUU_20190703_0_L2A", "2019-07-03T10:20:11.024000Z", 1.0, 122, "02.12", b),
        stac_item(server, "S2A_33UUU_20190708_0_L2A", "2019-07-08T10:10:31.024000Z", 4.0, 22, "04.00", b,
                  offset_applied=False),
        stac_item(server, "S2A_33UUU_20191008_0_L2A", "2019-10-08T10:10:31.024000Z", 0.0, 22, "04.00", b),
    ]
    yield server
    server.stop()


def aoi_in_crop(cogs, cols=(300, 520), rows=(410, 640)) -> list[float]:
    """A lon/lat bbox over part of the crop, off the 60 m grid on purpose."""
    t = cogs["transform"]
    x0, y1 = t @ (cols[0] + 0.3, rows[0] + 0.7)
    x1, y0 = t @ (cols[1] + 0.4, rows[1] + 0.2)
    return list(transform_bounds(cogs["crs"], "EPSG:4326", x0, y0, x1, y1))


def make_cfg(fake, cogs, **overrides):
    cfg = compose_config(["download=earth_search"]).download
    OmegaConf.set_struct(cfg, False)  # overrides may add season windows
    cfg.api.stac_url = f"{fake.url}/stac"
    cfg.aoi = aoi_in_crop(cogs)
    cfg.tile = "33UUU"
    cfg.merge_with({"retries": 2, "backoff_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 5, "page_size": 1,
                    "bands": ["B04", "B8A"]})
    cfg.merge_with(overrides)
    return cfg


def test_fetch_reads_only_the_aoi_window(fake, cogs, tmp_path):
    cfg = make_cfg(fake, cogs)
    folders = earth_search.fetch(cfg, tmp_path)
    # Orbit 22 is in both seasons; the clearer 122 summer scene would break the shared geometry.
    assert [f.name for f in folders] == ["S2A_33UUU_20190115_0_L2A", "S2A_33UUU_20190708_0_L2A"]
    assert sum(path == "/stac/search" for _, path in fake.requests) >= 4, "STAC paging not followed"

    winter = folders[0]
    b04, b8a, scl = (winter / f"T33UUU_20190115T101021_{b}.tif" for b in ("B04", "B8A", "SCL"))
    aoi_utm = transform_bounds("EPSG:4326", cogs["crs"], *cfg.aoi)
    with rasterio.open(b04) as out, rasterio.open(cogs["folder"] / "B04.tif") as src:
        left, bottom, right, top = out.bounds
        assert left <= aoi_utm[0] and bottom <= aoi_utm[1] and right >= aoi_utm[2] and top >= aoi_utm[3]
        assert right - left < (aoi_utm[2] - aoi_utm[0]) + 121, "window not limited to the AOI"
        assert (left - src.transform.c) % 60 == 0 and (src.transform.f - top) % 60 == 0
        expected = src.read(1, window=from_bounds(*out.bounds, src.transform).round_offsets().round_lengths())
        np.testing.assert_array_equal(out.read(1), expected)
        assert out.tags()["PRODUCT"] == "S2MSI2A" and out.tags()["TILE"] == "T33UUU"
        assert out.tags()["DATE"] == "20190115" and out.tags()["ADD_OFFSET"] == "0"
        assert out.tags()["QUANTIFICATION_VALUE"] == "10000" and out.tags()["PROCESSING_BASELINE"] == "02.07"
        ten_m_bounds = out.bounds
    with rasterio.open(b8a) as out20, rasterio.open(scl) as out_scl:
        assert out20.bounds == ten_m_bounds == out_scl.bounds, "bands of one scene must cover the same ground"
        assert out20.res == (20.0, 20.0) and out_scl.tags()["QUANTIFICATION_VALUE"] == "1"
    full = len(fake.static["B04.tif"])
    assert fake.bytes_served["B04.tif"] < 0.4 * 2 * full, "more than the window was downloaded"
    assert any(r.startswith("B04.tif bytes=") for r in fake.range_requests)

    summer = folders[1] / "T33UUU_20190708T101031_B04.tif"
    with rasterio.open(summer) as out:
        assert out.tags()["ADD_OFFSET"] == "-1000" and out.tags()["PROCESSING_BASELINE"] == "04.00"
    assert (winter / "granule_metadata.xml").read_bytes() == METADATA
    assert json.loads((winter / "item.json").read_text())["id"] == winter.name


def test_search_pages_and_retries_through_pystac_client(fake, cogs):
    fake.faults["stac/search"].extend(["503", "drop", "429"])
    cfg = make_cfg(fake, cogs, retries=3)
    candidates = earth_search.search(cfg, parse_aoi(cfg.aoi, cfg.tile), RetryPolicy.from_cfg(cfg))
    assert {season: [s.id for s in scenes] for season, scenes in candidates.items()} == {
        "winter": ["S2A_33UUU_20190105_0_L2A", "S2A_33UUU_20190115_0_L2A"],
        "summer": ["S2B_33UUU_20190703_0_L2A", "S2A_33UUU_20190708_0_L2A"]}
    searches = [path for method, path in fake.requests if (method, path) == ("POST", "/stac/search")]
    assert len(searches) == 4 + 3, "one page per item (page_size 1), plus the 3 retried answers"
    assert ("GET", "/stac") in fake.requests, "the landing page (conformance) was not read"
    summer = candidates["summer"][1]
    assert (summer.tile, summer.relative_orbit, summer.processing_baseline) == ("33UUU", 22, 4.0)


@pytest.mark.parametrize("path, problem", [
    (None, "GET 127.0.0.1:{port}: cannot connect (connection refused)"),
    ("/nothing-here", "GET 127.0.0.1:{port}/nothing-here: HTTP 404"),
])
def test_unreachable_stac_api_is_one_line(path, problem, fake, cogs, tmp_path):
    if path is None:
        with socket.socket() as probe:  # a port with nothing listening
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}/stac"
    else:
        port, url = fake.url.rsplit(":", 1)[1], fake.url + path
    cfg = make_cfg(fake, cogs)
    cfg.api.stac_url = url
    with pytest.raises(HttpError) as error:
        earth_search.fetch(cfg, tmp_path)
    assert str(error.value).startswith(problem.format(port=port)) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_rerun_skips_written_bands(fake, cogs, tmp_path):
    cfg = make_cfg(fake, cogs)
    earth_search.fetch(cfg, tmp_path)
    served = dict(fake.bytes_served)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.tif")}
    earth_search.fetch(cfg, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.tif")} == stamps
    assert dict(fake.bytes_served) == served


def test_offset_tag_follows_provider_flag():
    item = {"properties": {"earthsearch:boa_offset_applied": True}}
    scene = Scene("x", "x", "summer", "33UUU", 22, 1.0, datetime(2023, 1, 1), 5.09, item)
    assert earth_search.band_tags(scene, "B04", "S2MSI2A")["ADD_OFFSET"] == "0"
    unflagged = Scene("x", "x", "summer", "33UUU", 22, 1.0, scene.sensed, 5.09, {"properties": {}})
    assert earth_search.band_tags(unflagged, "B04", "S2MSI2A")["ADD_OFFSET"] == "-1000"
    assert earth_search.band_tags(unflagged, "SCL", "S2MSI2A")["ADD_OFFSET"] == "0"


def test_s3_only_assets_are_a_clear_error(fake, cogs, tmp_path):
    for item in fake.stac_items:
        item["assets"]["red"]["href"] = "s3://sentinel-s2-l1c/tiles/33/U/UU/2019/1/15/0/B04.jp2"
    with pytest.raises(ValueError, match="not a keyless https COG"):
        earth_search.fetch(make_cfg(fake, cogs), tmp_path)


def test_aoi_outside_the_image_is_a_clear_error(fake, cogs, tmp_path):
    x0, y0, x1, y1 = cogs["bounds"]
    for item in fake.stac_items:  # the catalogue footprint (a whole tile) is larger than the served crop
        item["bbox"][2] += 1.0
    with pytest.raises(ValueError, match="does not overlap the image"):
        earth_search.fetch(make_cfg(fake, cogs, aoi=[x1 + 0.5, y0, x1 + 0.6, y1]), tmp_path)


def test_empty_season_is_a_clear_error(fake, cogs, tmp_path):
    cfg = make_cfg(fake, cogs, seasons={"winter": ["2019-01-01", "2019-02-28"], "spring": ["2019-04-01", "2019-04-30"]})
    with pytest.raises(DownloadError, match="season\\(s\\) spring"):
        earth_search.fetch(cfg, tmp_path)


def test_parse_aoi_forms(tmp_path):
    assert parse_aoi("T36uya") == parse_aoi("36UYA") and parse_aoi("36UYA").tile == "36UYA"
    bbox = parse_aoi(OmegaConf.create({"a": [36.2, 49.95, 36.35, 50.05]}).a, tile="36UYA")
    assert bbox.bbox == (36.2, 49.95, 36.35, 50.05) and bbox.tile == "36UYA"
    assert bbox.wkt().startswith("POLYGON((36.2 49.95,36.35 49.95,")
    geojson = tmp_path / "aoi.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
            [[36.2, 49.9], [36.4, 49.95], [36.3, 50.1], [36.2, 49.9]]]}}]}))
    assert parse_aoi(str(geojson)).bbox == (36.2, 49.9, 36.4, 50.1)


@pytest.mark.parametrize("value, message", [
    ([36.35, 49.95, 36.2, 50.05], "is not min_lon < max_lon"),
    ([36.2, 49.95, 36.35], "needs 4 numbers"),
    ("missing.geojson", "missing.geojson: AOI file not found"),
    (None, "expected \\[min_lon"),
])
def test_parse_aoi_rejects_bad_input(value, message):
    with pytest.raises(ValueError, match=message):
        parse_aoi(value)


def test_parse_aoi_rejects_bad_geojson_and_tile_conflict(tmp_path):
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.geojson: not valid GeoJSON"):
        parse_aoi(str(broken))
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="empty.geojson: GeoJSON has no coordinates"):
        parse_aoi(str(empty))
    with pytest.raises(ValueError, match="disagree"):
        parse_aoi("36UYA", tile="35UQR")
