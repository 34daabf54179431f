"""The prior stage: data (capture layout -> records -> grain), the UHAP model, its loss, the Trainer, and eval.

Training frames are the `train`-split sequences of the training identities, seen by the held-in cameras
(`dataset.json`). Every `eval.every` steps, and at the end, the model is evaluated and rows go into
`<workdir>/metrics.jsonl`: `eval/psnr` and `eval/ssim` render the held-out cameras from an expression code
that the encoder took from held-in views of the same frame; `eval/scan_chamfer` (mm, symmetric mean distance)
compares each training identity's decoded neutral (z = 0, no head pose) with its neutral scan; where the
sequences have tracked meshes (`vertices.npy`), `eval/tracked_mm` is the mean distance of the decoded Gaussians
to the tracked surface at their texels.

Tracked meshes, when a capture has them (the synthetic data and Multiface do), also supervise training
(`loss.tracked_mesh`): the decoded, posed Gaussians are pulled to the tracked surface point of their texel.
This is what makes the expression code carry the mouth's motion at small image sizes, where a few pixels of
lip movement hardly change the photometric loss; the speech model learns these codes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from data_pipelines import frame_cache, layout, loaders, synth, tfds_builder
from uhap_jax.eval import image_metrics
from uhap_jax.geometry import template as template_lib
from uhap_jax.models import losses
from uhap_jax.models.population import POPULATION_FILE, AlbedoPopulation
from uhap_jax.models.prior import UHAP, scan_uv_maps
from uhap_jax.train.loop import Trainer, TrainResult
from uhap_jax.train.mesh import batch_sharding, make_mesh
from uhap_jax.train.sharding import place

logger = logging.getLogger(__name__)

_DROPPED_FIELDS = ("audio", "audio_valid")  # the prior does not listen


# ------------------------------------------------------------------------------------- data


def cache_dir(config: ml_collections.ConfigDict) -> Path:
    return Path(config.data.cache_dir or os.environ.get("UHAP_CACHE", Path.home() / ".cache" / "uhap"))


def dataset_root(config: ml_collections.ConfigDict) -> Path:
    """`data.root`, or the synthetic dataset of `data.synth_preset`, generated once into the cache."""
    if config.data.root:
        root = Path(config.data.root)
        if not (root / layout.DATASET_FILE).is_file():
            raise FileNotFoundError(f"{root / layout.DATASET_FILE}: data.root has no dataset.json (split file)")
        return root
    root = cache_dir(config) / "synth" / config.data.synth_preset
    if not (root / layout.DATASET_FILE).is_file():
        if jax.process_index() == 0:
            logger.info("generating the synthetic %s dataset into %s (once)", config.data.synth_preset, root)
            synth.generate(root, synth.synth_config(config.data.synth_preset), progress=False)
        multihost_utils.sync_global_devices("uhap synthetic dataset")
    return root


def prepared_records(root: Path, config: ml_collections.ConfigDict) -> loaders.FrameRecords:
    """The layout's frame records, prepared once per layout (keyed by its path and dataset.json)."""
    key = hashlib.sha256(str(root.resolve()).encode() + (root / layout.DATASET_FILE).read_bytes()).hexdigest()
    data_dir = cache_dir(config) / "records" / key[:16]
    if jax.process_index() == 0:
        tfds_builder.prepare(root, data_dir)
    multihost_utils.sync_global_devices("uhap prior records")
    dataset_dir = tfds_builder.prepare(root, data_dir)  # prepared: this only finds it
    records = loaders.open_records(dataset_dir)
    # --- issue 19: PNGs decoded once into a uint8 cache (data.decoded), so that loaders decode nothing
    if config.data.get("decoded", False):
        cache = frame_cache.cache_path(data_dir, dataset_dir)
        if jax.process_index() == 0:
            started = time.perf_counter()
            frame_cache.build(dataset_dir, cache, workers=config.data.get("decode_workers", 0) or None)
            logger.info("decoded frame cache %s ready in %.1f s", cache, time.perf_counter() - started)
        multihost_utils.sync_global_devices("uhap decoded frames")
        records = frame_cache.decoded_records(records, cache)
    # --- end issue 19
    return records


def encoder_views(config: ml_collections.ConfigDict) -> int:
    """Views the encoder sees apart from the rendered ones (issue 19): data.encoder_views, -1 for num_views."""
    views = config.data.get("encoder_views", 0)
    return config.data.num_views if views == -1 else views


