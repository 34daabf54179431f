"""Scale-out: two JAX processes train the tiny prior together and checkpoint; a missing process fails fast; the
checkpoint exports to a bundle that loads on one device."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.layouts import TINY_MODEL, rows, write_prior_layout
from helpers.processes import cpu_env, free_port

from uhap_jax.artifacts.bundles import load_bundle
from uhap_jax.artifacts.priors import export_bundle, load_prior
from uhap_jax.models.population import POPULATION_FILE


def _command(workdir, root, tmp_path, process_id: int, port: int, timeout_s: int) -> list[str]:
    return [
        sys.executable, "-m", "uhap_jax.cli", "train", "prior", "--config", "configs/prior.py:tiny",
        "--workdir", str(workdir), f"--config.data.root={root}", f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.data.batch_size=8", "--config.data.num_views=2", "--config.data.num_threads=0",
        "--config.eval.every=2", "--config.eval.num_frames=4", "--config.eval.batch_size=4",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.steps=2",
        "--config.train.mesh.fsdp=2", *TINY_MODEL,
        "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process_id),
        "--distributed_timeout", str(timeout_s),
    ]  # fmt: skip


def test_two_processes_train_checkpoint_and_export_to_one_device(tmp_path, rng):
    root, workdir = tmp_path / "layout", tmp_path / "run"
    write_prior_layout(root, rng)
    port = free_port()
    procs = [
        subprocess.Popen(_command(workdir, root, tmp_path, i, port, 120), env=cpu_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "running as process 0 of 2 processes (4 local / 8 global devices)" in outputs[0]
    train_rows = [r for r in rows(workdir) if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]  # written once, by process 0
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert (workdir / "checkpoints" / "2").is_dir()

    # The checkpoint was written by 2 processes over 8 devices; restore and export it here on one device.
    one_device = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    restored, config, _, step = load_prior(workdir, one_device)
    assert step == 2 and config.train.mesh.fsdp == 2
    reference = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
    for dtype, tolerance in (("float32", 0.0), ("bfloat16", 1e-2)):
        bundle = export_bundle(workdir, tmp_path / f"bundle_{dtype}", dtype=dtype)
        assert (bundle / POPULATION_FILE).is_file()  # written by process 0 alone, carried for personalisation
        model, _ = load_bundle(bundle, one_device)
        loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(reference)):
            assert got.dtype == want.dtype and len(got.sharding.device_set) == 1
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tolerance, atol=tolerance * 1e-2)
    # The float32 bundle decodes exactly as the restored checkpoint does.
    model, _ = load_bundle(tmp_path / "bundle_float32", one_device)
    res = config.model.uv_resolution
    args = (jnp.asarray(rng.normal(size=(2, config.model.z_dim)), jnp.float32),
            jnp.asarray(rng.normal(0, 0.01, size=(2, res, res, 6)), jnp.float32),
            jnp.asarray(rng.normal(0, 0.05, size=(2, 3)), jnp.float32), jnp.zeros((2, 3), jnp.float32))  # fmt: skip
    want, got = restored.decode(*args), model.decode(*args)
    assert np.isfinite(np.asarray(got.means)).all()
    np.testing.assert_allclose(np.asarray(got.means), np.asarray(want.means), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.opacities), np.asarray(want.opacities), rtol=1e-6)


def test_missing_process_fails_fast_with_a_clear_error(tmp_path, rng):
    root, workdir = tmp_path / "layout", tmp_path / "run"
    write_prior_layout(root, rng)
    start = time.monotonic()
    result = subprocess.run(_command(workdir, root, tmp_path, 0, free_port(), 10), env=cpu_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 200, f"took {elapsed:.0f} s to give up"
    assert "DEADLINE_EXCEEDED" in result.stderr or "timed out" in result.stderr.lower(), result.stderr[-2000:]


def test_bundle_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle.json"):
        load_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'checkpoints'}: no prior checkpoints"):
        load_prior(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_prior(tmp_path)
