"""The `uhap` console script. Each subcommand lives in `uhap_jax/commands/<name>.py` and registers itself there.

Every refusal and failure ends here as one line on stderr, `error: ...`, naming the file or flag and what to do;
the exit status is 2 for a command line to change (usage) and 1 for anything else. The traceback is printed only
with `--debug` (anywhere on the command line) or `UHAP_DEBUG=1`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

# Modules under uhap_jax.commands; each defines `register(subparsers)` that adds its parser with `func=run`, and
# `takes_config=True` on the parsers that accept `--config.<field>=<value>` overrides.
COMMAND_MODULES = [
    "animate",
    "bench",
    "data",
    "demo",
    "eval",
    "export",
    "personalize",
    "sweep",
    "train",
]
DEBUG_FLAG = "--debug"
DEBUG_ENV = "UHAP_DEBUG"
USAGE_EXIT, FAILURE_EXIT, INTERRUPTED_EXIT = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (exit 2) instead of the usage block."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uhap", description="Audio-driven universal Gaussian head avatars.",
                     epilog=f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) prints the traceback of an error.")  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"uhap_jax.commands.{name}").register(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Notices a user cannot act on stay off the terminal (set before the libraries are imported)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found ..."
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**27 else f"{num_bytes / 2**20:.1f} MiB"


def out_of_memory_message(error: BaseException) -> str | None:
    """A one-line account of an out-of-memory error (host or accelerator) with the size asked, else None."""
    text = str(error)
    host = isinstance(error, MemoryError)
    if not host and "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    if asked:
        size = _gib(int(asked.group(1)))
    else:
        human = re.search(r"allocate ([\d.]+ ?[KMGT]i?B)", text)
        size = human.group(1) if human else "an unknown amount"
    where = "host memory" if host else "accelerator memory"
    return (f"out of memory: {size} of {where} was asked for and is not available; use a smaller --size, "
            "--batch-size or preset, shorter inputs, or a machine with more memory")  # fmt: skip


def describe(error: BaseException) -> str:
    """The error's own message on one line (its first line when it has several)."""
    oom = out_of_memory_message(error)
    if oom:
        return oom
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if not isinstance(error, ValueError | OSError | RuntimeError | KeyError | MemoryError):
        first = f"{type(error).__name__}: {first} (an internal error: rerun with {DEBUG_FLAG} and report it)"
    return first


def exit_status(error: BaseException) -> int:
    from uhap_jax.config_utils import UsageError

    return USAGE_EXIT if isinstance(error, UsageError) else FAILURE_EXIT


def _run(argv: list[str]) -> int:
    from uhap_jax.config_utils import UsageError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if u.startswith("--config.")]
    rest = [u for u in unknown if not u.startswith("--config.")]
    command = " ".join(a for a in (args.command, getattr(args, "target", None), getattr(args, "action", None),
                                   getattr(args, "data_command", None)) if a)  # fmt: skip
    if rest:
        raise UsageError(f"uhap {command}: unrecognised arguments {' '.join(rest)} (see `uhap {command} --help`)")
    if overrides and not getattr(args, "takes_config", False):
        raise UsageError(f"uhap {command}: takes no --config.* overrides (got {' '.join(overrides)}); it has no "
                         "config to change")  # fmt: skip
    args.config_overrides = overrides
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (errors become one line on stderr, see the module docstring)."""
    _quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return _run(argv)
    except SystemExit as stop:  # argparse's usage errors and --help, as a status (main may run in-process)
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)
        print(f"error: {stop.code}", file=sys.stderr)
        return FAILURE_EXIT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as error:  # noqa: BLE001 - the one place every error is turned into a line
        if debug:
            traceback.print_exc()
        print(f"error: {describe(error)}", file=sys.stderr)
        return exit_status(error)


if __name__ == "__main__":
    sys.exit(main())
