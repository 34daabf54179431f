"""`uhap train audio` against a prior checkpoint: targets are the prior's posterior means, metrics.jsonl gets the
eval rows, a second run resumes, and 44.1 kHz stereo input is resampled and mixed down with a note."""

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from helpers.layouts import (
    HELD_OUT_CAMERA,
    NUM_CAMERAS,
    PRIOR_OVERRIDES,
    SEQUENCES,
    SMALL_SPEECH_MODEL,
    SPEECH_FRAMES,
    STEREO,
)

from data_pipelines import layout
from data_pipelines.dataset import Sequence
from uhap_jax import cli
from uhap_jax.artifacts.expression_codes import CODES_FILE
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.config_utils import load_config
from uhap_jax.eval import audio_eval
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import TexelLayout, lip_gaussian_ids, split_lips
from uhap_jax.train import audio_stage
from uhap_jax.train.mesh import make_mesh


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent XLA cache for this test only: the resumed run compiles the same functions again."""
    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in options}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_audio_eval_rows_targets_resume_and_resampling(prior_checkpoint, tmp_path, capsys, compilation_cache):
    root, cache, prior_workdir = prior_checkpoint
    capsys.readouterr()
    workdir = tmp_path / "audio"
    common = [
        "train", "audio", "--config", "configs/audio.py:tiny", "--workdir", str(workdir),
        f"--config.prior_workdir={prior_workdir}", f"--config.prior_overrides={tuple(PRIOR_OVERRIDES)}",
        f"--config.data.root={root}", f"--config.data.cache_dir={cache}", "--config.data.window_frames=4",
        "--config.data.batch_size=8", "--config.data.num_threads=0", "--config.eval.every=2",
        "--config.eval.batch_size=4", "--config.eval.max_lag=2", "--config.loss.lip_frames=2",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2", *SMALL_SPEECH_MODEL,
    ]  # fmt: skip
    assert cli.main([*common, "--config.train.steps=2"]) == 0
    out = capsys.readouterr().out
    stereo_wav = layout.sequence_dir(root, *STEREO) / layout.AUDIO_FILE
    assert f"{stereo_wav}: mixed 2 channels down to mono" in out
    assert f"{stereo_wav}: resampled 44100->16000 Hz" in out

    first = rows(workdir)
    train_rows = [r for r in first if "loss" in r]
    eval_rows = [r for r in first if "eval/lve" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert [r["step"] for r in eval_rows] == [0, 2]
    for row in train_rows:
        assert row["nonfinite_steps"] == 0 and row["lip"] > 0.0 and row["latent"] > 0.0
    for row in eval_rows:
        for name in ("lve", "lve_zero_motion", "lve_neutral", "lve_shuffled_audio", "lve_held_out_sentence",
                     "lve_held_out_identity"):  # fmt: skip
            assert np.isfinite(row[f"eval/{name}"]) and row[f"eval/{name}"] > 0.0, name
        assert abs(row["eval/sync_offset_frames"]) <= 2 and abs(row["eval/sync_offset_frames_target"]) <= 2
    # Different audio gives different codes, so the shuffled baseline differs from the model.
    assert eval_rows[-1]["eval/lve_shuffled_audio"] != eval_rows[-1]["eval/lve"]

    # The cached targets are the prior's posterior means over every held-in view, read here from the PNGs.
    prior_cfg = load_config("configs/prior.py:tiny", PRIOR_OVERRIDES)
    prior, _, _, step = load_prior(prior_workdir, make_mesh(), config=prior_cfg)
    assert step == 0
    held_in = [f"cam{i}" for i in range(NUM_CAMERAS) if f"cam{i}" != HELD_OUT_CAMERA]
    with np.load(workdir / CODES_FILE) as stored:
        for subject, sequence, _, _ in SEQUENCES:
            codes = stored[f"{subject}/{sequence}"]
            assert codes.shape == (SPEECH_FRAMES, 8)
            frame = SPEECH_FRAMES - 1
            seq_dir = layout.sequence_dir(root, subject, sequence)
            images = np.stack([layout.read_image(layout.frame_path(seq_dir, s, frame)) for s in held_in])
            expected, _ = prior.encode_expression(images[None].astype(np.float32) / 255.0)
            np.testing.assert_allclose(codes[frame], np.asarray(expected)[0], rtol=1e-4, atol=1e-5)

    assert cli.main([*common, "--config.train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "expression codes: cached" in out
    second = rows(workdir)
    assert second[: len(first)] == first
    assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in second if "eval/lve" in r] == [0, 2, 4]


def test_missing_prior_checkpoints_name_the_folder(tmp_path):
    config = load_config("configs/audio.py:tiny", [f"prior_workdir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'checkpoints'}: no prior checkpoints"):
        audio_stage.train_audio(config, tmp_path / "audio")


def test_lips_split_into_upper_and_lower_halves():
    head = template_lib.procedural_head(24)
    texels = TexelLayout.build(head, 32)
    lip_ids = lip_gaussian_ids(texels, head)
    upper, lower = split_lips(texels, head, lip_ids)
    assert len(upper) and len(lower) and len(upper) + len(lower) == len(lip_ids)
    points = np.asarray(template_lib.surface_points(head.vertices, head.faces, texels.face_ids, texels.barys))
    assert points[lip_ids[upper], 1].min() > points[lip_ids[lower], 1].max()
    with pytest.raises(ValueError, match="16² UV layout lies on the template's lips"):
        lip_gaussian_ids(TexelLayout.build(head, 16), head)


def test_speed_perturbation_keeps_audio_and_codes_on_one_clock(rng):
    """A window played `rate` times as fast: a tone of f Hz comes out at rate x f, codes that ramp with the frame
    index come out sampled every `rate` frames from the same start, so sound and motion stay in sync; rate 1 is
    the plain window."""
    fps, frames, start = 25.0, 16, int(rng.integers(3, 10))
    num_samples = round(frames * 16_000 / fps)
    tone = float(rng.uniform(150.0, 300.0))
    seconds = np.arange(int(3 * 16_000)) / 16_000
    waveform = np.sin(2 * np.pi * tone * seconds).astype(np.float32)
    slope, offset = rng.normal(size=(2, 5))
    codes = (offset + slope * np.arange(60)[:, None]).astype(np.float32)
    plain = audio_stage.speed_window(waveform, codes, start, frames, num_samples, fps, 1.0)
    np.testing.assert_array_equal(plain["codes"], codes[start : start + frames])
    np.testing.assert_array_equal(plain["audio"], waveform[round(start * 16_000 / fps) :][:num_samples])
    rate = float(rng.uniform(0.9, 1.1))
    fast = audio_stage.speed_window(waveform, codes, start, frames, num_samples, fps, rate)
    assert fast["audio"].shape == (num_samples,) and fast["codes"].shape == (frames, 5)
    np.testing.assert_allclose(fast["codes"], offset + slope * (start + rate * np.arange(frames))[:, None],
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    t0 = start / fps  # the window's first sample, in the source's seconds
    expected = np.sin(2 * np.pi * tone * (t0 + rate * np.arange(num_samples) / 16_000))
    np.testing.assert_allclose(fast["audio"], expected, atol=5e-3)  # linear interpolation of a <=330 Hz tone


def test_eval_runs_a_sequence_shorter_than_the_window_whole(rng):
    """A held-out sentence shorter than the training window (a fast voice) is predicted at its own length, every
    frame from its own audio; longer ones keep their windows. A sequence too short for the sync lags is refused."""
    fps, window, z_dim = 25.0, 16, 3
    samples_per_frame = layout.AUDIO_RATE / fps

    def sequence(name: str, sentence: int, frames: int) -> Sequence:
        waveform = rng.uniform(0.1, 1.0, round(frames * samples_per_frame)).astype(np.float32)
        return Sequence("id000", name, 0, "held_out_sentence", sentence, 0, frames, waveform,
                        np.full((frames, z_dim), np.nan, np.float32))  # fmt: skip

    sequences = [sequence("short", 0, 11), sequence("long", 1, 41)]
    config = ml_collections.ConfigDict({"data": {"window_frames": window}, "eval": {"batch_size": 2, "max_lag": 4}})
    evaluator = audio_eval.Evaluator(sequences, {}, np.zeros((1, 4, 4, 6), np.float32), config, fps,
                                     np.arange(4), (np.arange(2), np.arange(2, 4)))  # fmt: skip
    calls = []

    def frame_starts(graphdef, state, audio, num_frames):  # a "model" that reports each frame's first sample
        calls.append((audio.shape, num_frames))
        assert audio.shape[1] == round(num_frames * samples_per_frame)
        first = np.round(np.arange(num_frames) * samples_per_frame).astype(int)
        return np.repeat(audio[:, first, None], z_dim, axis=-1)

    evaluator._predict = frame_starts
    codes = evaluator.predict(None, None, [s.waveform for s in sequences])
    for s, predicted in zip(sequences, codes):
        first = np.round(np.arange(s.num_frames) * samples_per_frame).astype(int)
        np.testing.assert_array_equal(predicted, np.repeat(s.waveform[first, None], z_dim, axis=-1))
    assert ((2, round(window * samples_per_frame)), window) in calls
    assert ((1, round(11 * samples_per_frame)), 11) in calls

    sequences.append(sequence("too_short", 2, 8))
    with pytest.raises(ValueError, match=r"id000/too_short.*eval.max_lag=4"):
        audio_eval.Evaluator(sequences, {}, np.zeros((1, 4, 4, 6), np.float32), config, fps, np.arange(4),
                             (np.arange(2), np.arange(2, 4)))  # fmt: skip
