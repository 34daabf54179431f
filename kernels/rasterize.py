"""The public rasterizer API: `rasterize(...)`, in gsplat's argument order, with gsplat 1.5.3 classic semantics."""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import binning, reference
from kernels.constants import TILE
from kernels.projection import project

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "pallas", "pallas_tpu", "cuda", "cpu")
MODES = ("classic", "antialiased")


class CapacityOverflowError(RuntimeError):
    """The scene needs more (tile, Gaussian) pair slots than the static capacity holds."""

    def __init__(self, needed: int, capacity: int):
        self.needed = needed
        self.capacity = capacity
        super().__init__(
            f"rasterize: the scene needs {needed} (tile, Gaussian) pairs per camera but capacity is {capacity}; "
            f"pass capacity={binning.bucket_capacity(needed)} (kernels.capacity_for sizes it from a scene), "
            "or use kernels.AdaptiveCapacity to grow it between steps"
        )


class RasterStats(NamedTuple):
    n_pairs: jax.Array  # [C] int32 pairs each camera needed
    capacity: jax.Array  # [] int32 pair slots per camera
    overflow: jax.Array  # [] bool; when True the images are NaN rather than silently truncated


class Rendered(NamedTuple):
    rgb: jax.Array  # [C, H, W, 3]
    alpha: jax.Array  # [C, H, W]
    depth: jax.Array  # [C, H, W]  sum of z * alpha * T
    stats: RasterStats


def rasterize(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    colors: jax.Array,
    world_to_cam: jax.Array,
    intrinsics: jax.Array,
    *,
    width: int,
    height: int,
    background: jax.Array | None = None,
    backend: str = "auto",
    mode: str = "classic",
    capacity: int | None = None,
) -> Rendered:
    """Render N Gaussians into C pinhole cameras (OpenCV axes), differentiably in every Gaussian attribute.

    `capacity` is the static number of (tile, Gaussian) pair slots per camera. `None` sizes it from the scene,
    which needs concrete inputs (it reads the count back to the host); under `jax.jit` pass an int. Overflow is
    never silent: called eagerly it raises `CapacityOverflowError`; traced, the images come back NaN and
    `stats.overflow` is set (see `AdaptiveCapacity`).
    """
    width, height = int(width), int(height)
    _check_shapes(means, quats, scales, opacities, colors, world_to_cam, intrinsics, width, height, background)
    if backend not in BACKENDS:
        raise ValueError(f"rasterize: backend must be one of {BACKENDS}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"rasterize: mode must be one of {MODES}, got {mode!r}")
    backend = _resolve_backend(backend)
    args = (means, quats, scales, opacities, colors, world_to_cam, intrinsics)
    concrete = not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, background)))
    if concrete:
        _check_values(*args)
    if capacity is None:
        if not concrete:
            raise ValueError(
                "rasterize: under jax.jit the pair capacity must be a static int; size it with "
                "kernels.capacity_for(...) outside the jitted function, or use kernels.AdaptiveCapacity"
            )
        capacity = capacity_for(
            means, quats, scales, opacities, world_to_cam, intrinsics, width=width, height=height, mode=mode
        )
    capacity = int(capacity)
    if capacity <= 0:
        raise ValueError(f"rasterize: capacity must be positive, got {capacity}")
    if background is None:
        background = jnp.zeros((3,), jnp.result_type(colors))
    out = _rasterize(
        *args,
        background,
        width=width,
        height=height,
        backend=backend,
        mode=mode,
        capacity=capacity,
    )
    if concrete and bool(out.stats.overflow):
        raise CapacityOverflowError(int(jnp.max(out.stats.n_pairs)), capacity)
    return out


def capacity_for(
    means,
    quats,
    scales,
    opacities,
    world_to_cam,
    intrinsics,
    *,
    width: int,
    height: int,
    mode: str = "classic",
) -> int:
    """The bucketed pair capacity per camera that this scene needs (reads one number back to the host)."""
    needed = _count_pairs(
        means,
        quats,
        scales,
        opacities,
        world_to_cam,
        intrinsics,
        width=int(width),
        height=int(height),
        antialiased=mode == "antialiased",
    )
    return binning.bucket_capacity(int(jnp.max(needed, initial=0)))


