"""Loads transformers-format wav2vec2/HuBERT checkpoints (local safetensors) into the NNX AudioEncoder.

No torch: tensors are read with ``safetensors.numpy``. An explicit key map, built from the config, names the
NNX parameter and the layout change for every checkpoint key; anything missing or left over is an error that
names the file. Keys outside the base model (``lm_head``, classifiers, the pretraining quantizer and
projections) and the base model's ``masked_spec_embed`` (SpecAugment's mask vector, used only when masking
during training) are ignored on purpose, and logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

if TYPE_CHECKING:
    from uhap_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

# Keys of the base model that the encoder does not use.
_UNUSED_BASE_KEYS = ("masked_spec_embed",)
# Older checkpoints store the weight-normed positional conv under torch.nn.utils.weight_norm's names, newer
# ones under torch.nn.utils.parametrizations.weight_norm's. Both hold the same (magnitude, direction) pair.
_POS_CONV = "encoder.pos_conv_embed.conv"
_LEGACY_WEIGHT_NORM_NAMES = {
    f"{_POS_CONV}.weight_g": f"{_POS_CONV}.parametrizations.weight.original0",
    f"{_POS_CONV}.weight_v": f"{_POS_CONV}.parametrizations.weight.original1",
}

Transform = Callable[[np.ndarray], np.ndarray]
ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors, and the file (or shard index) they came from, for error messages."""

    tensors: dict[str, np.ndarray]
    source: str


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return safetensors.numpy.load_file(path)
    except TypeError as error:  # numpy has no bfloat16
        raise ValueError(f"{path}: {error}; re-save the checkpoint as float32 or float16") from error
    except safetensors.SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from error


def read_safetensors(folder: str | os.PathLike) -> Checkpoint:
    """Reads model.safetensors, or every shard listed in model.safetensors.index.json."""
    folder = os.fspath(folder)
    single = os.path.join(folder, SAFETENSORS_FILE)
    index_path = os.path.join(folder, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(single):
        return Checkpoint(_load_safetensors_file(single), single)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"{folder}: has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE} "
            "(PyTorch .bin checkpoints are not read: re-save them with safetensors)"
        )
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map': {error}") from error
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        shard_tensors = _load_safetensors_file(shard_path)
        absent = sorted(key for key, name in weight_map.items() if name == shard and key not in shard_tensors)
        if absent:
            raise ValueError(f"{shard_path}: lacks keys that {SAFETENSORS_INDEX_FILE} places there: {absent}")
        tensors.update(shard_tensors)
    return Checkpoint(tensors, index_path)


def read_hf_config(folder: str | os.PathLike) -> Any:
    """The transformers config in the folder's config.json (read locally, nothing is downloaded)."""
    import transformers

    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (expected a transformers model folder)")
    return transformers.AutoConfig.from_pretrained(os.fspath(folder), local_files_only=True)


def read_feature_extractor(folder: str | os.PathLike) -> Any:
    """The folder's Wav2Vec2FeatureExtractor (preprocessor_config.json), or transformers' default without one."""
    import transformers

    if not os.path.isfile(os.path.join(os.fspath(folder), PREPROCESSOR_FILE)):
        return transformers.Wav2Vec2FeatureExtractor()
    return transformers.Wav2Vec2FeatureExtractor.from_pretrained(os.fspath(folder), local_files_only=True)


