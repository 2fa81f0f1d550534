"""DVC stage `pairs`: seasonal pairs of tiles, split by location, each with a seeded random homography."""

from pathlib import Path

import pandas as pd

from s2match.cli import run
from s2match.data.pairs import write_pairs


def main(cfg) -> None:
    scenes = pd.read_csv(Path(cfg.paths.bands) / "scenes.csv", dtype={"date": str}, keep_default_na=False)
    tiles = pd.read_csv(Path(cfg.paths.tiles) / "tiles.csv", dtype={"date": str}, keep_default_na=False)
    table = write_pairs(cfg.pairs, scenes, tiles, Path(cfg.paths.pairs))
    print(f"{cfg.paths.pairs}: {len(table)} pairs, " + ", ".join(f"{k} {v}" for k, v in table.split.value_counts().items()))


if __name__ == "__main__":
    run(main)
