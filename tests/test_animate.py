"""Avatar folders and `uhap animate`: an avatar made from a prior and a speech-model checkpoint (written by the
Trainer on 8 devices) animates a 44.1 kHz stereo WAV into an MP4 with one video and one audio stream, the
right number of frames and one PLY per frame; a broken avatar names the missing file."""

import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from flax import nnx
from helpers.layouts import PRIOR_OVERRIDES, SMALL_SPEECH_MODEL, speech_like, write_stereo_wav
from helpers.models import random_cameras, randomise, save_step_zero

from data_pipelines import layout
from uhap_jax import cli
from uhap_jax.artifacts import avatars
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.inference import avatar as avatar_lib
from uhap_jax.inference import camera_paths
from uhap_jax.inference.ply import read_ply
from uhap_jax.models.frozen_prior import build_speech_model
from uhap_jax.models.prior import UHAP

FPS, SIZE, SUBJECT = 25.0, 64, "id007"
SECONDS = 1.02  # not a whole number of frames: the video must still match the audio within one frame


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory) -> Path:
    """An avatar of a one-subject layout, from a random prior and a random speech model (untrained: training
    either compiles the rasterizer's or the speech model's step, minutes on these CPUs)."""
    base = tmp_path_factory.mktemp("animate")
    seed = int.from_bytes(np.random.default_rng().bytes(4), "little")
    print(f"[avatar_dir] seed={seed}")
    rng = np.random.default_rng(seed)
    head = template_lib.procedural_head(24)
    subject_dir = layout.subject_dir(base / "layout", SUBJECT)
    views, intrinsics = random_cameras(rng, 2, 48)
    layout.write_calibration(subject_dir, [layout.Camera(f"cam{i}", v.astype(np.float64), k.astype(np.float64), 48, 48)
                                           for i, (v, k) in enumerate(zip(views, intrinsics))])  # fmt: skip
    scan = head.vertices + rng.normal(0.0, 0.002, head.vertices.shape)
    layout.write_neutral_scan(subject_dir, scan, head.faces, rng.uniform(0.0, 1.0, head.vertices.shape))
    layout.write_sequence_meta(layout.sequence_dir(base / "layout", SUBJECT, "sen_00"), fps=FPS, num_frames=10)

    prior_cfg = load_config("configs/prior.py:tiny", PRIOR_OVERRIDES)
    prior = UHAP(head, prior_cfg.model, rngs=nnx.Rngs(seed))
    randomise(prior.decoder.out, rng, scale=0.1)
    save_step_zero(prior_cfg, prior, base / "prior")

    speech_overrides = [o.removeprefix("--config.") for o in SMALL_SPEECH_MODEL]
    speech_cfg = load_config("configs/audio.py:tiny", [*speech_overrides, f"prior_workdir={base / 'prior'}"])
    model = build_speech_model(speech_cfg, prior, FPS)
    randomise(model.speech.head, rng)
    save_step_zero(speech_cfg, model, base / "audio")

    out = base / "avatar"
    assert cli.main(["avatar", "make", "--prior-workdir", str(base / "prior"), "--audio-workdir",
                     str(base / "audio"), "--data", str(base / "layout"), "--subject", SUBJECT, "--out", str(out),
                     "--size", str(SIZE)]) == 0  # fmt: skip
    return out


def _probe(path: Path) -> list[str]:
    """The stream kinds that `ffmpeg -i` lists (imageio-ffmpeg ships no ffprobe)."""
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr  # fmt: skip
    return re.findall(r"Stream #0:\d+\S*: (Video|Audio): (\w+)", info)


def test_animate_writes_video_with_audio_and_one_ply_per_frame(avatar_dir, tmp_path, rng, capsys):
    wav = tmp_path / "speech.wav"
    write_stereo_wav(wav, speech_like(rng, SECONDS, 44_100), speech_like(rng, SECONDS, 44_100), 44_100)
    out, ply_dir = tmp_path / "talk.mp4", tmp_path / "ply"
    assert cli.main(["animate", "--avatar", str(avatar_dir), "--audio", str(wav), "--out", str(out), "--camera",
                     "orbit", "--ply", str(ply_dir), "--batch-size", "8"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{wav}: mixed 2 channels down to mono" in printed and f"{wav}: resampled 44100->16000 Hz" in printed

    expected_frames = round(SECONDS * FPS)
    assert _probe(out) == [("Video", "h264"), ("Audio", "aac")]
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == expected_frames
    assert f"{expected_frames} frames at 25 fps" in printed
    decoded = np.frombuffer(
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-f", "rawvideo",
                        "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout, np.uint8,
    ).reshape(expected_frames, SIZE, SIZE, 3)  # fmt: skip
    assert decoded.max() > 64  # the head is in view, not a black frame
    assert not np.array_equal(decoded[0], decoded[expected_frames // 2])  # the orbit moves the camera

    files = sorted(ply_dir.glob("*.ply"))
    assert len(files) == expected_frames
    avatar = avatars.load_avatar(avatar_dir)
    first, last = read_ply(files[0]), read_ply(files[-1])
    assert first.means.shape == (avatar.prior.layout.num_gaussians, 3)
    assert np.all(np.isfinite(first.means)) and np.all((first.opacities > 0) & (first.opacities < 1))
    assert not np.allclose(first.means, last.means)  # the codes move the face from frame to frame


def test_avatar_round_trips_its_parts(avatar_dir, rng):
    avatar = avatars.load_avatar(avatar_dir)
    assert avatar.subject == SUBJECT and avatar.fps == FPS and avatar.image_size == (SIZE, SIZE)
    audio = speech_like(rng, 0.4, 16_000)
    codes = avatar_lib.predict_codes(avatar.speech, audio, avatar.fps)
    assert codes.shape == (10, avatar.prior.z_dim) and np.all(np.isfinite(codes))
    assert np.std(codes, axis=0).max() > 0  # audio moves the codes


def test_renderer_grows_an_overflowing_capacity_and_renders_the_same_frames(avatar_dir, rng):
    avatar = avatars.load_avatar(avatar_dir)
    codes = rng.normal(0.0, 1.0, (3, avatar.prior.z_dim)).astype(np.float32)
    path = camera_paths.front(3, width=32, height=32)
    ample = avatar_lib.FrameRenderer(avatar, path, batch_size=4, capacity=1 << 13)
    expected = np.stack([image for image, _ in ample(codes)])
    assert ample.capacity == 1 << 13  # 4 tiles of under 1000 Gaussians: no overflow
    starved = avatar_lib.FrameRenderer(avatar, path, batch_size=4, capacity=16)
    grown = np.stack([image for image, _ in starved(codes)])
    assert starved.capacity > 16 and grown.dtype == np.uint8
    np.testing.assert_allclose(grown, expected, atol=1)
    assert expected.max() > 50  # the head is in the frame


@pytest.mark.parametrize("part", ["avatar.json", "identity/scan_maps.npy", "speech/config.json", "prior/bundle.json"])
def test_missing_avatar_file_is_named(avatar_dir, tmp_path, part):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(avatar_dir), str(broken)], check=True)
    (broken / part).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(broken / part))):
        avatars.load_avatar(broken)
