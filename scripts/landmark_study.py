"""Can 2D face landmarks, learned on a capture's training identities, place a new identity's lips from its phone clip?

    python scripts/landmark_study.py DATA_ROOT [--steps 1500] [--phone-clips] [--workdir DEMO_WORKDIR]

A study for issue 17's LVE gap (docs/benchmarks.md, issue 17, session 19), not part of the pipeline. The demo's LVE
is mostly a static lip offset per test identity (its mouth sits where the average identity's does), and a next
step named there was a pose and lip fit to 2D landmarks. This script measures whether that can work on DATA_ROOT
(a `uhap data synth` capture with tracked meshes). It trains a small heat-map network (soft-argmax) on the
training identities' held-in rig views (with `--phone-clips`, also on the training identities' phone clips) to
find K landmarks (clusters of template vertices: 8 on the lips, 18 on the face, the irises), then prints

- the landmarks' pixel error on rig held-out cameras and on phone clips, training and held-out identities, beside
  a baseline that needs no network: the average training identity's landmarks projected with the true head pose;
- the lips' offset from the average identity in head space (mm), one 3D shift fitted to the detected landmarks
  over the clip, with the true head pose held, with a pose fitted to the face landmarks, or (with `--workdir`)
  with the demo's MonoEncoder's pose held (the poses' errors in degrees);
- with `--workdir` (a `uhap demo` workdir on DATA_ROOT): the benchmark's LVE of its avatars with their mouths moved
  by each shift, beside the baselines on the same moved avatars.

Held-out identities and held-out cameras are never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines import layout, monocular, synth
from uhap_jax.artifacts.avatars import load_avatar
from uhap_jax.artifacts.priors import load_prior, restore_encoder_model
from uhap_jax.eval import benchmark
from uhap_jax.geometry import rotations
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.identity_start import encode_video, texel_regions

LIP_LANDMARKS = 8
FACE_LANDMARKS = 18
SIZE = 64  # the demo's images


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    centres = points[rng.choice(len(points), k, replace=False)]
    for _ in range(iters):
        label = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), 1)
        centres = np.stack([points[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
    return label


def landmark_weights(template: template_lib.Template, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[K, V] averaging weights (lips first) and each landmark's outward normal [K, 3] in head space."""
    v, f = template.vertices, template.faces
    normals = np.zeros_like(v)
    face_normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    for i in range(3):
        np.add.at(normals, f[:, i], face_normals)
    normals = -normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-9)  # faces wind inward
    lips = np.flatnonzero(template.region_mask("lips"))
    front = np.flatnonzero((template.region_mask("face") | template.region_mask("brows")) & (normals[:, 2] < -0.2))
    iris = np.flatnonzero(template.region_mask("iris"))
    groups = [lips[kmeans(v[lips], LIP_LANDMARKS, rng) == j] for j in range(LIP_LANDMARKS)]
    groups += [front[kmeans(v[front], FACE_LANDMARKS, rng) == j] for j in range(FACE_LANDMARKS)]
    groups += [iris[v[iris, 0] < 0], iris[v[iris, 0] > 0]]
    weights = np.zeros((len(groups), len(v)), np.float32)
    for k, group in enumerate(groups):
        weights[k, group] = 1.0 / len(group)
    landmark_normals = weights @ normals
    return weights, landmark_normals / np.linalg.norm(landmark_normals, axis=-1, keepdims=True)


def project(points, world_to_cam, intrinsics):
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    u = intrinsics[0, 0] * cam[..., 0] / cam[..., 2] + intrinsics[0, 2]
    v = intrinsics[1, 1] * cam[..., 1] / cam[..., 2] + intrinsics[1, 2]
    return jnp.stack([u, v], -1) if isinstance(points, jax.Array) else np.stack([u, v], -1)


