"""Does a phone clip tell where a person's lips are? The fine-tune's image loss with the avatar's mouth moved.

    python scripts/lip_observability.py WORKDIR

WORKDIR is a `uhap demo` workdir. For each held-out identity, its phone-built avatar (WORKDIR/avatar_<id>, the
benchmark's) is driven by the phone clip's own audio and rendered at the phone camera with the clip's true head
pose (a diagnostic: a user's fit has only the encoder's pose). Printed: the lips' mean offset from the clip's
tracked lips (head space, mm), and two losses against the clip's frames with the mouth's Gaussians (lips, teeth,
tongue, mouth interior) moved in head space by multiples of the move onto the true lips (minus the offset):
the personalisation's image loss (configs/personalize.py:tiny weights: masked L1 + SSIM) and its L1 inside the
benchmark's mouth crop (`face_metrics.mouth_box`) around the unmoved lips over the clip. Where moving the mouth
onto the true lips does not lower them, the clip does not show where the lips are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from configs import personalize as personalize_config
from data_pipelines import layout, monocular
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.eval import benchmark, face_metrics
from uhap_jax.geometry import rotations
from uhap_jax.geometry.texels import region_gaussian_ids
from uhap_jax.models import losses
from uhap_jax.models.render import targets
from uhap_jax.train import benchmark_avatars

MOUTH = ("lips", "teeth", "tongue", "mouth_interior")
STEPS = (1.5, 1.0, 0.5, 0.0, -0.5, -1.0)  # multiples of the move onto the true lips


def main(workdir: str) -> None:
    work = Path(workdir)
    root = work / "data"
    _, _, template, _ = load_prior(work / "prior")
    weights = personalize_config.get_config("tiny").loss
    moves = " / ".join(f"{s:+.1f}" for s in STEPS)
    print(f"| identity | lips' offset from the truth (mm, x / y / z) | loss | mouth moved onto the truth x {moves} |")
    print("|---|---|---|---|")
    for subject in benchmark.read_split(root).test_identities:
        video = monocular.read_monocular(layout.subject_dir(root, subject), "", (), 0)
        sequence = video.frames[0][0]
        seq_dir = layout.sequence_dir(root, subject, sequence)
        meta = layout.read_sequence_meta(seq_dir)
        rotation = np.asarray(meta["head_pose"]["rotation_vector"], np.float32)
        translation = np.asarray(meta["head_pose"]["translation"], np.float32)
        chosen = [k for k, (name, _) in enumerate(video.frames) if name == sequence]
        frames = [video.frames[k][1] for k in chosen]
        avatar = benchmark_avatars.load(work / f"avatar_{subject}")
        prior = avatar.prior
        codes = benchmark.audio_driver(avatar, layout.read_audio(seq_dir / layout.AUDIO_FILE)[0], meta["num_frames"])
        maps = jnp.broadcast_to(jnp.asarray(avatar.scan_maps), (len(frames), *avatar.scan_maps.shape))
        gaussians = prior.decode(jnp.asarray(codes[frames], jnp.float32), maps, jnp.asarray(rotation[frames]),
                                 jnp.asarray(translation[frames]))  # fmt: skip

        lip_ids = face_metrics.lip_texel_ids(prior.layout, template)
        to_head = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(rotation[frames])))
        tracked = layout.read_vertices(seq_dir, num_frames=meta["num_frames"])[frames]
        head = np.einsum("tji,tvj->tvi", to_head, tracked - translation[frames, None])
        true_lips = face_metrics.surface_at_texels(head, template, prior.layout)[:, lip_ids]
        offset = np.mean(np.asarray(gaussians.head_means)[:, lip_ids] - true_lips, axis=(0, 1))

        mouth = np.zeros(prior.layout.num_gaussians, bool)
        mouth[np.concatenate([region_gaussian_ids(prior.layout, template, name) for name in MOUTH])] = True
        masks, target = targets(jnp.asarray(video.images[chosen]), jnp.asarray(video.masks[chosen]))
        views = jnp.broadcast_to(jnp.asarray(video.camera.world_to_cam, jnp.float32), (len(frames), 1, 4, 4))
        ks = jnp.broadcast_to(jnp.asarray(video.camera.intrinsics, jnp.float32), (len(frames), 1, 3, 3))
        height, width = video.images.shape[1:3]
        capacity = 64 * len(mouth) * len(frames)
        lip_pixels = face_metrics.project(np.asarray(gaussians.means)[:, lip_ids], video.camera.world_to_cam,
                                          video.camera.intrinsics)  # fmt: skip
        box = face_metrics.mouth_box(lip_pixels, width, height)
        in_box = np.zeros((height, width), np.float32)
        in_box[box.top : box.top + box.size, box.left : box.left + box.size] = 1.0
        pixel_weight = masks + weights.background_weight * (1.0 - masks)
        scores = {"image loss": [], "L1 in the mouth crop": []}
        for step in STEPS:
            move = jnp.einsum("bij,j->bi", gaussians.head_rotation, jnp.asarray(-step * offset, jnp.float32))
            moved = gaussians._replace(means=gaussians.means + jnp.where(mouth[None, :, None], move[:, None], 0.0))
            out = prior.render(moved, views, ks, width=width, height=height, capacity=capacity)
            if bool(jnp.any(out.stats.overflow)):
                raise RuntimeError("lip_observability: the rasterizer's pair capacity overflowed; raise `capacity`")
            rgb = out.rgb[:, 0]
            loss = weights.l1 * losses.masked_l1(rgb, target, pixel_weight)
            scores["image loss"].append(float(loss + weights.ssim * losses.ssim_loss(rgb, target)))
            scores["L1 in the mouth crop"].append(float(losses.masked_l1(rgb, target, pixel_weight * in_box)))
        where = " / ".join(f"{1000 * v:+.1f}" for v in offset)
        for name, values in scores.items():
            print(f"| {subject} | {where} | {name} | " + " / ".join(f"{v:.5f}" for v in values) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
