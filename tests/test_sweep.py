"""`uhap sweep` over a tiny prior's workdir and its bundle: the CSV, plots and HTML, identical metrics for the
two, the jobs split over two JAX processes and merged by process 0, and a clear error for a missing checkpoint.
Over an audio-stage workdir: the lve and sync_offset that the audio stage's own eval gives its checkpoint. With
the benchmark setting: two speech models scored by `uhap benchmark`'s protocol and ranked in each metric's
direction."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers.layouts import FPS, PRIOR_OVERRIDES, SMALL_SPEECH_MODEL, SPEECH_OVERRIDES, TINY_MODEL, write_prior_layout
from helpers.models import randomise, save_step_zero
from helpers.processes import cpu_env, free_port
from helpers.seeds import fresh_seed

from data_pipelines import synth
from uhap_jax import cli
from uhap_jax.artifacts.priors import export_bundle, load_prior
from uhap_jax.config_utils import load_config
from uhap_jax.eval import audio_eval, benchmark, prior_eval, sweep
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.frozen_prior import EncoderWithPrior, build_encoder, build_localiser, build_speech_model
from uhap_jax.models.prior import UHAP
from uhap_jax.train import audio_stage, benchmark_avatars
from uhap_jax.train.mesh import make_mesh

SCALES = (1.0, 0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny prior trained for 2 steps through the CLI on a written layout, and its float32 bundle."""
    seed = fresh_seed("trained")
    tmp = tmp_path_factory.mktemp("sweep")
    root, workdir = tmp / "layout", tmp / "prior"
    write_prior_layout(root, np.random.default_rng(seed))
    assert cli.main([
        "train", "prior", "--config", "configs/prior.py:tiny", "--workdir", str(workdir),
        f"--config.data.root={root}", f"--config.data.cache_dir={tmp / 'cache'}",
        "--config.data.batch_size=8", "--config.data.num_views=2", "--config.data.num_threads=0",
        "--config.eval.every=2", "--config.eval.num_frames=4", "--config.eval.batch_size=4",
        "--config.train.checkpoint_every=2", "--config.train.steps=2", *TINY_MODEL,
    ]) == 0  # fmt: skip
    bundle = export_bundle(workdir, tmp / "bundle")
    return {"root": root, "workdir": workdir, "bundle": bundle, "cache": tmp / "cache"}


def sweep_args(trained: dict[str, Path], out: Path, scales: tuple[float, ...] = SCALES) -> list[str]:
    return [
        "sweep", "--config", "configs/sweep.py:tiny", "--workdir", str(out),
        f"--config.checkpoints=('{trained['workdir']}', '{trained['bundle']}')",
        f"--config.datasets=('{trained['root']}',)", f"--config.cache_dir={trained['cache']}",
        f"--config.settings.image_scale={scales}", "--config.eval.num_frames=4", "--config.eval.batch_size=4",
    ]  # fmt: skip


def read_rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_sweep_writes_csv_plots_and_html(trained, tmp_path):
    out = tmp_path / "sweep"
    assert cli.main(sweep_args(trained, out)) == 0
    rows = read_rows(out)
    assert len(rows) == 4
    assert {(r["kind"], float(r["image_scale"])) for r in rows} == {
        (k, s) for k in ("workdir", "bundle") for s in SCALES
    }
    for row in rows:
        assert 0.0 < float(row["psnr"]) < 60.0 and -1.0 < float(row["ssim"]) < 1.0 and float(row["scan_chamfer"]) > 0
        assert row["lve"] == "" and row["sync_offset"] == ""  # no audio model in these jobs
        assert row["step"] == "2" and row["dataset"] == str(trained["root"])
    by_key = {(r["kind"], r["image_scale"]): r for r in rows}
    for scale in ("1.0", "0.5"):
        for metric in ("psnr", "ssim", "scan_chamfer"):
            assert by_key["workdir", scale][metric] == by_key["bundle", scale][metric], (metric, scale)
    assert by_key["workdir", "1.0"]["psnr"] != by_key["workdir", "0.5"]["psnr"]  # the setting reaches the render
    for metric in ("psnr", "ssim", "scan_chamfer"):
        assert (out / "plots" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "results.html").read_text()
    assert page.count("<tr>") == 5 and str(trained["bundle"]) in page


