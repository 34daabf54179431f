"""`import uhap_jax` turns XLA CPU's YNNPACK fusions off (2x faster small CPU programs), unless the user set it."""

import os
import subprocess
import sys

import pytest

import uhap_jax

PRINT_FLAGS = "import os, uhap_jax, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ.get('XLA_FLAGS'))"


def _flags_after_import(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "UHAP_KEEP_YNN")} | extra_env
    result = subprocess.run([sys.executable, "-c", PRINT_FLAGS], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, f"{uhap_jax.YNN_FLAG}="),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
         f"--xla_force_host_platform_device_count=2 {uhap_jax.YNN_FLAG}="),
        ({"XLA_FLAGS": f"{uhap_jax.YNN_FLAG}=dot"}, f"{uhap_jax.YNN_FLAG}=dot"),  # the user's value wins
        ({"UHAP_KEEP_YNN": "1"}, "None"),
    ],
)  # fmt: skip
def test_ynn_fusions_off_unless_the_user_says(env, expected):
    assert _flags_after_import(env) == expected
