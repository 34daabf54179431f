"""`uhap eval`: the metrics of one trained checkpoint on its own data (or another capture layout).

    uhap eval --workdir runs/audio      # speech model: LVE, its zero-motion and shuffled-audio baselines, sync
    uhap eval --workdir runs/prior      # prior (workdir or bundle): held-out-view PSNR/SSIM, scan Chamfer
    uhap eval --workdir runs/prior --data /data/other_layout

Prints one `name value` line per metric and, last, the metrics as one JSON line. `uhap sweep` runs the same
evaluations over many checkpoints, datasets and settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uhap_jax.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate one prior or speech-model checkpoint")
    parser.add_argument("--workdir", type=Path, required=True, help="a training workdir or an inference bundle")
    parser.add_argument("--data", type=Path, default=None, help="a capture layout (default: the checkpoint's data)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="records and code caches (default: the data's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.eval.evaluate import evaluate_checkpoint

    common.log_to_stdout()
    if not (args.workdir / "bundle.json").is_file():
        common.require_checkpoint(args.workdir, "--workdir", "uhap train")
    if args.data is not None:
        common.require_dataset(args.data, "--data")
    metrics = evaluate_checkpoint(args.workdir, data=args.data, cache_dir=args.cache_dir)
    width = max(map(len, metrics))
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.6g}")
    print(json.dumps(metrics))
    return 0
