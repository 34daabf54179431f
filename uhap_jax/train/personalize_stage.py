"""Personalisation: a new person's avatar from a monocular video, by fine-tuning only the identity conditioning.

The frozen MonoEncoder gives every frame's expression code and head pose. The identity conditioning starts from
the person's neutral scan when one is given, else from the template as the average identity with its albedo
read off the video: the prior's albedo population (`models.population`, its training identities) fitted to the
texels the video shows (without one: each texel's colour where the video shows it, its region's mean elsewhere).
Then only it is fitted, with the prior's photometric loss (masked L1 + SSIM, silhouette) on the video's frames:
the decoder's bias maps (free, from where the IdentityEncoder puts them for the start's UV maps), and optionally
the shape (a smooth deformation of the geometry across the camera's line of sight: per-axis scale and a coarse
3D displacement grid), the albedo map and the last decoder layers. Besides, a correction of the encoder's head
pose is fitted, which is no part of the avatar. Nothing else moves. The fine-tune runs in the one Trainer, so
it logs progress with an ETA, checkpoints, and resumes when run again with the same workdir.

A personalised avatar folder is `make_avatar`'s, plus `identity/bias_maps.npz` (`bias_<i>`, one map per
decoder block, coarse to fine) that stands in for the IdentityEncoder; `identity/scan_maps.npy` holds the
fitted UV maps, and `prior/` a bundle whose decoder holds the tuned layers. `attach_identity` puts the bias
maps into a loaded prior (`IdentityBias` replaces its IdentityEncoder); `load_avatar` should call it (until it
does, `load_personalized_avatar` is load_avatar plus that).

`heldout_quality` measures it: a held-out identity personalised from its monocular sequence alone, rendered at
the held-out cameras of its multi-view sequences (the prior's codes from its held-in views, as the audio stage
computes them, and the true head pose), against the same for the prior given that identity's true scan, and
for the prior on its training identities.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import kernels
from data_pipelines import layout, loaders, synth
from uhap_jax import export
from uhap_jax.artifacts import output_dirs
from uhap_jax.config_utils import save_config
from uhap_jax.eval import image_metrics
from uhap_jax.geometry import template as template_lib
from uhap_jax.inference import avatar as avatar_lib
from uhap_jax.models import losses
from uhap_jax.models.audio_to_latent import FrozenParam, freeze
from uhap_jax.models.mono_encoder import MonoEncoder
from uhap_jax.models.population import POPULATION_FILE, AlbedoPopulation
from uhap_jax.models.prior import UHAP, scan_uv_maps
from uhap_jax.train import encoder_stage, prior_stage
from uhap_jax.train.encoder_stage import grow_capacity, probe_capacity, targets
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh

logger = logging.getLogger(__name__)

BIAS_MAPS_FILE = Path("identity") / "bias_maps.npz"
RUN_FILE = "personalize.json"
POSE_MODES = ("none", "video", "frame")


# ------------------------------------------------------------------------------------- the identity conditioning


class IdentityBias(nnx.Module):
    """Stands in for the IdentityEncoder: one person's bias maps, whatever scan maps come in."""

    def __init__(self, maps: list[np.ndarray]):
        self.maps = nnx.List([nnx.Param(jnp.asarray(m, jnp.float32)) for m in maps])

    def __call__(self, scan_maps: jax.Array) -> list[jax.Array]:
        batch = scan_maps.shape[0]
        return [jnp.broadcast_to(m[...], (batch, *m[...].shape)) for m in self.maps]


def bias_shapes(prior: UHAP) -> list[tuple[int, ...]]:
    """The shape [r, r, c] of each bias map that the prior's decoder takes, coarse to fine."""
    resolution = prior.layout.resolution
    scan = jax.ShapeDtypeStruct((1, resolution, resolution, 6), jnp.float32)
    return [tuple(s.shape[1:]) for s in jax.eval_shape(lambda maps: prior.identity_encoder(maps), scan)]


def attach_identity(prior: UHAP, avatar_dir: str | Path) -> UHAP:
    """`prior` with the avatar's `identity/bias_maps.npz` in place of its IdentityEncoder (in place; returned).

    An avatar without that file (`make_avatar`) leaves the prior as it is.
    """
    path = Path(avatar_dir) / BIAS_MAPS_FILE
    if not path.is_file() or isinstance(prior.identity_encoder, IdentityBias):
        return prior
    expected = bias_shapes(prior)
    try:
        with np.load(path, allow_pickle=False) as stored:
            maps = [stored[f"bias_{i}"] for i in range(len(expected))]
            extra = sorted(set(stored.files) - {f"bias_{i}" for i in range(len(expected))})
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path}: needs arrays bias_0..bias_{len(expected) - 1} for the prior ({error})") from error
    shapes = [tuple(m.shape) for m in maps]
    if shapes != expected or extra or not all(np.all(np.isfinite(m)) for m in maps):
        raise ValueError(f"{path}: bias maps {shapes} (extra {extra}) do not fit the prior's decoder, which takes "
                         f"finite maps {expected}")  # fmt: skip
    prior.identity_encoder = IdentityBias(maps)
    return prior


def load_personalized_avatar(path: str | Path) -> avatar_lib.Avatar:
    """`load_avatar`, with a personalised avatar's bias maps attached (what load_avatar does once patched)."""
    avatar = avatar_lib.load_avatar(path)
    return dataclasses.replace(avatar, prior=attach_identity(avatar.prior, path))


