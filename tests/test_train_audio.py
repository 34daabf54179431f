"""`uhap train audio` against a prior checkpoint: targets are the prior's posterior means, metrics.jsonl gets the
eval rows, a second run resumes, and 44.1 kHz stereo input is resampled and mixed down with a note."""

import json
import wave
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from test_prior import random_cameras, randomise

from data_pipelines import layout
from uhap_jax import cli
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import TexelLayout
from uhap_jax.models.prior import UHAP
from uhap_jax.train import audio_stage, prior_stage
from uhap_jax.train.loop import Trainer
from uhap_jax.train.mesh import make_mesh

SIZE, FRAMES, NUM_CAMERAS, FPS = 32, 12, 4, 25.0
HELD_OUT_CAMERA = "cam2"
# (subject, sequence, split, sentence); the stereo 44.1 kHz file is the held-out sentence's.
SEQUENCES = (
    ("id000", "sen_00", "train", 0),
    ("id000", "sen_01", "held_out_sentence", 1),
    ("id001", "sen_02", "held_out_identity", 2),
)
STEREO = ("id000", "sen_01")
PRIOR_OVERRIDES = [
    "data.num_views=2",
    "model.template_resolution=24",
    "model.uv_resolution=32",  # the 24-row template's lips need 32²: 16² has no lip texel
    "model.z_dim=8",
    "model.decoder_channels=(8, 8, 8)",
    "model.expression_channels=(4, 8)",
    "model.expression_hidden=16",
    "model.color_features=4",
    "model.color_hidden=8",
]
SMALL_SPEECH_MODEL = [
    "--config.model.width=16", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=32", "--config.encoder.hidden_size=16", "--config.encoder.num_hidden_layers=1",
    "--config.encoder.num_attention_heads=2", "--config.encoder.intermediate_size=32",
    "--config.encoder.conv_dim=(8, 8, 8, 8, 8, 8, 8)",
]  # fmt: skip


def speech_like(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Noise under a syllable-rate envelope, so that audio energy varies from frame to frame."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t + rng.uniform(0, 2 * np.pi))
    return (0.3 * envelope * rng.normal(size=t.size)).clip(-1, 1).astype(np.float32)


def write_stereo_wav(path: Path, left: np.ndarray, right: np.ndarray, rate: int) -> None:
    pcm = np.round(np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())


def write_layout(root: Path, rng: np.random.Generator) -> None:
    """Two subjects with random 32x32 frames from 4 cameras (one held out), audio, head pose and a split."""
    head = template_lib.procedural_head(24)
    views, intrinsics = random_cameras(rng, NUM_CAMERAS, SIZE)
    serials = [f"cam{i}" for i in range(NUM_CAMERAS)]
    rig = [layout.Camera(s, v.astype(np.float64), k.astype(np.float64), SIZE, SIZE)
           for s, v, k in zip(serials, views, intrinsics)]  # fmt: skip
    info = {}
    for subject in ("id000", "id001"):
        subject_dir = layout.subject_dir(root, subject)
        layout.write_calibration(subject_dir, rig)
        scan = head.vertices + rng.normal(0.0, 0.002, head.vertices.shape)
        layout.write_neutral_scan(subject_dir, scan, head.faces, rng.uniform(0.0, 1.0, head.vertices.shape))
    for subject, sequence, split, sentence in SEQUENCES:
        seq_dir = layout.sequence_dir(root, subject, sequence)
        for frame in range(FRAMES):
            for serial in serials:
                layout.write_image(layout.frame_path(seq_dir, serial, frame),
                                   rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))  # fmt: skip
                mask = np.where(rng.uniform(size=(SIZE, SIZE)) > 0.3, 255, 0).astype(np.uint8)
                layout.write_image(layout.frame_path(seq_dir, serial, frame, kind="masks"), mask)
        seconds = FRAMES / FPS
        if (subject, sequence) == STEREO:
            left, right = speech_like(rng, seconds, 44_100), speech_like(rng, seconds, 44_100)
            write_stereo_wav(seq_dir / layout.AUDIO_FILE, left, right, 44_100)
        else:
            layout.write_audio(seq_dir / layout.AUDIO_FILE, speech_like(rng, seconds, layout.AUDIO_RATE))
        head_pose = {"rotation_vector": rng.normal(0.0, 0.03, (FRAMES, 3)).tolist(),
                     "translation": rng.normal(0.0, 0.002, (FRAMES, 3)).tolist()}  # fmt: skip
        layout.write_sequence_meta(seq_dir, fps=FPS, num_frames=FRAMES, head_pose=head_pose)
        info.setdefault(subject, {})[sequence] = {"split": split, "sentence_index": sentence}
    layout.write_dataset_info(
        root,
        {"identities": {"train": ["id000"], "held_out": ["id001"]}, "cameras": serials,
         "held_out_cameras": [HELD_OUT_CAMERA], "sequences": info},
    )  # fmt: skip


@pytest.fixture(scope="module")
def prior_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(layout root, cache dir, prior workdir) with a prior checkpoint written by the Trainer.

    The prior is a real UHAP whose zero-initialised output layer is made random, so that its codes move the
    lips; training it would compile the rasterizer's step, minutes on these CPUs (tests/test_train_prior.py).
    """
    base = tmp_path_factory.mktemp("audio_stage")
    root, cache, workdir = base / "layout", base / "cache", base / "prior"
    seed = int.from_bytes(np.random.default_rng().bytes(4), "little")
    print(f"[prior_checkpoint] seed={seed}")
    rng = np.random.default_rng(seed)
    write_layout(root, rng)
    config = load_config("configs/prior.py:tiny", PRIOR_OVERRIDES)
    prior = UHAP(template_lib.procedural_head(24), config.model, rngs=nnx.Rngs(seed))
    randomise(prior.decoder.out, rng)
    trainer = Trainer(
        config.train, prior, prior_stage.make_optimizer(config), prior_stage.make_loss_fn(config, capacity=1),
        iter(grain.MapDataset.range(1).to_iter_dataset()), workdir,
    )  # fmt: skip
    trainer.save()
    trainer.close()
    return root, cache, workdir


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
    prior, step = audio_stage.restore_prior(prior_cfg, prior_workdir, make_mesh())
    assert step == 0
    held_in = [f"cam{i}" for i in range(NUM_CAMERAS) if f"cam{i}" != HELD_OUT_CAMERA]
    with np.load(workdir / audio_stage.CODES_FILE) as stored:
        for subject, sequence, _, _ in SEQUENCES:
            codes = stored[f"{subject}/{sequence}"]
            assert codes.shape == (FRAMES, 8)
            frame = FRAMES - 1
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
    lip_ids = audio_stage.lip_gaussian_ids(texels, head)
    upper, lower = audio_stage.split_lips(texels, head, lip_ids)
    assert len(upper) and len(lower) and len(upper) + len(lower) == len(lip_ids)
    points = np.asarray(template_lib.surface_points(head.vertices, head.faces, texels.face_ids, texels.barys))
    assert points[lip_ids[upper], 1].min() > points[lip_ids[lower], 1].max()
    with pytest.raises(ValueError, match="16² UV layout lies on the template's lips"):
        audio_stage.lip_gaussian_ids(TexelLayout.build(head, 16), head)
