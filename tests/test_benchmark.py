"""The benchmark protocol on a small synthetic capture (3 identities, 2 held out, each speaking a held-out sentence;
4 cameras at 32², one held out) with a random prior and a random speech model: the test clips are the held-out
identities' held-out sentences at the held-out camera; constant neutral codes score exactly the zero-motion
baseline; a random speech model does not pass the bars against shuffled audio; a one-frame shift of the audio
moves the sync offset by one frame; the outputs carry every row and n/a for missing weights; a NeRSemble NVS
submission written from the synthetic data reads back."""

import csv
import json
import re
import zipfile

import numpy as np
import pytest
from flax import nnx
from helpers.layouts import PRIOR_OVERRIDES
from helpers.models import randomise

from data_pipelines import layout, synth
from uhap_jax import cli
from uhap_jax.config_utils import load_config
from uhap_jax.eval import benchmark, face_metrics, lip_metrics, nersemble_submission
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models.frozen_prior import build_speech_model
from uhap_jax.models.prior import UHAP

FPS, RATE = 25.0, 16_000
SPEECH = [
    "model.width=16", "model.num_layers=1", "model.num_heads=2", "model.mlp_dim=32", "encoder.hidden_size=16",
    "encoder.num_hidden_layers=1", "encoder.num_attention_heads=2", "encoder.intermediate_size=32",
    "encoder.conv_dim=(8, 8, 8, 8, 8, 8, 8)",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmark")
    rng = np.random.default_rng(7)
    data = synth.synth_config("tiny")
    data.update({"num_identities": 3, "num_held_out_identities": 2, "sentences_per_identity": 2, "max_seconds": 0.8,
                 "num_cameras": 4, "held_out_cameras": (1,), "image_size": 32, "template_resolution": 24,
                 "gaussian_uv_resolution": 32, "monocular": False})  # fmt: skip
    root = base / "layout"
    synth.generate(root, data, progress=False)
    prior_cfg = load_config("configs/prior.py:tiny", PRIOR_OVERRIDES)
    template = template_lib.procedural_head(24)
    prior = UHAP(template, prior_cfg.model, rngs=nnx.Rngs(0))
    randomise(prior.decoder.out, rng, scale=0.1)
    speech_cfg = load_config("configs/audio.py:tiny", SPEECH)
    speech = build_speech_model(speech_cfg, nnx.clone(prior), FPS).speech
    randomise(speech.head, rng)
    speech.eval()
    avatars = {}
    for subject in ("id001", "id002"):  # stand-ins for phone-built avatars: the prior with the subject's scan
        vertices, _, colours = layout.read_neutral_scan(layout.subject_dir(root, subject))
        avatars[subject] = benchmark.TestAvatar(prior, scan_uv_maps(prior.layout, template, vertices, colours, subject),
                                                speech)  # fmt: skip
    split = benchmark.read_split(root)
    clips = [benchmark.read_clip(root, s, q, split.held_out_cameras, split.held_in_cameras)
             for s, q in benchmark.test_sequences(root, split)]  # fmt: skip
    result = benchmark.run(root, avatars, template, benchmark.Oracle(prior, True), max_lag=3, clips=clips)
    return {"root": root, "template": template, "prior": prior, "avatars": avatars, "clips": clips, "result": result}


def test_the_test_clips_are_held_out_identities_sentences_and_cameras(setup):
    info = layout.read_dataset_info(setup["root"])
    keys = [c.key for c in setup["clips"]]
    assert keys == ["id001/sen_11", "id002/sen_10"]
    for clip in setup["clips"]:
        assert clip.subject in info["identities"]["held_out"] and clip.sentence in info["held_out_sentences"]
        assert [c.serial for c in clip.cameras] == info["held_out_cameras"]
        assert not {c.serial for c in clip.input_cameras} & set(info["held_out_cameras"])
    rows = setup["result"]["rows"]
    assert len(rows) == 2 * len(benchmark.CONDITIONS)
    assert {r["condition"] for r in rows} == set(benchmark.CONDITIONS)
    for row in rows:
        assert 5 < row["psnr"] < 60 and 5 < row["mouth_psnr"] < 60 and -1 < row["ssim"] <= 1
        assert row["lve_mm2"] > 0 and row["lpips"] is None and row["lse_d"] is None


def test_constant_neutral_codes_score_exactly_the_zero_motion_baseline(setup):
    def neutral(avatar, waveform, frames):
        return np.broadcast_to(benchmark.rest_code(avatar, waveform, frames), (frames, avatar.prior.z_dim))

    result = benchmark.run(setup["root"], setup["avatars"], setup["template"], None, drive=neutral, max_lag=3,
                           clips=setup["clips"])  # fmt: skip
    by = {(r["subject"], r["condition"]): r for r in result["rows"]}
    for clip in setup["clips"]:
        ours, still = by[clip.subject, "audio"], by[clip.subject, "zero_motion"]
        for name in benchmark.METRICS:
            assert ours[name] == still[name], name
    # ...and so fail the relative bars: a method that does not move is not better than not moving.
    checks = {c.name: c.passed for c in benchmark.check_bars(result["means"])}
    assert not checks["LVE <= 70% of zero_motion"] and not checks["mouth PSNR > zero_motion"]


def test_the_rest_face_is_the_speech_models_face_in_the_clips_pauses(setup, rng):
    """`rest_code` averages the speech model's codes over the quietest fifth of the clip's frames, wherever they
    are, and never over a loud one (digital silence is not its input: its face for that was unstable)."""
    avatar = setup["avatars"]["id001"]
    frames, hop = 20, int(RATE / FPS)
    quiet = np.sort(rng.choice(frames, 4, replace=False))
    level = np.where(np.isin(np.arange(frames), quiet), rng.uniform(0.001, 0.01, frames), rng.uniform(0.2, 0.5, frames))
    waveform = (np.repeat(level, hop) * rng.normal(size=frames * hop)).astype(np.float32)
    codes = benchmark.speech_codes(avatar.speech, waveform, frames)
    rest = benchmark.rest_code(avatar, waveform, frames)
    np.testing.assert_allclose(rest, codes[quiet].mean(0), rtol=1e-5, atol=1e-6)
    loud = np.setdiff1d(np.arange(frames), quiet)
    assert not np.allclose(rest, codes[loud[:4]].mean(0), atol=1e-4)


def test_a_random_speech_model_does_not_beat_shuffled_audio(setup):
    means = setup["result"]["means"]
    checks = {c.name: c.passed for c in benchmark.check_bars(means)}
    assert not checks["LVE <= 70% of shuffled_audio"] and not checks["LVE <= 70% of zero_motion"]
    # Sync: a random model's mouth follows no audio, so its confidence stays at the noise floor of another
    # sentence's audio (a model that follows the audio clears that floor by > 0.3: the one-frame-shift test). Its
    # offset is the argmax of a flat curve and the strict '>' of the bar compares two noise values: which way
    # they fall changed between runs of the same code (XLA's numerics), so those are not asserted.
    ours, shuffled = means["audio"]["sync_confidence"], means["shuffled_audio"]["sync_confidence"]
    assert ours < shuffled + 0.15, (ours, shuffled)
    # The oracle's codes are the prior's own: the metrics run on them too.
    assert np.isfinite(means["oracle_codes"]["lve_mm2"]) and np.isfinite(means["oracle_codes"]["psnr"])


def _mouth_direction(setup, clip) -> np.ndarray:
    """The unit code direction that opens the (random) decoder's mouth most for this identity, with its sign."""
    prior = setup["prior"]
    scorer = benchmark.Scorer(clip, setup["template"], prior.layout)
    renderer = benchmark.Renderer(prior, setup["avatars"][clip.subject].scan_maps, clip.cameras,
                                  ids={"lips": scorer.lip_ids})  # fmt: skip
    eye = np.eye(prior.z_dim, dtype=np.float32)
    lips = renderer(np.concatenate([eye, -eye, np.zeros_like(eye[:1])]), np.zeros((2 * len(eye) + 1, 6)))[1]["lips"]
    halves = face_metrics.lip_halves(lips[-1])
    opening = face_metrics.mouth_opening(lips, halves)
    gain = opening[: len(eye)] - opening[len(eye) : 2 * len(eye)]
    k = int(np.argmax(np.abs(gain)))
    return np.sign(gain[k]) * eye[k]


def test_a_one_frame_audio_shift_moves_the_sync_offset_by_one_frame(setup):
    directions = {id(setup["avatars"][c.subject]): _mouth_direction(setup, c) for c in setup["clips"]}
    per_frame = round(RATE / FPS)

    def envelope_driver(shift: int):
        """An ideal speech model: the mouth opens with the loudness of the audio `shift` frames later."""

        def drive(avatar, waveform, frames):
            moved = (
                np.concatenate([waveform[shift * per_frame :], np.zeros(shift * per_frame)])
                if shift > 0
                else (np.concatenate([np.zeros(-shift * per_frame), waveform[: waveform.size + shift * per_frame]]))
            )
            envelope = lip_metrics.audio_rms_envelope(moved, RATE, FPS, frames)
            return (0.8 * envelope / envelope.max())[:, None] * directions[id(avatar)][None]

        return drive

    offsets = {}
    for shift in (0, 1, -1):
        result = benchmark.run(setup["root"], setup["avatars"], setup["template"], None, drive=envelope_driver(shift),
                               max_lag=3, clips=setup["clips"], images=False)  # fmt: skip
        offsets[shift] = result["means"]["audio"]["sync_offset_frames"]
        if shift == 0:
            ours, shuffled = result["means"]["audio"], result["means"]["shuffled_audio"]
            assert ours["sync_confidence"] > shuffled["sync_confidence"] + 0.3  # the proxy sees the difference
    # The mouth opening with audio one frame later leads the audio by one frame: offset -1; and the reverse.
    assert offsets == {0: 0.0, 1: -1.0, -1: 1.0}


def test_the_true_scan_diagnostic_isolates_the_identitys_lip_placement(setup):
    """The diagnostic decodes the same codes on the universal prior given the true scan. Here the avatars are just
    that, so it scores what the table scores; an avatar of its own (another decoder) whose face sits 5 mm off
    raises the table's LVE and leaves the diagnostic where it was."""
    result = setup["result"]
    table_rows = {(r["subject"], r["condition"]): r for r in result["rows"]}
    diagnostic = result["true_scan_identity"]
    assert {(r["subject"], r["condition"]) for r in diagnostic["rows"]} == {
        (c.subject, d) for c in setup["clips"] for d in benchmark.TRUE_SCAN_DRIVERS
    }
    for row in diagnostic["rows"]:
        for name in benchmark.TRUE_SCAN_METRICS:
            assert row[name] == pytest.approx(table_rows[row["subject"], row["condition"]][name], rel=1e-4), name

    def moved(avatar):
        maps = np.array(avatar.scan_maps)
        maps[..., 0] += 0.005  # the geometry offset channels: 5 mm along x
        prior = nnx.clone(avatar.prior)  # a fine-tuned decoder stands apart from the universal prior
        randomise(prior.decoder.out, np.random.default_rng(3), scale=0.1)
        return benchmark.TestAvatar(prior, maps, avatar.speech)

    off = benchmark.run(
        setup["root"],
        {s: moved(a) for s, a in setup["avatars"].items()},
        setup["template"],
        benchmark.Oracle(setup["prior"], True),
        max_lag=3,
        clips=setup["clips"],
        images=False,
    )
    for driver in benchmark.TRUE_SCAN_DRIVERS:
        assert off["means"][driver]["lve_mm2"] > result["means"][driver]["lve_mm2"] + 10.0, driver
        for name in benchmark.TRUE_SCAN_METRICS:
            assert off["true_scan_identity"]["means"][driver][name] == pytest.approx(
                diagnostic["means"][driver][name], rel=1e-6
            )
    flat = benchmark.flat_metrics(off)
    assert flat["oracle_inputs/true_scan_identity/lve_mm2_zero_motion"] == diagnostic["means"]["zero_motion"]["lve_mm2"]
    assert not any(name.startswith("benchmark/true_scan") for name in flat)  # it reads the scan: not a user's number
    assert flat["benchmark/lve_mm2"] == off["means"]["audio"]["lve_mm2"]


def test_outputs_hold_every_row_the_means_and_na_for_missing_weights(setup, tmp_path):
    result = setup["result"]
    paths = benchmark.write(result, tmp_path)
    stored = json.loads(paths["json"].read_text())
    assert len(stored["rows"]) == len(result["rows"]) and "held-out identities" in stored["notes"]
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["subject"], r["sentence"]) for r in rows} == {("id001", "11"), ("id002", "10")}
    assert all(r["lpips"] == "n/a" for r in rows)
    table = benchmark.table(result)
    lpips_row = next(r for r in table if r[0] == "lpips")
    assert lpips_row[1:] == [face_metrics.LPIPS_MISSING] * len(result["means"])
    assert "oracle_codes (upper bound)" in table[0]
    flat = benchmark.flat_metrics(result)
    assert {"benchmark/lve_mm2", "benchmark/lve_mm2_zero_motion", "benchmark/mouth_psnr_shuffled_audio",
            "benchmark/psnr_oracle_codes", "benchmark/sync_offset_frames", "benchmark/sync_confidence",
            "benchmark/sync_confidence_shuffled_audio"} <= set(flat)  # fmt: skip
    assert not any("lpips" in name for name in flat)  # unknown, so absent here and n/a in the table


