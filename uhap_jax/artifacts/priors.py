"""Trained models back from disk, parameters only (no optimiser): the prior from a training workdir or an inference
bundle (`load_prior`, the one prior loader), a bundle exported from a workdir, the speech model of an audio
workdir, the MonoEncoder of an encoder workdir, and the prior's albedo population.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from uhap_jax.artifacts import output_dirs
from uhap_jax.artifacts.bundles import BUNDLE_FILE, DTYPES, load_bundle, load_template, save_bundle
from uhap_jax.artifacts.checkpoints import restore_latest, single_device_mesh
from uhap_jax.config_utils import read_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.audio_to_latent import AudioToLatent
from uhap_jax.models.frozen_prior import EncoderWithPrior, build_encoder, build_localiser, build_speech_model
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.population import POPULATION_FILE, AlbedoPopulation
from uhap_jax.models.prior import UHAP, build_prior

logger = logging.getLogger(__name__)


def load_prior(path: str | Path, mesh: jax.sharding.Mesh | None = None, *,
               config: ml_collections.ConfigDict | None = None,
               ) -> tuple[UHAP, ml_collections.ConfigDict, template_lib.Template, int]:  # fmt: skip
    """A prior from a training workdir (its latest checkpoint) or an inference bundle, replicated on `mesh` (default:
    one device): model, config, template and step. Whatever mesh or process count wrote it, it loads here.

    `config`, for a workdir: the prior config to build (the audio stage's `prior_config` + `prior_overrides`)
    instead of the workdir's config.json; a checkpoint of another structure is then an error that says so.
    """
    path = Path(path)
    if (path / BUNDLE_FILE).is_file():
        prior, bundle_config = load_bundle(path, mesh)
        step = int(json.loads((path / BUNDLE_FILE).read_text()).get("step", 0))
        return prior, bundle_config, load_template(path / "template.npz"), step
    if not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path / 'checkpoints'}: no prior checkpoints, and no {BUNDLE_FILE}: {path} is "
                                "neither a prior workdir nor an inference bundle")  # fmt: skip
    if config is None:
        config, expect = read_config(path / "config.json"), str(path / "config.json")
    else:
        expect = (f"the prior config {config.get('preset', '')!r} with the given prior_overrides; pass the overrides "
                  "the prior was trained with")  # fmt: skip
    template = template_lib.procedural_head(config.model.template_resolution)
    model, step = restore_latest(path, build_prior(template, config), mesh or single_device_mesh(), what="prior",
                                 expect=expect)  # fmt: skip
    return model, config, template, step


def export_bundle(workdir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write an inference bundle of the latest checkpoint in `workdir` to `out` (replaced only when complete)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    model, config, template, step = load_prior(workdir)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    manifest = {"kind": "uhap_prior", "step": step, "dtype": dtype, "source": str(Path(workdir).absolute())}
    with output_dirs.replacing(Path(out), "bundle", inputs=[workdir]) as staging:  # never a workdir, never foreign
        save_bundle(params, config, template, staging, manifest)
        if (Path(workdir) / POPULATION_FILE).is_file():
            shutil.copy(Path(workdir) / POPULATION_FILE, staging / POPULATION_FILE)
    return Path(out)


def restore_speech(audio_workdir: str | Path, prior: UHAP, fps: float) -> tuple[AudioToLatent, int]:
    """The speech model of the latest checkpoint of an audio workdir (`uhap train audio`), and its step.

    The checkpoint holds the speech model beside the frozen prior it was trained against; `prior` fixes the
    latent size and fills the prior's half of the structure. `fps` is that of the training data.
    """
    workdir = Path(audio_workdir)
    config = read_config(workdir / "config.json")
    model, step = restore_latest(workdir, build_speech_model(config, prior, fps), single_device_mesh(),
                                 what="speech-model", expect=f"{workdir / 'config.json'} and the prior")  # fmt: skip
    speech = model.speech
    speech.eval()
    return speech, step


def restore_encoder_model(encoder_workdir: str | Path, prior: UHAP) -> tuple[EncoderWithPrior, int]:
    """The latest checkpoint of an encoder workdir (the MonoEncoder, and its head localiser where it was trained
    with one), and its step, on one device.

    `prior` (not modified) fixes z_dim and the frozen half of the checkpoint's structure; it should be the
    prior the encoder was trained against (`encoder_info.json` says which), or the codes mean nothing.
    """
    workdir = Path(encoder_workdir)
    config = read_config(workdir / "config.json")
    model = EncoderWithPrior(build_encoder(config, prior), nnx.clone(prior), build_localiser(config))
    return restore_latest(workdir, model, single_device_mesh(), what="encoder",
                          expect=f"{workdir / 'config.json'} and the given prior")  # fmt: skip


def restore_encoder(encoder_workdir: str | Path, prior: UHAP) -> tuple[MonoEncoder, int]:
    """The MonoEncoder of the latest checkpoint of an encoder workdir, and its step (`restore_encoder_model`)."""
    model, step = restore_encoder_model(encoder_workdir, prior)
    return model.encoder, step


def load_population(path: str | Path) -> AlbedoPopulation | None:
    """The albedo population beside a prior workdir's checkpoints or in its bundle (None, with a warning, for a
    prior trained before the prior stage wrote one)."""
    file = Path(path) / POPULATION_FILE
    if file.is_file():
        return AlbedoPopulation.load(file)
    logger.warning("%s: missing; without a scan the albedo is the video's alone (each region's mean where unseen)",
                   file)  # fmt: skip
    return None
