"""TFDS builder: one record per captured frame of a capture layout, as array_record, with no TensorFlow.

Prepare with `uhap data prepare --root LAYOUT --data-dir DIR` (or `prepare`); read with
`tfds.data_source("capture_frames", data_dir=DIR)` or `tfds.builder_from_directory(...).as_data_source()`.
A record holds every camera of one frame: images and masks as the layout's PNG bytes (decoded by the loaders,
only for the views they sample), cameras, an audio window centred on the frame, and its indices. Records are
written in layout order (subjects, sequences, frames; `disable_shuffling`), and `info.metadata["sequences"]`
says where each sequence starts, so loaders can cut windows of consecutive frames without reading records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import layout
from data_pipelines.layout import LayoutError

NAME = "capture_frames"
SPLIT = "train"


@dataclasses.dataclass
class CaptureFramesConfig(tfds.core.BuilderConfig):
    """`audio_window_s`: length of the audio kept per frame, centred on the frame's midpoint."""

    audio_window_s: float = 0.5


def config_for(audio_window_s: float) -> CaptureFramesConfig:
    return CaptureFramesConfig(name=f"audio{round(audio_window_s * 1000)}ms", audio_window_s=audio_window_s)


FEATURES = tfds.features.FeaturesDict(
    {
        "subject": tfds.features.Text(),
        "sequence": tfds.features.Text(),
        "subject_id": tfds.features.Scalar(np.int32),
        "sequence_id": tfds.features.Scalar(np.int32),
        "frame_index": tfds.features.Scalar(np.int32),
        "num_frames": tfds.features.Scalar(np.int32),
        "fps": tfds.features.Scalar(np.float32),
        "serials": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),  # PNG bytes per camera
        "masks": tfds.features.Tensor(shape=(None,), dtype=np.object_),  # PNG bytes, b"" for no mask
        "image_size": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),  # [W, H] per camera
        "world_to_cam": tfds.features.Tensor(shape=(None, 4, 4), dtype=np.float32),
        "intrinsics": tfds.features.Tensor(shape=(None, 3, 3), dtype=np.float32),
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "audio_valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
    }
)


@dataclasses.dataclass(frozen=True)
class _SequenceEntry:
    subject: str
    sequence: str
    seq_dir: Path
    cameras: list[layout.Camera]
    num_frames: int
    fps: float
    has_masks: dict[str, bool]


def _index_sequence(subject: str, seq_dir: Path, calibration: dict[str, layout.Camera]) -> _SequenceEntry:
    meta = layout.read_sequence_meta(seq_dir)
    num_frames = meta["num_frames"]
    folders = sorted(p for p in (seq_dir / "images").glob("cam_*") if p.is_dir())
    if not folders:
        raise LayoutError(f"{seq_dir / 'images'}: no cam_<serial> image folders")
    has_masks = {}
    for folder in folders:
        serial = folder.name.removeprefix("cam_")
        if serial not in calibration:
            raise LayoutError(f"{folder}: camera {serial} is not in the subject's calibration")
        has_masks[serial] = (seq_dir / "masks" / folder.name).is_dir()
        for kind in ["images", "masks"] if has_masks[serial] else ["images"]:
            count = len(layout.frame_paths(seq_dir, serial, kind=kind))
            if count != num_frames:
                where = seq_dir / kind / folder.name
                raise LayoutError(f"{where}: {count} frames, but meta.json says {num_frames}")
    cameras = [calibration[serial] for serial in sorted(has_masks)]
    return _SequenceEntry(subject, seq_dir.name, seq_dir, cameras, num_frames, meta["fps"], has_masks)


def _index_layout(root: Path) -> list[_SequenceEntry]:
    """Every sequence of every subject, checked against its calibration and meta.json before any record."""
    entries = []
    for subject in layout.list_subjects(root):
        subject_path = layout.subject_dir(root, subject)
        calibration = layout.read_calibration(subject_path)
        for sequence in layout.list_sequences(subject_path):
            entries.append(_index_sequence(subject, subject_path / "sequences" / sequence, calibration))
    return entries


def _png_bytes(path: Path, camera: layout.Camera, *, grey: bool) -> bytes:
    """The file's bytes, after checking that it decodes to the calibrated size."""
    image = layout.read_image(path)
    expected = (camera.height, camera.width) if grey else (camera.height, camera.width, 3)
    if image.shape != expected:
        raise LayoutError(f"{path}: image of shape {list(image.shape)}, calibration says {list(expected)}")
    return path.read_bytes()


