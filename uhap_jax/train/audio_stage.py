"""The audio stage: a universal speech model (AudioToLatent) learns to predict a trained prior's expression codes.

Targets are the prior's posterior means (its ExpressionEncoder on every held-in view of each frame), computed
once per prior checkpoint and cached in `<workdir>/expression_codes.npz`. Training windows are runs of
`data.window_frames` frames of the `train`-split sequences of the training identities, with their audio cut to
the same span. The loss is the latent MSE, the velocity MSE and the lip geometry of the decoded avatar: the
prediction and the target are both decoded, by the frozen prior with the subject's identity and no head pose,
and the lip Gaussians (texels on the template's "lips" region) are compared in mm².

Evaluation (every `eval.every` steps and at the end) covers the held-out sentences of training identities and
the sequences of held-out identities (`dataset.json`). It scores the decoded prediction against the decoded
target, so it measures the speech model alone, not the prior's reconstruction error:
`eval/lve` (mm², FaceFormer's LVE on the lip Gaussians); the same for a zero-motion baseline, a static face at
the identity's mean code over all its loaded frames, `eval/lve_zero_motion`, for the neutral face (z = 0)
`eval/lve_neutral`, and for the model run on another sentence's audio `eval/lve_shuffled_audio`; and
`eval/sync_offset_frames`, the lag of peak correlation between the audio's RMS envelope and the decoded mouth
opening, pooled over sequences (`eval/sync_offset_frames_target` is the same for the decoded targets: how in
sync the data itself is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import zipfile
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax import nnx
from jax.experimental import multihost_utils

from data_pipelines import layout, loaders
from uhap_jax.artifacts.output_dirs import save_npz_atomic
from uhap_jax.config_utils import apply_override, load_config
from uhap_jax.eval import lip_metrics
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.audio_to_latent import (
    AudioToLatent,
    AudioToLatentConfig,
    build_audio_to_latent,
    freeze,
    latent_mse,
    velocity_loss,
)
from uhap_jax.models.prior import UHAP, TexelLayout
from uhap_jax.train import prior_stage
from uhap_jax.train.checkpoint import restore_latest
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh

logger = logging.getLogger(__name__)

CODES_FILE = "expression_codes.npz"
EVAL_SPLITS = ("held_out_sentence", "held_out_identity")
_MM = 1e3  # metres -> millimetres


# ------------------------------------------------------------------------------------- the prior


def prior_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The prior's config (`prior_config` + `prior_overrides`), pointed at the audio config's data if it names any."""
    prior = load_config(config.prior_config, list(config.prior_overrides))
    for field in ("root", "synth_preset", "cache_dir"):
        if config.data[field]:
            apply_override(prior, f"data.{field}={config.data[field]}", source="the audio config's data")
    return prior


def restore_prior(prior_cfg: ml_collections.ConfigDict, workdir: str | Path, mesh) -> tuple[UHAP, int]:
    """The prior of the latest checkpoint in `<workdir>/checkpoints`, and its step; parameters only."""
    workdir = Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no prior checkpoints (set prior_workdir)")
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    model = UHAP(template, prior_cfg.model, rngs=nnx.Rngs(prior_cfg.train.seed))
    expect = (f"the prior config {prior_cfg.preset!r} with the given prior_overrides; pass the overrides the prior was "
              "trained with")  # fmt: skip
    return restore_latest(workdir, model, prior_stage.make_optimizer(prior_cfg), mesh, what="prior", expect=expect)


def lip_gaussian_ids(texels: TexelLayout, template: template_lib.Template) -> np.ndarray:
    """Gaussians whose texel lies nearest (largest barycentric) to a vertex of the template's "lips" region."""
    nearest_vertex = template.faces[texels.face_ids, np.argmax(texels.barys, axis=1)]
    ids = np.flatnonzero(template.region_mask("lips")[nearest_vertex])
    if ids.size == 0:
        raise ValueError(f"no Gaussian of the {texels.resolution}² UV layout lies on the template's lips region")
    return ids


