"""The paper's evaluation protocol: audio-driven avatars of unseen people, scored against what they really did.

Test set (from the capture layout's `dataset.json`): every multi-view sequence of a held-out identity (never seen
by the prior, the speech model or the encoder) that speaks a held-out sentence (never heard by the speech model),
scored at the held-out cameras (never trained on). One clip is one (identity, sentence) pair.

The avatar of each test identity is made from its monocular clip alone (no scan, no multi-view frame, no tracked
mesh: `uhap personalize` without a scan; `train.benchmark_avatars` builds them) and is driven by the test
sentence's audio through its speech model. Only the rigid head pose comes from the capture (`meta.json`
head_pose): audio cannot know where the head is, so every condition gets the captured pose.

Conditions, on the same frames and cameras, in one table:
- `audio`: the speech model on the clip's own audio (what a user gets);
- `zero_motion`: the avatar held at its neutral code, the rest face its speech model shows in the clip's pauses
  (`rest_code`: the mean code over the quietest frames). Not digital silence: the model normalises each utterance,
  so an all-zero input is unlike anything it heard, and its face for it was unstable between retrainings (the
  demo: 108.6, then 258.6 mm² LVE, against 114.5 for the pauses' face); not z = 0 either (162 mm² on the demo);
- `shuffled_audio`: the speech model on another test sentence's audio (looped or cut to the clip's length);
- `oracle_codes`: an upper bound, not a method: the prior's own codes from the clip's held-in multi-view images,
  the true neutral scan and (if the prior was trained with them) the tracked meshes, rendered by the same avatar.

Metrics (`eval.face_metrics`): PSNR/SSIM/LPIPS over the head mask and over a mouth crop, LVE and FDD against the
ground-truth tracked meshes (mm²), the audio-mouth sync proxy (offset, confidence), and SyncNet's LSE-D/LSE-C
when its weights are given.

`prior_reconstruction` scores the prior alone, labelled by split: held-out cameras on held-out frames (held-out
sentences) of training identities, and held-out identities given their neutral scan, codes from the prior's
encoder on the held-in views (and tracked meshes where the prior uses them).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from data_pipelines import layout
from uhap_jax.eval import face_metrics
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import render_fitting, sized_capacity

logger = logging.getLogger(__name__)

CONDITIONS = ("audio", "zero_motion", "shuffled_audio", "oracle_codes")
BASELINES = CONDITIONS[1:]
# The diagnostic beside the table: the same drivers on the universal prior given the test identity's true scan.
TRUE_SCAN_DRIVERS = ("audio", "zero_motion", "shuffled_audio")
TRUE_SCAN_METRICS = ("lve_mm2", "lve_motion_mm2")
IMAGE_METRICS = ("psnr", "ssim", "lpips", "mouth_psnr", "mouth_ssim", "mouth_lpips")
METRICS = (
    *IMAGE_METRICS,
    "lve_mm2",
    "lve_motion_mm2",
    "fdd_mm2",
    "sync_offset_frames",
    "sync_confidence",
    "lse_d",
    "lse_c",
)
# What each metric is, for the report and the JSON: name -> (description, higher is better).
DESCRIPTIONS = {
    "psnr": ("PSNR (dB) over the ground-truth head mask, held-out cameras", True),
    "ssim": ("SSIM over the head mask, held-out cameras", True),
    "lpips": ("LPIPS-VGG of the head (composited on black), held-out cameras", False),
    "mouth_psnr": ("PSNR (dB) of the mouth crop (box around the projected ground-truth lips)", True),
    "mouth_ssim": ("SSIM of the mouth crop", True),
    "mouth_lpips": ("LPIPS-VGG of the mouth crop", False),
    "lve_mm2": ("LVE (mm²) vs the ground-truth tracked meshes: max squared lip-point error per frame, mean", False),
    "lve_motion_mm2": (
        "LVE (mm²) with each lip point's static error over the clip removed (the avatar's lip shape):"
        " the error of the motion alone; a diagnostic, not a bar",
        False,
    ),
    "fdd_mm2": (
        "FDD (mm²): upper-face dynamics of the ground truth minus the prediction's (each from its own "
        "neutral: the neutral scan; the avatar at its neutral code)",
        None,
    ),
    "sync_offset_frames": ("audio-mouth offset (frames, + = mouth lags) pooled over clips", None),
    "sync_confidence": ("audio-mouth confidence: peak minus median correlation over lags, pooled", True),
    "lse_d": ("SyncNet LSE-D on the first held-out camera's face crop (lower is better)", False),
    "lse_c": ("SyncNet LSE-C on the first held-out camera's face crop (higher is better)", True),
}
MISSING = {"lpips": face_metrics.LPIPS_MISSING, "mouth_lpips": face_metrics.LPIPS_MISSING,
           "lse_d": face_metrics.SYNCNET_MISSING, "lse_c": face_metrics.SYNCNET_MISSING}  # fmt: skip
CAPACITY_HEADROOM = 1.25
DIAGNOSTIC_PREFIX = "oracle_inputs/"  # metrics that read what a user does not have (the demo's convention)


# ------------------------------------------------------------------------------------- the test clips


@dataclasses.dataclass(frozen=True)
class Clip:
    """One (identity, sentence) clip of the capture: what the avatar is scored against."""

    subject: str
    sequence: str
    sentence: int | str
    split: str
    fps: float
    waveform: np.ndarray  # [S] 16 kHz mono, covering every frame
    head_pose: np.ndarray  # [T, 6] rotation vector, translation (world)
    vertices: np.ndarray  # [T, V, 3] ground-truth tracked meshes, world
    cameras: tuple[layout.Camera, ...]  # the cameras scored (held-out)
    images: np.ndarray  # [T, C, H, W, 3] uint8
    masks: np.ndarray  # [T, C, H, W] uint8
    input_cameras: tuple[layout.Camera, ...] = ()  # held-in cameras (for the oracle / prior encoder)
    input_images: np.ndarray | None = None  # [T, Ci, H, W, 3] uint8

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.sequence}"

    @property
    def num_frames(self) -> int:
        return len(self.head_pose)


def camera_frames(seq_dir: Path, serials: Sequence[str], frames: np.ndarray, kind: str) -> np.ndarray:
    return np.stack([np.stack([layout.read_image(layout.frame_path(seq_dir, s, int(f), kind=kind)) for s in serials])
                     for f in frames])  # fmt: skip


def read_clip(root: Path, subject: str, sequence: str, cameras: Sequence[str], input_cameras: Sequence[str] = (),
              frames: np.ndarray | None = None) -> Clip:  # fmt: skip
    """A sequence of the capture layout at `cameras` (and `input_cameras`), all frames or `frames`."""
    seq_dir = layout.sequence_dir(root, subject, sequence)
    meta = layout.read_sequence_meta(seq_dir)
    count = meta["num_frames"]
    frames = np.arange(count) if frames is None else np.asarray(frames)
    info = layout.read_dataset_info(root).get("sequences", {}).get(subject, {}).get(sequence, {})
    pose = meta.get("head_pose")
    if pose is None:
        raise layout.LayoutError(f"{seq_dir / layout.META_FILE}: no head_pose; the benchmark renders at the "
                                 "captured head pose")  # fmt: skip
    pose = np.concatenate([np.asarray(pose["rotation_vector"]), np.asarray(pose["translation"])], -1)
    calibration = layout.read_calibration(layout.subject_dir(root, subject))
    missing = sorted((set(cameras) | set(input_cameras)) - set(calibration))
    if missing:
        raise layout.LayoutError(f"{layout.subject_dir(root, subject) / layout.CALIBRATION_FILE}: no cameras {missing}")
    waveform, _ = layout.read_audio(seq_dir / layout.AUDIO_FILE)
    needed = math.ceil(count * SAMPLE_RATE / float(meta["fps"]))
    waveform = np.pad(waveform, (0, max(needed - waveform.size, 0)))
    inputs = camera_frames(seq_dir, input_cameras, frames, "images") if input_cameras else None
    return Clip(
        subject, sequence, info.get("sentence_index", sequence), info.get("split", ""), float(meta["fps"]), waveform,
        pose[frames].astype(np.float32), layout.read_vertices(seq_dir, num_frames=count)[frames],
        tuple(calibration[s] for s in cameras), camera_frames(seq_dir, cameras, frames, "images"),
        camera_frames(seq_dir, cameras, frames, "masks"), tuple(calibration[s] for s in input_cameras), inputs,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Split:
    """The held-out parts of `dataset.json` and the held-in cameras (every rig camera that is not held out)."""

    train_identities: list[str]
    test_identities: list[str]
    held_out_sentences: list
    held_out_cameras: list[str]
    held_in_cameras: list[str]


def read_split(root: Path) -> Split:
    info = layout.read_dataset_info(root)
    where = Path(root) / layout.DATASET_FILE
    try:
        cameras, held_out = list(info["cameras"]), list(info["held_out_cameras"])
        identities, sentences = info["identities"], list(info["held_out_sentences"])
        held_in = [c for c in cameras if c not in held_out]
        split = Split(list(identities["train"]), list(identities["held_out"]), sentences, held_out, held_in)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: the benchmark needs cameras, held_out_cameras, identities.train/held_out and "
                         f"held_out_sentences ({error!r} is missing)") from error  # fmt: skip
    if not (split.test_identities and split.held_out_sentences and split.held_out_cameras):
        raise ValueError(f"{where}: no held-out identity, sentence or camera: nothing to benchmark on")
    return split


def test_sequences(root: Path, split: Split) -> list[tuple[str, str]]:
    """(identity, sequence) of every multi-view sequence of a held-out identity that speaks a held-out sentence."""
    info = layout.read_dataset_info(root)
    chosen = []
    for subject in split.test_identities:
        for sequence, row in sorted(info["sequences"].get(subject, {}).items()):
            if row.get("sentence_index") not in split.held_out_sentences:
                continue
            serials = layout.read_sequence_meta(layout.sequence_dir(root, subject, sequence)).get("cameras", [])
            if not set(split.held_out_cameras) - set(serials):
                chosen.append((subject, sequence))
    if len(chosen) < 2:
        raise ValueError(f"{Path(root) / layout.DATASET_FILE}: {len(chosen)} test clip(s) (held-out identity, held-out "
                         "sentence, held-out cameras); the shuffled-audio baseline needs two")  # fmt: skip
    return chosen


# ------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _render_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
    """jitted decode and render for a prior's graph (compiled once per shape, whatever the clip)."""

    def decode(state, z, pose, scan_maps):
        model = nnx.merge(graphdef, state)
        return model.decode(z, jnp.broadcast_to(scan_maps, (z.shape[0], *scan_maps.shape)), pose[:, :3], pose[:, 3:])

    def render(state, z, pose, scan_maps, views, ks, ids, width: int, height: int, capacity: int):
        model = nnx.merge(graphdef, state)
        gaussians = decode(state, z, pose, scan_maps)
        views = jnp.broadcast_to(views, (z.shape[0], *views.shape))
        ks = jnp.broadcast_to(ks, (z.shape[0], *ks.shape))
        out = model.render(gaussians, views, ks, width=width, height=height, capacity=capacity)
        picked = {name: gaussians.head_means[:, index] for name, index in ids.items()}
        return jnp.clip(out.rgb, 0.0, 1.0), picked, jnp.max(out.stats.n_pairs)

    return jax.jit(decode), jax.jit(render, static_argnums=(7, 8, 9))


