"""DVC stage `bands`: per scene, the configured band composite as float32 reflectance on one grid."""

from pathlib import Path

from s2match.cli import run
from s2match.data.catalogue import read_catalogue
from s2match.data.composites import write_bands
from s2match.data.tables import require_usable


def main(cfg) -> None:
    path = Path(cfg.paths.catalogue)
    catalogue = read_catalogue(path, only_ok=False)
    require_usable(catalogue, catalogue["status"] == "ok", path, "scene")
    table = write_bands(cfg.bands, catalogue, Path(cfg.paths.bands), Path.cwd())
    print(f"{cfg.paths.bands}: {(table.status == 'ok').sum()} images, {(table.status != 'ok').sum()} skipped")


if __name__ == "__main__":
    run(main, __doc__, ("bands",))
