"""The one training loop that every stage (prior, audio, encoder, personalisation) calls.

    trainer = Trainer(config.train, model, optax.adam(1e-3), loss_fn, data_iter, workdir)
    result = trainer.run()          # resumes from <workdir>/checkpoints if a checkpoint is there
    trained = trainer.model         # an nnx.Module holding the current parameters

`loss_fn(model, batch, rng) -> (loss, aux)` where `aux` maps names to scalars (all logged). `data_iter`
yields each process's local batch (a pytree of arrays with a leading batch dimension, or global
`jax.Array`s) and has grain's `get_state()` / `set_state(state)`, so that a resumed run sees the same
data order. The model is split with `nnx.split` into pure pytrees, and the step is one `jax.jit` with
explicit in/out shardings and a donated train state.

Stages that render pass `capacity` (a `kernels.AdaptiveCapacity` whose `.value` the loss reads when traced)
and report the step's largest per-camera pair count as `aux["raster_pairs"]`. After each step the loop reads
the previous step's count (finished by then, so the device never waits on the host); when it outgrows the
capacity, the step is compiled again with the larger bucket. A step that overflowed rendered NaN images and
was skipped like any non-finite step; a skipped step never shrinks the capacity (broken parameters render
almost nothing).

A non-finite step is skipped (the state stays). A run of `rollback_after_nonfinite` of them means the parameters
no longer give a finite loss on any batch (issue 19's base run: every step from 6,600 on, for 2,200 steps): the
loop then reloads the latest checkpoint and carries on with the next batches, as large-model trainers do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

import kernels
from uhap_jax.artifacts.checkpoints import Checkpointer, abstract_like
from uhap_jax.models import image_metrics
from uhap_jax.train.mesh import batch_sharding, make_mesh, put_batch, replicated
from uhap_jax.train.metrics import MetricWriter, Progress
from uhap_jax.train.sharding import place, tree_shardings

logger = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
ImageFn = Callable[[nnx.Module, Any], tuple[jax.Array, jax.Array]]
_RESERVED_METRICS = (
    "loss",
    "grad_norm",
    "nonfinite_steps",
    "steps_per_sec",
    "ema_skipped_steps",
    "ema_restarts",
    "ema_fit_ratio",
)

# Train-state entries that a checkpoint of an older version may lack: a resume starts them fresh.
_FRESH_IF_MISSING = ("log_loss_average", "ema_skipped_steps", "ema_restarts", "ema_fit_ratio")


def default_config() -> ml_collections.ConfigDict:
    """The `train` section that stage configs embed and adjust."""
    config = ml_collections.ConfigDict()
    config.steps = 1000
    config.seed = 0
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.image_every = 0  # 0: no image grids
    # Decay of an exponential moving average of the parameters (0: none). With one, evaluations, exports and
    # later stages use the average: at a constant learning rate the raw parameters jitter from step to step
    # (issue 19: held-out PSNR dipped 2.3 dB for one eval), the average follows the trend.
    config.ema_decay = 0.0
    # The average leaves out a step whose loss is above this factor x the run's typical loss (the exponential of a
    # moving average of log-losses, decay 0.99, over every finite step): a loss spike means the parameters just
    # went wrong, and the average would keep them for ~1 / (1 - ema_decay) steps (issue 19's base run: one spike of
    # 4,700x at step 5,600; the held-out PSNR fell 5.9 dB within 650 steps and was still 1.6 dB down 1,650 steps
    # after the spike, while the raw parameters' training PSNR was back within 100 steps). The raw
    # parameters still train on it (the parameters that gave the first spiking loss were averaged one step earlier,
    # with weight 1 - ema_decay; the steps that follow while the loss stays high are left out). 0: every finite step.
    config.ema_skip_loss_factor = 10.0
    # Every `ema_check_every` steps the average is scored on the step's batch beside the raw parameters (one
    # forward pass more); when its `ema_check_metric` (the loss, or a positive, lower-is-better aux metric of
    # loss_fn) is above `ema_restart_factor` x the raw parameters', the average restarts from the raw parameters
    # (not on a step it leaves out as a spike; a check whose render overflowed does not count). An average
    # of parameters from before and after a reparametrisation (issue 19's base run: the expression code's KL
    # jumped from 13 to 182 nats in 200 steps and back, the raw parameters' training PSNR stayed at 27 dB) is a
    # model that neither side is: its held-out PSNR fell 6 dB and took 2,000 steps to come back. Counted as
    # `ema_restarts`; the last score is logged as `ema_fit_ratio` (both only when checked). 0: never checked.
    config.ema_check_every = 50
    config.ema_check_metric = "loss"
    config.ema_restart_factor = 1.25
    # This many non-finite steps in a row mean the parameters themselves are broken (every later step is skipped):
    # load the latest checkpoint and go on with the next batches (0: never); after max_rollbacks, stop with an error.
    config.rollback_after_nonfinite = 50
    config.max_rollbacks = 3
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    # (regex, spec) pairs, see uhap_jax.train.sharding; unmatched leaves are sharded "auto".
    config.sharding = ml_collections.ConfigDict({"rules": (), "min_shard_size": 2**14})
    return config


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Where `run()` stopped; `metrics` are the last logged values. Commands exit non-zero when preempted."""

    step: int
    preempted: bool
    nonfinite_steps: int
    metrics: dict[str, float]


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def _host_values(tree: Any) -> Any:
    """Fetch replicated or process-spanning arrays to numpy on every process."""

    def fetch(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


class Trainer:
    """Owns the sharded train state, the jitted step, checkpoints and metric output of one run."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        loss_fn: LossFn,
        data_iter: Iterator[Any],
        workdir: str | Path,
        mesh: jax.sharding.Mesh | None = None,
        image_fn: ImageFn | None = None,
        capacity: kernels.AdaptiveCapacity | None = None,
    ):
        for method in ("get_state", "set_state"):
            if not callable(getattr(data_iter, method, None)):
                raise TypeError(
                    f"data_iter ({type(data_iter).__name__}) has no {method}(); use a grain iterator or "
                    "another iterator whose position can be checkpointed"
                )
        self.config = config
        self.workdir = Path(workdir)
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh.data, config.mesh.fsdp)
        self.data_iter = data_iter
        self._loss_fn = loss_fn
        self._optimizer = optimizer
        self._image_fn = image_fn
        self._capacity = capacity
        self._graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._writer = MetricWriter(self.workdir, enabled=jax.process_index() == 0)
        self._checkpointer = Checkpointer(
            self.workdir, keep=config.keep_checkpoints, use_async=config.async_checkpoints
        )
        self._sigterm_received = False
        with jax.set_mesh(self.mesh):
            self.state = self._initial_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
        self._step_fn = self._compile_step()
        self._steps_by_capacity = {capacity.value: self._step_fn} if capacity is not None else {}
        self.step = 0
        self._nonfinite_run, self._rollbacks, self._first_broken_step = 0, 0, 0
        self._nonfinite_count = 0  # skipped steps counted by the last finished step
        self._resume_if_possible()

    # ---- state -------------------------------------------------------------------------------
    def _initial_state(self, params: dict, rest: dict) -> dict:
        host_state = {
            "params": params,
            "rest": rest,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(self.config.seed),
            "nonfinite_steps": jnp.zeros((), jnp.int32),
        }
        if self.config.get("ema_decay", 0.0):
            host_state["ema_params"] = params
            host_state["log_loss_average"] = jnp.full((), jnp.nan, jnp.float32)  # set by the first finite step
            host_state["ema_skipped_steps"] = jnp.zeros((), jnp.int32)
            host_state["ema_restarts"] = jnp.zeros((), jnp.int32)
            host_state["ema_fit_ratio"] = jnp.ones((), jnp.float32)
        abstract = jax.eval_shape(lambda s: {**s, "opt_state": self._optimizer.init(s["params"])}, host_state)
        self._state_shardings = tree_shardings(
            abstract, self.mesh, self.config.sharding.rules, self.config.sharding.min_shard_size
        )
        # A copy, never an alias: the state is donated each step and must not consume the caller's model.
        state = place(host_state, {k: self._state_shardings[k] for k in host_state})
        state["opt_state"] = jax.jit(self._optimizer.init, out_shardings=self._state_shardings["opt_state"])(
            state["params"]
        )
        return state

    def _restore(self, step: int, data_iter: Iterator[Any] | None = None) -> dict:
        """The train state of checkpoint `step` on this run's shardings (and `data_iter` rewound, if given). The
        average's bookkeeping grew over versions: entries of `_FRESH_IF_MISSING` that the checkpoint lacks start
        fresh; any other difference in the state's entries is refused in one line."""
        saved = self._checkpointer.state_keys(step)
        fresh = {k: v for k, v in self.state.items() if k in _FRESH_IF_MISSING and k not in saved}
        expected = set(self.state) - set(fresh)
        if saved != expected:
            differences = [f"{label} {', '.join(sorted(keys))}" for label, keys in
                           (("has", saved - expected), ("lacks", expected - saved)) if keys]  # fmt: skip
            raise ValueError(f"{self._checkpointer.directory / str(step)}: does not hold this run's training state "
                             f"(it {' and '.join(differences)}); resume with the config that wrote it, or give a new "
                             "--workdir")  # fmt: skip
        restored = self._checkpointer.restore(step, abstract_like({k: self.state[k] for k in expected}), data_iter)
        if fresh:
            logger.info("checkpoint %d has no %s (an older version wrote it): they start fresh", step,
                        ", ".join(sorted(fresh)))  # fmt: skip
        return {**restored, **fresh}

    def _resume_if_possible(self) -> None:
        latest = self._checkpointer.latest_step()
        if latest is None:
            return
        self.state = self._restore(latest, self.data_iter)
        self.step = int(self.state["step"])
        if self.step != latest:
            raise ValueError(f"{self._checkpointer.directory / str(latest)}: holds step {self.step}, not {latest}")
        self._writer.truncate_after(self.step)
        logger.info("resumed from step %d (%s)", self.step, self._checkpointer.directory)

    @property
    def model(self) -> nnx.Module:
        """A fresh module holding the current state (sharded arrays, shared with the trainer)."""
        return nnx.merge(self._graphdef, self.state["params"], self.state["rest"])

    @property
    def eval_model(self) -> nnx.Module:
        """The module to evaluate and export: the parameters' moving average when `ema_decay` is set."""
        return nnx.merge(self._graphdef, self.state.get("ema_params", self.state["params"]), self.state["rest"])

    # ---- the jitted step ---------------------------------------------------------------------
    def _compile_step(self) -> Callable:
        """A new jitted step: a new function object traces again, reading the current capacity."""
        return jax.jit(
            lambda state, batch: self._train_step(state, batch),
            in_shardings=(self._state_shardings, batch_sharding(self.mesh)),
            out_shardings=(self._state_shardings, replicated(self.mesh)),
            donate_argnums=0,
        )

    def _adapt_capacity(self, metrics: dict[str, jax.Array], finite: bool) -> None:
        """Size the pair capacity from a finished step's `raster_pairs` (`AdaptiveCapacity.observe`; a skipped
        step may only grow it); a changed capacity switches to its step, compiled once per capacity."""
        if "raster_pairs" not in metrics:
            raise ValueError("Trainer(capacity=...): loss_fn must report aux['raster_pairs']")
        pairs = int(_host_values(metrics["raster_pairs"]))
        before = self._capacity.value
        if self._capacity.observe(pairs) if finite else self._capacity.grow(pairs):
            compiled = self._capacity.value in self._steps_by_capacity
            logger.info("step %d needed %d pairs per camera: pair capacity %d -> %d (%s)", self.step, pairs, before,
                        self._capacity.value, "compiled before" if compiled else "recompiling the step")  # fmt: skip
            if not compiled:
                self._steps_by_capacity[self._capacity.value] = self._compile_step()
            self._step_fn = self._steps_by_capacity[self._capacity.value]

    def _train_step(self, state: dict, batch: Any) -> tuple[dict, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_of(params: dict) -> tuple[jax.Array, tuple[dict, dict]]:
            model = nnx.merge(self._graphdef, params, state["rest"])
            loss, aux = self._loss_fn(model, batch, rng)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return loss, (aux, nnx.to_pure_dict(new_rest))

        (loss, (aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        clashes = set(aux) & set(_RESERVED_METRICS)
        if clashes or jnp.ndim(loss) != 0 or any(jnp.ndim(v) != 0 for v in aux.values()):
            raise ValueError(
                f"loss_fn must return a scalar loss and a dict of scalars not named {_RESERVED_METRICS}; "
                f"got loss shape {jnp.shape(loss)}, aux shapes {jax.tree.map(jnp.shape, aux)}"
            )
        updates, new_opt_state = self._optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        # A NaN or inf anywhere in the gradients reaches their norm.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        nonfinite_steps = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
        new_state = {
            "params": _select(finite, new_params, state["params"]),
            **self._ema_update(state, new_params, loss, finite, self._ema_fit_ratio(state, batch, rng, loss, aux)),
            "opt_state": _select(finite, new_opt_state, state["opt_state"]),
            "rest": _select(finite, new_rest, state["rest"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite_steps": nonfinite_steps,
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite_steps": nonfinite_steps, **aux}
        for name in ("ema_skipped_steps", "ema_restarts", "ema_fit_ratio"):
            if name in new_state and (name == "ema_skipped_steps" or self._ema_checked()):
                metrics[name] = new_state[name]
        return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    def _ema_checked(self) -> bool:
        return bool(self.config.get("ema_check_every", 0) and self.config.get("ema_restart_factor", 0.0))

    def _ema_fit_ratio(self, state: dict, batch: Any, rng: jax.Array, loss: jax.Array, aux: dict) -> jax.Array:
        """The average's `ema_check_metric` on this batch over the raw parameters' (same batch, same key), on
        steps that are a multiple of `ema_check_every` (inf when the average's score is NaN); NaN on the others (no
        forward pass is spent), when the average's render overflowed, or when the raw value is not positive (the
        metric must be a positive, lower-is-better one)."""
        if "ema_params" not in state or not self._ema_checked():
            return jnp.full((), jnp.nan, jnp.float32)
        every = self.config.ema_check_every
        name = self.config.get("ema_check_metric", "loss")
        if name != "loss" and name not in aux:
            raise ValueError(f"train.ema_check_metric={name!r} is neither 'loss' nor one of loss_fn's metrics "
                             f"{sorted(aux)}: name a lower-is-better one")  # fmt: skip

        def score(params: dict) -> jax.Array:
            value, metrics = self._loss_fn(nnx.merge(self._graphdef, params, state["rest"]), batch, rng)
            value = jnp.asarray(value if name == "loss" else metrics[name], jnp.float32)
            value = jnp.where(jnp.isnan(value), jnp.inf, value)  # a broken average scores worst, not "unchecked"
            # A render that ran out of pair slots (sized for the raw parameters) says nothing: unchecked.
            return jnp.where(metrics.get("raster_overflow", 0.0) > 0, jnp.nan, value)

        raw = jnp.asarray(loss if name == "loss" else aux[name], jnp.float32)
        checked = state["step"] % every == 0
        average = jax.lax.cond(checked, score, lambda _: jnp.full((), jnp.nan, jnp.float32), state["ema_params"])
        return jnp.where(checked & (raw > 0), average / jnp.maximum(raw, 1e-30), jnp.nan)

    def _ema_update(self, state: dict, new_params: dict, loss: jax.Array, finite: jax.Array,
                    fit_ratio: jax.Array) -> dict:  # fmt: skip
        """The average's state after a step, or {} without one: the average moves toward `new_params` on a finite
        step whose loss is not a spike (`ema_skip_loss_factor`), and restarts from them when it fits the step's
        batch worse than the raw parameters by `ema_restart_factor` (`fit_ratio`: NaN when not checked). The
        decay ramps up as (1 + t) / (10 + t) (TensorFlow's ExponentialMovingAverage) so early averages are not
        stuck at the init."""
        if "ema_params" not in state:
            return {}
        log_loss = jnp.log(jnp.maximum(loss, 1e-30))
        known = jnp.isfinite(state["log_loss_average"])
        factor = self.config.get("ema_skip_loss_factor", 0.0)
        spike = jnp.asarray(False)
        if factor:
            spike = known & (loss > 0) & (log_loss > state["log_loss_average"] + math.log(factor))
        take = finite & ~spike
        checked = ~jnp.isnan(fit_ratio)
        # Not on a step the average leaves out: it would restart from the parameters the spike just moved.
        restart = take & checked & (fit_ratio > self.config.get("ema_restart_factor", 0.0))
        t = state["step"].astype(jnp.float32)
        decay = jnp.minimum(self.config.ema_decay, (1.0 + t) / (10.0 + t))
        moved = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], new_params)
        average = jnp.where(known, 0.99 * state["log_loss_average"] + 0.01 * log_loss, log_loss)
        return {
            "ema_params": _select(restart, new_params, _select(take, moved, state["ema_params"])),
            "log_loss_average": jnp.where(finite & (loss > 0), average, state["log_loss_average"]),
            "ema_skipped_steps": state["ema_skipped_steps"] + (finite & ~take).astype(jnp.int32),
            "ema_restarts": state["ema_restarts"] + restart.astype(jnp.int32),
            "ema_fit_ratio": jnp.where(checked, fit_ratio, state["ema_fit_ratio"]),
        }

    def train_step(self, batch: Any) -> dict[str, jax.Array]:
        """One update on `batch` (host-local or global arrays); returns the step's metrics, unfetched."""
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step_fn(self.state, put_batch(batch, self.mesh))
        self.step += 1
        return metrics

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until `config.steps`, the data ends, or SIGTERM; checkpoint on the way and at the end."""
        config = self.config
        progress = Progress(self.step, config.steps)
        metrics, logged_step, logged = None, self.step, {}
        previous = None
        nonfinite_seen = self._nonfinite_count = int(self.state["nonfinite_steps"])
        restore_signal_handler = self._install_sigterm_handler()
        try:
            while self.step < config.steps:
                try:
                    batch = next(self.data_iter)
                except StopIteration:
                    logger.info("data exhausted at step %d", self.step)
                    break
                metrics = self.train_step(batch)
                if previous is not None:
                    finite = self._finished_step_was_finite(previous)
                    if self._capacity is not None:
                        self._adapt_capacity(previous, finite)
                    if self._roll_back_if_diverged(finite):  # this step ran on the broken state: dropped
                        previous, nonfinite_seen = None, int(self.state["nonfinite_steps"])
                        continue
                previous = metrics
                if self.step % config.log_every == 0 or self.step == config.steps:
                    logged, nonfinite_seen = self._log(metrics, progress, nonfinite_seen)
                    logged_step = self.step
                if config.image_every and self._image_fn and self.step % config.image_every == 0:
                    self._write_images(batch)
                if self._preemption_requested():
                    self.save()
                    self._checkpointer.wait()
                    logger.warning("SIGTERM: saved checkpoint at step %d, exiting", self.step)
                    return self._result(preempted=True, logged=logged)
                if self.step % config.checkpoint_every == 0:
                    self.save()
            if metrics is not None and logged_step != self.step:
                logged, _ = self._log(metrics, progress, nonfinite_seen)
            if self._checkpointer.latest_step() != self.step:
                self.save()
            self._checkpointer.wait()
            return self._result(preempted=False, logged=logged)
        finally:
            restore_signal_handler()
            self._writer.flush()

    def _finished_step_was_finite(self, metrics: dict[str, jax.Array]) -> bool:
        """Whether the step that produced `metrics` (finished: the next one is queued) was applied."""
        count = int(_host_values(metrics["nonfinite_steps"]))
        finite = count == self._nonfinite_count
        self._nonfinite_count = count
        return finite

    def _roll_back_if_diverged(self, finite: bool) -> bool:
        """After `rollback_after_nonfinite` skipped steps in a row, reload the latest checkpoint (the data go on
        from here); True when it did. Raises once `max_rollbacks` did not help or no checkpoint exists."""
        if finite:
            self._nonfinite_run = 0
        elif self._nonfinite_run == 0:
            # The finished step is number self.step - 1: it started from the state of step self.step - 2, the
            # first one known to be broken. Checkpoints of earlier steps are safe to go back to.
            self._nonfinite_run, self._first_broken_step = 1, self.step - 2
        else:
            self._nonfinite_run += 1
        limit = self.config.get("rollback_after_nonfinite", 0)
        if not limit or self._nonfinite_run < limit:
            return False
        self._checkpointer.wait()
        safe = [s for s in self._checkpointer.all_steps() if s < self._first_broken_step]
        latest = max(safe) if safe else None
        if latest is None or self._rollbacks >= self.config.get("max_rollbacks", 0):
            raise RuntimeError(
                f"{self.workdir}: {self._nonfinite_run} steps in a row up to step {self.step} had a non-finite loss "
                f"or gradient after {self._rollbacks} rollback(s)"
                + ("" if latest is not None else " and there is no checkpoint to roll back to")
                + "; lower --config.optimizer.learning_rate, or raise --config.train.max_rollbacks"
            )
        diverged_at = self.step
        self.state = self._restore(latest)
        self.step = int(self.state["step"])
        self._checkpointer.delete_after(self.step)
        self._writer.truncate_after(self.step)
        self._rollbacks += 1
        self._nonfinite_run, self._nonfinite_count = 0, int(self.state["nonfinite_steps"])
        logger.warning("steps up to %d diverged (%d non-finite in a row): rolled back to the checkpoint of step %d, "
                       "going on with the next batches (rollback %d of at most %d)", diverged_at, limit, self.step,
                       self._rollbacks, self.config.max_rollbacks)  # fmt: skip
        return True

    def run_with_evals(self, evaluate: Callable[[nnx.Module], dict[str, float]], every: int
                       ) -> tuple[TrainResult, dict[str, float]]:  # fmt: skip
        """`run()` to `config.steps`, calling `evaluate(model)` first (on a fresh run), every `every` steps and
        at the end; its metrics go to metrics.jsonl, and where `evaluate` has `images` (name -> uint8 HxWx3) and
        `train.image_every` is on, those too; `every` <= 0: at the start and the end only. Returns the result and
        the last evaluation."""
        total_steps = self.config.steps
        metrics = {}
        result = self._result(preempted=False, logged={})
        try:
            if self.step == 0:
                metrics = self._evaluate(evaluate)
            while self.step < total_steps:
                # run() stops at config.steps; stepping that target through the eval points gives periodic evals.
                self.config.steps = min(total_steps, (self.step // every + 1) * every) if every > 0 else total_steps
                result = self.run()
                if result.preempted:
                    break
                metrics = self._evaluate(evaluate)
                if result.step < self.config.steps:  # the data ran out
                    break
        finally:
            self.config.steps = total_steps
        return result, metrics

    def _evaluate(self, evaluate: Callable[[nnx.Module], dict[str, float]]) -> dict[str, float]:
        with jax.set_mesh(self.mesh):
            metrics = evaluate(self.eval_model)
        self._writer.write_scalars(self.step, metrics)
        if self.config.image_every:  # an evaluator's `images` (e.g. held-out renders) go beside the training ones
            for name, image in getattr(evaluate, "images", {}).items():
                self._writer.write_image(self.step, name, image)
        self._writer.flush()
        logger.info("eval at step %d: %s", self.step, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def save(self) -> None:
        """Checkpoint this step (async). Skipped steps left the state as it was: no NaN is saved."""
        self._checkpointer.save(self.step, self.state, self.data_iter)

    def close(self) -> None:
        """Finish pending checkpoint writes and close the event files."""
        self._checkpointer.wait()
        self._checkpointer.close()
        self._writer.close()

    def _result(self, preempted: bool, logged: dict[str, float]) -> TrainResult:
        return TrainResult(self.step, preempted, int(self.state["nonfinite_steps"]), logged)

    def _log(self, metrics: dict, progress: Progress, nonfinite_seen: int) -> tuple[dict[str, float], int]:
        values = {k: float(v) for k, v in _host_values(metrics).items()}
        values["steps_per_sec"] = progress.rate(self.step)
        values["nonfinite_steps"] = nonfinite = int(values["nonfinite_steps"])
        if nonfinite > nonfinite_seen:
            logger.warning(
                "step %d: %d step(s) with a non-finite loss or gradient skipped since last log (total %d)",
                self.step,
                nonfinite - nonfinite_seen,
                nonfinite,
            )
        self._writer.write_scalars(self.step, values)
        if jax.process_index() == 0:
            logger.info(progress.line(self.step, values["loss"], values["steps_per_sec"]))
        return values, nonfinite

    def _write_images(self, batch: Any) -> None:
        with jax.set_mesh(self.mesh):
            render, target = self._image_fn(self.model, put_batch(batch, self.mesh))
        render, target = _host_values((render, target))
        self._writer.write_image(self.step, "render_gt_error", image_metrics.image_grid(render, target))

    # ---- preemption --------------------------------------------------------------------------
    def _install_sigterm_handler(self) -> Callable[[], None]:
        """Single process: catch SIGTERM ourselves. Multi-process: JAX's preemption service catches it.

        Returns the function that puts the previous handler back.
        """
        if jax.process_count() > 1:
            return lambda: None

        def on_sigterm(signum: int, frame: Any) -> None:
            logger.warning("SIGTERM received: saving at the end of this step")
            self._sigterm_received = True

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _preemption_requested(self) -> bool:
        if jax.process_count() > 1:
            # Every process must call this each step; it agrees on one step for all of them to save at.
            return multihost_utils.reached_preemption_sync_point(self.step)
        return self._sigterm_received
