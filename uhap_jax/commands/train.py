"""`uhap train <stage>`: train a stage from its config (`--config configs/<stage>.py:<preset>`).

    uhap train prior --config configs/prior.py:tiny --workdir runs/prior --config.train.steps=200
    uhap train audio --config configs/audio.py:tiny --workdir runs/audio --config.prior_workdir=runs/prior
    uhap train encoder --config configs/encoder.py:tiny --workdir runs/encoder --config.prior_workdir=runs/prior

A workdir that holds checkpoints resumes from the latest. Multi-host jobs pass the distributed flags (or let
SLURM / TPU / Open MPI be auto-detected). The exit status is 143 (128 + SIGTERM) when preempted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import jax

from uhap_jax.config_utils import load_config, save_config
from uhap_jax.train.distributed import add_distributed_args, initialize_from_args

STAGES = ("prior", "audio", "encoder")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a stage (prior, audio, encoder)",
        description="Config fields can be overridden with --config.<field>=<value>, e.g. --config.train.steps=100.",
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", default=None, help="configs/<stage>.py[:preset] (default: the stage's tiny)")
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints, metrics.jsonl, TensorBoard")
    add_distributed_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    initialize_from_args(args)
    config = load_config(args.config or f"{args.stage}:tiny", args.config_overrides)
    if jax.process_index() == 0:  # what `uhap export` and later stages rebuild the model from
        args.workdir.mkdir(parents=True, exist_ok=True)
        save_config(config, args.workdir / "config.json")
    if args.stage == "audio":
        from uhap_jax.train.audio_stage import train_audio as train_stage
    elif args.stage == "encoder":
        from uhap_jax.train.encoder_stage import train_encoder as train_stage
    else:
        from uhap_jax.train.prior_stage import train_prior as train_stage

    result, metrics = train_stage(config, args.workdir)
    print(json.dumps({"step": result.step, "preempted": result.preempted, **metrics}))
    return 128 + signal.SIGTERM if result.preempted else 0
