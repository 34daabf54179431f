"""The prior stage: data (capture layout -> records -> grain), the UHAP model, its loss, the Trainer, and eval.

Training frames are the `train`-split sequences of the training identities, seen by the held-in cameras
(`dataset.json`). Every `eval.every` steps, and at the end, `uhap_jax.eval.prior_eval` evaluates the model
(held-out-view PSNR/SSIM, neutral-scan Chamfer, tracked-mesh distance) and rows go into `<workdir>/metrics.jsonl`.

Tracked meshes, when a capture has them (the synthetic data and Multiface do), also supervise training
(`loss.tracked_mesh`): the decoded, posed Gaussians are pulled to the tracked surface point of their texel.
This is what makes the expression code carry the mouth's motion at small image sizes, where a few pixels of
lip movement hardly change the photometric loss; the speech model learns these codes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.eval import prior_eval
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import expression_gaussian_ids, lip_gaussian_ids, measured_gaussian_ids
from uhap_jax.models import image_metrics, losses
from uhap_jax.models.population import POPULATION_FILE, AlbedoPopulation
from uhap_jax.models.prior import UHAP, build_prior
from uhap_jax.models.render import decode_frames, encoder_geometry, frame_targets, initial_capacity
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh
from uhap_jax.train.optimizer import make_optimizer
from uhap_jax.train.sharding import place

logger = logging.getLogger(__name__)

_DROPPED_FIELDS = ("audio", "audio_valid")  # the prior does not listen


# ------------------------------------------------------------------------------------- data


class PriorBatches(dataset_lib.GatheredBatches):
    """The multi-view loader's global batches plus each example's scan and head pose, gathered on device."""

    def __init__(self, inner: loaders.GlobalBatchIterator, tables: dataset_lib.SubjectTables, mesh: jax.sharding.Mesh):
        replicated = NamedSharding(mesh, PartitionSpec())
        fields = {f.name: getattr(tables, f.name) for f in dataclasses.fields(dataset_lib.SubjectTables)}
        placed = dataset_lib.SubjectTables(**place(fields, jax.tree.map(lambda _: replicated, fields)))
        super().__init__(inner, placed, batch_sharding(mesh))

    def _attach(self, tables: dataset_lib.SubjectTables, batch: dict) -> dict:
        rows = tables.rows(batch["subject_id"], batch["sequence_id"], batch["frame_index"])
        return {k: v for k, v in batch.items() if k not in _DROPPED_FIELDS} | rows


# ------------------------------------------------------------------------------------- loss


def make_loss_fn(config: ml_collections.ConfigDict, capacity: kernels.AdaptiveCapacity,
                 lpips: losses.LPIPS | None = None):  # fmt: skip
    """`loss_fn(model, batch, rng) -> (loss, aux)` for the Trainer; `capacity.value` is read when traced."""
    weights = config.loss
    if weights.scan_metric not in ("chamfer", "point_to_plane"):
        raise ValueError(f"loss.scan_metric must be 'chamfer' or 'point_to_plane', got {weights.scan_metric!r}")
    # The lips are ~1.5% of the Gaussians: in the mean over all of them their motion is lost (the decoded lips
    # moved 1-3 mm² where the tracked ones move 30-40), so they get a term of their own.
    tracked_lips = weights.get("tracked_lips", 0.0) > 0 and weights.get("tracked_mesh", 0.0) > 0
    scope = weights.get("tracked_mesh_scope", "all")
    if scope not in ("all", "expression"):
        raise ValueError(f"loss.tracked_mesh_scope must be 'all' or 'expression', got {scope!r}")
    tracked_target = weights.get("tracked_target", "position")
    if tracked_target not in ("position", "motion"):
        raise ValueError(f"loss.tracked_target must be 'position' or 'motion', got {tracked_target!r}")
    hair_shell = config.model.get("hair_shell", 0.0)
    uses_template = tracked_lips or hair_shell > 0 or (scope == "expression" and weights.get("tracked_mesh", 0.0) > 0)
    template = template_lib.procedural_head(config.model.template_resolution) if uses_template else None

    def loss_fn(model: UHAP, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        images, masks, target = frame_targets(batch)
        batch_size, _, height, width, _ = images.shape
        noise_key, subset_key, drop_key = jax.random.split(rng, 3)
        geometry = encoder_geometry(model, batch)
        if geometry is not None:  # some frames encode from images alone, so that the image path learns too
            keep = jax.random.bernoulli(drop_key, 1.0 - config.model.geometry_dropout, (batch_size,))
            geometry = geometry * keep[:, None, None, None]
        # The encoder sees its own views (data.encoder_views), drawn apart from the rendered ones: a code that can
        # name the rendered cameras lets the decoder fit them, and held-out cameras fall as training goes on.
        encoder_images = batch["encoder_images"].astype(jnp.float32) / 255.0 if "encoder_images" in batch else images
        mean, log_var = model.encode_expression(encoder_images, geometry)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(noise_key, mean.shape)
        posed, neutral = decode_frames(model, batch, z)
        rendered = model.render(posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height,
                                capacity=capacity.value)  # fmt: skip
        rgb = model.camera_response(rendered.rgb, batch["camera_index"])
        pixel_weight = masks + weights.background_weight * (1.0 - masks)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        terms = {
            "l1": losses.masked_l1(rgb, target, pixel_weight),
            "ssim": losses.ssim_loss(flat(rgb), flat(target)),
            "silhouette": jnp.mean(jnp.abs(rendered.alpha - masks)),
            "kl": losses.kl_divergence(mean, log_var),
            "offset": losses.offset_regularizer(posed.offsets),
            "scale": losses.scale_regularizer(posed.scales, weights.max_scale),
            "normal_tilt": jnp.mean(posed.normal_tilt),
            "view_colour": losses.view_colour_spread(model.colours(posed, batch["world_to_cam"])),
        }
        measured = measured_gaussian_ids(model.layout, template, hair_shell) if hair_shell > 0 else None
        num_measured = neutral.head_means.shape[1] if measured is None else len(measured)
        subset = (
            jax.random.choice(subset_key, num_measured, (weights.scan_gaussians,), replace=False)
            if weights.scan_gaussians < num_measured
            else jnp.arange(num_measured)
        )
        if measured is not None:  # the hair shell's Gaussians stand off the scanned skull
            subset = jnp.asarray(measured)[subset]
        points = neutral.head_means[:, subset]
        if weights.scan_metric == "chamfer":
            terms["scan"] = jnp.mean(losses.chamfer(points, batch["scan_points"]))
        else:
            terms["scan"] = jnp.mean(losses.point_to_plane(points, batch["scan_points"], batch["scan_normals"]))
        neutral_colours = jnp.mean(model.colours(neutral, batch["world_to_cam"]), axis=1)[:, subset]
        terms["albedo"] = jnp.mean(
            losses.albedo_l1(points, neutral_colours, batch["scan_points"], batch["scan_colours"])
        )
        if "tracked_points" in batch:
            moving = slice(None) if measured is None else measured
            if scope == "expression":
                moving = expression_gaussian_ids(model.layout, template)
            decoded, tracked = posed.means, batch["tracked_points"]
            if tracked_target == "motion":  # displacements from the rest shape, in head space: blind to a static offset
                decoded = posed.head_means - neutral.head_means
                tracked = jnp.einsum("bji,bnj->bni", posed.head_rotation,
                                     tracked - posed.head_translation[:, None]) - batch["tracked_rest"]  # fmt: skip
            valid = batch["tracked_valid"]
            terms["tracked_mesh"] = losses.tracked_mesh_loss(decoded[:, moving], tracked[:, moving], valid)
            lips = _lip_ids(model.layout, template) if tracked_lips else None
            if lips is not None:
                terms["tracked_lips"] = losses.tracked_mesh_loss(decoded[:, lips], tracked[:, lips], valid)
        if lpips is not None:
            terms["lpips"] = jnp.mean(lpips(flat(rgb), flat(target)))
        if model.camera_log_gains is not None:  # the average camera is the colour reference
            terms["camera_gain"] = jnp.mean(model.camera_log_gains[...] ** 2)
        loss = sum(weights.get(name, 0.0) * value for name, value in terms.items())  # older configs lack new terms
        aux = dict(terms)
        aux["psnr"] = jnp.mean(image_metrics.psnr(jnp.clip(rgb, 0.0, 1.0), target))
        # The KL's two parts, and the posterior's extremes: which one a KL spike comes from.
        aux["kl_mean"] = 0.5 * jnp.mean(jnp.sum(mean**2, axis=-1))
        aux["code_abs_max"] = jnp.max(jnp.abs(mean))
        aux["code_log_var_max"] = jnp.max(log_var)
        aux["code_log_var_min"] = jnp.min(log_var)
        aux["raster_overflow"] = jnp.any(rendered.stats.overflow).astype(jnp.float32)
        aux["raster_pairs"] = jnp.max(rendered.stats.n_pairs).astype(jnp.float32)
        return loss, aux

    return loss_fn


def _lip_ids(texels, template: template_lib.Template):
    """The lips' Gaussians (numpy, at trace time), or None with one warning when the UV layout has none."""
    try:
        return lip_gaussian_ids(texels, template)
    except ValueError:
        logger.warning("loss.tracked_lips is off: no Gaussian of the %d² UV layout lies on the lips (a larger "
                       "model.uv_resolution turns it on; --config.loss.tracked_lips=0 silences this)",
                       texels.resolution)  # fmt: skip
        return None


