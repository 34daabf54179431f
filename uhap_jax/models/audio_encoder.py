"""wav2vec2 / HuBERT speech encoders in Flax NNX, numerically equal to transformers' PyTorch models.

One implementation covers both architectures, switched by the transformers config:
- ``feat_extract_norm="group"``, ``do_stable_layer_norm=False`` (wav2vec2-base, HuBERT-base): GroupNorm on the
  first conv only, post-norm transformer layers, LayerNorm before the layers.
- ``feat_extract_norm="layer"``, ``do_stable_layer_norm=True`` (wav2vec2-large-lv60, HuBERT-large): LayerNorm
  on every conv, pre-norm transformer layers, LayerNorm after the layers.
HuBERT differs from wav2vec2 only in its feature projection's optional LayerNorm (``feat_proj_layer_norm``).

Parameter names mirror transformers' module tree, so that `hf_weights` maps checkpoint keys one to one.
Parameters are float32; ``dtype`` sets the compute dtype (e.g. bfloat16), while normalisation statistics and
the softmax stay float32. Not covered (a clear error says so): wav2vec2 adapters (``add_adapter``,
``adapter_attn_dim``) and HuBERT's batch-normed positional conv (``conv_pos_batch_norm``). SpecAugment masking
and LayerDrop, which only matter for pretraining, are left out; dropout is in (``train()`` / ``eval()``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from uhap_jax.models import hf_weights

# transformers' ACT2FN names -> JAX. "gelu" is the exact erf form in PyTorch.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
_SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert")
# PyTorch's nn.LayerNorm / nn.GroupNorm default, used by the conv stack regardless of config.layer_norm_eps.
_TORCH_NORM_EPS = 1e-5
# transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm.
_WAVEFORM_NORM_EPS = 1e-7
SAMPLE_RATE = 16_000


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """The architecture fields of a transformers Wav2Vec2Config/HubertConfig, hashable for NNX."""

    model_type: Literal["wav2vec2", "hubert"]
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_bias: bool
    feat_extract_norm: Literal["group", "layer"]
    feat_extract_activation: str
    feature_projection_layer_norm: bool
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int
    do_stable_layer_norm: bool
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf_config: Any, source: str = "config") -> AudioEncoderConfig:
        """Validates a transformers config and keeps what the encoder needs; `source` names it in errors."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not one of {_SUPPORTED_MODEL_TYPES}")
        unsupported = {
            "add_adapter": bool(getattr(hf_config, "add_adapter", False)),
            "adapter_attn_dim": getattr(hf_config, "adapter_attn_dim", None) is not None,
            "conv_pos_batch_norm": bool(getattr(hf_config, "conv_pos_batch_norm", False)),
        }
        if any(unsupported.values()):
            names = [name for name, used in unsupported.items() if used]
            raise ValueError(f"{source}: {names} are set, which AudioEncoder does not implement")
        if hf_config.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"{source}: feat_extract_norm is {hf_config.feat_extract_norm!r}, expected 'group' or 'layer'"
            )
        for name in (hf_config.feat_extract_activation, hf_config.hidden_act):
            if name not in _ACTIVATIONS:
                raise ValueError(f"{source}: activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
        if not len(hf_config.conv_dim) == len(hf_config.conv_kernel) == len(hf_config.conv_stride):
            raise ValueError(f"{source}: conv_dim, conv_kernel and conv_stride must have the same length")
        if hf_config.hidden_size % hf_config.num_attention_heads:
            raise ValueError(f"{source}: hidden_size is not divisible by num_attention_heads")
        return cls(
            model_type=model_type,
            conv_dim=tuple(hf_config.conv_dim),
            conv_kernel=tuple(hf_config.conv_kernel),
            conv_stride=tuple(hf_config.conv_stride),
            conv_bias=bool(hf_config.conv_bias),
            feat_extract_norm=hf_config.feat_extract_norm,
            feat_extract_activation=hf_config.feat_extract_activation,
            # wav2vec2 always normalises before the projection; HuBERT makes it optional.
            feature_projection_layer_norm=model_type == "wav2vec2" or bool(hf_config.feat_proj_layer_norm),
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            hidden_act=hf_config.hidden_act,
            layer_norm_eps=float(hf_config.layer_norm_eps),
            num_conv_pos_embeddings=hf_config.num_conv_pos_embeddings,
            num_conv_pos_embedding_groups=hf_config.num_conv_pos_embedding_groups,
            do_stable_layer_norm=bool(hf_config.do_stable_layer_norm),
            hidden_dropout=float(hf_config.hidden_dropout),
            attention_dropout=float(hf_config.attention_dropout),
            activation_dropout=float(hf_config.activation_dropout),
            feat_proj_dropout=float(hf_config.feat_proj_dropout),
        )

    def num_frames(self, num_samples: int | jax.Array) -> int | jax.Array:
        """Output frames for a waveform length: 16 kHz in, 50 Hz out with the default conv stack."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples

    def min_num_samples(self) -> int:
        """The receptive field of one output frame: the shortest waveform that yields any frame."""
        num_samples = 1
        for kernel, stride in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            num_samples = (num_samples - 1) * stride + kernel
        return num_samples


@struct.dataclass
class AudioEncoderOutput:
    """What `AudioEncoder.encode` returns.

    hidden_states: the input of the first transformer layer, then each layer's output (num_hidden_layers + 1
      entries, as transformers 5 returns them; in the stable-layer-norm variant the last one precedes the
      final LayerNorm). Later stages may pick intermediate layers from here.
    frame_mask: [B, T'] True on frames computed from real samples, None when no attention mask was given.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    frame_mask: jax.Array | None


def _layer_norm(num_features: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(num_features, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class ConvLayer(nnx.Module):
    """One strided conv of the waveform feature encoder, an optional norm, then the activation."""

    def __init__(
        self,
        config: AudioEncoderConfig,
        layer_id: int,
        norm: Literal["group", "layer"] | None,
        *,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        in_features = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_features = config.conv_dim[layer_id]
        self.conv = nnx.Conv(
            in_features,
            out_features,
            kernel_size=config.conv_kernel[layer_id],
            strides=config.conv_stride[layer_id],
            padding="VALID",
            use_bias=config.conv_bias,
            dtype=dtype,
            kernel_init=nnx.initializers.he_normal(),
            rngs=rngs,
        )
        if norm == "group":
            # One group per channel: normalises each channel over time (fairseq's Fp32GroupNorm).
            self.layer_norm = nnx.GroupNorm(
                out_features,
                num_groups=out_features,
                epsilon=_TORCH_NORM_EPS,
                dtype=dtype,
                use_fast_variance=False,
                rngs=rngs,
            )
        elif norm == "layer":
            self.layer_norm = _layer_norm(out_features, _TORCH_NORM_EPS, dtype, rngs)
        else:
            self.layer_norm = None
        self.activation = _ACTIVATIONS[config.feat_extract_activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.activation(x)


class FeatureEncoder(nnx.Module):
    """The conv stack: [B, T] waveform -> [B, T', conv_dim[-1]] features (stride 320 by default)."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        if config.feat_extract_norm == "group":
            norms = ["group"] + [None] * (len(config.conv_dim) - 1)
        else:
            norms = ["layer"] * len(config.conv_dim)
        self.conv_layers = nnx.List(
            [ConvLayer(config, i, norm, dtype=dtype, rngs=rngs) for i, norm in enumerate(norms)]
        )

    def __call__(self, waveform: jax.Array) -> jax.Array:
        x = waveform[..., None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nnx.Module):
    """Conv features -> model width."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        width = config.conv_dim[-1]
        self.layer_norm = (
            _layer_norm(width, config.layer_norm_eps, dtype, rngs) if config.feature_projection_layer_norm else None
        )
        self.projection = nnx.Linear(width, config.hidden_size, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.feat_proj_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.dropout(self.projection(x))


class PositionalConvEmbedding(nnx.Module):
    """Grouped, weight-normed conv over time that gives the transformer its (relative) positions.

    Kept as magnitude and direction, as PyTorch's ``weight_norm(conv, dim=2)``: one magnitude per kernel tap,
    the direction normalised over the input and output channels of that tap. Fine-tuning then follows the same
    parametrisation as the original model.
    """

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        width, taps, groups = (
            config.hidden_size,
            config.num_conv_pos_embeddings,
            config.num_conv_pos_embedding_groups,
        )
        if width % groups:
            raise ValueError(f"hidden_size {width} is not divisible by num_conv_pos_embedding_groups {groups}")
        # transformers' init: normal with std 2 / sqrt(taps * in_channels), magnitude = the direction's norm.
        direction = nnx.initializers.normal(2.0 * (taps * width) ** -0.5)(rngs.params(), (taps, width // groups, width))
        self.direction = nnx.Param(direction)
        self.magnitude = nnx.Param(jnp.sqrt(jnp.sum(direction**2, axis=(1, 2))))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))
        # PyTorch pads taps // 2 on both sides and drops the last frame when taps is even: the same as this.
        self.padding = ((taps // 2, (taps - 1) // 2),)
        self.groups = groups
        self.dtype = dtype
        self.activation = _ACTIVATIONS[config.feat_extract_activation]

    def kernel(self) -> jax.Array:
        """The effective conv kernel [taps, width // groups, width] in float32."""
        direction = self.direction[...]
        norm = jnp.sqrt(jnp.sum(direction**2, axis=(1, 2), keepdims=True))
        return direction * (self.magnitude[...][:, None, None] / norm)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel().astype(self.dtype),
            window_strides=(1,),
            padding=self.padding,
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        return self.activation(y + self.bias[...].astype(self.dtype))


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a key padding mask; softmax in float32."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.q_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        batch, length, width = x.shape
        split_heads = lambda y: y.reshape(batch, length, self.num_heads, self.head_dim)
        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = self.dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.out_proj(out)


class FeedForward(nnx.Module):
    """The transformer layer's MLP: width -> intermediate_size -> width."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.intermediate_dense = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.intermediate_dropout = nnx.Dropout(config.activation_dropout, rngs=rngs)
        self.output_dense = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.output_dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.intermediate_dropout(self.activation(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nnx.Module):
    """A transformer layer: post-norm (base) or pre-norm (``do_stable_layer_norm``, large)."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.pre_norm = config.do_stable_layer_norm
        self.attention = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
        self.layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nnx.Module):
    """Positional conv, then the layers; the one LayerNorm sits before them (base) or after them (large)."""

    def __init__(self, config: AudioEncoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.norm_last = config.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config, dtype=dtype, rngs=rngs)
        self.layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array, frame_mask: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if frame_mask is not None:
            x = jnp.where(frame_mask[..., None], x, 0)
        x = x + self.pos_conv_embed(x)
        if not self.norm_last:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, frame_mask)
            hidden_states.append(x)
        if self.norm_last:
            x = self.layer_norm(x)
        return x, tuple(hidden_states)


def zero_mean_unit_variance(waveform: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Zero mean, unit variance per utterance over its real samples, padding set to 0.

    As transformers' Wav2Vec2FeatureExtractor does with ``do_normalize=True``, but inside the jitted model.
    """
    waveform = waveform.astype(jnp.float32)
    if attention_mask is None:
        mean = jnp.mean(waveform, axis=-1, keepdims=True)
        var = jnp.var(waveform, axis=-1, keepdims=True)
        return (waveform - mean) / jnp.sqrt(var + _WAVEFORM_NORM_EPS)
    mask = attention_mask.astype(bool)
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(mask, waveform, 0.0), axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.where(mask, waveform - mean, 0.0) ** 2, axis=-1, keepdims=True) / count
    return jnp.where(mask, (waveform - mean) / jnp.sqrt(var + _WAVEFORM_NORM_EPS), 0.0)


class AudioEncoder(nnx.Module):
    """wav2vec2 / HuBERT: [B, T] waveform at 16 kHz -> [B, T', hidden_size] features at 50 Hz.

    ``normalize_waveform`` applies the feature extractor's zero-mean/unit-variance step inside the model, so
    raw audio goes in. ``dtype`` is the compute dtype; parameters stay float32.
    """

    def __init__(
        self,
        config: AudioEncoderConfig,
        *,
        normalize_waveform: bool = True,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.normalize_waveform = normalize_waveform
        self.dtype = dtype
        self.feature_extractor = FeatureEncoder(config, dtype=dtype, rngs=rngs)
        self.feature_projection = FeatureProjection(config, dtype=dtype, rngs=rngs)
        self.encoder = TransformerEncoder(config, dtype=dtype, rngs=rngs)

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        *,
        rngs: nnx.Rngs,
        normalize_waveform: bool = True,
        dtype: Any = jnp.float32,
    ) -> AudioEncoder:
        """A randomly initialised encoder (in train mode) for a transformers Wav2Vec2Config/HubertConfig."""
        config = AudioEncoderConfig.from_hf(hf_config)
        return cls(config, normalize_waveform=normalize_waveform, dtype=dtype, rngs=rngs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        normalize_waveform: bool | None = None,
        dtype: Any = jnp.float32,
        dropout_seed: int = 0,
    ) -> AudioEncoder:
        """Loads a local transformers folder: config.json plus model.safetensors (or a sharded index).

        ``normalize_waveform=None`` takes ``do_normalize`` from preprocessor_config.json, or transformers'
        feature-extractor default (True) when the folder has none. The model comes back in eval mode (no
        dropout), as transformers' ``from_pretrained`` returns it; call ``.train()`` to fine-tune.
        """
        hf_config = hf_weights.read_hf_config(path)
        config = AudioEncoderConfig.from_hf(hf_config, source=os.path.join(path, hf_weights.CONFIG_FILE))
        extractor = hf_weights.read_feature_extractor(path)
        if extractor.sampling_rate != SAMPLE_RATE or extractor.feature_size != 1:
            raise ValueError(
                f"{os.path.join(path, hf_weights.PREPROCESSOR_FILE)}: expects {extractor.sampling_rate} Hz audio "
                f"with {extractor.feature_size} channel(s); AudioEncoder takes {SAMPLE_RATE} Hz mono"
            )
        if normalize_waveform is None:
            normalize_waveform = bool(extractor.do_normalize)

        # Build shapes only, then fill them from the checkpoint (no time spent on a random init) and give the
        # dropout streams, still abstract, a concrete seed.
        def build() -> AudioEncoder:
            rngs = nnx.Rngs(params=0, dropout=0)
            return cls(config, normalize_waveform=normalize_waveform, dtype=dtype, rngs=rngs)

        model = nnx.eval_shape(build)
        hf_weights.load_hf_weights(model, path)
        nnx.reseed(model, dropout=dropout_seed)
        model.eval()
        return model

    def frame_mask(self, attention_mask: jax.Array, num_frames: int) -> jax.Array:
        """[B, T] sample mask -> [B, T'] frame mask: the first num_frames(real samples) frames are real."""
        lengths = self.config.num_frames(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
        return jnp.arange(num_frames)[None, :] < lengths[:, None]

    def encode(self, waveform: jax.Array, attention_mask: jax.Array | None = None) -> AudioEncoderOutput:
        """All outputs; ``attention_mask`` [B, T] marks real samples (1) against right padding (0)."""
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be [batch, samples] at 16 kHz, got shape {waveform.shape}")
        if attention_mask is not None and attention_mask.shape != waveform.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} differs from waveform shape {waveform.shape}"
            )
        if waveform.shape[1] < self.config.min_num_samples():
            raise ValueError(
                f"waveform has {waveform.shape[1]} samples; the conv stack needs at least "
                f"{self.config.min_num_samples()} for one output frame"
            )
        if self.normalize_waveform:
            waveform = zero_mean_unit_variance(waveform, attention_mask)
        features = self.feature_extractor(waveform.astype(self.dtype))
        frame_mask = None if attention_mask is None else self.frame_mask(attention_mask, features.shape[1])
        hidden = self.feature_projection(features)
        last_hidden_state, hidden_states = self.encoder(hidden, frame_mask)
        return AudioEncoderOutput(last_hidden_state, hidden_states, frame_mask)

    def __call__(self, waveform: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The last hidden state [B, T', hidden_size]."""
        return self.encode(waveform, attention_mask).last_hidden_state
