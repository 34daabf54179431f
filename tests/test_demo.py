"""`uhap demo` end to end at toy size (4 identities, two of them held out, 4 cameras at 32², a few steps per stage):
every stage runs through the real code, the outputs the README promises are there and sound (the benchmark's
numbers among them), and a second run skips every stage."""

import json
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.layouts import PRIOR_OVERRIDES, SPEECH_OVERRIDES  # UV 32²: the 24-row template has lip texels

from uhap_jax import cli
from uhap_jax import demo as demo_lib
from uhap_jax.artifacts.avatars import load_avatar
from uhap_jax.config_utils import load_config

SYNTH = ("num_identities=4", "num_held_out_identities=2", "sentences_per_identity=2", "max_seconds=0.8",
         "num_cameras=4", "held_out_cameras=(1,)", "image_size=32", "template_resolution=24",
         "gaussian_uv_resolution=32")  # fmt: skip
# Batches are multiples of the 8 test devices.
STAGE_STEPS = ("train.steps=2", "train.log_every=1", "train.checkpoint_every=2", "eval.every=2")
ENCODER = (*STAGE_STEPS, "data.batch_size=8", "data.photo_frames=2", "model.crop_size=32", "model.channels=(8, 16)",
           "model.hidden=32", "eval.num_frames=4", "eval.batch_size=4")  # fmt: skip
PERSONALIZE = ("train.steps=2", "data.batch_size=8", "image_size=32", "albedo.frames=2", "eval.num_frames=2",
               "eval.batch_size=2")  # fmt: skip
PRIOR = (*PRIOR_OVERRIDES, *STAGE_STEPS, "data.batch_size=8", "eval.num_frames=2", "eval.batch_size=2")
OVERRIDES = [
    f"--config.synth_overrides={SYNTH}",
    f"--config.prior_overrides={PRIOR}",
    f"--config.audio_overrides={(*SPEECH_OVERRIDES, *STAGE_STEPS, 'data.window_frames=4', 'eval.max_lag=2')}",
    f"--config.encoder_overrides={ENCODER}",
    f"--config.personalize_overrides={PERSONALIZE}",
    "--config.video_size=32", "--config.report_frames=2",
]  # fmt: skip
METRICS = ("benchmark/prior_train_ids_heldout_frames/psnr", "benchmark/prior_heldout_ids_scan/psnr",
           "benchmark/prior_train_ids_heldout_frames/psnr_mean_code",
           "benchmark/lve_mm2", "benchmark/lve_mm2_zero_motion", "benchmark/lve_mm2_shuffled_audio",
           "benchmark/lve_mm2_oracle_codes", "benchmark/mouth_psnr", "benchmark/mouth_psnr_shuffled_audio",
           "benchmark/psnr", "benchmark/psnr_oracle_codes", "benchmark/sync_offset_frames", "benchmark/sync_confidence",
           "benchmark/sync_confidence_shuffled_audio", "benchmark/fdd_mm2", "oracle_inputs/prior_train_frames_psnr",
           "oracle_inputs/audio_lve_vs_prior_codes", "oracle_inputs/personalize/heldout_view_psnr",
           "encoder/phone_clip_rotation_error_deg", "encoder/phone_clip_rotation_error_deg_zero_motion",
           "encoder/phone_clip_translation_error_mm",
           "encoder/phone_clip_translation_error_mm_zero_motion", "oracle_inputs/true_scan_identity/lve_mm2",
           "oracle_inputs/true_scan_identity/lve_mm2_zero_motion",
           "oracle_inputs/true_scan_identity/lve_mm2_shuffled_audio")  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo") / "w"
    with pytest.MonkeyPatch.context() as patch:  # a relative --workdir, as a user types it
        patch.chdir(workdir.parent)
        assert cli.main(["demo", "--workdir", "w", *OVERRIDES]) == 0
    return workdir


