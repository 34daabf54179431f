"""The dataset as the stages see it: its root (a capture layout, or the synthetic one generated into the cache),
its prepared frame records, dataset.json's split, per-subject tables (neutral scans, head poses, tracked meshes),
the multi-view sequences that carry targets, and global batches that gather table rows on device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import frame_cache, layout, loaders, synth, tfds_builder
from uhap_jax.config_utils import apply_override
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import TexelLayout, scan_uv_maps

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("held_out_sentence", "held_out_identity")


def cache_dir(config: ml_collections.ConfigDict) -> Path:
    """`data.cache_dir`, else $UHAP_CACHE, else ~/.cache/uhap: where generated data and prepared records go."""
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


def with_data_of(prior_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 source: str) -> ml_collections.ConfigDict:  # fmt: skip
    """A copy of the prior's config with the data fields (root, synth_preset, cache_dir) that a later stage's
    `config.data` sets; `source` names that config in errors."""
    merged = ml_collections.ConfigDict(prior_cfg.to_dict())
    for field in ("root", "synth_preset", "cache_dir"):
        if config.data.get(field):
            apply_override(merged, f"data.{field}={config.data[field]}", source=source)
    return merged


def prepared_records(root: Path, config: ml_collections.ConfigDict) -> loaders.FrameRecords:
    """The layout's frame records, prepared once per layout (keyed by its path and dataset.json)."""
    key = hashlib.sha256(str(root.resolve()).encode() + (root / layout.DATASET_FILE).read_bytes()).hexdigest()
    data_dir = cache_dir(config) / "records" / key[:16]
    if jax.process_index() == 0:
        tfds_builder.prepare(root, data_dir)
    multihost_utils.sync_global_devices("uhap prior records")
    dataset_dir = tfds_builder.prepare(root, data_dir)  # prepared: this only finds it
    records = loaders.open_records(dataset_dir)
    if config.data.get("decoded", False):  # PNGs decoded once into a uint8 cache, so that loaders decode nothing
        cache = frame_cache.cache_path(data_dir, dataset_dir)
        if jax.process_index() == 0:
            started = time.perf_counter()
            frame_cache.build(dataset_dir, cache, workers=config.data.get("decode_workers", 0) or None)
            logger.info("decoded frame cache %s ready in %.1f s", cache, time.perf_counter() - started)
        multihost_utils.sync_global_devices("uhap decoded frames")
        records = frame_cache.decoded_records(records, cache)
    return records


def encoder_views(config: ml_collections.ConfigDict) -> int:
    """Views the encoder sees apart from the rendered ones: data.encoder_views, -1 for as many as num_views."""
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
    """dataset.json's training identities and held-out cameras, checked against the records."""
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


def loader_options(config: ml_collections.ConfigDict, **overrides) -> loaders.LoaderOptions:
    """A stage config's loader settings: `data.batch_size` (global), `train.seed`, `data.num_threads`/`prefetch`,
    and where set `data.device_prefetch`/`num_workers`; `overrides` replace any of them."""
    options = dict(global_batch=config.data.batch_size, seed=config.train.seed, num_threads=config.data.num_threads,
                   prefetch=config.data.prefetch, device_prefetch=config.data.get("device_prefetch", 0),
                   num_workers=config.data.get("num_workers", 0))  # fmt: skip
    return loaders.LoaderOptions(**(options | overrides))


def train_frames(records: loaders.FrameRecords, split: Split) -> loaders.FrameRecords:
    """The records of the split's training frames (train-split sequences of the training identities)."""
    return loaders.FrameRecords(RecordSubset(records.source, split.train_records), records.sequences)


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
    # The tracked meshes' vertices [num_records, V, 3] (world), or [0, V, 3]; a Gaussian's tracked point is its
    # texel's barycentric mix of the vertices `texel_corners` [N, 3] with weights `texel_barys` [N, 3]. Vertices,
    # not points, so that the table is V/N of the size (UV 256: 14.5k vertices for 65.5k texels).
    tracked_vertices: np.ndarray
    tracked_valid: np.ndarray  # [num_records] 1 where the sequence has tracked meshes
    texel_corners: np.ndarray
    texel_barys: np.ndarray
    # Each sequence's mean tracked mesh in head space [num_sequences, V, 3] (pose removed; [0, V, 3] unless
    # `loss.tracked_target="motion"`, which measures motion from it), and each record's sequence [num_records].
    tracked_rest_vertices: np.ndarray
    record_sequence: np.ndarray

    def rows(self, subject_id: np.ndarray, sequence_id: np.ndarray, frame_index: np.ndarray) -> dict:
        """The per-example fields of a batch (numpy tables on the host, or device arrays under jit)."""
        return self.record_rows(subject_id, self.first_record[sequence_id] + frame_index)

    def record_rows(self, subject_id: np.ndarray, record: np.ndarray) -> dict:
        """`rows` by record index."""
        pose = self.head_pose[record]
        tracked = {}
        if self.tracked_vertices.shape[0]:
            corners = self.tracked_vertices[record][..., self.texel_corners, :]  # [..., N, 3 corners, 3]
            points = (corners * self.texel_barys[..., None]).sum(-2)
            tracked = {"tracked_points": points, "tracked_valid": self.tracked_valid[record]}
            if self.tracked_rest_vertices.shape[0]:  # loss.tracked_target="motion" only
                rest = self.tracked_rest_vertices[self.record_sequence[record]][..., self.texel_corners, :]
                tracked["tracked_rest"] = (rest * self.texel_barys[..., None]).sum(-2)
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


