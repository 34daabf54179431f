"""Evaluation sweeps: the product of checkpoints x datasets x settings, split round-robin over JAX processes.

Each process evaluates its share of the jobs on its first local device and writes `<workdir>/parts/<i>.jsonl`;
after a barrier, process 0 merges the parts into `results.csv`, `results.html` and `plots/<metric>.png`.

Steps that orbax or the record preparation may synchronise across processes (preparing each dataset, loading
each checkpoint) run on every process in the same order; only the evaluation itself is split, so an uneven
share of jobs cannot deadlock a barrier.

An audio-stage workdir is scored as the audio stage's own eval scores it (`eval.audio_eval.make_evaluator`): its
speech model and the prior it names, on the dataset's held-out sentences and identities, fill `lve` (mm²) and
`sync_offset` (frames); psnr, ssim and scan_chamfer stay empty for it, and the settings do not change it, so it
runs once per (checkpoint, dataset) and the other settings' rows repeat its numbers.

With `config.benchmark.encoder` set, the benchmark setting: every audio-stage checkpoint is also scored by `uhap
benchmark`'s protocol (held-out identities, held-out sentences, audio-driven, held-out cameras), its columns named
as in the demo's metrics.json (`benchmark/lve_mm2`, ...), and `ranking.csv` lists the checkpoints best first by
`config.benchmark.rank_by`, in that metric's direction (lower LVE, higher PSNR), ranked within each dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import itertools
import json
import logging
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from data_pipelines import dataset as dataset_lib
from uhap_jax.artifacts import output_dirs
from uhap_jax.artifacts.bundles import BUNDLE_FILE
from uhap_jax.artifacts.checkpoints import single_device_mesh
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.config_utils import read_config
from uhap_jax.eval import audio_eval, benchmark, prior_eval
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import initial_capacity

logger = logging.getLogger(__name__)

SETTING_FIELDS = ("image_scale", "num_views")
# psnr, ssim and scan_chamfer come from prior workdirs and bundles; lve and sync_offset from audio-stage workdirs.
METRICS = ("psnr", "ssim", "scan_chamfer", "lve", "sync_offset")
# With config.benchmark.encoder set, audio-stage checkpoints are also scored by `uhap benchmark`'s protocol
# (`uhap_jax.train.benchmark_avatars.sweep_benchmark`). The sweep loads no LPIPS or SyncNet weights, so their
# metrics are left out; the LVE baselines stay beside the model's own LVE, to read it against.
BENCHMARK_METRICS = tuple(name for name in benchmark.METRICS if name not in benchmark.MISSING)
# What ranking.csv can order by: name -> higher is better (FDD and the sync offset have no better direction).
RANK_DIRECTIONS = {name: benchmark.DESCRIPTIONS[name][1] for name in BENCHMARK_METRICS
                   if benchmark.DESCRIPTIONS[name][1] is not None}  # fmt: skip
BENCHMARK_COLUMNS = (*(f"benchmark/{name}" for name in BENCHMARK_METRICS), "benchmark/lve_mm2_zero_motion",
                     "benchmark/lve_mm2_shuffled_audio")  # fmt: skip
RANKING_COLUMNS = ("rank", "checkpoint", "step", "dataset", *BENCHMARK_COLUMNS)
COLUMNS = ("job", "checkpoint", "kind", "step", "dataset", *SETTING_FIELDS, *METRICS, *BENCHMARK_COLUMNS, "process",
           "seconds")  # fmt: skip
PLOTTED = ("psnr", "ssim", "scan_chamfer", "lve")


@dataclasses.dataclass(frozen=True)
class Job:
    index: int
    checkpoint: str
    dataset: str
    setting: dict


def checkpoint_kind(path: Path) -> str:
    """'bundle', 'workdir' (a prior's) or 'audio' (an audio stage's); raises naming the path when it is none."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint listed in config.checkpoints does not exist")
    if (path / BUNDLE_FILE).is_file():
        return "bundle"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither an inference bundle ({BUNDLE_FILE}) nor a training workdir "
                                "(config.json)")  # fmt: skip
    if output_dirs.workdir_stage(path) == "encoder":
        raise ValueError(
            f"{path}: an encoder workdir (`uhap train encoder`); only priors (workdirs, bundles) and "
            "speech models are evaluated, and an encoder goes to configs/sweep.py's benchmark.encoder"
        )
    config = read_config(path / "config.json")
    if "prior_workdir" not in config:
        return "workdir"
    if not config.prior_workdir:
        raise ValueError(f"{path / 'config.json'}: an audio-stage config without prior_workdir")
    if jax.process_count() > 1:
        raise ValueError(f"{path}: audio-stage workdirs are evaluated by single-process sweeps only "
                         "(`restore_speech` places the speech model on one device)")  # fmt: skip
    return "audio"


