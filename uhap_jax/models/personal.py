"""Personalisation's model: the prior frozen but for one identity's conditioning (bias maps, optionally the shape,
the albedo and the last decoder layers), and the identity it produces.

`IdentityBias` stands in for the IdentityEncoder once an identity is fitted: the avatar folder stores its bias
maps (`uhap_jax.artifacts.avatars`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uhap_jax.geometry import template as template_lib
from uhap_jax.models.audio_to_latent import FrozenParam, freeze
from uhap_jax.models.prior import UHAP, build_prior

POSE_MODES = ("none", "video", "frame")


class IdentityBias(nnx.Module):
    """Stands in for the IdentityEncoder: one person's bias maps, whatever scan maps come in."""

    def __init__(self, maps: list[np.ndarray]):
        self.maps = nnx.List([nnx.Param(jnp.asarray(m, jnp.float32)) for m in maps])

    def __call__(self, scan_maps: jax.Array) -> list[jax.Array]:
        batch = scan_maps.shape[0]
        return [jnp.broadcast_to(m[...], (batch, *m[...].shape)) for m in self.maps]


def bias_shapes(prior: UHAP) -> list[tuple[int, ...]]:
    """The shape [r, r, c] of each bias map that the prior's decoder takes, coarse to fine."""
    resolution = prior.layout.resolution
    scan = jax.ShapeDtypeStruct((1, resolution, resolution, 6), jnp.float32)
    return [tuple(s.shape[1:]) for s in jax.eval_shape(lambda maps: prior.identity_encoder(maps), scan)]


def _set_variables(module: nnx.Module, source: type, target: type) -> None:
    """Every `source` variable under `module` becomes a `target` variable holding the same value, in place."""
    for path, variable in list(nnx.iter_graph(module)):
        if type(variable) is source:
            parent = module
            for name in path[:-1]:
                parent = parent[name] if isinstance(name, int) else getattr(parent, name)
            if isinstance(path[-1], int):
                parent[path[-1]] = target(variable.get_value())
            else:
                setattr(parent, path[-1], target(variable.get_value()))


def tuned_layers(prior: UHAP, count: int) -> list[nnx.Module]:
    """The last `count` decoder layers: 1 is the output conv and the colour MLP; k adds the last k - 1 UpBlocks."""
    blocks = list(prior.decoder.blocks)
    if not 0 <= count <= len(blocks) + 1:
        raise ValueError(f"tune.decoder_layers must be in 0..{len(blocks) + 1} for this prior, got {count}")
    if count == 0:
        return []
    return [prior.decoder.out, prior.color_hidden, prior.color_out, *blocks[len(blocks) - (count - 1) :]]


class ResidualIdentity(nnx.Module):
    """The IdentityEncoder's bias maps for the start's UV maps, fixed, plus free residual maps (from zero).

    The bias maps are free parameters that start where the IdentityEncoder puts them. They are not recomputed
    from a fitted shape or albedo: through the IdentityEncoder those would become levers on the decoder's colours
    and opacities, pulled to fit the one view rather than to describe the person.
    """

    def __init__(self, start: list[jax.Array], trainable: bool):
        self.start = nnx.List([FrozenParam(jnp.asarray(b, jnp.float32)) for b in start])
        kind = nnx.Param if trainable else FrozenParam
        self.residuals = nnx.List([kind(jnp.zeros(b.shape, jnp.float32)) for b in start])

    def __call__(self, scan_maps: jax.Array) -> list[jax.Array]:
        batch = scan_maps.shape[0]
        return [jnp.broadcast_to(b[...] + r[...], (batch, *b.shape)) for b, r in zip(self.start, self.residuals)]


