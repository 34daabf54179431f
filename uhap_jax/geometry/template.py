"""The template head mesh, its UV layout and named regions, and the UV sampler that puts one Gaussian per texel.

World frame of the procedural template: metres, y up, x to the subject's right, the face looking to -z.
A frontal OpenCV camera therefore sits on the -z axis looking toward +z (`cameras.look_at`). The head is about
0.21 m tall and centred on the origin. FLAME's template looks toward +z: rotate it 180 degrees about y.

Every vertex has one UV in [0, 1]^2 (v grows downward, like image rows) and faces index positions and UVs alike,
so vertices are split where the UV layout has seams. A texel of a UV map at resolution R is "inside the layout"
when its centre falls in a UV triangle; `uv_sample` maps each such texel to (face, barycentric), and
`surface_points` / `surface_frames` place it on any deformed copy of the mesh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

REGION_NAMES = (
    "face",
    "lips",
    "mouth_interior",
    "teeth",
    "tongue",
    "eyeball",
    "iris",
    "brows",
    "scalp",
    "neck",
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A triangle mesh with one UV per vertex and a region id per vertex.

    `weights` holds per-vertex rig weights ([V] float32, e.g. "jaw"), `anchors` named 3D points (e.g.
    "jaw_pivot") and `landmarks` named vertices (e.g. "upper_lip_mid"); the procedural template fills them for
    the synthetic rig, a loaded OBJ leaves them empty.
    """

    vertices: np.ndarray  # [V, 3] float32, metres
    faces: np.ndarray  # [F, 3] int32
    uvs: np.ndarray  # [V, 2] float32 in [0, 1]
    region_ids: np.ndarray  # [V] int32, indices into region_names
    region_names: tuple[str, ...]
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    anchors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    landmarks: dict[str, int] = dataclasses.field(default_factory=dict)  # named vertex indices

    def region_mask(self, name: str) -> np.ndarray:
        """[V] bool mask of the vertices in region `name`."""
        if name not in self.region_names:
            raise KeyError(f"template has no region {name!r}; it has {self.region_names}")
        return self.region_ids == self.region_names.index(name)


# ----------------------------------------------------------------------------------------- mesh building


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _grid_faces(rows: int, cols: int, index: np.ndarray) -> np.ndarray:
    """Two triangles per quad of a [rows, cols] vertex-index grid, wound counter-clockwise seen from outside."""
    a, b = index[:-1, :-1], index[:-1, 1:]
    c, d = index[1:, :-1], index[1:, 1:]
    return np.concatenate([np.stack([a, c, d], -1).reshape(-1, 3), np.stack([a, d, b], -1).reshape(-1, 3)])


def _grid_uvs(rows: int, cols: int, rect: tuple[float, float, float, float]) -> np.ndarray:
    """UVs of a [rows, cols] grid filling `rect` = (u0, v0, u1, v1) of the atlas."""
    u0, v0, u1, v1 = rect
    u, v = np.meshgrid(np.linspace(u0, u1, cols), np.linspace(v0, v1, rows))
    return np.stack([u, v], -1).reshape(-1, 2)


@dataclasses.dataclass
class _Part:
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    regions: np.ndarray  # [V] region names
    weights: dict[str, np.ndarray]
    landmarks: dict[str, int] = dataclasses.field(default_factory=dict)


class _Proportions:
    """The procedural head's landmarks (metres), in one place so that parts fit together."""

    radii = np.array([0.075, 0.105, 0.095])  # ellipsoid half-width, half-height, half-depth
    mouth_y = -0.045
    mouth_half_width = 0.026
    eye_x, eye_y = 0.032, 0.022
    eye_radius = 0.012
    socket_depth, socket_sigma = 0.010, 0.011
    jaw_pivot = np.array([0.0, -0.012, 0.012])
    # The neck: a tube from inside the head (its top ring hidden under the jaw) to below the cameras' crop.
    neck_radius, neck_centre_z, neck_top, neck_bottom = 0.05, 0.015, -0.06, -0.22


