"""The `uhap` CLI and the config loader: every refusal is one `error:` line with the right exit status, and
nothing is created or lost on the way."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from uhap_jax import cli
from uhap_jax.config_utils import UsageError, load_config, read_config
from uhap_jax.train import distributed

REPO = Path(__file__).resolve().parent.parent

CONFIG = """
import ml_collections

def get_config(preset="tiny"):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(steps={"tiny": 10, "base": 1000}[preset], lr=1e-3, bf16=False))
    c.name = preset
    c.sizes = (1, 2)
    return c
"""


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(CONFIG)
    config = load_config(f"{path}:base", ["--config.train.steps=7", "train.lr=2", "sizes=[3, 4]", "name=x"])
    assert config.train.steps == 7 and config.train.lr == 2.0 and isinstance(config.train.lr, float)
    assert config.sizes == (3, 4) and config.name == "x"
    assert load_config(f"{path}:tiny").train.steps == 10


def test_built_in_config_paths_load_from_any_working_directory(tmp_path, monkeypatch):
    """The demo and saved stage configs name `configs/prior.py:tiny`: a user running `uhap` outside the checkout
    must get the built-in file, and a file of that name in the working directory still wins."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/prior.py:tiny", ["train.steps=3"]).train.steps == 3
    (tmp_path / "configs").mkdir()
    mine = "import ml_collections\n\ndef get_config(preset):\n    return ml_collections.ConfigDict({'mine': preset})\n"
    (tmp_path / "configs" / "prior.py").write_text(mine)
    assert load_config("configs/prior.py:tiny").mine == "tiny"
    with pytest.raises(UsageError, match="configs/nope.py"):
        load_config("configs/nope.py:tiny")


def test_load_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(CONFIG)
    with pytest.raises(UsageError, match="train.nope"):
        load_config(f"{path}:tiny", ["train.nope=1"])
    with pytest.raises(UsageError, match="True or False"):
        load_config(f"{path}:tiny", ["train.bf16=3"])
    with pytest.raises(UsageError, match="an integer"):
        load_config(f"{path}:tiny", ["train.steps=abc"])
    with pytest.raises(UsageError, match="an integer"):
        load_config(f"{path}:tiny", ["train.steps=2.5"])
    with pytest.raises(UsageError, match="group of fields"):
        load_config(f"{path}:tiny", ["train=3"])
    with pytest.raises(UsageError, match="tuple"):
        load_config(f"{path}:tiny", ["sizes=3"])
    with pytest.raises(UsageError, match="missing.py"):
        load_config(f"{tmp_path}/missing.py:tiny")


def test_every_registered_command_builds():
    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(cli.COMMAND_MODULES) <= set(subcommands)


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "uhap_jax.cli", "bench", "rasterizer", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--gsplat" in result.stdout


# -------------------- one error line, exit status, --debug


