"""grain loaders: correct views and windows, process sharding, restorable order, and a jitted sharded step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.records import prepare_tiny  # the tiny layout and its prepared records are shared with the TFDS test
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import loaders


@pytest.fixture
def prepared(tmp_path, rng):
    dataset_dir, truth = prepare_tiny(tmp_path, rng)
    return loaders.open_records(dataset_dir), truth


@pytest.fixture
def mesh():
    return jax.make_mesh((8,), ("data",))


def _options(**overrides) -> loaders.LoaderOptions:
    defaults = dict(global_batch=8, seed=3, num_threads=2, prefetch=4)
    return loaders.LoaderOptions(**(defaults | overrides))


def _subject(records, sequence_id: int) -> str:
    return records.sequences[sequence_id]["subject"]


def test_multiview_batches_hold_the_sampled_cameras_and_feed_a_jitted_step(prepared, mesh):
    records, truth = prepared
    sharding = NamedSharding(mesh, P("data"))
    iterator = loaders.multiview_loader(records, sharding, _options(), num_views=2, serials=["cam0", "cam1"])
    batch = next(iterator)
    assert batch["images"].shape == (8, 2, 12, 16, 3) and batch["images"].dtype == jnp.uint8
    assert batch["images"].sharding.spec == P("data") and len(batch["images"].addressable_shards) == 8
    host = jax.device_get(batch)
    for b in range(8):
        expected = truth[_subject(records, host["sequence_id"][b])]
        frame = host["frame_index"][b]
        assert set(host["camera_index"][b]) == {0, 1}  # cam2 is held out
        for v, c in enumerate(host["camera_index"][b]):
            np.testing.assert_array_equal(host["images"][b, v], expected["images"][frame, c])
            world_to_cam = expected["cameras"][c].world_to_cam.astype(np.float32)
            np.testing.assert_array_equal(host["world_to_cam"][b, v], world_to_cam)
            assert host["has_mask"][b, v] == (c == 1)
            mask = expected["masks"][frame] if c == 1 else np.full((12, 16), 255)
            np.testing.assert_array_equal(host["masks"][b, v], mask)

    @jax.jit
    def step(batch):
        pixels = batch["images"].astype(jnp.float32) / 255.0
        weights = batch["masks"].astype(jnp.float32)[..., None] / 255.0
        per_example = (pixels * weights).mean(axis=(1, 2, 3, 4)) + batch["world_to_cam"][:, :, 2, 3].mean(1)
        return per_example, per_example.sum()

    with jax.set_mesh(mesh):
        per_example, total = step(batch)
    assert per_example.sharding.spec == P("data")
    np.testing.assert_allclose(float(total), float(np.asarray(per_example).sum()), rtol=1e-6)


def test_restored_iterator_repeats_the_same_order(prepared, mesh):
    records, _ = prepared
    sharding = NamedSharding(mesh, P("data"))
    first = loaders.multiview_loader(records, sharding, _options(), num_views=2)
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [jax.device_get(next(first)) for _ in range(3)]
    resumed = loaders.multiview_loader(records, sharding, _options(), num_views=2)
    resumed.set_state(state)
    for want in expected:
        got = jax.device_get(next(resumed))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other_seed = jax.device_get(next(loaders.multiview_loader(records, sharding, _options(seed=4), num_views=2)))
    fresh = jax.device_get(next(loaders.multiview_loader(records, sharding, _options(), num_views=2)))
    assert not all(np.array_equal(other_seed[k], fresh[k]) for k in ("frame_index", "camera_index"))


def test_each_process_reads_a_disjoint_share(prepared):
    records, _ = prepared
    frames = loaders.grain.MapDataset.source(np.arange(len(records.source)))
    shares = [list(loaders.shard_for_process(frames, _options(process_index=i, process_count=3))) for i in range(3)]
    assert sorted(sum(shares, [])) == list(range(len(records.source)))


def test_audio_windows_are_consecutive_frames_of_one_sequence(prepared, mesh):
    records, _ = prepared
    sharding = NamedSharding(mesh, P("data"))
    options = _options(num_epochs=1, shuffle=False)
    batches = list(loaders.audio_window_loader(records, sharding, options, num_frames=3, stride=1))
    assert len(batches) == 0  # 3 + 2 windows < one global batch of 8 with drop_remainder
    starts = loaders.window_starts(records.sequences, 3)
    np.testing.assert_array_equal(starts, [0, 1, 2, 5, 6])
    iterator = loaders.audio_window_loader(records, sharding, _options(), num_frames=3)
    batch = jax.device_get(next(iterator))
    assert batch["audio"].shape == (8, 3, 1600)
    for b in range(8):
        row = records.sequences[batch["sequence_id"][b]]
        first = batch["frame_index"][b, 0]
        np.testing.assert_array_equal(batch["frame_index"][b], first + np.arange(3))
        for k in range(3):
            record = records.source[row["first_record"] + first + k]
            np.testing.assert_array_equal(batch["audio"][b, k], record["audio"])
            np.testing.assert_array_equal(batch["audio_valid"][b, k], record["audio_valid"])


def test_monocular_frames_use_the_named_camera(prepared, mesh):
    records, truth = prepared
    sharding = NamedSharding(mesh, P("data"))
    batch = jax.device_get(next(loaders.monocular_loader(records, sharding, _options(), serial="cam2")))
    assert batch["images"].shape == (8, 12, 16, 3)
    for b in range(8):
        expected = truth[_subject(records, batch["sequence_id"][b])]
        np.testing.assert_array_equal(batch["images"][b], expected["images"][batch["frame_index"][b], 2])
        np.testing.assert_array_equal(batch["intrinsics"][b], expected["cameras"][2].intrinsics.astype(np.float32))
    with pytest.raises(ValueError, match="3 cameras"):
        next(loaders.monocular_loader(records, sharding, _options()))
