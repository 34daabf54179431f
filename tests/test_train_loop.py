"""The shared training loop on a small real NNX model: sharding invariance, NaN skips, metrics, restarts."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers.layouts import rows
from helpers.models import host_tree, small_config
from PIL import Image
from tensorboardX.proto import event_pb2
from train_toy_main import ToyData, image_fn, loss_fn, make_model

from uhap_jax.models.image_metrics import image_grid
from uhap_jax.train.loop import Trainer
from uhap_jax.train.mesh import make_mesh
from uhap_jax.train.optimizer import make_optimizer

TOY_MAIN = Path(__file__).resolve().parent / "train_toy_main.py"


def test_same_steps_on_one_and_eight_devices(tmp_path, rng):
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)
    # eps=1e-2: plain Adam's first step is g / (|g| + 1e-8), so gradients of 1e-8..1e-6 blow their device-count
    # rounding up to a unit step (seed 889); a larger eps keeps each update proportional to its gradient.
    optimizer = optax.adam(1e-2, eps=1e-2)
    trainers = {
        "one": Trainer(
            small_config(),
            make_model(seed),
            optimizer,
            loss_fn,
            data.iterator(),
            tmp_path / "one",
            mesh=make_mesh(devices=jax.devices()[:1]),
        ),
        "eight": Trainer(
            small_config(),
            make_model(seed),
            optimizer,
            loss_fn,
            data.iterator(),
            tmp_path / "eight",
            mesh=make_mesh(data=4, fsdp=2),
        ),
    }
    kernel = trainers["eight"].state["params"]["hidden"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert trainers["eight"].state["opt_state"][0].mu["hidden"]["kernel"].sharding.spec == kernel.sharding.spec
    losses = {name: [] for name in trainers}
    for k in range(3):
        for name, trainer in trainers.items():
            losses[name].append(float(trainer.train_step(data.batch(k))["loss"]))
    np.testing.assert_allclose(losses["one"], losses["eight"], rtol=2e-6)
    initial_kernel = np.asarray(make_model(seed).hidden.kernel[...])
    assert not np.allclose(host_tree(trainers["one"].state["params"])["hidden"]["kernel"], initial_kernel)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        host_tree(trainers["one"].state["params"]),
        host_tree(trainers["eight"].state["params"]),
    )


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, rng, caplog):
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16, nan_batches=(3,))
    trainer = Trainer(small_config(steps=3), make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path)
    trainer.run()
    before = host_tree({k: trainer.state[k] for k in ("params", "opt_state", "rest")})
    metrics = host_tree(trainer.train_step(data.batch(3)))
    assert np.isnan(metrics["loss"]) and metrics["nonfinite_steps"] == 1
    after = host_tree({k: trainer.state[k] for k in ("params", "opt_state", "rest")})
    jax.tree.map(np.testing.assert_array_equal, before, after)

    # Through run(): the skipped step is logged, the row holds null, and training carries on.
    workdir = tmp_path / "run"
    trainer = Trainer(small_config(steps=5), make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), workdir)
    with caplog.at_level(logging.WARNING, logger="uhap_jax.train.loop"):
        result = trainer.run()
    assert result.nonfinite_steps == 1
    assert any("step 4: 1 step(s) with a non-finite loss" in m for m in caplog.messages)
    by_step = {row["step"]: row for row in rows(workdir)}
    assert by_step[4]["loss"] is None and by_step[4]["nonfinite_steps"] == 1
    assert by_step[3]["nonfinite_steps"] == 0 and np.isfinite(by_step[5]["loss"])
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(host_tree(trainer.state["params"])))


def test_metrics_rows_progress_events_and_image_grid(tmp_path, rng, caplog):
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=8)
    config = small_config(steps=6, log_every=2, image_every=3)
    trainer = Trainer(config, make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path, image_fn=image_fn)
    with caplog.at_level(logging.INFO, logger="uhap_jax.train.loop"):
        result = trainer.run()
    trainer.close()
    table = rows(tmp_path)
    assert [row["step"] for row in table] == [2, 4, 6]
    for row, k in zip(table, (1, 3, 5)):
        assert row["index_sum"] == data.batch(k)["index"].sum()
        assert set(row) >= {"loss", "grad_norm", "steps_per_sec", "nonfinite_steps", "first_index"}
    assert result.metrics["loss"] == pytest.approx(table[-1]["loss"])
    assert any(re.fullmatch(r"step 6/6  loss \S+  \S+ steps/s  ETA \S+", m) for m in caplog.messages)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    assert scalar_steps(event_file)["loss"] == [2, 4, 6]
    grids = sorted((tmp_path / "images").glob("*.png"))
    assert [g.name for g in grids] == ["render_gt_error_00000003.png", "render_gt_error_00000006.png"]
    assert np.asarray(Image.open(grids[-1])).shape == (8 * 4, 3 * 4, 3)


@pytest.mark.parametrize(("every", "evaluated"), [(2, [0, 2, 4, 5]), (0, [0, 5]), (-1, [0, 5])])
def test_evaluations_come_at_the_start_every_n_steps_and_at_the_end(tmp_path, rng, every, evaluated):
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=8)
    trainer = Trainer(small_config(steps=5, log_every=5), make_model(seed), optax.adam(1e-2), loss_fn,
                      data.iterator(), tmp_path)  # fmt: skip
    steps = []

    def evaluate(model) -> dict[str, float]:
        steps.append(trainer.step)
        return {"eval/count": float(len(steps))}

    result, metrics = trainer.run_with_evals(evaluate, every)
    trainer.close()
    assert steps == evaluated and result.step == 5 and metrics == {"eval/count": float(len(evaluated))}
    assert [row["step"] for row in rows(tmp_path) if "eval/count" in row] == evaluated


@pytest.mark.parametrize("b2", [0.9, None])
def test_the_optimizer_is_clipped_adam_with_the_configs_second_moment_decay(rng, b2):
    config = ml_collections.ConfigDict({"optimizer": {"learning_rate": 1e-2, "warmup_steps": 2, "grad_clip": 1.0},
                                        "train": {"steps": 10}})  # fmt: skip
    if b2 is not None:
        config.optimizer.b2 = b2
    decay = 0.999 if b2 is None else b2
    optimizer = make_optimizer(config)
    params = rng.normal(size=6)
    state = optimizer.init(jnp.asarray(params, jnp.float32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, end_value=1e-3)
    m = v = np.zeros(6)
    for t in range(1, 5):  # float64 Adam by hand, on gradients above and below the clip
        grad = rng.normal(size=6) * (3.0 if t % 2 else 0.1)
        updates, state = optimizer.update(jnp.asarray(grad, jnp.float32), state)
        grad = grad * min(1.0, 1.0 / np.linalg.norm(grad))
        m, v = 0.9 * m + 0.1 * grad, decay * v + (1.0 - decay) * grad**2
        expected = -float(schedule(t - 1)) * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - decay**t)) + 1e-8)
        np.testing.assert_allclose(updates, expected, rtol=2e-4, atol=1e-9)


def scalar_steps(event_file: Path) -> dict[str, list[int]]:
    """Tag -> steps of the scalar summaries in a TensorBoard event file (TFRecord framing, Event protos)."""
    data, found, offset = event_file.read_bytes(), {}, 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                found.setdefault(value.tag, []).append(event.step)
    return found


def test_image_grid_rows_are_render_truth_error(rng):
    render, target = rng.uniform(size=(2, 3, 4, 3)), rng.uniform(size=(2, 3, 4, 3))
    grid = image_grid(render, target).astype(np.float32) / 255.0
    assert grid.shape == (2 * 3, 3 * 4, 3)
    np.testing.assert_allclose(grid[3:6, 0:4], render[1], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(grid[3:6, 4:8], target[1], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(grid[0:3, 8:12], np.abs(render[0] - target[0]), atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match=r"render \(2, 3, 4, 3\) and target \(2, 3, 4\)"):
        image_grid(render, target[..., 0])


def test_loss_fn_must_return_scalars(tmp_path, rng):
    data = ToyData(int(rng.integers(1 << 30)), batch_size=8)

    def vector_aux(model, batch, step_rng):
        loss, _ = loss_fn(model, batch, step_rng)
        return loss, {"per_example": batch["x"][:, 0]}

    trainer = Trainer(small_config(), make_model(), optax.sgd(0.1), vector_aux, data.iterator(), tmp_path)
    with pytest.raises(ValueError, match="dict of scalars"):
        trainer.train_step(data.batch(0))


# ---- the loop as a process: kill -9 and SIGTERM --------------------------------------------------------
def _toy_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(TOY_MAIN), str(workdir), *args]
    return subprocess.Popen(command, env=_toy_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Polls `condition`; the deadline only guards against a hung run (generous: the CPUs may be shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"toy run ended early (rc {process.returncode}):\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out:\n{process.stdout.read()}")
        time.sleep(0.05)


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_resume_after_kill_9_continues_the_data_order(tmp_path):
    args = ("--steps", "40", "--checkpoint_every", "10", "--data_delay", "0.04")
    process = _start(tmp_path, *args)
    _wait_until(lambda: (tmp_path / "checkpoints" / "10").is_dir() and max(_logged_steps(tmp_path)) >= 16, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_rows = {row["step"]: row for row in rows(tmp_path)}
    last_checkpoint = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert last_checkpoint < 40

    rerun = subprocess.run(
        [sys.executable, str(TOY_MAIN), str(tmp_path), *args],
        env=_toy_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = re.search(r"resumed from step (\d+)", rerun.stdout)
    assert resumed, rerun.stdout
    resumed_step = int(resumed.group(1))
    assert resumed_step >= 10 and resumed_step % 10 == 0
    final_rows = {row["step"]: row for row in rows(tmp_path)}
    assert sorted(final_rows) == list(range(1, 41))  # rows past the checkpoint were dropped, then redone
    redone = [s for s in killed_rows if s > resumed_step]
    assert redone, "the kill came right after the checkpoint; nothing to compare"
    for step in redone:
        for key in ("first_index", "index_sum", "loss"):
            assert final_rows[step][key] == pytest.approx(killed_rows[step][key], rel=1e-6), (step, key)


def test_sigterm_saves_then_exits(tmp_path):
    process = _start(tmp_path, "--steps", "100000", "--checkpoint_every", "100000", "--data_delay", "0.02")
    _wait_until(lambda: len(_logged_steps(tmp_path)) >= 5, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    saved = re.search(r"SIGTERM: saved checkpoint at step (\d+), exiting", output)
    assert saved, output
    step = int(saved.group(1))
    assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [step]
    assert max(_logged_steps(tmp_path)) == step


def test_capacity_grows_from_the_previous_step_and_recompiles(tmp_path, rng, caplog):
    """A loss whose "rendering" needs more pair slots than the capacity it was traced with: that step is NaN and
    skipped, the loop grows the capacity from the finished step's count and traces the step again."""
    import kernels

    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)
    capacity = kernels.AdaptiveCapacity(initial=1024, headroom=1.25)
    needed = int(rng.integers(3000, 6000))
    traced_with = []

    def capacity_loss(model, batch, rng_key):
        traced_with.append(capacity.value)
        loss, aux = loss_fn(model, batch, rng_key)
        overflow = needed > capacity.value  # static: known when the step is traced
        aux["raster_pairs"] = jax.numpy.float32(needed)
        return (jax.numpy.nan if overflow else loss), aux

    trainer = Trainer(small_config(steps=5), make_model(seed), optax.adam(1e-2), capacity_loss, data.iterator(),
                      tmp_path, capacity=capacity)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="uhap_jax.train.loop"):
        result = trainer.run()
    assert capacity.value >= needed * 1.25 and traced_with == [1024, capacity.value]
    assert any(f"pair capacity 1024 -> {capacity.value}" in m for m in caplog.messages)
    # Steps 1 and 2 were traced with the small capacity (step 2 was dispatched before step 1's count was read).
    assert result.nonfinite_steps == 2 and np.isfinite(rows(tmp_path)[-1]["loss"])