def _uhap(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


_PERSONALIZE = ["personalize", "--prior", "{w}", "--encoder", "{w}", "--audio-model", "{w}", "--video", "{w}",
                "--out", "{w}/avatar"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "status", "fragments"),
    [
        (["train", "prior", "--workdir", "{w}", "--config.train.steps=abc"], 2, ["--config.train.steps", "integer"]),
        (["train", "prior", "--workdir", "{w}", "--config.train.nope=1"], 2, ["--config.train.nope", "steps"]),
        (["train", "prior", "--workdir", "{w}", "--config.nope.deeper=1"], 2, ["--config.nope.deeper"]),
        (["train", "prior", "--workdir", "{w}", "--config", "prior:huge"], 2, ["prior:huge", "tiny"]),
        (["train", "prior", "--workdir", "{w}", "--config", "nosuchstage"], 2, ["nosuchstage", "prior"]),
        (["train", "prior", "--workdir", "{w}", "--config.data.root={w}/no_data"], 1, ["--config.data.root"]),
        (["train", "audio", "--workdir", "{w}"], 2, ["--config.prior_workdir"]),
        (["train", "audio", "--workdir", "{w}", "--config.prior_workdir={w}/p"], 1, ["--config.prior_workdir"]),
        (["train", "encoder", "--workdir", "{w}", "--config.prior_workdir={w}/p"], 1, ["--config.prior_workdir"]),
        (["eval", "--workdir", "{w}", "--config.train.steps=3"], 2, ["uhap eval", "--config.train.steps=3"]),
        (["animate", "--avatar", "{w}", "--audio", "a.wav", "--out", "o.mp4", "--config.x=1"], 2, ["--config.x"]),
        (
            ["data", "import", "--format", "nersemble", "--src", "{w}", "--out", "{w}/o", "--config.a=1"],
            2,
            ["uhap data import"],
        ),
        (["export", "--workdir", "{w}"], 2, ["--out", "uhap export --help"]),
        (["export", "--workdir", "{w}", "--out", "{w}/b", "--nope"], 2, ["--nope"]),
        (
            ["animate", "--avatar", "{w}/none", "--audio", "a.wav", "--out", "o.mp4"],
            1,
            ["--avatar", "uhap avatar make"],
        ),
        (
            ["animate", "--avatar", "{w}", "--audio", "a.wav", "--out", "o.mp4", "--size", "100000"],
            2,
            ["--size", "UHAP_MAX_SIZE=100000"],
        ),
        (
            ["animate", "--avatar", "{w}", "--audio", "a.wav", "--out", "o.mp4", "--batch-size", "0"],
            2,
            ["--batch-size"],
        ),
        (["train", "prior", "--workdir", "{w}", "--coordinator_address", "localhost"], 2, ["host:port"]),
        (["train", "prior", "--workdir", "{w}", "--coordinator_address", "h:99999"], 2, ["1..65535"]),
        (
            ["train", "prior", "--workdir", "{w}", "--coordinator_address", "h:1", "--distributed_timeout", "-1"],
            2,
            ["--distributed_timeout"],
        ),
        (["bench", "animate", "--batch", "1,x"], 2, ["--batch"]),
        (["bench", "animate", "--batch", "1,4,500"], 2, ["--batch 500", "UHAP_MAX_BATCH"]),
        (_PERSONALIZE + ["--config.max_frames=0"], 2, ["--config.max_frames 0", "at least 1"]),
        (_PERSONALIZE + ["--config.max_frames=5000"], 2, ["--config.max_frames 5000", "UHAP_MAX_FRAMES=5000"]),
        (_PERSONALIZE, 1, ["--prior {w}", "uhap train prior"]),
        (
            [
                "avatar",
                "make",
                "--prior-workdir",
                "{w}",
                "--audio-workdir",
                "{w}",
                "--data",
                "{w}",
                "--subject",
                "x",
                "--out",
                "{w}/a",
                "--size",
                "9000",
            ],
            2,
            ["--size 9000", "UHAP_MAX_SIZE"],
        ),
        (["data", "import", "--format", "multiface", "--src", "{w}", "--out", "{w}/o"], 1, ["--src"]),
        (["data", "prepare", "--root", "{w}", "--data-dir", "{w}/d"], 1, ["--root", "uhap data synth"]),
    ],
)
def test_bad_command_lines_get_one_line_and_the_right_status(tmp_path, capsys, argv, status, fragments):
    (tmp_path / "keep.txt").write_text("user data")
    before = _tree(tmp_path)
    got, out, err = _uhap(capsys, *[a.replace("{w}", str(tmp_path / "w")) for a in argv])
    assert got == status, err
    _one_error_line(err, *[f.replace("{w}", str(tmp_path / "w")) for f in fragments])
    assert "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing created


def test_debug_flag_and_environment_show_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["export", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "b")]
    status, _, err = _uhap(capsys, *argv, "--debug")
    assert status == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --workdir")
    monkeypatch.setenv("UHAP_DEBUG", "1")
    status, _, err = _uhap(capsys, *argv)
    assert status == 1 and "Traceback" in err


