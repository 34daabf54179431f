"""Test setup: 8 fake CPU devices, so that sharding tests run anywhere; the `rng` fixture; a prior checkpoint."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from helpers.layouts import PRIOR_OVERRIDES, write_speech_layout  # noqa: E402
from helpers.models import randomise  # noqa: E402
from helpers.seeds import drawn, fresh_seed  # noqa: E402

from uhap_jax.config_utils import load_config  # noqa: E402
from uhap_jax.geometry import template as template_lib  # noqa: E402
from uhap_jax.models.prior import UHAP  # noqa: E402
from uhap_jax.train import prior_stage  # noqa: E402
from uhap_jax.train.loop import Trainer  # noqa: E402
from uhap_jax.train.optimizer import make_optimizer  # noqa: E402


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh, logged seed per test: inputs are random, never zeros, yet reproducible from the log.

    `UHAP_TEST_SEED=<seed from the log>` replays a failure (helpers/seeds.py, which module fixtures use too).
    """
    return np.random.default_rng(fresh_seed(request.node.name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the seeds of the shared (module) fixtures it used, whose own print went to
    the first test that set them up."""
    outcome = yield
    report = outcome.get_result()
    lines = drawn(item.fixturenames) if report.failed else []
    if lines:
        report.sections.append(("seeds of shared fixtures", "\n".join(lines)))


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="module")
def prior_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(layout root, cache dir, prior workdir) with a prior checkpoint written by the Trainer.

    The prior is a real UHAP whose zero-initialised output layer is made random, so that its codes move the
    lips; training it would compile the rasterizer's step, minutes on these CPUs (tests/test_train_prior.py).
    """
    base = tmp_path_factory.mktemp("audio_stage")
    root, cache, workdir = base / "layout", base / "cache", base / "prior"
    seed = fresh_seed("prior_checkpoint")
    rng = np.random.default_rng(seed)
    write_speech_layout(root, rng)
    config = load_config("configs/prior.py:tiny", PRIOR_OVERRIDES)
    prior = UHAP(template_lib.procedural_head(24), config.model, rngs=nnx.Rngs(seed))
    randomise(prior.decoder.out, rng)
    trainer = Trainer(
        config.train, prior, make_optimizer(config), prior_stage.make_loss_fn(config, capacity=1),
        iter(grain.MapDataset.range(1).to_iter_dataset()), workdir,
    )  # fmt: skip
    trainer.save()
    trainer.close()
    return root, cache, workdir