@dataclasses.dataclass(frozen=True)
class RecordSubset:
    """The records at `indices` of a random-access source, as a random-access source."""

    source: object
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]


@dataclasses.dataclass(frozen=True)
class Split:
    """Who and what trains and evaluates, from dataset.json."""

    train_subjects: list[str]
    held_in_cameras: list[str]
    held_out_cameras: list[str]
    train_records: np.ndarray  # record indices of the train-split sequences of training identities


def read_split(root: Path, records: loaders.FrameRecords, num_views: int) -> Split:
    info = layout.read_dataset_info(root)
    where = root / layout.DATASET_FILE
    try:
        train_subjects = list(info["identities"]["train"])
        held_out = list(info["held_out_cameras"])
        splits = {(s, q): row["split"] for s, seqs in info["sequences"].items() for q, row in seqs.items()}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: needs identities.train, held_out_cameras and sequences.<id>.<seq>.split "
                         f"({error!r} is missing)") from error  # fmt: skip
    train_rows = [
        row for row in records.sequences if row["subject"] in train_subjects and splits.get(
            (row["subject"], row["sequence"])) == "train"
    ]  # fmt: skip
    if not train_rows:
        raise ValueError(f"{where}: no sequence of a training identity has split 'train'")
    held_in = sorted(set(train_rows[0]["serials"]) - set(held_out))
    for row in train_rows:
        missing = set(held_in) - set(row["serials"])
        if missing:
            raise ValueError(f"{root}/subjects/{row['subject']}/sequences/{row['sequence']}: lacks cameras "
                             f"{sorted(missing)} that the other training sequences have")  # fmt: skip
    if len(held_in) < num_views:
        raise ValueError(f"{where}: {len(held_in)} held-in cameras, but data.num_views is {num_views}")
    indices = np.concatenate([np.arange(r["first_record"], r["first_record"] + r["num_frames"]) for r in train_rows])
    return Split(train_subjects, held_in, held_out, indices)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SubjectTables:
    """Per-subject and per-record data that the records do not hold, indexed by subject_id / record index.

    scan_maps [S, R, R, 6]: the neutral scan in UV; scan_points/normals/colours [S, M, 3]: points sampled
    on the scan; head_pose [num_records, 6]: rotation vector and translation (meta.json `head_pose`).
    """

    scan_maps: np.ndarray
    scan_points: np.ndarray
    scan_normals: np.ndarray
    scan_colours: np.ndarray
    head_pose: np.ndarray
    first_record: np.ndarray  # [num_sequences]
    tracked_points: np.ndarray  # [num_records, N, 3] tracked surface at each Gaussian's texel (world), or [0, N, 3]
    tracked_valid: np.ndarray  # [num_records] 1 where the sequence has tracked meshes

    def rows(self, subject_id: np.ndarray, sequence_id: np.ndarray, frame_index: np.ndarray) -> dict:
        """The per-example fields of a batch (numpy tables on the host, or device arrays under jit)."""
        return self.record_rows(subject_id, self.first_record[sequence_id] + frame_index)

    def record_rows(self, subject_id: np.ndarray, record: np.ndarray) -> dict:
        """`rows` by record index."""
        pose = self.head_pose[record]
        tracked = {}
        if self.tracked_points.shape[0]:
            tracked = {"tracked_points": self.tracked_points[record], "tracked_valid": self.tracked_valid[record]}
        return tracked | {
            "scan_maps": self.scan_maps[subject_id],
            "scan_points": self.scan_points[subject_id],
            "scan_normals": self.scan_normals[subject_id],
            "scan_colours": self.scan_colours[subject_id],
            "head_rotation": pose[..., :3],
            "head_translation": pose[..., 3:],
        }


