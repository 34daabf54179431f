"""NeRSemble v2 → capture layout.

Source layout (as the `nersemble-data` toolkit downloads it):
```
<pid:03d>/calibration/camera_params.json      {"world_2_cam": {serial: 4x4 OpenCV world-to-camera, metres},
                                               "intrinsics": 3x3 shared by all cameras}
<pid:03d>/calibration/color_calibration.json  optional {serial: CCM [3, terms]} (Cheung et al. 2004)
<pid:03d>/sequences/<seq>/images/cam_<serial>.mp4
<pid:03d>/sequences/<seq>/alpha_maps/cam_<serial>.mp4   optional foreground alpha, imported as the masks
```
NeRSemble already uses metres and OpenCV world-to-camera matrices, so cameras pass through unchanged; the
intrinsics are rescaled when they were calibrated at another resolution than the videos (`calib_resolution`).
The colour matrices follow the toolkit's `correct_color`: decode sRGB to linear, expand RGB into the
Cheung-2004 polynomial terms the matrix width asks for, multiply, encode back to sRGB, and convert to 8 bits as it
does (clip to [0, 255], then truncate). Every camera is checked (rigid world_2_cam with a proper rotation, pinhole
K with positive focal lengths and the principal point inside the frame) before a frame is written.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data_pipelines import layout
from data_pipelines.importers import common, video
from data_pipelines.layout import LayoutError

CAMERA_PARAMS = Path("calibration") / "camera_params.json"
COLOR_CALIBRATION = Path("calibration") / "color_calibration.json"
ALPHA_MAPS = "alpha_maps"
FORMAT_NAME = "nersemble"


@dataclasses.dataclass(frozen=True)
class NersembleOptions:
    """`audio_dir` holds `<participant>/<sequence>.wav`, used before any audio stream inside the videos."""

    audio_dir: Path | None = None
    calib_resolution: tuple[int, int] | None = None  # (W, H) the intrinsics were calibrated at
    sequences: Sequence[str] | None = None  # import only these; None: every sequence
    color_correction: bool = True
    max_audio_overhang_s: float = 0.5


# Cheung et al. (2004) polynomial expansions, as exponents of (R, G, B) per term, keyed by term count.
_LINEAR = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
_CROSS = [(1, 1, 0), (1, 0, 1), (0, 1, 1)]
_SQUARES = [(2, 0, 0), (0, 2, 0), (0, 0, 2)]
_RGB = [(1, 1, 1)]
_ONE = [(0, 0, 0)]
_CUBIC_MIXED = [(2, 1, 0), (0, 2, 1), (1, 0, 2)]
_CUBIC_MIXED_2 = [(2, 0, 1), (1, 2, 0), (0, 1, 2)]
_CUBES = [(3, 0, 0), (0, 3, 0), (0, 0, 3)]
CHEUNG_TERMS = {
    3: _LINEAR,
    4: _LINEAR + _ONE,
    5: _LINEAR + _RGB + _ONE,
    7: _LINEAR + _CROSS + _ONE,
    8: _LINEAR + _CROSS + _RGB + _ONE,
    10: _LINEAR + _CROSS + _SQUARES + _ONE,
    11: _LINEAR + _CROSS + _SQUARES + _RGB + _ONE,
    14: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBES + _ONE,
    16: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBIC_MIXED + _CUBES,
    17: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBIC_MIXED + _CUBES + _ONE,
    19: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBIC_MIXED + _CUBIC_MIXED_2 + _CUBES,
    20: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBIC_MIXED + _CUBIC_MIXED_2 + _CUBES + _ONE,
}


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    values = np.maximum(values, 0.0)
    return np.where(values <= 0.0031308, values * 12.92, 1.055 * values ** (1 / 2.4) - 0.055)


def _cheung_expansion(rgb: np.ndarray, terms: int) -> np.ndarray:
    """[P, 3] linear RGB → [P, terms] polynomial terms, one column per monomial (no [P, terms, 3] temp)."""
    columns = []
    for exponents in CHEUNG_TERMS[terms]:
        column = np.ones(len(rgb))
        for channel, power in enumerate(exponents):
            if power:
                column = column * rgb[:, channel] ** power
        columns.append(column)
    return np.stack(columns, axis=1)


def apply_color_correction(image: np.ndarray, ccm: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """uint8 sRGB [H, W, 3] through a Cheung-2004 matrix [3, terms] applied in linear RGB, chunk by chunk."""
    pixels = image.reshape(-1, 3)
    out = np.empty_like(pixels)
    for start in range(0, len(pixels), chunk):
        rgb = srgb_to_linear(pixels[start : start + chunk].astype(np.float64) / 255.0)
        corrected = linear_to_srgb(_cheung_expansion(rgb, ccm.shape[1]) @ ccm.T)
        # As the official kit (`nersemble_data.util.color_correction.correct_color`): clip, then truncate.
        out[start : start + chunk] = np.clip(corrected * 255.0, 0, 255).astype(np.uint8)
    return out.reshape(image.shape)


def find_participants(src: Path) -> tuple[list[Path], list[tuple[Path, LayoutError]]]:
    """`src` itself when it is a participant folder, else its folders: participants, and the unusable ones."""
    return common.find_participant_dirs(src, CAMERA_PARAMS, "NeRSemble")


def read_camera_params(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`camera_params.json` → ({serial: world_to_cam}, {serial: K}); a shared K is given to every serial."""
    payload = common.read_json_object(path)
    if not isinstance(payload.get("world_2_cam"), dict) or not payload["world_2_cam"]:
        raise LayoutError(f"{path}: missing the 'world_2_cam' mapping from camera serial to a 4x4 matrix")
    extrinsics = {
        serial: common.finite_array(matrix, (4, 4), path, f"world_2_cam of camera {serial}")
        for serial, matrix in payload["world_2_cam"].items()
    }
    if "intrinsics" not in payload:
        raise LayoutError(f"{path}: no 'intrinsics': the cameras have no intrinsics")
    raw = payload["intrinsics"]
    if isinstance(raw, dict):
        intrinsics = {
            serial: common.finite_array(k, (3, 3), path, f"intrinsics of camera {serial}") for serial, k in raw.items()
        }
    else:
        shared = common.finite_array(raw, (3, 3), path, "the shared intrinsics")
        intrinsics = {serial: shared for serial in extrinsics}
    return extrinsics, intrinsics


