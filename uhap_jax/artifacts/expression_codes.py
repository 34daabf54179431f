"""Expression codes as targets: a prior's posterior mean for every frame of the multi-view sequences, from all
held-in views, computed once per prior checkpoint and cached (`expression_codes.npz` in the stage's workdir).
The audio stage learns them from speech, the encoder stage from one view; evaluation compares against them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders
from uhap_jax.artifacts.output_dirs import save_npz_atomic
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import encoder_geometry

logger = logging.getLogger(__name__)

CODES_FILE = "expression_codes.npz"
# Codes computed or read in this process, by cache key: {key: {sequence key: codes}}. The stages of `uhap demo`
# run in one process and each keeps its cache file in its own workdir; they share the codes through this.
_IN_PROCESS: dict[str, dict[str, np.ndarray]] = {}


def codes_key(prior_workdir: Path, prior_step: int, root: Path, held_in: list[str]) -> str:
    """What a cache of codes is valid for: the prior checkpoint, the data (its dataset.json) and the cameras."""
    digest = hashlib.sha256((root / layout.DATASET_FILE).read_bytes()).hexdigest()[:16]
    return f"{prior_workdir.resolve()}@{prior_step}|{root.resolve()}|{digest}|{','.join(held_in)}"


def cached_codes(cache: Path, key: str, sequences: list[dataset_lib.Sequence]) -> list[dataset_lib.Sequence] | None:
    """The sequences with their codes from `cache` when it holds them for `key`; None when it is missing, for
    another prior, data or cameras, or unreadable (a run killed while writing it): the codes are then recomputed."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) == key and all(s.key in stored for s in sequences):
                cached = [dataclasses.replace(s, codes=np.asarray(stored[s.key])) for s in sequences]
                logger.info("expression codes: cached in %s", cache)
                return cached
        logger.info("expression codes: %s is for another prior, data or cameras; recomputing", cache)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # a write cut short
        logger.warning("expression codes: %s is unreadable (%s); recomputing", cache, error)
    return None


def expression_codes(
    prior: UHAP, records: loaders.FrameRecords, tables: dataset_lib.SubjectTables,
    sequences: list[dataset_lib.Sequence], held_in: list[str], batch_size: int, cache: Path, key: str,
) -> list[dataset_lib.Sequence]:  # fmt: skip
    """Each sequence with its targets: the prior's posterior mean per frame, from all held-in views (and the
    frame's tracked mesh where the capture has one).

    Read from `cache` when it was written for the same prior checkpoint, data and cameras (`key`); else
    computed (batches of `batch_size` frames, the last one padded) and written there by process 0.
    """
    cached = cached_codes(cache, key, sequences)
    if cached is None:
        cached = _in_process_codes(cache, key, sequences)
    if cached is not None:
        _IN_PROCESS.setdefault(key, {}).update({s.key: s.codes for s in cached})
        return cached
    views = loaders.SampleViews(len(held_in), tuple(held_in))  # every held-in camera: no randomness left
    graphdef, state = nnx.split(prior)

    @jax.jit
    def encode(state, images, rows):
        model = nnx.merge(graphdef, state)
        return model.encode_expression(images / 255.0, encoder_geometry(model, rows))[0]

    frames = [(s, f) for s in sequences for f in range(s.num_frames)]
    rng = np.random.default_rng(0)
    codes = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = np.stack([views.random_map(records.source[s.first_record + f], rng)["images"] for s, f in chunk])
        rows = tables.record_rows(np.asarray([s.subject_id for s, _ in chunk]),
                                  np.asarray([s.first_record + f for s, f in chunk]))  # fmt: skip
        codes.append(np.asarray(encode(state, images.astype(np.float32), rows)))
    codes = np.concatenate(codes)[: len(frames)]
    bounds = np.cumsum([0] + [s.num_frames for s in sequences])
    sequences = [dataclasses.replace(s, codes=codes[a:b]) for s, a, b in zip(sequences, bounds[:-1], bounds[1:])]
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(cache, key=np.asarray(key), **{s.key: s.codes for s in sequences})
        logger.info("expression codes: %d frames encoded by the prior, cached in %s", len(frames), cache)
    _IN_PROCESS.setdefault(key, {}).update({s.key: s.codes for s in sequences})
    return sequences


def _in_process_codes(cache: Path, key: str, sequences: list[dataset_lib.Sequence]
                      ) -> list[dataset_lib.Sequence] | None:  # fmt: skip
    """The sequences with the codes this process computed or read earlier for `key` (another stage's, the same
    prior checkpoint, data and cameras), also written to `cache`; None unless every sequence is there."""
    known = _IN_PROCESS.get(key, {})
    if not sequences or not all(s.key in known for s in sequences):
        return None
    sequences = [dataclasses.replace(s, codes=known[s.key]) for s in sequences]
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(cache, key=np.asarray(key), **{s.key: s.codes for s in sequences})
    logger.info("expression codes: computed earlier in this process; cached in %s", cache)
    return sequences


def code_targets(
    prior: UHAP, prior_step: int, prior_workdir: str | Path, root: Path, records: loaders.FrameRecords,
    tables: dataset_lib.SubjectTables, held_in: list[str], batch_size: int, cache: Path,
    keep: Callable[[dataset_lib.Sequence], bool] | None = None,
) -> tuple[list[dataset_lib.Sequence], np.ndarray]:  # fmt: skip
    """The coded sequences (those `keep` accepts), and per record the prior's code [num_records, z_dim] (zero for
    uncoded records). The codes are `expression_codes`'s.
    """
    sequences = [s for s in dataset_lib.coded_sequences(root, records, held_in) if keep is None or keep(s)]
    key = codes_key(Path(prior_workdir), prior_step, root, held_in)
    sequences = expression_codes(
        prior=prior, records=records, tables=tables, sequences=sequences, held_in=held_in, batch_size=batch_size,
        cache=cache, key=key,
    )  # fmt: skip
    codes = np.zeros((len(records.source), prior.z_dim), np.float32)
    for s in sequences:
        codes[s.first_record : s.first_record + s.num_frames] = s.codes
    return sequences, codes


def speech_targets(
    config: ml_collections.ConfigDict, prior_cfg: ml_collections.ConfigDict, prior: UHAP, prior_step: int,
    root: Path, records: loaders.FrameRecords, fps: float, codes_cache: Path,
) -> tuple[list[dataset_lib.Sequence], np.ndarray]:  # fmt: skip
    """The train and eval sequences with the prior's codes as targets, and the subjects' scan UV maps."""
    template = template_lib.procedural_head(prior_cfg.model.template_resolution)
    split = dataset_lib.read_split(root, records, prior_cfg.data.num_views)
    tables = dataset_lib.subject_tables(root, records, prior.layout, template, prior_cfg)
    sequences = dataset_lib.read_sequences(root, records, split.held_in_cameras, fps)
    key = codes_key(Path(config.prior_workdir), prior_step, root, split.held_in_cameras)
    sequences = expression_codes(prior, records, tables, sequences, split.held_in_cameras,
                                 config.data.code_batch_size, codes_cache, key)  # fmt: skip
    return sequences, tables.scan_maps
