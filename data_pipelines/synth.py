"""Synthetic talking-head captures: seeded identities speak eSpeak sentences in front of a multi-view rig.

For each identity: a seeded shape (smooth deformation of the template plus narrow local features) and a look
(`shading.py`: sub-texel albedo detail, relief, materials, hair and brow strands, ears, neck); a neutral scan
captured as a scanner would (`scanner.py`: resampled, noisy, with holes) and registered to the template; its own
voice, recorded through a room and a microphone (`voices.py`); phonemes drive the rig (`rig.py`), mouth
appearance included; a small rigid head pose per frame. Each frame is a surface 4x denser than the model's texels
plus the strands and patches off the template, lit by rig lights and seen through each camera's gain, white
balance and noise, rendered with `kernels.rasterize`, with soft-edged masks, 16 kHz audio, the ground-truth
template-topology meshes and the per-frame expression controls. One more sequence per identity is monocular, seen
by a phone-like camera (wider lens, closer, exposure drift, motion blur) at a pose outside the rig, the head turning
left and right as phone-capture protocols ask (a near-frontal video alone leaves the head's depth unseen). The split
(held-out identities, sentences, cameras and voices) goes into `dataset.json`. Everything is written through
`layout.staged_dir`, so an interrupted run leaves no half-written dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

import kernels
from data_pipelines import layout, rig, scanner, shading, speech, voices
from uhap_jax.geometry import cameras as camera_lib
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib

SENTENCES = (
    "Bob bought a big map of Paris.",
    "Mom made warm apple pie.",
    "Five brave foxes jumped over the fence.",
    "Please open the window, it is very warm.",
    "We will move the boat by the pier.",
    "Father often plays the violin at home.",
    "A happy puppy ran across the park.",
    "My favourite food is fresh bread.",
    "Put the blue box above the bed.",
    "Oh wow, what a wonderful morning!",
    "The mouse ate a piece of cheese.",
    "Maybe Bobby will arrive before five.",
)
MONO_SERIAL = "mono"
_FRAME_BUCKET = 32  # clips are padded to a multiple of this many frames before the (jitted) rig


def synth_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """Generator presets: tiny (CPU, seconds), base (one GPU, 512^2)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_identities = 8
    config.num_held_out_identities = 2
    # One of them is a held-out sentence: three training sentences of six identities give the speech model
    # ~36 s of speech to learn from.
    config.sentences_per_identity = 4
    config.num_held_out_sentences = 2  # the last sentences of SENTENCES, spoken only in held-out sequences
    config.max_seconds = 2.0  # sentences are cut to this length (0: keep whole)
    config.fps = 25.0
    config.num_cameras = 8
    config.held_out_cameras = (2, 5)  # indices into the rig
    config.image_size = 64
    config.fov_deg = 20.0
    config.camera_distance = 0.9
    config.monocular = True
    config.monocular_turn_deg = 30.0  # the monocular sequence's head turn: yaw amplitude of one left-right sweep
    config.template_resolution = 48  # skin grid rows of the procedural head
    # The generator's surface: one Gaussian per texel of this UV map, 4x the model's (configs/prior.py) texels.
    config.gaussian_uv_resolution = 66  # 64 falls 1% short of 4x at the layout's borders
    config.model_uv_resolution = 32  # the prior's UV resolution, recorded to state the density ratio
    # Primitives off the template (shading.Counts): hair and brow strands, ears, neck.
    config.hair_strands = 300  # at 64^2 (2.5 mm a pixel) strands are sub-pixel: a few hundred make the look
    config.hair_segments = 3
    config.brow_strands = 30
    config.ear_points = 80
    config.neck_points = 300
    config.scan_resolution = 96  # the raw scan's sample grid (a UV map of this size, jittered)
    config.read_noise = 0.006  # sensor noise, in [0, 1] image units
    config.shot_noise = 0.015
    config.monocular_fov_deg = 55.0  # the phone's lens: wider than the rig's, and held closer
    config.monocular_noise_scale = 2.0  # a phone's small sensor is noisier
    config.exposure_drift = 0.12  # the phone's auto-exposure wanders by about this fraction
    config.motion_blur_shutter = 0.5  # of the frame interval: the phone's blur follows the head's motion
    config.images_per_batch = 16  # (frame, camera) images rendered per jitted call
    # "auto": the C++ kernels on a CPU (kernels/cpu_ops.py), the CUDA ones on an NVIDIA GPU.
    config.render_backend = "auto"
    if preset == "tiny":
        pass
    elif preset == "base":
        config.num_identities = 16
        config.num_held_out_identities = 3
        config.sentences_per_identity = 6
        config.max_seconds = 0.0
        config.num_cameras = 12
        config.held_out_cameras = (3, 8)
        config.image_size = 512
        config.images_per_batch = 48
        config.template_resolution = 96
        config.gaussian_uv_resolution = 544  # 512 falls 0.4% short of 4x at the layout's borders
        config.model_uv_resolution = 256
        config.scan_resolution = 256
        config.hair_strands = 24000
        config.hair_segments = 6
        config.brow_strands = 500
        config.ear_points = 3000
        config.neck_points = 16000
    else:
        raise ValueError(f"synth preset must be 'tiny' or 'base', got {preset!r}")
    return config


# --------------------------------------------------------------------------------------------- identities


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    template: template_lib.Template  # the template deformed into this identity's neutral shape
    albedo: np.ndarray  # [V, 3] coarse per-vertex colours in [0, 1] (the detail lives in `look`)
    voice: speech.Voice
    style: rig.Style
    look: shading.Look  # what the cameras see: detail, relief, materials, hair, ears and neck


_HAIR = np.array([[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.55, 0.4, 0.2], [0.5, 0.2, 0.08], [0.55, 0.55, 0.55]])
_IRIS = np.array([[0.2, 0.35, 0.6], [0.25, 0.45, 0.25], [0.3, 0.18, 0.08], [0.4, 0.3, 0.15]])
_FIXED_COLOURS = {
    "mouth_interior": (0.55, 0.16, 0.17),
    "teeth": (0.93, 0.9, 0.82),
    "tongue": (0.78, 0.38, 0.4),
    "eyeball": (0.92, 0.9, 0.88),
}


