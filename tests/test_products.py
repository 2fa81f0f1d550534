"""Readers for each format, DN -> reflectance with the baseline offset rule, and bad products."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.enums import Resampling

from s2match.data import composites as bands
from s2match.data.catalogue import local_rows, read_catalogue, sample_rows, write_catalogue
from s2match.config import PROJECT_ROOT
from s2match.s2.products import BASELINE_OFFSET, Product, ProductError, band_names

JP2 = "jp2/T33UUU/20160608.jp2"


def test_sample_catalogue_reads_every_format(stages):
    catalogue = stages["catalogue"]
    assert (catalogue.status == "ok").all(), catalogue[catalogue.status != "ok"][["scene_id", "reason"]]
    by_id = catalogue.set_index("scene_id")
    assert by_id.loc["oscd-pisa-20150704", "bands"] == "B02,B03,B04,B08"  # multi-band GeoTIFF
    assert by_id.loc["ua-T35UNQ-winter", "bands"] == "B04,B03,B02"  # RGB strip
    assert (by_id.loc["ua-T35UNQ-winter", "width"], by_id.loc["ua-T35UNQ-winter", "height"]) == (512, 5120)
    assert by_id.loc["t33uuu-20160608", "crs"] == "EPSG:32633"  # JP2
    assert by_id.loc["t36uya-20160212", "pixel_size"] == pytest.approx(107.2265625)


def test_composites_per_format(stages, sample_dir):
    scenes = stages["scenes"].set_index("scene_id")
    assert scenes.loc["oscd-pisa-20150704", "composite"] == "nir"
    assert scenes.loc["ua-T35UNQ-winter", "composite"] == "gray"  # no B08 in an RGB strip: grey fallback
    with rasterio.open(scenes.loc["oscd-pisa-20150704", "image"]) as out, \
            rasterio.open(sample_dir / "oscd/pisa/20150704.tif") as src:
        assert out.dtypes[0] == "float32" and out.transform == src.transform
        np.testing.assert_allclose(out.read(1), src.read(4) / 10000.0, rtol=1e-6)  # B08, no offset before 2022
    with rasterio.open(scenes.loc["ua-T35UNQ-winter", "image"]) as out:
        snow = out.read(1)
        assert np.nanmax(snow) <= 1.0 and np.nanmean(snow) > 0.6  # snow stays bright, not clipped to a constant


def make_safe(root: Path, sample_dir: Path, level: str, baseline: str, offset: int | None) -> Path:
    """A SAFE folder built from the real JP2 crop: B08 at 10 m, B8A at 20 m (L2A: R10m/R20m), MTD xml."""
    time = "20220608T101032"
    safe = root / f"S2A_MSI{level}_{time}_N{baseline.replace('.', '')}_R022_T33UUU_{time}.SAFE"
    img = safe / "GRANULE" / f"{level}_T33UUU_A000000_{time}" / "IMG_DATA"
    suffix10, suffix20 = ("_10m", "_20m") if level == "L2A" else ("", "")
    (img / "R10m" if level == "L2A" else img).mkdir(parents=True)
    if level == "L2A":
        (img / "R20m").mkdir()
    with rasterio.open(sample_dir / JP2) as src:
        crop = src.read(1, window=((0, 512), (0, 512)))
        profile = dict(driver="GTiff", dtype="uint16", count=1, crs=src.crs, nodata=None)
        transform10 = rasterio.windows.transform(((0, 512), (0, 512)), src.transform)
        crop20 = src.read(1, window=((0, 512), (0, 512)), out_shape=(256, 256), resampling=Resampling.average)
    b08 = (img / "R10m" if level == "L2A" else img) / f"T33UUU_{time}_B08{suffix10}.tif"
    b8a = (img / "R20m" if level == "L2A" else img) / f"T33UUU_{time}_B8A{suffix20}.tif"
    with rasterio.open(b08, "w", width=512, height=512, transform=transform10, **profile) as dst:
        dst.write(crop, 1)
    transform20 = transform10 @ rasterio.Affine.scale(2)
    with rasterio.open(b8a, "w", width=256, height=256, transform=transform20, **profile) as dst:
        dst.write(crop20, 1)
    offsets = "" if offset is None else "".join(
        f'<RADIO_ADD_OFFSET band_id="{i}">{offset}</RADIO_ADD_OFFSET>' for i in range(13))
    (safe / f"MTD_MSI{level}.xml").write_text(
        f"<Level-1C_User_Product><General_Info><Product_Info><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>"
        f"</Product_Info><Product_Image_Characteristics><QUANTIFICATION_VALUE unit='none'>10000</QUANTIFICATION_VALUE>"
        f"{offsets}</Product_Image_Characteristics></General_Info></Level-1C_User_Product>")
    return safe


@pytest.mark.parametrize(("level", "baseline", "offset", "expected"), [
    ("L1C", "04.00", -1000, -1000.0),  # offset written in the metadata
    ("L2A", "05.09", None, BASELINE_OFFSET),  # baseline >= 04.00 without offsets: the rule applies
    ("L1C", "02.04", None, 0.0),  # older baseline: no offset
])
def test_safe_products_reflectance(tmp_path, sample_dir, cfg, level, baseline, offset, expected):
    products = tmp_path / "products"
    make_safe(products, sample_dir, level, baseline, offset)
    catalogue = write_catalogue(local_rows(products, tmp_path), tmp_path / "catalogue.csv")
    assert list(catalogue.status) == ["ok"], catalogue.reason.tolist()
    row = catalogue.iloc[0]
    assert row.aoi == "T33UUU" and row.date == "2022-06-08" and row.season == "summer" and row.level == level
    scenes = bands.write_bands(cfg.bands, read_catalogue(tmp_path / "catalogue.csv"), tmp_path / "bands", tmp_path)
    with rasterio.open(scenes.image[0]) as out, rasterio.open(sample_dir / JP2) as src:
        dn = src.read(1, window=((0, 512), (0, 512))).astype(np.float32)
        expected_reflectance = np.where(dn == 0, np.nan, (dn + expected) / 10000)
        np.testing.assert_allclose(out.read(1), expected_reflectance, rtol=1e-5)


def test_b8a_resampled_to_10m(tmp_path, sample_dir, cfg):
    make_safe(tmp_path / "products", sample_dir, "L2A", "05.09", None)
    catalogue = write_catalogue(local_rows(tmp_path / "products", tmp_path), tmp_path / "catalogue.csv")
    config = cfg.bands.copy()
    config.composite = "nir20"
    scenes = bands.write_bands(config, catalogue, tmp_path / "bands", tmp_path)
    with rasterio.open(scenes.image[0]) as out:
        assert (out.width, out.height, out.transform.a) == (512, 512, 10.0)


def test_loose_band_files_and_tci(tmp_path, sample_dir):
    with rasterio.open(sample_dir / JP2) as src:
        profile = dict(driver="GTiff", width=256, height=256, crs=src.crs,
                       transform=rasterio.windows.transform(((0, 256), (0, 256)), src.transform))
        crop = src.read(1, window=((0, 256), (0, 256)))
    folder = tmp_path / "loose"
    folder.mkdir()
    with rasterio.open(folder / "T33UUU_20190105T101032_B08.tif", "w", dtype="uint16", count=1, **profile) as dst:
        dst.write(crop, 1)
        dst.update_tags(PROCESSING_BASELINE="02.07", PRODUCT="S2MSI1C")
    with rasterio.open(folder / "T33UUU_20190705T101032_TCI.tif", "w", dtype="uint8", count=3, **profile) as dst:
        dst.write(np.stack([(crop // 40).clip(0, 255).astype(np.uint8)] * 3))
    rows = {r["date"]: r for r in local_rows(folder, tmp_path)}
    assert rows["2019-01-05"]["season"] == "winter" and rows["2019-01-05"]["bands"] == "B08"
    assert rows["2019-07-05"]["level"] == "TCI" and rows["2019-07-05"]["bands"] == "B04,B03,B02"


def test_bad_inputs_are_recorded_not_fatal(tmp_path, sample_dir, cfg):
    sample = tmp_path / "sample"
    sample.mkdir()
    index = pd.read_csv(sample_dir / "scenes.csv", dtype=str, keep_default_na=False)
    index = index[index.aoi == "oscd-pisa"].copy()
    (sample / "oscd").mkdir()
    shutil.copytree(sample_dir / "oscd/pisa", sample / "oscd/pisa")
    (sample / "oscd/pisa/20180211.tif").write_bytes(b"II*\x00 truncated")  # corrupt
    missing = index.iloc[0].copy()
    missing["scene_id"], missing["path"] = "oscd-pisa-missing", "oscd/pisa/19990101.tif"
    index = pd.concat([index, missing.to_frame().T])
    index.to_csv(sample / "scenes.csv", index=False)
    catalogue = write_catalogue(sample_rows(sample, tmp_path), tmp_path / "catalogue.csv").set_index("scene_id")
    assert catalogue.loc["oscd-pisa-20150704", "status"] == "ok"
    for bad in ("oscd-pisa-20180211", "oscd-pisa-missing"):
        assert catalogue.loc[bad, "status"] == "skipped" and catalogue.loc[bad, "reason"]

    # A product without the requested band, with no fallback allowed: skipped, no image written.
    config = cfg.bands.copy()
    config.composite, config.fallback = "nir20", "skip"
    scenes = bands.write_bands(config, catalogue.reset_index(), tmp_path / "bands", tmp_path).set_index("scene_id")
    assert scenes.loc["oscd-pisa-20150704", "status"] == "skipped"
    assert "no band B8A" in scenes.loc["oscd-pisa-20150704", "reason"]
    assert sorted(p.name for p in (tmp_path / "bands").iterdir()) == ["scenes.csv"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ProductError, match="not found"):
        list(local_rows(tmp_path / "nope", tmp_path))


def test_product_offset_rule():
    product = Product(PROJECT_ROOT, "L2A", None, None, {}, processing_baseline=4.0)
    assert product.offset("B08") == BASELINE_OFFSET
    product.offsets["B08"] = 0.0  # a provider that already removed the offset says so in its metadata
    assert product.offset("B08") == 0.0


def test_undescribed_rasters_get_the_same_band_names_in_pipeline_and_inference():
    assert band_names(("B08", "B04")) == ["B08", "B04"]
    assert band_names((None, None, None)) == ["B04", "B03", "B02"]  # an RGB picture: display convention
    assert band_names((None,)) == ["band1"]