def test_capacity_shrinks_after_an_unusual_step_and_reuses_the_compiled_step(tmp_path, rng, caplog):
    """One step needs many more pairs than the rest: the capacity grows for it, shrinks back once `shrink_after`
    steps needed at most 2/3 of it, and the step traced for the old capacity is reused, not traced again."""
    from jax.experimental import io_callback

    import kernels

    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16)
    usual = int(rng.integers(3000, 4000))
    capacity = kernels.AdaptiveCapacity(initial=int(usual * 1.25), headroom=1.25, shrink_after=3)
    start = capacity.value
    traced_with = []
    step_pairs = iter([usual, usual * 4] + [usual] * 20)  # one per step run

    def capacity_loss(model, batch, rng_key):
        traced_with.append(capacity.value)
        loss, aux = loss_fn(model, batch, rng_key)
        aux["raster_pairs"] = io_callback(lambda: np.float32(next(step_pairs)), jax.ShapeDtypeStruct((), np.float32))
        return loss, aux

    trainer = Trainer(small_config(steps=8), make_model(seed), optax.adam(1e-2), capacity_loss, data.iterator(),
                      tmp_path, capacity=capacity)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="uhap_jax.train.loop"):
        trainer.run()
    grown = kernels.binning.bucket_capacity(int(usual * 4 * 1.25))
    assert traced_with == [start, grown]  # the shrink went back to the first trace
    assert capacity.value == start
    assert any(f"pair capacity {start} -> {grown} (recompiling" in m for m in caplog.messages)
    assert any(f"pair capacity {grown} -> {start} (compiled before)" in m for m in caplog.messages)


