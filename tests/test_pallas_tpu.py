"""The Pallas TPU (Mosaic) compositor, run in TPU interpret mode on CPU, against the jnp reference and the float64
oracle; and its Mosaic lowering, which needs no TPU."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.raster_oracle import oracle_render, random_scene
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import bench, binning, pallas_tpu, reference
from kernels.constants import NUM_FIELDS, T_EPSILON, TILE_PIXELS
from kernels.rasterize import _resolve_backend, build_pairs

ORDER = ("means", "quats", "scales", "opacities", "colors", "world_to_cam", "intrinsics")


def _scene(rng, width: int, height: int, num_cams: int) -> dict:
    """random_scene's hard cases behind two layers over the left of the views: a few large opaque Gaussians that
    saturate the left tiles within their first pairs, and a wall of small ones that gives those tiles more than one
    block of pairs (so the kernels' block-level early exit has blocks to skip). The cameras look almost straight
    ahead, so that the layers stay on the left; the last one sees the whole scene from 60 m as a few pixels (its
    other tiles are empty)."""
    scene = random_scene(rng, 120, num_cams, width, height, per_camera_colors=True)
    for c in range(num_cams):
        yaw = rng.uniform(-0.03, 0.03)
        scene["world_to_cam"][c, :3, :3] = [[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]
        scene["world_to_cam"][c, :3, 3] = rng.uniform(-0.002, 0.002, 3)
    scene["world_to_cam"][-1, :3, 3] = (0.0, 0.0, 60.0)
    layers = [  # count, depth range, x/z range, scale range, opacity range
        (70, (0.2, 0.22), (-0.7, -0.1), (0.03, 0.05), (0.9, 0.99)),
        (300, (0.3, 0.36), (-0.7, 0.1), (0.01, 0.02), (0.5, 0.95)),
    ]
    for n, depth, x, scale, opacity in layers:
        z = rng.uniform(*depth, n)
        layer = dict(
            means=np.c_[rng.uniform(*x, n) * z, rng.uniform(-0.5, 0.5, n) * z, z],
            quats=rng.normal(size=(n, 4)),
            scales=rng.uniform(*scale, (n, 3)),
            opacities=rng.uniform(*opacity, n),
            colors=rng.uniform(0, 1, (num_cams, n, 3)),
        )
        for key, value in layer.items():
            scene[key] = np.concatenate([scene[key], value], axis=1 if key == "colors" else 0)
    return scene


def _pairs(scene, width, height, dtype=jnp.float32):
    args = [jnp.asarray(scene[k], dtype) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    records, bins = build_pairs(
        *args, width=width, height=height, backend="pallas_tpu", mode="classic", capacity=capacity
    )
    return args, capacity, records, bins


def test_matches_reference_under_vmap(rng):
    """Two frames under jax.vmap (as the prior renders a batch), three cameras, an odd image size: images and the
    gradients of every Gaussian attribute against the reference backend."""
    width, height, num_cams = 37, 21, 3
    scene = _scene(rng, width, height, num_cams)
    args, capacity, _, bins = _pairs(scene, width, height)
    counts = np.asarray(bins.tile_end - bins.tile_start)
    assert counts.max() > pallas_tpu.BLOCK and (counts == 0).any()  # multi-block tiles and empty tiles
    frames = jnp.stack([args[0], args[0] + jnp.asarray(rng.normal(0, 0.002, args[0].shape), jnp.float32)])
    capacity = max(kernels.capacity_for(m, *args[1:4], *args[5:], width=width, height=height) for m in frames)
    background = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(num_cams, height, width, 3)), jnp.float32)
    results = {}
    for backend in ("reference", "pallas_tpu"):

        def loss(*params, backend=backend):
            out = kernels.rasterize(*params, *args[5:], width=width, height=height, background=background,
                                    backend=backend, capacity=capacity)  # fmt: skip
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + 0.3 * jnp.sum(out.depth), out

        per_frame = jax.value_and_grad(loss, argnums=range(5), has_aux=True)
        (_, out), grads = jax.jit(jax.vmap(per_frame, in_axes=(0, None, None, None, None)))(frames, *args[1:5])
        results[backend] = (out, grads)
    (ref, ref_grads), (tpu, tpu_grads) = results["reference"], results["pallas_tpu"]
    assert float(jnp.max(tpu.alpha)) > 0.999 and float(jnp.min(tpu.alpha)) == 0.0  # saturated and empty pixels
    for name in ("rgb", "alpha", "depth"):  # full arrays: every pixel of every camera and frame was written
        want = np.asarray(getattr(ref, name))
        # Depth in float32 rounding units of its scale, as the oracle tests do (the far camera sees depths of ~60).
        atol = 1e-5 * max(1.0, float(want.max())) if name == "depth" else 1e-5
        np.testing.assert_allclose(np.asarray(getattr(tpu, name)), want, atol=atol, rtol=0)
    for frame in range(2):
        for name, want, got in zip(ORDER, ref_grads, tpu_grads):
            relative = float(jnp.linalg.norm(got[frame] - want[frame]) / jnp.linalg.norm(want[frame]))
            assert relative <= 1e-4, (frame, name, relative)


def test_kernels_write_every_slot_and_skip_saturated_blocks(rng):
    """At the kernel level: outputs and every gradient slot of every tile range against the reference compositor.
    Then the records behind the first block of saturated tiles are poisoned with NaN: the forward must stop
    before them and the backward must not walk them (their gradients are written as zeros), so nothing changes."""
    width, height, num_cams = 40, 27, 2
    tiles_x, _ = binning.tile_grid(width, height)
    _, _, records, bins = _pairs(_scene(rng, width, height, num_cams), width, height)
    start, end = bins.tile_start, bins.tile_end
    acc, trans, last = pallas_tpu._forward(records, start, end, tiles_x)
    ref_out, ref_trans = reference.composite_tiles(records, start, end, jnp.zeros((4,)), tiles_x)
    got, want = np.swapaxes(np.asarray(acc), 2, 3), np.asarray(ref_out)
    np.testing.assert_allclose(got[..., :3], want[..., :3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[..., 3], want[..., 3], atol=1e-5 * max(1.0, want[..., 3].max()), rtol=0)
    np.testing.assert_allclose(np.asarray(trans[:, :, 0]), np.asarray(ref_trans), atol=1e-6, rtol=0)

    g_acc = jnp.asarray(rng.normal(size=acc.shape), jnp.float32)
    g_trans = jnp.asarray(rng.normal(size=ref_trans.shape), jnp.float32)
    g_base = (trans[:, :, 0] * g_trans)[:, :, None]
    g_records = np.asarray(pallas_tpu._backward(records, start, end, trans, last, g_acc, g_base, tiles_x))
    want, _ = reference._backward(
        records, start, end, None, tiles_x, ref_out, ref_trans, jnp.swapaxes(g_acc, 2, 3), g_trans
    )
    want = np.asarray(want)
    block = pallas_tpu.BLOCK
    log_keep = np.asarray(reference._pairs(records, start, end, tiles_x)["log_keep"])  # [C, P, 256]
    saturated = []
    for c in range(num_cams):
        for t in range(start.shape[1]):
            s, e = int(start[c, t]), int(end[c, t])
            padded = s + -(-(e - s) // block) * block
            got = g_records[c, :, s:padded]  # the whole range, padding included, is written
            assert np.isfinite(got).all(), (c, t)
            np.testing.assert_allclose(got[:, : e - s], want[c, :, s:e], rtol=2e-4, atol=2e-4 * np.abs(want).max())
            assert not got[:, e - s :].any()
            # Every pixel's T falls to T_EPSILON within the first block (with a margin for summation order).
            if e - s > block and np.exp(log_keep[c, s : s + block].sum(axis=0)).max() <= 0.5 * T_EPSILON:
                saturated.append((c, s, e))
    assert saturated, "the scene should hold a tile that saturates within its first block"

    poisoned = records
    for c, s, e in saturated:
        poisoned = poisoned.at[c, :, s + block : e].set(jnp.nan)
    acc2, trans2, last2 = pallas_tpu._forward(poisoned, start, end, tiles_x)
    for a, b in ((acc, acc2), (trans, trans2), (last, last2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g2 = np.asarray(pallas_tpu._backward(poisoned, start, end, trans, last, g_acc, g_base, tiles_x))
    for c, s, e in saturated:
        np.testing.assert_array_equal(g2[c, :, s:e], g_records[c, :, s:e])
        assert not g2[c, :, s + block : e].any()


@pytest.fixture
def x64_everywhere():
    """x64 for the whole process, not the thread-local `jax.enable_x64` context: the TPU interpreter runs the kernels'
    memory and DMA operations as callbacks on XLA's threads, which would not see the context (and would wait forever
    on a float64 DMA's byte count)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_float64_matches_oracle_and_reference(rng, x64_everywhere):
    width, height, num_cams = 29, 35, 2
    scene = _scene(rng, width, height, num_cams)
    background = rng.uniform(0, 1, 3)
    args = [jnp.asarray(scene[k], jnp.float64) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    weights = jnp.asarray(rng.normal(size=(num_cams, height, width, 3)))
    background_ = jnp.asarray(background)
    results = {}
    for backend in ("reference", "pallas_tpu"):

        def loss(*params, backend=backend):
            out = kernels.rasterize(*params, *args[5:], width=width, height=height, background=background_,
                                    backend=backend, capacity=capacity)  # fmt: skip
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + 0.3 * jnp.sum(out.depth), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args[:5])
        results[backend] = (out, grads)
    (_, ref_grads), (tpu, tpu_grads) = results["reference"], results["pallas_tpu"]
    assert tpu.rgb.dtype == jnp.float64
    for name, want, got in zip(ORDER, ref_grads, tpu_grads):
        relative = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert relative <= 1e-9, (name, relative)
    want_rgb, want_alpha, want_depth = oracle_render(*(scene[k] for k in ORDER), width, height, background)
    np.testing.assert_allclose(np.asarray(tpu.rgb), want_rgb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(tpu.alpha), want_alpha, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(tpu.depth), want_depth, atol=1e-5 * max(1.0, want_depth.max()), rtol=0)


def test_float64_under_a_thread_local_x64_context_is_a_clear_error(rng):
    scene = random_scene(rng, 20, 1, 17, 17)
    with jax.enable_x64(True):
        args = [jnp.asarray(scene[k], jnp.float64) for k in ORDER]
        with pytest.raises(ValueError, match="jax.config.update\\('jax_enable_x64', True\\)"):
            kernels.rasterize(*args, width=17, height=17, backend="pallas_tpu", capacity=1024)


def test_kernels_lower_to_mosaic():
    """Both kernels go through Mosaic's lowering for a TPU (jax.export cross-lowers without one), so every op in
    them has a TPU lowering; what only a TPU's compiler checks (layouts, VMEM) is left to `kernels.check`."""
    num_cams, n_tiles, tiles_x, slots = 2, 6, 3, 4 * pallas_tpu.BLOCK
    f32, i32 = jnp.float32, jnp.int32
    records = jax.ShapeDtypeStruct((num_cams, NUM_FIELDS, slots), f32)
    ranges = jax.ShapeDtypeStruct((num_cams, n_tiles), i32)
    row = jax.ShapeDtypeStruct((num_cams, n_tiles, 1, TILE_PIXELS), f32)
    rows = (row, jax.ShapeDtypeStruct(row.shape, i32), jax.ShapeDtypeStruct((num_cams, n_tiles, 4, TILE_PIXELS), f32))

    def forward(r, s, e):
        return pallas_tpu._forward(r, s, e, tiles_x, interpret=False)

    def backward(r, s, e, t, last, g, base):
        return pallas_tpu._backward(r, s, e, t, last, g, base, tiles_x, interpret=False)

    for fn, shapes in ((forward, (records, ranges, ranges)), (backward, (records, ranges, ranges, *rows, row))):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
        assert "tpu_custom_call" in text


def test_backend_selection_and_bench_flag(monkeypatch):
    monkeypatch.delenv("UHAP_RASTER_BACKEND", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert _resolve_backend("auto") == "pallas_tpu"
    assert pallas_tpu.interpret_params() is False  # compiled with Mosaic on a TPU
    monkeypatch.undo()
    assert _resolve_backend("auto") in ("cpu", "reference")  # the C++ kernels where a compiler builds them
    assert isinstance(pallas_tpu.interpret_params(), pltpu.InterpretParams)
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "pallas_tpu")
    assert _resolve_backend("auto") == "pallas_tpu"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args(["--backend", "pallas_tpu"]).backend == "pallas_tpu"