def _set_variables(module: nnx.Module, source: type, target: type) -> None:
    """Every `source` variable under `module` becomes a `target` variable holding the same value, in place."""
    for path, variable in list(nnx.iter_graph(module)):
        if type(variable) is source:
            parent = module
            for name in path[:-1]:
                parent = parent[name] if isinstance(name, int) else getattr(parent, name)
            if isinstance(path[-1], int):
                parent[path[-1]] = target(variable.get_value())
            else:
                setattr(parent, path[-1], target(variable.get_value()))


def tuned_layers(prior: UHAP, count: int) -> list[nnx.Module]:
    """The last `count` decoder layers: 1 is the output conv and the colour MLP; k adds the last k - 1 UpBlocks."""
    blocks = list(prior.decoder.blocks)
    if not 0 <= count <= len(blocks) + 1:
        raise ValueError(f"tune.decoder_layers must be in 0..{len(blocks) + 1} for this prior, got {count}")
    if count == 0:
        return []
    return [prior.decoder.out, prior.color_hidden, prior.color_out, *blocks[len(blocks) - (count - 1) :]]


class ResidualIdentity(nnx.Module):
    """The IdentityEncoder's bias maps for the start's UV maps, fixed, plus free residual maps (from zero).

    The bias maps are free parameters that start where the IdentityEncoder puts them. They are not recomputed
    from a fitted shape or albedo: through the IdentityEncoder those would become levers on the decoder's colours
    and opacities, pulled to fit the one view rather than to describe the person.
    """

    def __init__(self, start: list[jax.Array], trainable: bool):
        self.start = nnx.List([FrozenParam(jnp.asarray(b, jnp.float32)) for b in start])
        kind = nnx.Param if trainable else FrozenParam
        self.residuals = nnx.List([kind(jnp.zeros(b.shape, jnp.float32)) for b in start])

    def __call__(self, scan_maps: jax.Array) -> list[jax.Array]:
        batch = scan_maps.shape[0]
        return [jnp.broadcast_to(b[...] + r[...], (batch, *b.shape)) for b, r in zip(self.start, self.residuals)]


class ShapeField(nnx.Module):
    """A smooth deformation of the start geometry [N, 3] (metres): a per-axis scale about the head centre (the
    origin) and displacements on a coarse 3D grid over the head (trilinear, in units of `offset_scale`).

    Heads differ from one another smoothly; per-texel offsets fitted to one view would bend what it does not see.
    With `view_axis` (the camera's optical axis, world), the deformation keeps only its part across that axis:
    depth is what one view does not show, and fitted, it drifts (-4 dB held-out-view PSNR on the tiny data).
    """

    def __init__(self, points: np.ndarray, grid: int, offset_scale: float, trainable: bool,
                 view_axis: np.ndarray | None = None):  # fmt: skip
        if grid == 1 or grid < 0:
            raise ValueError(f"tune.shape_grid must be 0 (scale only) or >= 2, got {grid}")
        points = np.asarray(points, np.float32)
        pad = 0.05 * (points.max(0) - points.min(0))
        self.lo = tuple(float(x) for x in points.min(0) - pad)
        self.hi = tuple(float(x) for x in points.max(0) + pad)
        self.offset_scale = float(offset_scale)
        self.points = FrozenParam(jnp.asarray(points))
        kind = nnx.Param if trainable else FrozenParam
        self.log_scale = kind(jnp.zeros(3, jnp.float32))
        axis = np.zeros(3) if view_axis is None else np.asarray(view_axis, np.float64) / np.linalg.norm(view_axis)
        self.view_axis = tuple(float(a) for a in axis)
        self.use_grid = grid >= 2
        self.grid = (kind if self.use_grid else FrozenParam)(jnp.zeros((max(grid, 1),) * 3 + (3,), jnp.float32))

    def __call__(self) -> jax.Array:
        points, grid = self.points[...], self.grid[...]
        axis = jnp.asarray(self.view_axis, points.dtype)
        across = lambda d: d - (d @ axis)[:, None] * axis  # noqa: E731
        scaled = (jnp.exp(self.log_scale[...]) - 1.0) * points
        if not self.use_grid:
            return across(scaled)
        lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
        coords = ((points - lo) / (hi - lo) * (grid.shape[0] - 1)).T
        moved = jnp.stack(
            [jax.scipy.ndimage.map_coordinates(grid[..., c], list(coords), order=1, mode="nearest") for c in range(3)],
            -1,
        )
        return across(scaled + self.offset_scale * moved)


