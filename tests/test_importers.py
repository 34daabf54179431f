"""Importers on small fixtures written in each source's real format, with known cameras and bad inputs."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from data_pipelines import layout
from data_pipelines.importers import import_capture, lens, nersemble
from data_pipelines.importers.multiface import MultifaceOptions
from data_pipelines.importers.nersemble import NersembleOptions
from data_pipelines.layout import LayoutError
from uhap_jax import cli

# -------------------- shared fixture helpers


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """int16 PCM, samples [T] or [T, channels] in [-1, 1]."""
    samples = samples.reshape(len(samples), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(samples.shape[1])
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((samples * 32000).astype("<i2").tobytes())


def _tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(round(rate * seconds)) / rate)


def _assert_tone(waveform: np.ndarray, hz: float = 440.0) -> None:
    """The 16 kHz waveform is the tone (correlation with a fitted sinusoid, edges skipped)."""
    t = np.arange(len(waveform)) / layout.AUDIO_RATE
    core = slice(200, len(waveform) - 200)
    basis = np.stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)], axis=1)[core]
    coefficients, *_ = np.linalg.lstsq(basis, waveform[core], rcond=None)
    assert np.corrcoef(basis @ coefficients, waveform[core])[0, 1] > 0.99


def _random_rigid(rng: np.random.Generator, distance: float) -> tuple[np.ndarray, np.ndarray]:
    rotation = Rotation.from_rotvec(rng.uniform(-0.2, 0.2, 3)).as_matrix()
    translation = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), 1.0]) * distance
    return rotation, translation


def _assert_nothing_written(out: Path) -> None:
    subjects = out / "subjects"
    assert not subjects.exists() or not any(subjects.iterdir()), list(subjects.iterdir())
    assert not [p for p in out.parent.rglob(".uhap-import-*")]  # no staging folder left behind


def _existing_layout(out: Path, rng: np.random.Generator) -> dict[str, bytes]:
    """An --out that already holds a subject and a file of the user's; returns its files' bytes."""
    files = {
        out / "subjects" / "old" / "calibration" / "camera_params.json": rng.bytes(64),
        out / "notes.txt": rng.bytes(32),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {str(p.relative_to(out)): d for p, d in files.items()}


def _assert_unchanged(out: Path, before: dict[str, bytes]) -> None:
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in (out / "subjects").iterdir()) == ["old"]
    assert not [p for p in out.parent.rglob(".uhap-import-*")]


# -------------------- Multiface


MF_SIZE = (48, 40)  # W, H
MF_FRAMES = ["000100", "000101", "000102", "000103"]
MF_EXPRESSION = "SEN_a_good_morrow_to_you_my_boy"


def _distort_pixel(k: np.ndarray, dist: np.ndarray, x: float, y: float) -> np.ndarray:
    """OpenCV's model written out for one normalised point: where the lens images it, in pixels."""
    k1, k2, p1, p2, k3 = dist
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.array([k[0, 0] * xd + k[0, 2], k[1, 1] * yd + k[1, 2]])


