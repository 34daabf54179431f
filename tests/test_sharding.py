"""Mesh, sharding rules, batch placement, and multi-process start-up (2 CPU processes through gloo)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from uhap_jax.train.distributed import add_distributed_args, maybe_initialize_distributed
from uhap_jax.train.mesh import make_mesh, put_batch
from uhap_jax.train.sharding import tree_shardings

TOY_MAIN = Path(__file__).resolve().parent / "train_toy_main.py"


def specs(tree, mesh, rules=(), min_shard_size=64):
    return jax.tree.map(lambda s: s.spec, tree_shardings(tree, mesh, rules, min_shard_size))


def test_make_mesh_shapes_and_errors():
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(make_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh(devices=jax.devices()[:2]).shape) == {"data": 2, "fsdp": 1}
    with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide the 8 devices"):
        make_mesh(fsdp=3)
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 != 8 devices"):
        make_mesh(data=2, fsdp=2)


def test_auto_rule_shards_the_largest_divisible_dim_and_replicates_small_leaves():
    mesh = make_mesh(data=2, fsdp=4)
    tree = {
        "dense": {"kernel": jax.ShapeDtypeStruct((12, 32), np.float32)},  # 32 divides by 4, 12 by 4 too
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 6), np.float32)},  # 6 does not divide
        "odd": jax.ShapeDtypeStruct((9, 15), np.float32),  # nothing divides: replicated
        "bias": jax.ShapeDtypeStruct((32,), np.float32),  # below min_shard_size
        "step": jax.ShapeDtypeStruct((), np.int32),
    }
    got = specs(tree, mesh)
    assert got["dense"]["kernel"] == PartitionSpec(None, "fsdp")
    assert got["conv"]["kernel"] == PartitionSpec(None, None, "fsdp", None)
    assert got["odd"] == got["bias"] == got["step"] == PartitionSpec()
    assert specs(tree, make_mesh(fsdp=1))["dense"]["kernel"] == PartitionSpec()


def test_explicit_rules_first_match_wins_and_reach_optimiser_moments():
    mesh = make_mesh(data=4, fsdp=2)
    kernel = jax.ShapeDtypeStruct((64, 48), np.float32)
    tree = {
        "params": {"decoder": {"kernel": kernel}, "encoder": {"kernel": kernel}},
        "opt_state": {"mu": {"decoder": {"kernel": kernel}, "encoder": {"kernel": kernel}}},
    }
    rules = ((r"decoder/kernel$", ("fsdp", None)), (r"kernel$", "replicate"), (r".*", ("data",)))
    got = specs(tree, mesh, rules)
    for part in (got["params"], got["opt_state"]["mu"]):
        assert part["decoder"]["kernel"] == PartitionSpec("fsdp", None)
        assert part["encoder"]["kernel"] == PartitionSpec()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (("fsdp", None, None), r"w: spec \('fsdp', None, None\) has more entries than shape \(10, 8\)"),
        ((("data", "fsdp"), None), r"w: dim 10 of shape \(10, 8\) is not divisible by 8"),
        (("model", None), r"w: unknown mesh axes \['model'\]"),
        ("shard-everything", r"w: spec 'shard-everything' is not 'auto', 'replicate' or a tuple"),
    ],
)
def test_bad_rules_name_the_parameter(rule, message):
    with pytest.raises(ValueError, match=message):
        tree_shardings({"w": jax.ShapeDtypeStruct((10, 8), np.float32)}, make_mesh(fsdp=2), ((r"^w$", rule),))


def test_put_batch_keeps_device_arrays_on_the_devices(rng):
    """A batch already on the devices (device prefetch) is used as it is, or resharded on the devices: never
    copied back through the host."""
    mesh = make_mesh(data=8)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = rng.normal(size=(16, 3)).astype(np.float32)
    placed = jax.device_put(x, sharding)
    elsewhere = jax.device_put(x, jax.devices()[3])
    with jax.transfer_guard_device_to_host("disallow"):
        out = put_batch({"placed": placed, "elsewhere": elsewhere}, mesh)
    assert out["placed"] is placed
    assert out["elsewhere"].sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_array_equal(np.asarray(out["elsewhere"]), x)


def test_put_batch_builds_global_arrays_split_over_all_devices(rng):
    mesh = make_mesh(data=4, fsdp=2)
    batch = {"x": rng.normal(size=(16, 5)).astype(np.float32), "ids": rng.integers(0, 9, size=(16,))}
    placed = put_batch(batch, mesh)
    assert placed["x"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert {shard.data.shape for shard in placed["x"].addressable_shards} == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
    np.testing.assert_array_equal(np.asarray(placed["ids"]), batch["ids"])
    with pytest.raises(ValueError, match=r"\['y'\] has shape \(6, 2\).*divisible by the 8 devices"):
        put_batch({"y": batch["x"][:6, :2]}, mesh)


def test_distributed_flags_and_environment(monkeypatch):
    for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    assert maybe_initialize_distributed() is False
    with pytest.raises(ValueError, match="without --coordinator_address"):
        maybe_initialize_distributed(num_processes=2, process_id=0)
    parser = argparse.ArgumentParser()
    add_distributed_args(parser)
    args = parser.parse_args(["--coordinator_address", "h:1234", "--num_processes", "4", "--process_id", "3"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("h:1234", 4, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_and_checkpoint_together(tmp_path):
    """Two processes of 4 devices each form one 8-device mesh (gloo collectives), train, and checkpoint."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"localhost:{_free_port()}"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(TOY_MAIN),
                str(tmp_path),
                "--steps",
                "4",
                "--checkpoint_every",
                "2",
                "--coordinator_address",
                address,
                "--num_processes",
                "2",
                "--process_id",
                str(pid),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=150)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
    assert "running as process 1 of 2 processes (4 local / 8 global devices)" in outputs[1]
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # progress lines: process 0 only
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    # Each process's global batch slice came from its own half of the batch.
    assert rows[0]["index_sum"] == sum(int(i) for i in np.random.default_rng([0, 0]).choice(4096, 16, replace=False))
    for step in ("2", "4"):
        data_dir = tmp_path / "checkpoints" / step / "data"
        assert sorted(p.name for p in data_dir.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