class PersonalModel(nnx.Module):
    """The prior, frozen but for its identity conditioning (bias maps; optionally the shape, the albedo map and
    the last decoder layers: `tune`), with a correction of the encoder's head pose beside it."""

    ROTATION_UNIT, TRANSLATION_UNIT = 0.1, 0.01  # radians and metres per unit of the pose correction

    def __init__(self, prior: UHAP, scan_maps: np.ndarray, tune: ml_collections.ConfigDict, num_frames: int,
                 view_axis: np.ndarray | None = None):  # fmt: skip
        if tune.pose not in POSE_MODES:
            raise ValueError(f"tune.pose must be one of {POSE_MODES}, got {tune.pose!r}")
        scan_maps = jnp.asarray(scan_maps, jnp.float32)
        start = [b[0] for b in prior.identity_encoder(scan_maps[None])]
        freeze(prior)
        for layer in tuned_layers(prior, tune.decoder_layers):
            _set_variables(layer, FrozenParam, nnx.Param)
        prior.identity_encoder = ResidualIdentity(start, tune.bias_maps)
        self.prior = prior
        self.start_maps = FrozenParam(scan_maps)
        points = prior.template_points[...] + prior.layout.gather(scan_maps)[:, :3]
        self.shape = ShapeField(np.asarray(points), tune.shape_grid, prior.offset_scale, tune.shape, view_axis)
        self.albedo = (nnx.Param if tune.albedo else FrozenParam)(scan_maps[..., 3:])
        # Not identity, and not stored in the avatar: a correction of the encoder's head pose, for the whole video
        # or per frame, so that the shape need not absorb the encoder's pose errors.
        self.per_frame_pose = tune.pose == "frame"
        pose_rows = num_frames if self.per_frame_pose else 1
        self.pose_correction = (FrozenParam if tune.pose == "none" else nnx.Param)(jnp.zeros((pose_rows, 6)))

    def head_pose(self, frame: jax.Array, rotation: jax.Array, translation: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The encoder's head pose of frames [B] with the fitted correction."""
        correction = self.pose_correction[...][frame if self.per_frame_pose else jnp.zeros_like(frame)]
        return (rotation + self.ROTATION_UNIT * correction[:, :3],
                translation + self.TRANSLATION_UNIT * correction[:, 3:])  # fmt: skip

    def scan_maps(self) -> jax.Array:
        """The identity's UV maps [R, R, 6]: the start's offsets moved by the shape field, and the albedo."""
        rows, cols = self.prior.layout.texel_yx[:, 0], self.prior.layout.texel_yx[:, 1]
        offsets = self.start_maps[...][..., :3].at[rows, cols].add(self.shape())
        return jnp.concatenate([offsets, self.albedo[...]], -1)

    def bias_maps(self) -> list[jax.Array]:
        """The decoder's bias maps [r, r, c] for the current identity, coarse to fine."""
        return [b[0] for b in self.prior.identity_encoder(self.scan_maps()[None])]


# ------------------------------------------------------------------------------------- inputs


def load_prior(path: str | Path, mesh=None) -> tuple[UHAP, ml_collections.ConfigDict, template_lib.Template, int]:
    """A prior from a training workdir (latest checkpoint) or an inference bundle: model, config, template, step."""
    path = Path(path)
    if (path / export.BUNDLE_FILE).is_file():
        prior, config = export.load_bundle(path, mesh)
        step = int(json.loads((path / export.BUNDLE_FILE).read_text()).get("step", 0))
        return prior, config, export.load_template(path / "template.npz"), step
    if (path / "checkpoints").is_dir():
        prior, config, step = export.restore_prior(path, mesh)
        return prior, config, template_lib.procedural_head(config.model.template_resolution), step
    raise FileNotFoundError(f"{path}: neither a prior workdir (checkpoints/) nor an inference bundle (bundle.json)")


def load_population(path: str | Path) -> AlbedoPopulation | None:
    """The albedo population beside a prior workdir's checkpoints or in its bundle (None, with a warning, for a
    prior trained before the prior stage wrote one)."""
    file = Path(path) / POPULATION_FILE
    if file.is_file():
        return AlbedoPopulation.load(file)
    logger.warning("%s: missing; without a scan the albedo is the video's alone (each region's mean where unseen)",
                   file)  # fmt: skip
    return None


@dataclasses.dataclass(frozen=True)
class MonoVideo:
    """The frames of one camera, from one or more sequences of a subject, in memory."""

    subject: str
    subject_dir: Path
    camera: layout.Camera
    fps: float
    frames: tuple[tuple[str, int], ...]  # (sequence, frame index) of each frame
    images: np.ndarray  # [F, H, W, 3] uint8
    masks: np.ndarray  # [F, H, W] uint8, 255 where the sequence has no masks
    has_mask: np.ndarray  # [F] float32


def _camera_folders(seq_dir: Path) -> list[str]:
    return sorted(p.name.removeprefix("cam_") for p in (seq_dir / "images").glob("cam_*") if p.is_dir())


def _check_frames(seq_dir: Path, serial: str, num_frames: int, kind: str) -> None:
    for index in range(num_frames):
        path = layout.frame_path(seq_dir, serial, index, kind=kind)
        if not path.is_file():
            raise layout.LayoutError(f"{path}: missing ({kind[:-1]} {index} of the {num_frames} that meta.json says)")
    found = len(layout.frame_paths(seq_dir, serial, kind=kind))
    if found != num_frames:
        raise layout.LayoutError(f"{seq_dir / kind / f'cam_{serial}'}: {found} frames, but meta.json says {num_frames}")


def read_monocular(video_dir: str | Path, camera: str = "", sequences: tuple[str, ...] = (),
                   max_frames: int = 0) -> MonoVideo:  # fmt: skip
    """A capture-layout subject folder (all sequences of `camera`) or one sequence folder, checked and loaded.

    `camera` "" takes the sequences with a single camera folder. A missing camera, frame or calibration entry
    is a `LayoutError` that names the path.
    """
    video_dir = Path(video_dir)
    if (video_dir / "images").is_dir():
        if video_dir.parent.name != "sequences":
            raise layout.LayoutError(f"{video_dir}: a sequence folder must sit in <subject>/sequences/")
        subject_dir, names = video_dir.parent.parent, [video_dir.name]
    elif (video_dir / "sequences").is_dir():
        subject_dir, names = video_dir, layout.list_sequences(video_dir)
    else:
        raise layout.LayoutError(f"{video_dir}: neither a capture-layout subject folder (calibration/, sequences/) "
                                 "nor a sequence folder (images/cam_<serial>/)")  # fmt: skip
    if sequences:
        missing = sorted(set(sequences) - set(names))
        if missing:
            raise layout.LayoutError(f"{video_dir}: no sequences {missing} (has {names})")
        names = [n for n in names if n in sequences]
    seq_dirs = {n: subject_dir / "sequences" / n for n in names}
    if camera:
        chosen = [n for n in names if camera in _camera_folders(seq_dirs[n])]
        if not chosen:
            looked = ", ".join(str(seq_dirs[n] / "images" / f"cam_{camera}") for n in names)
            raise layout.LayoutError(f"{video_dir}: no sequence has images of camera {camera!r} (looked for {looked})")
    else:
        chosen = [n for n in names if len(_camera_folders(seq_dirs[n])) == 1]
        serials = sorted({_camera_folders(seq_dirs[n])[0] for n in chosen})
        if not serials:
            raise layout.LayoutError(f"{video_dir}: no monocular sequence (one images/cam_<serial> folder) among "
                                     f"{names}; name the camera with camera=<serial>")  # fmt: skip
        if len(serials) > 1:
            raise layout.LayoutError(f"{video_dir}: monocular sequences of several cameras {serials}; name one")
        camera = serials[0]
    calibration = layout.read_calibration(subject_dir)
    if camera not in calibration:
        raise layout.LayoutError(f"{subject_dir / layout.CALIBRATION_FILE}: no camera {camera!r} (has "
                                 f"{sorted(calibration)})")  # fmt: skip
    chosen_camera = calibration[camera]
    frames, has_masks, rates = [], {}, set()
    for name in chosen:
        seq_dir = seq_dirs[name]
        meta = layout.read_sequence_meta(seq_dir)
        rates.add(float(meta["fps"]))
        _check_frames(seq_dir, camera, meta["num_frames"], "images")
        has_masks[name] = (seq_dir / "masks" / f"cam_{camera}").is_dir()
        if has_masks[name]:
            _check_frames(seq_dir, camera, meta["num_frames"], "masks")
        frames += [(name, i) for i in range(meta["num_frames"])]
    if len(rates) != 1:
        raise layout.LayoutError(f"{video_dir}: the sequences' meta.json give different fps {sorted(rates)}")
    if max_frames and len(frames) > max_frames:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    images, masks = [], []
    size = (chosen_camera.height, chosen_camera.width)
    for name, index in frames:
        path = layout.frame_path(seq_dirs[name], camera, index)
        image = layout.read_image(path)
        if image.shape != (*size, 3):
            raise layout.LayoutError(f"{path}: image of shape {list(image.shape)}, calibration says {[*size, 3]}")
        images.append(image)
        if has_masks[name]:
            mask_path = layout.frame_path(seq_dirs[name], camera, index, kind="masks")
            mask = layout.read_image(mask_path)
            if mask.shape != size:
                raise layout.LayoutError(
                    f"{mask_path}: mask of shape {list(mask.shape)}, calibration says {list(size)}"
                )
            masks.append(mask)
        else:
            masks.append(np.full(size, 255, np.uint8))
    return MonoVideo(
        subject_dir.name, subject_dir, chosen_camera, rates.pop(), tuple(frames), np.stack(images), np.stack(masks),
        np.asarray([has_masks[name] for name, _ in frames], np.float32),
    )  # fmt: skip


def read_scan(config: ml_collections.ConfigDict, video: MonoVideo) -> tuple[np.ndarray, ...] | None:
    """The neutral scan to start from: `config.scan`, else the subject's own when `use_scan`, else None."""
    if config.scan:
        path = Path(config.scan)
        if (path / layout.SCAN_DIR).is_dir():
            return (*layout.read_neutral_scan(path), str(path / layout.SCAN_DIR))
        if path.name == layout.SCAN_DIR:
            return (*layout.read_neutral_scan(path.parent), str(path))
        raise layout.LayoutError(f"{path}: scan must be a neutral_scan folder or a subject folder holding one")
    if config.use_scan and (video.subject_dir / layout.SCAN_DIR).is_dir():
        return (*layout.read_neutral_scan(video.subject_dir), str(video.subject_dir / layout.SCAN_DIR))
    return None


def encode_video(encoder: MonoEncoder, video: MonoVideo, batch_size: int) -> tuple[np.ndarray, ...]:
    """The MonoEncoder's code [F, z_dim], rotation vector and translation [F, 3] of every frame."""
    graphdef, state = nnx.split(encoder)
    run = jax.jit(lambda state, images, views, ks: nnx.merge(graphdef, state)(images / 255.0, views, ks))
    count = len(video.images)
    views = np.broadcast_to(video.camera.world_to_cam.astype(np.float32), (batch_size, 4, 4))
    ks = np.broadcast_to(video.camera.intrinsics.astype(np.float32), (batch_size, 3, 3))
    outputs = []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), count - 1)
        outputs.append(jax.device_get(run(state, video.images[index].astype(np.float32), views, ks)))
    return tuple(np.concatenate([o[i] for o in outputs])[:count] for i in range(3))


