"""The cloud masks Sentinel-2 products carry, read onto any grid: True where a pixel must not be matched.

Where each lives (what the download stage fetches with `download.mask: true`):
- L2A: the scene classification SCL (20 m): `GRANULE/*/IMG_DATA/R20m/*_SCL_20m.jp2` in a SAFE folder, or a loose
  `T<tile>_<time>_SCL.tif` beside the band files (Earth Search), or a band named SCL in a multi-band raster;
- L1C, processing baseline >= 04.00: `GRANULE/*/QI_DATA/MSK_CLASSI_B00.jp2` (60 m; band 1 opaque clouds, band 2
  cirrus, band 3 snow and ice);
- L1C, older baselines: `GRANULE/*/QI_DATA/MSK_CLOUDS_B00.gml`, cloud polygons (OPAQUE, CIRRUS) in the tile's CRS.

Which classes count as cloud is a setting (`coregister.masks`: SCL classes and MSK_CLASSI layers by name, GML mask
types). Read onto any grid as the share of each pixel that is cloud: matching masks every pixel with some cloud
(a cloud edge is never matched), the survey of a date averages them.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.features import rasterize
from rasterio.transform import Affine, array_bounds, from_origin
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from s2match.geo.georef import Grid
from s2match.s2.products import BAND_FILE, Product, ProductError

# Scene classification of L2A (Sen2Cor), value -> name.
SCL_CLASSES = {0: "no_data", 1: "saturated_or_defective", 2: "dark_area", 3: "cloud_shadow", 4: "vegetation",
               5: "not_vegetated", 6: "water", 7: "unclassified", 8: "cloud_medium_probability",
               9: "cloud_high_probability", 10: "thin_cirrus", 11: "snow"}
# Layers (1-based bands) of the L1C MSK_CLASSI_B00.jp2 raster.
CLASSI_LAYERS = {"opaque_clouds": 1, "cirrus": 2, "snow": 3}
GML_NS = {"gml": "http://www.opengis.net/gml/3.2", "eop": "http://www.opengis.net/eop/2.0"}
# Mask types of the L1C MSK_CLOUDS_B00.gml polygons.
GML_TYPES = ("OPAQUE", "CIRRUS")
# MSK_CLOUDS polygons follow pixel edges of the 60 m detection grid; every Sentinel-2 grid (10, 20, 60 m) has its
# origin on a multiple of 20 m, so polygons burnt into 20 m pixels aligned on 0 are exact.
GML_PIXEL_M = 20.0


@dataclass(frozen=True)
class MaskClasses:
    """What counts as cloud in each kind of mask (conf/coregister/ `masks`)."""

    scl: tuple[str, ...]
    classi: tuple[str, ...]
    gml: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Sequence[str]]) -> MaskClasses:
        classes = cls(tuple(cfg["scl"]), tuple(cfg["classi"]), tuple(cfg["gml"]))
        for key, names, known in (("scl", classes.scl, set(SCL_CLASSES.values())),
                                  ("classi", classes.classi, set(CLASSI_LAYERS)), ("gml", classes.gml, set(GML_TYPES))):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"masks.{key}: unknown {unknown} (known: {', '.join(sorted(known))})")
        return classes


@dataclass(frozen=True)
class CloudMask:
    """A product's cloud mask: the file, its kind (SCL | MSK_CLASSI | MSK_CLOUDS) and the band of SCL (1, or its
    index in a multi-band raster)."""

    path: Path
    kind: str
    band: int = 1

    def cloud_fraction(self, grid: Grid, classes: MaskClasses) -> np.ndarray:
        """(height, width) float32 on `grid`: the share of each pixel that is cloud by `classes` (> 0: some of the
        pixel is; matching masks those, the survey of a scene averages them)."""
        try:
            cloudy, transform, crs = (self._polygons(grid, classes.gml) if self.kind == "MSK_CLOUDS"
                                      else self._raster(grid, classes))
        except (RasterioIOError, ET.ParseError, OSError, ValueError) as err:
            raise ProductError(f"{self.path}: unreadable cloud mask ({str(err).splitlines()[0]})") from err
        out = np.zeros((grid.height, grid.width), np.float32)
        reproject(cloudy.astype(np.float32), out, src_transform=transform, src_crs=crs, dst_transform=grid.transform,
                  dst_crs=grid.crs, resampling=Resampling.average)
        return out

    def _raster(self, grid: Grid, classes: MaskClasses) -> tuple[np.ndarray, Affine, CRS]:
        """The mask's native pixels over the grid's bounds (one more on each side): cloud or not."""
        with rasterio.open(self.path) as src:
            window = _covering_window(grid, src.crs, src.transform)
            if self.kind == "SCL":
                wanted = [value for value, name in SCL_CLASSES.items() if name in classes.scl]
                cloudy = np.isin(src.read(self.band, window=window, boundless=True, fill_value=0), wanted)
            elif classes.classi:
                layers = [CLASSI_LAYERS[name] for name in classes.classi]
                cloudy = np.any(src.read(layers, window=window, boundless=True, fill_value=0) != 0, axis=0)
            else:
                cloudy = np.zeros((int(window.height), int(window.width)), bool)
            return cloudy, src.window_transform(window), src.crs

    def _polygons(self, grid: Grid, mask_types: Sequence[str]) -> tuple[np.ndarray, Affine, CRS]:
        """The polygons of `mask_types` burnt into GML_PIXEL_M pixels (in their CRS) over the grid's bounds."""
        root = ET.parse(self.path).getroot()
        polygons = [polygon for feature in root.iterfind(".//eop:MaskFeature", GML_NS)
                    if feature.findtext("eop:maskType", default="", namespaces=GML_NS).strip() in mask_types
                    for polygon in feature.iterfind(".//gml:Polygon", GML_NS)]
        if not polygons:  # a cloudless product's file has no features (and may have no envelope)
            return np.zeros((grid.height, grid.width), bool), grid.transform, grid.crs
        crs = _gml_crs(_envelope_srs(root))
        shapes = [{"type": "Polygon", "coordinates": [_ring(ring) for ring in
                                                      polygon.iterfind(".//gml:LinearRing", GML_NS)]}
                  for polygon in polygons]
        left, bottom, right, top = transform_bounds(grid.crs, crs, *array_bounds(grid.height, grid.width,
                                                                                grid.transform))
        left, top = math.floor(left / GML_PIXEL_M) * GML_PIXEL_M, math.ceil(top / GML_PIXEL_M) * GML_PIXEL_M
        width = math.ceil((right - left) / GML_PIXEL_M) + 1
        height = math.ceil((top - bottom) / GML_PIXEL_M) + 1
        transform = from_origin(left, top, GML_PIXEL_M, GML_PIXEL_M)
        burnt = rasterize(shapes, out_shape=(height, width), transform=transform, dtype=np.uint8)
        return burnt > 0, transform, crs


