"""The encoder stage: a MonoEncoder learns, from one view, the expression code and head pose of a frozen prior.

Training examples are frames of the `train`-split sequences of the training identities, each seen by one random
held-in camera. Targets: the prior's posterior mean from all held-in views of the same frame (its
ExpressionEncoder; computed once per prior checkpoint and cached in `<workdir>/expression_codes.npz`, as the
audio stage does) and the frame's head pose (meta.json `head_pose`). The loss is the code MSE (over the
training codes' variance), the pose error (degrees², mm²), and a photometric term: the encoder's z and pose,
decoded by the frozen prior with the subject's scan and rendered into the view the encoder saw, against the
image (masked L1) for the first `data.photo_frames` frames of a random `loss.photometric_fraction` of the steps
(rendering and its gradient are most of a step's cost on a CPU; the codes learn mostly from the code loss).
Besides, the first `data.turned_frames` frames of every step are rendered by the frozen prior with their head
turned further (`turns`), and the encoder learns their code and pose too: the rig's cameras are tens of
degrees apart, and a phone video's head turns fall between them.

Every `eval.every` steps, and at the end, rows go into `<workdir>/metrics.jsonl` for the held-out sentences of
the training identities (and, with a `_held_out_identity` suffix, the held-out identities' multi-view
sequences; with `_train`, training frames, in-sample): `eval/code_mse` beside `eval/code_mse_mean_baseline`
(always predicting the mean training code), `eval/rotation_error_deg` / `eval/translation_error_mm` beside the
zero-motion baseline, and `eval/photo_psnr`, the view re-rendered from the prediction, beside
`eval/photo_psnr_target`, the same from the prior's own code and the true pose (the best the encoder can reach
through this prior).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders
from kernels import binning
from uhap_jax import export
from uhap_jax.config_utils import apply_override, read_config
from uhap_jax.eval import image_metrics
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.models import losses
from uhap_jax.models.audio_to_latent import freeze
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.prior import UHAP
from uhap_jax.train import audio_stage, prior_stage
from uhap_jax.train.checkpoint import restore_latest
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh

logger = logging.getLogger(__name__)

CODES_FILE = "expression_codes.npz"
INFO_FILE = "encoder_info.json"
_DEG = 180.0 / np.pi
_MM = 1e3


# ------------------------------------------------------------------------------------- the prior and its data


def data_config(config: ml_collections.ConfigDict, prior_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The prior's config with the data fields that `config.data` sets (root, synth_preset, cache_dir)."""
    merged = ml_collections.ConfigDict(prior_cfg.to_dict())
    for field in ("root", "synth_preset", "cache_dir"):
        if config.data.get(field):
            apply_override(merged, f"data.{field}={config.data[field]}", source="the encoder config's data")
    return merged


def restore_frozen_prior(prior_workdir: str | Path, mesh) -> tuple[UHAP, ml_collections.ConfigDict, int]:
    """The prior of the latest checkpoint in `prior_workdir`, replicated on `mesh`, with its config and step."""
    if not prior_workdir:
        raise ValueError("the encoder stage needs a trained prior: pass --config.prior_workdir=<prior workdir>")
    return export.restore_prior(prior_workdir, mesh)


def code_targets(
    prior: UHAP, prior_step: int, prior_workdir: str | Path, root: Path, records: loaders.FrameRecords,
    tables: dataset_lib.SubjectTables, held_in: list[str], batch_size: int, cache: Path,
    keep: Callable[[dataset_lib.Sequence], bool] | None = None,
) -> tuple[list[dataset_lib.Sequence], np.ndarray]:  # fmt: skip
    """The coded sequences (those `keep` accepts), and per record the prior's code [num_records, z_dim] (zero for
    uncoded records). The codes are the audio stage's (`audio_stage.expression_codes`): one definition of them.
    """
    sequences = [s for s in dataset_lib.coded_sequences(root, records, held_in) if keep is None or keep(s)]
    digest = hashlib.sha256((root / layout.DATASET_FILE).read_bytes()).hexdigest()[:16]
    key = f"{Path(prior_workdir).resolve()}@{prior_step}|{root.resolve()}|{digest}|{','.join(held_in)}"
    sequences = audio_stage.expression_codes(
        prior=prior, records=records, tables=tables, sequences=sequences, held_in=held_in, batch_size=batch_size,
        cache=cache, key=key,
    )  # fmt: skip
    codes = np.zeros((len(records.source), prior.z_dim), np.float32)
    for s in sequences:
        codes[s.first_record : s.first_record + s.num_frames] = s.codes
    return sequences, codes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tables:
    """What the records do not hold, gathered per example on device: codes and pose per record, scans per subject."""

    codes: np.ndarray  # [num_records, z_dim]
    head_pose: np.ndarray  # [num_records, 6]
    first_record: np.ndarray  # [num_sequences]
    scan_maps: np.ndarray  # [num_subjects, R, R, 6]


