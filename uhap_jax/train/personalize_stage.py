"""Personalisation: a new person's avatar from a monocular video, by fine-tuning only the identity conditioning.

The frozen MonoEncoder gives every frame's expression code and head pose. The identity conditioning starts from
the person's neutral scan when one is given, else from the average identity (the prior's training scans' mean
geometry, or the template for older priors) with its albedo read off the video: the prior's albedo population
(`models.population`, its training identities) fitted to the texels the video shows (without one: each texel's
colour where the video shows it, its region's mean elsewhere).
Then only it is fitted, with the prior's photometric loss (masked L1 + SSIM, silhouette) on the video's frames:
the decoder's bias maps (free, from where the IdentityEncoder puts them for the start's UV maps), and optionally
the shape (a smooth deformation of the geometry across the camera's line of sight: per-axis scale and a coarse
3D displacement grid), the albedo map and the last decoder layers. Besides, a correction of the encoder's head
pose is fitted, which is no part of the avatar. Nothing else moves. The fine-tune runs in the one Trainer, so
it logs progress with an ETA, checkpoints, and resumes when run again with the same workdir.

The model pieces are `uhap_jax.models.personal`'s and the start `uhap_jax.models.identity_start`'s; the avatar
folder (`make_avatar`'s format plus the fitted bias maps) is written by `uhap_jax.artifacts.avatars.write_avatar`.

The video is a capture-layout folder (calibrated) or a plain video file: then `read_video` finds the head in each
frame with the encoder's head localiser and sets up per-frame virtual cameras from the file's intrinsics (a user
calibration, its metadata or a stated field of view), then moves them to where the encoder itself puts the head
(`recentred`), so the encoder's crop and pose apply as on the rig.

`heldout_quality` measures it: a held-out identity personalised from its monocular sequence alone, scored by
`uhap_jax.eval.personalize_eval` at the held-out cameras of its multi-view sequences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders, monocular, synth, video_file
from uhap_jax.artifacts import output_dirs
from uhap_jax.artifacts.avatars import write_avatar
from uhap_jax.artifacts.bundles import save_bundle
from uhap_jax.artifacts.priors import load_population, load_prior, restore_encoder_model, restore_speech
from uhap_jax.config_utils import UsageError
from uhap_jax.eval import personalize_eval
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import region_gaussian_ids
from uhap_jax.models import head_localiser, image_metrics, losses
from uhap_jax.models.identity_start import encode_video, identity_maps, video_albedo
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.personal import PersonalIdentity, PersonalModel
from uhap_jax.models.population import AlbedoPopulation
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import sized_capacity, targets
from uhap_jax.train.encoder_stage import INFO_FILE
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh
from uhap_jax.train.optimizer import make_optimizer

logger = logging.getLogger(__name__)

RUN_FILE = "personalize.json"
VIDEO_SERIAL = "video"  # the camera of a plain video file, in the avatar


# ------------------------------------------------------------------------------------- data and loss


@dataclasses.dataclass(frozen=True)
class VideoFrame(grain.transforms.Map):
    """A frame index -> its image, mask, the encoder's code and pose, and the camera."""

    video: monocular.MonoVideo
    codes: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray

    def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
        i = int(element)
        return {
            "images": self.video.images[i], "masks": self.video.masks[i], "has_mask": self.video.has_mask[i],
            "z": self.codes[i], "rotation": self.rotation[i], "translation": self.translation[i], "frame": np.int32(i),
            "world_to_cam": self.video.camera.world_to_cam.astype(np.float32),
            "intrinsics": self.video.camera.intrinsics.astype(np.float32),
        }  # fmt: skip


def frame_loader(video: monocular.MonoVideo, codes, rotation, translation, mesh,
                 options: loaders.LoaderOptions) -> loaders.GlobalBatchIterator:  # fmt: skip
    """Shuffled frames of the video, repeated, in global batches; its position goes into checkpoints."""
    frame = VideoFrame(video, codes, rotation, translation)
    return loaders.build_loader(grain.MapDataset.source(np.arange(len(video.images))), lambda d: d.map(frame),
                                batch_sharding(mesh), options)  # fmt: skip


