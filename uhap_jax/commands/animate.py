r"""`uhap animate`: speech audio -> a talking-head MP4 (H.264 + the audio track), and `uhap avatar make`.

    uhap avatar make --prior-workdir runs/prior --audio-workdir runs/audio --data data/synth \
        --subject id000 --out avatars/id000
    uhap animate --avatar avatars/id000 --audio speech.wav --out talk.mp4 [--camera front|orbit|<serial>]
        [--size 512] [--ply frames/]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("animate", help="render an avatar speaking an audio file to MP4")
    parser.add_argument("--avatar", type=Path, required=True, help="an avatar folder (`uhap avatar make`)")
    parser.add_argument("--audio", type=Path, required=True, help="a PCM WAV file, any rate and channel count")
    parser.add_argument("--out", type=Path, required=True, help="the MP4 to write")
    parser.add_argument("--camera", default="front", help="front, orbit, orbit:<degrees> or a capture serial")
    parser.add_argument("--size", type=int, default=None, help="image height in pixels (default: the avatar's)")
    parser.add_argument("--ply", type=Path, default=None, help="also write one 3DGS PLY per frame into DIR")
    parser.add_argument("--batch-size", type=int, default=8, help="frames rendered per call")
    parser.set_defaults(func=run)

    avatar = subparsers.add_parser("avatar", help="avatar folders")
    actions = avatar.add_subparsers(dest="action", required=True, metavar="ACTION")
    make = actions.add_parser("make", help="an avatar folder for a dataset subject")
    make.add_argument("--prior-workdir", type=Path, required=True, help="a prior training workdir")
    make.add_argument("--audio-workdir", type=Path, required=True, help="a speech-model training workdir")
    make.add_argument("--data", type=Path, required=True, help="the capture layout holding the subject")
    make.add_argument("--subject", required=True, help="the subject id (subjects/<id>)")
    make.add_argument("--out", type=Path, required=True, help="avatar folder to write (replaced when complete)")
    make.add_argument("--fps", type=float, default=None, help="default: the subject's sequences' fps")
    make.add_argument("--size", type=int, default=512, help="default render size (square)")
    make.set_defaults(func=run_make)


def _log_to_stdout() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from uhap_jax.artifacts.avatars import load_avatar
    from uhap_jax.inference.avatar import animate

    _log_to_stdout()
    if (args.size is not None and args.size <= 0) or args.batch_size <= 0:
        raise ValueError(f"--size and --batch-size must be positive, got {args.size} and {args.batch_size}")
    avatar = load_avatar(args.avatar)
    result = animate(avatar, args.audio, args.out, camera=args.camera, size=args.size, ply_dir=args.ply,
                     batch_size=args.batch_size)  # fmt: skip
    print(f"wrote {result.video}: {result.num_frames} frames at {avatar.fps:g} fps, rendered at "
          f"{result.frames_per_second:.2f} frames/s (pair capacity {result.capacity})")  # fmt: skip
    if result.ply_files:
        print(f"wrote {len(result.ply_files)} PLY files to {args.ply}")
    return 0


def run_make(args: argparse.Namespace) -> int:
    from uhap_jax.artifacts.avatars import make_avatar

    _log_to_stdout()
    out = make_avatar(args.prior_workdir, args.audio_workdir, args.data, args.subject, args.out, fps=args.fps,
                      image_size=(args.size, args.size))  # fmt: skip
    print(f"wrote {out}")
    return 0
