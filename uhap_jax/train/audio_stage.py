"""The audio stage: a universal speech model (AudioToLatent) learns to predict a trained prior's expression codes.

Targets are the prior's posterior means (its ExpressionEncoder on every held-in view of each frame), computed
once per prior checkpoint and cached in `<workdir>/expression_codes.npz` (`artifacts.expression_codes`). Training
windows are runs of `data.window_frames` frames of the `train`-split sequences of the training identities, with
their audio cut to the same span. The loss is the latent MSE, the velocity MSE and the lip geometry of the decoded
avatar: the prediction and the target are both decoded, by the frozen prior with the subject's identity and no
head pose, and the lip Gaussians (texels on the template's "lips" region) are compared in mm².

Evaluation (every `eval.every` steps and at the end) is `uhap_jax.eval.audio_eval`'s, on the held-out sentences
of training identities and the sequences of held-out identities (`dataset.json`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.artifacts.expression_codes import CODES_FILE, speech_targets
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.eval import audio_eval
from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.audio_to_latent import latent_mse, velocity_loss
from uhap_jax.models.frozen_prior import SpeechWithPrior, build_speech_model
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh
from uhap_jax.train.optimizer import make_optimizer

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CutWindow(grain.transforms.RandomMap):
    """(sequence index, first frame) -> audio [S], target codes [K, z_dim] and the subject's scan UV maps.

    With `speed` > 0 each window is played at a random rate in [1 - speed, 1 + speed]: the audio resampled and
    the codes interpolated on the same clock, so they stay in sync while the voice's pitch and formants move
    (speed perturbation): a few training voices stand for more, and unseen voices are less foreign.
    """

    sequences: tuple[dataset_lib.Sequence, ...]
    scan_maps: np.ndarray  # [subjects, R, R, 6]
    window_frames: int
    fps: float
    speed: float = 0.0

    def random_map(self, element: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sequence = self.sequences[int(element[0])]
        start = int(element[1])
        num_samples = round(self.window_frames * SAMPLE_RATE / self.fps)
        rate = float(rng.uniform(1.0 - self.speed, 1.0 + self.speed)) if self.speed > 0 else 1.0
        return {
            **speed_window(sequence.waveform, sequence.codes, start, self.window_frames, num_samples, self.fps, rate),
            "scan_maps": self.scan_maps[sequence.subject_id],
        }


def speed_window(waveform: np.ndarray, codes: np.ndarray, start: int, frames: int, num_samples: int, fps: float,
                 rate: float) -> dict[str, np.ndarray]:  # fmt: skip
    """`frames` codes and `num_samples` of audio from frame `start` on, played `rate` times as fast (1: as they
    are; linear interpolation of both, past the end the last code and silence)."""
    if rate == 1.0:
        return {"audio": dataset_lib.window_audio(waveform, start, num_samples, fps),
                "codes": codes[start : start + frames].astype(np.float32)}  # fmt: skip
    span = int(np.ceil(num_samples * rate)) + 1
    source = dataset_lib.window_audio(waveform, start, span, fps).astype(np.float64)
    audio = np.interp(np.arange(num_samples) * rate, np.arange(span), source)
    times = np.minimum(start + np.arange(frames) * rate, len(codes) - 1)
    lower = np.floor(times).astype(int)
    upper, weight = np.minimum(lower + 1, len(codes) - 1), (times - lower)[:, None]
    mixed = (1.0 - weight) * codes[lower].astype(np.float64) + weight * codes[upper].astype(np.float64)
    return {"audio": audio.astype(np.float32), "codes": mixed.astype(np.float32)}


def window_loader(
    sequences: list[dataset_lib.Sequence], scan_maps: np.ndarray, window_frames: int, fps: float, mesh,
    options: loaders.LoaderOptions, speed: float = 0.0,
) -> loaders.GlobalBatchIterator:  # fmt: skip
    """Shuffled windows at every start frame of every sequence, batched into global arrays; checkpointable."""
    starts = [(i, f) for i, s in enumerate(sequences) for f in range(s.num_frames - window_frames + 1)]
    if not starts:
        raise ValueError(f"no training sequence has data.window_frames={window_frames} frames")
    cut = CutWindow(tuple(sequences), scan_maps, window_frames, fps, speed)
    return loaders.build_loader(grain.MapDataset.source(np.asarray(starts, np.int64)), lambda d: d.random_map(cut),
                                batch_sharding(mesh), options)  # fmt: skip


# ------------------------------------------------------------------------------------- model and loss


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


# ------------------------------------------------------------------------------------- the stage


def train_audio(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the speech model in `workdir` against the prior in `config.prior_workdir`."""
    workdir = Path(workdir)
    if not config.prior_workdir:
        raise ValueError("the audio stage needs a trained prior: pass --config.prior_workdir=<prior workdir>")
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    prior_cfg = audio_eval.prior_config(config)
    prior, _, _, prior_step = load_prior(config.prior_workdir, mesh, config=prior_cfg)
    logger.info("prior: step %d of %s", prior_step, config.prior_workdir)
    root = dataset_lib.dataset_root(prior_cfg)
    records = dataset_lib.prepared_records(root, prior_cfg)
    fps = dataset_lib.training_fps(root, records)
    sequences, scan_maps = speech_targets(config, prior_cfg, prior, prior_step, root, records, fps,
                                          workdir / CODES_FILE)  # fmt: skip
    multihost_utils.sync_global_devices("uhap audio targets")

    evaluator = audio_eval.make_evaluator(config, prior_cfg, prior, sequences, scan_maps, fps)
    model = build_speech_model(config, prior, fps)
    options = dataset_lib.loader_options(config)
    train_sequences = [s for s in sequences if s.split == "train"]
    data = window_loader(train_sequences, scan_maps, config.data.window_frames, fps, mesh, options,
                         config.data.get("speed_perturbation", 0.0))  # fmt: skip
    optimizer = make_optimizer(config)
    loss_fn = make_loss_fn(config, evaluator.lip_ids)
    trainer = Trainer(config.train, model, optimizer, loss_fn, data, workdir, mesh=mesh)
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()
