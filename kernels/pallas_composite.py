"""Steps 3-4 as Pallas kernels: one program per (camera, tile), chunks of CHUNK pairs, front to back.

The forward composites one pair at a time for all 256 pixels of the tile (the reference's exact arithmetic) and
checks once per chunk whether every pixel is saturated, to stop the tile early; per pixel it keeps only the output,
the final T and the last contributing slot. The backward evaluates a chunk as a [256 pixels, CHUNK pairs] block:
the transmittance before each pair is a prefix sum of log(1 - alpha) along the chunk, the colour behind pair i is
(out - prefix_i), so there is no reverse pass, and each pair's gradient is reduced over the tile's pixels and written
to the pair's own slot (tiles start at multiples of CHUNK, so whole-chunk writes never touch another tile's slots;
no atomics).

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

# Tuning knobs (environment, read at import): chunk length and warps per program of each kernel.
CHUNK = int(os.environ.get("UHAP_PALLAS_CHUNK", 4))
NUM_WARPS_FWD = int(os.environ.get("UHAP_PALLAS_WARPS_FWD", 4))
NUM_WARPS_BWD = int(os.environ.get("UHAP_PALLAS_WARPS_BWD", 4))
ALIGN = CHUNK
NUM_FIELDS = FEATURES + 4


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
    return [rec_ref[f, pl.ds(start, CHUNK)] for f in range(NUM_FIELDS)]


def _chunk_alpha(fields, px, py):
    mx, my, ca, cb, cc, opacity = fields[:FEATURES]
    dx = mx[None, :] - px[:, None]
    dy = my[None, :] - py[:, None]
    sigma = 0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) + cb[None, :] * dx * dy
    vis = jnp.exp(-sigma)
    raw = opacity[None, :] * vis
    return dx, dy, sigma, vis, raw, jnp.minimum(raw, ALPHA_MAX)


def _forward_kernel(start_ref, end_ref, bg_ref, rec_ref, out_ref, trans_ref, last_ref, *, tiles_x):
    """One pair at a time (per pixel exactly the reference's arithmetic); early exit checked once per chunk."""
    tile = pl.program_id(1)
    start, end = start_ref[0], end_ref[0]
    px, py = _pixels(tile, tiles_x)
    n_chunks = (end - start + CHUNK - 1) // CHUNK

    def cond(carry):
        chunk, _, _, _, _, _, _, done = carry
        return (chunk < n_chunks) & (jnp.min(done) == 0)

    def pair(i, carry):
        trans, acc0, acc1, acc2, acc3, last, done = carry
        mx, my, ca, cb, cc, opacity, f0, f1, f2, f3 = (rec_ref[f, i] for f in range(NUM_FIELDS))
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
        base = start + chunk * CHUNK
        state = jax.lax.fori_loop(base, base + CHUNK, pair, tuple(state))
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
    start_ref, end_ref, rec_ref, out_ref, trans_ref, last_ref, g_out_ref, g_trans_ref, _, g_rec_ref, *, tiles_x
):
    tile = pl.program_id(1)
    start, end = start_ref[0], end_ref[0]
    px, py = _pixels(tile, tiles_x)
    last = last_ref[...]
    g_outs = [g_out_ref[f, :] for f in range(4)]
    # Only sum_f g_f * (colour behind)_f is needed: G - Q_i with G = sum_f g_f out_f and Q_i its running prefix.
    g_total = sum(g * out_ref[f, :] for f, g in enumerate(g_outs)) + g_trans_ref[...] * trans_ref[...]
    n_chunks = (jnp.max(last) - start + CHUNK) // CHUNK  # chunks up to the last contributing slot (0 if none)
    lane = jnp.arange(CHUNK, dtype=jnp.int32)

    def body(chunk, carry):
        trans, prefix = carry
        base = start + chunk * CHUNK
        fields = _load_chunk(rec_ref, base)
        dx, dy, sigma, vis, raw, alpha = _chunk_alpha(fields, px, py)
        idx = base + lane
        take = (idx < end)[None, :] & (idx[None, :] <= last[:, None]) & (sigma >= 0) & (alpha >= ALPHA_MIN)
        a = jnp.where(take, alpha, 0.0)
        log_keep = jnp.log1p(-a)
        t_before = trans[:, None] * jnp.exp(jnp.cumsum(log_keep, axis=1) - log_keep)
        weight = a * t_before
        feats = fields[FEATURES:]
        g_feat = sum(g[:, None] * feats[f][None, :] for f, g in enumerate(g_outs))  # sum_f g_f c_f
        weighted = weight * g_feat
        behind = g_total[:, None] - prefix[:, None] - jnp.cumsum(weighted, axis=1)
        g_alpha = jnp.where(take, t_before * g_feat - behind / (1.0 - a), 0.0)
        g_sigma = jnp.where(raw <= ALPHA_MAX, -raw * g_alpha, 0.0)
        ca, cb, cc = fields[2][None, :], fields[3][None, :], fields[4][None, :]
        grads = [
            jnp.sum(g_sigma * (ca * dx + cb * dy), axis=0),
            jnp.sum(g_sigma * (cb * dx + cc * dy), axis=0),
            jnp.sum(g_sigma * 0.5 * dx * dx, axis=0),
            jnp.sum(g_sigma * dx * dy, axis=0),
            jnp.sum(g_sigma * 0.5 * dy * dy, axis=0),
            jnp.sum(jnp.where(raw <= ALPHA_MAX, vis * g_alpha, 0.0), axis=0),
            *(jnp.sum(weight * g[:, None], axis=0) for g in g_outs),
        ]
        for f, g in enumerate(grads):
            g_rec_ref[f, pl.ds(base, CHUNK)] = g
        return trans * jnp.exp(jnp.sum(log_keep, axis=1)), prefix + jnp.sum(weighted, axis=1)

    zeros = jnp.zeros((TILE_PIXELS,), jnp.float32)
    jax.lax.fori_loop(0, n_chunks, body, (zeros + 1.0, zeros))


