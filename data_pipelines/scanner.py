"""Neutral scans as a structured-light or photogrammetry scanner gives them, and their registration.

`scan` captures an identity's neutral head in a separate session: the true surface (the generator's displaced,
detailed skin, not the template's vertices) resampled at jittered points and triangulated anew, with ~0.5 mm
noise along the normal, and with the holes scanners leave: the hair (no return from hair), under the chin and
around the ears (occluded), the eyes (specular), and the closed mouth's inside (never seen). Colours come from the
detailed albedo with some noise.

The model's scan inputs are in the template's topology, so `register` fits the template to the raw scan as a
capture pipeline would: nearest-point correspondences with normal agreement (the lips matched to the scan's
lip-coloured points), solved for smooth per-vertex offsets (a Laplacian prior), repeated; the parts the scan does
not see follow the nearest fitted skin. The layout keeps both: `neutral_scan/mesh.ply` is the registration (what
every consumer reads, as before), `neutral_scan/scan.ply` (`layout.RAW_SCAN_FILE`) the raw scan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg
from scipy.spatial import Delaunay, cKDTree

from uhap_jax.geometry import template as template_lib


@dataclasses.dataclass(frozen=True)
class Scan:
    vertices: np.ndarray  # [S, 3] metres, the head's frame
    faces: np.ndarray  # [T, 3]
    colours: np.ndarray  # [S, 3] in [0, 1]


def scan(
    template: template_lib.Template,
    rest_vertices: np.ndarray,
    detail_albedo,
    displacement,
    resolution: int,
    rng: np.random.Generator,
    noise_m: float = 0.0005,
) -> Scan:
    """A raw scan of the identity whose neutral mesh is `rest_vertices` [V, 3] (template topology).

    `detail_albedo(face_ids, barys) -> [S, 3]` and `displacement(face_ids, barys) -> [S]` evaluate the identity's
    fine albedo and relief at surface points; `resolution` sets the sample spacing (a UV grid of that size,
    jittered within each texel).
    """
    face_ids, barys, texel_yx = template_lib.uv_sample(template, resolution)
    # Jitter: move each sample to a random point of its face near the texel centre (not on a vertex).
    jitter = rng.dirichlet(np.ones(3), len(face_ids))
    barys = (0.6 * barys + 0.4 * jitter).astype(np.float64)
    region = np.asarray(template.region_names)[template.region_ids[template.faces[face_ids, 0]]]
    corners = rest_vertices[template.faces[face_ids]].astype(np.float64)
    points = np.einsum("nk,nkd->nd", barys, corners)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    normals *= np.sign(np.sum(normals * points, axis=1, keepdims=True) + 1e-12)
    points += normals * (np.asarray(displacement(face_ids, barys))[:, None] + rng.normal(0, noise_m, (len(points), 1)))
    colours = np.clip(np.asarray(detail_albedo(face_ids, barys)) * rng.normal(1.0, 0.03, (len(points), 3)), 0, 1)

    keep = np.isin(region, ("face", "lips", "brows", "scalp"))
    x, y, z = points.T
    keep &= ~(region == "scalp")  # hair returns nothing
    keep &= ~((y < -0.085) & (z > -0.05))  # under the chin
    keep &= ~((np.abs(x) > 0.06) & (np.abs(y) < 0.035) & (np.abs(z - 0.012) < 0.03))  # around the ears
    keep &= rng.uniform(size=len(points)) > 0.01  # dropouts
    # A few random holes: specular or dark patches the scanner missed.
    centres = points[keep][rng.choice(int(keep.sum()), 4)]
    for centre in centres:
        keep &= np.linalg.norm(points - centre, axis=1) > rng.uniform(0.002, 0.006)
    return _triangulate(texel_yx[keep], points[keep], colours[keep])


def _triangulate(texel_yx: np.ndarray, points: np.ndarray, colours: np.ndarray) -> Scan:
    """Delaunay in the UV plane, then drop triangles that bridge holes or UV seams (long 3D edges)."""
    uv = texel_yx[:, ::-1].astype(np.float64)
    triangles = Delaunay(uv).simplices
    edges = np.stack([np.linalg.norm(points[triangles[:, i]] - points[triangles[:, (i + 1) % 3]], axis=1)
                      for i in range(3)], -1).max(1)  # fmt: skip
    uv_edges = np.stack([np.linalg.norm(uv[triangles[:, i]] - uv[triangles[:, (i + 1) % 3]], axis=1)
                         for i in range(3)], -1).max(1)  # fmt: skip
    good = (edges < 4.0 * np.median(edges)) & (uv_edges < 2.5)
    triangles = triangles[good]
    used = np.unique(triangles)
    remap = np.full(len(points), -1)
    remap[used] = np.arange(len(used))
    return Scan(points[used].astype(np.float32), remap[triangles].astype(np.int32), colours[used].astype(np.float32))


# ------------------------------------------------------------------------------------------- registration


def _laplacian(num_vertices: int, faces: np.ndarray) -> sparse.csr_matrix:
    """Uniform graph Laplacian (I - mean of neighbours)."""
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(num_vertices, num_vertices)).tocsr()
    adjacency.data[:] = 1.0
    degree = np.asarray(adjacency.sum(1)).ravel()
    return sparse.identity(num_vertices) - sparse.diags(1.0 / np.maximum(degree, 1)) @ adjacency


# Lips are redder than the skin around them: log(green / red) lower by ~0.5 (an albedo of the skin's x (0.9, 0.55,
# 0.58)); freckles and blotches move it by ~0.15. Points this far below the skin's typical value count as lips.
LIP_CHROMA_DROP = 0.3
LIP_SEARCH_RADIUS = 0.045  # metres around the template's (scaled) lips in which the lip colour is looked for
MIN_LIP_POINTS = 20  # fewer lip-coloured points than this: the scan has no usable lip colour, match on geometry
# The lips' first move carries the face around them: rigidly within 20 mm of their centre, fading (a Gaussian of
# this width) beyond. Widths 10-35 mm place the lips alike; the widest fits the rest of the face best.
LIP_SHIFT_FALLOFF = 0.035


def lip_coloured_points(raw: Scan, lips_centre: np.ndarray) -> np.ndarray:
    """Which raw scan points [S] have the lips' colour: near `lips_centre` and clearly redder than the skin there."""
    colours = raw.colours.astype(np.float64) + 1e-3
    chroma = np.log(colours[:, 1]) - np.log(colours[:, 0])
    near = np.linalg.norm(raw.vertices - lips_centre, axis=1) < LIP_SEARCH_RADIUS
    if not near.any():
        return near
    skin = np.percentile(chroma[near], 75)
    return near & (chroma < skin - LIP_CHROMA_DROP)


