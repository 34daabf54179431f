"""Rotation conversions in jnp, batched over leading axes; quaternions are wxyz like the rasterizer."""

from __future__ import annotations

import jax.numpy as jnp


def axis_angle_to_matrix(axis_angle: jnp.ndarray) -> jnp.ndarray:
    """Rodrigues: [..., 3] rotation vectors (radians) -> [..., 3, 3]; exact at the zero rotation."""
    axis_angle = jnp.asarray(axis_angle)
    angle = jnp.linalg.norm(axis_angle, axis=-1, keepdims=True)[..., None]
    safe = jnp.where(angle > 1e-8, angle, 1.0)
    x, y, z = jnp.moveaxis(axis_angle, -1, 0)
    zero = jnp.zeros_like(x)
    skew = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(*x.shape, 3, 3)
    sin_term = jnp.where(angle > 1e-8, jnp.sin(safe) / safe, 1.0)
    cos_term = jnp.where(angle > 1e-8, (1.0 - jnp.cos(safe)) / safe**2, 0.5)
    return jnp.eye(3, dtype=skew.dtype) + sin_term * skew + cos_term * (skew @ skew)


def matrix_to_quaternion(matrix: jnp.ndarray) -> jnp.ndarray:
    """[..., 3, 3] rotation matrices -> [..., 4] unit quaternions wxyz with w >= 0 (Shepperd's method)."""
    m = jnp.asarray(matrix)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    trace = m00 + m11 + m22
    candidates = jnp.stack(
        [
            jnp.stack(
                [
                    1.0 + trace,
                    m[..., 2, 1] - m[..., 1, 2],
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
            jnp.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1.0 + m00 - m11 - m22,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            jnp.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1.0 - m00 + m11 - m22,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            jnp.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1.0 - m00 - m11 + m22,
                ],
                -1,
            ),
        ],
        axis=-2,
    )
    # The candidate with the largest diagonal term is numerically the best conditioned.
    best = jnp.argmax(jnp.stack([trace, m00, m11, m22], -1), axis=-1)
    quat = jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    quat = quat / jnp.linalg.norm(quat, axis=-1, keepdims=True)
    return jnp.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_matrix(quat: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] quaternions wxyz (normalised here) -> [..., 3, 3]."""
    q = jnp.asarray(quat)
    w, x, y, z = jnp.moveaxis(q / jnp.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return jnp.stack(rows, axis=-1).reshape(*w.shape, 3, 3)


def matrix_to_axis_angle(matrix: jnp.ndarray) -> jnp.ndarray:
    """[..., 3, 3] rotation matrices -> [..., 3] rotation vectors (radians, angle in [0, pi]); finite gradients at
    the identity."""
    quat = matrix_to_quaternion(matrix)  # w >= 0
    w, vector = quat[..., :1], quat[..., 1:]
    norm_sq = jnp.sum(vector**2, axis=-1, keepdims=True)
    small = norm_sq < 1e-12
    norm = jnp.sqrt(jnp.where(small, 1.0, norm_sq))
    factor = jnp.where(small, 2.0 / jnp.maximum(w, 1e-6), 2.0 * jnp.arctan2(norm, w) / norm)
    return vector * factor