def test_adaptive_capacity_never_shrinks_below_what_recent_steps_needed(rng):
    import kernels

    n = int(rng.integers(5000, 9000))
    capacity = kernels.AdaptiveCapacity(initial=8 * n, headroom=1.5, shrink_after=4)
    big = capacity.value
    assert [capacity.observe(n) for _ in range(3)] == [False] * 3 and capacity.value == big
    capacity.observe(2 * n)  # the window's largest count decides
    assert capacity.value == kernels.binning.bucket_capacity(int(2 * n * 1.5)) < big
    settled = capacity.value
    assert not any(capacity.observe(int(n * 1.9)) for _ in range(8))  # within 2/3 of it: kept, no flapping
    assert capacity.value == settled
    never = kernels.AdaptiveCapacity(initial=8 * n, headroom=1.5)
    assert not any(never.observe(n) for _ in range(50)) and never.value == big


def test_a_skipped_step_never_shrinks_the_pair_capacity(tmp_path, rng):
    """Broken parameters render almost nothing: the few pairs of a skipped step must not shrink the capacity
    (issue 19's base run went 655,360 -> 1,024 and re-rendered every evaluation); finite steps still do."""
    import kernels

    seed = int(rng.integers(1 << 30))
    few = int(rng.integers(10, 500))

    def tiny_render_loss(model, batch, rng_key):
        loss, aux = loss_fn(model, batch, rng_key)
        aux["raster_pairs"] = jax.numpy.float32(few)
        return loss, aux

    values = {}
    for name, nan_batches in (("skipped", tuple(range(100))), ("finite", ())):
        capacity = kernels.AdaptiveCapacity(initial=1 << 16, headroom=1.25, shrink_after=2)
        config = small_config(steps=8, rollback_after_nonfinite=0)
        data = ToyData(seed, 16, nan_batches=nan_batches)
        trainer = Trainer(config, make_model(seed), optax.adam(1e-2), tiny_render_loss, data.iterator(),
                          tmp_path / name, capacity=capacity)  # fmt: skip
        trainer.run()
        trainer.close()
        values[name] = capacity.value
    assert values["skipped"] == kernels.binning.bucket_capacity(1 << 16)
    assert values["finite"] < values["skipped"]


