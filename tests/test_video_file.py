"""A plain video file as a phone hands it over: frames upright (rotation metadata honoured), its frame rate kept
or resampled, frames spread by max_frames, and the intrinsics from a calibration, the metadata's 35 mm-equivalent
focal length, or the stated field of view; unreadable files and bad flags are one line naming them."""

import subprocess

import imageio_ffmpeg
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import layout, video_file
from uhap_jax import cli
from uhap_jax.config_utils import UsageError, load_config
from uhap_jax.models import head_localiser
from uhap_jax.models.frozen_prior import build_localiser
from uhap_jax.models.head_localiser import HeadLocaliser, default_localiser_config
from uhap_jax.models.mono_encoder import FRONT, MonoEncoder, default_model_config
from uhap_jax.train import personalize_stage


def _clip(rng, count=12, width=48, height=32):
    """Frames with a bright block whose position encodes the frame index (read back through the codec)."""
    frames = rng.integers(20, 60, (count, height, width, 3)).astype(np.uint8)
    for i, frame in enumerate(frames):
        frame[:8, 4 * (i % 8) : 4 * (i % 8) + 8] = 250
    return frames


def test_frame_rate_kept_resampled_and_spread(rng, tmp_path):
    frames = _clip(rng, count=30)
    path = video_file.write_video_file(tmp_path / "clip.mp4", frames, 30.0)
    clip = video_file.read_video_file(path)
    assert clip.fps == clip.source_fps == 30.0 and clip.images.shape == (30, 32, 48, 3)
    assert np.abs(clip.images.astype(int) - frames).mean() < 12  # the codec is lossy, not wrong
    np.testing.assert_array_equal(clip.frame_index, np.arange(30))
    slower = video_file.read_video_file(path, fps=10.0)
    assert slower.fps == 10.0 and list(slower.frame_index) == list(range(0, 30, 3))
    np.testing.assert_allclose(slower.images.astype(float), clip.images[::3].astype(float), atol=1)
    spread = video_file.read_video_file(path, max_frames=4)
    assert list(spread.frame_index) == [0, 10, 19, 29]
    small = video_file.read_video_file(path, max_side=24)
    assert small.images.shape == (30, 16, 24, 3)
    np.testing.assert_allclose(small.intrinsics[:2], clip.intrinsics[:2] / 2)


def test_portrait_rotation_metadata_is_honoured(rng, tmp_path):
    frames = _clip(rng, count=3)
    landscape = video_file.write_video_file(tmp_path / "landscape.mp4", frames, 25.0)
    portrait = tmp_path / "portrait.mov"  # what a phone held upright writes: landscape pixels, a display rotation
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation:v:0", "90",
                    "-i", str(landscape), "-c", "copy", str(portrait)], check=True)  # fmt: skip
    clip = video_file.read_video_file(portrait)
    assert clip.rotation_deg == 90 and clip.images.shape == (3, 48, 32, 3)
    upright = video_file.read_video_file(landscape).images
    np.testing.assert_array_equal(clip.images, np.rot90(upright, 1, axes=(1, 2)))  # 90 degrees counter-clockwise
    assert clip.intrinsics[0, 2] == 16 and clip.intrinsics[1, 2] == 24


def test_focal_from_metadata_else_the_stated_field_of_view(rng, tmp_path):
    frames = _clip(rng, count=2, width=64, height=36)
    focal_mm = float(rng.uniform(20, 80))
    tagged = video_file.write_video_file(tmp_path / "tagged.mov", frames, 24.0, focal_mm_35=focal_mm)
    clip = video_file.read_video_file(tagged, fov_deg=40.0)
    expected = focal_mm / 43.27 * np.hypot(64, 36)
    np.testing.assert_allclose(clip.intrinsics[[0, 1], [0, 1]], expected, rtol=1e-4)
    assert clip.intrinsics_source.startswith("metadata")
    assert video_file.focal_35mm_of(clip.intrinsics, 64, 36) == pytest.approx(focal_mm, rel=1e-4)
    plain = video_file.write_video_file(tmp_path / "plain.mp4", frames, 24.0)
    fov = float(rng.uniform(30, 100))
    clip = video_file.read_video_file(plain, fov_deg=fov)
    assert clip.intrinsics_source.startswith("default field of view")
    np.testing.assert_allclose(2 * np.degrees(np.arctan(32 / clip.intrinsics[0, 0])), fov)
    matrix = np.array([[float(rng.uniform(40, 90)), 0, 31], [0, 55.0, 17], [0, 0, 1]])
    np.savetxt(tmp_path / "k.txt", matrix)
    calibrated = video_file.read_video_file(tagged, calibration=tmp_path / "k.txt")  # overrides the metadata
    np.testing.assert_allclose(calibrated.intrinsics, matrix)
    assert calibrated.intrinsics_source == f"calibration: {tmp_path / 'k.txt'}"