class Renderer:
    """Decodes codes at the captured head pose and renders the held-out cameras, in fixed-size batches (one
    compilation per capacity), sized and grown by `models.render` (a batch that overflowed is rendered again)."""

    def __init__(self, prior: UHAP, scan_maps: np.ndarray, cameras: Sequence[layout.Camera], batch_size: int = 8,
                 ids: dict[str, np.ndarray] | None = None):  # fmt: skip
        self.prior, self.batch_size = prior, batch_size
        self.scan_maps = jnp.asarray(scan_maps, jnp.float32)
        self.width, self.height = cameras[0].width, cameras[0].height
        if any((c.width, c.height) != (self.width, self.height) for c in cameras):
            raise ValueError("the benchmark's cameras must share one image size")
        self.views = np.stack([c.world_to_cam for c in cameras]).astype(np.float32)
        self.ks = np.stack([c.intrinsics for c in cameras]).astype(np.float32)
        self.ids = {name: jnp.asarray(index) for name, index in (ids or {}).items()}
        self.capacity: kernels.AdaptiveCapacity | None = None
        graphdef, self._state = nnx.split(prior)
        self._decode, self._render = _render_fns(graphdef)

    def _size(self, z: np.ndarray, pose: np.ndarray) -> None:
        gaussians = self._decode(self._state, z, pose, self.scan_maps)
        batch = len(z)
        self.capacity = sized_capacity(
            self.prior, gaussians, np.broadcast_to(self.views, (batch, *self.views.shape)),
            np.broadcast_to(self.ks, (batch, *self.ks.shape)), width=self.width, height=self.height,
            headroom=CAPACITY_HEADROOM,
        )  # fmt: skip

    def _render_batch(self, z: np.ndarray, pose: np.ndarray, capacity: int) -> tuple:
        return jax.device_get(self._render(self._state, z, pose, self.scan_maps, self.views, self.ks, self.ids,
                                           self.width, self.height, capacity))  # fmt: skip

    def points(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        """The head-space points of `ids` [T, K, 3] decoded from codes [T, z], without rendering."""
        count, picked = len(codes), {name: [] for name in self.ids}
        for start in range(0, count, self.batch_size):
            index = np.minimum(np.arange(start, start + self.batch_size), count - 1)
            z = np.asarray(codes[index], np.float32)
            means = self._decode(self._state, z, np.zeros((len(z), 6), np.float32), self.scan_maps).head_means
            for name, ids in self.ids.items():
                picked[name].append(np.asarray(means[:, ids])[: count - start])
        return {name: np.concatenate(v) for name, v in picked.items()}

    def __call__(self, codes: np.ndarray, head_pose: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """codes [T, z], head pose [T, 6] -> images [T, C, H, W, 3] in [0, 1] and the head-space points of `ids`."""
        count = len(codes)
        images, picked = [], {name: [] for name in self.ids}
        for start in range(0, count, self.batch_size):
            index = np.minimum(np.arange(start, start + self.batch_size), count - 1)
            z, pose = np.asarray(codes[index], np.float32), np.asarray(head_pose[index], np.float32)
            if self.capacity is None:
                self._size(z, pose)
            rgb, points, _ = render_fitting(functools.partial(self._render_batch, z, pose), self.capacity,
                                            lambda out: int(out[2]))  # fmt: skip
            keep = min(self.batch_size, count - start)
            images.append(rgb[:keep])
            for name in self.ids:
                picked[name].append(points[name][:keep])
        return np.concatenate(images), {name: np.concatenate(v) for name, v in picked.items()}


# ------------------------------------------------------------------------------------- codes


def speech_codes(speech, waveform: np.ndarray, num_frames: int) -> np.ndarray:
    """The speech model on a whole clip's 16 kHz audio (as `uhap animate` runs it): codes [num_frames, z]."""
    needed = math.ceil(num_frames * SAMPLE_RATE / speech.config.fps)
    waveform = np.pad(np.asarray(waveform, np.float32), (0, max(needed - len(waveform), 0)))
    graphdef, state = nnx.split(speech)
    return np.asarray(_speech_fn(graphdef)(state, jnp.asarray(waveform)[None], num_frames))[0]


@functools.lru_cache(maxsize=8)
def _speech_fn(graphdef: nnx.GraphDef) -> Callable:
    return jax.jit(lambda state, audio, num_frames: nnx.merge(graphdef, state)(audio, num_frames), static_argnums=2)


def encode_clip(prior: UHAP, clip: Clip, scan_maps: np.ndarray, template: template_lib.Template,
                tracked_mesh: bool, batch_size: int = 8) -> np.ndarray:  # fmt: skip
    """The prior's posterior-mean codes [T, z] from the clip's held-in views, the neutral scan's UV maps and, when
    `tracked_mesh` (the prior was trained with them), the tracked meshes: the oracle, not a user's input."""
    if clip.input_images is None or not len(clip.input_cameras):
        raise ValueError(f"{clip.key}: no held-in views to encode")
    graphdef, state = nnx.split(prior)
    if tracked_mesh:
        tracked = face_metrics.surface_at_texels(clip.vertices, template, prior.layout).astype(np.float32)
    else:  # not read by the encoder
        tracked = np.zeros((clip.num_frames, prior.layout.num_gaussians, 3), np.float32)
    encode, maps = _encode_fn(graphdef, tracked_mesh), jnp.asarray(scan_maps, jnp.float32)
    count, codes = clip.num_frames, []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), count - 1)
        images = clip.input_images[index].astype(np.float32)
        codes.append(np.asarray(encode(state, images, tracked[index], clip.head_pose[index], maps))[: count - start])
    return np.concatenate(codes)[:count]


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef: nnx.GraphDef, tracked_mesh: bool) -> Callable:
    def encode(state, images, points, pose, scan_maps):
        model = nnx.merge(graphdef, state)
        geometry = None
        if tracked_mesh:
            maps = jnp.broadcast_to(scan_maps, (images.shape[0], *scan_maps.shape))
            valid = jnp.ones(images.shape[0], jnp.float32)
            geometry = model.expression_geometry(points, valid, maps, pose[:, :3], pose[:, 3:])
        return model.encode_expression(images / 255.0, geometry)[0]

    return jax.jit(encode)


