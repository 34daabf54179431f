"""What one prior train step costs: a full step (forward, backward, Adam) against the rasterizer alone
(`uhap bench train`)."""

from __future__ import annotations

import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import synth
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models.prior import UHAP, build_prior
from uhap_jax.models.render import decode_frames, initial_capacity
from uhap_jax.train import prior_stage
from uhap_jax.train.loop import Trainer
from uhap_jax.train.optimizer import make_optimizer


def synthetic_batch(config: ml_collections.ConfigDict, model: UHAP, template: template_lib.Template,
                    rng: np.random.Generator) -> dict:  # fmt: skip
    """A training batch of the config's shape with random images, the synthetic rig's cameras and the template
    as every neutral scan: what a step costs does not depend on what the pixels show."""
    synth_config = synth.synth_config(config.data.synth_preset)
    rig = synth.camera_rig(synth_config, rng)
    batch_size, views, size = config.data.batch_size, config.data.num_views, synth_config.image_size
    encoder_views = dataset_lib.encoder_views(config)
    albedo = rng.uniform(0.2, 0.8, template.vertices.shape).astype(np.float32)
    maps = scan_uv_maps(model.layout, template, template.vertices, albedo, "the template")
    points = dataset_lib.sample_scan(template.vertices, template.faces, albedo, config.loss.scan_points, rng)
    chosen = [rng.choice(len(rig), views, replace=False) for _ in range(batch_size)]
    tile = lambda x: np.broadcast_to(np.asarray(x, np.float32), (batch_size, *np.shape(x))).copy()  # noqa: E731
    return {
        "images": rng.integers(0, 256, (batch_size, views, size, size, 3), dtype=np.uint8),
        **({"encoder_images": rng.integers(0, 256, (batch_size, encoder_views, size, size, 3), np.uint8)}
           if encoder_views else {}),
        "masks": np.full((batch_size, views, size, size), 255, np.uint8),
        "world_to_cam": np.asarray([[rig[c].world_to_cam for c in row] for row in chosen], np.float32),
        "intrinsics": np.asarray([[rig[c].intrinsics for c in row] for row in chosen], np.float32),
        "camera_index": np.asarray(chosen, np.int32),
        "scan_maps": tile(maps), "scan_points": tile(points[0]), "scan_normals": tile(points[1]),
        "scan_colours": tile(points[2]),
        "head_rotation": rng.normal(0.0, 0.03, (batch_size, 3)).astype(np.float32),
        "head_translation": rng.normal(0.0, 0.002, (batch_size, 3)).astype(np.float32),
    }  # fmt: skip


def benchmark_step(config: ml_collections.ConfigDict, workdir: Path, *, repeats: int = 10) -> dict[str, float]:
    """Times one full train step (forward, backward, Adam) and, alone, the rasterizer's forward + backward on
    the same decoded Gaussians; their ratio estimates the rasterizer's share of the step."""
    rng = np.random.default_rng(config.train.seed)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = build_prior(template, config)
    batch = synthetic_batch(config, model, template, rng)
    capacity = initial_capacity(model, batch, config.render.capacity_headroom)
    size = batch["images"].shape[2]
    mean, _ = model.encode_expression(batch["images"].astype(np.float32) / 255.0)
    posed, _ = decode_frames(model, batch, mean)
    colours = model.colours(posed, batch["world_to_cam"])
    cotangent = jnp.asarray(rng.normal(size=(*batch["images"].shape[:2], size, size, 3)), jnp.float32)

    @jax.jit
    def raster_grads(means, quats, scales, opacities, colours):
        def image_loss(*gaussians):
            render = jax.vmap(lambda m, q, s, o, c, v, k: kernels.rasterize(
                m, q, s, o, c, v, k, width=size, height=size, capacity=capacity.value).rgb)  # fmt: skip
            return jnp.sum(render(*gaussians, batch["world_to_cam"], batch["intrinsics"]) * cotangent)

        return jax.grad(image_loss, argnums=(0, 1, 2, 3, 4))(means, quats, scales, opacities, colours)

    def timed(fn) -> float:
        jax.block_until_ready(fn())  # compile and warm up
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats

    raster_s = timed(lambda: raster_grads(posed.means, posed.quats, posed.scales, posed.opacities, colours))
    trainer = Trainer(config.train, model, make_optimizer(config), prior_stage.make_loss_fn(config, capacity),
                      iter(grain.MapDataset.range(1).to_iter_dataset()), workdir)  # fmt: skip
    step_s = timed(lambda: trainer.train_step(batch)["loss"])
    trainer.close()
    images = batch["images"].shape[0] * batch["images"].shape[1]
    return {
        "gaussians": model.layout.num_gaussians, "batch_frames": batch["images"].shape[0],
        "views": batch["images"].shape[1], "image_size": size, "step_ms": 1e3 * step_s,
        "images_per_s": images / step_s, "raster_fwd_bwd_ms": 1e3 * raster_s, "raster_share": raster_s / step_s,
    }  # fmt: skip
