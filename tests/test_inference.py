"""Scene inference (s2match.inference.coarse_to_fine, src/infer.py) on inputs built from the real sample.

Most runs use SIFT with the ratio-test matcher (no network, fast); one recovers a homography with the default
ALIKED + LightGlue. Ground truth is exact: image1 is a real crop warped by a known homography, or a crop on a
known grid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.warp import transform as transform_coords
from rasterio.windows import Window

from s2match import cli
from s2match.config import PROJECT_ROOT, compose_config
from s2match.geo.homography import warp_points
from s2match.geo.georef import Grid, pixel_to_pixel
from s2match.inference.run import EXIT_NO_TRANSFORM, run_inference
from s2match.inference.scenes import open_image
from s2match.s2.products import ProductError

JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160529.jp2"
OSCD = PROJECT_ROOT / "data" / "sample" / "oscd" / "pisa" / "20150704.tif"
FAST = ["features=sift", "features.max_keypoints=1024", "matcher=ratio"]
# A mild perspective warp: rotation, scale, shear and shift, as two dates' residual misregistration is not.
H_TRUE = np.array([[0.985, -0.045, 11.3], [0.05, 1.01, -7.6], [1.5e-5, -1.0e-5, 1.0]])


def read_crop(path: Path, window: Window) -> tuple[np.ndarray, Affine, CRS]:
    with rasterio.open(path) as src:
        return src.read(window=window), src.window_transform(window), src.crs


def write_raster(path: Path, data: np.ndarray, transform: Affine | None = None, crs: CRS | None = None,
                 driver: str = "GTiff", descriptions: list[str] | None = None) -> Path:
    profile = dict(driver=driver, dtype=data.dtype, count=data.shape[0], height=data.shape[1], width=data.shape[2])
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if driver == "JP2OpenJPEG":
        profile.update(QUALITY=100, REVERSIBLE="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or []):
            dst.set_band_description(i + 1, name)
    return path


def warped(data: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Each band of (C, H, W) warped by H (image0 px -> image1 px); 0 outside the footprint (no data)."""
    size = (data.shape[2], data.shape[1])
    return np.stack([cv2.warpPerspective(band, H, size, flags=cv2.INTER_LINEAR) for band in data])


def corner_error(H: np.ndarray, H_true: np.ndarray, size: tuple[int, int]) -> float:
    corners = np.array([[0, 0], [size[0] - 1, 0], [size[0] - 1, size[1] - 1], [0, size[1] - 1]], float)
    return float(np.linalg.norm(warp_points(H, corners) - warp_points(H_true, corners), axis=1).mean())


def infer(tmp_path: Path, image0: Path, image1: Path, *overrides: str) -> tuple[int, dict, Path]:
    out = tmp_path / "run"
    cfg = compose_config([f"+pair.image0={image0}", f"+pair.image1={image1}",
                          f"infer.output_dir={out}", *overrides])
    status = run_inference(cfg)
    return status, json.loads((out / "result.json").read_text()), out


def to_uint8(data: np.ndarray) -> np.ndarray:
    low, high = np.percentile(data[data > 0], [1, 99])
    return np.clip((data.astype(np.float32) - low) / (high - low) * 254 + 1, 1, 255).astype(np.uint8)


def build_safe(folder: Path, band: np.ndarray, transform: Affine, crs: CRS) -> Path:
    """A SAFE folder with ESA naming holding the crop as its B08 (JP2)."""
    safe = folder / "S2A_MSIL1C_20160529T101032_N0202_R022_T33UUU_20160529T101030.SAFE"
    img_data = safe / "GRANULE" / "L1C_T33UUU_A004868_20160529T101030" / "IMG_DATA"
    img_data.mkdir(parents=True)
    write_raster(img_data / "T33UUU_20160529T101032_B08.jp2", band, transform, crs, driver="JP2OpenJPEG")
    return safe


@pytest.fixture(scope="module")
def jp2_crop():
    return read_crop(JP2, Window(600, 900, 384, 384))


@pytest.mark.parametrize("fmt", ["geotiff_multiband", "jp2", "safe", "png", "jpeg"])
def test_each_input_format_recovers_a_known_homography(tmp_path, jp2_crop, fmt):
    band, transform, crs = jp2_crop
    if fmt == "geotiff_multiband":
        data, transform, crs = read_crop(OSCD, Window(150, 150, 384, 384))
        names = ["B02", "B03", "B04", "B08"]
        image0 = write_raster(tmp_path / "a.tif", data, transform, crs, descriptions=names)
        image1 = write_raster(tmp_path / "b.tif", warped(data, H_TRUE), transform, crs, descriptions=names)
    elif fmt == "jp2":
        image0 = write_raster(tmp_path / "a.jp2", band, transform, crs, driver="JP2OpenJPEG")
        image1 = write_raster(tmp_path / "b.jp2", warped(band, H_TRUE), transform, crs, driver="JP2OpenJPEG")
    elif fmt == "safe":
        image0 = build_safe(tmp_path, band, transform, crs)
        image1 = write_raster(tmp_path / "b.tif", warped(band, H_TRUE), transform, crs)
    else:
        grey = to_uint8(band[0])
        suffix, params = (".png", []) if fmt == "png" else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
        image0, image1 = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        cv2.imwrite(str(image0), grey, params)
        cv2.imwrite(str(image1), warped(grey[None], H_TRUE)[0], params)
    status, result, out = infer(tmp_path, image0, image1, *FAST)
    assert status == 0 and result["success"], result["reason"]
    assert corner_error(np.array(result["homography"]), H_TRUE, (384, 384)) < 1.0
    if fmt == "geotiff_multiband":
        assert result["images"][0]["bands"] == ["B08"]  # the bands config's composite (nir)
    if fmt == "safe":
        assert result["images"][0]["bands"] == ["B08"] and result["images"][0]["crs"] == "EPSG:32633"
    georeferenced = fmt not in ("png", "jpeg")
    assert (out / "matches.geojson").is_file() == georeferenced
    assert {"matches.png", "keypoints.png", "matches.csv", "result.json"} <= {p.name for p in out.iterdir()}


