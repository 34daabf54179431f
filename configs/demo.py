"""`uhap demo`: the whole pipeline on the built-in synthetic data, with a report.

    uhap demo --workdir runs/demo [--config configs/demo.py:tiny] [--config.prior_overrides='("train.steps=100",)']

Each stage runs from its own config file and preset, with the overrides listed here ("a.b=v" strings, as on the
command line). The bars are the ones the report checks. Presets: tiny (64², 2 CPU cores, the README's demo) and
gpu (the same protocol at 512² with the base models, on one GPU; no pretrained weights, so the speech model's
wav2vec2 is trained from scratch as in tiny).
"""

import ml_collections


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "gpu"):
        raise ValueError(f"configs/demo.py: preset must be tiny (2 CPU cores) or gpu (one GPU), got {preset!r}")
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

    if preset == "gpu":
        # The base generator (512², 4x-denser surface, hair strands, ears, neck) with the tiny demo's counts of
        # identities, sentences and cameras, so that the whole protocol runs in minutes on one GPU.
        config.synth_preset = "base"
        config.synth_overrides = ("num_identities=8", "num_held_out_identities=2", "sentences_per_identity=4",
                                  "max_seconds=2.0", "num_cameras=8", "held_out_cameras=(2, 5)")  # fmt: skip
        # The base prior (UV 256², 61k Gaussians) with the tracked-mesh terms on, as in tiny (the synthetic
        # captures have tracked meshes; without them the lips barely move, docs/benchmarks.md session 9), and no
        # LPIPS (its weights are not shipped).
        config.prior_config = "configs/prior.py:base"
        config.prior_overrides = ("train.steps=4000", "eval.every=2000", "train.checkpoint_every=1000",
                                  "train.image_every=0", "loss.tracked_mesh=1e5", "loss.lpips=0.0")  # fmt: skip
        config.audio_overrides = ("train.steps=2000", "eval.every=1000", "train.checkpoint_every=1000")
        config.encoder_config = "configs/encoder.py:base"
        config.encoder_overrides = ("train.steps=2000", "eval.every=2000", "train.checkpoint_every=1000")
        config.personalize_config = "configs/personalize.py:base"
        config.personalize_overrides = ("train.steps=600", "train.checkpoint_every=300")
        config.video_size = 512
    return config
