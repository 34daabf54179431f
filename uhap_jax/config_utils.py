"""Load `configs/<stage>.py:<preset>` files and apply `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import ml_collections

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class UsageError(ValueError):
    """A command line the user must change (a flag, a `--config.*` override, a preset): `uhap` exits with 2."""


def load_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py[:preset]`; a bare stage name (`prior`) means `configs/prior.py`. A relative
    path that is not under the working directory is looked up in this checkout (`configs/prior.py` from anywhere).

    The file defines `get_config(preset: str) -> ConfigDict`. Overrides are `a.b.c=value` strings; the
    value is parsed as a Python literal when it can be, and must keep the field's type.
    """
    path_str, _, preset = spec.partition(":")
    path = Path(path_str)
    if not path.suffix:
        path = _REPO_CONFIGS / f"{path_str}.py"
    elif not path.is_file() and not path.is_absolute() and (_REPO_CONFIGS.parent / path).is_file():
        # `configs/prior.py` as the stages' defaults and saved configs name it, from outside the checkout
        path = _REPO_CONFIGS.parent / path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in _REPO_CONFIGS.glob("*.py") if not p.stem.startswith("_")))
        raise UsageError(f"--config {spec}: config file {path} does not exist (built-in stages: {known})")
    module_spec = importlib.util.spec_from_file_location(f"uhap_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"--config {spec}: {path} defines no get_config(preset)")
    try:
        config = module.get_config(preset) if preset else module.get_config()
    except (ValueError, KeyError) as error:  # the config files refuse an unknown preset this way
        message = error.args[0] if error.args else repr(error)
        raise UsageError(f"--config {spec}: {message}") from error
    for item in overrides or []:
        apply_override(config, item, source=str(path))
    return config


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> None:
    """Set `a.b.c=value` in place; an unknown key or a value of another type is a `UsageError` naming the flag.

    The value is a Python literal when it parses as one (`3`, `1e-3`, `(1, 2)`, `True`), else a plain string.
    An int is accepted for a float field and a list for a tuple field; a field that is None takes anything.
    """
    key, sep, raw = item.partition("=")
    flag = key if key.startswith("--") else f"--config.{key}"
    if not sep:
        raise UsageError(f"{flag}: overrides look like --config.<field>=<value> ({source})")
    key = key.removeprefix("--").removeprefix("config.")
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the top level"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise UsageError(f"{flag}: {source} has no field {key!r} (no {part!r} at {where}; known: "
                             f"{', '.join(known)})")  # fmt: skip
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = raw
    node[leaf] = _coerce(node[leaf], value, raw, flag)


def _coerce(old, value, raw: str, flag: str):
    """`value` in the type of the field's current value `old`, or a UsageError saying what was expected."""
    if old is None:
        return value
    if isinstance(old, ml_collections.ConfigDict):
        raise UsageError(f"{flag}: is a group of fields ({', '.join(sorted(old.keys()))}); set one of them")
    expected = {
        bool: "True or False",
        int: "an integer",
        float: "a number",
        tuple: "a tuple like (1, 2)",
        list: "a list like [1, 2]",
    }.get(type(old), f"a {type(old).__name__}")
    if isinstance(old, bool):
        ok = isinstance(value, bool)
    elif isinstance(old, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(old, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(old, str):
        ok, value = True, value if isinstance(value, str) else raw
    elif isinstance(old, tuple | list):
        ok = isinstance(value, tuple | list)
        value = type(old)(value) if ok else value
    else:
        ok = isinstance(value, type(old))
    if not ok:
        raise UsageError(f"{flag}: expected {expected} (now {old!r}), got {raw!r}")
    return value


def save_config(config: ml_collections.ConfigDict, path: str | Path) -> None:
    """Write a config as JSON (tuples become lists; `read_config` turns them back), atomically: a reader or a
    crash sees the old file or the new one, never a torn one."""
    write_text_atomic(Path(path), config.to_json_best_effort(indent=1, sort_keys=True))


def write_atomic(path: Path, write_to: Callable[[BinaryIO], object]) -> None:
    """`path` holds what `write_to(stream)` wrote, or what it held before, whatever happens (a temp file beside it,
    fsync, rename)."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write_to(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, whatever happens."""
    write_atomic(path, lambda stream: stream.write(text.encode()))


def read_config(path: str | Path) -> ml_collections.ConfigDict:
    """A config saved by `save_config` (e.g. `<workdir>/config.json`), lists read back as tuples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved config (was this written by `uhap train`?)")

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    try:
        return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
