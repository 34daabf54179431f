"""Output folders and crash-safe files: a command replaces only what is its own, never an input, and an
interruption or an error never costs the old contents; torn metrics rows and code caches are rebuilt, not fatal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.dataset import Sequence
from uhap_jax import cli
from uhap_jax.artifacts import expression_codes, output_dirs
from uhap_jax.artifacts.expression_codes import cached_codes
from uhap_jax.artifacts.metrics_log import read_rows
from uhap_jax.config_utils import UsageError
from uhap_jax.train.metrics import MetricWriter


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def _bundle(folder: Path, rng: np.random.Generator) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bundle.json").write_text(json.dumps({"kind": "uhap_prior", "step": int(rng.integers(100))}))
    (folder / "params.bin").write_bytes(rng.bytes(256))
    return _files(folder)


@pytest.mark.parametrize("state", ["missing", "empty", "ours"])
def test_replaces_a_missing_empty_or_own_folder_completely(tmp_path, rng, state):
    out = tmp_path / "bundle"
    if state == "empty":
        out.mkdir()
    elif state == "ours":
        _bundle(out, rng)
        (out / "stale.txt").write_text("from the last export")
    new = rng.bytes(128)
    with output_dirs.replacing(out, "bundle", inputs=[tmp_path / "workdir"]) as staging:
        assert staging.parent == tmp_path and staging.is_dir() and not any(staging.iterdir())
        (staging / "bundle.json").write_text(json.dumps({"kind": "uhap_prior"}))
        (staging / "params.bin").write_bytes(new)
    assert sorted(_files(out)) == ["bundle.json", "params.bin"] and (out / "params.bin").read_bytes() == new
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda out, rng: (out.mkdir(), (out / "thesis.pdf").write_bytes(rng.bytes(64))), "not a bundle"),
        (lambda out, rng: (out.mkdir(), (out / "avatar.json").write_text('{"kind": "uhap_avatar"}')), "not a bundle"),
        (lambda out, rng: (out.mkdir(), (out / "bundle.json").write_text("{torn")), "not a bundle"),
        (lambda out, rng: out.write_bytes(rng.bytes(16)), "is a file"),
    ],
)
def test_refuses_folders_that_are_not_its_own(tmp_path, rng, make, message):
    out = tmp_path / "out"
    make(out, rng)
    before = _files(tmp_path)
    with pytest.raises(UsageError, match=message):
        with output_dirs.replacing(out, "bundle"):
            raise AssertionError("the block must not run")
    assert _files(tmp_path) == before and _leftovers(tmp_path) == []


def test_refuses_an_input_a_folder_inside_one_or_one_holding_one(tmp_path, rng):
    workdir = tmp_path / "runs" / "prior"
    data = rng.bytes(64)
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "state").write_bytes(data)
    (workdir / "bundle.json").write_text(json.dumps({"kind": "uhap_prior"}))  # even one that looks like ours
    link = tmp_path / "link"
    link.symlink_to(workdir)
    cases = [(workdir, "is the input"), (workdir / "bundle", "lies inside"), (tmp_path / "runs", "contains"),
             (link, "is the input"), (tmp_path / "..", "contains")]  # fmt: skip
    for out, relation in cases:
        with pytest.raises(UsageError, match=relation):
            output_dirs.check_replaceable(out, "bundle", inputs=[workdir])
    assert (workdir / "checkpoints" / "state").read_bytes() == data


def test_refuses_a_symbolic_link_as_the_output(tmp_path, rng):
    target = tmp_path / "real"
    _bundle(target, rng)
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        output_dirs.check_replaceable(tmp_path / "out", "bundle")


def test_an_error_in_the_block_keeps_the_old_folder_and_removes_staging(tmp_path, rng):
    out = tmp_path / "bundle"
    before = _bundle(out, rng)
    with pytest.raises(RuntimeError, match="disk full"):
        with output_dirs.replacing(out, "bundle") as staging:
            (staging / "bundle.json").write_text("{}")
            raise RuntimeError("disk full")
    assert _files(out) == before and _leftovers(tmp_path) == []


def test_a_failed_move_puts_the_old_folder_back(tmp_path, rng):
    out = tmp_path / "bundle"
    before = _bundle(out, rng)
    with pytest.raises(FileNotFoundError):
        output_dirs.replace_dir(tmp_path / "vanished-staging", out)
    assert _files(out) == before and _leftovers(tmp_path) == []


def test_two_runs_never_share_a_staging_folder(tmp_path, rng):
    out = tmp_path / "bundle"
    with output_dirs.replacing(out, "bundle") as first, output_dirs.replacing(out, "bundle") as second:
        assert first != second and first.is_dir() and second.is_dir()
        for staging in (first, second):
            (staging / "bundle.json").write_text(json.dumps({"kind": "uhap_prior", "from": staging.name}))
    assert json.loads((out / "bundle.json").read_text())["from"] == first.name  # the last to finish wins
    assert _leftovers(tmp_path) == []


def test_data_synth_refuses_a_foreign_out_before_generating(tmp_path, rng, capsys):
    (tmp_path / "mine.txt").write_bytes(rng.bytes(32))
    before = _files(tmp_path)
    assert cli.main(["data", "synth", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a dataset written by uhap" in err[0]
    assert _files(tmp_path) == before


def test_save_npz_atomic_keeps_the_old_file_when_writing_fails(tmp_path, rng):
    path = tmp_path / "codes.npz"
    first = rng.normal(size=(5, 3))
    output_dirs.save_npz_atomic(path, codes=first)
    np.testing.assert_array_equal(np.load(path)["codes"], first)

    class Unsavable:
        def __array__(self, *args, **kwargs):
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        output_dirs.save_npz_atomic(path, codes=Unsavable())
    np.testing.assert_array_equal(np.load(path)["codes"], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npz"]


# -------------------- torn files of an interrupted run


def test_torn_metrics_line_is_dropped_and_rewritten(tmp_path, rng, caplog):
    rows = [{"step": step, "loss": float(rng.normal())} for step in (10, 20, 30)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 40, "lo')  # killed mid-write
    assert read_rows(tmp_path / "metrics.jsonl") == rows
    assert "unreadable metrics row" in caplog.text
    writer = MetricWriter(tmp_path)
    writer.truncate_after(20)  # what a resume from step 20 does
    writer.close()
    assert read_rows(tmp_path / "metrics.jsonl") == rows[:2]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(row) + "\n" for row in rows[:2])


def _sequences(rng: np.random.Generator) -> list[Sequence]:
    return [Sequence("id000", f"sen_{i:02d}", 0, "train", i, 10 * i, 10, np.zeros(0, np.float32))
            for i in range(2)]  # fmt: skip


def test_torn_code_cache_is_recomputed_not_fatal(tmp_path, rng, caplog):
    sequences = _sequences(rng)
    codes = {s.key: rng.normal(size=(s.num_frames, 4)).astype(np.float32) for s in sequences}
    cache = tmp_path / "expression_codes.npz"
    output_dirs.save_npz_atomic(cache, key=np.asarray("prior@5"), **codes)
    cached = cached_codes(cache, "prior@5", sequences)
    for sequence in cached:
        np.testing.assert_array_equal(sequence.codes, codes[sequence.key])
    assert cached_codes(cache, "prior@6", sequences) is None  # another prior checkpoint
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # a run killed while writing it (before writes were atomic)
    assert cached_codes(cache, "prior@5", sequences) is None
    assert "unreadable" in caplog.text
    cache.write_bytes(b"")
    assert cached_codes(cache, "prior@5", sequences) is None


def test_codes_read_once_serve_another_stage_of_the_process(tmp_path, rng):
    """`uhap demo` runs its stages in one process, each with its cache in its own workdir: codes one stage computed
    or read serve the next for the same key (no prior call: `prior` is None here), and are written to its cache."""
    sequences = _sequences(rng)
    codes = {s.key: rng.normal(size=(s.num_frames, 4)).astype(np.float32) for s in sequences}
    key = f"{tmp_path}/prior@5"
    output_dirs.save_npz_atomic(tmp_path / "audio.npz", key=np.asarray(key), **codes)
    common = dict(prior=None, records=None, tables=None, held_in=["c0"], batch_size=4)
    first = expression_codes.expression_codes(sequences=sequences, cache=tmp_path / "audio.npz", key=key, **common)
    second = expression_codes.expression_codes(sequences=sequences[:1], cache=tmp_path / "encoder.npz", key=key,
                                               **common)  # fmt: skip
    np.testing.assert_array_equal(second[0].codes, first[0].codes)
    np.testing.assert_array_equal(cached_codes(tmp_path / "encoder.npz", key, sequences[:1])[0].codes,
                                  codes[sequences[0].key])  # fmt: skip
    other = [dataclasses.replace(sequences[0], name="sen_99")]  # never coded: computed, not made up
    assert expression_codes._in_process_codes(tmp_path / "x.npz", key, other) is None
    assert expression_codes._in_process_codes(tmp_path / "x.npz", f"{tmp_path}/prior@6", sequences) is None


def _run(folder: Path, stage: str, preset: str = "tiny") -> Path:
    """A training workdir as `uhap train <stage>` leaves it: the stage's config.json and a finished checkpoint."""
    from uhap_jax.config_utils import load_config, save_config

    (folder / "checkpoints" / "5").mkdir(parents=True)
    (folder / "checkpoints" / "5" / "state").write_bytes(np.random.default_rng().bytes(64))
    save_config(load_config(f"{stage}:{preset}", []), folder / "config.json")
    return folder


