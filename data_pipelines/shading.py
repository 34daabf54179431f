"""How the synthetic captures are formed, on purpose unlike the avatar that learns from them.

The avatar is one flat Gaussian per UV texel on the template, coloured by a decoded albedo. The generator
renders instead:
- a surface `density`^2 times denser than the model's texels (the generator's UV resolution over the model's),
  displaced along the normal by fine procedural relief (pores, creases) that no template vertex carries;
- albedo detail above the model's UV resolution: pore-scale mottling, blotches, freckles, stubble, a patterned
  iris with a pupil;
- primitives off the template: hair as many thin strand segments, brows as strands, ears and a neck;
- shading by a few rig lights fixed in the world (so that it changes with the head's pose and the view):
  ambient with baked occlusion, Lambert diffuse on bump-mapped normals, Blinn-Phong specular (eye highlights),
  an oral cavity that light only reaches through the mouth's opening;
- a camera response: per-camera gain and white balance, shot and read noise, and soft-edged masks.

Everything per identity is drawn here from a seeded generator (`make_look`), in fixed counts per preset, so that
every identity runs one compiled renderer. `scene_gaussians` poses one frame; `shade` colours it for one camera.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib

# Rig lights fixed in the world (directions toward the light, y up, the face looking to -z), RGB intensities.
LIGHT_DIRECTIONS = np.array([[-0.55, 0.55, -0.63], [0.75, 0.1, -0.65], [0.1, 0.8, 0.6]], np.float32)
LIGHT_COLOURS = np.array([[0.78, 0.75, 0.7], [0.3, 0.33, 0.38], [0.35, 0.35, 0.35]], np.float32)
AMBIENT = np.array([0.3, 0.3, 0.32], np.float32)

_SKIN_REGIONS = ("face", "lips", "brows", "scalp")
_MOUTH_REGIONS = ("mouth_interior", "teeth", "tongue")


@dataclasses.dataclass(frozen=True)
class Counts:
    """Fixed primitive counts of the parts off the template (per preset; the same for every identity)."""

    hair_strands: int = 300
    hair_segments: int = 3
    brow_strands: int = 30  # per brow
    ear_points: int = 80  # per ear
    neck_points: int = 300


@dataclasses.dataclass(frozen=True)
class Look:
    """One identity's appearance on the generator's dense surface samples [N] and its extra primitives [M]."""

    # Dense surface samples (the generator's `SurfaceSampler`).
    albedo: np.ndarray  # [N, 3]
    displacement: np.ndarray  # [N] metres along the outward normal
    bump: np.ndarray  # [N, 2] the relief's gradient in the rest (tangent, bitangent) frame
    specular: np.ndarray  # [N]
    shininess: np.ndarray  # [N]
    occlusion: np.ndarray  # [N] ambient visibility in (0, 1]
    cavity_depth: np.ndarray  # [N] metres behind the lips for mouth parts, -1 elsewhere
    # Extra primitives, each riding on one template vertex (`anchor`) and the head's rotation.
    anchor: np.ndarray  # [M] int32
    offset: np.ndarray  # [M, 3] rest position minus the anchor's rest position
    frame: np.ndarray  # [M, 3, 3] rest orientation (columns: along, across, normal)
    scales: np.ndarray  # [M, 3]
    extra_albedo: np.ndarray  # [M, 3]
    extra_specular: np.ndarray  # [M]
    extra_shininess: np.ndarray  # [M]
    extra_occlusion: np.ndarray  # [M]
    strand: np.ndarray  # [M] 1 for strands (shaded as thin cylinders), 0 for surface patches
    closed: np.ndarray  # [M] 1 where the patch belongs to a closed surface (back faces culled)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


# ------------------------------------------------------------------------------------------- procedural fields


class _Waves:
    """A sum of random plane waves in 3D: value and gradient at points [N, 3] (band-limited noise)."""

    def __init__(self, rng: np.random.Generator, count: int, wavelength: tuple[float, float], amplitude: float):
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.k = directions * (2 * np.pi / rng.uniform(*wavelength, (count, 1)))
        self.phase = rng.uniform(0, 2 * np.pi, count)
        self.amplitude = amplitude / np.sqrt(count / 2)

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angle = points @ self.k.T + self.phase
        return self.amplitude * np.sin(angle).sum(1), self.amplitude * np.cos(angle) @ self.k


def _spots(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """[N] in [0, 1]: how much each point lies inside one of the round spots (soft-edged)."""
    if len(centres) == 0:
        return np.zeros(len(points))
    distance, index = cKDTree(centres).query(points, k=1)
    return np.clip(1.5 - distance / radii[index], 0.0, 1.0)


# ------------------------------------------------------------------------------------------- the identity's look


def make_look(
    template: template_lib.Template,
    rest_vertices: np.ndarray,
    base_albedo: np.ndarray,
    sample_faces: np.ndarray,
    sample_barys: np.ndarray,
    hair_colour: np.ndarray,
    counts: Counts,
    rng: np.random.Generator,
) -> Look:
    """Draws one identity's detail, relief, materials and extra primitives.

    `rest_vertices` [V, 3] is the identity's neutral mesh, `base_albedo` [V, 3] its coarse per-vertex colours,
    (`sample_faces`, `sample_barys`) the generator's dense surface samples.
    """
    corners = rest_vertices[template.faces[sample_faces]]
    points = np.einsum("nk,nkd->nd", sample_barys, corners).astype(np.float64)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    normals *= np.sign(np.sum(normals * points, axis=1, keepdims=True) + 1e-12)  # outward from the head centre
    region = np.asarray(template.region_names)[template.region_ids[template.faces[sample_faces, 0]]]
    skin = np.isin(region, _SKIN_REGIONS)
    colour = np.einsum("nk,nkd->nd", sample_barys, base_albedo[template.faces[sample_faces]]).astype(np.float64)

    # Relief: pores (~1 mm) and creases (~5 mm) on the skin only.
    pores, pore_gradient = _Waves(rng, 48, (0.0007, 0.0018), rng.uniform(1.2e-5, 2.5e-5))(points)
    creases, crease_gradient = _Waves(rng, 24, (0.003, 0.008), rng.uniform(6e-5, 1.5e-4))(points)
    displacement = np.where(skin, pores + creases, 0.0)
    gradient = np.where(skin[:, None], pore_gradient + crease_gradient, 0.0)
    tangent = np.cross([0.0, 1.0, 0.0], normals)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-12)
    bump = np.stack([np.sum(gradient * tangent, 1), np.sum(gradient * np.cross(normals, tangent), 1)], -1)

    # Albedo detail the model's texels cannot hold.
    face = region == "face"
    mottle, _ = _Waves(rng, 48, (0.0008, 0.003), 0.04)(points)
    blotch, _ = _Waves(rng, 16, (0.01, 0.03), 0.04)(points)
    colour[skin] *= (1.0 + mottle[skin, None]) * (1.0 + blotch[skin, None] * np.array([0.6, -0.3, -0.3]))
    face_points = points[face & (points[:, 2] < -0.03)]
    num_freckles = int(rng.choice([0, 40, 150]))
    if num_freckles and len(face_points):
        centres = face_points[rng.choice(len(face_points), num_freckles)]
        freckles = _spots(points, centres, rng.uniform(5e-4, 1.4e-3, num_freckles))
        colour *= 1.0 - 0.35 * (freckles * face)[:, None] * np.array([0.6, 0.9, 1.0])
    if rng.uniform() < 0.4:  # stubble on the jaw, chin and upper lip
        x, y, z = points.T
        upper_lip = (y < -0.035) & (np.abs(x) < 0.022)
        beard = face & (z < 0.0) & ((y < -0.05) | upper_lip | ((np.abs(x) > 0.045) & (y < 0.0)))
        stubble, _ = _Waves(rng, 64, (0.0005, 0.001), 1.0)(points)
        colour *= 1.0 - (0.25 * beard * (stubble > 0.3))[:, None]
    iris = region == "iris"
    for eye in ("eye_left", "eye_right"):
        relative = points - template.anchors[eye]
        on_this_eye = iris & (np.linalg.norm(relative, axis=1) < 0.02)
        angle = np.arccos(np.clip(-relative[:, 2] / np.maximum(np.linalg.norm(relative, axis=1), 1e-9), -1, 1))
        around = np.arctan2(relative[:, 1], relative[:, 0])
        pattern = 1.0 + 0.25 * np.sin(37 * around + 5 * angle) * np.sin(11 * around)
        colour[on_this_eye] *= pattern[on_this_eye, None]
        colour[on_this_eye & (angle < 0.17)] = 0.03  # the pupil
    colour[region == "scalp"] = hair_colour * 0.7

    specular = np.select([region == "lips", skin, np.isin(region, ("eyeball", "iris")), region == "teeth",
                          region == "tongue"], [0.18, 0.07, 0.9, 0.35, 0.3], 0.05)  # fmt: skip
    shininess = np.select([skin, np.isin(region, ("eyeball", "iris"))], [25.0, 250.0], 50.0)
    t_zone = face & (np.abs(points[:, 0]) < 0.015) & (points[:, 1] > -0.03)
    specular = np.where(t_zone, specular * rng.uniform(1.5, 2.5), specular)
    # Baked on the mesh's skin vertices (few, whatever the sample count), then interpolated to the samples.
    vertex_region = np.asarray(template.region_names)[template.region_ids]
    vertex_skin = np.isin(vertex_region, _SKIN_REGIONS)
    vertex_normals = _vertex_normals(rest_vertices.astype(np.float64), template.faces)
    vertex_occlusion = _skin_occlusion(rest_vertices.astype(np.float64), vertex_normals, vertex_skin)
    occlusion = np.einsum("nk,nk->n", sample_barys, vertex_occlusion[template.faces[sample_faces]])
    occlusion = np.where(skin, occlusion, 1.0)
    lips_z = float(np.min(rest_vertices[template.region_mask("lips"), 2]))
    cavity = np.where(np.isin(region, _MOUTH_REGIONS), np.maximum(points[:, 2] - lips_z, 0.0), -1.0)
    extras = _extras(template, rest_vertices, hair_colour, colour, points, normals, region, counts, rng)
    return Look(
        albedo=np.clip(colour, 0.0, 1.0).astype(np.float32),
        displacement=displacement.astype(np.float32),
        bump=bump.astype(np.float32),
        specular=specular.astype(np.float32),
        shininess=shininess.astype(np.float32),
        occlusion=occlusion.astype(np.float32),
        cavity_depth=cavity.astype(np.float32),
        **extras,
    )


def _skin_occlusion(points: np.ndarray, normals: np.ndarray, skin: np.ndarray, emitters: int = 512) -> np.ndarray:
    """Baked ambient visibility [N]: one pass of disc-to-point occlusion from a subset of the skin.

    A disc at q (normal m, area A) shadows p (normal n) by A cos+(n, q-p) cos+(m, p-q) / (pi d^2 + A): folds
    (eye sockets, beside the nose, under the lips) darken; the open cheek stays near 1.
    """
    rng = np.random.default_rng(0)
    source = np.flatnonzero(skin)
    chosen = source[rng.choice(len(source), min(emitters, len(source)), replace=False)]
    area = 4 * np.pi * 0.1**2 / len(chosen)  # the head's ~0.12 m^2 spread over the emitters
    out = np.ones(len(points))
    emitter, emitter_normal = points[chosen].T, normals[chosen].T
    for start in range(0, len(points), 4096):
        p, n = points[start : start + 4096, :, None], normals[start : start + 4096, :, None]
        # Per axis [P, E] (sums in the same order as over a [P, E, 3] array, which was ~3x slower).
        d = [emitter[k] - p[:, k] for k in range(3)]
        dist2 = np.maximum(d[0] * d[0] + d[1] * d[1] + d[2] * d[2], 1e-8)
        length = np.sqrt(dist2)
        unit = [dk / length for dk in d]
        cos_receiver = np.clip(unit[0] * n[:, 0] + unit[1] * n[:, 1] + unit[2] * n[:, 2], 0, None)
        cos_emitter = np.clip(-(unit[0] * emitter_normal[0] + unit[1] * emitter_normal[1]
                                + unit[2] * emitter_normal[2]), 0, None)  # fmt: skip
        shadow = np.sum(area * cos_receiver * cos_emitter / (np.pi * dist2 + area), 1)
        out[start : start + 4096] = np.clip(1.0 - shadow, 0.25, 1.0)
    return out


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals [V, 3], flipped to point away from the head's centre."""
    cross = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], cross)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return normals * np.sign(np.sum(normals * vertices, axis=1, keepdims=True) + 1e-12)


