"""Shared fixtures: the real sample (restored by `dvc pull`) and the data stages run once on it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from s2match import bands, pairs, tiling
from s2match.catalogue import sample_rows, write_catalogue
from s2match.config import PROJECT_ROOT, compose_config

SAMPLE = PROJECT_ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "scenes.csv").is_file():
        pytest.fail(f"{SAMPLE}: sample data missing; run `make setup` (it runs `dvc pull`)")
    return SAMPLE


@pytest.fixture(scope="session")
def cfg():
    return compose_config()


@pytest.fixture(scope="session")
def stages(sample_dir, cfg, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """download -> bands -> tile -> pairs on the whole sample, with the default configuration."""
    out = tmp_path_factory.mktemp("stages")
    catalogue = write_catalogue(sample_rows(sample_dir, PROJECT_ROOT), out / "catalogue.csv")
    scenes = bands.run_stage(cfg.bands, catalogue, out / "bands", PROJECT_ROOT)
    tiles = tiling.run_stage(cfg.tile, scenes, out / "tiles")
    table = pairs.run_stage(cfg.pairs, scenes, tiles, out / "pairs")
    return {"catalogue": catalogue, "scenes": scenes, "tiles": tiles, "pairs": table, "dir": out}
