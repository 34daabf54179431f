"""One checkpoint's metrics, as its stage's own evaluation computes them (what `uhap eval` prints)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from data_pipelines import dataset as dataset_lib
from uhap_jax.artifacts.checkpoints import single_device_mesh
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.eval import audio_eval, sweep


def _data(config: ml_collections.ConfigDict, data: Path | None, cache_dir: Path | None) -> ml_collections.ConfigDict:
    """The checkpoint's data section, pointed at `data` / `cache_dir` when given."""
    config = ml_collections.ConfigDict(config.to_dict())
    if data is not None:
        config.data.root = str(data)
    if cache_dir is not None:
        config.data.cache_dir = str(cache_dir)
    return config


def evaluate_checkpoint(path: str | Path, *, data: Path | None = None, cache_dir: Path | None = None
                        ) -> dict[str, float]:  # fmt: skip
    """A speech-model workdir: LVE (mm²) with its zero-motion, neutral and shuffled-audio baselines, per split, and
    the lip-sync offset; a prior workdir or bundle: held-out-view PSNR/SSIM and neutral-scan Chamfer (mm)."""
    path = Path(path)
    mesh = single_device_mesh()
    if sweep.checkpoint_kind(path) == "audio":
        checkpoint = audio_eval.load_speech_checkpoint(path, mesh)
        config = _data(checkpoint.prior_config, data, cache_dir)
        root = dataset_lib.dataset_root(config)
        records = dataset_lib.prepared_records(root, config)
        metrics, step = audio_eval.speech_metrics(checkpoint, root, records, path / "eval_codes.npz", mesh)
    else:
        model, train_config, template, step = load_prior(path, mesh)
        config = _data(train_config, data, cache_dir)
        root = dataset_lib.dataset_root(config)
        records = dataset_lib.prepared_records(root, config)
        job = sweep.Job(0, str(path), str(root), {"image_scale": 1.0, "num_views": 0})
        sweep_config = ml_collections.ConfigDict({"eval": {"num_frames": config.eval.num_frames,
                                                           "batch_size": config.eval.batch_size}})  # fmt: skip
        metrics = sweep.evaluate_job(job, model, config, template, root, records, sweep_config, mesh)
    return {"step": float(step), **{name.removeprefix("eval/"): float(value) for name, value in metrics.items()}}
