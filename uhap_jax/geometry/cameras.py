"""Pinhole cameras in OpenCV axes (x right, y down, z forward); pixel (i, j) is centred at (j+0.5, i+0.5)."""

from __future__ import annotations

import numpy as np


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 1.0, 0.0)) -> np.ndarray:
    """World-to-camera [4, 4] for a camera at `eye` looking at `target`; world `up` shows as up."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)  # OpenCV axes: right = forward x up, down = forward x right.
    if np.linalg.norm(right) < 1e-9:
        raise ValueError(f"look_at: view direction {forward} is parallel to up {up}")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = rotation
    world_to_cam[:3, 3] = -rotation @ eye
    return world_to_cam


def intrinsics_from_fov(fov_y_deg: float, width: int, height: int) -> np.ndarray:
    """K [3, 3] with square pixels, vertical field of view `fov_y_deg`, principal point at the centre."""
    focal = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2)
    return np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def project(points: np.ndarray, world_to_cam: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N, 3] -> pixel coordinates [N, 2] (x, y) and camera depth [N]."""
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    uvw = cam @ intrinsics.T
    return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]