def _pixel_spec(*lead):
    return pl.BlockSpec((None, None, *lead, TILE_PIXELS), lambda c, t: (c, t) + (0,) * (len(lead) + 1))


def _forward(records, tile_start, tile_end, background, tiles_x):
    num_cams, num_fields, slots = records.shape
    n_tiles = tile_start.shape[1]
    tile_scalar = pl.BlockSpec((None, 1), lambda c, t: (c * n_tiles + t, 0))
    rec_spec = pl.BlockSpec((None, num_fields, slots), lambda c, t: (c, 0, 0))
    out, trans, last = pl.pallas_call(
        functools.partial(_forward_kernel, tiles_x=tiles_x),
        grid=(num_cams, n_tiles),
        in_specs=[tile_scalar, tile_scalar, pl.BlockSpec((4,), lambda c, t: (0,)), rec_spec],
        out_specs=[_pixel_spec(4), _pixel_spec(), _pixel_spec()],
        out_shape=[
            jax.ShapeDtypeStruct((num_cams, n_tiles, 4, TILE_PIXELS), jnp.float32),
            jax.ShapeDtypeStruct((num_cams, n_tiles, TILE_PIXELS), jnp.float32),
            jax.ShapeDtypeStruct((num_cams, n_tiles, TILE_PIXELS), jnp.int32),
        ],
        compiler_params=_compiler_params(NUM_WARPS_FWD),
        interpret=_interpret(),
        name="gaussian_composite_fwd",
    )(tile_start.reshape(-1, 1), tile_end.reshape(-1, 1), background, records)
    return out, trans, last


def _backward(records, tile_start, tile_end, out, trans, last, g_out, g_trans, tiles_x):
    num_cams, num_fields, slots = records.shape
    n_tiles = tile_start.shape[1]
    tile_scalar = pl.BlockSpec((None, 1), lambda c, t: (c * n_tiles + t, 0))
    rec_spec = pl.BlockSpec((None, num_fields, slots), lambda c, t: (c, 0, 0))
    zeros = jnp.zeros_like(records)  # slots past a tile's last contributing pair keep a zero gradient
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
            rec_spec,
        ],
        out_specs=rec_spec,
        out_shape=jax.ShapeDtypeStruct(records.shape, jnp.float32),
        input_output_aliases={8: 0},
        compiler_params=_compiler_params(NUM_WARPS_BWD),
        interpret=_interpret(),
        name="gaussian_composite_bwd",
    )(tile_start.reshape(-1, 1), tile_end.reshape(-1, 1), records, out, trans, last, g_out, g_trans, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """Same contract as `kernels.reference.composite_tiles`: out [C,T,256,4] (background included), T [C,T,256]."""
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
