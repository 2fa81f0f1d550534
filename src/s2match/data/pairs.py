"""Seasonal pairs of tiles: the same ground on two dates, split by location, with a known homography.

Each pair gets a seeded random homography, its warp; image1 is the second date's tile warped by it. The ground
truth (image0 px -> image1 px) is the warp after the shift between the two dates' georeferences, measured per tile
(`dateshift`), or where a tile cannot tell (cloud), over the AOI's other tiles of the same dates. Splits are by
*location*: AOIs whose footprints touch form one location group, and a group lies wholly in one split, so no ground
of a test AOI is seen in training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from tqdm import tqdm

from s2match.data.dateshift import DateShiftSpec, measure_date_shift
from s2match.data.tables import PAIRS, make_table, read_table
from s2match.fileio import atomic_path
from s2match.geo.georef import boxes_intersect
from s2match.geo.homography import random_homography, warp_image
from s2match.s2.products import ProductError

log = logging.getLogger(__name__)

SEASONS = ["winter", "spring", "summer", "autumn"]
KM_PER_DEGREE = 111.32


def season_kind(season0: str, season1: str) -> str:
    """Order-free label of a pair's seasons, e.g. 'winter-summer', 'summer-summer'."""
    first, second = sorted([season0, season1], key=lambda s: SEASONS.index(s) if s in SEASONS else len(SEASONS))
    return f"{first}-{second}"


def season_priority(kind: str) -> int:
    """Lower comes first: winter-summer, other pairs with winter, other cross-season pairs, same season."""
    first, second = kind.split("-")
    if {first, second} == {"winter", "summer"}:
        return 0
    if "winter" in (first, second) and first != second:
        return 1
    return 2 if first != second else 3


def location_groups(footprints: dict[str, tuple[float, float, float, float]], buffer_km: float) -> dict[str, str]:
    """AOI -> location group: AOIs whose lon/lat boxes, grown by `buffer_km`, intersect (transitively)."""
    parent = {aoi: aoi for aoi in footprints}
    grown = {}
    for aoi, (west, south, east, north) in footprints.items():
        dlat = buffer_km / KM_PER_DEGREE
        dlon = dlat / max(np.cos(np.radians((south + north) / 2)), 1e-6)
        grown[aoi] = (west - dlon, south - dlat, east + dlon, north + dlat)

    def root(aoi: str) -> str:
        while parent[aoi] != aoi:
            parent[aoi] = parent[parent[aoi]]
            aoi = parent[aoi]
        return aoi

    for (a, box_a), (b, box_b) in combinations(sorted(grown.items()), 2):
        if boxes_intersect(box_a, box_b):
            parent[root(b)] = root(a)
    return {aoi: root(aoi) for aoi in footprints}


def assign_splits(groups: dict[str, str], val: list[str], test: list[str]) -> dict[str, str]:
    """AOI -> split. Naming one AOI of a location group for val/test puts the whole group there."""
    named = {**{aoi: "val" for aoi in val}, **{aoi: "test" for aoi in test}}
    unknown = sorted(set(named) - set(groups))
    if unknown:
        log.warning("split names AOIs not in the catalogue: %s", ", ".join(unknown))
    group_split: dict[str, str] = {}
    for aoi, split in named.items():
        if aoi not in groups:
            continue
        group = groups[aoi]
        if group_split.get(group, split) != split:
            raise ValueError(f"AOIs of location group {group} are named for both {group_split[group]} and {split}")
        group_split[group] = split
    return {aoi: group_split.get(group, "train") for aoi, group in groups.items()}


@dataclass(frozen=True)
class HomographySpec:
    rotation_deg: float
    scale: tuple[float, float]
    shift_frac: float
    perspective: float
    min_overlap: float


def pairs_for_tile(tiles: pd.DataFrame, max_pairs: int, rng: np.random.Generator) -> list[tuple[dict, dict, str]]:
    """Up to `max_pairs` date pairs of one tile, cross-season first (random order within a priority)."""
    candidates = []
    for a, b in combinations(tiles.sort_values("date").to_dict("records"), 2):
        kind = season_kind(a["season"], b["season"])
        candidates.append((season_priority(kind), rng.random(), a, b, kind))
    candidates.sort(key=lambda c: (c[0], c[1]))
    return [(a, b, kind) for _, _, a, b, kind in candidates[:max_pairs]]


