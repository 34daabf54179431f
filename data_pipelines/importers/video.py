"""Video and audio decoding through the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed)."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from data_pipelines.layout import AUDIO_RATE, LayoutError


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container header says: frame size, frame rate and whether an audio stream exists."""

    width: int
    height: int
    fps: float
    has_audio: bool


def _open_frames(path: Path):
    # passthrough: every decoded frame once, never duplicated or dropped to hit a nominal frame rate.
    return imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-fps_mode", "passthrough"])


def probe_video(path: Path) -> VideoInfo:
    """Reads the header of `path`; a missing or undecodable file is a LayoutError naming it."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: video file is missing")
    frames = _open_frames(path)
    try:
        meta = next(frames)
    except (OSError, RuntimeError, StopIteration) as error:
        raise LayoutError(f"{path}: not a decodable video ({error})") from error
    finally:
        frames.close()
    width, height = (int(s) for s in meta["size"])
    if not meta.get("fps"):
        raise LayoutError(f"{path}: the video header gives no frame rate")
    return VideoInfo(width, height, float(meta["fps"]), has_audio="audio_codec" in meta)


def read_video_frames(path: Path) -> Iterator[np.ndarray]:
    """Yields the frames of `path` one at a time as uint8 [H, W, 3], so that long videos stream."""
    path = Path(path)
    info = probe_video(path)
    frames = _open_frames(path)
    try:
        next(frames)
        for buffer in frames:
            if len(buffer) != info.width * info.height * 3:
                expected = f"{info.width}x{info.height}x3"
                raise LayoutError(f"{path}: a decoded frame has {len(buffer)} bytes, not {expected}")
            yield np.frombuffer(buffer, np.uint8).reshape(info.height, info.width, 3)
    except (OSError, RuntimeError) as error:
        raise LayoutError(f"{path}: video decoding failed ({error})") from error
    finally:
        frames.close()


def read_video_audio(path: Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """Decodes the first audio stream of `path` to float32 mono at `rate`; ffmpeg mixes down, resamples."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn"]
    command += ["-ac", "1", "-ar", str(rate), "-f", "f32le", "-"]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise LayoutError(f"{path}: could not decode its audio stream ({message})")
    waveform = np.frombuffer(result.stdout, "<f4").astype(np.float32)
    if waveform.size == 0:
        raise LayoutError(f"{path}: the audio stream has no samples")
    return waveform