class ShapeField(nnx.Module):
    """A smooth deformation of the start geometry [N, 3] (metres): a per-axis scale about the head centre (the
    origin) and displacements on a coarse 3D grid over the head (trilinear, in units of `offset_scale`).

    Heads differ from one another smoothly; per-texel offsets fitted to one view would bend what it does not see.
    With `view_axis` (the camera's optical axis, world), the deformation keeps only its part across that axis:
    depth is what one view does not show, and fitted, it drifts (-4 dB held-out-view PSNR on the tiny data).
    """

    def __init__(self, points: np.ndarray, grid: int, offset_scale: float, trainable: bool,
                 view_axis: np.ndarray | None = None):  # fmt: skip
        if grid == 1 or grid < 0:
            raise ValueError(f"tune.shape_grid must be 0 (scale only) or >= 2, got {grid}")
        points = np.asarray(points, np.float32)
        pad = 0.05 * (points.max(0) - points.min(0))
        self.lo = tuple(float(x) for x in points.min(0) - pad)
        self.hi = tuple(float(x) for x in points.max(0) + pad)
        self.offset_scale = float(offset_scale)
        self.points = FrozenParam(jnp.asarray(points))
        kind = nnx.Param if trainable else FrozenParam
        self.log_scale = kind(jnp.zeros(3, jnp.float32))
        axis = np.zeros(3) if view_axis is None else np.asarray(view_axis, np.float64) / np.linalg.norm(view_axis)
        self.view_axis = tuple(float(a) for a in axis)
        self.use_grid = grid >= 2
        self.grid = (kind if self.use_grid else FrozenParam)(jnp.zeros((max(grid, 1),) * 3 + (3,), jnp.float32))

    def __call__(self) -> jax.Array:
        points, grid = self.points[...], self.grid[...]
        axis = jnp.asarray(self.view_axis, points.dtype)
        across = lambda d: d - (d @ axis)[:, None] * axis  # noqa: E731
        scaled = (jnp.exp(self.log_scale[...]) - 1.0) * points
        if not self.use_grid:
            return across(scaled)
        lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
        coords = ((points - lo) / (hi - lo) * (grid.shape[0] - 1)).T
        moved = jnp.stack(
            [jax.scipy.ndimage.map_coordinates(grid[..., c], list(coords), order=1, mode="nearest") for c in range(3)],
            -1,
        )
        return across(scaled + self.offset_scale * moved)


def mouth_weights(points: np.ndarray, lips: np.ndarray, rigid_m: float = 0.03, falloff_m: float = 0.015) -> np.ndarray:
    """Each Gaussian's share [N] of a mouth shift: 1 within `rigid_m` of the lips' centre (lips, teeth, tongue,
    the mouth's inside and the skin around it move as one), a Gaussian falloff of `falloff_m` beyond. A mouth
    moved by the true offset this way takes the demo's LVE 44% / 49% under its baselines (docs/benchmarks.md,
    issue 17, session 19); a 15 mm falloff about the centre alone (no rigid core) leaves the corners behind."""
    points = np.asarray(points, np.float64)
    beyond = np.maximum(np.linalg.norm(points - points[lips].mean(0), axis=-1) - rigid_m, 0.0)
    return np.exp(-(beyond**2) / (2 * falloff_m**2)).astype(np.float32)