def texel_regions(prior: UHAP, template: template_lib.Template) -> np.ndarray:
    """Each Gaussian's template region id (of its texel's nearest face vertex)."""
    nearest_vertex = template.faces[prior.layout.face_ids, np.argmax(prior.layout.barys, axis=1)]
    return template.region_ids[nearest_vertex]


def template_maps(prior: UHAP, template: template_lib.Template, albedo: float = 0.5) -> np.ndarray:
    """The template itself as a neutral scan: no geometry offset, a flat albedo."""
    colours = np.full(template.vertices.shape, albedo, np.float32)
    return scan_uv_maps(prior.layout, template, template.vertices, colours, "the template")


def video_albedo(prior: UHAP, template: template_lib.Template, video: MonoVideo, codes: np.ndarray,
                 rotation: np.ndarray, translation: np.ndarray, maps: np.ndarray, config: ml_collections.ConfigDict,
                 population: AlbedoPopulation | None = None) -> np.ndarray:  # fmt: skip
    """`maps` with the albedo read off the video. Each Gaussian's colour is its mean over the frames where it is
    the visible surface (its depth within `depth_tolerance` of the rendered depth, inside the mask), read for those
    seen in at least `min_seen` of them. With a `population`, the albedo is its MAP estimate given those texels
    (weighted by how often each was seen) and per-region colour offsets (`AlbedoPopulation.posterior`); without,
    the texels read keep their colour and the others take the mean of the texels read in their region (this
    person's skin, hair, lips), or of all of them where a region is never seen.

    Held-out-view PSNR on the tiny data (template geometry, before any fine-tune): 28.25 dB with the regions'
    means, 28.98 with the population (the mouth interior, teeth and eyeballs, rarely seen, come out right).
    Tried and dropped: mirror images for unseen texels (no gain).
    """
    count = min(config.albedo.frames, len(video.images))
    index = np.linspace(0, len(video.images) - 1, count).round().astype(int)
    scans = np.broadcast_to(maps, (count, *maps.shape))
    posed = prior.decode(codes[index], scans, rotation[index], translation[index])
    views = np.broadcast_to(video.camera.world_to_cam.astype(np.float32), (count, 1, 4, 4))
    ks = np.broadcast_to(video.camera.intrinsics.astype(np.float32), (count, 1, 3, 3))
    height, width = video.images.shape[1:3]
    capacity = prior.capacity_for(posed, views, ks, width=width, height=height)
    graphdef, state = nnx.split(prior)
    render = jax.jit(lambda state, g: nnx.merge(graphdef, state).render(g, views, ks, width=width, height=height,
                                                                         capacity=capacity))  # fmt: skip
    out = jax.device_get(render(state, posed))
    alpha, depth = out.alpha[:, 0], out.depth[:, 0] / np.maximum(out.alpha[:, 0], 1e-6)
    world_to_cam, k = video.camera.world_to_cam, video.camera.intrinsics
    cam = np.asarray(posed.means) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]  # [K, N, 3]
    z = np.maximum(cam[..., 2], 1e-6)
    col = np.floor(k[0, 0] * cam[..., 0] / z + k[0, 2]).astype(int)
    row = np.floor(k[1, 1] * cam[..., 1] / z + k[1, 2]).astype(int)
    inside = (cam[..., 2] > 0.01) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
    frame = np.arange(count)[:, None]
    seen = inside & (alpha[frame, row, col] > 0.5) & (video.masks[index][frame, row, col] > 127)
    seen &= cam[..., 2] <= depth[frame, row, col] + config.albedo.depth_tolerance
    colours = video.images[index][frame, row, col].astype(np.float32) / 255.0  # [K, N, 3]
    hits = seen.sum(0)
    read = np.einsum("kn,knc->nc", seen.astype(np.float32), colours) / np.maximum(hits, 1)[:, None]
    known = hits >= max(1, config.albedo.min_seen * count)
    if not known.any():
        logger.warning("albedo: the video shows no Gaussian often enough; keeping the start's albedo")
        return maps
    if population is not None:
        albedo = population.posterior(read, np.where(known, hits / count, 0.0), config.albedo.population_noise,
                                      texel_regions(prior, template), config.albedo.region_variance)
    else:
        albedo = read.copy()
        regions = texel_regions(prior, template)
        for region in np.unique(regions):
            members = regions == region
            fill = read[members & known].mean(0) if (members & known).any() else read[known].mean(0)
            albedo[members & ~known] = fill
    logger.info("albedo: %d of %d Gaussians read off %d frames", int(known.sum()), len(known), count)
    updated = np.array(maps, np.float32)
    updated[prior.layout.texel_yx[:, 0], prior.layout.texel_yx[:, 1], 3:] = albedo
    return updated


