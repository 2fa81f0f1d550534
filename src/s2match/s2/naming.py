"""Sentinel-2 names: band ids, product types, and what ESA's product and band-file names hold.

The one home of this naming for the product readers (`s2.products`) and the catalogue clients
(`data.sources`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ESA band order: `band_id` in the product metadata indexes this list.
S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]

# Processing level -> product type, as catalogues and the GeoTIFF PRODUCT tag write it.
PRODUCT_TYPES = {"L1C": "S2MSI1C", "L2A": "S2MSI2A"}
LEVELS = {product_type: level for level, product_type in PRODUCT_TYPES.items()}

# S2A_MSIL2A_20190115T090321_N0211_R007_T36UYA_20190115T111111.SAFE: level, sensing time, processing
# baseline (N0211 = 02.11), relative orbit, tile.
SAFE_NAME = re.compile(
    r"^S2[A-D]_MSI(?P<level>L1C|L2A)_(?P<time>\d{8}T\d{6})_N(?P<baseline>\d{4})_R(?P<orbit>\d{3})"
    r"_T(?P<tile>\d{2}[A-Z]{3})"
)
# Band files as ESA names them: T33UUU_20160608T101032_B08.jp2, ..._B8A_20m.jp2, ..._TCI.jp2 (stems).
BAND_FILE = re.compile(
    r"^(?:.*_)?T(?P<tile>\d{2}[A-Z]{3})_(?P<time>\d{8}T\d{6})_(?P<band>B\d[0-9A]|TCI|SCL)(?:_(?P<res>\d+)m)?$"
)


@dataclass(frozen=True)
class ProductName:
    level: str  # L1C | L2A
    processing_baseline: float  # N0211 -> 2.11
    relative_orbit: int
    tile: str  # MGRS tile id without the leading T


def parse_product_name(name: str) -> ProductName | None:
    """What a Sentinel-2 product name (SAFE folder, CDSE product, STAC s2:product_uri) tells; None for others."""
    match = SAFE_NAME.match(name)
    if not match:
        return None
    return ProductName(match["level"], int(match["baseline"]) / 100, int(match["orbit"]), match["tile"])


def product_type_of(level: str) -> str:
    """The product type (S2MSI1C / S2MSI2A) of a processing level, with a clear error otherwise."""
    try:
        return PRODUCT_TYPES[str(level).upper()]
    except KeyError:
        raise ValueError(f"level={level!r}: expected one of {sorted(PRODUCT_TYPES)}") from None
