"""The benchmark's avatars: each test identity personalised from its monocular clip alone (no scan, no multi-view
frame, no tracked mesh), as `uhap personalize` does without a scan. It lives here, above `uhap_jax.eval`, because
building an avatar is a fine-tune; `eval.benchmark` only drives and scores them."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import ml_collections

from data_pipelines import layout
from uhap_jax.artifacts.avatars import AVATAR_FILE, load_avatar
from uhap_jax.artifacts.priors import load_prior, restore_speech
from uhap_jax.config_utils import load_config, read_config
from uhap_jax.eval import benchmark
from uhap_jax.train import personalize_stage

logger = logging.getLogger(__name__)


def _monocular_only(path: Path) -> None:
    """An avatar given to the benchmark must have been built without a scan (its avatar.json says so)."""
    manifest = json.loads((path / AVATAR_FILE).read_text())
    details = manifest.get("personalized")
    if not isinstance(details, dict) or details.get("scan") is not False:
        raise ValueError(f"{path / AVATAR_FILE}: not an avatar personalised from a monocular video without "
                         "a scan; the benchmark's avatars must be (delete it to have it rebuilt)")  # fmt: skip


def build(prior: Path, encoder: Path, audio: Path, root: Path, out: Path, config: ml_collections.ConfigDict,
          subjects: list[str] | None = None) -> dict[str, Path]:  # fmt: skip
    """`out/avatar_<id>` for every test identity (built once; an existing one is reused if it was built from the
    monocular video alone), its fine-tune in `out/avatar_<id>.work`."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.use_scan, config.scan, config.workdir = False, "", ""
    subjects = subjects or benchmark.read_split(root).test_identities
    avatars = {}
    for subject in subjects:
        path = Path(out) / f"avatar_{subject}"
        if not (path / AVATAR_FILE).is_file():
            logger.info("benchmark: personalising %s from its monocular clip alone", subject)
            work = path.with_name(path.name + ".work")
            result = personalize_stage.personalize(prior, encoder, layout.subject_dir(root, subject), path, config,
                                                   audio_workdir=audio, workdir=work)  # fmt: skip
            if result.preempted:
                raise RuntimeError(f"preempted while personalising {subject}: run again to resume")
        _monocular_only(path)
        avatars[subject] = path
    return avatars


def load(path: Path) -> benchmark.TestAvatar:
    avatar = load_avatar(path)
    return benchmark.TestAvatar(avatar.prior, avatar.scan_maps, avatar.speech)


def run_benchmark(prior: Path, encoder: Path, audio: Path, root: Path, out: Path,
                  personalize_config: ml_collections.ConfigDict, *, lpips_weights: Path | None = None,
                  syncnet_weights: Path | None = None, max_lag: int = 5, prior_frames: int = 8,
                  avatars_dir: Path | None = None) -> dict:  # fmt: skip
    """The whole protocol: avatars from the monocular clips (in `avatars_dir`, default `out`), the benchmark table
    with its baselines, the prior's reconstruction by split; written to `out` (benchmark.json / .csv /
    _table.csv). Returns the result."""
    from uhap_jax.eval import syncnet
    from uhap_jax.models import losses

    root, out = Path(root), Path(out)
    paths = build(prior, encoder, audio, root, Path(avatars_dir or out), personalize_config)
    avatars = {subject: load(path) for subject, path in paths.items()}
    base, prior_cfg, template, _ = load_prior(prior)
    tracked = float(prior_cfg.loss.get("tracked_mesh", 0.0)) > 0
    lpips_model = losses.load_lpips(lpips_weights) if lpips_weights else None
    syncnet_model = syncnet.load_syncnet(syncnet_weights) if syncnet_weights else None
    result = benchmark.run(root, avatars, template, benchmark.Oracle(base, tracked), lpips_model=lpips_model,
                           syncnet_model=syncnet_model, max_lag=max_lag)  # fmt: skip
    result["prior_reconstruction"] = benchmark.prior_reconstruction(root, base, template, tracked, frames=prior_frames)
    result["inputs"] = {"prior": str(prior), "encoder": str(encoder), "audio_model": str(audio), "data": str(root),
                        "avatars": {s: str(p) for s, p in paths.items()}, "tracked_mesh_oracle": tracked}  # fmt: skip
    benchmark.write(result, out)
    return result


def sweep_benchmark(settings: ml_collections.ConfigDict, out: Path) -> Callable[[Path, Path, Path], dict]:
    """`uhap sweep`'s benchmark setting: `fn(audio_checkpoint, dataset_root, job_out)` scores a speech-model
    checkpoint by the protocol and returns `benchmark.flat_metrics` of it (`benchmark/lve_mm2`, ...). The held-out
    identities' avatars are built once per (prior, encoder, personalisation config, dataset) under `out` from their
    monocular clips, so every checkpoint drives the same avatars with its own speech model."""
    personalize_config = load_config(settings.personalize_config, list(settings.personalize_overrides))
    encoder = Path(settings.encoder)

    def score(checkpoint: Path, root: Path, job_out: Path) -> dict[str, float]:
        prior_path = Path(read_config(Path(checkpoint) / "config.json").prior_workdir)
        # Everything the avatars depend on; the speech model they were built with is replaced below.
        sources = f"{prior_path.resolve()}|{encoder.resolve()}|{personalize_config.to_json()}|{Path(root).resolve()}"
        key = hashlib.sha256(sources.encode()).hexdigest()[:12]
        paths = build(prior_path, encoder, Path(checkpoint), Path(root), Path(out) / f"avatars_{key}",
                      personalize_config)  # fmt: skip
        base, prior_cfg, template, _ = load_prior(prior_path)
        avatars = {}
        for subject, path in paths.items():
            avatar = load(path)
            speech, _ = restore_speech(checkpoint, base, avatar.speech.config.fps)
            avatars[subject] = benchmark.TestAvatar(avatar.prior, avatar.scan_maps, speech)
        tracked = float(prior_cfg.loss.get("tracked_mesh", 0.0)) > 0
        result = benchmark.run(Path(root), avatars, template, benchmark.Oracle(base, tracked),
                               max_lag=settings.max_lag)  # fmt: skip
        benchmark.write(result, job_out)
        return benchmark.flat_metrics(result)

    return score
