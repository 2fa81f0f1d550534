"""Find the band files of a Sentinel-2 product and the metadata needed to turn DN into reflectance.

A product is one acquisition of one tile, laid out in one of the ways users have it:
- a `.SAFE` folder (or any folder with a `GRANULE/` inside: the Kaggle 'Deforestation in Ukraine' layout), L1C or
  L2A, band files found by name under `GRANULE/*/IMG_DATA` (L2A: `R10m/R20m/R60m`, finest resolution wins),
  radiometric offsets read from `MTD_MSIL1C.xml` / `MTD_MSIL2A.xml`;
- loose band files named as ESA names them (`T33UUU_20160608T101032_B08.jp2`, `..._B8A_20m.jp2`, `..._TCI.jp2`),
  GeoTIFF or JP2, grouped by tile and acquisition time, with metadata in GeoTIFF tags when present;
- one multi-band raster whose band descriptions (or a given list) name the bands.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from s2match.s2.naming import BAND_FILE, LEVELS, S2_BANDS, SAFE_NAME

TCI_BANDS = ["B04", "B03", "B02"]
RASTER_SUFFIXES = {".jp2", ".tif", ".tiff"}
# Pictures without georeference that inference also takes.
IMAGE_SUFFIXES = RASTER_SUFFIXES | {".png", ".jpg", ".jpeg"}
DEFAULT_QUANTIFICATION = 10000.0
# Processing baseline 04.00 (25 January 2022) added an offset of -1000 to the DN of every band.
OFFSET_BASELINE = 4.0
BASELINE_OFFSET = -1000.0


class ProductError(ValueError):
    """A product that cannot be read as asked; the message names the file and the problem."""


@dataclass
class Product:
    """One acquisition: where each band lives (path, 1-based band index) and its radiometry."""

    path: Path
    level: str  # L1C | L2A | TCI | RGB8 | unknown
    tile: str | None
    acquired: date | None
    bands: dict[str, tuple[Path, int]]
    processing_baseline: float | None = None
    offsets: dict[str, float] = field(default_factory=dict)
    quantification: float = DEFAULT_QUANTIFICATION

    def offset(self, band: str) -> float:
        """DN offset of a band: from the metadata when it has one, else the rule of baseline >= 04.00."""
        if band in self.offsets:
            return self.offsets[band]
        if self.processing_baseline is not None and self.processing_baseline >= OFFSET_BASELINE:
            return BASELINE_OFFSET
        return 0.0


def parse_time(text: str) -> date:
    return datetime.strptime(text[:8], "%Y%m%d").date()


def read_safe_metadata(xml_path: Path) -> tuple[float | None, dict[str, float], float]:
    """(processing baseline, per-band DN offsets, quantification value) from MTD_MSIL1C.xml / MTD_MSIL2A.xml."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ProductError(f"{xml_path}: unreadable product metadata ({err})") from err
    baseline = quantification = None
    offsets: dict[str, float] = {}
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "PROCESSING_BASELINE" and element.text:
            baseline = float(element.text)
        elif tag in ("QUANTIFICATION_VALUE", "BOA_QUANTIFICATION_VALUE") and element.text:
            quantification = float(element.text)
        elif tag in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET") and element.text:
            offsets[S2_BANDS[int(element.get("band_id"))]] = float(element.text)
    return baseline, offsets, quantification or DEFAULT_QUANTIFICATION


def _finest_per_band(files: list[Path]) -> dict[str, tuple[Path, int]]:
    """Band name -> file, keeping the finest resolution when L2A has the band at several."""
    chosen: dict[str, tuple[int, Path]] = {}
    for file in files:
        match = BAND_FILE.match(file.stem)
        if not match or match["band"] == "SCL":
            continue
        res = int(match["res"] or 0)
        if match["band"] not in chosen or res < chosen[match["band"]][0]:
            chosen[match["band"]] = (res, file)
    bands = {name: (path, 1) for name, (_, path) in chosen.items() if name != "TCI"}
    if "TCI" in chosen and not bands:
        bands = {name: (chosen["TCI"][1], i + 1) for i, name in enumerate(TCI_BANDS)}
    return bands


def open_safe(folder: Path) -> Product:
    """A SAFE-layout folder: bands under GRANULE/*/IMG_DATA, metadata from MTD_MSI*.xml."""
    files = sorted(p for p in folder.glob("GRANULE/*/IMG_DATA/**/*") if p.suffix.lower() in RASTER_SUFFIXES)
    bands = _finest_per_band(files)
    if not bands:
        raise ProductError(f"{folder}: no band files under GRANULE/*/IMG_DATA")
    name = SAFE_NAME.match(folder.name)
    first = BAND_FILE.match(next(iter(bands.values()))[0].stem)
    metadata = sorted(folder.glob("MTD_MSIL*.xml"))
    baseline, offsets, quantification = read_safe_metadata(metadata[0]) if metadata else (None, {}, DEFAULT_QUANTIFICATION)
    if baseline is None and name:
        baseline = int(name["baseline"]) / 100
    level = name["level"] if name else ("L2A" if any("MSIL2A" in m.name for m in metadata) else "L1C")
    return Product(
        path=folder,
        level=level,
        tile=(name or first)["tile"] if (name or first) else None,
        acquired=parse_time((name or first)["time"]) if (name or first) else None,
        bands=bands,
        processing_baseline=baseline,
        offsets=offsets,
        quantification=quantification,
    )


