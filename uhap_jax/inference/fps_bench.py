"""How fast a UHAP avatar animates: frames/s of decode (z -> Gaussians) and of decode + render, at 512^2.

`benchmark_animation` times any model (trained or not) on a given z sequence and camera path. Run as a
module, it builds an untrained model from a prior config, which costs the same per frame as a trained one
of that preset (the same Gaussians, the same shapes), and prints a markdown row:

    python -m uhap_jax.inference.fps_bench --config configs/prior.py:tiny --frames 50 --size 512
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uhap_jax.inference.camera_paths import CameraPath, orbit
from uhap_jax.models.prior import UHAP


def _batches(frames: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, frames)) for start in range(0, frames, batch_size)]


def _padded(values: np.ndarray, rows: slice, batch_size: int) -> jax.Array:
    """values[rows], the last row repeated up to `batch_size`, so that every batch has one shape."""
    chunk = values[rows]
    return jnp.asarray(np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)]))


def benchmark_animation(
    model: UHAP,
    scan_maps: np.ndarray,
    z: np.ndarray,
    path: CameraPath,
    *,
    batch_size: int = 1,
    capacity_headroom: float = 1.5,
) -> dict[str, float | int | str]:
    """Times decode and decode + render of `z` [T, z_dim] for one identity (`scan_maps` [R, R, 6]).

    Frame t is seen by camera t of `path`, with the head pose at rest. The first call of each jitted
    function (compilation and one batch) is timed apart; the rates cover every frame once, each batch
    read back to the host as a video writer would. The pair capacity is the train stage's bound (every
    scale at its maximum, x `capacity_headroom`); an overflow (NaN images) is an error, not a fast wrong
    number.
    """
    frames = len(z)
    if len(path) != frames:
        raise ValueError(f"fps bench: {frames} z frames but the camera path has {len(path)} cameras")
    graphdef, state = nnx.split(model)
    rest = jnp.zeros((batch_size, 3), jnp.float32)  # head rotation vector and translation
    identity = jnp.broadcast_to(jnp.asarray(scan_maps, jnp.float32), (batch_size, *np.shape(scan_maps)))
    size = {"width": path.width, "height": path.height}

    def inputs(rows: slice) -> tuple[jax.Array, jax.Array, jax.Array]:
        views = _padded(path.world_to_cam.astype(np.float32), rows, batch_size)[:, None]
        ks = _padded(path.intrinsics.astype(np.float32), rows, batch_size)[:, None]
        return _padded(np.asarray(z, np.float32), rows, batch_size), views, ks

    @jax.jit
    def decode(state, z_batch, views, ks):
        return nnx.merge(graphdef, state).decode(z_batch, identity, rest, rest)

    first = inputs(_batches(frames, batch_size)[0])
    start = time.perf_counter()
    widest = jax.block_until_ready(decode(state, *first))
    decode_compile_s = time.perf_counter() - start
    widest = widest._replace(scales=widest.scales * model.max_scale_ratio)
    capacity = int(model.capacity_for(widest, first[1], first[2], **size) * capacity_headroom)

    @jax.jit
    def decode_render(state, z_batch, views, ks):
        avatar = nnx.merge(graphdef, state)
        gaussians = avatar.decode(z_batch, identity, rest, rest)
        return avatar.render(gaussians, views, ks, **size, capacity=capacity).rgb

    def frames_per_second(fn) -> float:
        start = time.perf_counter()
        for rows in _batches(frames, batch_size):
            host = jax.device_get(fn(state, *inputs(rows)))
            if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(host)):
                raise RuntimeError(f"fps bench: frames {rows.start}..{rows.stop - 1} overflowed capacity {capacity}")
        return frames / (time.perf_counter() - start)

    start = time.perf_counter()
    jax.block_until_ready(decode_render(state, *first))
    render_compile_s = time.perf_counter() - start
    decode_fps, render_fps = frames_per_second(decode), frames_per_second(decode_render)
    return {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "gaussians": model.layout.num_gaussians,
        "image_size": f"{path.width}x{path.height}",
        "frames": frames,
        "batch": batch_size,
        "capacity": capacity,
        "decode_fps": decode_fps,
        "decode_render_fps": render_fps,
        "decode_compile_s": decode_compile_s,
        "decode_render_compile_s": render_compile_s,
    }


def main(argv: list[str] | None = None) -> int:
    from uhap_jax.config_utils import load_config
    from uhap_jax.geometry import template as template_lib
    from uhap_jax.models.prior import scan_uv_maps

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/prior.py:tiny", help="prior config and preset")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="frames decoded and rendered per jitted call")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    rng = np.random.default_rng(args.seed)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(template, config.model, rngs=nnx.Rngs(args.seed))
    albedo = rng.uniform(0.2, 0.8, template.vertices.shape).astype(np.float32)
    scan_maps = scan_uv_maps(model.layout, template, template.vertices, albedo, "the template")
    z = rng.normal(size=(args.frames, model.z_dim)).astype(np.float32)
    path = orbit(args.frames, width=args.size, height=args.size, arc_deg=60.0)
    row = benchmark_animation(model, scan_maps, z, path, batch_size=args.batch)
    print(f"config {args.config}")
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
