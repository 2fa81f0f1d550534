from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import Window

from s2match.geo.homography import warp_image
from s2match.viz import (
    GAP_PX,
    MARGIN_PX,
    MIN_SHORT_SIDE_PX,
    PANEL_TITLE_PX,
    TITLE_LINE_PX,
    OverlayWindow,
    ResidualField,
    display_image,
    draw_bars,
    draw_error_cdf,
    draw_keypoints,
    draw_matches,
    draw_overlay,
    pair_canvas,
    resize,
    stretch,
    to_display_coords,
)

STRIP = Path(__file__).resolve().parents[1] / "data/sample/ukraine/T35UNQ"
CROP_W, CROP_H = 320, 256


def read(name: str, window: Window) -> np.ndarray:
    """A real RGB crop (H, W, 3) uint8 of the winter / summer strip."""
    with rasterio.open(STRIP / name) as src:
        return src.read(window=window).transpose(1, 2, 0)


@pytest.fixture(scope="module")
def winter_crop() -> np.ndarray:
    return read("winter.tif", Window(0, 1000, CROP_W, CROP_H))


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
    assert stretch(reflectance[..., None]).shape == (64, 64)
    assert np.all(stretch(np.full((4, 4), np.nan)) == 0)
    with pytest.raises(ValueError, match="grey"):
        stretch(np.zeros((4, 4, 2)))


def test_display_image_shows_detail_in_snow_and_in_dark_fields():
    # Half snow (bright, faint texture), half dark summer fields (faint texture), and a no-data corner.
    rng = np.random.default_rng(0)
    texture = rng.normal(0.0, 0.01, size=(128, 128)).astype(np.float32)
    image = np.where(np.arange(128)[:, None] < 64, 0.85, 0.08).astype(np.float32) + texture
    image[:8, :8] = np.nan

    shown = display_image(image)

    assert shown.shape == (128, 128, 3) and shown.dtype == np.uint8
    assert np.all(shown[:8, :8] == 0)
    snow, fields = shown[8:56, 8:, 0].astype(float), shown[72:, :, 0].astype(float)
    # a global stretch leaves each half a near-constant grey; the local contrast brings the texture out in both
    plain = stretch(image, 0.5, 99.5).astype(float)
    assert snow.std() > 1.5 * plain[8:56, 8:].std() and fields.std() > 1.5 * plain[72:].std()
    assert snow.mean() > fields.mean() + 40  # and snow stays brighter than the fields
    rgb = display_image(np.dstack([image] * 3))
    assert rgb.shape == (128, 128, 3) and np.all(rgb[:8, :8] == 0)


