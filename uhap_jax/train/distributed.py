"""Multi-host start-up: JAX's own multi-controller runtime, started when flags or the cluster ask for it.

The coordination service and the collectives (gloo on CPU, NCCL on GPU) neither authenticate nor encrypt: run
multi-host jobs on a trusted network only. The coordinator binds to the address it is given (not every
interface) unless `--coordinator_bind_address` says otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

import jax

from uhap_jax.config_utils import UsageError

logger = logging.getLogger(__name__)


def _int_env(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def cluster_requests_distributed() -> bool:
    """True when the environment describes a job of several processes that JAX can auto-detect.

    SLURM (several tasks), Open MPI (several ranks), multi-host Cloud TPU, or an explicit
    `JAX_COORDINATOR_ADDRESS`. A single-process job on any of them needs no coordination service.
    """
    if "SLURM_JOB_ID" in os.environ and max(_int_env("SLURM_NTASKS"), _int_env("SLURM_NPROCS")) > 1:
        return True
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


MAX_TIMEOUT_S = 7 * 24 * 3600


def parse_host_port(address: str, flag: str) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port` -> (host, port); anything else is a ValueError naming `flag`."""
    host, sep, port = address.rpartition(":")
    example = "e.g. 10.0.0.1:1234, node0:1234 or [fe80::1]:1234"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {address!r}: expected host:port with a port in 1..65535 ({example})")
    if host.startswith("["):
        if not host.endswith("]"):
            raise UsageError(f"{flag} {address!r}: an unclosed [ipv6] host ({example})")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise UsageError(f"{flag} {address!r}: {host[1:-1]!r} is not an IPv6 address ({example})") from None
    elif ":" in host:
        raise UsageError(f"{flag} {address!r}: write an IPv6 host in brackets ({example})")
    return host, int(port)


def check_distributed_args(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, timeout_s: int,
    bind_address: str | None = None,
) -> None:  # fmt: skip
    """Refuses malformed multi-host flags with one line each, before JAX sees them."""
    if coordinator_address is not None:
        parse_host_port(coordinator_address, "--coordinator_address")
    if bind_address is not None:
        parse_host_port(bind_address, "--coordinator_bind_address")
    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num_processes {num_processes}: must be at least 1")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise UsageError(f"--process_id {process_id}: must be in [0, --num_processes)")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise UsageError(f"--distributed_timeout {timeout_s}: must be a number of seconds in 1..{MAX_TIMEOUT_S}")


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    bind_address: str | None = None,
) -> bool:
    """Call `jax.distributed.initialize` when flags are given or the environment asks; return whether it ran.

    `timeout_s` bounds both the wait for every process to join and the heartbeat: a missing or dead process
    makes the others fail with JAX's error instead of hanging. Process 0's coordinator listens on
    `bind_address`, by default on `coordinator_address` itself (JAX alone would listen on every interface).

    Must run before anything touches JAX devices. Missing values are auto-detected by JAX from the
    cluster environment. CPU cross-process collectives use gloo, which is set first (it only affects
    the CPU backend, so it is harmless on GPU/TPU).
    """
    check_distributed_args(coordinator_address, num_processes, process_id, timeout_s, bind_address)
    flags_given = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not flags_given and not cluster_requests_distributed():
        return False
    if jax.distributed.is_initialized():
        logger.info("jax.distributed is already initialised; not initialising again")
        return True
    if flags_given and coordinator_address is None and not cluster_requests_distributed():
        raise ValueError(
            "--num_processes/--process_id were given without --coordinator_address "
            "(and no cluster environment to detect it from)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=timeout_s,
        coordinator_bind_address=bind_address or coordinator_address,
    )
    logger.info(
        "running as process %d of %d processes (%d local / %d global devices)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Add `--coordinator_address --num_processes --process_id` to a command's parser."""
    group = parser.add_argument_group("multi-host (optional; SLURM/TPU/Open MPI are auto-detected)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0's coordinator")
    group.add_argument("--num_processes", type=int, default=None, help="total number of processes")
    group.add_argument("--process_id", type=int, default=None, help="this process's index, 0-based")
    group.add_argument(
        "--coordinator_bind_address",
        default=None,
        help="host:port process 0's coordinator listens on (default: --coordinator_address; [::]:PORT listens on "
        "every interface). Coordinator and collectives are unauthenticated: use a trusted network",
    )
    group.add_argument(
        "--distributed_timeout",
        type=int,
        default=300,
        help="seconds to wait for every process to join, and heartbeat timeout",
    )


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`maybe_initialize_distributed` with the flags that `add_distributed_args` added."""
    return maybe_initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        timeout_s=args.distributed_timeout,
        bind_address=args.coordinator_bind_address,
    )
