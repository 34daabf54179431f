"""The reference rasterizer against an independent float64 all-pairs oracle, finite differences, and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.raster_oracle import hard_scene, oracle_render, random_scene
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from kernels import binning
from kernels.projection import project
from kernels.rasterize import CapacityOverflowError

ORDER = ("means", "quats", "scales", "opacities", "colors", "world_to_cam", "intrinsics")


def _args(scene, dtype):
    return [jnp.asarray(scene[k], dtype) for k in ORDER]


@pytest.mark.parametrize(
    "width,height,num_cams,per_camera,mode",
    [(37, 29, 2, False, "classic"), (48, 32, 3, True, "classic"), (33, 50, 2, False, "antialiased")],
)
def test_matches_float64_oracle(rng, width, height, num_cams, per_camera, mode):
    scene = hard_scene(
        rng, 90, num_cams, width, height, per_camera_colors=per_camera, antialiased=mode == "antialiased"
    )
    background = rng.uniform(0, 1, 3)
    with jax.enable_x64(True):
        out = kernels.rasterize(
            *_args(scene, jnp.float64),
            width=width,
            height=height,
            background=jnp.asarray(background),
            backend="reference",
            mode=mode,
        )
        rgb, alpha, depth = (np.asarray(x) for x in (out.rgb, out.alpha, out.depth))
    ref_rgb, ref_alpha, ref_depth = oracle_render(
        *(scene[k] for k in ORDER), width, height, background, antialiased=mode == "antialiased"
    )
    assert rgb.shape == (num_cams, height, width, 3) and rgb.dtype == np.float64
    assert np.all(np.isfinite(rgb))
    # The scene is hard enough to exercise every rule (hard_scene redrew until it was): some pixels saturate, many
    # are touched, some are empty.
    assert ref_alpha.max() > 0.999 and (ref_alpha > 0.05).mean() > 0.1 and (ref_alpha < 0.02).any()
    np.testing.assert_allclose(rgb, ref_rgb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(alpha, ref_alpha, atol=1e-5, rtol=0)
    np.testing.assert_allclose(depth, ref_depth, atol=1e-5 * max(1.0, ref_depth.max()), rtol=0)


def test_float32_close_to_oracle(rng):
    scene = random_scene(rng, 120, 2, 40, 24)
    out = kernels.rasterize(*_args(scene, jnp.float32), width=40, height=24, backend="reference")
    ref_rgb, ref_alpha, _ = oracle_render(*(scene[k] for k in ORDER), 40, 24)
    # float32 can flip a threshold decision on a few pixels; the bulk must agree to float rounding.
    err = np.abs(np.asarray(out.rgb) - ref_rgb).max(axis=-1)
    assert np.mean(err < 1e-4) > 0.99
    assert np.median(np.abs(np.asarray(out.alpha) - ref_alpha)) < 1e-6


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_gradients_match_finite_differences(rng, mode):
    width, height = 24, 20
    scene = random_scene(rng, 30, 2, width, height, per_camera_colors=True)
    background = rng.uniform(0, 1, 3)
    with jax.enable_x64(True):
        args = _args(scene, jnp.float64)
        capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height, mode=mode)
        w_rgb = jnp.asarray(rng.normal(size=(2, height, width, 3)))
        w_alpha = jnp.asarray(rng.normal(size=(2, height, width)))
        w_depth = jnp.asarray(rng.normal(size=(2, height, width)))

        def loss(means, quats, scales, opacities, colors):
            out = kernels.rasterize(
                means,
                quats,
                scales,
                opacities,
                colors,
                *args[5:],
                width=width,
                height=height,
                background=jnp.asarray(background),
                backend="reference",
                mode=mode,
                capacity=capacity,
            )
            return jnp.sum(out.rgb * w_rgb) + jnp.sum(out.alpha * w_alpha) + 0.3 * jnp.sum(out.depth * w_depth)

        loss = jax.jit(loss)
        grads = jax.grad(loss, argnums=range(5))(*args[:5])

        def central_difference(i, direction, eps):
            plus = [a + eps * direction if j == i else a for j, a in enumerate(args[:5])]
            minus = [a - eps * direction if j == i else a for j, a in enumerate(args[:5])]
            return float((loss(*plus) - loss(*minus)) / (2 * eps))

        def crosses(i, direction):
            fd = central_difference(i, direction, 1e-7)
            return abs(fd - central_difference(i, direction, 2.5e-8)) > 1e-6 * max(1.0, abs(fd)), fd

        # The image is only piecewise smooth (alpha >= 1/255, T <= 1e-4, the tile boxes, the antialiased opacity
        # cull): a direction whose step crosses one of those thresholds has no derivative to compare. Two step sizes
        # that disagree reveal such a crossing. A coordinate that sits on a threshold spoils every dense direction,
        # so on a crossing each coordinate is probed alone and those on a threshold are left out of later
        # directions; the Gaussians they belong to must be few, and every attribute must still be checked twice.
        for i, name in enumerate(ORDER[:5]):
            free = np.ones(args[i].shape, bool)
            checked = 0
            for _ in range(8):
                direction = rng.normal(size=args[i].shape) * free
                crossed, fd = crosses(i, direction)
                if crossed:
                    if free.all():
                        for j in np.ndindex(free.shape):
                            unit = np.zeros(free.shape)
                            unit[j] = 1.0
                            free[j] = not crosses(i, unit)[0]
                        # A threshold is a Gaussian's (its footprint meets a pixel's cutoff): count Gaussians.
                        on = (~free).reshape(len(free), -1).any(1)
                        assert on.sum() <= max(2, len(free) // 5), f"{name}: {on.sum()} Gaussians on a threshold"
                    continue
                analytic = float(jnp.sum(grads[i] * direction))
                assert abs(analytic - fd) <= 1e-5 * max(1.0, abs(fd)), (name, analytic, fd)
                checked += 1
                if checked == 2:
                    break
            assert checked == 2, f"{name}: every direction crossed a threshold"
        assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)


def test_background_gradient(rng):
    scene = random_scene(rng, 40, 1, 20, 20)
    args = _args(scene, jnp.float32)
    cap = kernels.capacity_for(*args[:4], *args[5:], width=20, height=20)

    def loss(bg):
        out = kernels.rasterize(*args, width=20, height=20, background=bg, backend="reference", capacity=cap)
        return jnp.sum(out.rgb)

    bg = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    trans = 1 - kernels.rasterize(*args, width=20, height=20, backend="reference").alpha
    np.testing.assert_allclose(jax.grad(loss)(bg), np.full(3, float(jnp.sum(trans))), rtol=1e-5)


def test_jit_and_sharded_cameras_agree(rng):
    assert jax.device_count() == 8
    width, height = 40, 36
    scene = random_scene(rng, 80, 8, width, height, per_camera_colors=True)
    args = _args(scene, jnp.float32)
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    single = kernels.rasterize(*args, width=width, height=height, backend="reference")

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    by_camera = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    placed = [
        jax.device_put(a, by_camera if name in ("colors", "world_to_cam", "intrinsics") else replicated)
        for a, name in zip(args, ORDER)
    ]

    @jax.jit
    def render(*a):
        return kernels.rasterize(*a, width=width, height=height, backend="reference", capacity=capacity)

    with jax.set_mesh(mesh):
        sharded = render(*placed)
    assert sharded.rgb.sharding.spec[0] == "data" or len(sharded.rgb.sharding.device_set) == 8
    # Same result to float32 rounding (the partitioned program may sum in another order).
    np.testing.assert_allclose(np.asarray(sharded.rgb), np.asarray(single.rgb), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded.alpha), np.asarray(single.alpha), atol=1e-5)


def test_overflow_is_never_silent(rng):
    size = 96
    scene = random_scene(rng, 600, 2, size, size)
    scene["scales"] = scene["scales"] * 3
    args = _args(scene, jnp.float32)
    needed = int(jnp.max(kernels.rasterize(*args, width=size, height=size).stats.n_pairs))
    assert needed > 1100
    with pytest.raises(CapacityOverflowError, match=f"needs {needed} "):
        kernels.rasterize(*args, width=size, height=size, capacity=needed - 1)

    adaptive = kernels.AdaptiveCapacity(initial=1024)
    render = jax.jit(
        lambda *a, capacity: kernels.rasterize(*a, width=size, height=size, capacity=capacity),
        static_argnames="capacity",
    )
    traced = render(*args, capacity=adaptive.value)
    assert bool(traced.stats.overflow) and np.isnan(np.asarray(traced.rgb)).all()
    assert adaptive.update(traced.stats) and adaptive.value >= needed
    again = render(*args, capacity=adaptive.value)
    assert not bool(again.stats.overflow) and np.isfinite(np.asarray(again.rgb)).all()
    assert not adaptive.update(again.stats)


def test_capacity_under_jit_requires_int(rng):
    args = _args(random_scene(rng, 20, 1, 16, 16), jnp.float32)
    with pytest.raises(ValueError, match="static int"):
        jax.jit(lambda *a: kernels.rasterize(*a, width=16, height=16).rgb)(*args)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("means", np.nan, "means must be finite"),
        ("scales", 0.0, "scales must be finite and > 0"),
        ("scales", -1.0, "scales must be finite and > 0"),
        ("opacities", 1.5, "opacities must be in"),
        ("quats", np.inf, "quats must be finite"),
    ],
)
def test_bad_values_raise(rng, field, value, message):
    scene = random_scene(rng, 20, 1, 16, 16)
    scene[field] = np.array(scene[field])
    scene[field][3] = value
    with pytest.raises(ValueError, match=message):
        kernels.rasterize(*_args(scene, jnp.float32), width=16, height=16)


def test_bad_shapes_raise(rng):
    args = _args(random_scene(rng, 20, 2, 16, 16), jnp.float32)
    for i, bad in [(1, args[1][:, :3]), (2, args[2][:5]), (4, args[4][:, :2]), (6, args[6][:1])]:
        broken = list(args)
        broken[i] = bad
        with pytest.raises(ValueError, match=ORDER[i]):
            kernels.rasterize(*broken, width=16, height=16)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.rasterize(*args, width=16, height=16, backend="vulkan")
    with pytest.raises(ValueError, match="backend='cuda' needs an NVIDIA GPU"):  # this CPU machine
        kernels.rasterize(*args, width=16, height=16, backend="cuda")


def test_two_key_sort_matches_packed_key(rng, monkeypatch):
    scene = random_scene(rng, 60, 2, 40, 40)
    args = _args(scene, jnp.float32)
    packed = kernels.rasterize(*args, width=40, height=40, backend="reference")
    monkeypatch.setattr(binning, "packed_key_fits", lambda n_tiles, n: False)  # forces the stable pairs sort
    jax.clear_caches()
    two_key = kernels.rasterize(*args, width=40, height=40, backend="reference")
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(packed.rgb), np.asarray(two_key.rgb))
    assert not binning.packed_key_fits(120 * 68, 1 << 20)  # 1M Gaussians at 1080p needs 33 bits


def test_bucket_capacity_is_monotone_and_sufficient():
    caps = [binning.bucket_capacity(n) for n in range(1, 200_000, 997)]
    assert all(c >= n for c, n in zip(caps, range(1, 200_000, 997)))
    assert caps == sorted(caps) and len(set(caps)) < 40 and all(c % 1024 == 0 for c in caps)


def test_flat_sort_matches_per_camera_sort(rng, monkeypatch):
    """One flattened sort over all cameras (camera id in the key) bins exactly as one sort per camera."""
    width, height = 44, 36
    scene = random_scene(rng, 70, 3, width, height, per_camera_colors=True)
    args = _args(scene, jnp.float32)
    proj = project(*args[:4], *args[5:], width=width, height=height)
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    results = {}
    for flat in ("0", "1"):
        monkeypatch.setattr(binning, "FLAT_SORT", flat)
        jax.clear_caches()
        bins = binning.bin_pairs(proj, width, height, capacity, align=4)
        out = kernels.rasterize(*args, width=width, height=height, backend="reference", capacity=capacity)
        results[flat] = (bins, out)
    jax.clear_caches()
    for a, b in zip(results["0"][0], results["1"][0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(results["0"][1].rgb), np.asarray(results["1"][1].rgb))
    # The key-value fallback (camera, tile, rank need more than 32 bits for large scenes) agrees too.
    n_tiles = binning.tile_grid(width, height)[0] * binning.tile_grid(width, height)[1]
    rects = binning.tile_rectangles(proj, width, height)
    order = binning.rank_by_depth(proj.depths, rects[-1], flat=True)
    np.testing.assert_array_equal(np.asarray(order), np.asarray(binning.rank_by_depth(proj.depths, rects[-1])))
    tile, rank, used, _ = jax.vmap(
        lambda o, *r: binning.expand_pairs(o, *r, capacity=capacity, tiles_x=binning.tile_grid(width, height)[0])
    )(order, *rects)
    packed = binning.sort_pairs_flat(tile, rank, used, order, n_tiles=n_tiles)
    keyval = binning.sort_pairs_flat(tile, rank, used, order, n_tiles=n_tiles, key_bits=8)
    for a, b in zip(packed, keyval):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropped_pairs_touch_no_pixel(rng):
    """Pairs that binning drops (the ellipse misses the tile) have alpha < 1/255 at every pixel centre of the tile."""
    width, height = 64, 48
    scene = random_scene(rng, 200, 2, width, height)
    args = _args(scene, jnp.float32)
    proj = project(*args[:4], *args[5:], width=width, height=height)
    capacity = kernels.capacity_for(*args[:4], *args[5:], width=width, height=height)
    tiles_x = binning.tile_grid(width, height)[0]
    rects = binning.tile_rectangles(proj, width, height)
    order = binning.rank_by_depth(proj.depths, rects[-1])
    footprint = jnp.concatenate([proj.means2d, proj.conics, proj.opacities[..., None]], axis=-1)

    def expand(o, *r):
        return binning.expand_pairs(o, *r, capacity=capacity, tiles_x=tiles_x)

    tile, rank, every, _ = jax.vmap(expand)(order, *rects)
    kept = jax.vmap(expand)(order, *rects, footprint)[2]
    dropped = np.argwhere(np.asarray(every & ~kept))
    assert 0 < len(dropped) < int(jnp.sum(every)) // 2
    means2d, conics, opacities = (np.asarray(x, np.float64) for x in (proj.means2d, proj.conics, proj.opacities))
    pix = np.arange(256)
    for cam, slot in dropped:
        gid = int(order[cam, rank[cam, slot]])
        t = int(tile[cam, slot])
        dx = (t % tiles_x) * 16 + pix % 16 + 0.5 - means2d[cam, gid, 0]
        dy = (t // tiles_x) * 16 + pix // 16 + 0.5 - means2d[cam, gid, 1]
        a, b, c = conics[cam, gid]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        assert (opacities[cam, gid] * np.exp(-sigma)).max() < 1 / 255
