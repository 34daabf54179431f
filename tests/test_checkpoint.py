"""Checkpoints: restore onto other meshes, data-iterator state, retention, clear errors on bad files."""

from __future__ import annotations

import logging

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers.models import host_tree, small_config
from jax.sharding import NamedSharding, PartitionSpec
from train_toy_main import ToyData, loss_fn, make_model

from uhap_jax.artifacts.checkpoints import Checkpointer, abstract_like, restore_latest
from uhap_jax.train.loop import Trainer
from uhap_jax.train.mesh import make_mesh


def test_save_on_eight_devices_restore_on_one_and_on_another_mesh(tmp_path, rng):
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)

    def trainer_on(mesh):
        return Trainer(
            small_config(steps=4),
            make_model(seed),
            optax.adam(1e-2),
            loss_fn,
            data.iterator(),
            tmp_path,
            mesh=mesh,
        )

    first = trainer_on(make_mesh(data=4, fsdp=2))
    first.run()
    first.close()
    saved = host_tree(first.state)
    next_batch = data.batch(4)

    next_losses = []
    for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(data=2, fsdp=4)):
        trainer = trainer_on(mesh)
        assert trainer.step == 4
        jax.tree.map(np.testing.assert_array_equal, host_tree(trainer.state), saved)
        kernel = trainer.state["params"]["hidden"]["kernel"]
        assert kernel.sharding.mesh.shape == mesh.shape
        if mesh.shape["fsdp"] == 4:
            assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
            assert {shard.data.shape for shard in kernel.addressable_shards} == {(8, 16)}
        # The data iterator was rewound to the checkpoint: its next batch is batch 4.
        np.testing.assert_array_equal(next(trainer.data_iter)["index"], next_batch["index"])
        next_losses.append(float(trainer.train_step(next_batch)["loss"]))
        trainer.close()
    np.testing.assert_allclose(next_losses[0], next_losses[1], rtol=2e-6)


def test_params_only_restore_needs_no_optimizer_and_names_a_mismatch(tmp_path, rng):
    """`restore_latest` reads the parameters of an Adam-trained checkpoint into a fresh model, replicated on one
    device, without building an optimiser; a model of another structure is refused naming the checkpoint."""
    seed = int(rng.integers(1 << 30))
    trainer = Trainer(small_config(steps=3), make_model(seed), optax.adam(1e-2), loss_fn,
                      ToyData(seed, batch_size=16).iterator(), tmp_path, mesh=make_mesh(data=4, fsdp=2))  # fmt: skip
    trainer.run()
    trainer.close()
    trained = host_tree(trainer.state["params"])
    one_device = make_mesh(devices=jax.devices()[:1])
    model, step = restore_latest(tmp_path, make_model(seed + 1), one_device, what="toy")
    assert step == 3
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, host_tree(restored), trained)
    assert not np.array_equal(trained["hidden"]["kernel"], host_tree(make_model(seed + 1).hidden.kernel[...]))
    assert restored["hidden"]["kernel"].sharding.mesh.shape == one_device.shape
    wider = make_model(seed)
    wider.hidden = nnx.Linear(wider.hidden.in_features, 2 * wider.hidden.out_features, use_bias=False,
                              rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match=f"{tmp_path / 'checkpoints' / '3'}: does not match the toy"):
        restore_latest(tmp_path, wider, one_device, what="toy", expect="the toy")
    with pytest.raises(FileNotFoundError, match="holds no finished toy checkpoint"):
        restore_latest(tmp_path / "empty", make_model(seed), one_device, what="toy")


