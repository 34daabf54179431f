"""The speech model over audio of any length, in overlapping windows of one fixed size.

Run on a whole clip, the encoder's and the temporal transformer's attention cost memory in the square of its
length (43.6 GiB compiled for 600 s with the tiny model), so long files end in an out-of-memory crash. Here the
clip is cut into windows of `window_s` seconds (one shape: one compilation, memory flat in the length); of each
window only the frames at least `context_s` from a cut edge are used, and neighbouring windows cross-fade
linearly over `fade_s`. The model was trained on windows of 1.3 s (tiny) to 6 s (large), so 2 s of context on
each side covers what it ever learnt to look at; a clip that fits one window runs whole, exactly as before.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.audio_to_latent import AudioToLatent

WINDOW_S, CONTEXT_S, FADE_S = 16.0, 2.0, 1.0


def frame_count(num_samples: int, fps: float) -> int:
    """Video frames of `num_samples` of 16 kHz audio: its duration x fps, rounded, at least one."""
    return max(1, round(num_samples * fps / SAMPLE_RATE))


def window_starts(num_frames: int, window: int, context: int, fade: int) -> list[int]:
    """First frames of the windows: a hop of `window - 2 context - fade`, the last one flush with the end."""
    if num_frames <= window:
        return [0]
    hop = window - 2 * context - fade
    if hop <= 0:
        raise ValueError(f"windows of {window} frames leave no room after {context} context and {fade} fade frames")
    starts = list(range(0, num_frames - window, hop))
    return starts + [num_frames - window]


def window_weights(start: int, window: int, num_frames: int, context: int, fade: int) -> np.ndarray:
    """Per-frame weight of one window: 0 in the context at a cut edge, a linear ramp over `fade`, 1 inside.
    The clip's own first and last frames are no cut: a window there weighs them fully."""
    index = np.arange(window, dtype=np.float64)
    left = index - (context if start > 0 else -fade) + 0.5
    right = (window - (context if start + window < num_frames else -fade)) - index - 0.5
    return np.clip(np.minimum(left, right) / max(fade, 1), 0.0, 1.0)


def predict_codes(
    speech: AudioToLatent,
    waveform: np.ndarray,
    fps: float,
    *,
    window_s: float = WINDOW_S,
    context_s: float = CONTEXT_S,
    fade_s: float = FADE_S,
) -> np.ndarray:
    """16 kHz mono audio [S] -> expression codes [T, z_dim] at `fps`, T = duration x fps rounded."""
    waveform = np.asarray(waveform, np.float32)
    num_frames = frame_count(waveform.size, fps)
    window = max(1, round(window_s * fps))
    context, fade = round(context_s * fps), max(1, round(fade_s * fps))
    graphdef, state = nnx.split(speech)
    if num_frames <= window:  # one call on the whole clip
        run = jax.jit(lambda state, audio: nnx.merge(graphdef, state)(audio, num_frames))
        return np.asarray(run(state, jnp.asarray(waveform)[None]))[0]

    samples = math.ceil(window * SAMPLE_RATE / fps)
    run = jax.jit(lambda state, audio: nnx.merge(graphdef, state)(audio, window))
    total = np.zeros((num_frames, speech.config.latent_dim), np.float64)
    weight_sum = np.zeros((num_frames, 1), np.float64)
    for start in window_starts(num_frames, window, context, fade):
        first = round(start * SAMPLE_RATE / fps)
        chunk = waveform[first : first + samples]
        chunk = np.pad(chunk, (0, samples - chunk.size))  # only past the clip's end: silence, as whole-clip
        codes = np.asarray(run(state, jnp.asarray(chunk)[None]))[0]
        weights = window_weights(start, window, num_frames, context, fade)[:, None]
        total[start : start + window] += weights * codes
        weight_sum[start : start + window] += weights
    return (total / weight_sum).astype(np.float32)
