"""DVC stage `pairs`: seasonal pairs of tiles, split by location, each with a seeded random warp and the
shift between its dates."""

from pathlib import Path

from s2match.cli import run
from s2match.data.pairs import write_pairs
from s2match.data.tables import SCENES, SCENES_FILE, TILES, TILES_FILE, read_table, require_usable


def main(cfg) -> None:
    scenes = read_table(Path(cfg.paths.bands) / SCENES_FILE, SCENES, "bands")
    path = Path(cfg.paths.tiles) / TILES_FILE
    tiles = read_table(path, TILES, "tile")
    require_usable(tiles, tiles["kept"], path, "tile")
    table = write_pairs(cfg.pairs, scenes, tiles, Path(cfg.paths.pairs))
    print(f"{cfg.paths.pairs}: {len(table)} pairs, " + ", ".join(f"{k} {v}" for k, v in table.split.value_counts().items()))


if __name__ == "__main__":
    run(main, __doc__, ("pairs",))
