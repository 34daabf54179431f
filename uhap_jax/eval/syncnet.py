"""SyncNet in Flax NNX, and the LSE-D / LSE-C lip-sync scores of the Wav2Lip evaluation.

The architecture is `syncnet_v2` of joonson/syncnet_python (`SyncNetModel.S`), the model behind Wav2Lip's
LSE-D/LSE-C (Prajwal et al., ACM MM 2020, `evaluation/scores_LSE`), itself the colour, 224-pixel successor of
Chung & Zisserman's SyncNet ("Out of time", ACCV 2016 workshops):
- audio stream: 13 MFCCs × 20 steps (0.2 s at 100 Hz), a 2D CNN, then an MLP to a 1024-d embedding;
- lip stream: 5 consecutive 224×224 BGR face crops (0..255, no normalisation), a 3D CNN, then an MLP to 1024-d.
Batch norms are in inference mode (running statistics), as the evaluation runs them.

Weights are never downloaded: the user gives a local file, a PyTorch state dict (.pth/.pt/.model, read with
torch), .npz or .safetensors, with syncnet_python's key names ("netcnnaud.0.weight", ...). Video must be 25 fps
and audio 16 kHz: an audio window of 20 MFCC steps covers 5 video frames, and frame i starts at step 4·i.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SAMPLE_RATE = 16_000
FPS = 25
CROP_SIZE = 224
WINDOW_FRAMES = 5
MFCC_STEPS_PER_FRAME = 4
MFCC_WINDOW_STEPS = 20
NUM_MFCC = 13
EMBEDDING_DIM = 1024
_BATCH_NORM_EPS = 1e-5  # PyTorch's default
_PAIRWISE_DISTANCE_EPS = 1e-6  # torch.nn.functional.pairwise_distance adds it to the difference
_IGNORED_KEY_SUFFIX = ".num_batches_tracked"


# ----------------------------------------------------------------------------------------- MFCC


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_filterbank(num_filters: int, nfft: int, sample_rate: int) -> np.ndarray:
    """Triangular filters on FFT bins, with python_speech_features' bin rounding: [num_filters, nfft // 2 + 1]."""
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mel_points) / sample_rate)
    fft_bins = np.arange(nfft // 2 + 1)
    rising = (fft_bins[None, :] - bins[:-2, None]) / (bins[1:-1, None] - bins[:-2, None])
    falling = (bins[2:, None] - fft_bins[None, :]) / (bins[2:, None] - bins[1:-1, None])
    in_rising = (fft_bins[None, :] >= bins[:-2, None]) & (fft_bins[None, :] < bins[1:-1, None])
    in_falling = (fft_bins[None, :] >= bins[1:-1, None]) & (fft_bins[None, :] < bins[2:, None])
    return np.where(in_rising, rising, 0.0) + np.where(in_falling, falling, 0.0)


def mfcc(waveform_int16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[steps, 13] MFCCs at 100 Hz, equal to python_speech_features.mfcc with its defaults (v0.6).

    25 ms rectangular windows every 10 ms (the last one zero-padded), pre-emphasis 0.97, a 512-point power
    spectrum, 26 mel filters, log, orthonormal DCT-II, liftering 22, and the first coefficient replaced by the
    log frame energy. The input is in int16 units, as syncnet_python reads its 16-bit WAV.
    """
    from scipy.fft import dct

    signal = np.asarray(waveform_int16, np.float64)
    window, step, nfft = round(0.025 * sample_rate), round(0.01 * sample_rate), 512
    emphasised = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    num_steps = 1 if signal.size <= window else 1 + math.ceil((signal.size - window) / step)
    padded = np.pad(emphasised, (0, (num_steps - 1) * step + window - signal.size))
    frames = padded[np.arange(num_steps)[:, None] * step + np.arange(window)[None, :]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    tiny = np.finfo(np.float64).eps
    energy = np.sum(power, axis=1)
    energy = np.where(energy == 0, tiny, energy)
    filtered = power @ _mel_filterbank(26, nfft, sample_rate).T
    filtered = np.where(filtered == 0, tiny, filtered)
    cepstra = dct(np.log(filtered), type=2, axis=1, norm="ortho")[:, :NUM_MFCC]
    cepstra *= 1.0 + 11.0 * np.sin(np.pi * np.arange(NUM_MFCC) / 22.0)
    cepstra[:, 0] = np.log(energy)
    return cepstra


def to_int16_units(waveform: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> the 16-bit PCM values syncnet_python's ffmpeg step would write."""
    return np.clip(np.round(np.asarray(waveform, np.float64) * 32768.0), -32768, 32767)


# ----------------------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv + batch norm + ReLU of a syncnet_python nn.Sequential, and the max-pool after it (if any).

    `index` is the conv's position in the Sequential; its batch norm sits at index + 1.
    """

    index: int
    features: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    pool: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # (window, stride, padding)


# netcnnaud on [N, 13, 20, 1] (MFCC, time, channel). The 1×1 max-pool after the first conv is an identity.
AUDIO_CNN = (
    ConvSpec(0, 64, (3, 3), (1, 1), (1, 1)),
    ConvSpec(4, 192, (3, 3), (1, 1), (1, 1), ((3, 3), (1, 2), (0, 0))),
    ConvSpec(8, 384, (3, 3), (1, 1), (1, 1)),
    ConvSpec(11, 256, (3, 3), (1, 1), (1, 1)),
    ConvSpec(14, 256, (3, 3), (1, 1), (1, 1), ((3, 3), (2, 2), (0, 0))),
    ConvSpec(18, 512, (5, 4), (1, 1), (0, 0)),
)
# netcnnlip on [N, 5, 224, 224, 3] (time, height, width, BGR).
LIP_CNN = (
    ConvSpec(0, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0), ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    ConvSpec(4, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
    ConvSpec(8, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ConvSpec(11, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ConvSpec(14, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    ConvSpec(18, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0)),
)


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, use_running_average=True, epsilon=_BATCH_NORM_EPS, rngs=rngs)


class ConvBlock(nnx.Module):
    """Conv, batch norm (running statistics), ReLU, then the optional max-pool (padding counts as -inf)."""

    def __init__(self, in_features: int, spec: ConvSpec, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_features,
            spec.features,
            kernel_size=spec.kernel,
            strides=spec.stride,
            padding=[(p, p) for p in spec.padding],
            rngs=rngs,
        )
        self.norm = _batch_norm(spec.features, rngs)
        self.pool = spec.pool

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm(self.conv(x)))
        if self.pool is not None:
            window, stride, padding = self.pool
            x = nnx.max_pool(x, window, stride, [(p, p) for p in padding])
        return x


class EmbeddingHead(nnx.Module):
    """netfcaud / netfclip: Linear 512→512, batch norm, ReLU, Linear 512→embedding."""

    def __init__(self, embedding_dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(512, 512, rngs=rngs)
        self.norm = _batch_norm(512, rngs)
        self.out = nnx.Linear(512, embedding_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.norm(self.hidden(x))))


class Stream(nnx.Module):
    """A CNN whose output is 1×1 (×1) spatially, flattened into the embedding head."""

    def __init__(self, in_features: int, specs: tuple[ConvSpec, ...], embedding_dim: int, *, rngs: nnx.Rngs):
        features = [in_features] + [spec.features for spec in specs[:-1]]
        self.blocks = nnx.List([ConvBlock(f, spec, rngs=rngs) for f, spec in zip(features, specs)])
        self.head = EmbeddingHead(embedding_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(x.reshape(x.shape[0], -1))


class SyncNet(nnx.Module):
    """syncnet_python's `S`: an audio embedding and a lip embedding whose distance is small when in sync."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM, *, rngs: nnx.Rngs):
        self.audio = Stream(1, AUDIO_CNN, embedding_dim, rngs=rngs)
        self.lip = Stream(3, LIP_CNN, embedding_dim, rngs=rngs)

    def audio_embedding(self, mfcc_windows: jax.Array) -> jax.Array:
        """[N, 13, 20] MFCC windows -> [N, embedding_dim]."""
        if mfcc_windows.shape[1:] != (NUM_MFCC, MFCC_WINDOW_STEPS):
            raise ValueError(f"MFCC windows must be [N, 13, 20], got {mfcc_windows.shape}")
        return self.audio(mfcc_windows[..., None])

    def lip_embedding(self, crops_bgr: jax.Array) -> jax.Array:
        """[N, 5, 224, 224, 3] BGR face crops in 0..255 -> [N, embedding_dim]."""
        if crops_bgr.shape[1:] != (WINDOW_FRAMES, CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"lip windows must be [N, 5, 224, 224, 3], got {crops_bgr.shape}")
        return self.lip(crops_bgr)


# ----------------------------------------------------------------------------------------- weights

# How a syncnet_python tensor is laid out against its flax variable.
_CONV, _LINEAR, _SAME = "conv", "linear", "same"


def _to_flax(layout: str, value: np.ndarray) -> np.ndarray:
    """torch Conv [out, in, *kernel] -> flax [*kernel, in, out]; Linear [out, in] -> [in, out]."""
    if layout == _CONV:
        return np.moveaxis(value, (0, 1), (-1, -2))
    return value.T if layout == _LINEAR else value


def _torch_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == _CONV:
        return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
    return flax_shape[::-1] if layout == _LINEAR else flax_shape


def syncnet_key_map(model: SyncNet) -> dict[str, tuple[nnx.Variable, str]]:
    """Every syncnet_python state-dict key -> (the model's variable, its layout)."""
    key_map = {}
    for torch_name, stream, specs in (("aud", model.audio, AUDIO_CNN), ("lip", model.lip, LIP_CNN)):
        for spec, block in zip(specs, stream.blocks):
            conv = f"netcnn{torch_name}.{spec.index}"
            key_map[f"{conv}.weight"] = (block.conv.kernel, _CONV)
            key_map[f"{conv}.bias"] = (block.conv.bias, _SAME)
            key_map.update(_batch_norm_keys(f"netcnn{torch_name}.{spec.index + 1}", block.norm))
        head = f"netfc{torch_name}"
        for index, linear in ((0, stream.head.hidden), (3, stream.head.out)):
            key_map[f"{head}.{index}.weight"] = (linear.kernel, _LINEAR)
            key_map[f"{head}.{index}.bias"] = (linear.bias, _SAME)
        key_map.update(_batch_norm_keys(f"{head}.1", stream.head.norm))
    return key_map


def _batch_norm_keys(prefix: str, norm: nnx.BatchNorm) -> dict[str, tuple[nnx.Variable, str]]:
    return {
        f"{prefix}.weight": (norm.scale, _SAME),
        f"{prefix}.bias": (norm.bias, _SAME),
        f"{prefix}.running_mean": (norm.mean, _SAME),
        f"{prefix}.running_var": (norm.var, _SAME),
    }


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat name -> array mapping from a .pth/.pt/.model (torch), .npz or .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (SyncNet weights are never downloaded; give a local file)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    if suffix == ".safetensors":
        import safetensors.numpy

        return safetensors.numpy.load_file(path)
    if suffix in (".pth", ".pt", ".model"):
        return _read_torch_state_dict(path)
    raise ValueError(f"{path}: unknown weight format {suffix!r}; expected .pth/.pt/.model, .npz or .safetensors")


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{path}: reading a PyTorch file needs torch; or convert it to .npz/.safetensors") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad or unsafe pickle
        raise ValueError(f"{path}: not a loadable PyTorch state dict of tensors: {error}") from error
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
    return {key: value.detach().cpu().float().numpy() for key, value in loaded.items()}


def load_syncnet(path: str | os.PathLike, embedding_dim: int = EMBEDDING_DIM) -> SyncNet:
    """A SyncNet filled from a local syncnet_python checkpoint; every key must be there, with its shape."""
    path = os.fspath(path)
    tensors = {k: v for k, v in read_state_dict(path).items() if not k.endswith(_IGNORED_KEY_SUFFIX)}
    model = nnx.eval_shape(lambda: SyncNet(embedding_dim, rngs=nnx.Rngs(0)))
    key_map = syncnet_key_map(model)
    missing = sorted(set(key_map) - set(tensors))
    unexpected = sorted(set(tensors) - set(key_map))
    if missing or unexpected:
        raise ValueError(f"{path}: not a syncnet_v2 state dict: missing keys {missing}; unexpected keys {unexpected}")
    for key, (variable, layout) in key_map.items():
        expected = _torch_shape(layout, tuple(variable.get_value().shape))
        if tuple(tensors[key].shape) != expected:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}; SyncNet expects {expected}")
        variable.set_value(jnp.asarray(_to_flax(layout, np.asarray(tensors[key], np.float32))))
    return model


# ----------------------------------------------------------------------------------------- LSE-D / LSE-C


@dataclasses.dataclass(frozen=True)
class SyncScores:
    """offset: frames by which the video lags the audio (video frame i matches audio frame i − offset).
    lse_d: the smallest mean embedding distance over offsets (LSE-D, lower is better).
    lse_c: the median over offsets minus that minimum (LSE-C, higher is better).
    distances: [windows, 2·vshift + 1], the distance of each video window to each shifted audio window.
    """

    offset: int
    lse_d: float
    lse_c: float
    distances: np.ndarray


def scores_from_embeddings(video: np.ndarray, audio: np.ndarray, vshift: int = 15) -> SyncScores:
    """syncnet_python's `calc_pdist` and offset search, which Wav2Lip's LSE scripts run unchanged.

    Video window i is compared with audio windows i − vshift … i + vshift; audio windows outside the clip
    are zero vectors (the reference pads with zeros), and the distance is torch's pairwise_distance
    ‖v − a + 1e-6‖. The mean over windows at each offset gives LSE-D (its minimum) and LSE-C.
    """
    video, audio = np.asarray(video, np.float64), np.asarray(audio, np.float64)
    if video.ndim != 2 or video.shape != audio.shape:
        raise ValueError(f"video {video.shape} and audio {audio.shape} embeddings must be equal [N, D] arrays")
    padded = np.pad(audio, ((vshift, vshift), (0, 0)))
    shifts = np.arange(2 * vshift + 1)
    windows = padded[np.arange(len(video))[:, None] + shifts[None, :]]  # [N, 2·vshift + 1, D]
    distances = np.linalg.norm(video[:, None, :] - windows + _PAIRWISE_DISTANCE_EPS, axis=-1)
    mean_distance = distances.mean(axis=0)
    best = int(np.argmin(mean_distance))
    lse_d = float(mean_distance[best])
    return SyncScores(vshift - best, lse_d, float(np.median(mean_distance)) - lse_d, distances)


def mfcc_windows(waveform: np.ndarray, num_windows: int) -> np.ndarray:
    """[num_windows, 13, 20]: the 0.2 s of MFCCs starting at each video frame (frame i at step 4·i)."""
    coefficients = mfcc(to_int16_units(waveform)).astype(np.float32)
    needed = MFCC_STEPS_PER_FRAME * (num_windows - 1) + MFCC_WINDOW_STEPS
    if coefficients.shape[0] < needed:
        raise ValueError(f"audio gives {coefficients.shape[0]} MFCC steps, {num_windows} windows need {needed}")
    starts = MFCC_STEPS_PER_FRAME * np.arange(num_windows)
    return coefficients[starts[:, None] + np.arange(MFCC_WINDOW_STEPS)[None, :]].transpose(0, 2, 1)


@nnx.jit
def _embed_batch(model: SyncNet, crops_bgr: jax.Array, mfcc_batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.lip_embedding(crops_bgr), model.audio_embedding(mfcc_batch)


def lip_sync_error(
    model: SyncNet,
    face_crops: Any,
    waveform: Any,
    *,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    vshift: int = 15,
    batch_size: int = 20,
) -> SyncScores:
    """LSE-D / LSE-C of a talking-face clip, as Wav2Lip's `calculate_scores_real_videos.py` computes them.

    face_crops: [T, 224, 224, 3] RGB face crops in 0..255 (uint8 or float), one per video frame at 25 fps
    (the face track syncnet_python's pipeline crops; we flip to its BGR here). waveform: [samples] float
    mono at 16 kHz (use `uhap_jax.models.audio_to_latent.to_16k_mono` first). Like the reference, it scores
    min(T, samples // 640) − 5 windows.
    """
    if fps != FPS or sample_rate != SAMPLE_RATE:
        raise ValueError(f"SyncNet expects {FPS} fps video and {SAMPLE_RATE} Hz audio, got {fps} fps, {sample_rate} Hz")
    crops = np.asarray(face_crops)
    waveform = np.asarray(waveform, np.float64)
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"face_crops must be [T, {CROP_SIZE}, {CROP_SIZE}, 3] RGB, got {crops.shape}")
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [samples], got shape {waveform.shape}")
    samples_per_frame = SAMPLE_RATE // FPS
    num_windows = min(len(crops), waveform.size // samples_per_frame) - WINDOW_FRAMES
    if num_windows < 1:
        raise ValueError(f"{len(crops)} frames and {waveform.size} samples are too short for a 5-frame window")
    audio_windows = mfcc_windows(waveform, num_windows)
    crops_bgr = crops[..., ::-1].astype(np.float32)
    video_embeddings, audio_embeddings = [], []
    for start in range(0, num_windows, batch_size):
        count = min(batch_size, num_windows - start)
        # Pad the last batch to the same size: one compilation for the whole clip.
        starts = np.minimum(start + np.arange(batch_size), num_windows - 1)
        video_batch = crops_bgr[starts[:, None] + np.arange(WINDOW_FRAMES)[None, :]]
        video, audio = _embed_batch(model, jnp.asarray(video_batch), jnp.asarray(audio_windows[starts]))
        video_embeddings.append(np.asarray(video)[:count])
        audio_embeddings.append(np.asarray(audio)[:count])
    return scores_from_embeddings(np.concatenate(video_embeddings), np.concatenate(audio_embeddings), vshift)