def split_lips(
    texels: TexelLayout, template: template_lib.Template, lip_ids: np.ndarray, up_axis: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `lip_ids` of the upper- and lower-lip Gaussians: above or below the mouth's mid-height.

    The mouth opening is the distance between the two groups' centroids; it needs no landmark Gaussian, which a
    coarse UV layout may not have (the procedural lips are two texel rows high at 32²).
    """
    points = template_lib.surface_points(template.vertices, template.faces, texels.face_ids, texels.barys)
    height = np.asarray(points)[lip_ids, up_axis]
    upper = height > 0.5 * (height.min() + height.max())
    if upper.all() or not upper.any():
        raise ValueError(f"the lips of the {texels.resolution}² UV layout do not split into upper and lower lip")
    return np.flatnonzero(upper), np.flatnonzero(~upper)


class SpeechWithPrior(nnx.Module):
    """The speech model being trained and the frozen prior that decodes its codes for the lip loss and eval."""

    def __init__(self, speech: AudioToLatent, prior: UHAP):
        freeze(prior)
        self.speech = speech
        self.prior = prior

    def lip_points(self, z: jax.Array, scan_maps: jax.Array, ids: np.ndarray) -> jax.Array:
        """Head-space positions (mm) of Gaussians `ids` of the avatars decoded from z [B, z_dim] without head pose."""
        no_pose = jnp.zeros((z.shape[0], 3), z.dtype)
        return _MM * self.prior.decode(z, scan_maps, no_pose, no_pose).head_means[:, ids]


# ------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One multi-view sequence: its audio at 16 kHz mono, padded to cover every frame, and its target codes."""

    subject: str
    name: str
    subject_id: int
    split: str
    sentence: int | str  # dataset.json's sentence_index, or the sequence name when it has none
    first_record: int
    num_frames: int
    waveform: np.ndarray
    codes: np.ndarray | None = None  # [num_frames, z_dim] once encoded

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.name}"


def read_sequences(root: Path, records: loaders.FrameRecords, held_in: list[str], fps: float) -> list[Sequence]:
    """The train, held-out-sentence and held-out-identity sequences that every held-in camera saw, with audio."""
    info = layout.read_dataset_info(root)
    train_subjects = set(info["identities"]["train"])
    splits = ("train", *EVAL_SPLITS)
    sequences = []
    for row in records.sequences:
        entry = info["sequences"].get(row["subject"], {}).get(row["sequence"], {})
        split = entry.get("split")
        if split not in splits or (split == "train" and row["subject"] not in train_subjects):
            continue
        if set(held_in) - set(row["serials"]):
            continue  # monocular or partial captures carry no multi-view target
        seq_dir = layout.sequence_dir(root, row["subject"], row["sequence"])
        if row["fps"] != fps:
            raise ValueError(f"{seq_dir / layout.META_FILE}: fps {row['fps']}, but the training sequences are at {fps}")
        waveform, notes = layout.read_audio(seq_dir / layout.AUDIO_FILE)
        for note in notes:
            logger.info("audio input: %s", note)
        needed = math.ceil(row["num_frames"] * SAMPLE_RATE / fps)
        waveform = np.pad(waveform, (0, max(needed - waveform.size, 0)))
        sentence = entry.get("sentence_index", row["sequence"])
        sequences.append(
            Sequence(row["subject"], row["sequence"], row["subject_id"], split, sentence, row["first_record"],
                     row["num_frames"], waveform)
        )  # fmt: skip
    if not any(s.split == "train" for s in sequences):
        raise ValueError(f"{root / layout.DATASET_FILE}: no train-split multi-view sequence with audio")
    if not any(s.split != "train" for s in sequences):
        raise ValueError(f"{root / layout.DATASET_FILE}: no held-out sentence or identity to evaluate on")
    return sequences


def _codes_key(prior_workdir: Path, prior_step: int, root: Path, held_in: list[str]) -> str:
    digest = hashlib.sha256((root / layout.DATASET_FILE).read_bytes()).hexdigest()[:16]
    return f"{prior_workdir.resolve()}@{prior_step}|{root.resolve()}|{digest}|{','.join(held_in)}"


