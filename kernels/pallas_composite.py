"""Steps 3-4 as Pallas kernels: one program per (camera, tile), front to back over the tile's pairs.

Records are pair-major [C, P, 10]. Both kernels go one pair at a time over all 256 pixels of the tile, unrolled over
a chunk of pairs so that the chunk's record loads are in flight together. The forward uses the reference's exact
arithmetic, checks once per chunk whether every pixel is saturated, to stop the tile early, and keeps per pixel only
the output, the final T and the last contributing slot. The backward recomputes T front to back the same way; the
colour behind pair i is (out - prefix_i), so there is no reverse pass, and each pair's gradient is reduced over the
tile's pixels and written to the pair's own slot (tiles start at multiples of CHUNK, so the whole-chunk zero writes
never touch another tile's slots; no atomics). Slots outside every tile range are not written: their gradients are
dropped by the record gather's transpose.

The bodies use only loads/stores, elementwise math, reductions, stack/split and `cond`, so they lower through Triton
today and stay portable to Mosaic GPU. On CPU they run with `interpret=True`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.constants import ALPHA_MAX, ALPHA_MIN, NUM_FIELDS, T_EPSILON, TILE, TILE_PIXELS

# Tuning knobs (environment, read at import): pairs unrolled per backward loop step (also the alignment of tile
# ranges), forward pairs unrolled between early-exit checks and warps per program of each kernel. "auto" picks per
# grid size.
CHUNK = int(os.environ.get("UHAP_PALLAS_CHUNK", 4))
FWD_CHUNK = os.environ.get("UHAP_PALLAS_FWD_CHUNK", "auto")  # "auto": 16 on small grids, else 8
NUM_WARPS_FWD = os.environ.get("UHAP_PALLAS_WARPS_FWD", "auto")  # "auto": 4 on small grids, else 2
NUM_WARPS_BWD = int(os.environ.get("UHAP_PALLAS_WARPS_BWD", 2))
# A grid of this many (camera, tile) programs fills the GPU many times over: throughput matters more than the
# latency of the longest tile (one small view has few, long tiles: there shorter dependency chains win).
LARGE_GRID = 8192
ALIGN = CHUNK
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
    px = ((tile % tiles_x) * TILE + pix % TILE).astype(jnp.float32) + 0.5
    py = ((tile // tiles_x) * TILE + pix // TILE).astype(jnp.float32) + 0.5
    return px, py


def _unstack(x, depth):
    """The 2**depth slices x[..., q] of the last `depth` axes (each of size 2), q in row-major order."""
    if depth == 0:
        return [x]
    lo, hi = (jnp.squeeze(part, -1) for part in jnp.split(x, 2, axis=-1))
    return [v for pair in zip(_unstack(lo, depth - 1), _unstack(hi, depth - 1)) for v in pair]


def _stacked_sum(xs):
    """[jnp.sum(x) for x in xs] for [256] vectors as one reduction per power-of-two group (10 = 8 + 2): Triton gives
    each reduction its own shared-memory round trip and barrier across warps, so fewer, wider ones pay them once."""
    out = []
    while xs:
        group = 1 << (len(xs).bit_length() - 1)
        block, xs = xs[:group], xs[group:]
        depth = group.bit_length() - 1
        while len(block) > 1:
            half = len(block) // 2
            block = [jnp.stack([block[k], block[k + half]], axis=-1) for k in range(half)]
        out += _unstack(jnp.sum(block[0], axis=0), depth)
    return out


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


def _pair_grads(mxl, myl, ca, cb, cc, opacity, s0, su, sv, suu, suv, svv):
    """Mean, conic and opacity gradients of pairs from the six pixel moments of g_sigma."""
    g_dx = mxl * s0 - su  # sum g_sigma dx
    g_dy = myl * s0 - sv
    return [
        ca * g_dx + cb * g_dy,
        cb * g_dx + cc * g_dy,
        0.5 * (mxl * mxl * s0 - 2.0 * mxl * su + suu),
        mxl * myl * s0 - mxl * sv - myl * su + suv,
        0.5 * (myl * myl * s0 - 2.0 * myl * sv + svv),
        jnp.where(opacity > 0, -s0 / jnp.where(opacity > 0, opacity, 1.0), 0.0),
    ]


def _backward_kernel(
    start_ref, end_ref, rec_ref, out_ref, trans_ref, last_ref, g_out_ref, g_trans_ref, g_rec_ref, *, tiles_x
):
    """One pair at a time over the tile's 256 pixels, as the forward: T and the colour behind are running [256]
    vectors (T *= 1 - a, as the forward multiplied it, so no log/exp prefix sums), the colour behind pair i is
    (G - prefix_i) with G = sum_f g_f out_f, so there is no reverse pass. The mean/conic gradients follow from six
    pixel moments of g_sigma in tile-centred offsets u, v (per-pixel constants), the opacity gradient is
    -sum(g_sigma) / opacity; with the four colour sums that is ten pixel sums per pair, taken in two stacked
    reductions. A pair that no pixel takes (its pixels saturated before it, or alpha < 1/255 on all of them) leaves
    T and the colour behind unchanged: it costs one max-reduction and ten stores of zero, not the ten sums."""
    tile = pl.program_id(1)
    start, end = start_ref[0], end_ref[0]
    last = last_ref[...]
    g_outs = [g_out_ref[f, :] for f in range(4)]
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
    u = (pix % TILE).astype(jnp.float32) - (TILE - 1) / 2
    v = (pix // TILE).astype(jnp.float32) - (TILE - 1) / 2
    centre_x = ((tile % tiles_x) * TILE + TILE // 2).astype(jnp.float32)
    centre_y = ((tile // tiles_x) * TILE + TILE // 2).astype(jnp.float32)
    moments = (u, v, u * u, u * v, v * v)

    def pair(idx, rec, trans, rest):
        mx, my, ca, cb, cc, opacity, *feats = rec
        mxl, myl = mx - centre_x, my - centre_y
        dx = mxl - u
        dy = myl - v
        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        raw = opacity * jnp.exp(-sigma)
        alpha = jnp.minimum(raw, ALPHA_MAX)
        take = (idx < end) & (idx <= last) & (sigma >= 0) & (alpha >= ALPHA_MIN)

        def live(trans, rest):
            a = jnp.where(take, alpha, 0.0)
            weight = a * trans
            g_feat = sum(g * c for g, c in zip(g_outs, feats))  # sum_f g_f c_f
            rest = rest - weight * g_feat  # G minus the prefix through this pair: the colour behind it
            keep = 1.0 - a
            g_alpha = trans * g_feat - rest / keep
            g_sigma = jnp.where(take & (raw <= ALPHA_MAX), -raw * g_alpha, 0.0)
            s0, su, sv, suu, suv, svv, *g_feats = _stacked_sum(
                [g_sigma, *(g_sigma * m for m in moments), *(weight * g for g in g_outs)]
            )
            grads = _pair_grads(mxl, myl, ca, cb, cc, opacity, s0, su, sv, suu, suv, svv) + g_feats
            for f, g in enumerate(grads):
                g_rec_ref[idx, f] = g
            return trans * keep, rest

        def dead(trans, rest):
            for f in range(NUM_FIELDS):
                g_rec_ref[idx, f] = jnp.float32(0.0)
            return trans, rest

        return jax.lax.cond(jnp.max(jnp.where(take, 1, 0)) > 0, live, dead, trans, rest)

    def body(chunk, carry):
        trans, rest = carry
        base = start + chunk * CHUNK
        # Every record load of the chunk first: none depends on the running state.
        recs = [[rec_ref[base + j, f] for f in range(NUM_FIELDS)] for j in range(CHUNK)]
        for j in range(CHUNK):
            trans, rest = pair(base + j, recs[j], trans, rest)
        return trans, rest

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
