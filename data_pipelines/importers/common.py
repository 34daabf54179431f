"""Checks and conversions that every importer shares: audio against frames, intrinsics against frame size."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines import layout
from data_pipelines.layout import AUDIO_RATE, LayoutError


def fit_audio_to_frames(
    waveform: np.ndarray, *, num_frames: int, fps: float, source: Path, max_overhang_s: float
) -> tuple[np.ndarray, list[str]]:
    """Cuts or pads 16 kHz audio to exactly the video's span and says so.

    Audio shorter than the video by more than one frame period, or longer by more than `max_overhang_s`,
    means the audio and the frames disagree: a LayoutError naming `source`. Anything smaller is fixed here
    and reported in the returned notes, never silently.
    """
    needed = round(num_frames / fps * AUDIO_RATE)
    frame_samples = AUDIO_RATE / fps
    have = int(waveform.shape[0])
    audio_s, video_s = have / AUDIO_RATE, num_frames / fps
    if have < needed - frame_samples:
        raise LayoutError(
            f"{source}: audio lasts {audio_s:.3f} s but the {num_frames} frames at {fps:g} fps last {video_s:.3f} s"
        )
    if have > needed + max_overhang_s * AUDIO_RATE:
        raise LayoutError(
            f"{source}: audio lasts {audio_s:.3f} s, more than {max_overhang_s:g} s beyond the "
            f"{num_frames} frames at {fps:g} fps ({video_s:.3f} s); frames are missing or the audio belongs "
            "elsewhere"
        )
    notes = []
    if have > needed:
        notes.append(f"{source}: cut {(have - needed) / AUDIO_RATE:.3f} s of audio after the last frame")
    elif have < needed:
        notes.append(f"{source}: padded the last {(needed - have) / AUDIO_RATE:.3f} s of audio with silence")
    fitted = np.zeros(needed, np.float32)
    fitted[: min(have, needed)] = waveform[:needed]
    return fitted, notes


def scale_intrinsics(intrinsics: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Rescales a pixel-unit K calibrated at `from_size` (W, H) to images of `to_size` (W, H).

    With pixel centres at +0.5 the image edges sit at 0 and W, so focal lengths and principal point scale by
    the same factor per axis.
    """
    scale = np.diag([to_size[0] / from_size[0], to_size[1] / from_size[1], 1.0])
    return scale @ np.asarray(intrinsics, np.float64)


def check_principal_point(intrinsics: np.ndarray, width: int, height: int, source: Path, hint: str) -> None:
    """A principal point outside the frame means the intrinsics belong to another resolution."""
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    if not (0 < cx < width and 0 < cy < height):
        raise LayoutError(
            f"{source}: principal point ({cx:.1f}, {cy:.1f}) lies outside the {width}x{height} frames; "
            f"the intrinsics were calibrated at another resolution ({hint})"
        )


# How far a stored rotation may be from orthonormal: calibration files print 6-17 significant digits, so real
# rotations sit within ~1e-6 of R R^T = I; the layout's reader accepts up to 1e-4, and so do we (no looser).
ROTATION_TOLERANCE = 1e-4


def check_rotation(rotation: np.ndarray, source: Path, what: str) -> None:
    """A rotation block must be orthonormal with determinant +1 (not a reflection, not scaled or sheared)."""
    rotation = np.asarray(rotation, np.float64)
    deviation = float(np.max(np.abs(rotation @ rotation.T - np.eye(3))))
    if deviation > ROTATION_TOLERANCE:
        raise LayoutError(f"{source}: {what} has a rotation block that is not orthonormal (R Rᵀ is off the "
                          f"identity by up to {deviation:.3g}, more than {ROTATION_TOLERANCE:g}): "
                          f"{rotation.tolist()}")  # fmt: skip
    determinant = float(np.linalg.det(rotation))
    if determinant < 0:
        raise LayoutError(f"{source}: {what} has a rotation block with determinant {determinant:.4f}, a mirror "
                          "image; the axes are not OpenCV's right-handed ones")  # fmt: skip