def counts(config: ml_collections.ConfigDict) -> shading.Counts:
    """The preset's primitive counts off the template."""
    return shading.Counts(config.hair_strands, config.hair_segments, config.brow_strands, config.ear_points,
                          config.neck_points)  # fmt: skip


def make_identity(
    template: template_lib.Template, index: int, rng: np.random.Generator, sampler: SurfaceSampler,
    primitive_counts: shading.Counts, voice: speech.Voice,
) -> Identity:  # fmt: skip
    """A seeded identity: shape field, skin/lip/hair/iris colours with fine detail, speaking style; `voice` is
    chosen by the caller (voices.py), so that held-out voices stay out of training."""
    vertices, anchors = _identity_shape(template, rng)
    shaped = dataclasses.replace(template, vertices=vertices, anchors=anchors)
    albedo, hair = _identity_albedo(template, rng)
    look = shading.make_look(template, vertices, albedo, sampler.face_ids, sampler.barys, hair, primitive_counts, rng)
    return Identity(
        name=f"id{index:03d}",
        template=shaped,
        albedo=albedo,
        voice=voice,
        style=rig.Style(
            anticipation=float(rng.uniform(0.7, 1.5)),
            articulation=float(rng.uniform(0.8, 1.1)),
            blink_rate_hz=float(rng.uniform(0.2, 0.5)),
            brow_emphasis=float(rng.uniform(0.3, 1.0)),
        ),
        look=look,
    )


def scan_identity(template: template_lib.Template, identity: Identity, sampler: SurfaceSampler, resolution: int,
                  rng: np.random.Generator) -> scanner.Scan:  # fmt: skip
    """The identity's neutral as a scanner captures it: its detailed, displaced surface (looked up at the
    nearest of the generator's samples), resampled, noisy and with holes (`scanner.scan`)."""
    corners = identity.template.vertices[template.faces[sampler.face_ids]]
    samples = np.einsum("nk,nkd->nd", sampler.barys, corners)
    tree = cKDTree(samples)
    vertices = identity.template.vertices

    def lookup(values: np.ndarray):
        def at(face_ids: np.ndarray, barys: np.ndarray) -> np.ndarray:
            points = np.einsum("nk,nkd->nd", barys, vertices[template.faces[face_ids]])
            return values[tree.query(points)[1]]

        return at

    return scanner.scan(template, vertices, lookup(identity.look.albedo), lookup(identity.look.displacement),
                        resolution, rng)  # fmt: skip


def _identity_shape(template: template_lib.Template, rng: np.random.Generator):
    """Per-axis scale, a few broad Gaussian displacement bumps and narrow radial features on the face: a
    field over all of space.

    Eyeballs move rigidly with the field at their centres, so that they stay spheres that can turn.
    """
    scale = 1.0 + rng.normal(0.0, 0.04, 3)
    centres = template.vertices[rng.choice(len(template.vertices), 6, replace=False)]
    sigmas = rng.uniform(0.03, 0.06, 6)
    displacements = rng.normal(0.0, 0.004, (6, 3))

    # Local features on the face (nose, cheekbones, chin, brow ridge): narrow radial bumps of a few mm.
    front = template.vertices[(template.vertices[:, 2] < -0.04) & template.region_mask("face")]
    feature_centres = front[rng.choice(len(front), 8, replace=False)]
    feature_sigmas = rng.uniform(0.006, 0.015, 8)
    feature_heights = rng.normal(0.0, 0.0025, 8)

    def field(points: np.ndarray) -> np.ndarray:
        weights = np.exp(-0.5 * np.sum((points[:, None] - centres) ** 2, -1) / sigmas**2)
        local = np.exp(-0.5 * np.sum((points[:, None] - feature_centres) ** 2, -1) / feature_sigmas**2)
        radial = points / np.maximum(np.linalg.norm(points, axis=-1, keepdims=True), 1e-9)
        return points * scale + weights @ displacements + (local @ feature_heights)[:, None] * radial

    vertices = field(template.vertices.astype(np.float64))
    anchors = {name: field(point[None].astype(np.float64))[0] for name, point in template.anchors.items()}
    for side in ("left", "right"):
        eyeball = template.weights[f"eyeball_{side}"] > 0.5
        centre = template.anchors[f"eye_{side}"].astype(np.float64)
        vertices[eyeball] = template.vertices[eyeball] - centre + anchors[f"eye_{side}"]
    return vertices.astype(np.float32), {name: a.astype(np.float32) for name, a in anchors.items()}


