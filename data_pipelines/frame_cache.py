"""Decoded frames: the prepared records' PNGs decoded once into uint8 arrays, one row per camera-frame.

The records (`tfds_builder`) hold every camera of a frame as PNG bytes. Training reads a record to use four of
its cameras and decodes their PNGs on every visit: at 512^2 that is most of the input pipeline's time. This
cache decodes every PNG once (in parallel threads) into memory-mapped `.npy` arrays laid out per
camera-frame, so a loader copies the four rows it needs and decodes nothing. Its records are the same dicts as
the ArrayRecord source's (same keys and values), except that the pixels come through `record["decoded"]`
(`DecodedViews`) instead of PNG bytes; `loaders` reads both alike, so batches are bit-identical.

Layout of a cache folder: `meta.json` (written last: a folder without it is incomplete), per-record tables
(`record_*.npy`, `audio*.npy`), per-row tables (`row_*.npy`: camera, pixel group, has_mask, cameras) and the
pixels, one pair of arrays per image size: `images_<g>.npy` [rows, H, W, 3] and `masks_<g>.npy` [rows, H, W]
(255 where a camera has no mask). Bytes: H * W * 4 per camera-frame (about 1 MiB at 512^2).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import loaders

FORMAT = 1
META_FILE = "meta.json"


def cache_path(data_dir: Path, dataset_dir: Path) -> Path:
    """Where the decoded cache of a prepared dataset lives: beside the TFDS folders under `data_dir`."""
    return Path(data_dir) / "decoded" / Path(dataset_dir).relative_to(data_dir)


def _planned_rows(records: Any) -> dict:
    """Row layout from the first record of each sequence (cameras and image sizes are per sequence)."""
    serials, groups = [], []
    record_first_row, row_serial, row_group, row_index = [0], [], [], []
    group_rows: list[int] = []
    audio_length = None
    for row in records.sequences:
        first = records.source[int(row["first_record"])]
        names = [s.decode() for s in first["serials"]]
        sizes = [tuple(int(v) for v in wh) for wh in first["image_size"]]  # (W, H)
        audio_length = int(first["audio"].shape[0]) if audio_length is None else audio_length
        for _ in range(row["num_frames"]):
            for name, size in zip(names, sizes):
                if name not in serials:
                    serials.append(name)
                if size not in groups:
                    groups.append(size)
                    group_rows.append(0)
                g = groups.index(size)
                row_serial.append(serials.index(name))
                row_group.append(g)
                row_index.append(group_rows[g])
                group_rows[g] += 1
            record_first_row.append(len(row_serial))
    return {
        "serials": serials, "groups": [list(g) for g in groups], "group_rows": group_rows,
        "audio_length": audio_length or 0, "record_first_row": np.asarray(record_first_row, np.int64),
        "row_serial": np.asarray(row_serial, np.int32), "row_group": np.asarray(row_group, np.int32),
        "row_index": np.asarray(row_index, np.int64),
    }  # fmt: skip


def _fill(cache: Path, dataset_dir: Path, start: int, stop: int) -> int:
    """Decodes records [start, stop) into the cache's (pre-allocated) arrays; one worker thread's share."""
    records = loaders.open_records(dataset_dir)
    meta = json.loads((cache / "plan.json").read_text())
    table = {name: np.load(cache / f"{name}.npy", mmap_mode="r+") for name in _RECORD_TABLES + _ROW_TABLES}
    first_row, row_group, row_index = (np.load(cache / f"{n}.npy") for n in ("record_first_row", "row_group",
                                                                             "row_index"))  # fmt: skip
    images = [np.load(cache / f"images_{g}.npy", mmap_mode="r+") for g in range(len(meta["groups"]))]
    masks = [np.load(cache / f"masks_{g}.npy", mmap_mode="r+") for g in range(len(meta["groups"]))]
    for r in range(start, stop):
        record = records.source[r]
        rows = np.arange(first_row[r], first_row[r + 1])
        names = [s.decode() for s in record["serials"]]
        if [meta["serials"][i] for i in table["row_serial"][rows]] != names:
            raise ValueError(f"{loaders._where(record)}: cameras {names} differ from its sequence's first frame")
        table["record_ints"][r] = [record["subject_id"], record["sequence_id"], record["frame_index"],
                                   record["num_frames"]]  # fmt: skip
        table["record_fps"][r] = record["fps"]
        table["audio"][r] = record["audio"]
        table["audio_valid"][r] = record["audio_valid"]
        table["row_world_to_cam"][rows] = record["world_to_cam"]
        table["row_intrinsics"][rows] = record["intrinsics"]
        table["row_image_size"][rows] = record["image_size"]
        for c, row in enumerate(rows):
            g, i = row_group[row], row_index[row]
            image = loaders._decode_png(record["images"][c], record, names[c])
            if image.shape != images[g].shape[1:]:
                raise ValueError(f"{loaders._where(record)}: camera {names[c]} image of shape {list(image.shape)}, "
                                 f"its sequence's first frame has {list(images[g].shape[1:])}")  # fmt: skip
            images[g][i] = image
            present = len(record["masks"][c]) > 0
            table["row_has_mask"][row] = present
            masks[g][i] = loaders._decode_png(record["masks"][c], record, names[c]) if present else 255
    for array in [*table.values(), *images, *masks]:
        array.flush()
    return stop - start


_RECORD_TABLES = ("record_ints", "record_fps", "audio", "audio_valid")
_ROW_TABLES = ("row_serial", "row_has_mask", "row_world_to_cam", "row_intrinsics", "row_image_size")


def build(dataset_dir: Path, cache: Path, *, workers: int | None = None, chunk: int = 64) -> Path:
    """Decodes every record of the prepared dataset at `dataset_dir` into `cache` (once: a complete cache of
    the same records is kept). `workers` threads decode in parallel (default: the machine's cores)."""
    dataset_dir, cache = Path(dataset_dir), Path(cache)
    fingerprint = _fingerprint(dataset_dir)
    if (cache / META_FILE).is_file() and json.loads((cache / META_FILE).read_text()).get("source") == fingerprint:
        return cache
    records = loaders.open_records(dataset_dir)
    plan = _planned_rows(records)
    num_records, num_rows = len(records.source), len(plan["row_serial"])
    if plan["record_first_row"][-1] != num_rows or len(plan["record_first_row"]) != num_records + 1:
        raise ValueError(f"{dataset_dir}: the sequence table does not cover its {num_records} records")
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("record_first_row", "row_serial", "row_group", "row_index"):
        np.save(partial / f"{name}.npy", plan[name])
    shapes = {
        "record_ints": ((num_records, 4), np.int32), "record_fps": ((num_records,), np.float32),
        "audio": ((num_records, plan["audio_length"]), np.float32),
        "audio_valid": ((num_records, plan["audio_length"]), np.bool_),
        "row_has_mask": ((num_rows,), np.bool_), "row_world_to_cam": ((num_rows, 4, 4), np.float32),
        "row_intrinsics": ((num_rows, 3, 3), np.float32), "row_image_size": ((num_rows, 2), np.int32),
    }  # fmt: skip
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(partial / f"{name}.npy", "w+", dtype, shape).flush()
    for g, ((width, height), rows) in enumerate(zip(plan["groups"], plan["group_rows"])):
        np.lib.format.open_memmap(partial / f"images_{g}.npy", "w+", np.uint8, (rows, height, width, 3)).flush()
        np.lib.format.open_memmap(partial / f"masks_{g}.npy", "w+", np.uint8, (rows, height, width)).flush()
    meta = {"format": FORMAT, "source": fingerprint, "num_records": num_records, "num_rows": num_rows,
            "serials": plan["serials"], "groups": plan["groups"]}  # fmt: skip
    (partial / "plan.json").write_text(json.dumps(meta))
    spans = [(s, min(s + chunk, num_records)) for s in range(0, num_records, chunk)]
    # Threads, not processes: PIL decodes without the GIL, and no process has to import the caller's main module.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(spans)))) as pool:
        for _ in pool.map(lambda span: _fill(partial, dataset_dir, *span), spans):
            pass
    (partial / META_FILE).write_text(json.dumps(meta))
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)
    return cache


