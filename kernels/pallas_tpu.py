"""Steps 3-4 as Pallas TPU (Mosaic) kernels: one program per (camera, tile), the tile's pairs in blocks of BLOCK.

Records are field-major [C, 10, P] (a pair-major [P, 10] array would be padded to 128 lanes in TPU HBM), and every
tile's pair range starts at a multiple of BLOCK (binning's `align`), so a block is one [10, BLOCK] DMA. The tile's
range comes from SMEM (scalar prefetch); record blocks are streamed from HBM by hand-issued, double-buffered DMAs:
block k + 1 is in flight while block k is composited.

A block is evaluated as [BLOCK, 256] arrays (pairs on sublanes, the tile's 256 pixels on lanes, so a pixel's state
is a lane-dense [1, 256] row), with the reference's log-space arithmetic: the transmittance in front of each pair is
an exclusive prefix sum of log(1 - alpha) over the block, taken on the MXU as a product with a triangular 0/1
matrix, plus the running sum of the earlier blocks. The colour sums are a [4, BLOCK] x [BLOCK, 256] product. After
each block the tile stops when every pixel is saturated (T <= T_EPSILON); the forward keeps per pixel only the
output, the final T and the last contributing slot.

The backward walks the same blocks in reverse, from the last block holding a contributing pair: T in front of a
pair is T_final over the suffix product of (1 - alpha) behind it (a suffix sum of logs, again on the MXU), and the
colour behind it is a suffix sum as well, started at T_final times the background's share of the output
gradient. Each pair's gradient is reduced over the tile's 256 pixels and written to its own slot (blocks behind the
last contributing pair get zeros), so there are no atomics and the result is deterministic. Slots outside every
tile's range are not written; the record gather's transpose drops them.

Without a TPU the same kernels run in TPU interpret mode (`pltpu.InterpretParams`), which also simulates the DMAs
and semaphores, so the CPU tests exercise the streaming and early exit as written.
"""

from __future__ import annotations

import functools
import os
import threading

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.constants import (
    ALPHA_MAX,
    ALPHA_MIN,
    CA,
    CB,
    CC,
    FEATURES,
    MX,
    MY,
    NUM_FEATURES,
    NUM_FIELDS,
    OPACITY,
    T_EPSILON,
    TILE,
    TILE_PIXELS,
)

# Pairs per block: a multiple of 128 (the lane width, and the DMA-friendly slice of the records' pair axis).
BLOCK = int(os.environ.get("UHAP_PALLAS_TPU_BLOCK", 128))
if BLOCK <= 0 or BLOCK % 128:
    raise ValueError(f"UHAP_PALLAS_TPU_BLOCK must be a positive multiple of 128, got {BLOCK}")
ALIGN = BLOCK  # every tile's range starts at a multiple of BLOCK (rasterize.build_pairs reads this)
PAIR_MAJOR = False  # records [C, 10, P]
_HIGHEST = jax.lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the last axes of both operands: a @ b.T


def interpret_params() -> pltpu.InterpretParams | bool:
    """TPU interpret mode wherever JAX's default backend is not a TPU, else compile with Mosaic."""
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def _interpret_mode(interpret, dtype):
    """The `interpret` argument of pallas_call. In interpret mode the kernels' memory and DMA operations run as
    callbacks on XLA's threads, which do not see a thread-local `jax.enable_x64` context: with float64 records they
    would move float32 and wait forever for the rest of the bytes, so that case is a clear error instead."""
    interpret = interpret_params() if interpret is None else interpret
    if interpret is not False and jnp.dtype(dtype) == jnp.float64:
        seen = []
        probe = threading.Thread(target=lambda: seen.append(bool(jax.config.jax_enable_x64)))
        probe.start()
        probe.join()
        if not seen[0]:
            raise ValueError(
                "rasterize(backend='pallas_tpu') in TPU interpret mode with float64 needs x64 on for the whole "
                "process: call jax.config.update('jax_enable_x64', True) instead of the `jax.enable_x64` context"
            )
    return interpret


def _div(x, y):
    """Integer division of non-negative values (lax's truncating form: jnp's floor division lowers through sign)."""
    return jax.lax.div(x, jnp.asarray(y, jnp.int32))


def _rem(x, y):
    return jax.lax.rem(x, jnp.asarray(y, jnp.int32))


def _dot(a, b):
    return jax.lax.dot(a, b, precision=_HIGHEST, preferred_element_type=a.dtype)


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, precision=_HIGHEST, preferred_element_type=a.dtype)