def subject_tables(root: Path, records: loaders.FrameRecords, texels: TexelLayout, template: template_lib.Template,
                   config: ml_collections.ConfigDict) -> SubjectTables:  # fmt: skip
    """The subjects' neutral scans (UV maps on `texels`, `config.loss.scan_points` sampled points, off the scalp
    when `config.model.hair_shell` > 0) and, per record, head pose and (when `config.loss.tracked_mesh` > 0) the
    tracked surface at each texel."""
    subjects = sorted({row["subject"] for row in records.sequences})
    maps, points, normals, colours = [], [], [], []
    for index, subject in enumerate(subjects):
        subject_path = layout.subject_dir(root, subject)
        vertices, faces, vertex_colours = layout.read_neutral_scan(subject_path)
        maps.append(scan_uv_maps(texels, template, vertices, vertex_colours, str(subject_path / layout.SCAN_DIR)))
        if config.model.get("hair_shell", 0.0) > 0 and "scalp" in template.region_names:
            faces = faces[~template.region_mask("scalp")[faces].any(axis=1)]  # the registration's skull, not the hair
        sample = sample_scan(vertices, faces, vertex_colours, config.loss.scan_points, np.random.default_rng(index))
        for table, values in zip((points, normals, colours), sample):
            table.append(values)
    poses, first, tracked, valid, rest = [], [], [], [], []
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
            vertices = _tracked_vertices(seq_dir, row["num_frames"], texels)
            valid.append(np.full(row["num_frames"], vertices is not None, np.float32))
            tracked.append(vertices if vertices is not None else np.zeros((row["num_frames"], texels.num_vertices, 3)))
            if config.loss.get("tracked_target", "position") == "motion":
                rotation = np.asarray(rotations.axis_angle_to_matrix(pose[:, :3]), np.float64)  # head = R^T (world - t)
                rest.append(np.einsum("fji,fvj->fvi", rotation, tracked[-1] - pose[:, None, 3:]).mean(0))
    if config.loss.tracked_mesh > 0 and not any(v[0] for v in valid):
        logger.warning("loss.tracked_mesh > 0 but no sequence of %s has %s: the term is zero", root,
                       layout.VERTICES_FILE)  # fmt: skip
    if [row["first_record"] for row in records.sequences] != first:
        raise ValueError(f"{root}: the records' sequence table is not in record order")
    return SubjectTables(
        *(np.stack(table).astype(np.float32) for table in (maps, points, normals, colours)),
        head_pose=np.concatenate(poses).astype(np.float32), first_record=np.asarray(first, np.int32),
        tracked_vertices=(np.concatenate(tracked).astype(np.float32) if tracked
                          else np.zeros((0, texels.num_vertices, 3), np.float32)),
        tracked_valid=np.concatenate(valid) if valid else np.zeros((0,), np.float32),
        texel_corners=template.faces[texels.face_ids].astype(np.int32),
        texel_barys=texels.barys.astype(np.float32),
        tracked_rest_vertices=(np.stack(rest).astype(np.float32) if rest
                               else np.zeros((0, texels.num_vertices, 3), np.float32)),
        record_sequence=np.repeat(np.arange(len(poses), dtype=np.int32), [len(p) for p in poses]),
    )  # fmt: skip


def _tracked_vertices(seq_dir: Path, num_frames: int, texels: TexelLayout) -> np.ndarray | None:
    """The tracked meshes' vertices of a sequence [F, V, 3], or None when it has none."""
    if not (seq_dir / layout.VERTICES_FILE).is_file():
        return None
    vertices = layout.read_vertices(seq_dir, num_frames=num_frames)
    if vertices.shape[1] != texels.num_vertices:
        raise ValueError(f"{seq_dir / layout.VERTICES_FILE}: {vertices.shape[1]} vertices per frame, but the "
                         f"template (model.template_resolution) has {texels.num_vertices}")  # fmt: skip
    return vertices