def _fingerprint(dataset_dir: Path) -> str:
    """The prepared dataset's identity: its folder and the sizes of its record files."""
    files = sorted(p for p in dataset_dir.iterdir() if p.is_file())
    return f"{dataset_dir.resolve()}|" + ",".join(f"{p.name}:{p.stat().st_size}" for p in files)


class DecodedViews:
    """The pixels of one record's cameras: `images([i, ...])` [V, H, W, 3], `masks([i, ...])` [V, H, W];
    `lazy=True` gives `loaders.Rows` to be gathered later (one copy per batch)."""

    def __init__(self, frames: DecodedFrames, rows: np.ndarray):
        self._frames, self._rows = frames, rows

    def _gather(self, kind: str, indices, lazy: bool) -> np.ndarray | loaders.Rows:
        rows = self._rows[np.asarray(indices, np.int64)]
        groups = self._frames.table("row_group")[rows]
        if np.any(groups != groups[0]):
            raise ValueError(f"cameras {list(indices)} of one record differ in image size; they cannot stack")
        selected = loaders.Rows(self._frames.pixels(kind, int(groups[0])), self._frames.table("row_index")[rows])
        return selected if lazy else np.asarray(selected)

    def images(self, indices, *, lazy: bool = False) -> np.ndarray | loaders.Rows:
        return self._gather("images", indices, lazy)

    def masks(self, indices, *, lazy: bool = False) -> np.ndarray | loaders.Rows:
        return self._gather("masks", indices, lazy)


