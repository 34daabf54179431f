"""AudioEncoder (wav2vec2 / HuBERT in NNX) against transformers' PyTorch models, and its HF weight loading."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from uhap_jax.models import hf_weights
from uhap_jax.models.audio_encoder import SAMPLE_RATE, AudioEncoder, AudioEncoderConfig

# Default conv kernels and strides (16 kHz -> 50 Hz), but few channels and a tiny transformer.
_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    mask_time_prob=0.0,
)
KINDS = {
    "wav2vec2_base": lambda: transformers.Wav2Vec2Config(**_TINY),
    "wav2vec2_large": lambda: transformers.Wav2Vec2Config(
        **_TINY, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True
    ),
    # HuBERT-base style; also drops the feature projection's LayerNorm, HuBERT's one structural option.
    "hubert": lambda: transformers.HubertConfig(**_TINY, feat_proj_layer_norm=False),
}
ONE_SECOND = SAMPLE_RATE
TOLERANCE = 1e-4


@nnx.jit
def _encode(model: AudioEncoder, waveform: jax.Array, mask: jax.Array | None = None):
    return model.encode(waveform, mask)


def _torch_model(hf_config, rng: np.random.Generator) -> torch.nn.Module:
    torch.manual_seed(int(rng.integers(2**31)))
    model_class = transformers.HubertModel if hf_config.model_type == "hubert" else transformers.Wav2Vec2Model
    return model_class(hf_config).eval()


def _waveform(rng: np.random.Generator, batch: int, samples: int) -> np.ndarray:
    """Speech-like scale with a DC offset, so that the waveform normalisation matters."""
    return (0.1 * rng.standard_normal((batch, samples)) + 0.02).astype(np.float32)


def _reference(model: torch.nn.Module, waveform: np.ndarray, lengths: list[int] | None = None):
    """transformers' full pipeline: Wav2Vec2FeatureExtractor, then the PyTorch model."""
    extractor = transformers.Wav2Vec2FeatureExtractor()
    if lengths is None:
        inputs = extractor(list(waveform), sampling_rate=ONE_SECOND, return_tensors="np")
        kwargs = {}
    else:
        clips = [w[:n] for w, n in zip(waveform, lengths)]
        inputs = extractor(
            clips, sampling_rate=ONE_SECOND, padding=True, return_attention_mask=True, return_tensors="np"
        )
        kwargs = {"attention_mask": torch.from_numpy(inputs.attention_mask)}
    with torch.no_grad():
        return model(torch.from_numpy(inputs.input_values), output_hidden_states=True, **kwargs)