def shuffled_waveform(clips: Sequence[Clip], index: int) -> np.ndarray:
    """The audio of the next test clip that speaks another sentence, looped or cut to this clip's length."""
    this = clips[index]
    order = [*clips[index + 1 :], *clips[:index]]
    other = next((c for c in order if c.sentence != this.sentence), None)
    if other is None:
        raise ValueError("benchmark: every test clip speaks the same sentence; no shuffled-audio baseline")
    return np.resize(other.waveform, this.waveform.size)


# ------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scorer:
    """The metrics of one clip, whatever codes drive the avatar: the ground truth is read once."""

    clip: Clip
    template: template_lib.Template
    prior_layout: object
    lpips_model: object = None
    syncnet_model: object = None
    max_lag: int = 5

    def __post_init__(self):
        clip, layout_ = self.clip, self.prior_layout
        self.lip_ids = face_metrics.lip_texel_ids(layout_, self.template)
        self.upper_ids = face_metrics.upper_face_texel_ids(layout_, self.template)
        rotation = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(clip.head_pose[:, :3], jnp.float32)))
        head = np.einsum("tji,tvj->tvi", rotation, clip.vertices - clip.head_pose[:, None, 3:])  # world -> head
        surface = face_metrics.surface_at_texels(head, self.template, layout_)
        self.gt_lips, self.gt_upper = surface[:, self.lip_ids], surface[:, self.upper_ids]
        self.target = clip.images.astype(np.float64) / 255.0 * (clip.masks[..., None] / 255.0)
        self.mask = (clip.masks > 127).astype(np.float64)
        world_lips = face_metrics.surface_at_texels(clip.vertices, self.template, layout_)[:, self.lip_ids]
        height, width = clip.images.shape[2:4]
        self.boxes = [face_metrics.mouth_box(face_metrics.project(world_lips, c.world_to_cam, c.intrinsics), width,
                                             height) for c in clip.cameras]  # fmt: skip
        self.face_box = face_metrics.mouth_box(face_metrics.project(clip.vertices, clip.cameras[0].world_to_cam,
                                                                    clip.cameras[0].intrinsics), width, height,
                                               margin=0.05)  # fmt: skip

    def gt_neutral_upper(self, neutral_vertices: np.ndarray) -> np.ndarray:
        return face_metrics.surface_at_texels(neutral_vertices, self.template, self.prior_layout)[self.upper_ids]

    def __call__(self, rendered: np.ndarray, lips: np.ndarray, upper: np.ndarray, neutral_upper: np.ndarray,
                 gt_neutral_upper: np.ndarray, halves) -> tuple[dict[str, float | None], np.ndarray]:  # fmt: skip
        """Metrics of rendered images [T, C, H, W, 3] (None: geometry and sync only, the image metrics None) and
        decoded points (head space); and the sync curve."""
        clip = self.clip
        metrics = self._image_metrics(rendered) if rendered is not None else dict.fromkeys(IMAGE_METRICS)
        metrics["lve_mm2"] = face_metrics.lve_mm2(lips, self.gt_lips)
        metrics["lve_motion_mm2"] = face_metrics.lve_motion_mm2(lips, self.gt_lips)
        metrics["fdd_mm2"] = face_metrics.fdd_mm2(upper, self.gt_upper, neutral_upper, gt_neutral_upper)
        sync = face_metrics.audio_mouth_sync(clip.waveform, SAMPLE_RATE, clip.fps,
                                             face_metrics.mouth_opening(lips, halves), self.max_lag)  # fmt: skip
        metrics["sync_offset_frames"], metrics["sync_confidence"] = float(sync.offset), sync.confidence
        scores = None
        if self.syncnet_model is not None and rendered is not None:
            scores = face_metrics.syncnet_scores(self.syncnet_model, self.face_box.crop(rendered[:, 0]), clip.waveform,
                                                 clip.fps)  # fmt: skip
        metrics["lse_d"] = None if scores is None else scores.lse_d
        metrics["lse_c"] = None if scores is None else scores.lse_c
        return metrics, sync.correlations

    def _image_metrics(self, rendered: np.ndarray) -> dict[str, float | None]:
        target, mask = self.target, self.mask
        metrics: dict[str, float | None] = {
            "psnr": float(np.mean(face_metrics.masked_psnr(rendered, target, mask))),
            "ssim": float(np.mean(face_metrics.masked_ssim(rendered, target, mask))),
        }
        mouth_pred = [box.crop(rendered[:, c]) for c, box in enumerate(self.boxes)]
        mouth_true = [box.crop(target[:, c]) for c, box in enumerate(self.boxes)]
        metrics["mouth_psnr"] = float(np.mean([face_metrics.masked_psnr(p, t, np.ones(p.shape[:-1]))
                                               for p, t in zip(mouth_pred, mouth_true)]))  # fmt: skip
        metrics["mouth_ssim"] = float(np.mean([face_metrics.masked_ssim(p, t, np.ones(p.shape[:-1]))
                                               for p, t in zip(mouth_pred, mouth_true)]))  # fmt: skip
        flat = lambda x: x.reshape(-1, *x.shape[-3:])  # noqa: E731
        head = face_metrics.lpips(self.lpips_model, flat(rendered * mask[..., None]), flat(target))
        metrics["lpips"] = None if head is None else float(np.mean(head))
        mouth = [face_metrics.lpips(self.lpips_model, p, t) for p, t in zip(mouth_pred, mouth_true)]
        metrics["mouth_lpips"] = None if mouth[0] is None else float(np.mean(np.concatenate(mouth)))
        return metrics


