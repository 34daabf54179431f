"""Template mesh, UV sampler, surface frames, OBJ loading, rotations and cameras."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from uhap_jax.geometry import cameras, rotations
from uhap_jax.geometry import template as template_lib


@pytest.fixture(scope="module")
def head() -> template_lib.Template:
    return template_lib.procedural_head(48)


def test_procedural_head_is_a_valid_head(head):
    assert head.vertices.dtype == np.float32 and head.faces.dtype == np.int32
    assert head.faces.min() >= 0 and head.faces.max() < len(head.vertices)
    assert np.all((head.uvs >= 0) & (head.uvs <= 1))
    for name in template_lib.REGION_NAMES:
        assert head.region_mask(name).sum() >= 10, name
    neck = head.region_mask("neck")
    height = np.ptp(head.vertices[~neck, 1])
    assert 0.18 < height < 0.23
    assert np.all(np.abs(head.vertices[~neck].mean(0)) < 0.03)
    # The neck runs from inside the head (its top ring hidden in the skin) to below a head-framed crop, and no
    # rig weight moves it.
    assert head.vertices[neck, 1].max() > head.vertices[~neck, 1].min() + 0.03
    assert head.vertices[neck, 1].min() < -0.2
    assert all(float(np.abs(w[neck]).max()) == 0.0 for w in head.weights.values())
    # The face looks toward -z: the lips and irises are in front of (more negative z than) the head's centre.
    assert head.vertices[head.region_mask("iris"), 2].mean() < -0.06
    assert head.vertices[head.region_mask("lips"), 2].mean() < -0.08
    edge_a = head.vertices[head.faces[:, 1]] - head.vertices[head.faces[:, 0]]
    edge_b = head.vertices[head.faces[:, 2]] - head.vertices[head.faces[:, 0]]
    assert np.all(np.linalg.norm(np.cross(edge_a, edge_b), axis=1) > 1e-12), "degenerate faces"


@pytest.mark.parametrize("resolution", [32, 97])
def test_uv_sample_invariants(head, resolution):
    face_ids, barys, texel_yx = template_lib.uv_sample(head, resolution)
    assert len(face_ids) > 0.4 * resolution**2
    np.testing.assert_allclose(barys.sum(-1), 1.0, atol=1e-6)
    assert barys.min() >= 0
    flat = texel_yx[:, 0] * resolution + texel_yx[:, 1]
    assert np.all(np.diff(flat) > 0), "texels are unique and row-major"
    # Each sample's interpolated UV is its texel centre: (face, barycentric) really inverts the layout.
    uv = np.einsum("nk,nkd->nd", barys, head.uvs[head.faces[face_ids]])
    np.testing.assert_allclose(uv * resolution, texel_yx[:, ::-1] + 0.5, atol=1e-3)
    # Points lie on their faces: in the face's plane and inside it.
    points = np.asarray(template_lib.surface_points(head.vertices, head.faces, face_ids, barys))
    corners = head.vertices[head.faces[face_ids]]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    np.testing.assert_allclose(np.sum((points - corners[:, 0]) * normal, -1), 0.0, atol=1e-6)
    region_of_sample = head.region_ids[head.faces[face_ids, 0]]
    assert set(np.unique(region_of_sample)) == set(range(len(head.region_names)))


def test_surface_frames_are_orthonormal_on_deformed_meshes(head, rng):
    face_ids, barys, _ = template_lib.uv_sample(head, 32)
    deformed = head.vertices[None] + rng.normal(0, 0.002, (3, *head.vertices.shape)).astype(np.float32)
    frames = jax.jit(template_lib.surface_frames)
    normal, tangent = frames(jnp.asarray(deformed), head.faces, head.uvs, face_ids)
    assert normal.shape == (3, len(face_ids), 3)
    np.testing.assert_allclose(jnp.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(tangent, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(normal * tangent, -1), 0.0, atol=1e-5)
    corners = deformed[:, head.faces[face_ids]]
    np.testing.assert_allclose(jnp.sum(normal * (corners[:, :, 1] - corners[:, :, 0]), -1), 0.0, atol=1e-6)
    # The tangent follows +u: moving along it increases u on the face.
    dp_du, _ = template_lib.uv_jacobian(deformed, head.faces, head.uvs, face_ids)
    assert jnp.mean(jnp.sum(tangent * dp_du, -1) > 0) > 0.99


def test_mouth_interior_is_hidden_at_rest(head):
    """Teeth, tongue and mouth interior sit inside the closed head: rendering them changes nothing frontal."""
    face_ids, barys, _ = template_lib.uv_sample(head, 64)
    means = template_lib.surface_points(head.vertices, head.faces, face_ids, barys)
    normal, tangent = template_lib.surface_frames(head.vertices, head.faces, head.uvs, face_ids)
    quats = rotations.matrix_to_quaternion(jnp.stack([tangent, jnp.cross(normal, tangent), normal], -1))
    dp_du, dp_dv = template_lib.uv_jacobian(head.vertices, head.faces, head.uvs, face_ids)
    footprint = jnp.maximum(jnp.linalg.norm(dp_du, axis=-1), jnp.linalg.norm(dp_dv, axis=-1)) / 64
    scales = jnp.stack([footprint, footprint, jnp.full_like(footprint, 1e-4)], -1)
    region = head.region_ids[head.faces[face_ids, 0]]
    colors = jnp.asarray(np.eye(3)[region % 3], jnp.float32)
    view = cameras.look_at([0.0, 0.05, -0.6], [0.0, -0.03, 0.0])[None]
    k = cameras.intrinsics_from_fov(12.0, 64, 64)[None]
    interior = np.isin(region, [head.region_names.index(n) for n in ("teeth", "tongue", "mouth_interior")])

    def render(keep):
        return kernels.rasterize(means[keep], quats[keep], scales[keep], jnp.full(int(keep.sum()), 0.99),
                                 colors[keep], view, k, width=64, height=64).rgb  # fmt: skip

    with_interior, without = render(np.ones_like(interior)), render(~interior)
    # A part poking through the skin changes pixels by ~0.5; grazing skin at the jaw line lets ~3% through.
    assert float(jnp.abs(with_interior - without).max()) < 0.1


def _write_cube_obj(path, rng):
    """A unit cube with every face its own UV island (so vertices split at seams), in two groups."""
    scale = rng.uniform(0.5, 2.0)
    corners = scale * np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    lines = [f"v {x} {y} {z}" for x, y, z in corners]
    for i in range(6):
        u0, v0 = (i % 3) / 3, (i // 3) / 2
        lines += [f"vt {u0 + du / 3.2} {v0 + dv / 2.2}" for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1))]
    for i, quad in enumerate(quads):
        lines.append("g lips" if i == 0 else "g face")
        lines.append("f " + " ".join(f"{v + 1}/{4 * i + j + 1}" for j, v in enumerate(quad)))
    path.write_text("\n".join(lines) + "\n")
    return corners


def test_load_obj_splits_seams_and_reads_regions(tmp_path, rng):
    corners = _write_cube_obj(tmp_path / "cube.obj", rng)
    cube = template_lib.load_obj(tmp_path / "cube.obj")
    assert cube.vertices.shape == (24, 3) and cube.faces.shape == (12, 3)
    np.testing.assert_allclose(np.unique(cube.vertices, axis=0), np.unique(corners, axis=0), rtol=1e-6)
    assert cube.region_mask("lips").sum() == 4
    face_ids, barys, _ = template_lib.uv_sample(cube, 64)
    assert len(np.unique(face_ids)) == 12
    labels = tmp_path / "labels.json"
    labels.write_text('{"scalp": [4, 5, 6, 7]}')
    relabelled = template_lib.load_obj(tmp_path / "cube.obj", labels=labels)
    np.testing.assert_array_equal(relabelled.region_mask("scalp"), relabelled.vertices[:, 0] > 0.25)
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match=r"bad.obj:4: .*face without UV"):
        template_lib.load_obj(tmp_path / "bad.obj")


def test_rotation_round_trips(rng):
    quats = rng.normal(size=(64, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    quats *= np.sign(quats[:, :1])
    matrices = rotations.quaternion_to_matrix(quats)
    np.testing.assert_allclose(matrices @ jnp.swapaxes(matrices, -1, -2), np.broadcast_to(np.eye(3), (64, 3, 3)),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(rotations.matrix_to_quaternion(matrices), quats, atol=1e-5)
    axis_angle = rng.normal(size=(16, 3))
    axis = axis_angle / np.linalg.norm(axis_angle, axis=1, keepdims=True)
    rotated = rotations.axis_angle_to_matrix(axis_angle) @ axis[..., None]
    np.testing.assert_allclose(rotated[..., 0], axis, atol=1e-5)  # the axis is fixed
    np.testing.assert_allclose(rotations.axis_angle_to_matrix(np.zeros(3)), np.eye(3), atol=1e-7)
    vectors = axis * rng.uniform(0.0, 3.1, (16, 1))  # angles below pi: the rotation vector is unique
    np.testing.assert_allclose(rotations.matrix_to_axis_angle(rotations.axis_angle_to_matrix(vectors)), vectors,
                               atol=2e-5)  # fmt: skip
    np.testing.assert_allclose(rotations.matrix_to_axis_angle(jnp.eye(3)), np.zeros(3), atol=1e-7)
    gradient = jax.grad(lambda m: rotations.matrix_to_axis_angle(m)[2])(jnp.eye(3))  # the encoder's pose at rest
    np.testing.assert_allclose(gradient, [[0, -0.5, 0], [0.5, 0, 0], [0, 0, 0]], atol=1e-6)


def test_look_at_is_opencv(rng):
    eye = rng.normal(size=3) + np.array([0.0, 0.0, -2.0])
    target = rng.normal(scale=0.1, size=3)
    view = cameras.look_at(eye, target)
    k = cameras.intrinsics_from_fov(30.0, 64, 48)
    pixels, depth = cameras.project(np.stack([target, target + [0, 0.1, 0]]), view, k)
    np.testing.assert_allclose(pixels[0], [32, 24], atol=1e-6)
    assert depth[0] > 0 and pixels[1, 1] < pixels[0, 1], "world up must be image up (smaller row)"
    np.testing.assert_allclose(view[:3, :3] @ view[:3, :3].T, np.eye(3), atol=1e-9)


def test_texel_layouts_and_the_graphs_that_hold_them_compare_by_value():
    """Priors built apart (each stage loads its own, each avatar its own) share a graph, so the functions jitted
    per graph (`nnx.split(model)[0]`) compile once for all of them; another layout is another graph."""
    from flax import nnx

    from uhap_jax.config_utils import load_config
    from uhap_jax.geometry.texels import TexelLayout
    from uhap_jax.models.prior import build_prior

    template = template_lib.procedural_head(24)
    first, second = TexelLayout.build(template, 16), TexelLayout.build(template_lib.procedural_head(24), 16)
    assert first == second and hash(first) == hash(second) and first is not second
    assert first != TexelLayout.build(template, 32)
    config = load_config("configs/prior.py:tiny", ["model.template_resolution=24", "model.uv_resolution=16",
                                                   "model.decoder_channels=(8, 8)"])  # fmt: skip
    graphs = [nnx.split(build_prior(template_lib.procedural_head(24), config))[0] for _ in range(2)]
    assert graphs[0] == graphs[1] and hash(graphs[0]) == hash(graphs[1])
