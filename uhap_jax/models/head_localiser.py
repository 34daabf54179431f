"""HeadLocaliser: where the head is in a whole frame of a video that has no calibration, and how big it looks.

The MonoEncoder crops around the projection of the head centre, which a calibrated camera gives. A phone clip has
no calibration, so a small network finds, in the frame letterboxed to a square, the head centre's position and
the side of the encoder's crop (`crop_extent` metres at the head's depth, focal * extent / depth pixels). It is
trained in `uhap train encoder` on the rig's views, where the calibration and the head pose tell both exactly.
The views are augmented so that it learns the head and not the rig: random zoom (the head from a quarter of the
window to past its edges) and shift, or the whole frame (a close-up, as a phone clip often is); mirror; the
background replaced through the masks (colours, gradients, smooth noise); gain, offset and noise. A share of the
examples has no head at all, for a presence score.

The network is a CenterNet-like heat map: a CNN down to a coarse grid (with global context added to every cell);
each cell scores the head being there and regresses its offset within the cell and the log of the crop's size;
the prediction is their softmax-weighted mean, so it is translation-equivariant and sub-cell precise.

`head_cameras` turns the (temporally smoothed) detections into per-frame virtual cameras: the given intrinsics,
the encoder's frontal orientation, and a translation that puts the head centre where it was found, at the depth
its size implies; the MonoEncoder's crop and pose regression then apply unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uhap_jax.models.mono_encoder import FRONT


def default_localiser_config() -> ml_collections.ConfigDict:
    """The `localiser` section of configs/encoder.py."""
    config = ml_collections.ConfigDict()
    config.enabled = True  # trained beside the encoder; a video file needs it
    config.input_size = 64  # the frame is letterboxed and shrunk to this square
    config.channels = (16, 32, 48, 64)  # one stride-2 stage each: the heat map is input_size / 2**len cells a side
    config.weight = 1.0  # of its loss in the encoder stage's
    config.repeats = 4  # augmented windows of each of the step's frames (it is small: more examples cost little)
    config.head_fraction = (0.25, 1.6)  # the crop's side over the window's, drawn log-uniform
    config.whole_frames = 0.25  # share of examples that are the whole rig frame (no zoom, no shift)
    config.negatives = 0.15  # share of examples with no head (background only), for the presence score
    config.noise = 0.03  # std of the pixel noise added
    return config


def _leaky(x: jax.Array) -> jax.Array:
    return nnx.leaky_relu(x, 0.2)


class HeadLocaliser(nnx.Module):
    """A square frame [B, S, S, 3] in [0, 1] -> the head centre (x, y in units of S), the log of the crop's side
    in units of S, and the presence logit."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        channels = tuple(config.channels)
        self.input_size = int(config.input_size)
        self.grid = self.input_size // 2 ** len(channels)
        if self.grid < 2 or self.input_size % 2 ** len(channels):
            raise ValueError(f"localiser: input_size {self.input_size} must be a multiple of 2**{len(channels)} "
                             f"and give a heat map of at least 2x2 cells")  # fmt: skip
        widths = (3, *channels)
        self.downs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.convs = nnx.List([nnx.Conv(c, c, (3, 3), rngs=rngs) for c in channels])
        self.context = nnx.Linear(channels[-1], channels[-1], rngs=rngs)
        self.mix = nnx.Conv(channels[-1], channels[-1], (3, 3), rngs=rngs)
        self.cells = nnx.Conv(channels[-1], 4, (1, 1), rngs=rngs)  # score, offset x, offset y, log side
        self.presence = nnx.Linear(channels[-1], 1, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = 2.0 * images - 1.0
        for down, conv in zip(self.downs, self.convs):
            x = _leaky(down(x))
            x = x + _leaky(conv(x))
        pooled = jnp.mean(x, (1, 2))
        x = x + _leaky(self.mix(x + self.context(pooled)[:, None, None]))
        out = self.cells(x).reshape(x.shape[0], -1, 4)
        weights = jax.nn.softmax(out[..., 0], -1)
        cell = (jnp.arange(self.grid, dtype=x.dtype) + 0.5) / self.grid
        ys, xs = jnp.meshgrid(cell, cell, indexing="ij")
        positions = jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1) + jnp.tanh(out[..., 1:3]) / self.grid
        centre = jnp.einsum("bn,bnc->bc", weights, positions)
        log_side = jnp.einsum("bn,bn->b", weights, out[..., 3])
        return centre, log_side, self.presence(pooled)[:, 0]


# ------------------------------------------------------------------------------------- training on the rig