def _frame_pngs(entry: _SequenceEntry, frame: int) -> tuple[list[bytes], list[bytes]]:
    """Image and mask PNG bytes of every camera of one frame; b"" stands for a camera without masks."""
    images, masks = [], []
    for camera in entry.cameras:
        images.append(_png_bytes(layout.frame_path(entry.seq_dir, camera.serial, frame), camera, grey=False))
        mask_path = layout.frame_path(entry.seq_dir, camera.serial, frame, kind="masks")
        masks.append(_png_bytes(mask_path, camera, grey=True) if entry.has_masks[camera.serial] else b"")
    return images, masks


def _load_audio(entry: _SequenceEntry) -> np.ndarray | None:
    path = entry.seq_dir / layout.AUDIO_FILE
    if not path.is_file():
        return None
    waveform, _ = layout.read_audio(path)
    video_s = entry.num_frames / entry.fps
    if waveform.size < (entry.num_frames - 1) / entry.fps * layout.AUDIO_RATE:
        audio_s = waveform.size / layout.AUDIO_RATE
        raise LayoutError(f"{path}: audio lasts {audio_s:.3f} s, shorter than the frames ({video_s:.3f} s)")
    return waveform


def audio_window(waveform: np.ndarray | None, frame: int, fps: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`length` samples centred on the middle of `frame` (zeros outside the recording) and their validity."""
    audio, valid = np.zeros(length, np.float32), np.zeros(length, np.bool_)
    if waveform is None:
        return audio, valid
    start = round((frame + 0.5) / fps * layout.AUDIO_RATE) - length // 2
    lo, hi = max(start, 0), min(start + length, waveform.size)
    if hi > lo:
        audio[lo - start : hi - start] = waveform[lo:hi]
        valid[lo - start : hi - start] = True
    return audio, valid


class CaptureFrames(tfds.core.GeneratorBasedBuilder):
    """Per-frame multi-view records of a capture layout (the layout root is the manual dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Per-frame records: PNG bytes per camera, cameras, audio window."}
    BUILDER_CONFIGS = [config_for(0.5)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The manual dir is the capture-layout root (the folder holding subjects/)."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=FEATURES,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        entries = _index_layout(root)
        subjects = sorted({e.subject for e in entries})
        table, first = [], 0
        for sequence_id, entry in enumerate(entries):
            table.append(
                {
                    "subject": entry.subject,
                    "sequence": entry.sequence,
                    "subject_id": subjects.index(entry.subject),
                    "sequence_id": sequence_id,
                    "num_frames": entry.num_frames,
                    "fps": entry.fps,
                    "first_record": first,
                    "serials": [c.serial for c in entry.cameras],
                }
            )
            first += entry.num_frames
        self.info.metadata.update({"layout_root": str(root), "subjects": subjects, "sequences": table})
        return {SPLIT: self._generate_examples(entries, table)}

    def _generate_examples(self, entries: list[_SequenceEntry], table: list[dict]) -> Iterator[tuple[str, dict]]:
        window = round(self.builder_config.audio_window_s * layout.AUDIO_RATE)
        # Checking that every PNG decodes to its calibrated size is most of the work: threads (PIL decodes
        # without the GIL) check the frames ahead, in order.
        pool = concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1))
        for entry, row in zip(entries, table):
            waveform = _load_audio(entry)
            world_to_cam = np.stack([c.world_to_cam for c in entry.cameras]).astype(np.float32)
            intrinsics = np.stack([c.intrinsics for c in entry.cameras]).astype(np.float32)
            sizes = np.array([[c.width, c.height] for c in entry.cameras], np.int32)
            frames = pool.map(functools.partial(_frame_pngs, entry), range(entry.num_frames))
            for frame, (images, masks) in enumerate(frames):
                audio, valid = audio_window(waveform, frame, entry.fps, window)
                record = {
                    "subject": entry.subject,
                    "sequence": entry.sequence,
                    "subject_id": row["subject_id"],
                    "sequence_id": row["sequence_id"],
                    "frame_index": frame,
                    "num_frames": entry.num_frames,
                    "fps": entry.fps,
                    "serials": [c.serial.encode() for c in entry.cameras],
                    "images": images,
                    "masks": masks,
                    "image_size": sizes,
                    "world_to_cam": world_to_cam,
                    "intrinsics": intrinsics,
                    "audio": audio,
                    "audio_valid": valid,
                }
                yield f"{entry.subject}/{entry.sequence}/{frame:06d}", record
        pool.shutdown()


def prepare(layout_root: Path, data_dir: Path, *, audio_window_s: float = 0.5) -> Path:
    """Writes the array_record dataset for `layout_root` under `data_dir`; returns the dataset folder."""
    config = config_for(audio_window_s)
    predefined = {c.name: c for c in CaptureFrames.BUILDER_CONFIGS}
    builder = CaptureFrames(
        data_dir=str(data_dir), config=predefined.get(config.name, config), file_format="array_record"
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(layout_root)))
    return Path(builder.data_dir)