def _covering_window(grid: Grid, crs: CRS, transform: Affine) -> Window:
    """Whole pixels of a raster (crs, transform) covering the grid's bounds, one more on each side."""
    bounds = transform_bounds(grid.crs, crs, *array_bounds(grid.height, grid.width, grid.transform))
    window = from_bounds(*bounds, transform=transform)
    col0, row0 = math.floor(window.col_off) - 1, math.floor(window.row_off) - 1
    col1, row1 = math.ceil(window.col_off + window.width) + 1, math.ceil(window.row_off + window.height) + 1
    return Window(col0, row0, col1 - col0, row1 - row0)


def _envelope_srs(root: ET.Element) -> str:
    """The CRS the polygons are given in: the envelope's (the masks of one tile share it)."""
    envelope = root.find(".//gml:Envelope", GML_NS)
    if envelope is None or not envelope.get("srsName"):
        raise ET.ParseError("cloud polygons but no gml:Envelope srsName")
    return envelope.get("srsName")


def _gml_crs(srs_name: str) -> CRS:
    """`urn:ogc:def:crs:EPSG:8.7:32633` or `EPSG:32633` -> CRS."""
    return CRS.from_epsg(int(srs_name.rsplit(":", 1)[-1]))


def _ring(ring: ET.Element) -> list[tuple[float, float]]:
    """A LinearRing's (x, y) vertices (a third coordinate, when the file has one, is dropped)."""
    positions = ring.find("gml:posList", GML_NS)
    if positions is None or not positions.text:
        raise ET.ParseError("a LinearRing without posList")
    dimension = int(positions.get("srsDimension", 2))
    values = np.array(positions.text.split(), dtype=np.float64).reshape(-1, dimension)[:, :2]
    return [(float(x), float(y)) for x, y in values]


def find_cloud_mask(product: Product) -> CloudMask | None:
    """The product's own cloud mask, or None when it has none (SCL first, then MSK_CLASSI, then MSK_CLOUDS)."""
    if "SCL" in product.bands:
        path, band = product.bands["SCL"]
        return CloudMask(path, "SCL", band)
    if product.path.is_dir() and any(product.path.glob("GRANULE/*")):
        for kind, pattern in (("SCL", "GRANULE/*/IMG_DATA/R20m/*_SCL_20m.jp2"),
                              ("SCL", "GRANULE/*/IMG_DATA/R60m/*_SCL_60m.jp2"),
                              ("MSK_CLASSI", "GRANULE/*/QI_DATA/*MSK_CLASSI*B00*.jp2"),
                              ("MSK_CLOUDS", "GRANULE/*/QI_DATA/*MSK_CLOUDS*B00*.gml")):
            found = sorted(product.path.glob(pattern))
            if found:
                return CloudMask(found[0], kind)
        return None
    # loose ESA-named band files: an SCL file of the same tile and time beside the first band
    first, _ = next(iter(product.bands.values()))
    name = BAND_FILE.match(first.stem)
    if name is None:
        return None
    for sibling in sorted(first.parent.iterdir()):
        match = BAND_FILE.match(sibling.stem)
        if (match and match["band"] == "SCL" and (match["tile"], match["time"]) == (name["tile"], name["time"])
                and sibling.suffix.lower() in (".tif", ".tiff", ".jp2")):
            return CloudMask(sibling, "SCL")
    return None