def make_image_fn(capacity: kernels.AdaptiveCapacity):
    """Trainer image grids: the first frame's views, rendered from its posterior mean, against the target."""

    @functools.partial(nnx.jit, static_argnames="slots")
    def grid(model: UHAP, batch: dict, slots: int) -> tuple[jax.Array, jax.Array]:
        images, _, target = frame_targets(batch)
        mean, _ = model.encode_expression(images[:1])
        posed, _ = decode_frames(model, jax.tree.map(lambda x: x[:1], batch), mean)
        height, width = images.shape[2:4]
        rendered = model.render(posed, batch["world_to_cam"][:1], batch["intrinsics"][:1], width=width,
                                height=height, capacity=slots)  # fmt: skip
        return jnp.clip(rendered.rgb[0], 0.0, 1.0), target[0]

    return lambda model, batch: grid(model, batch, capacity.value)


# ------------------------------------------------------------------------------------- the stage


def write_population(workdir: Path, model: UHAP, records: loaders.FrameRecords, split: dataset_lib.Split,
                     tables: dataset_lib.SubjectTables) -> None:  # fmt: skip
    """The training identities' albedo population and mean scan offset (`population.POPULATION_FILE`), for
    personalisation."""
    if jax.process_index() != 0:
        return
    ids = sorted({row["subject_id"] for row in records.sequences if row["subject"] in split.train_subjects})
    rows, cols = model.layout.texel_yx[:, 0], model.layout.texel_yx[:, 1]
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / f".{POPULATION_FILE}.partial.npz"
    maps = tables.scan_maps[ids][:, rows, cols]
    AlbedoPopulation.fit(maps[..., 3:], offsets=maps[..., :3]).save(partial)
    partial.rename(workdir / POPULATION_FILE)


