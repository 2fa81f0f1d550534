"""Shared fixtures: the real sample (restored by `dvc pull`) and the data stages run once on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from s2match.data import composites as bands
from s2match.data import pairs
from s2match.data import tiling
from s2match.data.catalogue import sample_rows, write_catalogue
from s2match.config import PROJECT_ROOT, compose_config
from s2match.models.features import build_features
from s2match.geo.homography import warp_image

SAMPLE = PROJECT_ROOT / "data" / "sample"
# A known homography with rotation, scale, shift and mild perspective (image0 px -> image1 px).
H_TRUE = np.array([[0.95, -0.08, 14.0], [0.07, 0.97, -6.0], [2e-5, -1e-5, 1.0]])


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
    scenes = bands.write_bands(cfg.bands, catalogue, out / "bands", PROJECT_ROOT)
    tiles = tiling.write_tiles(cfg.tile, scenes, out / "tiles")
    table = pairs.write_pairs(cfg.pairs, scenes, tiles, out / "pairs")
    return {"catalogue": catalogue, "scenes": scenes, "tiles": tiles, "pairs": table, "dir": out}


@pytest.fixture(scope="session")
def warped_pair(sample_dir) -> dict:
    """One unbatched feature-cache item: ALIKED (256 keypoints) of a 256 px crop of a summer strip and of its copy
    warped by H_TRUE."""
    with rasterio.open(sample_dir / "ukraine/T35UNQ/summer.tif") as src:
        crop = src.read(window=rasterio.windows.Window(0, 2000, 256, 256)).transpose(1, 2, 0)
    extractor = build_features({"name": "aliked", "max_keypoints": 256})
    item = {"H": torch.from_numpy(H_TRUE).float(), "pair_id": "T35UNQ_summer_warped"}
    for side, image in (("0", crop), ("1", warp_image(crop, H_TRUE, (256, 256)))):
        feats = extractor(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        item[f"keypoints{side}"] = feats["keypoints"]
        item[f"descriptors{side}"] = feats["descriptors"]
        item[f"image_size{side}"] = torch.tensor([256.0, 256.0])
    return item
