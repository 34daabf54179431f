"""The models that learn beside a frozen prior: the speech model (audio stage) and the monocular encoder (encoder
stage). Their checkpoints hold both halves, so restoring either needs the prior to fill the frozen one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax import nnx

from uhap_jax.models.audio_to_latent import AudioToLatent, AudioToLatentConfig, build_audio_to_latent, freeze
from uhap_jax.models.head_localiser import HeadLocaliser
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.prior import UHAP

_MM = 1e3  # metres -> millimetres


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


def build_speech_model(config: ml_collections.ConfigDict, prior: UHAP, fps: float) -> SpeechWithPrior:
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


class EncoderWithPrior(nnx.Module):
    """The MonoEncoder being trained beside the frozen prior that renders its predictions, and the head localiser
    that places it in a video file's frames (None for an encoder trained without one)."""

    def __init__(self, encoder: MonoEncoder, prior: UHAP, localiser: HeadLocaliser | None = None):
        freeze(prior)
        self.encoder = encoder
        self.prior = prior
        self.localiser = localiser


def build_encoder(config: ml_collections.ConfigDict, prior: UHAP) -> MonoEncoder:
    """The MonoEncoder of `config.model` for the prior's latent size."""
    return MonoEncoder(prior.z_dim, config.model, rngs=nnx.Rngs(config.train.seed))


def build_localiser(config: ml_collections.ConfigDict) -> HeadLocaliser | None:
    """The HeadLocaliser of `config.localiser`; None where it is off or the config predates it."""
    section = config.get("localiser")
    if section is None or not section.enabled:
        return None
    return HeadLocaliser(section, rngs=nnx.Rngs(config.train.seed + 1))