P = _Proportions


def _skin_shape(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """The skin surface: an ellipsoid with a nose, eye sockets, a narrower jaw and fuller lips."""
    direction = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), -np.sin(theta) * np.cos(phi)], -1)
    points = direction * P.radii
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    front = _smoothstep(-z, 0.0, 0.05)
    jaw_taper = 1.0 - 0.22 * _smoothstep(-y, 0.0, 0.1)
    x = x * jaw_taper
    z = z * (1.0 - 0.08 * _smoothstep(-y, 0.04, 0.1))
    nose = 0.022 * _bump(x, y, 0.0, -0.004, 0.008, 0.02) * front
    lips = 0.005 * _bump(x, y, 0.0, P.mouth_y, 0.02, 0.008) * front
    chin = 0.006 * _bump(x, y, 0.0, -0.085, 0.015, 0.01) * front
    sockets = sum(
        P.socket_depth * _bump(x, y, side * P.eye_x, P.eye_y, P.socket_sigma, P.socket_sigma) * front
        for side in (-1.0, 1.0)
    )
    return np.stack([x, y, z - nose - lips - chin + sockets], -1)


def _skin(rows: int, cols: int, rect) -> _Part:
    """A latitude-longitude grid from the crown to under the chin, with a slit for the mouth.

    The mouth slit is one grid row whose interior vertices are duplicated: the quads above use the originals, the
    quads below the copies, so that the jaw can pull the lower lip away. Columns and rows are denser on the
    front of the face, so that the face gets most texels.
    """
    theta_mouth = np.arccos(P.mouth_y / P.radii[1])
    theta_max = 0.86 * np.pi
    n_top, n_face, n_low = rows // 6, rows // 2, rows - rows // 6 - rows // 2
    theta = np.concatenate(
        [
            np.linspace(0.0, 0.9, n_top, endpoint=False),
            np.linspace(0.9, theta_mouth, n_face, endpoint=False),
            np.linspace(theta_mouth, theta_max, n_low),
        ]
    )
    mouth_row = n_top + n_face
    s = np.linspace(-1.0, 1.0, cols)
    phi = np.pi * (0.55 * s + 0.45 * s**3)
    grid_theta, grid_phi = np.meshgrid(theta, phi, indexing="ij")
    vertices = _skin_shape(grid_theta, grid_phi).reshape(-1, 3)
    uvs = _grid_uvs(rows, cols, rect)
    index = np.arange(rows * cols).reshape(rows, cols)

    mouth_half_angle = np.arcsin(P.mouth_half_width / P.radii[0] / np.sin(theta_mouth))
    slit_cols = np.flatnonzero(np.abs(phi) < mouth_half_angle)
    copies = rows * cols + np.arange(len(slit_cols))
    below = index.copy()
    below[mouth_row, slit_cols] = copies
    faces = np.concatenate(
        [
            _grid_faces(mouth_row + 1, cols, index[: mouth_row + 1]),
            _grid_faces(rows - mouth_row, cols, below[mouth_row:]),
        ]
    )
    vertices = np.concatenate([vertices, vertices[index[mouth_row, slit_cols]]])
    uvs = np.concatenate([uvs, uvs[index[mouth_row, slit_cols]]])
    # The top row is one point (the crown): drop the triangles that collapse onto it.
    edge_a = vertices[faces[:, 1]] - vertices[faces[:, 0]]
    edge_b = vertices[faces[:, 2]] - vertices[faces[:, 0]]
    faces = faces[np.linalg.norm(np.cross(edge_a, edge_b), axis=1) > 1e-12]

    is_lower_lip = np.zeros(len(vertices), bool)
    is_lower_lip[copies] = True
    flat_theta = np.concatenate([grid_theta.ravel(), grid_theta[mouth_row, slit_cols]])
    flat_phi = np.concatenate([grid_phi.ravel(), grid_phi[mouth_row, slit_cols]])
    weights = _skin_weights(vertices, flat_theta, flat_phi, theta_mouth, mouth_half_angle, is_lower_lip)
    middle = int(np.argmin(np.abs(phi[slit_cols])))
    landmarks = {"upper_lip_mid": int(index[mouth_row, slit_cols[middle]]), "lower_lip_mid": int(copies[middle])}
    return _Part(vertices, faces, uvs, _skin_regions(vertices, flat_phi), weights, landmarks)


