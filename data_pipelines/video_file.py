"""A plain video file (a phone's mp4/mov: any frame rate, portrait or landscape, no calibration) read into upright
frames with the camera's intrinsics.

ffmpeg (imageio-ffmpeg's binary) decodes and applies the file's rotation, so portrait clips come out portrait.
The focal length comes from, in this order: a user calibration (`calibration`: a capture-layout calibration file
and camera serial, or explicit intrinsics), the file's metadata (the 35 mm-equivalent focal length phones write,
e.g. QuickTime's `com.apple.quicktime.camera.focal_length.35mm_equivalent`, converted to pixels over the frame's
diagonal: 35 mm film's is 43.27 mm), else a stated field of view across the frame's longer side (`fov_deg`).
Which one was used is returned in words, to be logged and recorded.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from data_pipelines import layout
from data_pipelines.errors import LayoutError

FILM_DIAGONAL_MM = 43.27  # the diagonal of 35 mm film (36 x 24 mm): what "35 mm equivalent" focal lengths refer to
# A phone's main camera: ~26 mm equivalent, 69 degrees across the longer side of its 4:3 frame.
DEFAULT_FOV_DEG = 69.0
SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")
_FOCAL_35MM = re.compile(r"^\s*(\S*focal_?length\S*35\S*|FocalLengthIn35mmFormat)\s*:\s*([0-9.]+)", re.I | re.M)
_ROTATION = re.compile(r"rotation of (-?[0-9.]+) degrees|^\s*rotate\s*:\s*(-?[0-9.]+)", re.M)


@dataclasses.dataclass(frozen=True)
class VideoFile:
    """Upright frames of a video file and the pinhole intrinsics that go with them (in their pixels)."""

    path: Path
    images: np.ndarray  # [F, H, W, 3] uint8
    fps: float  # of the frames' timeline (the file's, or the resampled one)
    source_fps: float
    frame_index: np.ndarray  # [F] each frame's index in the file
    intrinsics: np.ndarray  # [3, 3]
    intrinsics_source: str  # which of calibration, metadata and default field of view gave it
    rotation_deg: float  # the file's display rotation, applied


def probe(path: Path) -> str:
    """ffmpeg's description of the file (streams, metadata, side data): what `-i` prints."""
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                            text=True, errors="replace")  # fmt: skip
    if "Stream #" not in result.stderr or "Video:" not in result.stderr:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
        raise LayoutError(f"{path}: not a readable video ({last}); give an mp4/mov file or a capture-layout folder")
    return result.stderr


def focal_35mm(description: str) -> float | None:
    """The 35 mm-equivalent focal length (mm) in ffmpeg's description of a file, when its metadata has one."""
    match = _FOCAL_35MM.search(description)
    return float(match.group(2)) if match and float(match.group(2)) > 0 else None


def rotation_deg(description: str) -> float:
    match = _ROTATION.search(description)
    return float(match.group(1) or match.group(2)) if match else 0.0


def intrinsics_for(width: int, height: int, *, focal_mm_35: float | None = None,
                   fov_deg: float = DEFAULT_FOV_DEG) -> tuple[np.ndarray, str]:  # fmt: skip
    """Intrinsics of a [height, width] frame from a 35 mm-equivalent focal length, else from a field of view across
    its longer side; the principal point at the centre. Returns them and their source in words."""
    if focal_mm_35:
        focal = focal_mm_35 / FILM_DIAGONAL_MM * float(np.hypot(width, height))
        source = f"metadata: {focal_mm_35:g} mm (35 mm equivalent)"
    else:
        if not 1.0 < fov_deg < 170.0:
            raise ValueError(f"field of view {fov_deg} degrees: give one between 1 and 170")
        focal = max(width, height) / 2 / np.tan(np.deg2rad(fov_deg) / 2)
        source = f"default field of view: {fov_deg:g} degrees across the longer side"
    k = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    return k, source


def focal_35mm_of(intrinsics: np.ndarray, width: int, height: int) -> float:
    """The 35 mm-equivalent focal length (mm) of a camera's intrinsics for [height, width] frames."""
    return float(intrinsics[1, 1]) / float(np.hypot(width, height)) * FILM_DIAGONAL_MM


def write_video_file(path: str | Path, images: np.ndarray, fps: float, *, focal_mm_35: float | None = None) -> Path:
    """Frames [F, H, W, 3] uint8 as an H.264 mp4/mov (even sizes), with a 35 mm-equivalent focal length in its
    metadata (QuickTime's key, as phones write it) when given: a clip as a phone would hand it over."""
    path = Path(path)
    target = path.with_name(f".{path.stem}.plain{path.suffix}") if focal_mm_35 else path
    height, width = images.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(target), (width, height), fps=fps, quality=9, macro_block_size=2,
                                         ffmpeg_log_level="error")  # fmt: skip
    writer.send(None)
    for image in images:
        writer.send(np.ascontiguousarray(image))
    writer.close()
    if focal_mm_35:
        key = "com.apple.quicktime.camera.focal_length.35mm_equivalent"
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(target), "-c", "copy",
                   "-metadata", f"{key}={focal_mm_35:.4f}", "-movflags", "use_metadata_tags", str(path)]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        target.unlink()
    return path


