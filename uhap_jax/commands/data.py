"""`uhap data synth|import|prepare`: make, import and prepare datasets in the capture layout."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common
from uhap_jax.config_utils import apply_override


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="create or import datasets in the capture layout")
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        help="render synthetic talking heads (eSpeak speech, rigged template, Gaussian splats)",
        description="Generator settings can be overridden with --config.<field>=<value>, "
        "e.g. --config.num_identities=2.",
    )
    synth.add_argument("--out", type=Path, required=True, help="dataset root to write (replaced on success)")
    synth.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    synth.add_argument("--seed", type=int, default=None, help="overrides the preset's seed")
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synth.set_defaults(func=run_synth, takes_config=True)
    _add_import_parser(actions)
    _add_prepare_parser(actions)


def run_synth(args: argparse.Namespace) -> int:
    from data_pipelines import synth

    config = synth.synth_config(args.preset)
    for item in args.config_overrides:
        apply_override(config, item, source=f"synth preset {args.preset!r}")
    if args.seed is not None:
        config.seed = args.seed
    if not renders_with_cpu_kernels(config.render_backend):
        start_jax_cpu_on_one_core()
    with output_dirs.replacing(args.out, "dataset") as staging:
        info = synth.generate(staging, config, progress=not args.no_progress)
    num_sequences = sum(len(s) for s in info["sequences"].values())
    print(f"wrote {len(info['sequences'])} subjects, {num_sequences} sequences to {args.out}")
    return 0


def renders_with_cpu_kernels(backend: str) -> bool:
    """Whether the synth renderer gets the C++ CPU kernels (`kernels/cpu_ops.py`), decided without starting JAX's
    client. Those spread over XLA's thread pool, and on 2 cores the tiny preset took 74 s with it, 94 s on one."""
    from kernels import cpu_ops

    if backend == "auto":
        backend = os.environ.get("UHAP_RASTER_BACKEND", "auto")
    if backend not in ("auto", "cpu"):
        return False
    try:
        cpu_ops.build()
    except (cpu_ops.CpuBuildError, OSError):
        return False
    return True


def start_jax_cpu_on_one_core() -> None:
    """Starts JAX's CPU client while this thread may use one core, then gives every thread all its cores back.

    XLA sizes its CPU thread pool from the usable cores when the client starts. Without the C++ kernels the synth
    renderer runs many small XLA ops (the jnp reference; measured with the interpreted Pallas rasterizer, which
    took ~1.7x the CPU time, and no less wall time, with a pool that hands its work between 2 cores); with the pool
    on one core, the PNG writers and the identity preparer run on the others. Only where JAX can use no
    accelerator and the cores can be listed (Linux); a no-op if JAX has started already.
    """
    import jax

    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task") or _accelerator_plugins():
        return
    cores = os.sched_getaffinity(0)
    if len(cores) < 2 or jax.config.jax_platforms not in (None, "", "cpu"):
        return
    os.sched_setaffinity(0, {min(cores)})
    try:
        jax.devices()
    finally:
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that has ended meanwhile
                os.sched_setaffinity(int(thread), cores)


def _accelerator_plugins() -> list[str]:
    """JAX's GPU/TPU plugins installed here (entry points, `jax_plugins` modules, libtpu)."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    with contextlib.suppress(ImportError):
        import jax_plugins

        names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    return names + (["libtpu"] if importlib.util.find_spec("libtpu") else [])


def _size(text: str) -> tuple[int, int]:
    """`WxH` → (W, H) for --calib-resolution."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) <= 0 or int(height) <= 0:
        raise argparse.ArgumentTypeError(f"expected WxH in pixels, e.g. 2200x3208, got {text!r}")
    return int(width), int(height)


