"""The scene catalogue: one row per acquisition, whatever source it came from.

Columns: s2match.data.tables.CATALOGUE (scene_id, aoi, date, season, level, bands, CRS, transform, size, path,
band files, processing baseline, radiometric offsets, source, status, reason). `status` is `ok` or `skipped`
(with `reason`): bad inputs are logged and recorded here, never dropped silently. Two products of one acquisition
(one tile and date, e.g. processing baselines N0204 and N0500 of one scene): the newer baseline is kept, the other
recorded as skipped under its own product name.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from rasterio.warp import transform_bounds

from s2match.data.tables import CATALOGUE, make_table, read_table, require_usable, write_table
from s2match.s2.products import Product, ProductError, baseline_name, find_products, open_raster, preferred_product

log = logging.getLogger(__name__)

NORTHERN_SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
                    6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
OPPOSITE = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}


def season_of(day: date, latitude: float) -> str:
    """Meteorological season, flipped in the southern hemisphere."""
    season = NORTHERN_SEASONS[day.month]
    return season if latitude >= 0 else OPPOSITE[season]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def describe(product: Product, root: Path) -> dict:
    """Catalogue columns read from the product's first band file (all bands share its footprint)."""
    band_path, _ = next(iter(product.bands.values()))
    try:
        with rasterio.open(band_path) as src:
            crs, transform, width, height, dtype = src.crs, src.transform, src.width, src.height, src.dtypes[0]
            bounds = src.bounds
    except RasterioError as err:
        raise ProductError(f"{band_path}: unreadable raster ({err})") from err
    if crs is None:
        raise ProductError(f"{band_path}: no georeference (CRS missing)")
    lonlat = transform_bounds(crs, "EPSG:4326", *bounds)
    return {
        "level": product.level,
        "bands": ",".join(product.bands),
        "dtype": dtype,
        "crs": crs.to_string(),
        "transform": json.dumps(list(transform)[:6]),
        "width": width,
        "height": height,
        "pixel_size": abs(transform.a),
        "bounds_lonlat": json.dumps([round(v, 7) for v in lonlat]),
        "path": _relative(product.path, root),
        "band_files": json.dumps({b: [_relative(p, root), i] for b, (p, i) in product.bands.items()}),
        "processing_baseline": product.processing_baseline,
        "offsets": json.dumps({band: product.offset(band) for band in product.bands}),
        "quantification": product.quantification,
        "status": "ok",
        "reason": "",
    }


def skipped(scene_id: str, aoi: str, path: str, source: str, reason: str) -> dict:
    log.warning("skipped %s: %s", scene_id, reason)
    return {"scene_id": scene_id, "aoi": aoi, "path": path, "source": source, "status": "skipped", "reason": reason}


def sample_rows(folder: Path, root: Path) -> Iterable[dict]:
    """Rows for the bundled sample: scenes.csv names each scene, its AOI, season and bands."""
    index = folder / "scenes.csv"
    if not index.is_file():
        raise ProductError(f"{index}: sample index missing (run `dvc pull`)")
    for scene in pd.read_csv(index, dtype=str, keep_default_na=False).to_dict("records"):
        path = folder / scene["path"]
        names = scene["bands"].split(",")
        names = ["TCI-gray"] if names == ["TCI-gray"] else names
        try:
            with rasterio.open(path) as src:
                tags, descriptions = src.tags(), src.descriptions
            if names == ["unknown-single"]:
                names = ["unknown"]
            row = describe(open_raster(path, names, tags, descriptions), root)
        except (RasterioError, ProductError) as err:
            yield skipped(scene["scene_id"], scene["aoi"], _relative(path, root), scene["source"], str(err).splitlines()[0])
            continue
        row.update(scene_id=scene["scene_id"], aoi=scene["aoi"], date=scene["date"], season=scene["season"],
                   source=scene["source"])
        row["level"] = scene["product"] if row["level"] == "unknown" else row["level"]
        yield row