def test_moving_average_follows_a_float64_reference_and_is_what_evaluations_and_exports_read(tmp_path, rng):
    """With `ema_decay`, the state carries the parameters' moving average (decay ramped as (1 + t) / (10 + t)),
    equal to a float64 recurrence over the raw parameters after each step; `eval_model` and `restore_latest`
    read it, not the raw parameters; without it the state has no average."""
    seed, decay = int(rng.integers(1 << 30)), float(rng.uniform(0.5, 0.8))
    data = ToyData(seed, batch_size=16)
    trainer = Trainer(small_config(steps=5, ema_decay=decay), make_model(seed), optax.adam(3e-2), loss_fn,
                      data.iterator(), tmp_path, mesh=make_mesh(data=4, fsdp=2))  # fmt: skip
    reference = jax.tree.map(np.float64, host_tree(trainer.state["params"]))
    for t in range(5):
        trainer.train_step(data.batch(t))
        d = min(decay, (1.0 + t) / (10.0 + t))
        reference = jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, reference, host_tree(trainer.state["params"]))
    average = host_tree(trainer.state["ema_params"])
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7), average, reference)
    raw = host_tree(trainer.state["params"])
    assert np.abs(raw["hidden"]["kernel"] - average["hidden"]["kernel"]).max() > 1e-3  # they differ: a real test
    evaluated = host_tree(nnx.to_pure_dict(nnx.state(trainer.eval_model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, evaluated, average)
    trainer.save()
    trainer.close()
    model, step = restore_latest(tmp_path, make_model(seed + 1), make_mesh(devices=jax.devices()[:1]), what="toy")
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, host_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param))), average)
    plain = Trainer(small_config(), make_model(seed), optax.adam(3e-2), loss_fn, data.iterator(), tmp_path / "plain",
                    mesh=make_mesh(data=4, fsdp=2))  # fmt: skip
    assert "ema_params" not in plain.state
    plain.close()


@pytest.mark.parametrize("factor", [10.0, 0.0])
def test_the_average_leaves_out_a_loss_spike_and_the_raw_parameters_train_on(tmp_path, rng, factor):
    """`ema_skip_loss_factor`: a finite step whose loss is far above the run's typical loss trains the raw
    parameters but leaves the average as it was (and is counted); the next ordinary step moves it again. 0: the
    spike moves the average like any step."""
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)
    trainer = Trainer(small_config(steps=8, ema_decay=0.9, ema_skip_loss_factor=factor), make_model(seed),
                      optax.adam(3e-2), loss_fn, data.iterator(), tmp_path)  # fmt: skip
    for t in range(4):
        trainer.train_step(data.batch(t))
    before = host_tree({k: trainer.state[k] for k in ("params", "ema_params")})
    spiked = data.batch(4)
    spiked["y"] = spiked["y"] * 1e3  # finite, ~1e6 x the loss
    metrics = host_tree(trainer.train_step(spiked))
    after = host_tree({k: trainer.state[k] for k in ("params", "ema_params")})
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite_steps"] == 0
    assert np.abs(after["params"]["hidden"]["kernel"] - before["params"]["hidden"]["kernel"]).max() > 1e-3
    moved = np.abs(after["ema_params"]["hidden"]["kernel"] - before["ema_params"]["hidden"]["kernel"]).max()
    assert metrics["ema_skipped_steps"] == (1 if factor else 0)
    assert (moved == 0.0) if factor else (moved > 1e-4)
    trainer.train_step(data.batch(5))
    later = host_tree(trainer.state["ema_params"])
    assert np.abs(later["hidden"]["kernel"] - after["ema_params"]["hidden"]["kernel"]).max() > 1e-5
    trainer.close()


def _rescale_hidden_units(params: dict, scale: np.ndarray) -> dict:
    """The toy MLP with each hidden unit's BatchNorm scale and bias x `scale` (> 0) and its outgoing weights /
    `scale`: the same function (ReLU is positively homogeneous), other parameters. An average of the two
    parametrisations is neither (its outputs are ~(2 + c + 1/c) / 4 x too large)."""
    params = jax.tree.map(np.array, params)
    params["norm"]["scale"] = params["norm"]["scale"] * scale
    params["norm"]["bias"] = params["norm"]["bias"] * scale
    params["out"]["kernel"] = params["out"]["kernel"] / scale[:, None]
    return params