def sample_scan(vertices, faces, colours, count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`count` area-weighted points on a mesh with their face normals and interpolated colours."""
    corners = vertices[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area = np.linalg.norm(cross, axis=-1)
    face = rng.choice(len(faces), count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    barys = np.stack([1 - u - v, u, v], -1)[..., None]
    points = np.sum(corners[face] * barys, axis=1)
    normals = cross[face] / np.maximum(area[face, None], 1e-12)
    return points, normals, np.sum(colours[faces[face]] * barys, axis=1)


def subject_tables(root: Path, records: loaders.FrameRecords, model: UHAP, template: template_lib.Template,
                   config: ml_collections.ConfigDict) -> SubjectTables:  # fmt: skip
    subjects = sorted({row["subject"] for row in records.sequences})
    maps, points, normals, colours = [], [], [], []
    for index, subject in enumerate(subjects):
        subject_path = layout.subject_dir(root, subject)
        vertices, faces, vertex_colours = layout.read_neutral_scan(subject_path)
        maps.append(scan_uv_maps(model.layout, template, vertices, vertex_colours, str(subject_path / layout.SCAN_DIR)))
        sample = sample_scan(vertices, faces, vertex_colours, config.loss.scan_points, np.random.default_rng(index))
        for table, values in zip((points, normals, colours), sample):
            table.append(values)
    poses, first, tracked, valid = [], [], [], []
    texels = model.layout
    for row in records.sequences:
        seq_dir = layout.sequence_dir(root, row["subject"], row["sequence"])
        pose = layout.read_sequence_meta(seq_dir).get("head_pose")
        if pose is None:
            raise ValueError(f"{seq_dir / layout.META_FILE}: no head_pose (rotation_vector, translation per frame)")
        pose = np.concatenate([np.asarray(pose["rotation_vector"]), np.asarray(pose["translation"])], -1)
        if pose.shape != (row["num_frames"], 6):
            raise ValueError(f"{seq_dir / layout.META_FILE}: head_pose has shape {list(pose.shape)}, expected "
                             f"[{row['num_frames']}, 3] rotation vectors and translations")  # fmt: skip
        first.append(sum(len(p) for p in poses))
        poses.append(pose)
        if config.loss.tracked_mesh > 0:
            surface = _tracked_points(seq_dir, row["num_frames"], template, texels)
            valid.append(np.full(row["num_frames"], surface is not None, np.float32))
            tracked.append(surface if surface is not None else np.zeros((row["num_frames"], texels.num_gaussians, 3)))
    if config.loss.tracked_mesh > 0 and not any(v[0] for v in valid):
        logger.warning("loss.tracked_mesh > 0 but no sequence of %s has %s: the term is zero", root,
                       layout.VERTICES_FILE)  # fmt: skip
    if [row["first_record"] for row in records.sequences] != first:
        raise ValueError(f"{root}: the records' sequence table is not in record order")
    return SubjectTables(
        *(np.stack(table).astype(np.float32) for table in (maps, points, normals, colours)),
        head_pose=np.concatenate(poses).astype(np.float32), first_record=np.asarray(first, np.int32),
        tracked_points=(np.concatenate(tracked).astype(np.float32) if tracked
                        else np.zeros((0, texels.num_gaussians, 3), np.float32)),
        tracked_valid=np.concatenate(valid) if valid else np.zeros((0,), np.float32),
    )  # fmt: skip


def _tracked_points(seq_dir: Path, num_frames: int, template: template_lib.Template, texels) -> np.ndarray | None:
    """The tracked meshes of a sequence at each Gaussian's (face, barycentric) point [F, N, 3], or None."""
    if not (seq_dir / layout.VERTICES_FILE).is_file():
        return None
    vertices = layout.read_vertices(seq_dir, num_frames=num_frames)
    if vertices.shape[1] != texels.num_vertices:
        raise ValueError(f"{seq_dir / layout.VERTICES_FILE}: {vertices.shape[1]} vertices per frame, but the "
                         f"template (model.template_resolution) has {texels.num_vertices}")  # fmt: skip
    corners = vertices[:, template.faces[texels.face_ids]]  # [F, N, 3, 3]
    return np.einsum("nk,fnkd->fnd", texels.barys, corners)


class GatheredBatches:
    """A global-batch iterator whose batches gain per-example rows from tables kept on device (`_attach`, jitted);
    its state (for checkpoints) is the inner iterator's. Subclasses place the tables and define `_attach`."""

    def __init__(self, inner: loaders.GlobalBatchIterator, placed_tables, mesh: jax.sharding.Mesh):
        self._inner = inner
        self._tables = placed_tables
        self._gather = jax.jit(self._attach, out_shardings=batch_sharding(mesh))

    def _attach(self, tables, batch: dict) -> dict:
        raise NotImplementedError

    def __iter__(self) -> GatheredBatches:
        return self

    def __next__(self) -> dict:
        return self._gather(self._tables, next(self._inner))

    def get_state(self) -> dict:
        return self._inner.get_state()

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state)