# ------------------------------------------------------------------------------------- data and loss


@dataclasses.dataclass(frozen=True)
class VideoFrame(grain.transforms.Map):
    """A frame index -> its image, mask, the encoder's code and pose, and the camera."""

    video: MonoVideo
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


def frame_loader(video: MonoVideo, codes, rotation, translation, mesh,
                 options: loaders.LoaderOptions) -> loaders.GlobalBatchIterator:  # fmt: skip
    """Shuffled frames of the video, repeated, in global batches; its position goes into checkpoints."""
    count = jax.process_count() if options.process_count is None else options.process_count
    if options.global_batch % count:
        raise ValueError(f"data.batch_size {options.global_batch} does not split over {count} processes")
    dataset = loaders.shard_for_process(grain.MapDataset.source(np.arange(len(video.images))), options)
    dataset = dataset.seed(options.seed).shuffle().repeat(options.num_epochs)
    dataset = dataset.map(VideoFrame(video, codes, rotation, translation))
    dataset = dataset.batch(options.global_batch // count, drop_remainder=True)
    read_options = grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=options.prefetch)
    return loaders.GlobalBatchIterator(dataset, batch_sharding(mesh), read_options)


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


@dataclasses.dataclass(frozen=True)
class PersonalIdentity:
    """What personalisation produces: the identity conditioning and the prior's (possibly tuned) parameters."""

    bias_maps: list[np.ndarray]  # [r, r, c] per decoder block, coarse to fine
    scan_maps: np.ndarray  # [R, R, 6] fitted geometry offset and albedo
    start_scan_maps: np.ndarray  # [R, R, 6] where the fit started (the scan, or the template with the video's albedo)
    prior_params: dict  # the prior's parameters, pure dict, with the tuned decoder layers


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else np.asarray(value)
    return merged


