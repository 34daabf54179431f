"""The TFDS builder prepares a tiny layout into array_record and reads it back exactly, without TensorFlow."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers.records import FPS, SIZE, prepare_tiny, write_tiny_layout
from PIL import Image

from data_pipelines import layout, tfds_builder
from data_pipelines.layout import LayoutError


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_prepare_and_read_back_exactly_without_tensorflow(tmp_path, rng):
    dataset_dir, truth = prepare_tiny(tmp_path, rng)
    assert dataset_dir == tfds_builder.dataset_dir(tmp_path / "tfds", 0.1)
    source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split="train")
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


def test_prepare_streams_records_into_several_shards_without_tensorflow(tmp_path, rng, monkeypatch):
    """Past one shard's bytes the records go on in the next shard (TFDS's own writer spills through
    tf.io.gfile past 1 GB and fails without TensorFlow); they read back whole and in order, and a second
    prepare only finds them."""
    write_tiny_layout(tmp_path / "layout", rng)
    monkeypatch.setattr(tfds_builder, "SHARD_BYTES", 1)  # every record starts a shard
    dataset_dir = tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds", audio_window_s=0.1)
    shards = sorted(p.name for p in dataset_dir.glob(f"{tfds_builder.NAME}-train.array_record-*"))
    assert shards == [f"{tfds_builder.NAME}-train.array_record-{i:05d}-of-00009" for i in range(9)]
    source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split="train")
    assert [(source[i]["subject"].decode(), int(source[i]["frame_index"])) for i in range(len(source))] == [
        *[("subj_a", f) for f in range(5)],
        *[("subj_b", f) for f in range(4)],
    ]
    assert "tensorflow" not in sys.modules
    assert not list(dataset_dir.parent.glob(".*partial*"))
    stamp = (dataset_dir / "dataset_info.json").stat().st_mtime_ns
    assert tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds", audio_window_s=0.1) == dataset_dir
    assert (dataset_dir / "dataset_info.json").stat().st_mtime_ns == stamp


def test_a_prepare_that_finishes_second_uses_the_first_ones_records(tmp_path, rng, monkeypatch):
    """Two jobs prepare the same layout at once: the one whose rename comes second keeps the first one's folder
    and leaves no partial folder behind."""
    import shutil

    write_tiny_layout(tmp_path / "layout", rng)
    first = tfds_builder.prepare(tmp_path / "layout", tmp_path / "first", audio_window_s=0.1)
    out = tfds_builder.dataset_dir(tmp_path / "tfds", 0.1)
    real = tfds.folder_dataset.write_metadata

    def other_job_finishes_first(**kwargs):
        real(**kwargs)
        shutil.copytree(first, out)

    monkeypatch.setattr(tfds.folder_dataset, "write_metadata", other_job_finishes_first)
    assert tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds", audio_window_s=0.1) == out
    assert len(tfds.builder_from_directory(str(out)).as_data_source(split="train")) == 9
    assert [p.name for p in out.parent.iterdir()] == [out.name]
