"""The rasterizer's C++ kernels behind XLA's CPU FFI (`kernels/cpu/rasterizer.cc`): the binning of step 2 and the
compositor of steps 3-4, with the same records, tile ranges, outputs and contract as `kernels.cuda_ops`.

The jnp reference evaluates every pair against all 256 pixels of its tile and the interpreted Pallas kernels run
loops of small XLA ops; this library visits only the pixels a pair's ellipse can reach and spreads the (camera,
tile) programs over XLA's CPU thread pool, which is what makes CPU training and data synthesis practical. It is
compiled with the system's C++ compiler at first use and cached under $UHAP_CPU_CACHE (default
~/.cache/uhap/kernels), keyed by the source, the flags, the compiler and JAX's FFI headers. Nothing is downloaded;
without a compiler backend="auto" falls back to the reference (see `kernels.rasterize._resolve_backend`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
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
EXPAND = "cpu"  # binning (depth ranking, pair expansion, sorts) runs as the kernel below too
SOURCE = Path(__file__).parent / "cpu" / "rasterizer.cc"
# Under vmap (e.g. over frames) the kernels get the batch as more leading dimensions and treat them as cameras.
VMAP = "broadcast_all"
TARGETS = {
    "uhap_cpu_bin_pairs": "UhapCpuBinPairs",
    "uhap_cpu_composite_fwd": "UhapCpuCompositeForward",
    "uhap_cpu_composite_bwd": "UhapCpuCompositeBackward",
}


class CpuBuildError(RuntimeError):
    """The C++ kernels could not be built (no compiler, or the compiler failed)."""


def compiler_path() -> str | None:
    """$UHAP_CXX, else g++ or c++ on PATH, else /usr/bin/g++."""
    for candidate in (os.environ.get("UHAP_CXX"), shutil.which("g++"), shutil.which("c++"), "/usr/bin/g++"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _flags() -> list[str]:
    defines = [
        f"-DUHAP_{name}={float(value)!r}f"
        for name, value in (("ALPHA_MIN", ALPHA_MIN), ("ALPHA_MAX", ALPHA_MAX), ("T_EPSILON", T_EPSILON))
    ]
    # No -march=native: the cached library must run on any CPU of this architecture (shared home folders).
    # -ffp-contract=off: the forward and the backward's recomputation round alpha identically (no FMA choices).
    return [
        "-O3",
        "-std=c++17",
        "-fPIC",
        "-shared",
        "-ffp-contract=off",
        f"-I{jax.ffi.include_dir()}",
        *defines,
        *os.environ.get("UHAP_CXX_FLAGS", "").split(),  # extra compiler flags, for experiments
    ]


def _headers_digest() -> str:
    """JAX's FFI headers: the library's ABI with the jaxlib that loads it."""
    folder = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.h")))).hexdigest()


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile the library unless a build of this exact source, flags, compiler and FFI headers is cached; returns
    its path. Safe when several processes build at once (each compiles in a folder of its own, then renames)."""
    compiler = compiler_path()
    if compiler is None:
        raise CpuBuildError("kernels/cpu_ops: no C++ compiler found (set UHAP_CXX or install g++)")
    flags = _flags()
    probe = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise CpuBuildError(f"kernels/cpu_ops: {compiler} --version failed: {_first_line(probe.stderr)}")
    key = "\n".join([SOURCE.read_text(), *flags, probe.stdout, platform.machine(), _headers_digest()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir or os.environ.get("UHAP_CPU_CACHE") or Path.home() / ".cache" / "uhap" / "kernels")
    target = folder / f"uhap_rasterizer_cpu_{platform.machine()}_{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise CpuBuildError(
                f"kernels/cpu_ops: {compiler} failed on {SOURCE}: {_first_line(result.stderr)}\n{result.stderr[-4000:]}"
            )
        os.replace(partial, target)  # atomic: a concurrent build of the same digest writes the same bytes
    return target


def _first_line(text: str) -> str:
    """The compiler's first error line (the rest follows on later lines of the exception)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no output")


@functools.cache
def register() -> None:
    """Builds (or loads the cached build) and registers the FFI targets once per process; raises CpuBuildError."""
    library = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def bin_pairs(keys, x0, y0, x1, count, footprint, *, capacity: int, tiles_x: int, n_tiles: int):
    """All cameras at once, what `kernels.binning.bin_pairs` gets from its depth ranking, expansion and sorts: per
    slot [C, capacity] the tile id (n_tiles where the slot holds no pair) and the Gaussian id (0 there), sorted by
    tile then depth, and [C, n_tiles + 1] each tile's first slot. `keys` are `binning._depth_key`'s."""
    register()
    rects = jnp.stack([x0, y0, jnp.maximum(x1 - x0, 1), count], axis=-1).astype(jnp.int32)
    slots = jax.ShapeDtypeStruct((*keys.shape[:-1], capacity), jnp.int32)
    bounds = jax.ShapeDtypeStruct((*keys.shape[:-1], n_tiles + 1), jnp.int32)
    return jax.ffi.ffi_call("uhap_cpu_bin_pairs", (slots, slots, bounds), vmap_method=VMAP)(
        keys.astype(jnp.uint32),
        rects,
        footprint.astype(jnp.float32),
        tiles_x=np.int32(tiles_x),
        n_tiles=np.int32(n_tiles),
    )


def _forward(records, tile_start, tile_end, background, tiles_x):
    register()
    pixels = (*tile_start.shape, TILE_PIXELS)
    per_camera = jnp.broadcast_to(background.astype(jnp.float32), (*tile_start.shape[:-1], 4))
    return jax.ffi.ffi_call(
        "uhap_cpu_composite_fwd",
        (
            jax.ShapeDtypeStruct((*pixels, 4), jnp.float32),
            jax.ShapeDtypeStruct(pixels, jnp.float32),
            jax.ShapeDtypeStruct(pixels, jnp.int32),
        ),
        vmap_method=VMAP,
    )(records.astype(jnp.float32), tile_start, tile_end, per_camera, tiles_x=np.int32(tiles_x))


def _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x):
    """Per-pair gradients [C, P, 10] (zeros in slots no pixel takes)."""
    register()
    g_records = jax.ShapeDtypeStruct(records.shape, jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (records, out, trans, g_out, g_trans)]
    return jax.ffi.ffi_call("uhap_cpu_composite_bwd", g_records, vmap_method=VMAP)(
        f32[0], tile_start, tile_end, f32[1], f32[2], last, f32[3], f32[4], tiles_x=np.int32(tiles_x)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """As `kernels.reference.composite_tiles`, but records are pair-major [C, P, 10]: out [C,T,256,4] (background
    included), T [C,T,256]; computed in float32 and returned in the records' dtype."""
    out, trans, _ = _forward(records, tile_start, tile_end, background, tiles_x)
    return out.astype(records.dtype), trans.astype(records.dtype)


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    out, trans, last = _forward(records, tile_start, tile_end, background, tiles_x)
    out, trans = out.astype(records.dtype), trans.astype(records.dtype)
    return (out, trans), (records, tile_start, tile_end, out, trans, last)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, out, trans, last = residuals
    g_out, g_trans = cotangents
    g_records = _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x)
    g_background = jnp.sum(g_out * trans[..., None], axis=(0, 1, 2))
    return g_records.astype(records.dtype), None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