def test_read_only_commands_create_nothing_and_build_no_model(tmp_path, capsys, monkeypatch):
    """A workdir without checkpoints: eval and export refuse before building a model and leave the folder as it was."""
    from uhap_jax.models.prior import UHAP

    def no_model(*args, **kwargs):
        raise AssertionError("a read-only command built a UHAP before refusing")

    monkeypatch.setattr(UHAP, "__init__", no_model)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    before = _tree(tmp_path)
    for argv in (
        ["eval", "--workdir", str(workdir)],
        ["export", "--workdir", str(workdir), "--out", str(tmp_path / "b")],
    ):
        status, _, err = _uhap(capsys, *argv)
        assert status == 1
        _one_error_line(err, "--workdir", "no finished checkpoint")
    assert _tree(tmp_path) == before and not (workdir / "checkpoints").exists()


def test_export_refuses_to_write_over_its_workdir_or_foreign_folders(tmp_path, capsys, rng):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    payload = rng.normal(size=16).tobytes()
    (workdir / "checkpoints" / "5" / "state").write_bytes(payload)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "me.jpg").write_bytes(payload)
    before = _tree(tmp_path)
    for out, words in ((workdir, "is the input"), (workdir / "bundle", "lies inside the input"),
                       (tmp_path, "contains the input"), (foreign, "not a bundle")):  # fmt: skip
        status, _, err = _uhap(capsys, "export", "--workdir", str(workdir), "--out", str(out))
        assert status == 2
        _one_error_line(err, "--out", words)
    assert _tree(tmp_path) == before
    assert (workdir / "checkpoints" / "5" / "state").read_bytes() == payload


def test_out_of_memory_becomes_a_line_with_the_size_asked():
    from jax.errors import JaxRuntimeError

    device = JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 46849277952 bytes.")
    line = cli.describe(device)
    assert "out of memory" in line and "43.63 GiB" in line and "--batch-size" in line
    try:
        np.empty(2**42, np.float64)  # 32 TiB: more than any machine this runs on, so malloc refuses
    except MemoryError as error:
        host = cli.describe(error)
    assert "out of memory" in host and "host memory" in host and "32.0 TiB" in host
    assert cli.out_of_memory_message(ValueError("bad value")) is None