def _linear_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear [out, in] -> flax [in, out]."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-d linear weight, got shape {weight.shape}")
    return weight.T


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv1d [out, in / groups, width] -> flax [width, in / groups, out]."""
    if weight.ndim != 3:
        raise ValueError(f"expected a 3-d conv weight, got shape {weight.shape}")
    return weight.transpose(2, 1, 0)


def _weight_norm_magnitude(magnitude: np.ndarray) -> np.ndarray:
    """weight_norm(conv, dim=2) keeps one magnitude per kernel tap, shaped [1, 1, taps] -> [taps]."""
    if magnitude.ndim != 3 or magnitude.shape[:2] != (1, 1):
        raise ValueError(
            f"expected a weight-norm magnitude of shape (1, 1, taps) (weight_norm over dim=2), got {magnitude.shape}"
        )
    return magnitude.reshape(-1)


def _as_is(value: np.ndarray) -> np.ndarray:
    return value


def _module_path(hf_module: str) -> ParamPath:
    """'encoder.layers.0.attention' -> ('encoder', 'layers', 0, 'attention'): NNX mirrors transformers."""
    return tuple(int(part) if part.isdigit() else part for part in hf_module.split("."))


def hf_key_map(config: AudioEncoderConfig) -> dict[str, tuple[ParamPath, Transform]]:
    """Every base-model checkpoint key -> (NNX parameter path, layout change)."""
    key_map: dict[str, tuple[ParamPath, Transform]] = {}

    def linear(module: str) -> None:
        key_map[f"{module}.weight"] = (_module_path(module) + ("kernel",), _linear_kernel)
        key_map[f"{module}.bias"] = (_module_path(module) + ("bias",), _as_is)

    def norm(module: str) -> None:
        key_map[f"{module}.weight"] = (_module_path(module) + ("scale",), _as_is)
        key_map[f"{module}.bias"] = (_module_path(module) + ("bias",), _as_is)

    for i in range(len(config.conv_dim)):
        conv = f"feature_extractor.conv_layers.{i}.conv"
        key_map[f"{conv}.weight"] = (_module_path(conv) + ("kernel",), _conv_kernel)
        if config.conv_bias:
            key_map[f"{conv}.bias"] = (_module_path(conv) + ("bias",), _as_is)
        if config.feat_extract_norm == "layer" or i == 0:
            norm(f"feature_extractor.conv_layers.{i}.layer_norm")

    if config.feature_projection_layer_norm:
        norm("feature_projection.layer_norm")
    linear("feature_projection.projection")

    pos_conv = ("encoder", "pos_conv_embed")
    key_map[f"{_POS_CONV}.parametrizations.weight.original0"] = (
        pos_conv + ("magnitude",),
        _weight_norm_magnitude,
    )
    key_map[f"{_POS_CONV}.parametrizations.weight.original1"] = (pos_conv + ("direction",), _conv_kernel)
    key_map[f"{_POS_CONV}.bias"] = (pos_conv + ("bias",), _as_is)
    norm("encoder.layer_norm")

    for i in range(config.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{layer}.attention.{projection}")
        norm(f"{layer}.layer_norm")
        linear(f"{layer}.feed_forward.intermediate_dense")
        linear(f"{layer}.feed_forward.output_dense")
        norm(f"{layer}.final_layer_norm")
    return key_map


def _base_model_tensors(checkpoint: Checkpoint, model_type: str) -> dict[str, np.ndarray]:
    """Strips the `wav2vec2.`/`hubert.` prefix of task-model checkpoints; keys outside it belong to heads."""
    prefix = f"{model_type}."
    if not any(key.startswith(prefix) for key in checkpoint.tensors):
        return dict(checkpoint.tensors)
    heads = sorted(key for key in checkpoint.tensors if not key.startswith(prefix))
    if heads:
        logger.info("%s: ignoring keys outside the base model (task heads): %s", checkpoint.source, heads)
    return {key[len(prefix) :]: value for key, value in checkpoint.tensors.items() if key.startswith(prefix)}


def _canonical_weight_norm_names(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    renamed = {}
    for key, value in tensors.items():
        new_key = _LEGACY_WEIGHT_NORM_NAMES.get(key, key)
        if new_key in renamed:
            raise ValueError(f"{source}: holds both {key} and {new_key}, two forms of the same weight")
        renamed[new_key] = value
    return renamed


def load_hf_weights(model: AudioEncoder, folder: str | os.PathLike) -> None:
    """Fills every parameter of `model` (concrete or from nnx.eval_shape) from the folder's safetensors."""
    checkpoint = read_safetensors(folder)
    config = model.config
    tensors = _canonical_weight_norm_names(_base_model_tensors(checkpoint, config.model_type), checkpoint.source)
    key_map = hf_key_map(config)

    params = {path: variable for path, variable in nnx.iter_graph(model) if isinstance(variable, nnx.Param)}
    targets = {path for path, _ in key_map.values()}
    if targets != set(params):
        raise RuntimeError(
            "hf_key_map and AudioEncoder disagree (a bug): "
            f"unmapped parameters {sorted(map(str, set(params) - targets))}, "
            f"mapped to nothing {sorted(map(str, targets - set(params)))}"
        )

    unused = sorted(key for key in tensors if key in _UNUSED_BASE_KEYS)
    if unused:
        logger.info("%s: ignoring %s (used only for SpecAugment in training)", checkpoint.source, unused)
    missing = sorted(key for key in key_map if key not in tensors)
    unexpected = sorted(key for key in tensors if key not in key_map and key not in _UNUSED_BASE_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.source}: checkpoint does not match the {config.model_type} config: "
            f"missing keys {missing}; unexpected keys {unexpected}"
        )

    for key, (path, transform) in key_map.items():
        variable = params[path]
        try:
            value = transform(np.asarray(tensors[key]))
        except ValueError as error:
            raise ValueError(f"{checkpoint.source}: {key}: {error}") from error
        expected = tuple(variable.get_value().shape)
        if value.shape != expected:
            raise ValueError(
                f"{checkpoint.source}: {key} has shape {tensors[key].shape}, which becomes {value.shape} "
                f"but the model expects {expected}"
            )
        variable.set_value(jnp.asarray(value, dtype=jnp.float32))
