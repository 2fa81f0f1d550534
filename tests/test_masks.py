"""Cloud masks (s2match.s2.masks): where each product kind keeps its own, and reading them onto any grid.

The masks are written here in the layouts the download stage fetches (L2A SCL at 20 m, L1C MSK_CLASSI_B00.jp2 at
60 m, older L1C MSK_CLOUDS_B00.gml polygons) on the georeference of a real sample crop (T33UUU, UTM 33N, 10 m).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from s2match.config import PROJECT_ROOT
from s2match.geo.georef import Grid
from s2match.inference.scenes import open_image
from s2match.s2.masks import CloudMask, MaskClasses, find_cloud_mask
from s2match.s2.products import ProductError, open_product
from s2match.timeseries.stack import CloudMaskedScene

JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160529.jp2"
CLASSES = MaskClasses(scl=("cloud_shadow", "cloud_high_probability"), classi=("opaque_clouds", "cirrus"),
                      gml=("OPAQUE",))


@pytest.fixture(scope="module")
def crop():
    """(data (1, 120, 120) uint16, 10 m transform, CRS) of the real JP2 sample, its corner on the 20 m grid of
    Sentinel-2 tiles (as masks' polygons are)."""
    window = Window(600, 901, 120, 120)
    with rasterio.open(JP2) as src:
        return src.read(window=window), src.window_transform(window), src.crs


def write(path: Path, data: np.ndarray, transform: Affine, crs, driver: str = "GTiff") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver=driver, dtype=data.dtype, count=data.shape[0], height=data.shape[1], width=data.shape[2],
                   crs=crs, transform=transform)
    if driver == "JP2OpenJPEG":
        profile.update(QUALITY=100, REVERSIBLE="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def coarser(transform: Affine, factor: int) -> Affine:
    return transform * Affine.scale(factor)


def test_scl_classes_are_read_onto_a_finer_and_a_coarser_grid(tmp_path, crop):
    _, transform, crs = crop
    scl = np.full((1, 60, 60), 4, np.uint8)  # vegetation
    scl[0, 10:20, 10:30] = 9   # cloud, high probability
    scl[0, 40:50, 0:10] = 3    # cloud shadow
    scl[0, 30:40, 40:60] = 11  # snow: ground, matched
    mask = CloudMask(write(tmp_path / "T33UUU_20160529T101032_SCL.tif", scl, coarser(transform, 2), crs), "SCL")
    fine = mask.cloud_fraction(Grid(crs, transform, 120, 120), CLASSES)
    expected = np.zeros((120, 120), np.float32)
    expected[20:40, 20:60] = 1
    expected[80:100, 0:20] = 1
    np.testing.assert_array_equal(fine, expected)
    # 4 x 4 SCL pixels per output pixel: a pixel a cloud's edge crosses keeps the share of it that is cloud
    coarse = mask.cloud_fraction(Grid(crs, coarser(transform, 8), 15, 15), CLASSES)
    assert coarse.shape == (15, 15) and coarse[3, 3] == 1 and coarse[8, 8] == 0
    assert coarse[2, 3] == pytest.approx(0.5) and coarse[2, 2] == pytest.approx(0.25)
    assert coarse.sum() == pytest.approx(expected.sum() / 64)


def test_msk_classi_masks_opaque_clouds_and_cirrus_not_snow(tmp_path, crop):
    _, transform, crs = crop
    layers = np.zeros((3, 20, 20), np.uint8)
    layers[0, 0:5, 0:5] = 1    # opaque
    layers[1, 10:15, 0:5] = 1  # cirrus
    layers[2, 0:5, 10:20] = 1  # snow
    path = write(tmp_path / "MSK_CLASSI_B00.jp2", layers, coarser(transform, 6), crs, driver="JP2OpenJPEG")
    fraction = CloudMask(path, "MSK_CLASSI").cloud_fraction(Grid(crs, transform, 120, 120), CLASSES)
    assert fraction[:30, :30].min() == 1 and fraction[60:90, :30].min() == 1
    assert fraction[:30, 60:].max() == 0 and fraction.mean() == pytest.approx(2 * 30 * 30 / 120**2)
    only_opaque = MaskClasses(scl=(), classi=("opaque_clouds",), gml=())
    assert CloudMask(path, "MSK_CLASSI").cloud_fraction(Grid(crs, transform, 120, 120), only_opaque)[60:90, :30].max() == 0


def gml(polygons: list[tuple[str, list[list[tuple[float, float]]]]], epsg: int) -> str:
    features = "".join(f"""
    <eop:MaskFeature gml:id="{kind}.{i}">
      <eop:maskType codeSpace="urn:gs2:S2PDGS:maskType">{kind}</eop:maskType>
      <eop:extentOf><gml:Polygon gml:id="{kind}.{i}_Polygon">{''.join(
          f'<gml:{"exterior" if r == 0 else "interior"}><gml:LinearRing><gml:posList srsDimension="2">'
          + " ".join(f"{x} {y}" for x, y in ring) + f'</gml:posList></gml:LinearRing></gml:{"exterior" if r == 0 else "interior"}>'
          for r, ring in enumerate(rings))}</gml:Polygon></eop:extentOf>
    </eop:MaskFeature>""" for i, (kind, rings) in enumerate(polygons))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<eop:Mask xmlns:eop="http://www.opengis.net/eop/2.0" xmlns:gml="http://www.opengis.net/gml/3.2" gml:id="MSK_CLOUDS">
  <gml:boundedBy><gml:Envelope srsName="urn:ogc:def:crs:EPSG:8.7:{epsg}">
    <gml:lowerCorner>0 0</gml:lowerCorner><gml:upperCorner>1 1</gml:upperCorner></gml:Envelope></gml:boundedBy>
  <eop:maskMembers>{features}
  </eop:maskMembers>
</eop:Mask>"""


def test_msk_clouds_gml_polygons_with_holes_are_burnt_by_type(tmp_path, crop):
    _, transform, crs = crop
    x0, y0 = transform.c, transform.f  # top-left corner of the crop, metres
    square = [(x0 + 240, y0 - 240), (x0 + 840, y0 - 240), (x0 + 840, y0 - 840), (x0 + 240, y0 - 840), (x0 + 240, y0 - 240)]
    hole = [(x0 + 420, y0 - 420), (x0 + 660, y0 - 420), (x0 + 660, y0 - 660), (x0 + 420, y0 - 660), (x0 + 420, y0 - 420)]
    cirrus = [(x0, y0 - 1020), (x0 + 300, y0 - 1020), (x0 + 300, y0 - 1200), (x0, y0 - 1200), (x0, y0 - 1020)]
    path = tmp_path / "MSK_CLOUDS_B00.gml"
    path.write_text(gml([("OPAQUE", [square, hole]), ("CIRRUS", [cirrus])], crs.to_epsg()))
    fraction = CloudMask(path, "MSK_CLOUDS").cloud_fraction(Grid(crs, transform, 120, 120), CLASSES)
    expected = np.zeros((120, 120), np.float32)
    expected[24:84, 24:84] = 1
    expected[42:66, 42:66] = 0
    np.testing.assert_array_equal(fraction, expected)  # CIRRUS is not in CLASSES.gml
    empty = tmp_path / "cloudless.gml"
    empty.write_text('<eop:Mask xmlns:eop="http://www.opengis.net/eop/2.0" xmlns:gml="http://www.opengis.net/gml/3.2">'
                     '<gml:boundedBy><gml:Null>inapplicable</gml:Null></gml:boundedBy><eop:maskMembers/></eop:Mask>')
    assert CloudMask(empty, "MSK_CLOUDS").cloud_fraction(Grid(crs, transform, 120, 120), CLASSES).max() == 0
    broken = tmp_path / "broken.gml"
    broken.write_text("<eop:Mask")
    with pytest.raises(ProductError, match="broken.gml: unreadable cloud mask"):
        CloudMask(broken, "MSK_CLOUDS").cloud_fraction(Grid(crs, transform, 120, 120), CLASSES)


def test_each_product_layout_finds_its_own_mask(tmp_path, crop):
    band, transform, crs = crop
    l2a = tmp_path / "S2A_MSIL2A_20160529T101032_N0500_R022_T33UUU_20160529T101030.SAFE" / "GRANULE" / "L2A_T33UUU"
    write(l2a / "IMG_DATA" / "R10m" / "T33UUU_20160529T101032_B08_10m.tif", band, transform, crs)
    scl = write(l2a / "IMG_DATA" / "R20m" / "T33UUU_20160529T101032_SCL_20m.jp2", np.full((1, 60, 60), 4, np.uint8),
                coarser(transform, 2), crs, driver="JP2OpenJPEG")
    assert find_cloud_mask(open_product(l2a.parent.parent)) == CloudMask(scl, "SCL")
    l1c = tmp_path / "S2A_MSIL1C_20160529T101032_N0202_R022_T33UUU_20160529T101030.SAFE" / "GRANULE" / "L1C_T33UUU"
    write(l1c / "IMG_DATA" / "T33UUU_20160529T101032_B08.tif", band, transform, crs)
    assert find_cloud_mask(open_product(l1c.parent.parent)) is None
    old = l1c / "QI_DATA" / "S2A_OPER_MSK_CLOUDS_SGS__20160529T154211_A004868_T33UUU_B00_MSIL1C.gml"
    old.parent.mkdir()
    old.write_text(gml([], crs.to_epsg()))
    assert find_cloud_mask(open_product(l1c.parent.parent)) == CloudMask(old, "MSK_CLOUDS")
    classi = write(l1c / "QI_DATA" / "MSK_CLASSI_B00.jp2", np.zeros((3, 20, 20), np.uint8), coarser(transform, 6), crs,
                   driver="JP2OpenJPEG")
    assert find_cloud_mask(open_product(l1c.parent.parent)) == CloudMask(classi, "MSK_CLASSI")
    loose = write(tmp_path / "loose" / "T33UUU_20160529T101032_B08.tif", band, transform, crs)
    write(tmp_path / "loose" / "T33UUU_20160608T101032_SCL.tif", np.zeros((1, 60, 60), np.uint8), coarser(transform, 2), crs)
    assert find_cloud_mask(open_product(loose)) is None  # another date's SCL
    own = write(tmp_path / "loose" / "T33UUU_20160529T101032_SCL.tif", np.zeros((1, 60, 60), np.uint8),
                coarser(transform, 2), crs)
    assert find_cloud_mask(open_product(loose)) == CloudMask(own, "SCL")


def test_matching_sees_no_data_wherever_a_pixel_has_cloud(tmp_path, crop):
    band, transform, crs = crop
    image = write(tmp_path / "T33UUU_20160529T101032_B08.tif", band, transform, crs)
    scl = np.full((1, 60, 60), 4, np.uint8)
    scl[0, 0:30, 0:15] = 9
    write(tmp_path / "T33UUU_20160529T101032_SCL.tif", scl, coarser(transform, 2), crs)
    scene = open_image(image, "nir", {"nir": ["B08"]}, "gray", None)
    masked = CloudMaskedScene(scene, find_cloud_mask(scene.product), CLASSES)
    full = masked.read((0, 0, 120, 120), (120, 120))
    assert np.isnan(full[0, :60, :30]).all() and np.isfinite(full[0, 60:, :]).all() and np.isfinite(full[0, :, 30:]).all()
    # decimated 4x: the column of output pixels across the cloud's edge (30 px = 7.5 output px) is masked too
    small = masked.read((0, 0, 120, 120), (30, 30))
    assert np.isnan(small[0, :15, :8]).all() and np.isfinite(small[0, :15, 8:]).all()
    assert "cloud-masked by SCL" in masked.name


def test_unknown_mask_class_names_the_key():
    with pytest.raises(ValueError, match=r"masks.scl: unknown \['clouds'\]"):
        MaskClasses.from_config({"scl": ["clouds"], "classi": [], "gml": []})