def _max_error(ours: jax.Array, theirs: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.numpy())))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_transformers(kind, rng, tmp_path):
    torch_model = _torch_model(KINDS[kind](), rng)
    torch_model.save_pretrained(tmp_path)
    encoder = AudioEncoder.from_pretrained(tmp_path)

    waveform = _waveform(rng, 2, ONE_SECOND)
    expected = _reference(torch_model, waveform)
    out = _encode(encoder, jnp.asarray(waveform))
    # 16 kHz in, 50 Hz out: one second gives 49 frames (the first needs a 400-sample receptive field).
    assert out.last_hidden_state.shape == (2, 49, 32) == tuple(expected.last_hidden_state.shape)
    assert _max_error(out.last_hidden_state, expected.last_hidden_state) < TOLERANCE
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, expected.hidden_states):
        assert _max_error(ours, theirs) < TOLERANCE

    # Right-padded batch: the second clip is shorter, padding is zero, the mask marks real samples.
    lengths = [ONE_SECOND, int(rng.integers(ONE_SECOND // 2, ONE_SECOND - 1000))]
    mask = np.arange(ONE_SECOND)[None, :] < np.array(lengths)[:, None]
    padded = np.where(mask, waveform, 0.0).astype(np.float32)
    expected = _reference(torch_model, padded, lengths)
    out = _encode(encoder, jnp.asarray(padded), jnp.asarray(mask.astype(np.int32)))
    assert _max_error(out.last_hidden_state, expected.last_hidden_state) < TOLERANCE
    assert out.frame_mask.sum(axis=1).tolist() == [49, encoder.config.num_frames(lengths[1])]


def test_bf16_compute_keeps_float32_params_and_stays_close(rng):
    hf_config = KINDS["wav2vec2_large"]()
    seed = int(rng.integers(2**31))
    call = nnx.jit(AudioEncoder.__call__)
    waveform = jnp.asarray(_waveform(rng, 2, 4_000))
    encoder = AudioEncoder.from_config(hf_config, rngs=nnx.Rngs(seed))
    encoder.eval()
    full = call(encoder, waveform)

    encoder_bf16 = AudioEncoder.from_config(hf_config, rngs=nnx.Rngs(seed), dtype=jnp.bfloat16)
    encoder_bf16.eval()
    params = jax.tree.leaves(nnx.state(encoder_bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    half = call(encoder_bf16, waveform)
    assert half.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (~0.4% per rounding): a few percent of RMS error after the whole stack.
    relative_rms_error = jnp.sqrt(jnp.mean((half.astype(jnp.float32) - full) ** 2) / jnp.mean(full**2))
    assert float(relative_rms_error) < 0.05


def test_dropout_only_in_train_mode(rng):
    hf_config = transformers.Wav2Vec2Config(**{**_TINY, "hidden_dropout": 0.5})
    encoder = AudioEncoder.from_config(hf_config, rngs=nnx.Rngs(int(rng.integers(2**31))))
    waveform = jnp.asarray(_waveform(rng, 1, 4_000))
    first, second = _encode(encoder, waveform), _encode(encoder, waveform)
    assert not np.allclose(first.last_hidden_state, second.last_hidden_state)
    encoder.eval()
    first, second = _encode(encoder, waveform), _encode(encoder, waveform)
    np.testing.assert_array_equal(first.last_hidden_state, second.last_hidden_state)


def test_legacy_weight_norm_keys(rng, tmp_path):
    """Old checkpoints store the positional conv as weight_g / weight_v (torch.nn.utils.weight_norm)."""
    torch_model = _torch_model(KINDS["wav2vec2_base"](), rng)
    torch_model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, hf_weights.SAFETENSORS_FILE)
    tensors = safetensors.numpy.load_file(path)
    conv = "encoder.pos_conv_embed.conv"
    assert f"{conv}.parametrizations.weight.original0" in tensors
    tensors[f"{conv}.weight_g"] = tensors.pop(f"{conv}.parametrizations.weight.original0")
    tensors[f"{conv}.weight_v"] = tensors.pop(f"{conv}.parametrizations.weight.original1")
    safetensors.numpy.save_file(tensors, path)

    encoder = AudioEncoder.from_pretrained(tmp_path)
    # The effective kernel is PyTorch's weight_norm(dim=2): one magnitude per tap.
    torch_kernel = torch_model.encoder.pos_conv_embed.conv.weight.detach().numpy().transpose(2, 1, 0)
    np.testing.assert_allclose(np.asarray(encoder.encoder.pos_conv_embed.kernel()), torch_kernel, atol=1e-6)
    waveform = _waveform(rng, 1, ONE_SECOND)
    expected = _reference(torch_model, waveform)
    assert _max_error(_encode(encoder, jnp.asarray(waveform)).last_hidden_state, expected.last_hidden_state) < TOLERANCE

    tensors[f"{conv}.parametrizations.weight.original0"] = tensors[f"{conv}.weight_g"]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError, match="two forms of the same weight"):
        AudioEncoder.from_pretrained(tmp_path)


def test_task_checkpoint_loads_base_model_and_ignores_heads(rng, tmp_path):
    """A CTC checkpoint: keys under `hubert.`, plus lm_head and masked_spec_embed, which the encoder skips."""
    hf_config = transformers.HubertConfig(**{**_TINY, "mask_time_prob": 0.05, "vocab_size": 12})
    torch.manual_seed(int(rng.integers(2**31)))
    ctc_model = transformers.HubertForCTC(hf_config).eval()
    ctc_model.save_pretrained(tmp_path)
    keys = safetensors.numpy.load_file(os.path.join(tmp_path, hf_weights.SAFETENSORS_FILE))
    assert "lm_head.weight" in keys and "hubert.masked_spec_embed" in keys

    encoder = AudioEncoder.from_pretrained(tmp_path)
    waveform = _waveform(rng, 1, ONE_SECOND)
    expected = _reference(ctc_model.hubert, waveform)
    assert _max_error(_encode(encoder, jnp.asarray(waveform)).last_hidden_state, expected.last_hidden_state) < TOLERANCE


def test_sharded_checkpoint_and_preprocessor_config(rng, tmp_path):
    torch_model = _torch_model(KINDS["wav2vec2_large"](), rng)
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not os.path.exists(os.path.join(tmp_path, hf_weights.SAFETENSORS_FILE))
    with open(os.path.join(tmp_path, hf_weights.SAFETENSORS_INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)

    encoder = AudioEncoder.from_pretrained(tmp_path)
    assert not encoder.normalize_waveform
    waveform = _waveform(rng, 1, ONE_SECOND)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(waveform)).last_hidden_state
    assert _max_error(_encode(encoder, jnp.asarray(waveform)).last_hidden_state, expected) < TOLERANCE


@pytest.mark.parametrize("change", ["drop", "add"])
def test_checkpoint_mismatch_names_file_and_keys(change, rng, tmp_path):
    _torch_model(KINDS["hubert"](), rng).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, hf_weights.SAFETENSORS_FILE)
    tensors = safetensors.numpy.load_file(path)
    if change == "drop":
        key = str(rng.choice(sorted(tensors)))
        del tensors[key]
    else:
        key = "encoder.layers.7.attention.q_proj.weight"
        tensors[key] = rng.standard_normal((32, 32)).astype(np.float32)
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(
        ValueError, match=rf"model\.safetensors.*{'missing' if change == 'drop' else 'unexpected'}"
    ) as e:
        AudioEncoder.from_pretrained(tmp_path)
    assert key in str(e.value)


def test_wrong_shape_names_key(rng, tmp_path):
    _torch_model(KINDS["wav2vec2_base"](), rng).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, hf_weights.SAFETENSORS_FILE)
    tensors = safetensors.numpy.load_file(path)
    key = "feature_projection.projection.weight"
    tensors[key] = rng.standard_normal((16, 32)).astype(np.float32)  # transposed
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"model\.safetensors: {key} has shape \(16, 32\)"):
        AudioEncoder.from_pretrained(tmp_path)


def test_bad_inputs_raise_clear_errors(rng, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioEncoder.from_pretrained(tmp_path)
    transformers.Wav2Vec2Config(**_TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        AudioEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="add_adapter"):
        AudioEncoderConfig.from_hf(transformers.Wav2Vec2Config(**_TINY, add_adapter=True))
    with pytest.raises(ValueError, match="model_type"):
        AudioEncoderConfig.from_hf(transformers.BertConfig())

    encoder = AudioEncoder.from_config(KINDS["hubert"](), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        encoder(jnp.asarray(_waveform(rng, 1, 2_000)[0]))
    with pytest.raises(ValueError, match="at least 400"):
        encoder(jnp.asarray(_waveform(rng, 1, 399)))
    with pytest.raises(ValueError, match="attention_mask shape"):
        encoder(jnp.asarray(_waveform(rng, 2, 2_000)), jnp.ones((2, 1_000), jnp.int32))
