"""`uhap export --workdir W --out BUNDLE [--dtype bfloat16]`: an inference bundle from a (sharded) checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.artifacts.bundles import DTYPES
from uhap_jax.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an inference bundle (params, config, template)")
    parser.add_argument("--workdir", type=Path, required=True, help="a prior training workdir")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced when complete)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the parameters")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.artifacts.priors import export_bundle

    common.log_to_stdout()
    common.require_checkpoint(args.workdir, "--workdir", "uhap train prior")
    output_dirs.check_replaceable(args.out, "bundle", inputs=[args.workdir])
    out = export_bundle(args.workdir, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