class PersonalModel(nnx.Module):
    """The prior, frozen but for its identity conditioning (bias maps; optionally the shape, the albedo map and
    the last decoder layers, a shift of the mouth: `tune`), with a correction of the encoder's head pose beside it."""

    ROTATION_UNIT, TRANSLATION_UNIT = 0.1, 0.01  # radians and metres per unit of the pose correction
    MOUTH_UNIT = 0.01  # metres per unit of the mouth shift

    def __init__(self, prior: UHAP, scan_maps: np.ndarray, tune: ml_collections.ConfigDict, num_frames: int,
                 view_axis: np.ndarray | None = None, lips: np.ndarray | None = None):  # fmt: skip
        if tune.pose not in POSE_MODES:
            raise ValueError(f"tune.pose must be one of {POSE_MODES}, got {tune.pose!r}")
        scan_maps = jnp.asarray(scan_maps, jnp.float32)
        start = [b[0] for b in prior.identity_encoder(scan_maps[None])]
        freeze(prior)
        for layer in tuned_layers(prior, tune.decoder_layers):
            _set_variables(layer, FrozenParam, nnx.Param)
        prior.identity_encoder = ResidualIdentity(start, tune.bias_maps)
        self.prior = prior
        self.start_maps = FrozenParam(scan_maps)
        points = prior.template_points[...] + prior.layout.gather(scan_maps)[:, :3]
        self.shape = ShapeField(np.asarray(points), tune.shape_grid, prior.offset_scale, tune.shape, view_axis)
        self.albedo = (nnx.Param if tune.albedo else FrozenParam)(scan_maps[..., 3:])
        # Where this person's mouth sits on their face: one 3D shift of the Gaussians about the lips (`lips`: a
        # [N] mask of the lips' Gaussians), across the camera's line of sight like the shape field's. Only with
        # tune.mouth, so that a fine-tune without it keeps the checkpoint layout of one written before it.
        if tune.mouth and (lips is None or not np.any(lips)):
            raise ValueError("tune.mouth needs the lips' Gaussians (lips=..., a mask with at least one)")
        weights = mouth_weights(np.asarray(points), lips) if tune.mouth else None
        self.mouth_weights = FrozenParam(jnp.asarray(weights)) if tune.mouth else None
        self.mouth = nnx.Param(jnp.zeros(3, jnp.float32)) if tune.mouth else None
        # Not identity, and not stored in the avatar: a correction of the encoder's head pose, for the whole video
        # or per frame, so that the shape need not absorb the encoder's pose errors.
        self.per_frame_pose = tune.pose == "frame"
        pose_rows = num_frames if self.per_frame_pose else 1
        self.pose_correction = (FrozenParam if tune.pose == "none" else nnx.Param)(jnp.zeros((pose_rows, 6)))

    def head_pose(self, frame: jax.Array, rotation: jax.Array, translation: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The encoder's head pose of frames [B] with the fitted correction."""
        correction = self.pose_correction[...][frame if self.per_frame_pose else jnp.zeros_like(frame)]
        return (rotation + self.ROTATION_UNIT * correction[:, :3],
                translation + self.TRANSLATION_UNIT * correction[:, 3:])  # fmt: skip

    def scan_maps(self) -> jax.Array:
        """The identity's UV maps [R, R, 6]: the start's offsets moved by the shape field and the mouth shift, and
        the albedo."""
        rows, cols = self.prior.layout.texel_yx[:, 0], self.prior.layout.texel_yx[:, 1]
        moved = self.shape()
        if self.mouth is not None:
            moved = moved + self.mouth_weights[...][:, None] * self.mouth_shift()
        offsets = self.start_maps[...][..., :3].at[rows, cols].add(moved)
        return jnp.concatenate([offsets, self.albedo[...]], -1)

    def mouth_shift(self) -> jax.Array:
        """The mouth's shift [3] (metres, head space) as applied: the parameter without its part along the line of
        sight (Adam moves the raw parameter there too, where no gradient reaches it)."""
        axis = jnp.asarray(self.shape.view_axis, jnp.float32)
        shift = self.MOUTH_UNIT * self.mouth[...]
        return shift - (shift @ axis) * axis

    def bias_maps(self) -> list[jax.Array]:
        """The decoder's bias maps [r, r, c] for the current identity, coarse to fine."""
        return [b[0] for b in self.prior.identity_encoder(self.scan_maps()[None])]


@dataclasses.dataclass(frozen=True)
class PersonalIdentity:
    """What personalisation produces: the identity conditioning and the prior's (possibly tuned) parameters."""

    bias_maps: list[np.ndarray]  # [r, r, c] per decoder block, coarse to fine
    scan_maps: np.ndarray  # [R, R, 6] fitted geometry offset and albedo
    start_scan_maps: np.ndarray  # [R, R, 6] where the fit started (the scan, or the template with the video's albedo)
    prior_params: dict  # the prior's parameters, pure dict, with the tuned decoder layers


def personalized_prior(prior_cfg: ml_collections.ConfigDict, template: template_lib.Template,
                       identity: PersonalIdentity) -> UHAP:  # fmt: skip
    """A prior holding the identity's parameters, with its bias maps in place of the IdentityEncoder."""
    model = build_prior(template, prior_cfg)
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, identity.prior_params))
    nnx.update(model, params)
    model.identity_encoder = IdentityBias(identity.bias_maps)
    return model
