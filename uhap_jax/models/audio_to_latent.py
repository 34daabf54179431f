"""The universal speech model: raw audio, from any speaker, to per-frame UHAP expression codes z_t.

    waveform [B, S] at 16 kHz -> AudioEncoder (wav2vec2/HuBERT, 50 Hz) -> linear resampling to the video fps
    -> temporal transformer -> z [B, num_frames, latent_dim]

It is person-agnostic: no identity input. The encoder may be frozen, fine-tuned from a pretrained checkpoint, or
trained from scratch (`encoder_mode`). A frozen encoder's weights become `FrozenParam`s, not `nnx.Param`s, so the
training loop (which differentiates and optimises `nnx.Param` only) neither computes their gradients nor keeps
optimiser state for them, and its dropout is off. The transformer's positions are rotary (RoPE) on time in units
of 1/25 s, so that one model runs at any fps and any length and means the same time offsets at each.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uhap_jax.models.audio_encoder import SAMPLE_RATE, AudioEncoder

EncoderMode = Literal["frozen", "finetune", "scratch"]
_ENCODER_MODES = ("frozen", "finetune", "scratch")
_ROPE_TIME_UNIT_FPS = 25.0  # rotary positions count 40 ms steps, whatever the fps


@dataclasses.dataclass(frozen=True)
class AudioToLatentConfig:
    """The speech model's hyper-parameters (the encoder's own come from its transformers config)."""

    latent_dim: int = 128
    fps: float = 25.0
    width: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    causal: bool = False
    dropout: float = 0.1
    encoder_mode: EncoderMode = "finetune"
    # Which encoder output feeds the transformer: -1 the last hidden state, k >= 0 hidden_states[k].
    encoder_layer: int = -1
    rope_base: float = 10_000.0

    def __post_init__(self):
        if self.encoder_mode not in _ENCODER_MODES:
            raise ValueError(f"encoder_mode {self.encoder_mode!r} is not one of {_ENCODER_MODES}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.num_heads} heads of even size (RoPE)")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    @classmethod
    def from_config_dict(cls, config: ml_collections.ConfigDict) -> AudioToLatentConfig:
        """From a stage config's `model` section; unknown fields are an error, missing ones take defaults."""
        values = config.to_dict()
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"AudioToLatent config has unknown fields {unknown}")
        return cls(**values)


# ----------------------------------------------------------------------------------------- resampling


def resample_features(
    features: jax.Array,
    num_frames: int,
    fps: float,
    feature_rate: float = 50.0,
    feature_offset_s: float = 0.0,
) -> jax.Array:
    """[B, T, D] features at `feature_rate` Hz -> [B, num_frames, D] at `fps`, by linear interpolation in time.

    Feature j describes time feature_offset_s + j / feature_rate (the centre of its receptive field); video
    frame k is the interval [k / fps, (k + 1) / fps), sampled at its centre. Frames outside the features' span
    take the nearest feature. The counts are exact for any fps: `num_frames` is given, never rounded from
    the audio length. jit-able (num_frames is static).
    """
    num_features = features.shape[1]
    frame_times = (jnp.arange(num_frames, dtype=jnp.float32) + 0.5) / fps
    position = jnp.clip((frame_times - feature_offset_s) * feature_rate, 0.0, num_features - 1)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, num_features - 1)
    weight = (position - below)[None, :, None].astype(features.dtype)
    return (1 - weight) * features[:, below] + weight * features[:, above]


