"""Personalisation's mouth shift (`tune.mouth`): which Gaussians it moves and how, that it is stored in the
identity's maps, and that the photometric fit finds a known shift of the mouth from frames that show it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from helpers.models import small_model_config
from helpers.seeds import fresh_seed

from uhap_jax.geometry import cameras
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import lip_gaussian_ids, scan_uv_maps
from uhap_jax.models.identity_start import texel_regions
from uhap_jax.models.personal import PersonalModel, mouth_weights
from uhap_jax.models.prior import UHAP

SIZE = 48


def _tune(**values) -> ml_collections.ConfigDict:
    tune = ml_collections.ConfigDict(
        {"bias_maps": False, "albedo": False, "shape": False, "shape_grid": 0, "mouth": False, "decoder_layers": 0,
         "pose": "none"}
    )  # fmt: skip
    tune.update(values)
    return tune


def _setup(seed: int):
    """A small prior on the template (uv 32, so that the lips hold Gaussians), the template as the scan with
    region colours (the lips dark against the skin), and the lips' mask."""
    template = template_lib.procedural_head(32)
    config = small_model_config()
    config.uv_resolution, config.decoder_channels = 32, (8, 8, 8)
    prior = UHAP(template, config, rngs=nnx.Rngs(seed))
    colours = np.full(template.vertices.shape, 0.75, np.float32)
    for region, colour in (("lips", (0.6, 0.1, 0.1)), ("mouth_interior", (0.05, 0.0, 0.0)), ("teeth", (1.0,) * 3)):
        colours[template.region_mask(region)] = colour
    maps = scan_uv_maps(prior.layout, template, template.vertices, colours, "test")
    lips = np.zeros(prior.layout.num_gaussians, bool)
    lips[lip_gaussian_ids(prior.layout, template)] = True
    return template, prior, maps, lips


def test_mouth_weights_move_the_mouth_rigidly_and_fade_with_distance():
    rng = np.random.default_rng(fresh_seed("mouth weights"))
    centre = rng.normal(0.0, 0.01, 3)
    lips = centre + rng.normal(0.0, 0.005, (40, 3))
    lips += centre - lips.mean(0)  # their centre exactly there
    directions = rng.normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    distances = rng.uniform(0.0, 0.12, 200)
    points = np.concatenate([lips, centre + directions * distances[:, None]])
    mask = np.arange(len(points)) < len(lips)
    weights = mouth_weights(points, mask, rigid_m=0.03, falloff_m=0.015)
    expected = np.exp(-(np.maximum(distances - 0.03, 0.0) ** 2) / (2 * 0.015**2))
    np.testing.assert_allclose(weights[len(lips) :], expected, rtol=1e-5, atol=1e-7)
    assert np.all(weights[len(lips) :][distances < 0.03] == 1.0)
    assert np.all(weights[len(lips) :][distances > 0.1] < 0.01)


def test_the_mouth_shift_moves_only_the_mouth_across_the_view_axis_and_is_stored():
    seed = fresh_seed("mouth shift maps")
    rng = np.random.default_rng(seed)
    template, prior, maps, lips = _setup(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    model = PersonalModel(prior, maps, _tune(mouth=True), 1, axis, lips)
    shift = rng.normal(0.0, 0.5, 3)  # units of 1 cm
    model.mouth[...] = jnp.asarray(shift, jnp.float32)
    moved = np.asarray(model.scan_maps())
    rows, cols = prior.layout.texel_yx.T
    delta = (moved - maps)[rows, cols, :3]
    across = 0.01 * (shift - (shift @ axis) * axis)
    np.testing.assert_allclose(delta[lips], np.broadcast_to(across, delta[lips].shape), atol=1e-6)
    np.testing.assert_allclose(delta @ axis, 0.0, atol=1e-6)  # nothing moves along the line of sight
    regions = texel_regions(prior, template)
    for far in ("scalp", "neck", "eyeball"):
        assert np.abs(delta[regions == template.region_names.index(far)]).max() < 0.2 * np.abs(across).max()
    np.testing.assert_array_equal(moved[..., 3:], maps[..., 3:])  # the albedo stays

    still = PersonalModel(prior, maps, _tune(bias_maps=True), 1, axis)
    assert still.mouth is None and "mouth" not in nnx.to_pure_dict(nnx.state(still))  # absent unless tune.mouth
    np.testing.assert_array_equal(np.asarray(still.scan_maps()), maps)
    with pytest.raises(ValueError, match="lips"):
        PersonalModel(prior, maps, _tune(mouth=True), 1, axis, np.zeros_like(lips))


def test_the_fit_finds_a_known_shift_of_the_mouth():
    """Frames rendered with the mouth moved 4 mm across the face: the fit, started at no shift, finds it."""
    seed = fresh_seed("mouth shift fit")
    rng = np.random.default_rng(seed)
    template, prior, maps, lips = _setup(seed)
    views = np.stack([cameras.look_at(0.5 * np.array([np.sin(a), 0.0, -np.cos(a)]), np.array([0.0, -0.03, 0.0]))
                      for a in (-0.3, 0.0, 0.3)]).astype(np.float32)[:, None]  # fmt: skip
    ks = np.broadcast_to(cameras.intrinsics_from_fov(25.0, SIZE, SIZE), (3, 1, 3, 3)).astype(np.float32)
    z = jnp.asarray(rng.normal(0.0, 0.5, (3, prior.z_dim)), jnp.float32)
    pose = jnp.zeros((3, 3), jnp.float32)
    model = PersonalModel(prior, maps, _tune(mouth=True), 3, np.array([0.0, 0.0, 1.0]), lips)
    capacity = 4 * prior.capacity_for(prior.decode(z, jnp.broadcast_to(maps, (3, *maps.shape)), pose, pose),
                                      views, ks, width=SIZE, height=SIZE)  # fmt: skip

    def render(model):
        scan = jnp.broadcast_to(model.scan_maps(), (3, *maps.shape))
        out = model.prior.render(model.prior.decode(z, scan, pose, pose), views, ks, width=SIZE, height=SIZE,
                                 capacity=capacity)  # fmt: skip
        return out.rgb[:, 0]

    truth = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.5), rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4),
                      0.0])  # fmt: skip
    model.mouth[...] = jnp.asarray(truth, jnp.float32)
    target = jax.lax.stop_gradient(render(model))
    model.mouth[...] = jnp.zeros(3, jnp.float32)
    assert float(jnp.mean(jnp.abs(render(model) - target))) > 1e-4  # the shift shows in the frames

    optimizer = nnx.Optimizer(model, optax.adam(0.03), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.abs(render(m) - target)))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(120):
        step(model, optimizer)
    found = np.asarray(model.mouth_shift()) / model.MOUTH_UNIT
    assert np.abs(found[:2] - truth[:2]).max() < 0.1, (found, truth)  # within 1 mm of a 3-6 mm shift
    assert abs(found[2]) < 1e-6  # along the view axis it does not move
