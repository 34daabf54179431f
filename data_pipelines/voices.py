"""Many speakers from eSpeak NG, and the rooms and microphones they are recorded through.

A voice is an accent (eSpeak language) with a variant (its timbre: formant sets, including the Klatt
synthesiser's), a base pitch, an intonation range and a speaking rate. The variants are split in two: identities
seen in training speak with training variants, and the held-out voice(s) use variants that no training sequence
uses, so that "an unseen voice" is a real test. `record` then passes clean speech through a room (reverberation
from a synthetic impulse response), a microphone (high-pass, presence peak, high-frequency roll-off) and
background noise at a random SNR, as a phone or a capture stage would; the direct sound stays at time zero, so
the phoneme timing does not move.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import signal

from data_pipelines.speech import AUDIO_RATE, Voice

ACCENTS = ("en-us", "en", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan")
# Human-sounding variants of eSpeak NG's voices/!v (no robots, whispers or effects), split train / held out.
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m5", "m7", "f1", "f2", "f3", "f5", "klatt", "klatt2", "Andy", "adam", "anika", "benjamin",
    "caleb", "david", "ed", "edward", "ian", "john", "linda", "max", "michel", "norbert", "paul", "quincy",
    "rob", "robert", "steph", "travis", "victor", "zac", "aunty", "belinda", "shelby", "Alicia", "Michael",
)  # fmt: skip
HELD_OUT_VARIANTS = ("m4", "f4", "klatt4", "grandpa", "Annie", "Lee")
_FEMALE = {"f1", "f2", "f3", "f4", "f5", "anika", "linda", "steph", "aunty", "belinda", "shelby", "Alicia", "Annie"}


def draw_voice(rng: np.random.Generator, held_out: bool = False) -> Voice:
    """A random speaker: accent, variant (from the training or the held-out pool), pitch, range and rate."""
    variant = str(rng.choice(HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS))
    low, high = (45, 85) if variant in _FEMALE else (15, 60)
    return Voice(
        name=f"{rng.choice(ACCENTS)}+{variant}",
        rate_wpm=int(rng.integers(130, 200)),
        pitch=int(rng.integers(low, high)),
        pitch_range=int(rng.integers(20, 90)),
    )


def variant(voice: Voice) -> str:
    """The timbre part of a voice name ("en-us+m3" -> "m3"; no variant -> "")."""
    return voice.name.partition("+")[2]


@dataclasses.dataclass(frozen=True)
class Recording:
    """How one clip was recorded (kept in meta.json so that the conditions are known)."""

    rt60: float  # seconds, reverberation time of the room
    direct_to_reverb_db: float
    snr_db: float  # speech to background noise
    highpass_hz: float
    presence_db: float  # peak near 3 kHz
    rolloff_hz: float  # low-pass corner

    def to_dict(self) -> dict:
        return {k: round(float(v), 3) for k, v in dataclasses.asdict(self).items()}


def draw_recording(rng: np.random.Generator) -> Recording:
    return Recording(
        rt60=float(rng.uniform(0.15, 0.6)),
        direct_to_reverb_db=float(rng.uniform(0.0, 12.0)),
        snr_db=float(rng.uniform(15.0, 35.0)),
        highpass_hz=float(rng.uniform(60.0, 200.0)),
        presence_db=float(rng.uniform(-3.0, 6.0)),
        rolloff_hz=float(rng.uniform(4500.0, 7500.0)),
    )


def room_impulse_response(rt60: float, direct_to_reverb_db: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: a unit direct path at t = 0, a few early reflections, then a diffuse tail of noise
    decaying 60 dB over `rt60` seconds, scaled to the given direct-to-reverberant energy ratio."""
    length = int(min(rt60, 1.0) * AUDIO_RATE)
    times = np.arange(length) / AUDIO_RATE
    tail = rng.normal(size=length) * np.exp(-6.9 * times / rt60)
    tail[: int(0.003 * AUDIO_RATE)] = 0.0  # the tail starts after the direct sound
    for _ in range(6):  # early reflections, 3-25 ms
        tail[int(rng.uniform(0.003, 0.025) * AUDIO_RATE)] += rng.uniform(0.2, 0.6) * rng.choice([-1, 1])
    tail *= np.sqrt(10 ** (-direct_to_reverb_db / 10) / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def microphone(audio: np.ndarray, recording: Recording) -> np.ndarray:
    """High-pass, a presence peak around 3 kHz and a low-pass roll-off (a small microphone's response)."""
    sos = signal.butter(2, recording.highpass_hz, "highpass", fs=AUDIO_RATE, output="sos")
    out = signal.sosfilt(sos, audio)
    b, a = _peaking(3000.0, recording.presence_db, 1.0)
    out = signal.lfilter(b, a, out)
    sos = signal.butter(2, recording.rolloff_hz, "lowpass", fs=AUDIO_RATE, output="sos")
    return signal.sosfilt(sos, out)


def _peaking(centre_hz: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """RBJ cookbook peaking biquad."""
    amplitude = 10 ** (gain_db / 40)
    omega = 2 * np.pi * centre_hz / AUDIO_RATE
    alpha = np.sin(omega) / (2 * q)
    b = np.array([1 + alpha * amplitude, -2 * np.cos(omega), 1 - alpha * amplitude])
    a = np.array([1 + alpha / amplitude, -2 * np.cos(omega), 1 - alpha / amplitude])
    return b / a[0], a / a[0]


def background_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Pink-ish noise (1/f power) with a slow level drift and a faint mains hum: an ordinary room."""
    white = np.fft.rfft(rng.normal(size=length))
    freqs = np.fft.rfftfreq(length, 1 / AUDIO_RATE)
    pink = np.fft.irfft(white / np.sqrt(np.maximum(freqs, 20.0)), n=length)
    drift = 1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * np.arange(length) / AUDIO_RATE)
    hum = 0.1 * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * np.arange(length) / AUDIO_RATE)
    noise = pink / (np.std(pink) + 1e-12) * drift + hum
    return noise / (np.std(noise) + 1e-12)


def record(audio: np.ndarray, recording: Recording, rng: np.random.Generator) -> np.ndarray:
    """Clean speech [T] -> the room, microphone and background noise of `recording`; same length, float32,
    peak at most 0.99 (the level of the clean speech is kept unless that would clip)."""
    audio = np.asarray(audio, np.float64)
    wet = signal.fftconvolve(audio, room_impulse_response(recording.rt60, recording.direct_to_reverb_db, rng))
    wet = microphone(wet[: len(audio)], recording)
    speech_power = np.mean(wet**2) + 1e-12
    noisy = wet + np.sqrt(speech_power / 10 ** (recording.snr_db / 10)) * background_noise(len(audio), rng)
    noisy *= np.sqrt(np.mean(audio**2) / (np.mean(noisy**2) + 1e-12))
    peak = np.abs(noisy).max()
    if peak > 0.99:
        noisy *= 0.99 / peak
    return noisy.astype(np.float32)
