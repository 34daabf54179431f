"""The optimiser every stage trains with (restoring a model for use needs none: `uhap_jax.artifacts.priors`)."""

from __future__ import annotations

import ml_collections
import optax


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam behind global-norm clipping, on a warmup-cosine schedule (`config.optimizer`, over `train.steps`);
    `optimizer.b2` (where the config has it) is Adam's second-moment decay, 0.999 otherwise."""
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, max(opt.warmup_steps, 1), max(config.train.steps, opt.warmup_steps + 1),
        end_value=0.1 * opt.learning_rate,
    )  # fmt: skip
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), optax.adam(schedule, b2=opt.get("b2", 0.999)))
