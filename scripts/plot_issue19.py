"""Held-out-camera PSNR curves of prior runs (metrics.jsonl of `uhap train prior`): a PNG and a markdown table.

    python scripts/plot_issue19.py OUT.png NAME=metrics.jsonl [NAME=metrics.jsonl ...]

For each run: eval/psnr at every evaluation, its best, the last, and the largest fall from the best so far;
training PSNR and the KL term (logged every train.log_every steps) beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    evals, train = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "eval/psnr" in row:
            evals.append((row["step"], row["eval/psnr"]))
        if "psnr" in row:
            train.append((row["step"], row["psnr"], row.get("kl", float("nan"))))
    return evals, train


def main(argv: list[str]) -> int:
    out, runs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in runs:
        evals, train = read(Path(path))
        steps, psnr = zip(*evals)
        left.plot(steps, psnr, marker="o", label=f"{name}: held-out cameras")
        if train:
            left.plot([t[0] for t in train], [t[1] for t in train], alpha=0.5, label=f"{name}: training views")
            right.plot([t[0] for t in train], [t[2] for t in train], label=name)
        best, fall = float("-inf"), 0.0
        for _, value in evals:
            best = max(best, value)
            fall = max(fall, best - value)
        print(f"\n{name} ({path}): best {best:.2f} dB, last {psnr[-1]:.2f} dB, largest fall from the best so far "
              f"{fall:.2f} dB")  # fmt: skip
        print("| step | " + " | ".join(str(s) for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        print("| held-out PSNR (dB) | " + " | ".join(f"{p:.2f}" for p in psnr) + " |")
    left.set(xlabel="step", ylabel="PSNR (dB)", title="PSNR: held-out cameras (eval) and training views")
    right.set(xlabel="step", ylabel="KL (nats)", title="KL term", yscale="log")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
