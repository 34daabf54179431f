"""The encoder stage's evaluation: the MonoEncoder's code and head pose against the prior's codes and the true pose,
and the view re-rendered from its prediction, on fixed frames of each split, beside their baselines.

Rows: `eval/code_mse` beside `eval/code_mse_mean_baseline` (always predicting the mean training code),
`eval/rotation_error_deg` / `eval/translation_error_mm` beside the zero-motion baseline, and `eval/photo_psnr`,
the view re-rendered from the prediction, beside `eval/photo_psnr_target`, the same from the prior's own code and
the true pose (the best the encoder can reach through this prior). Held-out sentences of the training identities
carry no suffix, the held-out identities' multi-view sequences `_held_out_identity`, training frames `_train`.

The rig's heads barely turn, so those rows say little about the pose a user's video gets. Where the subjects have
monocular sequences with a true head pose (the synthetic phone clips: another lens, a head turning +-30 degrees),
`eval/rotation_error_deg_phone_clip_held_out_identity` (and `_phone_clip_train`) scores the encoder there, beside
the zero-motion baseline (no rotation), as personalisation reads that clip. With `data.phone_frames` > 0 (the
default) the encoder stage trains on the training identities' clips, so `_phone_clip_train` is then a training
row; the held-out identities' clips are never trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders, monocular
from data_pipelines.errors import LayoutError
from uhap_jax.geometry import rotations
from uhap_jax.models import image_metrics
from uhap_jax.models.frozen_prior import EncoderWithPrior
from uhap_jax.models.identity_start import encode_video
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import render_fitting, render_views, sized_capacity, targets

logger = logging.getLogger(__name__)

_DEG = 180.0 / np.pi
_MM = 1e3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tables:
    """What the records do not hold, gathered per example on device: codes and pose per record, scans per subject."""

    codes: np.ndarray  # [num_records, z_dim]
    head_pose: np.ndarray  # [num_records, 6]
    first_record: np.ndarray  # [num_sequences]
    scan_maps: np.ndarray  # [num_subjects, R, R, 6]


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


@dataclasses.dataclass(frozen=True)
class PhoneClip:
    """A subject's monocular sequences (frames spread over them) and the true head pose of each frame."""

    split: str  # "train" or "held_out_identity"
    video: monocular.MonoVideo
    rotation: np.ndarray  # [F, 3] rotation vectors (meta.json head_pose)
    translation: np.ndarray  # [F, 3] metres


def phone_clips(root: Path, count: int) -> list[PhoneClip]:
    """`count` frames of each identity's monocular sequences that have a head pose; none where a subject has no
    monocular sequence (a rig-only capture) or its meta.json no head_pose."""
    identities = layout.read_dataset_info(root).get("identities", {})
    clips = []
    for split, key in (("train", "train"), ("held_out_identity", "held_out")):
        for subject in identities.get(key, ()):
            try:
                video = monocular.read_monocular(layout.subject_dir(root, subject), "", (), count)
            except LayoutError as error:
                logger.info("encoder eval: no phone-clip pose row for %s (%s)", subject, error)
                continue
            poses = {name: layout.read_sequence_meta(layout.sequence_dir(root, subject, name)).get("head_pose")
                     for name in {name for name, _ in video.frames}}  # fmt: skip
            if any(pose is None for pose in poses.values()):
                logger.info("encoder eval: no phone-clip pose row for %s (its meta.json has no head_pose)", subject)
                continue
            rotation = [poses[name]["rotation_vector"][frame] for name, frame in video.frames]
            translation = [poses[name]["translation"][frame] for name, frame in video.frames]
            clips.append(PhoneClip(split, video, np.asarray(rotation, np.float32), np.asarray(translation, np.float32)))
    return clips


