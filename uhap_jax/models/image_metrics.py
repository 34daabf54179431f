"""Image metrics on [..., H, W, C] images in [0, max_value]: PSNR and SSIM, per image (leading axes kept).

SSIM follows Wang et al. 2004 as most papers report it: an 11x11 Gaussian window (sigma 1.5) over "valid"
positions, K1 = 0.01, K2 = 0.03, averaged over positions and channels. The same function is the SSIM loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(pred: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: [..., H, W, C] -> [...]."""
    _check_images(pred, target)
    mse = jnp.mean((jnp.asarray(pred) - jnp.asarray(target)) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, 1e-12))


def gain_fitted(pred: jax.Array, target: jax.Array) -> jax.Array:
    """`pred` [..., H, W, C] times the per-image, per-channel gain that best fits `target` (least squares).

    A diagnostic, not a headline metric: it uses the ground truth to remove what no model can know about an
    unseen camera (its gain and white balance), so that a PSNR of it tells colour errors from geometry errors."""
    _check_images(pred, target)
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    gain = jnp.sum(pred * target, axis=(-3, -2), keepdims=True) / jnp.maximum(
        jnp.sum(pred * pred, axis=(-3, -2), keepdims=True), 1e-12
    )
    return pred * gain


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1D Gaussian whose outer product is SSIM's window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-0.5 * (x / sigma) ** 2)
    return window / window.sum()


def _blur(images: jax.Array, window: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of [B, H, W, C] with the same 1D window along H and W."""
    size = window.shape[0]
    out_h, out_w = images.shape[1] - size + 1, images.shape[2] - size + 1
    rows = sum(window[k] * images[:, k : k + out_h] for k in range(size))
    return sum(window[k] * rows[:, :, k : k + out_w] for k in range(size))


def _ssim_per_channel(pred: jax.Array, target: jax.Array, max_value: float) -> jax.Array:
    """[..., H, W, C] -> SSIM at each valid window position and channel, [B, H - 10, W - 10, C] (leading axes
    flattened)."""
    _check_images(pred, target)
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    height, width, channels = pred.shape[-3:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    dtype = jnp.result_type(pred.dtype, jnp.float32)
    window = jnp.asarray(gaussian_window(), dtype)
    x = pred.reshape(-1, height, width, channels).astype(dtype)
    y = target.reshape(-1, height, width, channels).astype(dtype)
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * max_value) ** 2, (SSIM_K2 * max_value) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(pred: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Structural similarity per image: [..., H, W, C] -> [...]; images must be at least 11x11."""
    return jnp.mean(_ssim_per_channel(pred, target, max_value), axis=(1, 2, 3)).reshape(jnp.shape(pred)[:-3])


def ssim_map(pred: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
    """SSIM at every valid window position, averaged over channels: [..., H, W, C] -> [..., H - 10, W - 10]."""
    values = jnp.mean(_ssim_per_channel(pred, target, max_value), axis=-1)
    return values.reshape(*jnp.shape(pred)[:-3], *values.shape[1:])


def _check_images(pred, target) -> None:
    if np.shape(pred) != np.shape(target) or np.ndim(pred) < 3:
        raise ValueError(f"image metrics need two [..., H, W, C] images of one shape, got {np.shape(pred)} "
                         f"and {np.shape(target)}")  # fmt: skip


def image_grid(render: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rows of `render | ground truth | |error|` as one uint8 image; inputs [B,H,W,3] or [H,W,3] in [0,1]."""
    render = np.asarray(render, np.float32)
    target = np.asarray(target, np.float32)
    if render.shape != target.shape or render.shape[-1] != 3 or render.ndim not in (3, 4):
        raise ValueError(f"image_grid: render {render.shape} and target {target.shape} must both be [B,H,W,3]")
    if render.ndim == 3:
        render, target = render[None], target[None]
    rows = np.concatenate([render, target, np.abs(render - target)], axis=2)  # [B, H, 3W, 3]
    grid = rows.reshape(-1, *rows.shape[2:])
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
