"""Sentinel-2 sources for the download stage: the scene record both catalogues fill in, and the
choice of one scene per season.

`cdse.fetch(cfg, dest)` (Copernicus Data Space, SAFE subsets) and `earth_search.fetch(cfg, dest)`
(keyless STAC + COG windows) search every season window, call `choose_scenes`, download, and return
the product folders written under `dest`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

log = logging.getLogger(__name__)

LEVEL_PRODUCT_TYPE = {"L1C": "S2MSI1C", "L2A": "S2MSI2A"}

# Product names carry baseline, relative orbit and tile: S2A_MSIL2A_<t>_N0509_R106_T39QTA_<t>.SAFE
_NAME_FIELDS = re.compile(r"_N(\d{2})(\d{2})_R(\d{3})_T(\d{2}[A-Z]{3})_")


@dataclass(frozen=True)
class Scene:
    id: str  # catalogue id: CDSE product UUID, or STAC item id
    name: str  # product name (SAFE name for CDSE, STAC item id for Earth Search)
    season: str
    tile: str  # MGRS tile id without T, e.g. "36UYA"
    relative_orbit: int | None
    cloud_cover: float
    sensed: datetime
    processing_baseline: str | None  # "05.09"
    record: Mapping = field(default_factory=dict, compare=False, repr=False)  # raw catalogue entry


def parse_product_name(name: str) -> tuple[str | None, int | None, str | None]:
    """(processing baseline "05.09", relative orbit, tile) from a Sentinel-2 product name."""
    match = _NAME_FIELDS.search(name)
    if not match:
        return None, None, None
    major, minor, orbit, tile = match.groups()
    return f"{major}.{minor}", int(orbit), tile


def product_level(level: str) -> str:
    """The product type (S2MSI1C / S2MSI2A) for a configured level, with a clear error otherwise."""
    try:
        return LEVEL_PRODUCT_TYPE[str(level).upper()]
    except KeyError:
        raise ValueError(f"level={level!r}: expected one of {sorted(LEVEL_PRODUCT_TYPE)}") from None


def season_windows(seasons: Mapping) -> dict[str, tuple[date, date]]:
    """{season: (first day, last day)} from the config; both ends are inclusive."""
    windows = {}
    for season, bounds in seasons.items():
        if len(bounds) != 2:
            raise ValueError(f"seasons.{season}: expected [first_day, last_day], got {list(bounds)!r}")
        start, end = (_as_date(b, f"seasons.{season}") for b in bounds)
        if end < start:
            raise ValueError(f"seasons.{season}: {end} is before {start}")
        windows[str(season)] = (start, end)
    if not windows:
        raise ValueError("seasons: at least one season window is needed")
    return windows


def day_after(day: date) -> date:
    return day + timedelta(days=1)


def choose_scenes(candidates: Mapping[str, Sequence[Scene]]) -> dict[str, Scene]:
    """One scene per season: lowest cloud cover, on one tile and one relative orbit where possible.

    The (tile, orbit) pair seen in the most seasons wins (ties: lowest summed best cloud cover), so
    every season shares the viewing geometry; a season without that pair falls back to the same
    tile, then to anything.
    """
    empty = [season for season, scenes in candidates.items() if not scenes]
    if empty:
        raise LookupError(f"no Sentinel-2 scene found for season(s) {', '.join(empty)}: widen the window, "
                          "raise max_cloud or check the AOI")

    def best(scenes: Sequence[Scene]) -> Scene:
        return min(scenes, key=lambda s: (s.cloud_cover, -_baseline(s), s.sensed))

    def score(key) -> tuple[int, float]:
        clouds = [best(m).cloud_cover for m in ([s for s in c if (s.tile, s.relative_orbit) == key]
                                                for c in candidates.values()) if m]
        return len(clouds), -sum(clouds)

    keys = {(s.tile, s.relative_orbit) for scenes in candidates.values() for s in scenes}
    tile, orbit = max(sorted(keys, key=str), key=score)
    chosen = {}
    for season, scenes in candidates.items():
        pool = ([s for s in scenes if (s.tile, s.relative_orbit) == (tile, orbit)]
                or [s for s in scenes if s.tile == tile] or list(scenes))
        chosen[season] = best(pool)
        pick = chosen[season]
        if (pick.tile, pick.relative_orbit) != (tile, orbit):
            log.warning("%s: no scene on tile %s orbit R%s; using %s", season, tile, orbit, pick.name)
        log.info("%s: %s (cloud %.1f%%, tile %s, orbit R%s)", season, pick.name, pick.cloud_cover,
                 pick.tile, pick.relative_orbit)
    return chosen


def _baseline(scene: Scene) -> float:
    try:
        return float(scene.processing_baseline)
    except (TypeError, ValueError):
        return -1.0


def _as_date(value, where: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a date like 2019-01-31") from None
