"""DVC stage `download`: the scene catalogue from the configured source (sample, local folder, CDSE, Earth Search)."""

from pathlib import Path

from s2match.data.catalogue import build_catalogue, write_catalogue
from s2match.cli import run


def main(cfg) -> None:
    frame = write_catalogue(build_catalogue(cfg.download, Path.cwd()), Path(cfg.paths.catalogue))
    print(f"{cfg.paths.catalogue}: {(frame.status == 'ok').sum()} scenes, {(frame.status != 'ok').sum()} skipped")


if __name__ == "__main__":
    run(main, __doc__, ("download",))
