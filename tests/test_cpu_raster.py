"""The C++ CPU backend (`kernels/cpu_ops.py`) against the float64 reference on fresh random scenes, its binning
against binning's XLA path, its build, and the fallback of backend="auto" when it cannot be built."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.raster_oracle import hard_scene, random_scene

import kernels
from kernels import binning, cpu_ops
from kernels.constants import ALPHA_MIN
from kernels.projection import project
from kernels.rasterize import _cpu_kernels_built, _resolve_backend, build_pairs

ORDER = ("means", "quats", "scales", "opacities", "colors", "world_to_cam", "intrinsics")

needs_compiler = pytest.mark.skipif(cpu_ops.compiler_path() is None, reason="no C++ compiler")


def _loss_and_grads(args, width, height, background, weights, backend, capacity):
    def loss(*params):
        out = kernels.rasterize(*params, *args[5:], width=width, height=height, background=background,
                                backend=backend, capacity=capacity)  # fmt: skip
        return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + 0.3 * jnp.sum(out.depth), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args[:5])
    return out, grads


@needs_compiler
@pytest.mark.parametrize(
    "width,height,num_cams,per_camera", [(48, 40, 2, True), (37, 21, 1, False), (70, 33, 3, False)]
)
def test_cpu_matches_float64_reference(rng, width, height, num_cams, per_camera):
    scene = hard_scene(rng, 150, num_cams, width, height, per_camera_colors=per_camera)  # classic, as rendered
    background = rng.uniform(0, 1, 3)
    weights = rng.normal(size=(num_cams, height, width, 3))
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    out, grads = _loss_and_grads(args, width, height, jnp.asarray(background, jnp.float32),
                                 jnp.asarray(weights, jnp.float32), "cpu", capacity)  # fmt: skip
    with jax.enable_x64(True):
        args64 = [jnp.asarray(scene[k], jnp.float64) for k in ORDER]
        ref, ref_grads = _loss_and_grads(args64, width, height, jnp.asarray(background), jnp.asarray(weights),
                                         "reference", capacity)  # fmt: skip
        ref, ref_grads = jax.tree.map(np.asarray, (ref, ref_grads))
    assert out.rgb.shape == (num_cams, height, width, 3) and out.rgb.dtype == jnp.float32
    # Hard enough to exercise every rule (hard_scene redrew until the oracle's was): saturated pixels (the T_EPSILON
    # stop), touched ones, and empty ones.
    assert ref.alpha.max() > 0.999 and (ref.alpha > 0.05).mean() > 0.1 and (ref.alpha < 0.02).any()
    flipped = np.concatenate([_assert_close_up_to_threshold_flips(np.asarray(getattr(out, n)), getattr(ref, n), n)
                              for n in ("rgb", "alpha", "depth")])  # fmt: skip
    # A flipped pair moves the gradients of the Gaussians composited at its pixel (see the vmap test below): within
    # 1e-4 of the reference elsewhere; those rows within 1e-2 (CI seed 2202212708: one pixel, means at 1.8e-3).
    covering = sorted(_gaussians_covering(args[0], args, flipped, width, height))
    for name, want, got in zip(ORDER, ref_grads, grads):
        error = np.asarray(got) - want
        rows = np.moveaxis(error, -2, 0) if name == "colors" else error  # Gaussians first (colours may be per camera)
        others = np.delete(rows, covering, axis=0)
        relative = float(np.linalg.norm(others) / np.linalg.norm(want))
        assert relative <= 1e-4, (name, relative, covering)
        assert float(np.linalg.norm(error) / np.linalg.norm(want)) <= 1e-2, (name, covering)


def _assert_close_up_to_threshold_flips(got: np.ndarray, want: np.ndarray, name: str) -> np.ndarray:
    """Within 2e-5 everywhere but at a few elements where one pair's alpha is within float32 rounding of ALPHA_MIN,
    so that float32 and float64 legitimately decide the pair differently (replayed in float64 once: alpha = 1/255 -
    4e-11). Such a flip moves an output by at most ALPHA_MIN x its scale, and touches a handful of pixels (all three
    channels of one rgb pixel: CI seed 2202212708, one pixel of a 37 x 21 image); a real error touches more of them,
    or by more."""
    error = np.abs(got - want)
    flipped_pixels = error.max(-1) > 2e-5 if name == "rgb" else error > 2e-5
    allowed = max(3, int(5e-4 * flipped_pixels.size))
    assert flipped_pixels.sum() <= allowed, (name, int(flipped_pixels.sum()), allowed, float(error.max()))
    bound = ALPHA_MIN * max(1.0, float(np.abs(want).max()))
    assert error.max() <= bound, (name, float(error.max()), bound)
    return np.argwhere(flipped_pixels)  # [F, 3] (camera, y, x)


def _pairs(rng, width, height, num_cams):
    scene = random_scene(rng, 120, num_cams, width, height)
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    records, bins = build_pairs(*args, width=width, height=height, backend="cpu", mode="classic",
                                capacity=capacity)  # fmt: skip
    return records, bins, binning.tile_grid(width, height)[0]


@needs_compiler
def test_every_output_pixel_and_gradient_slot_is_written(rng):
    """The outputs come from fresh buffers: NaN sentinels in unused record slots must not leak, and every pixel and
    every gradient slot (used or not) gets a finite value; the unused slots' gradients are zeros."""
    records, bins, tiles_x = _pairs(rng, 45, 38, 2)
    records = jnp.where(bins.valid[..., None], records, jnp.nan)  # unused slots: NaN, never read
    background = jnp.asarray(rng.uniform(0, 1, 4), jnp.float32)
    out, trans, last = jax.jit(cpu_ops._forward, static_argnums=4)(records, bins.tile_start, bins.tile_end,
                                                                   background, tiles_x)  # fmt: skip
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(trans)).all()
    assert (np.asarray(trans) < 1).any() and (np.asarray(last) >= -1).all()
    g_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    g_trans = jnp.asarray(rng.normal(size=trans.shape), jnp.float32)
    g_records = jax.jit(cpu_ops._backward, static_argnums=8)(records, bins.tile_start, bins.tile_end, out, trans,
                                                              last, g_out, g_trans, tiles_x)  # fmt: skip
    g_records = np.asarray(g_records)
    assert np.isfinite(g_records).all() and np.abs(g_records).max() > 0
    assert not g_records[~np.asarray(bins.valid)].any()