def test_two_processes_split_the_jobs_and_process_zero_merges(trained, tmp_path):
    out, port = tmp_path / "sweep", free_port()
    flags = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--distributed_timeout", "120"]
    command = [sys.executable, "-m", "uhap_jax.cli", *sweep_args(trained, out, (1.0,)), *flags]
    procs = [
        subprocess.Popen([*command, "--process_id", str(i)], env=cpu_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{text[-4000:]}"
    assert "running as process 1 of 2 processes (4 local / 8 global devices)" in outputs[1]
    for index in range(2):
        part = [json.loads(line) for line in (out / "parts" / f"{index}.jsonl").read_text().splitlines()]
        assert [(r["job"], r["process"]) for r in part] == [(index, index)]
    rows = read_rows(out)  # job 0: the workdir, on process 0; job 1: its bundle, on process 1
    assert [(r["job"], r["process"], r["kind"]) for r in rows] == [("0", "0", "workdir"), ("1", "1", "bundle")]
    assert np.isfinite(float(rows[0]["psnr"])) and rows[0]["psnr"] == rows[1]["psnr"]
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert cli.main(["sweep", "--workdir", str(tmp_path / "out"), f"--config.checkpoints=('{missing}',)"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: checkpoint listed in config.checkpoints does not exist"]


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: neither an inference bundle"):
        sweep.plan_jobs(load_config("configs/sweep.py:tiny", [f"checkpoints=('{tmp_path}',)"]))


def test_scaled_views_keep_points_on_the_same_pixels(rng):
    frames, views, size = 2, 3, 16
    intrinsics = np.tile(np.asarray([[20.0, 0, 8], [0, 22.0, 8], [0, 0, 1]], np.float32), (frames, views, 1, 1))
    intrinsics[..., :2, 2] += rng.uniform(-2, 2, (frames, views, 2)).astype(np.float32)
    eval_set = prior_eval.EvalSet(
        encoder_images=rng.integers(0, 256, (frames, 2, size, size, 3), dtype=np.uint8),
        target_images=rng.integers(0, 256, (frames, views, size, size, 3), dtype=np.uint8),
        target_masks=rng.integers(0, 256, (frames, views, size, size), dtype=np.uint8),
        world_to_cam=np.tile(np.eye(4, dtype=np.float32), (frames, views, 1, 1)), intrinsics=intrinsics,
        rows={}, scan_subjects=np.zeros(1, np.int32),
    )  # fmt: skip
    half = sweep.scale_views(eval_set, 0.5)
    assert half.target_images.shape == (frames, views, 8, 8, 3) and half.target_masks.shape == (frames, views, 8, 8)
    np.testing.assert_array_equal(half.encoder_images, eval_set.encoder_images)
    # A 2x2 block of the full image averages into one pixel of the half-size one.
    block = eval_set.target_images[0, 0, 2:4, 4:6].astype(np.float32).mean(axis=(0, 1))
    np.testing.assert_allclose(half.target_images[0, 0, 1, 2], block, atol=1.0)
    # A camera-space point lands at half the pixel coordinates (pixel centres at j + 0.5).
    point = np.append(rng.uniform(-0.2, 0.2, 2), 1.0)
    full_uv, half_uv = (k[0, 0] @ point for k in (eval_set.intrinsics, half.intrinsics))
    np.testing.assert_allclose(half_uv[:2], full_uv[:2] / 2, rtol=1e-6)


@pytest.fixture(scope="module")
def speech_workdir(prior_checkpoint, tmp_path_factory) -> tuple[Path, Path, Path, dict]:  # noqa: F811 (fixture)
    """(layout root, cache, audio workdir, the audio stage's eval of it): a random step-0 speech model written by
    the Trainer with its config.json (training it compiles the speech model's step, minutes on these CPUs), then
    scored by `train_audio` with train.steps=0, which resumes it, evaluates at step 0 and trains nothing."""
    root, cache, prior_workdir = prior_checkpoint
    seed = fresh_seed("speech_workdir")
    workdir = tmp_path_factory.mktemp("sweep_audio") / "audio"
    config = load_config("configs/audio.py:tiny", [
        *(o.removeprefix("--config.") for o in SMALL_SPEECH_MODEL), f"prior_workdir={prior_workdir}",
        f"prior_overrides={tuple(PRIOR_OVERRIDES)}", f"data.root={root}", f"data.cache_dir={cache}",
        "data.window_frames=4", "data.batch_size=8", "data.num_threads=0", "eval.batch_size=4", "eval.max_lag=2",
        "train.steps=0",
    ])  # fmt: skip
    prior, _, _, _ = load_prior(prior_workdir, make_mesh(), config=audio_eval.prior_config(config))
    model = build_speech_model(config, prior, FPS)
    randomise(model.speech.head, np.random.default_rng(seed))
    save_step_zero(config, model, workdir)
    _, metrics = audio_stage.train_audio(config, workdir)
    return root, cache, workdir, metrics


def test_sweep_scores_an_audio_workdir_as_the_audio_stage_does(speech_workdir, tmp_path):
    root, cache, workdir, own = speech_workdir
    out = tmp_path / "sweep"
    assert cli.main([
        "sweep", "--config", "configs/sweep.py:tiny", "--workdir", str(out), f"--config.checkpoints=('{workdir}',)",
        f"--config.datasets=('{root}',)", f"--config.cache_dir={cache}", "--config.settings.image_scale=(1.0, 0.5)",
    ]) == 0  # fmt: skip
    rows = read_rows(out)
    assert [(r["kind"], r["step"], r["image_scale"]) for r in rows] == [("audio", "0", "1.0"), ("audio", "0", "0.5")]
    for row in rows:
        assert np.isfinite(float(row["lve"])) and float(row["lve"]) > 0.0
        assert float(row["lve"]) == pytest.approx(own["eval/lve"], rel=1e-5)
        assert float(row["lve"]) != pytest.approx(own["eval/lve_shuffled_audio"], rel=1e-5)  # the audio matters
        assert row["sync_offset"] == str(int(own["eval/sync_offset_frames"]))
        assert row["psnr"] == row["ssim"] == row["scan_chamfer"] == ""  # a speech model renders no views here
    # The sweep encoded its own targets rather than reading the audio workdir's cache.
    assert list((out / "expression_codes").glob("*.npz"))


def test_uhap_eval_prints_the_stage_metrics_of_one_checkpoint(speech_workdir, trained, capsys):
    """`uhap eval` on a speech-model workdir gives the audio stage's own metrics, baselines included; on a prior
    workdir and its bundle, the sweep's held-out-view metrics at scale 1."""
    root, cache, workdir, own = speech_workdir
    assert cli.main(["eval", "--workdir", str(workdir), "--data", str(root), "--cache-dir", str(cache)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("lve", "lve_zero_motion", "lve_shuffled_audio", "sync_offset_frames"):
        assert printed[name] == pytest.approx(own[f"eval/{name}"], rel=1e-5), name
    scores = []
    for checkpoint in (trained["workdir"], trained["bundle"]):
        assert cli.main(["eval", "--workdir", str(checkpoint), "--data", str(trained["root"]),
                         "--cache-dir", str(trained["cache"])]) == 0  # fmt: skip
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 3.0 < printed["psnr"] < 60.0 and -1.0 <= printed["ssim"] <= 1.0 and printed["step"] == 2
        scores.append(printed["psnr"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-4)  # the bundle holds the workdir's parameters


# ------------------------------------------------------------------------------------- the benchmark setting

PERSONALIZE = ("train.steps=2", "data.batch_size=8", "image_size=32", "albedo.frames=2")


@pytest.fixture(scope="module")
def benchmark_sweep(tmp_path_factory) -> dict[str, Path]:
    """`uhap sweep` with the benchmark setting, ranking by PSNR, over two speech models that differ in a known way:
    `still` (output layer zeroed: the same code for any audio, so it scores its zero-motion baseline exactly) and
    `wild` (output layer random at 30x a trained one's scale: lips thrown about by centimetres), listed wild first.

    A small synthetic capture (3 identities, 2 held out, 4 cameras at 32², one held out), a random step-0 prior
    whose codes move the lips, an untrained step-0 encoder (the held-out avatars are built from it; both models
    drive the same avatars). Nothing is trained: the demo's 2-step prior would do, but its codes do not move the
    lips (its benchmark LVE is the same to 6 digits under every condition), so no ranking could be seen on it."""
    base = tmp_path_factory.mktemp("sweep_benchmark")
    rng = np.random.default_rng(0)  # fixed: the models' scores must not depend on the draw
    data = synth.synth_config("tiny")
    data.update({"num_identities": 3, "num_held_out_identities": 2, "sentences_per_identity": 2, "max_seconds": 0.8,
                 "num_cameras": 4, "held_out_cameras": (1,), "image_size": 32, "template_resolution": 24,
                 "gaussian_uv_resolution": 32})  # fmt: skip
    root, cache, prior_dir = base / "layout", base / "cache", base / "prior"
    synth.generate(root, data, progress=False)
    prior_cfg = load_config("configs/prior.py:tiny", [*PRIOR_OVERRIDES, f"data.root={root}", f"data.cache_dir={cache}"])
    prior = UHAP(template_lib.procedural_head(24), prior_cfg.model, rngs=nnx.Rngs(0))
    randomise(prior.decoder.out, rng, scale=0.1)
    save_step_zero(prior_cfg, prior, prior_dir)
    encoder_cfg = load_config("configs/encoder.py:tiny", [
        f"prior_workdir={prior_dir}", "model.crop_size=32", "model.channels=(8, 16)", "model.hidden=32",
        "localiser.input_size=32", "localiser.channels=(8, 16, 16)",
    ])  # fmt: skip
    encoder = EncoderWithPrior(build_encoder(encoder_cfg, prior), nnx.clone(prior), build_localiser(encoder_cfg))
    save_step_zero(encoder_cfg, encoder, base / "encoder")
    speech_cfg = load_config("configs/audio.py:tiny", [
        *SPEECH_OVERRIDES, f"prior_workdir={prior_dir}", f"prior_overrides={tuple(PRIOR_OVERRIDES)}",
        "data.window_frames=4", "eval.max_lag=2",
    ])  # fmt: skip
    for name, scale in (("still", 0.0), ("wild", 30.0)):
        model = build_speech_model(speech_cfg, nnx.clone(prior), data.fps)
        randomise(model.speech.head, rng, scale=scale)
        save_step_zero(speech_cfg, model, base / name)
    out = base / "sweep"
    assert cli.main([
        "sweep", "--config", "configs/sweep.py:tiny", "--workdir", str(out),
        f"--config.checkpoints=('{base / 'wild'}', '{base / 'still'}')", f"--config.datasets=('{root}',)",
        f"--config.cache_dir={cache}", f"--config.benchmark.encoder={base / 'encoder'}",
        f"--config.benchmark.personalize_overrides={PERSONALIZE}", "--config.benchmark.rank_by=psnr",
    ]) == 0  # fmt: skip
    return {"root": root, "prior": prior_dir, "encoder": base / "encoder", "wild": base / "wild",
            "still": base / "still", "out": out}  # fmt: skip


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_the_benchmark_setting_scores_each_speech_model_by_the_protocol(benchmark_sweep, tmp_path):
    out = benchmark_sweep["out"]
    header, rows = read_csv(out / "results.csv")
    for name in ("benchmark/lve_mm2", "benchmark/psnr", "benchmark/mouth_psnr", "benchmark/sync_confidence",
                 "benchmark/lve_mm2_zero_motion", "benchmark/lve_mm2_shuffled_audio"):  # fmt: skip
        assert name in header, name
    by_name = {Path(r["checkpoint"]).name: {k: float(r[k]) for k in sweep.BENCHMARK_COLUMNS} for r in rows}
    assert sorted(by_name) == ["still", "wild"]
    still, wild = by_name["still"], by_name["wild"]
    assert all(np.isfinite(v) for scores in by_name.values() for v in scores.values())
    # Each model drives the avatars itself (they were built with the first checkpoint's, wild's): still's codes
    # never move, so its audio-driven LVE is its zero-motion baseline's, and wild's thrown-about lips are far off.
    assert still["benchmark/lve_mm2"] == still["benchmark/lve_mm2_zero_motion"]
    assert wild["benchmark/lve_mm2"] > 2.0 * still["benchmark/lve_mm2"]
    # The same protocol as `uhap benchmark` (on the avatars the sweep built, which carry wild's speech model).
    avatars = next(p for p in (out / "benchmark").glob("avatars_*") if p.is_dir())
    result = benchmark_avatars.run_benchmark(
        benchmark_sweep["prior"], benchmark_sweep["encoder"], benchmark_sweep["wild"], benchmark_sweep["root"],
        tmp_path / "benchmark", load_config("configs/personalize.py:tiny", list(PERSONALIZE)), avatars_dir=avatars,
    )  # fmt: skip
    expected = benchmark.flat_metrics(result)
    for column, value in wild.items():
        assert value == pytest.approx(expected[column], rel=1e-6), column


def test_the_ranking_lists_the_checkpoints_best_first_in_the_metric_direction(benchmark_sweep):
    out = benchmark_sweep["out"]
    header, ranking = read_csv(out / "ranking.csv")
    assert header == list(sweep.RANKING_COLUMNS)
    psnr = {Path(r["checkpoint"]).name: float(r["benchmark/psnr"]) for r in ranking}
    assert abs(psnr["still"] - psnr["wild"]) > 0.1  # the two differ, so the order says which way it sorts
    assert [Path(r["checkpoint"]).name for r in ranking] == sorted(psnr, key=psnr.get, reverse=True)  # higher first
    assert [r["rank"] for r in ranking] == ["1", "2"]
    # By LVE, lower is better: still first, whichever PSNR ranks first. (The same merged rows the sweep ranked.)
    rows = sweep.merge_parts(out / "parts", 1, 2)
    assert [Path(r["checkpoint"]).name for r in sweep.rank(rows, "lve_mm2")] == ["still", "wild"]


def test_a_benchmark_setting_that_cannot_rank_is_refused_before_anything_runs(benchmark_sweep, tmp_path):
    checkpoints = f"checkpoints=('{benchmark_sweep['still']}',)"
    encoder = f"benchmark.encoder={benchmark_sweep['encoder']}"
    for overrides, error, message in (
        ([checkpoints, encoder, "benchmark.rank_by=fdd_mm2"], ValueError, "benchmark.rank_by 'fdd_mm2' is not one of"),
        ([checkpoints, f"benchmark.encoder={tmp_path}"], FileNotFoundError, "is no `uhap train encoder` workdir"),
        ([f"checkpoints=('{benchmark_sweep['prior']}',)", encoder], ValueError, "no checkpoint is an audio-stage"),
    ):
        with pytest.raises(error, match=message):
            sweep.plan_jobs(load_config("configs/sweep.py:tiny", overrides))
