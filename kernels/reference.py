"""Step 3-4 in plain jnp: the per-tile front-to-back compositor and its hand-written backward.

This is the algorithm the Pallas kernels implement, vectorised over all tiles at once instead of one program per
tile, so it runs on any backend and serves as their reference. The backward recomputes transmittance front to
back and gets the colour behind pair i as (out - prefix_i): no reverse pass and no stored per-pair state.

Pair records are packed field-major as [C, 6 + F, P]: mean2d (2), conic (3), opacity (1), features (F: colour,
then depth), so that a kernel reads each field of a chunk of pairs contiguously.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.binning import TILE

TILE_PIXELS = TILE * TILE
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_EPSILON = 1e-4
CHUNK = 16
ALIGN = 1  # reads past a tile's range are masked, so tiles need no alignment

# Record layout.
MX, MY, CA, CB, CC, OPACITY, FEATURES = range(7)


def pixel_centres(tiles_x: int, n_tiles: int, dtype) -> tuple[jax.Array, jax.Array]:
    """[T, 256] x and y pixel centres of each tile's pixels, row-major within the tile."""
    tile = jnp.arange(n_tiles)
    k = jnp.arange(TILE_PIXELS)
    px = (tile[:, None] % tiles_x) * TILE + k[None, :] % TILE + 0.5
    py = (tile[:, None] // tiles_x) * TILE + k[None, :] // TILE + 0.5
    return px.astype(dtype), py.astype(dtype)


def _alpha(rec, px, py):
    """rec [..., B, K] against pixels [..., 256] -> sigma, exp(-sigma), unclamped and clamped alpha [..., 256, B]."""
    dx = rec[..., None, :, MX] - px[..., :, None]
    dy = rec[..., None, :, MY] - py[..., :, None]
    ca, cb, cc = rec[..., None, :, CA], rec[..., None, :, CB], rec[..., None, :, CC]
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    vis = jnp.exp(-sigma)
    raw = rec[..., None, :, OPACITY] * vis
    return dx, dy, sigma, vis, raw, jnp.minimum(ALPHA_MAX, raw)


def _gather_chunk(records, tile_start, tile_end, chunk):
    """Records of pairs start + chunk*CHUNK + [0, CHUNK) for every tile: [C, T, B, K], their slots and validity."""
    idx = tile_start[..., None] + chunk * CHUNK + jnp.arange(CHUNK, dtype=jnp.int32)  # [C,T,B]
    valid = idx < tile_end[..., None]
    safe = jnp.where(valid, idx, 0)
    num_cams, n_tiles = tile_start.shape
    rec = jnp.take_along_axis(records, safe.reshape(num_cams, 1, n_tiles * CHUNK), axis=2)
    return jnp.moveaxis(rec.reshape(num_cams, -1, n_tiles, CHUNK), 1, -1), idx, valid


def _forward(records, tile_start, tile_end, background, tiles_x):
    """Composite every tile. Returns out [C,T,256,F] (background included), T_final [C,T,256], last slot [C,T,256]."""
    num_cams, n_tiles = tile_start.shape
    dtype = records.dtype
    num_feat = records.shape[1] - FEATURES
    px, py = pixel_centres(tiles_x, n_tiles, dtype)
    count = tile_end - tile_start
    n_chunks = (jnp.max(count, initial=0) + CHUNK - 1) // CHUNK

    def cond(state):
        chunk, trans, _, _, done = state
        return (chunk < n_chunks) & ~jnp.all(done)

    def body(state):
        chunk, trans, acc, last, done = state
        rec, idx, valid = _gather_chunk(records, tile_start, tile_end, chunk)
        _, _, sigma, _, _, alpha = _alpha(rec, px, py)  # [C,T,256,B]
        for b in range(CHUNK):
            a = alpha[..., b]
            live = valid[..., b, None] & ~done & (sigma[..., b] >= 0) & (a >= ALPHA_MIN)
            next_t = trans * (1.0 - a)
            stop = live & (next_t <= T_EPSILON)
            done = done | stop
            take = live & ~stop
            weight = jnp.where(take, a * trans, 0.0)
            acc = acc + weight[..., None] * rec[..., b, None, FEATURES:]
            trans = jnp.where(take, next_t, trans)
            last = jnp.where(take, idx[..., b, None], last)
        return chunk + 1, trans, acc, last, done

    shape = (num_cams, n_tiles, TILE_PIXELS)
    init = (
        jnp.int32(0),
        jnp.ones(shape, dtype),
        jnp.zeros((*shape, num_feat), dtype),
        jnp.full(shape, -1, jnp.int32),
        jnp.zeros(shape, bool),
    )
    _, trans, acc, last, _ = jax.lax.while_loop(cond, body, init)
    out = acc + trans[..., None] * background
    return out, trans, last


def _backward(records, tile_start, tile_end, background, tiles_x, out, trans_final, last, g_out, g_trans):
    """Gradients w.r.t. records [C,K,P] and background [F], recomputing the forward front to back."""
    num_cams, n_tiles = tile_start.shape
    dtype = records.dtype
    px, py = pixel_centres(tiles_x, n_tiles, dtype)
    # Every pixel's stopping slot is `last`: pairs after it are ignored, as in the forward pass.
    n_chunks = (jnp.max(jnp.where(last >= 0, last - tile_start[..., None] + 1, 0), initial=0) + CHUNK - 1) // CHUNK
    g_background = jnp.sum(g_out * trans_final[..., None], axis=(0, 1, 2))
    # Only sum_f g_f * (colour behind)_f is needed: g_total - prefix, with g_total = sum_f g_f out_f (+ the T term).
    g_total = jnp.sum(g_out * out, axis=-1) + g_trans * trans_final

    def body(chunk, state):
        trans, prefix, g_records = state
        rec, idx, valid = _gather_chunk(records, tile_start, tile_end, chunk)
        dx, dy, sigma, vis, raw, alpha = _alpha(rec, px, py)
        g_pair = []
        for b in range(CHUNK):
            a = alpha[..., b]
            take = valid[..., b, None] & (idx[..., b, None] <= last) & (sigma[..., b] >= 0) & (a >= ALPHA_MIN)
            weight = jnp.where(take, a * trans, 0.0)
            g_feat = jnp.sum(g_out * rec[..., b, None, FEATURES:], axis=-1)
            prefix = prefix + weight * g_feat
            behind = g_total - prefix  # everything composited behind this pair, background included
            g_alpha = jnp.where(take, g_feat * trans - behind / (1.0 - a), 0.0)
            unclamped = raw[..., b] <= ALPHA_MAX
            g_sigma = jnp.where(unclamped, -raw[..., b] * g_alpha, 0.0)
            g_opacity = jnp.where(unclamped, vis[..., b] * g_alpha, 0.0)
            ddx, ddy = dx[..., b], dy[..., b]
            ca, cb, cc = rec[..., b, None, CA], rec[..., b, None, CB], rec[..., b, None, CC]
            grads = [
                g_sigma * (ca * ddx + cb * ddy),
                g_sigma * (cb * ddx + cc * ddy),
                g_sigma * 0.5 * ddx * ddx,
                g_sigma * ddx * ddy,
                g_sigma * 0.5 * ddy * ddy,
                g_opacity,
            ]
            per_pixel = jnp.concatenate([jnp.stack(grads, axis=-1), weight[..., None] * g_out], axis=-1)
            g_pair.append(jnp.sum(per_pixel, axis=2))  # reduce over the tile's pixels: [C,T,K]
            trans = jnp.where(take, trans * (1.0 - a), trans)
        g_pair = jnp.stack(g_pair, axis=2)  # [C,T,B,K]
        slots = jnp.where(valid, idx, records.shape[2]).reshape(num_cams, -1)  # invalid slots are dropped
        g_records = jax.vmap(lambda g, s, v: g.at[:, s].add(v.reshape(-1, v.shape[-1]).T, mode="drop"))(
            g_records, slots, g_pair
        )
        return trans, prefix, g_records

    shape = (num_cams, n_tiles, TILE_PIXELS)
    init = (jnp.ones(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros_like(records))
    _, _, g_records = jax.lax.fori_loop(0, n_chunks, body, init)
    return g_records, g_background


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """Composite sorted pair records per tile. Returns out [C,T,256,F] and T_final [C,T,256]."""
    out, trans, _ = _forward(records, tile_start, tile_end, background, tiles_x)
    return out, trans


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    out, trans, last = _forward(records, tile_start, tile_end, background, tiles_x)
    return (out, trans), (records, tile_start, tile_end, background, out, trans, last)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, background, out, trans, last = residuals
    g_out, g_trans = cotangents
    g_records, g_background = _backward(
        records, tile_start, tile_end, background, tiles_x, out, trans, last, g_out, g_trans
    )
    return g_records, None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