def _blob(center: np.ndarray, sigma: float = 1.3) -> np.ndarray:
    columns, rows = np.meshgrid(np.arange(MF_SIZE[0]) + 0.5, np.arange(MF_SIZE[1]) + 0.5)
    spot = np.exp(-((columns - center[0]) ** 2 + (rows - center[1]) ** 2) / (2 * sigma**2))
    return np.repeat(np.round(250 * spot).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(image: np.ndarray) -> np.ndarray:
    weight = image[..., 0].astype(np.float64)
    i, j = np.unravel_index(np.argmax(weight), weight.shape)
    window = weight[max(i - 4, 0) : i + 5, max(j - 4, 0) : j + 5]
    rows, columns = np.mgrid[max(i - 4, 0) : i + 5, max(j - 4, 0) : j + 5]
    return np.array([(window * (columns + 0.5)).sum(), (window * (rows + 0.5)).sum()]) / window.sum()


def _write_multiface(root: Path, rng: np.random.Generator) -> dict:
    """One participant: a distorted and an undistorted camera, blobs at projected 3D points, audio, meshes."""
    participant = root / "m--20180227--0000--6795937--GHS"
    cameras = {}
    krt_lines = []
    for name, dist in [("400002", [-0.25, 0.06, 0.01, -0.006, 0.01]), ("400004", [0.0] * 5)]:
        rotation, translation_mm = _random_rigid(rng, 1000.0)
        k = np.array([[50.0 + rng.uniform(-2, 2), 0, 24.0 + rng.uniform(-1, 1)], [0, 51.0, 20.0], [0, 0, 1]])
        k[1, 2] += rng.uniform(-1, 1)
        cameras[name] = dict(rotation=rotation, translation_mm=translation_mm, k=k, dist=np.array(dist))
        krt_lines += [name] + [" ".join(repr(float(v)) for v in row) for row in k]
        krt_lines += [" ".join(repr(float(v)) for v in dist)]
        extrinsic = np.concatenate([rotation, translation_mm[:, None]], axis=1)
        krt_lines += [" ".join(repr(float(v)) for v in row) for row in extrinsic] + [""]
    (participant).mkdir(parents=True)
    (participant / "KRT").write_text("\n".join(krt_lines) + "\n")
    points_mm = rng.uniform(-60, 60, (len(MF_FRAMES), 3))
    for name, camera in cameras.items():
        for stem, point in zip(MF_FRAMES, points_mm):
            in_camera = camera["rotation"] @ point + camera["translation_mm"]
            center = _distort_pixel(camera["k"], camera["dist"], *(in_camera[:2] / in_camera[2]))
            layout.write_image(participant / "images" / MF_EXPRESSION / name / f"{stem}.png", _blob(center))
    seconds = len(MF_FRAMES) / 30 + 0.01  # a little audio after the last frame, cut with a note
    _write_wav(participant / "audio" / f"{MF_EXPRESSION}.wav", np.stack([_tone(44100, seconds)] * 2, 1), 44100)
    mesh_dir = participant / "tracked_mesh" / MF_EXPRESSION
    mesh_dir.mkdir(parents=True)
    head_vertices_mm = rng.uniform(-90, 90, (len(MF_FRAMES), 7, 3)).astype(np.float32)
    poses = []
    for stem, vertices in zip(MF_FRAMES, head_vertices_mm):
        vertices.tofile(mesh_dir / f"{stem}.bin")
        rotation, translation = _random_rigid(rng, 30.0)
        pose = np.concatenate([rotation, translation[:, None]], axis=1)
        np.savetxt(mesh_dir / f"{stem}_transform.txt", pose)
        poses.append(pose)
    return dict(participant=participant, cameras=cameras, points_mm=points_mm, head=head_vertices_mm, poses=poses)


def test_multiface_recovers_cameras_undistorts_and_converts_units(tmp_path, rng):
    source = _write_multiface(tmp_path / "src", rng)
    out = tmp_path / "out"
    notes = import_capture("multiface", tmp_path / "src", out, MultifaceOptions())
    subject = out / "subjects" / source["participant"].name
    calibration = layout.read_calibration(subject)
    assert sorted(calibration) == ["400002", "400004"]
    for name, camera in source["cameras"].items():
        imported = calibration[name]
        np.testing.assert_array_equal(imported.world_to_cam[:3, :3], camera["rotation"])
        np.testing.assert_allclose(imported.world_to_cam[:3, 3], camera["translation_mm"] / 1000, rtol=1e-15)
        np.testing.assert_array_equal(imported.intrinsics, camera["k"])
        assert (imported.width, imported.height) == MF_SIZE
    seq_dir = subject / "sequences" / MF_EXPRESSION
    meta = layout.read_sequence_meta(seq_dir)
    assert meta["fps"] == 30.0 and meta["num_frames"] == len(MF_FRAMES)
    assert meta["source_frames"] == [int(s) for s in MF_FRAMES]
    for name, camera in source["cameras"].items():
        for index, point_mm in enumerate(source["points_mm"]):
            image = layout.read_image(layout.frame_path(seq_dir, name, index))
            if not camera["dist"].any():  # no distortion: sampling at the pixel centres is the identity
                original = layout.read_image(
                    source["participant"] / "images" / MF_EXPRESSION / name / f"{MF_FRAMES[index]}.png"
                )
                np.testing.assert_array_equal(image, original)
            world_to_cam, k = calibration[name].world_to_cam, calibration[name].intrinsics
            projected = k @ (world_to_cam[:3, :3] @ (point_mm / 1000) + world_to_cam[:3, 3])
            np.testing.assert_allclose(_centroid(image), projected[:2] / projected[2], atol=0.15)
    waveform, _ = layout.read_audio(seq_dir / "audio.wav")
    assert len(waveform) == round(len(MF_FRAMES) / 30 * 16000)
    _assert_tone(waveform)
    joined = " ".join(notes.notes[source["participant"].name])
    assert "mixed 2 channels" in joined and "44100->16000" in joined and "cut 0.010 s" in joined
    vertices = layout.read_vertices(seq_dir, num_frames=len(MF_FRAMES))
    for frame, pose in enumerate(source["poses"]):
        expected = (source["head"][frame].astype(np.float64) @ pose[:, :3].T + pose[:, 3]) / 1000
        np.testing.assert_allclose(vertices[frame], expected, atol=1e-6)
        np.testing.assert_allclose(np.array(meta["head_pose"][frame])[:3, 3], pose[:, 3] / 1000, rtol=1e-12)


def test_undistortion_moves_points_where_the_pinhole_model_puts_them(rng):
    """Independent of the importer: a dense grid of distorted positions lands back on the ideal pixels."""
    k = np.array([[300.0, 0.0, 161.0], [0.0, 305.0, 119.0], [0.0, 0.0, 1.0]])
    dist = np.array([-0.3, 0.1, 0.002, -0.001, -0.02]) * rng.uniform(0.5, 1.5)
    sampling = lens.undistortion_map(k, dist, 320, 240)
    for i, j in rng.integers([10, 10], [230, 310], (20, 2)):
        ideal = np.linalg.solve(k, [j + 0.5, i + 0.5, 1.0])
        expected = _distort_pixel(k, dist, ideal[0], ideal[1]) - 0.5
        np.testing.assert_allclose(sampling[:, i, j], expected[::-1], atol=1e-9)


@pytest.mark.parametrize(
    "damage",
    ["corrupt_image", "missing_image", "no_intrinsics", "nan_calibration", "short_audio", "unknown_camera",
     "not_a_rotation", "zero_focal_length", "mirrored_axes", "principal_point_outside"],
)  # fmt: skip
def test_multiface_bad_input_names_the_file_and_writes_nothing(tmp_path, rng, damage):
    source = _write_multiface(tmp_path / "src", rng)
    participant = source["participant"]
    images = participant / "images" / MF_EXPRESSION
    krt = participant / "KRT"
    lines = krt.read_text().splitlines()  # camera 400004's block: name 9, K 10-12, distortion 13, [R|t] 14-16
    before = _existing_layout(tmp_path / "out", rng)
    if damage == "not_a_rotation":
        lines[14] = " ".join(["3.0"] + lines[14].split()[1:])
        expected = [str(krt), "400004", "not orthonormal"]
    elif damage == "zero_focal_length":
        lines[10] = " ".join(["0.0"] + lines[10].split()[1:])
        expected = [str(krt), "400004", "focal lengths"]
    elif damage == "mirrored_axes":
        lines[16] = " ".join([repr(-float(v)) for v in lines[16].split()[:3]] + lines[16].split()[3:])
        expected = [str(krt), "400004", "determinant"]
    elif damage == "principal_point_outside":
        lines[10] = " ".join(lines[10].split()[:2] + [repr(MF_SIZE[0] + 5.0)])
        expected = [str(krt), "principal point"]
    if damage in ("not_a_rotation", "zero_focal_length", "mirrored_axes", "principal_point_outside"):
        krt.write_text("\n".join(lines) + "\n")
    elif damage == "corrupt_image":
        culprit = images / "400004" / "000102.png"
        culprit.write_bytes(culprit.read_bytes()[:40])
        expected = [str(culprit), "corrupt"]
    elif damage == "missing_image":
        culprit = images / "400002" / "000101.png"
        culprit.unlink()
        expected = [str(culprit), "missing"]
    elif damage == "no_intrinsics":
        lines = (participant / "KRT").read_text().splitlines()
        (participant / "KRT").write_text("\n".join(lines[:1] + lines[4:]) + "\n")  # 400002 loses its K rows
        expected = [str(participant / "KRT"), "400002", "intrinsics"]
    elif damage == "nan_calibration":
        lines = (participant / "KRT").read_text().splitlines()
        lines[14] = " ".join(lines[14].split()[:3] + ["nan"])  # x translation of camera 400004
        (participant / "KRT").write_text("\n".join(lines) + "\n")
        expected = [str(participant / "KRT"), "400004", "NaN"]
    elif damage == "short_audio":
        culprit = participant / "audio" / f"{MF_EXPRESSION}.wav"
        _write_wav(culprit, _tone(22050, 2 / 30), 22050)
        expected = [str(culprit), "audio lasts"]
    elif damage == "unknown_camera":
        (images / "400002").rename(images / "400099")
        expected = [str(images / "400099"), "missing from", "KRT"]
    with pytest.raises(LayoutError) as error:
        import_capture("multiface", participant, tmp_path / "out", MultifaceOptions())
    for fragment in expected:
        assert fragment in str(error.value)
    _assert_unchanged(tmp_path / "out", before)


# -------------------- NeRSemble


NS_VIDEO = (32, 24)  # W, H
NS_CALIB = (64, 48)  # the intrinsics are calibrated at twice the video resolution
NS_SERIALS = ["220700191", "222200037"]
NS_PARTICIPANT = "017"


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _srgb_encode(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, None)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)