@pytest.mark.parametrize("factor", [1.25, 0.0])
def test_the_average_restarts_when_it_fits_worse_than_the_raw_parameters(tmp_path, rng, factor):
    """`ema_restart_factor`: after the raw parameters jump to an equivalent parametrisation (hidden units
    rescaled), the average mixes the two and fits the batch far worse than the raw parameters: at the next check
    (every second step here) it restarts from them (counted); a broken (NaN) average restarts too. Ordinary
    training never restarts it; with the factor 0 nothing is checked or logged."""
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=32)
    trainer = Trainer(small_config(steps=20, ema_decay=0.9, ema_check_every=2, ema_restart_factor=factor),
                      make_model(seed), optax.adam(3e-3), loss_fn, data.iterator(), tmp_path)  # fmt: skip
    logged = [host_tree(trainer.train_step(data.batch(t))) for t in range(12)]
    if not factor:
        assert not any("ema_fit_ratio" in m or "ema_restarts" in m for m in logged)
    else:
        ratios = [float(m["ema_fit_ratio"]) for m in logged]
        np.testing.assert_allclose(ratios[0], 1.0, rtol=1e-5)  # step 0: the average is the raw parameters
        assert ratios[1::2] == ratios[0::2]  # odd steps are not checked: the last score stays
        assert len(set(ratios[0::2])) == 6 and all(0.8 < r < 1.2 for r in ratios)
        assert logged[-1]["ema_restarts"] == 0
    raw = host_tree(trainer.state["params"])
    rescaled = _rescale_hidden_units(raw, rng.uniform(5.0, 20.0, raw["norm"]["scale"].shape).astype(np.float32))
    place = lambda tree, like: jax.tree.map(lambda p, old: jax.device_put(p, old.sharding), tree, like)  # noqa: E731
    trainer.state["params"] = place(rescaled, trainer.state["params"])
    before = host_tree(trainer.state["ema_params"])
    metrics = host_tree(trainer.train_step(data.batch(12)))  # checked: the average fits (same function), then mixes
    trainer.train_step(data.batch(13))  # not checked: it mixes more
    mixed = host_tree(trainer.state["ema_params"])
    assert metrics.get("ema_restarts", 0) == 0 and np.abs(mixed["out"]["kernel"] - before["out"]["kernel"]).max() > 1e-2
    metrics = host_tree(trainer.train_step(data.batch(14)))
    after = host_tree({k: trainer.state[k] for k in ("params", "ema_params")})
    if not factor:
        assert np.abs(after["ema_params"]["out"]["kernel"] - after["params"]["out"]["kernel"]).max() > 1e-2
        trainer.close()
        return
    assert metrics["ema_restarts"] == 1 and metrics["ema_fit_ratio"] > 2.0
    jax.tree.map(np.testing.assert_array_equal, after["ema_params"], after["params"])
    trainer.state["ema_params"] = place(jax.tree.map(lambda x: np.full_like(x, np.nan), after["ema_params"]),
                                        trainer.state["ema_params"])  # fmt: skip
    trainer.train_step(data.batch(15))  # step 15: not checked
    metrics = host_tree(trainer.train_step(data.batch(16)))
    assert metrics["ema_restarts"] == 2 and metrics["ema_fit_ratio"] == np.inf
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_tree(trainer.state["ema_params"])))
    trainer.close()


