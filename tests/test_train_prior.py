"""`uhap train prior` on a small capture layout that the test writes: metrics and eval rows, resume, and the
same step on 1 and 8 devices."""

import json
import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.layouts import SIZE, TINY_MODEL, rows, write_prior_layout
from helpers.models import randomise, small_model_config
from PIL import Image
from scipy.spatial.transform import Rotation

from data_pipelines import dataset as dataset_lib
from data_pipelines import layout, loaders
from uhap_jax import cli
from uhap_jax.artifacts.priors import load_prior
from uhap_jax.config_utils import load_config
from uhap_jax.eval import prior_eval
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import expression_gaussian_ids, lip_gaussian_ids, region_gaussian_ids, scan_uv_maps
from uhap_jax.models.identity_start import identity_maps
from uhap_jax.models.population import POPULATION_FILE, AlbedoPopulation
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import initial_capacity
from uhap_jax.train import prior_bench, prior_stage
from uhap_jax.train.loop import Trainer
from uhap_jax.train.mesh import make_mesh
from uhap_jax.train.optimizer import make_optimizer


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent XLA cache for this test only: the resumed run compiles the same step again."""
    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in options}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_train_prior_writes_metrics_with_eval_rows_and_resumes(tmp_path, rng, capsys, compilation_cache):
    root = tmp_path / "layout"
    write_prior_layout(root, rng)
    workdir = tmp_path / "run"
    common = [
        "train", "prior", "--config", "configs/prior.py:tiny", "--workdir", str(workdir),
        f"--config.data.root={root}", f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.data.batch_size=8", "--config.data.num_views=2", "--config.data.num_threads=0",
        "--config.eval.every=2", "--config.eval.num_frames=4", "--config.eval.batch_size=4",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.image_every=2",
        # The base preset's parameter average, checked on the image term at every step (a second forward pass).
        "--config.train.ema_decay=0.99", "--config.train.ema_check_metric=l1", "--config.train.ema_check_every=1",
        *TINY_MODEL,
    ]  # fmt: skip
    assert cli.main([*common, "--config.train.steps=2"]) == 0
    first = rows(workdir)
    train_rows = [r for r in first if "loss" in r]
    eval_rows = [r for r in first if "eval/psnr" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert [r["step"] for r in eval_rows] == [0, 2]
    for row in eval_rows:
        assert 0.0 < row["eval/psnr"] < 60.0 and -1.0 < row["eval/ssim"] < 1.0 and row["eval/scan_chamfer"] > 0.0
        assert row["eval/psnr_gain_fitted"] >= row["eval/psnr"] - 1e-3  # the fitted gain can only lower the error
    for row in train_rows:
        for name in ("l1", "ssim", "silhouette", "kl", "scan", "albedo", "offset", "scale", "psnr"):
            assert np.isfinite(row[name]), name
        assert row["raster_overflow"] == 0.0 and row["nonfinite_steps"] == 0
        # The KL's mean part is at most the KL (the variance part, exp(v) - 1 - v, is never negative); the
        # untrained posterior's log-variance starts near its initial value.
        assert 0.0 < row["kl_mean"] <= row["kl"] and 0.0 < row["code_abs_max"]
        assert row["code_log_var_min"] <= row["code_log_var_max"] < -7.0
        assert 0.5 < row["ema_fit_ratio"] < 1.25 and row["ema_restarts"] == 0  # early steps: close to the raw
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    population = AlbedoPopulation.load(workdir / POPULATION_FILE)  # the training identities', for personalisation
    assert population.mean.ndim == 2 and population.mean.shape[1] == 3 and np.all(np.isfinite(population.components))
    # Its average identity: the training identity's (id000's, the only one) registered scan, offset and albedo,
    # at the texels; personalisation without a scan starts there.
    prior, _, template, _ = load_prior(workdir)
    vertices, _, colours = layout.read_neutral_scan(layout.subject_dir(root, "id000"))
    scan = prior.layout.gather(scan_uv_maps(prior.layout, template, vertices, colours, "id000"))
    np.testing.assert_allclose(population.mean_offset, scan[:, :3], atol=1e-6)
    np.testing.assert_allclose(population.mean, scan[:, 3:], atol=1e-6)
    assert np.abs(population.mean_offset).max() > 1e-3  # the scan is not the template
    start = prior.layout.gather(identity_maps(prior, template, None, population))
    np.testing.assert_array_equal(start, np.concatenate([population.mean_offset, population.mean], -1))
    (grid,) = (workdir / "images").glob("render_gt_error_*.png")
    assert np.asarray(Image.open(grid)).shape == (2 * SIZE, 3 * SIZE, 3)  # the first frame's two views
    held_out = sorted((workdir / "images").glob("heldout_render_gt_error_*.png"))  # at every eval: steps 0 and 2
    assert [p.stem[-8:] for p in held_out] == ["00000000", "00000002"]
    cameras = len(json.loads((root / "dataset.json").read_text())["held_out_cameras"])
    assert np.asarray(Image.open(held_out[0])).shape == (prior_eval.IMAGE_FRAMES * cameras * SIZE, 3 * SIZE, 3)

    assert cli.main([*common, "--config.train.steps=4"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    second = rows(workdir)
    assert second[: len(first)] == first
    assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in second if "eval/psnr" in r] == [0, 2, 4]


def test_bad_split_file_names_the_file(tmp_path):
    layout.write_dataset_info(tmp_path, {"identities": {"train": ["id000"]}})
    records = loaders.FrameRecords(source=None, sequences=[])
    with pytest.raises(ValueError, match=r"dataset\.json: needs identities\.train, held_out_cameras"):
        dataset_lib.read_split(tmp_path, records, num_views=2)


def test_tracked_points_are_each_texels_point_on_its_frames_tracked_mesh(tmp_path, rng):
    """The tables keep the tracked vertices and give each Gaussian the barycentric point of its texel on the
    record's mesh (float64 reference), on the host and gathered on device; frames without a mesh are invalid."""
    root = tmp_path / "layout"
    write_prior_layout(root, rng)
    head = template_lib.procedural_head(24)
    seq_dir = layout.sequence_dir(root, "id000", "sen_00")
    tracked = head.vertices + rng.normal(0.0, 0.01, (4, *head.vertices.shape))
    layout.write_vertices(seq_dir, tracked)
    config = load_config("configs/prior.py:tiny", [o.removeprefix("--config.") for o in TINY_MODEL])
    config.data.cache_dir = str(tmp_path / "cache")
    config.loss.tracked_target = "motion"  # the tables then also hold each sequence's rest shape
    records = dataset_lib.prepared_records(root, config)
    model = UHAP(head, config.model, rngs=nnx.Rngs(0))
    tables = dataset_lib.subject_tables(root, records, model.layout, head, config)
    texels = model.layout
    assert tables.tracked_vertices.shape[1:] == head.vertices.shape  # vertices, not [N, 3] points per record
    first = {row["subject"]: row["first_record"] for row in records.sequences}
    record = first["id000"] + np.array([3, 0, 2])
    expected = np.einsum("nk,fnkd->fnd", texels.barys.astype(np.float64),
                         tracked[[3, 0, 2]][:, head.faces[texels.face_ids]])  # fmt: skip
    host = tables.record_rows(np.zeros(3, np.int32), record)
    np.testing.assert_allclose(host["tracked_points"], expected, atol=1e-6)
    np.testing.assert_array_equal(host["tracked_valid"], 1.0)
    device = jax.jit(lambda t, r: t.record_rows(jnp.zeros(3, jnp.int32), r))(jax.device_put(tables), record)
    np.testing.assert_allclose(device["tracked_points"], expected, atol=1e-6)
    unmeshed = tables.record_rows(np.ones(2, np.int32), first["id001"] + np.array([0, 3]))
    np.testing.assert_array_equal(unmeshed["tracked_valid"], 0.0)
    # The rest shape: the sequence's tracked meshes in head space (pose removed), averaged over its frames.
    meta = layout.read_sequence_meta(seq_dir)["head_pose"]
    matrices = Rotation.from_rotvec(np.asarray(meta["rotation_vector"], np.float64)).as_matrix()
    in_head = np.einsum("fji,fvj->fvi", matrices, tracked - np.asarray(meta["translation"])[:, None]).mean(0)
    rest = np.einsum("nk,nkd->nd", texels.barys.astype(np.float64), in_head[head.faces[texels.face_ids]])
    np.testing.assert_allclose(host["tracked_rest"], np.broadcast_to(rest, host["tracked_rest"].shape), atol=1e-6)


