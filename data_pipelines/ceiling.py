"""The representation's ceiling: how well the avatar's own kind of Gaussians can reproduce a capture at best.

The avatar puts one Gaussian per texel of its UV map on the template, moved by decoded offsets, with decoded
rotation, scale, opacity and a view-dependent colour. Here those same Gaussians (the same UV resolution, on the
frame's ground-truth template-topology mesh) get every attribute as a free parameter, fitted by gradient
descent to one frame's held-in views, with no network in between: the PSNR this reaches on held-in cameras, and
on held-out cameras it never saw, bounds what any decoder of that representation could reach on these data.
The colour is a base colour plus a linear function of the view ray (the avatar's colour MLP, to first order).

    python -m data_pipelines.ceiling --data DATASET [--subject id000] [--frames 3] [--steps 400]

prints one JSON line with per-frame and mean PSNR: of full images over black, as the prior's `eval/psnr`, and
over the head mask against the foreground on black (`*_head`), as the benchmark's prior rows and the demo's prior
bar score it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kernels
from data_pipelines import layout
from data_pipelines.synth import SurfaceSampler
from uhap_jax.geometry import template as template_lib


def _quat_multiply(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    aw, ax, ay, az = jnp.moveaxis(a, -1, 0)
    bw, bx, by, bz = jnp.moveaxis(b, -1, 0)
    return jnp.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                      aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)  # fmt: skip


def init_params(num_gaussians: int) -> dict[str, jnp.ndarray]:
    """Every Gaussian on its texel's surface point, at its texel's footprint, nearly opaque, grey."""
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return {
        "offset": zeros((num_gaussians, 3)),  # mm, in the texel's (tangent, bitangent, normal) frame
        "rotation": zeros((num_gaussians, 3)),
        "log_scale": zeros((num_gaussians, 3)),
        "opacity": jnp.full((num_gaussians,), 3.0),
        "colour": jnp.full((num_gaussians, 3), 0.5),
        "view": zeros((num_gaussians, 3, 3)),  # colour change per unit of view ray
    }


def gaussians(params: dict, sampler: SurfaceSampler, vertices: jnp.ndarray):
    """The fitted Gaussians on mesh `vertices` [V, 3]: means, quats, scales, opacities."""
    means, quats, scales, normals, tangents = sampler.gaussians(vertices)
    frame = jnp.stack([tangents, jnp.cross(normals, tangents), normals], -1)
    means = means + 1e-3 * jnp.einsum("nij,nj->ni", frame, params["offset"])
    delta = jnp.concatenate([jnp.ones_like(params["rotation"][:, :1]), 0.5 * params["rotation"]], -1)
    quats = _quat_multiply(quats, delta / jnp.linalg.norm(delta, axis=-1, keepdims=True))
    scales = scales * jnp.array([1.0, 1.0, 10.0]) * jnp.exp(jnp.clip(params["log_scale"], -3.0, 3.0))
    return means, quats, scales, jax.nn.sigmoid(params["opacity"])


def render(params, sampler, vertices, world_to_cam, intrinsics, width, height, capacity, backend):
    """Images [C, H, W, 3] of the fitted Gaussians, each camera with its own view-dependent colours."""
    means, quats, scales, opacities = gaussians(params, sampler, vertices)
    centres = -jnp.einsum("cji,cj->ci", world_to_cam[:, :3, :3], world_to_cam[:, :3, 3])
    rays = means[None] - centres[:, None]
    rays = rays / jnp.linalg.norm(rays, axis=-1, keepdims=True)
    colours = params["colour"][None] + jnp.einsum("nij,cnj->cni", params["view"], rays)
    out = kernels.rasterize(means, quats, scales, opacities, colours, world_to_cam, intrinsics, width=width,
                            height=height, capacity=capacity, backend=backend)  # fmt: skip
    return out.rgb, out.stats.overflow


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """dB per image [..., H, W, 3] in [0, 1] (pred clipped to [0, 1])."""
    mse = np.mean((np.clip(pred, 0.0, 1.0) - target) ** 2, axis=(-3, -2, -1))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def head_psnr(pred: np.ndarray, target: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """dB per image over the pixels of masks [..., H, W] (uint8) above half, against the foreground on black."""
    inside = (masks > 127)[..., None]
    foreground = target * (masks[..., None] / np.float32(255))
    error = np.sum(inside * (np.clip(pred, 0.0, 1.0) - foreground) ** 2, axis=(-3, -2, -1))
    mse = error / np.maximum(3 * np.sum(inside, axis=(-3, -2, -1)), 1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def fit_frame(
    sampler: SurfaceSampler,
    vertices: np.ndarray,
    images: np.ndarray,
    world_to_cam: np.ndarray,
    intrinsics: np.ndarray,
    *,
    steps: int,
    learning_rate: float = 0.02,
    backend: str = "auto",
) -> tuple[dict, int]:
    """Fits free texel Gaussians to images [C, H, W, 3] in [0, 1] of one frame; returns params and capacity."""
    height, width = images.shape[1:3]
    vertices, world_to_cam, intrinsics = (jnp.asarray(a, jnp.float32) for a in (vertices, world_to_cam, intrinsics))
    params = init_params(len(sampler.face_ids))
    means, quats, scales, opacities = gaussians(params, sampler, vertices)
    capacity = 4 * max(
        kernels.capacity_for(
            means, quats, scales, opacities, world_to_cam[c, None], intrinsics[c, None], width=width, height=height
        )  # fmt: skip
        for c in range(len(world_to_cam))
    )
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
    optimizer = optax.adam(schedule)
    state = optimizer.init(params)
    target = jnp.asarray(images, jnp.float32)

    @jax.jit
    def step(params, state):
        def loss(params):
            rgb, overflow = render(params, sampler, vertices, world_to_cam, intrinsics, width, height, capacity,
                                   backend)  # fmt: skip
            error = rgb - target
            return jnp.mean(error**2) + 0.1 * jnp.mean(jnp.abs(error)), overflow

        (value, overflow), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value, overflow.any()

    for _ in range(steps):
        params, state, _, overflow = step(params, state)
    if bool(overflow):
        raise RuntimeError(f"ceiling: the pair capacity {capacity} overflowed; the fit grew its Gaussians too far")
    return params, capacity


def measure(root: Path, subject: str | None = None, num_frames: int = 3, steps: int = 400, backend: str = "auto",
            uv_resolution: int | None = None) -> dict:  # fmt: skip
    """Fits `num_frames` frames (spread over the first multi-view sequence of `subject`, default the first
    training identity) and scores held-in and held-out cameras; `uv_resolution` defaults to the dataset's
    `model_uv_resolution`."""
    root = Path(root)
    info = layout.read_dataset_info(root)
    config = info.get("config", {})
    uv_resolution = uv_resolution or info.get("model_uv_resolution")
    if not uv_resolution or "template_resolution" not in config:
        raise layout.LayoutError(f"{root / layout.DATASET_FILE}: no model_uv_resolution or template_resolution (not "
                                 "a synthetic dataset from `uhap data synth`); pass --uv-resolution")  # fmt: skip
    subject = subject or info["identities"]["train"][0]
    sequence = next(s for s in sorted(info["sequences"][subject]) if not s.startswith("mono"))
    seq_dir = layout.sequence_dir(root, subject, sequence)
    meta = layout.read_sequence_meta(seq_dir)
    vertices = layout.read_vertices(seq_dir, num_frames=meta["num_frames"])
    cameras = layout.read_calibration(layout.subject_dir(root, subject))
    held_out = list(info["held_out_cameras"])
    held_in = [s for s in info["cameras"] if s not in held_out]
    template = template_lib.procedural_head(config["template_resolution"])
    sampler = SurfaceSampler.build(template, uv_resolution)

    def arrays(serials):
        return (np.stack([cameras[s].world_to_cam for s in serials]).astype(np.float32),
                np.stack([cameras[s].intrinsics for s in serials]).astype(np.float32))  # fmt: skip

    def load(serials, frame: int) -> np.ndarray:
        return np.stack([layout.read_image(layout.frame_path(seq_dir, s, frame)) for s in serials]) / np.float32(255)

    frames = np.linspace(0, meta["num_frames"] - 1, num_frames).round().astype(int)
    width, height = cameras[held_in[0]].width, cameras[held_in[0]].height
    results, start = [], time.time()
    draw = jax.jit(
        lambda p, v, w, k, width, height, capacity: render(p, sampler, v, w, k, width, height, capacity, backend),
        static_argnums=(4, 5, 6),
    )
    for frame in (int(f) for f in frames):
        params, capacity = fit_frame(sampler, vertices[frame], load(held_in, frame), *arrays(held_in), steps=steps,
                                     backend=backend)  # fmt: skip
        scores = {}
        for name, serials in (("held_in", held_in), ("held_out", held_out)):
            rgb, _ = draw(params, jnp.asarray(vertices[frame]), *arrays(serials), width, height, capacity)
            images = load(serials, frame)
            masks = np.stack([layout.read_image(layout.frame_path(seq_dir, s, frame, kind="masks")) for s in serials])
            scores[name] = float(np.mean(psnr(np.asarray(rgb), images)))
            scores[f"{name}_head"] = float(np.mean(head_psnr(np.asarray(rgb), images, masks)))
        results.append({"frame": frame, **scores})
    return {
        "dataset": str(root),
        "subject": subject,
        "sequence": sequence,
        "uv_resolution": uv_resolution,
        "num_gaussians": int(len(sampler.face_ids)),
        "steps": steps,
        "frames": results,
        "psnr_held_in": float(np.mean([r["held_in"] for r in results])),
        "psnr_held_out": float(np.mean([r["held_out"] for r in results])),
        "psnr_held_in_head": float(np.mean([r["held_in_head"] for r in results])),
        "psnr_held_out_head": float(np.mean([r["held_out_head"] for r in results])),
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a synthetic dataset root (uhap data synth)")
    parser.add_argument("--subject", default=None, help="identity to fit (default: the first training identity)")
    parser.add_argument("--frames", type=int, default=3, help="frames to fit, spread over the first sequence")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps per frame")
    parser.add_argument("--backend", default="auto", help="rasterizer backend (auto, reference, pallas, cuda)")
    parser.add_argument("--uv-resolution", type=int, default=None, help="default: dataset.json model_uv_resolution")
    args = parser.parse_args(argv)
    if not (args.data / layout.DATASET_FILE).is_file():
        sys.exit(f"--data {args.data}: no {layout.DATASET_FILE}; make one with `uhap data synth --out DIR`")
    print(json.dumps(measure(args.data, args.subject, args.frames, args.steps, args.backend, args.uv_resolution)))


if __name__ == "__main__":
    main()
