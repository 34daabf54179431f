"""`uhap bench rasterizer`: time the Gaussian rasterizer (and gsplat beside it, on a GPU).
`uhap bench train`: time a prior training step (multi-view images/s and the rasterizer's share); with
`--real-data ROOT`, the step alone, the loader alone and end to end on real data (`uhap_jax.train.train_bench`).
`uhap bench animate`: frames/s of speech -> codes -> decode -> render -> host (`uhap_jax.inference.fps_bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kernels import bench as raster_bench
from uhap_jax.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (printed as markdown tables)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    raster = targets.add_parser("rasterizer", help="forward and forward+backward of the rasterizer")
    raster_bench.add_arguments(raster)
    raster.set_defaults(func=run_rasterizer)
    train = targets.add_parser("train", help="one UHAP prior train step on random data of a preset's shape")
    train.add_argument("--config", default="configs/prior.py:base", help="prior config and preset")
    train.add_argument("--repeats", type=int, default=10)
    train.add_argument(
        "--real-data",
        metavar="ROOT",
        default="",
        help="a capture layout (dataset.json): time the step alone, the loader alone and end to end",
    )
    train.add_argument("--steps", type=int, default=100, help="timed steps of the step alone and of end to end")
    train.add_argument(
        "--batch-search",
        default="",
        metavar="B,B,...",
        help="global batch sizes (frames) to size: the step's device memory, the largest that fits",
    )
    train.set_defaults(func=run_train, takes_config=True)
    animate = targets.add_parser(
        "animate", help="frames/s of audio -> speech model -> codes -> decode -> render -> host, untrained models",
        description="Overrides: --config.prior.<field>=V and --config.audio.<field>=V.",
    )  # fmt: skip
    animate.add_argument("--prior-config", default="configs/prior.py:base", help="prior config and preset")
    animate.add_argument("--audio-config", default="configs/audio.py:base", help="speech-model config and preset")
    animate.add_argument("--frames", type=int, default=256, help="frames of the clip (its audio lasts frames / fps)")
    animate.add_argument("--fps", type=float, default=25.0, help="video frame rate the speech model predicts at")
    animate.add_argument("--size", type=int, default=512, help="square image side in pixels")
    animate.add_argument("--batch", default="1", help="frames per decode+render call; a comma list times each")
    animate.add_argument(
        "--capacity",
        choices=("measured", "widest"),
        default="measured",
        help="pair capacity: `uhap animate`'s (first batch x 1.25) or the train stage's bound",
    )
    animate.add_argument(
        "--host-dtype",
        choices=("uint8", "float32"),
        default="uint8",
        help="frames read back as uint8 (made on the device) or float32",
    )
    animate.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up; the median")
    animate.add_argument("--seed", type=int, default=0)
    animate.set_defaults(func=run_animate, takes_config=True)


def run_rasterizer(args: argparse.Namespace) -> int:
    return raster_bench.main_with_args(args)


def run_train(args: argparse.Namespace) -> int:
    import tempfile

    import jax

    from uhap_jax.config_utils import load_config
    from uhap_jax.train.prior_bench import benchmark_step

    config = load_config(args.config, args.config_overrides)
    try:
        sizes = [int(b) for b in args.batch_search.split(",") if b]
    except ValueError:
        raise SystemExit(
            f"uhap bench train: --batch-search {args.batch_search!r} is not a comma list of integers"
        ) from None
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) x {jax.device_count()}, "
          f"config {args.config}")  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        if args.real_data:
            from uhap_jax.train.train_bench import benchmark_real_data

            _print_table([benchmark_real_data(config, args.real_data, Path(workdir), steps=args.steps)])
        else:
            _print_table([benchmark_step(config, workdir, repeats=args.repeats)])
        if sizes:
            from uhap_jax.train.train_bench import batch_search

            for row in batch_search(config, Path(workdir), sizes):  # one line each, as it is found
                print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)  # fmt: skip
    return 0


def _print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |")


def run_animate(args: argparse.Namespace) -> int:
    import jax

    from uhap_jax.inference import fps_bench

    overrides: dict[str, list[str]] = {"prior": [], "audio": []}
    for item in args.config_overrides:
        stage, _, rest = item.removeprefix("--config.").partition(".")
        if stage not in overrides or not rest:
            raise common.UsageError(f"{item}: uhap bench animate takes --config.prior.<field>=V or "
                                    "--config.audio.<field>=V")  # fmt: skip
        overrides[stage].append(rest)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise common.UsageError(f"--batch {args.batch!r}: not a comma list of integers, e.g. 1,4,8") from None
    for batch in batches:
        common.bounded(batch, "--batch", "BATCH")
    common.bounded(args.size, "--size", "SIZE")
    common.bounded(args.frames, "--frames", "FRAMES")
    if not args.fps > 0:
        raise common.UsageError(f"--fps {args.fps}: must be positive")
    rows, note = fps_bench.run(
        args.prior_config, args.audio_config, frames=args.frames, size=args.size, batches=batches,
        prior_overrides=overrides["prior"], audio_overrides=overrides["audio"], fps=args.fps,
        capacity=args.capacity, host_dtype=args.host_dtype, repeats=args.repeats, seed=args.seed,
    )  # fmt: skip
    best = max(rows, key=lambda row: row["end_to_end_fps"])
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), prior {args.prior_config}, "
          f"audio {args.audio_config}")  # fmt: skip
    print(f"{note}; untrained weights (same cost as trained); capacity {args.capacity}, frames read back as "
          f"{args.host_dtype}; median of {args.repeats} passes after one warm-up")  # fmt: skip
    print(fps_bench.markdown_table(rows))
    print(f"best batch: {best['batch']} ({best['end_to_end_fps']:.1f} frames/s end to end)")
    return 0
