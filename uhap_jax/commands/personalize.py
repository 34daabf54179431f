r"""`uhap personalize`: a new person's avatar from a monocular video (the encoder: `uhap train encoder`).

    uhap personalize --prior runs/prior --encoder runs/encoder --audio-model runs/audio \
        --video data/subjects/id004/sequences/mono_00 --out avatars/id004 [--config configs/personalize.py:tiny]

`--video` is a capture-layout folder (calibrated) or a plain video file (mp4/mov from a phone, any frame rate,
portrait or landscape): its focal length comes from `--calibration`, else the file's metadata, else `--fov-deg`;
the encoder's head localiser finds the face in each frame.

It resumes when run again (the fine-tune's workdir defaults to <out>.work). The exit status is 143 (128 +
SIGTERM) when preempted; a preempted personalisation writes no avatar.
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from data_pipelines.video_file import DEFAULT_FOV_DEG, SUFFIXES, probe
from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common

PREEMPTED = 128 + signal.SIGTERM


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "personalize",
        help="a new person's avatar from a monocular video",
        description="Config fields can be overridden with --config.<field>=<value>, e.g. --config.train.steps=50.",
    )
    parser.add_argument("--prior", type=Path, required=True, help="a prior workdir or inference bundle")
    parser.add_argument("--encoder", type=Path, required=True, help="a `uhap train encoder` workdir")
    parser.add_argument("--audio-model", type=Path, required=True, help="a `uhap train audio` workdir")
    parser.add_argument("--video", type=Path, required=True,
                        help="a video file (mp4/mov), a capture-layout subject or sequence folder")  # fmt: skip
    parser.add_argument("--fov-deg", type=float, default=None,
                        help=f"a video file's field of view across its longer side when its metadata has no focal "
                             f"length (default {DEFAULT_FOV_DEG:g}: a phone's main camera)")  # fmt: skip
    parser.add_argument("--calibration", type=Path, default=None,
                        help="a video file's intrinsics: a capture-layout calibration/camera_params.json "
                             "(--config.camera=<serial>) or a 3x3 matrix (.npy, text) in its pixels")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the avatar folder (replaced when complete)")
    parser.add_argument("--config", default="personalize:tiny", help="configs/personalize.py[:preset]")
    parser.add_argument("--workdir", type=Path, default=None, help="the fine-tune's checkpoints (<out>.work)")
    parser.set_defaults(func=run, takes_config=True)


def _video_options(args: argparse.Namespace, config) -> None:
    """--fov-deg and --calibration into config.video, checked: they belong to a readable video file."""
    if args.video.is_dir():
        for flag, value in (("--fov-deg", args.fov_deg), ("--calibration", args.calibration)):
            if value is not None:
                raise common.UsageError(f"{flag}: only for a video file; --video {args.video} is a capture-layout "
                                        "folder, calibrated already")  # fmt: skip
        return
    if args.video.suffix.lower() not in SUFFIXES:
        raise common.UsageError(f"--video {args.video}: not a video file ({', '.join(SUFFIXES)}) or a folder; give "
                                "the clip as a video file or a capture-layout folder")  # fmt: skip
    if args.fov_deg is not None:
        if not 1.0 < args.fov_deg < 170.0:
            raise common.UsageError(f"--fov-deg {args.fov_deg:g}: give the field of view in degrees, between 1 and "
                                    "170 (a phone's main camera: about 69)")  # fmt: skip
        config.video.fov_deg = args.fov_deg
    if args.calibration is not None:
        if not args.calibration.is_file():
            raise common.UsageError(f"--calibration {args.calibration}: no such file; give a capture-layout "
                                    "calibration/camera_params.json or a 3x3 intrinsics matrix")  # fmt: skip
        config.video.calibration = str(args.calibration)
    probe(args.video)  # an unreadable file fails here, before any model is loaded


def run(args: argparse.Namespace) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.train.personalize_stage import RUN_FILE, fine_tune_workdir, personalize

    common.log_to_stdout()
    config = load_config(args.config, getattr(args, "config_overrides", []))
    common.bounded(config.max_frames, "--config.max_frames", "FRAMES")
    common.bounded(config.image_size, "--config.image_size", "SIZE")
    common.require_prior(args.prior, "--prior")
    common.require_checkpoint(args.encoder, "--encoder", "uhap train encoder")
    common.require_checkpoint(args.audio_model, "--audio-model", "uhap train audio")
    if not args.video.exists():
        raise FileNotFoundError(f"--video {args.video}: does not exist; give a video file (mp4/mov), a capture-layout "
                                "subject folder or one of its sequence folders")  # fmt: skip
    _video_options(args, config)
    inputs = [args.prior, args.encoder, args.audio_model, args.video, *([args.calibration] if args.calibration else [])]
    output_dirs.check_replaceable(args.out, "avatar", inputs=inputs)
    workdir = fine_tune_workdir(args.out, config, args.workdir)
    clash = output_dirs.overlapping_input(workdir, [*inputs, args.out])
    if clash is not None:
        raise common.UsageError(f"--workdir {workdir}: overlaps {clash}; give the fine-tune a folder of its own")
    output_dirs.check_resumable(workdir, RUN_FILE, "uhap personalize")
    result = personalize(args.prior, args.encoder, args.video, args.out, config, audio_workdir=args.audio_model,
                         workdir=args.workdir)  # fmt: skip
    print(json.dumps({"avatar": str(result.avatar) if result.avatar else None, "step": result.step,
                      "preempted": result.preempted, "workdir": str(result.workdir)}))  # fmt: skip
    return PREEMPTED if result.preempted else 0