def plan_jobs(config: ml_collections.ConfigDict) -> list[Job]:
    """The sweep's jobs, checkpoints outermost; checks every checkpoint path before anything runs."""
    checkpoints = _as_tuple(config.checkpoints)
    if not checkpoints:
        raise ValueError("configs/sweep.py: config.checkpoints is empty; pass --config.checkpoints='(\"path\",)'")
    for checkpoint in checkpoints:
        checkpoint_kind(Path(checkpoint))
    settings = [_as_tuple(config.settings[name]) for name in SETTING_FIELDS]
    for name, values in zip(SETTING_FIELDS, settings):
        if not values:
            raise ValueError(f"configs/sweep.py: config.settings.{name} is empty")
    for scale in settings[0]:
        if not 0.0 < float(scale) <= 4.0:
            raise ValueError(f"configs/sweep.py: settings.image_scale {scale} is outside (0, 4]")
    check_benchmark_setting(config.benchmark, [Path(c) for c in checkpoints])
    combos = itertools.product(checkpoints, _as_tuple(config.datasets), *settings)
    return [
        Job(i, str(ckpt), str(dataset), dict(zip(SETTING_FIELDS, values)))
        for i, (ckpt, dataset, *values) in enumerate(combos)
    ]


def check_benchmark_setting(settings: ml_collections.ConfigDict, checkpoints: list[Path]) -> None:
    """Refuses a benchmark setting that could only fail or rank nothing, before any job runs: the protocol builds
    avatars with the encoder and drives them with speech models, and ranks by a metric with a direction."""
    if not settings.encoder:
        return
    if not (Path(settings.encoder) / "config.json").is_file():
        raise FileNotFoundError(f"{settings.encoder}: config.benchmark.encoder is no `uhap train encoder` workdir "
                                "(no config.json)")  # fmt: skip
    if settings.rank_by not in RANK_DIRECTIONS:
        raise ValueError(f"configs/sweep.py: benchmark.rank_by {settings.rank_by!r} is not one of "
                         f"{sorted(RANK_DIRECTIONS)}")  # fmt: skip
    if not any(checkpoint_kind(path) == "audio" for path in checkpoints):
        raise ValueError("configs/sweep.py: config.benchmark.encoder is set but no checkpoint is an audio-stage "
                         "workdir: the benchmark drives its avatars with a speech model")  # fmt: skip


def rank(rows: list[dict], metric: str) -> list[dict]:
    """One row per (checkpoint, dataset) that the benchmark scored, best first by `benchmark/<metric>` in its
    direction, ranked within each dataset (datasets in sweep order); a missing or NaN score ranks last.

    Audio-stage rows repeat across settings (the settings do not change a speech model's score), so the first
    setting's row stands for the checkpoint."""
    column, higher = f"benchmark/{metric}", RANK_DIRECTIONS[metric]
    firsts: dict[tuple[str, str], dict] = {}
    for row in rows:
        if column in row:
            firsts.setdefault((row["checkpoint"], row["dataset"]), row)

    def key(row: dict) -> tuple[bool, float]:
        value = row[column]
        missing = value is None or math.isnan(value)
        return missing, 0.0 if missing else (-value if higher else value)

    ranked = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        chosen = sorted((row for (_, d), row in firsts.items() if d == dataset), key=key)
        ranked.extend({**row, "rank": i} for i, row in enumerate(chosen, 1))
    return ranked


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, (str, int, float)) else tuple(value)


