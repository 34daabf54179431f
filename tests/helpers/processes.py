"""Subprocesses of the test suite: a free port for a JAX coordinator, and a CPU environment of 4 devices."""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    """The environment of a 4-device CPU JAX process (2 of them make the 8 devices of the tests)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 2 processes x 4 = 8 devices
    return env
