"""Step 2 of the rasterizer: expand each Gaussian into (tile, Gaussian) pairs and sort them per camera.

Everything has a static shape: each camera owns a buffer of `capacity` pair slots. Keeping cameras independent
(rather than one global buffer) lets the camera batch be sharded across devices with no communication.

Order: Gaussians are ranked by depth once per camera (stable, so ties keep index order, as gsplat's radix sort
does), pairs are emitted in rank order, and one sort by tile id orders them per tile while keeping depth order.
Pairs of the bounding rectangle's tiles that no pixel can take (`tile_hits`) sort to the end with the unused slots.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.constants import TILE
from kernels.projection import Projected

PAIR_SENTINEL = np.uint32(0xFFFFFFFF)
# Sort all cameras at once (camera id in the high key bits) instead of one sort per camera. "auto": when the
# program sees a single device, i.e. the camera batch cannot be sharded (a flattened sort of a sharded batch would
# need communication). Batched per-camera sorts run far slower on GPU than one flattened radix sort.
FLAT_SORT = os.environ.get("UHAP_FLAT_SORT", "auto")


class Bins(NamedTuple):
    gaussian_ids: jax.Array  # [C, P] int32 Gaussian index of each pair slot (0 in unused slots)
    valid: jax.Array  # [C, P] bool: the slot holds a pair
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


def _narrow_uint(n: int):
    """The narrowest unsigned type holding 0..n-1: XLA's GPU radix sort (CUB) takes unsigned keys and does one
    pass per key byte, so a 16-bit tile key sorts in half the passes of a 32-bit one."""
    return jnp.uint8 if n <= 1 << 8 else jnp.uint16 if n <= 1 << 16 else jnp.uint32


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def bin_pairs(
    proj: Projected,
    width: int,
    height: int,
    capacity: int,
    align: int = 1,
    *,
    expand: str = "cummax",
    sort: str = "auto",
) -> Bins:
    """Build the per-camera sorted pair buffers of `capacity` pairs (more slots when `align` > 1).

    `expand` and `sort` choose between equivalent strategies (benchmarked in kernels.bench --stages); `expand="cuda"`
    is the CUDA kernel of kernels/cuda_ops.py (NVIDIA GPUs), `expand="cpu"` the C++ one of kernels/cpu_ops.py.
    """
    tiles_x, tiles_y = tile_grid(width, height)
    n_tiles = tiles_x * tiles_y
    rects = tile_rectangles(proj, width, height)
    # One [C, N, 8] table (32-byte rows): the per-slot lookup reads one sector instead of six scattered floats.
    pad = jnp.zeros_like(proj.means2d)
    footprint = jnp.concatenate([proj.means2d, proj.conics, proj.opacities[..., None], pad], axis=-1)
    footprint = jax.lax.stop_gradient(footprint)
    n_pairs = jnp.sum(rects[-1], axis=-1, dtype=jnp.int32)
    if expand == "cpu":  # ranking, expansion and sorts in one C++ kernel for all cameras (kernels/cpu_ops.py)
        from kernels import cpu_ops

        x0, y0, x1, _, count = rects
        tile_sorted, gid_sorted, bounds = cpu_ops.bin_pairs(
            _depth_key(proj.depths, count), x0, y0, x1, count, footprint,
            capacity=capacity, tiles_x=tiles_x, n_tiles=n_tiles,
        )  # fmt: skip
    else:
        tile_sorted, gid_sorted = _expand_and_sort(proj, rects, footprint, capacity, tiles_x, n_tiles, expand, sort)
        bounds = jax.vmap(functools.partial(_tile_bounds, n_tiles=n_tiles))(tile_sorted)
    tile_start, tile_end = bounds[:, :-1], bounds[:, 1:]
    gid_valid = tile_sorted < n_tiles
    if align > 1:
        gid_sorted, gid_valid, tile_start, tile_end = jax.vmap(
            functools.partial(_align_tiles, align=align, n_tiles=n_tiles)
        )(gid_sorted, tile_sorted, tile_start, tile_end)
    return Bins(
        gaussian_ids=gid_sorted,
        valid=gid_valid,
        tile_start=tile_start,
        tile_end=tile_end,
        n_pairs=n_pairs,
        overflow=jnp.any(n_pairs > capacity),
    )


def _expand_and_sort(proj, rects, footprint, capacity, tiles_x, n_tiles, expand, sort):
    """Depth ranking, pair expansion and the sort by tile in XLA: per slot the tile id and the Gaussian id."""
    flat = flat_sort(proj.depths.shape[0])
    order = rank_by_depth(proj.depths, rects[-1], flat=flat)
    if expand == "cuda":  # one kernel for all cameras (kernels/cuda_ops.py)
        from kernels import cuda_ops

        tile, rank, used, _ = cuda_ops.expand_pairs(
            order, *rects, footprint, capacity=capacity, tiles_x=tiles_x, n_tiles=n_tiles
        )
    else:
        expand_fn = functools.partial(expand_pairs, capacity=capacity, tiles_x=tiles_x, method=expand)
        tile, rank, used, _ = jax.vmap(expand_fn)(order, *rects, footprint)
    if flat and sort == "auto":
        return sort_pairs_flat(tile, rank, used, order, n_tiles=n_tiles)
    sort_fn = functools.partial(sort_pairs, n_tiles=n_tiles, num_gauss=proj.depths.shape[1], method=sort)
    return jax.vmap(sort_fn)(tile, rank, used, order)


def flat_sort(num_cams: int) -> bool:
    """Whether to sort all cameras in one flattened sort (see FLAT_SORT)."""
    if FLAT_SORT == "auto":
        return num_cams == 1 or jax.device_count() == 1
    return FLAT_SORT in ("1", "true", True)


def _depth_key(depths: jax.Array, count: jax.Array) -> jax.Array:
    """Unsigned integer sort keys in depth order: the bits of a positive float order as the float does (every
    Gaussian with tiles has depth >= the near plane > 0); culled Gaussians get the largest key. Integer keys let XLA
    use its radix sort (a float comparator canonicalises -0 and NaN, which XLA's GPU sort rewriter does not match)."""
    udtype = jnp.dtype(f"uint{jnp.dtype(depths.dtype).itemsize * 8}")
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(depths), udtype)
    return jnp.where(count > 0, bits, np.array(np.iinfo(udtype).max, udtype))


