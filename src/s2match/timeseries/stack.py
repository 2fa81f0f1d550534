"""The dates of one area: which scenes, each opened with its cloud mask, surveyed, and the reference date.

A stack comes from conf/stack/<name>.yaml, from exactly one source: `aoi` (the catalogue's scenes of that AOI, at
`paths.catalogue`), `folder` (every product under a folder, as s2match.s2.products.find_products finds them) or
`files` (scene files or .SAFE folders). Each date is opened as inference opens an image (the bands group's
composite) and needs a georeference and an acquisition date (from its product name or DATE tag).

The AOI is the grid of the configured reference date, else of the first date. Each date is surveyed on an overview
of the AOI: the share of it with data and no cloud (the scene's own mask), and a small picture. A date with too
little clear ground is skipped with the reason. The default reference is the clearest date: its clear share times
the correlation of its picture with the stack's temporal median, which, clouds, haze and snow being passing, looks
like clear ground (a cloud-free date that is mostly no data, or a cloudless snow scene, scores low).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

from s2match.data.catalogue import read_catalogue
from s2match.geo.georef import Grid, prior_homography
from s2match.inference.registration import guided_view
from s2match.inference.run import resolve_path
from s2match.inference.scenes import Box, Scene, SceneImage, open_image
from s2match.s2.masks import CloudMask, MaskClasses, find_cloud_mask
from s2match.s2.products import ProductError, find_products

MIN_DATES = 2
# Percentiles of each survey picture mapped to [0, 1] before the temporal median: dates compare by pattern, not level.
STRETCH_PERCENTILES = (2.0, 98.0)


def box_grid(grid: Grid, box: Box, out_size: tuple[int, int]) -> Grid:
    """The grid of `box` (pixel edges of `grid`) resampled to out_size = (w, h)."""
    x0, y0, x1, y1 = box
    transform = grid.transform * Affine.translation(x0, y0) * Affine.scale((x1 - x0) / out_size[0],
                                                                             (y1 - y0) / out_size[1])
    return Grid(grid.crs, transform, int(out_size[0]), int(out_size[1]))


def overview_size(grid: Grid, longest_side: int) -> tuple[int, int]:
    """(w, h) of the whole grid decimated to at most `longest_side` px (as Scene.overview decimates)."""
    factor = max(1.0, max(grid.width, grid.height) / longest_side)
    return max(1, round(grid.width / factor)), max(1, round(grid.height / factor))


@dataclass
class CloudMaskedScene(Scene):
    """A scene whose cloudy pixels read as no data (NaN): matching never sees them. Any cloud in an output pixel
    masks it, so a cloud's edge is never taken for ground."""

    scene: SceneImage
    mask: CloudMask
    classes: MaskClasses

    @property
    def grid(self) -> Grid:
        return self.scene.grid

    @property
    def name(self) -> str:
        return f"{self.scene.name} (cloud-masked by {self.mask.kind})"

    def read(self, box: Box, out_size: tuple[int, int]) -> np.ndarray:
        data = self.scene.read(box, out_size)
        data[:, self.mask.cloud_fraction(box_grid(self.grid, box, out_size), self.classes) > 0] = np.nan
        return data

    def describe(self) -> dict:
        return {**self.scene.describe(), "cloud_mask": str(self.mask.path), "cloud_mask_kind": self.mask.kind}


@dataclass
class StackDate:
    """One date of the stack: its name (YYYY-MM-DD, plus the file's stem when two scenes share a day), the scene
    as read for the outputs, and its cloud mask (None: the product has none)."""

    name: str
    day: date
    scene: SceneImage
    mask: CloudMask | None

    def for_matching(self, classes: MaskClasses) -> Scene:
        """The scene matching reads: cloudy pixels removed when the product has a mask."""
        return self.scene if self.mask is None else CloudMaskedScene(self.scene, self.mask, classes)


@dataclass
class Survey:
    """A date seen on the AOI's overview: shares of the AOI that are clear, cloud (by the mask) and no data, and
    the grey picture (NaN where no data or cloud)."""

    clear: float
    cloud: float
    no_data: float
    picture: np.ndarray


def stack_sources(stack: Mapping[str, Any], catalogue: str) -> list[Path]:
    """The scene paths a stack config names (exactly one of aoi, folder, files)."""
    given = [key for key in ("aoi", "folder", "files") if stack.get(key)]
    if len(given) != 1:
        raise ValueError(f"stack {stack.get('name')!r}: give exactly one of stack.aoi, stack.folder, stack.files "
                         f"(got {', '.join(given) or 'none'})")
    if given == ["files"]:
        return [resolve(path) for path in stack["files"]]
    if given == ["folder"]:
        folder = resolve(stack["folder"])
        if not folder.is_dir():
            raise FileNotFoundError(f"stack.folder={folder}: folder not found")
        paths = []
        for scene_id, product in find_products(folder):
            if isinstance(product, Exception):
                raise ProductError(f"stack.folder: {scene_id}: {product}")
            paths.append(product.path if product.path.is_dir() and any(product.path.glob("GRANULE/*"))
                         else next(iter(product.bands.values()))[0])
        return paths
    rows = read_catalogue(resolve(catalogue))
    rows = rows[rows["aoi"] == stack["aoi"]]
    if rows.empty:
        raise ValueError(f"stack.aoi={stack['aoi']}: no scene of that AOI in {catalogue}")
    paths = []
    for row in rows.to_dict("records"):
        path = resolve(row["path"])
        # a loose product's row names its folder: its first band file opens the product
        paths.append(path if path.is_file() or any(path.glob("GRANULE/*"))
                     else resolve(next(iter(json.loads(row["band_files"]).values()))[0]))
    return paths