def head_in_view(world_to_cam: jax.Array, intrinsics: jax.Array, centre: jax.Array, extent: float) -> jax.Array:
    """[B, 3] pixel column, row and the crop's side (focal * extent / depth) of world points `centre` [B, 3]."""
    point = jnp.einsum("bij,bj->bi", world_to_cam[:, :3, :3], centre) + world_to_cam[:, :3, 3]
    depth = jnp.maximum(point[:, 2], 1e-3)
    u = intrinsics[:, 0, 0] * point[:, 0] / depth + intrinsics[:, 0, 2]
    v = intrinsics[:, 1, 1] * point[:, 1] / depth + intrinsics[:, 1, 2]
    return jnp.stack([u, v, intrinsics[:, 1, 1] * extent / depth], -1)


def _backgrounds(rng: jax.Array, batch: int, size: int) -> jax.Array:
    """[B, S, S, 3] random backdrops: a colour, a linear gradient to another and smooth noise, each of random
    strength."""
    keys = jax.random.split(rng, 5)
    first, second = jax.random.uniform(keys[0], (2, batch, 1, 1, 3))
    angle = jax.random.uniform(keys[1], (batch, 1, 1), maxval=2 * jnp.pi)
    axis = (jnp.arange(size) + 0.5) / size - 0.5
    ramp = jnp.cos(angle) * axis[None, None, :] + jnp.sin(angle) * axis[None, :, None] + 0.5
    strength = jax.random.uniform(keys[2], (2, batch, 1, 1, 1))
    coarse = jax.random.normal(keys[3], (batch, 6, 6, 3))
    noise = jax.image.resize(coarse, (batch, size, size, 3), "cubic") * 0.25
    fine = jax.random.normal(keys[4], (batch, size, size, 3)) * 0.1
    return jnp.clip(first + strength[0] * ramp[..., None] * (second - first) + strength[1] * (noise + fine), 0, 1)


