"""The capture layout: round trips, and every kind of bad input named with its file."""

import io
import json
import wave

import numpy as np
import pytest

from data_pipelines import layout


def _random_camera(rng: np.random.Generator, serial: str) -> layout.Camera:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.linalg.det(q))
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = rotation
    world_to_cam[:3, 3] = rng.normal(size=3)
    focal = rng.uniform(50, 200)
    intrinsics = np.array([[focal, 0, rng.uniform(20, 40)], [0, focal, rng.uniform(20, 40)], [0, 0, 1]])
    return layout.Camera(serial, world_to_cam, intrinsics, width=int(rng.integers(32, 96)), height=64)


def test_calibration_round_trip(tmp_path, rng):
    cameras = [_random_camera(rng, serial) for serial in ("222", "111", "333")]
    layout.write_calibration(tmp_path, cameras)
    read = layout.read_calibration(tmp_path)
    assert list(read) == ["111", "222", "333"]
    for camera in cameras:
        np.testing.assert_allclose(read[camera.serial].world_to_cam, camera.world_to_cam)
        np.testing.assert_allclose(read[camera.serial].intrinsics, camera.intrinsics)
        assert (read[camera.serial].width, read[camera.serial].height) == (camera.width, camera.height)


def _edit_calibration(subject_dir, edit) -> None:
    path = subject_dir / layout.CALIBRATION_FILE
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


def _set_nan_translation(payload):
    payload["world_2_cam"]["111"][0][3] = float("nan")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_nan_translation, "NaN or inf"),
        (lambda p: p["intrinsics"].pop("111"), "camera 111 has no intrinsics"),
        (lambda p: p["image_size"].pop("111"), "camera 111 has no image_size"),
        (lambda p: p["intrinsics"].__setitem__("111", [[1, 0], [0, 1]]), "has shape [2, 2], expected [3, 3]"),
        (lambda p: p["world_2_cam"]["111"][0].__setitem__(0, 3.0), "not a rigid transform"),
        (lambda p: p.pop("intrinsics"), "missing the 'intrinsics' mapping"),
    ],
)
def test_bad_calibration_names_file_and_problem(tmp_path, rng, edit, message):
    layout.write_calibration(tmp_path, [_random_camera(rng, "111"), _random_camera(rng, "222")])
    _edit_calibration(tmp_path, edit)
    with pytest.raises(layout.LayoutError, match="camera_params.json") as error:
        layout.read_calibration(tmp_path)
    assert message in str(error.value)


def test_sequence_meta_checks_fps_and_frames(tmp_path, rng):
    num_frames = int(rng.integers(1, 100))
    layout.write_sequence_meta(tmp_path, fps=25, num_frames=num_frames, split="train")
    assert layout.read_sequence_meta(tmp_path) == {"fps": 25.0, "num_frames": num_frames, "split": "train"}
    layout.write_sequence_meta(tmp_path, fps=-3, num_frames=num_frames)
    with pytest.raises(layout.LayoutError, match=r"meta.json: 'fps' must be a positive number"):
        layout.read_sequence_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"fps": 25}')
    with pytest.raises(layout.LayoutError, match=r"meta.json: 'num_frames' must be a positive int"):
        layout.read_sequence_meta(tmp_path)


def test_audio_round_trip_is_16_bit_exact(tmp_path, rng):
    waveform = rng.uniform(-0.9, 0.9, size=4000).astype(np.float32)
    layout.write_audio(tmp_path / "a.wav", waveform)
    read, notes = layout.read_audio(tmp_path / "a.wav")
    assert notes == [] and read.dtype == np.float32
    np.testing.assert_allclose(read, waveform, atol=0.5 / 32768 + 1e-7)


def test_stereo_44k_audio_is_mixed_down_and_resampled(tmp_path, rng):
    seconds, rate = 0.5, 44100
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    noise = 0.01 * rng.normal(size=t.size)
    stereo = np.stack([tone + noise, tone - noise], axis=1)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(np.round(stereo * 32767).astype("<i2").tobytes())
    read, notes = layout.read_audio(path)
    assert any("resampled 44100->16000 Hz" in note and "stereo.wav" in note for note in notes)
    assert any("mixed 2 channels down to mono" in note for note in notes)
    assert read.ndim == 1 and abs(read.size - int(seconds * 16000)) <= 1
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(read.size) / 16000)
    np.testing.assert_allclose(read[200:-200], expected[200:-200], atol=0.02)


