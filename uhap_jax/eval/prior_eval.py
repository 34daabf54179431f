"""The prior stage's evaluation: held-out-view PSNR/SSIM, neutral-scan Chamfer and tracked-mesh distance.

`eval/psnr` and `eval/ssim` render the held-out cameras from an expression code that the encoder took from
held-in views of the same frame (`eval/psnr_gain_fitted`, a diagnostic: the same after a per-image colour gain
fitted to the ground truth, which no model can know for an unseen camera); `eval/scan_chamfer` (mm, symmetric
mean distance) compares each training identity's decoded neutral (z = 0, no head pose) with its neutral scan;
where the sequences have tracked meshes (`vertices.npy`), `eval/tracked_mm` is the mean distance of the decoded
Gaussians to the tracked surface at their texels. The prior stage calls it; so do `uhap eval` and sweeps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import measured_gaussian_ids
from uhap_jax.models import image_metrics, losses
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import encoder_geometry, frame_targets, render_fitting

IMAGE_FRAMES = 2  # frames of the first eval batch whose held-out views go into `Evaluator.images`


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fixed frames: held-in views for the encoder, held-out views to score, and the neutral-scan subjects."""

    encoder_images: np.ndarray  # [E, V, H, W, 3] uint8
    target_images: np.ndarray  # [E, Vo, H, W, 3] uint8
    target_masks: np.ndarray  # [E, Vo, H, W] uint8
    world_to_cam: np.ndarray  # [E, Vo, 4, 4] held-out cameras
    intrinsics: np.ndarray  # [E, Vo, 3, 3]
    rows: dict  # dataset_lib.SubjectTables.rows of the frames
    scan_subjects: np.ndarray  # subject ids of the training identities

    def probe(self, count: int) -> dict:
        """The first `count` frames, their held-out views as the images: a batch to size the pair capacity."""
        return {"images": self.target_images[:count], "world_to_cam": self.world_to_cam[:count],
                "intrinsics": self.intrinsics[:count], **{k: v[:count] for k, v in self.rows.items()}}  # fmt: skip


def build_eval_set(records: loaders.FrameRecords, split: dataset_lib.Split, tables: dataset_lib.SubjectTables,
                   config: ml_collections.ConfigDict) -> EvalSet:  # fmt: skip
    """`eval.num_frames` training frames spread evenly, each with random held-in and all held-out views."""
    count = config.eval.num_frames - config.eval.num_frames % config.eval.batch_size
    if count <= 0:
        raise ValueError(
            f"eval.num_frames {config.eval.num_frames} must be >= eval.batch_size {config.eval.batch_size}"
        )
    chosen = split.train_records[np.linspace(0, len(split.train_records) - 1, count).round().astype(int)]
    rng = np.random.default_rng(config.train.seed)
    encoder = loaders.SampleViews(config.data.num_views, tuple(split.held_in_cameras))
    held_out = loaders.SampleViews(len(split.held_out_cameras), tuple(split.held_out_cameras))
    frames = [records.source[int(i)] for i in chosen]
    inputs = [encoder.random_map(r, rng) for r in frames]
    targets = [held_out.random_map(r, rng) for r in frames]
    stack = lambda items, key: np.stack([item[key] for item in items])  # noqa: E731
    subject_ids = sorted({row["subject_id"] for row in records.sequences if row["subject"] in split.train_subjects})
    return EvalSet(
        stack(inputs, "images"), stack(targets, "images"), stack(targets, "masks"),
        stack(targets, "world_to_cam"), stack(targets, "intrinsics"),
        tables.rows(stack(inputs, "subject_id"), stack(inputs, "sequence_id"), stack(inputs, "frame_index")),
        np.asarray(subject_ids, np.int32),
    )  # fmt: skip


def _render_frames(model: UHAP, batch: dict, world_to_cam, intrinsics, width: int, height: int, capacity: int):
    """Frames decoded from the posterior mean of their encoder views, rendered into other cameras."""
    mean, _ = model.encode_expression(batch["encoder_images"].astype(jnp.float32) / 255.0,
                                      encoder_geometry(model, batch))  # fmt: skip
    posed = model.decode(mean, batch["scan_maps"], batch["head_rotation"], batch["head_translation"])
    return model.render(posed, world_to_cam, intrinsics, width=width, height=height, capacity=capacity), posed


