"""Homographies in pixels: warping points and images, corner and overlap geometry, synthetic homographies.

Pixel convention (OpenCV) throughout: a point is (x, y) in pixels, (0, 0) is the centre of the top-left
pixel, x grows to the right and y downwards. A homography H is a 3x3 float64 array that maps image0 pixel
coordinates to image1 pixel coordinates.
"""

import cv2
import numpy as np


def as_points(pts, name: str) -> np.ndarray:
    """`pts` as an (N, 2) float64 array of (x, y) pixel coords; ValueError naming `name` otherwise."""
    array = np.asarray(pts, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) of (x, y) pixel coords, got {array.shape}")
    return array


def warp_points(H: np.ndarray, pts) -> np.ndarray:
    """Map (N, 2) pixel coords through H (OpenCV convention, (0,0) = centre of the top-left pixel).

    Points sent to the line at infinity come out inf (or NaN), never as a finite location.
    """
    pts = as_points(pts, "pts")
    projected = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, dtype=np.float64).T
    # Plain division, not cv2.perspectiveTransform: OpenCV returns (0, 0) for points sent to infinity and for
    # a NaN H, which would pass as a valid location; here they come out inf / NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        return projected[:, :2] / projected[:, 2:]


def residuals(H: np.ndarray, pts0, pts1) -> np.ndarray:
    """Per-correspondence reprojection error ||H(pts0) - pts1|| in image1 pixels."""
    pts1 = as_points(pts1, "pts1")
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

    Bicubic interpolation (bilinear smooths by an amount that varies with the sub-pixel offset, which biases
    the sub-pixel refinement), OpenCV pixel convention. Output pixels whose source lies outside the image
    footprint (edges at -0.5 and W - 0.5) are NaN for float images and 0 for integer images.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"image must be a non-empty H x W or H x W x C array, got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating) and img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float32)  # OpenCV cannot resample float16
    H = np.asarray(H, dtype=np.float64)
    dsize = (int(size[0]), int(size[1]))
    # A NaN border would leak into the last row and column through zero interpolation weights (0 * NaN = NaN), so
    # resample with a replicated border and cut the footprint out with a nearest-neighbour mask instead.
    warped = cv2.warpPerspective(img, H, dsize, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    footprint = np.ones(img.shape[:2], dtype=np.uint8)
    inside = cv2.warpPerspective(footprint, H, dsize, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT) > 0
    # OpenCV drops a trailing single channel axis; keep the caller's layout.
    warped = warped.reshape(warped.shape[:2] + img.shape[2:])
    nodata = np.nan if np.issubdtype(img.dtype, np.floating) else 0
    warped[~inside] = nodata
    return warped
