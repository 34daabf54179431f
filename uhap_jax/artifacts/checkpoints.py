"""Checkpoints in `<workdir>/checkpoints/<step>/`: the train state plus each process's data-iterator state.

Built on orbax's asynchronous `CheckpointManager`. Restoring takes abstract targets that carry shardings,
so a checkpoint written on one mesh loads onto any other (a different device count or mesh shape). The Trainer
resumes the whole state; `restore_latest` reads only the parameters, for inference and evaluation (no optimiser).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)


def _state_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves an iterator's `get_state()` (a JSON-able object or bytes, as grain returns) per process.

    Each process feeds its own shard of the data, so each keeps its own file. The state is taken
    synchronously inside `save`, at the step being checkpointed, never later in a background thread.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        state = args.iterator.get_state()
        if isinstance(state, bytes):
            record = {"encoding": "base64", "state": base64.b64encode(state).decode("ascii")}
        else:
            record = {"encoding": "json", "state": state}
        _state_file(directory).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> Any:
        path = _state_file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no data-iterator state for this process; the checkpoint was written by a "
                "different number of processes"
            )
        try:
            record = json.loads(path.read_text())
            state = record["state"]
            if record["encoding"] == "base64":
                state = base64.b64decode(state)
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: corrupt data-iterator state ({err})") from err
        args.iterator.set_state(state)
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target for `tree`'s layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """`<workdir>/checkpoints/<step>/{state,data}`, asynchronous, keeping the last `keep` steps."""

    def __init__(self, workdir: str | Path, keep: int = 3, use_async: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=use_async,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete_after(self, step: int) -> None:
        """Remove the checkpoints of later steps (a rollback discards them before the steps are trained again)."""
        self.wait()
        for later in self.all_steps():
            if later > step:
                self._manager.delete(later)

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Start writing `step`; returns once the arrays are copied off the devices."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataIteratorSave(data_iterator)),
            force=True,
        )
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Load `step` onto the shardings in `abstract_state`; rewind `data_iterator`, if given.

        Without an iterator only the state is read (export, evaluation).
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = DataIteratorRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items)).state

    def state_keys(self, step: int) -> set[str]:
        """The top-level keys of the train state saved at `step` (read from its metadata, no arrays)."""
        return set(_saved_tree(self.directory / str(step) / "state"))

    def wait(self) -> None:
        """Block until every pending asynchronous write is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _saved_tree(state_dir: Path) -> dict:
    """The metadata tree (keys and array metadata, no arrays) of a saved train state."""
    with ocp.PyTreeCheckpointer() as reader:
        metadata = reader.metadata(state_dir)
    return getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)


def single_device_mesh() -> jax.sharding.Mesh:
    """A mesh of this process's first device: where restored models for inference and evaluation live."""
    return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices()[:1])


def restore_latest(workdir: str | Path, model: nnx.Module, mesh: jax.sharding.Mesh, *, what: str,
                   expect: str = "") -> tuple[nnx.Module, int]:  # fmt: skip
    """`model` (an nnx.Module of the trained structure) holding the parameters of the latest checkpoint that the
    Trainer wrote in `workdir`, replicated on `mesh`, and its step. Only the parameters are read (no optimiser
    state is needed or loaded): their moving average where the run kept one (`train.ema_decay`), the raw ones
    otherwise; whatever mesh or process count wrote the checkpoint, they restore here. `what`
    and `expect` word the errors: a missing checkpoint names `what`, a mismatch says that it must match `expect`."""
    workdir = Path(workdir)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.to_pure_dict(params))  # fmt: skip
    checkpointer = Checkpointer(workdir, use_async=False)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: holds no finished {what} checkpoint")
    state_dir = checkpointer.directory / str(step) / "state"
    key = "ema_params" if "ema_params" in _saved_tree(state_dir) else "params"
    with ocp.PyTreeCheckpointer() as reader:
        abstract = {key: shapes}
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        try:
            state = reader.restore(state_dir, args=ocp.args.PyTreeRestore(abstract, restore_args, partial_restore=True))
        except (ValueError, KeyError) as error:
            message = f"{checkpointer.directory / str(step)}: does not match {expect or what}"
            raise ValueError(f"{message}: {error}") from error
    nnx.replace_by_pure_dict(params, state[key])
    return nnx.merge(graphdef, params, rest), step
