"""Small models for tests: a tiny prior config, random cameras, random output layers, step-0 checkpoints."""

from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uhap_jax.config_utils import save_config
from uhap_jax.geometry import cameras
from uhap_jax.train.loop import Trainer, default_config
from uhap_jax.train.optimizer import make_optimizer


def small_model_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.uv_resolution = 16
    config.z_dim = 8
    config.decoder_base_resolution = 4
    config.decoder_channels = (8, 8)
    config.expression_channels = (4, 8)
    config.expression_hidden = 16
    config.color_features = 4
    config.color_hidden = 8
    config.offset_scale = 0.01
    config.max_scale_ratio = 4.0
    config.thickness = 0.3
    config.opacity_init_logit = 3.0
    return config


def random_cameras(rng, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cameras 0.9 m away on the front hemisphere, looking at the head."""
    views = []
    for azimuth in rng.uniform(-1.0, 1.0, count):
        eye = 0.9 * np.array([np.sin(azimuth), rng.uniform(-0.2, 0.2), -np.cos(azimuth)])
        views.append(cameras.look_at(eye, np.zeros(3)))
    intrinsics = np.stack([cameras.intrinsics_from_fov(20.0, size, size)] * count)
    return np.stack(views).astype(np.float32), intrinsics.astype(np.float32)


def randomise(module: nnx.Module, rng, scale: float = 0.3) -> None:
    """Overwrite a layer's zero-initialised kernel with random values, so that its output matters."""
    module.kernel[...] = jnp.asarray(rng.normal(0.0, scale, module.kernel.shape), jnp.float32)


def save_step_zero(config, model: nnx.Module, workdir: Path) -> None:
    """A step-0 checkpoint as `uhap train` writes it (sharded over the 8 test devices), with its config.json."""
    trainer = Trainer(config.train, model, make_optimizer(config), lambda m, b, r: (jnp.zeros(()), {}),
                      iter(grain.MapDataset.range(1).to_iter_dataset()), workdir)  # fmt: skip
    trainer.save()
    trainer.close()
    save_config(config, workdir / "config.json")


def small_config(**overrides) -> ml_collections.ConfigDict:
    """The Trainer's config for the toy model: 6 steps, every step logged, the kernels sharded over fsdp."""
    config = default_config()
    config.steps, config.log_every, config.checkpoint_every = 6, 1, 1000
    config.sharding.min_shard_size = 256  # shard the toy's 8x64 and 64x2 kernels over fsdp
    config.update(overrides)
    return config


def host_tree(tree):
    """Numpy copies (PRNG keys as their key data): the train state is donated on the next step."""

    def fetch(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)