def _block_geometry(rec, tile, tiles_x, block):
    """Per pair of the block (sublanes) and pixel of the tile (lanes): the record fields as [B, 1] columns (the
    [10, B] block turned by an exact product with the identity on the MXU), and dx, dy, sigma [B, 256]."""
    dtype = rec.dtype
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    cols = _dot_nt((row == col).astype(dtype), rec)  # [B, 10]
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, TILE_PIXELS), 1)
    px = (_rem(tile, tiles_x) * TILE + _rem(lane, TILE)).astype(dtype) + 0.5
    py = (_div(tile, tiles_x) * TILE + _div(lane, TILE)).astype(dtype) + 0.5
    field = [cols[:, f : f + 1] for f in range(NUM_FIELDS)]
    dx = field[MX] - px
    dy = field[MY] - py
    sigma = 0.5 * (field[CA] * dx * dx + field[CC] * dy * dy) + field[CB] * dx * dy
    return field, dx, dy, sigma


def _triangle(block, dtype, keep):
    """[B, B] 0/1 matrix with ones where keep(row, col): a product with it is a prefix or suffix sum over pairs."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    return keep(row, col).astype(dtype)


def _forward_kernel(start_ref, end_ref, rec_hbm, acc_ref, trans_ref, last_ref, buf, sem, *, tiles_x, n_tiles, block):
    cam, tile = pl.program_id(0), pl.program_id(1)
    start, end = start_ref[cam * n_tiles + tile], end_ref[cam * n_tiles + tile]
    n_blocks = _div(end - start + block - 1, block)
    dtype = buf.dtype
    prefix = _triangle(block, dtype, lambda i, j: j <= i)  # inclusive prefix sum over the block's pairs
    pair = jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)

    def copy(k, slot):
        return pltpu.make_async_copy(rec_hbm.at[cam, :, pl.ds(start + k * block, block)], buf.at[slot], sem.at[slot])

    @pl.when(n_blocks > 0)
    def _():
        copy(0, 0).start()

    def cond(carry):
        k, cum_row = carry[0], carry[1]
        # Every pixel saturated (the same test as `take`): no later pair can be taken (T only falls), so stop.
        return (k < n_blocks) & (jnp.max(jnp.exp(cum_row)) > T_EPSILON)

    def body(carry):
        k, cum_row, log_t, acc, last = carry
        slot = _rem(k, 2)
        copy(k, slot).wait()

        @pl.when(k + 1 < n_blocks)
        def _():
            copy(k + 1, 1 - slot).start()

        rec = buf[slot]  # [10, B]
        field, _, _, sigma = _block_geometry(rec, tile, tiles_x, block)
        alpha = jnp.minimum(field[OPACITY] * jnp.exp(-sigma), ALPHA_MAX)
        idx = start + k * block + pair  # [B, 1] slot of each pair
        live = (idx < end) & (sigma >= 0) & (alpha >= ALPHA_MIN)
        a = jnp.where(live, alpha, 0.0)
        log_keep = jnp.log1p(-a)
        cum = cum_row + _dot(prefix, log_keep)  # log T behind each pair (inclusive)
        take = live & (jnp.exp(cum) > T_EPSILON)
        weight = jnp.where(take, a * jnp.exp(cum - log_keep), 0.0)
        acc = acc + _dot(rec, weight)[FEATURES:]  # [4, 256]
        log_t = log_t + jnp.sum(jnp.where(take, log_keep, 0.0), axis=0, keepdims=True)
        last = jnp.maximum(last, jnp.max(jnp.where(take, idx, -1), axis=0, keepdims=True))
        return k + 1, cum[block - 1 :], log_t, acc, last

    zeros = jnp.zeros((1, TILE_PIXELS), dtype)
    init = (
        jnp.int32(0),
        zeros,
        zeros,
        jnp.zeros((NUM_FEATURES, TILE_PIXELS), dtype),
        jnp.full(zeros.shape, -1, jnp.int32),
    )
    k, _, log_t, acc, last = jax.lax.while_loop(cond, body, init)

    @pl.when(k < n_blocks)  # stopped early: the prefetch of block k is still in flight
    def _():
        copy(k, _rem(k, 2)).wait()

    acc_ref[...] = acc
    trans_ref[...] = jnp.exp(log_t)
    last_ref[...] = last


def _backward_kernel(
    start_ref,
    end_ref,
    rec_hbm,
    trans_ref,
    last_ref,
    g_acc_ref,
    g_base_ref,
    g_hbm,
    buf,
    gbuf,
    zero,
    read_sem,
    write_sem,
    zero_sem,
    *,
    tiles_x,
    n_tiles,
    block,
):
    cam, tile = pl.program_id(0), pl.program_id(1)
    start, end = start_ref[cam * n_tiles + tile], end_ref[cam * n_tiles + tile]
    n_blocks = _div(end - start + block - 1, block)
    last = last_ref[...]  # [1, 256] last contributing slot of each pixel (-1: none)
    final = jnp.max(last)
    walk = jnp.where(final >= start, _div(final - start, block) + 1, 0)  # blocks [0, walk) hold contributing pairs
    dtype = buf.dtype

    # Blocks behind the last contributing pair: zero gradients.
    zero[...] = jnp.zeros(zero.shape, dtype)

    def zero_copy(k):
        return pltpu.make_async_copy(zero, g_hbm.at[cam, :, pl.ds(start + k * block, block)], zero_sem)

    jax.lax.fori_loop(walk, n_blocks, lambda k, c: (zero_copy(k).start(), c)[1], 0)

    def read(k, slot):
        return pltpu.make_async_copy(
            rec_hbm.at[cam, :, pl.ds(start + k * block, block)], buf.at[slot], read_sem.at[slot]
        )

    def write(k, slot):
        return pltpu.make_async_copy(
            gbuf.at[slot], g_hbm.at[cam, :, pl.ds(start + k * block, block)], write_sem.at[slot]
        )

    @pl.when(walk > 0)
    def _():
        read(walk - 1, 0).start()

    suffix = _triangle(block, dtype, lambda i, j: j >= i)  # inclusive suffix sum
    behind_of = _triangle(block, dtype, lambda i, j: j > i)  # exclusive suffix sum
    pair = jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    g_acc = g_acc_ref[...]  # [4, 256]
    log_t_final = jnp.log(trans_ref[...])

    def body(step, carry):
        suffix_row, behind_row = carry  # log (1 - a) summed over, and colour behind, the later blocks
        k = walk - 1 - step
        slot = _rem(step, 2)
        read(k, slot).wait()

        @pl.when(k > 0)
        def _():
            read(k - 1, 1 - slot).start()

        @pl.when(step >= 2)  # gbuf[slot] is still being written out from two steps ago
        def _():
            write(k + 2, slot).wait()

        rec = buf[slot]
        field, dx, dy, sigma = _block_geometry(rec, tile, tiles_x, block)
        vis = jnp.exp(-sigma)
        raw = field[OPACITY] * vis
        alpha = jnp.minimum(raw, ALPHA_MAX)
        idx = start + k * block + pair
        take = (idx < end) & (idx <= last) & (sigma >= 0) & (alpha >= ALPHA_MIN)
        a = jnp.where(take, alpha, 0.0)
        log_keep = jnp.log1p(-a)
        t_before = jnp.exp(log_t_final - (suffix_row + _dot(suffix, log_keep)))
        weight = jnp.where(take, a * t_before, 0.0)
        g_feat = sum(field[FEATURES + f] * g_acc[f : f + 1] for f in range(NUM_FEATURES))  # [B, 256]
        weighted = weight * g_feat
        behind = behind_row + _dot(behind_of, weighted)  # sum_f g_f (colour behind the pair)_f
        g_alpha = jnp.where(take, t_before * g_feat - behind / (1.0 - a), 0.0)
        unclamped = take & (raw <= ALPHA_MAX)
        g_sigma = jnp.where(unclamped, -raw * g_alpha, 0.0)
        g_dx, g_dy = g_sigma * dx, g_sigma * dy
        # Sums over the tile's pixels as [1, B] rows (ones @ x.T on the MXU): the block's gradient rows.
        ones = jnp.ones((8, TILE_PIXELS), dtype)
        s_dx, s_dy, s_dxdx, s_dxdy, s_dydy, s_vis = (
            _dot_nt(ones, x)[:1]
            for x in (g_dx, g_dy, g_dx * dx, g_dx * dy, g_dy * dy, jnp.where(unclamped, vis * g_alpha, 0.0))
        )
        g_feats = _dot_nt(g_acc, weight)  # [4, B]
        rows = [
            rec[CA : CA + 1] * s_dx + rec[CB : CB + 1] * s_dy,
            rec[CB : CB + 1] * s_dx + rec[CC : CC + 1] * s_dy,
            0.5 * s_dxdx,
            s_dxdy,
            0.5 * s_dydy,
            s_vis,
        ]
        for f, value in enumerate(rows):
            gbuf[slot, f : f + 1, :] = value
        gbuf[slot, FEATURES:, :] = g_feats
        write(k, slot).start()
        return (
            suffix_row + jnp.sum(log_keep, axis=0, keepdims=True),
            behind_row + jnp.sum(weighted, axis=0, keepdims=True),
        )

    zeros = jnp.zeros((1, TILE_PIXELS), dtype)
    jax.lax.fori_loop(0, walk, body, (zeros, g_base_ref[...]))

    # Drain: the last two block writes and every zero write.
    @pl.when(walk >= 1)
    def _():
        write(0, _rem(walk - 1, 2)).wait()

    @pl.when(walk >= 2)
    def _():
        write(1, _rem(walk, 2)).wait()

    jax.lax.fori_loop(walk, n_blocks, lambda k, c: (zero_copy(k).wait(), c)[1], 0)


def _row_spec(rows):
    return pl.BlockSpec((None, None, rows, TILE_PIXELS), lambda c, t, *_: (c, t, 0, 0))


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _forward(records, tile_start, tile_end, tiles_x, interpret=None):
    """acc [C,T,4,256] (background not included), T_final [C,T,1,256], last contributing slot [C,T,1,256].
    `interpret`: None picks TPU interpret mode off a TPU; False forces the Mosaic lowering."""
    num_cams, num_fields, _ = records.shape
    n_tiles = tile_start.shape[1]
    dtype = records.dtype
    pixels = (num_cams, n_tiles, 1, TILE_PIXELS)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_cams, n_tiles),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_row_spec(NUM_FEATURES), _row_spec(1), _row_spec(1)],
        scratch_shapes=[pltpu.VMEM((2, num_fields, BLOCK), dtype), pltpu.SemaphoreType.DMA((2,))],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, tiles_x=tiles_x, n_tiles=n_tiles, block=BLOCK),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((num_cams, n_tiles, NUM_FEATURES, TILE_PIXELS), dtype),
            jax.ShapeDtypeStruct(pixels, dtype),
            jax.ShapeDtypeStruct(pixels, jnp.int32),
        ],
        compiler_params=_params(),
        interpret=_interpret_mode(interpret, dtype),
        name="gaussian_composite_fwd_tpu",
    )(tile_start.reshape(-1), tile_end.reshape(-1), records)


def _backward(records, tile_start, tile_end, trans, last, g_acc, g_base, tiles_x, interpret=None):
    """Per-pair gradients [C, 10, P] from the output gradient of acc [C,T,4,256] and g_base = T_final x (the
    gradient of T_final plus the background's share) [C,T,1,256]."""
    num_cams, num_fields, _ = records.shape
    n_tiles = tile_start.shape[1]
    dtype = records.dtype
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_cams, n_tiles),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), _row_spec(1), _row_spec(1), _row_spec(NUM_FEATURES), _row_spec(1)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[
            pltpu.VMEM((2, num_fields, BLOCK), dtype),
            pltpu.VMEM((2, num_fields, BLOCK), dtype),
            pltpu.VMEM((num_fields, BLOCK), dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA,
        ],
    )
    return pl.pallas_call(
        functools.partial(_backward_kernel, tiles_x=tiles_x, n_tiles=n_tiles, block=BLOCK),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(records.shape, dtype),
        compiler_params=_params(),
        interpret=_interpret_mode(interpret, dtype),
        name="gaussian_composite_bwd_tpu",
    )(tile_start.reshape(-1), tile_end.reshape(-1), records, trans, last, g_acc, g_base)