def local_rows(folder: Path, root: Path, source: str = "local") -> Iterable[dict]:
    """Rows for a folder of Sentinel-2 products; AOI = MGRS tile (else the parent folder's name). Of two products of
    one acquisition, the newer processing baseline is kept (s2match.s2.products.preferred_product)."""
    if not folder.is_dir():
        raise ProductError(f"{folder}: folder of products not found")
    described: dict[str, list[tuple[str, Product, dict]]] = defaultdict(list)
    for scene_id, product in find_products(folder):
        if isinstance(product, Exception):
            yield skipped(scene_id, "", str(folder), source, str(product).splitlines()[0])
            continue
        aoi = f"T{product.tile}" if product.tile else product.path.parent.name
        try:
            row = describe(product, root)
        except ProductError as err:
            yield skipped(scene_id, aoi, _relative(product.path, root), source, str(err))
            continue
        when = product.acquired
        latitude = sum(json.loads(row["bounds_lonlat"])[1::2]) / 2
        row.update(scene_id=f"{aoi}-{when:%Y%m%d}" if when else scene_id, aoi=aoi,
                   date=when.isoformat() if when else "", season=season_of(when, latitude) if when else "",
                   source=source)
        described[row["scene_id"]].append((scene_id, product, row))
    for members in described.values():
        kept = preferred_product([product for _, product, _ in members])
        for product_id, product, row in members:
            if product is kept:
                yield row
            else:
                yield skipped(product_id, row["aoi"], row["path"], source,
                              f"same tile and date as {_relative(kept.path, root)} ({baseline_name(kept)}), which "
                              f"is kept: {baseline_name(product)} is an older processing baseline")


def write_catalogue(rows: Iterable[dict], path: Path) -> pd.DataFrame:
    """Write the catalogue; no usable scene, or two usable rows with one scene id, is a one-line ProductError."""
    frame = make_table(rows, CATALOGUE)
    if frame.empty:
        raise ProductError(f"{path}: no scene found, nothing to catalogue; check the download configuration "
                           f"(download.folder, download.aoi, download.seasons)")
    require_usable(frame, frame["status"] == "ok", path, "scene")
    usable = frame[frame["status"] == "ok"]
    duplicated = usable[usable["scene_id"].duplicated(keep=False)]
    if len(duplicated):
        scene_id = duplicated["scene_id"].iloc[0]
        paths = duplicated.loc[duplicated["scene_id"] == scene_id, "path"]
        raise ProductError(f"{path}: scene id {scene_id} names several scenes ({', '.join(paths)}); give each its "
                           f"own id")
    write_table(frame, path, CATALOGUE)
    return frame


def read_catalogue(path: Path, only_ok: bool = True) -> pd.DataFrame:
    frame = read_table(path, CATALOGUE, "download")
    return frame[frame["status"] == "ok"].reset_index(drop=True) if only_ok else frame


def product_of(row: dict, root: Path) -> Product:
    """The Product a catalogue row describes (band files resolved against the project root)."""
    band_files = {band: (root / path, index) for band, (path, index) in json.loads(row["band_files"]).items()}
    baseline = row["processing_baseline"]
    return Product(
        path=root / row["path"],
        level=row["level"],
        tile=None,
        acquired=date.fromisoformat(row["date"]) if row["date"] else None,
        bands=band_files,
        processing_baseline=None if baseline in ("", None) or pd.isna(baseline) else float(baseline),
        offsets=json.loads(row["offsets"]),
        quantification=float(row["quantification"]),
    )


def build_catalogue(cfg, root: Path) -> Iterable[dict]:
    """Catalogue rows for the configured source (`download` config group)."""
    if cfg.source == "sample":
        return sample_rows(Path(cfg.sample_dir), root)
    if cfg.source == "local":
        return local_rows(Path(cfg.folder), root)
    if cfg.source in ("cdse", "earth_search"):
        # Remote sources download into a SAFE-like folder; from there a scene is a scene.
        from importlib import import_module

        fetch = import_module(f"s2match.data.sources.{cfg.source}").fetch
        dest = Path(cfg.dest)
        fetch(cfg, dest)
        return local_rows(dest, root, source=cfg.source)
    raise ProductError(f"download.source={cfg.source}: unknown source (sample, local, cdse, earth_search)")
