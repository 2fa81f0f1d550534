"""Sentinel-2 from Element84 Earth Search (keyless STAC API + Cloud-Optimized GeoTIFFs).

Only the AOI is read from each band's COG (HTTP range requests through GDAL's /vsicurl/) and
written as <dest>/<scene_id>/T{tile}_{YYYYMMDDTHHMMSS}_{band}.tif with the GeoTIFF tags the
project's reader uses: PRODUCT, DATE, TILE, BAND, PROCESSING_BASELINE, ADD_OFFSET,
QUANTIFICATION_VALUE. The STAC item is kept beside them as item.json.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import rasterio
import requests
from pystac.errors import STACTypeError
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from rasterio.errors import RasterioIOError, WindowError
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds
from tqdm import tqdm

from s2match.data.sources import DownloadError, Scene, choose_scenes, season_windows
from s2match.data.sources.aoi import Aoi, parse_aoi
from s2match.data.sources.http import (
    MAX_PARALLEL, Checksum, FileJob, HttpError, RetryPolicy, download_all, failure_message, status_message,
)
from s2match.fileio import atomic_path, write_text
from s2match.s2.naming import parse_product_name, product_type_of
from s2match.s2.products import BASELINE_OFFSET, DEFAULT_QUANTIFICATION, OFFSET_BASELINE

log = logging.getLogger(__name__)

# Earth Search v1 names band assets by common name (the href ends in the band id, e.g. B8A.tif).
ASSET_KEYS = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22",
    "SCL": "scl", "AOT": "aot", "WVP": "wvp",
}
# The 10, 20 and 60 m grids of a tile share one origin: snapping the AOI outward to 60 m gives every
# band exactly the same ground extent.
GRID_M = 60
CLASS_BANDS = frozenset({"SCL"})  # class maps: no reflectance scaling


def fetch(cfg, dest: Path) -> list[Path]:
    """Search every season window, pick one scene each, read the AOI of each band into `dest`.

    Returns the scene folders (<dest>/<scene_id>) in season order, each once.
    """
    dest = Path(dest)
    aoi = parse_aoi(cfg.aoi, cfg.get("tile"))
    policy = RetryPolicy.from_cfg(cfg)
    workers = int(cfg.max_workers)
    if not 1 <= workers <= MAX_PARALLEL:
        raise ValueError(f"max_workers={workers}: must be 1..{MAX_PARALLEL}")
    chosen = choose_scenes(search(cfg, aoi, policy))
    scenes = list({scene.id: scene for scene in chosen.values()}.values())
    bands = [str(b).upper() for b in cfg.bands]
    if cfg.mask and str(cfg.level).upper() == "L2A" and "SCL" not in bands:
        bands.append("SCL")
    tasks = [(scene, band) for scene in scenes for band in bands]
    env, wanted_type = _gdal_env(cfg), product_type_of(cfg.level)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s2cog") as pool:
        written = pool.map(lambda t: write_band(t[0], t[1], aoi, dest / t[0].id, env, wanted_type), tasks)
        for _ in tqdm(written, total=len(tasks), desc="COG windows", unit="band", disable=None):
            pass
    jobs = [job for scene in scenes for job in _metadata_jobs(scene, cfg.metadata_assets, dest / scene.id)]
    download_all(jobs, policy, max_workers=workers)
    for scene in scenes:
        write_text(dest / scene.id / "item.json", json.dumps(dict(scene.record), indent=1))
    return [dest / scene.id for scene in scenes]


def search(cfg, aoi: Aoi, policy: RetryPolicy) -> dict[str, list[Scene]]:
    """{season: candidate scenes} from the STAC API (pystac-client: POST searches, rel=next paging)."""
    level = str(cfg.level).upper()
    product_type_of(level)  # the configuration is checked before any request
    windows = season_windows(cfg.seasons)
    query = {"eo:cloud_cover": {"lte": float(cfg.max_cloud)}}
    if aoi.tile:
        query["grid:code"] = {"eq": f"MGRS-{aoi.tile}"}
    catalogue = _open_catalogue(str(cfg.api.stac_url), policy)
    candidates = {}
    for season, (first, last) in windows.items():
        found = catalogue.search(method="POST", collections=[cfg.collections[level]],
                                 datetime=f"{first.isoformat()}/{last.isoformat()}", bbox=aoi.bbox,
                                 query=query, limit=int(cfg.page_size))
        items = _stac_call(lambda: list(found.items_as_dicts()), found.url, "POST", policy)
        scenes = [_scene(item, season) for item in items]
        candidates[season] = [s for s in scenes if aoi.tile is None or s.tile == aoi.tile]
        log.info("%s %s..%s: %d candidate items", season, first, last, len(candidates[season]))
    return candidates


def write_band(scene: Scene, band: str, aoi: Aoi, folder: Path, gdal_env: dict, product_type: str) -> Path:
    """Read the AOI window of one band's COG and write it, tagged, to `folder` (skipped if present)."""
    out = folder / f"T{scene.tile}_{scene.sensed.strftime('%Y%m%dT%H%M%S')}_{band}.tif"
    if out.exists():
        return out
    href = _asset_href(scene, band)
    try:
        with rasterio.Env(**gdal_env), rasterio.open(href) as src:
            window = _aoi_window(src, aoi, f"{scene.id} {band}")
            data = src.read(1, window=window)
            profile = {
                "driver": "GTiff", "dtype": src.dtypes[0], "count": 1, "crs": src.crs,
                "transform": src.window_transform(window), "width": window.width, "height": window.height,
                "nodata": src.nodata, "compress": "deflate", "predictor": 2,
                "tiled": True, "blockxsize": 256, "blockysize": 256,
            }
    except RasterioIOError as err:  # GDAL has retried 429 / 5xx itself (GDAL_HTTP_MAX_RETRY)
        raise HttpError(f"{scene.id} {band}: cannot read the COG at {urlsplit(href).netloc} "
                        f"({_first_line(err)}); check the network connection and try again") from None
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data, 1)
        dst.update_tags(**band_tags(scene, band, product_type))
    return out