@pytest.mark.parametrize(("stage", "preset"), [("prior", "tiny"), ("prior", "base"), ("prior", "large"),
                                               ("audio", "tiny"), ("audio", "base"), ("audio", "large"),
                                               ("encoder", "tiny"), ("encoder", "base")])  # fmt: skip
def test_workdir_stage_tells_each_training_stage_by_its_saved_config(tmp_path, stage, preset):
    assert output_dirs.workdir_stage(_run(tmp_path / stage, stage, preset)) == stage


def test_workdir_stage_knows_older_configs_and_no_others(tmp_path):
    encoder = _run(tmp_path / "encoder", "encoder")
    config = json.loads((encoder / "config.json").read_text())
    del config["localiser"]  # an encoder run from before the head localiser
    (encoder / "config.json").write_text(json.dumps(config))
    assert output_dirs.workdir_stage(encoder) == "encoder"
    for name, text in (("empty", "{}"), ("list", "[1, 2]"), ("torn", '{"model": {"uv_res'), ("not_ours", '{"a": 1}'),
                       ("demo", json.dumps({"prior_config": "configs/prior.py:tiny", "model": 3}))):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        assert output_dirs.workdir_stage(tmp_path / name) is None, name
    assert output_dirs.workdir_stage(tmp_path / "missing") is None


