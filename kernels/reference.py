"""Steps 3-4 in plain jnp: the front-to-back compositor and its hand-written backward, pair-major.

Every (tile, Gaussian) pair is evaluated against the 256 pixels of its tile at once ([C, P, 256] arrays), and the
transmittance in front of each pair is a segmented prefix sum of log(1 - alpha) within the pair's tile. Work is
proportional to the number of pairs (no padding to the busiest tile), there are no sequential loops, and it runs on
any backend: it is the CPU/TPU path and the reference for the Pallas kernels. The backward recomputes the forward
and gets the colour behind pair i as (out - prefix_i): no reverse pass and no stored per-pair state.

Pair records are packed field-major as [C, 6 + F, P]: mean2d (2), conic (3), opacity (1), features (F: colour,
then depth), so that a kernel reads each field of a chunk of pairs contiguously.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.constants import ALPHA_MAX, ALPHA_MIN, CA, CB, CC, FEATURES, MX, MY, OPACITY, T_EPSILON, TILE, TILE_PIXELS

ALIGN = 1  # pair-major evaluation needs no alignment of tile ranges


def pixel_centres(tiles_x: int, n_tiles: int, dtype) -> tuple[jax.Array, jax.Array]:
    """[T, 256] x and y pixel centres of each tile's pixels, row-major within the tile."""
    tile = jnp.arange(n_tiles)
    k = jnp.arange(TILE_PIXELS)
    px = (tile[:, None] % tiles_x) * TILE + k[None, :] % TILE + 0.5
    py = (tile[:, None] // tiles_x) * TILE + k[None, :] // TILE + 0.5
    return px.astype(dtype), py.astype(dtype)


def _slot_tiles(tile_start, tile_end, slots: int):
    """Per slot [C, P]: its tile id, whether it holds a pair, and whether it is its tile's first pair."""
    n_tiles = tile_start.shape[1]

    def one(start, end):
        marks = (
            jnp.zeros((slots,), jnp.int32)
            .at[jnp.where(end > start, start, slots)]
            .max(jnp.arange(n_tiles, dtype=jnp.int32), mode="drop")
        )
        tile = jax.lax.cummax(marks)
        slot = jnp.arange(slots, dtype=jnp.int32)
        return tile, (slot >= start[tile]) & (slot < end[tile]), slot == start[tile]

    return jax.vmap(one)(tile_start, tile_end)


def _segment_cumsum(x, first):
    """Inclusive prefix sum along axis 1 that restarts where `first` [C, P] is set (a segmented scan)."""

    def combine(left, right):
        left_flag, left_sum = left
        right_flag, right_sum = right
        return left_flag | right_flag, jnp.where(right_flag, right_sum, left_sum + right_sum)

    flags = jnp.broadcast_to(first[..., None], x.shape)
    return jax.lax.associative_scan(combine, (flags, x), axis=1)[1]


def _segment_sum(x, tile, n_tiles: int):
    """Sum the [C, P, ...] values of each tile into [C, T, ...]."""
    return jax.vmap(lambda v, t: jax.ops.segment_sum(v, t, num_segments=n_tiles))(x, tile)


def _pairs(records, tile_start, tile_end, tiles_x):
    """Everything the forward and backward share, per pair and pixel of its tile ([C, P, 256])."""
    n_tiles = tile_start.shape[1]
    tile, valid, first = _slot_tiles(tile_start, tile_end, records.shape[2])
    px, py = pixel_centres(tiles_x, n_tiles, records.dtype)
    px, py = px[tile], py[tile]
    field = [records[:, f, :, None] for f in range(records.shape[1])]
    dx, dy = field[MX] - px, field[MY] - py
    sigma = 0.5 * (field[CA] * dx * dx + field[CC] * dy * dy) + field[CB] * dx * dy
    vis = jnp.exp(-sigma)
    raw = field[OPACITY] * vis
    alpha = jnp.minimum(raw, ALPHA_MAX)
    live = valid[..., None] & (sigma >= 0) & (alpha >= ALPHA_MIN)
    a = jnp.where(live, alpha, 0.0)
    log_keep = jnp.log1p(-a)
    cum = _segment_cumsum(log_keep, first)
    # Transmittance only falls, so once T would drop to T_EPSILON every later pair of the pixel is out too.
    take = live & (jnp.exp(cum) > T_EPSILON)
    t_before = jnp.exp(cum - log_keep)
    weight = jnp.where(take, a * t_before, 0.0)
    return dict(
        tile=tile,
        valid=valid,
        first=first,
        field=field,
        dx=dx,
        dy=dy,
        vis=vis,
        raw=raw,
        a=a,
        log_keep=log_keep,
        take=take,
        t_before=t_before,
        weight=weight,
    )


def _forward(records, tile_start, tile_end, background, tiles_x):
    """Returns out [C,T,256,F] (background included) and the final transmittance T [C,T,256]."""
    n_tiles = tile_start.shape[1]
    p = _pairs(records, tile_start, tile_end, tiles_x)
    feats = records[:, FEATURES:, :]  # [C,F,P]
    acc = _segment_sum(p["weight"][..., None] * jnp.swapaxes(feats, 1, 2)[:, :, None, :], p["tile"], n_tiles)
    trans = jnp.exp(_segment_sum(jnp.where(p["take"], p["log_keep"], 0.0), p["tile"], n_tiles))
    return acc + trans[..., None] * background, trans


def _backward(records, tile_start, tile_end, background, tiles_x, out, trans_final, g_out, g_trans):
    """Gradients w.r.t. records [C,K,P] and background [F]."""
    del background
    p = _pairs(records, tile_start, tile_end, tiles_x)
    tile, field = p["tile"], p["field"]
    gather = jax.vmap(lambda x, t: x[t])
    g_out_pair = gather(g_out, tile)  # [C,P,256,F]
    # Only sum_f g_f * (colour behind)_f is needed: g_total - prefix, with g_total = sum_f g_f out_f (+ the T term).
    g_total = gather(jnp.sum(g_out * out, axis=-1) + g_trans * trans_final, tile)
    g_feat = sum(g_out_pair[..., f] * field[FEATURES + f] for f in range(g_out.shape[-1]))
    weighted = p["weight"] * g_feat
    behind = g_total - _segment_cumsum(weighted, p["first"])
    g_alpha = jnp.where(p["take"], p["t_before"] * g_feat - behind / (1.0 - p["a"]), 0.0)
    unclamped = p["raw"] <= ALPHA_MAX
    g_sigma = jnp.where(unclamped, -p["raw"] * g_alpha, 0.0)
    dx, dy = p["dx"], p["dy"]
    grads = [
        g_sigma * (field[CA] * dx + field[CB] * dy),
        g_sigma * (field[CB] * dx + field[CC] * dy),
        g_sigma * 0.5 * dx * dx,
        g_sigma * dx * dy,
        g_sigma * 0.5 * dy * dy,
        jnp.where(unclamped, p["vis"] * g_alpha, 0.0),
        *(p["weight"] * g_out_pair[..., f] for f in range(g_out.shape[-1])),
    ]
    g_records = jnp.stack([jnp.sum(g, axis=-1) for g in grads], axis=1)  # reduce over each tile's pixels
    g_records = jnp.where(p["valid"][:, None, :], g_records, 0.0)
    g_background = jnp.sum(g_out * trans_final[..., None], axis=(0, 1, 2))
    return g_records, g_background


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """Composite sorted pair records per tile. Returns out [C,T,256,F] and T_final [C,T,256]."""
    return _forward(records, tile_start, tile_end, background, tiles_x)


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    out, trans = _forward(records, tile_start, tile_end, background, tiles_x)
    return (out, trans), (records, tile_start, tile_end, background, out, trans)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, background, out, trans = residuals
    g_out, g_trans = cotangents
    g_records, g_background = _backward(records, tile_start, tile_end, background, tiles_x, out, trans, g_out, g_trans)
    return g_records, None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
