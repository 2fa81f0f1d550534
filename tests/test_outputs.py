"""What a run writes (s2match.inference.outputs, gis, report), on real sample crops: GIS layers, GCPs that GDAL
warps by, report.html rendered by a real headless Chromium, and the warning when pretrained weights stand in.

image1 is a real JP2 crop warped by a known homography and given image0's georeference, so the georeference is
wrong by that warp and the GCPs must put it right.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from s2match.config import PROJECT_ROOT, compose_config
from s2match.geo.homography import warp_points
from s2match.inference.outputs import run_title
from s2match.inference.run import EXIT_NO_TRANSFORM, run_inference

JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160529.jp2"
FAST = ["features=sift", "features.max_keypoints=1024", "matcher=ratio"]
H_TRUE = np.array([[0.995, -0.02, 6.3], [0.018, 1.004, -4.2], [1.0e-5, -0.6e-5, 1.0]])
SIZE = 384
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless Chromium on a machine without a display, a sandbox or a network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def write_raster(path: Path, data: np.ndarray, transform, crs) -> Path:
    profile = dict(driver="GTiff", dtype=data.dtype, count=data.shape[0], height=data.shape[1], width=data.shape[2],
                   crs=crs, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def infer(folder: Path, image0: Path, image1: Path, *overrides: str) -> tuple[int, dict, Path]:
    out = folder / "run"
    cfg = compose_config([f"+pair.image0={image0}", f"+pair.image1={image1}", f"infer.output_dir={out}",
                          *overrides])
    status = run_inference(cfg)
    return status, json.loads((out / "result.json").read_text()), out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path, Path, Path]:
    folder = tmp_path_factory.mktemp("outputs")
    with rasterio.open(JP2) as src:
        window = Window(600, 900, SIZE, SIZE)
        band, transform, crs = src.read(window=window), src.window_transform(window), src.crs
    image0 = write_raster(folder / "a.tif", band, transform, crs)
    image1 = write_raster(folder / "b.tif", cv2.warpPerspective(band[0], H_TRUE, (SIZE, SIZE))[None], transform, crs)
    status, result, out = infer(folder, image0, image1, *FAST, "infer.regions=2")
    assert status == 0 and result["success"], result["reason"]
    return result, out, image0, image1


def test_run_writes_every_output(run):
    result, out, _, _ = run
    expected = {"result.json", "report.html", "matches.png", "keypoints.png", "overlay.png", "matches.csv",
                "tie_points.csv", "matches.geojson", "tie_points.geojson", "regions.geojson", "shifts_by_region.csv",
                "gcps.vrt", "gcps.points"}
    assert expected <= {path.name for path in out.iterdir()}
    assert result["fitted_on"] == "refined tie points" and result["images"][0]["date"] is None
    assert not list(out.parent.glob(".*tmp*"))  # written into a temporary folder, then renamed


def test_geojson_lines_in_the_named_projected_crs(run):
    result, out, _, _ = run
    layer = json.loads((out / "matches.geojson").read_text())
    assert layer["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert CRS.from_user_input(layer["crs"]["properties"]["name"]) == CRS.from_epsg(32633)
    features = layer["features"]
    assert len(features) == result["matches"]
    table = np.genfromtxt(out / "matches.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    for feature, row in zip(features, table):
        start, end = feature["geometry"]["coordinates"]
        assert feature["geometry"]["type"] == "LineString"
        # from where image0 places the ground to where image1 does: here the map positions of both pixels
        assert np.allclose(start, [row["map_x0"], row["map_y0"]], atol=0.006)
        assert np.allclose(end, [row["map_x1"], row["map_y1"]], atol=0.006)
        assert all(abs(c * 100 - round(c * 100)) < 1e-6 for c in start + end)  # rounded to the centimetre
        properties = feature["properties"]
        assert set(properties) == {"x0", "y0", "x1", "y1", "residual_px", "dx_m", "dy_m", "score", "inlier"}
        assert properties["dx_m"] == pytest.approx(row["dx_m"], abs=1e-3)
        assert properties["inlier"] == bool(row["inlier"])
    tie_points = json.loads((out / "tie_points.geojson").read_text())["features"]
    used = [f for f in tie_points if f["properties"]["used"]]
    assert len(used) == result["inliers"]
    assert max(f["properties"]["residual_px"] for f in used) <= result["residuals_px"]["max"] + 1e-3
    # 4 cells (regions=2) as polygons counting the tie points the transform rests on
    regions = json.loads((out / "regions.geojson").read_text())["features"]
    assert len(regions) == 4 and all(f["geometry"]["type"] == "Polygon" for f in regions)
    assert sum(f["properties"]["count"] for f in regions) == result["inliers"]
    assert len((out / "matches.geojson").read_bytes()) < 400 * len(features)  # compact: no 15-decimal floats


def test_gdal_reads_the_gcps_and_warps_by_them_within_a_pixel(run):
    result, out, image0, image1 = run
    with rasterio.open(out / "gcps.vrt") as vrt:
        gcps, gcp_crs = vrt.gcps
        assert vrt.transform.is_identity and vrt.crs is None  # only the GCPs georeference it
        assert gcp_crs == CRS.from_epsg(32633) and len(gcps) == result["gcps"]["count"] == result["inliers"]
        pixels = vrt.read(1)
        with rasterio.open(image0) as src:
            grid0, shape0, crs0 = src.transform, src.shape, src.crs
            reference = src.read(1).astype(np.float32)
        warped = np.zeros(shape0, np.float32)
        reproject(rasterio.band(vrt, 1), warped, gcps=gcps, src_crs=gcp_crs, dst_transform=grid0, dst_crs=crs0,
                  resampling=Resampling.bilinear)
    with rasterio.open(image1) as src:
        assert np.array_equal(pixels, src.read(1))  # the VRT is image1's pixels
    # Warp where each pixel of image1 holds its own (column, row): GDAL's warp by the GCPs then says, for each pixel
    # p of image0's grid, which pixel of image1 it takes; the fitted transform says H(p).
    rows, cols = np.indices(pixels.shape, dtype=np.float32)
    taken = []
    for coordinate in (cols, rows):
        into = np.full(shape0, np.nan, np.float32)
        reproject(coordinate, into, gcps=gcps, src_crs=gcp_crs, dst_transform=grid0, dst_crs=crs0,
                  resampling=Resampling.bilinear, src_nodata=-1, dst_nodata=np.nan)
        taken.append(into)
    inner = (slice(40, SIZE - 40), slice(40, SIZE - 40))
    v, u = np.indices(shape0)
    fitted = warp_points(np.array(result["homography"]), np.c_[u[inner].ravel(), v[inner].ravel()])
    gdal = np.c_[taken[0][inner].ravel(), taken[1][inner].ravel()]
    assert np.abs(gdal - fitted).max() < 1.0
    # and the image warped through the VRT lands on image0
    assert np.corrcoef(warped[inner].ravel(), reference[inner].ravel())[0, 1] > 0.9


def test_qgis_points_file_holds_the_same_gcps(run):
    result, out, _, _ = run
    lines = (out / "gcps.points").read_text().splitlines()
    assert lines[0].startswith("#CRS: ") and CRS.from_wkt(lines[0][6:]) == CRS.from_epsg(32633)
    assert lines[1] == "mapX,mapY,sourceX,sourceY,enable,dX,dY,residual"
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[2:]])
    with rasterio.open(out / "gcps.vrt") as vrt:
        gcps = vrt.gcps[0]
    assert len(rows) == len(gcps) == result["inliers"]
    assert np.allclose(rows[:, :2], [[g.x, g.y] for g in gcps], atol=1e-6)
    # image1 is georeferenced: QGIS reads its source coordinates in image1's own CRS (here image0's transform)
    with rasterio.open(out.parent / "b.tif") as src:
        transform = src.transform
    source_pixels = np.c_[[g.col for g in gcps], [g.row for g in gcps]]
    east, north = transform * (source_pixels[:, 0], source_pixels[:, 1])
    assert np.allclose(rows[:, 2:4], np.c_[east, north], atol=0.01)


@pytest.fixture(scope="module")
def browser():
    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).is_file():
            pytest.fail(f"{program} not found: `make setup` installs Debian's chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="s2match-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", "--window-size=1400,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_report_renders_with_its_pictures_in_chromium(run, browser, tmp_path):
    result, out, _, _ = run
    # one file: a copy alone in another folder renders the same
    alone = tmp_path / "report.html"
    shutil.copy(out / "report.html", alone)
    browser.get(alone.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert [name for name, *_ in images] == ["matches.png", "overlay.png", "keypoints.png"]
    for name, complete, width, height in images:
        png = cv2.imread(str(out / name))
        assert complete and (height, width) == png.shape[:2], name  # decoded at the picture's full size
    text = browser.execute_script("return document.body.innerText")
    assert f"{result['inliers']} refined tie points" in text and "registered" in text
    assert "EPSG:32633" in text and "usac_magsac" in text  # the inputs and the configuration
    screenshot = cv2.imdecode(np.frombuffer(browser.get_screenshot_as_png(), np.uint8), cv2.IMREAD_COLOR)
    assert screenshot.std() > 20


def test_pretrained_stand_in_is_a_warning_in_log_report_and_pictures(tmp_path, caplog):
    with rasterio.open(JP2) as src:
        window = Window(300, 1500, 256, 256)
        band, transform, crs = src.read(window=window), src.window_transform(window), src.crs
    image0 = write_raster(tmp_path / "a.tif", band, transform, crs)
    image1 = write_raster(tmp_path / "b.tif", cv2.warpPerspective(band[0], H_TRUE, (256, 256))[None], transform, crs)
    missing = tmp_path / "no_training" / "matcher.pt"
    with caplog.at_level(logging.WARNING):
        status, result, out = infer(tmp_path, image0, image1, "features.max_keypoints=256",
                                    f"matcher.weights={missing}", "registration.second_pass=false",
                                    "registration.refine=false")
    assert status == 0 and result["model"]["weights"] == "pretrained"
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "pretrained" in r.getMessage()]
    assert logged and str(missing) in logged[0].getMessage()
    assert any(str(missing) in warning and "pretrained" in warning for warning in result["warnings"])
    html = (out / "report.html").read_text()
    assert f'<div class="warning">Warning: the trained LightGlue head {missing} was not found' in html
    assert "ALIKED + LightGlue, pretrained weights" in run_title(result)


def test_failed_run_still_reports(tmp_path):
    with rasterio.open(JP2) as src:
        band = src.read(1, window=Window(512, 512, 256, 256))  # within the orbit's swath: every pixel valid
    image0, image1 = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(image0), cv2.normalize(band, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    cv2.imwrite(str(image1), np.random.default_rng(0).integers(1, 256, (256, 256), dtype=np.uint8))
    status, result, out = infer(tmp_path, image0, image1, *FAST)
    assert status == EXIT_NO_TRANSFORM
    html = (out / "report.html").read_text()
    assert 'class="status failed"' in html and result["reason"] in html
    assert not (out / "gcps.vrt").exists() and not (out / "overlay.png").exists()  # no transform, no GIS layers
