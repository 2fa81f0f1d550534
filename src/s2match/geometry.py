"""Homography estimation, point/image warping and synthetic homographies.

Pixel convention (OpenCV) throughout: a point is (x, y) in pixels, (0, 0) is the centre of the top-left
pixel, x grows to the right and y downwards. A homography H is a 3x3 float64 array that maps image0 pixel
coordinates to image1 pixel coordinates.
"""

from dataclasses import dataclass

import cv2
import numpy as np

ROBUST_METHODS = {
    "usac_magsac": cv2.USAC_MAGSAC,
    "usac_accurate": cv2.USAC_ACCURATE,
    "ransac": cv2.RANSAC,
}

# A minimal sample of 4 correspondences always fits exactly, so a fit needs support beyond it to mean anything.
DEFAULT_MIN_INLIERS = 8

# Bounds on the local area scale |det J| of a fitted H at the inlier centroid: outside them the fit has
# collapsed (near-singular) or blown up, which real image pairs never do.
MIN_AREA_SCALE = 1e-4
MAX_AREA_SCALE = 1e4


@dataclass(frozen=True)
class FitResult:
    """Outcome of a robust homography fit.

    H: 3x3 float64 mapping image0 -> image1 pixel coords, or None when the fit failed.
    inliers: bool mask of shape (N,) over the input correspondences (all False on failure).
    reason: why the fit failed; empty on success.
    """

    H: np.ndarray | None
    inliers: np.ndarray
    n_inliers: int
    success: bool
    reason: str = ""


def _as_points(pts, name: str) -> np.ndarray:
    array = np.asarray(pts, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) of (x, y) pixel coords, got {array.shape}")
    return array


def _failure(n_points: int, reason: str) -> FitResult:
    return FitResult(H=None, inliers=np.zeros(n_points, dtype=bool), n_inliers=0, success=False, reason=reason)


def _degeneracy(H: np.ndarray, inlier_pts0: np.ndarray) -> str:
    """Why an estimated H is unusable on these inlier points, or '' when it is fine."""
    if not np.all(np.isfinite(H)):
        return "estimated homography is not finite"
    homogeneous = np.c_[inlier_pts0, np.ones(len(inlier_pts0))]
    w = homogeneous @ H[2]
    w_centroid = np.r_[inlier_pts0.mean(axis=0), 1.0] @ H[2]
    if w_centroid == 0 or np.any(np.sign(w) != np.sign(w_centroid)):
        return "estimated homography sends inliers through the line at infinity"
    # Jacobian determinant of a homography at p is det(H) / w(p)^3.
    area_scale = abs(np.linalg.det(H) / w_centroid**3)
    if not MIN_AREA_SCALE <= area_scale <= MAX_AREA_SCALE:
        return f"estimated homography is near-singular (local area scale {area_scale:.3g})"
    return ""


def fit_homography(
    pts0,
    pts1,
    method: str = "usac_magsac",
    threshold: float = 3.0,
    confidence: float = 0.9999,
    max_iters: int = 10000,
    min_inliers: int = DEFAULT_MIN_INLIERS,
) -> FitResult:
    """Robustly fit H with pts1 ~ H(pts0) using OpenCV (USAC MAGSAC++ by default).

    pts0, pts1: (N, 2) matched pixel coords (OpenCV convention, (0,0) = centre of the top-left pixel).
    threshold: inlier reprojection threshold in image1 pixels.
    Degenerate data (fewer than 4 or `min_inliers` points, non-finite coords, collinear points, an H that is
    not finite or near-singular) never raises: it returns a FitResult with success False and a reason.
    Malformed arguments (wrong shapes, unknown method) raise ValueError.
    """
    if method not in ROBUST_METHODS:
        raise ValueError(f"unknown homography method {method!r}, expected one of {sorted(ROBUST_METHODS)}")
    pts0 = _as_points(pts0, "pts0")
    pts1 = _as_points(pts1, "pts1")
    if len(pts0) != len(pts1):
        raise ValueError(f"pts0 and pts1 differ in length: {len(pts0)} vs {len(pts1)}")
    n_points = len(pts0)
    needed = max(4, min_inliers)
    if n_points < needed:
        return _failure(n_points, f"{n_points} correspondences, need at least {needed}")
    if not (np.all(np.isfinite(pts0)) and np.all(np.isfinite(pts1))):
        return _failure(n_points, "correspondences contain non-finite coordinates")
    try:
        H, mask = cv2.findHomography(
            pts0, pts1, ROBUST_METHODS[method], threshold, maxIters=max_iters, confidence=confidence
        )
    except cv2.error as error:
        return _failure(n_points, f"OpenCV findHomography failed: {str(error).strip().splitlines()[-1]}")
    if H is None or mask is None:
        return _failure(n_points, "no homography found (degenerate configuration, e.g. collinear points)")
    inliers = mask.ravel().astype(bool)
    n_inliers = int(inliers.sum())
    if n_inliers < needed:
        return _failure(n_points, f"{n_inliers} inliers, need at least {needed}")
    H = np.asarray(H, dtype=np.float64)
    reason = _degeneracy(H, pts0[inliers])
    if reason:
        return _failure(n_points, reason)
    return FitResult(H=H, inliers=inliers, n_inliers=n_inliers, success=True)


