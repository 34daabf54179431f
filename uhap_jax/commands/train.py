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
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common
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
    parser.set_defaults(func=run, takes_config=True)


def check_inputs(stage: str, config: ml_collections.ConfigDict) -> None:
    """The data root and the prior a stage reads exist, before anything is built or written."""
    root = config.get("data", {}).get("root", "")
    if root and not (Path(root) / "dataset.json").is_file():
        what = "does not exist" if not Path(root).exists() else "has no dataset.json (split file)"
        raise FileNotFoundError(f"--config.data.root {root}: {what}; give a layout made by `uhap data synth` or "
                                "`uhap data import`, or leave it empty for the built-in synthetic data")  # fmt: skip
    if stage in ("audio", "encoder"):
        if not config.get("prior_workdir"):
            raise common.UsageError(f"uhap train {stage}: needs a trained prior; pass "
                                    "--config.prior_workdir=<a `uhap train prior` workdir>")  # fmt: skip
        # The audio stage rebuilds the prior from its own prior_config; the encoder stage from the workdir's.
        common.require_checkpoint(Path(config.prior_workdir), "--config.prior_workdir", "uhap train prior",
                                  need_config=stage == "encoder")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Checks the flags and inputs, starts the processes, trains the stage (`train_saving_config`)."""
    common.log_to_stdout()
    config = load_config(args.config or f"{args.stage}:tiny", args.config_overrides)  # bad flags: before start-up
    check_inputs(args.stage, config)
    inputs = [config.get("data", {}).get("root", ""), config.get("prior_workdir", "")]
    output_dirs.check_workdir(args.workdir, args.stage, inputs=inputs)
    initialize_from_args(args)
    import jax

    if args.stage == "audio":
        from uhap_jax.train.audio_stage import train_audio as train_stage
    elif args.stage == "encoder":
        from uhap_jax.train.encoder_stage import train_encoder as train_stage
    else:
        from uhap_jax.train.prior_stage import train_prior as train_stage

    result, metrics = train_saving_config(train_stage, config, args.workdir, writer=jax.process_index() == 0)
    print(json.dumps({"step": result.step, "preempted": result.preempted, **metrics}))
    return 128 + signal.SIGTERM if result.preempted else 0


def train_saving_config(
    train_stage: Callable[[ml_collections.ConfigDict, Path], tuple[Any, dict]],
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    writer: bool = True,
) -> tuple[Any, dict]:
    """`train_stage(config, workdir)`, with `<workdir>/config.json` (what `uhap export` and later stages rebuild
    the model from) written atomically: before a fresh run, and after a resumed one, once its checkpoint has
    been restored into `config`. A refused resume (another model shape) leaves the saved config as it was."""
    resuming = bool(common.finished_steps(workdir))
    if writer and not resuming:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(config, workdir / "config.json")
    result, metrics = train_stage(config, workdir)
    if writer and resuming:
        save_config(config, workdir / "config.json")
    return result, metrics