@dataclasses.dataclass(frozen=True)
class TestAvatar:
    """What the benchmark drives: the personalised prior, its identity maps and its speech model."""

    prior: UHAP
    scan_maps: np.ndarray
    speech: object


@dataclasses.dataclass(frozen=True)
class Oracle:
    """The upper bound's inputs: the universal prior (with its IdentityEncoder) and whether it reads tracked
    meshes; the subjects' true neutral scans are read from the layout."""

    prior: UHAP
    tracked_mesh: bool


Driver = Callable[[TestAvatar, np.ndarray, int], np.ndarray]


def rest_code(avatar: TestAvatar, waveform: np.ndarray, num_frames: int, quiet_fraction: float = 0.2) -> np.ndarray:
    """The avatar's neutral code [z] for a clip: its speech model's mean code over the clip's quietest
    `quiet_fraction` of frames (lowest audio RMS: the pauses, what the avatar shows when nobody speaks); also the
    neutral that FDD measures the prediction's motion from."""
    codes = speech_codes(avatar.speech, waveform, num_frames)
    hop = SAMPLE_RATE / avatar.speech.config.fps
    padded = np.pad(np.asarray(waveform, np.float64), (0, max(0, math.ceil(num_frames * hop) - len(waveform))))
    loudness = [np.mean(padded[round(i * hop) : round((i + 1) * hop)] ** 2) for i in range(num_frames)]
    quiet = np.argsort(loudness, kind="stable")[: max(1, round(quiet_fraction * num_frames))]
    return codes[quiet].mean(0).astype(np.float32)


