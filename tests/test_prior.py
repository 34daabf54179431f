"""The UHAP prior model, its losses and the image metrics, on small random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.models import random_cameras, randomise, small_model_config
from safetensors.numpy import save_file

from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models import image_metrics, losses
from uhap_jax.models.prior import UHAP


@pytest.fixture(scope="module")
def head() -> template_lib.Template:
    return template_lib.procedural_head(24)


def test_untrained_gaussians_sit_on_the_surface_and_follow_the_head_pose(head, rng):
    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    face_ids, barys, _ = template_lib.uv_sample(head, 16)
    num = len(face_ids)
    assert model.layout.num_gaussians == num
    scan_vertices = head.vertices + rng.normal(0.0, 0.003, head.vertices.shape).astype(np.float32)
    albedo = rng.uniform(0.0, 1.0, head.vertices.shape).astype(np.float32)
    maps = scan_uv_maps(model.layout, head, scan_vertices, albedo, "test scan")
    batch = 3
    rotation_vectors = rng.normal(0.0, 0.2, (batch, 3)).astype(np.float32)
    translations = rng.normal(0.0, 0.01, (batch, 3)).astype(np.float32)
    z = rng.normal(size=(batch, 8)).astype(np.float32)
    out = model.decode(z, np.stack([maps] * batch), rotation_vectors, translations)

    assert out.means.shape == (batch, num, 3) and out.quats.shape == (batch, num, 4)
    assert out.scales.shape == (batch, num, 3) and out.opacities.shape == (batch, num)
    scan_points = template_lib.surface_points(scan_vertices, head.faces, face_ids, barys)
    rotation = np.asarray(rotations.axis_angle_to_matrix(rotation_vectors))
    expected = np.einsum("bij,nj->bni", rotation, scan_points) + translations[:, None]
    np.testing.assert_allclose(out.means, expected, atol=1e-6)
    np.testing.assert_allclose(out.head_means, np.broadcast_to(scan_points, out.head_means.shape), atol=1e-6)
    np.testing.assert_allclose(out.offsets, 0.0)
    normal, tangent = template_lib.surface_frames(head.vertices, head.faces, head.uvs, face_ids)
    frames = np.stack([tangent, np.cross(normal, tangent), normal], axis=-1)
    np.testing.assert_allclose(
        rotations.quaternion_to_matrix(out.quats), np.einsum("bij,njk->bnik", rotation, frames), atol=1e-5
    )
    assert np.all(out.scales[..., 2] < out.scales[..., 0]) and np.all(out.scales > 0)
    np.testing.assert_allclose(out.opacities, 1 / (1 + np.exp(-3.0)), rtol=1e-6)
    np.testing.assert_allclose(out.albedo[0], template_lib.surface_points(albedo, head.faces, face_ids, barys),
                               atol=1e-6)  # fmt: skip

    # Once the decoder's output layer is trained, z moves the Gaussians off the surface, and differently per z.
    randomise(model.decoder.out, rng)
    moved = model.decode(z, np.stack([maps] * batch), rotation_vectors, translations)
    assert np.abs(moved.offsets).max() > 1e-4
    assert not np.allclose(moved.offsets[0], moved.offsets[1])


def test_scan_in_another_topology_is_refused(head, rng):
    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(0))
    vertices = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"subjects/x/neutral_scan: neutral scan has 10 vertices"):
        scan_uv_maps(model.layout, head, vertices, vertices, "subjects/x/neutral_scan")


def test_render_shapes_and_view_dependent_colour(head, rng):
    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    albedo = rng.uniform(0.2, 0.8, head.vertices.shape).astype(np.float32)
    maps = np.stack([scan_uv_maps(model.layout, head, head.vertices, albedo, "scan")] * 2)
    views, intrinsics = random_cameras(rng, 3, 32)
    views, intrinsics = np.stack([views] * 2), np.stack([intrinsics] * 2)
    gaussians = model.decode(rng.normal(size=(2, 8)).astype(np.float32), maps, np.zeros((2, 3)), np.zeros((2, 3)))
    colours = model.colours(gaussians, views)
    assert colours.shape == (2, 3, model.layout.num_gaussians, 3)
    np.testing.assert_allclose(colours, np.broadcast_to(gaussians.albedo[:, None], colours.shape), atol=1e-6)
    capacity = model.capacity_for(gaussians, views, intrinsics, width=32, height=32)
    out = model.render(gaussians, views, intrinsics, width=32, height=32, capacity=capacity)
    assert out.rgb.shape == (2, 3, 32, 32, 3) and out.alpha.shape == (2, 3, 32, 32)
    assert 0.05 < float(jnp.mean(out.alpha)) < 0.9  # the head covers part of each image
    randomise(model.color_out, rng)
    randomise(model.decoder.out, rng)
    gaussians = model.decode(rng.normal(size=(2, 8)).astype(np.float32), maps, np.zeros((2, 3)), np.zeros((2, 3)))
    colours = np.asarray(model.colours(gaussians, views))
    assert np.abs(colours[:, 0] - colours[:, 1]).mean() > 1e-3  # the view direction changes the colour


def test_view_independent_colour_is_the_same_from_every_camera(head, rng):
    config = small_model_config()
    config.view_dependent = False
    model = UHAP(head, config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    randomise(model.color_out, rng)
    randomise(model.decoder.out, rng)
    albedo = rng.uniform(0.2, 0.8, head.vertices.shape).astype(np.float32)
    maps = np.stack([scan_uv_maps(model.layout, head, head.vertices, albedo, "scan")] * 2)
    views, _ = random_cameras(rng, 3, 32)
    gaussians = model.decode(rng.normal(size=(2, 8)).astype(np.float32), maps, np.zeros((2, 3)), np.zeros((2, 3)))
    colours = np.asarray(model.colours(gaussians, np.stack([views] * 2)))
    np.testing.assert_array_equal(colours[:, 0], colours[:, 2])
    assert np.abs(colours - np.asarray(gaussians.albedo)[:, None]).mean() > 1e-3  # the features still colour


def test_normal_tilt_is_the_thin_axis_angle_from_the_surface_normal(head, rng):
    """`normal_tilt` = 1 - cos of the angle between each Gaussian's thin (third) axis and its texel's surface
    normal, both in world space under a random head pose (float64 reference from the posed quaternions)."""
    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    randomise(model.decoder.out, rng, scale=1.0)
    maps = np.stack([scan_uv_maps(model.layout, head, head.vertices, np.full(head.vertices.shape, 0.5), "s")] * 2)
    pose = rng.normal(0.0, 0.5, (2, 3)).astype(np.float32)
    out = model.decode(rng.normal(size=(2, 8)).astype(np.float32), maps, pose, np.zeros((2, 3), np.float32))
    axes = np.asarray(rotations.quaternion_to_matrix(np.asarray(out.quats, np.float64)))[..., 2]
    normal, _ = template_lib.surface_frames(head.vertices, head.faces, head.uvs, model.layout.face_ids)
    world_normal = np.einsum("bij,nj->bni", np.asarray(out.head_rotation, np.float64), normal)
    expected = 1.0 - np.sum(axes * world_normal, -1) / np.linalg.norm(axes, axis=-1)
    np.testing.assert_allclose(out.normal_tilt, expected, atol=2e-5)
    assert expected.max() > 0.05  # the random decoder does tilt them


def test_expression_posterior_shapes_and_view_order_invariance(head, rng):
    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    images = rng.uniform(0.0, 1.0, (2, 3, 32, 32, 3)).astype(np.float32)
    mean, log_var = model.encode_expression(images)
    assert mean.shape == log_var.shape == (2, 8)
    shuffled_mean, _ = model.encode_expression(images[:, ::-1])
    np.testing.assert_allclose(mean, shuffled_mean, rtol=1e-5, atol=1e-6)
    other_mean, _ = model.encode_expression(images[::-1])
    assert not np.allclose(mean[0], other_mean[0])


def test_a_bounded_posterior_squashes_the_raw_mean_and_caps_the_variance_at_the_priors(head, rng):
    config = small_model_config()
    raw = UHAP(head, config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    config.code_bound = 2.0
    bounded = UHAP(head, config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    # Outputs far beyond the bounds, of both signs in every draw: biases of N(0, 4) left every log-variance below 0
    # for 1 seed in 256 (the log-variance kernel starts at zero, so its outputs are the biases).
    heads = raw.expression_encoder
    signs = rng.permutation(np.resize([1.0, -1.0], heads.mean.bias.shape))
    heads.mean.bias[...] = jnp.asarray(signs * rng.uniform(3.0, 8.0, signs.shape), jnp.float32)
    heads.log_var.bias[...] = jnp.asarray(-signs * rng.uniform(1.0, 8.0, signs.shape), jnp.float32)
    nnx.update(bounded.expression_encoder, nnx.state(heads))
    images = rng.uniform(0.0, 1.0, (2, 3, 32, 32, 3)).astype(np.float32)
    raw_mean, raw_log_var = (np.asarray(x, np.float64) for x in raw.encode_expression(images))
    mean, log_var = bounded.encode_expression(images)
    assert np.abs(raw_mean).max() > 2.0 and raw_log_var.max() > 0.0
    np.testing.assert_allclose(mean, 2.0 * np.tanh(raw_mean / 2.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_var, -np.logaddexp(0.0, -raw_log_var), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(mean)).max() < 2.0 and np.asarray(log_var).max() < 0.0


# ------------------------------------------------------------------------------------- losses and metrics


def test_kl_divergence_known_values(rng):
    mean = rng.normal(size=(4, 16))
    log_var = rng.normal(0.0, 0.5, size=(4, 16))
    sigma = np.exp(0.5 * log_var)
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per dimension.
    expected = np.mean(np.sum(-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5, axis=-1))
    np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(mean), jnp.asarray(log_var)), expected, rtol=1e-5)
    assert float(losses.kl_divergence(jnp.zeros((2, 5)), jnp.zeros((2, 5)))) == 0.0


def test_view_colour_spread_against_float64_and_zero_for_view_independent_colour(rng):
    colours = rng.uniform(0.0, 1.0, size=(2, 5, 64, 3))  # [B, C, N, 3]
    spread = colours - colours.mean(axis=1, keepdims=True)
    expected = np.mean(np.sum(spread**2, axis=-1))  # over batch, cameras and Gaussians
    got = float(losses.view_colour_spread(jnp.asarray(colours, jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    same = np.broadcast_to(colours[:, :1], colours.shape)  # every camera sees the same colour
    assert float(losses.view_colour_spread(jnp.asarray(same, jnp.float32))) < 1e-12


def ssim_float64(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [H, W, C] images by explicit 11x11 windows in float64 (Wang et al. 2004)."""
    g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(x.shape[-1]):
        px = np.lib.stride_tricks.sliding_window_view(x[..., c], (11, 11))
        py = np.lib.stride_tricks.sliding_window_view(y[..., c], (11, 11))
        mx, my = np.sum(px * window, (-2, -1)), np.sum(py * window, (-2, -1))
        vx = np.sum(px**2 * window, (-2, -1)) - mx**2
        vy = np.sum(py**2 * window, (-2, -1)) - my**2
        cov = np.sum(px * py * window, (-2, -1)) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_against_float64_numpy_and_psnr_known_values(rng):
    clean = rng.uniform(0.0, 1.0, (2, 24, 20, 3))
    noisy = np.clip(clean + rng.normal(0.0, 0.1, clean.shape), 0.0, 1.0)
    ours = image_metrics.ssim(jnp.asarray(noisy, jnp.float32), jnp.asarray(clean, jnp.float32))
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, [ssim_float64(noisy[i], clean[i]) for i in range(2)], atol=2e-5)
    np.testing.assert_allclose(image_metrics.ssim(clean, clean), 1.0, atol=1e-6)
    np.testing.assert_allclose(losses.ssim_loss(jnp.asarray(noisy), jnp.asarray(clean)), 1 - np.mean(ours), atol=1e-5)
    delta = rng.uniform(0.01, 0.2)
    np.testing.assert_allclose(image_metrics.psnr(clean, clean + delta), 10 * np.log10(1 / delta**2), rtol=1e-4)
    with pytest.raises(ValueError, match="at least 11x11"):
        image_metrics.ssim(clean[:, :8, :8], clean[:, :8, :8])


