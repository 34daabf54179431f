"""Audio decoding through the bundled ffmpeg: every common format, rate and channel count to 16 kHz mono, against
a float64 reference; files a speech model cannot use are refused with a line naming the file and the reason."""

from __future__ import annotations

import struct
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from scipy import signal

from data_pipelines import audio_io, layout
from data_pipelines.layout import LayoutError


def _encode(path: Path, samples: np.ndarray, rate: int, *codec: str) -> Path:
    """Writes float [T, C] samples through ffmpeg with the given output options."""
    channels = samples.shape[1]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "f32le", "-ar", str(rate), "-ac",
               str(channels), "-i", "-", *codec, str(path)]  # fmt: skip
    subprocess.run(command, input=samples.astype("<f4").tobytes(), check=True)
    return path


def _reference(samples: np.ndarray, rate: int) -> np.ndarray:
    """float64: channel mean, then the polyphase resampling to 16 kHz."""
    mono = samples.astype(np.float64).mean(axis=1)
    ratio = Fraction(16_000, rate)
    return signal.resample_poly(mono, ratio.numerator, ratio.denominator) if rate != 16_000 else mono


def _random_audio(rng: np.random.Generator, seconds: float, rate: int, channels: int) -> np.ndarray:
    return (0.3 * rng.standard_normal((round(seconds * rate), channels))).clip(-0.99, 0.99)


@pytest.mark.parametrize(
    ("suffix", "codec", "channels", "rate", "atol"),
    [
        (".wav", ["-c:a", "pcm_f32le"], 1, 44_100, 1e-6),  # 32-bit float WAV ("format 3")
        (".wav", ["-c:a", "pcm_f32le"], 6, 48_000, 1e-6),  # 5.1: WAVE_FORMAT_EXTENSIBLE
        (".wav", ["-c:a", "pcm_s24le"], 2, 22_050, 1e-6),  # 24-bit PCM
        (".flac", ["-c:a", "flac"], 2, 8_000, 1e-4),  # lossless, 16-bit
    ],
)
def test_lossless_formats_decode_to_the_float64_reference(tmp_path, rng, suffix, codec, channels, rate, atol):
    samples = _random_audio(rng, 0.7, rate, channels)
    path = _encode(tmp_path / f"speech{suffix}", samples, rate, *codec)
    decoded = audio_io.decode_audio(path)
    assert decoded.rate == rate and decoded.channels == channels
    waveform, notes = layout.read_audio(path)
    reference = _reference(samples, rate)
    assert waveform.dtype == np.float32 and waveform.shape == reference.shape
    np.testing.assert_allclose(waveform, reference, atol=atol * 20)
    assert (f"{path}: mixed {channels} channels down to mono" in notes) == (channels > 1)
    assert f"{path}: resampled {rate}->16000 Hz" in notes


@pytest.mark.parametrize(("suffix", "codec"), [(".mp3", ["-c:a", "libmp3lame"]), (".m4a", ["-c:a", "aac"])])
def test_lossy_formats_keep_the_signal(tmp_path, rng, suffix, codec):
    """A lossy codec cannot give the samples back; a tone must come back as that tone, at its length."""
    rate, seconds = 44_100, 1.0
    hz = float(rng.uniform(200, 800))
    t = np.arange(round(rate * seconds)) / rate
    tone = 0.4 * np.sin(2 * np.pi * hz * t)
    path = _encode(tmp_path / f"speech{suffix}", np.stack([tone, tone], 1), rate, *codec)
    waveform, _ = layout.read_audio(path)
    assert abs(waveform.size / 16_000 - seconds) < 0.06  # encoder priming/padding: tens of milliseconds
    core = waveform[2000:14000]
    time = (np.arange(waveform.size) / 16_000)[2000:14000]
    basis = np.stack([np.sin(2 * np.pi * hz * time), np.cos(2 * np.pi * hz * time)], 1)
    fit, *_ = np.linalg.lstsq(basis, core, rcond=None)
    assert np.corrcoef(basis @ fit, core)[0, 1] > 0.99


def test_pcm16_round_trip_stays_exact(tmp_path, rng):
    waveform = (rng.integers(-32768, 32767, 8000) / 32768.0).astype(np.float32)
    layout.write_audio(tmp_path / "a.wav", waveform)
    read, notes = layout.read_audio(tmp_path / "a.wav")
    np.testing.assert_array_equal(read, waveform) and not notes


def _pcm_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((samples * 32000).astype("<i2").tobytes())
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zero_rate(path: Path, rng: np.random.Generator) -> Path:
    _pcm_wav(path, rng.uniform(-0.5, 0.5, 1600), 16_000)
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", 0)  # the fmt chunk's sample rate
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, rng: _written(p, b""), r"empty \(0 bytes\)"),
        (lambda p, rng: _pcm_wav(p, rng.uniform(-0.5, 0.5, 10), 16_000), "at least 0.1 s"),
        (lambda p, rng: _pcm_wav(p, rng.uniform(-0.5, 0.5, 1500), 16_000), "at least 0.1 s"),
        (_zero_rate, "sample rate of 0 Hz"),
        (lambda p, rng: _written(p, b"plain text, not audio\n" * 50), "not a readable audio file"),
        (lambda p, rng: p, "missing"),
    ],
)
def test_unusable_audio_is_refused_with_its_name(tmp_path, rng, make, message):
    path = make(tmp_path / "speech.wav", rng)
    with pytest.raises(LayoutError, match=message) as error:
        audio_io.decode_audio(path)  # what `uhap animate` reads a speech file with
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_capture_audio_may_be_short_but_not_empty(tmp_path, rng):
    """A capture's audio is cut to its frames (a 2-frame sequence lasts 80 ms): the layout reads it; not nothing."""
    samples = rng.uniform(-0.5, 0.5, 1280)
    waveform, _ = layout.read_audio(_pcm_wav(tmp_path / "short.wav", samples, 16_000))
    np.testing.assert_allclose(waveform, (samples * 32000).astype("<i2") / 32768, atol=1e-7)  # as _pcm_wav wrote
    with pytest.raises(LayoutError, match="empty"):
        layout.read_audio(_written(tmp_path / "empty.wav", b""))


def test_video_without_audio_is_refused(tmp_path, rng):
    frames = rng.integers(0, 255, (5, 16, 16, 3), np.uint8)
    path = tmp_path / "silent.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "16x16",
               "-r", "25", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(command, input=frames.tobytes(), check=True)
    with pytest.raises(LayoutError, match="no audio stream"):
        audio_io.decode_audio(path)