def test_unreadable_files_name_the_file(rng, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(rng.bytes(2000))
    with pytest.raises(layout.LayoutError, match=rf"{broken}: not a readable video"):
        video_file.read_video_file(broken)
    with pytest.raises(layout.LayoutError, match=rf"{tmp_path / 'gone.mp4'}: video file not found"):
        video_file.read_video_file(tmp_path / "gone.mp4")
    path = video_file.write_video_file(tmp_path / "clip.mp4", _clip(rng, count=2), 25.0)
    np.save(tmp_path / "k.npy", np.eye(2))
    with pytest.raises(layout.LayoutError, match=r"k.npy: intrinsics of shape \[2, 2\]; give a 3x3 matrix"):
        video_file.read_video_file(path, calibration=tmp_path / "k.npy")


@pytest.mark.parametrize("extra, line", [
    (["--fov-deg", "200"], "--fov-deg 200: give the field of view in degrees, between 1 and 170"),
    (["--calibration", "missing.json"], "--calibration missing.json: no such file"),
])  # fmt: skip
def test_personalize_flags_are_checked_in_one_line(rng, tmp_path, capsys, extra, line):
    path = video_file.write_video_file(tmp_path / "clip.mp4", _clip(rng, count=2), 25.0)
    for name in ("prior", "encoder", "audio"):
        (tmp_path / name / "checkpoints" / "0").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    args = ["personalize", "--prior", str(tmp_path / "prior"), "--encoder", str(tmp_path / "encoder"),
            "--audio-model", str(tmp_path / "audio"), "--video", str(path), "--out", str(tmp_path / "out")]  # fmt: skip
    status = cli.main([*args, *extra])
    err = capsys.readouterr().err
    assert status == 2 and line in err and len(err.strip().splitlines()) == 1, err


def test_a_video_file_needs_the_encoders_localiser_and_a_face(rng, tmp_path):
    """An encoder trained without the localiser (a config from before it, or with it off) and a clip where no frame
    scores a head are one line each, naming the file and what to do."""
    path = video_file.write_video_file(tmp_path / "clip.mp4", _clip(rng, count=6), 25.0)
    config = load_config("configs/personalize.py:tiny")
    encoder = MonoEncoder(8, default_model_config(), rngs=nnx.Rngs(0))
    old = load_config("configs/encoder.py:tiny")
    del old["localiser"]
    assert build_localiser(old) is None
    with pytest.raises(UsageError, match=rf"--video {path}: a video file needs the encoder's head localiser"):
        personalize_stage.read_video(path, build_localiser(old), encoder, config)
    localiser = HeadLocaliser(default_localiser_config(), rngs=nnx.Rngs(int(rng.integers(1000))))
    localiser.presence.bias[...] = -10.0  # scores no head anywhere
    with pytest.raises(UsageError, match=rf"--video {path}: no face found in any of its 6 frames"):
        personalize_stage.read_video(path, localiser, encoder, config)


def test_virtual_cameras_put_the_head_where_it_was_found(rng):
    """The per-frame cameras project the head centre to the tracked pixel with the tracked crop side (and
    `head_track` reads that track back), face the template as the encoder's frontal view, and a frame scored
    without a head takes its neighbour's place."""
    k = video_file.intrinsics_for(int(rng.integers(100, 400)), int(rng.integers(100, 400)),
                                  fov_deg=float(rng.uniform(40, 90)))[0]  # fmt: skip
    found = np.stack([rng.uniform(20, 90, 9), rng.uniform(20, 90, 9), rng.uniform(30, 80, 9)], -1)
    presence = np.ones(9)
    presence[4] = 0.1
    track = head_localiser.smooth_track(found, presence, 1, 0.5)
    np.testing.assert_allclose(np.delete(track, 4, 0), np.delete(found, 4, 0))
    assert np.allclose(track[4], found[3]) or np.allclose(track[4], found[5])
    centre = tuple(rng.normal(0, 0.02, 3))
    cameras = head_localiser.head_cameras(k, track, 0.36, centre)
    ks = jnp.asarray(np.broadcast_to(k, (9, 3, 3)), jnp.float32)
    centres = jnp.broadcast_to(jnp.asarray(centre, jnp.float32), (9, 3))
    seen = head_localiser.head_in_view(jnp.asarray(cameras, jnp.float32), ks, centres, 0.36)
    np.testing.assert_allclose(np.asarray(seen), track, rtol=1e-4)
    np.testing.assert_allclose(cameras[:, :3, :3], np.broadcast_to(FRONT, (9, 3, 3)), atol=1e-6)
    in_camera = np.einsum("bij,j->bi", cameras[:, :3, :3], np.asarray(centre)) + cameras[:, :3, 3]
    np.testing.assert_allclose(head_localiser.head_track(k, in_camera, 0.36), track, rtol=1e-9)  # its inverse
    smoothed = head_localiser.smooth_track(found, np.ones(9), 3, 0.5)
    np.testing.assert_allclose(smoothed[1, :2], np.median(found[:3, :2], 0))
    with pytest.raises(ValueError, match="no frame scored a head"):
        head_localiser.smooth_track(found, np.zeros(9), 3, 0.5)
