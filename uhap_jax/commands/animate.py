r"""`uhap animate`: speech audio -> a talking-head MP4 (H.264 + the audio track), and `uhap avatar make`.

    uhap avatar make --prior-workdir runs/prior --audio-workdir runs/audio --data data/synth \
        --subject id000 --out avatars/id000
    uhap animate --avatar avatars/id000 --audio speech.wav --out talk.mp4 [--camera front|orbit|<serial>]
        [--size 512] [--ply frames/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhap_jax.artifacts import output_dirs
from uhap_jax.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser("animate", help="render an avatar speaking an audio file to MP4")
    parser.add_argument("--avatar", type=Path, required=True, help="an avatar folder (`uhap avatar make`)")
    parser.add_argument(
        "--audio", type=Path, required=True, help="speech audio: WAV, MP3, M4A, FLAC, ... (any rate and channel count)"
    )
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


def run(args: argparse.Namespace) -> int:
    from data_pipelines import audio_io
    from uhap_jax.artifacts.avatars import load_avatar
    from uhap_jax.inference.avatar import animate

    common.log_to_stdout()
    if args.size is not None:
        common.bounded(args.size, "--size", "SIZE")
    common.bounded(args.batch_size, "--batch-size", "BATCH")
    common.require_avatar(args.avatar)
    common.require_file(args.audio, "--audio", "a speech audio file (WAV, MP3, M4A, FLAC, ...)")
    common.require_dir(args.out.absolute().parent, "--out", "an MP4 path in an existing folder")
    if args.out.is_dir():
        raise common.UsageError(f"--out {args.out}: is a folder; give the MP4 file to write")
    clash = output_dirs.overlapping_input(args.out, [args.avatar, args.audio])
    if clash is not None:
        raise common.UsageError(f"--out {args.out}: would overwrite the input {clash}; give another path")
    if args.ply is not None:
        clash = output_dirs.overlapping_input(args.ply, [args.avatar, args.audio, args.out])
        if clash is not None:
            raise common.UsageError(f"--ply {args.ply}: overlaps {clash}; give a folder of its own")
    audio_io.decode_audio(args.audio)  # an unusable file is refused before the models load
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

    common.log_to_stdout()
    common.bounded(args.size, "--size", "SIZE")
    if args.fps is not None and not args.fps > 0:
        raise common.UsageError(f"--fps {args.fps}: must be positive")
    common.require_checkpoint(args.prior_workdir, "--prior-workdir", "uhap train prior")
    common.require_checkpoint(args.audio_workdir, "--audio-workdir", "uhap train audio")
    common.require_dataset(args.data, "--data")
    common.require_dir(args.data / "subjects" / args.subject, "--subject", f"a subject of {args.data / 'subjects'}")
    output_dirs.check_replaceable(args.out, "avatar", inputs=[args.prior_workdir, args.audio_workdir, args.data])
    out = make_avatar(args.prior_workdir, args.audio_workdir, args.data, args.subject, args.out, fps=args.fps,
                      image_size=(args.size, args.size))  # fmt: skip
    print(f"wrote {out}")
    return 0
