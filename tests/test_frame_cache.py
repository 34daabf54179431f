"""The decoded frame cache reads back every record exactly, and loaders over it yield the same batches as over
the PNG records (same seed: bit-identical images); the device prefetch keeps the order and restorable state."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.records import prepare_tiny, write_tiny_layout
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import frame_cache, loaders, tfds_builder
from uhap_jax import cli


@pytest.fixture
def both(tmp_path, rng):
    dataset_dir, _ = prepare_tiny(tmp_path, rng)
    records = loaders.open_records(dataset_dir)
    cache = frame_cache.build(dataset_dir, frame_cache.cache_path(tmp_path / "tfds", dataset_dir), workers=1)
    return records, frame_cache.decoded_records(records, cache)


def _options(**overrides) -> loaders.LoaderOptions:
    return loaders.LoaderOptions(**(dict(global_batch=8, seed=5, num_threads=2, prefetch=4) | overrides))


def test_decoded_records_equal_the_png_records(both):
    records, decoded = both
    assert len(decoded.source) == len(records.source) == 9
    for index in range(len(records.source)):
        want, got = records.source[index], decoded.source[index]
        assert set(got) - {"decoded", "has_mask"} == set(want) - {"images", "masks"}
        for key in set(want) - {"images", "masks"}:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        cameras = range(len(want["serials"]))
        views = loaders._views(want, list(cameras))
        np.testing.assert_array_equal(got["decoded"].images(list(cameras)), views["images"])
        np.testing.assert_array_equal(got["decoded"].masks(list(cameras)), views["masks"])
        np.testing.assert_array_equal(got["has_mask"], views["has_mask"])


def test_loaders_over_the_cache_yield_the_png_loaders_batches(both):
    records, decoded = both
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    old = loaders.multiview_loader(records, sharding, _options(), num_views=2, serials=["cam0", "cam1", "cam2"])
    new = loaders.multiview_loader(decoded, sharding, _options(device_prefetch=2), num_views=2,
                                   serials=["cam0", "cam1", "cam2"])  # fmt: skip
    for _ in range(4):  # past one epoch of 9 frames
        want, got = jax.device_get(next(old)), jax.device_get(next(new))
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    new.close()
    mono_old = jax.device_get(next(loaders.monocular_loader(records, sharding, _options(), serial="cam1")))
    mono_new = jax.device_get(next(loaders.monocular_loader(decoded, sharding, _options(), serial="cam1")))
    for key in mono_old:
        np.testing.assert_array_equal(mono_new[key], mono_old[key], err_msg=key)


def test_prefetching_iterator_state_is_after_the_last_batch_handed_out(both):
    _, decoded = both
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    first = loaders.multiview_loader(decoded, sharding, _options(device_prefetch=3), num_views=2)
    for _ in range(2):
        next(first)
    state = first.get_state()  # the thread has read further ahead by now
    expected = [jax.device_get(next(first)) for _ in range(3)]
    first.close()
    resumed = loaders.multiview_loader(decoded, sharding, _options(device_prefetch=3), num_views=2)
    next(resumed)  # started and read ahead: set_state must drop what it read
    resumed.set_state(state)
    for want in expected:
        got = jax.device_get(next(resumed))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    resumed.close()


def test_finite_epochs_end_and_errors_reach_the_consumer(both):
    _, decoded = both
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    one_epoch = loaders.multiview_loader(decoded, sharding, _options(num_epochs=1, device_prefetch=2), num_views=2)
    assert len(list(one_epoch)) == 1  # 9 frames, batches of 8, remainder dropped
    with pytest.raises(StopIteration):
        next(one_epoch)
    too_many = loaders.multiview_loader(decoded, sharding, _options(device_prefetch=2), num_views=4)
    with pytest.raises(ValueError, match="3 usable cameras, 4 views asked"):
        next(too_many)


def test_parallel_build_matches_and_a_complete_cache_is_kept(tmp_path, both):
    records, decoded = both
    dataset_dir = tmp_path / "tfds" / decoded.source.cache.relative_to(tmp_path / "tfds" / "decoded")
    parallel = frame_cache.build(dataset_dir, tmp_path / "parallel", workers=2, chunk=4)
    again = frame_cache.DecodedFrames(parallel, records.sequences)
    for index in range(len(records.source)):
        a, b = decoded.source[index], again[index]
        np.testing.assert_array_equal(a["decoded"].images([0, 1, 2]), b["decoded"].images([0, 1, 2]))
        np.testing.assert_array_equal(a["decoded"].masks([0, 1, 2]), b["decoded"].masks([0, 1, 2]))
        np.testing.assert_array_equal(a["world_to_cam"], b["world_to_cam"])
    stamp = (parallel / frame_cache.META_FILE).stat().st_mtime_ns
    assert frame_cache.build(dataset_dir, parallel, workers=2) == parallel
    assert (parallel / frame_cache.META_FILE).stat().st_mtime_ns == stamp  # not decoded again
    with pytest.raises(FileNotFoundError, match="build the decoded cache"):
        frame_cache.DecodedFrames(tmp_path / "nowhere", records.sequences)


def test_encoder_views_are_an_independent_draw_that_leaves_the_rendered_views_alone(both):
    records, decoded = both
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    plain = jax.device_get(next(loaders.multiview_loader(records, sharding, _options(), num_views=2)))
    both_sets = jax.device_get(next(loaders.multiview_loader(decoded, sharding, _options(), num_views=2,
                                                             encoder_views=2)))  # fmt: skip
    for key in plain:
        np.testing.assert_array_equal(both_sets[key], plain[key], err_msg=key)
    assert both_sets["encoder_images"].shape == (8, 2, 12, 16, 3)
    differs = 0
    for b in range(8):
        record = records.source[records.sequences[both_sets["sequence_id"][b]]["first_record"]
                                + both_sets["frame_index"][b]]  # fmt: skip
        cameras = both_sets["encoder_camera_index"][b]
        np.testing.assert_array_equal(both_sets["encoder_images"][b], loaders._views(record, cameras)["images"])
        differs += not np.array_equal(cameras, both_sets["camera_index"][b])
    assert differs > 0  # drawn apart from the rendered views (3 cameras, pairs: equal for 1 frame in 3)


def test_worker_processes_yield_the_same_batches(both):
    _, decoded = both
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    threads = loaders.multiview_loader(decoded, sharding, _options(), num_views=2, encoder_views=1)
    workers = loaders.multiview_loader(decoded, sharding, _options(num_workers=2, device_prefetch=2), num_views=2,
                                       encoder_views=1)  # fmt: skip
    for _ in range(3):
        want, got = jax.device_get(next(threads)), jax.device_get(next(workers))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    workers.close()


def test_data_prepare_decoded_writes_the_cache_that_loaders_read(tmp_path, rng):
    write_tiny_layout(tmp_path / "layout", rng)
    assert cli.main(["data", "prepare", "--root", str(tmp_path / "layout"), "--data-dir", str(tmp_path / "out"),
                     "--audio-window", "0.1", "--decoded"]) == 0  # fmt: skip
    config, version = tfds_builder.config_for(0.1).name, tfds_builder.VERSION
    dataset_dir = tmp_path / "out" / tfds_builder.NAME / config / version
    records = loaders.open_records(dataset_dir)
    decoded = frame_cache.decoded_records(records, frame_cache.cache_path(tmp_path / "out", dataset_dir))
    np.testing.assert_array_equal(decoded.source[4]["decoded"].images([0, 1, 2]),
                                  loaders._views(records.source[4], [0, 1, 2])["images"])  # fmt: skip