class Sequence:
    """One sequence's head poses, tracked landmarks (world and head space) and camera views."""

    def __init__(self, root: Path, subject: str, name: str, weights: np.ndarray, normals: np.ndarray):
        self.dir = layout.sequence_dir(root, subject, name)
        self.cameras = layout.read_calibration(layout.subject_dir(root, subject))
        pose = layout.read_sequence_meta(self.dir)["head_pose"]
        self.rotation = np.asarray(pose["rotation_vector"], np.float64)
        self.translation = np.asarray(pose["translation"], np.float64)
        self.matrix = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(self.rotation, jnp.float32)), np.float64)
        self.world = np.einsum("kv,fvc->fkc", weights, np.load(self.dir / layout.VERTICES_FILE))
        self.head = np.einsum("fji,fkj->fki", self.matrix, self.world - self.translation[:, None])
        self.normals = normals

    def view(self, serial: str) -> tuple[np.ndarray, ...]:
        """Images [F, S, S, 3] uint8, masks [F, S, S], landmark pixels [F, K, 2], visibility [F, K]."""
        camera = self.cameras[serial]
        images = np.stack([layout.read_image(p) for p in layout.frame_paths(self.dir, serial)])
        masks = np.stack([layout.read_image(p) for p in layout.frame_paths(self.dir, serial, kind="masks")])
        masks = masks if masks.ndim == 3 else masks[..., 0]
        pixels = project(self.world, camera.world_to_cam, camera.intrinsics)
        cam_points = self.world @ camera.world_to_cam[:3, :3].T + camera.world_to_cam[:3, 3]
        cam_normals = np.einsum("fij,kj->fki", self.matrix, self.normals) @ camera.world_to_cam[:3, :3].T
        facing = -np.sum(cam_normals * cam_points, -1) / np.linalg.norm(cam_points, axis=-1) > 0.15
        return images, masks, pixels.astype(np.float32), facing