def read_color_calibration(path: Path) -> dict[str, np.ndarray]:
    payload = common.read_json_object(path)
    ccms = {}
    for serial, matrix in payload.items():
        ccm = np.asarray(matrix, np.float64) if isinstance(matrix, list) else np.empty(0)
        if ccm.ndim != 2 or ccm.shape[0] != 3 or ccm.shape[1] not in CHEUNG_TERMS:
            raise LayoutError(
                f"{path}: colour matrix of camera {serial} must be [3, terms] with terms in "
                f"{sorted(CHEUNG_TERMS)}, got shape {list(ccm.shape)}"
            )
        ccms[serial] = common.finite_array(ccm, ccm.shape, path, f"colour matrix of camera {serial}")
    return ccms


def import_participant(
    participant_dir: Path,
    out_root: Path,
    options: NersembleOptions,
    on_bad_sequence: Callable[[str, LayoutError], None] | None = None,
) -> list[str]:
    """Imports one participant into `out_root/subjects/<folder name>`; all or nothing. Returns notes.

    A sequence that fails is an error, or, given `on_bad_sequence`, reported to it and left out.
    """
    participant_dir = Path(participant_dir)
    subject = participant_dir.name
    extrinsics, intrinsics = read_camera_params(participant_dir / CAMERA_PARAMS)
    color_path = participant_dir / COLOR_CALIBRATION
    ccms = read_color_calibration(color_path) if options.color_correction and color_path.is_file() else None
    wanted = common.select_subdirs(participant_dir / "sequences", options.sequences, "sequences")
    notes = [] if ccms is not None else [f"{color_path}: no colour correction applied"]
    cameras: dict[str, layout.Camera] = {}
    with layout.staged_dir(layout.subject_dir(out_root, subject)) as staging:
        imported = 0
        for sequence in wanted:
            context = _SequenceSource(participant_dir, subject, sequence, extrinsics, intrinsics, ccms, options)
            seen = dict(cameras)
            try:
                notes += context.write(staging / "sequences" / sequence, seen)
            except LayoutError as error:
                if on_bad_sequence is None:
                    raise
                shutil.rmtree(staging / "sequences" / sequence, ignore_errors=True)
                on_bad_sequence(f"{subject}/{sequence}", error)
                continue
            cameras.update(seen)
            imported += 1
        if not imported:
            raise LayoutError(f"{participant_dir}: none of its {len(wanted)} sequences could be imported")
        layout.write_calibration(staging, list(cameras.values()))
    return notes