def audio_driver(avatar: TestAvatar, waveform: np.ndarray, num_frames: int) -> np.ndarray:
    """The user's path: the avatar's speech model on audio."""
    return speech_codes(avatar.speech, waveform, num_frames)


def run(root: Path, avatars: dict[str, TestAvatar], template: template_lib.Template, oracle: Oracle | None, *,
        drive: Driver = audio_driver, lpips_model=None, syncnet_model=None, max_lag: int = 5, batch_size: int = 8,
        clips: Sequence[Clip] | None = None, images: bool = True) -> dict:  # fmt: skip
    """The protocol on the layout at `root`: one row per (identity, sentence) and condition, and the means.

    `avatars` maps every test identity to its avatar (made from its monocular clip alone); `drive` turns audio
    into codes (default: the avatar's speech model). `images=False` scores geometry and sync only (no rendering;
    the image metrics are None). Returns {"rows", "means", "split", "notes"} and, with an `oracle`, the diagnostic
    "true_scan_identity" ({"rows", "means", "note"}).
    """
    root = Path(root)
    split = read_split(root)
    if clips is None:
        input_cameras = split.held_in_cameras if oracle is not None else ()
        clips = [read_clip(root, s, q, split.held_out_cameras, input_cameras) for s, q in test_sequences(root, split)]
    missing = sorted({c.subject for c in clips} - set(avatars))
    if missing:
        raise ValueError(f"benchmark: no avatar for test identities {missing}")
    rows, curves, true_scan_rows = [], {condition: [] for condition in CONDITIONS}, []
    for index, clip in enumerate(clips):
        avatar = avatars[clip.subject]
        scorer = Scorer(clip, template, avatar.prior.layout, lpips_model, syncnet_model, max_lag)
        ids = {"lips": scorer.lip_ids, "upper": scorer.upper_ids}
        renderer = Renderer(avatar.prior, avatar.scan_maps, clip.cameras, batch_size, ids)
        rest = rest_code(avatar, clip.waveform, clip.num_frames)
        neutral = renderer.points(rest[None])
        halves = face_metrics.lip_halves(neutral["lips"][0])
        scan_vertices, _, _ = layout.read_neutral_scan(layout.subject_dir(root, clip.subject))
        gt_neutral_upper = scorer.gt_neutral_upper(scan_vertices)
        codes = {
            "audio": drive(avatar, clip.waveform, clip.num_frames),
            "zero_motion": np.broadcast_to(rest, (clip.num_frames, avatar.prior.z_dim)),
            "shuffled_audio": drive(avatar, shuffled_waveform(clips, index), clip.num_frames),
        }
        if oracle is not None:
            scan_maps = scan_uv_maps(oracle.prior.layout, template, scan_vertices,
                                     layout.read_neutral_scan(layout.subject_dir(root, clip.subject))[2],
                                     clip.key)  # fmt: skip
            codes["oracle_codes"] = encode_clip(oracle.prior, clip, scan_maps, template, oracle.tracked_mesh,
                                                batch_size)  # fmt: skip
            true_scan = Renderer(oracle.prior, scan_maps, clip.cameras, batch_size, {"lips": scorer.lip_ids})
            for condition in TRUE_SCAN_DRIVERS:
                lips, gt = true_scan.points(codes[condition])["lips"], scorer.gt_lips
                true_scan_rows.append({"subject": clip.subject, "sequence": clip.sequence, "condition": condition,
                                       "lve_mm2": face_metrics.lve_mm2(lips, gt),
                                       "lve_motion_mm2": face_metrics.lve_motion_mm2(lips, gt)})  # fmt: skip
        for condition, z in codes.items():
            rendered, points = renderer(z, clip.head_pose) if images else (None, renderer.points(z))
            metrics, curve = scorer(rendered, points["lips"], points["upper"], neutral["upper"][0], gt_neutral_upper,
                                    halves)  # fmt: skip
            curves[condition].append(curve)
            rows.append({"subject": clip.subject, "sequence": clip.sequence, "sentence": clip.sentence,
                         "condition": condition, "frames": clip.num_frames, **metrics})  # fmt: skip
            logger.info("benchmark %s %s: LVE %.3f mm², mouth PSNR %s dB, PSNR %s dB, sync %+d (%.3f)", clip.key,
                        condition, metrics["lve_mm2"], face_metrics.format_value(metrics["mouth_psnr"], "n/a"),
                        face_metrics.format_value(metrics["psnr"], "n/a"), int(metrics["sync_offset_frames"]),
                        metrics["sync_confidence"])  # fmt: skip
    means = {}
    for condition in CONDITIONS:
        chosen = [r for r in rows if r["condition"] == condition]
        if not chosen:
            continue
        means[condition] = {}
        for name in METRICS:
            values = [r[name] for r in chosen]
            means[condition][name] = None if any(v is None for v in values) else float(np.mean(values))
        offset, confidence = face_metrics.pooled_sync(curves[condition], max_lag)
        means[condition]["sync_offset_frames"], means[condition]["sync_confidence"] = float(offset), confidence
    result = {
        "rows": rows, "means": means,
        "split": {"test_identities": sorted({c.subject for c in clips}), "clips": [c.key for c in clips],
                  "held_out_sentences": split.held_out_sentences, "cameras": split.held_out_cameras},
        "notes": NOTES,
    }  # fmt: skip
    if true_scan_rows:
        result["true_scan_identity"] = {
            "rows": true_scan_rows, "note": TRUE_SCAN_NOTE,
            "means": {c: {name: float(np.mean([r[name] for r in true_scan_rows if r["condition"] == c]))
                          for name in TRUE_SCAN_METRICS} for c in TRUE_SCAN_DRIVERS},
        }  # fmt: skip
    return result


