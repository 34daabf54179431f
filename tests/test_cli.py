"""The `uhap` CLI and the config loader."""

import subprocess
import sys

import pytest

from uhap_jax import cli
from uhap_jax.config_utils import load_config

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


def test_load_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(CONFIG)
    with pytest.raises(KeyError, match="train.nope"):
        load_config(f"{path}:tiny", ["train.nope=1"])
    with pytest.raises(TypeError, match="bool"):
        load_config(f"{path}:tiny", ["train.bf16=3"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
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
