"""Load `configs/<stage>.py:<preset>` files and apply `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py[:preset]`; a bare stage name (`prior`) means `configs/prior.py`.

    The file defines `get_config(preset: str) -> ConfigDict`. Overrides are `a.b.c=value` strings; the
    value is parsed as a Python literal when it can be, and must keep the field's type.
    """
    path_str, _, preset = spec.partition(":")
    path = Path(path_str)
    if not path.suffix:
        path = _REPO_CONFIGS / f"{path_str}.py"
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"uhap_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config(preset)")
    config = module.get_config(preset) if preset else module.get_config()
    for item in overrides or []:
        apply_override(config, item, source=str(path))
    return config


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> None:
    """Set `a.b.c=value` in place, refusing unknown keys and type changes."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} for {source} must look like key=value")
    key = key.removeprefix("--").removeprefix("config.")
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node:
            raise KeyError(f"{source} has no field {key!r} (at {part!r})")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise KeyError(f"{source} has no field {key!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    old = node[leaf]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise TypeError(f"{source}: {key} is a bool, got {raw!r}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def save_config(config: ml_collections.ConfigDict, path: str | Path) -> None:
    """Write a config as JSON (tuples become lists; `read_config` turns them back)."""
    Path(path).write_text(config.to_json_best_effort(indent=1, sort_keys=True))


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
