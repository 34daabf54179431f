"""Multi-host start-up: JAX's own multi-controller runtime, started when flags or the cluster ask for it."""

from __future__ import annotations

import argparse
import logging
import os

import jax

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


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Call `jax.distributed.initialize` when flags are given or the environment asks; return whether it ran.

    `timeout_s` bounds both the wait for every process to join and the heartbeat: a missing or dead process
    makes the others fail with JAX's error instead of hanging.

    Must run before anything touches JAX devices. Missing values are auto-detected by JAX from the
    cluster environment. CPU cross-process collectives use gloo, which is set first (it only affects
    the CPU backend, so it is harmless on GPU/TPU).
    """
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
        "--distributed_timeout",
        type=int,
        default=300,
        help="seconds to wait for every process to join, and heartbeat timeout",
    )


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`maybe_initialize_distributed` with the flags that `add_distributed_args` added."""
    return maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id, timeout_s=args.distributed_timeout
    )