class EncoderBatches(dataset_lib.GatheredBatches):
    """The multi-view loader's one-view batches, squeezed to [B, ...], with each frame's targets and scan."""

    def __init__(self, inner: loaders.GlobalBatchIterator, tables: Tables, mesh: jax.sharding.Mesh):
        replicated = NamedSharding(mesh, PartitionSpec())
        super().__init__(inner, jax.tree.map(lambda x: jax.device_put(x, replicated), tables), batch_sharding(mesh))

    @staticmethod
    def _attach(tables: Tables, batch: dict) -> dict:
        record = tables.first_record[batch["sequence_id"]] + batch["frame_index"]
        pose = tables.head_pose[record]
        return {
            "images": batch["images"][:, 0], "masks": batch["masks"][:, 0],
            "world_to_cam": batch["world_to_cam"][:, 0], "intrinsics": batch["intrinsics"][:, 0],
            "codes": tables.codes[record], "scan_maps": tables.scan_maps[batch["subject_id"]],
            "head_rotation": pose[:, :3], "head_translation": pose[:, 3:],
        }  # fmt: skip


# ------------------------------------------------------------------------------------- model and loss


class EncoderWithPrior(nnx.Module):
    """The MonoEncoder being trained beside the frozen prior that renders its predictions."""

    def __init__(self, encoder: MonoEncoder, prior: UHAP):
        freeze(prior)
        self.encoder = encoder
        self.prior = prior


