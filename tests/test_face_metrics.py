"""The benchmark's metrics against float64 references, and each one shown able to fail: masked PSNR/SSIM see only
the head mask, the mouth box follows the lips, LPIPS is "n/a" without weights (never 0), LVE/FDD in mm², and a
one-frame shift of the audio moves the sync proxy's offset by one frame."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_prior import random_lpips_weights

from uhap_jax.eval import face_metrics, lip_metrics
from uhap_jax.geometry import template as template_lib
from uhap_jax.models import image_metrics, losses
from uhap_jax.models.prior import TexelLayout


def test_masked_psnr_matches_numpy_and_ignores_pixels_outside_the_mask(rng):
    target = rng.uniform(size=(2, 20, 24, 3))
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    mask = (rng.uniform(size=(2, 20, 24)) > 0.4).astype(np.float64)
    expected = [10 * np.log10(1 / np.mean((pred[i] - target[i])[mask[i] > 0] ** 2)) for i in range(2)]
    np.testing.assert_allclose(face_metrics.masked_psnr(pred, target, mask), expected, rtol=1e-10)
    outside = pred + 5.0 * (1 - mask)[..., None]  # anything outside the head: no change
    np.testing.assert_allclose(face_metrics.masked_psnr(outside, target, mask), expected, rtol=1e-10)
    inside = pred + 0.2 * mask[..., None]  # worse inside: lower
    assert np.all(face_metrics.masked_psnr(inside, target, mask) < np.asarray(expected) - 1.0)
    with pytest.raises(ValueError, match="empty"):
        face_metrics.masked_psnr(pred, target, np.zeros_like(mask))


def test_gain_fitted_removes_a_camera_gain_but_not_a_geometry_error(rng):
    """The prior eval's diagnostic: a render off by a per-channel gain is restored (float64 least squares), a
    shifted render is not, so `eval/psnr_gain_fitted` tells a colour error from a misplaced head."""
    target = rng.uniform(0.05, 0.9, (2, 16, 20, 3))
    gains = rng.uniform(0.8, 1.2, (2, 1, 1, 3))
    fitted = np.asarray(image_metrics.gain_fitted(jnp.asarray(target * gains), jnp.asarray(target)))
    np.testing.assert_allclose(fitted, target, rtol=1e-5)
    pred = np.clip(target * gains + rng.normal(0, 0.05, target.shape), 0, 1)
    reference = [
        (pred[i] * (np.sum(pred[i] * target[i], axis=(0, 1)) / np.sum(pred[i] ** 2, axis=(0, 1)))) for i in range(2)
    ]
    np.testing.assert_allclose(image_metrics.gain_fitted(jnp.asarray(pred), jnp.asarray(target)), reference, rtol=1e-5)
    shifted = np.roll(target, 5, axis=2)
    before = image_metrics.psnr(jnp.asarray(shifted), jnp.asarray(target))
    after = image_metrics.psnr(
        image_metrics.gain_fitted(jnp.asarray(shifted), jnp.asarray(target)), jnp.asarray(target)
    )
    assert np.all(np.asarray(after) < 20.0) and np.all(np.asarray(after) - np.asarray(before) < 3.0)


def _ssim_float64(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Wang et al.'s SSIM with the 2D 11x11 Gaussian window at every valid position, in float64, averaged over
    channels, then over the window centres weighted by `mask`: images [B, H, W, 3] -> [B]."""
    w = np.outer(*(2 * [image_metrics.gaussian_window()]))
    windows = lambda x: np.lib.stride_tricks.sliding_window_view(x, (11, 11), axis=(1, 2))  # noqa: E731
    blur = lambda x: np.einsum("bhwcij,ij->bhwc", windows(x), w)  # noqa: E731
    mx, my = blur(pred), blur(target)
    vx, vy, cov = blur(pred**2) - mx**2, blur(target**2) - my**2, blur(pred * target) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    values = (((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean(-1)
    centres = mask[:, 5:-5, 5:-5]
    return np.sum(centres * values, axis=(1, 2)) / np.sum(centres, axis=(1, 2))


def test_masked_ssim_matches_a_float64_reference_on_fresh_images(rng):
    """Every image of an odd count (the last chunk padded), a soft random mask, three chunk sizes."""
    target = rng.uniform(size=(5, 40, 33, 3))
    pred = np.clip(target + rng.normal(0, 0.15, target.shape), 0, 1)
    mask = rng.uniform(size=target.shape[:-1]) * (rng.uniform(size=target.shape[:-1]) > 0.3)
    expected = _ssim_float64(pred, target, mask)
    assert np.ptp(expected) > 1e-3  # the images differ, so a mixed-up order would show
    for chunk in (1, 2, 8):
        got = face_metrics.masked_ssim(pred, target, mask, chunk=chunk)
        assert got.shape == (5,) and np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(face_metrics.masked_ssim(pred[None], target[None], mask[None]), expected[None],
                               atol=2e-6)  # fmt: skip


def test_masked_ssim_is_ssim_under_a_full_mask_and_local_otherwise(rng):
    target = rng.uniform(size=(2, 24, 24, 3))
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    full = np.ones(target.shape[:-1])
    np.testing.assert_allclose(face_metrics.masked_ssim(pred, target, full),
                               image_metrics.ssim(jnp.asarray(pred), jnp.asarray(target)), rtol=1e-4)  # fmt: skip
    left = np.zeros_like(full)
    left[:, :, :6] = 1.0  # window centres only at columns 5: what happens at columns >= 17 cannot reach them
    changed = pred.copy()
    changed[:, :, 17:] = rng.uniform(size=changed[:, :, 17:].shape)
    np.testing.assert_allclose(face_metrics.masked_ssim(changed, target, left),
                               face_metrics.masked_ssim(pred, target, left), rtol=1e-12)  # fmt: skip
    assert np.all(face_metrics.masked_ssim(changed, target, full) < face_metrics.masked_ssim(pred, target, full))


def test_projection_and_mouth_box_follow_the_lips(rng):
    world_to_cam = np.eye(4)
    world_to_cam[:3, 3] = [0.01, -0.02, 1.0]
    k = np.array([[120.0, 0, 32], [0, 120.0, 30], [0, 0, 1]])
    points = rng.normal(0, 0.03, (5, 7, 3))
    pixels = face_metrics.project(points, world_to_cam, k)
    cam = points + world_to_cam[:3, 3]
    np.testing.assert_allclose(pixels[..., 0], 120 * cam[..., 0] / cam[..., 2] + 32, rtol=1e-12)
    np.testing.assert_allclose(pixels[..., 1], 120 * cam[..., 1] / cam[..., 2] + 30, rtol=1e-12)
    lips = np.array([40.0, 20.0]) + rng.uniform(-3, 3, (4, 6, 2))
    box = face_metrics.mouth_box(lips, 64, 48, margin=0.5, min_size=12)
    assert 0 <= box.left and box.left + box.size <= 64 and 0 <= box.top and box.top + box.size <= 48
    assert box.left <= lips[..., 0].min() and lips[..., 0].max() <= box.left + box.size
    assert box.top <= lips[..., 1].min() and lips[..., 1].max() <= box.top + box.size
    assert box.size >= 12 and face_metrics.mouth_box(lips + [20, 0], 64, 48, 0.5, 12).left > box.left
    assert box.crop(np.zeros((2, 48, 64, 3))).shape == (2, box.size, box.size, 3)
    corner = face_metrics.mouth_box(np.array([[[63.0, 47.0]]]), 64, 48, min_size=16)
    assert (corner.left, corner.top, corner.size) == (48, 32, 16)  # moved inside, not shrunk


def test_lpips_is_missing_without_weights_and_separates_images_with_them(tmp_path, rng):
    x = rng.uniform(size=(2, 20, 20, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    assert face_metrics.lpips(None, x, y) is None
    assert face_metrics.format_value(None) == "n/a (no weights: --lpips-weights)"
    path = tmp_path / "lpips.safetensors"
    save_file(random_lpips_weights(rng), str(path))
    model = losses.load_lpips(path)
    same, different = face_metrics.lpips(model, x, x), face_metrics.lpips(model, x, y)
    assert np.allclose(same, 0.0, atol=1e-6) and np.all(different > 1e-4)
    assert face_metrics.format_value(float(different[0])) != face_metrics.LPIPS_MISSING


def test_lve_and_fdd_in_square_millimetres(rng):
    gt = rng.normal(0, 0.01, (6, 5, 3))
    pred = gt + rng.normal(0, 0.002, gt.shape)
    expected = np.mean(np.max(np.sum((pred - gt) ** 2, -1), 1)) * 1e6
    assert face_metrics.lve_mm2(pred, gt) == pytest.approx(expected, rel=1e-12)
    assert face_metrics.lve_mm2(gt, gt) == 0.0
    # The motion LVE ignores a static lip-shape error, counts motion: zero for the truth shifted by a constant,
    # the truth's own spread for a still face, and the plain LVE's value when the error's mean is zero.
    shape_error = rng.normal(0, 0.005, gt.shape[1:])
    assert face_metrics.lve_motion_mm2(gt + shape_error, gt) == pytest.approx(0.0, abs=1e-9)
    assert face_metrics.lve_mm2(gt + shape_error, gt) > 1.0
    still = np.broadcast_to(gt.mean(0) + shape_error, gt.shape)
    spread = face_metrics.lve_mm2(np.broadcast_to(gt.mean(0), gt.shape), gt)
    assert face_metrics.lve_motion_mm2(still, gt) == pytest.approx(spread, rel=1e-9)
    centred = pred - (pred - gt).mean(0)
    assert face_metrics.lve_motion_mm2(pred + shape_error, gt) == pytest.approx(face_metrics.lve_mm2(centred, gt))
    neutral = rng.normal(0, 0.01, (5, 3))
    shared = face_metrics.fdd_mm2(pred, gt, neutral, neutral)
    assert shared == pytest.approx(1e6 * lip_metrics.upper_face_dynamics_deviation(pred, gt, neutral, range(5)))
    # Each side from its own neutral: a prediction offset by a constant (another identity's shape) moves alike.
    offset = rng.normal(0, 0.01, 3)
    assert face_metrics.fdd_mm2(gt + offset, gt, neutral + offset, neutral) == pytest.approx(0.0, abs=1e-9)
    still = np.broadcast_to(neutral, gt.shape)
    assert face_metrics.fdd_mm2(still, gt, neutral, neutral) > 0.0


def test_texel_sets_and_surface_points_on_the_template():
    template = template_lib.procedural_head(24)
    layout = TexelLayout.build(template, 32)
    lips, upper = face_metrics.lip_texel_ids(layout, template), face_metrics.upper_face_texel_ids(layout, template)
    assert lips.size and upper.size and not set(lips) & set(upper)
    points = face_metrics.surface_at_texels(template.vertices[None], template, layout)[0]
    expected = template_lib.surface_points(template.vertices, template.faces, layout.face_ids, layout.barys)
    np.testing.assert_allclose(points, expected, atol=1e-6)
    top, bottom = face_metrics.lip_halves(points[lips])
    assert points[lips][top, 1].min() > points[lips][bottom, 1].max()
    with pytest.raises(ValueError, match="topology"):
        face_metrics.surface_at_texels(np.zeros((1, 5, 3)), template, layout)


def test_a_one_frame_audio_shift_moves_the_sync_offset_by_one_frame(rng):
    fps, rate, frames = 25.0, 16_000, 60
    per_frame = rate // 25
    levels = np.abs(rng.normal(size=frames)) + 0.05
    waveform = np.repeat(levels, per_frame) * rng.choice([-1.0, 1.0], frames * per_frame)
    opening = levels + 0.01 * rng.normal(size=frames)
    base = face_metrics.audio_mouth_sync(waveform, rate, fps, opening, max_lag=5)
    assert base.offset == 0 and base.confidence > 0.3
    delayed = np.concatenate([np.zeros(per_frame), waveform[:-per_frame]])  # the audio one frame later
    assert face_metrics.audio_mouth_sync(delayed, rate, fps, opening, max_lag=5).offset == base.offset - 1
    noise = rng.normal(size=frames)  # a mouth unrelated to the audio: low confidence
    assert face_metrics.audio_mouth_sync(waveform, rate, fps, noise, 5).confidence < base.confidence
    offset, confidence = face_metrics.pooled_sync([base.correlations, base.correlations], 5)
    assert offset == 0 and confidence == pytest.approx(base.confidence)
