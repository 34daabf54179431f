"""Steps 3-4 as Pallas kernels: one program per (camera, tile), front to back over the tile's pairs.

Records are pair-major [C, P, 10]. The forward composites one pair at a time for all 256 pixels of the tile (the
reference's exact arithmetic), unrolled over a chunk of pairs so that their record loads are in flight together, and
checks once per chunk whether every pixel is saturated, to stop the tile early; per pixel it keeps only the output,
the final T and the last contributing slot. The backward evaluates CHUNK pairs as a [256 pixels, CHUNK pairs] block:
the transmittance before each pair is a prefix sum of log(1 - alpha) along the chunk, the colour behind pair i is
(out - prefix_i), so there is no reverse pass, and each pair's gradient is reduced over the tile's pixels and written
to the pair's own slot (tiles start at multiples of CHUNK, so whole-chunk writes never touch another tile's slots;
no atomics). Slots outside every tile range are not written: their gradients are dropped by the record gather's
transpose.

The bodies use only loads/stores of contiguous slices, elementwise math, `cumsum` and reductions, so they lower
through Triton today and stay portable to Mosaic GPU. On CPU they run with `interpret=True`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.reference import ALPHA_MAX, ALPHA_MIN, FEATURES, T_EPSILON, TILE_PIXELS

# Tuning knobs (environment, read at import): backward chunk length (also the alignment of tile ranges), forward
# pairs unrolled between early-exit checks and warps per program of each kernel. "auto" picks per grid size.
CHUNK = int(os.environ.get("UHAP_PALLAS_CHUNK", 4))
FWD_CHUNK = os.environ.get("UHAP_PALLAS_FWD_CHUNK", "auto")  # "auto": 16 on small grids, else 8
NUM_WARPS_FWD = os.environ.get("UHAP_PALLAS_WARPS_FWD", "auto")  # "auto": 4 on small grids, else 2
NUM_WARPS_BWD = int(os.environ.get("UHAP_PALLAS_WARPS_BWD", 4))
# A grid of this many (camera, tile) programs fills the GPU many times over: throughput matters more than the
# latency of the longest tile (one small view has few, long tiles: there shorter dependency chains win).
LARGE_GRID = 8192
ALIGN = CHUNK
NUM_FIELDS = FEATURES + 4
# Records are pair-major [C, P, fields]: a pair's fields are one 40-byte row, so the record gather reads 2 sectors
# per pair instead of 10 (rasterize.build_pairs reads this flag; the jnp reference takes [C, fields, P]).
PAIR_MAJOR = True


def _compiler_params(num_warps: int):
    if jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _pixels(tile, tiles_x):
    pix = jnp.arange(TILE_PIXELS, dtype=jnp.int32)
    px = ((tile % tiles_x) * 16 + pix % 16).astype(jnp.float32) + 0.5
    py = ((tile // tiles_x) * 16 + pix // 16).astype(jnp.float32) + 0.5
    return px, py


def _load_chunk(rec_ref, start):
    return [rec_ref[pl.ds(start, CHUNK), f] for f in range(NUM_FIELDS)]


def _fwd_chunk(num_programs: int) -> int:
    if FWD_CHUNK == "auto":
        return 16 if num_programs < LARGE_GRID else 8
    return int(FWD_CHUNK)


def _fwd_warps(num_programs: int) -> int:
    if NUM_WARPS_FWD == "auto":
        return 4 if num_programs < LARGE_GRID else 2
    return int(NUM_WARPS_FWD)


def _forward_kernel(start_ref, end_ref, bg_ref, rec_ref, out_ref, trans_ref, last_ref, *, tiles_x, fwd_chunk):
    """One pair at a time (per pixel exactly the reference's arithmetic). The pairs of a chunk of fwd_chunk are
    unrolled: their record loads do not depend on the running state, so they are all in flight before the first
    pair is composited (slots past the tile's end re-read its last slot and are masked). Early exit: once per
    chunk, when every pixel of the tile is saturated."""
    tile = pl.program_id(1)
    start, end = start_ref[0], end_ref[0]
    px, py = _pixels(tile, tiles_x)
    n_chunks = (end - start + fwd_chunk - 1) // fwd_chunk
    final = end - 1

    def cond(carry):
        chunk, _, _, _, _, _, _, done = carry
        return (chunk < n_chunks) & (jnp.min(done) == 0)

    def pair(i, carry):
        trans, acc0, acc1, acc2, acc3, last, done = carry
        slot = jnp.minimum(i, final)
        mx, my, ca, cb, cc, opacity, f0, f1, f2, f3 = (rec_ref[slot, f] for f in range(NUM_FIELDS))
        dx = mx - px
        dy = my - py
        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        alpha = jnp.minimum(opacity * jnp.exp(-sigma), ALPHA_MAX)
        live = (i < end) & (done == 0) & (sigma >= 0) & (alpha >= ALPHA_MIN)
        next_t = trans * (1.0 - alpha)
        stop = live & (next_t <= T_EPSILON)
        take = live & ~stop
        weight = jnp.where(take, alpha * trans, 0.0)
        return (
            jnp.where(take, next_t, trans),
            acc0 + weight * f0,
            acc1 + weight * f1,
            acc2 + weight * f2,
            acc3 + weight * f3,
            jnp.where(take, i, last),
            jnp.where(stop, 1, done),
        )

    def body(carry):
        chunk, *state = carry
        base = start + chunk * fwd_chunk
        state = tuple(state)
        for j in range(fwd_chunk):
            state = pair(base + j, state)
        return (chunk + 1, *state)

    zeros = jnp.zeros((TILE_PIXELS,), jnp.float32)
    init = (
        jnp.int32(0),
        zeros + 1.0,
        zeros,
        zeros,
        zeros,
        zeros,
        jnp.full((TILE_PIXELS,), -1, jnp.int32),
        jnp.zeros((TILE_PIXELS,), jnp.int32),
    )
    _, trans, acc0, acc1, acc2, acc3, last, _ = jax.lax.while_loop(cond, body, init)
    for f, acc in enumerate((acc0, acc1, acc2, acc3)):
        out_ref[f, :] = acc + trans * bg_ref[f]
    trans_ref[...] = trans
    last_ref[...] = last


def _backward_kernel(
    start_ref, end_ref, rec_ref, out_ref, trans_ref, last_ref, g_out_ref, g_trans_ref, g_rec_ref, *, tiles_x
):
    """A chunk is a [256 pixels, CHUNK pairs] block. Fewer block temporaries than a direct transcription: the pixel
    offsets u, v from the tile centre are per-pixel constants, so with dx = mx' - u (mx' = mean minus tile centre)
    every mean/conic gradient follows from six pixel moments of g_sigma (sum of g, g u, g v, g u^2, g u v, g v^2),
    combined per pair; the opacity gradient is -sum(g_sigma) / opacity (g_sigma = -opacity vis g_alpha where alpha
    is not clamped); 1 / (1 - a) = exp(-log(1 - a)) reuses the log."""
    tile = pl.program_id(1)
    start, end = start_ref[0], end_ref[0]
    last = last_ref[...]
    g_outs = [g_out_ref[f, :] for f in range(4)]
    # Only sum_f g_f * (colour behind)_f is needed: G - Q_i with G = sum_f g_f out_f and Q_i its running prefix.
    g_total = sum(g * out_ref[f, :] for f, g in enumerate(g_outs)) + g_trans_ref[...] * trans_ref[...]
    # Chunks up to the last contributing slot (none if no pixel has one); the tile's later chunks get zeros.
    n_chunks = jnp.maximum((jnp.max(last) - start + CHUNK) // CHUNK, 0)
    zero = jnp.zeros((CHUNK,), jnp.float32)

    def clear(chunk, carry):
        for f in range(NUM_FIELDS):
            g_rec_ref[pl.ds(start + chunk * CHUNK, CHUNK), f] = zero
        return carry

    jax.lax.fori_loop(n_chunks, (end - start + CHUNK - 1) // CHUNK, clear, 0)

    pix = jnp.arange(TILE_PIXELS, dtype=jnp.int32)
    u = (pix % 16).astype(jnp.float32) - 7.5
    v = (pix // 16).astype(jnp.float32) - 7.5
    centre_x = ((tile % tiles_x) * 16 + 8).astype(jnp.float32)
    centre_y = ((tile // tiles_x) * 16 + 8).astype(jnp.float32)
    uu, uv, vv = u * u, u * v, v * v
    lane = jnp.arange(CHUNK, dtype=jnp.int32)

    def body(chunk, carry):
        trans, rest = carry  # rest = G - (sum_f g_f c_f weighted, over the pairs before this chunk)
        base = start + chunk * CHUNK
        mx, my, ca, cb, cc, opacity, *feats = _load_chunk(rec_ref, base)
        mxl, myl = mx - centre_x, my - centre_y
        dx = mxl[None, :] - u[:, None]
        dy = myl[None, :] - v[:, None]
        sigma = 0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) + cb[None, :] * dx * dy
        raw = opacity[None, :] * jnp.exp(-sigma)
        alpha = jnp.minimum(raw, ALPHA_MAX)
        idx = base + lane
        take = (idx < end)[None, :] & (idx[None, :] <= last[:, None]) & (sigma >= 0) & (alpha >= ALPHA_MIN)
        a = jnp.where(take, alpha, 0.0)
        log_keep = jnp.log(1.0 - a)  # the log of the factor the forward multiplied T by
        t_before = trans[:, None] * jnp.exp(jnp.cumsum(log_keep, axis=1) - log_keep)
        weight = a * t_before
        g_feat = sum(g[:, None] * feats[f][None, :] for f, g in enumerate(g_outs))  # sum_f g_f c_f
        weighted = weight * g_feat
        behind = rest[:, None] - jnp.cumsum(weighted, axis=1)
        g_alpha = t_before * g_feat - behind * jnp.exp(-log_keep)
        g_sigma = jnp.where(take & (raw <= ALPHA_MAX), -raw * g_alpha, 0.0)
        s0 = jnp.sum(g_sigma, axis=0)
        su = jnp.sum(g_sigma * u[:, None], axis=0)
        sv = jnp.sum(g_sigma * v[:, None], axis=0)
        suu = jnp.sum(g_sigma * uu[:, None], axis=0)
        suv = jnp.sum(g_sigma * uv[:, None], axis=0)
        svv = jnp.sum(g_sigma * vv[:, None], axis=0)
        g_dx = mxl * s0 - su  # sum g_sigma dx
        g_dy = myl * s0 - sv
        grads = [
            ca * g_dx + cb * g_dy,
            cb * g_dx + cc * g_dy,
            0.5 * (mxl * mxl * s0 - 2.0 * mxl * su + suu),
            mxl * myl * s0 - mxl * sv - myl * su + suv,
            0.5 * (myl * myl * s0 - 2.0 * myl * sv + svv),
            jnp.where(opacity > 0, -s0 / jnp.where(opacity > 0, opacity, 1.0), 0.0),
            *(jnp.sum(weight * g[:, None], axis=0) for g in g_outs),
        ]
        for f, g in enumerate(grads):
            g_rec_ref[pl.ds(base, CHUNK), f] = g
        return trans * jnp.exp(jnp.sum(log_keep, axis=1)), rest - jnp.sum(weighted, axis=1)

    zeros = jnp.zeros((TILE_PIXELS,), jnp.float32)
    jax.lax.fori_loop(0, n_chunks, body, (zeros + 1.0, g_total))


def _pixel_spec(*lead):
    return pl.BlockSpec((None, None, *lead, TILE_PIXELS), lambda c, t: (c, t) + (0,) * (len(lead) + 1))


def _forward(records, tile_start, tile_end, background, tiles_x):
    num_cams, n_tiles = tile_start.shape
    tile_scalar = pl.BlockSpec((None, 1), lambda c, t: (c * n_tiles + t, 0))
    rec_spec = pl.BlockSpec((None, *records.shape[1:]), lambda c, t: (c, 0, 0))
    out, trans, last = pl.pallas_call(
        functools.partial(_forward_kernel, tiles_x=tiles_x, fwd_chunk=_fwd_chunk(num_cams * n_tiles)),
        grid=(num_cams, n_tiles),
        in_specs=[tile_scalar, tile_scalar, pl.BlockSpec((4,), lambda c, t: (0,)), rec_spec],
        out_specs=[_pixel_spec(4), _pixel_spec(), _pixel_spec()],
        out_shape=[
            jax.ShapeDtypeStruct((num_cams, n_tiles, 4, TILE_PIXELS), jnp.float32),
            jax.ShapeDtypeStruct((num_cams, n_tiles, TILE_PIXELS), jnp.float32),
            jax.ShapeDtypeStruct((num_cams, n_tiles, TILE_PIXELS), jnp.int32),
        ],
        compiler_params=_compiler_params(_fwd_warps(num_cams * n_tiles)),
        interpret=_interpret(),
        name="gaussian_composite_fwd",
    )(tile_start.reshape(-1, 1), tile_end.reshape(-1, 1), background, records)
    return out, trans, last


def _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x):
    num_cams, n_tiles = tile_start.shape
    tile_scalar = pl.BlockSpec((None, 1), lambda c, t: (c * n_tiles + t, 0))
    rec_spec = pl.BlockSpec((None, *records.shape[1:]), lambda c, t: (c, 0, 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, tiles_x=tiles_x),
        grid=(num_cams, n_tiles),
        in_specs=[
            tile_scalar,
            tile_scalar,
            rec_spec,
            _pixel_spec(4),
            _pixel_spec(),
            _pixel_spec(),
            _pixel_spec(4),
            _pixel_spec(),
        ],
        out_specs=rec_spec,
        # Only the slots of tile ranges are written: the others are empty slots, whose gradients the transposed
        # record gather drops (their Gaussian index is out of range), so no zero fill of the whole buffer.
        out_shape=jax.ShapeDtypeStruct(records.shape, jnp.float32),
        compiler_params=_compiler_params(NUM_WARPS_BWD),
        interpret=_interpret(),
        name="gaussian_composite_bwd",
    )(tile_start.reshape(-1, 1), tile_end.reshape(-1, 1), records, out, trans, last, g_out, g_trans)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """As `kernels.reference.composite_tiles`, but records are pair-major [C, P, 10]: out [C,T,256,4] (background
    included), T [C,T,256]."""
    out, trans, _ = _forward(records, tile_start, tile_end, background, tiles_x)
    return jnp.swapaxes(out, 2, 3), trans


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    out, trans, last = _forward(records, tile_start, tile_end, background, tiles_x)
    return (jnp.swapaxes(out, 2, 3), trans), (records, tile_start, tile_end, out, trans, last)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, out, trans, last = residuals
    g_out, g_trans = cotangents
    g_records = _backward(records, tile_start, tile_end, out, trans, last, jnp.swapaxes(g_out, 2, 3), g_trans, tiles_x)
    g_background = jnp.sum(g_out * trans[..., None], axis=(0, 1, 2))
    return g_records, None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