def register(template: template_lib.Template, raw: Scan, iterations: int = 6, smoothness: float = 3.0,
             lip_colour: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The template fitted to a raw scan: vertices [V, 3] and colours [V, 3] in the template's topology.

    Each iteration matches skin vertices to their nearest scan point (within 8 mm, normals agreeing) and solves
    min sum w |v + d - target|^2 + smoothness |L d|^2 for the offsets d (relative to a per-axis scale fitted
    first); vertices with no match follow the Laplacian. Parts the scan cannot see (mouth inside, eyes) move
    with the nearest fitted skin.

    Nearest points fix the surface but not where along it a vertex lands: the lips' shape says little about
    where they are on a smooth face, and geometry alone left them 4.9 mm rms from the truth on 8 synthetic
    identities (15 mm on one). With `lip_colour` (the scan's colours, as a capture pipeline uses texture
    landmarks), the template's lips match only lip-coloured scan points (`lip_coloured_points`) and the other
    skin only the rest, both ways (each lip-coloured point also pulls its nearest lip vertex): 3.7 mm rms. The
    lips still stopped part of the way to their colour (their centroid 3.3 mm from the truth's, 5.8 at worst), so
    they now start there (`_moved_with_the_lips`): 1.5 mm rms, centroid 0.9 mm (docs/benchmarks.md). Scans
    without lip colour fall back to geometry.
    """
    rest = template.vertices.astype(np.float64)
    region = np.asarray(template.region_names)[template.region_ids]
    skin = np.isin(region, ("face", "lips", "brows", "scalp"))
    lip_vertices = np.flatnonzero(region == "lips")
    laplacian = _laplacian(len(rest), template.faces)
    system_l = smoothness * (laplacian.T @ laplacian)
    tree = cKDTree(raw.vertices)
    raw_normals = _vertex_normals(raw.vertices.astype(np.float64), raw.faces)
    # The scan and the template share the head frame: start from the per-axis scale that fits best (ICP), so that
    # the offsets solved next need not slide along the surface to take up the head's size.
    scale = np.ones(3)
    for _ in range(8):
        distance, index = tree.query(rest * scale)
        pairs = skin & (distance < 0.015)
        scale = np.sum(raw.vertices[index[pairs]] * rest[pairs], 0) / np.sum(rest[pairs] ** 2, 0)
    lips = np.zeros(len(raw.vertices), bool)
    if lip_colour and len(lip_vertices):
        lips = lip_coloured_points(raw, (rest[lip_vertices] * scale).mean(0))
    guided = int(lips.sum()) >= MIN_LIP_POINTS
    lip_points, other_points = np.flatnonzero(lips), np.flatnonzero(~lips)
    if guided:
        lip_tree, other_tree = cKDTree(raw.vertices[lip_points]), cKDTree(raw.vertices[other_points])
    else:
        lip_tree, other_tree, other_points = None, tree, np.arange(len(raw.vertices))
    start = rest * (scale - 1.0)  # offsets relative to the scaled start: the smoothness prior pulls toward it
    if guided:
        start = start + _moved_with_the_lips(rest * scale, lip_vertices, raw.vertices[lip_points])
    offsets = start
    for step in range(iterations):
        current = rest + offsets
        normals = _vertex_normals(current, template.faces)
        distance, index = other_tree.query(current)
        index = other_points[index]
        radius = np.full(len(rest), 0.008 if step else 0.015)
        if guided:
            lip_distance, lip_index = lip_tree.query(current[lip_vertices])
            distance[lip_vertices], index[lip_vertices] = lip_distance, lip_points[lip_index]
            radius[lip_vertices] = 0.015  # lips may have to slide further, to where their colour is
        agree = np.abs(np.sum(normals * raw_normals[index], axis=1)) > 0.5
        weight = (skin & agree & (distance < radius)).astype(np.float64)
        target = raw.vertices[index].astype(np.float64) - rest
        if guided:
            _pull_lips_from_their_points(raw.vertices[lip_points], current, rest, lip_vertices, target, weight)
        system = (sparse.diags(weight + 1e-4) + system_l).tocsc()
        solve = sparse_linalg.factorized(system)
        offsets = start + np.stack([solve(weight * (target - start)[:, k]) for k in range(3)], -1)
    matched = weight > 0
    # Unseen parts (and unmatched skin far from any match) follow the nearest matched skin's offset.
    _, nearest = cKDTree(rest[matched]).query(rest[~skin])
    offsets[~skin] = offsets[matched][nearest]
    _, colour_index = tree.query(rest + offsets)
    colours = raw.colours[colour_index]
    return (rest + offsets).astype(np.float32), colours.astype(np.float32)


def _moved_with_the_lips(scaled: np.ndarray, lip_vertices: np.ndarray, lip_points: np.ndarray) -> np.ndarray:
    """Offsets [V, 3] that move the template's lips onto the lip-coloured points' centroid (where the lips are:
    within ~1 mm on synthetic identities), and the face around them with a falloff. Nearest points alone slide
    the lips only part of the way: once the two overlap, nothing pulls them further."""
    centre = scaled[lip_vertices].mean(0)
    beyond = np.maximum(np.linalg.norm(scaled - centre, axis=1) - 0.02, 0.0)
    return np.exp(-0.5 * (beyond / LIP_SHIFT_FALLOFF) ** 2)[:, None] * (lip_points.mean(0) - centre)


def _pull_lips_from_their_points(points: np.ndarray, current: np.ndarray, rest: np.ndarray,
                                 lip_vertices: np.ndarray, target: np.ndarray, weight: np.ndarray) -> None:  # fmt: skip
    """The backward half of the lips' matching, in place: each lip-coloured point (within 15 mm) pulls its nearest
    lip vertex, whose target becomes the mean of the forward match and its points' centroid. Without it, lips the
    scan has beyond the template's would pull nothing toward them."""
    distance, nearest = cKDTree(current[lip_vertices]).query(points)
    close = distance < 0.015
    sums = np.zeros((len(lip_vertices), 3))
    counts = np.zeros(len(lip_vertices))
    np.add.at(sums, nearest[close], points[close])
    np.add.at(counts, nearest[close], 1.0)
    pulled = counts > 0
    vertices = lip_vertices[pulled]
    backward = sums[pulled] / counts[pulled, None] - rest[vertices]
    forward = weight[vertices] > 0
    target[vertices] = np.where(forward[:, None], 0.5 * (target[vertices] + backward), backward)
    weight[vertices] = 1.0


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    cross = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], cross)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
