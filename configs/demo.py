"""`uhap demo`: the whole pipeline on the built-in synthetic data, with a report.

    uhap demo --workdir runs/demo [--config configs/demo.py:tiny] [--config.prior_overrides='("train.steps=100",)']

Each stage runs from its own config file and preset, with the overrides listed here ("a.b=v" strings, as on the
command line). The bars are the ones the report checks.
"""

import ml_collections


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset != "tiny":
        raise ValueError(f"configs/demo.py: the demo has only the tiny preset (2 CPU cores), got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.synth_preset = "tiny"
    config.synth_overrides = ()  # "field=value" strings on data_pipelines.synth.synth_config(synth_preset)
    config.prior_config = "configs/prior.py:tiny"
    config.prior_overrides = ("train.steps=400", "eval.every=200")
    config.audio_config = "configs/audio.py:tiny"
    config.audio_overrides = ("train.steps=300", "eval.every=300")
    config.encoder_config = "configs/encoder.py:tiny"
    config.encoder_overrides = ()
    config.personalize_config = "configs/personalize.py:tiny"
    config.personalize_overrides = ()
    config.video_size = 256  # pixels, square, front camera
    config.report_frames = 4  # render-vs-ground-truth frames per model
    # JAX's persistent compilation cache in W/xla_cache (empty on a new workdir): a program that the stages build
    # again (per identity, per stage) is compiled once.
    config.xla_cache = True

    config.bars = ml_collections.ConfigDict()
    # On `uhap benchmark`'s numbers: held-out identities (avatars from their monocular clip alone) speaking
    # held-out sentences, scored at held-out cameras against the ground truth.
    config.bars.prior_psnr = 24.0  # dB, the prior at held-out cameras on held-out frames of training identities
    config.bars.lve_below_baselines = 0.3  # LVE at least this fraction below zero motion and shuffled audio
    config.bars.sync_offset_frames = 1.0  # |audio-mouth offset| (and its confidence above shuffled audio's)
    config.bars.oracle_gap_db = 3.0  # audio-driven avatar's PSNR at most this far below the oracle-code render
    config.bars.minutes = 15.0  # the goal for a cold run on 2 cores
    return config
