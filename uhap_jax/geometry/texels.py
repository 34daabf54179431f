"""Gaussians on UV texels: which texels of the template's UV map carry a Gaussian, and a neutral scan as UV maps.

Geometry only (no network): the data pipelines build per-texel tables from it, the prior decodes on it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import numpy as np

from uhap_jax.geometry import template as template_lib


@dataclasses.dataclass(frozen=True, eq=False)
class TexelLayout:
    """Which texels of an R x R UV map carry a Gaussian, and where each sits on the template mesh."""

    resolution: int
    face_ids: np.ndarray  # [N] int32
    barys: np.ndarray  # [N, 3] float32
    texel_yx: np.ndarray  # [N, 2] int32 (row, column)
    num_vertices: int  # of the template, to check that a scan is in its topology

    @classmethod
    def build(cls, template: template_lib.Template, resolution: int) -> TexelLayout:
        face_ids, barys, texel_yx = template_lib.uv_sample(template, resolution)
        if len(face_ids) == 0:
            raise ValueError(f"the template's UV layout covers no texel centre at resolution {resolution}")
        return cls(resolution, face_ids, barys, texel_yx, len(template.vertices))

    @property
    def num_gaussians(self) -> int:
        return len(self.face_ids)

    # Equal by value: a model's graph (nnx.GraphDef) holds its layout, and jitted functions are cached by graph;
    # two priors built or loaded apart (each stage, each avatar) then share their compiled functions.
    @functools.cached_property
    def _digest(self) -> str:
        digest = hashlib.sha256(f"{self.resolution}|{self.num_vertices}".encode())
        for array in (self.face_ids, self.barys, self.texel_yx):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TexelLayout) and (other is self or other._digest == self._digest)

    def __hash__(self) -> int:
        return hash(self._digest)

    def mask(self) -> np.ndarray:
        """[R, R] float32: 1 on texels that carry a Gaussian."""
        mask = np.zeros((self.resolution, self.resolution), np.float32)
        mask[self.texel_yx[:, 0], self.texel_yx[:, 1]] = 1.0
        return mask

    def gather(self, maps: jax.Array) -> jax.Array:
        """UV maps [..., R, R, K] -> per-Gaussian values [..., N, K]."""
        return maps[..., self.texel_yx[:, 0], self.texel_yx[:, 1], :]

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """Per-Gaussian values [N, K] -> UV maps [R, R, K], zero on texels without a Gaussian."""
        values = np.asarray(values, np.float32)
        maps = np.zeros((self.resolution, self.resolution, values.shape[-1]), np.float32)
        maps[self.texel_yx[:, 0], self.texel_yx[:, 1]] = values
        return maps


def scan_uv_maps(
    layout: TexelLayout, template: template_lib.Template, vertices: np.ndarray, colours: np.ndarray, source: str
) -> np.ndarray:
    """A neutral scan in the template's topology -> UV maps [R, R, 6]: geometry offset (metres) and albedo.

    `source` names the scan in errors. Scans in another topology must be registered to the template first.
    """
    vertices, colours = np.asarray(vertices, np.float32), np.asarray(colours, np.float32)
    if vertices.shape != (layout.num_vertices, 3) or colours.shape != vertices.shape:
        raise ValueError(
            f"{source}: neutral scan has {vertices.shape[0]} vertices (colours {list(colours.shape)}), but the "
            f"template has {layout.num_vertices}; scans must be registered to the template's topology"
        )
    scan_points = template_lib.surface_points(vertices, template.faces, layout.face_ids, layout.barys)
    template_points = template_lib.surface_points(template.vertices, template.faces, layout.face_ids, layout.barys)
    albedo = template_lib.surface_points(colours, template.faces, layout.face_ids, layout.barys)
    return layout.scatter(np.concatenate([np.asarray(scan_points - template_points), np.asarray(albedo)], -1))


def _nearest_vertices(texels: TexelLayout, template: template_lib.Template) -> np.ndarray:
    """Each Gaussian's nearest template vertex (its face's corner of largest barycentric weight) [N]."""
    return template.faces[texels.face_ids, np.argmax(texels.barys, axis=1)]


def lip_gaussian_ids(texels: TexelLayout, template: template_lib.Template) -> np.ndarray:
    """Gaussians whose texel lies nearest (largest barycentric) to a vertex of the template's "lips" region."""
    nearest_vertex = _nearest_vertices(texels, template)
    ids = np.flatnonzero(template.region_mask("lips")[nearest_vertex])
    if ids.size == 0:
        raise ValueError(f"no Gaussian of the {texels.resolution}² UV layout lies on the template's lips region")
    return ids


def region_gaussian_ids(texels: TexelLayout, template: template_lib.Template, region: str) -> np.ndarray:
    """Gaussians whose texel's nearest vertex is in `region` (empty when the template has no such region)."""
    if region not in template.region_names:
        return np.zeros(0, np.int64)
    return np.flatnonzero(template.region_mask(region)[_nearest_vertices(texels, template)])


def measured_gaussian_ids(texels: TexelLayout, template: template_lib.Template, hair_shell: float) -> np.ndarray:
    """The Gaussians that a neutral scan or a tracked mesh constrains: all of them, or all but the scalp's when the
    scalp is a hair shell (`model.hair_shell` > 0), which stands off the skull that scans and trackers see."""
    ids = np.arange(texels.num_gaussians)
    return np.setdiff1d(ids, region_gaussian_ids(texels, template, "scalp")) if hair_shell > 0 else ids


def expression_gaussian_ids(
    texels: TexelLayout, template: template_lib.Template, threshold: float = 0.05
) -> np.ndarray:
    """Gaussians whose texel's nearest vertex moves with the template's expression rig (any weight > `threshold`:
    jaw, lips, eyelids, brows, eyeballs) and is not scalp (where hair hides the skin); neck, ears and upper
    cheeks are left out too."""
    nearest_vertex = _nearest_vertices(texels, template)
    moving = np.max(np.stack(list(template.weights.values())), axis=0) > threshold
    if "scalp" in template.region_names:
        moving &= ~template.region_mask("scalp")
    return np.flatnonzero(moving[nearest_vertex])


def split_lips(
    texels: TexelLayout, template: template_lib.Template, lip_ids: np.ndarray, up_axis: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `lip_ids` of the upper- and lower-lip Gaussians: above or below the mouth's mid-height.

    The mouth opening is the distance between the two groups' centroids; it needs no landmark Gaussian, which a
    coarse UV layout may not have (the procedural lips are two texel rows high at 32²).
    """
    points = template_lib.surface_points(template.vertices, template.faces, texels.face_ids, texels.barys)
    height = np.asarray(points)[lip_ids, up_axis]
    upper = height > 0.5 * (height.min() + height.max())
    if upper.all() or not upper.any():
        raise ValueError(f"the lips of the {texels.resolution}² UV layout do not split into upper and lower lip")
    return np.flatnonzero(upper), np.flatnonzero(~upper)
