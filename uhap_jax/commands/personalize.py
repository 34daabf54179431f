r"""`uhap personalize`: a new person's avatar from a monocular video (the encoder: `uhap train encoder`).

    uhap personalize --prior runs/prior --encoder runs/encoder --audio-model runs/audio \
        --video data/subjects/id004/sequences/mono_00 --out avatars/id004 [--config configs/personalize.py:tiny]

It resumes when run again (the fine-tune's workdir defaults to <out>.work). The exit status is 143 (128 +
SIGTERM) when preempted; a preempted personalisation writes no avatar.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common

PREEMPTED = 128 + signal.SIGTERM


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "personalize",
        help="a new person's avatar from a monocular video",
        description="Config fields can be overridden with --config.<field>=<value>, e.g. --config.train.steps=50.",
    )
    parser.add_argument("--prior", type=Path, required=True, help="a prior workdir or inference bundle")
    parser.add_argument("--encoder", type=Path, required=True, help="a `uhap train encoder` workdir")
    parser.add_argument("--audio-model", type=Path, required=True, help="a `uhap train audio` workdir")
    parser.add_argument("--video", type=Path, required=True,
                        help="a capture-layout subject folder or one sequence folder (one camera)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the avatar folder (replaced when complete)")
    parser.add_argument("--config", default="personalize:tiny", help="configs/personalize.py[:preset]")
    parser.add_argument("--workdir", type=Path, default=None, help="the fine-tune's checkpoints (<out>.work)")
    parser.set_defaults(func=run, takes_config=True)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.train.personalize_stage import personalize

    common.log_to_stdout()
    config = load_config(args.config, getattr(args, "config_overrides", []))
    common.bounded(config.max_frames, "--config.max_frames", "FRAMES")
    common.bounded(config.image_size, "--config.image_size", "SIZE")
    common.require_prior(args.prior, "--prior")
    common.require_checkpoint(args.encoder, "--encoder", "uhap train encoder")
    common.require_checkpoint(args.audio_model, "--audio-model", "uhap train audio")
    if not args.video.exists():  # a layout folder, or (where supported) a plain video file
        raise FileNotFoundError(f"--video {args.video}: does not exist; give a capture-layout subject folder or one "
                                "of its sequence folders")  # fmt: skip
    inputs = [args.prior, args.encoder, args.audio_model, args.video]
    output_dirs.check_replaceable(args.out, "avatar", inputs=inputs)
    workdir = args.workdir or (Path(config.workdir) if config.workdir else None)
    if workdir is not None:
        clash = output_dirs.overlapping_input(workdir, [*inputs, args.out])
        if clash is not None:
            raise common.UsageError(f"--workdir {workdir}: overlaps {clash}; give the fine-tune a folder of its own")
    result = personalize(args.prior, args.encoder, args.video, args.out, config, audio_workdir=args.audio_model,
                         workdir=args.workdir)  # fmt: skip
    print(json.dumps({"avatar": str(result.avatar) if result.avatar else None, "step": result.step,
                      "preempted": result.preempted, "workdir": str(result.workdir)}))  # fmt: skip
    return PREEMPTED if result.preempted else 0
