"""`uhap sweep`: evaluate every (checkpoint, dataset, setting) combination, split over the JAX processes.

    uhap sweep --config configs/sweep.py:tiny --workdir runs/sweep \
        --config.checkpoints='("runs/prior", "bundles/prior")' --config.settings.image_scale='(1.0, 0.5)'

A checkpoint is a prior training workdir (its latest checkpoint) or an inference bundle (`uhap export`). A
dataset is a capture-layout root, or "" for the synthetic dataset of `synth_preset` (made once into the cache).
Each settings field is a tuple; the sweep runs their product with the checkpoints and datasets.
"""

import ml_collections


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "base", "large"):
        raise ValueError(f"configs/sweep.py: preset must be tiny, base or large, got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.checkpoints = ()  # prior workdirs or bundles; at least one is needed
    config.datasets = ("",)  # capture-layout roots; "" = the synthetic dataset of synth_preset
    config.synth_preset = "tiny"
    config.cache_dir = ""  # records and the synthetic dataset (default $UHAP_CACHE or ~/.cache/uhap)

    config.settings = ml_collections.ConfigDict()
    # Render size of the held-out views relative to the capture (intrinsics scale with it); the encoder
    # always sees the captured size.
    config.settings.image_scale = (1.0,)
    # Held-in views the expression encoder averages over; 0 keeps the checkpoint's own data.num_views.
    config.settings.num_views = (0,)

    # `uhap benchmark` as a setting: with an encoder workdir, every audio-stage checkpoint is also scored by the
    # paper's protocol on each dataset (avatars of the held-out identities from their monocular clips, built once
    # per prior, encoder and personalisation under <workdir>/benchmark/, each checkpoint's speech model driving
    # them; columns benchmark/<metric>), and ranking.csv orders the checkpoints by rank_by.
    config.benchmark = ml_collections.ConfigDict()
    config.benchmark.encoder = ""  # a `uhap train encoder` workdir trained against the checkpoints' prior
    config.benchmark.personalize_config = "personalize:tiny"
    config.benchmark.personalize_overrides = ()  # "a.b=v" strings
    config.benchmark.max_lag = 5
    # The benchmark metric ranking.csv orders by, best first: lve_mm2 lowest first; psnr, ssim, mouth_psnr,
    # mouth_ssim or sync_confidence highest first.
    config.benchmark.rank_by = "lve_mm2"

    config.eval = ml_collections.ConfigDict()
    config.eval.num_frames = 8  # frames per job (rounded down to a multiple of batch_size)
    config.eval.batch_size = 4

    if preset == "base":
        config.synth_preset = "base"
        config.settings.image_scale = (0.5, 1.0)
        config.eval.num_frames = 32
        config.eval.batch_size = 8
    elif preset == "large":
        config.synth_preset = "base"
        config.settings.image_scale = (0.5, 1.0)
        config.settings.num_views = (1, 2, 4)
        config.eval.num_frames = 64
        config.eval.batch_size = 8
    return config