def test_startup_is_quiet_but_keeps_our_progress_lines():
    """transformers' "PyTorch was not found" and JAX's TPU probe are not shown; our own INFO lines are."""
    script = textwrap.dedent("""
        import logging
        from uhap_jax import cli
        from uhap_jax.commands import common
        cli._quiet_libraries()
        common.log_to_stdout()
        import transformers, jax
        jax.devices()
        logging.getLogger("uhap_jax.progress").info("our progress line")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY", "JAX_PLATFORMS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "our progress line" and result.stderr.strip() == "", result


# -------------------- multi-host flags


@pytest.mark.parametrize(
    ("address", "ok"),
    [("10.0.0.1:1234", True), ("node0:80", True), ("[::1]:1234", True), ("localhost", False), (":1234", False),
     ("h:0", False), ("h:70000", False), ("h:12a", False), ("::1:1234", False), ("[nothex]:1", False)],
)  # fmt: skip
def test_host_port_is_validated(address, ok):
    if ok:
        host, port = distributed.parse_host_port(address, "--coordinator_address")
        assert f"{host}:{port}" == address
    else:
        with pytest.raises(UsageError, match="--coordinator_address"):
            distributed.parse_host_port(address, "--coordinator_address")


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                found.append(address.rsplit(":", 1)[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's socket tables")
def test_coordinator_listens_on_the_given_address_only(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from uhap_jax.train.distributed import maybe_initialize_distributed
        maybe_initialize_distributed("127.0.0.1:{port}", 1, 0, timeout_s=30)
        lines = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            lines += Path(table).read_text().splitlines()[1:]
        print(json.dumps(lines))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    listening = []
    for line in json.loads(result.stdout.strip().splitlines()[-1]):
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            listening.append(fields[1].rsplit(":", 1)[0])
    # 127.0.0.1 as /proc/net/tcp writes it (little-endian hex), or its IPv4-mapped IPv6 form; never 0.0.0.0 / ::.
    assert listening and all(a in ("0100007F", "0000000000000000FFFF00000100007F") for a in listening), listening


# -------------------- config.json of a resumed run


def _toy_stage(config, workdir):
    """A real (small) training stage: a linear model whose width comes from the config, on the real Trainer."""
    import grain
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from uhap_jax.train.loop import Trainer, default_config

    model = nnx.Linear(4, config.model.width, rngs=nnx.Rngs(0))
    inputs = np.random.default_rng(config.seed).normal(size=(64, 8, 4)).astype(np.float32)
    source = [{"x": x} for x in inputs]  # batches of 8: one row per CPU device of the tests
    data = iter(grain.MapDataset.source(source).to_iter_dataset())
    train_config = default_config()
    train_config.steps = config.train.steps
    train_config.async_checkpoints = False

    def loss_fn(model, batch, rng):
        return jnp.mean(model(batch["x"]) ** 2), {}

    trainer = Trainer(train_config, model, optax.sgd(1e-3), loss_fn, data, workdir)
    try:
        return trainer.run(), {}
    finally:
        trainer.close()


def _toy_config(width: int, steps: int, seed: int):
    import ml_collections

    return ml_collections.ConfigDict({"model": {"width": width}, "train": {"steps": steps}, "seed": seed})


def test_config_json_is_replaced_only_after_the_resume_check(tmp_path, rng):
    from uhap_jax.commands.train import train_saving_config

    workdir = tmp_path / "run"
    seed = int(rng.integers(1 << 30))
    train_saving_config(_toy_stage, _toy_config(3, 2, seed), workdir)
    assert read_config(workdir / "config.json").model.width == 3
    saved = (workdir / "config.json").read_text()
    with pytest.raises(ValueError):  # another model shape: the checkpoint does not restore into it
        train_saving_config(_toy_stage, _toy_config(5, 4, seed), workdir)
    assert (workdir / "config.json").read_text() == saved
    train_saving_config(_toy_stage, _toy_config(3, 4, seed), workdir)  # same shape, more steps: resumes, then saves
    assert read_config(workdir / "config.json").train.steps == 4
    assert not [p for p in workdir.iterdir() if p.name.startswith(".config.json")]  # no temp file left


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_data_synth_starts_xla_cpu_on_one_core_and_gives_the_cores_back():
    """`uhap data synth` starts JAX's CPU client with a one-core thread pool (its many small ops ran ~1.7x the CPU
    time handed between cores), and every thread of the process may use all cores afterwards."""
    script = textwrap.dedent("""
        import os
        from uhap_jax.commands import data
        cores = os.sched_getaffinity(0)
        data.start_jax_cpu_on_one_core()
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
        print(names.count("tf_XLAEigen"), all(os.sched_getaffinity(t) == cores for t in tasks))
    """)
    # One CPU device, as `uhap data synth` runs (the tests' 8 fake devices get a thread each).
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]


def test_a_foreign_kernels_package_is_named_in_one_line(monkeypatch, tmp_path):
    """Hugging Face's `kernels` (a dependency of transformers >= 5.25) shadowing our rasterizer is refused with the
    fix; our own package passes."""
    import importlib.machinery
    import importlib.util

    import uhap_jax

    uhap_jax._own_kernels()  # the checkout's own kernels
    origin = str(tmp_path / "site-packages/kernels/__init__.py")
    foreign = importlib.machinery.ModuleSpec("kernels", None, origin=origin)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: foreign)
    with pytest.raises(ImportError, match=r"resolves to .*site-packages/kernels/__init__\.py.*transformers<5\.25"):
        uhap_jax._own_kernels()