def test_a_checkpoint_without_the_averages_newer_bookkeeping_resumes_with_it_fresh(tmp_path, rng, caplog):
    """A run with a parameter average resumes from a checkpoint that an older version wrote (no `ema_restarts`,
    `ema_fit_ratio`): the saved state comes back and those entries start fresh. A checkpoint without the average
    itself (a run without one) is refused in one line that names it."""
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)
    config = small_config(steps=5, ema_decay=0.9)
    trainer = Trainer(config, make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path)
    for t in range(2):
        trainer.train_step(data.batch(t))
    old = {k: v for k, v in trainer.state.items() if k not in ("ema_restarts", "ema_fit_ratio")}
    trainer._checkpointer.save(2, old, trainer.data_iter)
    trainer._checkpointer.wait()
    saved = host_tree({k: old[k] for k in ("params", "ema_params", "step")})
    trainer.close()
    with caplog.at_level(logging.INFO, logger="uhap_jax.train.loop"):
        resumed = Trainer(config, make_model(seed + 1), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path)
    assert "has no ema_fit_ratio, ema_restarts" in caplog.text and resumed.step == 2
    jax.tree.map(np.testing.assert_array_equal, host_tree({k: resumed.state[k] for k in saved}), saved)
    assert host_tree(resumed.state["ema_restarts"]) == 0 and host_tree(resumed.state["ema_fit_ratio"]) == 1.0
    metrics = host_tree(resumed.train_step(data.batch(2)))
    assert np.isfinite(metrics["loss"]) and metrics["ema_restarts"] == 0
    resumed.close()
    plain = small_config(steps=5)  # no average: a checkpoint of it lacks the average itself
    without = Trainer(plain, make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path / "plain")
    without.save()
    without.close()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'plain' / 'checkpoints' / '0'}: does not hold this run's"):
        Trainer(config, make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path / "plain")


class CountingIterator:
    """A real (tiny) checkpointable iterator whose state is bytes or a dict, as grain's iterators give."""

    def __init__(self, as_bytes: bool, start: int = 0):
        self.position, self.as_bytes = start, as_bytes

    def __next__(self) -> int:
        self.position += 1
        return self.position

    def get_state(self):
        return str(self.position).encode() if self.as_bytes else {"position": self.position}

    def set_state(self, state) -> None:
        self.position = int(state.decode()) if self.as_bytes else state["position"]


@pytest.mark.parametrize("as_bytes", [True, False])
def test_data_iterator_state_round_trip(tmp_path, rng, as_bytes):
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    state = jax.device_put(params, NamedSharding(make_mesh(), PartitionSpec()))
    iterator = CountingIterator(as_bytes, start=int(rng.integers(100)))
    checkpointer = Checkpointer(tmp_path, use_async=False)
    checkpointer.save(7, state, iterator)
    expected = next(iterator)  # what the iterator yields right after the checkpoint
    for _ in range(5):
        next(iterator)
    restored = checkpointer.restore(7, abstract_like(state), iterator)
    np.testing.assert_array_equal(np.asarray(restored["w"]), params["w"])
    assert next(iterator) == expected
    # Without an iterator (export, evaluation) only the state is read.
    np.testing.assert_array_equal(np.asarray(checkpointer.restore(7, abstract_like(state))["w"]), params["w"])
    assert next(iterator) == expected + 1
    checkpointer.close()


def test_keeps_only_the_last_n(tmp_path, rng):
    state = {"w": jax.numpy.asarray(rng.normal(size=(3,)), jax.numpy.float32)}
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in range(1, 6):
        checkpointer.save(step, state, CountingIterator(as_bytes=False))
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "5"]
    checkpointer.close()


def test_corrupt_iterator_state_names_the_file(tmp_path, rng):
    state = {"w": jax.numpy.asarray(rng.normal(size=(3,)), jax.numpy.float32)}
    checkpointer = Checkpointer(tmp_path, use_async=False)
    checkpointer.save(1, state, CountingIterator(as_bytes=False))
    state_file = tmp_path / "checkpoints" / "1" / "data" / "process_0-of-1.json"
    state_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"process_0-of-1\.json: corrupt data-iterator state"):
        checkpointer.restore(1, abstract_like(state), CountingIterator(as_bytes=False))
    state_file.unlink()
    with pytest.raises(FileNotFoundError, match="different number of processes"):
        checkpointer.restore(1, abstract_like(state), CountingIterator(as_bytes=False))
    checkpointer.close()