def build_pairs(tiles: pd.DataFrame, splits: dict[str, str], groups: dict[str, str], max_pairs: dict[str, int],
                spec: HomographySpec, shift_spec: DateShiftSpec, seed: int) -> pd.DataFrame:
    """The pair table: one row per (tile, date0, date1) with split, season kind, warp and shift between the dates."""
    rng = np.random.default_rng(seed)
    rows, measured = [], {}
    for tile_id, tile in tqdm(list(tiles.groupby("tile_id", sort=True)), desc="pairs", unit="tile"):
        split = splits[tile["aoi"].iloc[0]]
        for a, b in ((a, b) for a, b, _ in pairs_for_tile(tile, max_pairs[split], rng)):
            # Alternate which date is image0 so that neither season is always the warped one.
            if rng.random() < 0.5:
                a, b = b, a
            size = (int(a["width"]), int(a["height"]))
            warp = random_homography(rng, size, spec.rotation_deg, tuple(spec.scale), spec.shift_frac,
                                     spec.perspective, spec.min_overlap)
            pair_id = f"{tile_id}_{a['scene_id']}_{b['scene_id']}"
            between = measure_date_shift(read_tile(a["path"]), read_tile(b["path"]), shift_spec)
            if between.shift is None:
                log.info("pair %s: %s", pair_id, between.reason)
            else:
                measured[pair_id] = between.shift
            rows.append({
                "pair_id": pair_id, "split": split,
                "aoi": a["aoi"], "location": groups[a["aoi"]], "tile_id": tile_id,
                "season_kind": season_kind(a["season"], b["season"]),
                "scene0": a["scene_id"], "scene1": b["scene_id"], "date0": a["date"], "date1": b["date"],
                "season0": a["season"], "season1": b["season"], "path0": a["path"], "path1": b["path"],
                "width": size[0], "height": size[1], "warp": json.dumps(np.round(warp, 10).ravel().tolist()),
            })
    return make_table(with_date_shifts(rows, measured), PAIRS)


def with_date_shifts(rows: list[dict], measured: dict[str, np.ndarray]) -> list[dict]:
    """The rows with their shift between the dates and where it comes from: the tile's own measurement; else the
    median over the AOI's tiles measured for the same two dates (the offset belongs to the products, so it holds
    across a tile under cloud); else none (the georeference is trusted)."""
    def oriented(row: dict) -> tuple[tuple[str, str, str], float]:
        first, second = sorted((row["scene0"], row["scene1"]))
        return (row["aoi"], first, second), 1.0 if row["scene0"] == first else -1.0

    per_dates: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for row in rows:
        if row["pair_id"] in measured:
            key, sign = oriented(row)
            per_dates.setdefault(key, []).append(sign * measured[row["pair_id"]])
    filled, trusted = [], {}
    for row in rows:
        key, sign = oriented(row)
        if row["pair_id"] in measured:
            shift, source = measured[row["pair_id"]], "tile"
        elif key in per_dates:
            shift, source = sign * np.median(per_dates[key], axis=0), "aoi"
        else:
            shift, source = np.zeros(2), "georeference"
            trusted[row["aoi"]] = trusted.get(row["aoi"], 0) + 1
        filled.append({**row, "date_shift_x": round(float(shift[0]), 4), "date_shift_y": round(float(shift[1]), 4),
                       "date_shift_from": source})
    for aoi, count in trusted.items():
        log.warning("AOI %s: %d pairs whose two dates have the shift between them measured on no tile (cloud, snow); "
                    "their georeference is trusted", aoi, count)
    return filled


def read_pairs(path: Path, split: str | None = None) -> pd.DataFrame:
    frame = read_table(path, PAIRS, "pairs")
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)


def pair_warp(row: dict) -> np.ndarray:
    """The homography that made image1 from the second date's tile."""
    return np.asarray(json.loads(row["warp"]), dtype=np.float64).reshape(3, 3)


def pair_homography(row: dict) -> np.ndarray:
    """The ground truth, image0 px -> image1 px: the ground at p in image0 lies at p + date shift in the second
    date's tile, which the warp then takes into image1."""
    between = np.eye(3)
    between[:2, 2] = float(row["date_shift_x"]), float(row["date_shift_y"])
    return pair_warp(row) @ between