class DecodedFrames:
    """A random-access source of a decoded cache: `len()` and `[i]` give records like the ArrayRecord
    source's, with pixels through `record["decoded"]`. Arrays open lazily (memory-mapped), per process, so
    the source pickles into grain worker processes."""

    def __init__(self, cache: Path, sequences: list[dict]):
        self.cache = Path(cache)
        if not (self.cache / META_FILE).is_file():
            raise FileNotFoundError(f"{self.cache}: no {META_FILE}; build the decoded cache first (frame_cache.build)")
        self.meta = json.loads((self.cache / META_FILE).read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.cache}: decoded cache format {self.meta.get('format')}, expected {FORMAT}")
        self.sequences = sequences
        self._serials = np.array([s.encode() for s in self.meta["serials"]], dtype=object)
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def table(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.cache / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def pixels(self, kind: str, group: int) -> np.ndarray:
        return self.table(f"{kind}_{group}")

    def __len__(self) -> int:
        return int(self.meta["num_records"])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        first = self.table("record_first_row")
        rows = np.arange(first[index], first[index + 1])
        subject_id, sequence_id, frame_index, num_frames = (int(v) for v in self.table("record_ints")[index])
        row = self.sequences[sequence_id]
        return {
            "subject": row["subject"].encode(),
            "sequence": row["sequence"].encode(),
            "subject_id": np.int32(subject_id),
            "sequence_id": np.int32(sequence_id),
            "frame_index": np.int32(frame_index),
            "num_frames": np.int32(num_frames),
            "fps": self.table("record_fps")[index],
            "serials": self._serials[self.table("row_serial")[rows]],
            "has_mask": np.asarray(self.table("row_has_mask")[rows]),
            "image_size": np.asarray(self.table("row_image_size")[rows]),
            "world_to_cam": np.asarray(self.table("row_world_to_cam")[rows]),
            "intrinsics": np.asarray(self.table("row_intrinsics")[rows]),
            "audio": np.asarray(self.table("audio")[index]),
            "audio_valid": np.asarray(self.table("audio_valid")[index]),
            "decoded": DecodedViews(self, rows),
        }


def decoded_records(records: loaders.FrameRecords, cache: Path) -> loaders.FrameRecords:
    """`records` (the prepared ArrayRecord dataset) read from its decoded cache `cache` instead."""
    frames = DecodedFrames(cache, records.sequences)
    if len(frames) != len(records.source):
        raise ValueError(f"{cache}: {len(frames)} decoded records, the prepared dataset has {len(records.source)}")
    return loaders.FrameRecords(frames, records.sequences)
