"""`uhap demo` end to end at toy size (3 identities, 4 cameras at 32², a few steps per stage): every stage runs
through the real code, the outputs the README promises are there and sound, and a second run skips every stage."""

import json
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from helpers.layouts import PRIOR_OVERRIDES, SPEECH_OVERRIDES  # UV 32²: the 24-row template has lip texels

from uhap_jax import cli
from uhap_jax.artifacts.avatars import load_avatar

SYNTH = ("num_identities=3", "num_held_out_identities=1", "sentences_per_identity=2", "max_seconds=0.8",
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
METRICS = ("prior/heldout_view_psnr", "audio/lve", "audio/lve_zero_motion", "audio/lve_shuffled_audio",
           "audio/sync_offset_frames", "personalize/heldout_view_psnr")  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo") / "w"
    assert cli.main(["demo", "--workdir", str(workdir), *OVERRIDES]) == 0
    return workdir


def test_demo_writes_metrics_avatar_video_and_report(demo):
    metrics = json.loads((demo / "metrics.json").read_text())
    for name in METRICS:
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 3.0 < metrics["prior/heldout_view_psnr"] < 60.0 and metrics["audio/lve_zero_motion"] > 0.0
    assert metrics["demo/minutes"] > 0.0

    avatars = list(demo.glob("avatar_*"))
    assert [a.name for a in avatars] == ["avatar_id002"]  # the held-out identity
    avatar = load_avatar(avatars[0])
    assert avatar.subject == "id002"

    video = demo / "talking_head.mp4"
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(video)], capture_output=True, text=True)
    assert re.search(r"Stream #0:\d.*: Video: h264", probe.stderr) and re.search(r"Stream #0:\d.*: Audio", probe.stderr)

    page = (demo / "report.html").read_text()
    for name in ("prior held-out-view PSNR", "speech LVE vs zero motion", "lip-sync offset", "personalised PSNR"):
        assert name in page
    linked = re.findall(r"(?:src)='([^']+)'", page)
    assert "talking_head.mp4" in linked and len(linked) >= 4
    for path in linked:
        assert (demo / path).is_file() and (demo / path).stat().st_size > 0, path


def test_demo_run_again_skips_every_stage(demo, capsys):
    before = (demo / "metrics.json").read_text()
    assert cli.main(["demo", "--workdir", str(demo), *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"done earlier", out)) == 7
    assert (demo / "metrics.json").read_text() == before
