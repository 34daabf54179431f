"""A workdir's `metrics.jsonl`, read back: every stage's rows (written by `uhap_jax.train.metrics.MetricWriter`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a `metrics.jsonl`, one per line. A run killed mid-write leaves a torn last line: it is
    dropped with a warning (the step is redone or was never finished), never an error. A bad line before
    others is real damage and skipped the same way, naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            logger.warning("%s:%d: unreadable metrics row (a write cut short); dropped", path, number)
            continue
        rows.append(row)
    return rows


def last_value(workdir: Path, name: str) -> float | None:
    """The last logged value of `name` in `<workdir>/metrics.jsonl`, or None."""
    values = [row[name] for row in read_rows(Path(workdir) / "metrics.jsonl") if row.get(name) is not None]
    return float(values[-1]) if values else None
