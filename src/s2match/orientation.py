"""The gradient orientation field of an image: what area correlation compares across seasons.

z = g^2 / |g| (g = dI/dx + i dI/dy): its magnitude is the edge strength and its phase twice the edge direction, so
a field edge that is dark against bright in winter and bright against dark in summer (contrast inversion under
snow) looks the same in both. The refinement of tie points (s2match.twoview.refinement) and the measured shift
between the dates of a pair's ground truth (s2match.data.dateshift) correlate it.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np


def orientation_field(view: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(real, imaginary) float32 planes of z = g^2 / |g| of a (C, H, W) view's mean band, and its valid mask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        image = np.nanmean(view, axis=0) if view.shape[0] > 1 else view[0]
    valid = np.isfinite(image)
    filled = np.where(valid, image, np.nanmedian(image) if valid.any() else 0.0).astype(np.float32)
    smooth = cv2.GaussianBlur(filled, (0, 0), sigma)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.maximum(np.hypot(gx, gy), np.finfo(np.float32).tiny)
    return np.stack([(gx * gx - gy * gy) / magnitude, 2 * gx * gy / magnitude]), valid
