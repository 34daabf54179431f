"""What every `uhap` command shares: quiet logging, and the checks that run before any model is built.

Each check raises `UsageError` (exit 2: the flag must change) or `FileNotFoundError` (exit 1: the input is not
there), with one line that names the flag, the path and what to do. None of them creates anything.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from uhap_jax.config_utils import UsageError

# Loggers of libraries whose INFO lines a user cannot act on (JAX's platform probing, orbax's bookkeeping).
_QUIET_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "etils", "tensorflow", "tensorflow_datasets", "grain")


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a line is logged, so a command run in-process (tests, notebooks)
    never logs into a stream that was swapped out and closed since."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stdout() -> None:
    """Our progress lines (INFO) on stdout, libraries at WARNING and above."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_CurrentStdout()], force=True)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def require_file(path: Path, flag: str, what: str) -> Path:
    """`path` must be an existing file."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{flag} {path}: {problem}; give {what}")
    return path


def require_dir(path: Path, flag: str, what: str) -> Path:
    """`path` must be an existing folder."""
    path = Path(path)
    if not path.is_dir():
        problem = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{flag} {path}: {problem}; give {what}")
    return path


def finished_steps(workdir: Path) -> list[int]:
    """The steps of `<workdir>/checkpoints/<step>/` folders that orbax finished (temp folders are not steps)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def require_checkpoint(workdir: Path, flag: str, made_by: str, *, need_config: bool = True) -> Path:
    """A training workdir with at least one finished checkpoint (and its config.json, when the reader rebuilds
    the model from it); nothing is created."""
    workdir = require_dir(workdir, flag, f"a workdir written by `{made_by}`")
    if need_config and not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {workdir}: has no config.json; give a workdir written by `{made_by}`")
    if not finished_steps(workdir):
        raise FileNotFoundError(f"{flag} {workdir}: holds no finished checkpoint (nothing in "
                                f"{workdir / 'checkpoints'}); train it first with `{made_by}`")  # fmt: skip
    return workdir


def require_prior(path: Path, flag: str) -> Path:
    """An inference bundle (`uhap export`) or a prior training workdir with a checkpoint."""
    path = Path(path)
    if (path / "bundle.json").is_file():
        return path
    return require_checkpoint(path, flag, "uhap train prior` or `uhap export")


def require_avatar(path: Path, flag: str = "--avatar") -> Path:
    """An avatar folder (`uhap avatar make` or `uhap personalize`)."""
    path = require_dir(path, flag, "an avatar folder made by `uhap avatar make` or `uhap personalize`")
    if not (path / "avatar.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: not an avatar folder (no avatar.json); make one with "
                                "`uhap avatar make` or `uhap personalize`")  # fmt: skip
    return path


def require_dataset(root: Path, flag: str) -> Path:
    """A capture-layout root (`uhap data synth` or `uhap data import`): it holds subjects/."""
    root = require_dir(root, flag, "a capture-layout root made by `uhap data synth` or `uhap data import`")
    if not (root / "subjects").is_dir():
        raise FileNotFoundError(f"{flag} {root}: not a capture layout (no subjects/ folder); make one with "
                                "`uhap data synth` or `uhap data import`")  # fmt: skip
    return root


# Upper bounds that keep a default run inside a laptop's memory; `UHAP_MAX_<NAME>=<n>` raises one on purpose.
LIMITS = {
    "SIZE": 2048,  # rendered image side, pixels
    "BATCH": 64,  # frames rendered per call
    "FRAMES": 1000,  # frames of a personalisation video held in memory
}


def limit(name: str) -> int:
    """The bound `name` of LIMITS, or the positive integer that `UHAP_MAX_<name>` sets."""
    variable = f"UHAP_MAX_{name}"
    raw = os.environ.get(variable, "")
    if not raw:
        return LIMITS[name]
    if not raw.isdigit() or int(raw) <= 0:
        raise UsageError(f"{variable}={raw!r}: must be a positive integer")
    return int(raw)


def bounded(value: int, flag: str, name: str, *, low: int = 1) -> int:
    """`value` inside [low, limit(name)]; above it the message says how to go past the limit on purpose."""
    if value < low:
        raise UsageError(f"{flag} {value}: must be at least {low}")
    high = limit(name)
    if value > high:
        raise UsageError(f"{flag} {value}: above the limit of {high} that keeps memory in check; set "
                         f"UHAP_MAX_{name}={value} to allow it")  # fmt: skip
    return value
