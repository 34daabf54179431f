"""`uhap demo`: the whole pipeline on the built-in synthetic data, with a report.

    uhap demo [--workdir W] [--config configs/demo.py:tiny] [--config.audio_overrides='("train.steps=300",)']

W defaults to a fresh `uhap-demo-<time>` folder in the current directory; running again on the same W skips
the finished stages and resumes the interrupted one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="synthesise, train every stage, personalise, animate, report")
    parser.add_argument("--workdir", type=Path, default=None, help="default: ./uhap-demo-<time> (a new folder)")
    parser.add_argument("--config", default="demo:tiny", help="configs/demo.py[:preset]")
    parser.set_defaults(func=run, takes_config=True)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.demo import DEMO_CONFIG, default_workdir, run_demo

    common.log_to_stdout()
    config = load_config(args.config, args.config_overrides)
    workdir = args.workdir or default_workdir()
    output_dirs.check_resumable(workdir, DEMO_CONFIG, "uhap demo")
    print(f"uhap demo: workdir {workdir}", flush=True)
    metrics = run_demo(config, workdir)
    print(json.dumps(metrics, indent=1))
    return 0
