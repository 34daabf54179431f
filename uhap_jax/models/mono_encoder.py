"""MonoEncoder: one camera's view of a face -> the prior's expression code z and the rigid head pose.

The image is first cropped around the projection of the head centre (a fixed world point, the origin of the
capture layouts) to a square of `crop_extent` metres at that depth, and resized to `crop_size` pixels. The
crop uses only the calibration, so a rig camera 0.9 m away and a closer, wider phone camera show the head at
the same size, and the encoder trained on the rig's views transfers to a monocular video.

Head pose is regressed as what the view shows. The rotation: the head's orientation in the camera's frame,
R_cam R_head, as a rotation vector v from a frontal view (R_cam R_head = exp(v) R_front, the template facing
-z). A rig camera 50 degrees to the side and a head turned 50 degrees in front of a phone look alike, and have
the same v, so the rig's spread of cameras teaches the network the head turns of a phone video. The network
is not told the camera's orientation: in rig captures it alone nearly fixes v, and the network would read v
off it instead of off the image. The translation is regressed in the camera's axes. `__call__` turns both
into world axes with the camera's extrinsics, the convention of meta.json's `head_pose` and of `UHAP.decode`.
The outputs start near zero: a frontal view of a head at rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uhap_jax.geometry import rotations
from uhap_jax.geometry.cameras import look_at

POSE_DIM = 6  # rotation vector (3, radians) and translation (3, metres)
FRONT = look_at(np.array([0.0, 0.0, -1.0]), np.zeros(3))[:3, :3].astype(np.float32)  # a camera facing the template


class CodeStatistic(nnx.Variable):
    """The training codes' per-dimension mean or standard deviation: state (checkpointed), never trained."""


def _leaky(x: jax.Array) -> jax.Array:
    return nnx.leaky_relu(x, 0.2)


def default_model_config() -> ml_collections.ConfigDict:
    """The `model` section of configs/encoder.py (z_dim comes from the prior)."""
    config = ml_collections.ConfigDict()
    config.crop_size = 64  # pixels of the square crop the CNN sees
    config.crop_extent = 0.36  # metres covered by the crop at the head centre's depth
    config.crop_centre = (0.0, 0.0, 0.0)  # the head centre in world coordinates (metres)
    config.channels = (16, 32, 64, 64)  # one stride-2 stage each
    config.hidden = 128
    config.rotation_scale = 1.0  # radians per unit of the pose head's output
    config.translation_scale = 0.01  # metres per unit
    return config


def crop_faces(
    images: jax.Array, world_to_cam: jax.Array, intrinsics: jax.Array, *, size: int, extent: float,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> jax.Array:  # fmt: skip
    """Images [B, H, W, C] -> square crops [B, size, size, C] centred on the projected head centre.

    The crop spans `extent` metres at the centre's depth (focal * extent / depth pixels); outside the image
    is black. Bilinear, antialiased when the crop shrinks the image.
    """
    point = jnp.einsum("bij,j->bi", world_to_cam[:, :3, :3], jnp.asarray(centre, images.dtype)) + world_to_cam[:, :3, 3]
    depth = jnp.maximum(point[:, 2], 1e-3)
    u = intrinsics[:, 0, 0] * point[:, 0] / depth + intrinsics[:, 0, 2]
    v = intrinsics[:, 1, 1] * point[:, 1] / depth + intrinsics[:, 1, 2]
    side = intrinsics[:, 1, 1] * extent / depth  # pixels
    scale = size / side
    # Output coordinate = input coordinate * scale + translation (continuous pixel coordinates).
    translation = jnp.stack([-(v - side / 2) * scale, -(u - side / 2) * scale], -1)

    def one(image, s, t):
        return jax.image.scale_and_translate(
            image, (size, size, image.shape[-1]), (0, 1), jnp.stack([s, s]), t, "linear", antialias=True
        )

    return jax.vmap(one)(images, scale, translation)


class MonoEncoder(nnx.Module):
    """A single view [B, H, W, 3] in [0, 1] and its camera -> z [B, z_dim], rotation vector and translation
    [B, 3] each (world axes, like meta.json's head_pose)."""

    def __init__(self, z_dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        channels = tuple(config.channels)
        self.crop_size = int(config.crop_size)
        self.crop_extent = float(config.crop_extent)
        self.crop_centre = tuple(float(c) for c in config.crop_centre)
        self.rotation_scale = float(config.rotation_scale)
        self.translation_scale = float(config.translation_scale)
        pooled = self.crop_size // 2 ** len(channels)
        if pooled < 1 or self.crop_size % 2 ** len(channels):
            raise ValueError(f"encoder model: crop_size {self.crop_size} must be a multiple of 2**{len(channels)} "
                             f"(one halving per entry of channels={channels})")  # fmt: skip
        widths = (3, *channels)
        self.downs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.convs = nnx.List([nnx.Conv(c, c, (3, 3), rngs=rngs) for c in channels])
        self.project = nnx.Linear(channels[-1] * pooled**2, config.hidden, rngs=rngs)
        self.hidden = nnx.Linear(config.hidden, config.hidden, rngs=rngs)
        # Both heads start near zero: z at the code mean, no head motion. Not at exactly zero: the
        # rotation's gradient is NaN at the zero rotation vector (the norm in Rodrigues' formula).
        small = nnx.initializers.normal(1e-3)
        self.z_head = nnx.Linear(config.hidden, z_dim, kernel_init=small, rngs=rngs)
        # z = mean + std * z_head: the head works in standardised units whatever the prior's code scale.
        self.code_mean = CodeStatistic(jnp.zeros(z_dim, jnp.float32))
        self.code_std = CodeStatistic(jnp.ones(z_dim, jnp.float32))
        self.pose_head = nnx.Linear(config.hidden, POSE_DIM, kernel_init=small, rngs=rngs)

    def crop(self, images: jax.Array, world_to_cam: jax.Array, intrinsics: jax.Array) -> jax.Array:
        return crop_faces(images, world_to_cam, intrinsics, size=self.crop_size, extent=self.crop_extent,
                          centre=self.crop_centre)  # fmt: skip

    def set_code_statistics(self, codes: np.ndarray) -> None:
        """Standardise z's head with the training codes [F, z_dim]: the encoder then starts at their mean."""
        self.code_mean[...] = jnp.asarray(codes.mean(0), jnp.float32)
        self.code_std[...] = jnp.asarray(np.maximum(codes.std(0), 1e-6), jnp.float32)

    def __call__(
        self, images: jax.Array, world_to_cam: jax.Array, intrinsics: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images [B, H, W, 3] in [0, 1], world_to_cam [B, 4, 4], intrinsics [B, 3, 3] -> z, rotation, translation."""
        x = 2.0 * self.crop(images, world_to_cam, intrinsics) - 1.0
        for down, conv in zip(self.downs, self.convs):
            x = _leaky(down(x))
            x = x + _leaky(conv(x))
        h = _leaky(self.project(x.reshape(x.shape[0], -1)))
        h = _leaky(self.hidden(h))
        pose = self.pose_head(h)
        rotation = world_to_cam[:, :3, :3]
        seen = rotations.axis_angle_to_matrix(self.rotation_scale * pose[:, :3]) @ jnp.asarray(FRONT, x.dtype)
        rotation_vector = rotations.matrix_to_axis_angle(jnp.swapaxes(rotation, 1, 2) @ seen)  # R_head = R_cam^T seen
        translation = jnp.einsum("bji,bj->bi", rotation, self.translation_scale * pose[:, 3:])  # camera -> world axes
        return self.code_mean[...] + self.code_std[...] * self.z_head(h), rotation_vector, translation
