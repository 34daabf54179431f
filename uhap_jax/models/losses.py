"""Losses of the UHAP prior: photometric (masked L1, SSIM, LPIPS), KL on z, neutral-scan geometry and albedo,
and regularisers on the decoded offsets and scales.

LPIPS: the network (VGG-16 features plus LPIPS's linear heads) is defined here; its weights come only from a
local file that the user gives, never from a download. The file holds the state dict of `lpips.LPIPS(net="vgg")`
(torch layout, keys such as `net.slice1.0.weight`, `lin0.model.1.weight`) as .safetensors or .npz.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uhap_jax.models.image_metrics import ssim


def masked_l1(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean |pred - target| under per-pixel weights: images [..., H, W, C], weight [..., H, W]."""
    weight = jnp.broadcast_to(weight[..., None], pred.shape)
    return jnp.sum(weight * jnp.abs(pred - target)) / jnp.maximum(jnp.sum(weight), 1e-6)


def ssim_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """1 - SSIM, averaged over images."""
    return 1.0 - jnp.mean(ssim(pred, target))


def kl_divergence(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(mean, exp(log_var)) || N(0, I)), summed over the latent and averaged over the batch: [B, D] -> []."""
    per_example = 0.5 * jnp.sum(mean**2 + jnp.exp(log_var) - 1.0 - log_var, axis=-1)
    return jnp.mean(per_example)


# ------------------------------------------------------------------------------------- neutral scan


def nearest_neighbours(points: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each of points [B, N, 3], its nearest of targets [B, M, 3]: squared distance [B, N] and index [B, N]."""
    squared = jnp.sum((points[:, :, None, :] - targets[:, None, :, :]) ** 2, axis=-1)  # [B, N, M]
    index = jnp.argmin(squared, axis=-1)
    return jnp.take_along_axis(squared, index[..., None], axis=-1)[..., 0], index


def chamfer(points: jax.Array, targets: jax.Array, *, squared: bool = True) -> jax.Array:
    """Symmetric Chamfer distance per example [B]: mean nearest (squared) distance both ways, summed."""
    forward, _ = nearest_neighbours(points, targets)
    backward, _ = nearest_neighbours(targets, points)
    if not squared:
        forward, backward = jnp.sqrt(forward), jnp.sqrt(backward)
    return jnp.mean(forward, axis=-1) + jnp.mean(backward, axis=-1)


def point_to_plane(points: jax.Array, targets: jax.Array, target_normals: jax.Array) -> jax.Array:
    """Point-to-surface distance, approximated by the tangent plane of the nearest target: mean squared [B]."""
    _, index = nearest_neighbours(points, targets)
    nearest = jnp.take_along_axis(targets, index[..., None], axis=1)
    normals = jnp.take_along_axis(target_normals, index[..., None], axis=1)
    return jnp.mean(jnp.sum((points - nearest) * normals, axis=-1) ** 2, axis=-1)


def albedo_l1(points: jax.Array, colours: jax.Array, targets: jax.Array, target_colours: jax.Array) -> jax.Array:
    """Mean |colour - colour of the nearest scan point| per example [B]; the match itself gets no gradient."""
    _, index = nearest_neighbours(jax.lax.stop_gradient(points), targets)
    nearest_colours = jnp.take_along_axis(target_colours, index[..., None], axis=1)
    return jnp.mean(jnp.abs(colours - nearest_colours), axis=(-2, -1))


# ------------------------------------------------------------------------------------- regularisers


def offset_regularizer(offsets: jax.Array) -> jax.Array:
    """Mean squared length of the decoded position offsets (metres^2): keeps Gaussians near the surface."""
    return jnp.mean(jnp.sum(offsets**2, axis=-1))


def view_colour_spread(colours: jax.Array) -> jax.Array:
    """Mean squared deviation of each Gaussian's colour [B, C, N, 3] over the C cameras from its camera mean.

    View-dependent colour lets every Gaussian take a different colour in each training camera; with a rig's
    handful of fixed cameras that fits the training views (and hides geometry errors) at the expense of the
    views in between. Penalising the spread keeps the colour view-dependent only where the images demand it.
    """
    return jnp.mean(jnp.sum((colours - jnp.mean(colours, axis=1, keepdims=True)) ** 2, axis=-1))


