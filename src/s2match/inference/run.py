"""`src/infer.py`: register two scenes and write the run folder (see s2match.inference.registration)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import rasterio
from omegaconf import DictConfig, OmegaConf

from s2match.config import PROJECT_ROOT
from s2match.fileio import atomic_path
from s2match.inference.outputs import write_outputs
from s2match.inference.registration import RegistrationSettings, register
from s2match.inference.scenes import open_image
from s2match.presets import with_preset
from s2match.twoview.pipeline import TwoViewPipeline, pipeline_config

log = logging.getLogger(__name__)

# Exit status of a run that found no reliable transform (1 is a bad input or configuration, see s2match.cli).
EXIT_NO_TRANSFORM = 2


def resolve_path(path: str | Path) -> Path:
    """A path as given when it exists there, else relative to the project root (configs name files from it)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def pair_name(pair: DictConfig) -> str:
    return pair.get("name") or f"{Path(str(pair.image0)).stem}__{Path(str(pair.image1)).stem}"


def run_inference(cfg: DictConfig) -> int:
    """The `infer` entry point: register cfg.pair.image1 onto cfg.pair.image0 with the preset cfg.preset and write
    the run folder. Returns 0 on success, EXIT_NO_TRANSFORM when no reliable transform was found."""
    cfg = with_preset(cfg)
    if "pair" not in cfg or not cfg.pair.get("image0") or not cfg.pair.get("image1"):
        raise KeyError("no pair to match: pass +pair=NAME (conf/pair/) or +pair.image0=PATH +pair.image1=PATH")
    # GDAL's block cache defaults to 5 % of RAM; on big scenes it would dominate the memory of a run.
    with rasterio.Env(GDAL_CACHEMAX=int(cfg.infer.gdal_cache_mb)):
        return _infer(cfg)


def _infer(cfg: DictConfig) -> int:
    start = time.perf_counter()
    infer, bands = cfg.infer, cfg.bands
    images = [open_image(resolve_path(cfg.pair[key]), bands.composite, bands.composites, bands.fallback,
                         infer.resolution) for key in ("image0", "image1")]
    pipeline = TwoViewPipeline.from_config(pipeline_config(cfg))
    opened_s = time.perf_counter() - start
    registration = register(*images, pipeline, RegistrationSettings.from_config(cfg.registration))
    report = registration.report
    report["timings"]["open_s"] = opened_s
    report["model"] = {"preset": str(cfg.preset), **pipeline.describe()}
    report["config"] = {**pipeline_config(cfg), **{group: OmegaConf.to_container(cfg[group], resolve=True)
                                                   for group in ("pair", "infer", "bands")}}
    folder = PROJECT_ROOT / (infer.output_dir or Path("outputs", "infer", pair_name(cfg.pair)))
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        write_outputs(*images, registration, infer, tmp)
        report["timings"]["total_s"] = time.perf_counter() - start
        (tmp / "result.json").write_text(json.dumps(report, indent=2))
    if report["success"]:
        log.info("%d tie points (%s), residual RMSE %.2f px; wrote %s", report["inliers"], report["fitted_on"],
                 report["residuals_px"]["rmse"], folder)
        return 0
    log.error("%s (wrote %s)", report["reason"], folder)
    return EXIT_NO_TRANSFORM