def test_same_loss_on_one_and_eight_devices(tmp_path, rng):
    config = load_config("configs/prior.py:tiny", [o.removeprefix("--config.") for o in TINY_MODEL])
    config.model.update(small_model_config())
    config.loss.scan_gaussians = 64  # a random subset: it must be the same one on every mesh
    config.train.sharding.min_shard_size = 64  # shard the small kernels over fsdp too
    head = template_lib.procedural_head(24)
    seed = int(rng.integers(1 << 30))
    model = UHAP(head, config.model, rngs=nnx.Rngs(seed))
    config.data.batch_size, config.data.num_views = 8, 2
    batch = prior_bench.synthetic_batch(config, model, head, rng)
    capacity = initial_capacity(model, batch, headroom=1.5)
    losses = {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(data=4, fsdp=2))):
        trainer = Trainer(
            config.train, UHAP(head, config.model, rngs=nnx.Rngs(seed)), make_optimizer(config),
            prior_stage.make_loss_fn(config, capacity), iter(grain.MapDataset.range(1).to_iter_dataset()),
            tmp_path / name, mesh=mesh,
        )  # fmt: skip
        if name == "eight":
            kernel = trainer.state["params"]["decoder"]["project"]["kernel"]
            assert "fsdp" in kernel.sharding.spec
        losses[name] = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
        trainer.close()
    assert np.all(np.isfinite(losses["one"])) and losses["one"][1] != losses["one"][0]
    np.testing.assert_allclose(losses["one"], losses["eight"], rtol=1e-5)