class Evaluator:
    """Jitted eval of a model state on an EvalSet: held-out-view PSNR/SSIM and the neutral-scan Chamfer."""

    def __init__(self, eval_set: EvalSet, tables: dataset_lib.SubjectTables, capacity: kernels.AdaptiveCapacity,
                 config: ml_collections.ConfigDict):  # fmt: skip
        self.eval_set, self.tables, self.capacity = eval_set, tables, capacity
        self.batch_size = config.eval.batch_size
        self.scan_gaussians = config.loss.scan_gaussians
        self.hair_shell = config.model.get("hair_shell", 0.0)
        self.template_resolution = config.model.template_resolution
        self._views = jax.jit(self._score_views, static_argnums=(0, 1))
        self._scan = jax.jit(self._scan_chamfer, static_argnums=0)
        self.images: dict[str, np.ndarray] = {}  # the last call's held-out renders | truth | error (uint8)

    @staticmethod
    def _score_views(capacity: int, graphdef, state, batch: dict) -> dict[str, jax.Array]:
        height, width = batch["target_images"].shape[2:4]
        rendered, posed = _render_frames(nnx.merge(graphdef, state), batch, batch["world_to_cam"],
                                         batch["intrinsics"], width, height, capacity)  # fmt: skip
        _, masks, target = frame_targets({"images": batch["target_images"], "masks": batch["target_masks"]})
        render = jnp.clip(rendered.rgb, 0.0, 1.0)
        scores = {"psnr": image_metrics.psnr(render, target), "ssim": image_metrics.ssim(render, target),
                  "psnr_gain_fitted": image_metrics.psnr(jnp.clip(image_metrics.gain_fitted(render, target), 0, 1),
                                                         target),
                  "n_pairs": jnp.max(rendered.stats.n_pairs),
                  "render": render[:IMAGE_FRAMES], "target": target[:IMAGE_FRAMES]}  # fmt: skip
        if "tracked_points" in batch:
            distance = jnp.linalg.norm(posed.means - batch["tracked_points"], axis=-1)
            scores["tracked_mm"] = 1e3 * jnp.mean(distance, axis=-1)
            scores["tracked_valid"] = batch["tracked_valid"]
        return scores

    def _scan_chamfer(self, graphdef, state, scan_maps, scan_points) -> jax.Array:
        model = nnx.merge(graphdef, state)
        zeros = jnp.zeros((scan_maps.shape[0], 3))
        neutral = model.decode(jnp.zeros((scan_maps.shape[0], model.z_dim)), scan_maps, zeros, zeros)
        points = neutral.head_means
        if self.hair_shell > 0:  # as in the loss: the hair shell stands off the scanned skull
            template = template_lib.procedural_head(self.template_resolution)
            points = points[:, measured_gaussian_ids(model.layout, template, self.hair_shell)]
        if self.scan_gaussians < points.shape[1]:
            points = points[:, np.random.default_rng(0).choice(points.shape[1], self.scan_gaussians, replace=False)]
        return 1e3 * losses.chamfer(points, scan_points, squared=False)

    def __call__(self, model: UHAP) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        e = self.eval_set
        parts = []
        for start in range(0, len(e.encoder_images), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = {
                "encoder_images": e.encoder_images[part], "target_images": e.target_images[part],
                "target_masks": e.target_masks[part], "world_to_cam": e.world_to_cam[part],
                "intrinsics": e.intrinsics[part], **{k: v[part] for k, v in e.rows.items()},
            }  # fmt: skip
            views = lambda capacity, batch=batch: jax.device_get(self._views(capacity, graphdef, state, batch))  # noqa: E731
            scores = render_fitting(views, self.capacity, lambda scores: int(scores["n_pairs"]))
            render, target = scores.pop("render"), scores.pop("target")
            if not parts:  # the first frames' held-out views, as `images` for the trainer to write
                flat = lambda x: x.reshape(-1, *x.shape[-3:])  # noqa: E731
                self.images = {"heldout_render_gt_error": image_metrics.image_grid(flat(render), flat(target))}
            parts.append({k: v for k, v in scores.items() if k != "n_pairs"})
        scores = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
        subjects = e.scan_subjects
        chamfer = self._scan(graphdef, state, self.tables.scan_maps[subjects], self.tables.scan_points[subjects])
        metrics = {
            "eval/psnr": float(np.mean(scores["psnr"])),
            "eval/ssim": float(np.mean(scores["ssim"])),
            "eval/psnr_gain_fitted": float(np.mean(scores["psnr_gain_fitted"])),
            "eval/scan_chamfer": float(np.mean(chamfer)),
        }
        if "tracked_mm" in scores and scores["tracked_valid"].sum() > 0:
            valid = scores["tracked_valid"]
            metrics["eval/tracked_mm"] = float(np.sum(scores["tracked_mm"] * valid) / valid.sum())
        return metrics