def _identity_albedo(template: template_lib.Template, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coarse per-vertex colours [V, 3] and the hair colour [3]."""
    tone = rng.uniform()
    skin = (1 - tone) * np.array([0.88, 0.7, 0.6]) + tone * np.array([0.38, 0.24, 0.17])
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.8, 1.2), 0, 1)
    colours = {
        "face": skin,
        "lips": np.clip(skin * np.array([0.9, 0.55, 0.58]) * rng.uniform(0.85, 1.05), 0, 1),
        "brows": hair * 0.8,
        "scalp": hair,
        "neck": skin,  # never drawn (SurfaceSampler): the capture's neck is its own primitive
        "iris": _IRIS[rng.integers(len(_IRIS))],
        **{name: np.array(c) for name, c in _FIXED_COLOURS.items()},
    }
    albedo = np.stack([colours[template.region_names[r]] for r in template.region_ids])
    # Rosier cheeks and slight per-vertex mottling, so the skin is not one flat colour.
    x, y = template.vertices[:, 0], template.vertices[:, 1]
    cheeks = sum(np.exp(-0.5 * (((x - s * 0.04) / 0.015) ** 2 + ((y + 0.02) / 0.015) ** 2)) for s in (-1, 1))
    skin_like = np.isin(template.region_ids, [template.region_names.index("face")])
    albedo[skin_like] *= 1.0 + 0.12 * cheeks[skin_like, None] * np.array([0.5, -0.4, -0.4])
    albedo *= rng.uniform(0.97, 1.03, (len(albedo), 1))
    return np.clip(albedo, 0.0, 1.0).astype(np.float32), hair


# --------------------------------------------------------------------------------------------- cameras


def camera_rig(config: ml_collections.ConfigDict, rng: np.random.Generator) -> list[layout.Camera]:
    """`num_cameras` cameras on the front hemisphere (azimuth -70..70 deg, elevation -10..25 deg)."""
    count = config.num_cameras
    azimuths = np.deg2rad(np.linspace(-70.0, 70.0, count) + rng.normal(0.0, 3.0, count))
    elevations = np.deg2rad(np.where(np.arange(count) % 2 == 0, 15.0, -5.0) + rng.normal(0.0, 3.0, count))
    return [
        _camera(f"{220700 + i}", azimuth, elevation, config.camera_distance, config, rng)
        for i, (azimuth, elevation) in enumerate(zip(azimuths, elevations))
    ]


def _camera(serial, azimuth, elevation, distance, config, rng, fov_scale: float = 1.0) -> layout.Camera:
    eye = distance * np.array(
        [np.sin(azimuth) * np.cos(elevation), np.sin(elevation), -np.cos(azimuth) * np.cos(elevation)]
    )
    target = rng.normal(0.0, 0.005, 3)
    size = config.image_size
    return layout.Camera(
        serial=serial,
        world_to_cam=camera_lib.look_at(eye, target),
        intrinsics=camera_lib.intrinsics_from_fov(config.fov_deg * fov_scale, size, size),
        width=size,
        height=size,
    )


def monocular_camera(config: ml_collections.ConfigDict, rng: np.random.Generator) -> layout.Camera:
    """A phone-like camera: near-frontal, with a wider lens (`monocular_fov_deg`) held closer, so that the head
    fills about as much of the frame as in the rig, under a phone's stronger perspective."""
    azimuth, elevation = np.deg2rad(rng.uniform(-15, 15)), np.deg2rad(rng.uniform(-5, 10))
    fov_scale = config.monocular_fov_deg / config.fov_deg
    distance = config.camera_distance * np.tan(np.deg2rad(config.fov_deg) / 2)
    distance /= np.tan(np.deg2rad(config.monocular_fov_deg) / 2) / 1.2
    return _camera(MONO_SERIAL, azimuth, elevation, distance, config, rng, fov_scale=fov_scale)


def camera_gains(serials: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per camera: gain x white balance [3] (sensors and colour calibration are never quite equal)."""
    return {s: (rng.uniform(0.85, 1.15) * rng.normal(1.0, 0.04, 3)).astype(np.float32) for s in serials}


def exposure_drift(num_frames: int, amount: float, rng: np.random.Generator) -> np.ndarray:
    """[F] a phone's auto-exposure: a smooth random wander of about +-`amount` around 1."""
    steps = np.cumsum(rng.normal(0.0, 1.0, num_frames + 24))
    smooth = np.convolve(steps, np.hanning(25) / np.hanning(25).sum(), mode="valid")[:num_frames]
    smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-9)
    return (1.0 + amount * np.tanh(smooth)).astype(np.float32)


def motion_blur(images: np.ndarray, shifts: np.ndarray, taps: int = 5) -> np.ndarray:
    """Blurs each image [F, H, W(, 3)] uint8 along its own 2D motion `shifts` [F, 2] (x, y pixels over the
    exposure): the mean of `taps` copies shifted evenly across it."""
    out = np.empty_like(images)
    for frame, (image, shift) in enumerate(zip(images.astype(np.float32), shifts)):
        acc = np.zeros_like(image)
        for fraction in np.linspace(-0.5, 0.5, taps):
            offset = (fraction * shift[1], fraction * shift[0]) + (0,) * (image.ndim - 2)
            acc += ndimage.shift(image, offset, order=1, mode="nearest")
        out[frame] = np.clip(np.round(acc / taps), 0, 255).astype(np.uint8)
    return out


def image_motion(camera: layout.Camera, rotation: np.ndarray, translation: np.ndarray, shutter: float) -> np.ndarray:
    """[F, 2] pixels the face moves while the shutter is open (`shutter` of the frame interval): the tip of
    the nose's projected velocity, by central differences."""
    nose = np.einsum("fij,j->fi", rotation, np.array([0.0, -0.005, -0.11])) + translation
    pixels, _ = camera_lib.project(nose, camera.world_to_cam, camera.intrinsics)
    return shutter * np.gradient(pixels, axis=0)


# --------------------------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class SurfaceSampler:
    """The generator's dense surface: one small flat Gaussian per texel of a UV map finer than the model's.

    `outward` is +-1 per sample where the skin's face normal must flip to point out of the head, and 0 for
    the parts inside the mouth and the eyeballs; a camera never sees skin from inside the closed head, so
    back-facing skin is culled per camera, which halves the rasterizer's work.
    """

    faces: np.ndarray
    uvs: np.ndarray
    face_ids: np.ndarray
    barys: np.ndarray
    outward: np.ndarray
    resolution: int

    @classmethod
    def build(cls, template: template_lib.Template, resolution: int) -> SurfaceSampler:
        face_ids, barys, _ = template_lib.uv_sample(template, resolution)
        # The template's neck is the model's; the capture's neck is a primitive of its own (shading._extras).
        on_template_neck = template.region_ids[template.faces[face_ids, 0]] == template.region_names.index("neck")
        face_ids, barys = face_ids[~on_template_neck], barys[~on_template_neck]
        points, normals = _points_and_normals(template.vertices, template.faces, template.uvs, face_ids, barys)
        sign = np.sign(np.sum(np.asarray(normals) * np.asarray(points), axis=-1))
        skin = np.isin(template.region_names, ["face", "lips", "brows", "scalp"])
        outward = np.where(skin[template.region_ids[template.faces[face_ids, 0]]], sign, 0.0)
        return cls(template.faces, template.uvs, face_ids, barys, outward.astype(np.float32), resolution)

    def gaussians(self, vertices: jnp.ndarray, displacement: jnp.ndarray | None = None):
        """Flat Gaussians on one posed mesh [V, 3], moved `displacement` [N] along the outward normal of the
        skin: means, quats, scales, and the (outward where known) face normals and tangents."""
        means = template_lib.surface_points(vertices, self.faces, self.face_ids, self.barys)
        normal, tangent = template_lib.surface_frames(vertices, self.faces, self.uvs, self.face_ids)
        frame = jnp.stack([tangent, jnp.cross(normal, tangent), normal], axis=-1)
        dp_du, dp_dv = template_lib.uv_jacobian(vertices, self.faces, self.uvs, self.face_ids)
        footprint = jnp.maximum(jnp.linalg.norm(dp_du, axis=-1), jnp.linalg.norm(dp_dv, axis=-1))
        in_plane = jnp.clip(0.8 * footprint / self.resolution, 1e-4, 4e-3)
        scales = jnp.stack([in_plane, in_plane, jnp.full_like(in_plane, 1e-4)], axis=-1)
        outward = normal * jnp.where(self.outward == 0, 1.0, self.outward)[:, None]
        if displacement is not None:
            means = means + outward * displacement[:, None]
        return means, rotations.matrix_to_quaternion(frame), scales, outward, tangent

    def visible_opacities(self, means, normals, world_to_cam) -> jnp.ndarray:
        """[C, N] opacity 0.99, or 0 (culled by the rasterizer) for skin facing away from camera c; `normals`
        are the outward normals that `gaussians` returns."""
        centres = -jnp.einsum("cji,cj->ci", world_to_cam[:, :3, :3], world_to_cam[:, :3, 3])
        facing = jnp.einsum("nd,cnd->cn", normals, centres[:, None] - means)
        return jnp.where((self.outward == 0) | (facing > 0), 0.99, 0.0).astype(means.dtype)


@jax.jit
def _points_and_normals(vertices, faces, uvs, face_ids, barys):
    """Samples' rest positions and face normals (jitted: one compilation instead of one per eager op)."""
    normals, _ = template_lib.surface_frames(vertices, faces, uvs, face_ids)
    return template_lib.surface_points(vertices, faces, face_ids, barys), normals


def _scene(sampler: SurfaceSampler, look: shading.Look, vertices, rotation, jaw_open, world_to_cam):
    """Every Gaussian of one frame seen by one camera: means, quats, scales, opacities and shaded colours."""
    means, quats, scales, normals, tangents = sampler.gaussians(vertices, look.displacement)
    opacities = sampler.visible_opacities(means, normals, world_to_cam[None])[0]
    up = rotation[:, 1]
    bump_t = jnp.cross(up, normals)
    bump_t = bump_t / jnp.maximum(jnp.linalg.norm(bump_t, axis=-1, keepdims=True), 1e-9)
    bump_b = jnp.cross(normals, bump_t)
    shading_normals = normals - look.bump[:, :1] * bump_t - look.bump[:, 1:] * bump_b
    extra_means, extra_quats, extra_frames = shading.posed_extras(look, vertices, rotation)
    extra_normals, extra_tangents = extra_frames[..., 2], extra_frames[..., 0]
    centre = -world_to_cam[:3, :3].T @ world_to_cam[:3, 3]
    facing = jnp.sum(extra_normals * (centre - extra_means), -1) > 0
    extra_opacities = jnp.where((look.closed > 0.5) & ~facing, 0.0, jnp.where(look.strand > 0.5, 0.9, 0.99))
    all_means = jnp.concatenate([means, extra_means])
    colours = shading.shade(
        jnp.concatenate([look.albedo, look.extra_albedo]),
        jnp.concatenate([shading_normals, extra_normals]),
        jnp.concatenate([tangents, extra_tangents]),
        jnp.concatenate([jnp.zeros(len(means)), look.strand]),
        jnp.concatenate([look.specular, look.extra_specular]),
        jnp.concatenate([look.shininess, look.extra_shininess]),
        jnp.concatenate([look.occlusion, look.extra_occlusion]),
        all_means,
        centre,
    )
    light = jnp.concatenate([shading.cavity_light(look.cavity_depth, jaw_open), jnp.ones(len(extra_means))])
    return (
        all_means,
        jnp.concatenate([quats, extra_quats]),
        jnp.concatenate([scales, look.scales]),
        jnp.concatenate([opacities, extra_opacities]).astype(means.dtype),
        colours * light[:, None],
    )


@functools.partial(jax.jit, static_argnames=("resolution",))
def _visible_gaussians(vertices, rotation, world_to_cam, sampler_arrays, look_arrays, resolution):
    """The Gaussians of one mesh in each camera [C]: means, quats, scales, opacities [C, N]."""
    sampler, look = SurfaceSampler(*sampler_arrays, resolution), shading.Look(*look_arrays)
    scenes = [_scene(sampler, look, vertices, rotation, 0.0, view) for view in world_to_cam]
    return scenes[0][0], scenes[0][1], scenes[0][2], jnp.stack([s[3] for s in scenes])


@functools.partial(jax.jit, static_argnames=("statics",))
def _render_images(vertices, rotation, jaw_open, world_to_cam, intrinsics, gains, keys, noise, look_arrays,
                   sampler_arrays, statics):  # fmt: skip
    """Image i shows posed mesh vertices[i] [V, 3] (head rotation [i], jaw opening [i]) from camera i, through
    that camera's response (gain [i] [3], noise key data [i] [2], read and shot noise `noise` [2]), one image after
    another (`lax.map`).

    One image per step keeps every shape independent of the camera count, so the rig's and the monocular
    camera's sequences share one compiled program; the identity's look is an argument, so identities share it.
    """
    resolution, width, height, capacity, backend = statics
    sampler, look = SurfaceSampler(*sampler_arrays, resolution), shading.Look(*look_arrays)

    def render_image(image):
        frame_vertices, frame_rotation, frame_jaw, view, k, gain, key_data = image
        key = jax.random.wrap_key_data(key_data)
        means, quats, scales, opacities, colours = _scene(sampler, look, frame_vertices, frame_rotation,
                                                          frame_jaw, view)  # fmt: skip
        out = kernels.rasterize(
            means, quats, scales, opacities, colours, view[None], k[None],
            width=width, height=height, capacity=capacity, backend=backend,
        )  # fmt: skip
        rgb = shading.camera_response(out.rgb[0], gain, key, noise[0], noise[1])
        return _to_uint8(rgb), _to_uint8(shading.soften(out.alpha[0])), out.stats.overflow

    return jax.lax.map(render_image, (vertices, rotation, jaw_open, world_to_cam, intrinsics, gains, keys))


class Renderer:
    """Renders posed meshes [F, V, 3] of one identity's look into cameras, in jitted batches of
    `images_per_batch` (frame, camera) images.

    The pair capacity is sized once, from the first frame in every camera, so that all sequences run one
    compiled program; an overflow (never silent) doubles it and renders the sequence again.
    """

    def __init__(self, sampler: SurfaceSampler, images_per_batch: int, backend: str):
        self.sampler = sampler
        self.images_per_batch = images_per_batch
        self.backend = backend
        self.capacity: int | None = None
        arrays = (sampler.faces, sampler.uvs, sampler.face_ids, sampler.barys, sampler.outward)
        self._arrays = tuple(jnp.asarray(a) for a in arrays)

    def size_capacity(self, vertices: np.ndarray, look: shading.Look, cameras: list[layout.Camera]) -> None:
        """Pairs the mesh `vertices` [V, 3] needs in the busiest camera, back-facing skin culled as when rendering,
        plus headroom: over whole clips the busiest image needed at most 12% more pairs than the first frame, and
        other identities' hair may need more.

        Binning and the record gather do work in proportion to the capacity: tight saves a few percent here.
        """
        world_to_cam, intrinsics = _camera_arrays(cameras)
        means, quats, scales, opacities = _visible_gaussians(
            vertices, np.eye(3, dtype=np.float32), world_to_cam, self._arrays, _look_arrays(look),
            self.sampler.resolution)  # fmt: skip
        size = {"width": cameras[0].width, "height": cameras[0].height}
        needed = max(
            kernels.capacity_for(means, quats, scales, opacities[c], world_to_cam[c, None], intrinsics[c, None], **size)
            for c in range(len(cameras))
        )
        self.capacity = int(needed * 1.6)

    def warm_up(self, vertices: np.ndarray, rotation: np.ndarray, cameras: list[layout.Camera],
                look: shading.Look) -> None:  # fmt: skip
        """Compiles the render program (one batch of frame 0), so that a progress bar started after it measures
        rendering alone."""
        gains = np.ones((1, len(cameras), 3), np.float32)
        self(vertices[:1], rotation[:1], np.zeros(1, np.float32), cameras[:1], look, gains[:, :1], (0,), (0.0, 0.0))

    def __call__(self, vertices: np.ndarray, rotation: np.ndarray, jaw_open: np.ndarray,
                 cameras: list[layout.Camera], look: shading.Look, gains: np.ndarray, seed: tuple[int, ...],
                 noise: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Returns rgb uint8 [F, C, H, W, 3] and alpha uint8 [F, C, H, W].

        `rotation` [F, 3, 3] is the head's rotation per frame, `jaw_open` [F] its jaw control, `gains` [F, C, 3]
        the camera response per image; `seed` seeds the sensor noise.
        """
        if self.capacity is None:
            self.size_capacity(vertices[0], look, cameras)
        num_frames, num_cameras = len(vertices), len(cameras)
        world_to_cam, intrinsics = _camera_arrays(cameras)
        # Image i is frame i // C in camera i % C; the last batch repeats its last image.
        frame_of = np.arange(num_frames * num_cameras) // num_cameras
        camera_of = np.arange(num_frames * num_cameras) % num_cameras
        keys = _noise_keys(np.random.default_rng(seed).integers(2**31), len(frame_of))
        gains = np.asarray(gains, np.float32).reshape(-1, 3)
        statics = (self.sampler.resolution, cameras[0].width, cameras[0].height, self.capacity, self.backend)
        look_arrays, noise = _look_arrays(look), np.asarray(noise, np.float32)
        batches = []
        for start in range(0, len(frame_of), self.images_per_batch):
            ids = np.arange(start, start + self.images_per_batch).clip(max=len(frame_of) - 1)
            frames = frame_of[ids]
            batch = (vertices[frames], rotation[frames], jaw_open[frames], world_to_cam[camera_of[ids]],
                     intrinsics[camera_of[ids]], gains[ids], keys[ids])  # fmt: skip
            batches.append(_render_images(*batch, noise, look_arrays, self._arrays, statics))  # asynchronous
        rgb, alpha, overflow = (np.concatenate(parts)[: len(frame_of)] for parts in zip(*jax.device_get(batches)))
        if overflow.any():
            self.capacity *= 2
            return self(vertices, rotation, jaw_open, cameras, look, gains, seed, noise)
        shape = (num_frames, num_cameras, *alpha.shape[1:])
        return rgb.reshape(*shape, 3), alpha.reshape(shape)


def _noise_keys(seed: int, count: int) -> np.ndarray:
    """The raw data [count, 2] of `jax.random.split(jax.random.key(seed), count)`, split to the next power of two
    and cut on the host: with partitionable threefry the first keys do not depend on the count, and a split and a
    gather of every new clip length compiled again."""
    keys = jax.random.split(jax.random.key(seed), 1 << max(count - 1, 0).bit_length())
    return np.asarray(jax.random.key_data(keys))[:count]


def _look_arrays(look: shading.Look) -> tuple[jnp.ndarray, ...]:
    return tuple(jnp.asarray(a) for a in look.arrays())


def _camera_arrays(cameras: list[layout.Camera]) -> tuple[np.ndarray, np.ndarray]:
    world_to_cam = np.stack([c.world_to_cam for c in cameras]).astype(np.float32)
    return world_to_cam, np.stack([c.intrinsics for c in cameras]).astype(np.float32)


def _to_uint8(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


# --------------------------------------------------------------------------------------------- sequences


def head_pose_track(num_frames: int, fps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small smooth rigid motion: rotation vectors [F, 3] (<~4 degrees) and translations [F, 3] (<~4 mm)."""
    times = np.arange(num_frames) / fps
    freqs = rng.uniform(0.15, 0.8, (2, 3, 2))
    phases = rng.uniform(0, 2 * np.pi, (2, 3, 2))
    waves = np.sin(2 * np.pi * freqs[None] * times[:, None, None, None] + phases[None]).sum(-1) / 2
    return (np.deg2rad(3.0) * waves[:, 0]).astype(np.float32), (0.003 * waves[:, 1]).astype(np.float32)


def head_turn(rotation_vectors: np.ndarray, amplitude_deg: float) -> np.ndarray:
    """Rotation vectors [F, 3] composed with one left-right sweep of yaw over the F frames (turn after the small
    motion: R = R_yaw R_small)."""
    count = len(rotation_vectors)
    yaw = np.deg2rad(amplitude_deg) * np.sin(2 * np.pi * np.arange(count) / max(count, 1))
    turn = np.zeros((count, 3)) + np.array([0.0, 1.0, 0.0]) * yaw[:, None]
    padded = (_pad_frames(np.asarray(track, np.float32)) for track in (turn, rotation_vectors))
    quat = np.asarray(_composed_quaternions(*padded), np.float64)[:count]  # wxyz, w >= 0
    half = np.arctan2(np.linalg.norm(quat[:, 1:], axis=-1), quat[:, 0])
    scale = np.where(half > 1e-8, 2.0 * half / np.maximum(np.sin(half), 1e-12), 2.0)
    return (quat[:, 1:] * scale[:, None]).astype(np.float32)


@jax.jit
def _composed_quaternions(first: jnp.ndarray, then: jnp.ndarray) -> jnp.ndarray:
    """[F, 4] the rotation vectors `then` [F, 3] followed by `first` [F, 3], as quaternions (jitted: op by op, every
    new clip length compiled each op again)."""
    matrix = rotations.axis_angle_to_matrix(first) @ rotations.axis_angle_to_matrix(then)
    return rotations.matrix_to_quaternion(matrix)


def pose_vertices(vertices: jnp.ndarray, rotation_vectors: jnp.ndarray, translations: jnp.ndarray) -> jnp.ndarray:
    """Applies the per-frame rigid head pose (about the head centre at the origin) to [F, V, 3]."""
    rotation = rotations.axis_angle_to_matrix(rotation_vectors)
    return jnp.einsum("fij,fvj->fvi", rotation, vertices) + translations[:, None]


def posed_meshes(template: template_lib.Template, vertices, anchors, expressions, rotation_vectors, translations):
    """World-space meshes [F, V, 3]: `template`'s rig on an identity's rest `vertices` and `anchors`, driven by
    per-frame `expressions`, then the rigid head pose (jit-able; the identity's shape is an argument, so one
    compiled program serves every identity)."""
    shaped = dataclasses.replace(template, vertices=vertices, anchors=anchors)
    return pose_vertices(rig.deform(shaped, expressions), rotation_vectors, translations)


def _posed_frames(template: template_lib.Template, vertices, anchors, expressions, rotation_vectors, translations):
    """`posed_meshes` and the head's rotations [F, 3, 3], in one program (computed op by op, the rotations
    compiled each op again for every new clip length)."""
    meshes = posed_meshes(template, vertices, anchors, expressions, rotation_vectors, translations)
    return meshes, rotations.axis_angle_to_matrix(rotation_vectors)


def _pad_frames(track: np.ndarray) -> np.ndarray:
    """Repeats the last frame up to a multiple of _FRAME_BUCKET frames, so that clip lengths share compilations."""
    padding = -len(track) % _FRAME_BUCKET
    return np.concatenate([track, np.repeat(track[-1:], padding, axis=0)])


WRITE_FRAMES = 8  # frames per PNG-writing task


def _write_sequence(
    writers: ThreadPoolExecutor,
    seq_dir: Path,
    utterance,
    audio,
    expressions,
    vertices,
    pose,
    rgb,
    alpha,
    serials,
    meta,
    blur_shifts: np.ndarray | None = None,
) -> list[Future]:
    """Writes one sequence (`audio` as recorded); its PNGs are encoded by `writers` (one task per camera and run of
    `WRITE_FRAMES` frames, which first applies `motion_blur` along `blur_shifts` if given) while the next one
    renders. Runs of frames, not whole cameras: a phone clip is one camera, and one task blurring all of it was the
    base preset's tail on a 16-core GPU machine."""
    layout.write_audio(seq_dir / layout.AUDIO_FILE, audio)
    layout.write_vertices(seq_dir, vertices)
    np.save(seq_dir / "expressions.npy", expressions)
    layout.write_sequence_meta(
        seq_dir,
        fps=meta.pop("fps"),
        num_frames=len(vertices),
        audio_rate=speech.AUDIO_RATE,
        cameras=list(serials),
        text=utterance.text,
        phonemes=[[p.symbol, round(p.start, 4)] for p in utterance.phonemes],
        expression_names=list(rig.EXPRESSION_NAMES),
        head_pose={"rotation_vector": pose[0].tolist(), "translation": pose[1].tolist()},
        vertices_space="world (head pose applied)",
        **meta,
    )
    write = functools.partial(writers.submit, _write_camera_images, seq_dir)
    runs = [slice(start, start + WRITE_FRAMES) for start in range(0, len(rgb), WRITE_FRAMES)]
    return [
        write(serial, run.start, rgb[run, c], alpha[run, c], None if blur_shifts is None else blur_shifts[run])
        for c, serial in enumerate(serials)
        for run in runs
    ]


def _write_camera_images(seq_dir: Path, serial: str, first_frame: int, rgb: np.ndarray, alpha: np.ndarray,
                         blur_shifts: np.ndarray | None) -> None:  # fmt: skip
    if blur_shifts is not None:
        rgb, alpha = motion_blur(rgb, blur_shifts), motion_blur(alpha, blur_shifts)
    for frame, (image, mask) in enumerate(zip(rgb, alpha), start=first_frame):
        layout.write_image(layout.frame_path(seq_dir, serial, frame), image)
        layout.write_image(layout.frame_path(seq_dir, serial, frame, kind="masks"), mask)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One sequence to render: its name, sentence, cameras and the (clipped) utterance its voice speaks."""

    name: str
    sentence: int
    cameras: list[layout.Camera]
    voice: speech.Voice
    utterance: speech.Utterance

    def num_images(self, fps: float) -> int:
        return rig.frame_count(self.utterance.duration, fps) * len(self.cameras)


def _plan_sequences(config, index: int, identity_rng: np.random.Generator, rig_cameras, mono_camera,
                    own_voice: speech.Voice, held_out_sentence_voice: speech.Voice) -> list[_Plan]:  # fmt: skip
    """An identity's sequences, drawn from its `identity_rng` before any of them renders (so that the progress bar
    counts images from the start): its sentences, the last one held out, and the monocular clip's."""
    num_train_sentences = len(SENTENCES) - config.num_held_out_sentences
    train_choice = identity_rng.choice(num_train_sentences, config.sentences_per_identity, replace=False)
    sentence_ids = [int(i) for i in train_choice]
    if config.num_held_out_sentences:
        sentence_ids[-1] = num_train_sentences + index % config.num_held_out_sentences
    plans = [(f"sen_{i:02d}", i, rig_cameras) for i in sentence_ids]
    if config.monocular:
        plans.append(("mono_00", int(identity_rng.integers(num_train_sentences)), [mono_camera]))
    out = []
    for name, sentence, cameras in plans:
        voice = held_out_sentence_voice if sentence >= num_train_sentences else own_voice
        utterance = _clip(speech.synthesize(SENTENCES[sentence], voice), config.max_seconds)
        out.append(_Plan(name, sentence, cameras, voice, utterance))
    return out


def _clip(utterance: speech.Utterance, max_seconds: float) -> speech.Utterance:
    if max_seconds <= 0 or utterance.duration <= max_seconds:
        return utterance
    keep = int(max_seconds * speech.AUDIO_RATE)
    phonemes = tuple(p for p in utterance.phonemes if p.start < max_seconds)
    return speech.Utterance(utterance.text, utterance.audio[:keep], phonemes)


def generate(out_dir: Path, config: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """Writes a complete synthetic dataset to `out_dir` (replacing it only once everything succeeded)."""
    if config.num_held_out_identities >= config.num_identities:
        raise ValueError("synth: num_held_out_identities must leave at least one training identity")
    if config.num_held_out_sentences >= len(SENTENCES):
        raise ValueError(f"synth: num_held_out_sentences must be < {len(SENTENCES)}")
    if any(not 0 <= i < config.num_cameras for i in config.held_out_cameras):
        raise ValueError(f"synth: held_out_cameras {config.held_out_cameras} must index {config.num_cameras} cameras")
    rng = np.random.default_rng(config.seed)
    template = template_lib.procedural_head(config.template_resolution)
    sampler = SurfaceSampler.build(template, config.gaussian_uv_resolution)
    rig_cameras = camera_rig(config, rng)
    mono_camera = monocular_camera(config, rng)
    gains = camera_gains([c.serial for c in [*rig_cameras, mono_camera]], rng)
    held_out_serials = [rig_cameras[i].serial for i in config.held_out_cameras]
    num_train_sentences = len(SENTENCES) - config.num_held_out_sentences
    held_out_ids = [f"id{i:03d}" for i in range(config.num_identities - config.num_held_out_identities,
                                                config.num_identities)]  # fmt: skip
    # The held-out voice speaks every held-out sentence; held-out identities get held-out voices of their own.
    voice_rng = np.random.default_rng([config.seed, 7])
    held_out_sentence_voice = voices.draw_voice(voice_rng, held_out=True)
    renderer = Renderer(sampler, config.images_per_batch, config.render_backend)
    animate = jax.jit(functools.partial(_posed_frames, template))
    primitive_counts = counts(config)
    sequences_info, pending_writes, used_voices = {}, [], {"train": set(), "held_out": set()}
    workers = max(2, min(16, os.cpu_count() or 2))
    # Identities prepared ahead (~6 s of numpy each at the base preset; one at a time could starve a GPU renderer).
    ahead = max(1, min(4, (os.cpu_count() or 2) // 4))
    own_voices = [voices.draw_voice(voice_rng, held_out=f"id{i:03d}" in held_out_ids)
                  for i in range(config.num_identities)]  # fmt: skip
    identity_rngs = [np.random.default_rng([config.seed, index, 1]) for index in range(config.num_identities)]
    all_plans = [_plan_sequences(config, index, identity_rngs[index], rig_cameras, mono_camera, own_voices[index],
                                 held_out_sentence_voice) for index in range(config.num_identities)]  # fmt: skip
    # Images, not sequences: a phone clip is one camera's. The bar's clock starts once the renderer has compiled.
    total_images = sum(plan.num_images(config.fps) for plans in all_plans for plan in plans)
    bar = tqdm(total=total_images, desc="synth: compiling", unit="img", disable=not progress)

    def prepare(index: int):
        """An identity, its raw scan and the scan's registration (numpy only: runs beside the renderer)."""
        identity = make_identity(template, index, np.random.default_rng([config.seed, index]), sampler,
                                 primitive_counts, own_voices[index])  # fmt: skip
        raw_scan = scan_identity(template, identity, sampler, config.scan_resolution,
                                 np.random.default_rng([config.seed, index, 2]))  # fmt: skip
        return identity, raw_scan, scanner.register(template, raw_scan)

    with (
        layout.staged_dir(Path(out_dir)) as root,
        ThreadPoolExecutor(max_workers=workers) as writers,
        ThreadPoolExecutor(max_workers=ahead) as preparer,
    ):
        prepared = [preparer.submit(prepare, i) for i in range(min(ahead, config.num_identities))]
        for index in range(config.num_identities):
            if index + ahead < config.num_identities:
                prepared.append(preparer.submit(prepare, index + ahead))  # while this one renders
            identity, raw_scan, (registered, registered_colours) = prepared[index].result()
            identity_rng = identity_rngs[index]
            subject = layout.subject_dir(root, identity.name)
            layout.write_calibration(subject, [*rig_cameras, mono_camera])
            layout.write_neutral_scan(subject, registered, template.faces, registered_colours)
            layout.write_neutral_scan(subject, raw_scan.vertices, raw_scan.faces, raw_scan.colours,
                                      file_name=layout.RAW_SCAN_FILE)  # fmt: skip
            for number, plan in enumerate(all_plans[index]):
                seq_name, sentence, seq_cameras, voice, utterance = (plan.name, plan.sentence, plan.cameras,
                                                                     plan.voice, plan.utterance)  # fmt: skip
                held_out_sentence = sentence >= num_train_sentences
                recording = voices.draw_recording(identity_rng)
                recorded = voices.record(utterance.audio, recording, identity_rng)
                expressions = rig.expression_track(
                    utterance.phonemes, utterance.duration, config.fps, identity_rng, identity.style
                )
                pose = head_pose_track(len(expressions), config.fps, identity_rng)
                monocular = seq_name.startswith("mono")
                if monocular:
                    pose = (head_turn(pose[0], config.monocular_turn_deg), pose[1])
                tracks = (_pad_frames(track) for track in (expressions, *pose))
                vertices, rotation = animate(identity.template.vertices, identity.template.anchors, *tracks)
                vertices, rotation = (np.asarray(x)[: len(expressions)] for x in (vertices, rotation))
                if renderer.capacity is None:
                    renderer.size_capacity(vertices[0], identity.look, [*rig_cameras, mono_camera])
                    renderer.warm_up(vertices, rotation, seq_cameras, identity.look)
                    bar.reset()  # the bar's rate and ETA count rendering only
                    bar.set_description("synth images")
                image_gains = np.stack([gains[c.serial] for c in seq_cameras])[None].repeat(len(vertices), 0)
                noise = (config.read_noise, config.shot_noise)
                if monocular:
                    drift = exposure_drift(len(vertices), config.exposure_drift, identity_rng)
                    image_gains = image_gains * drift[:, None, None]
                    noise = tuple(config.monocular_noise_scale * n for n in noise)
                jaw = expressions[:, rig.EXPRESSION_NAMES.index("jaw_open")]
                rgb, alpha = renderer(vertices, rotation, jaw, seq_cameras, identity.look, image_gains,
                                      (config.seed, index, number), noise)  # fmt: skip
                shifts = None  # the phone's motion blur, applied by the writer
                if monocular and config.motion_blur_shutter > 0:
                    shifts = image_motion(mono_camera, rotation, pose[1], config.motion_blur_shutter)
                split = _split(identity.name in held_out_ids, held_out_sentence, seq_name)
                used_voices["train" if split in ("train", "monocular") else "held_out"].add(voice.name)
                meta = {"fps": config.fps, "sentence_index": sentence, "split": split, "monocular": monocular,
                        "voice": dataclasses.asdict(voice), "recording": recording.to_dict()}  # fmt: skip
                seq_dir = layout.sequence_dir(root, identity.name, seq_name)
                serials = [c.serial for c in seq_cameras]
                pending_writes.append(_write_sequence(
                    writers, seq_dir, utterance, recorded, expressions, vertices, pose, rgb, alpha, serials, meta,
                    shifts,
                ))  # fmt: skip
                while len(pending_writes) > 3:  # at most a few sequences' images wait in memory for the writers
                    for write in pending_writes.pop(0):
                        write.result()
                sequences_info.setdefault(identity.name, {})[seq_name] = {
                    "sentence_index": sentence, "split": split, "voice": voice.name}  # fmt: skip
                bar.update(plan.num_images(config.fps))
                bar.set_postfix_str(f"{identity.name}/{seq_name}", refresh=False)
        for write in (w for sequence_writes in pending_writes for w in sequence_writes):
            write.result()  # raises what a writer raised
        info = {
            "generator": "uhap data synth",
            "config": config.to_dict(),
            "fps": config.fps,
            "audio_rate": speech.AUDIO_RATE,
            "identities": {
                "train": [f"id{i:03d}" for i in range(config.num_identities) if f"id{i:03d}" not in held_out_ids],
                "held_out": held_out_ids,
            },
            "sentences": list(SENTENCES),
            "held_out_sentences": list(range(num_train_sentences, len(SENTENCES))),
            # Voices heard in training sequences, and those heard only in held-out ones (no variant is shared).
            "voices": {
                "train": sorted(used_voices["train"]),
                "held_out": sorted(used_voices["held_out"]),
                "held_out_sentence_voice": held_out_sentence_voice.name,
            },  # fmt: skip
            "cameras": [c.serial for c in rig_cameras],
            "held_out_cameras": held_out_serials,
            "camera_gains": {serial: gain.round(4).tolist() for serial, gain in gains.items()},
            "monocular_sequences": [f"{s}/mono_00" for s in sequences_info if "mono_00" in sequences_info[s]],
            "sequences": sequences_info,
            "expression_names": list(rig.EXPRESSION_NAMES),
            "region_names": list(template.region_names),
            "num_gaussians": int(len(sampler.face_ids)),
            "num_extra_primitives": int(len(identity.look.anchor)),
            "model_uv_resolution": config.model_uv_resolution,
        }
        layout.write_dataset_info(root, info)
    bar.close()
    return info


def _split(held_out_identity: bool, held_out_sentence: bool, seq_name: str) -> str:
    if held_out_identity:
        return "held_out_identity"
    if seq_name.startswith("mono"):
        return "monocular"
    return "held_out_sentence" if held_out_sentence else "train"
