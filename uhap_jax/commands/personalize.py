r"""`uhap personalize`: a new person's avatar from a monocular video (the encoder: `uhap train encoder`).

    uhap personalize --prior runs/prior --encoder runs/encoder --audio-model runs/audio \
        --video data/subjects/id004/sequences/mono_00 --out avatars/id004 [--config configs/personalize.py:tiny]

It resumes when run again (the fine-tune's workdir defaults to <out>.work). The exit status is 143 (128 +
SIGTERM) when preempted; a preempted personalisation writes no avatar.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

PREEMPTED = 128 + signal.SIGTERM


def _log_to_stdout() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.train.personalize_stage import personalize

    _log_to_stdout()
    config = load_config(args.config, getattr(args, "config_overrides", []))
    result = personalize(args.prior, args.encoder, args.video, args.out, config, audio_workdir=args.audio_model,
                         workdir=args.workdir)  # fmt: skip
    print(json.dumps({"avatar": str(result.avatar) if result.avatar else None, "step": result.step,
                      "preempted": result.preempted, "workdir": str(result.workdir)}))  # fmt: skip
    return PREEMPTED if result.preempted else 0