def _skin_weights(vertices, theta, phi, theta_mouth, mouth_half_angle, is_lower_lip) -> dict[str, np.ndarray]:
    """Rig weights of the skin: jaw (lens-shaped lip opening, whole lower face), lips, eyelids, brows."""
    x, y = vertices[:, 0], vertices[:, 1]
    below_mouth = (theta > theta_mouth + 1e-6) | is_lower_lip
    lens = np.clip(1.0 - (phi / mouth_half_angle) ** 2, 0.0, 1.0)
    jaw_sides = 1.0 - _smoothstep(np.abs(phi), 0.9, 1.6)
    lower_face = _smoothstep(theta - theta_mouth, 0.0, 0.12) * jaw_sides
    jaw = np.where(below_mouth, np.maximum(lens, lower_face), 0.0)
    front = np.abs(phi) < np.pi / 2
    near_mouth = _bump(x, y, 0.0, P.mouth_y, 0.018, 0.007) * front
    upper = (~below_mouth).astype(float)
    eyelids = {
        f"eyelid_{name}": _bump(x, y, side * P.eye_x, P.eye_y, P.socket_sigma, P.socket_sigma) * front
        for name, side in (("left", -1.0), ("right", 1.0))
    }
    brow = _smoothstep(y, P.eye_y + 0.006, P.eye_y + 0.02) * (1.0 - _smoothstep(y, 0.06, 0.09)) * front
    brow *= 1.0 - _smoothstep(np.abs(x), 0.045, 0.065)
    return {
        "jaw": jaw,
        "lip_upper": near_mouth * upper,
        "lip_lower": near_mouth * (1.0 - upper),
        "brow": brow,
        **eyelids,
    }


def _skin_regions(vertices: np.ndarray, phi: np.ndarray) -> np.ndarray:
    x, y = vertices[:, 0], vertices[:, 1]
    front = np.abs(phi) < np.pi / 2
    regions = np.full(len(vertices), "face", dtype=object)
    hairline = 0.062 - 0.11 * _smoothstep(np.abs(phi), 1.2, 2.6)
    regions[y > hairline] = "scalp"
    in_lips = (x / (P.mouth_half_width + 0.002)) ** 2 + ((y - P.mouth_y) / 0.0095) ** 2 < 1.0
    regions[in_lips & front] = "lips"
    for side in (-1.0, 1.0):
        dx = (x - side * P.eye_x) / 0.019
        arch = P.eye_y + 0.019 + 0.004 * (1.0 - dx**2)
        regions[(np.abs(dx) < 1.0) & (np.abs(y - arch) < 0.004) & front] = "brows"
    return regions


def _sphere(center, radii, rows: int, cols: int, rect, theta_range=(0.0, np.pi)) -> tuple[np.ndarray, ...]:
    """A latitude-longitude patch around the -z axis (theta is the angle from -z); returns verts, faces, uvs."""
    theta = np.linspace(*theta_range, rows)
    phi = np.linspace(-np.pi, np.pi, cols)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    direction = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), -np.cos(t)], -1).reshape(-1, 3)
    vertices = np.asarray(center) + direction * np.asarray(radii)
    faces = _grid_faces(rows, cols, np.arange(rows * cols).reshape(rows, cols))
    edge_a = vertices[faces[:, 1]] - vertices[faces[:, 0]]
    edge_b = vertices[faces[:, 2]] - vertices[faces[:, 0]]
    faces = faces[np.linalg.norm(np.cross(edge_a, edge_b), axis=1) > 1e-12]
    return vertices, faces, _grid_uvs(rows, cols, rect), t.ravel()


