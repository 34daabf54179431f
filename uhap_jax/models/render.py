"""Rendering the prior's avatars for training, evaluation and animation: batch targets, decoded frames, one-camera
views, and the one pair-capacity protocol (size from a probe, render, check the pair count, grow, re-render).

The rasterizer's pair capacity is static (one compilation per bucket); a render that needs more pairs than it has
returns NaN images and its true pair count. `sized_capacity` starts a `kernels.AdaptiveCapacity` from what some
frames need; `render_fitting` renders until the count fits, so no overflowed render is ever kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

import kernels
from uhap_jax.models.prior import UHAP, Gaussians

logger = logging.getLogger(__name__)

CAPACITY_HEADROOM = 1.25  # pair slots above the first frames' need, for mouths that open wider later
Rendering = TypeVar("Rendering")


def frame_targets(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, V, H, W, 3] in [0, 1], masks [B, V, H, W], and the foreground on black as the target."""
    images = batch["images"].astype(jnp.float32) / 255.0
    masks = batch["masks"].astype(jnp.float32) / 255.0
    return images, masks, images * masks[..., None]


def targets(images: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 images [..., H, W, 3] and masks [..., H, W] -> masks in [0, 1] and the foreground on black."""
    masks = masks.astype(jnp.float32) / 255.0
    return masks, images.astype(jnp.float32) / 255.0 * masks[..., None]


def encoder_geometry(model: UHAP, batch: dict) -> jax.Array | None:
    """The expression encoder's tracked-mesh input for a batch with `tracked_points` (else None: images only)."""
    if "tracked_points" not in batch:
        return None
    return model.expression_geometry(batch["tracked_points"], batch["tracked_valid"], batch["scan_maps"],
                                     batch["head_rotation"], batch["head_translation"])  # fmt: skip


def decode_frames(model: UHAP, batch: dict, z: jax.Array) -> tuple[Gaussians, Gaussians]:
    """The posed avatars of the batch's frames and their neutral (z = 0, no pose), decoded in one pass."""
    batch_size = z.shape[0]
    zeros = jnp.zeros_like(batch["head_rotation"])
    both = model.decode(
        jnp.concatenate([z, jnp.zeros_like(z)]),
        jnp.concatenate([batch["scan_maps"]] * 2),
        jnp.concatenate([batch["head_rotation"], zeros]),
        jnp.concatenate([batch["head_translation"], zeros]),
    )
    posed = jax.tree.map(lambda x: x[:batch_size], both)
    neutral = jax.tree.map(lambda x: x[batch_size:], both)
    return posed, neutral


def render_views(prior: UHAP, z, scan_maps, rotation, translation, world_to_cam, intrinsics, *, width: int,
                 height: int, capacity: int) -> kernels.Rendered:  # fmt: skip
    """Each frame's avatar (code, scan, pose) rendered into its one camera: images [B, H, W, 3]."""
    posed = prior.decode(z, scan_maps, rotation, translation)
    out = prior.render(posed, world_to_cam[:, None], intrinsics[:, None], width=width, height=height,
                       capacity=capacity)  # fmt: skip
    return jax.tree.map(lambda x: x[:, 0] if x.ndim > 1 else x, out)


def sized_capacity(model: UHAP, gaussians: Gaussians, world_to_cam: jax.Array, intrinsics: jax.Array, *, width: int,
                   height: int, headroom: float, shrink_after: int = 0) -> kernels.AdaptiveCapacity:  # fmt: skip
    """The pairs per camera that these Gaussians need in these cameras [B, V, ...], x `headroom`, bucketed; it
    grows by the same headroom (and shrinks, with `shrink_after`: `kernels.AdaptiveCapacity`)."""
    needed = model.capacity_for(gaussians, world_to_cam, intrinsics, width=width, height=height)
    return kernels.AdaptiveCapacity(int(needed * headroom), headroom, shrink_after)


def initial_capacity(model: UHAP, batch: dict, headroom: float, shrink_after: int = 0) -> kernels.AdaptiveCapacity:
    """The capacity that a multi-view probe batch needs with the model as it is (its posterior-mean codes)."""
    images = batch["images"]
    mean, _ = model.encode_expression(images.astype(jnp.float32) / 255.0)
    posed, _ = decode_frames(model, batch, mean)
    height, width = images.shape[2:4]
    return sized_capacity(model, posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height,
                          headroom=headroom, shrink_after=shrink_after)  # fmt: skip


def render_fitting(render: Callable[[int], Rendering], capacity: kernels.AdaptiveCapacity,
                   n_pairs: Callable[[Rendering], int]) -> Rendering:  # fmt: skip
    """`render(capacity.value)`, rendered again with a grown capacity while its largest per-camera pair count
    (`n_pairs(out)`) outgrows the capacity (x headroom): a render that overflowed is never returned."""
    out = render(capacity.value)
    while True:
        pairs, before = n_pairs(out), capacity.value
        if not capacity.grow(pairs):
            return out
        logger.info("a render needed %d pairs per camera: pair capacity %d -> %d (re-rendering)", pairs, before,
                    capacity.value)  # fmt: skip
        out = render(capacity.value)