def to_16k_mono(audio: Any, sample_rate: float, source: str = "audio") -> tuple[np.ndarray, str]:
    """Any audio array -> float32 mono at 16 kHz, and a note saying what was changed (or that nothing was).

    `audio` is [samples] or [samples, channels] (the layout of scipy and soundfile), or [channels, samples]
    with at most 8 channels (torchaudio's); integer PCM is scaled to [-1, 1); channels are averaged; the rate
    is changed with a polyphase filter. `source` names the input in the note and in errors.
    """
    audio = np.asarray(audio)
    steps = []
    if audio.ndim == 2:
        channel_axis = 1 if audio.shape[1] <= audio.shape[0] else 0
        if audio.shape[channel_axis] > 8:
            raise ValueError(f"{source}: shape {audio.shape} has no channel axis of at most 8 channels")
        channels = audio.shape[channel_axis]
        audio = np.moveaxis(audio, channel_axis, 1)
    elif audio.ndim == 1:
        audio, channels = audio[:, None], 1
    else:
        raise ValueError(f"{source}: expected [samples] or [samples, channels], got shape {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError(f"{source}: holds no samples")

    if np.issubdtype(audio.dtype, np.integer):
        info = np.iinfo(audio.dtype)
        half_range = (int(info.max) + 1) / 2 if info.min == 0 else int(info.max) + 1
        zero = half_range if info.min == 0 else 0.0  # unsigned PCM (8-bit WAV) is offset binary
        audio = (audio.astype(np.float64) - zero) / half_range
        steps.append(f"scaled {info.dtype} PCM to [-1, 1)")
    elif not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{source}: samples of dtype {audio.dtype} are neither integer PCM nor float")
    audio = audio.astype(np.float64)
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"{source}: holds NaN or inf samples")

    if channels > 1:
        steps.append(f"mixed {channels} channels down to mono")
    mono = audio.mean(axis=1)

    if not sample_rate > 0:
        raise ValueError(f"{source}: sample rate must be positive, got {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        from scipy import signal

        ratio = fractions.Fraction(SAMPLE_RATE) / fractions.Fraction(sample_rate).limit_denominator(1000)
        mono = signal.resample_poly(mono, ratio.numerator, ratio.denominator)
        steps.append(f"resampled {sample_rate:g} Hz -> {SAMPLE_RATE} Hz")
    note = f"{source}: " + ("; ".join(steps) if steps else f"already {SAMPLE_RATE // 1000} kHz mono float")
    return mono.astype(np.float32), note


# ----------------------------------------------------------------------------------------- the transformer


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """RoPE (Su et al., 2021) on [B, T, heads, head_dim]: rotates channel pairs by angles ∝ position."""
    half = x.shape[-1] // 2
    frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None] * frequencies[None, :]  # [T, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1).astype(x.dtype)


class TemporalAttention(nnx.Module):
    """Multi-head self-attention over frames with rotary positions, optionally causal."""

    def __init__(self, config: AudioToLatentConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.causal = config.causal
        self.rope_base = config.rope_base
        self.qkv = nnx.Linear(config.width, 3 * config.width, rngs=rngs)
        self.out = nnx.Linear(config.width, config.width, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3 * self.num_heads, -1), 3, axis=2)
        q = rotary_embedding(q, positions, self.rope_base)
        k = rotary_embedding(k, positions, self.rope_base)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(attended.reshape(batch, length, width))


class TemporalLayer(nnx.Module):
    """A pre-norm transformer layer: x + attention(norm(x)), then x + MLP(norm(x)), with residual dropout."""

    def __init__(self, config: AudioToLatentConfig, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.attention = TemporalAttention(config, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.mlp_in = nnx.Linear(config.width, config.mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(config.mlp_dim, config.width, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attention(self.attention_norm(x), positions))
        return x + self.dropout(self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x)))))


# ----------------------------------------------------------------------------------------- the model


class FrozenParam(nnx.Variable):
    """A weight of a frozen encoder: not an `nnx.Param`, so no gradient and no optimiser state."""


def freeze(module: nnx.Module) -> None:
    """Turns every `nnx.Param` under `module` into a `FrozenParam` and its dropout off, in place."""
    for path, variable in list(nnx.iter_graph(module)):
        if isinstance(variable, nnx.Param):
            parent = module
            for name in path[:-1]:
                parent = parent[name] if isinstance(name, int) else getattr(parent, name)
            frozen = FrozenParam(variable.get_value())
            if isinstance(path[-1], int):
                parent[path[-1]] = frozen
            else:
                setattr(parent, path[-1], frozen)
    for _, submodule in nnx.iter_modules(module):
        if isinstance(submodule, nnx.Dropout):
            submodule.rate = 0.0