def test_lightglue_recovers_a_known_homography_within_a_pixel(tmp_path):
    band, transform, crs = read_crop(JP2, Window(300, 1500, 384, 384))
    H = np.array([[0.94, -0.17, 45.0], [0.16, 0.95, -15.0], [2e-5, 1e-5, 1.0]])
    image0 = write_raster(tmp_path / "a.tif", band, transform, crs)
    image1 = write_raster(tmp_path / "b.tif", warped(band, H), transform, crs)
    status, result, out = infer(tmp_path, image0, image1, "features.max_keypoints=256",
                                "matcher.weights=/nonexistent/matcher.pt")
    assert status == 0
    assert corner_error(np.array(result["homography"]), H, (384, 384)) < 1.0
    assert result["model"]["weights"] == "pretrained" and Path(result["model"]["file"]).is_file()
    assert result["model"]["features"] == "aliked" and result["model"]["matcher"] == "lightglue"


def test_large_scene_is_matched_tile_wise(tmp_path):
    with rasterio.open(JP2) as src:
        band = src.read(1)
    mosaic = np.pad(band, ((0, 0), (0, 3000 - band.shape[1])), mode="symmetric")[None, :3000]
    transform, crs = rasterio.open(JP2).transform, rasterio.open(JP2).crs
    H = np.array([[0.999, -0.012, 23.4], [0.011, 1.001, -17.2], [0.0, 0.0, 1.0]])
    image0 = write_raster(tmp_path / "a.tif", mosaic, transform, crs)
    image1 = write_raster(tmp_path / "b.tif", warped(mosaic, H), transform, crs)
    status, result, _ = infer(tmp_path, image0, image1, *FAST, "registration.coarse_size=512",
                              "registration.tile_size=512", "registration.max_tiles=4")
    assert status == 0
    tiles = result["tiles"]
    assert tiles["candidates"] == 36 and tiles["used"] == 4
    assert sum(t["matches"] > 20 for t in tiles["per_tile"]) >= 3
    assert result["coarse"]["success"]
    assert corner_error(np.array(result["homography"]), H, (3000, 3000)) < 1.0


def test_georeferenced_outputs_match_the_known_grids(tmp_path):
    """Two crops of one JP2 with different extents: H is the offset of their grids; outputs in map coords."""
    band0, transform0, crs = read_crop(JP2, Window(100, 1200, 500, 400))
    band1, transform1, _ = read_crop(JP2, Window(160, 1150, 450, 500))
    image0 = write_raster(tmp_path / "a.tif", band0, transform0, crs)
    image1 = write_raster(tmp_path / "b.tif", band1, transform1, crs)
    status, result, out = infer(tmp_path, image0, image1, *FAST, "infer.regions=2")
    assert status == 0
    expected = np.array([[1, 0, -60], [0, 1, 50], [0, 0, 1]], float)
    assert np.allclose(result["prior"]["homography"], expected, atol=1e-6)
    assert corner_error(np.array(result["homography"]), expected, (500, 400)) < 0.3
    assert abs(result["shift_m"]["dx_median"]) < 1.0 and abs(result["shift_m"]["dy_median"]) < 1.0
    assert len(result["shift_m_by_region"]) == 4
    # the regions count the tie points the transform rests on (tests/test_outputs.py checks the GIS layers)
    assert sum(r["count"] for r in result["shift_m_by_region"]) == result["inliers"]
    table = np.genfromtxt(out / "matches.csv", delimiter=",", names=True)
    east, north = rasterio.transform.xy(transform0, table["y0"], table["x0"], offset="center")
    assert np.allclose(table["map_x0"], east) and np.allclose(table["map_y0"], north)
    lon, lat = transform_coords(crs, "EPSG:4326", east, north)
    assert np.allclose(table["lon0"], lon) and np.allclose(table["lat0"], lat)
    assert (out / "shifts_by_region.csv").is_file()


