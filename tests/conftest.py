"""Test setup: 8 fake CPU devices, so that sharding tests run anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh, logged seed per test: inputs are random, never zeros, yet reproducible from the log."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"[{request.node.name}] seed={seed}")
    return np.random.default_rng(seed)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