def read_tile(path: str | Path) -> np.ndarray:
    """(C, H, W) float32 tile (NaN = no data)."""
    with rasterio.open(path) as src:
        return src.read().astype(np.float32)


def load_pair(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image0, image1, H) for a pair row: (C, H, W) reflectance (NaN = no data), image1 = tile1 warped by the
    pair's warp, H the ground truth (`pair_homography`)."""
    warp = pair_warp(row)
    image0 = read_tile(row["path0"])
    tile1 = read_tile(row["path1"])
    warped = np.stack([warp_image(channel, warp, (int(row["width"]), int(row["height"]))) for channel in tile1])
    return image0, warped, pair_homography(row)


def aoi_footprints(scenes: pd.DataFrame) -> dict[str, tuple[float, float, float, float]]:
    """AOI -> lon/lat box enclosing its scenes."""
    boxes = {}
    for aoi, group in scenes.groupby("aoi"):
        coords = np.array([json.loads(b) for b in group["bounds_lonlat"]])
        boxes[aoi] = (coords[:, 0].min(), coords[:, 1].min(), coords[:, 2].max(), coords[:, 3].max())
    return boxes


def date_shift_summary(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per AOI and date pair (scene0 -> scene1): the median shift (x, y) px between the dates measured on tiles,
    and its largest distance to a tile's own."""
    summary = {}
    tiles = table[table["date_shift_from"] == "tile"]
    for (aoi, scene0, scene1), group in tiles.groupby(["aoi", "scene0", "scene1"], sort=True):
        shifts = group[["date_shift_x", "date_shift_y"]].to_numpy(np.float64)
        median = np.median(shifts, axis=0)
        summary[f"{aoi}: {scene0} -> {scene1}"] = {
            "x": round(float(median[0]), 3), "y": round(float(median[1]), 3), "tiles": len(group),
            "max_tile_deviation": round(float(np.max(np.hypot(*(shifts - median).T))), 3)}
    return summary


def write_pairs(cfg, scenes: pd.DataFrame, tiles: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Write pairs.csv and summary.json under `out_dir` (atomically, as a whole)."""
    scenes = scenes[scenes["status"] == "ok"]
    kept = tiles[tiles["kept"].astype(bool)]
    dates_per_aoi = kept.groupby("aoi")["scene_id"].nunique()
    single = sorted(dates_per_aoi[dates_per_aoi < 2].index)
    for aoi in single:
        log.warning("skipped AOI %s: a single date, nothing to pair", aoi)
    groups = location_groups(aoi_footprints(scenes[scenes["aoi"].isin(kept["aoi"])]), cfg.location_buffer_km)
    splits = assign_splits(groups, list(cfg.split.val), list(cfg.split.test))
    spec = HomographySpec(**cfg.homography)
    table = build_pairs(kept[~kept["aoi"].isin(single)], splits, groups, cfg.max_per_tile, spec,
                        DateShiftSpec(**cfg.date_shift), cfg.seed)
    if table.empty:
        raise ProductError(f"{out_dir}: no pair of tiles: every AOI has kept tiles of a single date"
                           f" ({', '.join(single) or 'no AOI'}); add scenes of other dates")
    leaked = set(table[table["split"] == "train"]["location"]) & set(table[table["split"] != "train"]["location"])
    if leaked:
        raise ValueError(f"location groups in training and evaluation splits: {sorted(leaked)}")
    summary = {
        "pairs": len(table),
        "per_split": table["split"].value_counts().sort_index().to_dict(),
        "per_season_kind": table.groupby(["split", "season_kind"]).size().unstack(fill_value=0).to_dict("index"),
        "location_groups": {g: sorted(a for a, h in groups.items() if h == g) for g in sorted(set(groups.values()))},
        "splits": {split: sorted(a for a, s in splits.items() if s == split) for split in ("train", "val", "test")},
        "skipped_aois": {aoi: "single date" for aoi in single},
        "date_shift_from": table.groupby(["split", "date_shift_from"]).size().unstack(fill_value=0).to_dict("index"),
        "date_shift_px": date_shift_summary(table),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        table.to_csv(tmp / "pairs.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=int))
    return table
