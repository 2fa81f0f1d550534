"""The tables the dataset stages write (catalogue, scenes, tiles, pairs): CSV files with fixed column types.

A skipped row has empty cells; without a schema pandas would then read a size column as floats ('512.0') or an
empty table as no columns at all. Each table has a schema (column -> int | float | str | bool): written and read
through it, a column keeps its type whatever rows were skipped, and an empty table keeps its columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from s2match.fileio import atomic_path
from s2match.s2.products import ProductError

Schema = dict[str, str]
# pandas dtypes that hold a missing value without changing type (strings: '' for missing)
DTYPES = {"int": "Int64", "float": "Float64", "bool": "boolean", "str": "str"}

# catalogue.csv (download stage): one row per scene, `status` ok or skipped with its `reason`
CATALOGUE = {
    "scene_id": "str", "aoi": "str", "date": "str", "season": "str", "level": "str", "bands": "str", "dtype": "str",
    "crs": "str", "transform": "str", "width": "int", "height": "int", "pixel_size": "float", "bounds_lonlat": "str",
    "path": "str", "band_files": "str", "processing_baseline": "float", "offsets": "str", "quantification": "float",
    "source": "str", "status": "str", "reason": "str",
}
# <paths.bands>/scenes.csv (bands stage): the catalogue, with the composite written for each usable scene
SCENES_FILE = "scenes.csv"
SCENES = {**CATALOGUE, "image": "str", "composite": "str"}
# <paths.tiles>/tiles.csv (tile stage): one row per (tile, scene), kept or dropped with the reason; a scene with no
# tile at all has one row
TILES_FILE = "tiles.csv"
TILES = {
    "tile_id": "str", "aoi": "str", "scene_id": "str", "date": "str", "season": "str", "path": "str", "row": "int",
    "col": "int", "width": "int", "height": "int", "crs": "str", "transform": "str", "valid_fraction": "float",
    "texture": "float", "kept": "bool", "reason": "str",
}
# <paths.pairs>/pairs.csv (pairs stage): one row per pair of tiles with its split, the warp that made image1 (a
# homography, row-major) and the shift between the two dates (px; the ground truth is the warp after this shift)
# with where it comes from: "tile", "aoi" (the AOI's other tiles of the same dates) or "georeference" (none measured)
PAIRS = {
    "pair_id": "str", "split": "str", "aoi": "str", "location": "str", "tile_id": "str", "season_kind": "str",
    "scene0": "str", "scene1": "str", "date0": "str", "date1": "str", "season0": "str", "season1": "str",
    "path0": "str", "path1": "str", "width": "int", "height": "int", "warp": "str",
    "date_shift_x": "float", "date_shift_y": "float", "date_shift_from": "str",
}


def conform(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The frame with the schema's columns, in its order and types (missing columns empty)."""
    frame = frame.reindex(columns=list(schema))
    for column, kind in schema.items():
        values = frame[column]
        if kind == "str":
            frame[column] = values.astype(object).where(values.notna(), "").astype(str)
        else:
            frame[column] = values.replace("", None).astype(DTYPES[kind])
    return frame


def make_table(rows: Iterable[dict], schema: Schema) -> pd.DataFrame:
    return conform(pd.DataFrame(list(rows)), schema)


def write_table(frame: pd.DataFrame, path: Path, schema: Schema) -> None:
    with atomic_path(path) as tmp:
        conform(frame, schema).to_csv(tmp, index=False)


def read_table(path: Path, schema: Schema, stage: str) -> pd.DataFrame:
    """A table written by `stage`; a missing or unreadable file is a one-line ProductError."""
    if not path.is_file():
        raise ProductError(f"{path}: table not found (run the {stage} stage)")
    numeric = [column for column, kind in schema.items() if kind != "str"]
    try:
        frame = pd.read_csv(path, dtype={c: DTYPES[k] for c, k in schema.items()}, keep_default_na=False,
                            na_values={column: [""] for column in numeric})
    except (ValueError, pd.errors.ParserError) as err:
        raise ProductError(f"{path}: not a {stage} table ({' '.join(str(err).split())}); run the {stage} stage "
                           f"again") from err
    missing = [column for column in schema if column not in frame.columns]
    if missing:
        raise ProductError(f"{path}: not a {stage} table (no column {', '.join(missing)}); run the {stage} stage "
                           f"again")
    return conform(frame, schema)


def require_usable(frame: pd.DataFrame, usable: pd.Series, path: Path, what: str) -> None:
    """A stage with nothing to work on stops here, naming its input table and why its rows were left out."""
    if usable.any():
        return
    if frame.empty:
        raise ProductError(f"{path}: no {what} (the table is empty); check the earlier stage's configuration")
    reasons = frame.loc[~usable, "reason"].replace("", "no reason recorded").value_counts()
    summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.head(3).items())
    raise ProductError(f"{path}: no usable {what} of {len(frame)} ({summary})")
