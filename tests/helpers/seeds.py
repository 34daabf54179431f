"""Logged seeds: random test inputs are fresh on every run, yet replayable from the log.

`fresh_seed(label)` prints `[label] seed=N`. `UHAP_TEST_SEED=N` makes every seed N (the `rng` fixture's and the
shared fixtures'); `UHAP_TEST_SEED_<LABEL>=N` (the label upper-cased, other than letters and digits as `_`, e.g.
UHAP_TEST_SEED_TORCH_SYNCNET) sets one alone, to replay a test whose own seed and a shared fixture's differed.
"""

from __future__ import annotations

import os
import re

ENV = "UHAP_TEST_SEED"
_drawn: dict[str, int] = {}


def env_name(label: str) -> str:
    return f"{ENV}_{re.sub(r'[^0-9A-Za-z]', '_', label).upper()}"


def fresh_seed(label: str) -> int:
    """A fresh 32-bit seed (or the replayed one), printed as `[label] seed=N` and remembered under `label`."""
    seed = int(os.environ.get(env_name(label)) or os.environ.get(ENV) or int.from_bytes(os.urandom(4), "little"))
    print(f"[{label}] seed={seed}")
    _drawn[label] = seed
    return seed


def drawn(labels) -> list[str]:
    """`[label] seed=N` for each of `labels` that drew a seed: a module fixture's seed is printed only in the
    captured output of the first test to use it, so conftest adds these lines to every failing test's report."""
    return [
        f"[{label}] seed={_drawn[label]} ({env_name(label)}={_drawn[label]})" for label in labels if label in _drawn
    ]