def test_image_round_trip_and_corrupt_png(tmp_path, rng):
    image = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, size=(7, 9), dtype=np.uint8)
    layout.write_image(tmp_path / "im.png", image)
    layout.write_image(tmp_path / "mask.png", mask)
    np.testing.assert_array_equal(layout.read_image(tmp_path / "im.png"), image)
    np.testing.assert_array_equal(layout.read_image(tmp_path / "mask.png"), mask)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((tmp_path / "im.png").read_bytes()[:40])
    with pytest.raises(layout.LayoutError, match=r"corrupt.png: corrupt or unreadable image"):
        layout.read_image(corrupt)
    with pytest.raises(layout.LayoutError, match=r"missing.png: image file is missing"):
        layout.read_image(tmp_path / "missing.png")


def test_png_writer_matches_pil_pixels(rng):
    """The direct PNG writer's files decode (with PIL) to exactly the pixels written, colour and grey, any size."""
    from PIL import Image

    for shape in [(64, 64, 3), (64, 64), (1, 5, 3), (33, 2)]:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with Image.open(io.BytesIO(layout.png_bytes(image))) as decoded:
            assert decoded.mode == ("RGB" if len(shape) == 3 else "L")
            np.testing.assert_array_equal(np.asarray(decoded), image)


def test_neutral_scan_round_trip(tmp_path, rng):
    vertices = rng.normal(size=(50, 3)).astype(np.float32)
    faces = rng.integers(0, 50, size=(30, 3))
    colors = rng.uniform(size=(50, 3)).astype(np.float32)
    layout.write_neutral_scan(tmp_path, vertices, faces, colors)
    read_vertices, read_faces, read_colors = layout.read_neutral_scan(tmp_path)
    np.testing.assert_array_equal(read_vertices, vertices)
    np.testing.assert_array_equal(read_faces, faces)
    np.testing.assert_allclose(read_colors, colors, atol=0.5 / 255 + 1e-6)
    ply = tmp_path / "neutral_scan" / "mesh.ply"
    ply.write_bytes(ply.read_bytes()[:-5])
    with pytest.raises(layout.LayoutError, match=r"mesh.ply: truncated"):
        layout.read_neutral_scan(tmp_path)


def test_vertices_frame_count_must_match_meta(tmp_path, rng):
    vertices = rng.normal(size=(4, 10, 3)).astype(np.float32)
    layout.write_vertices(tmp_path, vertices)
    np.testing.assert_array_equal(layout.read_vertices(tmp_path, num_frames=4), vertices)
    with pytest.raises(layout.LayoutError, match=r"vertices.npy: 4 frames of vertices, but meta.json says 5"):
        layout.read_vertices(tmp_path, num_frames=5)


def test_staged_dir_leaves_nothing_half_written(tmp_path, rng):
    final = tmp_path / "out"
    payload = rng.bytes(16)
    with pytest.raises(RuntimeError, match="boom"), layout.staged_dir(final) as staging:
        (staging / "partial").write_bytes(payload)
        raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with layout.staged_dir(final) as staging:
        (staging / "done").write_bytes(payload)
        assert not final.exists()
    assert (final / "done").read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_listing_and_missing_camera(tmp_path, rng):
    seq = layout.sequence_dir(tmp_path, "s02", "sen_00")
    frames = rng.permutation(12)[:3]
    for frame in frames:
        image = rng.integers(0, 256, (4, 4), dtype=np.uint8)
        layout.write_image(layout.frame_path(seq, "7", int(frame)), image)
    (layout.subject_dir(tmp_path, "s01") / "sequences").mkdir(parents=True)
    assert layout.list_subjects(tmp_path) == ["s01", "s02"]
    assert layout.list_sequences(layout.subject_dir(tmp_path, "s02")) == ["sen_00"]
    assert [int(p.stem) for p in layout.frame_paths(seq, "7")] == sorted(int(f) for f in frames)
    with pytest.raises(layout.LayoutError, match=r"cam_8: no images for camera 8"):
        layout.frame_paths(seq, "8")