def make_loss_fn(config: ml_collections.ConfigDict, capacity: kernels.AdaptiveCapacity):
    """`loss_fn(model, batch, rng)`: the prior's photometric loss on the video plus anchors to the start."""
    weights = config.loss

    def loss_fn(model: PersonalModel, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch_size, height, width = batch["images"].shape[:3]
        pixels = height * width
        scan = model.scan_maps()
        rotation, translation = model.head_pose(batch["frame"], batch["rotation"], batch["translation"])
        posed = model.prior.decode(batch["z"], jnp.broadcast_to(scan, (batch_size, *scan.shape)), rotation, translation)
        out = model.prior.render(posed, batch["world_to_cam"][:, None], batch["intrinsics"][:, None], width=width,
                                 height=height, capacity=capacity.value)  # fmt: skip
        rgb, alpha = out.rgb[:, 0], out.alpha[:, 0]
        masks, target = targets(batch["images"], batch["masks"])
        has_mask = batch["has_mask"][:, None, None]
        residuals = model.prior.identity_encoder.residuals
        terms = {
            "l1": losses.masked_l1(rgb, target, masks + weights.background_weight * (1.0 - masks)),
            "ssim": losses.ssim_loss(rgb, target),
            "silhouette": jnp.sum(has_mask * jnp.abs(alpha - masks)) / jnp.maximum(jnp.sum(has_mask) * pixels, 1.0),
            "bias_anchor": sum(jnp.mean(r[...] ** 2) for r in residuals) / len(residuals),
            "albedo_anchor": jnp.mean((model.albedo[...] - model.start_maps[...][..., 3:]) ** 2),
            "shape_anchor": jnp.mean(model.shape.grid[...] ** 2) + jnp.mean(model.shape.log_scale[...] ** 2),
            "mouth_anchor": jnp.mean(model.mouth[...] ** 2) if model.mouth is not None else jnp.zeros(()),
            "pose_anchor": jnp.mean(model.pose_correction[...] ** 2),
            "offset": losses.offset_regularizer(posed.offsets),
            "scale": losses.scale_regularizer(posed.scales, weights.max_scale),
        }
        loss = sum(getattr(weights, name) * value for name, value in terms.items())
        aux = dict(terms)
        aux["psnr"] = jnp.mean(image_metrics.psnr(jnp.clip(rgb, 0.0, 1.0), target))
        aux["raster_overflow"] = jnp.any(out.stats.overflow).astype(jnp.float32)
        aux["raster_pairs"] = jnp.max(out.stats.n_pairs).astype(jnp.float32)
        return loss, aux

    return loss_fn


# ------------------------------------------------------------------------------------- the fine-tune


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else np.asarray(value)
    return merged


def fit_identity(prior: UHAP, prior_cfg: ml_collections.ConfigDict, template: template_lib.Template,
                 encoder: MonoEncoder, video: monocular.MonoVideo, config: ml_collections.ConfigDict,
                 workdir: str | Path,                 scan=None, population: AlbedoPopulation | None = None,
                 ) -> tuple[PersonalIdentity, TrainResult]:  # fmt: skip
    """Fine-tunes the identity conditioning on the video in `workdir` (resuming from its checkpoints).

    `prior` is not modified. `scan` is `monocular.read_scan`'s (vertices, faces, colours, source) or None;
    `population` the prior's (`load_population`), for the albedo when there is no scan.
    """
    tune = config.tune
    if not (tune.bias_maps or tune.albedo or tune.shape or tune.mouth or tune.decoder_layers):
        raise ValueError(
            "personalize: tune.bias_maps, tune.albedo, tune.shape, tune.mouth and tune.decoder_layers are all off"
        )
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    codes, rotation, translation = encode_video(encoder, video, config.data.encode_batch_size)
    maps = identity_maps(prior, template, scan, population)
    if scan is None:
        logger.info("identity: no scan; starting from the average identity with the video's albedo")
        maps = video_albedo(prior, template, video, codes, rotation, translation, maps, config, population)
    base_params = jax.device_get(nnx.to_pure_dict(nnx.state(prior, nnx.Param)))
    probe = np.arange(min(len(video.images), config.data.batch_size))
    posed = prior.decode(codes[probe], np.broadcast_to(maps, (len(probe), *maps.shape)), rotation[probe],
                         translation[probe])  # fmt: skip
    capacity = sized_capacity(
        prior, posed, np.broadcast_to(video.camera.world_to_cam.astype(np.float32), (len(probe), 1, 4, 4)),
        np.broadcast_to(video.camera.intrinsics.astype(np.float32), (len(probe), 1, 3, 3)),
        width=video.images.shape[2], height=video.images.shape[1], headroom=config.render.capacity_headroom,
    )  # fmt: skip
    lips = np.zeros(prior.layout.num_gaussians, bool)
    lips[region_gaussian_ids(prior.layout, template, "lips")] = True
    if tune.mouth and not lips.any():
        logger.warning(
            "personalize: tune.mouth is on, but no Gaussian of the prior's %d² UV layout lies on a "
            "'lips' region of its template; the mouth's place is not fitted",
            prior.layout.resolution,
        )
        tune = ml_collections.ConfigDict({**tune.to_dict(), "mouth": False})
    model = PersonalModel(
        nnx.clone(prior), maps, tune, len(video.images), video.camera.world_to_cam[2, :3], lips if tune.mouth else None
    )
    options = dataset_lib.loader_options(config)
    data = frame_loader(video, codes, rotation, translation, mesh, options)
    logger.info("personalising %s from %d frames of camera %s (%s)", video.subject, len(video.images),
                video.camera.serial, "scan" if scan is not None else "no scan")  # fmt: skip
    trainer = Trainer(config.train, model, make_optimizer(config), make_loss_fn(config, capacity), data,
                      workdir, mesh=mesh, capacity=capacity)  # fmt: skip
    try:
        result = trainer.run()
        trained = trainer.eval_model
    finally:
        trainer.close()
    if tune.mouth:
        shift = 1e3 * np.asarray(trained.mouth_shift())
        logger.info("%s: mouth shifted (%+.1f, %+.1f, %+.1f) mm (head x, y, z)", video.subject, *shift)
    tuned = jax.device_get(nnx.to_pure_dict(nnx.state(trained.prior, nnx.Param)))
    tuned.pop("identity_encoder", None)
    identity = PersonalIdentity(
        bias_maps=[np.asarray(b) for b in jax.device_get(trained.bias_maps())],
        scan_maps=np.asarray(trained.scan_maps()), start_scan_maps=np.asarray(maps),
        prior_params=_merge(base_params, tuned),
    )  # fmt: skip
    return identity, result


# ------------------------------------------------------------------------------------- a plain video file


def read_video(path: str | Path, localiser: head_localiser.HeadLocaliser | None, encoder: MonoEncoder,
               config: ml_collections.ConfigDict) -> tuple[monocular.MonoVideo, str]:  # fmt: skip
    """A video file as a MonoVideo (no masks) with per-frame virtual cameras where the localiser found the head,
    recentred `config.video.recentre` times by the encoder, and where its intrinsics came from
    (`data_pipelines.video_file`). `localiser` None (an encoder trained without one) and a video where no frame
    shows a head are UsageErrors that say what to do."""
    path = Path(path)
    if localiser is None:
        raise UsageError(f"--video {path}: a video file needs the encoder's head localiser, and this encoder was "
                         "trained without one; train it again with `uhap train encoder` (localiser.enabled=True) "
                         "or give a capture-layout folder")  # fmt: skip
    options = config.video
    clip = video_file.read_video_file(path, fps=options.fps, max_frames=config.max_frames, max_side=options.max_side,
                                      fov_deg=options.fov_deg, calibration=options.calibration,
                                      camera=config.camera)  # fmt: skip
    found, presence = head_localiser.localise(localiser, clip.images, config.data.encode_batch_size)
    if not np.any(presence >= options.min_presence):
        raise UsageError(f"--video {path}: no face found in any of its {len(clip.images)} frames (best presence "
                         f"{presence.max():.2f}); give a clip where the face is visible and lit")  # fmt: skip
    track = head_localiser.smooth_track(found, presence, options.smooth_frames, options.min_presence)
    views = head_localiser.head_cameras(clip.intrinsics, track, encoder.crop_extent, encoder.crop_centre)
    reference = _reference_of(views)
    height, width = clip.images.shape[1:3]
    logger.info("%s: %d frames %dx%d at %.3g fps (file: %.3g fps, rotation %g); intrinsics from %s; head found in "
                "%d of them, %.0f px across", path, len(clip.images), width, height, clip.fps, clip.source_fps,
                clip.rotation_deg, clip.intrinsics_source, int(np.sum(presence >= options.min_presence)),
                float(np.median(track[:, 2])))  # fmt: skip
    camera = layout.Camera(VIDEO_SERIAL, reference, clip.intrinsics, width, height)
    count = len(clip.images)
    video = monocular.MonoVideo(path.stem, path, camera, clip.fps,
                                tuple((path.name, int(i)) for i in clip.frame_index), clip.images,
                                np.full((count, height, width), 255, np.uint8), np.zeros(count, np.float32),
                                views)  # fmt: skip
    for _ in range(options.recentre):
        video = recentred(video, encoder, options.smooth_frames, config.data.encode_batch_size)
    return video, clip.intrinsics_source


def recentred(video: monocular.MonoVideo, encoder: MonoEncoder, smooth_frames: int,
              batch_size: int) -> monocular.MonoVideo:  # fmt: skip
    """A video file's virtual cameras moved to where the encoder, looking through them, puts the head (its
    translation, smoothed over `smooth_frames`): the localiser's box is coarse (its size 8-42% off on the demo's
    held-out phone clips), and the encoder reads the pose best in crops framed as in its training, where the head
    sits at the crop's centre and size."""
    _, _, translation = encode_video(encoder, video, batch_size)
    reference = video.camera.world_to_cam
    # The head centre (the world point the crop frames, moved with the head) in camera space, as the track the
    # localiser gives and `head_cameras` takes.
    centre = np.asarray(encoder.crop_centre, np.float64) + translation
    head = centre @ reference[:3, :3].T + reference[:3, 3]
    k = video.camera.intrinsics
    track = head_localiser.head_track(k, head, encoder.crop_extent)
    track = head_localiser.smooth_track(track, np.ones(len(track)), smooth_frames, 0.5)
    views = head_localiser.head_cameras(k, track, encoder.crop_extent, encoder.crop_centre)
    camera = dataclasses.replace(video.camera, world_to_cam=_reference_of(views))
    return dataclasses.replace(video, camera=camera, frame_world_to_cam=views)


def _reference_of(views: np.ndarray) -> np.ndarray:
    """The video's camera: the virtual cameras' shared orientation at their median position."""
    reference = views[0].copy()
    reference[:3, 3] = np.median(views[:, :3, 3], 0)
    return reference


# ------------------------------------------------------------------------------------- the avatar and its quality


def _claim_workdir(workdir: Path, inputs: dict) -> None:
    """A workdir resumes only the run it was started for (the same video, camera, prior, encoder, scan and what is
    tuned: the parameters a checkpoint holds), and a new run starts only in a missing or empty folder."""
    run_file = workdir / RUN_FILE
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        if before != inputs:
            changed = sorted(k for k in inputs if before.get(k) != inputs[k])
            raise ValueError(f"{run_file}: this workdir holds a personalisation with other inputs ({changed}); "
                             "delete it or pass another workdir")  # fmt: skip
        return
    output_dirs.check_resumable(workdir, RUN_FILE, "uhap personalize")  # a user's files: metrics.jsonl would overwrite
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(inputs, indent=1))