def test_the_prior_is_scored_by_split(setup):
    metrics = benchmark.prior_reconstruction(setup["root"], setup["prior"], setup["template"], True, frames=2)
    assert set(metrics) == {
        f"{split}/{metric}{baseline}"
        for split in ("prior_train_ids_heldout_frames", "prior_heldout_ids_scan")
        for metric in ("psnr", "ssim")
        for baseline in ("", "_mean_code")
    }
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["prior_heldout_ids_scan/psnr"] != metrics["prior_heldout_ids_scan/psnr_mean_code"]


def test_constant_codes_score_exactly_the_priors_mean_code_baseline(setup, monkeypatch, rng):
    """Codes that do not follow the frames (one code for the whole clip) score the baseline to the last digit, so
    the bar "above the mean code" fails for them."""
    still = rng.normal(size=setup["prior"].z_dim).astype(np.float32)
    monkeypatch.setattr(benchmark, "encode_clip", lambda prior, clip, *args: np.tile(still, (clip.num_frames, 1)))
    metrics = benchmark.prior_reconstruction(setup["root"], setup["prior"], setup["template"], True, frames=2)
    for split in ("prior_train_ids_heldout_frames", "prior_heldout_ids_scan"):
        for metric in ("psnr", "ssim"):
            assert metrics[f"{split}/{metric}"] == metrics[f"{split}/{metric}_mean_code"]


