"""Radial-tangential (OpenCV k1 k2 p1 p2 k3) lens distortion, removed by inverse mapping.

Every output pixel centre (j + 0.5, i + 0.5) of the distortion-free image is pushed through the distortion
model to the place where the lens imaged it, and the source image is sampled there bilinearly. The
distortion-free image keeps the same intrinsics, so the layout's pinhole camera describes it exactly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def distort_normalized(x: np.ndarray, y: np.ndarray, distortion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ideal normalised image coordinates (X/Z, Y/Z) to where the lens puts them."""
    k1, k2, p1, p2, k3 = (float(c) for c in distortion)
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    x_distorted = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    y_distorted = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return x_distorted, y_distorted


def undistortion_map(intrinsics: np.ndarray, distortion: np.ndarray, width: int, height: int) -> np.ndarray:
    """Source-image sampling positions [2, H, W] (row, column in array indices) for every output pixel."""
    k = np.asarray(intrinsics, np.float64)
    columns, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([columns, rows, np.ones_like(columns)], axis=-1)
    normalized = pixels @ np.linalg.inv(k).T
    x_distorted, y_distorted = distort_normalized(normalized[..., 0], normalized[..., 1], distortion)
    source = np.stack([x_distorted, y_distorted, np.ones_like(x_distorted)], axis=-1) @ k.T
    return np.stack([source[..., 1] - 0.5, source[..., 0] - 0.5])


def undistort_image(image: np.ndarray, sampling_map: np.ndarray) -> np.ndarray:
    """Bilinear resampling of uint8 [H, W, 3] (or [H, W]) at `sampling_map`; outside the frame is black."""
    channels = image[..., None] if image.ndim == 2 else image
    out = np.stack(
        [
            ndimage.map_coordinates(channels[..., c].astype(np.float32), sampling_map, order=1, cval=0.0)
            for c in range(channels.shape[-1])
        ],
        axis=-1,
    )
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out