def cached_codes(cache: Path, key: str, sequences: list[Sequence]) -> list[Sequence] | None:
    """The sequences with their codes from `cache` when it holds them for `key`; None when it is missing, for
    another prior, data or cameras, or unreadable (a run killed while writing it): the codes are then recomputed."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) == key and all(s.key in stored for s in sequences):
                cached = [dataclasses.replace(s, codes=np.asarray(stored[s.key])) for s in sequences]
                logger.info("expression codes: cached in %s", cache)
                return cached
        logger.info("expression codes: %s is for another prior, data or cameras; recomputing", cache)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # a write cut short
        logger.warning("expression codes: %s is unreadable (%s); recomputing", cache, error)
    return None


def expression_codes(
    prior: UHAP, records: loaders.FrameRecords, tables: prior_stage.SubjectTables, sequences: list[Sequence],
    held_in: list[str], batch_size: int, cache: Path, key: str,
) -> list[Sequence]:  # fmt: skip
    """Each sequence with its targets: the prior's posterior mean per frame, from all held-in views (and the
    frame's tracked mesh where the capture has one).

    Read from `cache` when it was written for the same prior checkpoint, data and cameras (`key`); else
    computed (batches of `batch_size` frames, the last one padded) and written there by process 0.
    """
    cached = cached_codes(cache, key, sequences)
    if cached is not None:
        return cached
    views = loaders.SampleViews(len(held_in), tuple(held_in))  # every held-in camera: no randomness left
    graphdef, state = nnx.split(prior)

    @jax.jit
    def encode(state, images, rows):
        model = nnx.merge(graphdef, state)
        return model.encode_expression(images / 255.0, prior_stage.encoder_geometry(model, rows))[0]

    frames = [(s, f) for s in sequences for f in range(s.num_frames)]
    rng = np.random.default_rng(0)
    codes = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = np.stack([views.random_map(records.source[s.first_record + f], rng)["images"] for s, f in chunk])
        rows = tables.record_rows(np.asarray([s.subject_id for s, _ in chunk]),
                                  np.asarray([s.first_record + f for s, f in chunk]))  # fmt: skip
        codes.append(np.asarray(encode(state, images.astype(np.float32), rows)))
    codes = np.concatenate(codes)[: len(frames)]
    bounds = np.cumsum([0] + [s.num_frames for s in sequences])
    sequences = [dataclasses.replace(s, codes=codes[a:b]) for s, a, b in zip(sequences, bounds[:-1], bounds[1:])]
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(cache, key=np.asarray(key), **{s.key: s.codes for s in sequences})
        logger.info("expression codes: %d frames encoded by the prior, cached in %s", len(frames), cache)
    return sequences


def _window_audio(waveform: np.ndarray, start_frame: int, num_samples: int, fps: float) -> np.ndarray:
    start = round(start_frame * SAMPLE_RATE / fps)
    window = waveform[start : start + num_samples]
    return np.pad(window, (0, num_samples - window.size))


@dataclasses.dataclass(frozen=True)
class CutWindow(grain.transforms.Map):
    """(sequence index, first frame) -> audio [S], target codes [K, z_dim] and the subject's scan UV maps."""

    sequences: tuple[Sequence, ...]
    scan_maps: np.ndarray  # [subjects, R, R, 6]
    window_frames: int
    fps: float

    def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
        sequence = self.sequences[int(element[0])]
        start = int(element[1])
        num_samples = round(self.window_frames * SAMPLE_RATE / self.fps)
        return {
            "audio": _window_audio(sequence.waveform, start, num_samples, self.fps),
            "codes": sequence.codes[start : start + self.window_frames].astype(np.float32),
            "scan_maps": self.scan_maps[sequence.subject_id],
        }


def window_loader(
    sequences: list[Sequence], scan_maps: np.ndarray, window_frames: int, fps: float, mesh,
    options: loaders.LoaderOptions,
) -> loaders.GlobalBatchIterator:  # fmt: skip
    """Shuffled windows at every start frame of every sequence, batched into global arrays; checkpointable."""
    starts = [(i, f) for i, s in enumerate(sequences) for f in range(s.num_frames - window_frames + 1)]
    if not starts:
        raise ValueError(f"no training sequence has data.window_frames={window_frames} frames")
    count = jax.process_count() if options.process_count is None else options.process_count
    if options.global_batch % count:
        raise ValueError(f"data.batch_size {options.global_batch} does not split over {count} processes")
    dataset = loaders.shard_for_process(grain.MapDataset.source(np.asarray(starts, np.int64)), options)
    dataset = dataset.seed(options.seed).shuffle().repeat(options.num_epochs)
    dataset = dataset.map(CutWindow(tuple(sequences), scan_maps, window_frames, fps))
    dataset = dataset.batch(options.global_batch // count, drop_remainder=True)
    read_options = grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=options.prefetch)
    return loaders.GlobalBatchIterator(dataset, batch_sharding(mesh), read_options)


# ------------------------------------------------------------------------------------- model and loss


