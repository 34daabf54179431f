"""Rendered frames and 16 kHz speech -> an H.264/AAC MP4, through the ffmpeg binary that imageio-ffmpeg ships.

Frames stream into ffmpeg's stdin one at a time, so a long animation never sits in memory as float images.
The file is written beside its destination and moved into place only once ffmpeg has finished, so a
crash never leaves a truncated video under the final name.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from data_pipelines.layout import AUDIO_RATE


def to_uint8(frame: np.ndarray, source: str) -> np.ndarray:
    """[H, W, 3] float in [0, 1] (clipped) or uint8 -> uint8; NaN (e.g. a rasterizer overflow) is an error."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{source}: expected an RGB frame [H, W, 3], got shape {list(frame.shape)}")
    if frame.dtype == np.uint8:
        return frame
    if not np.issubdtype(frame.dtype, np.floating):
        raise ValueError(f"{source}: frames must be uint8 or float in [0, 1], got {frame.dtype}")
    if not np.all(np.isfinite(frame)):
        raise ValueError(f"{source}: holds NaN or inf pixels")
    return np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p (what every player decodes) needs even sizes: repeat the last row/column of odd ones.

    Repeating, not black, keeps the shared chroma of the last real row/column true to its colour.
    """
    height, width = frame.shape[:2]
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _check_audio(audio: np.ndarray, path: Path) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0 or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(
            f"{path}: audio must be non-empty float mono [samples] (see audio_to_latent.to_16k_mono), got "
            f"{audio.dtype} {list(audio.shape)}"
        )
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"{path}: audio holds NaN or inf samples")
    return audio.astype("<f4")


def _check_durations(num_frames: int, fps: float, num_samples: int, sample_rate: int, path: Path) -> None:
    """Video and audio must agree to within one frame: a longer gap means the frames belong to other audio."""
    video_seconds, audio_seconds = num_frames / fps, num_samples / sample_rate
    if abs(video_seconds - audio_seconds) > 1.0 / fps + 1e-9:
        raise ValueError(
            f"{path}: {num_frames} frames at {fps:g} fps last {video_seconds:.3f} s but the audio lasts "
            f"{audio_seconds:.3f} s; they must agree within one frame ({1.0 / fps:.3f} s)"
        )


def _ffmpeg_command(
    width: int, height: int, fps: float, audio_file: Path | None, sample_rate: int, crf: int, output: Path
) -> list[str]:
    rate = str(Fraction(fps).limit_denominator(100000))
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-v", "error", "-nostdin"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", rate, "-i", "pipe:0"]
    if audio_file is not None:
        command += ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", str(audio_file)]
    # The BT.709 matrix is used and tagged, so players and decoders convert back to the same RGB.
    video_filter = (
        "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
        "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv"
    )
    command += ["-map", "0:v:0", "-vf", video_filter, "-c:v", "libx264", "-preset", "medium", "-crf", str(crf)]
    if audio_file is not None:
        command += ["-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
    return command + ["-movflags", "+faststart", "-f", "mp4", str(output)]


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    audio: np.ndarray | None = None,
    *,
    fps: float = 25.0,
    sample_rate: int = AUDIO_RATE,
    crf: int = 18,
) -> Path:
    """Encodes frames (an array [T, H, W, 3] or any iterable of [H, W, 3]; float in [0, 1] or uint8) to MP4.

    `audio` (mono float [samples] at `sample_rate`) is muxed as AAC; its duration must match the video's
    within one frame. Odd frame sizes gain a copy of their last row or column (yuv420p needs even sizes).
    `crf` is x264's quality (lower is better; 18 is visually lossless). Returns `path`.
    """
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    if audio is not None:
        audio = _check_audio(audio, path)
        if hasattr(frames, "__len__"):  # fail before encoding when the frame count is known up front
            _check_durations(len(frames), fps, audio.size, sample_rate, path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    first = to_uint8(first, f"{path}: frame 0")
    height, width = _even(first).shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part.mp4")
    try:
        with tempfile.TemporaryDirectory(prefix="uhap_video_") as scratch:
            audio_file = None
            if audio is not None:
                audio_file = Path(scratch) / "audio.f32"
                audio.tofile(audio_file)
            log_path = Path(scratch) / "ffmpeg.log"
            command = _ffmpeg_command(width, height, fps, audio_file, sample_rate, crf, partial)
            num_frames = _encode(command, itertools.chain([first], frames), first.shape, log_path, path)
        if audio is not None:
            _check_durations(num_frames, fps, audio.size, sample_rate, path)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return path


def _encode(
    command: list[str], frames: Iterator[np.ndarray], shape: tuple[int, ...], log_path: Path, path: Path
) -> int:
    """Runs ffmpeg, feeding it every frame (all of `shape`); returns the number of frames written."""
    num_frames = 0
    with open(log_path, "w+b") as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            for frame in frames:
                frame = to_uint8(frame, f"{path}: frame {num_frames}")
                if frame.shape != shape:
                    raise ValueError(f"{path}: frame {num_frames} has shape {list(frame.shape)}, frame 0 {list(shape)}")
                process.stdin.write(np.ascontiguousarray(_even(frame)).tobytes())
                num_frames += 1
            process.stdin.close()
            returncode = process.wait()
        except BrokenPipeError:  # ffmpeg quit early; its log says why
            returncode = process.wait() or 1
        except BaseException:
            process.kill()
            process.wait()
            raise
        log.seek(0)
        message = log.read().decode(errors="replace").strip()
    if returncode != 0:
        raise RuntimeError(f"{path}: ffmpeg failed (exit {returncode}): {message or 'no message'}")
    return num_frames
