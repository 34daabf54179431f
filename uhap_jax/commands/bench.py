"""`uhap bench rasterizer`: time the Gaussian rasterizer (and gsplat beside it, on a GPU).
`uhap bench train`: time a prior training step (multi-view images/s and the rasterizer's share)."""

from __future__ import annotations

import argparse

from kernels import bench as raster_bench


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (printed as markdown tables)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    raster = targets.add_parser("rasterizer", help="forward and forward+backward of the rasterizer")
    raster_bench.add_arguments(raster)
    raster.set_defaults(func=run_rasterizer)
    train = targets.add_parser("train", help="one UHAP prior train step on random data of a preset's shape")
    train.add_argument("--config", default="configs/prior.py:base", help="prior config and preset")
    train.add_argument("--repeats", type=int, default=10)
    train.set_defaults(func=run_train)


def run_rasterizer(args: argparse.Namespace) -> int:
    return raster_bench.main_with_args(args)


def run_train(args: argparse.Namespace) -> int:
    import tempfile

    import jax

    from uhap_jax.config_utils import load_config
    from uhap_jax.train.prior_stage import benchmark_step

    config = load_config(args.config, args.config_overrides)
    with tempfile.TemporaryDirectory() as workdir:
        row = benchmark_step(config, workdir, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) x {jax.device_count()}, "
          f"config {args.config}")  # fmt: skip
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0
