"""Animation outputs: MP4 with the speech track, per-frame 3DGS PLY, and the camera paths they are rendered from.

The MP4 and PLY files are checked with independent readers written here (the ffmpeg binary's own output, a
minimal PLY parser), never only with the library's writer and reader against each other.
"""

import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from flax import nnx

import kernels
from data_pipelines import layout
from kernels.constants import ALPHA_MIN
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import cameras
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.inference import camera_paths, fps_bench, ply, video
from uhap_jax.models.prior import UHAP

AUDIO_RATE = 16000
INRIA_PROPERTIES = [
    *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"),
    *("scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"),
]
RAW_RGB = ("-f", "rawvideo", "-pix_fmt", "rgb24")

# ------------------------------------------------------------------------------------------ MP4


def _ffmpeg(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", *arguments], capture_output=True)


def _probe(path) -> dict:
    """Streams and duration as `ffmpeg -i` prints them on stderr."""
    info = _ffmpeg("-i", str(path)).stderr.decode()
    streams = re.findall(r"Stream #0:\d+\S*: (Video|Audio): (\w+)", info)
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+)", info).groups()
    return {
        "video": [codec for kind, codec in streams if kind == "Video"],
        "audio": [codec for kind, codec in streams if kind == "Audio"],
        "duration": 3600 * int(hours) + 60 * int(minutes) + float(seconds),
        "size": tuple(int(s) for s in re.search(r"Video: .*?, (\d+)x(\d+)", info).groups()),
    }


def _decode_frames(path, width: int, height: int) -> np.ndarray:
    """RGB frames with the chroma interpolated as players do (swscale's default fast path repeats it)."""
    upsample = "scale=flags=bicubic+accurate_rnd+full_chroma_int"
    result = _ffmpeg("-v", "error", "-i", str(path), "-map", "0:v:0", "-vf", upsample, *RAW_RGB, "-")
    assert result.returncode == 0, result.stderr.decode()
    return np.frombuffer(result.stdout, np.uint8).reshape(-1, height, width, 3)


def _decode_audio(path) -> np.ndarray:
    mono_16k = ("-ac", "1", "-ar", str(AUDIO_RATE), "-f", "f32le")
    result = _ffmpeg("-v", "error", "-i", str(path), "-map", "0:a:0", *mono_16k, "-")
    assert result.returncode == 0, result.stderr.decode()
    return np.frombuffer(result.stdout, "<f4")