def train_prior(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the prior in `workdir`; returns the Trainer's result and the last eval metrics."""
    workdir = Path(workdir)
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    root = dataset_lib.dataset_root(config)
    records = dataset_lib.prepared_records(root, config)
    split = dataset_lib.read_split(root, records, config.data.num_views)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = build_prior(template, config)
    tables = dataset_lib.subject_tables(root, records, model.layout, template, config)
    options = dataset_lib.loader_options(config)
    train_records = dataset_lib.train_frames(records, split)
    frames = loaders.multiview_loader(
        train_records, batch_sharding(mesh), options, num_views=config.data.num_views, serials=split.held_in_cameras,
        encoder_views=dataset_lib.encoder_views(config),
    )  # fmt: skip
    data = PriorBatches(frames, tables, mesh)
    write_population(workdir, model, records, split, tables)
    eval_set = prior_eval.build_eval_set(records, split, tables, config)
    capacity = initial_capacity(
        model,
        eval_set.probe(config.eval.batch_size),
        config.render.capacity_headroom,
        config.render.capacity_shrink_after,
    )
    lpips = None
    if config.loss.lpips > 0 and config.loss.lpips_weights:
        lpips = losses.load_lpips(config.loss.lpips_weights)
    elif config.loss.lpips > 0:
        logger.info("loss.lpips_weights is empty: training without LPIPS")
    trainer = Trainer(
        config.train, model, make_optimizer(config), make_loss_fn(config, capacity, lpips), data, workdir,
        mesh=mesh, image_fn=make_image_fn(capacity), capacity=capacity,
    )  # fmt: skip
    evaluator = prior_eval.Evaluator(eval_set, tables, capacity, config)
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()