def targets(images: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 images [..., H, W, 3] and masks [..., H, W] -> masks in [0, 1] and the foreground on black."""
    masks = masks.astype(jnp.float32) / 255.0
    return masks, images.astype(jnp.float32) / 255.0 * masks[..., None]


def render_views(prior: UHAP, z, scan_maps, rotation, translation, world_to_cam, intrinsics, *, width: int,
                 height: int, capacity: int) -> kernels.Rendered:  # fmt: skip
    """Each frame's avatar (code, scan, pose) rendered into its one camera: images [B, H, W, 3]."""
    posed = prior.decode(z, scan_maps, rotation, translation)
    out = prior.render(posed, world_to_cam[:, None], intrinsics[:, None], width=width, height=height,
                       capacity=capacity)  # fmt: skip
    return jax.tree.map(lambda x: x[:, 0] if x.ndim > 1 else x, out)


def turn_heads(rng: jax.Array, rotation: jax.Array, max_yaw_deg: float, max_pitch_deg: float) -> jax.Array:
    """Head rotation vectors [B, 3] turned further, about the vertical then the sideways axis, by uniform random
    angles within +-max_yaw_deg and +-max_pitch_deg."""
    angles = jax.random.uniform(rng, (rotation.shape[0], 2), minval=-1.0, maxval=1.0)
    angles = angles * jnp.deg2rad(jnp.array([max_yaw_deg, max_pitch_deg], jnp.float32))
    yaw = rotations.axis_angle_to_matrix(angles[:, :1] * jnp.array([0.0, 1.0, 0.0]))
    pitch = rotations.axis_angle_to_matrix(angles[:, 1:] * jnp.array([1.0, 0.0, 0.0]))
    return rotations.matrix_to_axis_angle(pitch @ yaw @ rotations.axis_angle_to_matrix(rotation))


def _pseudo_huber(squared: jax.Array, delta: float) -> jax.Array:
    """`squared` errors below delta**2 as they are, larger ones growing linearly in the error (2 delta |e|)."""
    return 2.0 * delta**2 * (jnp.sqrt(1.0 + squared / delta**2) - 1.0)


def make_loss_fn(config: ml_collections.ConfigDict, code_variance: float, capacity: kernels.AdaptiveCapacity):
    """`loss_fn(model, batch, rng)` for the Trainer: code MSE, pose error and the photometric term."""
    weights = config.loss
    photo_frames = min(config.data.photo_frames, config.data.batch_size)
    turned_frames = min(config.data.turned_frames, config.data.batch_size)

    def pose_and_code(model: EncoderWithPrior, images, batch: dict, codes, rotation, translation) -> dict:
        z, predicted, shift = model.encoder(images, batch["world_to_cam"], batch["intrinsics"])
        return {
            "code": jnp.mean((z - codes) ** 2) / code_variance,
            "rotation": jnp.mean(_pseudo_huber(jnp.sum((_DEG * (predicted - rotation)) ** 2, -1),
                                               weights.rotation_linear_deg)),  # fmt: skip
            "translation": jnp.mean(jnp.sum((_MM * (shift - translation)) ** 2, -1)),
        }, (z, predicted, shift)

    def loss_fn(model: EncoderWithPrior, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        images = batch["images"].astype(jnp.float32) / 255.0
        terms, (z, rotation, translation) = pose_and_code(
            model, images, batch, batch["codes"], batch["head_rotation"], batch["head_translation"]
        )
        photo_rng, turn_rng = jax.random.split(rng)
        aux = {}
        if weights.turned > 0 and turned_frames > 0:
            head = {key: value[:turned_frames] for key, value in batch.items()}
            turned_rotation = turn_heads(turn_rng, head["head_rotation"], config.turns.max_yaw_deg,
                                         config.turns.max_pitch_deg)  # fmt: skip
            rendered = render_views(model.prior, head["codes"], head["scan_maps"], turned_rotation,
                                    head["head_translation"], head["world_to_cam"], head["intrinsics"],
                                    width=images.shape[2], height=images.shape[1], capacity=capacity.value)  # fmt: skip
            seen = jax.lax.stop_gradient(jnp.clip(rendered.rgb, 0.0, 1.0))
            turned, _ = pose_and_code(model, seen, head, head["codes"], turned_rotation, head["head_translation"])
            terms["turned"] = sum(getattr(weights, name) * value for name, value in turned.items())
            aux = {"raster_overflow": jnp.any(rendered.stats.overflow).astype(jnp.float32),
                   "raster_pairs": jnp.max(rendered.stats.n_pairs).astype(jnp.float32)}  # fmt: skip
        if weights.photometric > 0 and photo_frames > 0:
            k = photo_frames
            height, width = images.shape[1:3]

            def photometric(_) -> tuple[jax.Array, ...]:
                rendered = render_views(model.prior, z[:k], batch["scan_maps"][:k], rotation[:k], translation[:k],
                                        batch["world_to_cam"][:k], batch["intrinsics"][:k], width=width,
                                        height=height, capacity=capacity.value)  # fmt: skip
                masks, target = targets(batch["images"][:k], batch["masks"][:k])
                l1 = losses.masked_l1(rendered.rgb, target, masks + weights.background_weight * (1.0 - masks))
                psnr = jnp.mean(image_metrics.psnr(jnp.clip(rendered.rgb, 0.0, 1.0), target))
                stats = rendered.stats
                return l1, psnr, jnp.any(stats.overflow).astype(jnp.float32), jnp.max(stats.n_pairs).astype(jnp.float32)

            if weights.photometric_fraction >= 1.0:
                rendered_now, photo = jnp.ones(()), photometric(None)
            else:  # only this random share of the steps pays for rendering (and its gradient)
                rendered_now = (jax.random.uniform(photo_rng) < weights.photometric_fraction).astype(jnp.float32)
                photo = jax.lax.cond(rendered_now > 0, photometric, lambda _: (jnp.zeros(()),) * 4, None)
            terms["photometric"] = photo[0]
            aux = {"photo_rendered": rendered_now, "photo_psnr": photo[1],
                   "raster_overflow": jnp.maximum(photo[2], aux.get("raster_overflow", 0.0)),
                   "raster_pairs": jnp.maximum(photo[3], aux.get("raster_pairs", 0.0))}  # fmt: skip
        loss = sum(getattr(weights, name) * value for name, value in terms.items())
        return loss, terms | aux

    return loss_fn


def probe_capacity(prior: UHAP, z, scan_maps, rotation, translation, world_to_cam, intrinsics, *, width: int,
                   height: int, headroom: float) -> kernels.AdaptiveCapacity:  # fmt: skip
    """The pair capacity that these frames need (each in its one camera), x `headroom`, bucketed."""
    posed = prior.decode(z, scan_maps, rotation, translation)
    needed = prior.capacity_for(posed, world_to_cam[:, None], intrinsics[:, None], width=width, height=height)
    return kernels.AdaptiveCapacity(int(needed * headroom), headroom)


def grow_capacity(capacity: kernels.AdaptiveCapacity, n_pairs: int) -> bool:
    """Make room for `n_pairs` (x headroom); True when it grew. Eval re-renders a batch that overflowed."""
    needed = int(n_pairs * capacity.headroom)
    if needed <= capacity.value:
        return False
    capacity.value = binning.bucket_capacity(needed)
    return True


# ------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvalFrames:
    """Fixed frames of one split, each seen by one held-in camera, with its targets."""

    split: str
    images: np.ndarray  # [E, H, W, 3] uint8
    masks: np.ndarray  # [E, H, W] uint8
    world_to_cam: np.ndarray  # [E, 4, 4]
    intrinsics: np.ndarray  # [E, 3, 3]
    codes: np.ndarray  # [E, z_dim]
    head_pose: np.ndarray  # [E, 6]
    scan_maps: np.ndarray  # [E, R, R, 6]


def build_eval_frames(records: loaders.FrameRecords, sequences: list[dataset_lib.Sequence], split: str,
                      held_in: list[str], tables: Tables, count: int, seed: int) -> EvalFrames | None:  # fmt: skip
    """`count` frames spread evenly over the split's sequences, each with a random held-in camera."""
    frames = [(s, f) for s in sequences if s.split == split for f in range(s.num_frames)]
    if not frames or count <= 0:
        return None
    rng = np.random.default_rng(seed)
    chosen = [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]
    views = []
    for s, f in chosen:
        record = records.source[s.first_record + f]
        views.append(loaders.SingleView(str(rng.choice(held_in))).map(record))
    stack = lambda key: np.stack([v[key] for v in views])  # noqa: E731
    index = np.asarray([s.first_record + f for s, f in chosen])
    return EvalFrames(
        split, stack("images"), stack("masks"), stack("world_to_cam"), stack("intrinsics"), tables.codes[index],
        tables.head_pose[index], tables.scan_maps[[s.subject_id for s, _ in chosen]],
    )  # fmt: skip


def rotation_error_deg(predicted: jax.Array, true: jax.Array) -> jax.Array:
    """Geodesic angle (degrees) between rotation vectors [..., 3]."""
    relative = jnp.swapaxes(rotations.axis_angle_to_matrix(predicted), -1, -2) @ rotations.axis_angle_to_matrix(true)
    quat = rotations.matrix_to_quaternion(relative)
    return _DEG * 2.0 * jnp.arctan2(jnp.linalg.norm(quat[..., 1:], axis=-1), jnp.abs(quat[..., 0]))


class Evaluator:
    """Code MSE, pose error and photometric PSNR of the encoder on fixed frames, with their baselines."""

    def __init__(self, frame_sets: list[EvalFrames], mean_code: np.ndarray, capacity: kernels.AdaptiveCapacity,
                 batch_size: int):  # fmt: skip
        self.frame_sets, self.mean_code, self.capacity, self.batch_size = frame_sets, mean_code, capacity, batch_size
        self._score = jax.jit(self._score_batch, static_argnums=(0, 1))

    @staticmethod
    def _score_batch(capacity: int, graphdef, state, batch: dict) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state)
        images = batch["images"].astype(jnp.float32) / 255.0
        z, rotation, translation = model.encoder(images, batch["world_to_cam"], batch["intrinsics"])
        true_rotation, true_translation = batch["head_pose"][:, :3], batch["head_pose"][:, 3:]
        height, width = images.shape[1:3]
        _, target = targets(batch["images"], batch["masks"])
        both = render_views(
            model.prior, jnp.concatenate([z, batch["codes"]]), jnp.concatenate([batch["scan_maps"]] * 2),
            jnp.concatenate([rotation, true_rotation]), jnp.concatenate([translation, true_translation]),
            jnp.concatenate([batch["world_to_cam"]] * 2), jnp.concatenate([batch["intrinsics"]] * 2),
            width=width, height=height, capacity=capacity,
        )  # fmt: skip
        psnr = image_metrics.psnr(jnp.clip(both.rgb, 0.0, 1.0), jnp.concatenate([target, target]))
        return {
            "code_se": jnp.mean((z - batch["codes"]) ** 2, -1),
            "rotation_deg": rotation_error_deg(rotation, true_rotation),
            "translation_mm": _MM * jnp.linalg.norm(translation - true_translation, axis=-1),
            "psnr": psnr[: z.shape[0]], "psnr_target": psnr[z.shape[0] :], "n_pairs": jnp.max(both.stats.n_pairs),
        }  # fmt: skip

    def _scores(self, graphdef, state, frames: EvalFrames) -> dict[str, np.ndarray]:
        fields = ("images", "masks", "world_to_cam", "intrinsics", "codes", "head_pose", "scan_maps")
        count, parts = len(frames.images), []
        for start in range(0, count, self.batch_size):
            index = np.minimum(np.arange(start, start + self.batch_size), count - 1)  # pad with the last frame
            batch = {f: getattr(frames, f)[index] for f in fields}
            while True:  # an overflowing batch rendered NaN: grow the capacity and score it again
                scores = jax.device_get(self._score(self.capacity.value, graphdef, state, batch))
                if not grow_capacity(self.capacity, int(scores.pop("n_pairs"))):
                    break
            parts.append({k: v[: min(self.batch_size, count - start)] for k, v in scores.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __call__(self, model: EncoderWithPrior) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        metrics = {}
        for frames in self.frame_sets:
            suffix = "" if frames.split == "held_out_sentence" else f"_{frames.split}"
            scores = self._scores(graphdef, state, frames)
            true_rotation = frames.head_pose[:, :3]
            metrics |= {
                f"eval/code_mse{suffix}": float(np.mean(scores["code_se"])),
                f"eval/code_mse_mean_baseline{suffix}": float(np.mean((frames.codes - self.mean_code) ** 2)),
                f"eval/rotation_error_deg{suffix}": float(np.mean(scores["rotation_deg"])),
                f"eval/rotation_error_deg_zero_motion{suffix}": float(_DEG * np.mean(
                    np.linalg.norm(true_rotation, axis=-1))),
                f"eval/translation_error_mm{suffix}": float(np.mean(scores["translation_mm"])),
                f"eval/translation_error_mm_zero_motion{suffix}": float(_MM * np.mean(
                    np.linalg.norm(frames.head_pose[:, 3:], axis=-1))),
                f"eval/photo_psnr{suffix}": float(np.mean(scores["psnr"])),
                f"eval/photo_psnr_target{suffix}": float(np.mean(scores["psnr_target"])),
            }  # fmt: skip
        return metrics


# ------------------------------------------------------------------------------------- the stage


def build_encoder(config: ml_collections.ConfigDict, prior: UHAP) -> MonoEncoder:
    return MonoEncoder(prior.z_dim, config.model, rngs=nnx.Rngs(config.train.seed))


def train_encoder(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the MonoEncoder in `workdir` against the prior in `config.prior_workdir`."""
    workdir = Path(workdir)
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    prior, prior_cfg, prior_step = restore_frozen_prior(config.prior_workdir, mesh)
    logger.info("prior: step %d of %s", prior_step, config.prior_workdir)
    data_cfg = data_config(config, prior_cfg)
    root = dataset_lib.dataset_root(data_cfg)
    records = dataset_lib.prepared_records(root, data_cfg)
    split = dataset_lib.read_split(root, records, 1)
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    subjects = dataset_lib.subject_tables(root, records, prior.layout, template, prior_cfg)
    sequences, codes = code_targets(
        prior, prior_step, config.prior_workdir, root, records, subjects, split.held_in_cameras,
        config.data.code_batch_size, workdir / CODES_FILE,
    )  # fmt: skip
    multihost_utils.sync_global_devices("uhap encoder targets")
    tables = Tables(codes, subjects.head_pose, subjects.first_record, subjects.scan_maps)
    train_codes = codes[split.train_records]
    mean_code, code_variance = train_codes.mean(0), float(train_codes.var(0).mean())

    frame_sets = [
        f for f in (build_eval_frames(records, sequences, s, split.held_in_cameras, tables, config.eval.num_frames,
                                      config.train.seed) for s in (*dataset_lib.EVAL_SPLITS, "train")) if f is not None
    ]  # fmt: skip
    if not frame_sets:
        raise ValueError(f"{root / layout.DATASET_FILE}: no held-out sentence or identity to evaluate on")
    probe = frame_sets[0]
    capacity = probe_capacity(
        prior, probe.codes, probe.scan_maps, probe.head_pose[:, :3], probe.head_pose[:, 3:], probe.world_to_cam,
        probe.intrinsics, width=probe.images.shape[2], height=probe.images.shape[1],
        headroom=config.render.capacity_headroom,
    )  # fmt: skip
    evaluator = Evaluator(frame_sets, mean_code, capacity, config.eval.batch_size)

    encoder = build_encoder(config, prior)
    encoder.set_code_statistics(train_codes)  # it starts at the mean-code baseline
    model = EncoderWithPrior(encoder, prior)
    options = loaders.LoaderOptions(
        global_batch=config.data.batch_size, seed=config.train.seed, num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
    )  # fmt: skip
    train_records = loaders.FrameRecords(dataset_lib.RecordSubset(records.source, split.train_records),
                                         records.sequences)  # fmt: skip
    frames = loaders.multiview_loader(train_records, batch_sharding(mesh), options, num_views=1,
                                      serials=split.held_in_cameras)  # fmt: skip
    data = EncoderBatches(frames, tables, mesh)
    loss_fn = make_loss_fn(config, code_variance, capacity)
    renders = config.loss.photometric > 0 and config.data.photo_frames > 0  # the Trainer grows the capacity then
    trainer = Trainer(config.train, model, prior_stage.make_optimizer(config), loss_fn, data, workdir, mesh=mesh,
                      capacity=capacity if renders else None)  # fmt: skip
    if jax.process_index() == 0:
        info = {"prior_workdir": str(Path(config.prior_workdir).absolute()), "prior_step": prior_step,
                "z_dim": prior.z_dim, "held_in_cameras": split.held_in_cameras}  # fmt: skip
        (workdir / INFO_FILE).write_text(json.dumps(info, indent=1))
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()


def restore_encoder(encoder_workdir: str | Path, prior: UHAP) -> tuple[MonoEncoder, int]:
    """The MonoEncoder of the latest checkpoint of an encoder workdir, and its step, on one device.

    `prior` (not modified) fixes z_dim and the frozen half of the checkpoint's structure; it should be the
    prior the encoder was trained against (`encoder_info.json` says which), or the codes mean nothing.
    """
    workdir = Path(encoder_workdir)
    config = read_config(workdir / "config.json")
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    model, step = restore_latest(workdir, EncoderWithPrior(build_encoder(config, prior), nnx.clone(prior)),
                                 prior_stage.make_optimizer(config), mesh, what="encoder",
                                 expect=f"{workdir / 'config.json'} and the given prior")  # fmt: skip
    return model.encoder, step
