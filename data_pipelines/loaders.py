"""grain loaders over the prepared frame records (`tfds_builder`): multi-view frames, audio windows aligned
to frames, and monocular frames.

Each process reads its own shard of the records (by `jax.process_index()`), batches them locally, and
`jax.make_array_from_process_local_data` joins the shards into global arrays with the given sharding (the
batch split over the `data` mesh axis). Images and masks stay uint8 until the step, so that host memory and
transfers stay four times smaller. The iterators' `get_state`/`set_state` go into checkpoints: a restored
iterator yields the same batches in the same order.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags
from PIL import Image

from data_pipelines.tfds_builder import SPLIT

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class FrameRecords:
    """A random-access view of one prepared split, with the builder's table of sequences."""

    source: Any  # tfds ArrayRecord data source: len() and [i] give decoded records
    sequences: list[dict]


def open_records(dataset_dir: Path, split: str = SPLIT) -> FrameRecords:
    """The records under a prepared dataset folder (`.../capture_frames/<config>/<version>`)."""
    builder = tfds.builder_from_directory(str(dataset_dir))
    return FrameRecords(builder.as_data_source(split=split), list(builder.info.metadata["sequences"]))


def _where(record: dict) -> str:
    subject, sequence = record["subject"].decode(), record["sequence"].decode()
    return f"record {subject}/{sequence}/frame {int(record['frame_index'])}"


class Rows:
    """Rows of one pixel array (a `frame_cache` table), not yet copied: a batch gathers them with one copy each
    (`stack_rows`) instead of copying per frame and again to stack."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.array[self.rows]
        return out if dtype is None else out.astype(dtype)


def stack_rows(items: list[Rows]) -> np.ndarray:
    """[len(items), *item.shape]: each item's rows copied once, straight into the batch."""
    out = np.empty((len(items), *items[0].shape), items[0].array.dtype)
    for slot, item in zip(out, items):
        np.take(item.array, item.rows, axis=0, out=slot)
    return out


def _decode_png(data: bytes, record: dict, serial: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"{_where(record)}: camera {serial} holds an undecodable PNG ({error})") from error


def _views(record: dict, indices: Sequence[int], lazy: bool = False) -> Batch:
    """The chosen cameras of one record: uint8 images [V,H,W,3], masks [V,H,W] (255 where none), cameras.
    `lazy`: from a decoded cache, the pixels stay `Rows` for `_stack` to gather into the batch."""
    if "decoded" in record:  # a frame_cache record: the pixels are decoded already, one row per camera
        images = record["decoded"].images(indices, lazy=lazy)
        masks = record["decoded"].masks(indices, lazy=lazy)
        has_mask = record["has_mask"][list(indices)]
    else:
        serials = [s.decode() for s in record["serials"]]
        images = np.stack([_decode_png(record["images"][i], record, serials[i]) for i in indices])
        has_mask = np.array([len(record["masks"][i]) > 0 for i in indices])
        masks = np.stack([
            _decode_png(record["masks"][i], record, serials[i]) if present else np.full(image.shape[:2], 255, np.uint8)
            for i, present, image in zip(indices, has_mask, images)
        ])  # fmt: skip
    return {
        "images": images,
        "masks": masks,
        "has_mask": has_mask,
        "camera_index": np.asarray(indices, np.int32),
        "world_to_cam": record["world_to_cam"][list(indices)],
        "intrinsics": record["intrinsics"][list(indices)],
    }


def _frame_fields(record: dict) -> Batch:
    return {
        "frame_index": np.int32(record["frame_index"]),
        "subject_id": np.int32(record["subject_id"]),
        "sequence_id": np.int32(record["sequence_id"]),
        "audio": record["audio"],
        "audio_valid": record["audio_valid"],
    }


