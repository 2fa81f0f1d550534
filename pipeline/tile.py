"""DVC stage `tile`: cut each AOI's images into georeferenced tiles on one common grid."""

from pathlib import Path

from s2match.cli import run
from s2match.data.tables import SCENES, SCENES_FILE, read_table, require_usable
from s2match.data.tiling import write_tiles


def main(cfg) -> None:
    path = Path(cfg.paths.bands) / SCENES_FILE
    scenes = read_table(path, SCENES, "bands")
    require_usable(scenes, scenes["status"] == "ok", path, "scene")
    table = write_tiles(cfg.tile, scenes, Path(cfg.paths.tiles))
    kept = table[table["kept"]]
    print(f"{cfg.paths.tiles}: {len(kept)} tiles kept of {len(table)} ({kept['tile_id'].nunique()} locations)")


if __name__ == "__main__":
    run(main, __doc__, ("tile",))