class AdaptiveCapacity:
    """Sizes the pair capacity between jitted steps from the previous step's count, never truncating silently.

    Use `cap.value` as the static capacity of a step, then `cap.update(out.stats)`; it reads the previous step's
    (already finished) count, so no step waits on the host. A step that overflowed returned NaN images; the
    training loop skips it and the next step recompiles with the larger bucket. With `shrink_after` > 0 it also
    shrinks: when the largest count of the last `shrink_after` steps (x headroom) fits a bucket at most 2/3 of
    the capacity, so one unusual batch does not slow every later step (the sort and the pair buffers scale with
    the capacity).
    """

    def __init__(self, initial: int = 1 << 16, headroom: float = 1.1, shrink_after: int = 0):
        self.value = binning.bucket_capacity(initial)
        self.headroom = headroom
        self.shrink_after = shrink_after
        self._steps, self._largest = 0, 0

    def update(self, stats: RasterStats) -> bool:
        """Returns True when the capacity changed (the next step recompiles)."""
        return self.observe(int(jnp.max(stats.n_pairs, initial=0)))

    def grow(self, n_pairs: int) -> bool:
        """Makes room for `n_pairs` pairs per camera (x headroom); True when the capacity grew."""
        needed = int(n_pairs * self.headroom)
        if needed > self.value:
            self.value = binning.bucket_capacity(needed)
            self._steps, self._largest = 0, 0
            return True
        return False

    def observe(self, n_pairs: int) -> bool:
        """One step's largest per-camera pair count: grows at once, shrinks as described above. True on a change."""
        if self.grow(n_pairs):
            return True
        if self.shrink_after <= 0:
            return False
        self._steps, self._largest = self._steps + 1, max(self._largest, n_pairs)
        if self._steps < self.shrink_after:
            return False
        fitted = binning.bucket_capacity(int(self._largest * self.headroom))
        self._steps, self._largest = 0, 0
        if 3 * fitted <= 2 * self.value:
            self.value = fitted
            return True
        return False


