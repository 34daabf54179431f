"""Avatar folders and `uhap animate`: an avatar made from a prior and a speech-model checkpoint (written by the
Trainer on 8 devices) animates a 44.1 kHz stereo WAV into an MP4 with one video and one audio stream, the
right number of frames and one PLY per frame; a broken avatar names the missing file."""

import math
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import jax
import numpy as np
import pytest
from flax import nnx
from helpers.layouts import PRIOR_OVERRIDES, SMALL_SPEECH_MODEL, speech_like, write_stereo_wav
from helpers.models import random_cameras, randomise, save_step_zero
from helpers.seeds import fresh_seed

from data_pipelines import layout
from uhap_jax import cli
from uhap_jax.artifacts import avatars
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.inference import avatar as avatar_lib
from uhap_jax.inference import camera_paths, speech_windows
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
    seed = fresh_seed("avatar_dir")
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


# -------------------- long audio: the speech model in windows


def _relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of a - b over the codes' own spread in time (per-dimension std, averaged)."""
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.mean(np.std(b, axis=0)))


def test_windowed_codes_match_whole_clip_codes(avatar_dir, rng):
    """A 12 s clip in 4 s windows (1 s context, 0.5 s fade) against one pass over the whole clip.

    The codes must follow the audio, not the cuts: windowing may move them by at most half of what other speech
    moves them (both as RMS over the codes' own spread in time). This untrained model attends over the whole clip
    (audio 2+ s outside a window moves its codes by 6-12% of their spread, a trained model far less: it learnt
    from 1.3-6 s windows), so windowing costs it 15-35%; other speech moves the codes by ~140%. A clip that fits
    one window runs whole: the same codes to float precision."""
    avatar = avatars.load_avatar(avatar_dir)
    rate, seconds = 16_000, 12.0
    audio = speech_like(rng, seconds, rate)
    whole = speech_windows.predict_codes(avatar.speech, audio, FPS, window_s=1000.0)
    windowed = speech_windows.predict_codes(avatar.speech, audio, FPS, window_s=4.0, context_s=1.0, fade_s=0.5)
    assert windowed.shape == whole.shape == (300, avatar.prior.z_dim)
    other = speech_windows.predict_codes(avatar.speech, speech_like(rng, seconds, rate), FPS, window_s=1000.0)
    error, change = _relative_rms(windowed, whole), _relative_rms(other, whole)
    print(f"windowed vs whole: relative rms {error:.4f}; other speech vs this: {change:.4f}")
    assert error <= 0.5 * change
    shortest = speech_windows.predict_codes(avatar.speech, audio[: rate // 10], FPS)  # the 0.1 s animate accepts
    assert shortest.shape == (speech_windows.frame_count(rate // 10, FPS), avatar.prior.z_dim)
    assert np.all(np.isfinite(shortest))
    short = audio[: rate * 3]
    np.testing.assert_allclose(speech_windows.predict_codes(avatar.speech, short, FPS, window_s=4.0),
                               speech_windows.predict_codes(avatar.speech, short, FPS, window_s=1000.0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_window_weights_cover_every_frame_once(rng):
    num_frames = int(rng.integers(200, 2000))
    window, context = int(rng.integers(60, 120)), int(rng.integers(5, 20))
    # hop (window - 2 context - fade) >= fade, as every setting predict_codes uses: a frame is in at most two
    # windows. Below that, fades overlap and sum past 1 (predict_codes divides by the sum; this test would not).
    fade = int(rng.integers(1, min(15, (window - 2 * context) // 2 + 1)))
    total = np.zeros(num_frames)
    for start in speech_windows.window_starts(num_frames, window, context, fade):
        assert 0 <= start <= num_frames - window
        total[start : start + window] += speech_windows.window_weights(start, window, num_frames, context, fade)
    assert np.all(total > 0.99)  # every frame weighed, by one window or two cross-fading to one
    starts = speech_windows.window_starts(num_frames, window, context, fade)
    np.testing.assert_allclose(total[: starts[-1]], 1.0, atol=1e-9)  # before the flush last window: exactly 1


def test_ten_minute_clip_runs_in_windows_of_flat_memory(avatar_dir, rng):
    """600 s of audio -> 15000 codes, through windows of one shape: the compiled step needs the same small memory
    whatever the clip's length, where one pass over the whole clip needs many times more."""
    avatar = avatars.load_avatar(avatar_dir)
    seconds = 600.0
    codes = speech_windows.predict_codes(avatar.speech, speech_like(rng, seconds, 16_000), FPS)
    assert codes.shape == (round(seconds * FPS), avatar.prior.z_dim) and np.all(np.isfinite(codes))
    assert np.std(codes[:100], axis=0).max() > 0 and np.std(codes[-100:], axis=0).max() > 0

    graphdef, state = nnx.split(avatar.speech)

    def temp_bytes(clip_s: float) -> int:
        frames, samples = round(clip_s * FPS), math.ceil(clip_s * 16_000)
        step = jax.jit(lambda state, audio: nnx.merge(graphdef, state)(audio, frames))
        compiled = step.lower(state, jax.ShapeDtypeStruct((1, samples), np.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    window, whole = temp_bytes(speech_windows.WINDOW_S), temp_bytes(seconds)
    print(f"compiled temporaries: one {speech_windows.WINDOW_S:g} s window {window / 2**20:.1f} MiB, the whole "
          f"{seconds:g} s clip {whole / 2**30:.2f} GiB")  # fmt: skip
    assert window < 2**28 and whole > 30 * window


def test_animate_runs_a_clip_longer_than_one_window(avatar_dir, tmp_path, rng):
    """An MP3 (decoded by ffmpeg) longer than one speech window: every frame is rendered, audio and video agree."""
    seconds, rate = speech_windows.WINDOW_S + 1.5, 22_050
    wav, mp3 = tmp_path / "long.wav", tmp_path / "long.mp3"
    samples = speech_like(rng, seconds, rate)
    write_stereo_wav(wav, samples, samples[::-1], rate)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(wav), "-c:a", "libmp3lame", str(mp3)],
                   check=True)  # fmt: skip
    out = tmp_path / "long.mp4"
    assert cli.main(["animate", "--avatar", str(avatar_dir), "--audio", str(mp3), "--out", str(out), "--size", "16",
                     "--batch-size", "32"]) == 0  # fmt: skip
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert abs(frames - seconds * FPS) <= 2  # mp3 encoder padding may add a frame's worth of samples


@pytest.mark.parametrize(("audio", "message"), [(b"", "empty (0 bytes)"), (b"RIFF", "not a readable audio file")])
def test_animate_refuses_unusable_audio_in_one_line(avatar_dir, tmp_path, capsys, audio, message):
    path = tmp_path / "speech.wav"
    path.write_bytes(audio)
    out = tmp_path / "talk.mp4"
    status = cli.main(["animate", "--avatar", str(avatar_dir), "--audio", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith(f"error: {path}") and message in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"]