def identity_maps(prior: UHAP, template: template_lib.Template, scan, population: AlbedoPopulation | None,
                  ) -> np.ndarray:  # fmt: skip
    """The identity before the video is read: the scan's UV maps, else the template (the average identity) with
    the population's mean albedo (a flat grey without one)."""
    if scan is not None:
        vertices, _, colours, source = scan
        logger.info("identity: starting from the neutral scan %s", source)
        return scan_uv_maps(prior.layout, template, vertices, colours, source)
    maps = template_maps(prior, template)
    if population is not None:
        maps[prior.layout.texel_yx[:, 0], prior.layout.texel_yx[:, 1], 3:] = population.mean
    return maps


def fit_identity(prior: UHAP, prior_cfg: ml_collections.ConfigDict, template: template_lib.Template,
                 encoder: MonoEncoder, video: MonoVideo, config: ml_collections.ConfigDict, workdir: str | Path,
                 scan=None, population: AlbedoPopulation | None = None,
                 ) -> tuple[PersonalIdentity, TrainResult]:  # fmt: skip
    """Fine-tunes the identity conditioning on the video in `workdir` (resuming from its checkpoints).

    `prior` is not modified. `scan` is `read_scan`'s (vertices, faces, colours, source) or None; `population`
    the prior's (`load_population`), for the albedo when there is no scan.
    """
    tune = config.tune
    if not (tune.bias_maps or tune.albedo or tune.shape or tune.decoder_layers):
        raise ValueError("personalize: tune.bias_maps, tune.albedo, tune.shape and tune.decoder_layers are all off")
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    codes, rotation, translation = encode_video(encoder, video, config.data.encode_batch_size)
    maps = identity_maps(prior, template, scan, population)
    if scan is None:
        logger.info("identity: no scan; starting from the template (average identity) with the video's albedo")
        maps = video_albedo(prior, template, video, codes, rotation, translation, maps, config, population)
    base_params = jax.device_get(nnx.to_pure_dict(nnx.state(prior, nnx.Param)))
    probe = np.arange(min(len(video.images), config.data.batch_size))
    capacity = probe_capacity(
        prior, codes[probe], np.broadcast_to(maps, (len(probe), *maps.shape)), rotation[probe], translation[probe],
        np.broadcast_to(video.camera.world_to_cam.astype(np.float32), (len(probe), 4, 4)),
        np.broadcast_to(video.camera.intrinsics.astype(np.float32), (len(probe), 3, 3)),
        width=video.images.shape[2], height=video.images.shape[1], headroom=config.render.capacity_headroom,
    )  # fmt: skip
    model = PersonalModel(nnx.clone(prior), maps, tune, len(video.images), video.camera.world_to_cam[2, :3])
    options = loaders.LoaderOptions(global_batch=config.data.batch_size, seed=config.train.seed,
                                    num_threads=config.data.num_threads, prefetch=config.data.prefetch)  # fmt: skip
    data = frame_loader(video, codes, rotation, translation, mesh, options)
    logger.info("personalising %s from %d frames of camera %s (%s)", video.subject, len(video.images),
                video.camera.serial, "scan" if scan is not None else "no scan")  # fmt: skip
    trainer = Trainer(config.train, model, prior_stage.make_optimizer(config), make_loss_fn(config, capacity), data,
                      workdir, mesh=mesh, capacity=capacity)  # fmt: skip
    try:
        result = trainer.run()
        trained = trainer.model
    finally:
        trainer.close()
    tuned = jax.device_get(nnx.to_pure_dict(nnx.state(trained.prior, nnx.Param)))
    tuned.pop("identity_encoder", None)
    identity = PersonalIdentity(
        bias_maps=[np.asarray(b) for b in jax.device_get(trained.bias_maps())],
        scan_maps=np.asarray(trained.scan_maps()), start_scan_maps=np.asarray(maps),
        prior_params=_merge(base_params, tuned),
    )  # fmt: skip
    return identity, result


def personalized_prior(prior_cfg: ml_collections.ConfigDict, template: template_lib.Template,
                       identity: PersonalIdentity) -> UHAP:  # fmt: skip
    """A prior holding the identity's parameters, with its bias maps in place of the IdentityEncoder."""
    model = export.build_prior(template, prior_cfg)
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, identity.prior_params))
    nnx.update(model, params)
    model.identity_encoder = IdentityBias(identity.bias_maps)
    return model


# ------------------------------------------------------------------------------------- the avatar


def _save_bundle(params: dict, config: ml_collections.ConfigDict, template: template_lib.Template, out: Path,
                 manifest: dict) -> None:  # fmt: skip
    """An inference bundle (`uhap_jax.export`'s format) of these parameters."""
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.absolute() / "params", params)
    save_config(config, out / "config.json")
    export.save_template(template, out / "template.npz")
    (out / export.BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))


