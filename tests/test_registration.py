"""Registration to a fraction of a pixel (s2match.inference.registration, s2match.twoview.refinement): exact
geometry for every extractor, any orientation, sub-pixel shifts, and what the refinement accepts and rejects.

Ground truth is exact: image1 is a real Sentinel-2 crop resampled (cubic) by a known transform, or turned by
np.rot90; the cross-season cases are test pairs of the sample's pipeline (fixture `stages`).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from s2match.config import PROJECT_ROOT, compose_config
from s2match.evaluation.metrics import mean_corner_error
from s2match.evaluation.runner import build_methods, method_specs, pair_scenes, pairs_by_kind
from s2match.geo.homography import corner_pixels, warp_points
from s2match.inference.registration import RegistrationSettings, _Registrar, register, window_grid
from s2match.inference.scenes import ArrayScene, open_image
from s2match.twoview.pipeline import TwoViewPipeline, pipeline_config
from s2match.timeseries.synthetic import shifted_date
from s2match.twoview.refinement import TiePointRefiner

JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160529.jp2"
T36UYA = PROJECT_ROOT / "data" / "sample" / "t36uya_overview"
SIZE = 512
CENTRE = (SIZE - 1) / 2
# The same pipeline for each extractor: its pretrained matcher (SIFT: the ratio test), second pass, refinement.
EXTRACTORS = {
    "sift": ["features=sift", "matcher=ratio"],
    "aliked": ["matcher.weights=pretrained"],
    "disk": ["features=disk", "matcher.weights=pretrained"],
    "xfeat": ["features=xfeat", "matcher.weights=pretrained"],
}


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """(1, 512, 512) float32 DN of a real L1C crop (uint16 on disk)."""
    with rasterio.open(JP2) as src:
        return src.read(window=Window(600, 600, SIZE, SIZE)).astype(np.float32)


def similarity(degrees: float, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Rotation and scale about the crop's centre, then a shift: image0 px -> image1 px."""
    angle = np.deg2rad(degrees)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    H = np.eye(3)
    H[:2, :2] = linear
    H[:2, 2] = np.array([CENTRE, CENTRE]) - linear @ np.array([CENTRE, CENTRE]) + shift
    return H


def resampled(image: np.ndarray, H: np.ndarray) -> np.ndarray:
    """image1 = image0 seen through H (cubic), NaN outside image0's footprint."""
    return cv2.warpPerspective(image[0], H, (SIZE, SIZE), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))[None]


def quarter_turn(image: np.ndarray, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """np.rot90 (counter-clockwise, exact) and the map image0 px -> image1 px."""
    H = np.eye(3)
    for _ in range(turns):  # (x, y) -> (y, W - 1 - x)
        H = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, SIZE - 1.0], [0.0, 0.0, 1.0]]) @ H
    return np.ascontiguousarray(np.rot90(image, turns, axes=(1, 2))), H


def pipeline_for(overrides: list[str]) -> tuple[TwoViewPipeline, RegistrationSettings]:
    cfg = compose_config(overrides)
    return TwoViewPipeline.from_config(pipeline_config(cfg)), RegistrationSettings.from_config(cfg.registration)


def corner_offsets(H_est: np.ndarray, H_true: np.ndarray) -> np.ndarray:
    """(4, 2) displacement of image0's corner pixels under H_true^-1 H_est: zero for an exact fit."""
    corners = corner_pixels(SIZE, SIZE)
    return warp_points(np.linalg.inv(H_true) @ H_est, corners) - corners


@pytest.mark.parametrize("extractor", sorted(EXTRACTORS))
def test_every_extractor_registers_a_known_transform_exactly(crop, extractor):
    """Same date, known transforms: the pixel convention of every path (overview, second pass, rectified
    refinement, orientation search) is exact, with no systematic offset."""
    pipeline, settings = pipeline_for(EXTRACTORS[extractor])
    cases = {"rotation 20, scale 1.1, shift": (resampled(crop, similarity(20, 1.1, (7.3, -4.6))),
                                              similarity(20, 1.1, (7.3, -4.6)))}
    cases.update({f"{90 * turns} degrees": quarter_turn(crop, turns) for turns in (1, 2, 3)})
    image0 = ArrayScene.of(crop, "image0")
    for name, (image1, H_true) in cases.items():
        registration = register(image0, ArrayScene.of(image1, f"image1 {name}"), pipeline, settings)
        assert registration.success, f"{extractor}, {name}: {registration.report['reason']}"
        assert registration.report["fitted_on"] == "refined tie points"
        assert registration.report["refinement"]["model"] != "shift", f"{extractor}, {name}: a turn is no shift"
        offsets = corner_offsets(registration.H, H_true)
        assert np.linalg.norm(offsets, axis=1).mean() <= 0.05, f"{extractor}, {name}: {offsets}"
        assert np.all(np.abs(offsets.mean(axis=0)) <= 0.03), f"{extractor}, {name}: systematic {offsets.mean(0)}"


