"""The audio stage's evaluation: the speech model's lip vertex error against the prior's codes on held-out
sentences and identities, beside zero-motion, neutral and shuffled-audio baselines, and the audio-mouth sync.

It scores the decoded prediction against the decoded target, so it measures the speech model alone, not the
prior's reconstruction error: `eval/lve` (mm², FaceFormer's LVE on the lip Gaussians); the same for a zero-motion
baseline, a static face at the identity's mean code over all its loaded frames, `eval/lve_zero_motion`, for the
neutral face (z = 0) `eval/lve_neutral`, and for the model run on another sentence's audio
`eval/lve_shuffled_audio`; and `eval/sync_offset_frames`, the lag of peak correlation between the audio's RMS
envelope and the decoded mouth opening, pooled over sequences (`eval/sync_offset_frames_target` is the same for
the decoded targets: how in sync the data itself is). The audio stage calls it; so do `uhap eval` and sweeps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.artifacts.expression_codes import speech_targets
from uhap_jax.artifacts.priors import load_prior, restore_speech
from uhap_jax.config_utils import load_config, read_config
from uhap_jax.eval import lip_metrics
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import lip_gaussian_ids, split_lips
from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.frozen_prior import SpeechWithPrior
from uhap_jax.models.prior import UHAP


def prior_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The prior's config (`prior_config` + `prior_overrides`), pointed at the audio config's data if it names any."""
    prior = load_config(config.prior_config, list(config.prior_overrides))
    return dataset_lib.with_data_of(prior, config, "the audio config's data")


class Evaluator:
    """LVE of the model, a zero-motion and a shuffled-audio baseline, and the audio-mouth sync offset.

    Sequences are cut into windows of the training length (the last one aligned to the sequence's end) and run
    in batches of a fixed size, so each jitted function compiles once. A sequence shorter than the window runs
    whole at its own length, as `uhap animate` runs a clip that fits one window (a short sentence of a fast voice
    is no reason to stop a training run).
    """

    def __init__(
        self, sequences: list[dataset_lib.Sequence], mean_codes: dict[int, np.ndarray], scan_maps: np.ndarray,
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
        too_short = [s.key for s in sequences if s.num_frames < 2 * self.max_lag + 3]
        if too_short:
            raise ValueError(f"eval sequences {too_short} are shorter than the {2 * self.max_lag + 3} frames that "
                             f"eval.max_lag={self.max_lag} needs; lower eval.max_lag")  # fmt: skip
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
            if s.num_frames >= window
            for start in sorted({*range(0, s.num_frames - window + 1, window), s.num_frames - window})
        ]
        outputs = []
        for batch in self._batches(starts, starts[-1]) if starts else []:
            audio = np.stack(
                [dataset_lib.window_audio(waveforms[i], start, num_samples, self.fps) for i, start in batch]
            )
            outputs.extend(np.asarray(self._predict(graphdef, state, audio, window)))
        codes = [np.zeros_like(s.codes) for s in self.sequences]
        for (i, start), predicted in zip(starts, outputs):
            codes[i][start : start + window] = predicted
        for i, s in enumerate(self.sequences):
            if s.num_frames < window:
                whole = dataset_lib.window_audio(
                    waveforms[i], 0, round(s.num_frames * SAMPLE_RATE / self.fps), self.fps
                )
                codes[i][:] = np.asarray(self._predict(graphdef, state, whole[None], s.num_frames))[0]
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
        for split in dataset_lib.EVAL_SPLITS:
            which = [s.split == split for s in self.sequences]
            if any(which):
                metrics[f"eval/lve_{split}"] = self._lve(predicted, target, which)
        return metrics


def make_evaluator(
    config: ml_collections.ConfigDict, prior_cfg: ml_collections.ConfigDict, prior: UHAP,
    sequences: list[dataset_lib.Sequence], scan_maps: np.ndarray, fps: float,
) -> Evaluator:  # fmt: skip
    """The evaluator of the held-out sequences; the zero-motion baseline is each identity's mean code."""
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    lip_ids = lip_gaussian_ids(prior.layout, template)
    mean_codes = {i: np.mean(np.concatenate([s.codes for s in sequences if s.subject_id == i]), axis=0)
                  for i in {s.subject_id for s in sequences}}  # fmt: skip
    return Evaluator([s for s in sequences if s.split != "train"], mean_codes, scan_maps, config, fps, lip_ids,
                     split_lips(prior.layout, template, lip_ids))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SpeechCheckpoint:
    """An audio-stage workdir: its config, the prior it was trained against (restored as the stage does)."""

    path: Path
    config: ml_collections.ConfigDict
    prior_config: ml_collections.ConfigDict
    prior: UHAP
    prior_step: int


def load_speech_checkpoint(path: Path, mesh: jax.sharding.Mesh) -> SpeechCheckpoint:
    """An audio workdir's config and the prior it names, on `mesh`."""
    config = read_config(path / "config.json")
    prior_cfg = prior_config(config)
    prior, _, _, prior_step = load_prior(config.prior_workdir, mesh, config=prior_cfg)
    return SpeechCheckpoint(path, config, prior_cfg, prior, prior_step)


def speech_metrics(checkpoint: SpeechCheckpoint, root: Path, records: loaders.FrameRecords, codes_cache: Path,
                   mesh: jax.sharding.Mesh) -> tuple[dict[str, float], int]:  # fmt: skip
    """The audio stage's eval metrics (`eval/lve`, its baselines, sync offset...) of the latest speech model on
    the dataset's held-out sequences; and the speech model's step."""
    config, prior_cfg, prior = checkpoint.config, checkpoint.prior_config, checkpoint.prior
    fps = dataset_lib.training_fps(root, records)
    speech, step = restore_speech(checkpoint.path, prior, fps)
    sequences, scan_maps = speech_targets(config, prior_cfg, prior, checkpoint.prior_step, root, records, fps,
                                          codes_cache)  # fmt: skip
    evaluator = make_evaluator(config, prior_cfg, prior, sequences, scan_maps, fps)
    with jax.set_mesh(mesh):
        return evaluator(SpeechWithPrior(speech, prior)), step
