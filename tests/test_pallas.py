"""The Pallas compositor (interpret mode on CPU) against the jnp reference, on fresh random scenes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.raster_oracle import random_scene

import kernels

ORDER = ("means", "quats", "scales", "opacities", "colors", "world_to_cam", "intrinsics")


@pytest.mark.parametrize("width,height,num_cams,per_camera", [(48, 40, 2, True), (37, 21, 1, False)])
def test_pallas_matches_reference(rng, width, height, num_cams, per_camera):
    scene = random_scene(rng, 100, num_cams, width, height, per_camera_colors=per_camera)
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    background = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    weights = jnp.asarray(rng.normal(size=(num_cams, height, width, 3)), jnp.float32)
    results = {}
    for backend in ("reference", "pallas"):

        def loss(*params, backend=backend):
            out = kernels.rasterize(*params, *args[5:], width=width, height=height, background=background,
                                    backend=backend, capacity=capacity)  # fmt: skip
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + 0.3 * jnp.sum(out.depth), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args[:5])
        results[backend] = (out, grads)
    (ref, ref_grads), (pal, pal_grads) = results["reference"], results["pallas"]
    assert np.isfinite(np.asarray(pal.rgb)).all() and float(jnp.max(pal.alpha)) > 0.5
    for name in ("rgb", "alpha", "depth"):
        np.testing.assert_allclose(np.asarray(getattr(pal, name)), np.asarray(getattr(ref, name)), atol=1e-5, rtol=0)
    for name, want, got in zip(ORDER, ref_grads, pal_grads):
        relative = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert relative <= 1e-4, (name, relative)
