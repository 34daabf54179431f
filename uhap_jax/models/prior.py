"""The UHAP prior: a universal Gaussian head avatar decoded on the template's UV texels.

Every texel inside the template's UV layout is one Gaussian, attached to the surface through (face,
barycentric). An `IdentityEncoder` turns a person's neutral-scan UV maps (geometry offset and albedo) into bias
maps at every decoder scale; an `ExpressionEncoder` turns a few views of a frame into a VAE posterior over z, a
space shared by all identities; the `GaussianDecoder` (Codec-Avatar style: x2-upsampling conv blocks on UV
maps, each with the identity bias added) turns z into UV maps of position offset (in the local surface
frame), rotation, scale, opacity and colour features. A small per-Gaussian MLP makes the colour depend on the
view direction. Mouth interior, teeth, tongue and eyes are texels like any other and are decoded alike.

A Gaussian's centre is template point + identity offset (from the scan) + decoded offset; the per-frame rigid
head pose is applied last. Colour is the scan's albedo plus the decoded, view-dependent residual. The output
layers start at zero, so an untrained model puts every Gaussian on the identity's neutral surface, coloured
with the scan's albedo.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kernels
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import TexelLayout, region_gaussian_ids

SCAN_CHANNELS = 6  # identity geometry offset (3, metres, world axes) and albedo (3, in [0, 1])


def _leaky(x: jax.Array) -> jax.Array:
    return nnx.leaky_relu(x, 0.2)


GEOMETRY_INPUT_CHANNELS = 4  # tracked displacement (3, texel frame) and "has a tracked mesh"


def _zeros_init(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


class TemplateConstant(nnx.Variable):
    """Fixed per-Gaussian template data (surface points, frames, base scales): state, but never trained."""


def decoder_resolutions(config: ml_collections.ConfigDict) -> list[int]:
    """The UV resolution after each decoder block, coarse to fine; the last is `uv_resolution`."""
    base, channels, resolution = config.decoder_base_resolution, config.decoder_channels, config.uv_resolution
    if base * 2 ** len(channels) != resolution:
        raise ValueError(
            f"model config: decoder_base_resolution {base} doubled by {len(channels)} blocks "
            f"(decoder_channels={tuple(channels)}) gives {base * 2 ** len(channels)}, not uv_resolution {resolution}"
        )
    return [base * 2 ** (i + 1) for i in range(len(channels))]


# ------------------------------------------------------------------------------------- encoders


class IdentityEncoder(nnx.Module):
    """Neutral-scan UV maps [B, R, R, 6] -> one bias map per decoder block, coarse to fine."""

    def __init__(self, channels: tuple[int, ...], offset_scale: float, mask: np.ndarray, *, rngs: nnx.Rngs):
        self.offset_scale = offset_scale
        self.mask = TemplateConstant(jnp.asarray(mask)[..., None])
        self.stem = nnx.Conv(SCAN_CHANNELS + 1, channels[-1], (3, 3), rngs=rngs)
        self.downs = nnx.List(
            [nnx.Conv(channels[i + 1], channels[i], (3, 3), strides=2, rngs=rngs) for i in range(len(channels) - 1)]
        )
        self.to_bias = nnx.List([nnx.Conv(c, c, (1, 1), rngs=rngs) for c in channels])

    def __call__(self, scan_maps: jax.Array) -> list[jax.Array]:
        mask = jnp.broadcast_to(self.mask[...], (*scan_maps.shape[:-1], 1))
        x = jnp.concatenate([scan_maps[..., :3] / self.offset_scale, 2.0 * scan_maps[..., 3:] - 1.0, mask], -1)
        features = [_leaky(self.stem(x))]
        for down in reversed(self.downs):
            features.insert(0, _leaky(down(features[0])))
        return [to_bias(f) for to_bias, f in zip(self.to_bias, features)]


class ExpressionEncoder(nnx.Module):
    """A few views of one frame [B, V, H, W, 3] in [0, 1] (and, where the capture has one, the frame's tracked
    mesh as a UV displacement map [B, R, R, 4]) -> posterior mean and log-variance [B, z_dim].

    Each view goes through a strided CNN, is pooled to a fixed 4x4 grid and projected; the views' features
    are averaged, so any number of views, from any cameras, can go in. The displacement map (channel 3 says
    whether it is there) goes through its own CNN and adds to that average. At small image sizes the mouth
    is a few pixels: without the tracked geometry the codes learn the lips' motion far too slowly, so where
    meshes exist they go in (as in Deep Appearance Models' encoder), and training drops them at random
    (`geometry_dropout`) so that images alone give codes too.
    """

    POOL = 4
    # The posterior starts nearly deterministic (sigma ~ 0.02): with unit noise on z, the frame-to-frame changes
    # of the mean (mouth, blinks) drown and the decoder learns to ignore z (posterior collapse).
    INITIAL_LOG_VAR = -8.0

    def __init__(self, channels: tuple[int, ...], hidden: int, z_dim: int, uv_resolution: int, *,
                 code_bound: float = 0.0, rngs: nnx.Rngs):  # fmt: skip
        self.code_bound = code_bound
        widths = (3, *channels)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.project = nnx.Linear(channels[-1] * self.POOL**2, hidden, rngs=rngs)
        downs = max(int(math.log2(uv_resolution // self.POOL)), 0)
        geo_widths = (GEOMETRY_INPUT_CHANNELS, *(min(16 * 2**i, channels[-1]) for i in range(downs)))
        self.geometry_convs = nnx.List(
            [nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(geo_widths[:-1], geo_widths[1:])]
        )
        self.geometry_project = nnx.Linear(geo_widths[-1] * self.POOL**2, hidden, rngs=rngs)
        self.hidden = nnx.Linear(hidden, hidden, rngs=rngs)
        self.mean = nnx.Linear(hidden, z_dim, rngs=rngs)
        self.log_var = nnx.Linear(hidden, z_dim, kernel_init=_zeros_init,
                                  bias_init=nnx.initializers.constant(self.INITIAL_LOG_VAR), rngs=rngs)  # fmt: skip

    def _pooled(self, x: jax.Array, convs) -> jax.Array:
        for conv in convs:
            x = _leaky(conv(x))
        x = jax.image.resize(x, (x.shape[0], self.POOL, self.POOL, x.shape[-1]), "linear", antialias=True)
        return x.reshape(x.shape[0], -1)

    def __call__(self, images: jax.Array, geometry: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, views, height, width, _ = images.shape
        x = self._pooled(2.0 * images.reshape(batch * views, height, width, 3) - 1.0, self.convs)
        per_view = _leaky(self.project(x.reshape(batch, views, -1)))
        from_geometry = _leaky(self.geometry_project(self._pooled(geometry, self.geometry_convs)))
        h = _leaky(self.hidden(jnp.mean(per_view, axis=1) + from_geometry))
        mean, log_var = self.mean(h), self.log_var(h)
        if self.code_bound:  # smooth bounds: |mean| < code_bound, and no wider than the prior N(0, 1)
            mean = self.code_bound * jnp.tanh(mean / self.code_bound)
            log_var = -jax.nn.softplus(-log_var)
        return mean, log_var


# ------------------------------------------------------------------------------------- decoder


class UpBlock(nnx.Module):
    """x2 nearest upsampling, conv, + identity bias, conv: one resolution step of the UV decoder."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = _leaky(self.conv1(x) + bias)
        return _leaky(self.conv2(x))


class GaussianDecoder(nnx.Module):
    """z [B, z_dim] and identity bias maps -> UV maps [B, R, R, 10 + F] of per-texel Gaussian parameters.

    Channels: position offset (3, local frame, in units of `offset_scale`), rotation (3, axis-angle-like),
    log-scale (3), opacity logit (1), colour features (F). The output layer starts at zero.
    """

    GEOMETRY_CHANNELS = 10

    def __init__(self, z_dim: int, base_resolution: int, channels: tuple[int, ...], color_features: int, *,
                 rngs: nnx.Rngs):  # fmt: skip
        self.base_resolution = base_resolution
        self.project = nnx.Linear(z_dim, base_resolution**2 * channels[0], rngs=rngs)
        widths = (channels[0], *channels)
        self.blocks = nnx.List([UpBlock(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Conv(
            channels[-1], self.GEOMETRY_CHANNELS + color_features, (1, 1),
            kernel_init=_zeros_init, rngs=rngs,
        )  # fmt: skip

    def __call__(self, z: jax.Array, biases: list[jax.Array]) -> jax.Array:
        x = _leaky(self.project(z)).reshape(z.shape[0], self.base_resolution, self.base_resolution, -1)
        for block, bias in zip(self.blocks, biases):
            x = block(x, bias)
        return self.out(x)


# ------------------------------------------------------------------------------------- the avatar


class Gaussians(NamedTuple):
    """A batch of decoded avatars, posed: every field has leading [B]; N Gaussians each."""

    means: jax.Array  # [B, N, 3] world (head pose applied)
    quats: jax.Array  # [B, N, 4] wxyz, world
    scales: jax.Array  # [B, N, 3] metres
    opacities: jax.Array  # [B, N]
    head_means: jax.Array  # [B, N, 3] before the head pose
    albedo: jax.Array  # [B, N, 3] the scan's albedo at each texel
    color_features: jax.Array  # [B, N, F]
    offsets: jax.Array  # [B, N, 3] decoded offsets in metres (local frame), for the regulariser
    normal_tilt: jax.Array  # [B, N] 1 - cos(angle of each Gaussian's thin axis from the surface normal)
    head_rotation: jax.Array  # [B, 3, 3]
    head_translation: jax.Array  # [B, 3]


def _quat_multiply(a: jax.Array, b: jax.Array) -> jax.Array:
    """Hamilton product of wxyz quaternions (a then b applied in b's frame: rotation a @ b)."""
    aw, ax, ay, az = jnp.moveaxis(a, -1, 0)
    bw, bx, by, bz = jnp.moveaxis(b, -1, 0)
    return jnp.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def _base_scales(template: template_lib.Template, layout: TexelLayout) -> np.ndarray:
    """[N] in-plane size of each texel on the surface (metres), clipped to a sane band around the median."""
    dp_du, dp_dv = template_lib.uv_jacobian(template.vertices, template.faces, template.uvs, layout.face_ids)
    footprint = np.maximum(np.linalg.norm(dp_du, axis=-1), np.linalg.norm(dp_dv, axis=-1)) / layout.resolution
    median = float(np.median(footprint[footprint > 0]))
    return 0.5 * np.clip(footprint, 0.25 * median, 4.0 * median).astype(np.float32)


def _hair_shell_points(points: np.ndarray, normal: np.ndarray, template: template_lib.Template, layout: TexelLayout,
                       shell: float) -> np.ndarray:  # fmt: skip
    """The texel points with the scalp's moved `shell` metres out along the surface normal: a capture's hair stands
    off the skull (1-6 cm in the synthetic data), where the scalp's Gaussians otherwise reach only by growing."""
    scalp = region_gaussian_ids(layout, template, "scalp")
    if scalp.size == 0:
        raise ValueError("model.hair_shell > 0 needs a template with a 'scalp' region; this one has none")
    outward = np.sign(np.sum(normal[scalp] * (points[scalp] - points.mean(0)), -1, keepdims=True))
    moved = np.array(points, np.float32)
    moved[scalp] += shell * outward * normal[scalp]
    return moved


class UHAP(nnx.Module):
    """The universal prior: encoders, UV decoder, view-dependent colour, and rendering with `kernels`."""

    def __init__(self, template: template_lib.Template, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        decoder_resolutions(config)
        self.layout = TexelLayout.build(template, config.uv_resolution)
        self.z_dim = int(config.z_dim)
        self.offset_scale = float(config.offset_scale)
        self.max_scale_ratio = float(config.max_scale_ratio)
        self.max_log_scale = math.log(self.max_scale_ratio)
        self.thickness = float(config.thickness)
        self.view_dependent = bool(config.get("view_dependent", True))
        self.opacity_init = float(config.opacity_init_logit)
        channels = tuple(config.decoder_channels)
        layout = self.layout
        points = template_lib.surface_points(template.vertices, template.faces, layout.face_ids, layout.barys)
        normal, tangent = template_lib.surface_frames(template.vertices, template.faces, template.uvs, layout.face_ids)
        frame = jnp.stack([tangent, jnp.cross(normal, tangent), normal], axis=-1)  # columns: local axes
        self.hair_shell = float(config.get("hair_shell", 0.0))
        if self.hair_shell:
            points = _hair_shell_points(np.asarray(points), np.asarray(normal), template, layout, self.hair_shell)
        self.template_points = TemplateConstant(jnp.asarray(points, jnp.float32))
        self.frames = TemplateConstant(frame.astype(jnp.float32))
        self.frame_quats = TemplateConstant(rotations.matrix_to_quaternion(frame).astype(jnp.float32))
        self.base_scales = TemplateConstant(jnp.asarray(_base_scales(template, layout)))
        self.identity_encoder = IdentityEncoder(channels, self.offset_scale, layout.mask(), rngs=rngs)
        self.expression_encoder = ExpressionEncoder(
            tuple(config.expression_channels), config.expression_hidden, config.z_dim, config.uv_resolution,
            code_bound=config.get("code_bound", 0.0), rngs=rngs,
        )  # fmt: skip
        self.decoder = GaussianDecoder(
            config.z_dim, config.decoder_base_resolution, channels, config.color_features, rngs=rngs
        )
        self.color_hidden = nnx.Linear(config.color_features + 3, config.color_hidden, rngs=rngs)
        self.color_out = nnx.Linear(config.color_hidden, 3, kernel_init=_zeros_init, rngs=rngs)
        # A colour gain per capture camera (log, [cameras, 3]), used by the training loss only: rig cameras differ
        # in gain and white balance, and without these the view-dependent colour learns each training camera's
        # response, which a held-out camera does not share. 0 cameras: none.
        cameras = int(config.get("camera_gains", 0))
        self.camera_log_gains = nnx.Param(jnp.zeros((cameras, 3), jnp.float32)) if cameras else None

    def encode_expression(self, images: jax.Array, geometry: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Views [B, V, H, W, 3] in [0, 1], and optionally `expression_geometry` maps -> posterior mean and
        log-variance of z."""
        if geometry is None:
            resolution = self.layout.resolution
            geometry = jnp.zeros((images.shape[0], resolution, resolution, GEOMETRY_INPUT_CHANNELS), images.dtype)
        return self.expression_encoder(images, geometry)

    def expression_geometry(self, tracked_points: jax.Array, tracked_valid: jax.Array, scan_maps: jax.Array,
                            head_rotation: jax.Array, head_translation: jax.Array) -> jax.Array:  # fmt: skip
        """Tracked surface points [B, N, 3] (world) -> the encoder's UV map [B, R, R, 4]: their displacement
        from the neutral scan in each texel's local frame (units of `offset_scale`) and a channel that is 1
        where `tracked_valid` [B] says the frame has a tracked mesh."""
        rotation = rotations.axis_angle_to_matrix(head_rotation)
        head = jnp.einsum("bji,bnj->bni", rotation, tracked_points - head_translation[:, None])
        neutral = self.template_points[...] + self.layout.gather(scan_maps)[..., :3]
        local = jnp.einsum("nji,bnj->bni", self.frames[...], head - neutral) / self.offset_scale
        valid = tracked_valid.astype(local.dtype)[:, None, None]
        values = jnp.concatenate([local * valid, jnp.broadcast_to(valid, (*local.shape[:2], 1))], -1)
        resolution = self.layout.resolution
        maps = jnp.zeros((values.shape[0], resolution, resolution, GEOMETRY_INPUT_CHANNELS), values.dtype)
        return maps.at[:, self.layout.texel_yx[:, 0], self.layout.texel_yx[:, 1]].set(values)

    def decode(
        self, z: jax.Array, scan_maps: jax.Array, head_rotation: jax.Array, head_translation: jax.Array
    ) -> Gaussians:
        """z [B, z_dim], scan UV maps [B, R, R, 6], head pose (rotation vector [B, 3], translation [B, 3])."""
        maps = self.decoder(z, self.identity_encoder(scan_maps))
        texels = self.layout.gather(maps)  # [B, N, 10 + F]
        scan = self.layout.gather(scan_maps)
        offsets = self.offset_scale * texels[..., 0:3]
        head_means = self.template_points[...] + scan[..., :3] + jnp.einsum("nij,bnj->bni", self.frames[...], offsets)
        delta = jnp.concatenate([jnp.ones_like(texels[..., :1]), 0.5 * texels[..., 3:6]], -1)
        delta = delta / jnp.linalg.norm(delta, axis=-1, keepdims=True)
        local_quats = _quat_multiply(self.frame_quats[...], delta)
        log_ratio = self.max_log_scale * jnp.tanh(texels[..., 6:9] / self.max_log_scale)
        base = self.base_scales[...][:, None] * jnp.array([1.0, 1.0, self.thickness])
        rotation = rotations.axis_angle_to_matrix(head_rotation)  # [B, 3, 3]
        head_quat = rotations.matrix_to_quaternion(rotation)[:, None]
        return Gaussians(
            means=jnp.einsum("bij,bnj->bni", rotation, head_means) + head_translation[:, None],
            quats=_quat_multiply(head_quat, local_quats),
            scales=base * jnp.exp(log_ratio),
            opacities=jax.nn.sigmoid(self.opacity_init + texels[..., 9]),
            head_means=head_means,
            albedo=scan[..., 3:6],
            color_features=texels[..., 10:],
            offsets=offsets,
            normal_tilt=2.0 * jnp.sum(jnp.square(delta[..., 1:3]), -1),  # 1 - R[2, 2] of the unit quaternion
            head_rotation=rotation,
            head_translation=head_translation,
        )

    def camera_response(self, rgb: jax.Array, camera_index: jax.Array) -> jax.Array:
        """Renders [B, V, H, W, 3] as the capture's cameras `camera_index` [B, V] record them (their learned gains);
        unchanged without camera gains. An index outside the table is an error, not a silent clamp."""
        if self.camera_log_gains is None:
            return rgb
        table = self.camera_log_gains[...]
        gains = jnp.exp(table[camera_index])  # [B, V, 3]
        gains = jnp.where((camera_index < table.shape[0])[..., None], gains, jnp.nan)  # NaN: the step is skipped
        return rgb * gains[:, :, None, None, :]

    def colours(self, gaussians: Gaussians, world_to_cam: jax.Array) -> jax.Array:
        """Per-camera colours [B, C, N, 3]: albedo plus an MLP of colour features and the head-space view ray."""
        rot, trans = world_to_cam[..., :3, :3], world_to_cam[..., :3, 3]
        centres = -jnp.einsum("bcji,bcj->bci", rot, trans)  # camera centres, world
        centres = jnp.einsum("bji,bcj->bci", gaussians.head_rotation, centres - gaussians.head_translation[:, None])
        rays = gaussians.head_means[:, None] - centres[:, :, None]  # [B, C, N, 3]
        rays = rays / jnp.linalg.norm(rays, axis=-1, keepdims=True)
        if not self.view_dependent:  # the same colour from every camera (same parameters: the ray is held at 0)
            rays = jnp.zeros_like(rays)
        features = jnp.broadcast_to(
            gaussians.color_features[:, None], (*rays.shape[:-1], gaussians.color_features.shape[-1])
        )
        hidden = _leaky(self.color_hidden(jnp.concatenate([features, rays], -1)))
        return gaussians.albedo[:, None] + self.color_out(hidden)

    def capacity_for(self, gaussians: Gaussians, world_to_cam: jax.Array, intrinsics: jax.Array, *, width: int,
                     height: int) -> int:  # fmt: skip
        """The pair capacity that the worst avatar of this (concrete) batch needs, for a jitted `render`."""
        return max(
            kernels.capacity_for(g.means, g.quats, g.scales, g.opacities, views, ks, width=width, height=height)
            for g, views, ks in zip(_unbatch(gaussians), world_to_cam, intrinsics)
        )

    def render(
        self,
        gaussians: Gaussians,
        world_to_cam: jax.Array,
        intrinsics: jax.Array,
        *,
        width: int,
        height: int,
        capacity: int,
    ) -> kernels.Rendered:
        """Render each avatar of the batch into its own cameras [B, C, 4, 4] / [B, C, 3, 3] -> [B, C, H, W, ...].

        `capacity` is the static pair capacity per camera (`capacity_for`); overflow gives NaN images.
        """
        colours = self.colours(gaussians, world_to_cam)

        def one(means, quats, scales, opacities, colors, views, ks):
            return kernels.rasterize(means, quats, scales, opacities, colors, views, ks, width=width, height=height,
                                     capacity=capacity)  # fmt: skip

        return jax.vmap(one)(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, colours,
                             world_to_cam, intrinsics)  # fmt: skip


def _unbatch(gaussians: Gaussians) -> list[Gaussians]:
    return [Gaussians(*(field[b] for field in gaussians)) for b in range(gaussians.means.shape[0])]


def build_prior(template: template_lib.Template, config: ml_collections.ConfigDict) -> UHAP:
    """A freshly initialised prior of a prior config (`config.model`, seeded by `config.train.seed`)."""
    return UHAP(template, config.model, rngs=nnx.Rngs(config.train.seed))