def test_a_sub_pixel_shift_is_recovered(crop):
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    shift = similarity(0.0, 1.0, (0.3, -0.2))
    registration = register(ArrayScene.of(crop, "image0"), ArrayScene.of(resampled(crop, shift), "shifted"),
                            pipeline, settings)
    assert registration.report["refinement"]["model"] == "shift"  # two parameters: nothing else is there
    assert np.array_equal(registration.H[:2, :2], np.eye(2)) and np.all(registration.H[2] == [0, 0, 1])
    assert np.abs(corner_offsets(registration.H, shift)).max() <= 0.1


def test_the_final_transform_owes_nothing_to_the_fit_that_placed_the_windows(crop):
    """A perspective warp, the windows placed by a fit 1.5 px off at the corners in perspective (what a matcher
    leaves on two seasons): the transform fitted to the refined tie points alone is exact, and so is the next pass,
    with the windows placed by it."""
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    H_true = similarity(5.0, 1.02, (3.1, -2.4)) @ np.array([[1, 0, 0], [0, 1, 0], [2e-5, -1e-5, 1.0]])
    biased = H_true @ np.array([[1, 0, 0], [0, 1, 0], [-6e-6, 6e-6, 1.0]])
    assert 1.0 < np.linalg.norm(corner_offsets(biased, H_true), axis=1).max() < 2.0
    run = _Registrar(ArrayScene.of(crop, "image0"), ArrayScene.of(resampled(crop, H_true), "warped"), pipeline,
                     settings, None)
    tile = (0, 0, SIZE, SIZE)
    points = window_grid(tile, pipeline.refiner.window / 2)
    refined = run.refined_fit([tile], biased, points, np.zeros(len(points)), chance_share=0.0)
    assert refined.correction.success and refined.model == "homography"
    assert np.linalg.norm(corner_offsets(refined.H, H_true), axis=1).mean() <= 0.05
    again = run.refined_fit([tile], refined.H, points, np.zeros(len(points)), chance_share=0.0)
    assert again.correction.success and np.linalg.norm(corner_offsets(again.H, H_true), axis=1).mean() <= 0.05


@pytest.mark.parametrize(("overrides", "box0", "tries"), [
    ([], (0, 0, 512, 512), [(320, False, 40), (1024, False, 0), (1024, True, 0)]),  # quick, whole, second pass on the rectified
    ([], (0, 0, 10980, 10980), [(1024, True, 0)]),  # a whole scene: the second pass, once
    (["registration.second_pass=true"], (0, 0, 512, 512), [(1024, True, 0)]),
    (["registration.second_pass=false"], (0, 0, 512, 512), [(320, False, 40), (1024, False, 0)]),
    (["registration.quick_scale=null"], (0, 0, 512, 512), [(1024, False, 0), (1024, True, 0)]),
    (["registration.refine=false"], (0, 0, 512, 512), [(1024, False, 0)]),  # nothing could confirm a quick fit
    ([], (0, 0, 1200, 900), [(640, False, 40), (1024, False, 0), (1024, True, 0)]),  # quick_scale of the 1024 px overview
])
def test_registration_tries_cheap_before_dear(overrides, box0, tries):
    assert RegistrationSettings.from_config(compose_config(overrides).registration).attempts(box0) == tries


@pytest.mark.parametrize(("pair", "second_pass"), [
    # at 320 px the rotated, rescaled pair gives the coarse fit too few matches: the full-resolution try confirms
    ("t33uuu-crop_r02560_c01536_t33uuu-20160529_t33uuu-20160608", False),
    # snow against summer, rotated 21 degrees: no whole-image fit correlates; the second pass on the rectified pair
    ("ua-T35UNQ_r01536_c00000_ua-T35UNQ-summer_ua-T35UNQ-winter", True),
])
def test_a_try_area_correlation_does_not_confirm_leads_to_the_next(stages, pair, second_pass):
    pairs = stages["pairs"]
    row = pairs[pairs["pair_id"] == pair].iloc[0].to_dict()
    scene0, scene1, H_gt = pair_scenes(row)
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    registration = register(scene0, scene1, pipeline, settings)
    tries = registration.report["attempts"]
    assert [t["confirmed"] for t in tries] == [False] * (len(tries) - 1) + [True], tries
    assert len(tries) > 1 and tries[0]["overview_px"] == 320
    assert (tries[-1]["overview_px"], tries[-1]["second_pass"]) == (SIZE, second_pass), tries
    assert registration.report["fitted_on"] == "refined tie points"
    assert mean_corner_error(registration.H, H_gt, int(row["width"]), int(row["height"])) <= 1.0