def rotation_error_deg(predicted: jax.Array, true: jax.Array) -> jax.Array:
    """Geodesic angle (degrees) between rotation vectors [..., 3]."""
    relative = jnp.swapaxes(rotations.axis_angle_to_matrix(predicted), -1, -2) @ rotations.axis_angle_to_matrix(true)
    quat = rotations.matrix_to_quaternion(relative)
    return _DEG * 2.0 * jnp.arctan2(jnp.linalg.norm(quat[..., 1:], axis=-1), jnp.abs(quat[..., 0]))


class Evaluator:
    """Code MSE, pose error and photometric PSNR of the encoder on fixed frames, with their baselines."""

    def __init__(self, frame_sets: list[EvalFrames], mean_code: np.ndarray, capacity: kernels.AdaptiveCapacity,
                 batch_size: int, clips: list[PhoneClip] = ()):  # fmt: skip
        self.frame_sets, self.mean_code, self.capacity, self.batch_size = frame_sets, mean_code, capacity, batch_size
        self.clips = list(clips)
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
            score = lambda capacity, batch=batch: jax.device_get(self._score(capacity, graphdef, state, batch))  # noqa: E731
            scores = render_fitting(score, self.capacity, lambda scores: int(scores["n_pairs"]))
            parts.append({k: v[: min(self.batch_size, count - start)] for k, v in scores.items() if k != "n_pairs"})
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
        return metrics | self._phone_clip_pose(model)

    def _phone_clip_pose(self, model: EncoderWithPrior) -> dict[str, float]:
        """The rotation and translation errors on the phone clips of each split, pooled over their frames, beside
        the zero-motion baseline. A monocular clip confounds a head's size with its distance, so a new identity's
        translation can be far off where its rotation is not (docs/benchmarks.md, issue 17, session 25)."""
        errors = {}
        for clip in self.clips:
            _, rotation, translation = encode_video(model.encoder, clip.video, self.batch_size)
            errors.setdefault(clip.split, []).append({
                "rotation_error_deg": np.asarray(rotation_error_deg(rotation, clip.rotation)),
                "rotation_error_deg_zero_motion": _DEG * np.linalg.norm(clip.rotation, axis=-1),
                "translation_error_mm": _MM * np.linalg.norm(np.asarray(translation) - clip.translation, axis=-1),
                "translation_error_mm_zero_motion": _MM * np.linalg.norm(clip.translation, axis=-1),
            })  # fmt: skip
        return {
            f"eval/{name}_phone_clip_{split}": float(np.mean(np.concatenate([clip[name] for clip in clips])))
            for split, clips in errors.items() for name in clips[0]
        }  # fmt: skip


def make_evaluator(records: loaders.FrameRecords, sequences: list[dataset_lib.Sequence], held_in: list[str],
                   tables: Tables, prior: UHAP, mean_code: np.ndarray, config: ml_collections.ConfigDict,
                   root: Path) -> Evaluator:  # fmt: skip
    """Fixed frames of each split (held-out sentences, held-out identities, training), the pair capacity that
    the first split's frames need, and the phone clips of the capture at `root` (whose dataset.json is named when
    there is nothing to evaluate on)."""
    where = root / layout.DATASET_FILE
    frame_sets = [
        f for f in (build_eval_frames(records, sequences, s, held_in, tables, config.eval.num_frames, config.train.seed)
                    for s in (*dataset_lib.EVAL_SPLITS, "train")) if f is not None
    ]  # fmt: skip
    if not frame_sets:
        raise ValueError(f"{where}: no held-out sentence or identity to evaluate on")
    probe = frame_sets[0]
    posed = prior.decode(probe.codes, probe.scan_maps, probe.head_pose[:, :3], probe.head_pose[:, 3:])
    capacity = sized_capacity(prior, posed, probe.world_to_cam[:, None], probe.intrinsics[:, None],
                              width=probe.images.shape[2], height=probe.images.shape[1],
                              headroom=config.render.capacity_headroom)  # fmt: skip
    return Evaluator(frame_sets, mean_code, capacity, config.eval.batch_size, phone_clips(root, config.eval.num_frames))