@dataclasses.dataclass(frozen=True)
class SampleViews(grain.transforms.RandomMap):
    """`num_views` distinct cameras per frame, drawn from `serials` (e.g. the held-in cameras) or all.

    `encoder_views` > 0 draws that many more, independently of the first (they may overlap), as
    `encoder_images` [E,H,W,3] (and `encoder_camera_index`): the views a model encodes, apart from the views
    its loss renders, so the code it encodes cannot tell which cameras the loss will look through.
    """

    num_views: int
    serials: tuple[str, ...] | None = None
    lazy: bool = False  # decoded caches: leave the pixels for the batch to gather (`_views`)
    encoder_views: int = 0

    def random_map(self, record: dict, rng: np.random.Generator) -> Batch:
        serials = [s.decode() for s in record["serials"]]
        allowed = [i for i, s in enumerate(serials) if self.serials is None or s in self.serials]
        if len(allowed) < self.num_views:
            raise ValueError(f"{_where(record)}: {len(allowed)} usable cameras, {self.num_views} views asked")
        chosen = np.sort(rng.choice(allowed, self.num_views, replace=False))
        sample = _views(record, chosen, self.lazy) | _frame_fields(record)
        if self.encoder_views:
            if len(allowed) < self.encoder_views:
                raise ValueError(f"{_where(record)}: {len(allowed)} usable cameras, {self.encoder_views} encoder "
                                 "views asked")  # fmt: skip
            encoder = np.sort(rng.choice(allowed, self.encoder_views, replace=False))
            views = _views(record, encoder, self.lazy)
            sample |= {"encoder_images": views["images"], "encoder_camera_index": views["camera_index"]}
        return sample


@dataclasses.dataclass(frozen=True)
class SingleView(grain.transforms.Map):
    """The frame as one camera sees it: camera `serial`, or the record's only camera when None."""

    serial: str | None = None

    def map(self, record: dict) -> Batch:
        serials = [s.decode() for s in record["serials"]]
        if self.serial is None and len(serials) != 1:
            raise ValueError(f"{_where(record)}: {len(serials)} cameras {serials}; name the monocular one")
        if self.serial is not None and self.serial not in serials:
            raise ValueError(f"{_where(record)}: no camera {self.serial} (has {serials})")
        view = _views(record, [0 if self.serial is None else serials.index(self.serial)])
        return {key: value[0] for key, value in view.items()} | _frame_fields(record)


@dataclasses.dataclass(frozen=True)
class ConsecutiveFrames(grain.transforms.Map):
    """A window start (record index) → audio windows of `length` consecutive frames of one sequence."""

    source: Any
    length: int

    def map(self, start: int) -> Batch:
        records = [self.source[int(start) + k] for k in range(self.length)]
        frames = np.array([r["frame_index"] for r in records], np.int32)
        if len({int(r["sequence_id"]) for r in records}) != 1 or np.any(np.diff(frames) != 1):
            raise ValueError(f"{_where(records[0])}: records {start}..{start + self.length - 1} are not one run")
        return {
            "frame_index": frames,
            "subject_id": np.int32(records[0]["subject_id"]),
            "sequence_id": np.int32(records[0]["sequence_id"]),
            "audio": np.stack([r["audio"] for r in records]),
            "audio_valid": np.stack([r["audio_valid"] for r in records]),
        }


def window_starts(sequences: Sequence[dict], length: int, stride: int = 1) -> np.ndarray:
    """Record indices where a run of `length` frames of one sequence begins, every `stride` frames."""
    starts = [
        row["first_record"] + frame for row in sequences for frame in range(0, row["num_frames"] - length + 1, stride)
    ]
    if not starts:
        raise ValueError(f"no sequence has {length} frames for an audio window")
    return np.asarray(starts, np.int64)


def _stack(elements: Sequence[Batch]) -> Batch:
    """np.stack per key (lazy decoded rows gathered straight into the batch), with a clear error when frames
    of different sizes meet in one batch."""
    batch = {}
    for key in elements[0]:
        shapes = {np.shape(e[key]) for e in elements}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {key!r}: shapes {sorted(shapes)} differ (mixed resolutions?)")
        if isinstance(elements[0][key], Rows):
            batch[key] = stack_rows([e[key] for e in elements])
        else:
            batch[key] = np.stack([e[key] for e in elements])
    return batch


