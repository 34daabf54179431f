"""Parameter sharding from rules kept in config: regex on the parameter path -> PartitionSpec.

A rule is `(pattern, spec)`. `pattern` is searched (`re.search`) in the leaf's "/"-joined path, e.g.
`params/decoder/layers/0/kernel`; optimiser moments live at paths that end the same way
(`opt_state/0/mu/decoder/layers/0/kernel`), so a rule anchored at the end (`kernel$`) shards a parameter
and its moments alike. The first matching rule wins. `spec` is one of
  - a tuple with one entry per dimension: a mesh axis name, a tuple of axis names, or None;
  - "replicate";
  - "auto": shard the largest dimension that the `fsdp` axis divides over `fsdp`, if the leaf has at
    least `min_shard_size` elements, else replicate. Leaves that match no rule get "auto" too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rule = tuple[str, Any]


def path_str(path: Sequence[Any]) -> str:
    """`(DictKey('a'), SequenceKey(0), GetAttrKey('mu'))` -> `a/0/mu`."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _auto_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> PartitionSpec:
    size = 1
    for dim in shape:
        size *= dim
    if fsdp_size == 1 or size < min_shard_size:
        return PartitionSpec()
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    largest = max(candidates, key=lambda d: (shape[d], -d))
    return PartitionSpec(*[("fsdp" if d == largest else None) for d in range(len(shape))])


def _checked_spec(name: str, shape: tuple[int, ...], spec: Sequence[Any], mesh: Mesh) -> PartitionSpec:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule for {name}: spec {tuple(spec)} has more entries than shape {shape}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"sharding rule for {name}: unknown mesh axes {unknown}; mesh has {dict(mesh.shape)}")
        parts = 1
        for a in axes:
            parts *= mesh.shape[a]
        if dim % parts:
            raise ValueError(f"sharding rule for {name}: dim {dim} of shape {shape} is not divisible by {parts}")
    return PartitionSpec(*spec)


def spec_for(
    name: str, shape: tuple[int, ...], rules: Sequence[Rule], mesh: Mesh, min_shard_size: int
) -> PartitionSpec:
    """The PartitionSpec of one leaf, by the first rule whose pattern is found in `name`."""
    spec = next((rule_spec for pattern, rule_spec in rules if re.search(pattern, name)), "auto")
    if spec == "replicate":
        return PartitionSpec()
    if spec == "auto":
        return _auto_spec(tuple(shape), mesh.shape.get("fsdp", 1), min_shard_size)
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise ValueError(f"sharding rule for {name}: spec {spec!r} is not 'auto', 'replicate' or a tuple")
    return _checked_spec(name, tuple(shape), spec, mesh)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = (), min_shard_size: int = 2**14) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs), by path and rules."""
    rules = [(str(p), s) for p, s in rules]

    def one(path: tuple, leaf: Any) -> NamedSharding:
        spec = spec_for(path_str(path), tuple(leaf.shape), rules, mesh, min_shard_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Copy a host-replicated tree (the same values on every process) onto `shardings`, across processes.

    `jax.device_put` cannot target devices of other processes; each process here supplies the shards
    its own devices hold, from its own copy. PRNG keys travel as their key data.
    """

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)
