"""`uhap demo`: synthesise the tiny captures, train every stage, personalise a held-out identity, animate it from
held-out speech, evaluate, and write a report.

    W/data/            the synthetic captures (capture layout)      W/prior/, W/audio/, W/encoder/  stage workdirs
    W/avatar_<id>/     the personalised avatar (`uhap animate`)     W/personalize/   its fine-tune workdir
    W/talking_head.mp4 the avatar speaking held-out audio           W/metrics.json, W/report.html, W/report/

Each stage records its result in `W/stages/<stage>.json` when it finishes; a demo started again on the same
workdir skips finished stages, and an interrupted stage resumes from its checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders, synth
from uhap_jax import report
from uhap_jax.artifacts.avatars import load_avatar
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.config_utils import apply_override, load_config, save_config
from uhap_jax.eval import benchmark as benchmark_lib
from uhap_jax.inference import avatar as avatar_lib
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import encoder_geometry
from uhap_jax.train import audio_stage, benchmark_avatars, encoder_stage, personalize_stage, prior_stage

logger = logging.getLogger(__name__)

# Minutes each stage took on a quiet 2-core CPU (the whole demo's ETA scales these by how the finished ones went).
STAGE_MINUTES = {
    "data": 2.3, "prior": 4.3, "audio": 0.9, "encoder": 1.6, "personalize": 3.1, "animate": 0.1, "benchmark": 3.5,
    "report": 0.2,
}  # fmt: skip
SUMMARY_STAGE = "report"  # written again whenever a stage before it ran


DEMO_CONFIG = "demo_config.json"  # what marks a folder as a demo workdir that `uhap demo` may resume
XLA_CACHE = "xla_cache"  # W/xla_cache: the demo's compiled programs (`compilation_cache`)


@contextlib.contextmanager
def compilation_cache(path: Path | None, min_compile_seconds: float = 0.5) -> Iterator[None]:
    """JAX's persistent compilation cache in `path` (None: left as it is) while the block runs, then the previous
    setting. The stages build the same programs more than once (a personalisation per held-out identity, the
    fine-tune resumed for its evaluation, the speech model and renderers rebuilt per stage): with it, XLA
    compiles each once per workdir, and a resumed demo reuses them. Programs that compile faster than
    `min_compile_seconds` are not stored."""
    if path is None:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cache_lib

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update(names[0], str(path))
    jax.config.update(names[1], min_compile_seconds)
    cache_lib.reset_cache()  # JAX decides once per process whether the cache is on: decide again
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cache_lib.reset_cache()


class Demo:
    """The stages in order, sharing one workdir and config."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        # Absolute: every stage config saved under W names W's folders, so a resume from another directory works.
        self.config, self.workdir = config, Path(workdir).absolute()
        self.data = self.workdir / "data"
        self.stages: list[tuple[str, Callable[[], dict]]] = [
            ("data", self.synthesise), ("prior", self.train_prior), ("audio", self.train_audio),
            ("encoder", self.train_encoder), ("personalize", self.personalize), ("animate", self.animate),
            ("benchmark", self.benchmark), ("report", self.write_report),
        ]  # fmt: skip

    # ---- running and resuming ----------------------------------------------------------------------------
    def _record(self, stage: str) -> Path:
        return self.workdir / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict | None:
        path = self._record(stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self) -> dict[str, float]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.workdir / DEMO_CONFIG)
        cache = self.workdir / XLA_CACHE if self.config.get("xla_cache", False) else None
        with compilation_cache(cache):
            return self._run_stages()

    def _run_stages(self) -> dict[str, float]:
        """Each stage once; a finished one is skipped, but the report (a summary of the others: metrics.json, the
        bars, the page) is written again whenever a stage before it ran, so it never shows stale numbers."""
        started, spent, planned, ran = time.perf_counter(), 0.0, 0.0, False
        for index, (stage, fn) in enumerate(self.stages, 1):
            record = self.done(stage)
            if record is not None and not (stage == SUMMARY_STAGE and ran):
                logger.info("[%d/%d] %s: done earlier (%.1f min), skipped", index, len(self.stages), stage,
                            record["seconds"] / 60)  # fmt: skip
                continue
            ahead = [s for s, _ in self.stages[index:] if self.done(s) is None or s == SUMMARY_STAGE]
            remaining = STAGE_MINUTES[stage] + sum(STAGE_MINUTES[s] for s in ahead)
            pace = spent / planned if planned else 1.0
            logger.info("[%d/%d] %s (demo ETA %.0f min)", index, len(self.stages), stage, remaining * pace)
            stage_start = time.perf_counter()
            metrics, ran = fn(), True
            seconds = time.perf_counter() - stage_start
            spent, planned = spent + seconds / 60, planned + STAGE_MINUTES[stage]
            self._record(stage).parent.mkdir(parents=True, exist_ok=True)
            self._record(stage).write_text(json.dumps({"seconds": seconds, "metrics": metrics}, indent=1))
            logger.info("[%d/%d] %s finished in %.1f min", index, len(self.stages), stage, seconds / 60)
        logger.info("demo finished in %.1f min (this run); report: %s", (time.perf_counter() - started) / 60,
                    self.workdir / "report.html")  # fmt: skip
        return json.loads((self.workdir / "metrics.json").read_text())

    # ---- configs -----------------------------------------------------------------------------------------
    def _data_overrides(self) -> list[str]:
        return [f"data.root={self.data}", f"data.cache_dir={self.workdir / 'cache'}"]

    def prior_config(self) -> ml_collections.ConfigDict:
        return load_config(self.config.prior_config, [*self.config.prior_overrides, *self._data_overrides()])

    def _stage_config(self, spec: str, overrides) -> ml_collections.ConfigDict:
        config = load_config(spec, list(overrides))
        config.prior_workdir = str(self.workdir / "prior")
        return config

    # ---- the stages --------------------------------------------------------------------------------------
    def synth_config(self) -> ml_collections.ConfigDict:
        config = synth.synth_config(self.config.synth_preset)
        for item in self.config.synth_overrides:
            apply_override(config, item, source="demo synth_overrides")
        return config

    def synthesise(self) -> dict:
        info = synth.generate(self.data, self.synth_config())
        return {"identities": info["identities"], "sequences": sum(len(s) for s in info["sequences"].values())}

    def _train(self, name: str, config: ml_collections.ConfigDict, train_fn) -> dict:
        """Runs (or resumes) one training stage in W/<name>, its config saved beside it (what later stages and
        `uhap eval` rebuild the model from)."""
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(config, workdir / "config.json")
        result, metrics = train_fn(config, workdir)
        _check_finished(name, result)
        return metrics

    def train_prior(self) -> dict:
        return self._train("prior", self.prior_config(), prior_stage.train_prior)

    def train_audio(self) -> dict:
        config = self._stage_config(self.config.audio_config, self.config.audio_overrides)
        config.prior_config = self.config.prior_config
        config.prior_overrides = (*self.config.prior_overrides, *self._data_overrides())
        return self._train("audio", config, audio_stage.train_audio)

    def train_encoder(self) -> dict:
        config = self._stage_config(self.config.encoder_config, self.config.encoder_overrides)
        return self._train("encoder", config, encoder_stage.train_encoder)

    def held_out_subject(self) -> str:
        return layout.read_dataset_info(self.data)["identities"]["held_out"][0]

    def avatar_dir(self) -> Path:
        return self.workdir / f"avatar_{self.held_out_subject()}"

    def personalize_config(self) -> ml_collections.ConfigDict:
        """The personalisation of every held-out identity: from its monocular sequence only (no scan)."""
        config = load_config(self.config.personalize_config, list(self.config.personalize_overrides))
        config.use_scan, config.scan = False, ""
        config.camera = synth.MONO_SERIAL
        return config

    def personalize(self) -> dict:
        """The first held-out identity from its monocular sequence only (no scan), then scored on held-out views."""
        config = self.personalize_config()
        subject = self.held_out_subject()
        workdir = self.workdir / "personalize"
        result = personalize_stage.personalize(
            self.workdir / "prior", self.workdir / "encoder", layout.subject_dir(self.data, subject),
            self.avatar_dir(), config, audio_workdir=self.workdir / "audio", workdir=workdir,
        )  # fmt: skip
        _check_finished("personalize", result)
        # The same fine-tune (it resumes at its last step), scored on the identity's multi-view sequences.
        return personalize_stage.heldout_quality(self.workdir / "prior", self.workdir / "encoder", config, workdir,
                                                 subject=subject)  # fmt: skip

    def held_out_speech(self) -> Path:
        """Audio of a held-out sentence, preferably spoken by the personalised identity."""
        info = layout.read_dataset_info(self.data)
        held_out = set(info["held_out_sentences"])
        subject = self.held_out_subject()
        candidates = sorted(
            (s != subject, s, q) for s, seqs in info["sequences"].items() for q, row in seqs.items()
            if row["sentence_index"] in held_out and not q.startswith("mono")
        )  # fmt: skip
        if not candidates:
            raise ValueError(f"{self.data / layout.DATASET_FILE}: no sequence speaks a held-out sentence")
        _, s, q = candidates[0]
        return layout.sequence_dir(self.data, s, q) / layout.AUDIO_FILE

    def animate(self) -> dict:
        audio = self.held_out_speech()
        avatar = load_avatar(self.avatar_dir())
        out = self.workdir / "talking_head.mp4"
        animation = avatar_lib.animate(avatar, audio, out, camera="front", size=self.config.video_size)
        return {"audio": str(audio), "frames": animation.num_frames, "frames_per_second": animation.frames_per_second}

    def benchmark(self) -> dict:
        """The paper's protocol (`uhap benchmark`): every held-out identity's avatar from its monocular clip (the
        first one's is the personalise stage's), driven by held-out sentences' audio, scored at held-out cameras
        against the ground truth, beside the zero-motion, shuffled-audio and oracle-code baselines."""
        result = benchmark_avatars.run_benchmark(
            self.workdir / "prior", self.workdir / "encoder", self.workdir / "audio", self.data,
            self.workdir / "benchmark", self.personalize_config(), avatars_dir=self.workdir,
        )  # fmt: skip
        prior = {f"benchmark/{name}": value for name, value in result["prior_reconstruction"].items()}
        return {**benchmark_lib.flat_metrics(result), **prior}

    def write_report(self) -> dict:
        metrics = self.collect_metrics()
        (self.workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        out = self.workdir / "report"
        out.mkdir(exist_ok=True)
        stage_dirs = {s: self.workdir / s for s in ("prior", "audio", "encoder", "personalize")}
        curves = report.plot_curves(stage_dirs, out / "curves.png")
        frames = self.frames(out)
        seconds = {s: self.done(s)["seconds"] for s, _ in self.stages if self.done(s) is not None}
        video = self.workdir / "talking_head.mp4"
        result = json.loads((self.workdir / "benchmark" / "benchmark.json").read_text())
        page = report.write_report(self.workdir, metrics, self.bars(), seconds, curves, frames,
                                   video if video.is_file() else None, benchmark=result)  # fmt: skip
        return {"report": str(page)}

    # ---- metrics and bars --------------------------------------------------------------------------------
    def collect_metrics(self) -> dict[str, float]:
        """`benchmark/...`: the paper's protocol (what a user gets; its baselines `_oracle_codes` and the prior's
        `prior_heldout_ids_scan` read true scans, as their names say). `oracle_inputs/...`: the stages' own evals
        and the benchmark's true-scan diagnostic, which use what a user does not have (the prior's codes from
        multi-view images and tracked meshes, true scans; training frames for the prior), kept under names that
        say so."""
        prior, audio = self.done("prior")["metrics"], self.done("audio")["metrics"]
        personal = self.done("personalize")["metrics"]
        encoder, phone = self.done("encoder")["metrics"], "_phone_clip_held_out_identity"
        metrics = {
            **self.done("benchmark")["metrics"],
            "oracle_inputs/prior_train_frames_psnr": prior["eval/psnr"],
            "oracle_inputs/prior_train_frames_ssim": prior["eval/ssim"],
            "prior/scan_chamfer_mm": prior["eval/scan_chamfer"],
            "oracle_inputs/audio_lve_vs_prior_codes": audio["eval/lve"],
            "oracle_inputs/audio_lve_vs_prior_codes_zero_motion": audio["eval/lve_zero_motion"],
            "oracle_inputs/audio_lve_vs_prior_codes_shuffled_audio": audio["eval/lve_shuffled_audio"],
            "oracle_inputs/audio_sync_offset_frames_true_scan": audio["eval/sync_offset_frames"],
            "oracle_inputs/audio_sync_offset_frames_prior_codes": audio["eval/sync_offset_frames_target"],
            **{f"oracle_inputs/{k}": v for k, v in personal.items() if k.startswith("personalize/")},
            "oracle_inputs/encoder_code_mse": encoder.get("eval/code_mse", math.nan),
            # The encoder's head rotation on the held-out identities' phone clips (the pose personalisation starts
            # from), and the zero-motion baseline (no rotation) on the same frames.
            "encoder/phone_clip_rotation_error_deg": encoder.get(f"eval/rotation_error_deg{phone}", math.nan),
            "encoder/phone_clip_rotation_error_deg_zero_motion": encoder.get(
                f"eval/rotation_error_deg_zero_motion{phone}", math.nan
            ),
            "encoder/phone_clip_translation_error_mm": encoder.get(f"eval/translation_error_mm{phone}", math.nan),
            "encoder/phone_clip_translation_error_mm_zero_motion": encoder.get(
                f"eval/translation_error_mm_zero_motion{phone}", math.nan
            ),
            "animate/frames_per_second": self.done("animate")["metrics"]["frames_per_second"],
        }
        minutes = sum(self.done(s)["seconds"] for s, _ in self.stages if s != "report" and self.done(s)) / 60
        metrics["demo/minutes"] = minutes
        return {k: float(v) for k, v in metrics.items()}

    def bars(self) -> list[report.Bar]:
        """The bars, on the benchmark's numbers (held-out identities, sentences and cameras; see the report)."""
        b = self.config.bars
        below = 1.0 - b.lve_below_baselines
        m = "benchmark/"
        prior = f"{m}prior_train_ids_heldout_frames/psnr"
        return [
            report.Bar("prior PSNR, held-out cameras, held-out frames of training identities (dB)", prior, ">=",
                       threshold=b.prior_psnr),
            report.Bar("prior PSNR, same frames, vs the clip's mean code held still (dB)", prior, ">",
                       f"{prior}_mean_code"),
            report.Bar("LVE (GT meshes) vs zero motion", f"{m}lve_mm2", "<=", f"{m}lve_mm2_zero_motion", factor=below),
            report.Bar("LVE (GT meshes) vs shuffled audio", f"{m}lve_mm2", "<=", f"{m}lve_mm2_shuffled_audio",
                       factor=below),
            report.Bar("mouth-crop PSNR vs zero motion (dB)", f"{m}mouth_psnr", ">", f"{m}mouth_psnr_zero_motion"),
            report.Bar("mouth-crop PSNR vs shuffled audio (dB)", f"{m}mouth_psnr", ">",
                       f"{m}mouth_psnr_shuffled_audio"),
            report.Bar("audio-mouth sync offset (frames)", f"{m}sync_offset_frames", "abs<=",
                       threshold=b.sync_offset_frames),
            report.Bar("audio-mouth sync confidence vs shuffled audio", f"{m}sync_confidence", ">",
                       f"{m}sync_confidence_shuffled_audio"),
            report.Bar("audio-driven phone-built avatar PSNR vs oracle codes (dB)", f"{m}psnr", ">=",
                       f"{m}psnr_oracle_codes", threshold=-b.oracle_gap_db),
            report.Bar("demo minutes", "demo/minutes", "<=", threshold=b.minutes),
        ]  # fmt: skip

    def frames(self, out: Path) -> list[tuple[str, Path]]:
        """Held-out camera views of a training identity (the prior) and of the personalised identity (its
        avatar), each decoded from the codes the prior's encoder gives their held-in views."""
        base, config, template, _ = load_prior(self.workdir / "prior")
        root = dataset_lib.dataset_root(config)
        records = dataset_lib.prepared_records(root, config)
        split = dataset_lib.read_split(root, records, config.data.num_views)
        tables = dataset_lib.subject_tables(root, records, base.layout, template, config)
        subject = self.held_out_subject()
        avatar = load_avatar(self.avatar_dir())
        shown = []
        for name, who, model, scan_maps in (
            ("prior", split.train_subjects[0], base, None),
            ("personalised", subject, avatar.prior, avatar.scan_maps),
        ):
            views = held_out_views(base, records, split, tables, who, self.config.report_frames)
            if scan_maps is None:
                scan_maps = views["scan_maps"][0]
            renders = render_views(model, scan_maps, views)
            caption = (f"{name}: {who} ({'monocular video only' if who == subject else 'a training identity'}), "
                       "held-out cameras")  # fmt: skip
            shown.append((caption, report.image_rows([(name, renders, views["target"])], out / f"{name}.png")))
        return shown


def held_out_views(prior: UHAP, records: loaders.FrameRecords, split: dataset_lib.Split,
                   tables: dataset_lib.SubjectTables, subject: str, count: int) -> dict[str, np.ndarray]:  # fmt: skip
    """`count` frames of a subject's multi-view sequences: the prior's codes from their held-in views (and tracked
    meshes), head poses, the first held-out camera and its foreground image on black [K, H, W, 3] in [0, 1]."""
    cameras = set(split.held_in_cameras) | set(split.held_out_cameras)
    sequences = [r for r in records.sequences if r["subject"] == subject and not cameras - set(r["serials"])]
    if not sequences:
        raise ValueError(f"{subject}: no multi-view sequence with the held-in and held-out cameras")
    ids = np.concatenate([np.arange(r["first_record"], r["first_record"] + r["num_frames"]) for r in sequences])
    ids = ids[np.linspace(0, len(ids) - 1, count).round().astype(int)]
    rng = np.random.default_rng(0)
    held_in = loaders.SampleViews(len(split.held_in_cameras), tuple(split.held_in_cameras))
    held_out = loaders.SampleViews(1, tuple(split.held_out_cameras[:1]))
    inputs = [held_in.random_map(records.source[int(i)], rng) for i in ids]
    targets = [held_out.random_map(records.source[int(i)], rng) for i in ids]
    first_view = lambda key: np.stack([t[key][0] for t in targets])  # noqa: E731
    rows = tables.record_rows(np.asarray([i["subject_id"] for i in inputs]), ids)
    images = np.stack([i["images"] for i in inputs]).astype(np.float32) / 255.0
    codes, _ = prior.encode_expression(images, encoder_geometry(prior, rows))
    target = first_view("images") / 255.0 * (first_view("masks")[..., None] / 255.0)
    return {
        "codes": np.asarray(codes),
        "rows": rows,
        "scan_maps": rows["scan_maps"],
        "target": target,
        "world_to_cam": first_view("world_to_cam"),
        "intrinsics": first_view("intrinsics"),
    }


def render_views(model: UHAP, scan_maps: np.ndarray, views: dict) -> np.ndarray:
    """The views' codes decoded with one identity's maps at their head poses, rendered: [K, H, W, 3] in [0, 1]."""
    count = len(views["codes"])
    posed = model.decode(views["codes"], np.broadcast_to(scan_maps, (count, *scan_maps.shape)),
                         views["rows"]["head_rotation"], views["rows"]["head_translation"])  # fmt: skip
    cameras = views["world_to_cam"][:, None], views["intrinsics"][:, None]
    height, width = views["target"].shape[1:3]
    capacity = model.capacity_for(posed, *cameras, width=width, height=height)
    rendered = model.render(posed, *cameras, width=width, height=height, capacity=capacity)
    return np.clip(np.asarray(rendered.rgb[:, 0]), 0.0, 1.0)


def _check_finished(stage: str, result) -> None:
    if getattr(result, "preempted", False):
        raise SystemExit(f"demo: the {stage} stage was interrupted; run the same command again to resume it")


def default_workdir() -> Path:
    return Path.cwd() / time.strftime("uhap-demo-%Y%m%d-%H%M%S")


def run_demo(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
    if jax.process_count() > 1:
        raise ValueError("uhap demo runs in one process; train the stages with `uhap train` to scale out")
    return Demo(config, workdir).run()