def test_a_quick_fit_on_few_tie_points_gives_way_to_full_resolution():
    """A hazy early-spring date of T36UYA against the summer reference (real 107 m overviews, one grid): matched at
    quick_scale, the refinement confirms the fit on fewer tie points than quick_min_tie_points; at full resolution
    it ties about three times as many, and that fit is the result."""
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    scenes = [open_image(T36UYA / f"{date}.tif", "gray", {}, "gray", None) for date in ("20190825", "20160330")]
    registration = register(*scenes, pipeline, settings)
    quick, full = registration.report["attempts"]
    assert quick["confirmed"] and quick["tie_points"] < settings.quick_min_tie_points, quick
    assert full["confirmed"] and full["tie_points"] >= 2 * quick["tie_points"], full
    assert registration.report["inliers"] == full["tie_points"]


@pytest.mark.parametrize("degrees", [37.0, 90.0, 180.0, 270.0])
def test_any_orientation_registers_without_a_georeference(crop, degrees):
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    H_true = similarity(degrees)
    registration = register(ArrayScene.of(crop, "image0"), ArrayScene.of(resampled(crop, H_true), f"{degrees}"),
                            pipeline, settings)
    assert registration.success, registration.report["reason"]
    assert np.linalg.norm(corner_offsets(registration.H, H_true), axis=1).mean() <= 1.0


def test_inverted_contrast_registers(crop):
    """Snow can turn a bright field dark against its hedges: image1 is image0 with its contrast inverted."""
    pipeline, settings = pipeline_for(EXTRACTORS["aliked"])
    H_true = similarity(15, 1.05, (5.5, -3.2))
    inverted = resampled(crop.max() - crop, H_true)
    registration = register(ArrayScene.of(crop, "image0"), ArrayScene.of(inverted, "inverted"), pipeline, settings)
    assert registration.success, registration.report["reason"]
    assert registration.report["coarse"]["contrast_inverted"]
    assert np.linalg.norm(corner_offsets(registration.H, H_true), axis=1).mean() <= 0.1


def test_refinement_never_worsens_real_cross_season_pairs(stages):
    """The test pairs of the sample: two real dates, image1 warped by a known homography. The dates' own
    misregistration is in the error of both methods alike; the refinement must not add to it."""
    pairs = stages["pairs"]
    cross = pairs[(pairs["split"] == "test") & (pairs["season0"] != pairs["season1"])]
    specs = {spec.name: spec for spec in method_specs(compose_config(["matcher.weights=pretrained"]))}
    unrefined, refined = build_methods([specs["trained_second_pass"], specs["trained"]])
    errors = {"unrefined": [], "refined": []}
    for row in pairs_by_kind(cross, 4).to_dict("records"):
        scene0, scene1, H_gt = pair_scenes(row)
        for name, method in (("unrefined", unrefined), ("refined", refined)):
            registration = method.register(scene0, scene1)
            errors[name].append(mean_corner_error(registration.H, H_gt, int(row["width"]), int(row["height"])))
    assert np.median(errors["refined"]) <= np.median(errors["unrefined"])


@pytest.fixture(scope="module")
def refiner() -> TiePointRefiner:
    return TiePointRefiner.from_config(compose_config().refinement)