def test_demo_writes_metrics_avatar_video_and_report(demo):
    metrics = json.loads((demo / "metrics.json").read_text())
    for name in METRICS:
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 3.0 < metrics["benchmark/psnr"] < 60.0 and metrics["benchmark/lve_mm2_zero_motion"] > 0.0
    assert metrics["demo/minutes"] > 0.0
    assert not any(name.startswith(("prior/heldout", "audio/", "personalize/")) for name in metrics)  # renamed
    assert "benchmark/lpips" not in metrics  # no weights: unknown, not 0
    assert any((demo / demo_lib.XLA_CACHE).iterdir())  # the stages' programs, compiled once
    assert jax.config.jax_compilation_cache_dir is None  # the process's setting is back

    avatars = sorted(a for a in demo.glob("avatar_*") if (a / "avatar.json").is_file())
    assert [a.name for a in avatars] == ["avatar_id002", "avatar_id003"]  # the held-out identities, phone-built
    avatar = load_avatar(avatars[0])
    assert avatar.subject == "id002"
    rows = json.loads((demo / "benchmark" / "benchmark.json").read_text())["rows"]
    assert {(r["subject"], r["condition"]) for r in rows} == {
        (s, c) for s in ("id002", "id003") for c in ("audio", "zero_motion", "shuffled_audio", "oracle_codes")
    }

    video = demo / "talking_head.mp4"
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(video)], capture_output=True, text=True)
    assert re.search(r"Stream #0:\d.*: Video: h264", probe.stderr) and re.search(r"Stream #0:\d.*: Audio", probe.stderr)

    page = (demo / "report.html").read_text()
    for name in (
        "Benchmark: audio-driven avatars",
        "LVE (GT meshes) vs zero motion",
        "audio-mouth sync offset",
        "PSNR vs oracle codes",
        "oracle_codes (upper bound)",
        "n/a (no weights: --lpips-weights)",
        "Diagnostic: the same codes on the true scan's identity",
        "prior PSNR, same frames, vs the clip&#x27;s mean code held still",
    ):
        assert name in page
    linked = re.findall(r"(?:src)='([^']+)'", page)
    assert "talking_head.mp4" in linked and len(linked) >= 4
    for path in linked:
        assert (demo / path).is_file() and (demo / path).stat().st_size > 0, path


def test_stage_configs_name_the_workdir_absolutely(demo):
    """A demo started with a relative --workdir resumes from any directory: its saved stage configs hold
    absolute paths (a relative data.root broke the report stage of a resume from elsewhere)."""
    for stage in ("prior", "audio", "encoder"):
        config = json.loads((demo / stage / "config.json").read_text())
        paths = [config["data"]["root"], config["data"]["cache_dir"]] if stage == "prior" else [config["prior_workdir"]]
        for path in paths:
            assert Path(path).is_absolute() and Path(path).resolve().is_relative_to(demo.resolve()), (stage, path)


def test_demo_run_again_skips_every_stage(demo, capsys):
    before = (demo / "metrics.json").read_text()
    assert cli.main(["demo", "--workdir", str(demo), *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"done earlier", out)) == 8
    assert (demo / "metrics.json").read_text() == before


def test_a_stage_run_again_writes_the_report_again(demo, capsys):
    """A stage whose record is deleted runs again, and the report (its summary: metrics.json, the bars, the page)
    follows it instead of showing the numbers of before; the other stages stay skipped."""
    (demo / "stages" / "animate.json").unlink()
    before = json.loads((demo / "stages" / "report.json").read_text())
    assert cli.main(["demo", "--workdir", str(demo), *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"done earlier", out)) == 6
    assert "animate finished in" in out and "report finished in" in out
    assert json.loads((demo / "stages" / "report.json").read_text())["seconds"] != before["seconds"]


def test_compilation_cache_stores_programs_then_restores_the_setting(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with demo_lib.compilation_cache(tmp_path / "cache", min_compile_seconds=0.0):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.5)(jnp.arange(7.0)).block_until_ready()
    assert any((tmp_path / "cache").iterdir())
    assert jax.config.jax_compilation_cache_dir == before
    with demo_lib.compilation_cache(None):  # off: nothing changes
        assert jax.config.jax_compilation_cache_dir == before


def test_gpu_preset_builds_every_stage_at_512_with_the_base_models(tmp_path):
    """configs/demo.py:gpu: each stage's config builds here (a wrong override key fails now, not on a GPU after
    minutes of training), at the base sizes, with the tracked-mesh terms on and no LPIPS weights needed."""
    demo = demo_lib.Demo(load_config("configs/demo.py:gpu", []), tmp_path)
    data, prior = demo.synth_config(), demo.prior_config()
    assert (data.image_size, data.num_identities, data.num_held_out_identities) == (512, 8, 2)
    assert data.template_resolution == prior.model.template_resolution == 96
    assert data.model_uv_resolution == prior.model.uv_resolution == 256
    assert prior.data.root == str(tmp_path.absolute() / "data") and prior.train.steps == 4000
    assert prior.loss.tracked_mesh > 0 and prior.loss.lpips == 0.0
    audio = demo._stage_config(demo.config.audio_config, demo.config.audio_overrides)
    assert audio.model.encoder_mode == "scratch" and audio.train.steps == 2000  # no wav2vec2 weights are shipped
    encoder = demo._stage_config(demo.config.encoder_config, demo.config.encoder_overrides)
    assert encoder.preset == "base" and encoder.train.steps == 2000
    personal = demo.personalize_config()
    assert personal.preset == "base" and not personal.use_scan and personal.train.steps == 600
    with pytest.raises(ValueError, match="configs/demo.py: preset must be tiny"):
        load_config("configs/demo.py:base", [])
