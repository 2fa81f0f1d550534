"""GIS layers of a registration run: matches and tie points as lines, the region table as polygons, and the tie
points as ground control points (GCPs) for GDAL (`gcps.vrt`) and the QGIS georeferencer (`gcps.points`).

Vector layers are GeoJSON in image0's CRS, named in the file's `crs` member (EPSG URN; a geographic or code-less CRS
is written as WGS84 lon/lat, OGC CRS84), with coordinates rounded to about a centimetre. GCPs tie a pixel of
image1's file to the map position (image0's CRS) of the same ground, so that `gdalwarp gcps.vrt out.tif` resamples
image1 onto image0's georeference.
Pixel convention (OpenCV): (x, y), (0, 0) the centre of the top-left pixel; GDAL's pixel/line and QGIS's source
coordinates count from the top-left corner, hence the + 0.5.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import rasterio.shutil
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from s2match.geo.georef import WGS84, Grid, map_to_pixel, pixel_to_map, reproject_points

CRS84 = "urn:ogc:def:crs:OGC:1.3:CRS84"
# Decimals of written coordinates: ~1 cm in metres or in degrees (1e-7 deg ~ 1.1 cm); of properties (pixels,
# metres, scores): a thousandth.
METRE_DECIMALS = 2
DEGREE_DECIMALS = 7
VALUE_DECIMALS = 3
QGIS_HEADER = "mapX,mapY,sourceX,sourceY,enable,dX,dY,residual"


@dataclass(frozen=True)
class LayerCRS:
    """The CRS vector layers are written in: image0's when it has an EPSG code and is projected, else CRS84."""

    crs: CRS
    name: str
    decimals: int

    @classmethod
    def of(cls, crs: CRS) -> LayerCRS:
        epsg = crs.to_epsg()
        if crs.is_geographic or epsg is None:
            return cls(WGS84, CRS84, DEGREE_DECIMALS)
        return cls(crs, f"urn:ogc:def:crs:EPSG::{epsg}", METRE_DECIMALS)

    def coordinates(self, grid: Grid, pts: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coords of an image on `grid` -> rounded (N, 2) coordinates in this CRS."""
        return np.round(reproject_points(grid.crs, self.crs, pixel_to_map(grid, pts)), self.decimals)


def _value(value):
    """A table cell as JSON: rounded floats, bools, None for NaN."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else round(float(value), VALUE_DECIMALS)
    return value


def write_layer(path: Path, layer_crs: LayerCRS, geometries: list[dict], properties: pd.DataFrame,
                about: Mapping[str, object]) -> None:
    """A GeoJSON FeatureCollection: one feature per geometry, with that row of `properties`; `about` says what
    the layer holds (a foreign member, ignored by GIS readers)."""
    features = [{"type": "Feature", "geometry": geometry, "properties": {k: _value(v) for k, v in row.items()}}
                for geometry, row in zip(geometries, properties.to_dict("records"))]
    collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": layer_crs.name}},
                  "s2match": dict(about), "features": features}
    path.write_text(json.dumps(collection, separators=(",", ":")))


def write_lines(path: Path, grid0: Grid, grid1: Grid, pts0: np.ndarray, pts1: np.ndarray, properties: pd.DataFrame,
                about: Mapping[str, object]) -> None:
    """Each correspondence as a line from where image0 places the ground to where image1 does (both in image0's
    layer CRS): the line is the misregistration there."""
    layer_crs = LayerCRS.of(grid0.crs)
    start, end = layer_crs.coordinates(grid0, pts0), layer_crs.coordinates(grid1, pts1)
    geometries = [{"type": "LineString", "coordinates": [a.tolist(), b.tolist()]} for a, b in zip(start, end)]
    write_layer(path, layer_crs, geometries, properties, about)


def write_regions(path: Path, grid0: Grid, regions: pd.DataFrame, about: Mapping[str, object]) -> None:
    """The region table (pixel boxes x0, y0, x1, y1 of image0 in pixel edges) as polygons."""
    layer_crs = LayerCRS.of(grid0.crs)
    geometries = []
    for box in regions[["x0", "y0", "x1", "y1"]].to_numpy():
        corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]], [box[0], box[1]]])
        ring = layer_crs.coordinates(grid0, corners - 0.5)  # pixel edges -> pixel coords
        geometries.append({"type": "Polygon", "coordinates": [ring.tolist()]})
    write_layer(path, layer_crs, geometries, regions, about)


@dataclass(frozen=True)
class GCPSource:
    """The raster file GCPs refer to: image1's file (first band of its composite), its georeference (Grid with crs
    None when it has none) and image1's grid, on which the tie points' pixel coords are."""

    path: Path
    file_grid: Grid
    image_grid: Grid

    @classmethod
    def open(cls, path: Path, image_grid: Grid) -> GCPSource:
        with warnings.catch_warnings(), rasterio.open(path) as src:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            file_grid = Grid(src.crs, src.transform, src.width, src.height)
        return cls(Path(path).resolve(), file_grid, image_grid)

    def file_pixels(self, pts1: np.ndarray) -> np.ndarray:
        """Pixel coords of image1's grid -> pixel coords of the file (they differ when image1 was resampled)."""
        if not self.file_grid.georeferenced:
            return np.asarray(pts1, dtype=np.float64)
        return map_to_pixel(self.file_grid, pixel_to_map(self.image_grid, pts1))


def write_gcp_vrt(path: Path, source: GCPSource, pts1: np.ndarray, map0: np.ndarray, crs0: CRS) -> None:
    """A GDAL VRT of image1's file whose georeference is only the GCPs (file pixel/line -> image0's map coords):
    its own geotransform and CRS are left out, so that GDAL warps by the GCPs."""
    pixels = source.file_pixels(pts1) + 0.5
    gcps = [GroundControlPoint(row=float(line), col=float(pixel), x=float(x), y=float(y), id=str(i + 1),
                               info="s2match tie point")
            for i, ((pixel, line), (x, y)) in enumerate(zip(pixels, map0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(source.path, path, driver="VRT")
        with rasterio.open(path, "r+") as vrt:
            vrt.gcps = (gcps, crs0)
    tree = ET.parse(path)
    root = tree.getroot()
    for tag in ("SRS", "GeoTransform"):
        for element in root.findall(tag):
            root.remove(element)
    tree.write(path, encoding="unicode")


def write_qgis_points(path: Path, source: GCPSource, pts1: np.ndarray, map0: np.ndarray, crs0: CRS) -> None:
    """The GCPs as a QGIS georeferencer `.points` file: map coords in image0's CRS (named on the #CRS line) and
    source coords as QGIS reads image1's file: its map coords when georeferenced, else (column, -row)."""
    if source.file_grid.georeferenced:
        sources = pixel_to_map(source.image_grid, pts1)
    else:
        sources = (np.asarray(pts1, dtype=np.float64) + 0.5) * (1.0, -1.0)
    lines = [f"#CRS: {crs0.to_wkt()}", QGIS_HEADER]
    lines += [f"{x!r},{y!r},{sx!r},{sy!r},1,0,0,0" for (x, y), (sx, sy) in zip(map0.tolist(), sources.tolist())]
    path.write_text("\n".join(lines) + "\n")