def test_unambiguous_windows_are_refined_and_ambiguous_ones_rejected(crop, refiner):
    textured = crop.copy()
    shifted = resampled(textured, similarity(0.0, 1.0, (0.4, -0.7)))
    # image1: a flat patch (no structure), a patch of cloud-like noise unrelated to image0, and no data
    shifted[:, 40:140, 40:140] = np.nanmedian(shifted)
    shifted[:, 40:140, 372:472] = np.random.default_rng(0).normal(3000, 800, (100, 100)).astype(np.float32)
    shifted[:, 372:472, 40:140] = np.nan
    points = np.array([[256.0, 256.0], [320.0, 200.0], [90.0, 90.0], [422.0, 90.0], [90.0, 422.0]])
    refined = refiner.refine(textured, shifted, points)
    # the flat patch correlates with nothing; the noise peak lands anywhere: too far, or too weak
    assert list(refined.status[[0, 1, 2, 4]]) == ["ok", "ok", "low correlation", "no data"]
    assert refined.status[3] in ("low correlation", "shift too large")
    ok = refined.reliable
    # the ground at points0 lies at points0 + shift in image1
    assert np.abs(refined.shifts[ok] - (0.4, -0.7)).max() <= 0.1  # one window alone; the fit averages many
    assert np.all(refined.quality[ok] > refined.quality[~ok].max())


def test_more_windows_than_one_resampling_call_takes_are_all_refined(crop, refiner):
    """A whole-tile grid has thousands of windows; OpenCV's remap takes fewer than 32767 rows of windows at a time."""
    shifted = resampled(crop, similarity(0.0, 1.0, (0.4, -0.7)))
    lattice = np.arange(40.0, SIZE - 40.0, 16.0)
    points = np.stack(np.meshgrid(lattice, lattice), axis=-1).reshape(-1, 2)
    assert len(points) * refiner.window > np.iinfo(np.int16).max
    refined = refiner.refine(crop, shifted, points)
    assert refined.reliable.mean() > 0.9
    assert np.abs(np.median(refined.shifts[refined.reliable], axis=0) - (0.4, -0.7)).max() <= 0.02


def test_windows_all_on_no_data_are_rejected_without_error(crop, refiner):
    """A cloud mask or a footprint edge can leave no window with data: every one is rejected, none raises."""
    empty = np.full_like(crop, np.nan)
    refined = refiner.refine(crop, empty, np.array([[256.0, 256.0], [100.0, 300.0]]))
    assert list(refined.status) == ["no data", "no data"] and not refined.reliable.any()


def test_georeferenced_dates_the_matcher_cannot_tie_register_on_a_grid_of_windows(tmp_path):
    """A cloudy summer date against the clear reference of T36UYA (real 107 m overviews, one grid), with too few
    keypoints for the matcher to fit anything: windows on a grid placed by the georeference find the shift given to
    the date's content. Shift consistency (as the evaluation's protocol) cancels the dates' own misregistration;
    without grid windows the same pair fails with its reason."""
    window = Window(0, 0, 1024, 1024)
    reference = shifted_date(T36UYA / "20190825.tif", window, (0.0, 0.0), tmp_path / "reference.tif", "20190825")
    given = (0.37, -1.62)
    cloudy = {shift: shifted_date(T36UYA / "20190721.tif", window, shift, tmp_path / f"cloudy{i}.tif", "20190721")
              for i, shift in enumerate([(0.0, 0.0), given])}
    pipeline, settings = pipeline_for(["features=sift", "matcher=ratio", "features.max_keypoints=15"])
    scenes = {shift: open_image(path, "gray", {}, "gray", None) for shift, path in cloudy.items()}
    found = {shift: register(open_image(reference, "gray", {}, "gray", None), scene, pipeline, settings)
             for shift, scene in scenes.items()}
    for registration in found.values():
        assert registration.success, registration.report["reason"]
        assert not registration.report["matcher"]["success"]
        assert registration.report["refinement"]["windows_at"] == ("a grid over the overlap placed by the "
                                                                  "georeference")
        assert registration.report["refinement"]["inliers"] >= 20
    centre = np.array([[511.5, 511.5]])
    moved = warp_points(found[given].H, centre) - warp_points(found[(0.0, 0.0)].H, centre)
    assert np.linalg.norm(moved[0] - given) <= 0.1

    # content 40 px off its georeference: beyond every window's reach, so nothing registers rather than a guess
    far = shifted_date(T36UYA / "20190721.tif", window, (40.0, -25.0), tmp_path / "far.tif", "20190721")
    beyond = register(open_image(reference, "gray", {}, "gray", None), open_image(far, "gray", {}, "gray", None),
                      pipeline, settings)
    assert not beyond.success and "windows on a grid" in beyond.report["reason"]

    without = RegistrationSettings.from_config({**settings.__dict__, "grid_windows": False})
    failed = register(open_image(reference, "gray", {}, "gray", None), scenes[given], pipeline, without)
    assert not failed.success and failed.report["reason"] == "no reliable transform: 0 correspondences, need at least 20"