@needs_compiler
def test_binning_matches_xla_path(rng):
    width, height, num_cams = 67, 41, 3
    scene = random_scene(rng, 200, num_cams, width, height)
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    proj = project(*args[:4], *args[5:], width=width, height=height)
    ours, xla = (binning.bin_pairs(proj, width, height, capacity, expand=how) for how in ("cpu", "cummax"))
    for field in ("valid", "tile_start", "tile_end", "n_pairs"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(xla, field), err_msg=field)
    valid = np.asarray(xla.valid)
    assert valid.sum() > 100
    np.testing.assert_array_equal(np.asarray(ours.gaussian_ids)[valid], np.asarray(xla.gaussian_ids)[valid])


@needs_compiler
def test_vmap_over_frames_matches_one_call_per_frame(rng):
    width, height = 40, 35
    scene = random_scene(rng, 100, 2, width, height)
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    capacity = 2 * kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    frames = jnp.stack([args[0], args[0] + jnp.asarray(rng.normal(0, 0.01, args[0].shape), jnp.float32)])

    def loss(means):
        out = kernels.rasterize(means, *args[1:], width=width, height=height, backend="cpu", capacity=capacity)
        return jnp.sum(out.rgb * out.rgb) + jnp.sum(out.depth), out.rgb

    (_, batched), g_batched = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))(frames)
    # The batched projection may round a float32 ulp differently, and where that moves one pair's alpha across
    # ALPHA_MIN at one pixel the pair is composited in one image only: that pixel moves by alpha * T * (its colour -
    # what is behind it), at most ALPHA_MIN x the colour span, and the gradients of the Gaussians composited there
    # move (the flipped one's, and those whose blend it changes), by that pair's share (measured: 1/18 seeds, one
    # pixel at 0.09x the bound; seed 2580492567, one pixel and two Gaussians' rows, both covering it, at <= 6e-4 x
    # the largest gradient). Without a flip: within 1e-6 and 1e-5 x the largest gradient; a wrong batching rule
    # moves many pixels and rows.
    span = float(jnp.max(args[4]) - jnp.minimum(jnp.min(args[4]), 0.0))
    for i in range(2):
        (_, rgb), g = jax.value_and_grad(loss, has_aux=True)(frames[i])
        error = np.abs(np.asarray(batched[i]) - np.asarray(rgb)).max(-1)
        flipped = np.argwhere(error > 1e-6)  # [F, 3] (camera, y, x)
        assert len(flipped) <= 2 and error.max() <= ALPHA_MIN * span, (i, flipped, error.max())
        scale = float(jnp.abs(g).max())
        g_error = np.abs(np.asarray(g_batched[i]) - np.asarray(g)).max(-1)
        off = set(np.flatnonzero(g_error > 1e-5 * scale).tolist())
        assert off <= _gaussians_covering(frames[i], args, flipped, width, height), (i, flipped, off)
        assert g_error.max() <= 1e-2 * scale, (i, flipped, g_error.max() / scale)