def build_model(config: ml_collections.ConfigDict, prior: UHAP, fps: float) -> SpeechWithPrior:
    """The speech model of `config.model` (latent size from the prior, fps from the data) beside the prior."""
    model_config = dataclasses.replace(
        AudioToLatentConfig.from_config_dict(config.model), latent_dim=prior.z_dim, fps=fps
    )
    rngs = nnx.Rngs(config.train.seed)
    if model_config.encoder_mode == "scratch":
        encoder_config = transformers.Wav2Vec2Config(**config.encoder.to_dict())
        speech = build_audio_to_latent(model_config, rngs=rngs, encoder_hf_config=encoder_config)
    else:
        if not config.encoder_path:
            raise ValueError(f"model.encoder_mode {model_config.encoder_mode!r} needs encoder_path (a local folder)")
        speech = build_audio_to_latent(model_config, rngs=rngs, encoder_path=config.encoder_path)
    return SpeechWithPrior(speech, prior)


def make_loss_fn(config: ml_collections.ConfigDict, lip_ids: np.ndarray):
    """`loss_fn(model, batch, rng)` for the Trainer: latent MSE + velocity + lip geometry (mm²)."""
    weights = config.loss

    def loss_fn(model: SpeechWithPrior, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        codes = batch["codes"]
        batch_size, num_frames, _ = codes.shape
        pred = model.speech(batch["audio"], num_frames)
        terms = {"latent": latent_mse(pred, codes), "velocity": velocity_loss(pred, codes)}
        if weights.lip > 0:
            count = min(weights.lip_frames, num_frames)
            frames = jax.random.choice(rng, num_frames, (count,), replace=False)
            pick = lambda z: z[:, frames].reshape(batch_size * count, -1)  # noqa: E731
            scans = jnp.repeat(batch["scan_maps"], count, axis=0)
            points = model.lip_points(
                jnp.concatenate([pick(pred), pick(codes)]), jnp.concatenate([scans, scans]), lip_ids
            )
            pred_lips, target_lips = jnp.split(points, 2)
            terms["lip"] = jnp.mean(jnp.sum((pred_lips - target_lips) ** 2, axis=-1))
        loss = sum(getattr(weights, name) * value for name, value in terms.items())
        return loss, terms

    return loss_fn


# ------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """LVE of the model, a zero-motion and a shuffled-audio baseline, and the audio-mouth sync offset.

    Sequences are cut into windows of the training length (the last one aligned to the sequence's end) and run
    in batches of a fixed size, so each jitted function compiles once.
    """

    def __init__(
        self, sequences: list[Sequence], mean_codes: dict[int, np.ndarray], scan_maps: np.ndarray,
        config: ml_collections.ConfigDict, fps: float, lip_ids: np.ndarray, lip_halves: tuple[np.ndarray, np.ndarray],
    ):  # fmt: skip
        self.sequences = sequences
        self.mean_codes = mean_codes
        self.scan_maps = scan_maps
        self.fps = fps
        self.window_frames = config.data.window_frames
        self.batch_size = config.eval.batch_size
        self.max_lag = config.eval.max_lag
        self.lip_ids = lip_ids
        self.lip_halves = lip_halves
        too_short = [s.key for s in sequences if s.num_frames < max(self.window_frames, 2 * self.max_lag + 3)]
        if too_short:
            raise ValueError(
                f"eval sequences {too_short} are shorter than data.window_frames={self.window_frames} or the "
                f"{2 * self.max_lag + 3} frames that eval.max_lag={self.max_lag} needs"
            )
        self.shuffled_audio = [self._other_sentence_audio(i) for i in range(len(sequences))]
        self._predict = jax.jit(self._predict_codes, static_argnums=(0, 3))
        self._points = jax.jit(self._decode_points, static_argnums=0)

    def _other_sentence_audio(self, index: int) -> np.ndarray:
        """The audio of the next eval sequence that speaks another sentence, looped to this sequence's length."""
        this = self.sequences[index]
        order = self.sequences[index + 1 :] + self.sequences[:index]
        other = next((s for s in order if s.sentence != this.sentence), None)
        if other is None:
            raise ValueError("eval: every held-out sequence speaks the same sentence; no shuffled-audio baseline")
        return np.resize(other.waveform, this.waveform.size)

    @staticmethod
    def _predict_codes(graphdef, state, audio: jax.Array, num_frames: int) -> jax.Array:
        return nnx.merge(graphdef, state).speech(audio, num_frames)

    def _decode_points(self, graphdef, state, z: jax.Array, scan_maps: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).lip_points(z, scan_maps, self.lip_ids)

    def _batches(self, items: list, fill) -> list[list]:
        """`items` in lists of `batch_size`, the last one padded with `fill`."""
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        batches[-1] = batches[-1] + [fill] * (self.batch_size - len(batches[-1]))
        return batches

    def predict(self, graphdef, state, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Codes [F, z_dim] per sequence, from `waveforms` (one per sequence) in windows of the training length."""
        window, num_samples = self.window_frames, round(self.window_frames * SAMPLE_RATE / self.fps)
        starts = [
            (i, start)
            for i, s in enumerate(self.sequences)
            for start in sorted({*range(0, s.num_frames - window + 1, window), s.num_frames - window})
        ]
        outputs = []
        for batch in self._batches(starts, starts[-1]):
            audio = np.stack([_window_audio(waveforms[i], start, num_samples, self.fps) for i, start in batch])
            outputs.extend(np.asarray(self._predict(graphdef, state, audio, window)))
        codes = [np.zeros_like(s.codes) for s in self.sequences]
        for (i, start), predicted in zip(starts, outputs):
            codes[i][start : start + window] = predicted
        return codes

    def points(self, graphdef, state, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded lip Gaussians [F, L, 3] (mm) per sequence, with each sequence's identity."""
        frames = [(z, s.subject_id) for s, seq_codes in zip(self.sequences, codes) for z in seq_codes]
        chunk = self.batch_size * self.window_frames
        decoded = []
        for part in (frames[i : i + chunk] for i in range(0, len(frames), chunk)):
            padded = part + [part[-1]] * (chunk - len(part))
            z = np.stack([f[0] for f in padded]).astype(np.float32)
            scans = self.scan_maps[[f[1] for f in padded]]
            decoded.append(np.asarray(self._points(graphdef, state, z, scans))[: len(part)])
        return np.split(np.concatenate(decoded), np.cumsum([s.num_frames for s in self.sequences])[:-1])

    def _lve(self, pred: list[np.ndarray], target: list[np.ndarray], which: list[bool]) -> float:
        lips = np.arange(len(self.lip_ids))  # the points are the lip Gaussians already
        chosen = [(p, t) for p, t, keep in zip(pred, target, which) if keep]
        return lip_metrics.lip_vertex_error(
            np.concatenate([p for p, _ in chosen]), np.concatenate([t for _, t in chosen]), lips
        )

    def _sync(self, points: list[np.ndarray]) -> tuple[int, float]:
        """The pooled lip-sync offset: the lag where the correlation, averaged over sequences, peaks."""
        upper, lower = self.lip_halves
        curves = []
        for sequence, seq_points in zip(self.sequences, points):
            envelope = lip_metrics.audio_rms_envelope(sequence.waveform, SAMPLE_RATE, self.fps, sequence.num_frames)
            centroids = np.stack([seq_points[:, upper].mean(axis=1), seq_points[:, lower].mean(axis=1)], axis=1)
            opening = lip_metrics.mouth_opening(centroids, 0, 1)
            curves.append(lip_metrics.lip_sync_offset(envelope, opening, self.max_lag).correlations)
        mean = np.mean(curves, axis=0)
        peak = int(np.argmax(mean))
        return peak - self.max_lag, float(mean[peak] - np.median(mean))

    def __call__(self, model: SpeechWithPrior) -> dict[str, float]:
        model.eval()
        graphdef, state = nnx.split(model)
        targets = [s.codes for s in self.sequences]
        predicted = self.points(graphdef, state, self.predict(graphdef, state, [s.waveform for s in self.sequences]))
        shuffled = self.points(graphdef, state, self.predict(graphdef, state, self.shuffled_audio))
        target = self.points(graphdef, state, targets)
        static = self.points(graphdef, state, [np.broadcast_to(self.mean_codes[s.subject_id], s.codes.shape)
                                               for s in self.sequences])  # fmt: skip
        neutral = self.points(graphdef, state, [np.zeros_like(z) for z in targets])
        every = [True] * len(self.sequences)
        offset, confidence = self._sync(predicted)
        metrics = {
            "eval/lve": self._lve(predicted, target, every),
            "eval/lve_zero_motion": self._lve(static, target, every),
            "eval/lve_neutral": self._lve(neutral, target, every),
            "eval/lve_shuffled_audio": self._lve(shuffled, target, every),
            "eval/sync_offset_frames": float(offset),
            "eval/sync_confidence": confidence,
            "eval/sync_offset_frames_target": float(self._sync(target)[0]),
        }
        for split in EVAL_SPLITS:
            which = [s.split == split for s in self.sequences]
            if any(which):
                metrics[f"eval/lve_{split}"] = self._lve(predicted, target, which)
        return metrics


def training_fps(root: Path, records: loaders.FrameRecords) -> float:
    """The frame rate of the training identities' sequences: the speech model's output rate on this data."""
    info = layout.read_dataset_info(root)
    train_subjects = set(info.get("identities", {}).get("train", ()))
    fps = next((float(row["fps"]) for row in records.sequences if row["subject"] in train_subjects), None)
    if fps is None:
        raise ValueError(f"{root / layout.DATASET_FILE}: no sequence of a training identity (identities.train)")
    return fps


def speech_targets(
    config: ml_collections.ConfigDict, prior_cfg: ml_collections.ConfigDict, prior: UHAP, prior_step: int,
    root: Path, records: loaders.FrameRecords, fps: float, codes_cache: Path,
) -> tuple[list[Sequence], np.ndarray]:  # fmt: skip
    """The train and eval sequences with the prior's codes as targets, and the subjects' scan UV maps."""
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    split = prior_stage.read_split(root, records, prior_cfg.data.num_views)
    tables = prior_stage.subject_tables(root, records, prior, template, prior_cfg)
    sequences = read_sequences(root, records, split.held_in_cameras, fps)
    key = _codes_key(Path(config.prior_workdir), prior_step, root, split.held_in_cameras)
    sequences = expression_codes(prior, records, tables, sequences, split.held_in_cameras,
                                 config.data.code_batch_size, codes_cache, key)  # fmt: skip
    return sequences, tables.scan_maps


def make_evaluator(
    config: ml_collections.ConfigDict, prior_cfg: ml_collections.ConfigDict, prior: UHAP, sequences: list[Sequence],
    scan_maps: np.ndarray, fps: float,
) -> Evaluator:  # fmt: skip
    """The evaluator of the held-out sequences; the zero-motion baseline is each identity's mean code."""
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    lip_ids = lip_gaussian_ids(prior.layout, template)
    mean_codes = {i: np.mean(np.concatenate([s.codes for s in sequences if s.subject_id == i]), axis=0)
                  for i in {s.subject_id for s in sequences}}  # fmt: skip
    return Evaluator([s for s in sequences if s.split != "train"], mean_codes, scan_maps, config, fps, lip_ids,
                     split_lips(prior.layout, template, lip_ids))  # fmt: skip


# ------------------------------------------------------------------------------------- the stage


def train_audio(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the speech model in `workdir` against the prior in `config.prior_workdir`."""
    workdir = Path(workdir)
    if not config.prior_workdir:
        raise ValueError("the audio stage needs a trained prior: pass --config.prior_workdir=<prior workdir>")
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    prior_cfg = prior_config(config)
    prior, prior_step = restore_prior(prior_cfg, config.prior_workdir, mesh)
    logger.info("prior: step %d of %s", prior_step, config.prior_workdir)
    root = prior_stage.dataset_root(prior_cfg)
    records = prior_stage.prepared_records(root, prior_cfg)
    fps = training_fps(root, records)
    sequences, scan_maps = speech_targets(config, prior_cfg, prior, prior_step, root, records, fps,
                                          workdir / CODES_FILE)  # fmt: skip
    multihost_utils.sync_global_devices("uhap audio targets")

    evaluator = make_evaluator(config, prior_cfg, prior, sequences, scan_maps, fps)
    model = build_model(config, prior, fps)
    options = loaders.LoaderOptions(
        global_batch=config.data.batch_size, seed=config.train.seed, num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
    )  # fmt: skip
    train_sequences = [s for s in sequences if s.split == "train"]
    data = window_loader(train_sequences, scan_maps, config.data.window_frames, fps, mesh, options)
    optimizer = prior_stage.make_optimizer(config)
    loss_fn = make_loss_fn(config, evaluator.lip_ids)
    trainer = Trainer(config.train, model, optimizer, loss_fn, data, workdir, mesh=mesh)
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()