class _End:
    """The producer thread's last item: the data ended, or `error` stopped it."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class GlobalBatchIterator:
    """Global jax.Arrays from a per-process grain pipeline; its state restores the exact data order.

    With `device_prefetch` > 0 a thread keeps that many batches ahead, already copied to the devices, so the
    host's batching and the host-to-device copy overlap the step. `get_state()` is the state after the last
    batch handed out (not after those waiting in the queue), so a checkpoint resumes exactly after it. A
    `sharding` of None yields this process's numpy batches instead (to time the input pipeline alone).
    """

    def __init__(self, dataset: grain.MapDataset, sharding: jax.sharding.Sharding | None,
                 read_options: grain.ReadOptions, device_prefetch: int = 0, num_workers: int = 0):  # fmt: skip
        batches = dataset.to_iter_dataset(read_options)
        if num_workers > 0:  # worker processes build the batches: the training process's GIL stays free
            if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; the defaults do
                absl_flags.FLAGS.mark_as_parsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._iterator = iter(batches)
        self._sharding = sharding
        self._ahead = device_prefetch
        self._state = self._iterator.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> GlobalBatchIterator:
        return self

    def _global(self, local: Batch) -> dict[str, jax.Array] | Batch:
        if self._sharding is None:  # host batches only (timing the input pipeline alone)
            return local
        return {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in local.items()}

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = (self._global(next(self._iterator)), self._iterator.get_state())
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            out.put(_End())
        except BaseException as error:  # handed to the consumer, raised there
            out.put(_End(error))

    def __next__(self) -> dict[str, jax.Array]:
        if self._ahead <= 0:
            batch = self._global(next(self._iterator))
            self._state = self._iterator.get_state()
            return batch
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self._ahead), threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                            name="device-prefetch")  # fmt: skip
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _End):
            self._queue.put(item)  # later calls end (or fail) the same way
            if item.error is not None:
                raise item.error
            raise StopIteration
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (batches it read ahead are dropped; `get_state` does not count them)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self.close()
        self._iterator.set_state(state)
        self._state = self._iterator.get_state()


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How a loader walks the data; process_index/count default to this JAX process's."""

    global_batch: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_threads: int = 4
    prefetch: int = 16
    device_prefetch: int = 0  # global batches kept ready on the devices by a thread (0: none, copied on demand)
    num_workers: int = 0  # grain worker processes that build batches (0: threads of this process only)
    process_index: int | None = None
    process_count: int | None = None


def shard_for_process(dataset: grain.MapDataset, options: LoaderOptions) -> grain.MapDataset:
    """This process's disjoint share of `dataset` (every process_count-th element)."""
    index = jax.process_index() if options.process_index is None else options.process_index
    count = jax.process_count() if options.process_count is None else options.process_count
    return dataset[index::count]


def build_loader(
    elements: grain.MapDataset,
    transform: Callable[[grain.MapDataset], grain.MapDataset],
    sharding: jax.sharding.Sharding | None,
    options: LoaderOptions,
) -> GlobalBatchIterator:
    """`elements`, this process's share, shuffled (options.shuffle), repeated, `transform`ed and stacked into
    global batches of `options.global_batch` with `sharding`; checkpointable."""
    count = jax.process_count() if options.process_count is None else options.process_count
    if options.global_batch % count:
        raise ValueError(f"global batch {options.global_batch} does not split over {count} processes")
    dataset = shard_for_process(elements, options).seed(options.seed)
    if options.shuffle:
        dataset = dataset.shuffle()
    dataset = transform(dataset.repeat(options.num_epochs))
    dataset = dataset.batch(options.global_batch // count, drop_remainder=True, batch_fn=_stack)
    read_options = grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=options.prefetch)
    return GlobalBatchIterator(dataset, sharding, read_options, options.device_prefetch, options.num_workers)


def multiview_loader(
    records: FrameRecords,
    sharding: jax.sharding.Sharding | None,
    options: LoaderOptions,
    *,
    num_views: int,
    serials: Sequence[str] | None = None,
    encoder_views: int = 0,
) -> GlobalBatchIterator:
    """Frames with `num_views` sampled cameras each: images [B,V,H,W,3], masks, cameras, audio window; and
    `encoder_views` more drawn independently, as encoder_images [B,E,H,W,3] (see `SampleViews`)."""
    sampler = SampleViews(num_views, None if serials is None else tuple(serials), True, encoder_views)
    frames = grain.MapDataset.source(records.source)
    return build_loader(frames, lambda d: d.random_map(sampler), sharding, options)


def monocular_loader(
    records: FrameRecords,
    sharding: jax.sharding.Sharding | None,
    options: LoaderOptions,
    *,
    serial: str | None = None,
) -> GlobalBatchIterator:
    """Single-camera frames: image [B,H,W,3], mask, camera, audio window, indices."""
    return build_loader(grain.MapDataset.source(records.source), lambda d: d.map(SingleView(serial)), sharding, options)


def audio_window_loader(
    records: FrameRecords,
    sharding: jax.sharding.Sharding | None,
    options: LoaderOptions,
    *,
    num_frames: int,
    stride: int = 1,
) -> GlobalBatchIterator:
    """Runs of `num_frames` consecutive frames: audio [B,K,S] (each frame's window), frame_index [B,K]."""
    starts = grain.MapDataset.source(window_starts(records.sequences, num_frames, stride))
    windows = ConsecutiveFrames(records.source, num_frames)
    return build_loader(starts, lambda d: d.map(windows), sharding, options)
