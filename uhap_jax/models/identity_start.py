"""Where personalisation starts: the video's frames encoded (code and head pose per frame), and the identity before
the fine-tune, from a neutral scan, or the average identity (`models.population`) with the albedo read off the
video.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import monocular
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.population import AlbedoPopulation
from uhap_jax.models.prior import UHAP

logger = logging.getLogger(__name__)


def encode_video(encoder: MonoEncoder, video: monocular.MonoVideo, batch_size: int) -> tuple[np.ndarray, ...]:
    """The MonoEncoder's code [F, z_dim], rotation vector and translation [F, 3] of every frame.

    With per-frame cameras (a video file's), each frame is encoded in its own, and its head translation moved into
    `video.camera`'s world: they share its orientation, so the head's place in front of the camera is kept.
    """
    graphdef, state = nnx.split(encoder)
    run = _encode_fn(graphdef)
    count = len(video.images)
    reference = video.camera.world_to_cam.astype(np.float32)
    frame_views = video.frame_world_to_cam
    views = np.broadcast_to(reference, (count, 4, 4)) if frame_views is None else frame_views.astype(np.float32)
    ks = np.broadcast_to(video.camera.intrinsics.astype(np.float32), (batch_size, 3, 3))
    outputs = []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), count - 1)
        outputs.append(jax.device_get(run(state, video.images[index].astype(np.float32), views[index], ks)))
    codes, rotation, translation = (np.concatenate([o[i] for o in outputs])[:count] for i in range(3))
    if frame_views is not None:  # R x + t_i = R (x + R^T (t_i - t_ref)) + t_ref
        translation = translation + (frame_views[:, :3, 3] - reference[:3, 3]) @ reference[:3, :3]
    return codes, rotation, translation.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef: nnx.GraphDef) -> Callable:
    """The jitted MonoEncoder of a graph: every video (the personalise and benchmark stages' identities, a
    personalisation resumed for its evaluation) reuses its compilation."""
    return jax.jit(lambda state, images, views, ks: nnx.merge(graphdef, state)(images / 255.0, views, ks))


@functools.lru_cache(maxsize=8)
def _render_fn(graphdef: nnx.GraphDef) -> Callable:
    """The jitted render of a prior's graph (cameras as arguments), compiled once per shape and capacity."""

    def render(state, gaussians, views, ks, width: int, height: int, capacity: int):
        return nnx.merge(graphdef, state).render(gaussians, views, ks, width=width, height=height, capacity=capacity)

    return jax.jit(render, static_argnums=(4, 5, 6))


def texel_regions(prior: UHAP, template: template_lib.Template) -> np.ndarray:
    """Each Gaussian's template region id (of its texel's nearest face vertex)."""
    nearest_vertex = template.faces[prior.layout.face_ids, np.argmax(prior.layout.barys, axis=1)]
    return template.region_ids[nearest_vertex]


def template_maps(prior: UHAP, template: template_lib.Template, albedo: float = 0.5) -> np.ndarray:
    """The template itself as a neutral scan: no geometry offset, a flat albedo."""
    colours = np.full(template.vertices.shape, albedo, np.float32)
    return scan_uv_maps(prior.layout, template, template.vertices, colours, "the template")


def video_albedo(prior: UHAP, template: template_lib.Template, video: monocular.MonoVideo, codes: np.ndarray,
                 rotation: np.ndarray, translation: np.ndarray, maps: np.ndarray, config: ml_collections.ConfigDict,
                 population: AlbedoPopulation | None = None) -> np.ndarray:  # fmt: skip
    """`maps` with the albedo read off the video. Each Gaussian's colour is its mean over the frames where it is
    the visible surface (its depth within `depth_tolerance` of the rendered depth, inside the mask), read for those
    seen in at least `min_seen` of them. With a `population`, the albedo is its MAP estimate given those texels
    (weighted by how often each was seen) and per-region colour offsets (`AlbedoPopulation.posterior`); without,
    the texels read keep their colour and the others take the mean of the texels read in their region (this
    person's skin, hair, lips), or of all of them where a region is never seen.

    Held-out-view PSNR on the tiny data (template geometry, before any fine-tune): 28.25 dB with the regions'
    means, 28.98 with the population (the mouth interior, teeth and eyeballs, rarely seen, come out right).
    Tried and dropped: mirror images for unseen texels (no gain).
    """
    count = min(config.albedo.frames, len(video.images))
    index = np.linspace(0, len(video.images) - 1, count).round().astype(int)
    scans = np.broadcast_to(maps, (count, *maps.shape))
    posed = prior.decode(codes[index], scans, rotation[index], translation[index])
    views = np.broadcast_to(video.camera.world_to_cam.astype(np.float32), (count, 1, 4, 4))
    ks = np.broadcast_to(video.camera.intrinsics.astype(np.float32), (count, 1, 3, 3))
    height, width = video.images.shape[1:3]
    capacity = prior.capacity_for(posed, views, ks, width=width, height=height)  # exact: one render, no growth
    graphdef, state = nnx.split(prior)
    out = jax.device_get(_render_fn(graphdef)(state, posed, views, ks, width, height, capacity))
    alpha, depth = out.alpha[:, 0], out.depth[:, 0] / np.maximum(out.alpha[:, 0], 1e-6)
    world_to_cam, k = video.camera.world_to_cam, video.camera.intrinsics
    cam = np.asarray(posed.means) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]  # [K, N, 3]
    z = np.maximum(cam[..., 2], 1e-6)
    col = np.floor(k[0, 0] * cam[..., 0] / z + k[0, 2]).astype(int)
    row = np.floor(k[1, 1] * cam[..., 1] / z + k[1, 2]).astype(int)
    inside = (cam[..., 2] > 0.01) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
    frame = np.arange(count)[:, None]
    seen = inside & (alpha[frame, row, col] > 0.5) & (video.masks[index][frame, row, col] > 127)
    seen &= cam[..., 2] <= depth[frame, row, col] + config.albedo.depth_tolerance
    colours = video.images[index][frame, row, col].astype(np.float32) / 255.0  # [K, N, 3]
    hits = seen.sum(0)
    read = np.einsum("kn,knc->nc", seen.astype(np.float32), colours) / np.maximum(hits, 1)[:, None]
    known = hits >= max(1, config.albedo.min_seen * count)
    if not known.any():
        logger.warning("albedo: the video shows no Gaussian often enough; keeping the start's albedo")
        return maps
    if population is not None:
        albedo = population.posterior(
            read,
            np.where(known, hits / count, 0.0),
            config.albedo.population_noise,
            texel_regions(prior, template),
            config.albedo.region_variance,
        )
    else:
        albedo = read.copy()
        regions = texel_regions(prior, template)
        for region in np.unique(regions):
            members = regions == region
            fill = read[members & known].mean(0) if (members & known).any() else read[known].mean(0)
            albedo[members & ~known] = fill
    logger.info("albedo: %d of %d Gaussians read off %d frames", int(known.sum()), len(known), count)
    updated = np.array(maps, np.float32)
    updated[prior.layout.texel_yx[:, 0], prior.layout.texel_yx[:, 1], 3:] = albedo
    return updated


def identity_maps(prior: UHAP, template: template_lib.Template, scan, population: AlbedoPopulation | None,
                  ) -> np.ndarray:  # fmt: skip
    """The identity before the video is read: the scan's UV maps, else the population's average identity (its
    mean scan offset and albedo; the bare template where the population has no offset, a flat grey albedo
    without a population)."""
    if scan is not None:
        vertices, _, colours, source = scan
        logger.info("identity: starting from the neutral scan %s", source)
        return scan_uv_maps(prior.layout, template, vertices, colours, source)
    maps = template_maps(prior, template)
    rows, cols = prior.layout.texel_yx[:, 0], prior.layout.texel_yx[:, 1]
    if population is not None:
        maps[rows, cols, 3:] = population.mean
        if population.mean_offset is not None:
            maps[rows, cols, :3] = population.mean_offset
    return maps