def test_masked_l1_chamfer_point_to_plane_and_albedo_known_values(rng):
    pred, target = rng.uniform(size=(2, 5, 6, 3)), rng.uniform(size=(2, 5, 6, 3))
    weight = (rng.uniform(size=(2, 5, 6)) > 0.5).astype(np.float64)
    expected = np.sum(np.abs(pred - target) * weight[..., None]) / (3 * weight.sum())
    np.testing.assert_allclose(losses.masked_l1(pred, target, weight), expected, rtol=1e-5)

    points, targets = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 9, 3))
    squared = np.sum((points[:, :, None] - targets[:, None]) ** 2, -1)
    expected = squared.min(2).mean(1) + squared.min(1).mean(1)
    np.testing.assert_allclose(losses.chamfer(jnp.asarray(points), jnp.asarray(targets)), expected, rtol=1e-5)
    expected = np.sqrt(squared.min(2)).mean(1) + np.sqrt(squared.min(1)).mean(1)
    np.testing.assert_allclose(losses.chamfer(points, targets, squared=False), expected, rtol=1e-5)

    normals = rng.normal(size=(2, 9, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    heights = rng.uniform(-1e-3, 1e-3, (2, 9))
    lifted = targets + heights[..., None] * normals  # each point just above its own target, along the normal
    # The float64 reference takes the same float32-rounded inputs: rounding `lifted` alone moves a 1e-3 height by
    # up to ~1e-4 of itself, which is the input's precision, not the loss's.
    lifted, targets, normals = (x.astype(np.float32).astype(np.float64) for x in (lifted, targets, normals))
    expected = np.mean(np.sum((lifted - targets) * normals, -1) ** 2, -1)
    np.testing.assert_allclose(losses.point_to_plane(lifted, targets, normals), expected, rtol=1e-5)
    colours, target_colours = rng.uniform(size=(2, 9, 3)), rng.uniform(size=(2, 9, 3))
    np.testing.assert_allclose(
        losses.albedo_l1(lifted, colours, targets, target_colours), np.abs(colours - target_colours).mean((1, 2)),
        rtol=1e-5,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- LPIPS


def random_lpips_weights(rng) -> dict[str, np.ndarray]:
    weights = {}
    for key, shape in losses.lpips_weight_shapes().items():
        fan_in = int(np.prod(shape[1:])) or 1
        values = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        weights[key] = np.abs(values) if key.startswith("lin") else values  # LPIPS heads are non-negative
    return {k: v.astype(np.float32) for k, v in weights.items()}


def lpips_torch(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS-VGG in torch, written from the paper, as an independent check of layouts and padding."""
    import torch
    import torch.nn.functional as F

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(images):
        h = (torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1 - shift) / scale
        outs = []
        for level, indices in enumerate(losses.VGG_SLICES):
            if level:
                h = F.max_pool2d(h, 2, 2)
            for index in indices:
                w = torch.from_numpy(weights[f"net.slice{level + 1}.{index}.weight"])
                b = torch.from_numpy(weights[f"net.slice{level + 1}.{index}.bias"])
                h = F.relu(F.conv2d(h, w, b, padding=1))
            outs.append(h)
        return outs

    total = 0
    for level, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, torch.from_numpy(weights[f"lin{level}.model.1.weight"])).mean((1, 2, 3))
    return total.numpy()


def test_lpips_loads_a_local_file_and_matches_torch(tmp_path, rng):
    weights = random_lpips_weights(rng)
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(weights, str(path))
    model = losses.load_lpips(path)
    np.testing.assert_array_equal(model.convs[1].kernel[...], weights["net.slice1.2.weight"].transpose(2, 3, 1, 0))
    x = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0.0, 0.2, x.shape), 0.0, 1.0).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(ours, lpips_torch(weights, x, y), rtol=1e-4)
    assert np.all(ours > 0) and np.allclose(model(jnp.asarray(x), jnp.asarray(x)), 0.0)
    npz = tmp_path / "lpips_vgg.npz"
    np.savez(npz, **weights)
    np.testing.assert_allclose(losses.load_lpips(npz)(x, y), ours, rtol=1e-6)


def test_lpips_missing_or_mismatched_weights_are_clear_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors: LPIPS weights file does not exist"):
        losses.load_lpips(tmp_path / "nowhere.safetensors")
    weights = random_lpips_weights(rng)
    missing = dict(weights)
    del missing["lin3.model.1.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors: LPIPS weights lack 1 keys, e\.g\. \['lin3"):
        losses.load_lpips(tmp_path / "missing.safetensors")
    wrong = dict(weights, **{"net.slice2.5.weight": weights["net.slice2.5.weight"][:, :32]})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"wrong\.safetensors: net\.slice2\.5\.weight has shape \[128, 32, 3, 3\]"):
        losses.load_lpips(tmp_path / "wrong.safetensors")


def test_tracked_mesh_loss_and_encoder_geometry(head, rng):
    """The tracked-mesh loss is the mean squared distance over valid frames; the encoder's geometry map holds each
    texel's displacement from the scan in its local frame (offset_scale units), in the head frame."""
    from uhap_jax.models.losses import tracked_mesh_loss

    model = UHAP(head, small_model_config(), rngs=nnx.Rngs(0))
    n = model.layout.num_gaussians
    means = rng.normal(0.0, 0.1, (3, n, 3)).astype(np.float32)
    tracked = means + rng.normal(0.0, 0.01, means.shape).astype(np.float32)
    valid = np.array([1.0, 0.0, 1.0], np.float32)
    expected = np.mean(np.sum((means - tracked) ** 2, -1), -1)[[0, 2]].mean()
    np.testing.assert_allclose(tracked_mesh_loss(means, tracked, valid), expected, rtol=1e-5)
    assert float(tracked_mesh_loss(means, tracked, np.zeros(3, np.float32))) == 0.0

    albedo = rng.uniform(0.2, 0.8, head.vertices.shape).astype(np.float32)
    scan_maps = np.stack([scan_uv_maps(model.layout, head, head.vertices, albedo, "test")] * 3)
    local = rng.normal(0.0, 0.5, (3, n, 3)).astype(np.float32)  # displacement, offset_scale units, texel frame
    neutral = np.asarray(model.template_points[...]) + np.asarray(model.layout.gather(scan_maps))[..., :3]
    head_points = neutral + 0.01 * np.einsum("nij,bnj->bni", np.asarray(model.frames[...]), local)
    rotation_vectors = rng.normal(0.0, 0.2, (3, 3)).astype(np.float32)
    translations = rng.normal(0.0, 0.02, (3, 3)).astype(np.float32)
    rotation = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(rotation_vectors)))
    world = np.einsum("bij,bnj->bni", rotation, head_points) + translations[:, None]
    maps = np.asarray(model.expression_geometry(world, valid, scan_maps, rotation_vectors, translations))
    texels = maps[:, model.layout.texel_yx[:, 0], model.layout.texel_yx[:, 1]]
    np.testing.assert_allclose(texels[[0, 2], :, :3], local[[0, 2]], atol=2e-3)
    assert np.all(texels[1] == 0.0) and np.all(texels[[0, 2], :, 3] == 1.0)
    assert np.count_nonzero(maps[0, ..., 3]) == n  # texels without a Gaussian stay empty
    mean, _ = model.encode_expression(rng.uniform(size=(3, 2, 32, 32, 3)).astype(np.float32), maps)
    assert mean.shape == (3, 8) and np.all(np.isfinite(mean))