@dataclasses.dataclass(frozen=True)
class PersonalizeResult:
    """The avatar folder (None when preempted: run again to resume), where the fine-tune stopped, its workdir."""

    avatar: Path | None
    step: int
    preempted: bool
    workdir: Path
    metrics: dict[str, float]


def fine_tune_workdir(
    out_avatar: str | Path, config: ml_collections.ConfigDict, workdir: str | Path | None = None
) -> Path:
    """Where the fine-tune runs: `workdir`, else `config.workdir`, else `<out_avatar>.work`."""
    return Path(workdir or config.workdir or f"{out_avatar}.work")


def personalize(prior: str | Path, encoder_workdir: str | Path, video_dir: str | Path, out_avatar: str | Path,
                config: ml_collections.ConfigDict, *, audio_workdir: str | Path,
                workdir: str | Path | None = None) -> PersonalizeResult:  # fmt: skip
    """A personalised avatar folder from a monocular video: encoder codes, identity fine-tune, speech model.

    `prior` is a prior workdir or bundle, `encoder_workdir` a `uhap train encoder` workdir, `audio_workdir` a
    `uhap train audio` workdir. The fine-tune runs in `fine_tune_workdir(out_avatar, config, workdir)` and resumes
    from it.
    """
    out = Path(out_avatar)
    workdir = fine_tune_workdir(out, config, workdir)
    base, prior_cfg, template, prior_step = load_prior(prior)
    restored, encoder_step = restore_encoder_model(encoder_workdir, base)
    encoder = restored.encoder
    info_file = Path(encoder_workdir) / INFO_FILE
    if info_file.is_file() and json.loads(info_file.read_text()).get("prior_step") != prior_step:
        logger.warning("%s: the encoder was trained against another prior step than %s's %d; its codes may be off",
                       info_file, prior, prior_step)  # fmt: skip
    if Path(video_dir).is_file():
        video, intrinsics_source = read_video(video_dir, restored.localiser, encoder, config)
    else:
        video = monocular.read_monocular(video_dir, config.camera, tuple(config.sequences), config.max_frames)
        intrinsics_source = f"calibration: {video.subject_dir / layout.CALIBRATION_FILE}"
    scan = monocular.read_scan(config, video)
    speech, speech_step = restore_speech(audio_workdir, nnx.clone(base), video.fps)
    if speech.config.latent_dim != base.z_dim:
        raise ValueError(f"{audio_workdir}: the speech model predicts {speech.config.latent_dim}-d codes, the prior "
                         f"{prior} takes {base.z_dim}")  # fmt: skip
    sources = {"prior": str(Path(prior).absolute()), "encoder": str(Path(encoder_workdir).absolute()),
               "speech": str(Path(audio_workdir).absolute()), "video": str(Path(video_dir).absolute())}  # fmt: skip
    _claim_workdir(workdir, {**sources, "camera": video.camera.serial, "frames": [list(f) for f in video.frames],
                             "scan": scan[3] if scan is not None else None, "prior_step": prior_step,
                             "encoder_step": encoder_step, "intrinsics": intrinsics_source,
                             "tune": config.tune.to_dict()})  # fmt: skip
    identity, result = fit_identity(base, prior_cfg, template, encoder, video, config, workdir, scan,
                                    load_population(prior))  # fmt: skip
    if result.preempted:
        logger.warning("preempted at step %d: run the same command again to resume from %s", result.step, workdir)
        return PersonalizeResult(None, result.step, True, workdir, result.metrics)
    details = {"frames": len(video.images), "camera": video.camera.serial, "intrinsics": intrinsics_source,
               "head_placed": "calibration" if video.frame_world_to_cam is None else "head localiser",
               "scan": scan is not None,
               "steps": result.step, "prior_step": prior_step, "encoder_step": encoder_step,
               "tuned": config.tune.to_dict()}  # fmt: skip
    bundle = {"kind": "uhap_prior", "step": prior_step, "dtype": "float32", "source": sources["prior"],
              "personalized": True}  # fmt: skip
    manifest = {
        "kind": "uhap_avatar", "subject": video.subject, "fps": video.fps,
        "image_size": [int(config.image_size)] * 2, "speech_step": speech_step, "sources": sources,
        "personalized": details,
    }  # fmt: skip
    inputs = [*(v for v in sources.values() if isinstance(v, str)), video.subject_dir]
    written = write_avatar(out, lambda folder: save_bundle(identity.prior_params, prior_cfg, template, folder, bundle),
                           identity.scan_maps, identity.bias_maps, speech, [video.camera], manifest,
                           inputs=inputs)  # fmt: skip
    logger.info("wrote %s", written)
    return PersonalizeResult(written, result.step, False, workdir, result.metrics)