NOTES = (
    "Test clips: held-out identities (never seen by the prior, the speech model or the encoder) speaking held-out "
    "sentences (never heard by the speech model), scored at held-out cameras. Each avatar is made from its "
    "identity's monocular clip alone (no scan, no multi-view frame, no tracked mesh) and driven by the sentence's "
    "audio through the speech model; only the rigid head pose comes from the capture (audio cannot know it). "
    "zero_motion: the avatar held at its neutral code (its speech model's mean code over the clip's quietest "
    "fifth of frames: its face in the pauses); "
    "shuffled_audio: another test sentence's audio; "
    "oracle_codes: an UPPER BOUND, the prior's codes from the held-in multi-view images, the true scan and the "
    "tracked meshes, rendered by the same avatar. sync_offset_frames and sync_confidence are pooled over clips "
    "(the correlation-per-lag curves averaged); LVE and FDD are against the ground-truth tracked meshes."
)


TRUE_SCAN_NOTE = (
    "DIAGNOSTIC, not the protocol (it reads the true scan, which a user does not have): the same codes (audio, "
    "zero_motion, shuffled_audio) decoded by the universal prior given the test identity's TRUE neutral scan "
    "instead of its phone-built identity, geometry only. The gap between these LVEs and the table's is what the "
    "phone-built identity (its geometry and bias maps) costs, which audio cannot change; compare lve_motion_mm2 "
    "to see how much of it is the lips' static placement."
)

