"""The demo's report: one self-contained HTML page (metrics against their bars, training curves, render-vs-
ground-truth frames and the talking-head video), with its pictures as PNG files beside it."""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from uhap_jax.artifacts.metrics_log import read_rows  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Bar:
    """A pass/fail rule on the metrics: `value <op> threshold` (op: '>=', '>', '<=', 'abs<=')."""

    name: str
    metric: str
    op: str
    threshold_metric: str = ""  # compare against another metric (x factor, + offset) instead of a constant
    threshold: float = 0.0
    factor: float = 1.0

    def limit(self, metrics: dict[str, float]) -> float:
        base = metrics.get(self.threshold_metric, math.nan) if self.threshold_metric else 0.0
        return self.factor * base + self.threshold

    def passed(self, metrics: dict[str, float]) -> bool:
        value, limit = metrics.get(self.metric, math.nan), self.limit(metrics)
        if self.op == ">=":
            return value >= limit
        if self.op == ">":
            return value > limit
        if self.op == "<=":
            return value <= limit
        if self.op == "abs<=":
            return abs(value) <= limit
        raise ValueError(f"bar {self.name!r}: unknown op {self.op!r}")


def read_jsonl(path: Path) -> list[dict]:
    return read_rows(path)  # a torn last line (a killed run) is dropped, not an error


def plot_curves(stage_dirs: dict[str, Path], out: Path) -> Path:
    """One panel per stage: its training loss and (right axis) its first eval metric, against the step."""
    fig, axes = plt.subplots(1, len(stage_dirs), figsize=(4.2 * len(stage_dirs), 3.2), squeeze=False)
    for ax, (stage, directory) in zip(axes[0], stage_dirs.items()):
        rows = read_jsonl(directory / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if train:
            ax.plot(*zip(*train), color="tab:blue", label="train loss")
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss", color="tab:blue")
        evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
        if evals:
            name = evals[0] if "eval/psnr" not in evals else "eval/psnr"
            name = "eval/lve" if "eval/lve" in evals else name
            points = [(r["step"], r[name]) for r in rows if name in r]
            right = ax.twinx()
            right.plot(*zip(*points), "o-", color="tab:orange")
            right.set_ylabel(name, color="tab:orange")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def image_rows(rows: list[tuple[str, np.ndarray, np.ndarray]], out: Path, scale: int = 2) -> Path:
    """Rows of (label, renders [K, H, W, 3], ground truth [K, H, W, 3]) in [0, 1] -> one PNG: each row shows
    the K renders above their ground truth, upscaled `scale` times without smoothing."""
    strips = []
    for _, render, truth in rows:
        top = np.concatenate(list(render), axis=1)
        bottom = np.concatenate(list(truth), axis=1)
        strips.append(np.concatenate([top, bottom], axis=0))
    width = max(s.shape[1] for s in strips)
    padded = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0)), constant_values=1.0) for s in strips]
    grid = np.clip(np.concatenate(padded, axis=0), 0.0, 1.0)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(out)
    return out