class LandmarkNet(nnx.Module):
    """Image [B, S, S, 3] in [0, 1] -> K landmark pixels [B, K, 2]: heat maps at S/2, soft-argmax."""

    def __init__(self, landmarks: int, rngs: nnx.Rngs, channels: int = 32):
        self.stem = nnx.Conv(3, channels, (3, 3), strides=2, rngs=rngs)
        self.convs = nnx.List([nnx.Conv(channels, channels, (3, 3), kernel_dilation=d, rngs=rngs)
                               for d in (1, 2, 4, 8, 1)])  # fmt: skip
        self.out = nnx.Conv(channels, landmarks, (1, 1), rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        h = nnx.leaky_relu(self.stem(2.0 * images - 1.0), 0.2)
        for conv in self.convs:
            h = h + nnx.leaky_relu(conv(h), 0.2)
        logits = self.out(h)
        batch, cells = logits.shape[:2]
        weights = jax.nn.softmax(logits.reshape(batch, cells * cells, -1), 1)
        centres = (jnp.arange(cells) + 0.5) * (images.shape[1] / cells) - 0.5  # OpenCV: pixel i's centre at i
        ys, xs = jnp.meshgrid(centres, centres, indexing="ij")
        return jnp.stack([weights.transpose(0, 2, 1) @ xs.reshape(-1), weights.transpose(0, 2, 1) @ ys.reshape(-1)], -1)


def augment(key: jax.Array, images, masks, pixels):
    """Random similarity warp (scale 0.6-1.5, +-17 degrees, +-12 px), new backdrop through the mask, gain, blur,
    noise; the landmark pixels warped alike."""
    batch = images.shape[0]
    keys = jax.random.split(key, 8)
    scale = jnp.exp(jax.random.uniform(keys[0], (batch,), minval=np.log(0.6), maxval=np.log(1.5)))
    angle = jax.random.uniform(keys[1], (batch,), minval=-0.3, maxval=0.3)
    shift = jax.random.uniform(keys[2], (batch, 2), minval=-12, maxval=12)
    cos, sin = jnp.cos(angle) * scale, jnp.sin(angle) * scale
    warp = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
    centre = jnp.full((2,), (SIZE - 1) / 2.0)
    grid = jnp.arange(SIZE, dtype=jnp.float32)
    ys, xs = jnp.meshgrid(grid, grid, indexing="ij")
    out = jnp.stack([xs, ys], -1).reshape(-1, 2)
    source = jnp.einsum("bij,bnj->bni", jnp.linalg.inv(warp), out[None] - centre - shift[:, None]) + centre
    layers = jnp.concatenate([images, masks[..., None]], -1)

    def sample(layer, where):
        coords = [where[:, 1], where[:, 0]]
        return jnp.stack([jax.scipy.ndimage.map_coordinates(layer[..., c], coords, order=1, mode="constant")
                          for c in range(4)], -1)  # fmt: skip

    warped = jax.vmap(sample)(layers, source).reshape(batch, SIZE, SIZE, 4)
    alpha = jnp.clip(warped[..., 3:], 0, 1)
    texture = 1 + 0.1 * jax.random.normal(keys[4], warped[..., :3].shape)
    backdrop = jax.random.uniform(keys[3], (batch, 1, 1, 3)) * texture
    views = warped[..., :3] * alpha + jnp.clip(backdrop, 0, 1) * (1 - alpha)
    gain = jax.random.uniform(keys[5], (2, batch, 1, 1, 1), minval=-1, maxval=1)
    views = views * (1 + 0.3 * gain[0]) + 0.08 * gain[1]
    taps = jnp.array([0.25, 0.5, 0.25])
    kernel = taps[:, None, None] * taps[None, :, None]
    blurred = jax.vmap(lambda im: jax.scipy.signal.convolve(im, kernel, mode="same"))(views)
    views = jnp.where(jax.random.uniform(keys[6], (batch, 1, 1, 1)) < 0.5, blurred, views)
    views = views + 0.02 * jax.random.normal(keys[7], views.shape)
    moved = jnp.einsum("bij,bkj->bki", warp, pixels - centre) + centre + shift[:, None]
    return jnp.clip(views, 0, 1), moved


def train(examples: list[tuple[np.ndarray, ...]], phone: list[tuple[np.ndarray, ...]], landmarks: int, steps: int,
          seed: int) -> LandmarkNet:  # fmt: skip
    images, masks, pixels, facing = (np.concatenate([e[i] for e in examples]) for i in range(4))
    phone_arrays = [np.concatenate([e[i] for e in phone]) for i in range(4)] if phone else None
    print(f"training on {len(images)} rig views" + (f" and {len(phone_arrays[0])} phone frames" if phone else ""))
    net = LandmarkNet(landmarks, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(net, optax.adam(optax.cosine_decay_schedule(2e-3, steps, 0.05)), wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, key, images, masks, pixels, facing):
        views, target = augment(key, images, masks, pixels)

        def loss_fn(net):
            error = jnp.sqrt(jnp.sum((net(views) - target) ** 2, -1) + 1e-4)
            return jnp.sum(error * facing) / jnp.maximum(facing.sum(), 1)

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    rng, key, batch, start = np.random.default_rng(seed), jax.random.PRNGKey(seed), 32, time.time()
    for i in range(steps):
        index = rng.integers(0, len(images), batch)
        arrays = [a[index] for a in (images, masks, pixels, facing)]
        if phone_arrays is not None:  # a quarter of each batch from the training identities' phone clips
            extra = rng.integers(0, len(phone_arrays[0]), batch // 4)
            arrays = [np.concatenate([a[: batch - batch // 4], p[extra]]) for a, p in zip(arrays, phone_arrays)]
        key, sub = jax.random.split(key)
        loss = step(net, optimizer, sub, jnp.asarray(arrays[0], jnp.float32) / 255,
                    jnp.asarray(arrays[1], jnp.float32) / 255, jnp.asarray(arrays[2]),
                    jnp.asarray(arrays[3], jnp.float32))  # fmt: skip
        if i % 500 == 0 or i == steps - 1:
            print(f"step {i} loss {float(loss):.3f} px ({time.time() - start:.0f} s)", flush=True)
    return net


def fit_lip_shift(pixels, world_to_cam, intrinsics, base, rotation, translation, fit_pose: bool, steps: int = 800):
    """Fits detected pixels [F, K, 2] with the average identity's landmarks `base` [K, 3] (head space).

    `fit_pose`: the per-frame head pose alone, to the face landmarks (the lips left out, so that the pose cannot
    absorb the lips' offset); else the pose is held and one 3D shift of the lip landmarks is fitted (a 4 mm
    Gaussian prior). Pseudo-Huber in pixels. Returns the shift (metres), the rotation and translation [F, 3].
    """
    params = {"r": jnp.asarray(rotation, jnp.float32), "t": jnp.asarray(translation, jnp.float32),
              "s": jnp.zeros(3, jnp.float32)}  # fmt: skip
    lips = (jnp.arange(base.shape[0]) < LIP_LANDMARKS).astype(jnp.float32)
    used = 1.0 - lips if fit_pose else jnp.ones_like(lips)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.1))
    state = optimizer.init(params)

    def loss(p):
        turn = rotations.axis_angle_to_matrix(p["r"])
        points = jnp.einsum("fij,kj->fki", turn, base + 1e-2 * lips[:, None] * p["s"]) + p["t"][:, None]
        error = jnp.sqrt(jnp.sum((project(points, world_to_cam, intrinsics) - pixels) ** 2, -1) + 0.25)
        prior = jnp.sum((p["s"] * 10 / 4.0) ** 2) / pixels.shape[0]
        return jnp.mean(error * used) / jnp.mean(used) + prior

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        keep = ("r", "t") if fit_pose else ("s",)
        grads = {name: g if name in keep else jnp.zeros_like(g) for name, g in grads.items()}
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state)
    params = jax.device_get(params)
    return (1e-2 * np.asarray(params["s"], np.float64), np.asarray(params["r"], np.float64),
            np.asarray(params["t"], np.float64))  # fmt: skip


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(x, jnp.float32)), np.float64) for x in (a, b))
    cos = (np.trace(np.einsum("fji,fjk->fik", ra, rb), axis1=1, axis2=2) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a `uhap data synth` capture (tracked meshes, phone clips)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--phone-clips", action="store_true", help="train on the training identities' phone clips too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="a `uhap demo` workdir on ROOT: score its avatars, mouths moved")
    args = parser.parse_args()
    info = json.loads((args.root / layout.DATASET_FILE).read_text())
    weights, normals = landmark_weights(template_lib.procedural_head(48), np.random.default_rng(args.seed))
    held_in = [s for s in info["cameras"] if s not in info["held_out_cameras"]]
    train_ids, test_ids = info["identities"]["train"], info["identities"]["held_out"]
    mono = [synth.MONO_SERIAL]

    def sequence(subject, name):
        return Sequence(args.root, subject, name, weights, normals)

    rig, phone, average = [], [], []
    for subject in train_ids:
        for name, meta in info["sequences"][subject].items():
            if meta["split"] == "train":
                seq = sequence(subject, name)
                rig += [seq.view(serial) for serial in held_in]
                average.append(seq.head.mean(0))
            elif meta["split"] == "monocular" and args.phone_clips:
                phone.append(sequence(subject, name).view(mono[0]))
    base = np.mean(average, 0)  # the average training identity's landmarks, head space
    net = train(rig, phone, len(weights), args.steps, args.seed)
    predict = nnx.jit(lambda net, images: net(images))

    print("\n| identity | views | lips px (network / average identity at the true pose) | face px (same) |")
    print("|---|---|---|---|")
    fits = []
    for subject in train_ids[:2] + test_ids:
        phone_clips = set(info["monocular_sequences"])
        rig_seq = [n for n in info["sequences"][subject] if f"{subject}/{n}" not in phone_clips][-1]
        phone_seq = [n for n in info["sequences"][subject] if f"{subject}/{n}" in phone_clips][0]
        for label, seq, serials in (("rig held-out cameras", sequence(subject, rig_seq), info["held_out_cameras"]),
                                    ("phone clip", sequence(subject, phone_seq), mono)):  # fmt: skip
            errors = []
            for serial in serials:
                images, _, truth, facing = seq.view(serial)
                camera = seq.cameras[serial]
                found = np.asarray(predict(net, jnp.asarray(images, jnp.float32) / 255))
                placed = project(np.einsum("fij,kj->fki", seq.matrix, base) + seq.translation[:, None],
                                 camera.world_to_cam, camera.intrinsics)  # fmt: skip
                for guess in (found, placed):
                    error = np.linalg.norm(guess - truth, axis=-1)
                    errors.append([error[:, :LIP_LANDMARKS][facing[:, :LIP_LANDMARKS]].mean(),
                                   error[:, LIP_LANDMARKS:][facing[:, LIP_LANDMARKS:]].mean()])  # fmt: skip
                if label == "phone clip":
                    fits.append((subject, seq, camera, found))
            e = np.mean(np.reshape(errors, (-1, 2, 2)), 0)
            name = subject + (" (held out)" if subject in test_ids else "")
            print(f"| {name} | {label} | {e[0, 0]:.2f} / {e[1, 0]:.2f} | {e[0, 1]:.2f} / {e[1, 1]:.2f} |")

    print("\n| identity | lips' offset from the average identity, truth (mm) | fitted, true pose held "
          "| fitted, pose fitted to the face landmarks (its error, deg) | fitted, the encoder's pose held (its error) "
          "| zero rotation's error (deg) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    shifts = {"none": {}, "truth": {}, "landmarks, true pose held": {}, "landmarks, pose fitted": {},
              "landmarks, the encoder's pose held": {}}  # fmt: skip
    encoder = None
    if args.workdir:  # the demo's MonoEncoder, for its head pose on the phone clips
        prior, _, _, _ = load_prior(args.workdir / "prior")
        encoder = restore_encoder_model(args.workdir / "encoder", prior)[0].encoder
    fmt = lambda x: "(" + ", ".join(f"{1e3 * c:+.1f}" for c in x) + ")"  # noqa: E731
    for subject, seq, camera, found in fits:
        w2c, k = jnp.asarray(camera.world_to_cam, jnp.float32), jnp.asarray(camera.intrinsics, jnp.float32)
        found, average = jnp.asarray(found), jnp.asarray(base, jnp.float32)
        held = fit_lip_shift(found, w2c, k, average, seq.rotation, seq.translation, False)[0]
        start = np.full_like(seq.rotation, 1e-3)
        _, rotation, translation = fit_lip_shift(found, w2c, k, average, start, np.zeros_like(seq.translation), True)
        fitted = fit_lip_shift(found, w2c, k, average, rotation, translation, False)[0]
        truth = (seq.head.mean(0) - base)[:LIP_LANDMARKS].mean(0)
        by_encoder, encoder_cell = np.full(3, np.nan), "-"
        if encoder is not None:
            video = monocular.read_monocular(seq.dir, camera.serial)
            _, encoder_rotation, encoder_translation = encode_video(encoder, video, 16)
            by_encoder = fit_lip_shift(found, w2c, k, average, encoder_rotation, encoder_translation, False)[0]
            encoder_cell = f"{fmt(by_encoder)} ({rotation_error_deg(encoder_rotation, seq.rotation):.1f})"
        for name, value in zip(shifts, (np.zeros(3), truth, held, fitted, by_encoder)):
            shifts[name][subject] = value
        print(f"| {subject}{' (held out)' if subject in test_ids else ''} | {fmt(truth)} | {fmt(held)} | "
              f"{fmt(fitted)} ({rotation_error_deg(rotation, seq.rotation):.1f}) | {encoder_cell} "
              f"| {rotation_error_deg(start, seq.rotation):.1f} |")  # fmt: skip
    if args.workdir:
        score_moved_mouths(args.root, args.workdir, {n: {s: v[s] for s in test_ids} for n, v in shifts.items()})


def moved_mouth(prior, template: template_lib.Template, scan_maps: np.ndarray, shift: np.ndarray,
                rigid_m: float) -> np.ndarray:  # fmt: skip
    """scan_maps with the Gaussians within `rigid_m` of the lips' centre moved by `shift` (metres, head space),
    and those beyond by a Gaussian falloff (15 mm) of their distance past it."""
    maps = np.array(scan_maps, np.float32)
    rows, cols = prior.layout.texel_yx[:, 0], prior.layout.texel_yx[:, 1]
    points = np.asarray(prior.template_points[...]) + maps[rows, cols, :3]
    lips = texel_regions(prior, template) == template.region_names.index("lips")
    beyond = np.maximum(np.linalg.norm(points - points[lips].mean(0), axis=-1) - rigid_m, 0.0)
    maps[rows, cols, :3] += np.exp(-(beyond**2) / (2 * 0.015**2))[:, None] * shift[None].astype(np.float32)
    return maps


def score_moved_mouths(root: Path, workdir: Path, shifts: dict[str, dict[str, np.ndarray]]) -> None:
    """The LVE of the demo workdir's avatars (`avatar_<id>`) with their mouths moved by each estimate, against the
    benchmark's baselines on the same moved avatars (geometry only, no rendering)."""
    prior, _, template, _ = load_prior(workdir / "prior")
    avatars = {s: load_avatar(workdir / f"avatar_{s}") for s in next(iter(shifts.values()))}
    split = benchmark.read_split(root)
    clips = [benchmark.read_clip(root, s, q, split.held_out_cameras) for s, q in benchmark.test_sequences(root, split)]
    best = {}
    for subject, avatar in avatars.items():  # a diagnostic: the avatar's own mean lip error over its test clips
        errors = []
        for clip in (c for c in clips if c.subject == subject):
            scorer = benchmark.Scorer(clip, template, prior.layout)
            renderer = benchmark.Renderer(avatar.prior, avatar.scan_maps, clip.cameras, 8, {"lips": scorer.lip_ids})
            test = benchmark.TestAvatar(avatar.prior, avatar.scan_maps, avatar.speech)
            lips = renderer.points(benchmark.audio_driver(test, clip.waveform, clip.num_frames))["lips"]
            errors.append((scorer.gt_lips - lips).reshape(-1, 3).mean(0))
        best[subject] = np.mean(errors, 0)
    rows = [(name, 0.03, per) for name, per in shifts.items()]
    rows += [("truth", 0.0, shifts["truth"]), ("the avatar's own mean lip error (diagnostic)", 0.03, best)]
    print("\n| mouth moved by | moved region | lve_mm2 (zero motion / shuffled audio) | under zero / shuffled |")
    print("|---|---|---|---|")
    for name, rigid, per in rows:
        moved = {s: benchmark.TestAvatar(a.prior, moved_mouth(prior, template, a.scan_maps, per[s], rigid), a.speech)
                 for s, a in avatars.items()}  # fmt: skip
        means = benchmark.run(root, moved, template, None, images=False, clips=clips)["means"]
        lve = [means[c]["lve_mm2"] for c in ("audio", "zero_motion", "shuffled_audio")]
        region = f"within {1e3 * rigid:.0f} mm rigid, 15 mm falloff" if rigid else "15 mm falloff"
        print(
            f"| {name} | {region} | {lve[0]:.1f} ({lve[1]:.1f} / {lve[2]:.1f}) | "
            f"{100 * (1 - lve[0] / lve[1]):.1f}% / {100 * (1 - lve[0] / lve[2]):.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
