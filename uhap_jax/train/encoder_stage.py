"""The encoder stage: a MonoEncoder learns, from one view, the expression code and head pose of a frozen prior.

Training examples are frames of the `train`-split sequences of the training identities, each seen by one random
held-in camera. Targets: the prior's posterior mean from all held-in views of the same frame (its
ExpressionEncoder; computed once per prior checkpoint and cached in `<workdir>/expression_codes.npz`, as the
audio stage does) and the frame's head pose (meta.json `head_pose`). The loss is the code MSE (over the
training codes' variance), the pose error (degrees², mm²), and a photometric term: the encoder's z and pose,
decoded by the frozen prior with the subject's scan and rendered into the view the encoder saw, against the
image (masked L1) for the first `data.photo_frames` frames of a random `loss.photometric_fraction` of the steps
(rendering and its gradient are most of a step's cost on a CPU; the codes learn mostly from the code loss).
Besides, the first `data.turned_frames` frames of every step are rendered by the frozen prior with their head
turned further (`turns`), and the encoder learns their code and pose too: the rig's cameras are tens of
degrees apart, and a phone video's head turns fall between them. Where the capture has monocular sequences of the
training identities with a true head pose (the synthetic phone clips), `data.phone_frames` of their frames join
every step for the pose terms alone (no multi-view frame gives them a code target), a share `data.phone_video.share`
of them seen as a plain video file of that clip would be: through a virtual camera placed where the head is
(`as_video_file_views`), so the encoder learns the pose in the cameras of both ways a user's clip comes in.
Held-out identities' clips are never used. Beside the encoder, in the same steps, the head localiser
(`uhap_jax.models.head_localiser`, where `localiser.enabled`) learns where the head centre projects in augmented
whole views (the rig's and the phone clips') and how big the encoder's crop is there: what places the encoder
in a video file's frames.

Every `eval.every` steps, and at the end, `uhap_jax.eval.encoder_eval` scores code, pose and re-rendered view on
fixed frames of each split, beside their baselines, into `<workdir>/metrics.jsonl`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from scipy.spatial.transform import Rotation

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.artifacts.expression_codes import CODES_FILE, code_targets
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.eval import encoder_eval
from uhap_jax.geometry import rotations
from uhap_jax.models import image_metrics, losses
from uhap_jax.models.frozen_prior import EncoderWithPrior, build_encoder, build_localiser
from uhap_jax.models.head_localiser import head_cameras, head_in_view, head_track, localiser_loss
from uhap_jax.models.mono_encoder import FRONT
from uhap_jax.models.render import render_views, targets
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh, put_batch
from uhap_jax.train.optimizer import make_optimizer

logger = logging.getLogger(__name__)

INFO_FILE = "encoder_info.json"
_DEG = 180.0 / np.pi
_MM = 1e3


# ------------------------------------------------------------------------------------- data


def phone_pool(root: Path) -> dict[str, np.ndarray] | None:
    """Every frame of the training identities' monocular sequences that carry a true head pose (the synthetic
    phone clips), with its camera: images [N, H, W, 3] and masks [N, H, W] uint8, world_to_cam [N, 4, 4],
    intrinsics [N, 3, 3], rotation and translation [N, 3]. None where the capture has none (a rig-only capture
    such as NeRSemble)."""
    clips = [c for c in encoder_eval.phone_clips(root, 0) if c.split == "train"]
    if not clips:
        return None
    pool = {"images": [], "masks": [], "world_to_cam": [], "intrinsics": [], "rotation": [], "translation": []}
    for clip in clips:
        video, count = clip.video, len(clip.video.images)
        views = video.frame_world_to_cam
        pool["images"].append(video.images)
        pool["masks"].append(video.masks)
        pool["world_to_cam"].append(np.broadcast_to(video.camera.world_to_cam, (count, 4, 4)) if views is None
                                    else views)  # fmt: skip
        pool["intrinsics"].append(np.broadcast_to(video.camera.intrinsics, (count, 3, 3)))
        pool["rotation"].append(clip.rotation)
        pool["translation"].append(clip.translation)
    return {name: np.concatenate(parts).astype(np.uint8 if name in ("images", "masks") else np.float32)
            for name, parts in pool.items()}  # fmt: skip


def as_video_file_views(rows: dict[str, np.ndarray], rng: np.random.Generator, *, extent: float,
                        centre: tuple[float, float, float], centre_jitter: float,
                        size_jitter: float) -> dict[str, np.ndarray]:  # fmt: skip
    """Phone-pool rows seen as a plain video file of the clip gives them (`personalize_stage.read_video`): the same
    image through a frontal virtual camera that puts the head centre where it was found, at the depth its size
    implies (`head_cameras`), with the head pose re-expressed so that every point lands on the same pixel. The
    head is "found" at its true projection moved by up to `centre_jitter` of the crop's side and sized by up to
    exp(+-size_jitter): a localiser's errors (0.05 of the window and 0.14 in log size on its training views, 0.30
    too big on the tests' clip; docs/benchmarks.md, "Plain video files")."""
    world_to_cam = rows["world_to_cam"].astype(np.float64)
    intrinsics = rows["intrinsics"].astype(np.float64)
    rotation, translation = rows["rotation"].astype(np.float64), rows["translation"].astype(np.float64)
    cam_rotation, cam_translation = world_to_cam[:, :3, :3], world_to_cam[:, :3, 3]
    head = np.einsum("bij,bj->bi", cam_rotation, np.asarray(centre) + translation) + cam_translation
    track = head_track(intrinsics, head, extent)
    track[:, :2] += centre_jitter * track[:, 2:] * rng.uniform(-1.0, 1.0, (len(track), 2))
    track[:, 2] *= np.exp(size_jitter * rng.uniform(-1.0, 1.0, len(track)))
    views = np.concatenate([head_cameras(k, found[None], extent, centre) for k, found in zip(intrinsics, track)])
    # The same camera-space head: FRONT (R' x + t') + t_v = R_cam (R x + t) + t_cam for every template point x.
    front = FRONT.astype(np.float64)
    rotated = front.T @ cam_rotation @ Rotation.from_rotvec(rotation).as_matrix()
    origin = np.einsum("bij,bj->bi", cam_rotation, translation) + cam_translation  # the head's, camera space
    moved = (origin - views[:, :3, 3]) @ front
    return rows | {"world_to_cam": views.astype(np.float32),
                   "rotation": Rotation.from_matrix(rotated).as_rotvec().astype(np.float32),
                   "translation": moved.astype(np.float32)}  # fmt: skip


