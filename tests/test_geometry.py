import numpy as np
import pytest

from s2match.geo.homography import (
    overlap_fraction,
    random_homography,
    residuals,
    warp_image,
    warp_points,
)

from s2match.twoview.estimators import ROBUST_METHODS, RobustEstimator

SIZE = (320, 256)  # (width, height)


def fit_homography(pts0, pts1, method="usac_magsac"):
    return RobustEstimator(method, 3.0, 0.9999, 10000, 8).fit(pts0, pts1)


def _corner_error(H_a, H_b):
    corners = np.array([[0, 0], [319, 0], [319, 255], [0, 255]], dtype=np.float64)
    return np.linalg.norm(warp_points(H_a, corners) - warp_points(H_b, corners), axis=1).mean()


@pytest.mark.parametrize("method", sorted(ROBUST_METHODS))
def test_fit_recovers_homography_despite_outliers(method):
    rng = np.random.default_rng(3)
    H_true = random_homography(rng, SIZE)
    pts0 = rng.uniform(0, [319, 255], size=(300, 2))
    pts1 = warp_points(H_true, pts0) + rng.normal(0, 0.3, size=(300, 2))
    is_outlier = rng.random(300) < 0.4
    pts1[is_outlier] = rng.uniform(0, [319, 255], size=(is_outlier.sum(), 2))

    fit = fit_homography(pts0, pts1, method=method)

    assert fit.success and fit.reason == ""
    assert fit.H.shape == (3, 3) and fit.H.dtype == np.float64
    assert _corner_error(fit.H, H_true) < 1.0
    assert fit.n_inliers == fit.inliers.sum()
    assert np.mean(fit.inliers == ~is_outlier) > 0.95


def test_the_final_transform_is_the_simplest_model_the_tie_points_support():
    """Refined tie points of two dates (inliers): a shift in noise comes back a shift (two parameters, not eight), as
    does a shift with a scale too small to matter, a small scale the noise cannot hide an affine map, and a
    perspective a homography, each fitted by least squares to the tie points."""
    rng = np.random.default_rng(5)
    pts0 = rng.uniform(0, 512, size=(60, 2))
    noise = rng.normal(0, 0.25, size=(60, 2))

    def simplest(M_true):
        return RobustEstimator.simplest(pts0, warp_points(M_true, pts0) + noise)

    shift, model = simplest(np.array([[1, 0, 0.4], [0, 1, -0.3], [0, 0, 1.0]]))
    assert model == "shift" and np.array_equal(shift[:2, :2], np.eye(2)) and np.all(shift[2] == [0, 0, 1])
    np.testing.assert_allclose(shift[:2, 2], [0.4, -0.3], atol=0.1)

    # a same-date pair: noise so low that a 0.005 px scale across the tile is significant, but far below any use
    noise *= 0.01
    shift, model = simplest(np.array([[1.00001, 0, 0.4], [0, 1.00001, -0.3], [0, 0, 1.0]]))
    assert model == "shift"
    noise *= 100

    affine, model = simplest(np.array([[1.004, 0, -1.0], [0, 1.004, -1.0], [0, 0, 1.0]]))  # 2 px across
    assert model == "affine" and np.all(affine[2] == [0, 0, 1])
    np.testing.assert_allclose(affine[0, 0], 1.004, atol=1e-3)

    perspective = np.array([[1, 0, 0], [0, 1, 0], [1e-5, 0, 1.0]])  # 2.6 px at the far corners
    kept, model = simplest(perspective)
    assert model == "homography"
    assert _corner_error(kept, perspective) < 0.2  # least squares on the tie points, nothing else

    # too few points for eight parameters and an F-test: the affine map
    affine, model = RobustEstimator.simplest(pts0[:4], warp_points(perspective, pts0[:4]))
    assert model == "affine" and np.all(affine[2] == [0, 0, 1])


@pytest.mark.parametrize(
    "pts0, pts1, reason",
    [
        (np.zeros((3, 2)), np.zeros((3, 2)), "need at least"),
        (np.c_[np.arange(20.0), np.arange(20.0)], np.c_[np.arange(20.0), np.arange(20.0)] * 2, "no homography"),
        (np.r_[[[np.nan, 1.0]], np.ones((19, 2))], np.ones((20, 2)), "non-finite"),
        # Every point lands on (nearly) one spot: a rank-deficient, collapsed fit.
        (
            np.random.default_rng(0).uniform(0, 500, (50, 2)),
            100 + np.random.default_rng(1).normal(0, 1e-3, (50, 2)),
            "near-singular",
        ),
    ],
    ids=["too-few", "collinear", "nan", "collapsed"],
)
def test_fit_degenerate_input_fails_without_raising(pts0, pts1, reason):
    fit = fit_homography(pts0, pts1)

    assert not fit.success
    assert fit.H is None and fit.n_inliers == 0
    assert fit.inliers.shape == (len(pts0),) and not fit.inliers.any()
    assert reason in fit.reason