def calibration_intrinsics(calibration: str | Path, serial: str, width: int, height: int) -> tuple[np.ndarray, str]:
    """A user calibration's intrinsics for the file's upright [height, width] frames: a capture-layout
    `calibration/camera_params.json` (camera `serial`, or its only camera; scaled to the frames when it was made at
    another resolution of the same aspect), or a 3x3 matrix (.npy, or text) in the file's upright pixels."""
    path = Path(calibration)
    if not path.is_file():
        raise LayoutError(f"{path}: calibration file not found; give a capture-layout calibration/camera_params.json "
                          "or a 3x3 intrinsics matrix (.npy or text)")  # fmt: skip
    if path.suffix == ".json":
        subject_dir = path.parent.parent
        if subject_dir / layout.CALIBRATION_FILE != path:
            raise LayoutError(f"{path}: a calibration .json must be a capture layout's {layout.CALIBRATION_FILE}")
        cameras = layout.read_calibration(subject_dir)
        if not serial and len(cameras) == 1:
            serial = next(iter(cameras))
        if serial not in cameras:
            raise LayoutError(f"{path}: no camera {serial!r} (has {sorted(cameras)}); name one with camera=<serial>")
        camera = cameras[serial]
        k, size = camera.intrinsics.astype(np.float64), (camera.width, camera.height)
    else:
        try:
            k = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
        except ValueError as error:
            raise LayoutError(f"{path}: not a 3x3 intrinsics matrix ({error})") from error
        if k.shape != (3, 3):
            raise LayoutError(f"{path}: intrinsics of shape {list(k.shape)}; give a 3x3 matrix")
        size = (width, height)
    if abs(size[0] / size[1] - width / height) > 0.01:
        raise LayoutError(f"{path}: calibrated for {size[0]}x{size[1]} frames, the video's are {width}x{height}")
    return np.diag([width / size[0], height / size[1], 1.0]) @ k, f"calibration: {path}"


def _wanted(count: int, source_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Indices of the file's frames to keep: resampled to `fps` (0: as they are), then at most `max_frames`
    spread evenly."""
    if fps and abs(fps - source_fps) > 1e-6:
        times = np.arange(int(np.floor(count / source_fps * fps + 1e-6))) / fps
        index = np.unique(np.minimum(np.round(times * source_fps).astype(int), count - 1))
    else:
        index = np.arange(count)
    if max_frames and len(index) > max_frames:
        index = index[np.linspace(0, len(index) - 1, max_frames).round().astype(int)]
    return index


def read_video_file(path: str | Path, *, fps: float = 0.0, max_frames: int = 0, max_side: int = 0,
                    fov_deg: float = DEFAULT_FOV_DEG, calibration: str | Path = "",
                    camera: str = "") -> VideoFile:  # fmt: skip
    """The file's upright frames (resampled to `fps` when given, at most `max_frames` spread evenly, shrunk so that
    the longer side is at most `max_side` when given) and their intrinsics (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: video file not found")
    description = probe(path)
    output = ["-vf", f"scale=w='min(iw,{max_side})':h='min(ih,{max_side})':force_original_aspect_ratio=decrease:"
                     "force_divisible_by=2"] if max_side else None  # fmt: skip
    reader = imageio_ffmpeg.read_frames(str(path), output_params=output)
    try:
        meta = reader.__next__()
        width, height = meta["size"]
        source_fps = float(meta["fps"])
        estimate = max(1, int(round(float(meta.get("duration") or 0.0) * source_fps)))
        keep = set(_wanted(estimate, source_fps, fps, max_frames).tolist())
        frames, index = [], []
        for i, data in enumerate(reader):
            if i in keep:  # (a duration that is a frame off loses or ignores that frame)
                frames.append(np.frombuffer(data, np.uint8).reshape(height, width, 3))
                index.append(i)
    except (RuntimeError, OSError, KeyError, StopIteration) as error:
        raise LayoutError(f"{path}: could not decode ({error}); give an mp4/mov file ffmpeg can read") from error
    finally:
        reader.close()
    if not frames:
        raise LayoutError(f"{path}: no frames decoded; give a video with at least one frame")
    source_w, source_h = meta["source_size"]
    upright = (source_w, source_h) if (source_w >= source_h) == (width >= height) else (source_h, source_w)
    if calibration:
        k, source = calibration_intrinsics(calibration, camera, *upright)
        k = np.diag([width / upright[0], height / upright[1], 1.0]) @ k
    else:
        k, source = intrinsics_for(width, height, focal_mm_35=focal_35mm(description), fov_deg=fov_deg)
    return VideoFile(path, np.stack(frames), float(fps) if fps else source_fps, source_fps, np.asarray(index), k,
                     source, rotation_deg(description))  # fmt: skip