def _eyeball(side: float, name: str, rect) -> _Part:
    """An eyeball whose front cap (within 0.45 rad of the -z axis) is the iris; it rotates for gaze."""
    center = np.array([side * P.eye_x, P.eye_y, -0.066])
    vertices, faces, uvs, theta = _sphere(center, [P.eye_radius] * 3, 12, 16, rect)
    regions = np.where(theta < 0.45, "iris", "eyeball").astype(object)
    return _Part(vertices, faces, uvs, regions, {f"eyeball_{name}": np.ones(len(vertices))})


def _mouth_parts(rects) -> list[_Part]:
    """Mouth interior (a bowl behind the lips), upper and lower teeth (arcs) and the tongue."""
    lips_z = _skin_shape(np.array(np.arccos(P.mouth_y / P.radii[1])), np.array(0.0))[2]
    bowl_center = np.array([0.0, P.mouth_y, lips_z + 0.022])
    bowl, bowl_faces, bowl_uvs, _ = _sphere(
        bowl_center, [0.022, 0.016, 0.035], 8, 16, rects[0], (np.pi / 2, np.pi - 0.35)
    )
    bowl_jaw = _smoothstep(P.mouth_y - bowl[:, 1], -0.004, 0.004)
    parts = [_Part(bowl, bowl_faces, bowl_uvs, np.full(len(bowl), "mouth_interior", object), {"jaw": bowl_jaw})]

    arc_radius, teeth_front = 0.026, lips_z + 0.013
    angle = np.linspace(-1.15, 1.15, 14)
    for rect, (y0, y1), jaw in ((rects[1], (-0.0005, 0.008), 0.0), (rects[2], (-0.008, 0.0005), 1.0)):
        a, height = np.meshgrid(angle, P.mouth_y + np.linspace(y1, y0, 3))
        vertices = np.stack([arc_radius * np.sin(a), height, teeth_front + arc_radius * (1.0 - np.cos(a))], -1).reshape(
            -1, 3
        )
        faces = _grid_faces(3, len(angle), np.arange(3 * len(angle)).reshape(3, -1))
        parts.append(
            _Part(vertices, faces, _grid_uvs(3, len(angle), rect), np.full(len(vertices), "teeth", object),
                  {"jaw": np.full(len(vertices), jaw)})
        )  # fmt: skip

    s, t = np.meshgrid(np.linspace(-1.0, 1.0, 8), np.linspace(0.0, 1.0, 8))
    width = 0.017 * (1.0 - 0.35 * (1.0 - t) ** 2)
    tongue = np.stack(
        [
            s * width,
            P.mouth_y - 0.009 + 0.004 * (1.0 - s**2) * np.sin(np.pi * t),
            teeth_front + 0.006 + 0.035 * t,
        ],
        -1,
    ).reshape(-1, 3)
    faces = _grid_faces(8, 8, np.arange(64).reshape(8, 8))
    parts.append(_Part(tongue, faces, _grid_uvs(8, 8, rects[3]), np.full(64, "tongue", object), {"jaw": np.ones(64)}))
    return parts