def test_the_official_nvs_submission_layout():
    spec = nersemble_submission.NVS
    assert (spec.width, spec.height, spec.fps, spec.crf) == (1100, 1604, 73.0, 14)
    expected = spec.expected()
    assert len(expected) == 15 and "388/GLASSES/cam_222200046.mp4" in expected
    assert "475/HAIR/cam_222200039.mp4" in expected and sum(spec.frame_counts.values()) == 3516


def test_a_submission_written_from_synthetic_data_reads_back(setup, tmp_path):
    root, prior = setup["root"], setup["prior"]
    split = benchmark.read_split(root)
    serial = split.held_out_cameras[0]
    calibration = layout.read_calibration(layout.subject_dir(root, "id001"))
    frames = layout.read_sequence_meta(layout.sequence_dir(root, "id001", "sen_11"))["num_frames"]
    spec = nersemble_submission.SubmissionSpec(48, 64, 25.0, {7: "sen_11"}, (serial,), {7: frames})
    renders = list(nersemble_submission.render_sequence(
        prior, setup["avatars"]["id001"].scan_maps, setup["template"], True, root, "id001", "sen_11",
        [calibration[serial]], split.held_in_cameras, spec,
    ))  # fmt: skip
    assert [s for s, _ in renders] == [serial] and renders[0][1].shape == (frames, 64, 48, 3)
    out = nersemble_submission.write_submission(tmp_path / "nvs.zip", [(7, "sen_11", iter(renders))], spec)
    assert nersemble_submission.check_submission(out, spec) == []
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == [f"007/sen_11/cam_{serial}.mp4"]
        decoded, fps = nersemble_submission.read_video(archive.read(archive.namelist()[0]))
    assert fps == 25.0 and decoded.shape == renders[0][1].shape
    error = np.mean((decoded.astype(float) - renders[0][1]) ** 2)
    assert 10 * np.log10(255.0**2 / max(error, 1e-9)) > 30.0  # crf 14: near-lossless
    # A wrong camera, size or length is refused, and leaves no zip behind.
    good = renders[0][1]
    for args, message in (
        ((7, "sen_11", "nope", good), "hold-out"),
        ((7, "sen_11", serial, good[:, :32]), "uint8"),
        ((7, "sen_11", serial, good[:-1]), "frames"),
        ((8, "sen_11", serial, good), "benchmark"),
    ):
        with pytest.raises(ValueError, match=message):
            with nersemble_submission.SubmissionWriter(tmp_path / "bad.zip", spec) as writer:
                writer.add_video(*args)
        assert not (tmp_path / "bad.zip").exists()
    assert nersemble_submission.check_submission(out, nersemble_submission.NVS)[0].endswith("missing")


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_the_command_names_a_missing_weights_file(tmp_path, capsys):
    args = ["benchmark", "--prior", str(tmp_path), "--audio-model", str(tmp_path), "--encoder", str(tmp_path),
            "--data", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main([*args, "--lpips-weights", str(tmp_path / "nowhere.safetensors")]) == 2
    assert re.search(r"--lpips-weights .*nowhere\.safetensors: no such file", _one_error_line(capsys))
    with pytest.raises(ValueError, match="dataset.json|benchmark"):
        benchmark.read_split(_empty_layout(tmp_path))


def test_the_command_takes_overrides_of_the_avatars_personalisation(tmp_path, capsys):
    """`--config.*` overrides reach the personalisation config of the test identities' avatars: a known field is
    taken (the run goes on to the data, which is missing here), an unknown one is named."""
    args = ["benchmark", "--prior", str(tmp_path), "--audio-model", str(tmp_path), "--encoder", str(tmp_path),
            "--data", str(_empty_layout(tmp_path / "layout")), "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main([*args, "--config.tune.not_a_field=1"]) == 2
    assert "tune.not_a_field" in _one_error_line(capsys)
    assert cli.main([*args, "--config.tune.pose=video"]) != 0
    line = _one_error_line(capsys)
    assert "override" not in line and "benchmark" in line  # past the config: the split has no test identity


def _empty_layout(root):
    layout.write_dataset_info(root, {"cameras": ["a"], "held_out_cameras": [], "held_out_sentences": [],
                                     "identities": {"train": [], "held_out": []}})  # fmt: skip
    return root


def test_the_nersemble_command_names_missing_benchmark_sequences(tmp_path, capsys):
    args = ["nersemble", "--prior", str(tmp_path), "--data", str(tmp_path), "--nersemble", str(tmp_path), "--out",
            str(tmp_path / "nvs.zip")]  # fmt: skip
    assert cli.main(args) == 2
    assert re.search(r"388/sequences/GLASSES.*import them first", _one_error_line(capsys))
    assert not (tmp_path / "nvs.zip").exists()


def test_syncnet_weights_turn_lse_from_na_into_numbers(setup, rng):
    """Given a SyncNet (random weights here: `load_syncnet` of syncnet_v2 is tested against PyTorch in
    test_lip_metrics), every condition's LSE-D / LSE-C are finite numbers in the rows, the means and the table."""
    from uhap_jax.eval import syncnet

    model = syncnet.SyncNet(64, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model.eval()
    result = benchmark.run(setup["root"], setup["avatars"], setup["template"], None, syncnet_model=model, max_lag=3,
                           clips=setup["clips"], images=True)  # fmt: skip
    assert result["rows"] and all(np.isfinite(r["lse_d"]) and np.isfinite(r["lse_c"]) for r in result["rows"])
    assert len({round(r["lse_d"], 6) for r in result["rows"]}) > 1  # the conditions' mouths differ
    table = benchmark.table(result)
    for name in ("lse_d", "lse_c"):
        row = next(r for r in table if r[0] == name)
        assert all(face_metrics.SYNCNET_MISSING not in str(cell) for cell in row[1:]), row
    flat = benchmark.flat_metrics(result)
    assert np.isfinite(flat["benchmark/lse_d"]) and np.isfinite(flat["benchmark/lse_c_shuffled_audio"])