def _resolve_backend(backend: str) -> str:
    """The backend "auto" stands for: $UHAP_RASTER_BACKEND if set, else the CUDA kernels on an NVIDIA GPU with nvcc,
    else Pallas (Triton) on a GPU, the Pallas TPU (Mosaic) kernels on a TPU, the C++ kernels on a CPU with a C++
    compiler, else the jnp reference."""
    from kernels import cuda_ops

    if backend == "auto":
        backend = os.environ.get("UHAP_RASTER_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"rasterize: UHAP_RASTER_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if jax.default_backend() == "tpu":
            return "pallas_tpu"
        if jax.default_backend() == "gpu":
            return "cuda" if cuda_ops.available() else "pallas"
        return "cpu" if _cpu_kernels_built() else "reference"
    if backend == "cuda" and not cuda_ops.available():
        raise ValueError(
            "rasterize: backend='cuda' needs an NVIDIA GPU as JAX's default device and nvcc (set UHAP_NVCC or put "
            f"the CUDA toolkit on PATH); JAX's default backend is {jax.default_backend()!r}"
        )
    if backend == "cpu":
        if jax.default_backend() != "cpu":
            raise ValueError(
                f"rasterize: backend='cpu' needs the CPU as JAX's default device, not {jax.default_backend()!r}"
            )
        from kernels import cpu_ops

        cpu_ops.register()  # raises CpuBuildError, with the compiler's message
    return backend


@functools.cache
def _cpu_kernels_built() -> bool:
    """Whether the C++ kernels are built and registered; says once why not (then "auto" is the slower reference)."""
    from kernels import cpu_ops

    try:
        cpu_ops.register()
    except (cpu_ops.CpuBuildError, OSError) as err:  # no compiler, it failed, or the cache is not writable
        logger.warning("rasterize: using the jnp reference on CPU, the C++ kernels are unavailable: %s",
                       str(err).splitlines()[0])  # fmt: skip
        return False
    return True


@functools.partial(jax.jit, static_argnames=("width", "height", "antialiased"))
def _count_pairs(means, quats, scales, opacities, world_to_cam, intrinsics, *, width, height, antialiased):
    proj = project(
        means,
        quats,
        scales,
        opacities,
        world_to_cam,
        intrinsics,
        width=width,
        height=height,
        antialiased=antialiased,
    )
    return binning.count_pairs(proj, width, height)


def _compositor(backend: str):
    if backend == "pallas":
        from kernels import pallas_composite

        return pallas_composite
    if backend == "pallas_tpu":
        from kernels import pallas_tpu

        return pallas_tpu
    if backend == "cuda":
        from kernels import cuda_ops

        return cuda_ops
    if backend == "cpu":
        from kernels import cpu_ops

        return cpu_ops
    return reference


def build_pairs(
    means, quats, scales, opacities, colors, world_to_cam, intrinsics, *, width, height, backend, mode, capacity
) -> tuple[jax.Array, binning.Bins]:
    """Steps 1-2: project, bin and sort, then gather each pair's record: [C, 10, P] field-major, or [C, P, 10]
    pair-major for a compositor that sets PAIR_MAJOR."""
    num_cams = world_to_cam.shape[0]
    proj = project(
        means,
        quats,
        scales,
        opacities,
        world_to_cam,
        intrinsics,
        width=width,
        height=height,
        antialiased=mode == "antialiased",
    )
    compositor = _compositor(backend)
    bins = binning.bin_pairs(
        proj, width, height, capacity, align=compositor.ALIGN, expand=getattr(compositor, "EXPAND", "cummax")
    )
    if colors.ndim == 2:
        colors = jnp.broadcast_to(colors[None], (num_cams, *colors.shape))
    per_gaussian = jnp.concatenate(
        [proj.means2d, proj.conics, proj.opacities[..., None], colors, proj.depths[..., None]], axis=-1
    )  # [C, N, K=10]
    # One plain gather per camera (a batched take_along_axis makes XLA build a huge index tensor). Empty slots
    # point past the end and read zeros (opacity 0); in the backward the transposed scatter-add then skips them
    # instead of piling their zero gradients onto Gaussian 0 with contended atomics.
    ids = jnp.where(bins.valid, bins.gaussian_ids, per_gaussian.shape[1])
    if getattr(compositor, "PAIR_MAJOR", False):  # [C, P, 10]: one contiguous row per pair
        return jax.vmap(lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=0))(per_gaussian, ids), bins
    records = jax.vmap(lambda x, i: jnp.take(x, i, axis=1, mode="fill", fill_value=0))(
        jnp.swapaxes(per_gaussian, 1, 2), ids
    )
    return records, bins


@functools.partial(jax.jit, static_argnames=("width", "height", "backend", "mode", "capacity"))
def _rasterize(
    means,
    quats,
    scales,
    opacities,
    colors,
    world_to_cam,
    intrinsics,
    background,
    *,
    width,
    height,
    backend,
    mode,
    capacity,
) -> Rendered:
    records, bins = build_pairs(
        means,
        quats,
        scales,
        opacities,
        colors,
        world_to_cam,
        intrinsics,
        width=width,
        height=height,
        backend=backend,
        mode=mode,
        capacity=capacity,
    )
    tiles_x, tiles_y = binning.tile_grid(width, height)
    background4 = jnp.concatenate([background.astype(records.dtype), jnp.zeros((1,), records.dtype)])
    out, trans = _compositor(backend).composite_tiles(records, bins.tile_start, bins.tile_end, background4, tiles_x)
    image = _untile(out, tiles_x, tiles_y, width, height)
    trans = _untile(trans[..., None], tiles_x, tiles_y, width, height)[..., 0]
    image = jnp.where(bins.overflow, jnp.nan, image)
    stats = RasterStats(n_pairs=bins.n_pairs, capacity=jnp.int32(capacity), overflow=bins.overflow)
    return Rendered(rgb=image[..., :3], alpha=1.0 - trans, depth=image[..., 3], stats=stats)