def training_views(rng: jax.Array, images: jax.Array, masks: jax.Array, head: jax.Array,
                   config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Augmented square windows of rig images [B, H, W, 3] (masks [B, H, W], in [0, 1]; `head_in_view`'s [B, 3]).

    Returns the windows [B, S, S, 3], the head centre in them (x, y in units of S) and the log of the crop's side
    in units of S (the targets), and whether the head is in them (1) or the example is a negative (0).
    """
    batch, size = images.shape[0], int(config.input_size)
    keys = jax.random.split(rng, 8)
    low, high = np.log(np.asarray(config.head_fraction, np.float32))
    log_fraction = jax.random.uniform(keys[0], (batch,), minval=low, maxval=high)
    window = head[:, 2] / jnp.exp(log_fraction)  # source pixels the window spans
    position = jax.random.uniform(keys[1], (batch, 2), minval=0.1, maxval=0.9)  # the head centre in the window
    corner = head[:, :2] - position * window[:, None]
    # A share of the windows is the whole frame, letterboxed as `localise` does: a close-up, edges and all.
    whole = jax.random.uniform(keys[7], (batch,)) < config.whole_frames
    side = max(images.shape[1:3])
    frame_corner = jnp.array([images.shape[2] - side, images.shape[1] - side], images.dtype) / 2
    corner = jnp.where(whole[:, None], frame_corner, corner)
    window = jnp.where(whole, side, window)
    position = jnp.where(whole[:, None], (head[:, :2] - frame_corner) / side, position)
    log_fraction = jnp.where(whole, jnp.log(head[:, 2] / side), log_fraction)
    scale = size / window
    layers = jnp.concatenate([images, masks[..., None]], -1)

    def warp(layer, s, c):
        return jax.image.scale_and_translate(layer, (size, size, 4), (0, 1), jnp.stack([s, s]), -c[::-1] * s,
                                             "linear", antialias=True)  # fmt: skip

    warped = jax.vmap(warp)(layers, scale, corner)
    flip = jax.random.bernoulli(keys[2], 0.5, (batch,))
    warped = jnp.where(flip[:, None, None, None], warped[:, :, ::-1], warped)
    position = position.at[:, 0].set(jnp.where(flip, 1.0 - position[:, 0], position[:, 0]))
    present = (jax.random.uniform(keys[3], (batch,)) >= config.negatives).astype(images.dtype)
    alpha = jnp.clip(warped[..., 3:], 0.0, 1.0) * present[:, None, None, None]
    views = warped[..., :3] * alpha + _backgrounds(keys[4], batch, size) * (1.0 - alpha)
    gain_bias = jax.random.uniform(keys[5], (2, batch, 1, 1, 1), minval=-1.0, maxval=1.0)
    views = views * (1.0 + 0.4 * gain_bias[0]) + 0.1 * gain_bias[1]
    views = views + config.noise * jax.random.normal(keys[6], views.shape)
    return jnp.clip(views, 0.0, 1.0), position, log_fraction, present


def localiser_loss(localiser: HeadLocaliser, rng: jax.Array, images: jax.Array, masks: jax.Array, head: jax.Array,
                   config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """The localiser's loss on augmented windows of the images (see `training_views`): L1 of the centre (in units
    of the window) and of the log crop side where the head is, and the presence's cross-entropy."""
    views, position, log_fraction, present = training_views(rng, images, masks, head, config)
    centre, log_side, presence = localiser(views)
    count = jnp.maximum(jnp.sum(present), 1.0)
    centre_error = jnp.sum(present * jnp.sum(jnp.abs(centre - position), -1)) / count
    side_error = jnp.sum(present * jnp.abs(log_side - log_fraction)) / count
    presence_loss = jnp.mean(_sigmoid_bce(presence, present))
    terms = {"localiser_centre": centre_error, "localiser_side": side_error, "localiser_presence": presence_loss}
    return 10.0 * centre_error + side_error + 0.1 * presence_loss, terms


def _sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of logits against labels in [0, 1], stable for large logits."""
    return jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


# ------------------------------------------------------------------------------------- a video


def localise(localiser: HeadLocaliser, frames: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Frames [F, H, W, 3] uint8 -> per frame the head centre's column and row and the crop's side, in the frames'
    pixels [F, 3], and the presence probability [F]. Each frame is letterboxed (black) to the localiser's square."""
    size = localiser.input_size
    height, width = frames.shape[1:3]
    scale = size / max(height, width)
    offset = np.array([(size - width * scale) / 2, (size - height * scale) / 2], np.float32)
    graphdef, state = nnx.split(localiser)

    @jax.jit
    def run(state, images):
        square = jax.image.scale_and_translate(images / 255.0, (images.shape[0], size, size, 3), (1, 2),
                                               jnp.array([scale, scale]), jnp.asarray(offset[::-1]), "linear",
                                               antialias=True)  # fmt: skip
        centre, log_side, presence = nnx.merge(graphdef, state)(square)
        return centre, log_side, jax.nn.sigmoid(presence)

    found, scores = [], []
    for start in range(0, len(frames), batch_size):
        index = np.minimum(np.arange(start, start + batch_size), len(frames) - 1)
        centre, log_side, presence = jax.device_get(run(state, frames[index].astype(np.float32)))
        pixels = (centre * size - offset) / scale
        found.append(np.concatenate([pixels, (np.exp(log_side) * size / scale)[:, None]], -1))
        scores.append(presence)
    count = len(frames)
    return np.concatenate(found)[:count].astype(np.float64), np.concatenate(scores)[:count].astype(np.float64)


def smooth_track(found: np.ndarray, presence: np.ndarray, window: int, min_presence: float) -> np.ndarray:
    """Detections [F, 3] -> a track [F, 3]: frames scored below `min_presence` take their nearest scored
    frame's, then a running median over `window` frames (the side in log space). Needs one scored frame."""
    good = np.flatnonzero(presence >= min_presence)
    if not len(good):
        raise ValueError("no frame scored a head")
    nearest = good[np.abs(np.arange(len(found))[:, None] - good[None]).argmin(1)]
    track = found[nearest].copy()
    track[:, 2] = np.log(track[:, 2])
    half = max(window, 1) // 2
    padded = np.pad(track, ((half, half), (0, 0)), mode="edge")
    smoothed = np.stack([np.median(padded[i : i + 2 * half + 1], 0) for i in range(len(track))])
    smoothed[:, 2] = np.exp(smoothed[:, 2])
    return smoothed


def head_track(intrinsics: np.ndarray, head: np.ndarray, extent: float) -> np.ndarray:
    """Head centres in camera space [F, 3] -> the track `head_cameras` takes [F, 3]: the pixel column and row they
    project to and the crop's side there (focal * extent / depth). intrinsics [3, 3] or [F, 3, 3]."""
    k = np.broadcast_to(intrinsics, (len(head), 3, 3))
    pixel = np.stack([k[:, 0, 0], k[:, 1, 1]], -1) * head[:, :2] / head[:, 2:] + k[:, :2, 2]
    return np.concatenate([pixel, (k[:, 1, 1] * extent / head[:, 2])[:, None]], -1)


def head_cameras(intrinsics: np.ndarray, track: np.ndarray, extent: float,
                 centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:  # fmt: skip
    """Per-frame virtual cameras world_to_cam [F, 4, 4]: facing the template (the encoder's frontal view) with the
    world point `centre` (the head centre) at the tracked pixel, at the depth where `extent` metres span the
    tracked side."""
    depth = intrinsics[1, 1] * extent / track[:, 2]
    x = (track[:, 0] - intrinsics[0, 2]) * depth / intrinsics[0, 0]
    y = (track[:, 1] - intrinsics[1, 2]) * depth / intrinsics[1, 1]
    cameras = np.tile(np.eye(4), (len(track), 1, 1))
    cameras[:, :3, :3] = FRONT
    cameras[:, :3, 3] = np.stack([x, y, depth], -1) - FRONT @ np.asarray(centre, np.float64)
    return cameras