class EncoderBatches(dataset_lib.GatheredBatches):
    """The multi-view loader's one-view batches, squeezed to [B, ...], with each frame's targets and scan; and,
    with a phone pool, at least `phone_frames` frames drawn from it (`phone_<name>`; rounded up so that every
    device gets as many, sharded over the batch axis like the rest), a random `video_share` of them through a
    video file's virtual camera (`video_views(rows, rng)`, e.g. `as_video_file_views` with its settings)."""

    def __init__(self, inner: loaders.GlobalBatchIterator, tables: encoder_eval.Tables, mesh: jax.sharding.Mesh,
                 phone: dict[str, np.ndarray] | None = None, phone_frames: int = 0, seed: int = 0,
                 video_share: float = 0.0, video_views: Callable[..., dict] | None = None):  # fmt: skip
        replicated = NamedSharding(mesh, PartitionSpec())
        super().__init__(inner, jax.tree.map(lambda x: jax.device_put(x, replicated), tables), batch_sharding(mesh))
        self._phone = phone if phone_frames > 0 else None
        local_devices = mesh.devices.size // jax.process_count()
        self._local_frames = -(-phone_frames // (local_devices * jax.process_count())) * local_devices
        self._mesh, self._seed, self._draws = mesh, seed, 0
        self._video_share, self._video_views = (video_share, video_views) if video_views is not None else (0.0, None)

    def __next__(self) -> dict:
        batch = super().__next__()
        if self._phone is None:
            return batch
        # Drawn from (seed, process, step): a resumed run draws what an uninterrupted one would (the step count is
        # in the state); each process draws its own slice of the global batch.
        rng = np.random.default_rng([self._seed, jax.process_index(), self._draws])
        index = rng.integers(0, len(self._phone["images"]), self._local_frames)
        self._draws += 1
        rows = {name: value[index] for name, value in self._phone.items()}
        as_video = rng.uniform(size=len(index)) < self._video_share
        if as_video.any():
            seen = self._video_views({name: value[as_video] for name, value in rows.items()}, rng)
            for name, value in seen.items():
                rows[name][as_video] = value  # `rows` are copies (fancy indexing)
        return batch | put_batch({f"phone_{name}": value for name, value in rows.items()}, self._mesh)

    def get_state(self):
        state = super().get_state()
        return {**state, "phone_draws": self._draws} if isinstance(state, dict) and self._phone is not None else state

    def set_state(self, state) -> None:
        if isinstance(state, dict) and "phone_draws" in state:
            state = dict(state)
            self._draws = int(state.pop("phone_draws"))
        super().set_state(state)

    @staticmethod
    def _attach(tables: encoder_eval.Tables, batch: dict) -> dict:
        record = tables.first_record[batch["sequence_id"]] + batch["frame_index"]
        pose = tables.head_pose[record]
        return {
            "images": batch["images"][:, 0], "masks": batch["masks"][:, 0],
            "world_to_cam": batch["world_to_cam"][:, 0], "intrinsics": batch["intrinsics"][:, 0],
            "codes": tables.codes[record], "scan_maps": tables.scan_maps[batch["subject_id"]],
            "head_rotation": pose[:, :3], "head_translation": pose[:, 3:],
        }  # fmt: skip


# ------------------------------------------------------------------------------------- model and loss


def turn_heads(rng: jax.Array, rotation: jax.Array, max_yaw_deg: float, max_pitch_deg: float) -> jax.Array:
    """Head rotation vectors [B, 3] turned further, about the vertical then the sideways axis, by uniform random
    angles within +-max_yaw_deg and +-max_pitch_deg."""
    angles = jax.random.uniform(rng, (rotation.shape[0], 2), minval=-1.0, maxval=1.0)
    angles = angles * jnp.deg2rad(jnp.array([max_yaw_deg, max_pitch_deg], jnp.float32))
    yaw = rotations.axis_angle_to_matrix(angles[:, :1] * jnp.array([0.0, 1.0, 0.0]))
    pitch = rotations.axis_angle_to_matrix(angles[:, 1:] * jnp.array([1.0, 0.0, 0.0]))
    return rotations.matrix_to_axis_angle(pitch @ yaw @ rotations.axis_angle_to_matrix(rotation))


def colour_jitter(rng: jax.Array, images: jax.Array, gain: float, contrast: float) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] with a random gain per image and channel (log-normal, `gain` its std: white
    balance, exposure, skin and hair tone) and a random contrast about each image's mean (`contrast`, the same),
    clipped to [0, 1]. The code and the head pose do not depend on them; identity cues in colour do."""
    if gain <= 0 and contrast <= 0:
        return images
    gain_rng, contrast_rng = jax.random.split(rng)
    gains = jnp.exp(gain * jax.random.normal(gain_rng, (images.shape[0], 1, 1, 3)))
    scale = jnp.exp(contrast * jax.random.normal(contrast_rng, (images.shape[0], 1, 1, 1)))
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return jnp.clip((images * gains - mean) * scale + mean, 0.0, 1.0)


def _pseudo_huber(squared: jax.Array, delta: float) -> jax.Array:
    """`squared` errors below delta**2 as they are, larger ones growing linearly in the error (2 delta |e|)."""
    return 2.0 * delta**2 * (jnp.sqrt(1.0 + squared / delta**2) - 1.0)


def make_loss_fn(config: ml_collections.ConfigDict, code_variance: float, capacity: kernels.AdaptiveCapacity):
    """`loss_fn(model, batch, rng)` for the Trainer: code MSE, pose error and the photometric term."""
    weights = config.loss
    photo_frames = min(config.data.photo_frames, config.data.batch_size)
    turned_frames = min(config.data.turned_frames, config.data.batch_size)

    def pose_and_code(model: EncoderWithPrior, images, batch: dict, codes, rotation, translation) -> dict:
        z, predicted, shift = model.encoder(images, batch["world_to_cam"], batch["intrinsics"])
        return {
            "code": jnp.mean((z - codes) ** 2) / code_variance,
            "rotation": jnp.mean(
                _pseudo_huber(jnp.sum((_DEG * (predicted - rotation)) ** 2, -1), weights.rotation_linear_deg)
            ),  # fmt: skip
            "translation": jnp.mean(jnp.sum((_MM * (shift - translation)) ** 2, -1)),
        }, (z, predicted, shift)

    def loss_fn(model: EncoderWithPrior, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        photo_rng, turn_rng, localiser_rng = jax.random.split(rng, 3)
        jitter_rngs = jax.random.split(jax.random.fold_in(rng, 1), 3)
        jitter = functools.partial(colour_jitter, gain=config.augment.gain, contrast=config.augment.contrast)
        images = jitter(jitter_rngs[0], batch["images"].astype(jnp.float32) / 255.0)
        terms, (z, rotation, translation) = pose_and_code(
            model, images, batch, batch["codes"], batch["head_rotation"], batch["head_translation"]
        )
        aux = {}
        phone_images = None
        if "phone_images" in batch:  # pose only: a phone clip has no multi-view frame to give a code target
            phone_images = jitter(jitter_rngs[1], batch["phone_images"].astype(jnp.float32) / 255.0)
            _, phone_rotation, phone_translation = model.encoder(phone_images, batch["phone_world_to_cam"],
                                                                 batch["phone_intrinsics"])  # fmt: skip
            error = jnp.sum((_DEG * (phone_rotation - batch["phone_rotation"])) ** 2, -1)
            shift = jnp.sum((_MM * (phone_translation - batch["phone_translation"])) ** 2, -1)
            terms["phone_pose"] = (weights.rotation * jnp.mean(_pseudo_huber(error, weights.rotation_linear_deg))
                                   + weights.translation * jnp.mean(shift))  # fmt: skip
        if weights.turned > 0 and turned_frames > 0:
            head = {key: value[:turned_frames] for key, value in batch.items()}
            turned_rotation = turn_heads(turn_rng, head["head_rotation"], config.turns.max_yaw_deg,
                                         config.turns.max_pitch_deg)  # fmt: skip
            rendered = render_views(model.prior, head["codes"], head["scan_maps"], turned_rotation,
                                    head["head_translation"], head["world_to_cam"], head["intrinsics"],
                                    width=images.shape[2], height=images.shape[1], capacity=capacity.value)  # fmt: skip
            seen = jitter(jitter_rngs[2], jax.lax.stop_gradient(jnp.clip(rendered.rgb, 0.0, 1.0)))
            turned, _ = pose_and_code(model, seen, head, head["codes"], turned_rotation, head["head_translation"])
            terms["turned"] = sum(getattr(weights, name) * value for name, value in turned.items())
            aux = {"raster_overflow": jnp.any(rendered.stats.overflow).astype(jnp.float32),
                   "raster_pairs": jnp.max(rendered.stats.n_pairs).astype(jnp.float32)}  # fmt: skip
        if weights.photometric > 0 and photo_frames > 0:
            k = photo_frames
            height, width = images.shape[1:3]

            def photometric(_) -> tuple[jax.Array, ...]:
                rendered = render_views(model.prior, z[:k], batch["scan_maps"][:k], rotation[:k], translation[:k],
                                        batch["world_to_cam"][:k], batch["intrinsics"][:k], width=width,
                                        height=height, capacity=capacity.value)  # fmt: skip
                masks, target = targets(batch["images"][:k], batch["masks"][:k])
                l1 = losses.masked_l1(rendered.rgb, target, masks + weights.background_weight * (1.0 - masks))
                psnr = jnp.mean(image_metrics.psnr(jnp.clip(rendered.rgb, 0.0, 1.0), target))
                stats = rendered.stats
                return l1, psnr, jnp.any(stats.overflow).astype(jnp.float32), jnp.max(stats.n_pairs).astype(jnp.float32)

            if weights.photometric_fraction >= 1.0:
                rendered_now, photo = jnp.ones(()), photometric(None)
            else:  # only this random share of the steps pays for rendering (and its gradient)
                rendered_now = (jax.random.uniform(photo_rng) < weights.photometric_fraction).astype(jnp.float32)
                photo = jax.lax.cond(rendered_now > 0, photometric, lambda _: (jnp.zeros(()),) * 4, None)
            terms["photometric"] = photo[0]
            aux = {"photo_rendered": rendered_now, "photo_psnr": photo[1],
                   "raster_overflow": jnp.maximum(photo[2], aux.get("raster_overflow", 0.0)),
                   "raster_pairs": jnp.maximum(photo[3], aux.get("raster_pairs", 0.0))}  # fmt: skip
        if model.localiser is not None:
            # Rig views, and the phone clips' frames where the step has them (a phone's lens and framing, as a
            # video file's are): each frame in `repeats` windows, augmented differently.
            fields = ("masks", "world_to_cam", "intrinsics")
            sources = [(images, *(batch[name] for name in fields), batch["head_translation"])]
            if phone_images is not None:
                sources.append((phone_images, *(batch[f"phone_{name}"] for name in fields),
                                batch["phone_translation"]))  # fmt: skip
            repeats, terms_of, weights_of = config.localiser.repeats, [], []
            for (seen, masks, world_to_cam, intrinsics, translation), rng_of in zip(
                sources, jax.random.split(localiser_rng, len(sources))
            ):  # fmt: skip
                centre = jnp.asarray(model.encoder.crop_centre, jnp.float32) + translation
                where = head_in_view(world_to_cam, intrinsics, centre, model.encoder.crop_extent)
                masks = jnp.tile(masks.astype(jnp.float32) / 255.0, (repeats, 1, 1))
                terms_of.append(localiser_loss(model.localiser, rng_of, jnp.tile(seen, (repeats, 1, 1, 1)), masks,
                                               jnp.tile(where, (repeats, 1)), config.localiser))  # fmt: skip
                weights_of.append(seen.shape[0])
            share = [w / sum(weights_of) for w in weights_of]  # every frame counts the same
            localiser = sum(s * value for s, (value, _) in zip(share, terms_of))
            found = {name: sum(s * f[name] for s, (_, f) in zip(share, terms_of)) for name in terms_of[0][1]}
            aux = aux | found | {"localiser": localiser}
            loss = config.localiser.weight * localiser
        else:
            loss = 0.0
        loss += sum(getattr(weights, name) * value for name, value in terms.items())
        return loss, terms | aux

    return loss_fn


# ------------------------------------------------------------------------------------- the stage


def train_encoder(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the MonoEncoder in `workdir` against the prior in `config.prior_workdir`."""
    workdir = Path(workdir)
    if not config.prior_workdir:
        raise ValueError("the encoder stage needs a trained prior: pass --config.prior_workdir=<prior workdir>")
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    prior, prior_cfg, template, prior_step = load_prior(config.prior_workdir, mesh)
    logger.info("prior: step %d of %s", prior_step, config.prior_workdir)
    data_cfg = dataset_lib.with_data_of(prior_cfg, config, "the encoder config's data")
    root = dataset_lib.dataset_root(data_cfg)
    records = dataset_lib.prepared_records(root, data_cfg)
    split = dataset_lib.read_split(root, records, 1)
    subjects = dataset_lib.subject_tables(root, records, prior.layout, template, prior_cfg)
    sequences, codes = code_targets(
        prior, prior_step, config.prior_workdir, root, records, subjects, split.held_in_cameras,
        config.data.code_batch_size, workdir / CODES_FILE,
    )  # fmt: skip
    multihost_utils.sync_global_devices("uhap encoder targets")
    tables = encoder_eval.Tables(codes, subjects.head_pose, subjects.first_record, subjects.scan_maps)
    train_codes = codes[split.train_records]
    mean_code, code_variance = train_codes.mean(0), float(train_codes.var(0).mean())
    evaluator = encoder_eval.make_evaluator(records, sequences, split.held_in_cameras, tables, prior, mean_code,
                                            config, root)  # fmt: skip

    encoder = build_encoder(config, prior)
    encoder.set_code_statistics(train_codes)  # it starts at the mean-code baseline
    model = EncoderWithPrior(encoder, prior, build_localiser(config))
    frames = loaders.multiview_loader(dataset_lib.train_frames(records, split), batch_sharding(mesh),
                                      dataset_lib.loader_options(config), num_views=1,
                                      serials=split.held_in_cameras)  # fmt: skip
    phone = phone_pool(root) if config.data.phone_frames > 0 else None
    if config.data.phone_frames > 0:
        logger.info("phone clips: %s", f"{len(phone['images'])} frames of the training identities' monocular "
                    "sequences teach the pose" if phone is not None else "none in this capture")  # fmt: skip
    video = config.data.phone_video

    def video_views(rows: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return as_video_file_views(rows, rng, extent=encoder.crop_extent, centre=encoder.crop_centre,
                                   centre_jitter=video.centre_jitter, size_jitter=video.size_jitter)  # fmt: skip

    data = EncoderBatches(frames, tables, mesh, phone, config.data.phone_frames, config.train.seed, video.share,
                          video_views)  # fmt: skip
    loss_fn = make_loss_fn(config, code_variance, evaluator.capacity)
    renders = config.loss.photometric > 0 and config.data.photo_frames > 0  # the Trainer grows the capacity then
    trainer = Trainer(config.train, model, make_optimizer(config), loss_fn, data, workdir, mesh=mesh,
                      capacity=evaluator.capacity if renders else None)  # fmt: skip
    if jax.process_index() == 0:
        info = {"prior_workdir": str(Path(config.prior_workdir).absolute()), "prior_step": prior_step,
                "z_dim": prior.z_dim, "held_in_cameras": split.held_in_cameras}  # fmt: skip
        (workdir / INFO_FILE).write_text(json.dumps(info, indent=1))
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()
