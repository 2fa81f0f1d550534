from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import Window

from s2match.geo.homography import random_homography, warp_image, warp_points
from s2match.viz import (
    DISPLAY_MAX_SIDE,
    DISPLAY_MIN_SIDE,
    MARGIN_PX,
    TITLE_PX,
    display_factor,
    downsample_for_display,
    draw_bars,
    draw_error_cdf,
    draw_keypoints,
    draw_matches,
    stretch,
    to_display_coords,
)

WINTER = Path(__file__).resolve().parents[1] / "data/sample/ukraine/T35UNQ/winter.tif"
CROP_W, CROP_H = 320, 256


@pytest.fixture(scope="module")
def winter_crop() -> np.ndarray:
    """A real snowy RGB crop (H, W, 3) uint8."""
    with rasterio.open(WINTER) as src:
        return src.read(window=Window(0, 1000, CROP_W, CROP_H)).transpose(1, 2, 0)


def _read_png(path: Path) -> np.ndarray:
    png = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert png is not None, f"{path} is not a readable PNG"
    return png


def _assert_not_blank(png: np.ndarray) -> None:
    assert png.astype(np.float64).std() > 20.0


def test_stretch_maps_percentiles_to_the_full_range(winter_crop):
    shown = stretch(winter_crop)

    assert shown.dtype == np.uint8 and shown.shape == winter_crop.shape
    for channel in range(3):
        values, out = winter_crop[..., channel].ravel(), shown[..., channel].ravel()
        low, high = np.percentile(values, [2, 98])
        assert np.all(out[values <= low] == 0) and np.all(out[values >= high] == 255)
        order = np.argsort(values, kind="stable")
        assert np.all(np.diff(out[order].astype(int)) >= 0)  # brighter input never displays darker


def test_stretch_handles_float_reflectance_with_snow_and_nan():
    rng = np.random.default_rng(0)
    reflectance = rng.uniform(0.02, 0.2, size=(64, 64)).astype(np.float32)
    reflectance[0, :40] = 0.9  # a few snow pixels (1 %), far brighter than the land
    reflectance[1, :5] = np.nan

    shown = stretch(reflectance)

    assert shown.shape == (64, 64) and shown.dtype == np.uint8
    assert np.all(shown[0, :40] == 255)
    assert np.all(shown[1, :5] == 0)
    assert shown[2:].std() > 60  # the land keeps its contrast instead of being squeezed under the snow

    snowy = reflectance.copy()
    snowy[:32] = 0.9  # snow over half the scene still stands apart from the land
    shown = stretch(snowy)
    assert np.all(shown[2:32] == 255) and shown[32:].max() < 128

    assert stretch(reflectance[..., None]).shape == (64, 64)
    assert np.all(stretch(np.full((4, 4), np.nan)) == 0)
    with pytest.raises(ValueError, match="grey"):
        stretch(np.zeros((4, 4, 2)))


def test_draw_keypoints_writes_a_readable_png(winter_crop, tmp_path):
    rng = np.random.default_rng(0)
    kpts = rng.uniform(0, [CROP_W - 1, CROP_H - 1], size=(200, 2))

    path = draw_keypoints(winter_crop, kpts, tmp_path / "kpts.png", title="winter")

    png = _read_png(path)
    # The crop is enlarged so its long side is DISPLAY_MIN_SIDE px, inside fixed margins.
    zoom = DISPLAY_MIN_SIDE / CROP_W
    assert png.shape[:2] == (round(CROP_H * zoom) + MARGIN_PX + TITLE_PX, round(CROP_W * zoom) + 2 * MARGIN_PX)
    _assert_not_blank(png)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_draw_matches_writes_a_readable_png(winter_crop, tmp_path):
    rng = np.random.default_rng(1)
    H = random_homography(rng, (CROP_W, CROP_H))
    warped = warp_image(winter_crop.astype(np.float32), H, (CROP_W, CROP_H))
    kpts0 = rng.uniform(0, [CROP_W - 1, CROP_H - 1], size=(150, 2))
    kpts1 = warp_points(H, kpts0)
    kpts1[:30] += rng.uniform(-40, 40, size=(30, 2))
    inliers = np.arange(150) >= 30

    path = draw_matches(
        winter_crop, warped, kpts0, kpts1, rng.random(150), tmp_path / "m.png",
        max_lines=100, subset="random", inliers=inliers,
    )

    png = _read_png(path)
    assert png.shape[0] > png.shape[1] / 3  # two crops side by side plus a colour bar
    assert DISPLAY_MIN_SIDE < png.shape[1] < DISPLAY_MIN_SIDE + 300
    _assert_not_blank(png)


def test_draw_matches_checks_its_arguments(winter_crop, tmp_path):
    kpts = np.zeros((5, 2))
    with pytest.raises(ValueError, match="subset='first' or 'random'"):
        draw_matches(winter_crop, winter_crop, kpts, kpts, np.ones(5), tmp_path / "m.png", max_lines=3)
    with pytest.raises(ValueError, match="needs max_lines"):
        draw_matches(winter_crop, winter_crop, kpts, kpts, np.ones(5), tmp_path / "m.png", subset="first")
    with pytest.raises(ValueError, match="differ in length"):
        draw_matches(winter_crop, winter_crop, kpts, kpts[:4], np.ones(5), tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_downsampling_keeps_points_in_place(tmp_path):
    width, height = 5000, 600
    img = np.zeros((height, width), dtype=np.float32)
    pts = np.array([[100.0, 100.0], [2500.0, 300.0], [4890.0, 500.0]])
    for x, y in pts.astype(int):
        img[y - 10 : y + 11, x - 10 : x + 11] = 1.0  # 21 px blob centred on the point

    factor = display_factor([(width, height)])
    small, factors = downsample_for_display(img, factor)

    assert max(small.shape) == DISPLAY_MAX_SIDE
    for shown_pt in to_display_coords(pts, factors):
        x, y = np.round(shown_pt).astype(int)
        window = small[y - 8 : y + 9, x - 8 : x + 9]
        ys, xs = np.nonzero(window > 0.5)
        # The blob's centre in the small image is where the scaled coordinate says.
        assert np.hypot(xs.mean() - 8 + x - shown_pt[0], ys.mean() - 8 + y - shown_pt[1]) < 0.5

    path = draw_matches(img, img, pts, pts, [0.2, 0.5, 0.9], tmp_path / "wide.png")
    png = _read_png(path)
    assert png.shape[1] <= DISPLAY_MAX_SIDE + 300
    _assert_not_blank(png)


def test_draw_error_cdf_and_bars(tmp_path):
    rng = np.random.default_rng(0)
    errors = {
        "lightglue": np.r_[rng.exponential(2.0, 40), [np.inf] * 3],
        "sift": np.r_[rng.exponential(5.0, 40), [np.inf] * 12],
    }
    cdf = _read_png(draw_error_cdf(errors, tmp_path / "cdf.png"))
    assert cdf.shape[:2] == (550, 800)
    _assert_not_blank(cdf)

    table = pd.DataFrame(
        {
            "method": ["lightglue", "lightglue", "lightglue", "sift", "sift", "sift"],
            "season_kind": ["summer-summer", "winter-summer", "all"] * 2,
            "auc@3": [80.0, 40.0, 60.0, 50.0, 5.0, 27.5],
        }
    ).set_index(["method", "season_kind"])
    bars = _read_png(draw_bars(table, tmp_path / "bars.png"))
    assert bars.shape[:2] == (500, 800)
    _assert_not_blank(bars)
    with pytest.raises(ValueError, match="precision"):
        draw_bars(table, tmp_path / "bad.png", metric="precision")