def heldout_quality(prior_workdir: str | Path, encoder_workdir: str | Path, config: ml_collections.ConfigDict,
                    workdir: str | Path, *, subject: str | None = None,
                    as_file: str = "") -> dict[str, float]:  # fmt: skip
    """Personalises a held-out identity from its monocular sequence only (no scan) and scores held-out views
    (`uhap_jax.eval.personalize_eval.heldout_metrics`), with the video's frame count and the fine-tune's steps.
    The fine-tune runs in `workdir` (resumable); codes are cached there.

    `as_file` "metadata" or "fov": the sequence is written to `<workdir>/<sequence>.mp4` at its frame rate, with
    its 35 mm-equivalent focal length in the metadata as a phone writes it ("metadata") or without
    (`config.video.fov_deg` then gives the intrinsics), and read through the video-file path (`read_video`), its
    calibration withheld."""
    workdir = Path(workdir)
    base, prior_cfg, template, prior_step = load_prior(prior_workdir)
    restored, _ = restore_encoder_model(encoder_workdir, base)
    encoder = restored.encoder
    root = dataset_lib.dataset_root(prior_cfg)
    records = dataset_lib.prepared_records(root, prior_cfg)
    split = dataset_lib.read_split(root, records, 1)
    subject = subject or layout.read_dataset_info(root)["identities"]["held_out"][0]
    mono = ml_collections.ConfigDict(config.to_dict())
    mono.use_scan, mono.scan = False, ""
    mono.camera = config.camera or synth.MONO_SERIAL
    video = monocular.read_monocular(layout.subject_dir(root, subject), mono.camera, tuple(mono.sequences),
                                     mono.max_frames)  # fmt: skip
    if as_file:
        if as_file not in ("metadata", "fov"):
            raise ValueError(f"as_file must be 'metadata' or 'fov', got {as_file!r}")
        clip = workdir / f"{video.frames[0][0]}_{as_file}.mp4"
        if not clip.is_file():
            workdir.mkdir(parents=True, exist_ok=True)
            everything = monocular.read_monocular(video.subject_dir, mono.camera, (video.frames[0][0],))
            camera = everything.camera
            focal = video_file.focal_35mm_of(camera.intrinsics, camera.width, camera.height)
            focal = focal if as_file == "metadata" else None
            video_file.write_video_file(clip, everything.images, everything.fps, focal_mm_35=focal)
        video, _ = read_video(clip, restored.localiser, encoder, mono)
    identity, result = fit_identity(base, prior_cfg, template, encoder, video, mono, workdir, None,
                                    load_population(prior_workdir))  # fmt: skip
    if result.preempted:
        raise RuntimeError(f"preempted at step {result.step}: run again to resume from {workdir}")
    metrics = personalize_eval.heldout_metrics(base, prior_cfg, template, prior_step, prior_workdir, identity, root,
                                               records, split, subject, config, workdir)  # fmt: skip
    return metrics | {"personalize/frames": float(len(video.images)), "personalize/steps": float(result.step)}