class PriorBatches(GatheredBatches):
    """The multi-view loader's global batches plus each example's scan and head pose, gathered on device."""

    def __init__(self, inner: loaders.GlobalBatchIterator, tables: SubjectTables, mesh: jax.sharding.Mesh):
        replicated = NamedSharding(mesh, PartitionSpec())
        fields = {f.name: getattr(tables, f.name) for f in dataclasses.fields(SubjectTables)}
        super().__init__(inner, SubjectTables(**place(fields, jax.tree.map(lambda _: replicated, fields))), mesh)

    def _attach(self, tables: SubjectTables, batch: dict) -> dict:
        rows = tables.rows(batch["subject_id"], batch["sequence_id"], batch["frame_index"])
        return {k: v for k, v in batch.items() if k not in _DROPPED_FIELDS} | rows


# ------------------------------------------------------------------------------------- loss


def _frame_targets(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [B, V, H, W, 3] in [0, 1], masks [B, V, H, W], and the foreground on black as the target."""
    images = batch["images"].astype(jnp.float32) / 255.0
    masks = batch["masks"].astype(jnp.float32) / 255.0
    return images, masks, images * masks[..., None]


def encoder_geometry(model: UHAP, batch: dict) -> jax.Array | None:
    """The expression encoder's tracked-mesh input for a batch with `tracked_points` (else None: images only)."""
    if "tracked_points" not in batch:
        return None
    return model.expression_geometry(batch["tracked_points"], batch["tracked_valid"], batch["scan_maps"],
                                     batch["head_rotation"], batch["head_translation"])  # fmt: skip


def decode_frames(model: UHAP, batch: dict, z: jax.Array):
    """The posed avatars of the batch's frames and their neutral (z = 0, no pose), decoded in one pass."""
    batch_size = z.shape[0]
    zeros = jnp.zeros_like(batch["head_rotation"])
    both = model.decode(
        jnp.concatenate([z, jnp.zeros_like(z)]),
        jnp.concatenate([batch["scan_maps"]] * 2),
        jnp.concatenate([batch["head_rotation"], zeros]),
        jnp.concatenate([batch["head_translation"], zeros]),
    )
    posed = jax.tree.map(lambda x: x[:batch_size], both)
    neutral = jax.tree.map(lambda x: x[batch_size:], both)
    return posed, neutral


def make_loss_fn(config: ml_collections.ConfigDict, capacity: kernels.AdaptiveCapacity,
                 lpips: losses.LPIPS | None = None):  # fmt: skip
    """`loss_fn(model, batch, rng) -> (loss, aux)` for the Trainer; `capacity.value` is read when traced."""
    weights = config.loss
    if weights.scan_metric not in ("chamfer", "point_to_plane"):
        raise ValueError(f"loss.scan_metric must be 'chamfer' or 'point_to_plane', got {weights.scan_metric!r}")

    def loss_fn(model: UHAP, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        images, masks, target = _frame_targets(batch)
        batch_size, _, height, width, _ = images.shape
        noise_key, subset_key, drop_key = jax.random.split(rng, 3)
        geometry = encoder_geometry(model, batch)
        if geometry is not None:  # some frames encode from images alone, so that the image path learns too
            keep = jax.random.bernoulli(drop_key, 1.0 - config.model.geometry_dropout, (batch_size,))
            geometry = geometry * keep[:, None, None, None]
        # issue 19: the encoder sees its own views (data.encoder_views), drawn apart from the rendered ones
        encoder_images = batch["encoder_images"].astype(jnp.float32) / 255.0 if "encoder_images" in batch else images
        mean, log_var = model.encode_expression(encoder_images, geometry)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(noise_key, mean.shape)
        posed, neutral = decode_frames(model, batch, z)
        rendered = model.render(posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height,
                                capacity=capacity.value)  # fmt: skip
        pixel_weight = masks + weights.background_weight * (1.0 - masks)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        terms = {
            "l1": losses.masked_l1(rendered.rgb, target, pixel_weight),
            "ssim": losses.ssim_loss(flat(rendered.rgb), flat(target)),
            "silhouette": jnp.mean(jnp.abs(rendered.alpha - masks)),
            "kl": losses.kl_divergence(mean, log_var),
            "offset": losses.offset_regularizer(posed.offsets),
            "scale": losses.scale_regularizer(posed.scales, weights.max_scale),
            "view_colour": losses.view_colour_spread(model.colours(posed, batch["world_to_cam"])),  # issue 19
        }
        num_gaussians = neutral.head_means.shape[1]
        subset = (
            jax.random.choice(subset_key, num_gaussians, (weights.scan_gaussians,), replace=False)
            if weights.scan_gaussians < num_gaussians
            else jnp.arange(num_gaussians)
        )
        points = neutral.head_means[:, subset]
        if weights.scan_metric == "chamfer":
            terms["scan"] = jnp.mean(losses.chamfer(points, batch["scan_points"]))
        else:
            terms["scan"] = jnp.mean(losses.point_to_plane(points, batch["scan_points"], batch["scan_normals"]))
        neutral_colours = jnp.mean(model.colours(neutral, batch["world_to_cam"]), axis=1)[:, subset]
        terms["albedo"] = jnp.mean(
            losses.albedo_l1(points, neutral_colours, batch["scan_points"], batch["scan_colours"])
        )
        if "tracked_points" in batch:
            terms["tracked_mesh"] = tracked_mesh_loss(posed.means, batch["tracked_points"], batch["tracked_valid"])
        if lpips is not None:
            terms["lpips"] = jnp.mean(lpips(flat(rendered.rgb), flat(target)))
        loss = sum(weights.get(name, 0.0) * value for name, value in terms.items())
        aux = dict(terms)
        aux["psnr"] = jnp.mean(image_metrics.psnr(jnp.clip(rendered.rgb, 0.0, 1.0), target))
        aux["raster_overflow"] = jnp.any(rendered.stats.overflow).astype(jnp.float32)
        aux["raster_pairs"] = jnp.max(rendered.stats.n_pairs).astype(jnp.float32)
        return loss, aux

    return loss_fn


def tracked_mesh_loss(means: jax.Array, tracked: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared distance (m²) of posed Gaussians [B, N, 3] to their tracked points, over valid frames."""
    per_frame = jnp.mean(jnp.sum((means - tracked) ** 2, axis=-1), axis=-1)
    return jnp.sum(valid * per_frame) / jnp.maximum(jnp.sum(valid), 1.0)


def make_image_fn(capacity: kernels.AdaptiveCapacity):
    """Trainer image grids: the first frame's views, rendered from its posterior mean, against the target."""

    @functools.partial(nnx.jit, static_argnames="slots")
    def grid(model: UHAP, batch: dict, slots: int) -> tuple[jax.Array, jax.Array]:
        images, _, target = _frame_targets(batch)
        mean, _ = model.encode_expression(images[:1])
        posed, _ = decode_frames(model, jax.tree.map(lambda x: x[:1], batch), mean)
        height, width = images.shape[2:4]
        rendered = model.render(posed, batch["world_to_cam"][:1], batch["intrinsics"][:1], width=width,
                                height=height, capacity=slots)  # fmt: skip
        return jnp.clip(rendered.rgb[0], 0.0, 1.0), target[0]

    return lambda model, batch: grid(model, batch, capacity.value)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, max(opt.warmup_steps, 1), max(config.train.steps, opt.warmup_steps + 1),
        end_value=0.1 * opt.learning_rate,
    )  # fmt: skip
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), optax.adam(schedule))


