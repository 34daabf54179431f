"""Step 1 of the rasterizer: EWA projection of 3D Gaussians to screen space, with gsplat 1.5.3's culling.

Plain XLA and differentiable by autodiff. Outputs are per camera: [C, N, ...].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.constants import ALPHA_MIN, EPS2D, FAR_PLANE, FRUSTUM_MARGIN, MAX_EXTEND, NEAR_PLANE


class Projected(NamedTuple):
    means2d: jax.Array  # [C, N, 2] pixels
    conics: jax.Array  # [C, N, 3] (inverse 2D covariance: xx, xy, yy)
    depths: jax.Array  # [C, N] camera-space z
    radii: jax.Array  # [C, N, 2] int32 pixels; 0 means culled
    opacities: jax.Array  # [C, N] opacity used for compositing (times the compensation when antialiased)


def quat_to_rotmat(quats: jax.Array) -> jax.Array:
    """wxyz quaternions [..., 4] (normalised here) to rotation matrices [..., 3, 3]."""
    q = quats / jnp.linalg.norm(quats, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched products of tiny matrices as unrolled multiply-adds: one fused elementwise kernel, and full float32
    (a dot would take the GPU's TF32 default, which moves Gaussians by a fraction of a pixel). Not a broadcast
    multiply and a sum over the inner axis: XLA:CPU in jaxlib 0.10.2 miscompiles that reduce when a broadcast slice
    of an operand is added after it (camera-space means of Gaussians past index ~10.9k came out wrong)."""
    return sum(a[..., :, k, None] * b[..., None, k, :] for k in range(a.shape[-1]))


def covariance_3d(quats: jax.Array, scales: jax.Array) -> jax.Array:
    """Sigma = R S S^T R^T for [N,4] quats and [N,3] linear scales -> [N,3,3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return _matmul(m, jnp.swapaxes(m, -1, -2))


def project(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    world_to_cam: jax.Array,
    intrinsics: jax.Array,
    *,
    width: int,
    height: int,
    antialiased: bool = False,
) -> Projected:
    """Project N Gaussians into C cameras exactly as gsplat's fused EWA projection (pinhole) does."""
    rot = world_to_cam[:, :3, :3]  # [C,3,3]
    trans = world_to_cam[:, :3, 3]  # [C,3]
    mean_c = _matmul(rot[:, None], means[None, :, :, None])[..., 0] + trans[:, None, :]  # [C,N,3]
    rot_n = rot[:, None]  # [C,1,3,3]
    cov_c = _matmul(_matmul(rot_n, covariance_3d(quats, scales)[None]), jnp.swapaxes(rot_n, -1, -2))  # [C,N,3,3]

    fx, fy = intrinsics[:, 0, 0][:, None], intrinsics[:, 1, 1][:, None]
    cx, cy = intrinsics[:, 0, 2][:, None], intrinsics[:, 1, 2][:, None]
    x, y, z = mean_c[..., 0], mean_c[..., 1], mean_c[..., 2]
    in_depth = (z >= NEAR_PLANE) & (z <= FAR_PLANE)
    z_safe = jnp.where(in_depth, z, 1.0)  # keeps gradients finite for culled Gaussians
    rz = 1.0 / z_safe

    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + FRUSTUM_MARGIN * tan_fovx
    lim_x_neg = cx / fx + FRUSTUM_MARGIN * tan_fovx
    lim_y_pos = (height - cy) / fy + FRUSTUM_MARGIN * tan_fovy
    lim_y_neg = cy / fy + FRUSTUM_MARGIN * tan_fovy
    tx = z_safe * jnp.clip(x * rz, -lim_x_neg, lim_x_pos)
    ty = z_safe * jnp.clip(y * rz, -lim_y_neg, lim_y_pos)

    zeros = jnp.zeros_like(z)
    jac = jnp.stack(
        [
            jnp.stack([fx * rz, zeros, -fx * tx * rz * rz], axis=-1),
            jnp.stack([zeros, fy * rz, -fy * ty * rz * rz], axis=-1),
        ],
        axis=-2,
    )  # [C,N,2,3]
    cov2d = _matmul(_matmul(jac, cov_c), jnp.swapaxes(jac, -1, -2))  # [C,N,2,2]
    means2d = jnp.stack([fx * x * rz + cx, fy * y * rz + cy], axis=-1)

    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + EPS2D, c + EPS2D
    det = a * c - b * b
    valid = in_depth & (det > 0)
    det_safe = jnp.where(valid, det, 1.0)
    conics = jnp.stack([c / det_safe, -b / det_safe, a / det_safe], axis=-1)

    opac = jnp.broadcast_to(opacities[None, :], z.shape)
    if antialiased:
        opac = opac * jnp.sqrt(jnp.maximum(det_orig / det_safe, 0.0))
    valid = valid & (opac >= ALPHA_MIN)
    extend = jnp.minimum(MAX_EXTEND, jnp.sqrt(2.0 * jnp.log(jnp.maximum(opac, ALPHA_MIN) / ALPHA_MIN)))
    extend = jax.lax.stop_gradient(extend)
    radius_x = jnp.ceil(extend * jnp.sqrt(jnp.maximum(jax.lax.stop_gradient(a), 0.0)))
    radius_y = jnp.ceil(extend * jnp.sqrt(jnp.maximum(jax.lax.stop_gradient(c), 0.0)))
    valid = valid & ((radius_x > 0) | (radius_y > 0))
    m2 = jax.lax.stop_gradient(means2d)
    inside = (
        (m2[..., 0] + radius_x > 0)
        & (m2[..., 0] - radius_x < width)
        & (m2[..., 1] + radius_y > 0)
        & (m2[..., 1] - radius_y < height)
    )
    valid = valid & inside
    radii = jnp.where(valid[..., None], jnp.stack([radius_x, radius_y], axis=-1), 0).astype(jnp.int32)
    return Projected(
        means2d=jnp.where(valid[..., None], means2d, 0.0),
        conics=jnp.where(valid[..., None], conics, 0.0),
        depths=jnp.where(valid, z, 0.0),
        radii=radii,
        opacities=jnp.where(valid, opac, 0.0),
    )