def test_fit_rejects_malformed_arguments():
    pts = np.zeros((10, 2))
    with pytest.raises(ValueError, match="unknown 'lmeds'"):
        fit_homography(pts, pts, method="lmeds")
    with pytest.raises(ValueError, match="differ in length"):
        fit_homography(pts, pts[:9])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        fit_homography(np.zeros((10, 3)), pts)


def test_warp_points_and_residuals():
    translate = np.array([[1.0, 0, 5], [0, 1, -2], [0, 0, 1]])
    pts = np.array([[0.0, 0.0], [10.0, 20.0]])

    assert np.allclose(warp_points(translate, pts), [[5, -2], [15, 18]])
    assert warp_points(translate, np.zeros((0, 2))).shape == (0, 2)
    # A 3-4-5 triangle: the second point is off by (3, 4) after the warp.
    assert np.allclose(residuals(translate, pts, [[5, -2], [18, 22]]), [0.0, 5.0])

    H = random_homography(np.random.default_rng(5), SIZE)
    assert np.allclose(warp_points(np.linalg.inv(H), warp_points(H, pts)), pts)

    # This H sends the line x = 10 to infinity: that point must not come back as a finite location.
    horizon = np.array([[1.0, 0, 0], [0, 1, 0], [1, 0, -10]])
    assert not np.isfinite(warp_points(horizon, pts)[1]).any()


def test_random_homography_is_deterministic_and_keeps_the_image_in_frame():
    draws = [random_homography(np.random.default_rng(seed), SIZE) for seed in range(20)]

    assert np.array_equal(draws[0], random_homography(np.random.default_rng(0), SIZE))
    assert not np.allclose(draws[0], draws[1])
    assert min(overlap_fraction(H, SIZE) for H in draws) >= 0.5


def test_random_homography_rotates_about_the_centre_without_other_terms():
    rng = np.random.default_rng(0)
    H = random_homography(rng, SIZE, rotation_deg=30.0, scale=(1.0, 1.0), shift_frac=0.0, perspective=0.0)
    centre = np.array([[159.5, 127.5]])
    corners = np.array([[0.0, 0.0], [319.0, 255.0]])

    assert np.allclose(warp_points(H, centre), centre, atol=1e-6)
    # A pure rotation keeps distances.
    warped = warp_points(H, corners)
    assert np.isclose(np.linalg.norm(warped[1] - warped[0]), np.linalg.norm(corners[1] - corners[0]))
    assert not np.allclose(H, np.eye(3))

    identity = random_homography(rng, SIZE, rotation_deg=0.0, scale=(1.0, 1.0), shift_frac=0.0, perspective=0.0)
    assert np.allclose(identity, np.eye(3), atol=1e-9)


def test_random_homography_reports_unreachable_overlap():
    with pytest.raises(ValueError, match="too wide"):
        random_homography(np.random.default_rng(0), SIZE, shift_frac=3.0, min_overlap=0.9, max_tries=5)


def test_warp_image_follows_the_pixel_centre_convention():
    img = np.zeros((40, 50), dtype=np.float32)
    img[7, 10] = 1.0  # pixel centre (x=10, y=7)
    scale_2 = np.diag([2.0, 2.0, 1.0])

    warped = warp_image(img, scale_2, (100, 80))

    # With (0, 0) at the centre of the top-left pixel, x -> 2x maps the centre (10, 7) onto (20, 14) exactly.
    assert np.unravel_index(np.nanargmax(warped), warped.shape) == (14, 20)
    assert warped[14, 20] == pytest.approx(1.0)


def test_warp_image_marks_nodata_and_keeps_channels():
    shift = np.array([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]])
    float_rgb = np.ones((20, 30, 3), dtype=np.float32)
    grey_u8 = np.full((20, 30, 1), 200, dtype=np.uint8)

    warped_float = warp_image(float_rgb, shift, (30, 20))
    warped_u8 = warp_image(grey_u8, shift, (30, 20))

    assert warped_float.shape == (20, 30, 3) and warped_u8.shape == (20, 30, 1)
    assert np.isnan(warped_float[:, :9]).all() and np.all(warped_float[:, 11:] == 1.0)
    assert np.all(warped_u8[:, :9] == 0) and np.all(warped_u8[:, 11:] == 200)