def initial_capacity(model: UHAP, batch: dict, headroom: float) -> kernels.AdaptiveCapacity:
    """The pairs that a probe batch needs with the model as it is, x `headroom`, bucketed; it grows as needed."""
    images = batch["images"]
    mean, _ = model.encode_expression(images.astype(jnp.float32) / 255.0)
    posed, _ = decode_frames(model, batch, mean)
    height, width = images.shape[2:4]
    needed = model.capacity_for(posed, batch["world_to_cam"], batch["intrinsics"], width=width, height=height)
    return kernels.AdaptiveCapacity(int(needed * headroom), headroom)


# ------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fixed frames: held-in views for the encoder, held-out views to score, and the neutral-scan subjects."""

    encoder_images: np.ndarray  # [E, V, H, W, 3] uint8
    target_images: np.ndarray  # [E, Vo, H, W, 3] uint8
    target_masks: np.ndarray  # [E, Vo, H, W] uint8
    world_to_cam: np.ndarray  # [E, Vo, 4, 4] held-out cameras
    intrinsics: np.ndarray  # [E, Vo, 3, 3]
    rows: dict  # SubjectTables.rows of the frames
    scan_subjects: np.ndarray  # subject ids of the training identities

    def probe(self, count: int) -> dict:
        """The first `count` frames, their held-out views as the images: a batch to size the pair capacity."""
        return {"images": self.target_images[:count], "world_to_cam": self.world_to_cam[:count],
                "intrinsics": self.intrinsics[:count], **{k: v[:count] for k, v in self.rows.items()}}  # fmt: skip