def group_loose_band_files(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Loose ESA-named band files grouped into acquisitions: [(T<tile>_<time>, files)]."""
    groups: dict[str, list[Path]] = {}
    for file in files:
        match = BAND_FILE.match(file.stem)
        if match:
            groups.setdefault(f"T{match['tile']}_{match['time']}", []).append(file)
    return sorted(groups.items())


def open_loose(key: str, files: list[Path], tags: dict[str, str]) -> Product:
    """An acquisition given as loose band files; `tags` are the GeoTIFF tags of one of them (may be empty)."""
    tile, time = key[1:].split("_")
    baseline = float(tags["PROCESSING_BASELINE"]) if tags.get("PROCESSING_BASELINE") else None
    bands = _finest_per_band(files)
    offsets = {band: float(tags["ADD_OFFSET"]) for band in bands} if tags.get("ADD_OFFSET") else {}
    level = LEVELS.get(tags.get("PRODUCT", ""), "L1C")
    if set(bands) == set(TCI_BANDS) and all(path.stem.endswith("TCI") for path, _ in bands.values()):
        level = "TCI"
    return Product(
        path=files[0].parent,
        level=level,
        tile=tile,
        acquired=parse_time(time),
        bands=bands,
        processing_baseline=baseline,
        offsets=offsets,
        quantification=float(tags.get("QUANTIFICATION_VALUE", DEFAULT_QUANTIFICATION)),
    )


def band_names(descriptions: tuple) -> list[str]:
    """Band names of a raster: its descriptions, else the display convention (3 or 4 bands are RGB(A), the rest
    band1, band2, ...)."""
    if all(descriptions):
        return list(descriptions)
    if len(descriptions) in (3, 4):
        return TCI_BANDS + ["alpha"] * (len(descriptions) - 3)
    return [f"band{i + 1}" for i in range(len(descriptions))]


def open_raster(path: Path, band_names: list[str] | None, tags: dict[str, str], descriptions: tuple) -> Product:
    """One multi-band raster whose bands are named by `band_names` or by the file's band descriptions."""
    names = band_names or [d for d in descriptions if d]
    if len(names) != len(descriptions):
        raise ProductError(
            f"{path}: {len(descriptions)} bands but {len(names)} band names ({','.join(names) or 'none'})"
        )
    baseline = float(tags["PROCESSING_BASELINE"]) if tags.get("PROCESSING_BASELINE") else None
    offsets = {name: float(tags["ADD_OFFSET"]) for name in names} if tags.get("ADD_OFFSET") else {}
    return Product(
        path=path,
        level=LEVELS.get(tags.get("PRODUCT", ""), "unknown"),
        tile=tags.get("TILE"),
        acquired=parse_time(tags["DATE"]) if tags.get("DATE") else None,
        bands={name: (path, i + 1) for i, name in enumerate(names)},
        processing_baseline=baseline,
        offsets=offsets,
        quantification=float(tags.get("QUANTIFICATION_VALUE", DEFAULT_QUANTIFICATION)),
    )


def _raster_header(path: Path) -> tuple[dict[str, str], tuple, bool]:
    """(tags, band descriptions, georeferenced) of a raster or picture; ProductError when unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.tags(), src.descriptions, src.crs is not None
    except RasterioError as err:
        raise ProductError(f"{path}: unreadable image ({str(err).splitlines()[0]})") from err


def open_product(path: Path) -> Product:
    """The one product opener: a SAFE-layout folder, one band file of a loose ESA-named product (its sibling band
    files in the folder join it), or one raster or picture whose bands are named by their descriptions."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: input image not found")
    if path.is_dir():
        return open_safe(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        known = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ProductError(f"{path}: unsupported image format (use {known} or a .SAFE folder)")
    tags, descriptions, georeferenced = _raster_header(path)
    if georeferenced and BAND_FILE.match(path.stem) and path.suffix.lower() in RASTER_SUFFIXES:
        siblings = [p for p in sorted(path.parent.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES]
        key, files = next((key, files) for key, files in group_loose_band_files(siblings) if path in files)
        return open_loose(key, files, tags)
    return open_raster(path, band_names(descriptions), tags, descriptions)


def baseline_name(product: Product) -> str:
    """The processing baseline as ESA writes it in product names (N0500), or 'no baseline'."""
    baseline = product.processing_baseline
    return "no baseline" if baseline is None else f"N{round(baseline * 100):04d}"


def preferred_product(products: list[Product]) -> Product:
    """Of several products of one acquisition (one tile, one date), the one to keep: the newest processing baseline
    (a reprocessing with a newer baseline corrects the older), then the last name in sort order."""
    return max(products, key=lambda p: (-1.0 if p.processing_baseline is None else p.processing_baseline,
                                        p.path.name))


def find_products(folder: Path) -> Iterable[tuple[str, Product | Exception]]:
    """Every product under a user's folder, each opened by open_product (or the error that stopped it): SAFE-layout
    folders, acquisitions of loose ESA-named band files, other rasters."""
    safe_dirs = sorted({p.parent.parent for p in folder.rglob("GRANULE/*") if p.is_dir()})
    loose = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in RASTER_SUFFIXES
             and not any(s == p or s in p.parents for s in safe_dirs)]
    grouped = group_loose_band_files(loose)
    in_groups = {f for _, files in grouped for f in files}
    named = [(safe.name.removesuffix(".SAFE"), safe) for safe in safe_dirs]
    named += [(key, files[0]) for key, files in grouped]
    named += [(path.stem, path) for path in loose if path not in in_groups]
    for scene_id, path in named:
        try:
            yield scene_id, open_product(path)
        except (ProductError, FileNotFoundError) as err:
            yield scene_id, err