def test_a_run_of_nonfinite_steps_rolls_back_to_a_checkpoint_before_it(tmp_path, rng, caplog):
    """Seven poisoned batches in a row (steps 14-20) with rollback_after_nonfinite=4: the loop reloads step 10
    (step 15's checkpoint holds the broken state and is deleted), keeps reading the next batches, and finishes
    with every metrics row once; a run that never recovers stops with one clear error after max_rollbacks."""
    seed = int(rng.integers(1 << 30))
    data = ToyData(seed, batch_size=16, nan_batches=tuple(range(13, 20)))
    config = small_config(steps=25, checkpoint_every=5, rollback_after_nonfinite=4, max_rollbacks=1,
                          async_checkpoints=False)  # fmt: skip
    trainer = Trainer(config, make_model(seed), optax.adam(1e-2), loss_fn, data.iterator(), tmp_path / "recovers")
    with caplog.at_level(logging.WARNING, logger="uhap_jax.train.loop"):
        result = trainer.run()
    assert any("rolled back to the checkpoint of step 10" in m for m in caplog.messages), caplog.messages
    assert result.step == 25 and np.isfinite(result.metrics["loss"])
    assert [row["step"] for row in rows(tmp_path / "recovers")] == list(range(1, 26))
    # Batches 0-17 before the rollback, then 15 more: the data went on, they were not replayed.
    np.testing.assert_array_equal(next(trainer.data_iter)["index"], data.batch(33)["index"])
    trainer.close()

    stuck = ToyData(seed, batch_size=16, nan_batches=tuple(range(3, 1000)))
    config = small_config(steps=40, checkpoint_every=2, rollback_after_nonfinite=3, max_rollbacks=2,
                          async_checkpoints=False)  # fmt: skip
    trainer = Trainer(config, make_model(seed), optax.adam(1e-2), loss_fn, stuck.iterator(), tmp_path / "stuck")
    # Back at step 2, the next run of skipped steps starts at step 3: no checkpoint before it is left.
    with pytest.raises(RuntimeError, match=r"stuck: 3 steps in a row .* after 1 rollback\(s\) and there is no "
                                           r"checkpoint to roll back to; lower"):  # fmt: skip
        trainer.run()
    trainer.close()