def data_config(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """What `dataset_lib.dataset_root` and `prepared_records` read: where the data is and where to cache it."""
    return ml_collections.ConfigDict(
        {"data": {"root": dataset, "synth_preset": config.synth_preset, "cache_dir": config.cache_dir}}
    )


def scale_views(eval_set: prior_eval.EvalSet, scale: float) -> prior_eval.EvalSet:
    """The eval set with its held-out views resampled by `scale` (area filter when shrinking) and the
    intrinsics scaled to match: with pixel centres at (j + 0.5, i + 0.5), K's rows scale exactly."""
    if scale == 1.0:
        return eval_set
    frames, views, height, width = eval_set.target_masks.shape
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resample = Image.Resampling.BOX if scale < 1.0 else Image.Resampling.BILINEAR

    def resize(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(frames * views, *images.shape[2:])
        out = np.stack([np.asarray(Image.fromarray(x).resize((new_w, new_h), resample)) for x in flat])
        return out.reshape(frames, views, *out.shape[1:])

    intrinsics = eval_set.intrinsics.copy()
    intrinsics[..., 0, :] *= new_w / width
    intrinsics[..., 1, :] *= new_h / height
    return dataclasses.replace(eval_set, target_images=resize(eval_set.target_images),
                               target_masks=resize(eval_set.target_masks), intrinsics=intrinsics)  # fmt: skip


def evaluate_job(job: Job, model: UHAP, train_config: ml_collections.ConfigDict, template: template_lib.Template,
                 root: Path, records, sweep_config: ml_collections.ConfigDict, mesh) -> dict[str, float]:  # fmt: skip
    """Held-out-view PSNR/SSIM and neutral-scan Chamfer (mm) of one prior on one dataset at one setting."""
    config = ml_collections.ConfigDict(train_config.to_dict())
    config.data.root = str(root)
    if job.setting["num_views"]:
        config.data.num_views = int(job.setting["num_views"])
    config.eval.num_frames = sweep_config.eval.num_frames
    config.eval.batch_size = sweep_config.eval.batch_size
    split = dataset_lib.read_split(root, records, config.data.num_views)
    tables = dataset_lib.subject_tables(root, records, model.layout, template, config)
    eval_set = scale_views(prior_eval.build_eval_set(records, split, tables, config), float(job.setting["image_scale"]))
    with jax.set_mesh(mesh):
        capacity = initial_capacity(model, eval_set.probe(config.eval.batch_size),
                                                config.render.capacity_headroom)  # fmt: skip
        metrics = prior_eval.Evaluator(eval_set, tables, capacity, config)(model)
    return {name.removeprefix("eval/"): value for name, value in metrics.items()}


def evaluate_speech(checkpoint: audio_eval.SpeechCheckpoint, root: Path, records, codes_cache: Path,
                    mesh) -> tuple[dict[str, float], int]:  # fmt: skip
    """The sweep's columns for a speech model: LVE (mm²) and sync offset (frames), and its step."""
    metrics, step = audio_eval.speech_metrics(checkpoint, root, records, codes_cache, mesh)
    return {"lve": metrics["eval/lve"], "sync_offset": int(metrics["eval/sync_offset_frames"])}, step


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path, benchmark_fn=None) -> list[dict] | None:
    """Runs this process's share of the sweep; process 0 returns the merged rows (others None).

    `benchmark_fn(audio_checkpoint, dataset_root, out) -> {column: value}` adds `BENCHMARK_COLUMNS` to the rows
    of audio-stage checkpoints (it builds avatars, which is training: the command passes it in)."""
    workdir = Path(workdir)
    jobs = plan_jobs(config)
    parts = workdir / "parts"  # first: what marks the folder as a sweep's, which a rerun resumes (`check_resumable`)
    parts.mkdir(parents=True, exist_ok=True)
    index, count = jax.process_index(), jax.process_count()
    mine = [job for job in jobs if job.index % count == index]
    logger.info("sweep: %d jobs, %d on process %d of %d", len(jobs), len(mine), index, count)
    mesh = single_device_mesh()
    datasets = {}
    for dataset in dict.fromkeys(job.dataset for job in jobs):  # collective: every process, same order
        data = data_config(config, dataset)
        root = dataset_lib.dataset_root(data)
        datasets[dataset] = (root, dataset_lib.prepared_records(root, data))
    rows = []
    for checkpoint in dict.fromkeys(job.checkpoint for job in jobs):  # loading may synchronise processes
        if checkpoint_kind(Path(checkpoint)) == "audio":
            speech_checkpoint = audio_eval.load_speech_checkpoint(Path(checkpoint), mesh)
            by_dataset = {}
            for job in (j for j in mine if j.checkpoint == checkpoint):
                start = time.perf_counter()
                if job.dataset not in by_dataset:
                    cache = workdir / "expression_codes" / f"job{job.index}.npz"
                    by_dataset[job.dataset] = evaluate_speech(speech_checkpoint, *datasets[job.dataset], cache, mesh)
                    if benchmark_fn is not None:
                        out = workdir / "benchmark" / f"job{job.index}"
                        extra = benchmark_fn(Path(checkpoint), datasets[job.dataset][0], out)
                        by_dataset[job.dataset] = ({**by_dataset[job.dataset][0], **extra}, by_dataset[job.dataset][1])
                metrics, step = by_dataset[job.dataset]
                rows.append(_row(job, config, "audio", step, metrics, start))
            continue
        kind = checkpoint_kind(Path(checkpoint))
        model, train_config, template, step = load_prior(checkpoint, mesh)
        for job in (j for j in mine if j.checkpoint == checkpoint):
            start = time.perf_counter()
            root, records = datasets[job.dataset]
            metrics = evaluate_job(job, model, train_config, template, root, records, config, mesh)
            rows.append(_row(job, config, kind, step, metrics, start))
    (parts / f"{index}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    multihost_utils.sync_global_devices("uhap sweep parts")
    if index != 0:
        return None
    merged = merge_parts(parts, count, len(jobs))
    write_csv(merged, workdir / "results.csv")
    if benchmark_fn is not None:
        write_csv(rank(merged, config.benchmark.rank_by), workdir / "ranking.csv", RANKING_COLUMNS)
    write_html(merged, workdir / "results.html")
    write_plots(merged, workdir / "plots")
    return merged


def _row(job: Job, config: ml_collections.ConfigDict, kind: str, step: int, metrics: dict, start: float) -> dict:
    row = {"job": job.index, "checkpoint": job.checkpoint, "kind": kind, "step": step,
           "dataset": job.dataset or f"synthetic:{config.synth_preset}", **job.setting, **metrics,
           "process": jax.process_index(), "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    logger.info("sweep job %d: %s", job.index, row)
    return row


def merge_parts(parts: Path, count: int, num_jobs: int) -> list[dict]:
    """Every process's rows in job order; raises when a part is missing or a job has no row."""
    rows = []
    for index in range(count):
        path = parts / f"{index}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: process {index} wrote no results")
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    rows.sort(key=lambda row: row["job"])
    if [row["job"] for row in rows] != list(range(num_jobs)):
        raise ValueError(f"{parts}: the parts hold jobs {[row['job'] for row in rows]}, expected 0..{num_jobs - 1}")
    return rows


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_html(rows: list[dict], path: Path) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in COLUMNS) + "</tr>\n" for row in rows
    )
    path.write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>uhap sweep</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}</style></head>\n"
        f"<body><h1>uhap sweep</h1>\n<table>\n<tr>{head}</tr>\n{body}</table>\n</body></html>\n"
    )


def write_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One grouped bar chart per metric: a group per (checkpoint, dataset), a bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)

    def group_of(row):
        return Path(row["checkpoint"]).name, Path(row["dataset"]).name

    def setting_of(row):
        return tuple(row[f] for f in SETTING_FIELDS)

    groups = list(dict.fromkeys(group_of(r) for r in rows))
    settings = list(dict.fromkeys(setting_of(r) for r in rows))
    width = 0.8 / len(settings)
    written = []
    for metric in PLOTTED:
        figure, axes = plt.subplots(figsize=(max(4.0, 1.5 * len(groups)), 3.5))
        for offset, setting in enumerate(settings):
            by_group = {group_of(r): r.get(metric, np.nan) for r in rows if setting_of(r) == setting}
            values = [by_group.get(group, np.nan) for group in groups]
            label = ", ".join(f"{f}={v}" for f, v in zip(SETTING_FIELDS, setting))
            axes.bar(np.arange(len(groups)) + offset * width, values, width, label=label)
        axes.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{c}\n{d}" for c, d in groups], fontsize=8)
        axes.set_ylabel(metric)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"{metric}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