def test_a_georeference_error_shows_as_shift_in_metres(tmp_path, jp2_crop):
    band, transform, crs = jp2_crop
    image0 = write_raster(tmp_path / "a.tif", band, transform, crs)
    # Same pixels, but image1's georeference puts them 15 m further east and 5 m further south.
    image1 = write_raster(tmp_path / "b.tif", band, Affine.translation(15, -5) * transform, crs)
    status, result, _ = infer(tmp_path, image0, image1, *FAST)
    assert status == 0
    assert corner_error(np.array(result["homography"]), np.eye(3), (384, 384)) < 0.3
    assert result["shift_m"]["dx_median"] == pytest.approx(15.0, abs=0.5)
    assert result["shift_m"]["dy_median"] == pytest.approx(-5.0, abs=0.5)


def test_grids_in_neighbouring_utm_zones_at_different_resolutions(tmp_path, jp2_crop):
    """Image1 is the crop reprojected into UTM 32N at 20 m: the prior comes from the georeference, and the fit
    agrees with the exact pixel mapping of the two grids."""
    band, transform, crs = read_crop(JP2, Window(400, 800, 640, 640))
    zone32 = CRS.from_epsg(32632)
    bounds = rasterio.transform.array_bounds(640, 640, transform)
    transform1, width1, height1 = calculate_default_transform(crs, zone32, 640, 640, *bounds, resolution=20.0)
    band1 = np.zeros((1, height1, width1), band.dtype)
    reproject(band, band1, src_transform=transform, src_crs=crs, dst_transform=transform1, dst_crs=zone32,
              resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
    image0 = write_raster(tmp_path / "a.tif", band, transform, crs)
    image1 = write_raster(tmp_path / "b.tif", band1, transform1, zone32)
    status, result, out = infer(tmp_path, image0, image1, *FAST, "estimator.min_inliers=20")
    assert status == 0
    H = np.array(result["homography"])
    pts = np.array([[160.0, 160.0], [480.0, 160.0], [480.0, 480.0], [160.0, 480.0]])
    exact = pixel_to_pixel(Grid(crs, transform, 640, 640), Grid(zone32, transform1, width1, height1), pts)
    # the content was placed by the georeference, so the fit must agree with it (image1 pixels are 20 m)
    assert np.linalg.norm(warp_points(H, pts) - exact, axis=1).mean() < 0.5
    assert result["prior"]["max_error_px"] < 0.1
    assert abs(np.degrees(np.arctan2(H[1, 0], H[0, 0]))) > 1.0  # the grid convergence between the zones


def test_missing_and_corrupt_inputs_are_one_line_errors(tmp_path, jp2_crop, monkeypatch, capsys):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 not really a tiff" * 10)
    with pytest.raises(ProductError, match="corrupt.tif: unreadable image"):
        open_image(corrupt, "nir", {"nir": ["B08"]}, "gray", None)
    image0 = write_raster(tmp_path / "a.tif", *jp2_crop)
    monkeypatch.setattr(sys, "argv", ["infer.py", f"+pair.image0={image0}",
                                      f"+pair.image1={tmp_path / 'missing.tif'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.run(run_inference)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.tif'}: input image not found\n"


def test_no_overlap_fails_with_a_non_zero_exit(tmp_path):
    image0 = write_raster(tmp_path / "a.tif", *read_crop(JP2, Window(1000, 0, 300, 300)))
    image1 = write_raster(tmp_path / "b.tif", *read_crop(JP2, Window(1000, 2000, 300, 300)))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "infer.py"), *FAST,
                          f"+pair.image0={image0}", f"+pair.image1={image1}", f"infer.output_dir={out}"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert run.returncode == EXIT_NO_TRANSFORM
    result = json.loads((out / "result.json").read_text())
    assert result["success"] is False and "do not overlap" in result["reason"] and "homography" not in result


def test_unrelated_images_give_no_transform(tmp_path, jp2_crop):
    image0 = tmp_path / "a.png"
    cv2.imwrite(str(image0), to_uint8(jp2_crop[0][0]))
    image1 = tmp_path / "b.png"
    cv2.imwrite(str(image1), np.random.default_rng(0).integers(1, 256, (384, 384), dtype=np.uint8))
    status, result, _ = infer(tmp_path, image0, image1, *FAST)
    assert status == EXIT_NO_TRANSFORM
    assert result["success"] is False and result["reason"].startswith("no reliable transform")


def test_coregistered_product_lies_on_image0_grid(tmp_path, jp2_crop):
    band, transform, crs = jp2_crop
    image0 = write_raster(tmp_path / "a.tif", band, transform, crs)
    image1 = write_raster(tmp_path / "b.tif", warped(band, H_TRUE), transform, crs)
    status, _, out = infer(tmp_path, image0, image1, *FAST, "infer.write_coregistered=true",
                           "infer.coregister_block=128")
    assert status == 0
    with rasterio.open(out / "coregistered.tif") as src:
        assert (src.crs, src.transform, src.shape) == (crs, transform, (384, 384))
        resampled = src.read(1)
    original = band[0] / 10000.0
    inner = np.isfinite(resampled)
    inner[:20], inner[-20:], inner[:, :20], inner[:, -20:] = False, False, False, False
    assert inner.sum() > 250 * 250
    assert np.median(np.abs(resampled[inner] - original[inner])) < 0.01 * np.median(original)