def write_avatar(out: Path, identity: PersonalIdentity, prior_cfg: ml_collections.ConfigDict,
                 template: template_lib.Template, speech, speech_step: int, video: MonoVideo,
                 config: ml_collections.ConfigDict, sources: dict, details: dict) -> Path:  # fmt: skip
    """The avatar folder (`load_avatar`'s format plus the bias maps); `out` is replaced only once complete, and
    only when it is missing, empty or an avatar, never an input (`output_dirs`)."""
    inputs = [*(v for v in sources.values() if isinstance(v, str)), video.subject_dir]
    with output_dirs.replacing(out, "avatar", inputs=inputs) as staging:
        _write_avatar_files(staging, identity, prior_cfg, template, speech, speech_step, video, config, sources,
                            details)  # fmt: skip
    return out


def _write_avatar_files(staging: Path, identity: PersonalIdentity, prior_cfg: ml_collections.ConfigDict,
                        template: template_lib.Template, speech, speech_step: int, video: MonoVideo,
                        config: ml_collections.ConfigDict, sources: dict, details: dict) -> None:  # fmt: skip
    bundle = {"kind": "uhap_prior", "step": details["prior_step"], "dtype": "float32", "source": sources["prior"],
              "personalized": True}  # fmt: skip
    _save_bundle(identity.prior_params, prior_cfg, template, staging / avatar_lib.PRIOR_DIR, bundle)
    (staging / avatar_lib.SCAN_MAPS_FILE).parent.mkdir(parents=True)
    np.save(staging / avatar_lib.SCAN_MAPS_FILE, identity.scan_maps.astype(np.float32))
    np.savez(staging / BIAS_MAPS_FILE, **{f"bias_{i}": b.astype(np.float32) for i, b in enumerate(identity.bias_maps)})
    avatar_lib.save_speech(speech, staging)
    layout.write_calibration(staging, [video.camera])
    manifest = {
        "kind": "uhap_avatar", "subject": video.subject, "fps": video.fps,
        "image_size": [int(config.image_size)] * 2, "speech_step": speech_step, "sources": sources,
        "personalized": details,
    }  # fmt: skip
    (staging / avatar_lib.AVATAR_FILE).write_text(json.dumps(manifest, indent=1))


def _claim_workdir(workdir: Path, inputs: dict) -> None:
    """A workdir resumes only the run it was started for: the same video, camera, prior, encoder and scan."""
    run_file = workdir / RUN_FILE
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        if before != inputs:
            changed = sorted(k for k in inputs if before.get(k) != inputs[k])
            raise ValueError(f"{run_file}: this workdir holds a personalisation with other inputs ({changed}); "
                             "delete it or pass another workdir")  # fmt: skip
        return
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


def personalize(prior: str | Path, encoder_workdir: str | Path, video_dir: str | Path, out_avatar: str | Path,
                config: ml_collections.ConfigDict, *, audio_workdir: str | Path,
                workdir: str | Path | None = None) -> PersonalizeResult:  # fmt: skip
    """A personalised avatar folder from a monocular video: encoder codes, identity fine-tune, speech model.

    `prior` is a prior workdir or bundle, `encoder_workdir` a `uhap train encoder` workdir, `audio_workdir` a
    `uhap train audio` workdir. The fine-tune runs in `workdir` (default `config.workdir`, else
    `<out_avatar>.work`) and resumes from it.
    """
    out = Path(out_avatar)
    workdir = Path(workdir or config.workdir or f"{out}.work")
    base, prior_cfg, template, prior_step = load_prior(prior)
    encoder, encoder_step = encoder_stage.restore_encoder(encoder_workdir, base)
    info_file = Path(encoder_workdir) / encoder_stage.INFO_FILE
    if info_file.is_file() and json.loads(info_file.read_text()).get("prior_step") != prior_step:
        logger.warning("%s: the encoder was trained against another prior step than %s's %d; its codes may be off",
                       info_file, prior, prior_step)  # fmt: skip
    video = read_monocular(video_dir, config.camera, tuple(config.sequences), config.max_frames)
    scan = read_scan(config, video)
    speech, speech_step = avatar_lib.restore_speech(audio_workdir, nnx.clone(base), video.fps)
    if speech.config.latent_dim != base.z_dim:
        raise ValueError(f"{audio_workdir}: the speech model predicts {speech.config.latent_dim}-d codes, the prior "
                         f"{prior} takes {base.z_dim}")  # fmt: skip
    sources = {"prior": str(Path(prior).absolute()), "encoder": str(Path(encoder_workdir).absolute()),
               "speech": str(Path(audio_workdir).absolute()), "video": str(Path(video_dir).absolute())}  # fmt: skip
    _claim_workdir(workdir, {**sources, "camera": video.camera.serial, "frames": [list(f) for f in video.frames],
                             "scan": scan[3] if scan is not None else None, "prior_step": prior_step,
                             "encoder_step": encoder_step})  # fmt: skip
    identity, result = fit_identity(base, prior_cfg, template, encoder, video, config, workdir, scan,
                                    load_population(prior))  # fmt: skip
    if result.preempted:
        logger.warning("preempted at step %d: run the same command again to resume from %s", result.step, workdir)
        return PersonalizeResult(None, result.step, True, workdir, result.metrics)
    details = {"frames": len(video.images), "camera": video.camera.serial, "scan": scan is not None,
               "steps": result.step, "prior_step": prior_step, "encoder_step": encoder_step,
               "tuned": config.tune.to_dict()}  # fmt: skip
    written = write_avatar(out, identity, prior_cfg, template, speech, speech_step, video, config, sources, details)
    logger.info("wrote %s", written)
    return PersonalizeResult(written, result.step, False, workdir, result.metrics)


# ------------------------------------------------------------------------------------- quality


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


