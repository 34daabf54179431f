"""Jitted code against float64 numpy at sizes where XLA:CPU (jaxlib 0.10.2) miscompiled a broadcast multiply summed
over its inner axis followed by the add of a broadcast slice (YNNPACK reduce fusions: outputs past ~32k elements
came out wrong, e.g. camera-space means of Gaussians past index ~10.9k). Eager execution was right."""

import jax
import numpy as np

from kernels import projection
from uhap_jax.geometry import cameras

NUM_GAUSSIANS = 20_000  # in the miscompiled range: rows past ~10.9k were wrong
SIZE = 256  # pixels, square


def random_gaussians(rng: np.random.Generator, count: int) -> tuple[np.ndarray, ...]:
    """Gaussians in a 0.2 m box at the origin, large and opaque enough that every one is drawn."""
    means = rng.uniform(-0.1, 0.1, (count, 3)).astype(np.float32)
    quats = rng.normal(size=(count, 4)).astype(np.float32)
    scales = rng.uniform(0.002, 0.01, (count, 3)).astype(np.float32)
    opacities = rng.uniform(0.3, 0.9, count).astype(np.float32)
    return means, quats, scales, opacities


def random_views(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Cameras 0.9 m from the origin, looking at it, in OpenCV axes."""
    views = []
    for azimuth, elevation in zip(rng.uniform(-1.0, 1.0, count), rng.uniform(-0.3, 0.3, count)):
        eye = 0.9 * np.array(
            [np.sin(azimuth) * np.cos(elevation), np.sin(elevation), -np.cos(azimuth) * np.cos(elevation)]
        )
        views.append(cameras.look_at(eye, np.zeros(3)))
    intrinsics = np.stack([cameras.intrinsics_from_fov(30.0, SIZE, SIZE)] * count)
    return np.stack(views).astype(np.float32), intrinsics.astype(np.float32)


def test_jitted_projection_camera_space_means_match_float64_numpy(rng):
    means, quats, scales, opacities = random_gaussians(rng, NUM_GAUSSIANS)
    world_to_cam, intrinsics = random_views(rng, 2)
    project = jax.jit(lambda *args: projection.project(*args, width=SIZE, height=SIZE))
    out = project(means, quats, scales, opacities, world_to_cam, intrinsics)

    w2c = world_to_cam.astype(np.float64)
    mean_c = np.einsum("cij,nj->cni", w2c[:, :3, :3], means.astype(np.float64)) + w2c[:, None, :3, 3]  # [C, N, 3]
    k = intrinsics.astype(np.float64)
    pixels = mean_c[..., :2] / mean_c[..., 2:] * k[:, None, [0, 1], [0, 1]] + k[:, None, [0, 1], [2, 2]]
    radii = np.asarray(out.radii)
    assert (radii > 0).any(-1).all(), f"{int((radii == 0).all(-1).sum())} Gaussians culled; all are in view"
    np.testing.assert_allclose(np.asarray(out.depths), mean_c[..., 2], rtol=1e-5, atol=0.0)
    np.testing.assert_allclose(np.asarray(out.means2d), pixels, rtol=0.0, atol=2e-3)
