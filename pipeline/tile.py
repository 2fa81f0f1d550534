"""DVC stage `tile`: cut each AOI's images into georeferenced tiles on one common grid."""

from pathlib import Path

import pandas as pd

from s2match.cli import run
from s2match.data.tiling import write_tiles


def main(cfg) -> None:
    scenes = pd.read_csv(Path(cfg.paths.bands) / "scenes.csv", dtype={"date": str}, keep_default_na=False)
    table = write_tiles(cfg.tile, scenes, Path(cfg.paths.tiles))
    kept = table[table["kept"].astype(bool)]
    print(f"{cfg.paths.tiles}: {len(kept)} tiles kept of {len(table)} ({kept['tile_id'].nunique()} locations)")


if __name__ == "__main__":
    run(main)
