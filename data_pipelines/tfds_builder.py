"""TFDS records: one record per captured frame of a capture layout, as array_record, with no TensorFlow.

Prepare with `uhap data prepare --root LAYOUT --data-dir DIR` (or `prepare`); read with
`tfds.builder_from_directory(dataset_dir(DIR)).as_data_source()`.
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
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from data_pipelines import layout
from data_pipelines.layout import LayoutError

NAME = "capture_frames"
SPLIT = "train"
VERSION = "1.0.0"
SHARD_BYTES = 1 << 30  # records per shard file: about this many bytes


@dataclasses.dataclass(frozen=True)
class CaptureFramesConfig:
    """`audio_window_s`: length of the audio kept per frame, centred on the frame's midpoint."""

    name: str
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


def _sequence_table(entries: list[_SequenceEntry]) -> tuple[list[str], list[dict]]:
    """The subjects, and per sequence its indices and the record where it starts (records are in layout order)."""
    subjects = sorted({e.subject for e in entries})
    table, first = [], 0
    for sequence_id, entry in enumerate(entries):
        table.append({
            "subject": entry.subject, "sequence": entry.sequence, "subject_id": subjects.index(entry.subject),
            "sequence_id": sequence_id, "num_frames": entry.num_frames, "fps": entry.fps, "first_record": first,
            "serials": [c.serial for c in entry.cameras],
        })  # fmt: skip
        first += entry.num_frames
    return subjects, table


def _records(entries: list[_SequenceEntry], table: list[dict], audio_window_s: float) -> Iterator[dict]:
    """Every frame's record, in layout order."""
    window = round(audio_window_s * layout.AUDIO_RATE)
    # Checking that every PNG decodes to its calibrated size is most of the work: threads (PIL decodes
    # without the GIL) check the frames ahead, in order.
    with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        for entry, row in zip(entries, table):
            waveform = _load_audio(entry)
            world_to_cam = np.stack([c.world_to_cam for c in entry.cameras]).astype(np.float32)
            intrinsics = np.stack([c.intrinsics for c in entry.cameras]).astype(np.float32)
            sizes = np.array([[c.width, c.height] for c in entry.cameras], np.int32)
            frames = pool.map(functools.partial(_frame_pngs, entry), range(entry.num_frames))
            for frame, (images, masks) in enumerate(frames):
                audio, valid = audio_window(waveform, frame, entry.fps, window)
                yield {
                    "subject": entry.subject, "sequence": entry.sequence, "subject_id": row["subject_id"],
                    "sequence_id": row["sequence_id"], "frame_index": frame, "num_frames": entry.num_frames,
                    "fps": entry.fps, "serials": [c.serial.encode() for c in entry.cameras], "images": images,
                    "masks": masks, "image_size": sizes, "world_to_cam": world_to_cam, "intrinsics": intrinsics,
                    "audio": audio, "audio_valid": valid,
                }  # fmt: skip


def dataset_dir(data_dir: Path, audio_window_s: float = 0.5) -> Path:
    """Where `prepare` puts the records of this audio window: `<data_dir>/capture_frames/<config>/<version>`."""
    return Path(data_dir) / NAME / config_for(audio_window_s).name / VERSION


def prepare(layout_root: Path, data_dir: Path, *, audio_window_s: float = 0.5) -> Path:
    """Writes the array_record dataset for `layout_root` under `data_dir` (once); returns the dataset folder.

    Records stream into shards of about `SHARD_BYTES` as they are made, and the TFDS metadata is written with
    `tfds.folder_dataset.write_metadata`: TFDS's own builder buffers a split in memory and spills past 1 GB
    through `tf.io.gfile`, i.e. it needs TensorFlow for any real capture. The folder appears complete or not at
    all (written beside it, then renamed); a job that finishes second uses the first one's.
    """
    out = dataset_dir(data_dir, audio_window_s)
    if (out / "dataset_info.json").is_file():
        return out
    layout_root = Path(layout_root)
    entries = _index_layout(layout_root)
    subjects, table = _sequence_table(entries)
    staging = out.with_name(f".{VERSION}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lengths, sizes, writer = [], [], None
    try:
        for record in _records(entries, table, audio_window_s):
            data = FEATURES.serialize_example(record)
            if writer is None or sizes[-1] >= SHARD_BYTES:
                if writer is not None:
                    writer.close()
                writer = array_record_module.ArrayRecordWriter(str(staging / f"shard{len(lengths):05d}"),
                                                               "group_size:1")  # fmt: skip
                lengths.append(0)
                sizes.append(0)
            writer.write(data)
            lengths[-1] += 1
            sizes[-1] += len(data)
        if writer is None:
            raise LayoutError(f"{layout_root}: no frames to write")
        writer.close()
        for shard in range(len(lengths)):
            (staging / f"shard{shard:05d}").rename(
                staging / f"{NAME}-{SPLIT}.array_record-{shard:05d}-of-{len(lengths):05d}"
            )  # fmt: skip
        tfds.folder_dataset.write_metadata(
            data_dir=staging, features=FEATURES, version=VERSION, check_data=False,
            split_infos=[tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths, num_bytes=sum(sizes))],
            description=__doc__, disable_shuffling=True,
            metadata=tfds.core.MetadataDict(layout_root=str(layout_root), subjects=subjects, sequences=table),
        )  # fmt: skip
        try:
            staging.rename(out)
        except OSError:  # another job prepared the same layout meanwhile: use its records
            if not (out / "dataset_info.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
