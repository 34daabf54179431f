"""`uhap bench animate` (uhap_jax.inference.fps_bench): speech model -> codes -> decode -> render -> host, on the CPU.

Tiny presets shrunk further, a few frames at 64x64: the numbers mean nothing here, only that they are rates of
work that was done, that the end-to-end rate includes the speech model, and that an overflow is an error.
"""

import math

import numpy as np
import pytest

from uhap_jax.commands import bench as bench_command
from uhap_jax.config_utils import UsageError, load_config
from uhap_jax.inference import camera_paths, fps_bench
from uhap_jax.models.audio_encoder import SAMPLE_RATE

SMALL_PRIOR = ["template_resolution=24", "uv_resolution=16", "decoder_channels=(16, 8)", "expression_channels=(8,)"]
FRAMES, FPS, SIZE = 3, 25.0, 64


@pytest.fixture(scope="module")
def models():
    prior, scan_maps = fps_bench.build_prior(
        load_config("configs/prior.py:tiny", [f"model.{item}" for item in SMALL_PRIOR]), seed=1
    )
    speech, note = fps_bench.build_speech(load_config("configs/audio.py:tiny"), prior.z_dim, FPS, seed=1)
    return prior, scan_maps, speech, note


def _clip(rng, frames=FRAMES):
    return (0.1 * rng.standard_normal(round(frames / FPS * SAMPLE_RATE))).astype(np.float32)


@pytest.mark.slow  # building any UHAP compiles its initialisers: ~20-60 s on a shared 2-core CPU
def test_end_to_end_rates_are_finite_positive_and_include_the_speech_model(models, rng):
    prior, scan_maps, speech, note = models
    assert "wav2vec2 2 x 64" in note and "scratch" in note
    path = camera_paths.orbit(FRAMES, width=SIZE, height=SIZE, arc_deg=30.0)
    row = fps_bench.benchmark_end_to_end(speech, prior, scan_maps, _clip(rng), path, batch_size=2, repeats=2)

    assert (row["frames"], row["batch"], row["image_size"], row["host"]) == (FRAMES, 2, "64x64", "uint8")
    assert row["clip_s"] == pytest.approx(FRAMES / FPS)
    rates = [row[key] for key in ("decode_fps", "decode_render_fps", "end_to_end_fps")]
    times = [row[key] for key in ("audio_ms", "audio_compile_s", "decode_compile_s", "decode_render_compile_s")]
    assert all(math.isfinite(value) and value > 0 for value in rates + times), row
    # The speech model's time is inside the end-to-end figure: frames / (audio + decode-and-render), both from
    # each repeat, so its median pass is longer than both medians apart.
    assert row["end_to_end_fps"] < row["decode_render_fps"]
    assert FRAMES / row["end_to_end_fps"] > row["audio_ms"] / 1e3 * (1 - 1e-9)
    table = fps_bench.markdown_table([row, row])
    assert table.count("\n") == 3 and "end_to_end_fps" in table


@pytest.mark.slow
def test_an_overflow_is_an_error_not_a_rate(models, rng):
    prior, scan_maps, speech, _ = models
    path = camera_paths.front(FRAMES, width=SIZE, height=SIZE)
    with pytest.raises(RuntimeError, match=r"fps bench: frames 0\.\.1 overflowed capacity \d+"):
        fps_bench.benchmark_end_to_end(
            speech, prior, scan_maps, _clip(rng), path, batch_size=2, repeats=1,
            capacity="widest", capacity_headroom=1e-4,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"3 frames at 25 fps need 0\.120 s of audio"):
        fps_bench.benchmark_end_to_end(speech, prior, scan_maps, _clip(rng, frames=1), path)


def test_bench_animate_refuses_an_override_of_no_stage():
    parser = bench_command.argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "animate", "--batch", "1,8"])
    args.config_overrides = ["--config.model.width=8"]
    with pytest.raises(UsageError, match=r"takes --config\.prior\.<field>=V or --config\.audio\.<field>=V"):
        bench_command.run_animate(args)
    args.config_overrides, args.batch = [], "1,eight"
    with pytest.raises(UsageError, match="not a comma list of integers"):
        bench_command.run_animate(args)
