"""`src/infer.py`: register two scenes and write the run folder (see s2match.inference.registration).

Before anything is matched: both inputs must open and hold valid pixels, and the run folder must be writable and
must not hold another pair's result. The default folder is outputs/infer/<pair name, or the two stems>-<digest of
the two absolute paths>, so two pairs never share one; a run of the same pair replaces its earlier result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from omegaconf import DictConfig, OmegaConf

from s2match.config import PROJECT_ROOT, ConfigError
from s2match.fileio import atomic_path, signals_held
from s2match.inference.outputs import write_outputs
from s2match.inference.registration import RegistrationSettings, register
from s2match.inference.scenes import Scene, open_image
from s2match.presets import with_preset
from s2match.s2.products import ProductError
from s2match.twoview.pipeline import TwoViewPipeline, pipeline_config

log = logging.getLogger(__name__)

# Exit status of a run that found no reliable transform (1 is a bad input or configuration, see s2match.cli).
EXIT_NO_TRANSFORM = 2
RESULT_FILE = "result.json"
# px: longest side of the overview read to check that an input holds valid pixels
CHECK_SIZE = 256
DIGEST_CHARS = 8


def resolve_path(path: str | Path) -> Path:
    """A path as given when it exists there, else relative to the project root (configs name files from it);
    absolute, so that result.json says which file was read."""
    path = Path(path).expanduser()
    return (path if path.is_absolute() or path.exists() else PROJECT_ROOT / path).absolute()


def default_folder(pair: DictConfig, paths: list[Path]) -> Path:
    """outputs/infer/<name or stem0__stem1>-<digest of both absolute paths>: unique per pair of inputs."""
    label = pair.get("name") or f"{paths[0].stem}__{paths[1].stem}"
    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:DIGEST_CHARS]
    return PROJECT_ROOT / "outputs" / "infer" / f"{label}-{digest}"


def previous_inputs(folder: Path) -> list[Path] | None:
    """The inputs of the run whose result a folder holds (None when it holds none)."""
    try:
        images = json.loads((folder / RESULT_FILE).read_text())["images"]
        return [Path(image["path"]).resolve() for image in images]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run_folder(folder: Path, paths: list[Path]) -> None:
    """Fail before matching if the run could not write `folder` or would replace what is not its own: a file, a
    folder of other files, another pair's result."""
    option = f"infer.output_dir={folder}"
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{option}: {folder} is a file, not a folder; choose another infer.output_dir")
        if any(folder.iterdir()):
            previous = previous_inputs(folder)
            if previous is None:
                raise ConfigError(f"{option}: the folder holds other files, which a run would replace; choose an "
                                  f"empty or new folder")
            if previous != [p.resolve() for p in paths]:
                raise ConfigError(f"{option}: the folder holds the result of another pair "
                                  f"({' and '.join(map(str, previous))}); choose another infer.output_dir")
    existing = next(parent for parent in folder.parents if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option}: {existing} is a file, not a folder; choose another infer.output_dir")
    try:  # what atomic_path will do there: create a folder (then remove it)
        with signals_held():
            Path(tempfile.mkdtemp(prefix=".s2match-write-check", dir=existing)).rmdir()
    except OSError as err:
        raise ConfigError(f"{option}: cannot write in {existing} ({err.strerror}); choose another "
                          f"infer.output_dir") from err


def check_valid_pixels(image: Scene, label: str) -> None:
    """An input with nothing to match says so (instead of a failed match of 0 correspondences)."""
    overview, _ = image.overview((0, 0, *image.size), CHECK_SIZE)
    bands = [band[np.isfinite(band)] for band in overview]
    if not any(band.size for band in bands):
        raise ProductError(f"{image.name}: {label} has no valid pixels (every pixel is no data: 0 or NaN)")
    if all(band.size == 0 or band.min() == band.max() for band in bands):
        raise ProductError(f"{image.name}: {label} is uniform (each band holds one value): nothing to match")


def run_inference(cfg: DictConfig) -> int:
    """The `infer` entry point: register cfg.pair.image1 onto cfg.pair.image0 with the preset cfg.preset and write
    the run folder. Returns 0 on success, EXIT_NO_TRANSFORM when no reliable transform was found."""
    cfg = with_preset(cfg)
    if "pair" not in cfg or not cfg.pair.get("image0") or not cfg.pair.get("image1"):
        raise ConfigError("no pair to match: give two images (python src/infer.py IMAGE0 IMAGE1), +pair=NAME "
                          "(conf/pair/) or +pair.image0=PATH +pair.image1=PATH")
    # GDAL's block cache defaults to 5 % of RAM; on big scenes it would dominate the memory of a run.
    with rasterio.Env(GDAL_CACHEMAX=int(cfg.infer.gdal_cache_mb)):
        return _infer(cfg)


def _infer(cfg: DictConfig) -> int:
    start = time.perf_counter()
    infer, bands = cfg.infer, cfg.bands
    paths = [resolve_path(cfg.pair[key]) for key in ("image0", "image1")]
    folder = PROJECT_ROOT / infer.output_dir if infer.output_dir else default_folder(cfg.pair, paths)
    images = [open_image(path, bands.composite, bands.composites, bands.fallback, infer.resolution)
              for path in paths]
    for label, image in zip(("image0", "image1"), images):
        check_valid_pixels(image, label)
    check_run_folder(folder, paths)
    pipeline = TwoViewPipeline.from_config(pipeline_config(cfg))
    opened_s = time.perf_counter() - start
    registration = register(*images, pipeline, RegistrationSettings.from_config(cfg.registration))
    report = registration.report
    report["timings"]["open_s"] = opened_s
    report["model"] = {"preset": str(cfg.preset), **pipeline.describe()}
    report["config"] = {**pipeline_config(cfg), **{group: OmegaConf.to_container(cfg[group], resolve=True)
                                                   for group in ("pair", "infer", "bands")}}
    check_run_folder(folder, paths)  # again: another run may have written there while this one matched
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        write_outputs(*images, registration, infer, tmp)
        report["timings"]["total_s"] = time.perf_counter() - start
        (tmp / RESULT_FILE).write_text(json.dumps(report, indent=2))
    if report["success"]:
        log.info("%d tie points (%s), residual RMSE %.2f px; wrote %s", report["inliers"], report["fitted_on"],
                 report["residuals_px"]["rmse"], folder)
        return 0
    log.error("%s (wrote %s)", report["reason"], folder)
    return EXIT_NO_TRANSFORM