class GatheredBatches:
    """A global-batch iterator whose batches gain per-example rows from tables kept on device (`_attach`, jitted);
    its state (for checkpoints) is the inner iterator's. Subclasses place the tables and define `_attach`."""

    def __init__(self, inner: loaders.GlobalBatchIterator, placed_tables, sharding: jax.sharding.Sharding):
        """`sharding`: the global batches' (the mesh's batch sharding)."""
        self._inner = inner
        self._tables = placed_tables
        self._gather = jax.jit(self._attach, out_shardings=sharding)

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


# ------------------------------------------------------------------------------------- sequences


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One multi-view sequence: its audio at 16 kHz mono (`layout.AUDIO_RATE`), padded to cover every frame, when
    read, and its target codes once encoded."""

    subject: str
    name: str
    subject_id: int
    split: str
    sentence: int | str  # dataset.json's sentence_index, or the sequence name when it has none
    first_record: int
    num_frames: int
    waveform: np.ndarray
    codes: np.ndarray | None = None  # [num_frames, z_dim] once encoded

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.name}"


def coded_sequences(root: Path, records: loaders.FrameRecords, held_in: list[str]) -> list[Sequence]:
    """The train, held-out-sentence and held-out-identity sequences that every held-in camera saw (no audio)."""
    info = layout.read_dataset_info(root)
    train_subjects = set(info["identities"]["train"])
    chosen = []
    for row in records.sequences:
        entry = info["sequences"].get(row["subject"], {}).get(row["sequence"], {})
        split = entry.get("split")
        if split not in ("train", *EVAL_SPLITS) or (split == "train" and row["subject"] not in train_subjects):
            continue
        if set(held_in) - set(row["serials"]):
            continue  # monocular or partial captures carry no multi-view target
        chosen.append(Sequence(
            row["subject"], row["sequence"], row["subject_id"], split, entry.get("sentence_index", row["sequence"]),
            row["first_record"], row["num_frames"], np.zeros(0, np.float32),
        ))  # fmt: skip
    if not any(s.split == "train" for s in chosen):
        raise ValueError(f"{root / layout.DATASET_FILE}: no train-split multi-view sequence of a training identity")
    return chosen


def read_sequences(root: Path, records: loaders.FrameRecords, held_in: list[str], fps: float) -> list[Sequence]:
    """`coded_sequences` with their audio, all at `fps`; there must be held-out ones to evaluate on."""
    sequences = []
    fps_of = {(row["subject"], row["sequence"]): row["fps"] for row in records.sequences}
    for sequence in coded_sequences(root, records, held_in):
        seq_dir = layout.sequence_dir(root, sequence.subject, sequence.name)
        if fps_of[sequence.subject, sequence.name] != fps:
            raise ValueError(f"{seq_dir / layout.META_FILE}: fps {fps_of[sequence.subject, sequence.name]}, but the "
                             f"training sequences are at {fps}")  # fmt: skip
        waveform, notes = layout.read_audio(seq_dir / layout.AUDIO_FILE)
        for note in notes:
            logger.info("audio input: %s", note)
        needed = math.ceil(sequence.num_frames * layout.AUDIO_RATE / fps)
        sequences.append(dataclasses.replace(sequence, waveform=np.pad(waveform, (0, max(needed - waveform.size, 0)))))
    if not any(s.split != "train" for s in sequences):
        raise ValueError(f"{root / layout.DATASET_FILE}: no held-out sentence or identity to evaluate on")
    return sequences


def training_fps(root: Path, records: loaders.FrameRecords) -> float:
    """The frame rate of the training identities' sequences: the speech model's output rate on this data."""
    info = layout.read_dataset_info(root)
    train_subjects = set(info.get("identities", {}).get("train", ()))
    fps = next((float(row["fps"]) for row in records.sequences if row["subject"] in train_subjects), None)
    if fps is None:
        raise ValueError(f"{root / layout.DATASET_FILE}: no sequence of a training identity (identities.train)")
    return fps


def window_audio(waveform: np.ndarray, start_frame: int, num_samples: int, fps: float) -> np.ndarray:
    """`num_samples` of the waveform from frame `start_frame` on (at `fps`), zero-padded past its end."""
    start = round(start_frame * layout.AUDIO_RATE / fps)
    window = waveform[start : start + num_samples]
    return np.pad(window, (0, num_samples - window.size))