def _smooth_frames(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """Colourful, slowly varying sinusoids in [0.1, 0.9] that move from frame to frame: float32 [T, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height) / height, np.arange(width) / width, indexing="ij")
    channels = []
    for _ in range(3):
        fx, fy, ft, phase = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.02, 0.1), rng.uniform(0, 6)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * x + fy * y + ft * t) + phase))
    return np.stack(channels, -1).astype(np.float32)


def _speech_like(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """A few random tones with a syllable-rate envelope, plus a little noise."""
    seconds = np.arange(num_samples) / AUDIO_RATE
    tones = sum(rng.uniform(0.05, 0.15) * np.sin(2 * np.pi * rng.uniform(150, 2000) * seconds) for _ in range(4))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 6) * seconds)
    return (envelope * tones + 0.005 * rng.normal(size=num_samples)).astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_mp4_has_video_and_audio_with_matching_duration_and_decodes_back(tmp_path, rng):
    fps, num_frames = 25.0, int(rng.integers(18, 30))
    frames = _smooth_frames(rng, num_frames, 48, 64)
    # The audio may run up to a little under one frame longer or shorter than the video.
    num_samples = int(num_frames / fps * AUDIO_RATE + rng.integers(-600, 600))
    audio = _speech_like(rng, num_samples)
    path = video.write_video(tmp_path / "out" / "talk.mp4", frames, audio, fps=fps)

    probe = _probe(path)
    assert probe["video"] == ["h264"] and probe["audio"] == ["aac"]
    assert probe["size"] == (64, 48)
    assert abs(probe["duration"] - num_samples / AUDIO_RATE) <= 1 / fps
    decoded = _decode_frames(path, 64, 48)
    assert len(decoded) == num_frames
    assert _psnr(decoded / 255.0, frames) > 30.0
    # Frames stay in order: each decoded frame is closest to its own source frame.
    errors = np.mean((decoded[:, None] / 255.0 - frames[None]) ** 2, axis=(2, 3, 4))
    np.testing.assert_array_equal(np.argmin(errors, axis=1), np.arange(num_frames))

    sound = _decode_audio(path)
    assert abs(len(sound) - num_samples) <= AUDIO_RATE / fps
    overlap = min(len(sound), num_samples)
    assert np.corrcoef(sound[:overlap], audio[:overlap])[0, 1] > 0.95
    assert [p.name for p in path.parent.iterdir()] == ["talk.mp4"]  # no partial file left beside it


def test_mp4_streams_uint8_frames_of_odd_size_without_audio(tmp_path, rng):
    frames = np.round(255 * _smooth_frames(rng, 7, 37, 53)).astype(np.uint8)
    path = video.write_video(tmp_path / "silent.mp4", (frame for frame in frames), fps=12.5)
    probe = _probe(path)
    assert probe["video"] == ["h264"] and probe["audio"] == []
    assert probe["size"] == (54, 38)  # made even for yuv420p by repeating the last row and column
    decoded = _decode_frames(path, 54, 38)
    assert len(decoded) == 7
    assert abs(probe["duration"] - 7 / 12.5) <= 1 / 12.5
    assert _psnr(decoded[:, :37, :53] / 255.0, frames / 255.0) > 30.0
    assert _psnr(decoded[:, 37, :53] / 255.0, frames[:, 36] / 255.0) > 30.0


def test_mp4_refuses_bad_input_and_keeps_the_old_file(tmp_path, rng):
    path = tmp_path / "talk.mp4"
    path.write_bytes(b"previous video")
    frames = _smooth_frames(rng, 10, 16, 16)
    two_frames_too_long = _speech_like(rng, 12 * AUDIO_RATE // 25)
    with pytest.raises(ValueError, match=r"talk\.mp4: 10 frames at 25 fps last 0\.400 s but the audio lasts 0\.480"):
        video.write_video(path, frames, two_frames_too_long)
    with pytest.raises(ValueError, match=r"talk\.mp4: 10 frames .* must agree within one frame"):
        video.write_video(path, (f for f in frames), two_frames_too_long)  # found only after encoding
    broken = frames.copy()
    broken[4, 3, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"talk\.mp4: frame 4: holds NaN"):
        video.write_video(path, broken)
    with pytest.raises(ValueError, match=r"talk\.mp4: audio must be non-empty float mono"):
        video.write_video(path, frames, np.stack([two_frames_too_long] * 2, -1))
    with pytest.raises(ValueError, match=r"talk\.mp4: frame 1 has shape \[8, 16, 3\]"):
        video.write_video(path, [frames[0], frames[1, :8]])
    assert path.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]


# ------------------------------------------------------------------------------------------ PLY


def _random_gaussians(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {
        "means": rng.normal(0.0, 0.1, (count, 3)).astype(np.float32),
        "quats": rng.normal(size=(count, 4)).astype(np.float32),
        "scales": np.exp(rng.uniform(-7, -3, (count, 3))).astype(np.float32),
        "opacities": rng.uniform(0.02, 0.98, count).astype(np.float32),
        "colors": rng.uniform(-0.1, 1.1, (count, 3)).astype(np.float32),
    }


def _parse_ply(data: bytes) -> tuple[list[str], dict[str, np.ndarray]]:
    """A minimal plyfile-style reader: header lines, then little-endian float32 records by property name."""
    header_end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:header_end].decode("ascii").splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", lines[2]]
    count = int(lines[2].removeprefix("element vertex "))
    names = []
    for line in lines[3:-1]:
        kind, dtype, name = line.split()
        assert (kind, dtype) == ("property", "float")
        names.append(name)
    assert lines[-1] == "end_header"
    assert len(data) == header_end + 4 * count * len(names)
    table = np.frombuffer(data, "<f4", offset=header_end).reshape(count, len(names))
    return names, {name: table[:, i] for i, name in enumerate(names)}


def test_ply_header_is_inria_and_values_are_the_3dgs_encoding(tmp_path, rng):
    gaussians = _random_gaussians(rng, int(rng.integers(50, 200)))
    path = ply.write_ply(tmp_path / "frame.ply", **gaussians)
    names, fields = _parse_ply(path.read_bytes())
    assert names == INRIA_PROPERTIES

    g = {key: value.astype(np.float64) for key, value in gaussians.items()}
    quats = g["quats"] / np.linalg.norm(g["quats"], axis=-1, keepdims=True)
    expected = {
        **dict(zip(["x", "y", "z"], g["means"].T)),
        **dict(zip(["nx", "ny", "nz"], np.zeros((3, len(quats))))),
        **dict(zip(["f_dc_0", "f_dc_1", "f_dc_2"], ((g["colors"] - 0.5) / 0.28209479177387814).T)),
        "opacity": np.log(g["opacities"] / (1 - g["opacities"])),
        **dict(zip(["scale_0", "scale_1", "scale_2"], np.log(g["scales"]).T)),
        **dict(zip(["rot_0", "rot_1", "rot_2", "rot_3"], quats.T)),
    }
    for name in INRIA_PROPERTIES:
        np.testing.assert_allclose(fields[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(fields["x"], gaussians["means"][:, 0])  # positions are stored bit-exact


def test_ply_round_trips(tmp_path, rng):
    gaussians = _random_gaussians(rng, int(rng.integers(50, 200)))
    path = ply.write_ply(tmp_path / "frame.ply", **gaussians)
    read = ply.read_ply(path)
    np.testing.assert_array_equal(read.means, gaussians["means"])
    quats = gaussians["quats"] / np.linalg.norm(gaussians["quats"], axis=-1, keepdims=True)
    np.testing.assert_allclose(read.quats, quats, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(read.scales, gaussians["scales"], rtol=1e-6)
    np.testing.assert_allclose(read.opacities, gaussians["opacities"], rtol=1e-6)
    np.testing.assert_allclose(read.colors, gaussians["colors"], rtol=1e-6, atol=1e-7)
    # Writing what was read gives the same records: bit for bit, but for the re-normalised quaternions.
    again = ply.write_ply(tmp_path / "again.ply", *read)
    first, second = ply.read_ply_fields(path), ply.read_ply_fields(again)
    for name in INRIA_PROPERTIES:
        if name.startswith("rot_"):
            np.testing.assert_array_max_ulp(second[name], first[name], maxulp=2)
        else:
            np.testing.assert_array_equal(second[name], first[name], err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.ply", "frame.ply"]


def test_ply_reader_takes_full_inria_files_with_spherical_harmonics(tmp_path, rng):
    """Files from the INRIA code carry f_rest_0..44 between f_dc and opacity; the reader skips them."""
    gaussians = _random_gaussians(rng, 20)
    records = ply.gaussian_fields(**gaussians)
    rest = [f"f_rest_{i}" for i in range(45)]
    names = INRIA_PROPERTIES[:9] + rest + INRIA_PROPERTIES[9:]
    table = np.empty(20, dtype=[(name, "<f4") for name in names])
    for name in names:
        table[name] = records[name] if name in INRIA_PROPERTIES else rng.normal(size=20)
    header = ["ply", "format binary_little_endian 1.0", "comment from train.py", "element vertex 20"]
    header += [f"property float {name}" for name in names] + ["end_header\n"]
    path = tmp_path / "point_cloud.ply"
    path.write_bytes("\n".join(header).encode() + table.tobytes())
    read = ply.read_ply(path)
    np.testing.assert_array_equal(read.means, gaussians["means"])
    np.testing.assert_allclose(read.opacities, gaussians["opacities"], rtol=1e-6)


def test_ply_frames_and_bad_input(tmp_path, rng):
    frames = {key: np.stack([value] * 3) for key, value in _random_gaussians(rng, 30).items()}
    frames["means"] = frames["means"] + rng.normal(size=(3, 1, 3)).astype(np.float32)
    paths = ply.write_ply_frames(tmp_path / "ply", **frames, first_frame=5)
    assert [p.name for p in paths] == ["frame_00005.ply", "frame_00006.ply", "frame_00007.ply"]
    for t, path in enumerate(paths):
        np.testing.assert_array_equal(ply.read_ply(path).means, frames["means"][t])

    gaussians = _random_gaussians(rng, 10)
    gaussians["means"][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"bad\.ply: means holds NaN"):
        ply.write_ply(tmp_path / "bad.ply", **gaussians)
    gaussians = _random_gaussians(rng, 10)
    with pytest.raises(ValueError, match=r"bad\.ply: colors has shape \[2, 10, 3\]"):
        ply.write_ply(tmp_path / "bad.ply", **{**gaussians, "colors": np.stack([gaussians["colors"]] * 2)})
    with pytest.raises(ValueError, match=r"bad\.ply: opacities must lie in \[0, 1\]"):
        ply.write_ply(tmp_path / "bad.ply", **{**gaussians, "opacities": gaussians["opacities"] + 1.0})
    assert not (tmp_path / "bad.ply").exists()

    data = paths[0].read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-7])
    with pytest.raises(ValueError, match=r"cut\.ply: the header promises 30 vertices"):
        ply.read_ply(tmp_path / "cut.ply")
    (tmp_path / "ascii.ply").write_bytes(data.replace(b"binary_little_endian", b"ascii", 1))
    with pytest.raises(ValueError, match=r"ascii\.ply: unsupported PLY format"):
        ply.read_ply(tmp_path / "ascii.ply")


def test_ply_renders_like_the_gaussians_it_was_written_from(tmp_path, rng):
    """What matters downstream: a viewer reading the file sees the same image as our renderer."""
    gaussians = _random_gaussians(rng, 64)
    gaussians["scales"] = np.exp(rng.uniform(-4.5, -3, (64, 3))).astype(np.float32)
    path = camera_paths.orbit(2, width=32, height=32, arc_deg=60)
    read = ply.read_ply(ply.write_ply(tmp_path / "frame.ply", **gaussians))

    def render(g):
        return kernels.rasterize(*g, path.world_to_cam, path.intrinsics, width=32, height=32).rgb

    original = render([gaussians[k] for k in ("means", "quats", "scales", "opacities", "colors")])
    assert float(np.max(np.asarray(original))) > 0.1  # the Gaussians are in view
    # The file stores log scales, logit opacities and SH colours, so read-back values differ by a float32 ulp or
    # two; within 2e-5 everywhere but where that ulp moves one pair's alpha across ALPHA_MIN (the skip and the
    # bounding box's cut-off). Such a flip adds or drops alpha * (c_i - what is behind it), at most ALPHA_MIN times
    # the colour span (with the 0 background), at one pixel (measured: 14/3000 seeds, one pixel each, <= 0.85x the
    # bound); a real encoding error moves many pixels.
    error = np.abs(np.asarray(render(read)) - np.asarray(original)).max(-1)
    span = float(gaussians["colors"].max() - min(gaussians["colors"].min(), 0.0))
    assert np.sum(error > 2e-5) <= 2 and error.max() <= ALPHA_MIN * span, (int(np.sum(error > 2e-5)), error.max())


# ------------------------------------------------------------------------------------------ camera paths


def _centres(path: camera_paths.CameraPath) -> np.ndarray:
    rotation, translation = path.world_to_cam[:, :3, :3], path.world_to_cam[:, :3, 3]
    return -np.einsum("tji,tj->ti", rotation, translation)


def _assert_looks_at(path: camera_paths.CameraPath, centre: np.ndarray) -> None:
    for world_to_cam, intrinsics in zip(path.world_to_cam, path.intrinsics):
        rotation = world_to_cam[:3, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) > 0
        pixels, depth = cameras.project(np.stack([centre, centre + [0, 0.05, 0]]), world_to_cam, intrinsics)
        np.testing.assert_allclose(pixels[0], [path.width / 2, path.height / 2], atol=1e-9)
        assert depth[0] > 0
        assert pixels[1, 1] < pixels[0, 1]  # world up (+y) shows as up in the image (smaller row)


def test_front_camera_faces_the_head(rng):
    centre = rng.normal(0.0, 0.05, 3)
    distance = rng.uniform(0.5, 1.5)
    path = camera_paths.front(6, width=48, height=32, distance=distance, centre=centre)
    assert len(path) == 6 and np.all(path.world_to_cam == path.world_to_cam[0])
    _assert_looks_at(path, centre)
    np.testing.assert_allclose(_centres(path)[0], centre + [0, 0, -distance], atol=1e-12)


def test_orbit_circles_the_head_at_constant_distance(rng):
    centre = rng.normal(0.0, 0.05, 3)
    distance, elevation, count = rng.uniform(0.5, 1.5), rng.uniform(-30, 30), int(rng.integers(5, 40))
    path = camera_paths.orbit(count, width=40, height=40, distance=distance, elevation_deg=elevation, centre=centre)
    assert len(path) == count
    _assert_looks_at(path, centre)
    eyes = _centres(path)
    np.testing.assert_allclose(np.linalg.norm(eyes - centre, axis=-1), distance, rtol=1e-12)
    np.testing.assert_allclose(eyes[:, 1] - centre[1], distance * np.sin(np.deg2rad(elevation)), atol=1e-12)
    gaps = np.linalg.norm(eyes[:, None] - eyes[None], axis=-1) + np.diag(np.full(count, np.inf))  # no self-gaps
    expected_gap = 2 * distance * np.cos(np.deg2rad(elevation)) * np.sin(np.pi / count)  # chord between neighbours
    np.testing.assert_allclose(gaps.min(), expected_gap, rtol=1e-9)  # N distinct, evenly spaced cameras
    assert eyes[0, 2] < centre[2]  # starts in front

    arc = camera_paths.orbit(5, width=40, height=40, distance=distance, arc_deg=90.0, elevation_deg=0.0)
    azimuths = np.degrees(np.arctan2(_centres(arc)[:, 0], -_centres(arc)[:, 2]))
    np.testing.assert_allclose(azimuths, [-45, -22.5, 0, 22.5, 45], atol=1e-9)


def test_capture_camera_by_serial(tmp_path, rng):
    rig = []
    for serial in ("220700", "220701"):
        eye = rng.normal(0.0, 0.1, 3) + [0, 0, -0.9]
        k = cameras.intrinsics_from_fov(rng.uniform(15, 30), 64, 48)
        rig.append(layout.Camera(serial, cameras.look_at(eye, rng.normal(0, 0.01, 3)), k, width=64, height=48))
    layout.write_calibration(tmp_path, rig)

    path = camera_paths.capture(tmp_path, "220701", 4)
    assert (len(path), path.width, path.height) == (4, 64, 48)
    np.testing.assert_allclose(path.world_to_cam, np.broadcast_to(rig[1].world_to_cam, (4, 4, 4)))
    np.testing.assert_allclose(path.intrinsics[2], rig[1].intrinsics)

    half = camera_paths.from_spec("camera:220701", 3, width=32, height=24, subject_dir=tmp_path)
    points = rng.normal(0.0, 0.05, (10, 3))
    full_pixels, _ = cameras.project(points, path.world_to_cam[0], path.intrinsics[0])
    half_pixels, _ = cameras.project(points, half.world_to_cam[0], half.intrinsics[0])
    np.testing.assert_allclose(half_pixels, full_pixels / 2, atol=1e-9)

    with pytest.raises(layout.LayoutError, match=r"camera_params\.json: no camera '9'; it has \['220700', '220701'\]"):
        camera_paths.capture(tmp_path, "9", 4)
    with pytest.raises(ValueError, match=r"camera_params\.json: camera 220700 is 64x48; 64x64 has another aspect"):
        camera_paths.capture(tmp_path, "220700", 4, size=(64, 64))


def test_camera_path_specs(rng):
    arc = rng.uniform(10, 300)
    spec_path = camera_paths.from_spec(f"orbit:{arc}", 7, width=16, height=16)
    direct = camera_paths.orbit(7, width=16, height=16, arc_deg=arc)
    np.testing.assert_array_equal(spec_path.world_to_cam, direct.world_to_cam)
    front = camera_paths.from_spec("front", 2, width=16, height=16)
    np.testing.assert_array_equal(front.world_to_cam, camera_paths.front(2, width=16, height=16).world_to_cam)
    with pytest.raises(ValueError, match="needs the subject directory"):
        camera_paths.from_spec("camera:220700", 2, width=16, height=16)
    with pytest.raises(ValueError, match=r"'spiral': expected 'front', 'orbit'"):
        camera_paths.from_spec("spiral", 2, width=16, height=16)
    with pytest.raises(ValueError, match="orbit arc must be a number"):
        camera_paths.from_spec("orbit:half", 2, width=16, height=16)


# ------------------------------------------------------------------------------------------ fps bench


@pytest.mark.slow  # building any UHAP compiles its initialisers: ~20-60 s on a shared 2-core CPU
def test_fps_bench_times_every_frame_and_refuses_an_overflowing_capacity(rng):
    small = ["template_resolution=24", "uv_resolution=16", "decoder_channels=(16, 8)", "expression_channels=(8,)"]
    config = load_config("configs/prior.py:tiny", [f"model.{item}" for item in small])
    template = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(template, config.model, rngs=nnx.Rngs(int(rng.integers(1 << 16))))
    albedo = rng.uniform(0.2, 0.8, template.vertices.shape).astype(np.float32)
    scan_maps = scan_uv_maps(model.layout, template, template.vertices, albedo, "the template")
    z = rng.normal(size=(3, model.z_dim)).astype(np.float32)
    path = camera_paths.orbit(3, width=32, height=24, arc_deg=40.0)

    row = fps_bench.benchmark_animation(model, scan_maps, z, path, batch_size=2)
    assert (row["frames"], row["batch"], row["image_size"]) == (3, 2, "32x24")
    assert row["gaussians"] == model.layout.num_gaussians
    # Two passes timed apart on a shared CPU: each is a finite positive rate, neither is ordered against the
    # other (CI once timed the decode alone slower than decode + render).
    rates = [row[key] for key in ("decode_fps", "decode_render_fps", "decode_compile_s", "decode_render_compile_s")]
    assert all(np.isfinite(value) and value > 0 for value in rates), row
    with pytest.raises(RuntimeError, match=r"fps bench: frames 0\.\.1 overflowed capacity"):
        fps_bench.benchmark_animation(model, scan_maps, z, path, batch_size=2, capacity_headroom=1e-3)
    with pytest.raises(ValueError, match="3 z frames but the camera path has 2 cameras"):
        fps_bench.benchmark_animation(model, scan_maps, z, camera_paths.front(2, width=32, height=24))
