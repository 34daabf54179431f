"""The `uhap` console script. Each subcommand lives in `uhap_jax/commands/<name>.py` and registers itself there."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under uhap_jax.commands; each defines `register(subparsers)` that adds its parser with `func=run`.
COMMAND_MODULES = [
    "animate",
    "bench",
    "benchmark",
    "data",
    "demo",
    "eval",
    "export",
    "nersemble",
    "personalize",
    "sweep",
    "train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uhap", description="Audio-driven universal Gaussian head avatars.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"uhap_jax.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    config_overrides = [u for u in unknown if u.startswith("--config.")]
    rest = [u for u in unknown if not u.startswith("--config.")]
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    args.config_overrides = config_overrides
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