def build_eval_set(records: loaders.FrameRecords, split: Split, tables: SubjectTables,
                   config: ml_collections.ConfigDict) -> EvalSet:  # fmt: skip
    count = config.eval.num_frames - config.eval.num_frames % config.eval.batch_size
    if count <= 0:
        raise ValueError(
            f"eval.num_frames {config.eval.num_frames} must be >= eval.batch_size {config.eval.batch_size}"
        )
    chosen = split.train_records[np.linspace(0, len(split.train_records) - 1, count).round().astype(int)]
    rng = np.random.default_rng(config.train.seed)
    encoder = loaders.SampleViews(config.data.num_views, tuple(split.held_in_cameras))
    held_out = loaders.SampleViews(len(split.held_out_cameras), tuple(split.held_out_cameras))
    frames = [records.source[int(i)] for i in chosen]
    inputs = [encoder.random_map(r, rng) for r in frames]
    targets = [held_out.random_map(r, rng) for r in frames]
    stack = lambda items, key: np.stack([item[key] for item in items])  # noqa: E731
    subject_ids = sorted({row["subject_id"] for row in records.sequences if row["subject"] in split.train_subjects})
    return EvalSet(
        stack(inputs, "images"), stack(targets, "images"), stack(targets, "masks"),
        stack(targets, "world_to_cam"), stack(targets, "intrinsics"),
        tables.rows(stack(inputs, "subject_id"), stack(inputs, "sequence_id"), stack(inputs, "frame_index")),
        np.asarray(subject_ids, np.int32),
    )  # fmt: skip


def _render_frames(model: UHAP, batch: dict, world_to_cam, intrinsics, width: int, height: int, capacity: int):
    """Frames decoded from the posterior mean of their encoder views, rendered into other cameras."""
    mean, _ = model.encode_expression(batch["encoder_images"].astype(jnp.float32) / 255.0,
                                      encoder_geometry(model, batch))  # fmt: skip
    posed = model.decode(mean, batch["scan_maps"], batch["head_rotation"], batch["head_translation"])
    return model.render(posed, world_to_cam, intrinsics, width=width, height=height, capacity=capacity), posed