def test_an_interrupted_sweep_leaves_its_marker_first_so_a_rerun_resumes(tmp_path, monkeypatch):
    from uhap_jax.config_utils import load_config
    from uhap_jax.eval import sweep

    def preempted():
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "plan_jobs", lambda config: [])
    monkeypatch.setattr(sweep, "single_device_mesh", preempted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(load_config("sweep:tiny", []), tmp_path / "sweep")
    (tmp_path / "sweep" / "expression_codes").mkdir()  # what its jobs write before the end
    assert output_dirs.check_resumable(tmp_path / "sweep", "parts", "uhap sweep") == tmp_path / "sweep"


def test_check_workdir_starts_or_resumes_only_where_no_data_is_lost(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _run(tmp_path / "prior_run", "prior")
    for folder in (tmp_path / "new", tmp_path / "empty", run):
        assert output_dirs.check_workdir(folder, "prior") == folder
    for stage, words in (("audio", "holds a `uhap train prior` run"), ("encoder", "`uhap train encoder` a folder")):
        with pytest.raises(UsageError, match=words):
            output_dirs.check_workdir(run, stage)
    with pytest.raises(ValueError, match="unknown training stage"):
        output_dirs.check_workdir(tmp_path / "new", "decoder")
    (tmp_path / "sweep" / "parts").mkdir(parents=True)
    (tmp_path / "sweep" / "results.csv").write_text("job\n0\n")
    for folder in (tmp_path / "new", tmp_path / "empty", tmp_path / "sweep"):
        assert output_dirs.check_resumable(folder, "parts", "uhap sweep") == folder
    with pytest.raises(UsageError, match="no parts"):
        output_dirs.check_resumable(run, "parts", "uhap sweep")
    with pytest.raises(UsageError, match="is a file"):
        output_dirs.check_resumable(run / "config.json", "parts", "uhap sweep")


def test_train_refuses_a_workdir_that_would_cost_data_and_changes_nothing(tmp_path, capsys, rng):
    """`uhap train --workdir`: a folder of the user's own files (its config.json would be overwritten), another
    stage's run, an input or a folder inside one, a file: one line naming --workdir, status 2, every byte kept."""
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "config.json").write_bytes(rng.bytes(256))
    (mine / "notes.txt").write_text("user data")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("user data")
    prior = _run(tmp_path / "prior_run", "prior")
    data = tmp_path / "capture"
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    (tmp_path / "a_file").write_bytes(rng.bytes(32))
    cases = [
        (["train", "prior", "--workdir", str(mine)], ["--workdir", "config.json is not one `uhap train` wrote"]),
        (["train", "prior", "--workdir", str(notes)], ["--workdir", "no `uhap train` run", "remove"]),
        (["train", "encoder", "--workdir", str(prior), f"--config.prior_workdir={prior}"], ["is the input"]),
        (
            [
                "train",
                "audio",
                "--workdir",
                str(_run(tmp_path / "encoder_run", "encoder")),
                f"--config.prior_workdir={prior}",
            ],
            ["holds a `uhap train encoder` run"],
        ),  # fmt: skip
        (["train", "prior", "--workdir", str(data / "runs"), f"--config.data.root={data}"], ["lies inside the input"]),
        (["train", "prior", "--workdir", str(tmp_path), f"--config.data.root={data}"], ["contains the input"]),
        (["train", "prior", "--workdir", str(tmp_path / "a_file")], ["is a file"]),
    ]
    before, tree = _files(tmp_path), sorted(tmp_path.rglob("*"))
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --workdir"), lines
        assert all(word in lines[0] for word in words), (words, lines[0])
    assert _files(tmp_path) == before and sorted(tmp_path.rglob("*")) == tree


def test_demo_and_sweep_refuse_a_folder_of_other_files_and_eval_an_encoder_run(tmp_path, capsys, rng):
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "results.csv").write_bytes(rng.bytes(64))
    encoder = _run(tmp_path / "encoder_run", "encoder")
    before = _files(tmp_path)
    for command in ("demo", "sweep"):
        assert cli.main([command, "--workdir", str(mine)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--workdir {mine}" in err[0] and f"no `uhap {command}` run" in err[0], err
    assert cli.main(["eval", "--workdir", str(encoder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an encoder workdir" in err[0] and "benchmark.encoder" in err[0], err
    assert _files(tmp_path) == before
