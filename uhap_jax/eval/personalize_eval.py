"""Personalisation's evaluation: a personalised held-out identity rendered at held-out cameras, against the prior
given that identity's true scan, the fit's starting point, and the prior on its training identities (PSNR, the
foreground on black as the prior's eval/psnr). `uhap_jax.train.personalize_stage.heldout_quality` personalises
the identity, then calls `heldout_metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders
from uhap_jax.artifacts.expression_codes import CODES_FILE, code_targets
from uhap_jax.artifacts.metrics_log import last_value
from uhap_jax.geometry import template as template_lib
from uhap_jax.models import image_metrics
from uhap_jax.models.personal import PersonalIdentity, personalized_prior
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import render_fitting, sized_capacity, targets


@dataclasses.dataclass(frozen=True)
class ViewSet:
    """Frames to score at held-out cameras: codes from held-in views, true poses, the target views."""

    codes: np.ndarray  # [E, z_dim]
    head_pose: np.ndarray  # [E, 6]
    subject_ids: np.ndarray  # [E]
    images: np.ndarray  # [E, Vo, H, W, 3] uint8
    masks: np.ndarray  # [E, Vo, H, W] uint8
    world_to_cam: np.ndarray  # [E, Vo, 4, 4]
    intrinsics: np.ndarray  # [E, Vo, 3, 3]


def view_set(records: loaders.FrameRecords, record_ids: np.ndarray, held_out: list[str], codes: np.ndarray,
             head_pose: np.ndarray, count: int) -> ViewSet:  # fmt: skip
    """`count` of the records spread evenly, with their codes (the prior's, `encoder_stage.code_targets`), true
    head pose and every held-out view."""
    chosen = record_ids[np.linspace(0, len(record_ids) - 1, count).round().astype(int)]
    target_views = loaders.SampleViews(len(held_out), tuple(held_out))
    rng = np.random.default_rng(0)
    outputs = [target_views.random_map(records.source[int(index)], rng) for index in chosen]
    stack = lambda key: np.stack([v[key] for v in outputs])  # noqa: E731
    return ViewSet(codes[chosen], head_pose[chosen], stack("subject_id"), stack("images"), stack("masks"),
                   stack("world_to_cam"), stack("intrinsics"))  # fmt: skip


@functools.lru_cache(maxsize=8)
def _score_fn(graphdef: nnx.GraphDef):
    """The jitted PSNR of a batch rendered at its cameras, one per prior graph: `view_psnr`'s calls for the base
    prior and its personalised copies reuse it (compiled once per shape and capacity, not once per call)."""

    @functools.partial(jax.jit, static_argnums=2)
    def score(state, batch, slots: int):
        model = nnx.merge(graphdef, state)
        posed = model.decode(batch["codes"], batch["scan_maps"], batch["head_pose"][:, :3], batch["head_pose"][:, 3:])
        height, width = batch["images"].shape[2:4]
        out = model.render(posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height,
                           capacity=slots)  # fmt: skip
        _, target = targets(batch["images"], batch["masks"])
        return image_metrics.psnr(jnp.clip(out.rgb, 0.0, 1.0), target), jnp.max(out.stats.n_pairs)

    return score


def view_psnr(prior: UHAP, views: ViewSet, scan_maps: np.ndarray, capacity: kernels.AdaptiveCapacity,
              batch_size: int) -> float:  # fmt: skip
    """Mean PSNR of the frames rendered at the held-out cameras (foreground on black, as the prior's eval/psnr)."""
    graphdef, state = nnx.split(prior)
    score = _score_fn(graphdef)
    count, values = len(views.codes), []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), count - 1)
        batch = {"codes": views.codes[index], "head_pose": views.head_pose[index], "scan_maps": scan_maps[index],
                 "images": views.images[index], "masks": views.masks[index],
                 "world_to_cam": views.world_to_cam[index], "intrinsics": views.intrinsics[index]}  # fmt: skip
        psnr, _ = render_fitting(lambda slots, batch=batch: jax.device_get(score(state, batch, slots)), capacity,
                                 lambda out: int(out[1]))  # fmt: skip
        values.append(psnr[: min(batch_size, count - start)])
    return float(np.mean(np.concatenate(values)))


