"""A run's metric output: `<workdir>/metrics.jsonl`, TensorBoard events beside it, progress, image grids.

Only process 0 writes; on other processes the writer is a no-op, so callers need no `if`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from uhap_jax.artifacts.metrics_log import read_rows

logger = logging.getLogger(__name__)


def _json_value(value: float) -> float | int | None:
    """Non-finite numbers become null: strict JSON has no NaN, and a skipped step's loss is NaN."""
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    """Appends one JSON object per logged step to `metrics.jsonl`; mirrors it and images to TensorBoard."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(logdir=str(self.workdir), flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a run killed after its last checkpoint redoes those steps on resume."""
        if not self.enabled or not self.jsonl_path.exists():
            return
        kept = "".join(json.dumps(row) + "\n" for row in read_rows(self.jsonl_path) if row["step"] <= step)
        temp = self.jsonl_path.with_name(f".{self.jsonl_path.name}.tmp")
        temp.write_text(kept)
        os.replace(temp, self.jsonl_path)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, float(value), global_step=step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> Path | None:
        """Save an HxWx3 uint8 image as `images/<name>_<step>.png` and to TensorBoard."""
        if not self.enabled:
            return None
        path = self.workdir / "images" / f"{name}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        self._tensorboard.add_image(name, image, global_step=step, dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Steps/s and ETA between successive reports, for one-line progress output."""

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def rate(self, step: int) -> float:
        """Steps per second since the previous call (or since construction)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

    def line(self, step: int, loss: float, rate: float) -> str:
        eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
        return f"step {step}/{self.total_steps}  loss {loss:.5g}  {rate:.2f} steps/s  ETA {eta}"
