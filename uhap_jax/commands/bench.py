"""`uhap bench rasterizer`: time the Gaussian rasterizer (and gsplat beside it, on a GPU)."""

from __future__ import annotations

import argparse

from kernels import bench as raster_bench


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (printed as markdown tables)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    raster = targets.add_parser("rasterizer", help="forward and forward+backward of the rasterizer")
    raster_bench.add_arguments(raster)
    raster.set_defaults(func=run_rasterizer)


def run_rasterizer(args: argparse.Namespace) -> int:
    return raster_bench.main_with_args(args)
