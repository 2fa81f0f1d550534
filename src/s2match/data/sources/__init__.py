"""Sentinel-2 sources for the download stage: the scene record both catalogues fill in, and the
choice of one scene per season.

`cdse.fetch(cfg, dest)` (Copernicus Data Space, SAFE subsets) and `earth_search.fetch(cfg, dest)`
(keyless STAC + COG windows) search every season window, call `choose_scenes`, download, and return
the product folders written under `dest`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

log = logging.getLogger(__name__)


class DownloadError(ValueError):
    """A download that cannot go on: network, service, account or an empty search. The message is one line
    that names the host or setting and what to check; the entry scripts print it without a traceback."""


@dataclass(frozen=True)
class Scene:
    id: str  # catalogue id: CDSE product UUID, or STAC item id
    name: str  # product name (SAFE name for CDSE, STAC item id for Earth Search)
    season: str
    tile: str  # MGRS tile id without T, e.g. "36UYA"
    relative_orbit: int | None
    cloud_cover: float
    sensed: datetime
    processing_baseline: float | None  # 5.09 for N0509
    record: Mapping = field(default_factory=dict, compare=False, repr=False)  # raw catalogue entry


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
        raise DownloadError(f"no Sentinel-2 scene found for season(s) {', '.join(empty)}: widen the window, "
                          "raise max_cloud or check the AOI")

    def best(scenes: Sequence[Scene]) -> Scene:
        return min(scenes, key=lambda s: (s.cloud_cover, -(s.processing_baseline or 0.0), s.sensed))

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


def _as_date(value, where: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a date like 2019-01-31") from None
