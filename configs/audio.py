"""`uhap train audio`: the universal speech model, audio -> UHAP expression codes, supervised by a trained prior.

    uhap train audio --config configs/audio.py:tiny --workdir runs/audio --config.prior_workdir=runs/prior

Presets: tiny (CPU/CI: a small wav2vec2 trained from scratch, minutes), base (one GPU: wav2vec2-base fine-tuned
from a local folder), large (a cluster: wav2vec2-large / HuBERT-large fine-tuned). No weights are downloaded.
"""

import ml_collections

from uhap_jax.train.loop import default_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "base", "large"):
        raise ValueError(f"configs/audio.py: preset must be tiny, base or large, got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset

    # The trained prior: its workdir (checkpoints/) and the config it was trained with, as a spec and the
    # overrides given to `uhap train prior` ("a.b=v" strings). Its latest checkpoint is used.
    config.prior_workdir = ""
    config.prior_config = "configs/prior.py:tiny"
    config.prior_overrides = ()

    # Where the captures are; empty fields take the prior config's (the data the prior was trained on).
    config.data = ml_collections.ConfigDict()
    config.data.root = ""
    config.data.synth_preset = ""
    config.data.cache_dir = ""
    config.data.window_frames = 32  # frames per training window (audio cut to the same span)
    config.data.batch_size = 8  # windows per global batch
    # Each training window played at a random rate within 1 +- this (audio and codes together): more voices. On
    # the demo it lowered the held-out-identity LVE from 21.9 to 17.6 mm² (docs/benchmarks.md, session 9).
    config.data.speed_perturbation = 0.1
    config.data.code_batch_size = 16  # frames per call when the prior encodes the targets (once)
    config.data.num_threads = 2
    config.data.prefetch = 4

    config.model = ml_collections.ConfigDict()  # AudioToLatentConfig fields; latent_dim comes from the prior
    config.model.width = 64
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.mlp_dim = 128
    config.model.causal = False
    config.model.dropout = 0.1
    config.model.encoder_mode = "scratch"  # "frozen" / "finetune" load `encoder_path`
    config.model.encoder_layer = -1
    config.model.rope_base = 10_000.0
    config.encoder_path = ""  # a local transformers wav2vec2/HuBERT folder (config.json + safetensors)
    # "scratch" only: a transformers Wav2Vec2Config's fields (the default conv stack: 16 kHz -> 50 Hz).
    config.encoder = ml_collections.ConfigDict()
    config.encoder.hidden_size = 64
    config.encoder.num_hidden_layers = 2
    config.encoder.num_attention_heads = 4
    config.encoder.intermediate_size = 128
    config.encoder.conv_dim = (32, 32, 32, 32, 32, 32, 32)
    config.encoder.num_conv_pos_embeddings = 16
    config.encoder.num_conv_pos_embedding_groups = 4
    config.encoder.hidden_dropout = 0.0
    config.encoder.attention_dropout = 0.0
    config.encoder.activation_dropout = 0.0
    config.encoder.feat_proj_dropout = 0.0

    config.loss = ml_collections.ConfigDict()
    config.loss.latent = 1.0  # MSE of z
    config.loss.velocity = 1.0  # MSE of z's frame-to-frame change
    config.loss.lip = 0.1  # x mm^2: lip Gaussians of the decoded prediction against the decoded target
    config.loss.lip_frames = 8  # frames per window decoded for the lip loss (all when fewer)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.grad_clip = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 200  # steps; LVE against both baselines and the lip-sync offset into metrics.jsonl
    config.eval.batch_size = 8  # windows per eval call
    config.eval.max_lag = 5  # frames of lag searched by the lip-sync offset

    config.train = default_config()
    config.train.steps = 1000
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.mesh.fsdp = 1
    # The frozen prior and the template constants live in `rest`: whole on every device.
    config.train.sharding.rules = ((r"^rest/", "replicate"),)

    if preset == "base":
        config.prior_config = "configs/prior.py:base"
        config.data.window_frames = 100
        config.data.batch_size = 16
        config.data.num_threads = 8
        config.data.prefetch = 16
        config.model.width = 256
        config.model.num_layers = 4
        config.model.num_heads = 4
        config.model.mlp_dim = 1024
        config.model.encoder_mode = "finetune"
        config.loss.lip_frames = 16
        config.optimizer.learning_rate = 1e-4
        config.optimizer.warmup_steps = 1000
        config.eval.every = 2000
        config.eval.max_lag = 10
        config.train.steps = 50_000
        config.train.log_every = 100
        config.train.checkpoint_every = 2000
    elif preset == "large":
        config.prior_config = "configs/prior.py:large"
        config.data.window_frames = 150
        config.data.batch_size = 64
        config.data.num_threads = 16
        config.data.prefetch = 32
        config.model.width = 512
        config.model.num_layers = 6
        config.model.num_heads = 8
        config.model.mlp_dim = 2048
        config.model.encoder_mode = "finetune"
        config.model.encoder_layer = -1
        config.loss.lip_frames = 16
        config.optimizer.learning_rate = 5e-5
        config.optimizer.warmup_steps = 2000
        config.eval.every = 5000
        config.eval.max_lag = 10
        config.train.steps = 200_000
        config.train.log_every = 100
        config.train.checkpoint_every = 5000
        config.train.sharding.min_shard_size = 2**16
    return config
