"""The rasterizer's CUDA kernels behind XLA's FFI (`kernels/cuda/rasterizer.cu`), for NVIDIA GPUs: the pair
expansion of step 2 and the compositor of steps 3-4.

The compositor takes the same records ([C, P, 10], pair-major), tile ranges and outputs as
`kernels.pallas_composite`, with what the Triton lowering of Pallas does not expose (shared-memory staging of a
tile's pair records, warp votes and warp shuffles); see the .cu file. The library is compiled with nvcc at first
use for the GPU JAX sees and cached under $UHAP_CUDA_CACHE (default ~/.cache/uhap_jax/cuda), keyed by the source,
the flags and the compiler, as gsplat's CUDA code is. Nothing is downloaded; a machine without nvcc gets a clear
error (backend="auto" then uses Pallas).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.constants import ALPHA_MAX, ALPHA_MIN, T_EPSILON, TILE_PIXELS

ALIGN = 1  # the kernels read and write exactly a tile's slots: no padding of tile ranges
PAIR_MAJOR = True
EXPAND = "cuda"  # binning's pair expansion runs as the kernel below too
SOURCE = Path(__file__).parent / "cuda" / "rasterizer.cu"
# Under vmap (e.g. over frames) the kernels get the batch as more leading dimensions and treat them as cameras.
VMAP = "broadcast_all"
TARGETS = {
    "uhap_expand_pairs": "UhapExpandPairs",
    "uhap_composite_fwd": "UhapCompositeForward",
    "uhap_composite_bwd": "UhapCompositeBackward",
}


class CudaBuildError(RuntimeError):
    """The CUDA kernels could not be built (no nvcc, or the compiler failed)."""


def nvcc_path() -> str | None:
    """$UHAP_NVCC, else nvcc on PATH, else the CUDA toolkit's default location."""
    for candidate in (os.environ.get("UHAP_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def available() -> bool:
    """Whether this process can run the CUDA kernels: JAX's default device is an NVIDIA GPU and nvcc exists."""
    if jax.default_backend() != "gpu" or nvcc_path() is None:
        return False
    return "rocm" not in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def _defines() -> list[str]:
    return [
        f"-DUHAP_{name}={float(value)!r}f"
        for name, value in (("ALPHA_MIN", ALPHA_MIN), ("ALPHA_MAX", ALPHA_MAX), ("T_EPSILON", T_EPSILON))
    ]


def _device_arch() -> str:
    major, minor = str(jax.devices()[0].compute_capability).split(".")
    return f"sm_{major}{minor}"


def build(arch: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile the library for `arch` (default: the GPU JAX sees, e.g. "sm_90") unless a build of this exact
    source, flags and compiler is cached; returns its path. Safe when several processes build at once."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaBuildError(
            "kernels/cuda_ops: nvcc not found (set UHAP_NVCC or put the CUDA toolkit on PATH); "
            "use backend='pallas' instead"
        )
    arch = arch or _device_arch()
    flags = [
        "-O3",
        "-std=c++17",
        "--shared",
        "-Xcompiler=-fPIC",
        f"-gencode=arch=compute_{arch[3:]},code={arch}",
        f"-I{jax.ffi.include_dir()}",
        *_defines(),
        *os.environ.get("UHAP_CUDA_FLAGS", "").split(),  # extra nvcc flags, for experiments
    ]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), *flags, version]).encode()).hexdigest()[:16]
    folder = Path(cache_dir or os.environ.get("UHAP_CUDA_CACHE") or Path.home() / ".cache" / "uhap_jax" / "cuda")
    target = folder / f"uhap_rasterizer_{arch}_{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([nvcc, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise CudaBuildError(f"kernels/cuda_ops: nvcc failed on {SOURCE}:\n{result.stderr[-4000:]}")
        os.replace(partial, target)  # atomic: a concurrent build of the same digest writes the same bytes
    return target


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="CUDA")


def expand_pairs(order, x0, y0, x1, y1, count, footprint, *, capacity: int, tiles_x: int, n_tiles: int):
    """All cameras at once, as `kernels.binning.expand_pairs` per camera: per slot [C, capacity] the tile id (n_tiles
    where the slot holds no pair), the depth rank, whether it is used, and [C] the pairs each camera needed."""
    _register()
    count_r = jnp.take_along_axis(count, order, axis=-1)
    ends = jnp.cumsum(count_r, axis=-1, dtype=jnp.int32)
    rects = jnp.stack([x0, y0, jnp.maximum(x1 - x0, 1), count], axis=-1).astype(jnp.int32)
    slots = jax.ShapeDtypeStruct((*order.shape[:-1], capacity), jnp.int32)
    tile, rank = jax.ffi.ffi_call("uhap_expand_pairs", (slots, slots), vmap_method=VMAP)(
        order.astype(jnp.int32),
        ends,
        rects,
        footprint.astype(jnp.float32),
        tiles_x=np.int32(tiles_x),
        n_tiles=np.int32(n_tiles),
    )
    n_pairs = ends[..., -1] if order.shape[-1] else jnp.zeros(order.shape[:-1], jnp.int32)
    return tile, rank, tile < n_tiles, n_pairs


def _forward(records, tile_start, tile_end, background, tiles_x):
    _register()
    pixels = (*tile_start.shape, TILE_PIXELS)
    per_camera = jnp.broadcast_to(background.astype(jnp.float32), (*tile_start.shape[:-1], 4))
    return jax.ffi.ffi_call(
        "uhap_composite_fwd",
        (
            jax.ShapeDtypeStruct((*pixels, 4), jnp.float32),
            jax.ShapeDtypeStruct(pixels, jnp.float32),
            jax.ShapeDtypeStruct(pixels, jnp.int32),
        ),
        vmap_method=VMAP,
    )(records, tile_start, tile_end, per_camera, tiles_x=np.int32(tiles_x))


def _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x):
    """Per-pair gradients [C, P, 10]; only the slots of tile ranges are written (the others are empty slots, whose
    gradients the transposed record gather drops)."""
    _register()
    g_records = jax.ShapeDtypeStruct(records.shape, jnp.float32)
    return jax.ffi.ffi_call("uhap_composite_bwd", g_records, vmap_method=VMAP)(
        records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x=np.int32(tiles_x)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """As `kernels.reference.composite_tiles`, but records are pair-major [C, P, 10]: out [C,T,256,4] (background
    included), T [C,T,256]."""
    out, trans, _ = _forward(records, tile_start, tile_end, background, tiles_x)
    return out, trans


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    out, trans, last = _forward(records, tile_start, tile_end, background, tiles_x)
    return (out, trans), (records, tile_start, tile_end, out, trans, last)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, out, trans, last = residuals
    g_out, g_trans = cotangents
    g_records = _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x)
    g_background = jnp.sum(g_out * trans[..., None], axis=(0, 1, 2))
    return g_records, None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
