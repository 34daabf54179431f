"""A monocular video in the capture layout (one camera's frames of a subject's sequences), loaded and checked, and
the neutral scan that personalisation may start from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from data_pipelines import layout


@dataclasses.dataclass(frozen=True)
class MonoVideo:
    """The frames of one camera, from one or more sequences of a subject, in memory."""

    subject: str
    subject_dir: Path
    camera: layout.Camera
    fps: float
    frames: tuple[tuple[str, int], ...]  # (sequence, frame index) of each frame
    images: np.ndarray  # [F, H, W, 3] uint8
    masks: np.ndarray  # [F, H, W] uint8, 255 where the sequence has no masks
    has_mask: np.ndarray  # [F] float32
    # A video file's per-frame virtual cameras [F, 4, 4] (where its head was found; `camera` is their reference,
    # with the same orientation); None: `camera` saw every frame.
    frame_world_to_cam: np.ndarray | None = None


def _camera_folders(seq_dir: Path) -> list[str]:
    return sorted(p.name.removeprefix("cam_") for p in (seq_dir / "images").glob("cam_*") if p.is_dir())


def _check_frames(seq_dir: Path, serial: str, num_frames: int, kind: str) -> None:
    for index in range(num_frames):
        path = layout.frame_path(seq_dir, serial, index, kind=kind)
        if not path.is_file():
            raise layout.LayoutError(f"{path}: missing ({kind[:-1]} {index} of the {num_frames} that meta.json says)")
    found = len(layout.frame_paths(seq_dir, serial, kind=kind))
    if found != num_frames:
        raise layout.LayoutError(f"{seq_dir / kind / f'cam_{serial}'}: {found} frames, but meta.json says {num_frames}")


def read_monocular(video_dir: str | Path, camera: str = "", sequences: tuple[str, ...] = (),
                   max_frames: int = 0) -> MonoVideo:  # fmt: skip
    """A capture-layout subject folder (all sequences of `camera`) or one sequence folder, checked and loaded.

    `camera` "" takes the sequences with a single camera folder. A missing camera, frame or calibration entry
    is a `LayoutError` that names the path.
    """
    video_dir = Path(video_dir)
    if (video_dir / "images").is_dir():
        if video_dir.parent.name != "sequences":
            raise layout.LayoutError(f"{video_dir}: a sequence folder must sit in <subject>/sequences/")
        subject_dir, names = video_dir.parent.parent, [video_dir.name]
    elif (video_dir / "sequences").is_dir():
        subject_dir, names = video_dir, layout.list_sequences(video_dir)
    else:
        raise layout.LayoutError(f"{video_dir}: neither a capture-layout subject folder (calibration/, sequences/) "
                                 "nor a sequence folder (images/cam_<serial>/)")  # fmt: skip
    if sequences:
        missing = sorted(set(sequences) - set(names))
        if missing:
            raise layout.LayoutError(f"{video_dir}: no sequences {missing} (has {names})")
        names = [n for n in names if n in sequences]
    seq_dirs = {n: subject_dir / "sequences" / n for n in names}
    if camera:
        chosen = [n for n in names if camera in _camera_folders(seq_dirs[n])]
        if not chosen:
            looked = ", ".join(str(seq_dirs[n] / "images" / f"cam_{camera}") for n in names)
            raise layout.LayoutError(f"{video_dir}: no sequence has images of camera {camera!r} (looked for {looked})")
    else:
        chosen = [n for n in names if len(_camera_folders(seq_dirs[n])) == 1]
        serials = sorted({_camera_folders(seq_dirs[n])[0] for n in chosen})
        if not serials:
            raise layout.LayoutError(f"{video_dir}: no monocular sequence (one images/cam_<serial> folder) among "
                                     f"{names}; name the camera with camera=<serial>")  # fmt: skip
        if len(serials) > 1:
            raise layout.LayoutError(f"{video_dir}: monocular sequences of several cameras {serials}; name one")
        camera = serials[0]
    calibration = layout.read_calibration(subject_dir)
    if camera not in calibration:
        raise layout.LayoutError(f"{subject_dir / layout.CALIBRATION_FILE}: no camera {camera!r} (has "
                                 f"{sorted(calibration)})")  # fmt: skip
    chosen_camera = calibration[camera]
    frames, has_masks, rates = [], {}, set()
    for name in chosen:
        seq_dir = seq_dirs[name]
        meta = layout.read_sequence_meta(seq_dir)
        rates.add(float(meta["fps"]))
        _check_frames(seq_dir, camera, meta["num_frames"], "images")
        has_masks[name] = (seq_dir / "masks" / f"cam_{camera}").is_dir()
        if has_masks[name]:
            _check_frames(seq_dir, camera, meta["num_frames"], "masks")
        frames += [(name, i) for i in range(meta["num_frames"])]
    if len(rates) != 1:
        raise layout.LayoutError(f"{video_dir}: the sequences' meta.json give different fps {sorted(rates)}")
    if max_frames and len(frames) > max_frames:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    images, masks = [], []
    size = (chosen_camera.height, chosen_camera.width)
    for name, index in frames:
        path = layout.frame_path(seq_dirs[name], camera, index)
        image = layout.read_image(path)
        if image.shape != (*size, 3):
            raise layout.LayoutError(f"{path}: image of shape {list(image.shape)}, calibration says {[*size, 3]}")
        images.append(image)
        if has_masks[name]:
            mask_path = layout.frame_path(seq_dirs[name], camera, index, kind="masks")
            mask = layout.read_image(mask_path)
            if mask.shape != size:
                raise layout.LayoutError(
                    f"{mask_path}: mask of shape {list(mask.shape)}, calibration says {list(size)}"
                )
            masks.append(mask)
        else:
            masks.append(np.full(size, 255, np.uint8))
    return MonoVideo(
        subject_dir.name, subject_dir, chosen_camera, rates.pop(), tuple(frames), np.stack(images), np.stack(masks),
        np.asarray([has_masks[name] for name, _ in frames], np.float32),
    )  # fmt: skip


def read_scan(config: ml_collections.ConfigDict, video: MonoVideo) -> tuple[np.ndarray, ...] | None:
    """The neutral scan to start from: `config.scan`, else the subject's own when `use_scan`, else None."""
    if config.scan:
        path = Path(config.scan)
        if (path / layout.SCAN_DIR).is_dir():
            return (*layout.read_neutral_scan(path), str(path / layout.SCAN_DIR))
        if path.name == layout.SCAN_DIR:
            return (*layout.read_neutral_scan(path.parent), str(path))
        raise layout.LayoutError(f"{path}: scan must be a neutral_scan folder or a subject folder holding one")
    if config.use_scan and (video.subject_dir / layout.SCAN_DIR).is_dir():
        return (*layout.read_neutral_scan(video.subject_dir), str(video.subject_dir / layout.SCAN_DIR))
    return None