def _untile(x, tiles_x, tiles_y, width, height):
    """[C, T, 256, F] tile-major pixels -> [C, H, W, F] image (cropping the partial tiles)."""
    num_cams, _, _, feat = x.shape
    x = x.reshape(num_cams, tiles_y, tiles_x, TILE, TILE, feat)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(num_cams, tiles_y * TILE, tiles_x * TILE, feat)
    return x[:, :height, :width]


def _check_shapes(means, quats, scales, opacities, colors, world_to_cam, intrinsics, width, height, background):
    def shape(x):
        return tuple(np.shape(x))

    n = shape(means)[0] if np.ndim(means) == 2 else None
    problems = []
    if np.ndim(means) != 2 or shape(means)[1] != 3:
        problems.append(f"means must be [N, 3], got {shape(means)}")
    if shape(quats) != (n, 4):
        problems.append(f"quats must be [N, 4] (wxyz) with N={n}, got {shape(quats)}")
    if shape(scales) != (n, 3):
        problems.append(f"scales must be [N, 3] with N={n}, got {shape(scales)}")
    if shape(opacities) != (n,):
        problems.append(f"opacities must be [N] with N={n}, got {shape(opacities)}")
    c = shape(world_to_cam)[0] if np.ndim(world_to_cam) == 3 else None
    if np.ndim(world_to_cam) != 3 or shape(world_to_cam)[1:] != (4, 4):
        problems.append(f"world_to_cam must be [C, 4, 4], got {shape(world_to_cam)}")
    if shape(intrinsics) != (c, 3, 3):
        problems.append(f"intrinsics must be [C, 3, 3] with C={c}, got {shape(intrinsics)}")
    if shape(colors) not in ((n, 3), (c, n, 3)):
        problems.append(f"colors must be [N, 3] or [C, N, 3] with C={c}, N={n}, got {shape(colors)}")
    if background is not None and shape(background) != (3,):
        problems.append(f"background must be [3] or None, got {shape(background)}")
    if width <= 0 or height <= 0:
        problems.append(f"width and height must be positive, got {width}x{height}")
    if problems:
        raise ValueError("rasterize: " + "; ".join(problems))


def _check_values(means, quats, scales, opacities, colors, world_to_cam, intrinsics):
    """Bad values give a clear error instead of NaN images (only possible on concrete inputs)."""
    checks = {
        "means": ~jnp.all(jnp.isfinite(means), axis=-1),
        "quats": ~jnp.all(jnp.isfinite(quats), axis=-1) | (jnp.sum(quats * quats, axis=-1) <= 0),
        "scales": ~jnp.all(jnp.isfinite(scales) & (scales > 0), axis=-1),
        "opacities": ~(jnp.isfinite(opacities) & (opacities > 0) & (opacities <= 1)),
        "colors": ~jnp.all(jnp.isfinite(colors), axis=-1),
    }
    problems = []
    rules = {
        "means": "finite",
        "quats": "finite and non-zero",
        "scales": "finite and > 0",
        "opacities": "in (0, 1]",
        "colors": "finite",
    }
    for name, bad in checks.items():
        bad = np.asarray(bad).reshape(-1)
        if bad.any():
            first = np.flatnonzero(bad)[:5].tolist()
            problems.append(f"{name} must be {rules[name]}: {int(bad.sum())} bad entries (first at {first})")
    if not np.all(np.isfinite(np.asarray(world_to_cam))):
        problems.append("world_to_cam has non-finite entries")
    k = np.asarray(intrinsics)
    if not np.all(np.isfinite(k)) or np.any(k[:, 0, 0] <= 0) or np.any(k[:, 1, 1] <= 0):
        problems.append("intrinsics must be finite with positive focal lengths")
    if problems:
        raise ValueError("rasterize: " + "; ".join(problems))