def warp_points(H: np.ndarray, pts) -> np.ndarray:
    """Map (N, 2) pixel coords through H (OpenCV convention, (0,0) = centre of the top-left pixel).

    Points sent to the line at infinity come out inf (or NaN), never as a finite location.
    """
    pts = _as_points(pts, "pts")
    projected = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, dtype=np.float64).T
    # Plain division, not cv2.perspectiveTransform: OpenCV returns (0, 0) for points sent to infinity and for
    # a NaN H, which would pass as a valid location; here they come out inf / NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        return projected[:, :2] / projected[:, 2:]


def residuals(H: np.ndarray, pts0, pts1) -> np.ndarray:
    """Per-correspondence reprojection error ||H(pts0) - pts1|| in image1 pixels."""
    pts1 = _as_points(pts1, "pts1")
    projected = warp_points(H, pts0)
    if len(projected) != len(pts1):
        raise ValueError(f"pts0 and pts1 differ in length: {len(projected)} vs {len(pts1)}")
    return np.linalg.norm(projected - pts1, axis=1)


def corner_pixels(width: int, height: int) -> np.ndarray:
    """Centres of the four corner pixels, clockwise from the top-left."""
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float64)


def overlap_fraction(H: np.ndarray, size: tuple[int, int]) -> float:
    """Co-visible share for two frames of the same `size`=(width, height) related by H.

    The smaller of: the share of the image1 frame covered by image0 warped with H, and the share of warped
    image0 that lies inside the image1 frame. 0 when H folds the frame through the line at infinity.
    """
    width, height = size
    frame = corner_pixels(width, height).astype(np.float32)
    warped = warp_points(H, frame).astype(np.float32)
    if not np.all(np.isfinite(warped)) or not cv2.isContourConvex(warped[:, None, :]):
        return 0.0
    area, _ = cv2.intersectConvexConvex(frame, warped)
    return float(area) / max(cv2.contourArea(frame), cv2.contourArea(warped))


def random_homography(
    rng: np.random.Generator,
    size: tuple[int, int],
    rotation_deg: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.25),
    shift_frac: float = 0.1,
    perspective: float = 0.05,
    min_overlap: float = 0.5,
    max_tries: int = 100,
) -> np.ndarray:
    """Draw a homography mapping image0 pixel coords to image1 pixel coords for a frame of `size`=(width, height).

    The four corner pixels are first jittered independently by up to `perspective` x (width, height) (mild
    perspective), then rotated by a uniform angle in [-rotation_deg, rotation_deg] and scaled by a
    log-uniform factor in `scale` about the image centre, then shifted by up to `shift_frac` x (width, height).
    Draws are repeated until image0 warped with H covers at least `min_overlap` of the frame, so the warped
    image stays mostly inside it. Deterministic for a given Generator state. OpenCV pixel convention.
    """
    width, height = size
    low, high = scale
    if width < 2 or height < 2:
        raise ValueError(f"size must be (width, height) of at least 2x2 pixels, got {size}")
    if not 0 < low <= high:
        raise ValueError(f"scale must be a range (low, high) with 0 < low <= high, got {scale}")
    corners = corner_pixels(width, height)
    centre = corners[2] / 2.0
    for _ in range(max_tries):
        jitter = rng.uniform(-perspective, perspective, size=(4, 2)) * (width, height)
        angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
        factor = np.exp(rng.uniform(np.log(low), np.log(high)))
        shift = rng.uniform(-shift_frac, shift_frac, size=2) * (width, height)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        moved = (corners + jitter - centre) @ rotation.T * factor + centre + shift
        H = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32)).astype(np.float64)
        if overlap_fraction(H, size) >= min_overlap:
            return H
    raise ValueError(
        f"no homography with overlap >= {min_overlap} in {max_tries} draws for size {size}: "
        f"rotation_deg={rotation_deg}, scale={scale}, shift_frac={shift_frac}, perspective={perspective} too wide"
    )


def warp_image(img: np.ndarray, H: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample img (H x W or H x W x C) into the image1 frame of `size`=(width, height): out(H(p)) = img(p).

    Bilinear interpolation, OpenCV pixel convention. Output pixels whose source lies outside the image
    footprint (edges at -0.5 and W - 0.5) are NaN for float images and 0 for integer images.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"image must be a non-empty H x W or H x W x C array, got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating) and img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float32)  # OpenCV cannot resample float16
    H = np.asarray(H, dtype=np.float64)
    dsize = (int(size[0]), int(size[1]))
    # A NaN border would leak into the last row and column through zero bilinear weights (0 * NaN = NaN), so
    # resample with a replicated border and cut the footprint out with a nearest-neighbour mask instead.
    warped = cv2.warpPerspective(img, H, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    footprint = np.ones(img.shape[:2], dtype=np.uint8)
    inside = cv2.warpPerspective(footprint, H, dsize, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT) > 0
    # OpenCV drops a trailing single channel axis; keep the caller's layout.
    warped = warped.reshape(warped.shape[:2] + img.shape[2:])
    nodata = np.nan if np.issubdtype(img.dtype, np.floating) else 0
    warped[~inside] = nodata
    return warped