def test_camera_gains_scale_each_view_by_its_camera_and_learn_from_the_loss(rng):
    """`model.camera_gains`: a render is multiplied by exp(log gain) of its camera (float64 reference), an index
    outside the table gives NaN (a skipped step, never a clamped camera); in the prior loss, only the cameras of
    the batch get a gradient, of the sign that brightens renders darker than their (white) targets."""
    config = load_config("configs/prior.py:tiny", [o.removeprefix("--config.") for o in TINY_MODEL])
    config.model.update(small_model_config())
    config.model.camera_gains = 6
    head = template_lib.procedural_head(24)
    model = UHAP(head, config.model, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    table = rng.normal(0.0, 0.2, (6, 3))
    model.camera_log_gains[...] = jax.numpy.asarray(table, jax.numpy.float32)
    rgb = rng.uniform(0.1, 0.9, (2, 3, 4, 5, 3))
    index = rng.integers(0, 6, (2, 3))
    out = np.asarray(model.camera_response(jax.numpy.asarray(rgb, jax.numpy.float32), jax.numpy.asarray(index)))
    np.testing.assert_allclose(out, rgb * np.exp(table[index])[:, :, None, None, :], rtol=1e-5)
    index[1, 2] = 6
    out = np.asarray(model.camera_response(jax.numpy.asarray(rgb, jax.numpy.float32), jax.numpy.asarray(index)))
    assert np.isnan(out[1, 2]).all() and np.isfinite(out[0]).all() and np.isfinite(out[1, :2]).all()
    model.camera_log_gains[...] = jax.numpy.zeros((6, 3), jax.numpy.float32)
    config.data.batch_size, config.data.num_views = 2, 2
    batch = prior_bench.synthetic_batch(config, model, head, rng)
    batch["camera_index"] = np.asarray([[0, 2], [2, 4]], np.int32)
    batch["images"][:] = 255  # white targets: every render is darker, brighter cameras lower the loss
    loss_fn = prior_stage.make_loss_fn(config, initial_capacity(model, batch, headroom=1.5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, jax.random.key(0))[0]

    grads = np.asarray(jax.grad(loss_of)(params)["camera_log_gains"][...])
    assert (grads[[0, 2, 4]] < 0).all(), grads
    np.testing.assert_array_equal(grads[[1, 3, 5]], 0.0)


def _tracked_case(rng, batch_size: int):
    """(config, template, model, batch): a small prior at UV 32 (16² has no texel on the lips) whose encoder never
    sees the tracked mesh, so the tracked terms are its only path, and a synthetic batch with random tracked points
    on every frame."""
    config = load_config("configs/prior.py:tiny", [o.removeprefix("--config.") for o in TINY_MODEL])
    config.model.update(small_model_config())
    config.model.geometry_dropout = 1.0
    config.model.uv_resolution, config.model.decoder_channels = 32, (8, 8, 8)
    head = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(head, config.model, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    config.data.batch_size, config.data.num_views = batch_size, 2
    batch = prior_bench.synthetic_batch(config, model, head, rng)
    batch["tracked_points"] = rng.normal(0.0, 0.05, (batch_size, model.layout.num_gaussians, 3)).astype(np.float32)
    batch["tracked_valid"] = np.ones(batch_size, np.float32)
    return config, head, model, batch


def test_tracked_lips_pulls_only_the_lip_gaussians_to_their_tracked_points(rng, caplog):
    """`loss.tracked_lips`: a tracked-mesh term over the lips' Gaussians alone. Its gradient in the tracked points
    is -2 (mean - tracked) / (lips x valid frames) on every lip Gaussian of a valid frame and zero elsewhere, its
    value is that residual's mean square; with the weight at 0 it is not computed."""
    config, head, model, batch = _tracked_case(rng, 3)
    count = model.layout.num_gaussians
    batch["tracked_valid"] = np.asarray([1.0, 0.0, 1.0], np.float32)
    capacity = initial_capacity(model, batch, headroom=1.5)
    lips = lip_gaussian_ids(model.layout, head)
    key = jax.random.key(int(rng.integers(1 << 30)))

    def aux_of(weight: float):
        config.loss.tracked_lips = weight
        loss_fn = prior_stage.make_loss_fn(config, capacity)
        return lambda tracked: loss_fn(model, batch | {"tracked_points": tracked}, key)[1]

    assert "tracked_lips" not in jax.eval_shape(aux_of(0.0), batch["tracked_points"])  # off: not computed
    term = jax.jit(jax.value_and_grad(lambda t: aux_of(1e3)(t)["tracked_lips"]))
    value, grad = term(batch["tracked_points"])
    grad = np.asarray(grad, np.float64)
    others = np.setdiff1d(np.arange(count), lips)
    assert np.all(grad[:, others] == 0.0) and np.all(grad[1] == 0.0)  # not a lip, or an invalid frame
    assert np.all(np.abs(grad[[0, 2]][:, lips]).sum(-1) > 0)
    residual = -grad[[0, 2]][:, lips] * len(lips) * 2.0 / 2.0  # mean - tracked: the gradient x lips x frames / -2
    np.testing.assert_allclose(float(value), np.mean(np.sum(residual**2, -1)), rtol=1e-4)
    # A UV layout without a lip texel (16²) trains without the term, and one warning line says why.
    config.model.uv_resolution, config.model.decoder_channels = 16, (8, 8)
    coarse = UHAP(head, config.model, rngs=nnx.Rngs(0))
    coarse_maps = prior_bench.synthetic_batch(config, coarse, head, rng)["scan_maps"]
    coarse_batch = batch | {"tracked_points": batch["tracked_points"][:, : coarse.layout.num_gaussians],
                            "scan_maps": coarse_maps}  # fmt: skip
    loss_fn = prior_stage.make_loss_fn(config, initial_capacity(coarse, coarse_batch, headroom=1.5))
    with caplog.at_level(logging.WARNING, logger=prior_stage.logger.name):
        aux = jax.eval_shape(lambda b: loss_fn(coarse, b, key)[1], coarse_batch)
    assert "tracked_lips" not in aux and "tracked_mesh" in aux
    assert any("loss.tracked_lips is off" in r.getMessage() for r in caplog.records)


def test_tracked_mesh_scope_expression_pulls_only_the_gaussians_the_rig_moves(rng):
    """`loss.tracked_mesh_scope="expression"`: the tracked-mesh term's gradient reaches the tracked points of the
    Gaussians that the expression rig moves (lips yes, scalp no) and no other; "all" reaches every one; a typo
    is one clear error."""
    config, head, model, batch = _tracked_case(rng, 2)
    config.loss.tracked_lips = 0.0
    count = model.layout.num_gaussians
    capacity = initial_capacity(model, batch, headroom=1.5)
    key = jax.random.key(int(rng.integers(1 << 30)))
    moving = expression_gaussian_ids(model.layout, head)
    nearest = head.faces[model.layout.face_ids, np.argmax(model.layout.barys, axis=1)]
    assert set(lip_gaussian_ids(model.layout, head)) <= set(moving)
    assert not set(np.flatnonzero(head.region_mask("scalp")[nearest])) & set(moving)

    def reached(scope: str) -> np.ndarray:
        config.loss.tracked_mesh_scope = scope
        loss_fn = prior_stage.make_loss_fn(config, capacity)
        grad = jax.grad(lambda t: loss_fn(model, batch | {"tracked_points": t}, key)[1]["tracked_mesh"])
        return np.flatnonzero(np.abs(np.asarray(grad(batch["tracked_points"]))).sum((0, 2)) > 0)

    np.testing.assert_array_equal(reached("expression"), moving)
    np.testing.assert_array_equal(reached("all"), np.arange(count))
    with pytest.raises(ValueError, match="loss.tracked_mesh_scope must be"):
        config.loss.tracked_mesh_scope = "face"
        prior_stage.make_loss_fn(config, capacity)


def test_tracked_target_motion_is_blind_to_a_static_offset_of_the_tracker(rng):
    """`loss.tracked_target="motion"`: a per-point offset of the tracked meshes that is fixed in head space (moved
    with each frame's pose, and in the rest shape) leaves the term unchanged, where the position term grows."""
    config, _, model, batch = _tracked_case(rng, 3)
    randomise(model.decoder.out, rng)
    count = model.layout.num_gaussians
    batch["head_rotation"] = rng.normal(0.0, 0.3, (3, 3)).astype(np.float32)
    batch["tracked_rest"] = rng.normal(0.0, 0.05, (3, count, 3)).astype(np.float32)
    offset = rng.normal(0.0, 0.03, (count, 3))
    matrices = Rotation.from_rotvec(batch["head_rotation"].astype(np.float64)).as_matrix()
    shifted = batch | {"tracked_points": (batch["tracked_points"] + np.einsum("bij,nj->bni", matrices, offset)
                                          ).astype(np.float32),
                       "tracked_rest": (batch["tracked_rest"] + offset).astype(np.float32)}  # fmt: skip
    capacity = initial_capacity(model, batch, headroom=1.5)
    key = jax.random.key(int(rng.integers(1 << 30)))

    def terms(target: str, b: dict) -> tuple[float, float]:
        config.loss.tracked_target = target
        aux = jax.jit(lambda b: prior_stage.make_loss_fn(config, capacity)(model, b, key)[1])(b)
        return float(aux["tracked_mesh"]), float(aux["tracked_lips"])

    np.testing.assert_allclose(terms("motion", shifted), terms("motion", batch), rtol=2e-4)
    assert terms("position", shifted)[0] > 1.05 * terms("position", batch)[0]
    with pytest.raises(ValueError, match="loss.tracked_target must be"):
        config.loss.tracked_target = "velocity"
        prior_stage.make_loss_fn(config, capacity)


def test_hair_shell_lifts_the_scalp_off_the_scan_and_tracked_terms(tmp_path, rng):
    """`model.hair_shell`: the scalp's Gaussians start that far out along the outward normal and the others stay;
    the neutral-scan and tracked-mesh terms then ignore the scalp's Gaussians (moving them changes neither) and
    still see every other one; the scan points are sampled off the registered scan's scalp."""
    config, head, model, batch = _tracked_case(rng, 2)
    config.loss.tracked_lips = 0.0
    config.loss.scan_gaussians = 1 << 20  # every compared Gaussian: no random subset
    config.model.hair_shell = 0.02
    shelled = UHAP(head, config.model, rngs=nnx.Rngs(0))
    count = model.layout.num_gaussians
    scalp = region_gaussian_ids(model.layout, head, "scalp")
    others = np.setdiff1d(np.arange(count), scalp)
    assert scalp.size > 0.1 * count
    before = np.asarray(model.template_points[...], np.float64)
    after = np.asarray(shelled.template_points[...], np.float64)
    np.testing.assert_allclose(np.linalg.norm(after - before, axis=1)[scalp], 0.02, rtol=1e-4)
    np.testing.assert_array_equal(after[others], before[others])
    centre = before.mean(0)
    assert np.all(np.linalg.norm(after[scalp] - centre, axis=1) > np.linalg.norm(before[scalp] - centre, axis=1))

    capacity = initial_capacity(shelled, batch, headroom=1.5)
    key = jax.random.key(int(rng.integers(1 << 30)))
    displaced = UHAP(head, config.model, rngs=nnx.Rngs(0))  # the shelled prior's parameters, the scalp moved
    displaced.template_points[...] = jnp.asarray(after + np.isin(np.arange(count), scalp)[:, None] * 0.3, jnp.float32)

    def scan_term(prior: UHAP, shell: float) -> float:
        config.model.hair_shell = shell
        return float(prior_stage.make_loss_fn(config, capacity)(prior, batch, key)[1]["scan"])

    assert scan_term(displaced, 0.02) == pytest.approx(scan_term(shelled, 0.02), rel=1e-6)
    assert scan_term(displaced, 0.0) > 1.5 * scan_term(shelled, 0.0)  # without the shell the scalp is compared

    def reached(shell: float) -> np.ndarray:
        config.model.hair_shell = shell
        loss_fn = prior_stage.make_loss_fn(config, capacity)
        grad = jax.grad(lambda t: loss_fn(shelled, batch | {"tracked_points": t}, key)[1]["tracked_mesh"])
        return np.flatnonzero(np.abs(np.asarray(grad(batch["tracked_points"]))).sum((0, 2)) > 0)

    np.testing.assert_array_equal(reached(0.02), others)
    np.testing.assert_array_equal(reached(0.0), np.arange(count))

    # The tables' scan points: off the scalp with the shell, about a quarter on it without.
    root = tmp_path / "layout"
    write_prior_layout(root, rng)
    config.data.cache_dir = str(tmp_path / "cache")
    records = dataset_lib.prepared_records(root, config)
    small_head = template_lib.procedural_head(config.model.template_resolution)
    small = UHAP(small_head, config.model, rngs=nnx.Rngs(0))
    vertices, _, _ = layout.read_neutral_scan(layout.subject_dir(root, "id000"))

    def on_scalp(shell: float) -> float:
        config.model.hair_shell = shell
        points = dataset_lib.subject_tables(root, records, small.layout, small_head, config).scan_points[0]
        nearest = np.argmin(np.linalg.norm(points[:, None] - vertices[None], axis=-1), axis=1)
        return float(np.mean(small_head.region_mask("scalp")[nearest]))

    assert on_scalp(0.02) < 0.05 < 0.15 < on_scalp(0.0)