def band_tags(scene: Scene, band: str, product_type: str) -> dict[str, str]:
    """The tags the reader converts DN with: reflectance = (DN + ADD_OFFSET) / QUANTIFICATION_VALUE."""
    props = scene.record.get("properties", {})
    offset = 0
    if band not in CLASS_BANDS and (scene.processing_baseline or 0.0) >= OFFSET_BASELINE:
        # Earth Search subtracts the offset itself for some items and says so in this property.
        offset = 0 if props.get("earthsearch:boa_offset_applied") else int(BASELINE_OFFSET)
    return {
        "PRODUCT": str(props.get("s2:product_type") or product_type),
        "DATE": scene.sensed.strftime("%Y%m%d"),
        "TILE": f"T{scene.tile}",
        "BAND": band,
        "PROCESSING_BASELINE": _baseline_text(scene.processing_baseline),
        "ADD_OFFSET": str(offset),
        "QUANTIFICATION_VALUE": str(1 if band in CLASS_BANDS else int(DEFAULT_QUANTIFICATION)),
    }


def _aoi_window(src, aoi: Aoi, what: str) -> Window:
    full = Window(0, 0, src.width, src.height)
    if aoi.bbox is None:
        return full
    left, bottom, right, top = transform_bounds("EPSG:4326", src.crs, *aoi.bbox, densify_pts=21)
    x0, y0 = src.transform.c, src.transform.f
    left = x0 + math.floor((left - x0) / GRID_M) * GRID_M
    right = x0 + math.ceil((right - x0) / GRID_M) * GRID_M
    top = y0 - math.floor((y0 - top) / GRID_M) * GRID_M
    bottom = y0 - math.ceil((y0 - bottom) / GRID_M) * GRID_M
    window = from_bounds(left, bottom, right, top, src.transform)
    window = Window(round(window.col_off), round(window.row_off), round(window.width), round(window.height))
    try:
        return window.intersection(full)
    except WindowError:
        raise ValueError(f"{what}: the AOI {aoi.bbox} does not overlap the image") from None


def _asset_href(scene: Scene, band: str) -> str:
    assets = scene.record.get("assets", {})
    key = ASSET_KEYS.get(band)
    asset = assets.get(key) or next(
        (a for a in assets.values() if Path(a.get("href", "")).stem.upper() == band), None)
    if asset is None:
        raise DownloadError(f"{scene.id}: no asset for band {band} (assets: {sorted(assets)})")
    href = asset["href"]
    if not href.startswith(("http://", "https://")):
        raise DownloadError(f"{scene.id} {band}: asset is at {href.split('://')[0]}://, not a keyless https COG "
                         "(Earth Search keeps L1C in a requester-pays bucket): use level L2A or source cdse")
    return href


