"""Rasterizer benchmark: forward and forward+backward medians, peak memory and pairs/s, optionally beside gsplat.

    python -m kernels.bench --preset full --gsplat          # on a GPU, the scenes of the project's target table
    python -m kernels.bench --preset tiny                   # small scenes that run on a CPU in a minute

Both systems get identical inputs; with --gsplat the images must agree (max |diff| <= 1e-4) and the table reports
the time ratio ours/gsplat. gsplat is only imported when asked for, and is never a dependency of this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import binning
from kernels.rasterize import BACKENDS, _compositor, _resolve_backend, build_pairs, capacity_for, rasterize


@dataclasses.dataclass(frozen=True)
class Scene:
    name: str
    kind: str  # "head" or "box"
    n: int
    width: int
    height: int
    views: int = 1


PRESETS = {
    "full": [
        Scene("head100k_512_x1", "head", 100_000, 512, 512),
        Scene("head100k_1024_x1", "head", 100_000, 1024, 1024),
        Scene("head100k_512_x16", "head", 100_000, 512, 512, 16),
        Scene("head250k_1024_x4", "head", 250_000, 1024, 1024, 4),
        Scene("box1M_1080p", "box", 1_000_000, 1920, 1080),
    ],
    "tiny": [
        Scene("head5k_128_x1", "head", 5_000, 128, 128),
        Scene("head5k_96_x4", "head", 5_000, 96, 96, 4),
    ],
}


def make_scene(scene: Scene, seed: int = 0) -> dict[str, np.ndarray]:
    """Head-like ellipsoid shell 1 m in front of the camera, or a box of large Gaussians; float32 arrays."""
    rng = np.random.default_rng(seed)
    n = scene.n
    if scene.kind == "head":
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = np.array([0.08, 0.11, 0.10]) * (1 + rng.uniform(-0.03, 0.03, (n, 1)))
        means = direction * radius + np.array([0.0, 0.0, 1.0])
        scales = np.exp(rng.uniform(np.log(5e-4), np.log(4e-3), (n, 3)))
        focal = 2.5 * scene.height
        yaws = np.linspace(-0.15, 0.15, scene.views) if scene.views > 1 else np.zeros(1)
    else:
        means = rng.uniform([-3.0, -2.0, 1.5], [3.0, 2.0, 7.0], (n, 3))
        scales = np.exp(rng.uniform(np.log(0.01), np.log(0.1), (n, 3)))
        focal = 0.55 * scene.width
        yaws = np.zeros(scene.views)
    world_to_cam = np.tile(np.eye(4), (len(yaws), 1, 1))
    centre = np.array([0.0, 0.0, 1.0])
    for i, yaw in enumerate(yaws):  # orbit the head centre
        rot = np.array([[np.cos(yaw), 0, -np.sin(yaw)], [0, 1, 0], [np.sin(yaw), 0, np.cos(yaw)]])
        world_to_cam[i, :3, :3] = rot
        world_to_cam[i, :3, 3] = centre - rot @ centre
    intrinsics = np.tile(
        np.array([[focal, 0, scene.width / 2], [0, focal, scene.height / 2], [0, 0, 1.0]]), (len(yaws), 1, 1)
    )
    arrays = dict(
        means=means,
        quats=rng.normal(size=(n, 4)),
        scales=scales,
        opacities=rng.uniform(0.3, 0.9, n),
        colors=rng.uniform(0, 1, (n, 3)),
        world_to_cam=world_to_cam,
        intrinsics=intrinsics,
    )
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms, each run synchronised (block_until_ready / cuda synchronize inside fn)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


ORDER = ("means", "quats", "scales", "opacities", "colors", "world_to_cam", "intrinsics")


def bench_ours(scene: Scene, arrays: dict, backend: str, repeats: int) -> dict:
    args = [jnp.asarray(arrays[k]) for k in ORDER]
    width, height = scene.width, scene.height
    capacity = capacity_for(*args[:4], *args[5:], width=width, height=height)
    weights = jax.random.normal(jax.random.key(1), (len(arrays["world_to_cam"]), height, width, 3))

    def render(*a):
        return rasterize(*a, width=width, height=height, backend=backend, capacity=capacity)

    forward = jax.jit(lambda *a: render(*a)[:3])

    @jax.jit
    def forward_backward(*a):
        def loss(m, q, s, o, c):
            out = render(m, q, s, o, c, *a[5:])
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + jnp.sum(out.depth)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a[:5])

    out = render(*args)
    n_pairs = int(jnp.sum(out.stats.n_pairs))
    fwd = median_ms(lambda: jax.block_until_ready(forward(*args)), repeats)
    fwd_bwd = median_ms(lambda: jax.block_until_ready(forward_backward(*args)), repeats)
    stats = jax.devices()[0].memory_stats() or {}
    breakdown = _breakdown(scene, args, capacity, repeats, backend) if backend != "reference" else {}
    return dict(
        **breakdown,
        rgb=np.asarray(out.rgb),
        fwd_ms=fwd,
        fwd_bwd_ms=fwd_bwd,
        n_pairs=n_pairs,
        capacity=capacity,
        peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20,
        pairs_per_s=n_pairs / (fwd * 1e-3),
    )


def _breakdown(scene: Scene, args: list, capacity: int, repeats: int, backend: str) -> dict:
    """Times of the stages: projection + binning + record gather, and each compositor kernel alone."""
    pc = _compositor(backend)
    width, height = scene.width, scene.height
    tiles_x, _ = binning.tile_grid(width, height)
    pairs = jax.jit(
        lambda *a: build_pairs(*a, width=width, height=height, backend=backend, mode="classic", capacity=capacity)
    )
    records, bins = pairs(*args)
    ranges = (bins.tile_start, bins.tile_end)
    if backend == "pallas_tpu":  # the background is blended outside its kernels
        fwd = jax.jit(lambda r, s, e: pc._forward(r, s, e, tiles_x))
    else:
        background = jnp.zeros((4,), jnp.float32)
        fwd = jax.jit(lambda r, s, e: pc._forward(r, s, e, background, tiles_x))
    out, trans, last = fwd(records, *ranges)
    g_out = jax.random.normal(jax.random.key(2), out.shape)
    g_trans = jax.random.normal(jax.random.key(3), trans.shape)
    if backend == "pallas_tpu":  # per-pixel inputs: T_final, the last slot, d/d(acc), T_final x d/d(T_final)
        bwd_args = (records, *ranges, trans, last, g_out, trans * g_trans)
    else:
        bwd_args = (records, *ranges, out, trans, last, g_out, g_trans)
    bwd = jax.jit(lambda *a: pc._backward(*a, tiles_x))
    return dict(
        pairs_ms=median_ms(lambda: jax.block_until_ready(pairs(*args)), repeats),
        kernel_fwd_ms=median_ms(lambda: jax.block_until_ready(fwd(records, *ranges)), repeats),
        kernel_bwd_ms=median_ms(lambda: jax.block_until_ready(bwd(*bwd_args)), repeats),
    )


def stage_times(scene: Scene, arrays: dict, repeats: int) -> dict:
    """Projection, depth ranking, pair expansion, sorting and the record gather, timed cumulatively, for each
    binning strategy (per-camera batched sorts vs one flattened sort)."""
    from kernels.projection import project

    args = [jnp.asarray(arrays[k]) for k in ORDER]
    width, height = scene.width, scene.height
    tiles_x, _ = binning.tile_grid(width, height)
    capacity = capacity_for(*args[:4], *args[5:], width=width, height=height)

    def proj_of(a):
        return project(a[0], a[1], a[2], a[3], a[5], a[6], width=width, height=height)

    def rank(a, how):
        p = proj_of(a)
        rects = binning.tile_rectangles(p, width, height)
        if how == "float":  # the old float-keyed argsort
            key = jnp.where(rects[-1] > 0, p.depths, jnp.inf)
            return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32), rects
        return binning.rank_by_depth(p.depths, rects[-1], flat=how == "flat"), rects

    def expand(a, how, method):
        order, rects = rank(a, how)
        fn = functools.partial(binning.expand_pairs, capacity=capacity, tiles_x=tiles_x, method=method)
        return jax.vmap(fn)(order, *rects)

    def time(fn):
        fn = jax.jit(fn)
        return median_ms(lambda: jax.block_until_ready(fn(*args)), repeats)

    row = dict(scene=scene.name, capacity=capacity, project_ms=time(lambda *a: proj_of(a).means2d))
    for how in ("float", "percam", "flat"):
        row[f"rank_{how}_ms"] = time(lambda *a, h=how: rank(a, h)[0])
    for method in ("cummax", "searchsorted"):
        row[f"expand_{method}_ms"] = time(lambda *a, m=method: expand(a, "flat", m))
    from kernels import pallas_composite as pc

    saved = binning.FLAT_SORT
    try:
        for flat in ("0", "1"):
            binning.FLAT_SORT = flat
            row[f"bin_flat{flat}_ms"] = time(
                lambda *a: binning.bin_pairs(proj_of(a), width, height, capacity, pc.ALIGN).tile_start
            )
            row[f"pairs_flat{flat}_ms"] = time(
                lambda *a: build_pairs(
                    *a, width=width, height=height, backend="pallas", mode="classic", capacity=capacity
                )[0]
            )
    finally:
        binning.FLAT_SORT = saved
    return row


def profile(scene: Scene, arrays: dict, repeats: int, backend: str, top: int = 25) -> str:
    """Device time per iteration of forward+backward, by XLA op and by GPU kernel (jax.profiler trace)."""
    import collections
    import glob
    import tempfile

    from jax.profiler import ProfileData

    args = [jnp.asarray(arrays[k]) for k in ORDER]
    width, height = scene.width, scene.height
    capacity = capacity_for(*args[:4], *args[5:], width=width, height=height)
    weights = jax.random.normal(jax.random.key(1), (len(arrays["world_to_cam"]), height, width, 3))

    @jax.jit
    def forward_backward(*a):
        def loss(m, q, s, o, c):
            out = rasterize(m, q, s, o, c, *a[5:], width=width, height=height, backend=backend, capacity=capacity)
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + jnp.sum(out.depth)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a[:5])

    for _ in range(3):
        jax.block_until_ready(forward_backward(*args))
    folder = tempfile.mkdtemp()
    jax.profiler.start_trace(folder)
    for _ in range(repeats):
        jax.block_until_ready(forward_backward(*args))
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    by_op, by_kernel = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            target = by_op if line.name == "XLA Ops" else by_kernel if line.name.startswith("Stream") else None
            if target is not None:
                for event in line.events:
                    target[event.name] += event.duration_ns / 1e6 / repeats
    if not by_op and not by_kernel:
        return "no GPU events; planes: " + "; ".join(f"{p.name}: {[x.name for x in p.lines]}" for p in data.planes)
    lines = [
        f"== profile {scene.name}: device ms per fwd+bwd iteration (total by op {sum(by_op.values()):.3f}, "
        f"by kernel {sum(by_kernel.values()):.3f})"
    ]
    for title, counter in (("op", by_op), ("kernel", by_kernel)):
        for name, ms in counter.most_common(top):
            lines.append(f"  {title:6s} {ms:8.3f}  {name[:110]}")
    return "\n".join(lines)


def bench_gsplat(scene: Scene, arrays: dict, repeats: int) -> dict:
    """gsplat 1.5.3 `rasterization(..., packed=False)` on the same inputs, RGB+D like ours."""
    import torch
    from gsplat import rasterization

    dev = torch.device("cuda")
    t = {k: torch.tensor(v, device=dev) for k, v in arrays.items()}
    weights = torch.randn(len(arrays["world_to_cam"]), scene.height, scene.width, 3, device=dev)

    def render(m, q, s, o, c):
        img, alpha, _ = rasterization(
            m,
            q,
            s,
            o,
            c,
            t["world_to_cam"],
            t["intrinsics"],
            scene.width,
            scene.height,
            packed=False,
            render_mode="RGB+D",
        )
        return img, alpha

    def forward():
        with torch.no_grad():
            render(*(t[k] for k in ORDER[:5]))
        torch.cuda.synchronize()

    params = [t[k].clone().requires_grad_(True) for k in ORDER[:5]]

    def forward_backward():
        img, alpha = render(*params)
        loss = (img[..., :3] * weights).sum() + alpha.sum() + img[..., 3].sum()
        loss.backward()
        torch.cuda.synchronize()

    with torch.no_grad():
        img, _ = render(*(t[k] for k in ORDER[:5]))
    torch.cuda.reset_peak_memory_stats()
    fwd = median_ms(forward, repeats)
    fwd_bwd = median_ms(forward_backward, repeats)
    return dict(
        rgb=img[..., :3].cpu().numpy(),
        fwd_ms=fwd,
        fwd_bwd_ms=fwd_bwd,
        peak_mib=torch.cuda.max_memory_allocated() / 2**20,
    )


def run(
    preset: str,
    backend: str,
    repeats: int,
    with_gsplat: bool,
    only: list[str] | None = None,
    save_images: str | None = None,
) -> list[dict]:
    rows = []
    for scene in PRESETS[preset]:
        if only and scene.name not in only:
            continue
        arrays = make_scene(scene)
        ours = bench_ours(scene, arrays, backend, repeats)
        row = dict(
            scene=scene.name,
            gaussians=scene.n,
            size=f"{scene.width}x{scene.height}",
            views=scene.views,
            **{k: v for k, v in ours.items() if k != "rgb"},
        )
        if with_gsplat:
            theirs = bench_gsplat(scene, arrays, repeats)
            row.update(
                gsplat_fwd_ms=theirs["fwd_ms"],
                gsplat_fwd_bwd_ms=theirs["fwd_bwd_ms"],
                gsplat_peak_mib=theirs["peak_mib"],
                max_abs_diff=float(np.abs(ours["rgb"] - theirs["rgb"]).max()),
                ratio_fwd=ours["fwd_ms"] / theirs["fwd_ms"],
                ratio_fwd_bwd=ours["fwd_bwd_ms"] / theirs["fwd_bwd_ms"],
            )
        if save_images:
            np.savez_compressed(
                f"{save_images}/{scene.name}.npz",
                ours=ours["rgb"][0],
                **({"gsplat": theirs["rgb"][0]} if with_gsplat else {}),
            )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["scene", "fwd_ms", "fwd_bwd_ms", "peak_mib", "pairs_per_s"]
    if rows and "kernel_fwd_ms" in rows[0]:
        cols += ["pairs_ms", "kernel_fwd_ms", "kernel_bwd_ms"]
    if rows and "gsplat_fwd_ms" in rows[0]:
        cols += ["gsplat_fwd_ms", "gsplat_fwd_bwd_ms", "ratio_fwd", "ratio_fwd_bwd", "max_abs_diff"]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--backend", choices=list(BACKENDS), default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gsplat", action="store_true", help="also time gsplat 1.5.3 (GPU, needs torch + gsplat)")
    parser.add_argument("--scenes", nargs="*", help="only these scene names")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--stages", action="store_true", help="time the binning stages and strategies instead")
    parser.add_argument("--profile", action="store_true", help="per-op device times of forward+backward instead")
    parser.add_argument("--save-images", help="folder to save the first view of each scene (npz) for inspection")


def main_with_args(args: argparse.Namespace) -> int:
    args.backend = _resolve_backend(args.backend)
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, backend {args.backend}")
    if args.profile:
        for scene in PRESETS[args.preset]:
            if not args.scenes or scene.name in args.scenes:
                print(profile(scene, make_scene(scene), args.repeats, args.backend), flush=True)
        return 0
    if args.stages:
        for scene in PRESETS[args.preset]:
            if not args.scenes or scene.name in args.scenes:
                print(json.dumps(stage_times(scene, make_scene(scene), args.repeats)), flush=True)
        return 0
    rows = run(args.preset, args.backend, args.repeats, args.gsplat, args.scenes, args.save_images)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main_with_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