def _frames_along(along: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """[M, 3, 3] orthonormal columns (along, across, normal'), `along` kept exactly."""
    along = along / np.maximum(np.linalg.norm(along, axis=1, keepdims=True), 1e-12)
    across = np.cross(normal, along)
    bad = np.linalg.norm(across, axis=1) < 1e-6
    across[bad] = np.cross(along[bad], [0.0, 0.0, 1.0])
    across /= np.maximum(np.linalg.norm(across, axis=1, keepdims=True), 1e-12)
    return np.stack([along, across, np.cross(along, across)], -1)


def _extras(template, rest_vertices, hair_colour, colour, points, normals, region, counts: Counts, rng) -> dict:
    """Hair strands, brow strands, ears and neck in the identity's rest frame, anchored to template vertices."""
    parts = []  # (positions, frames, scales, albedo, specular, shininess, occlusion, strand, closed, anchor_pool)

    # Hair: strands rooted on the scalp, rising along the normal and then falling back and down.
    scalp = np.flatnonzero(region == "scalp")
    roots = scalp[rng.choice(len(scalp), counts.hair_strands)]
    length = rng.uniform(0.01, 0.06) * rng.uniform(0.7, 1.3, counts.hair_strands)
    segment = length / counts.hair_segments
    position = points[roots] + 0.0005 * normals[roots]
    direction = normals[roots] + rng.normal(0, 0.25, (counts.hair_strands, 3))
    fall = np.array([0.0, -1.0, 0.6]) / np.linalg.norm([0.0, -1.0, 0.6])
    curl = rng.uniform(0.2, 0.6)
    strand_colour = np.clip(hair_colour * rng.uniform(0.75, 1.25, (counts.hair_strands, 1)), 0, 1)
    hair_positions, hair_directions = [], []
    for _ in range(counts.hair_segments):
        direction = direction / np.linalg.norm(direction, axis=1, keepdims=True)
        hair_positions.append(position + 0.5 * segment[:, None] * direction)
        hair_directions.append(direction)
        position = position + segment[:, None] * direction
        direction = direction + curl * fall + rng.normal(0, 0.15, direction.shape)
    hair_positions, hair_directions = np.concatenate(hair_positions), np.concatenate(hair_directions)
    tiled = np.tile(np.arange(counts.hair_strands), counts.hair_segments)
    width = rng.uniform(1.2e-4, 2.5e-4)
    hair_scales = np.stack([np.tile(segment, counts.hair_segments) / 2.2,
                            np.full(len(tiled), width), np.full(len(tiled), width)], -1)  # fmt: skip
    parts.append((hair_positions, _frames_along(hair_directions, normals[roots][tiled]), hair_scales,
                  strand_colour[tiled], 0.12, 30.0, 0.8, 1.0, 0.0, "head"))  # fmt: skip

    # Brows: short strands lying on the brow region, pointing outward and a little up.
    brows = np.flatnonzero(region == "brows")
    roots = brows[rng.choice(len(brows), 2 * counts.brow_strands)]
    along = np.stack([np.sign(points[roots, 0] + 1e-9), np.full(len(roots), 0.35), np.zeros(len(roots))], -1)
    along = along - np.sum(along * normals[roots], 1, keepdims=True) * normals[roots]
    along += rng.normal(0, 0.15, along.shape)
    strand_length = rng.uniform(0.004, 0.007, len(roots))
    along /= np.linalg.norm(along, axis=1, keepdims=True)
    position = points[roots] + 0.0004 * normals[roots] + 0.5 * strand_length[:, None] * along
    brow_width = rng.uniform(8e-5, 1.5e-4)
    brow_scales = np.stack([strand_length / 2.2, np.full(len(roots), brow_width), np.full(len(roots), brow_width)], -1)
    brow_colour = np.clip(hair_colour * 0.7 * rng.uniform(0.8, 1.2, (len(roots), 1)), 0, 1)
    parts.append((position, _frames_along(along, normals[roots]), brow_scales, brow_colour, 0.08, 20.0, 0.9, 1.0,
                  0.0, "brows"))  # fmt: skip

    # Ears: cupped ovals on both sides, tilted forward, with a raised rim and a shadowed bowl.
    skin_tone = np.median(colour[region == "face"], axis=0)
    ear_scale = rng.uniform(0.9, 1.15)
    for side in (-1.0, 1.0):
        radius = np.sqrt(rng.uniform(0, 1, counts.ear_points))
        angle = rng.uniform(0, 2 * np.pi, counts.ear_points)
        u, v = radius * np.cos(angle), radius * np.sin(angle)
        out = np.array([side, 0.0, -0.45]) / np.linalg.norm([side, 0.0, -0.45])
        up = np.array([0.0, 1.0, 0.0])
        across = np.cross(out, up)
        cup = 0.004 * (radius**4) - 0.003 * (1 - radius) ** 2
        centre = np.array([side * 0.077, 0.0, 0.012])
        position = centre + ear_scale * (0.029 * u[:, None] * up + 0.017 * v[:, None] * across) + cup[:, None] * out
        spacing = ear_scale * 0.9 * np.sqrt(np.pi * 0.029 * 0.017 / counts.ear_points)
        scales = np.tile([spacing, spacing, 1e-4], (counts.ear_points, 1))
        frame = np.tile(np.stack([up, across, out], -1), (counts.ear_points, 1, 1))
        tint = np.clip(skin_tone * np.array([1.05, 0.93, 0.93]), 0, 1)
        parts.append((position, frame, scales, np.tile(tint, (counts.ear_points, 1)), 0.05, 20.0,
                      0.45 + 0.5 * radius, 0.0, 0.0, "head"))  # fmt: skip

    # Neck: a cylinder under the head.
    height = rng.uniform(-0.23, -0.065, counts.neck_points)
    angle = rng.uniform(-np.pi, np.pi, counts.neck_points)
    neck_radius = rng.uniform(0.045, 0.056)
    radial = np.stack([np.sin(angle), np.zeros_like(angle), -np.cos(angle)], -1)
    position = np.array([0.0, 0.0, 0.015]) + neck_radius * radial + height[:, None] * np.array([0.0, 1.0, 0.0])
    spacing = 1.1 * np.sqrt(2 * np.pi * neck_radius * 0.165 / counts.neck_points)
    frame = _frames_along(np.tile([0.0, 1.0, 0.0], (counts.neck_points, 1)), radial)
    shade_under_chin = 0.55 + 0.45 * np.clip((-0.07 - height) / 0.05, 0, 1)
    parts.append((position, frame, np.tile([spacing, spacing, 1e-4], (counts.neck_points, 1)),
                  np.tile(skin_tone * 0.95, (counts.neck_points, 1)), 0.04, 15.0, shade_under_chin, 0.0, 1.0,
                  "head"))  # fmt: skip

    rigid = (template.weights.get("jaw", 0) < 0.01) & np.isin(np.asarray(template.region_names)[template.region_ids],
                                                              ("scalp", "face"))  # fmt: skip
    rigid &= (template.weights.get("eyelid_left", 0) < 0.05) & (template.weights.get("eyelid_right", 0) < 0.05)
    rigid &= template.weights.get("brow", 0) < 0.05
    pools = {"head": np.flatnonzero(rigid), "brows": np.flatnonzero(template.region_mask("brows"))}
    columns = {k: [] for k in ("anchor", "offset", "frame", "scales", "extra_albedo", "extra_specular",
                               "extra_shininess", "extra_occlusion", "strand", "closed")}  # fmt: skip
    for position, frame, scales, albedo, spec, shine, occlusion, strand, closed, pool in parts:
        count = len(position)
        candidates = pools[pool]
        _, nearest = cKDTree(rest_vertices[candidates]).query(position)
        anchor = candidates[nearest]
        values = (anchor, position - rest_vertices[anchor], frame, scales, albedo, np.full(count, spec),
                  np.full(count, shine), np.broadcast_to(occlusion, (count,)), np.full(count, strand),
                  np.full(count, closed))  # fmt: skip
        for key, value in zip(columns, values):
            columns[key].append(np.asarray(value))
    out = {key: np.concatenate(value) for key, value in columns.items()}
    out["anchor"] = out["anchor"].astype(np.int32)
    return {key: (value if key == "anchor" else value.astype(np.float32)) for key, value in out.items()}


# ------------------------------------------------------------------------------------------- per frame (jnp)


def posed_extras(look, vertices: jnp.ndarray, rotation: jnp.ndarray):
    """The extra primitives on one posed mesh: means [M, 3], quats [M, 4], frames [M, 3, 3]."""
    means = vertices[look.anchor] + look.offset @ rotation.T
    frames = jnp.einsum("ij,mjk->mik", rotation, look.frame)
    return means, rotations.matrix_to_quaternion(frames), frames


def shade(albedo, normals, tangents, strand, specular, shininess, occlusion, means, camera_centre):
    """Colour [N, 3] under the rig lights seen from `camera_centre`.

    Surfaces are two-sided (the normal is flipped toward the viewer); strands are thin cylinders, whose shading
    normal is the view direction with its component along the strand removed.
    """
    view = camera_centre - means
    view = view / jnp.maximum(jnp.linalg.norm(view, axis=-1, keepdims=True), 1e-9)
    cylinder = view - jnp.sum(view * tangents, -1, keepdims=True) * tangents
    normals = jnp.where(strand[:, None] > 0.5, cylinder, normals)
    normals = normals / jnp.maximum(jnp.linalg.norm(normals, axis=-1, keepdims=True), 1e-9)
    normals = normals * jnp.where(jnp.sum(normals * view, -1, keepdims=True) < 0, -1.0, 1.0)
    lights = jnp.asarray(LIGHT_DIRECTIONS / np.linalg.norm(LIGHT_DIRECTIONS, axis=1, keepdims=True))
    cosines = jnp.clip(normals @ lights.T, 0.0, None)  # [N, L]
    diffuse = occlusion[:, None] * jnp.asarray(AMBIENT) + cosines @ jnp.asarray(LIGHT_COLOURS)
    halves = view[:, None] + lights[None]
    halves = halves / jnp.maximum(jnp.linalg.norm(halves, axis=-1, keepdims=True), 1e-9)
    highlight = jnp.clip(jnp.sum(halves * normals[:, None], -1), 0.0, 1.0) ** shininess[:, None]
    highlight = highlight * (cosines > 0)
    spec = specular[:, None] * (highlight @ jnp.asarray(LIGHT_COLOURS)) * occlusion[:, None]
    return albedo * diffuse + spec


def cavity_light(cavity_depth: jnp.ndarray, opening: jnp.ndarray) -> jnp.ndarray:
    """[N] light reaching the mouth's parts: it falls off with depth behind the lips, and reaches deeper the more
    the mouth opens (`opening` = jaw_open in [0, 1]); 1 for the rest of the surface."""
    reach = 0.003 + 0.012 * jnp.clip(opening, 0.0, 1.0)
    return jnp.where(cavity_depth < 0, 1.0, 0.15 + 0.85 * jnp.exp(-cavity_depth / reach))


def camera_response(rgb: jnp.ndarray, gain: jnp.ndarray, key: jax.Array, read_noise: float, shot_noise: float):
    """Linear rgb [H, W, 3] -> what the sensor records: gain x white balance, then shot and read noise."""
    exposed = rgb * gain
    sigma = jnp.sqrt(read_noise**2 + shot_noise**2 * jnp.clip(exposed, 0.0, None))
    return exposed + sigma * jax.random.normal(key, rgb.shape)


def soften(alpha: jnp.ndarray) -> jnp.ndarray:
    """A matting-like soft edge: alpha [H, W] blurred by a 3x3 binomial filter (only the edges change)."""
    kernel = jnp.outer(jnp.array([1.0, 2.0, 1.0]), jnp.array([1.0, 2.0, 1.0])) / 16.0
    padded = jnp.pad(alpha, 1, mode="edge")
    return jax.scipy.signal.convolve2d(padded, kernel, mode="valid")
