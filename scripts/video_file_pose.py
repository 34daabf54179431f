"""The encoder's head rotation on the held-out identities' phone clips, through the calibrated capture-layout
folder and as a plain mp4 (its 35 mm-equivalent focal length, calibration withheld; the head localiser's virtual
cameras, before and after `personalize_stage.recentred`), and with `--quality` the personalised held-out-view PSNR
both ways (docs/benchmarks.md, issue 17, session 20):

    PYTHONPATH=. python scripts/video_file_pose.py W/prior W/data OUT NAME=ENCODER_WORKDIR ... [--quality]

Errors are the angle between the predicted and the true head orientation as the camera sees it (R_cam R_head), so
the calibrated camera and the virtual ones compare directly. One JSON line per (encoder, identity).
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from data_pipelines import layout, monocular, synth, video_file
from uhap_jax.artifacts.priors import load_prior, restore_encoder_model
from uhap_jax.config_utils import load_config
from uhap_jax.models.identity_start import encode_video
from uhap_jax.train import personalize_stage

RECENTRE = int(load_config("configs/personalize.py:tiny").video.recentre)  # the default passes


def seen_from(world_to_cam: np.ndarray, rotation: np.ndarray) -> Rotation:
    return Rotation.from_matrix(world_to_cam[:3, :3] @ Rotation.from_rotvec(rotation).as_matrix())


def main(prior_dir: Path, root: Path, out: Path, encoders: dict[str, Path], quality: bool) -> None:
    prior, _, _, _ = load_prior(prior_dir)
    config = load_config("configs/personalize.py:tiny")
    config.use_scan, config.scan, config.camera = False, "", synth.MONO_SERIAL
    out.mkdir(parents=True, exist_ok=True)
    for name, encoder_dir in encoders.items():
        restored, _ = restore_encoder_model(encoder_dir, prior)
        for subject in layout.read_dataset_info(root)["identities"]["held_out"]:
            video = monocular.read_monocular(layout.subject_dir(root, subject), synth.MONO_SERIAL)
            sequence = video.frames[0][0]
            first = [i for i, (s, _) in enumerate(video.frames) if s == sequence]
            meta = layout.read_sequence_meta(layout.sequence_dir(root, subject, sequence))["head_pose"]
            truth = seen_from(
                video.camera.world_to_cam, np.asarray(meta["rotation_vector"])[[i for _, i in video.frames]][first]
            )
            _, rotation, _ = encode_video(restored.encoder, video, 8)

            def error_deg(world_to_cam: np.ndarray, rotation: np.ndarray, truth: Rotation = truth) -> float:
                return float(np.degrees((seen_from(world_to_cam, rotation).inv() * truth).magnitude()).mean())

            row = {"encoder": name, "subject": subject, "frames": len(first),
                   "no_rotation_deg": error_deg(video.camera.world_to_cam, np.zeros((len(first), 3))),
                   "folder_deg": error_deg(video.camera.world_to_cam, rotation[first])}  # fmt: skip
            clip = out / f"{subject}_{sequence}.mp4"
            focal = video_file.focal_35mm_of(video.camera.intrinsics, video.camera.width, video.camera.height)
            video_file.write_video_file(clip, video.images[first], video.fps, focal_mm_35=focal)
            for passes in (0, RECENTRE):
                config.video.recentre = passes
                found, _ = personalize_stage.read_video(clip, restored.localiser, restored.encoder, config)
                _, rotation, _ = encode_video(restored.encoder, found, 8)
                row[f"mp4_recentred{passes}_deg"] = error_deg(found.camera.world_to_cam, rotation)
            if quality:
                for as_file in ("", "metadata"):
                    metrics = personalize_stage.heldout_quality(prior_dir, encoder_dir, load_config(
                        "configs/personalize.py:tiny"), out / f"{name}_{subject}_{as_file or 'folder'}",
                        subject=subject, as_file=as_file)  # fmt: skip
                    row[f"psnr_{as_file or 'folder'}"] = metrics["personalize/heldout_view_psnr"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quality"]
    main(
        Path(args[0]),
        Path(args[1]),
        Path(args[2]),
        {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in args[3:]},
        "--quality" in sys.argv,
    )