# A tall strip, a wide strip (the strip turned) and a square scene: (winter, summer) crops of the real strip.
SHAPES = {
    "tall": lambda name: read(name, Window(0, 1000, 160, 1600)),
    "wide": lambda name: np.ascontiguousarray(np.rot90(read(name, Window(0, 1000, 160, 1600)))),
    "square": lambda name: read(name, Window(0, 1000, 400, 400)),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_pictures_are_readable_on_every_shape(shape, tmp_path):
    winter, summer = SHAPES[shape]("winter.tif"), SHAPES[shape]("summer.tif")
    height, width = winter.shape[:2]
    rng = np.random.default_rng(0)
    kpts = rng.uniform(0, [width - 1, height - 1], size=(600, 2))
    moved = kpts + rng.normal(0, 0.5, size=kpts.shape)
    moved[:100] += rng.uniform(-60, 60, size=(100, 2))  # outliers
    inliers = np.arange(600) >= 100

    canvas = pair_canvas(winter, summer)
    drawn = [np.array([width, height]) * factors for factors in canvas.factors]
    assert all(min(size) >= MIN_SHORT_SIDE_PX - 0.5 for size in drawn)  # each image >= 300 px on its short side
    assert canvas.stacked == (shape == "wide")  # wide pairs one above the other, the others side by side
    gap = canvas.offsets[1] - np.where(canvas.stacked, [0, drawn[0][1]], [drawn[0][0], 0])
    assert np.allclose(gap, [0, GAP_PX] if canvas.stacked else [GAP_PX, 0], atol=0.5)

    title = "image0 winter.tif vs image1 summer.tif\nSIFT + ratio test"
    matches = _read_png(draw_matches(winter, summer, kpts, moved, rng.random(600), tmp_path / "m.png",
                                     max_lines=300, subset="random", inliers=inliers, title=title))
    # the canvas drawn 1:1 under three title lines (two given, one legend), inside the margins
    picture_h, picture_w = canvas.picture.shape[:2]
    assert matches.shape[:2] == (picture_h + 2 * MARGIN_PX + 3 * TITLE_LINE_PX, picture_w + 2 * MARGIN_PX)
    _assert_not_blank(matches)
    # green inliers and red outliers are both drawn
    b, g, r = (matches[..., c].astype(int) for c in range(3))
    assert np.sum((g > 200) & (r < 120) & (b < 120)) > 200 and np.sum((r > 200) & (g < 80) & (b < 80)) > 50

    tile = np.array([[-0.5, -0.5], [width / 2, -0.5], [width / 2, height / 2], [-0.5, height / 2]])
    keypoints = _read_png(draw_keypoints(winter, summer, kpts, moved, tmp_path / "k.png", [tile], [tile],
                                         title=title, max_points=400))
    assert keypoints.shape == matches.shape
    _assert_not_blank(keypoints)

    resampled = warp_image(summer.astype(np.float32), np.eye(3), (width, height))
    windows = [OverlayWindow(winter[:64, :64], resampled[:64, :64], (0, 0, 64, 64), "window 1")]
    residuals = ResidualField(kpts[100:], rng.normal(0, 2.0, size=(500, 2)), "m", "residuals")
    overlay = _read_png(draw_overlay(winter, resampled, tmp_path / "o.png", windows, residuals, title=title))
    _assert_not_blank(overlay)
    assert min(overlay.shape[:2]) >= MIN_SHORT_SIDE_PX + 2 * MARGIN_PX
    assert list(sorted(p.name for p in tmp_path.iterdir())) == ["k.png", "m.png", "o.png"]  # no temporary files


def test_overlay_panels_are_laid_out_by_shape(tmp_path):
    # A tall view: whole-view panels side by side; a wide one: one above the other.
    for size, rows in (((100, 400), 1), ((400, 100), 2)):
        view = np.random.default_rng(0).random((size[1], size[0])).astype(np.float32)
        png = _read_png(draw_overlay(view, view, tmp_path / "o.png", long_side=400))
        short = MIN_SHORT_SIDE_PX  # 100 px enlarged to 300, the long side to 1200
        panel_h, panel_w = (4 * short, short) if rows == 1 else (short, 4 * short)
        expected_h = 2 * MARGIN_PX + rows * (panel_h + PANEL_TITLE_PX) + (rows - 1) * GAP_PX
        expected_w = 2 * MARGIN_PX + (2 * panel_w + GAP_PX if rows == 1 else panel_w)
        assert png.shape[:2] == (expected_h, expected_w)


def test_draw_matches_checks_its_arguments(winter_crop, tmp_path):
    kpts = np.zeros((5, 2))
    with pytest.raises(ValueError, match="subset='first' or 'random'"):
        draw_matches(winter_crop, winter_crop, kpts, kpts, np.ones(5), tmp_path / "m.png", max_lines=3)
    with pytest.raises(ValueError, match="needs max_lines"):
        draw_matches(winter_crop, winter_crop, kpts, kpts, np.ones(5), tmp_path / "m.png", subset="first")
    with pytest.raises(ValueError, match="differ in length"):
        draw_matches(winter_crop, winter_crop, kpts, kpts[:4], np.ones(5), tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_resizing_keeps_points_in_place():
    width, height = 5000, 600
    img = np.zeros((height, width), dtype=np.float32)
    pts = np.array([[100.0, 100.0], [2500.0, 300.0], [4890.0, 500.0]])
    for x, y in pts.astype(int):
        img[y - 10 : y + 11, x - 10 : x + 11] = 1.0  # 21 px blob centred on the point

    small = resize(img, (2000, 240))
    factors = np.array([2000 / width, 240 / height])

    for shown_pt in to_display_coords(pts, factors):
        x, y = np.round(shown_pt).astype(int)
        window = small[y - 8 : y + 9, x - 8 : x + 9]
        ys, xs = np.nonzero(window > 0.5)
        # The blob's centre in the small image is where the scaled coordinate says.
        assert np.hypot(xs.mean() - 8 + x - shown_pt[0], ys.mean() - 8 + y - shown_pt[1]) < 0.5


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
