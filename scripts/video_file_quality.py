"""Personalised quality through a calibrated capture-layout folder and through a plain mp4 (calibration withheld),
on a small synthetic capture (docs/benchmarks.md, "Plain video files"):

    PYTHONPATH=. python scripts/video_file_quality.py /tmp/video_quality [encoder steps] [personalise steps]

The data and models are those of tests/test_encoder_personalize.py (3 identities, 4 rig cameras, 32^2, a random
prior), with the encoder and its head localiser trained for more steps. Prints one JSON line per path.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

from data_pipelines import synth
from uhap_jax import cli
from uhap_jax.config_utils import load_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import UHAP
from uhap_jax.train import personalize_stage

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from helpers.models import randomise, save_step_zero  # noqa: E402
from test_encoder_personalize import ENCODER_OVERRIDES, PERSONALIZE_OVERRIDES, PRIOR_OVERRIDES  # noqa: E402


def main(base: Path, encoder_steps: int = 400, steps: int = 150) -> None:
    rng = np.random.default_rng(0)
    root = base / "layout"
    if not root.exists():
        data = synth.synth_config("tiny")
        data.update({"num_identities": 3, "num_held_out_identities": 1, "sentences_per_identity": 2,
                     "max_seconds": 0.8, "num_cameras": 4, "held_out_cameras": (1,), "image_size": 32,
                     "template_resolution": 24, "gaussian_uv_resolution": 32, "seed": 7})  # fmt: skip
        synth.generate(root, data, progress=False)
    prior_cfg = load_config("configs/prior.py:tiny",
                            [*PRIOR_OVERRIDES, f"data.root={root}", f"data.cache_dir={base / 'cache'}"])  # fmt: skip
    if not (base / "prior").exists():
        prior = UHAP(template_lib.procedural_head(24), prior_cfg.model, rngs=nnx.Rngs(0))
        randomise(prior.decoder.out, rng, scale=0.1)
        save_step_zero(prior_cfg, prior, base / "prior")
    encoder = base / "encoder"
    overrides = [o for o in ENCODER_OVERRIDES if "steps" not in o and "every" not in o]
    assert cli.main(["train", "encoder", "--config", "configs/encoder.py:tiny", "--workdir", str(encoder),
                     f"--config.prior_workdir={base / 'prior'}", *overrides, f"--config.train.steps={encoder_steps}",
                     f"--config.eval.every={encoder_steps}", f"--config.train.checkpoint_every={encoder_steps}",
                     "--config.train.log_every=50"]) == 0  # fmt: skip
    config = load_config("configs/personalize.py:tiny", [o.removeprefix("--config.") for o in PERSONALIZE_OVERRIDES]
                         + [f"train.steps={steps}", "eval.num_frames=8", "train.checkpoint_every=1000"])  # fmt: skip
    for path in ("", "metadata", "fov"):
        start = time.time()
        metrics = personalize_stage.heldout_quality(base / "prior", encoder, config, base / f"work_{path or 'folder'}",
                                                    as_file=path)  # fmt: skip
        print(json.dumps({"path": path or "folder", "seconds": round(time.time() - start, 1), **metrics}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(int(arg) for arg in sys.argv[2:4]))
