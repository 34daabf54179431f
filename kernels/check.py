"""A kernel backend (CUDA, C++ on CPU, Pallas or Pallas TPU) against the reference compositor on fresh random
scenes, on whatever device JAX has.

    python -m kernels.check                   # the backend "auto" picks; prints max differences and gradient errors
    python -m kernels.check --backend pallas
    python -m kernels.check --backend cpu     # the C++ kernels (what "auto" picks on a CPU with a compiler)
    python -m kernels.check --backend pallas_tpu  # on a TPU: the Mosaic kernels compiled (elsewhere: interpreted)

Images must agree within 1e-5 and gradients within 1e-4 (relative, by norm); exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels import bench, binning
from kernels.projection import project
from kernels.rasterize import _resolve_backend, capacity_for, rasterize

ORDER = bench.ORDER


def compare(scene: bench.Scene, seed: int, backend: str) -> dict:
    arrays = bench.make_scene(scene, seed)
    args = [jnp.asarray(arrays[k]) for k in ORDER]
    w, h = scene.width, scene.height
    capacity = capacity_for(*args[:4], *args[5:], width=w, height=h)
    key = jax.random.key(seed)
    weights = jax.random.normal(key, (scene.views, h, w, 3))
    background = jax.random.uniform(jax.random.fold_in(key, 1), (3,))
    results = {}
    for name in ("reference", backend):

        def loss(*params, backend=name):
            out = rasterize(
                *params, *args[5:], width=w, height=h, background=background, backend=backend, capacity=capacity
            )
            return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha) + jnp.sum(out.depth), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args[:5])
        results[name] = (out, grads)
    (ref, ref_g), (pal, pal_g) = results["reference"], results[backend]
    with jax.default_device(jax.devices("cpu")[0]):  # the shared projection/binning too, against another backend
        cpu = rasterize(
            *(jnp.asarray(arrays[k]) for k in ORDER),
            width=w,
            height=h,
            background=background,
            backend="reference",
            capacity=capacity,
        )
        cpu_rgb = np.asarray(cpu.rgb)
    row = dict(
        scene=scene.name,
        **(_compare_expansion(args, w, h, capacity, backend) if backend in ("cuda", "cpu") else {}),
        **_compare_vmap(args, w, h, capacity, backend),
        backend=backend,
        seed=seed,
        n_pairs=int(jnp.sum(ref.stats.n_pairs)),
        all_finite=bool(all(np.isfinite(np.asarray(x)).all() for x in (pal.rgb, pal.alpha, pal.depth))),
    )
    cpu_diff = np.abs(cpu_rgb - np.asarray(pal.rgb)).max(-1)
    row["frac_px_vs_cpu_over_1e-4"] = float((cpu_diff > 1e-4).mean())
    row["median_diff_vs_cpu"] = float(np.median(cpu_diff))
    for name in ("rgb", "alpha", "depth"):
        row[f"max_diff_{name}"] = float(jnp.max(jnp.abs(getattr(ref, name) - getattr(pal, name))))
    for name, a, b in zip(ORDER, ref_g, pal_g):
        row[f"grad_rel_{name}"] = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-30))
    return row


def _compare_vmap(args, width: int, height: int, capacity: int, backend: str) -> dict:
    """jax.vmap over two frames (as the prior renders a batch) against one call per frame: images and gradients."""
    frames = [args[0], args[0] + 0.002 * jnp.sin(jnp.arange(args[0].size, dtype=jnp.float32)).reshape(args[0].shape)]

    def loss(means):
        out = rasterize(means, *args[1:], width=width, height=height, backend=backend, capacity=capacity)
        return jnp.sum(out.rgb * out.rgb) + jnp.sum(out.depth), out.rgb

    (_, batched), g_batched = jax.vmap(jax.value_and_grad(loss, has_aux=True))(jnp.stack(frames))
    single = [jax.value_and_grad(loss, has_aux=True)(m) for m in frames]
    return dict(
        vmap_max_diff_rgb=max(float(jnp.max(jnp.abs(batched[i] - rgb))) for i, ((_, rgb), _) in enumerate(single)),
        vmap_grad_rel_means=max(
            float(jnp.linalg.norm(g_batched[i] - g) / jnp.maximum(jnp.linalg.norm(g), 1e-30))
            for i, (_, g) in enumerate(single)
        ),
    )


def _compare_expansion(args, width: int, height: int, capacity: int, expand: str) -> dict:
    """The CUDA pair expansion (or the C++ binning) against binning's jnp one: the fraction of sorted pair slots that
    differ (tile decisions at float rounding may flip a pair whose alpha is within 1% of 1/255 at the tile's best
    pixel)."""
    proj = project(*args[:4], *args[5:], width=width, height=height)
    bins = [binning.bin_pairs(proj, width, height, capacity, expand=how) for how in ("cummax", expand)]
    # Unused slots' ids are never read (the C++ binning leaves 0 there, the sorts the frontmost Gaussian).
    same_ids = ((bins[0].gaussian_ids == bins[1].gaussian_ids) | ~bins[0].valid) & (bins[0].valid == bins[1].valid)
    return dict(
        pair_slots_differ=float(1.0 - jnp.mean(same_ids)),
        n_pairs_equal=bool(jnp.all(bins[0].n_pairs == bins[1].n_pairs)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--backend", choices=["auto", "pallas", "pallas_tpu", "cuda", "cpu"], default="auto")
    args = parser.parse_args(argv)
    backend = _resolve_backend(args.backend)
    if backend == "reference":  # "auto" on a CPU without a C++ compiler: the Pallas kernels, interpreted
        backend = "pallas"
    scenes = [
        bench.Scene("head20k_200x136_x2", "head", 20_000, 200, 136, 2),
        bench.Scene("box50k_256x144", "box", 50_000, 256, 144),
    ]
    ok = True
    print(f"device: {jax.devices()[0].device_kind}")
    for scene in scenes:
        for _ in range(args.seeds):
            row = compare(scene, int.from_bytes(os.urandom(3), "little"), backend)
            good = (
                row["all_finite"]
                and row.get("pair_slots_differ", 0.0) <= 1e-4
                and row.get("n_pairs_equal", True)
                and row["vmap_max_diff_rgb"] <= 1e-6
                and row["vmap_grad_rel_means"] <= 1e-5
                and row["frac_px_vs_cpu_over_1e-4"] < 1e-3
                and row["max_diff_rgb"] <= 1e-5
                and row["max_diff_alpha"] <= 1e-5
                and all(v <= 1e-4 for k, v in row.items() if k.startswith("grad_rel"))
            )
            ok &= good
            print(
                ("PASS " if good else "FAIL ")
                + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
