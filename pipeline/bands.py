"""DVC stage `bands`: per scene, the configured band composite as float32 reflectance on one grid."""

from pathlib import Path

from s2match.data.composites import write_bands
from s2match.data.catalogue import read_catalogue
from s2match.cli import run


def main(cfg) -> None:
    table = write_bands(cfg.bands, read_catalogue(Path(cfg.paths.catalogue), only_ok=False), Path(cfg.paths.bands),
                      Path.cwd())
    print(f"{cfg.paths.bands}: {(table.status == 'ok').sum()} images, {(table.status != 'ok').sum()} skipped")


if __name__ == "__main__":
    run(main)
