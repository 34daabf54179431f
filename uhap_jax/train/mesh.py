"""The device mesh (`data`, `fsdp`) and the placement of host batches onto it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
# The batch's leading dimension is split over every device: data parallel across `data`, and FSDP shards
# see different examples too, as in ZeRO-3.
BATCH_SPEC = PartitionSpec(MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2D mesh over `devices` (default: all); `data=-1` takes every device that `fsdp` leaves.

    Axes are `Auto`, so XLA propagates shardings through model code that never names them.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} != {len(devices)} devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh devices, the rest replicated."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Turn each process's local batch (numpy or jax arrays) into global arrays sharded over the batch dim.

    Each process passes its own slice; the global batch is their concatenation. Arrays that are
    already global (a loader that built them) are moved to the batch sharding if they are elsewhere.
    """
    sharding = batch_sharding(mesh)
    devices_per_process = mesh.devices.size // jax.process_count()

    def put(path: tuple, leaf: Any) -> jax.Array:
        # A global array (what a device-prefetching loader hands over) stays on the devices: pulling it back to
        # the host and up again cost the base step ~40 ms a batch (issue 19). Only in a multi-process run is a
        # fully addressable array this process's slice.
        if isinstance(leaf, jax.Array) and (not leaf.is_fully_addressable or jax.process_count() == 1):
            return leaf if leaf.sharding.is_equivalent_to(sharding, leaf.ndim) else jax.device_put(leaf, sharding)
        local = np.asarray(leaf)
        if local.ndim == 0 or local.shape[0] % devices_per_process:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {local.shape}: its leading (batch) "
                f"dimension must be divisible by the {devices_per_process} devices of this process"
            )
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree_util.tree_map_with_path(put, batch)