def scale_regularizer(scales: jax.Array, max_scale: float) -> jax.Array:
    """Mean excess of the scales over `max_scale` (metres): discourages large, blurry Gaussians."""
    return jnp.mean(jax.nn.relu(scales - max_scale))


# ------------------------------------------------------------------------------------- LPIPS

# torchvision's vgg16().features indices of the 13 convolutions, grouped into LPIPS's five slices.
VGG_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nnx.Module):
    """LPIPS (Zhang et al. 2018) with a VGG-16 trunk; `load_lpips` fills it from a local weights file."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.convs = nnx.List()
        in_channels = 3
        for block in VGG_CHANNELS:
            for out_channels in block:
                self.convs.append(nnx.Conv(in_channels, out_channels, (3, 3), padding=1, rngs=rngs))
                in_channels = out_channels
        self.heads = nnx.List([nnx.Conv(block[-1], 1, (1, 1), use_bias=False, rngs=rngs) for block in VGG_CHANNELS])

    def features(self, images: jax.Array) -> list[jax.Array]:
        """The five relu outputs (relu1_2 ... relu5_3) of images [B, H, W, 3] in [-1, 1]."""
        x = (images - _LPIPS_SHIFT) / _LPIPS_SCALE
        outputs, index = [], 0
        for level, block in enumerate(VGG_CHANNELS):
            if level:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            for _ in block:
                x = nnx.relu(self.convs[index](x))
                index += 1
            outputs.append(x)
        return outputs

    def __call__(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        """Perceptual distance per image [B] between [B, H, W, 3] images in [0, 1] (at least 16x16)."""
        distance = 0.0
        for head, a, b in zip(self.heads, self.features(2 * pred - 1), self.features(2 * target - 1)):
            a = a / (jnp.sqrt(jnp.sum(a**2, axis=-1, keepdims=True)) + 1e-10)
            b = b / (jnp.sqrt(jnp.sum(b**2, axis=-1, keepdims=True)) + 1e-10)
            distance = distance + jnp.mean(head((a - b) ** 2), axis=(1, 2, 3))
        return distance


def lpips_weight_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and torch-layout shapes a weights file must hold."""
    shapes, in_channels = {}, 3
    for level, (indices, block) in enumerate(zip(VGG_SLICES, VGG_CHANNELS)):
        for index, out_channels in zip(indices, block):
            shapes[f"net.slice{level + 1}.{index}.weight"] = (out_channels, in_channels, 3, 3)
            shapes[f"net.slice{level + 1}.{index}.bias"] = (out_channels,)
            in_channels = out_channels
        shapes[f"lin{level}.model.1.weight"] = (1, block[-1], 1, 1)
    return shapes


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LPIPS weights file does not exist (LPIPS weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return dict(archive)
    raise ValueError(f"{path}: LPIPS weights must be .safetensors or .npz, not {path.suffix!r}")


def load_lpips(path: str | Path) -> LPIPS:
    """An LPIPS network holding the weights of `path`; missing keys or wrong shapes raise, naming the key."""
    path = Path(path)
    weights = _read_weights(path)
    expected = lpips_weight_shapes()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path}: LPIPS weights lack {len(missing)} keys, e.g. {missing[:3]}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {list(weights[key].shape)}, expected {list(shape)}")
    model = LPIPS(rngs=nnx.Rngs(0))
    convs = [(level, index) for level, indices in enumerate(VGG_SLICES) for index in indices]
    for conv, (level, index) in zip(model.convs, convs):
        prefix = f"net.slice{level + 1}.{index}"
        conv.kernel[...] = jnp.asarray(weights[f"{prefix}.weight"].transpose(2, 3, 1, 0), jnp.float32)  # OIHW->HWIO
        conv.bias[...] = jnp.asarray(weights[f"{prefix}.bias"], jnp.float32)
    for level, head in enumerate(model.heads):
        head.kernel[...] = jnp.asarray(weights[f"lin{level}.model.1.weight"].transpose(2, 3, 1, 0), jnp.float32)
    return model


def tracked_mesh_loss(means: jax.Array, tracked: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared distance (m²) of posed Gaussians [B, N, 3] to their tracked points, over valid frames."""
    per_frame = jnp.mean(jnp.sum((means - tracked) ** 2, axis=-1), axis=-1)
    return jnp.sum(valid * per_frame) / jnp.maximum(jnp.sum(valid), 1.0)
