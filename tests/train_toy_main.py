"""A small real training job for the loop's tests: an NNX MLP regressing a fixed random function.

Imported by the tests (model, data, loss) and run by them as a subprocess (kill -9, SIGTERM, multi-process):
    python tests/train_toy_main.py WORKDIR --steps 60 [--data_delay 0.05] [--coordinator_address ...]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uhap_jax.train.distributed import add_distributed_args, initialize_from_args  # noqa: E402
from uhap_jax.train.loop import Trainer, default_config  # noqa: E402

IN_DIM, HIDDEN, OUT_DIM, NUM_EXAMPLES = 8, 64, 2, 4096


class ToyMLP(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout -> Linear: params, batch statistics and a held RNG stream."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(IN_DIM, HIDDEN, use_bias=False, rngs=rngs)  # BatchNorm follows
        self.norm = nnx.BatchNorm(HIDDEN, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUT_DIM, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def make_model(seed: int = 0) -> ToyMLP:
    return ToyMLP(nnx.Rngs(params=seed, dropout=seed + 1))


class ToyData:
    """Batch k is a deterministic function of k, so a grain iterator's position fixes the data order."""

    def __init__(self, seed: int, batch_size: int, nan_batches: tuple[int, ...] = (), delay: float = 0.0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(NUM_EXAMPLES, IN_DIM)).astype(np.float32)
        w = rng.normal(size=(IN_DIM, OUT_DIM)).astype(np.float32)
        self.y = np.tanh(self.x @ w)
        self.seed, self.batch_size, self.nan_batches, self.delay = seed, batch_size, nan_batches, delay

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch k."""
        index = np.random.default_rng([self.seed, k]).choice(NUM_EXAMPLES, self.batch_size, replace=False)
        local = self.batch_size // jax.process_count()
        index = index[jax.process_index() * local : (jax.process_index() + 1) * local]
        x = self.x[index].copy()
        if k in self.nan_batches:
            x[0, 0] = np.nan
        if self.delay:
            time.sleep(self.delay)
        return {"x": x, "y": self.y[index], "index": index.astype(np.int32)}

    def iterator(self) -> grain.DatasetIterator:
        dataset = grain.MapDataset.range(10**9).map(self.batch)
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def loss_fn(model: ToyMLP, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MSE on inputs jittered with the step's RNG (so the per-step key matters to the result)."""
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    loss = jnp.mean((model(x) - batch["y"]) ** 2)
    index = batch["index"].astype(jnp.float32)
    return loss, {"index_sum": jnp.sum(index), "first_index": index[0]}


def image_fn(model: ToyMLP, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Predictions and targets painted as 4x4 images, to exercise the image-grid output."""
    model.eval()

    def paint(values: jax.Array) -> jax.Array:
        rgb = jnp.concatenate([values, values[:, :1]], axis=-1) * 0.5 + 0.5
        return jnp.broadcast_to(rgb[:, None, None, :], (values.shape[0], 4, 4, 3))

    return paint(model(batch["x"])), paint(batch["y"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--log_every", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=2)
    parser.add_argument("--data_delay", type=float, default=0.0, help="seconds of sleep per batch")
    add_distributed_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    initialize_from_args(args)

    config = default_config()
    config.steps, config.log_every, config.checkpoint_every = (
        args.steps,
        args.log_every,
        args.checkpoint_every,
    )
    config.mesh.fsdp = args.fsdp
    config.sharding.min_shard_size = 256
    data = ToyData(seed=0, batch_size=args.batch_size, delay=args.data_delay)
    trainer = Trainer(config, make_model(), optax.adam(1e-2), loss_fn, data.iterator(), args.workdir)
    result = trainer.run()
    trainer.close()
    return 128 + signal.SIGTERM if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