def view_psnr(prior: UHAP, views: ViewSet, scan_maps: np.ndarray, capacity: kernels.AdaptiveCapacity,
              batch_size: int) -> float:  # fmt: skip
    """Mean PSNR of the frames rendered at the held-out cameras (foreground on black, as the prior's eval/psnr)."""
    graphdef, state = nnx.split(prior)

    @functools.partial(jax.jit, static_argnums=2)
    def score(state, batch, slots: int):
        model = nnx.merge(graphdef, state)
        posed = model.decode(batch["codes"], batch["scan_maps"], batch["head_pose"][:, :3], batch["head_pose"][:, 3:])
        height, width = batch["images"].shape[2:4]
        out = model.render(posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height,
                           capacity=slots)  # fmt: skip
        _, target = targets(batch["images"], batch["masks"])
        return image_metrics.psnr(jnp.clip(out.rgb, 0.0, 1.0), target), jnp.max(out.stats.n_pairs)

    count, values = len(views.codes), []
    for start in range(0, count, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), count - 1)
        batch = {"codes": views.codes[index], "head_pose": views.head_pose[index], "scan_maps": scan_maps[index],
                 "images": views.images[index], "masks": views.masks[index],
                 "world_to_cam": views.world_to_cam[index], "intrinsics": views.intrinsics[index]}  # fmt: skip
        while True:  # an overflowing batch rendered NaN: grow the capacity and score it again
            psnr, pairs = jax.device_get(score(state, batch, capacity.value))
            if not grow_capacity(capacity, int(pairs)):
                break
        values.append(psnr[: min(batch_size, count - start)])
    return float(np.mean(np.concatenate(values)))


def _last_eval(workdir: Path, name: str) -> float | None:
    from uhap_jax.train.metrics import read_rows  # tolerates a torn last line

    rows = read_rows(workdir / "metrics.jsonl")
    values = [row[name] for row in rows if row.get(name) is not None]
    return float(values[-1]) if values else None


def heldout_quality(prior_workdir: str | Path, encoder_workdir: str | Path, config: ml_collections.ConfigDict,
                    workdir: str | Path, *, subject: str | None = None) -> dict[str, float]:  # fmt: skip
    """Personalises a held-out identity from its monocular sequence only (no scan) and scores held-out views.

    Returns `personalize/heldout_view_psnr` (the personalised avatar), `..._true_scan` (the prior given the
    identity's scan), `..._start` (the average identity with the video's albedo, before the fine-tune),
    `personalize/prior_train_psnr` (the prior on its training identities' frames, same protocol), the prior's
    own last `eval/psnr`, and `personalize/gap_db` between the prior's and the personalised PSNR. The fine-tune
    runs in `workdir` (resumable); codes are cached there.
    """
    workdir = Path(workdir)
    base, prior_cfg, template, prior_step = load_prior(prior_workdir)
    encoder, _ = encoder_stage.restore_encoder(encoder_workdir, base)
    root = prior_stage.dataset_root(prior_cfg)
    records = prior_stage.prepared_records(root, prior_cfg)
    split = prior_stage.read_split(root, records, 1)
    subject = subject or layout.read_dataset_info(root)["identities"]["held_out"][0]
    mono = ml_collections.ConfigDict(config.to_dict())
    mono.use_scan, mono.scan = False, ""
    mono.camera = config.camera or synth.MONO_SERIAL
    video = read_monocular(layout.subject_dir(root, subject), mono.camera, tuple(mono.sequences), mono.max_frames)
    identity, result = fit_identity(base, prior_cfg, template, encoder, video, mono, workdir, None,
                                    load_population(prior_workdir))  # fmt: skip
    if result.preempted:
        raise RuntimeError(f"preempted at step {result.step}: run again to resume from {workdir}")

    subjects = prior_stage.subject_tables(root, records, base, template, prior_cfg)
    held_in, held_out = split.held_in_cameras, split.held_out_cameras
    sequences, codes = encoder_stage.code_targets(
        base, prior_step, prior_workdir, root, records, subjects, held_in, config.eval.batch_size,
        workdir / encoder_stage.CODES_FILE, keep=lambda s: s.split == "train" or s.subject == subject,
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
    capacity = probe_capacity(
        base, frames.codes[:batch], scans[frames.subject_ids[:batch]], frames.head_pose[:batch, :3],
        frames.head_pose[:batch, 3:], frames.world_to_cam[:batch, 0], frames.intrinsics[:batch, 0], width=width,
        height=height, headroom=config.render.capacity_headroom,
    )  # fmt: skip
    tile = lambda maps: np.broadcast_to(maps, (count, *maps.shape))  # noqa: E731
    personal = personalized_prior(prior_cfg, template, identity)
    metrics = {
        "personalize/heldout_view_psnr": view_psnr(personal, frames, tile(identity.scan_maps), capacity, batch),
        "personalize/heldout_view_psnr_true_scan": view_psnr(base, frames, scans[frames.subject_ids], capacity, batch),
        "personalize/heldout_view_psnr_start": view_psnr(
            base, frames, tile(identity.start_scan_maps), capacity, batch
        ),  # fmt: skip
        "personalize/prior_train_psnr": view_psnr(base, train, scans[train.subject_ids], capacity, batch),
        "personalize/frames": float(len(video.images)),
        "personalize/steps": float(result.step),
    }
    prior_eval = _last_eval(Path(prior_workdir), "eval/psnr")
    if prior_eval is not None:
        metrics["personalize/prior_eval_psnr"] = prior_eval
    metrics["personalize/gap_db"] = metrics["personalize/prior_train_psnr"] - metrics["personalize/heldout_view_psnr"]
    return metrics
