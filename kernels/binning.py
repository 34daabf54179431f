"""Step 2 of the rasterizer: expand each Gaussian into (tile, Gaussian) pairs and sort them per camera.

Everything has a static shape: each camera owns a buffer of `capacity` pair slots. Keeping cameras independent
(rather than one global buffer) lets the camera batch be sharded across devices with no communication.

Order: Gaussians are ranked by depth once per camera (stable, so ties keep index order, as gsplat's radix sort
does), pairs are emitted in rank order, and one sort by tile id orders them per tile while keeping depth order.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.projection import Projected

TILE = 16
PAIR_SENTINEL = np.uint32(0xFFFFFFFF)


class Bins(NamedTuple):
    gaussian_ids: jax.Array  # [C, P] int32 Gaussian index of each pair slot (0 in unused slots)
    tile_start: jax.Array  # [C, T] int32 first pair slot of each tile
    tile_end: jax.Array  # [C, T] int32 one past the last pair slot of each tile
    n_pairs: jax.Array  # [C] int32 pairs needed (may exceed capacity)
    overflow: jax.Array  # [] bool: some camera needed more than `capacity` slots


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering the image with 16x16 tiles."""
    return -(-width // TILE), -(-height // TILE)


def tile_rectangles(proj: Projected, width: int, height: int) -> tuple[jax.Array, ...]:
    """Per Gaussian and camera, the covered tile rectangle [x0, x1) x [y0, y1), as gsplat's isect_tiles."""
    tiles_x, tiles_y = tile_grid(width, height)
    radii = proj.radii.astype(proj.means2d.dtype)
    centre = jax.lax.stop_gradient(proj.means2d) / TILE
    r = radii / TILE
    lo = jnp.floor(centre - r)
    hi = jnp.ceil(centre + r)
    x0 = jnp.clip(lo[..., 0], 0, tiles_x).astype(jnp.int32)
    y0 = jnp.clip(lo[..., 1], 0, tiles_y).astype(jnp.int32)
    x1 = jnp.clip(hi[..., 0], 0, tiles_x).astype(jnp.int32)
    y1 = jnp.clip(hi[..., 1], 0, tiles_y).astype(jnp.int32)
    valid = (proj.radii[..., 0] > 0) & (proj.radii[..., 1] > 0)
    count = jnp.where(valid, (x1 - x0) * (y1 - y0), 0)
    return x0, y0, x1, y1, count


def count_pairs(proj: Projected, width: int, height: int) -> jax.Array:
    """[C] number of (tile, Gaussian) pairs each camera needs."""
    return jnp.sum(tile_rectangles(proj, width, height)[-1], axis=-1, dtype=jnp.int32)


def bucket_capacity(n_pairs: int, minimum: int = 1024) -> int:
    """Round a pair count up to one of four buckets per octave (multiples of 1024), so recompiles stay rare."""
    n = max(int(n_pairs), minimum)
    octave = 2 ** math.floor(math.log2(n))
    for step in (1.0, 1.25, 1.5, 1.75, 2.0):
        cap = int(octave * step)
        if cap >= n:
            return -(-cap // 1024) * 1024
    raise AssertionError("unreachable")


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def bin_pairs(proj: Projected, width: int, height: int, capacity: int) -> Bins:
    """Build the per-camera sorted pair buffers of static size `capacity`."""
    tiles_x, tiles_y = tile_grid(width, height)
    n_tiles = tiles_x * tiles_y
    num_cams, num_gauss = proj.depths.shape
    x0, y0, x1, y1, count = tile_rectangles(proj, width, height)

    # Rank Gaussians by depth per camera; culled ones go last (their count is 0 anyway).
    depth_key = jnp.where(count > 0, jax.lax.stop_gradient(proj.depths), jnp.inf)
    order = jnp.argsort(depth_key, axis=-1, stable=True).astype(jnp.int32)  # [C,N] rank -> gaussian id

    def per_camera(order_c, x0_c, y0_c, x1_c, count_c):
        count_r = count_c[order_c]
        ends = jnp.cumsum(count_r, dtype=jnp.int32)
        starts = ends - count_r
        n_pairs = ends[-1] if num_gauss else jnp.int32(0)
        # Slot -> rank: mark each non-empty rank's first slot, then carry it forward with a running max.
        slot_rank = jnp.zeros((capacity,), jnp.int32)
        first = jnp.where((count_r > 0) & (starts < capacity), starts, capacity)
        slot_rank = slot_rank.at[first].max(jnp.arange(num_gauss, dtype=jnp.int32), mode="drop")
        slot_rank = jax.lax.cummax(slot_rank)
        slot = jnp.arange(capacity, dtype=jnp.int32)
        used = slot < n_pairs
        gid = order_c[slot_rank]
        local = slot - starts[slot_rank]
        w = jnp.maximum(x1_c[gid] - x0_c[gid], 1)
        tile = (y0_c[gid] + local // w) * tiles_x + x0_c[gid] + local % w
        return _sort_pairs(tile, slot_rank, used, n_tiles, num_gauss, order_c), n_pairs

    (tile_sorted, gid_sorted), n_pairs = jax.vmap(per_camera)(order, x0, y0, x1, count)
    bounds = jax.vmap(functools.partial(_tile_bounds, n_tiles=n_tiles))(tile_sorted)
    return Bins(
        gaussian_ids=gid_sorted,
        tile_start=bounds[:, :-1],
        tile_end=bounds[:, 1:],
        n_pairs=n_pairs,
        overflow=jnp.any(n_pairs > capacity),
    )


def _tile_bounds(sorted_tile: jax.Array, n_tiles: int) -> jax.Array:
    """[n_tiles + 1] first slot of each tile in a sorted tile-id array (unused slots carry id n_tiles)."""
    capacity = sorted_tile.shape[0]
    slot = jnp.arange(capacity, dtype=jnp.int32)
    is_first = jnp.concatenate([jnp.ones((1,), bool), sorted_tile[1:] != sorted_tile[:-1]])
    first = jnp.full((n_tiles + 1,), capacity, jnp.int32)
    first = first.at[jnp.where(is_first, sorted_tile, n_tiles + 1)].min(slot, mode="drop")
    # A tile with no pairs starts where the next non-empty tile does.
    return jax.lax.cummin(first, reverse=True)


def packed_key_fits(n_tiles: int, num_gauss: int) -> bool:
    """Whether (tile << bits(N)) | rank, plus a sentinel above every key, fits in 32 bits."""
    return _bits(n_tiles + 1) + _bits(num_gauss) <= 32


def _sort_pairs(tile, rank, used, n_tiles: int, num_gauss: int, order_c):
    """Sort pairs by (tile, rank). Returns (tile id per slot, n_tiles in unused slots; Gaussian id per slot)."""
    rank_bits = _bits(num_gauss)
    if packed_key_fits(n_tiles, num_gauss):
        # Fast path: one keys-only sort of a packed 32-bit key (radix sort on GPU).
        key = (tile.astype(jnp.uint32) << rank_bits) | rank.astype(jnp.uint32)
        key = jnp.where(used, key, PAIR_SENTINEL)
        key = jax.lax.sort(key)
        sorted_tile = jnp.where(key == PAIR_SENTINEL, n_tiles, (key >> rank_bits).astype(jnp.int32))
        sorted_rank = (key & np.uint32((1 << rank_bits) - 1)).astype(jnp.int32)
    else:
        # Too many bits for 32: sort (tile, rank) lexicographically as two int32 keys, without x64.
        tile = jnp.where(used, tile, n_tiles).astype(jnp.int32)
        sorted_tile, sorted_rank = jax.lax.sort((tile, rank.astype(jnp.int32)), num_keys=2)
    sorted_rank = jnp.where(sorted_tile < n_tiles, sorted_rank, 0)
    return sorted_tile.astype(jnp.int32), order_c[sorted_rank]
