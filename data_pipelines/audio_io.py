"""Audio files of any common format (WAV of any sample format, MP3, M4A/AAC, FLAC, OGG, ...) decoded through the
ffmpeg binary that imageio-ffmpeg ships, so no system ffmpeg is needed.

ffmpeg decodes every channel to 32-bit float at the file's own rate and hands it over as a WAV stream; channels
are then averaged and the rate changed here (`scipy.signal.resample_poly`), exactly as for the capture layout's
own 16-bit files, so a speech model hears a file the same way in training and at inference. Files a speech model
cannot use (empty, shorter than `MIN_SECONDS`, a header with a sample rate of 0) are refused with a message that
names the file and says why.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from scipy import signal

from data_pipelines.errors import LayoutError

AUDIO_RATE = 16000  # what the speech model and the capture layout's audio.wav files run at
MIN_SECONDS = 0.1  # shorter input holds no speech a model could follow (and less than one 25 fps frame pair)


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """Every channel of a file as float32 [samples, channels] in [-1, 1], at the file's own `rate`."""

    samples: np.ndarray
    rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.rate


def _riff_chunks(data: bytes, start: int = 12):
    """(chunk id, payload offset, payload size) of a RIFF body; a size past the end runs to the end (pipes)."""
    offset = start
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        payload = offset + 8
        yield chunk_id, payload, min(size, len(data) - payload)
        offset = payload + size + (size & 1)


def _check_wav_header(path: Path, head: bytes) -> None:
    """A RIFF/WAVE file whose format chunk says 0 Hz or 0 channels cannot be decoded by anyone: say so."""
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return
    for chunk_id, payload, size in _riff_chunks(head):
        if chunk_id == b"fmt " and size >= 16:
            _, channels, rate = struct.unpack("<HHI", head[payload : payload + 8])
            if rate == 0:
                raise LayoutError(f"{path}: the WAV header gives a sample rate of 0 Hz; the file is damaged, "
                                  "export it again")  # fmt: skip
            if channels == 0:
                raise LayoutError(f"{path}: the WAV header gives 0 channels; the file is damaged, export it again")
            return


def _parse_float_wav(data: bytes, source: Path) -> DecodedAudio:
    """ffmpeg's `-f wav -c:a pcm_f32le` output (sizes may be placeholders on a pipe) -> DecodedAudio."""
    channels = rate = None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise LayoutError(f"{source}: ffmpeg produced no WAV stream")
    for chunk_id, payload, size in _riff_chunks(data):
        if chunk_id == b"fmt ":
            _, channels, rate = struct.unpack("<HHI", data[payload : payload + 8])
        elif chunk_id == b"data":
            if not channels or not rate:
                raise LayoutError(f"{source}: decoded audio has no format (channels, rate)")
            body = data[payload : payload + size]
            usable = len(body) - len(body) % (4 * channels)
            samples = np.frombuffer(body[:usable], "<f4").reshape(-1, channels)
            return DecodedAudio(samples.astype(np.float32), int(rate))
    raise LayoutError(f"{source}: ffmpeg produced no audio samples")


def decode_audio(path: Path, *, min_seconds: float = MIN_SECONDS) -> DecodedAudio:
    """The first audio stream of `path`, every channel, at its own rate; unusable files are LayoutErrors.

    `min_seconds` is what a speech model needs to hear (a capture's audio, cut to its frames, may be shorter).
    """
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: audio file is missing")
    size = path.stat().st_size
    if size == 0:
        raise LayoutError(f"{path}: the file is empty (0 bytes); give a recording with speech in it")
    with path.open("rb") as stream:
        _check_wav_header(path, stream.read(4096))
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-vn",
               "-map_metadata", "-1", "-fflags", "+bitexact", "-c:a", "pcm_f32le", "-f", "wav", "-"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        text = result.stderr.decode(errors="replace").strip()
        reason = text.splitlines()[-1] if text else f"ffmpeg exit status {result.returncode}"
        if "matches no streams" in text or "does not contain any stream" in text:
            reason = "it has no audio stream"
        raise LayoutError(f"{path}: not a readable audio file ({reason}); give WAV, MP3, M4A, FLAC or OGG audio")
    audio = _parse_float_wav(result.stdout, path)
    if audio.samples.shape[0] == 0:
        raise LayoutError(f"{path}: holds no audio samples; give a recording with speech in it")
    if audio.seconds < min_seconds:
        raise LayoutError(f"{path}: lasts {audio.seconds * 1000:.1f} ms; at least {min_seconds:g} s of speech is "
                          "needed")  # fmt: skip
    if not np.all(np.isfinite(audio.samples)):
        raise LayoutError(f"{path}: decoded samples contain NaN or inf")
    return audio


def to_mono(audio: DecodedAudio, target_rate: int, source: Path) -> tuple[np.ndarray, list[str]]:
    """The channels' mean, resampled to `target_rate` (polyphase filter), and notes saying what was changed."""
    notes = []
    if audio.channels > 1:
        notes.append(f"{source}: mixed {audio.channels} channels down to mono")
    waveform = audio.samples.mean(axis=1, dtype=np.float64)
    if audio.rate != target_rate:
        ratio = Fraction(int(target_rate), int(audio.rate))
        waveform = signal.resample_poly(waveform, ratio.numerator, ratio.denominator)
        notes.append(f"{source}: resampled {audio.rate}->{target_rate} Hz")
    return waveform.astype(np.float32), notes


def read_audio(path: Path, *, target_rate: int = AUDIO_RATE, min_seconds: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Any audio file -> float32 mono at `target_rate` (default 16 kHz), and notes of what was mixed or resampled.
    Any length above zero by default: a capture's audio is checked against its frames instead."""
    return to_mono(decode_audio(path, min_seconds=min_seconds), target_rate, Path(path))
