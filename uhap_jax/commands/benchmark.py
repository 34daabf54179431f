r"""`uhap benchmark`: the paper's evaluation protocol on a capture layout (the built-in synthetic data or yours).

    uhap benchmark --prior runs/prior --audio-model runs/audio --encoder runs/encoder --data DIR --out OUT \
        [--lpips-weights lpips_vgg.safetensors] [--syncnet-weights syncnet_v2.model] [--config.train.steps=...]

Held-out identities speaking held-out sentences, scored at held-out cameras; each identity's avatar made from
its monocular clip alone (OUT/avatar_<id>, built once, resumable) and driven by the sentence's audio, beside the
zero-motion, shuffled-audio and oracle-code (upper bound) baselines on the same frames. Writes
OUT/benchmark.json, OUT/benchmark.csv (one row per identity, sentence and condition) and
OUT/benchmark_table.csv, and prints the mean table. `--config` is the personalisation's (configs/personalize.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from uhap_jax.config_utils import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("benchmark", help="the paper's protocol: audio-driven avatars of unseen people")
    parser.add_argument("--prior", type=Path, required=True, help="a prior workdir or inference bundle")
    parser.add_argument("--audio-model", type=Path, required=True, help="a `uhap train audio` workdir")
    parser.add_argument("--encoder", type=Path, required=True, help="a `uhap train encoder` workdir")
    parser.add_argument("--data", type=Path, required=True, help="a capture layout with dataset.json (the split)")
    parser.add_argument("--out", type=Path, required=True, help="results and the test identities' avatars")
    parser.add_argument(
        "--config",
        default="personalize:tiny",
        help="configs/personalize.py[:preset] of the test identities' avatars; --config.* overrides it",
    )
    parser.add_argument("--lpips-weights", type=Path, default=None, help="LPIPS-VGG weights (.safetensors/.npz)")
    parser.add_argument("--syncnet-weights", type=Path, default=None, help="syncnet_v2 weights (LSE-D/LSE-C)")
    parser.add_argument("--max-lag", type=int, default=5, help="sync search range, frames (default 5)")
    parser.set_defaults(func=run, takes_config=True)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.eval import benchmark
    from uhap_jax.train import benchmark_avatars

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for flag, path in (("--lpips-weights", args.lpips_weights), ("--syncnet-weights", args.syncnet_weights)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file (weights are never downloaded; give a local file)")
    config = load_config(args.config, getattr(args, "config_overrides", []))
    result = benchmark_avatars.run_benchmark(args.prior, args.encoder, args.audio_model, args.data, args.out, config,
                                             lpips_weights=args.lpips_weights, syncnet_weights=args.syncnet_weights,
                                             max_lag=args.max_lag)  # fmt: skip
    rows = benchmark.table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    for name, value in result["prior_reconstruction"].items():
        print(f"{name}  {value:.4f}")
    print(benchmark.NOTES)
    if "true_scan_identity" in result:
        for driver, values in result["true_scan_identity"]["means"].items():
            print(f"true_scan_identity {driver}  " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
        print(result["true_scan_identity"]["note"])
    print(json.dumps({**benchmark.flat_metrics(result), **result["prior_reconstruction"]}))
    return 0