def check_intrinsics(intrinsics: np.ndarray, source: Path, what: str) -> None:
    """A pinhole K: positive focal lengths, [0 0 1] last row, nothing below the diagonal."""
    k = np.asarray(intrinsics, np.float64)
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise LayoutError(f"{source}: {what} has focal lengths fx={k[0, 0]:g}, fy={k[1, 1]:g}; both must be "
                          "positive (pixels)")  # fmt: skip
    if not np.allclose(k[2], [0, 0, 1]) or abs(k[1, 0]) > 1e-9:
        raise LayoutError(f"{source}: {what} is not a pinhole matrix [[fx s cx] [0 fy cy] [0 0 1]]: {k.tolist()}")


def check_image_size(width: int, height: int, source: Path) -> None:
    if not (width > 0 and height > 0):
        raise LayoutError(f"{source}: frames of {width}x{height} pixels; both sides must be positive")


def checked_camera(serial: str, world_to_cam: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                   source: Path, hint: str) -> layout.Camera:  # fmt: skip
    """A layout camera after every check a calibration must pass: a rigid world-to-camera transform, a pinhole
    K with positive focal lengths, a principal point inside positive-sized frames."""
    world_to_cam = np.asarray(world_to_cam, np.float64)
    if not np.allclose(world_to_cam[3], [0, 0, 0, 1]):
        raise LayoutError(f"{source}: world_2_cam of camera {serial} has last row {world_to_cam[3].tolist()}, "
                          "not [0, 0, 0, 1]")  # fmt: skip
    check_rotation(world_to_cam[:3, :3], source, f"world_2_cam of camera {serial}")
    check_intrinsics(intrinsics, source, f"the intrinsics of camera {serial}")
    check_image_size(width, height, source)
    check_principal_point(intrinsics, width, height, source, hint)
    return layout.Camera(serial, world_to_cam, np.asarray(intrinsics, np.float64), int(width), int(height))


def finite_array(value, shape: tuple[int, ...], source: Path, what: str) -> np.ndarray:
    """`value` as float64 of exactly `shape` with no NaN or inf, else a LayoutError naming `source`."""
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError) as error:
        raise LayoutError(f"{source}: {what} is not numeric ({error})") from error
    if array.shape != shape:
        raise LayoutError(f"{source}: {what} has shape {list(array.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(array)):
        raise LayoutError(f"{source}: {what} contains NaN or inf")
    return array


def rigid_world_to_cam(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """[R | t] as a 4x4 world-to-camera matrix."""
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = rotation
    world_to_cam[:3, 3] = translation
    return world_to_cam


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; missing, unparsable or non-object files are LayoutErrors naming it."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: file is missing")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayoutError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(payload, dict):
        raise LayoutError(f"{path}: expected a JSON object at the top level")
    return payload


def find_participant_dirs(src: Path, marker: Path, what: str) -> tuple[list[Path], list[tuple[Path, LayoutError]]]:
    """`src` itself when it holds `marker`, else each of its (non-hidden) folders: those holding `marker`, and
    the others with the error that names them (a folder of participants must hold nothing else)."""
    src = Path(src)
    if (src / marker).is_file():
        return [src], []
    if not src.is_dir():
        raise LayoutError(f"{src}: no such folder; give a {what} participant folder or a folder of them")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [p for p in folders if (p / marker).is_file()]
    unusable = [(p, LayoutError(f"{p / marker}: missing, so participant {p.name} cannot be imported (a folder "
                                f"of {what} participants holds only participant folders)"))
                for p in folders if p not in found]  # fmt: skip
    if not found and not unusable:
        raise LayoutError(f"{src}: no {what} participant folder (none holds {marker})")
    return found, unusable


def select_subdirs(parent: Path, wanted: Sequence[str] | None, what: str) -> list[str]:
    """Names of the folders in `parent` (sorted), or exactly `wanted`, each of which must exist."""
    parent = Path(parent)
    available = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    chosen = list(wanted) if wanted else available
    missing = sorted(set(chosen) - set(available))
    if missing or not chosen:
        raise LayoutError(f"{parent}: {what} {missing or 'of any kind'} not found (have {available})")
    return chosen