class AudioToLatent(nnx.Module):
    """[B, samples] 16 kHz waveform -> [B, num_frames, latent_dim] expression codes at `config.fps`."""

    def __init__(self, config: AudioToLatentConfig, encoder: AudioEncoder, *, rngs: nnx.Rngs):
        if config.encoder_mode == "frozen":
            freeze(encoder)
        num_outputs = encoder.config.num_hidden_layers + 1
        if not -1 <= config.encoder_layer < num_outputs:
            raise ValueError(f"encoder_layer {config.encoder_layer} is not -1 or in [0, {num_outputs})")
        self.config = config
        self.encoder = encoder
        self.input_projection = nnx.Linear(encoder.config.hidden_size, config.width, rngs=rngs)
        self.input_dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.layers = nnx.List([TemporalLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.output_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.head = nnx.Linear(config.width, config.latent_dim, rngs=rngs)

    def features(self, waveform: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The encoder's chosen output at 50 Hz, [B, T', hidden_size]; no gradient when frozen."""
        output = self.encoder.encode(waveform, attention_mask)
        layer = self.config.encoder_layer
        features = output.last_hidden_state if layer == -1 else output.hidden_states[layer]
        if self.config.encoder_mode == "frozen":
            features = jax.lax.stop_gradient(features)
        return features

    def __call__(self, waveform: jax.Array, num_frames: int, attention_mask: jax.Array | None = None) -> jax.Array:
        """`num_frames` video frames at config.fps; the waveform should cover num_frames / fps seconds.

        `attention_mask` [B, S] marks real samples for the encoder; the temporal transformer attends over all
        frames, so mask the frames of padded audio out of the loss (`latent_mse(..., mask)`).
        """
        encoder_config = self.encoder.config
        feature_rate = SAMPLE_RATE / math.prod(encoder_config.conv_stride)
        # Feature j is computed from samples [j·stride, j·stride + receptive field): its centre is the offset.
        feature_offset_s = encoder_config.min_num_samples() / 2 / SAMPLE_RATE
        covered_s = waveform.shape[1] / SAMPLE_RATE
        if num_frames / self.config.fps > covered_s + 1.0 / self.config.fps:
            raise ValueError(
                f"{num_frames} frames at {self.config.fps} fps last {num_frames / self.config.fps:.3f} s, "
                f"but the waveform holds only {covered_s:.3f} s"
            )
        features = self.features(waveform, attention_mask)
        features = resample_features(features, num_frames, self.config.fps, feature_rate, feature_offset_s)
        x = self.input_dropout(self.input_projection(features))
        positions = jnp.arange(num_frames, dtype=jnp.float32) * (_ROPE_TIME_UNIT_FPS / self.config.fps)
        for layer in self.layers:
            x = layer(x, positions)
        return self.head(self.output_norm(x))


def build_audio_to_latent(
    config: AudioToLatentConfig,
    *,
    rngs: nnx.Rngs,
    encoder_path: str | os.PathLike | None = None,
    encoder_hf_config: Any = None,
) -> AudioToLatent:
    """The model for `config.encoder_mode`: "frozen"/"finetune" load the local pretrained folder `encoder_path`
    (transformers layout, never downloaded); "scratch" initialises the encoder from `encoder_hf_config`."""
    if config.encoder_mode == "scratch":
        if encoder_hf_config is None or encoder_path is not None:
            raise ValueError("encoder_mode 'scratch' takes encoder_hf_config (a transformers config), no encoder_path")
        encoder = AudioEncoder.from_config(encoder_hf_config, rngs=rngs)
    else:
        if encoder_path is None or encoder_hf_config is not None:
            raise ValueError(f"encoder_mode {config.encoder_mode!r} takes encoder_path (a local model folder)")
        encoder = AudioEncoder.from_pretrained(encoder_path)
        if config.encoder_mode == "finetune":
            encoder.train()
    return AudioToLatent(config, encoder, rngs=rngs)


# ----------------------------------------------------------------------------------------- losses


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over all entries of [B, T, ...] values, counting only frames where mask [B, T] is True."""
    if mask is None:
        return jnp.mean(values)
    mask = jnp.reshape(mask, mask.shape + (1,) * (values.ndim - mask.ndim)).astype(values.dtype)
    count = jnp.sum(jnp.broadcast_to(mask, values.shape))
    return jnp.sum(values * mask) / jnp.maximum(count, 1.0)


def latent_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error of z over frames [B, T, latent_dim] (mask [B, T] marks real frames)."""
    return _masked_mean((pred - target) ** 2, mask)


def velocity_loss(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error of the frame-to-frame change of z: penalises jitter and lag the MSE barely sees."""
    pair_mask = None if mask is None else mask[:, 1:] & mask[:, :-1]
    return _masked_mean((jnp.diff(pred, axis=1) - jnp.diff(target, axis=1)) ** 2, pair_mask)