def resolve(path: str | Path) -> Path:
    """inference's rule (as given when it exists, else from the project root), made absolute for the workers."""
    return resolve_path(path).resolve()


def open_stack(paths: list[Path], bands: Mapping[str, Any], resolution: float | None) -> list[StackDate]:
    """Every scene opened (header only), dated and sorted in time; fewer than two dates is an error."""
    dates = []
    for path in paths:
        scene = open_image(path, bands["composite"], bands["composites"], bands["fallback"], resolution)
        if not scene.grid.georeferenced:
            raise ProductError(f"{path}: no georeference (a stack is co-registered on a map grid)")
        if scene.product.acquired is None:
            raise ProductError(f"{path}: no acquisition date (neither an ESA product name nor a DATE tag)")
        dates.append(StackDate("", scene.product.acquired, scene, find_cloud_mask(scene.product)))
    if len(dates) < MIN_DATES:
        raise ValueError(f"a stack needs at least {MIN_DATES} dates to co-register, got {len(dates)}"
                         + (f" ({paths[0]})" if paths else ""))
    dates.sort(key=lambda d: (d.day, str(d.scene.path)))
    for item in dates:
        shared = sum(other.day == item.day for other in dates) > 1
        item.name = f"{item.day.isoformat()}_{item.scene.path.stem}" if shared else item.day.isoformat()
    return dates


def find_date(dates: list[StackDate], wanted: str) -> StackDate:
    """The date named `wanted` (YYYY-MM-DD or YYYYMMDD, or a full date name)."""
    key = str(wanted)
    for item in dates:
        if key in (item.name, item.day.isoformat(), item.day.strftime("%Y%m%d")):
            return item
    raise ValueError(f"coregister.reference={key}: no such date in the stack ({', '.join(d.name for d in dates)})")


def survey_date(item: StackDate, aoi: Grid, overview_px: int, classes: MaskClasses) -> Survey:
    """The date on the AOI's overview grid, placed by its georeference (a task: reads one decimated view)."""
    size = overview_size(aoi, overview_px)
    prior = prior_homography(aoi, item.scene.grid).H
    guided = guided_view(item.scene, prior, (0, 0, aoi.width, aoi.height), size)
    if guided is None:
        picture = np.full(size[::-1], np.nan, np.float32)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
            picture = np.nanmean(guided[0], axis=0).astype(np.float32)
    has_data = np.isfinite(picture)
    cloud = (item.mask.cloud_fraction(box_grid(aoi, (0, 0, aoi.width, aoi.height), size), classes)
             if item.mask is not None else np.zeros(picture.shape, np.float32))
    picture[cloud > 0] = np.nan
    return Survey(clear=float(np.mean(has_data * (1 - cloud))), cloud=float(np.mean(has_data * cloud)),
                  no_data=float(np.mean(~has_data)), picture=picture)


def skip_reason(survey: Survey, mask: CloudMask | None, min_clear: float) -> str:
    """Why a date is left out of the stack ('' when it is kept)."""
    if survey.clear >= min_clear:
        return ""
    masked = f"{survey.cloud:.0%} cloud ({mask.kind})" if mask is not None else "no cloud mask"
    what = "too cloudy" if survey.cloud >= survey.no_data else "too little data"
    return (f"{what} over the AOI: {survey.clear:.0%} clear < coregister.min_clear {min_clear:.0%} "
            f"({masked}, {survey.no_data:.0%} no data)")


def clearness(surveys: Mapping[str, Survey]) -> dict[str, float]:
    """Per date: clear share x correlation of its picture with the temporal median of all pictures (see the
    module docstring); 0 when they share no pixel."""
    stretched = {}
    for name, survey in surveys.items():
        picture = survey.picture
        finite = picture[np.isfinite(picture)]
        if finite.size == 0:
            stretched[name] = picture
            continue
        low, high = np.percentile(finite, STRETCH_PERCENTILES)
        stretched[name] = (picture - low) / max(high - low, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels with no data on any date
        median = np.nanmedian(np.stack(list(stretched.values())), axis=0)
    scores = {}
    for name, picture in stretched.items():
        both = np.isfinite(picture) & np.isfinite(median)
        if both.sum() < 3 or np.std(picture[both]) == 0 or np.std(median[both]) == 0:
            scores[name] = 0.0
            continue
        correlation = float(np.corrcoef(picture[both], median[both])[0, 1])
        scores[name] = surveys[name].clear * max(correlation, 0.0)
    return scores