def heldout_metrics(base: UHAP, prior_cfg: ml_collections.ConfigDict, template: template_lib.Template,
                    prior_step: int, prior_workdir: str | Path, identity: PersonalIdentity,
                    root: Path, records: loaders.FrameRecords, split: dataset_lib.Split, subject: str,
                    config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:  # fmt: skip
    """A held-out identity personalised from its monocular video (`identity`), scored at the held-out
    cameras of its multi-view sequences: codes from their held-in views (the prior's, cached in `workdir`), the
    true head pose.

    Returns `personalize/heldout_view_psnr` (the personalised avatar), `..._true_scan` (the prior given the
    identity's scan), `..._start` (the average identity with the video's albedo, before the fine-tune),
    `personalize/prior_train_psnr` (the prior on its training identities' frames, same protocol), the prior's
    own last `eval/psnr`, and `personalize/gap_db` between the prior's and the personalised PSNR.
    """
    subjects = dataset_lib.subject_tables(root, records, base.layout, template, prior_cfg)
    held_in, held_out = split.held_in_cameras, split.held_out_cameras
    sequences, codes = code_targets(
        base, prior_step, prior_workdir, root, records, subjects, held_in, config.eval.batch_size,
        workdir / CODES_FILE, keep=lambda s: s.split == "train" or s.subject == subject,
    )  # fmt: skip
    serials = {(row["subject"], row["sequence"]): row["serials"] for row in records.sequences}
    ours = [s for s in sequences if s.subject == subject and not set(held_out) - set(serials[s.subject, s.name])]
    if not ours:
        raise ValueError(f"{layout.subject_dir(root, subject)}: no multi-view sequence with the held-out cameras")
    ours_ids = np.concatenate([np.arange(s.first_record, s.first_record + s.num_frames) for s in ours])
    count = config.eval.num_frames
    frames = view_set(records, ours_ids, held_out, codes, subjects.head_pose, count)
    train = view_set(records, split.train_records, held_out, codes, subjects.head_pose, count)
    scans, batch = subjects.scan_maps, config.eval.batch_size
    height, width = frames.images.shape[2:4]
    posed = base.decode(frames.codes[:batch], scans[frames.subject_ids[:batch]], frames.head_pose[:batch, :3],
                        frames.head_pose[:batch, 3:])  # fmt: skip
    capacity = sized_capacity(base, posed, frames.world_to_cam[:batch, :1], frames.intrinsics[:batch, :1], width=width,
                              height=height, headroom=config.render.capacity_headroom)  # fmt: skip
    tile = lambda maps: np.broadcast_to(maps, (count, *maps.shape))  # noqa: E731
    personal = personalized_prior(prior_cfg, template, identity)
    metrics = {
        "personalize/heldout_view_psnr": view_psnr(personal, frames, tile(identity.scan_maps), capacity, batch),
        "personalize/heldout_view_psnr_true_scan": view_psnr(base, frames, scans[frames.subject_ids], capacity, batch),
        "personalize/heldout_view_psnr_start": view_psnr(
            base, frames, tile(identity.start_scan_maps), capacity, batch
        ),  # fmt: skip
        "personalize/prior_train_psnr": view_psnr(base, train, scans[train.subject_ids], capacity, batch),
    }
    prior_eval = last_value(Path(prior_workdir), "eval/psnr")
    if prior_eval is not None:
        metrics["personalize/prior_eval_psnr"] = prior_eval
    metrics["personalize/gap_db"] = metrics["personalize/prior_train_psnr"] - metrics["personalize/heldout_view_psnr"]
    return metrics