@dataclasses.dataclass
class _SequenceSource:
    participant_dir: Path
    subject: str
    sequence: str
    extrinsics: dict[str, np.ndarray]
    intrinsics: dict[str, np.ndarray]
    ccms: dict[str, np.ndarray] | None
    options: NersembleOptions

    def _camera(self, video_path: Path, info: video.VideoInfo) -> layout.Camera:
        serial = video_path.stem.removeprefix("cam_")
        params = self.participant_dir / CAMERA_PARAMS
        if serial not in self.extrinsics:
            raise LayoutError(f"{video_path}: camera {serial} is missing from {params}")
        if serial not in self.intrinsics:
            raise LayoutError(f"{params}: camera {serial} has no intrinsics (but has {video_path.name})")
        if self.ccms is not None and serial not in self.ccms:
            color_path = self.participant_dir / COLOR_CALIBRATION
            raise LayoutError(f"{color_path}: no colour matrix for camera {serial}")
        k = self.intrinsics[serial]
        if self.options.calib_resolution is not None:
            k = common.scale_intrinsics(k, self.options.calib_resolution, (info.width, info.height))
        hint = "check --calib-resolution" if self.options.calib_resolution else "pass --calib-resolution WxH"
        return common.checked_camera(serial, self.extrinsics[serial], k, info.width, info.height, params, hint)

    def write(self, seq_dir: Path, cameras: dict[str, layout.Camera]) -> list[str]:
        """Decodes every camera's video into `seq_dir`, then the audio and meta.json; returns notes."""
        images_dir = self.participant_dir / "sequences" / self.sequence / "images"
        videos = sorted(images_dir.glob("cam_*.mp4"))
        if not videos:
            raise LayoutError(f"{images_dir}: no cam_<serial>.mp4 videos")
        infos = {path: video.probe_video(path) for path in videos}
        fps = infos[videos[0]].fps
        frame_counts = {}
        for path in videos:
            info = infos[path]
            if abs(info.fps - fps) > 1e-3:
                raise LayoutError(f"{path}: {info.fps:g} fps, but {videos[0].name} has {fps:g} fps")
            camera = self._camera(path, info)
            known = cameras.setdefault(camera.serial, camera)
            if (known.width, known.height) != (camera.width, camera.height):
                raise LayoutError(
                    f"{path}: {camera.width}x{camera.height} frames, but other sequences of camera "
                    f"{camera.serial} are {known.width}x{known.height}"
                )
            frame_counts[path] = self._write_frames(path, seq_dir, camera.serial)
        counts = sorted(set(frame_counts.values()))
        if len(counts) > 1:
            per_video = ", ".join(f"{p.name}: {n}" for p, n in frame_counts.items())
            raise LayoutError(f"{images_dir}: the cameras disagree on the frame count ({per_video})")
        num_frames = counts[0]
        masked = [serial for serial in (p.stem.removeprefix("cam_") for p in videos)
                  if self._write_masks(seq_dir, cameras[serial], num_frames)]  # fmt: skip
        audio_notes = self._write_audio(seq_dir, videos, infos, num_frames, fps)
        has_audio = (seq_dir / layout.AUDIO_FILE).is_file()
        layout.write_sequence_meta(
            seq_dir,
            fps=fps,
            num_frames=num_frames,
            source=FORMAT_NAME,
            cameras=sorted(p.stem.removeprefix("cam_") for p in videos),
            has_audio=has_audio,
            color_corrected=self.ccms is not None,
            masked_cameras=masked,
            notes=audio_notes,
        )
        return audio_notes

    def _write_masks(self, seq_dir: Path, camera: layout.Camera, num_frames: int) -> bool:
        """`alpha_maps/cam_<serial>.mp4` as the camera's masks (grey levels: the channels' mean), when present;
        it must match the images frame for frame."""
        path = self.participant_dir / "sequences" / self.sequence / ALPHA_MAPS / f"cam_{camera.serial}.mp4"
        if not path.is_file():
            return False
        info = video.probe_video(path)
        if (info.width, info.height) != (camera.width, camera.height):
            raise LayoutError(f"{path}: {info.width}x{info.height} alpha maps, but the images of camera "
                              f"{camera.serial} are {camera.width}x{camera.height}")  # fmt: skip
        count = 0
        for index, frame in enumerate(video.read_video_frames(path)):
            if index >= num_frames:
                count = index + 1
                break
            alpha = np.round(frame.mean(axis=2)).astype(np.uint8)
            layout.write_image(layout.frame_path(seq_dir, camera.serial, index, kind="masks"), alpha)
            count = index + 1
        if count != num_frames:
            more = "more than" if count > num_frames else f"only {count} of"
            raise LayoutError(f"{path}: {more} the {num_frames} frames of cam_{camera.serial}.mp4")
        return True

    def _write_frames(self, path: Path, seq_dir: Path, serial: str) -> int:
        ccm = self.ccms[serial] if self.ccms is not None else None
        count = 0
        for index, frame in enumerate(video.read_video_frames(path)):
            image = apply_color_correction(frame, ccm) if ccm is not None else frame
            layout.write_image(layout.frame_path(seq_dir, serial, index), image)
            count = index + 1
        if count == 0:
            raise LayoutError(f"{path}: the video has no frames")
        return count

    def _write_audio(self, seq_dir, videos, infos, num_frames: int, fps: float) -> list[str]:
        external = None
        if self.options.audio_dir is not None:
            external = Path(self.options.audio_dir) / self.subject / f"{self.sequence}.wav"
        with_audio = [path for path in videos if infos[path].has_audio]
        if external is not None and external.is_file():
            waveform, notes = layout.read_audio(external)
            source = external
        elif with_audio:
            source = with_audio[0]
            waveform = video.read_video_audio(source)
            notes = [f"{source}: decoded its audio stream to {layout.AUDIO_RATE} Hz mono"]
        else:
            looked = f"{external} is missing and " if external is not None else ""
            return [f"{self.sequence}: video only ({looked}no video has an audio stream)"]
        waveform, fit_notes = common.fit_audio_to_frames(
            waveform,
            num_frames=num_frames,
            fps=fps,
            source=source,
            max_overhang_s=self.options.max_audio_overhang_s,
        )
        layout.write_audio(seq_dir / layout.AUDIO_FILE, waveform)
        return notes + fit_notes
