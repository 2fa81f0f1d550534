"""Area of interest for a Sentinel-2 search: a lon/lat bbox, a GeoJSON file, or an MGRS tile id.

A tile id filters the catalogue by its tile property (no MGRS library needed); a bbox limits the
search spatially and, for Earth Search, the window read from each COG. Both may be given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import ListConfig
from rasterio import features

# Sentinel-2 tile ids: UTM zone 01-60, latitude band C-X (no I, O), 100 km square (no I, O).
_TILE = re.compile(r"^T?(\d{1,2})([C-HJ-NP-X])([A-HJ-NP-Z]{2})$", re.IGNORECASE)

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Aoi:
    bbox: BBox | None  # (min_lon, min_lat, max_lon, max_lat), WGS84
    tile: str | None  # MGRS tile id without the leading T, e.g. "36UYA"

    def wkt(self) -> str:
        """The bbox as a WKT polygon (lon lat order), as OData's Intersects expects."""
        if self.bbox is None:
            raise ValueError("this AOI has no bbox")
        x0, y0, x1, y1 = self.bbox
        return f"POLYGON(({x0} {y0},{x1} {y0},{x1} {y1},{x0} {y1},{x0} {y0}))"


def parse_aoi(aoi, tile: str | None = None) -> Aoi:
    """Read the `aoi` config value (bbox list, GeoJSON path or tile id) plus an optional tile filter."""
    tile_id = parse_tile(tile) if tile else None
    if isinstance(aoi, str) and _TILE.match(aoi.strip()):
        aoi_tile = parse_tile(aoi)
        if tile_id and tile_id != aoi_tile:
            raise ValueError(f"aoi tile {aoi_tile} and tile {tile_id} disagree")
        return Aoi(bbox=None, tile=aoi_tile)
    if isinstance(aoi, str):
        return Aoi(bbox=_geojson_bounds(Path(aoi)), tile=tile_id)
    if isinstance(aoi, (list, tuple, ListConfig)):
        return Aoi(bbox=_check_bbox(list(aoi), "aoi"), tile=tile_id)
    if aoi is None and tile_id:
        return Aoi(bbox=None, tile=tile_id)
    raise ValueError(f"aoi={aoi!r}: expected [min_lon, min_lat, max_lon, max_lat], a GeoJSON file or an MGRS tile id")


def parse_tile(value: str) -> str:
    match = _TILE.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not an MGRS tile id like 36UYA")
    zone, band, square = match.groups()
    return f"{int(zone):02d}{band.upper()}{square.upper()}"


def _check_bbox(values: list, where: str) -> BBox:
    if len(values) != 4:
        raise ValueError(f"{where}: a bbox needs 4 numbers [min_lon, min_lat, max_lon, max_lat], got {len(values)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbox values must be numbers, got {values!r}") from None
    if not (-180 <= x0 < x1 <= 180 and -90 <= y0 < y1 <= 90):
        raise ValueError(f"{where}: bbox {values!r} is not min_lon < max_lon, min_lat < max_lat in degrees")
    return x0, y0, x1, y1


def _geojson_bounds(path: Path) -> BBox:
    if not path.is_file():
        raise ValueError(f"{path}: AOI file not found (and not an MGRS tile id)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid GeoJSON ({exc})") from None
    try:
        box = features.bounds(doc)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise ValueError(f"{path}: GeoJSON has no coordinates (expected a geometry, Feature or "
                         "FeatureCollection)") from None
    return _check_bbox(list(box), str(path))
