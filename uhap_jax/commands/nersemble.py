r"""`uhap nersemble`: a trained prior's renders as a NeRSemble dynamic-NVS benchmark submission zip.

    uhap nersemble --prior runs/prior --data layout/ --nersemble SRC --out nvs_submission.zip \
        [--calib-resolution 1100 1604]

`--data` is the capture layout the benchmark sequences were imported into (`uhap data import --format nersemble`,
subjects named by participant id, e.g. `388`), each with a neutral scan for the identity; `--nersemble` the
downloaded benchmark folder, whose `<participant>/calibration/camera_params.json` holds the hold-out cameras. Each
frame's code comes from the prior's encoder on the sequence's training cameras; the zip holds
`{participant:03d}/{sequence}/cam_{serial}.mp4` at 1100x1604, 73 fps (`uhap_jax.eval.nersemble_submission.NVS`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from uhap_jax.config_utils import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("nersemble", help="NeRSemble NVS benchmark submission zip from a prior")
    parser.add_argument("--prior", type=Path, required=True, help="a prior workdir or inference bundle")
    parser.add_argument("--data", type=Path, required=True, help="the capture layout holding the benchmark sequences")
    parser.add_argument("--nersemble", type=Path, required=True, help="the NeRSemble benchmark download (calibration)")
    parser.add_argument("--out", type=Path, required=True, help="the submission .zip")
    parser.add_argument("--calib-resolution", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="camera_params.json's intrinsics resolution (default: the submission's)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipelines import layout
    from data_pipelines.importers import nersemble
    from uhap_jax.artifacts.priors import load_prior
    from uhap_jax.eval import nersemble_submission as nvs
    from uhap_jax.geometry.texels import scan_uv_maps

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    spec = nvs.NVS
    missing = [str(layout.sequence_dir(args.data, f"{p:03d}", q)) for p, q in spec.sequences.items()
               if not layout.sequence_dir(args.data, f"{p:03d}", q).is_dir()]  # fmt: skip
    if missing:
        raise UsageError(f"--data: the benchmark sequences {missing} are missing; import them first "
                         "(uhap data import --format nersemble)")  # fmt: skip
    prior, config, template, _ = load_prior(args.prior)
    tracked = float(config.loss.get("tracked_mesh", 0.0)) > 0
    width, height = args.calib_resolution or (spec.width, spec.height)

    def renders():
        for participant, sequence in spec.sequences.items():
            subject = f"{participant:03d}"
            subject_dir = layout.subject_dir(args.data, subject)
            vertices, _, colours = layout.read_neutral_scan(subject_dir)
            maps = scan_uv_maps(prior.layout, template, vertices, colours, str(subject_dir))
            extrinsics, intrinsics = nersemble.read_camera_params(args.nersemble / subject / nersemble.CAMERA_PARAMS)
            missing = [s for s in spec.serials if s not in extrinsics]
            if missing:
                raise UsageError(f"{args.nersemble / subject / nersemble.CAMERA_PARAMS}: no hold-out cameras {missing}")
            cameras = [nvs.scaled_camera(layout.Camera(s, extrinsics[s], intrinsics[s], width, height), spec.width,
                                         spec.height) for s in spec.serials]  # fmt: skip
            meta = layout.read_sequence_meta(layout.sequence_dir(args.data, subject, sequence))
            inputs = [s for s in meta.get("cameras", []) if s not in spec.serials]
            yield participant, sequence, nvs.render_sequence(prior, maps, template, tracked, args.data, subject,
                                                             sequence, cameras, inputs, spec)  # fmt: skip

    out = nvs.write_submission(args.out, renders(), spec)
    print(f"wrote {out}")
    return 0