def _write_video(path: Path, frames: np.ndarray, fps: float = 25.0, audio: Path | None = None) -> None:
    """Lossless RGB H.264 so that decoded frames can be compared exactly; optional AAC audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (frames.shape[2], frames.shape[1]),
        fps=fps,
        codec="libx264rgb",
        pix_fmt_out="rgb24",
        quality=None,
        macro_block_size=1,
        output_params=["-qp", "0"],
        audio_path=None if audio is None else str(audio),
        audio_codec=None if audio is None else "aac",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def _write_nersemble(root: Path, rng: np.random.Generator, *, num_frames: int = 3) -> dict:
    participant = root / NS_PARTICIPANT
    world_2_cam = {}
    for serial in NS_SERIALS:
        rotation, translation = _random_rigid(rng, 1.2)
        world_2_cam[serial] = np.eye(4)
        world_2_cam[serial][:3, :3], world_2_cam[serial][:3, 3] = rotation, translation
    intrinsics = np.array([[90.0 + rng.uniform(-3, 3), 0, 31.3], [0, 91.0, 24.6], [0, 0, 1]])
    ccms = {
        s: np.concatenate([np.diag(rng.uniform(0.8, 1.2, 3)), rng.uniform(-0.03, 0.03, (3, 1))], 1) for s in NS_SERIALS
    }
    calibration = participant / "calibration"
    calibration.mkdir(parents=True)
    params = {
        "world_2_cam": {s: m.tolist() for s, m in world_2_cam.items()},
        "intrinsics": intrinsics.tolist(),
    }
    (calibration / "camera_params.json").write_text(json.dumps(params))
    (calibration / "color_calibration.json").write_text(json.dumps({s: m.tolist() for s, m in ccms.items()}))
    frames = {}
    speech = root / "speech.wav"
    _write_wav(speech, _tone(48000, num_frames / 25), 48000)
    for sequence in ["EXP-1-head", "SEN-01-cramp_small_danger"]:
        for serial in NS_SERIALS:
            frames[sequence, serial] = rng.integers(0, 256, (num_frames, NS_VIDEO[1], NS_VIDEO[0], 3), np.uint8)
            with_audio = sequence.startswith("SEN") and serial == NS_SERIALS[1]
            path = participant / "sequences" / sequence / "images" / f"cam_{serial}.mp4"
            _write_video(path, frames[sequence, serial], audio=speech if with_audio else None)
    return dict(participant=participant, world_2_cam=world_2_cam, intrinsics=intrinsics, ccms=ccms, frames=frames)


def test_nersemble_cameras_colours_scaled_intrinsics_and_audio(tmp_path, rng):
    source = _write_nersemble(tmp_path / "src", rng)
    out = tmp_path / "out"
    report = import_capture("nersemble", tmp_path / "src", out, NersembleOptions(calib_resolution=NS_CALIB))
    subject = out / "subjects" / NS_PARTICIPANT
    calibration = layout.read_calibration(subject)
    assert sorted(calibration) == NS_SERIALS
    expected_k = source["intrinsics"].copy()
    expected_k[:2] *= 0.5
    for serial, camera in calibration.items():
        np.testing.assert_array_equal(camera.world_to_cam, source["world_2_cam"][serial])
        np.testing.assert_allclose(camera.intrinsics, expected_k, rtol=1e-15)
        assert (camera.width, camera.height) == NS_VIDEO
    for (sequence, serial), frames in source["frames"].items():
        seq_dir = subject / "sequences" / sequence
        assert layout.read_sequence_meta(seq_dir)["num_frames"] == len(frames)
        ccm = source["ccms"][serial]
        for index, frame in enumerate(frames):
            linear = _srgb_decode(frame / 255.0)
            expected = np.clip(np.round(_srgb_encode(linear @ ccm[:, :3].T + ccm[:, 3]) * 255), 0, 255)
            imported = layout.read_image(layout.frame_path(seq_dir, serial, index)).astype(np.float64)
            assert np.abs(imported - expected).max() <= 1
    silent, speech = (
        layout.read_sequence_meta(subject / "sequences" / s) for s in ["EXP-1-head", "SEN-01-cramp_small_danger"]
    )
    assert not silent["has_audio"] and not (subject / "sequences" / "EXP-1-head" / "audio.wav").exists()
    assert speech["has_audio"]
    waveform, _ = layout.read_audio(subject / "sequences" / "SEN-01-cramp_small_danger" / "audio.wav")
    assert len(waveform) == round(3 / 25 * 16000)
    _assert_tone(waveform)
    assert any("video only" in note for note in report.notes[NS_PARTICIPANT])
    assert not report.skipped


def test_nersemble_audio_dir_is_used_and_checked_against_frames(tmp_path, rng):
    source = _write_nersemble(tmp_path / "src", rng)
    audio_dir = tmp_path / "audio"
    _write_wav(audio_dir / NS_PARTICIPANT / "EXP-1-head.wav", _tone(16000, 3 / 25, hz=300.0), 16000)
    options = NersembleOptions(audio_dir=audio_dir, calib_resolution=NS_CALIB, sequences=["EXP-1-head"])
    import_capture("nersemble", source["participant"], tmp_path / "out", options)
    seq_dir = tmp_path / "out" / "subjects" / NS_PARTICIPANT / "sequences" / "EXP-1-head"
    waveform, _ = layout.read_audio(seq_dir / "audio.wav")
    _assert_tone(waveform, hz=300.0)
    short = audio_dir / NS_PARTICIPANT / "EXP-1-head.wav"
    _write_wav(short, _tone(16000, 1 / 25), 16000)
    with pytest.raises(LayoutError, match="audio lasts") as error:
        import_capture("nersemble", source["participant"], tmp_path / "out2", options)
    assert str(short) in str(error.value)
    _assert_nothing_written(tmp_path / "out2")


@pytest.mark.parametrize(
    "damage",
    [
        "no_intrinsics",
        "nan_calibration",
        "missing_camera",
        "frame_count",
        "corrupt_video",
        "calib_resolution",
        "not_a_rotation",
        "zero_focal_length",
        "negative_focal_length",
        "mirrored_axes",
        "not_rigid",
        "alpha_frame_count",
        "alpha_size",
    ],
)
def test_nersemble_bad_input_names_the_file_and_writes_nothing(tmp_path, rng, damage):
    source = _write_nersemble(tmp_path / "src", rng, num_frames=2)
    participant = source["participant"]
    params_path = participant / "calibration" / "camera_params.json"
    params = json.loads(params_path.read_text())
    videos = participant / "sequences" / "EXP-1-head" / "images"
    options = NersembleOptions(calib_resolution=NS_CALIB)
    if damage == "no_intrinsics":
        params.pop("intrinsics")
        expected = [str(params_path), "no intrinsics"]
    elif damage == "nan_calibration":
        params["world_2_cam"][NS_SERIALS[1]][0][3] = float("nan")
        expected = [str(params_path), NS_SERIALS[1], "NaN"]
    elif damage == "missing_camera":
        params["world_2_cam"].pop(NS_SERIALS[0])
        expected = [str(videos / f"cam_{NS_SERIALS[0]}.mp4"), "missing from"]
    elif damage == "frame_count":
        _write_video(videos / f"cam_{NS_SERIALS[1]}.mp4", source["frames"]["EXP-1-head", NS_SERIALS[1]][:1])
        expected = [str(videos), "frame count", f"cam_{NS_SERIALS[1]}.mp4: 1"]
    elif damage == "corrupt_video":
        culprit = videos / f"cam_{NS_SERIALS[0]}.mp4"
        culprit.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
        expected = [str(culprit), "video"]
    elif damage == "calib_resolution":
        options = NersembleOptions()  # the intrinsics' principal point lies outside the smaller video
        expected = [str(params_path), "--calib-resolution"]
    elif damage == "not_a_rotation":
        params["world_2_cam"][NS_SERIALS[1]][0][0] = 3.0
        expected = [str(params_path), NS_SERIALS[1], "not orthonormal"]
    elif damage == "zero_focal_length":
        params["intrinsics"][0][0] = 0.0
        expected = [str(params_path), "focal lengths"]
    elif damage == "negative_focal_length":
        params["intrinsics"][1][1] = -91.0
        expected = [str(params_path), "focal lengths"]
    elif damage == "mirrored_axes":
        params["world_2_cam"][NS_SERIALS[0]][2][:3] = [-v for v in params["world_2_cam"][NS_SERIALS[0]][2][:3]]
        expected = [str(params_path), NS_SERIALS[0], "determinant"]
    elif damage == "not_rigid":
        params["world_2_cam"][NS_SERIALS[0]][3] = [0.0, 0.0, 1.0, 1.0]
        expected = [str(params_path), NS_SERIALS[0], "last row"]
    elif damage == "alpha_frame_count":
        culprit = videos.parent / "alpha_maps" / f"cam_{NS_SERIALS[1]}.mp4"
        _write_video(culprit, source["frames"]["EXP-1-head", NS_SERIALS[1]][:1])
        expected = [str(culprit), "only 1 of the 2 frames"]
    else:
        culprit = videos.parent / "alpha_maps" / f"cam_{NS_SERIALS[0]}.mp4"
        _write_video(culprit, rng.integers(0, 256, (2, 8, 8, 3), np.uint8))
        expected = [str(culprit), "8x8 alpha maps"]
    params_path.write_text(json.dumps(params))
    before = _existing_layout(tmp_path / "out", rng)
    with pytest.raises(LayoutError) as error:
        import_capture("nersemble", participant, tmp_path / "out", options)
    for fragment in expected:
        assert fragment in str(error.value)
    _assert_unchanged(tmp_path / "out", before)


def test_nersemble_colour_conversion_truncates_like_the_official_kit(rng):
    """`nersemble_data.util.color_correction.correct_color` ends in `np.clip(x * 255, 0, 255).astype(np.uint8)`:
    clip, then truncate. Same here, exactly, against a float64 reference; rounding would differ often."""
    image = rng.integers(0, 256, (37, 29, 3), np.uint8)
    terms = int(rng.choice(sorted(nersemble.CHEUNG_TERMS)))
    ccm = np.zeros((3, terms))
    ccm[:, :3] = np.diag(rng.uniform(0.7, 1.3, 3)) + rng.uniform(-0.05, 0.05, (3, 3))
    ccm[:, 3:] = rng.uniform(-0.02, 0.02, (3, terms - 3))
    linear = _srgb_decode(image.reshape(-1, 3) / 255.0)
    corrected = _srgb_encode(nersemble._cheung_expansion(linear, terms) @ ccm.T) * 255.0
    expected = np.clip(corrected, 0, 255).astype(np.uint8).reshape(image.shape)
    np.testing.assert_array_equal(nersemble.apply_color_correction(image, ccm), expected)
    rounded = np.clip(np.round(corrected), 0, 255).astype(np.uint8).reshape(image.shape)
    assert np.mean(rounded != expected) > 0.2


def test_nersemble_alpha_maps_become_the_masks(tmp_path, rng):
    source = _write_nersemble(tmp_path / "src", rng, num_frames=2)
    alphas = {}
    for serial in NS_SERIALS:
        grey = rng.integers(0, 256, (2, NS_VIDEO[1], NS_VIDEO[0]), np.uint8)
        alphas[serial] = grey
        path = source["participant"] / "sequences" / "EXP-1-head" / "alpha_maps" / f"cam_{serial}.mp4"
        _write_video(path, np.repeat(grey[..., None], 3, axis=3))
    options = NersembleOptions(calib_resolution=NS_CALIB, sequences=["EXP-1-head"])
    import_capture("nersemble", source["participant"], tmp_path / "out", options)
    seq_dir = tmp_path / "out" / "subjects" / NS_PARTICIPANT / "sequences" / "EXP-1-head"
    assert layout.read_sequence_meta(seq_dir)["masked_cameras"] == NS_SERIALS
    for serial, grey in alphas.items():
        for index, expected in enumerate(grey):
            mask = layout.read_image(layout.frame_path(seq_dir, serial, index, kind="masks"))
            np.testing.assert_array_equal(mask, expected)  # lossless video: the alpha levels themselves


def test_folder_of_participants_names_an_unusable_one_and_skips_it_only_when_asked(tmp_path, rng, capsys):
    source = _write_nersemble(tmp_path / "src", rng, num_frames=2)
    stray = tmp_path / "src" / "018"
    (stray / "sequences").mkdir(parents=True)  # a participant without calibration/camera_params.json
    options = NersembleOptions(calib_resolution=NS_CALIB)
    before = _existing_layout(tmp_path / "out", rng)
    with pytest.raises(LayoutError, match=str(stray / "calibration" / "camera_params.json")):
        import_capture("nersemble", tmp_path / "src", tmp_path / "out", options)
    _assert_unchanged(tmp_path / "out", before)

    report = import_capture("nersemble", tmp_path / "src", tmp_path / "out", options, skip_bad=True)
    assert list(report.notes) == [NS_PARTICIPANT] and [item for item, _ in report.skipped] == ["018"]
    assert layout.read_calibration(tmp_path / "out" / "subjects" / NS_PARTICIPANT)
    assert (tmp_path / "out" / "notes.txt").read_bytes() == before["notes.txt"]

    argv = ["data", "import", "--format", "nersemble", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"),
            "--calib-resolution", "64x48"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "018" in err[0]
    assert not (tmp_path / "o2").exists()
    assert cli.main([*argv, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "SKIPPED 018:" in captured.err and "SKIPPED 1" in captured.out
    assert source["participant"].is_dir()


def test_a_bad_sequence_is_skipped_only_with_skip_bad(tmp_path, rng):
    source = _write_nersemble(tmp_path / "src", rng, num_frames=2)
    culprit = source["participant"] / "sequences" / "EXP-1-head" / "images" / f"cam_{NS_SERIALS[0]}.mp4"
    culprit.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    options = NersembleOptions(calib_resolution=NS_CALIB)
    with pytest.raises(LayoutError, match=str(culprit)):
        import_capture("nersemble", source["participant"], tmp_path / "out", options)
    _assert_nothing_written(tmp_path / "out")
    report = import_capture("nersemble", source["participant"], tmp_path / "out", options, skip_bad=True)
    assert [item for item, _ in report.skipped] == [f"{NS_PARTICIPANT}/EXP-1-head"]
    subject = tmp_path / "out" / "subjects" / NS_PARTICIPANT
    assert layout.list_sequences(subject) == ["SEN-01-cramp_small_danger"]


def test_import_refuses_an_out_inside_its_source(tmp_path, rng, capsys):
    source = _write_nersemble(tmp_path / "src", rng, num_frames=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    status = cli.main(["data", "import", "--format", "nersemble", "--src", str(source["participant"]), "--out",
                       str(source["participant"] / "layout"), "--calib-resolution", "64x48"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "overlaps the input" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