def _gaussians_covering(means, args, pixels, width, height) -> set[int]:
    """The Gaussians whose projected footprint box holds any of these (camera, y, x) pixels."""
    proj = project(means, *args[1:4], *args[5:], width=width, height=height)
    centre, radius = np.asarray(proj.means2d), np.asarray(proj.radii)
    found = set()
    for cam, y, x in pixels:
        inside = np.all(np.abs(np.array([x + 0.5, y + 0.5]) - centre[cam]) <= radius[cam] + 1, axis=-1)
        found |= set(np.flatnonzero(inside & (radius[cam] > 0).all(-1)).tolist())
    return found


@needs_compiler
def test_build_is_cached_and_atomic(tmp_path):
    library = cpu_ops.build(cache_dir=tmp_path)
    stamp = os.stat(library).st_mtime_ns
    assert cpu_ops.build(cache_dir=tmp_path) == library
    assert os.stat(library).st_mtime_ns == stamp  # the cached build, not a second compile
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial files left behind


@pytest.fixture
def fresh_selection(monkeypatch):
    """backend="auto" decided again (the kernels' registration too), and restored afterwards."""
    monkeypatch.delenv("UHAP_RASTER_BACKEND", raising=False)
    monkeypatch.setattr(cpu_ops, "register", functools.cache(cpu_ops.register.__wrapped__))
    _cpu_kernels_built.cache_clear()
    yield
    _cpu_kernels_built.cache_clear()


def test_without_a_compiler_auto_is_the_reference_with_one_log_line(fresh_selection, monkeypatch, caplog, rng):
    monkeypatch.setattr(cpu_ops, "compiler_path", lambda: None)
    with caplog.at_level(logging.WARNING, logger="kernels.rasterize"):
        assert _resolve_backend("auto") == "reference"
        scene = random_scene(rng, 40, 1, 24, 20)
        out = kernels.rasterize(*(jnp.asarray(scene[k], jnp.float32) for k in ORDER), width=24, height=20)
        assert _resolve_backend("auto") == "reference"
    assert np.isfinite(np.asarray(out.rgb)).all()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0], lines
    with pytest.raises(cpu_ops.CpuBuildError, match="no C\\+\\+ compiler found"):
        _resolve_backend("cpu")


def test_a_broken_compiler_is_one_clear_line(fresh_selection, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("UHAP_CPU_CACHE", str(tmp_path / "cache"))
    compiler = tmp_path / "g++"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'fake g++ 1.0'; exit 0; }\n"
                        "echo 'cc1plus: fatal error: out of cheese' >&2\nexit 1\n")  # fmt: skip
    compiler.chmod(0o755)
    monkeypatch.setenv("UHAP_CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger="kernels.rasterize"):
        assert _resolve_backend("auto") == "reference"
        assert _resolve_backend("auto") == "reference"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "failed on" in lines[0] and "rasterizer.cc" in lines[0] and "out of cheese" in lines[0]
    with pytest.raises(cpu_ops.CpuBuildError, match="failed on .*rasterizer.cc: cc1plus: fatal error: out of cheese"):
        _resolve_backend("cpu")
    assert not any((tmp_path / "cache").iterdir())  # no partial library left behind


@needs_compiler
def test_auto_is_cpu_with_a_compiler(fresh_selection, monkeypatch):
    assert _resolve_backend("auto") == "cpu"
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "reference")
    assert _resolve_backend("auto") == "reference"


def test_synth_keeps_both_cores_only_for_the_cpu_kernels(monkeypatch):
    from uhap_jax.commands import data

    monkeypatch.delenv("UHAP_RASTER_BACKEND", raising=False)
    assert not data.renders_with_cpu_kernels("pallas")
    assert data.renders_with_cpu_kernels("auto") == (cpu_ops.compiler_path() is not None)
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "reference")
    assert not data.renders_with_cpu_kernels("auto")
    monkeypatch.setattr(cpu_ops, "compiler_path", lambda: None)
    assert not data.renders_with_cpu_kernels("cpu")


@needs_compiler
def test_sharded_cameras_agree(rng):
    """Under a mesh (the tests' 8 CPU devices) XLA places the custom calls; the images and gradients stay those of
    one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    width, height = 40, 36
    scene = random_scene(rng, 80, 8, width, height, per_camera_colors=True)
    args = [jnp.asarray(scene[k], jnp.float32) for k in ORDER]
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)

    def loss(*a):
        out = kernels.rasterize(*a, width=width, height=height, backend="cpu", capacity=capacity)
        return jnp.sum(out.rgb * out.rgb), out.rgb

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 4), has_aux=True))
    (_, single), single_grads = step(*args)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    by_camera, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    placed = [jax.device_put(a, by_camera if name in ("colors", "world_to_cam", "intrinsics") else replicated)
              for a, name in zip(args, ORDER)]  # fmt: skip
    with jax.set_mesh(mesh):
        (_, sharded), sharded_grads = step(*placed)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6, rtol=0)
    for want, got in zip(single_grads, sharded_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