def rank_by_depth(depths: jax.Array, count: jax.Array, *, flat: bool = False) -> jax.Array:
    """[C, N] rank -> Gaussian id, front to back; ties keep index order (as gsplat's stable radix sort); culled
    Gaussians (no tiles) go last. `flat`: two 1-D stable sorts over all cameras (by depth, then by camera) instead
    of C batched sorts."""
    num_cams, num_gauss = depths.shape
    key = _depth_key(depths, count)
    if not flat or num_cams == 1:
        idx = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
        return jax.lax.sort((key, idx), dimension=1, num_keys=1, is_stable=True)[1]
    idx = jnp.arange(num_cams * num_gauss, dtype=jnp.int32)
    _, idx = jax.lax.sort((key.reshape(-1), idx), num_keys=1, is_stable=True)  # global depth order
    cam = (idx // num_gauss).astype(_narrow_uint(num_cams))
    _, idx = jax.lax.sort((cam, idx), num_keys=1, is_stable=True)  # camera-major, depth order kept
    return (idx % num_gauss).reshape(num_cams, num_gauss)


def expand_pairs(order, x0, y0, x1, y1, count, footprint=None, *, capacity: int, tiles_x: int, method: str = "cummax"):
    """One camera: emit the (tile, Gaussian) pairs in depth-rank order into `capacity` slots.

    Returns per slot the tile id, the rank, whether the slot is used, and the number of pairs needed. With
    `footprint` ([N, 6+] rows of mean x, y, conic xx, xy, yy, opacity), a pair whose tile no pixel of it can take is
    not used (`tile_hits`).
    """
    del y1
    num_gauss = order.shape[0]
    count_r = count[order]
    ends = jnp.cumsum(count_r, dtype=jnp.int32)
    starts = ends - count_r
    n_pairs = ends[-1] if num_gauss else jnp.int32(0)
    slot = jnp.arange(capacity, dtype=jnp.int32)
    if method == "cummax":
        # Mark each non-empty rank's first slot, then carry it forward with a running max.
        first = jnp.where((count_r > 0) & (starts < capacity), starts, capacity)
        slot_rank = jnp.zeros((capacity,), jnp.int32).at[first].max(jnp.arange(num_gauss, dtype=jnp.int32), mode="drop")
        slot_rank = jax.lax.cummax(slot_rank)
    elif method == "searchsorted":
        slot_rank = jnp.searchsorted(ends, slot, side="right").astype(jnp.int32)
        slot_rank = jnp.minimum(slot_rank, num_gauss - 1)
    else:
        raise ValueError(f"unknown expand method {method!r}")
    gid = order[slot_rank]
    local = slot - starts[slot_rank]
    w = jnp.maximum(x1[gid] - x0[gid], 1)
    tile = (y0[gid] + local // w) * tiles_x + x0[gid] + local % w
    used = slot < n_pairs
    if footprint is not None:
        row = footprint[gid]
        used &= tile_hits(tile, row[:, :2], row[:, 2:5], row[:, 5], tiles_x)
    return tile, slot_rank, used, n_pairs


def tile_hits(tile, mean, conic, opacity, tiles_x: int):
    """Whether any pixel centre of the tile can reach alpha >= 1/255, i.e. sigma <= ln(255 opacity), with sigma's
    minimum over the tile's box of pixel centres (0 inside; else the least of the four edges' clamped 1-D minima).
    The bounding rectangle also covers tiles that the ellipse misses (its corners); their pairs change no pixel,
    so dropping them leaves images and gradients as they are and saves both kernels the work. A 1% margin in alpha
    keeps the test conservative under float rounding."""
    a, b, c = conic[..., 0], conic[..., 1], conic[..., 2]
    x_lo = ((tile % tiles_x) * TILE).astype(mean.dtype) + 0.5 - mean[..., 0]
    y_lo = ((tile // tiles_x) * TILE).astype(mean.dtype) + 0.5 - mean[..., 1]
    x_hi, y_hi = x_lo + (TILE - 1), y_lo + (TILE - 1)

    def sigma(dx, dy):
        return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy

    edges = [sigma(dx, jnp.clip(-b * dx / c, y_lo, y_hi)) for dx in (x_lo, x_hi)]
    edges += [sigma(jnp.clip(-b * dy / a, x_lo, x_hi), dy) for dy in (y_lo, y_hi)]
    inside = (x_lo <= 0) & (x_hi >= 0) & (y_lo <= 0) & (y_hi >= 0)
    lowest = jnp.where(inside, 0.0, functools.reduce(jnp.minimum, edges))
    return lowest <= jnp.log(255.0 * opacity) + 0.01


def aligned_size(capacity: int, n_tiles: int, align: int) -> int:
    """Slots needed when every tile's range starts at a multiple of `align` (plus one chunk of read-ahead)."""
    return -(-(capacity + n_tiles * (align - 1)) // align) * align


def _align_tiles(gid_sorted, tile_sorted, tile_start, tile_end, *, align: int, n_tiles: int):
    """Move each tile's pairs to a range starting at a multiple of `align`, so that a kernel reading or writing
    whole chunks of `align` slots never touches another tile's slots."""
    count = tile_end - tile_start
    padded = (count + align - 1) // align * align
    new_start = (jnp.cumsum(padded) - padded).astype(jnp.int32)
    size = aligned_size(gid_sorted.shape[0], n_tiles, align)
    slot = jnp.arange(gid_sorted.shape[0], dtype=jnp.int32)
    tile = jnp.minimum(tile_sorted, n_tiles - 1)
    target = jnp.where(tile_sorted < n_tiles, new_start[tile] + slot - tile_start[tile], size)
    gids = jnp.zeros((size,), jnp.int32).at[target].set(gid_sorted, mode="drop")
    valid = jnp.zeros((size,), bool).at[target].set(True, mode="drop")
    return gids, valid, new_start, new_start + count


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


def sort_pairs_flat(tile, rank, used, order, *, n_tiles: int, key_bits: int = 32):
    """All cameras [C, P] in one 1-D sort, camera id in the high key bits. Every camera owns exactly P slots and its
    unused slots sort to the end of its own range, so the sorted array is already the per-camera [C, P] layout.
    Returns what `sort_pairs` returns, per camera."""
    num_cams, slots = tile.shape
    num_gauss = order.shape[1]
    cam_bits = (num_cams - 1).bit_length()
    tile_bits, rank_bits = _bits(n_tiles + 1), _bits(num_gauss)
    cam = jnp.arange(num_cams, dtype=jnp.uint32)[:, None]
    if cam_bits + tile_bits + rank_bits <= key_bits:
        # Keys only: (camera, tile, rank) packed; a camera's unused slots get all ones below its camera bits.
        low = tile_bits + rank_bits
        key = (tile.astype(jnp.uint32) << rank_bits) | rank.astype(jnp.uint32)
        key = jnp.where(used, key, np.uint32((1 << low) - 1))
        if cam_bits:
            key = key | (cam << low)
        key = jax.lax.sort(key.reshape(-1)).reshape(num_cams, slots)
        tile_field = ((key >> rank_bits) & np.uint32((1 << tile_bits) - 1)).astype(jnp.int32)
        sorted_tile = jnp.minimum(tile_field, n_tiles)
        sorted_rank = (key & np.uint32((1 << rank_bits) - 1)).astype(jnp.int32)
    else:
        # Too many bits: a stable key-value sort on (camera, tile); pairs arrive in rank order within each camera.
        key = cam.astype(jnp.int32) * (n_tiles + 1) + jnp.where(used, tile, n_tiles)
        key = key.astype(_narrow_uint(num_cams * (n_tiles + 1)))
        key, sorted_rank = jax.lax.sort((key.reshape(-1), rank.reshape(-1)), num_keys=1, is_stable=True)
        sorted_tile = key.reshape(num_cams, slots).astype(jnp.int32) - cam.astype(jnp.int32) * (n_tiles + 1)
        sorted_rank = sorted_rank.reshape(num_cams, slots)
    sorted_rank = jnp.where(sorted_tile < n_tiles, sorted_rank, 0)
    return sorted_tile, jax.vmap(lambda o, r: o[r])(order, sorted_rank)


def sort_pairs(tile, rank, used, order, *, n_tiles: int, num_gauss: int, method: str = "auto"):
    """One camera: order pairs by (tile, rank). Returns the tile id per slot (n_tiles in unused slots) and the
    Gaussian id per slot. Pairs arrive in rank order, so a stable sort on the tile id alone keeps depth order."""
    rank_bits = _bits(num_gauss)
    if method == "auto" and packed_key_fits(n_tiles, num_gauss):
        # Fast path: one keys-only sort of a packed 32-bit key (radix sort on GPU).
        key = (tile.astype(jnp.uint32) << rank_bits) | rank.astype(jnp.uint32)
        key = jnp.where(used, key, PAIR_SENTINEL)
        key = jax.lax.sort(key)
        sorted_tile = jnp.where(key == PAIR_SENTINEL, n_tiles, (key >> rank_bits).astype(jnp.int32))
        sorted_rank = (key & np.uint32((1 << rank_bits) - 1)).astype(jnp.int32)
    elif method in ("auto", "stable_pairs"):
        # Too many bits for 32 (e.g. 1M Gaussians at 1080p): a stable key-value sort on the tile id, without x64.
        tile = jnp.where(used, tile, n_tiles).astype(_narrow_uint(n_tiles + 1))
        sorted_tile, sorted_rank = jax.lax.sort((tile, rank.astype(jnp.int32)), num_keys=1, is_stable=True)
    else:
        raise ValueError(f"unknown sort method {method!r}")
    sorted_rank = jnp.where(sorted_tile < n_tiles, sorted_rank, 0)
    return sorted_tile.astype(jnp.int32), order[sorted_rank]
