"""The TFDS builder prepares a tiny layout into array_record and reads it back exactly, without TensorFlow."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import layout, tfds_builder
from data_pipelines.layout import LayoutError

FPS = 25.0
SIZE = (16, 12)  # W, H


def write_tiny_layout(root: Path, rng: np.random.Generator, *, num_frames: tuple[int, ...] = (5, 4)) -> dict:
    """Two subjects, three cameras, masks for one camera, audio for the first subject only."""
    truth = {}
    for subject, frames in zip(["subj_a", "subj_b"], num_frames):
        subject_dir = layout.subject_dir(root, subject)
        cameras = []
        for serial in ["cam0", "cam1", "cam2"]:
            world_to_cam = np.eye(4)
            world_to_cam[:3, 3] = rng.uniform(-0.1, 0.1, 3) + [0, 0, 1]
            k = np.array([[20.0 + rng.uniform(), 0, 8.0], [0, 20.0, 6.0], [0, 0, 1]])
            cameras.append(layout.Camera(serial, world_to_cam, k, *SIZE))
        layout.write_calibration(subject_dir, cameras)
        seq_dir = subject_dir / "sequences" / "seq0"
        images = rng.integers(0, 256, (frames, len(cameras), SIZE[1], SIZE[0], 3), np.uint8)
        masks = rng.integers(0, 256, (frames, SIZE[1], SIZE[0]), np.uint8)
        for frame in range(frames):
            for c, camera in enumerate(cameras):
                layout.write_image(layout.frame_path(seq_dir, camera.serial, frame), images[frame, c])
            layout.write_image(layout.frame_path(seq_dir, "cam1", frame, kind="masks"), masks[frame])
        waveform = None
        if subject == "subj_a":
            waveform = rng.uniform(-0.5, 0.5, round(frames / FPS * layout.AUDIO_RATE)).astype(np.float32)
            layout.write_audio(seq_dir / layout.AUDIO_FILE, waveform)
            waveform, _ = layout.read_audio(seq_dir / layout.AUDIO_FILE)  # as quantised to 16 bits
        layout.write_sequence_meta(seq_dir, fps=FPS, num_frames=frames)
        truth[subject] = dict(cameras=cameras, images=images, masks=masks, waveform=waveform)
    return truth


def prepare_tiny(tmp_path: Path, rng: np.random.Generator, audio_window_s: float = 0.1) -> tuple[Path, dict]:
    truth = write_tiny_layout(tmp_path / "layout", rng)
    dataset_dir = tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds", audio_window_s=audio_window_s)
    return dataset_dir, truth


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_prepare_and_read_back_exactly_without_tensorflow(tmp_path, rng):
    dataset_dir, truth = prepare_tiny(tmp_path, rng)
    config = tfds_builder.config_for(0.1).name
    source = tfds.data_source(f"{tfds_builder.NAME}/{config}", data_dir=str(tmp_path / "tfds"))["train"]
    assert "tensorflow" not in sys.modules
    assert len(source) == 5 + 4
    assert any(p.name.startswith(f"{tfds_builder.NAME}-train.array_record") for p in dataset_dir.iterdir())
    window = round(0.1 * layout.AUDIO_RATE)
    sequences = tfds.builder_from_directory(str(dataset_dir)).info.metadata["sequences"]
    assert [(s["subject"], s["first_record"], s["num_frames"]) for s in sequences] == [
        ("subj_a", 0, 5),
        ("subj_b", 5, 4),
    ]
    for index in range(len(source)):
        record = source[index]
        subject = record["subject"].decode()
        row = sequences[int(record["sequence_id"])]
        frame = int(record["frame_index"])
        assert (row["subject"], row["first_record"] + frame) == (subject, index)
        assert record["sequence"].decode() == "seq0" and int(record["num_frames"]) == row["num_frames"]
        expected = truth[subject]
        assert [s.decode() for s in record["serials"]] == ["cam0", "cam1", "cam2"]
        for c, camera in enumerate(expected["cameras"]):
            np.testing.assert_array_equal(_png(record["images"][c]), expected["images"][frame, c])
            np.testing.assert_array_equal(record["world_to_cam"][c], camera.world_to_cam.astype(np.float32))
            np.testing.assert_array_equal(record["intrinsics"][c], camera.intrinsics.astype(np.float32))
        np.testing.assert_array_equal(record["image_size"], [list(SIZE)] * 3)
        assert record["masks"][0] == b"" and record["masks"][2] == b""
        np.testing.assert_array_equal(_png(record["masks"][1]), expected["masks"][frame])
        waveform = expected["waveform"]
        if waveform is None:
            assert not record["audio_valid"].any() and not record["audio"].any()
            continue
        start = round((frame + 0.5) / FPS * layout.AUDIO_RATE) - window // 2
        padded = np.concatenate([np.zeros(window), waveform, np.zeros(window)])
        np.testing.assert_array_equal(record["audio"], padded[start + window : start + 2 * window])
        positions = np.arange(start, start + window)
        np.testing.assert_array_equal(record["audio_valid"], (positions >= 0) & (positions < waveform.size))


def test_prepare_refuses_a_layout_whose_frames_disagree_with_meta(tmp_path, rng):
    write_tiny_layout(tmp_path / "layout", rng)
    seq_dir = layout.sequence_dir(tmp_path / "layout", "subj_b", "seq0")
    culprit = layout.frame_path(seq_dir, "cam2", 3)
    culprit.unlink()
    with pytest.raises(LayoutError, match="3 frames, but meta.json says 4") as error:
        tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds")
    assert str(culprit.parent) in str(error.value)


def test_prepare_refuses_a_corrupt_image(tmp_path, rng):
    write_tiny_layout(tmp_path / "layout", rng)
    culprit = layout.frame_path(layout.sequence_dir(tmp_path / "layout", "subj_a", "seq0"), "cam0", 2)
    culprit.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    with pytest.raises(LayoutError, match="corrupt") as error:
        tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds")
    assert str(culprit) in str(error.value)