def _blend(acc, trans, background):
    """[C,T,256,4] output with the background behind, and T_final [C,T,256]."""
    trans = trans[:, :, 0]
    return jnp.swapaxes(acc, 2, 3) + trans[..., None] * background, trans


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def composite_tiles(records, tile_start, tile_end, background, tiles_x):
    """As `kernels.reference.composite_tiles` (records field-major [C, 10, P], tile ranges aligned to BLOCK):
    out [C,T,256,4] (background included), T_final [C,T,256]."""
    acc, trans, _ = _forward(records, tile_start, tile_end, tiles_x)
    return _blend(acc, trans, background)


def _composite_fwd(records, tile_start, tile_end, background, tiles_x):
    acc, trans, last = _forward(records, tile_start, tile_end, tiles_x)
    return _blend(acc, trans, background), (records, tile_start, tile_end, background, trans, last)


def _composite_bwd(tiles_x, residuals, cotangents):
    records, tile_start, tile_end, background, trans, last = residuals
    g_out, g_trans = cotangents
    trans_final = trans[:, :, 0]
    # out = acc + T_final * background: T_final's gradient gains the background's share.
    g_base = trans_final * (g_trans + jnp.sum(g_out * background, axis=-1))
    g_records = _backward(
        records, tile_start, tile_end, trans, last, jnp.swapaxes(g_out, 2, 3), g_base[:, :, None], tiles_x
    )
    g_background = jnp.sum(g_out * trans_final[..., None], axis=(0, 1, 2))
    return g_records, None, None, g_background


composite_tiles.defvjp(_composite_fwd, _composite_bwd)
