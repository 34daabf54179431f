"""`uhap sweep --config configs/sweep.py:tiny --workdir S`: evaluate checkpoints x datasets x settings.

    uhap sweep --config configs/sweep.py:tiny --workdir runs/sweep \
        --config.checkpoints='("runs/prior", "bundles/prior")' --config.settings.image_scale='(1.0, 0.5)'

Jobs are split round-robin over the JAX processes (pass the distributed flags, or let SLURM / TPU / Open MPI be
auto-detected); process 0 writes S/results.csv, S/results.html and S/plots/<metric>.png. With
--config.benchmark.encoder=E, speech-model checkpoints are also scored by `uhap benchmark`'s protocol and
S/ranking.csv lists them best first by --config.benchmark.rank_by (default lve_mm2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common
from uhap_jax.config_utils import load_config
from uhap_jax.train.distributed import add_distributed_args, initialize_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="evaluate checkpoints x datasets x settings over all processes",
        description="Config fields can be overridden with --config.<field>=<value>, e.g. "
        "--config.checkpoints='(\"runs/prior\",)'.",
    )
    parser.add_argument("--config", default="sweep:tiny", help="configs/sweep.py[:preset] (default: tiny)")
    parser.add_argument("--workdir", type=Path, required=True, help="parts/, results.csv, results.html, plots/")
    add_distributed_args(parser)
    parser.set_defaults(func=run, takes_config=True)


def run(args: argparse.Namespace) -> int:
    common.log_to_stdout()
    config = load_config(args.config, args.config_overrides)  # a bad override fails before any start-up
    output_dirs.check_resumable(args.workdir, "parts", "uhap sweep")  # results.csv and the rest are written over
    initialize_from_args(args)
    from uhap_jax.eval.sweep import run_sweep  # after distributed start-up: it imports the models

    config = load_config(args.config, args.config_overrides)
    benchmark_fn = None
    if config.benchmark.encoder:
        from uhap_jax.train.benchmark_avatars import sweep_benchmark

        benchmark_fn = sweep_benchmark(config.benchmark, args.workdir / "benchmark")
    rows = run_sweep(config, args.workdir, benchmark_fn)
    if rows is not None:
        print(f"wrote {args.workdir / 'results.csv'} ({len(rows)} rows), results.html and plots/")
        if benchmark_fn is not None:
            metric = f"benchmark/{config.benchmark.rank_by}"
            print(f"wrote {args.workdir / 'ranking.csv'}: the checkpoints best first by {metric}")
    return 0