def _metadata_jobs(scene: Scene, asset_keys, folder: Path) -> list[FileJob]:
    jobs = []
    for key in asset_keys:
        asset = scene.record.get("assets", {}).get(key)
        if asset is None:
            log.warning("%s: no %s asset", scene.id, key)
            continue
        checksum = asset.get("file:checksum")
        jobs.append(FileJob(url=asset["href"], path=folder / Path(asset["href"]).name,
                            size=asset.get("file:size"),
                            checksum=Checksum.from_multihash(checksum) if checksum else None))
    return jobs


def _scene(item: dict, season: str) -> Scene:
    props = item["properties"]
    parsed = parse_product_name(str(props.get("s2:product_uri", "")))
    grid = str(props.get("grid:code", ""))
    tile = ((grid.removeprefix("MGRS-") if grid.startswith("MGRS-") else None) or props.get("s2:mgrs_tile")
            or (parsed and parsed.tile))
    if not tile:
        raise DownloadError(f"STAC item {item.get('id')}: no grid:code, s2:mgrs_tile or product name to tell its tile")
    baseline = props.get("s2:processing_baseline")  # '05.09' or '5.09'
    return Scene(
        id=item["id"],
        name=item["id"],
        season=season,
        tile=tile,
        relative_orbit=props.get("sat:relative_orbit") or (parsed and parsed.relative_orbit),
        cloud_cover=float(props.get("eo:cloud_cover", 100.0)),
        sensed=datetime.fromisoformat(props["datetime"]),
        processing_baseline=float(baseline) if baseline else (parsed and parsed.processing_baseline),
        record=item,
    )


def _open_catalogue(url: str, policy: RetryPolicy) -> Client:
    """The STAC API's landing page, through a StacApiIO that retries by `policy`."""
    stac_io = StacApiIO(max_retries=policy.retry(), timeout=policy.timeouts)
    catalogue = _stac_call(lambda: Client.open(url, stac_io=stac_io, timeout=policy.timeouts), url, "GET", policy)
    if not catalogue.conforms_to("ITEM_SEARCH"):
        raise DownloadError(f"{url}: not a STAC API with item search (no conformance class item-search); "
                            "check download.api.stac_url")
    return catalogue


def _stac_call(call, url: str, method: str, policy: RetryPolicy):
    """`call()`, with pystac-client's failures worded as one line (host, what failed, what to check)."""
    try:
        return call()
    except APIError as err:
        status = getattr(err, "status_code", None)
        if status is not None:
            raise HttpError(status_message(method, url, status, "", policy)) from None
        if isinstance(err.__context__, requests.RequestException):  # pystac-client re-raises it as APIError
            raise HttpError(failure_message(method, url, err.__context__, policy)) from None
        raise HttpError(f"{method} {urlsplit(url).netloc}: {_first_line(err)[:200]}") from None
    except (json.JSONDecodeError, STACTypeError) as err:  # not JSON, or not a STAC object
        raise DownloadError(f"{url}: not a STAC API answer ({type(err).__name__}); "
                            "check download.api.stac_url") from None


def _gdal_env(cfg) -> dict:
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per COG opened
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
        "GDAL_HTTP_MULTIRANGE": "YES",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MAX_RETRY": str(int(cfg.retries)),  # GDAL retries 429 / 5xx itself
        "GDAL_HTTP_RETRY_DELAY": str(float(cfg.backoff_s)),
        "GDAL_HTTP_CONNECTTIMEOUT": str(int(cfg.connect_timeout_s)),
        "GDAL_HTTP_TIMEOUT": str(int(cfg.timeout_s)),
    }


def _baseline_text(baseline: float | None) -> str:
    """The SAFE form of a processing baseline: 5.09 -> '05.09'."""
    return f"{baseline:05.2f}" if baseline is not None else ""


def _first_line(error: Exception) -> str:
    return next(iter(str(error).splitlines()), type(error).__name__)