def _poster(video: Path, out: Path) -> Path:
    """The video's middle frame as a PNG, shown before it plays (and in pages that cannot play it)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    frames = [frame for frame in reader]
    width, height = meta["size"]
    frame = np.frombuffer(frames[len(frames) // 2], np.uint8).reshape(height, width, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).resize((384, round(384 * height / width)), Image.NEAREST).save(out)
    return out


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(
    out_dir: Path,
    metrics: dict[str, float],
    bars: list[Bar],
    stage_seconds: dict[str, float],
    curves_png: Path,
    frames: list[tuple[str, Path]],
    video: Path | None,
    benchmark: dict | None = None,
) -> Path:
    """`out_dir/report.html`; every linked file is inside `out_dir`, so the folder can be moved or served.
    `benchmark`: `eval.benchmark`'s result, shown first as the headline table."""
    bar_rows = []
    for bar in bars:
        ok = bar.passed(metrics)
        bar_rows.append(
            f"<tr class={'pass' if ok else 'fail'}><td>{html.escape(bar.name)}</td>"
            f"<td>{_format(metrics.get(bar.metric, math.nan))}</td><td>{html.escape(bar.op)} "
            f"{_format(bar.limit(metrics))}</td><td>{'pass' if ok else 'FAIL'}</td></tr>"
        )
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_format(v)}</td></tr>" for k, v in metrics.items())
    time_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v / 60:.1f} min</td></tr>"
                        for k, v in stage_seconds.items())  # fmt: skip
    frame_html = "".join(
        f"<figure><img src='{path.relative_to(out_dir)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, path in frames
    )
    video_html = "none"
    if video is not None:
        poster = _poster(video, out_dir / "report" / "video_poster.png")
        video_html = (f"<video controls width=384 poster='{poster.relative_to(out_dir)}' "
                      f"src='{video.relative_to(out_dir)}'></video>")  # fmt: skip
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>UHAP-JAX demo report</title>
<style>
body {{ font-family: sans-serif; margin: 24px; max-width: 1280px; }}
table {{ border-collapse: collapse; margin-bottom: 16px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; }}
tr.pass td:last-child {{ color: #117a11; font-weight: bold; }}
tr.fail td:last-child {{ color: #b00; font-weight: bold; }}
.row {{ display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
figure {{ margin: 0 0 16px 0; }}
</style></head><body>
<h1>UHAP-JAX demo</h1>
<p>Synthetic captures, the universal prior, the speech model, the monocular encoder and personalised avatars,
all trained in this run. Bars are the ones the project holds the demo to, on the benchmark's numbers. Metrics
named <code>oracle_inputs/...</code> are the stages' own evaluations, which use inputs a user does not have.</p>
{benchmark_section(benchmark) if benchmark else ""}
<div class="row">
<div><h2>Bars</h2><table><tr><th>check</th><th>value</th><th>bar</th><th></th></tr>{"".join(bar_rows)}</table>
<h2>Stage times</h2><table>{time_rows}</table></div>
<div><h2>Talking head (held-out speech)</h2>{video_html}</div>
</div>
<h2>Training curves</h2><img src='{curves_png.relative_to(out_dir)}'>
<h2>Renders (top) against ground truth (bottom)</h2>{frame_html}
<h2>All metrics</h2><table>{metric_rows}</table>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def benchmark_section(result: dict) -> str:
    """The headline: `uhap benchmark`'s mean table (one column per condition), what each metric is, the split
    and inputs, the prior's reconstruction by split, and the true-scan diagnostic when it ran."""
    from uhap_jax.eval import benchmark as benchmark_lib

    rows = benchmark_lib.table(result)
    header = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        + f"<td>{html.escape(benchmark_lib.DESCRIPTIONS[row[0]][0])}</td></tr>"
        for row in rows[1:]
    )  # fmt: skip
    split = result.get("split", {})
    prior = "".join(f"<tr><td>{html.escape(k)}</td><td>{_format(v)}</td></tr>"
                    for k, v in result.get("prior_reconstruction", {}).items())  # fmt: skip
    return f"""<h2>Benchmark: audio-driven avatars of unseen people (the paper's protocol)</h2>
<p>{html.escape(result.get("notes", ""))}</p>
<p>Test clips: {html.escape(", ".join(split.get("clips", [])))}; held-out cameras
{html.escape(", ".join(split.get("cameras", [])))}. Means over clips and held-out cameras.</p>
<table><tr>{header}<th>what (split, inputs)</th></tr>{body}</table>
<h3>The prior alone, by split (codes from its encoder on held-in views; scored at held-out cameras)</h3>
<p>prior_train_ids_heldout_frames: training identities, held-out sentences (frames it never trained on), their
scans; prior_heldout_ids_scan: held-out identities given their neutral scan. The baseline on the same frames,
..._mean_code: its encoder's codes averaged over each clip and held still.</p>
<table>{prior}</table>{true_scan_section(result)}"""


def true_scan_section(result: dict) -> str:
    """The benchmark's diagnostic, when it ran: the LVE of the same drivers given the true scan's identity."""
    diagnostic = result.get("true_scan_identity")
    if not diagnostic:
        return ""
    drivers = list(diagnostic["means"])
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_format(diagnostic['means'][d][name])}</td>" for d in drivers) + "</tr>"
        for name in next(iter(diagnostic["means"].values()))
    )  # fmt: skip
    header = "".join(f"<th>{html.escape(d)}</th>" for d in drivers)
    return f"""
<h3>Diagnostic: the same codes on the true scan's identity</h3>
<p>{html.escape(diagnostic["note"])}</p>
<table><tr><th>metric</th>{header}</tr>{body}</table>"""