# ------------------------------------------------------------------------------------- the prior by split


def prior_reconstruction(root: Path, prior: UHAP, template: template_lib.Template, tracked_mesh: bool, *,
                         frames: int = 8, batch_size: int = 8) -> dict[str, float]:  # fmt: skip
    """The prior alone at held-out cameras, codes from its encoder on the held-in views (and tracked meshes):
    `prior_train_ids_heldout_frames/psnr|ssim` on the held-out-sentence sequences of training identities (frames
    it never trained on), `prior_heldout_ids_scan/psnr|ssim` on held-out identities given their neutral scan; and
    the baseline on the same frames, `.../psnr_mean_code|ssim_mean_code`: the encoder's codes averaged over the
    clip and held for every frame (the prior's face for this clip, without its motion)."""
    root = Path(root)
    split = read_split(root)
    info = layout.read_dataset_info(root)
    groups = {"prior_train_ids_heldout_frames": [], "prior_heldout_ids_scan": []}
    for subject, seqs in sorted(info["sequences"].items()):
        for sequence, row in sorted(seqs.items()):
            serials = layout.read_sequence_meta(layout.sequence_dir(root, subject, sequence)).get("cameras", [])
            if (set(split.held_out_cameras) | set(split.held_in_cameras)) - set(serials):
                continue
            if subject in split.train_identities and row.get("split") == "held_out_sentence":
                groups["prior_train_ids_heldout_frames"].append((subject, sequence))
            elif subject in split.test_identities:
                groups["prior_heldout_ids_scan"].append((subject, sequence))
    metrics = {}
    for name, sequences in groups.items():
        if not sequences:
            logger.warning("prior reconstruction: no sequence for %s in %s", name, root)
            continue
        scores = {key: {"psnr": [], "ssim": []} for key in ("", "_mean_code")}
        for subject, sequence in sequences:
            count = layout.read_sequence_meta(layout.sequence_dir(root, subject, sequence))["num_frames"]
            chosen = np.linspace(0, count - 1, min(frames, count)).round().astype(int)
            clip = read_clip(root, subject, sequence, split.held_out_cameras, split.held_in_cameras, chosen)
            vertices, _, colours = layout.read_neutral_scan(layout.subject_dir(root, subject))
            scan_maps = scan_uv_maps(prior.layout, template, vertices, colours, clip.key)
            codes = encode_clip(prior, clip, scan_maps, template, tracked_mesh, batch_size)
            renderer = Renderer(prior, scan_maps, clip.cameras, batch_size)
            target = clip.images / 255.0 * (clip.masks[..., None] / 255.0)
            mask = (clip.masks > 127).astype(np.float64)
            mean_code = np.broadcast_to(codes.mean(0, dtype=np.float64).astype(codes.dtype), codes.shape)
            for key, z in (("", codes), ("_mean_code", mean_code)):
                rendered, _ = renderer(z, clip.head_pose)
                scores[key]["psnr"].append(face_metrics.masked_psnr(rendered, target, mask).ravel())
                scores[key]["ssim"].append(face_metrics.masked_ssim(rendered, target, mask).ravel())
        for key, values in scores.items():
            for metric, parts in values.items():
                metrics[f"{name}/{metric}{key}"] = float(np.mean(np.concatenate(parts)))
    return metrics