class Evaluator:
    """Jitted eval of a model state on an EvalSet: held-out-view PSNR/SSIM and the neutral-scan Chamfer."""

    def __init__(self, eval_set: EvalSet, tables: SubjectTables, capacity: kernels.AdaptiveCapacity,
                 config: ml_collections.ConfigDict):  # fmt: skip
        self.eval_set, self.tables, self.capacity = eval_set, tables, capacity
        self.batch_size = config.eval.batch_size
        self.scan_gaussians = config.loss.scan_gaussians
        self._views = jax.jit(self._score_views, static_argnums=(0, 1))
        self._scan = jax.jit(self._scan_chamfer, static_argnums=0)

    @staticmethod
    def _score_views(capacity: int, graphdef, state, batch: dict) -> dict[str, jax.Array]:
        height, width = batch["target_images"].shape[2:4]
        rendered, posed = _render_frames(nnx.merge(graphdef, state), batch, batch["world_to_cam"],
                                         batch["intrinsics"], width, height, capacity)  # fmt: skip
        _, masks, target = _frame_targets({"images": batch["target_images"], "masks": batch["target_masks"]})
        render = jnp.clip(rendered.rgb, 0.0, 1.0)
        scores = {"psnr": image_metrics.psnr(render, target), "ssim": image_metrics.ssim(render, target),
                  "n_pairs": jnp.max(rendered.stats.n_pairs)}  # fmt: skip
        if "tracked_points" in batch:
            distance = jnp.linalg.norm(posed.means - batch["tracked_points"], axis=-1)
            scores["tracked_mm"] = 1e3 * jnp.mean(distance, axis=-1)
            scores["tracked_valid"] = batch["tracked_valid"]
        return scores

    def _scan_chamfer(self, graphdef, state, scan_maps, scan_points) -> jax.Array:
        model = nnx.merge(graphdef, state)
        zeros = jnp.zeros((scan_maps.shape[0], 3))
        neutral = model.decode(jnp.zeros((scan_maps.shape[0], model.z_dim)), scan_maps, zeros, zeros)
        points = neutral.head_means
        if self.scan_gaussians < points.shape[1]:
            points = points[:, np.random.default_rng(0).choice(points.shape[1], self.scan_gaussians, replace=False)]
        return 1e3 * losses.chamfer(points, scan_points, squared=False)

    def __call__(self, model: UHAP) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        e = self.eval_set
        parts = []
        for start in range(0, len(e.encoder_images), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = {
                "encoder_images": e.encoder_images[part], "target_images": e.target_images[part],
                "target_masks": e.target_masks[part], "world_to_cam": e.world_to_cam[part],
                "intrinsics": e.intrinsics[part], **{k: v[part] for k, v in e.rows.items()},
            }  # fmt: skip
            while True:  # an overflowing batch rendered NaN: grow the capacity and score it again
                scores = jax.device_get(self._views(self.capacity.value, graphdef, state, batch))
                if not self.capacity.grow(int(scores.pop("n_pairs"))):
                    break
            parts.append(scores)
        scores = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
        subjects = e.scan_subjects
        chamfer = self._scan(graphdef, state, self.tables.scan_maps[subjects], self.tables.scan_points[subjects])
        metrics = {
            "eval/psnr": float(np.mean(scores["psnr"])),
            "eval/ssim": float(np.mean(scores["ssim"])),
            "eval/scan_chamfer": float(np.mean(chamfer)),
        }
        if "tracked_mm" in scores and scores["tracked_valid"].sum() > 0:
            valid = scores["tracked_valid"]
            metrics["eval/tracked_mm"] = float(np.sum(scores["tracked_mm"] * valid) / valid.sum())
        return metrics


# ------------------------------------------------------------------------------------- the stage


def write_population(workdir: Path, model: UHAP, records: loaders.FrameRecords, split: Split,
                     tables: SubjectTables) -> None:  # fmt: skip
    """The training identities' albedo population (`population.POPULATION_FILE`), for personalisation."""
    if jax.process_index() != 0:
        return
    ids = sorted({row["subject_id"] for row in records.sequences if row["subject"] in split.train_subjects})
    rows, cols = model.layout.texel_yx[:, 0], model.layout.texel_yx[:, 1]
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / f".{POPULATION_FILE}.partial.npz"
    AlbedoPopulation.fit(tables.scan_maps[ids][:, rows, cols, 3:]).save(partial)
    partial.rename(workdir / POPULATION_FILE)


def train_prior(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[TrainResult, dict[str, float]]:
    """Trains (or resumes) the prior in `workdir`; returns the Trainer's result and the last eval metrics."""
    workdir = Path(workdir)
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    root = dataset_root(config)
    records = prepared_records(root, config)
    split = read_split(root, records, config.data.num_views)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(template, config.model, rngs=nnx.Rngs(config.train.seed))
    tables = subject_tables(root, records, model, template, config)
    options = loaders.LoaderOptions(
        global_batch=config.data.batch_size, seed=config.train.seed, num_threads=config.data.num_threads,
        prefetch=config.data.prefetch, device_prefetch=config.data.get("device_prefetch", 0),
        num_workers=config.data.get("num_workers", 0),
    )  # fmt: skip
    train_records = loaders.FrameRecords(RecordSubset(records.source, split.train_records), records.sequences)
    frames = loaders.multiview_loader(
        train_records, batch_sharding(mesh), options, num_views=config.data.num_views, serials=split.held_in_cameras,
        encoder_views=encoder_views(config),
    )  # fmt: skip
    data = PriorBatches(frames, tables, mesh)
    write_population(workdir, model, records, split, tables)
    eval_set = build_eval_set(records, split, tables, config)
    capacity = initial_capacity(model, eval_set.probe(config.eval.batch_size), config.render.capacity_headroom)
    lpips = None
    if config.loss.lpips > 0 and config.loss.lpips_weights:
        lpips = losses.load_lpips(config.loss.lpips_weights)
    elif config.loss.lpips > 0:
        logger.info("loss.lpips_weights is empty: training without LPIPS")
    trainer = Trainer(
        config.train, model, make_optimizer(config), make_loss_fn(config, capacity, lpips), data, workdir,
        mesh=mesh, image_fn=make_image_fn(capacity), capacity=capacity,
    )  # fmt: skip
    evaluator = Evaluator(eval_set, tables, capacity, config)
    try:
        return trainer.run_with_evals(evaluator, config.eval.every)
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------- benchmark


def synthetic_batch(config: ml_collections.ConfigDict, model: UHAP, template: template_lib.Template,
                    rng: np.random.Generator) -> dict:  # fmt: skip
    """A training batch of the config's shape with random images, the synthetic rig's cameras and the template
    as every neutral scan: what a step costs does not depend on what the pixels show."""
    synth_config = synth.synth_config(config.data.synth_preset)
    rig = synth.camera_rig(synth_config, rng)
    batch_size, views, size = config.data.batch_size, config.data.num_views, synth_config.image_size
    albedo = rng.uniform(0.2, 0.8, template.vertices.shape).astype(np.float32)
    maps = scan_uv_maps(model.layout, template, template.vertices, albedo, "the template")
    points = sample_scan(template.vertices, template.faces, albedo, config.loss.scan_points, rng)
    chosen = [rng.choice(len(rig), views, replace=False) for _ in range(batch_size)]
    tile = lambda x: np.broadcast_to(np.asarray(x, np.float32), (batch_size, *np.shape(x))).copy()  # noqa: E731
    return {
        "images": rng.integers(0, 256, (batch_size, views, size, size, 3), dtype=np.uint8),
        **({"encoder_images": rng.integers(0, 256, (batch_size, encoder_views(config), size, size, 3), np.uint8)}
           if encoder_views(config) else {}),  # issue 19
        "masks": np.full((batch_size, views, size, size), 255, np.uint8),
        "world_to_cam": np.asarray([[rig[c].world_to_cam for c in row] for row in chosen], np.float32),
        "intrinsics": np.asarray([[rig[c].intrinsics for c in row] for row in chosen], np.float32),
        "scan_maps": tile(maps), "scan_points": tile(points[0]), "scan_normals": tile(points[1]),
        "scan_colours": tile(points[2]),
        "head_rotation": rng.normal(0.0, 0.03, (batch_size, 3)).astype(np.float32),
        "head_translation": rng.normal(0.0, 0.002, (batch_size, 3)).astype(np.float32),
    }  # fmt: skip


def benchmark_step(config: ml_collections.ConfigDict, workdir: Path, *, repeats: int = 10) -> dict[str, float]:
    """Times one full train step (forward, backward, Adam) and, alone, the rasterizer's forward + backward on
    the same decoded Gaussians; their ratio estimates the rasterizer's share of the step."""
    rng = np.random.default_rng(config.train.seed)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(template, config.model, rngs=nnx.Rngs(config.train.seed))
    batch = synthetic_batch(config, model, template, rng)
    capacity = initial_capacity(model, batch, config.render.capacity_headroom)
    size = batch["images"].shape[2]
    mean, _ = model.encode_expression(batch["images"].astype(np.float32) / 255.0)
    posed, _ = decode_frames(model, batch, mean)
    colours = model.colours(posed, batch["world_to_cam"])
    cotangent = jnp.asarray(rng.normal(size=(*batch["images"].shape[:2], size, size, 3)), jnp.float32)

    @jax.jit
    def raster_grads(means, quats, scales, opacities, colours):
        def image_loss(*gaussians):
            render = jax.vmap(lambda m, q, s, o, c, v, k: kernels.rasterize(
                m, q, s, o, c, v, k, width=size, height=size, capacity=capacity.value).rgb)  # fmt: skip
            return jnp.sum(render(*gaussians, batch["world_to_cam"], batch["intrinsics"]) * cotangent)

        return jax.grad(image_loss, argnums=(0, 1, 2, 3, 4))(means, quats, scales, opacities, colours)

    def timed(fn) -> float:
        jax.block_until_ready(fn())  # compile and warm up
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats

    raster_s = timed(lambda: raster_grads(posed.means, posed.quats, posed.scales, posed.opacities, colours))
    trainer = Trainer(config.train, model, make_optimizer(config), make_loss_fn(config, capacity),
                      iter(grain.MapDataset.range(1).to_iter_dataset()), workdir)  # fmt: skip
    step_s = timed(lambda: trainer.train_step(batch)["loss"])
    trainer.close()
    images = batch["images"].shape[0] * batch["images"].shape[1]
    return {
        "gaussians": model.layout.num_gaussians, "batch_frames": batch["images"].shape[0],
        "views": batch["images"].shape[1], "image_size": size, "step_ms": 1e3 * step_s,
        "images_per_s": images / step_s, "raster_fwd_bwd_ms": 1e3 * raster_s, "raster_share": raster_s / step_s,
    }  # fmt: skip