def _neck(rows: int, cols: int, rects) -> list[_Part]:
    """The neck's tube in two halves (front and back), each its own UV patch, so that its texels stay about
    square in a patch taller than wide. Rigid with the head: no rig weight moves it."""
    parts = []
    for rect, (a0, a1) in zip(rects, ((-0.5 * np.pi, 0.5 * np.pi), (0.5 * np.pi, 1.5 * np.pi))):
        angle, height = np.meshgrid(np.linspace(a0, a1, cols), np.linspace(P.neck_top, P.neck_bottom, rows))
        vertices = np.stack(
            [P.neck_radius * np.sin(angle), height, P.neck_centre_z - P.neck_radius * np.cos(angle)], -1
        ).reshape(-1, 3)
        faces = _grid_faces(rows, cols, np.arange(rows * cols).reshape(rows, cols))
        parts.append(_Part(vertices, faces, _grid_uvs(rows, cols, rect), np.full(len(vertices), "neck", object), {}))
    return parts


def procedural_head(resolution: int = 64) -> Template:
    """The procedural template head; `resolution` sets the skin grid (rows = resolution, cols = 1.5x).

    The UV atlas: skin in the top 72%, then a band holding mouth interior, teeth, tongue, both eyeballs and the
    neck. The neck reaches below the crop of a head-framed camera, as a capture's neck does; without it the
    Gaussians of the chin had to stretch down to cover the neck, which held only from the training cameras
    (issue 19).
    """
    if resolution < 24:
        raise ValueError(f"procedural_head needs resolution >= 24 to resolve the mouth, got {resolution}")
    band = (0.74, 0.995)
    parts = [_skin(resolution, resolution * 3 // 2, (0.005, 0.005, 0.995, 0.72))]
    parts += _mouth_parts(
        [(0.005, band[0], 0.25, band[1]), (0.265, band[0], 0.425, 0.86), (0.265, 0.875, 0.425, band[1]),
         (0.44, band[0], 0.54, band[1])]
    )  # fmt: skip
    parts.append(_eyeball(-1.0, "left", (0.555, band[0], 0.685, band[1])))
    parts.append(_eyeball(1.0, "right", (0.7, band[0], 0.83, band[1])))
    parts += _neck(max(4, resolution // 6), max(8, resolution // 3),
                   [(0.845, band[0], 0.995, 0.862), (0.845, 0.872, 0.995, band[1])])  # fmt: skip

    vertices, faces, uvs, regions, landmarks, offset = [], [], [], [], {}, 0
    weight_names = sorted({name for part in parts for name in part.weights})
    weights = {name: [] for name in weight_names}
    for part in parts:
        vertices.append(part.vertices)
        faces.append(part.faces + offset)
        uvs.append(part.uvs)
        regions.append(part.regions)
        for name in weight_names:
            weights[name].append(part.weights.get(name, np.zeros(len(part.vertices))))
        landmarks.update({name: index + offset for name, index in part.landmarks.items()})
        offset += len(part.vertices)
    region_ids = np.array([REGION_NAMES.index(r) for r in np.concatenate(regions)], np.int32)
    anchors = {
        "jaw_pivot": P.jaw_pivot,
        "mouth_center": np.array([0.0, P.mouth_y, 0.0]),
        "eye_left": np.array([-P.eye_x, P.eye_y, -0.066]),
        "eye_right": np.array([P.eye_x, P.eye_y, -0.066]),
    }
    return Template(
        vertices=np.concatenate(vertices).astype(np.float32),
        faces=np.concatenate(faces).astype(np.int32),
        uvs=np.concatenate(uvs).astype(np.float32),
        region_ids=region_ids,
        region_names=REGION_NAMES,
        weights={name: np.concatenate(w).astype(np.float32) for name, w in weights.items()},
        anchors={name: a.astype(np.float32) for name, a in anchors.items()},
        landmarks=landmarks,
    )


# ----------------------------------------------------------------------------------------- OBJ loading


def load_obj(path: Path, labels: Path | None = None) -> Template:
    """Loads an OBJ with UVs (`vt`, `f v/vt`) as a Template, splitting vertices at UV seams.

    Regions come from `labels` when given: a JSON or .npz mapping region name -> vertex indices of the OBJ
    (0-based, as FLAME's mask files hold them), or a text file with one region name per OBJ vertex. Without
    `labels`, OBJ groups (`g name`) label the vertices of their faces. Unlabelled vertices are "face".
    """
    path = Path(path)
    positions, texcoords, corners, groups, group = [], [], [], [], "face"
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if parts[0] == "v":
                positions.append([float(p) for p in parts[1:4]])
            elif parts[0] == "vt":
                texcoords.append([float(p) for p in parts[1:3]])
            elif parts[0] in ("g", "o") and len(parts) > 1:
                group = parts[1]
            elif parts[0] == "f":
                refs = [p.split("/") for p in parts[1:]]
                if any(len(r) < 2 or not r[1] for r in refs):
                    raise ValueError("face without UV indices (need f v/vt)")
                ids = [(int(r[0]) - 1, int(r[1]) - 1) for r in refs]
                for k in range(1, len(ids) - 1):  # fan-triangulate polygons
                    corners.append([ids[0], ids[k], ids[k + 1]])
                    groups.append(group)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: cannot parse {line.strip()!r} ({error})") from error
    if not corners:
        raise ValueError(f"{path}: no faces with UVs")
    positions, texcoords = np.asarray(positions, np.float64), np.asarray(texcoords, np.float64)
    pairs = np.asarray(corners).reshape(-1, 2)
    if pairs[:, 0].max() >= len(positions) or pairs[:, 1].max() >= len(texcoords) or pairs.min() < 0:
        raise ValueError(f"{path}: a face indexes a vertex or UV that does not exist")
    unique_pairs, faces = np.unique(pairs, axis=0, return_inverse=True)
    uvs = texcoords[unique_pairs[:, 1]]
    uvs[:, 1] = 1.0 - uvs[:, 1]  # OBJ's v grows upward; ours grows downward like image rows.
    if uvs.min() < -1e-6 or uvs.max() > 1 + 1e-6:
        raise ValueError(f"{path}: UVs must lie in [0, 1]^2")
    source = unique_pairs[:, 0]
    names = _obj_labels(path, labels, len(positions), source, faces.reshape(-1, 3), groups)
    region_names = tuple(dict.fromkeys(["face", *sorted(set(names) - {"face"})]))
    return Template(
        vertices=positions[source].astype(np.float32),
        faces=faces.reshape(-1, 3).astype(np.int32),
        uvs=np.clip(uvs, 0.0, 1.0).astype(np.float32),
        region_ids=np.array([region_names.index(n) for n in names], np.int32),
        region_names=region_names,
    )


def _obj_labels(path, labels, num_positions, source, faces, groups) -> list[str]:
    """One region name per split vertex: from a label file (per OBJ vertex), else from its faces' groups."""
    if labels is None:
        per_vertex = np.full(len(source), "face", dtype=object)
        for face, group in zip(faces, groups):
            per_vertex[face] = group
        return list(per_vertex)
    per_position = np.full(num_positions, "face", dtype=object)
    labels = Path(labels)
    if labels.suffix in (".json", ".npz"):
        mapping = json.loads(labels.read_text()) if labels.suffix == ".json" else dict(np.load(labels))
        for name, indices in mapping.items():
            indices = np.asarray(indices, np.int64)
            if indices.size and (indices.min() < 0 or indices.max() >= num_positions):
                raise ValueError(f"{labels}: region {name!r} indexes vertices outside the {num_positions} of {path}")
            per_position[indices] = name
    else:
        names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        if len(names) != num_positions:
            raise ValueError(f"{labels}: {len(names)} labels for the {num_positions} vertices of {path}")
        per_position[:] = names
    return list(per_position[source])


# ----------------------------------------------------------------------------------------- UV sampling


def uv_sample(template: Template, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps every texel of an R x R UV map whose centre lies in a UV triangle to (face, barycentric).

    Returns face_ids [N] int32, barys [N, 3] float32 (non-negative, summing to 1) and texel_yx [N, 2] int32
    (row, column), in row-major texel order. Where triangles share an edge, the first face wins.
    """
    uv = template.uvs.astype(np.float64) * resolution
    tri = uv[template.faces]  # [F, 3, 2] in texel units, x = u * R, y = v * R
    lo = np.clip(np.floor(tri.min(1) - 0.5), 0, resolution - 1).astype(np.int64)
    hi = np.clip(np.ceil(tri.max(1) - 0.5), 0, resolution - 1).astype(np.int64)
    span = hi - lo + 1
    counts = span[:, 0] * span[:, 1]
    face = np.repeat(np.arange(len(tri)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    x = lo[face, 0] + local % span[face, 0]
    y = lo[face, 1] + local // span[face, 0]
    point = np.stack([x + 0.5, y + 0.5], -1)
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    area = _cross2(b - a, c - a)
    safe_area = np.where(np.abs(area) > 1e-12, area, 1.0)
    w0 = _cross2(b - point, c - point) / safe_area
    w1 = _cross2(c - point, a - point) / safe_area
    w2 = 1.0 - w0 - w1
    inside = (np.abs(area) > 1e-12) & (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
    texel = (y * resolution + x)[inside]
    texel, first = np.unique(texel, return_index=True)
    barys = np.clip(np.stack([w0, w1, w2], -1)[inside][first], 0.0, 1.0)
    barys /= barys.sum(-1, keepdims=True)
    face_ids = face[inside][first]
    texel_yx = np.stack([texel // resolution, texel % resolution], -1)
    return face_ids.astype(np.int32), barys.astype(np.float32), texel_yx.astype(np.int32)


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def surface_points(vertices: jnp.ndarray, faces: jnp.ndarray, face_ids: jnp.ndarray, barys: jnp.ndarray):
    """Points on the (deformed) mesh: [..., V, 3] vertices -> [..., N, 3], batched over leading axes."""
    corners = jnp.asarray(vertices)[..., jnp.asarray(faces)[face_ids], :]  # [..., N, 3, 3]
    return jnp.einsum("nk,...nkd->...nd", jnp.asarray(barys, corners.dtype), corners)


def uv_jacobian(vertices: jnp.ndarray, faces: jnp.ndarray, uvs: jnp.ndarray, face_ids: jnp.ndarray):
    """dP/du and dP/dv [..., N, 3] of each sample's face: how far one unit of UV moves on the surface."""
    corners = jnp.asarray(vertices)[..., jnp.asarray(faces)[face_ids], :]
    uv = jnp.asarray(uvs)[jnp.asarray(faces)[face_ids]]  # [N, 3, 2]
    e1, e2 = corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :]
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    inv = jnp.where(jnp.abs(det) > 1e-12, 1.0 / jnp.where(jnp.abs(det) > 1e-12, det, 1.0), 0.0)[:, None]
    dp_du = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv
    dp_dv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inv
    return dp_du, dp_dv


def surface_frames(vertices: jnp.ndarray, faces: jnp.ndarray, uvs: jnp.ndarray, face_ids: jnp.ndarray):
    """Unit normal and tangent [..., N, 3] per sample: the face normal, and dP/du made orthogonal to it.

    Where a face's UV map is degenerate the tangent falls back to the face's first edge.
    """
    corners = jnp.asarray(vertices)[..., jnp.asarray(faces)[face_ids], :]
    e1, e2 = corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :]
    normal = _normalize(jnp.cross(e1, e2))
    dp_du, _ = uv_jacobian(vertices, faces, uvs, face_ids)
    tangent = jnp.where(jnp.linalg.norm(dp_du, axis=-1, keepdims=True) > 1e-12, dp_du, e1)
    tangent = _normalize(tangent - jnp.sum(tangent * normal, -1, keepdims=True) * normal)
    return normal, tangent


def _normalize(v: jnp.ndarray) -> jnp.ndarray:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