# ------------------------------------------------------------------------------------- outputs


def flat_metrics(result: dict, prefix: str = "benchmark/") -> dict[str, float]:
    """`benchmark/<metric>` (the audio-driven avatar) and `benchmark/<metric>_<baseline>`, and the diagnostic's
    `oracle_inputs/true_scan_identity/<metric>[_<baseline>]`; unknown values (no weights) are left out here and
    printed as n/a by `table`."""
    flat = {}
    sections = [(prefix, result["means"])]
    if "true_scan_identity" in result:  # it reads the true scan: named as what a user does not have
        sections.append((f"{DIAGNOSTIC_PREFIX}true_scan_identity/", result["true_scan_identity"]["means"]))
    for section_prefix, means in sections:
        for condition, values in means.items():
            suffix = "" if condition == "audio" else f"_{condition}"
            for name, value in values.items():
                if value is not None:
                    flat[f"{section_prefix}{name}{suffix}"] = float(value)
    return flat


def table(result: dict) -> list[list[str]]:
    """The mean table: a header row, then one row per metric with a column per condition."""
    header = ["metric", *(c + (" (upper bound)" if c == "oracle_codes" else "") for c in result["means"])]
    rows = [header]
    for name in METRICS:
        cells = [name]
        for condition in result["means"]:
            value = result["means"][condition][name]
            cells.append(face_metrics.format_value(value, MISSING.get(name, "n/a"), 4 if "ssim" in name else 3))
        rows.append(cells)
    return rows


def write(result: dict, out: Path) -> dict[str, Path]:
    """`out/benchmark.json` (rows, means, split, notes, the true-scan diagnostic when it ran), `out/benchmark.csv`
    (one row per (identity, sentence, condition)) and `out/benchmark_table.csv` (the means)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "csv": out / "benchmark.csv", "table": out / "benchmark_table.csv"}
    paths["json"].write_text(json.dumps({**result, "descriptions": DESCRIPTIONS}, indent=1))
    fields = ["subject", "sequence", "sentence", "condition", "frames", *METRICS]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({k: ("n/a" if row.get(k) is None else row[k]) for k in fields})
    with paths["table"].open("w", newline="") as handle:
        csv.writer(handle).writerows(table(result))
    return paths


@dataclasses.dataclass(frozen=True)
class BarCheck:
    name: str
    passed: bool
    value: float
    limit: float


def check_bars(means: dict, lve_below: float = 0.3, sync_frames: float = 1.0, psnr_gap_db: float = 3.0
               ) -> list[BarCheck]:  # fmt: skip
    """The protocol's bars on the mean table: LVE at least `lve_below` under both zero motion and shuffled audio;
    mouth-crop PSNR above both; |sync offset| <= `sync_frames` and confidence above shuffled audio; held-out-camera
    PSNR within `psnr_gap_db` of the oracle-code render (when the oracle ran)."""
    ours = means["audio"]
    checks = []
    for baseline in ("zero_motion", "shuffled_audio"):
        limit = (1.0 - lve_below) * means[baseline]["lve_mm2"]
        checks.append(BarCheck(f"LVE <= {1 - lve_below:.0%} of {baseline}", ours["lve_mm2"] <= limit, ours["lve_mm2"],
                               limit))  # fmt: skip
        limit = means[baseline]["mouth_psnr"]
        checks.append(BarCheck(f"mouth PSNR > {baseline}", ours["mouth_psnr"] > limit, ours["mouth_psnr"], limit))
    offset = ours["sync_offset_frames"]
    checks.append(BarCheck("|sync offset| <= frames", abs(offset) <= sync_frames, offset, sync_frames))
    limit = means["shuffled_audio"]["sync_confidence"]
    checks.append(BarCheck("sync confidence > shuffled_audio", ours["sync_confidence"] > limit,
                           ours["sync_confidence"], limit))  # fmt: skip
    if "oracle_codes" in means:
        limit = means["oracle_codes"]["psnr"] - psnr_gap_db
        checks.append(BarCheck(f"PSNR within {psnr_gap_db:g} dB of oracle_codes", ours["psnr"] >= limit, ours["psnr"],
                               limit))  # fmt: skip
    return checks