def _add_import_parser(commands) -> None:
    parser = commands.add_parser("import", help="convert NeRSemble v2 or Multiface captures into the layout")
    parser.add_argument("--format", required=True, choices=["nersemble", "multiface"])
    parser.add_argument("--src", required=True, type=Path, help="a participant folder, or a folder of them")
    parser.add_argument("--out", required=True, type=Path, help="layout root; subjects/<id> is written in it")
    parser.add_argument("--sequences", help="comma-separated sequence (expression) names; default: all")
    parser.add_argument("--audio", type=Path, help="nersemble: folder of <participant>/<sequence>.wav files")
    parser.add_argument("--calib-resolution", type=_size, help="nersemble: WxH the intrinsics were calibrated at")
    parser.add_argument("--no-color-calibration", action="store_true", help="nersemble: leave colours as decoded")
    parser.add_argument(
        "--max-audio-overhang", type=float, default=0.5, help="seconds of audio after the last frame cut with a note"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out a participant or sequence that cannot be imported (one SKIPPED line each) instead of failing",
    )
    parser.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from data_pipelines import importers

    common.require_dir(args.src, "--src", f"a {args.format} participant folder or a folder of them")
    clash = output_dirs.overlapping_input(args.out, [args.src, args.audio])
    if clash is not None:
        raise common.UsageError(f"--out {args.out}: overlaps the input {clash}; give a layout folder of its own")
    if args.out.exists() and not args.out.is_dir():
        raise common.UsageError(f"--out {args.out}: is a file; give a layout folder (new, or one to add to)")
    if args.max_audio_overhang < 0:
        raise common.UsageError(f"--max-audio-overhang {args.max_audio_overhang}: must be 0 or more seconds")
    sequences = args.sequences.split(",") if args.sequences else None
    if args.format == "nersemble":
        if args.audio is not None:
            common.require_dir(args.audio, "--audio", "a folder of <participant>/<sequence>.wav files")
        options = importers.nersemble.NersembleOptions(
            audio_dir=args.audio,
            calib_resolution=args.calib_resolution,
            sequences=sequences,
            color_correction=not args.no_color_calibration,
            max_audio_overhang_s=args.max_audio_overhang,
        )
    else:
        nersemble_only = [args.audio, args.calib_resolution, args.no_color_calibration or None]
        if any(option is not None for option in nersemble_only):
            raise common.UsageError("--audio, --calib-resolution and --no-color-calibration need --format nersemble")
        options = importers.multiface.MultifaceOptions(
            sequences=sequences, max_audio_overhang_s=args.max_audio_overhang
        )
    report = importers.import_capture(args.format, args.src, args.out, options, skip_bad=args.skip_bad)
    for subject, subject_notes in report.notes.items():
        print(f"imported {subject} into {args.out}")
        for note in subject_notes:
            print(f"  note: {note}")
    for item, reason in report.skipped:
        print(f"SKIPPED {item}: {reason}", file=sys.stderr)
    summary = f"imported {len(report.notes)} participant(s) into {args.out}"
    if report.skipped:
        summary += f"; SKIPPED {len(report.skipped)} (--skip-bad; see the lines above)"
    print(summary)
    return 0


def _add_prepare_parser(commands) -> None:
    parser = commands.add_parser("prepare", help="write per-frame TFDS array_record records from a layout")
    parser.add_argument("--root", required=True, type=Path, help="layout root (holds subjects/)")
    parser.add_argument("--data-dir", required=True, type=Path, help="TFDS data dir to write into")
    parser.add_argument("--audio-window", type=float, default=0.5, help="seconds of audio kept per frame")
    parser.add_argument("--decoded", action="store_true",
                        help="also decode every PNG once into uint8 rows per camera-frame (~1 MiB each at 512^2), "
                             "what `data.decoded` loaders read")  # fmt: skip
    parser.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from data_pipelines import tfds_builder

    common.require_dataset(args.root, "--root")
    dataset_dir = tfds_builder.prepare(args.root, args.data_dir, audio_window_s=args.audio_window)
    print(f"prepared {dataset_dir}")
    if args.decoded:
        from data_pipelines import frame_cache

        cache = frame_cache.build(dataset_dir, frame_cache.cache_path(args.data_dir, dataset_dir))
        print(f"decoded {cache}")
    return 0
