"""The representation's ceiling: the avatar's texel Gaussians, fitted freely, against the generator's images; its
head PSNR is the benchmark's."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import ceiling, synth
from uhap_jax.eval import face_metrics
from uhap_jax.geometry import template as template_lib

# The C++ rasterizer, which `python -m data_pipelines.ceiling` uses on a CPU ("auto"); the jnp reference is slower.
BACKEND = "cpu"


def test_texel_gaussians_copy_their_own_renders_but_not_the_generators(rng):
    """Free texel Gaussians at the model's resolution fit an image that such Gaussians drew almost exactly, but
    stay well below that on the generator's image of the same mesh from the same cameras."""
    size, steps = 24, 40
    config = synth.synth_config("tiny")
    config.update(image_size=size, num_cameras=2, hair_strands=80, brow_strands=10, ear_points=40, neck_points=80)
    template = template_lib.procedural_head(24)
    model = synth.SurfaceSampler.build(template, 24)
    dense = synth.SurfaceSampler.build(template, 48)
    identity = synth.make_identity(template, 0, rng, dense, synth.counts(config), synth.voices.draw_voice(rng))
    vertices = identity.template.vertices
    cameras = synth.camera_rig(config, rng)
    views = np.stack([c.world_to_cam for c in cameras]).astype(np.float32)
    ks = np.stack([c.intrinsics for c in cameras]).astype(np.float32)

    own = ceiling.init_params(len(model.face_ids))
    own["colour"] = jnp.asarray(rng.uniform(0.1, 0.9, (len(model.face_ids), 3)), jnp.float32)
    own_images, _ = ceiling.render(own, model, jnp.asarray(vertices), views, ks, size, size, 60000, BACKEND)
    renderer = synth.Renderer(dense, images_per_batch=2, backend=BACKEND)
    generated, _ = renderer(vertices[None], np.eye(3, dtype=np.float32)[None], np.zeros(1, np.float32), cameras,
                            identity.look, np.ones((1, 2, 3), np.float32), (0,), (0.0, 0.0))  # fmt: skip
    scores = []
    for target in (np.asarray(own_images), generated[0].astype(np.float32) / 255.0):
        params, capacity = ceiling.fit_frame(model, vertices, target, views, ks, steps=steps, backend=BACKEND)
        fitted, _ = ceiling.render(params, model, jnp.asarray(vertices), views, ks, size, size, capacity, BACKEND)
        scores.append(float(np.mean(ceiling.psnr(np.asarray(fitted), target))))
    print(f"fitted PSNR: own renders {scores[0]:.1f} dB, generator {scores[1]:.1f} dB")
    assert scores[0] > 35.0
    assert scores[1] < scores[0] - 6.0


def test_ceiling_command_names_a_missing_dataset(tmp_path):
    with pytest.raises(SystemExit, match="no dataset.json"):
        ceiling.main(["--data", str(tmp_path / "nowhere")])


def test_head_psnr_is_the_benchmarks_masked_psnr(rng):
    """The ceiling's head PSNR scores what the demo's prior bar scores: `face_metrics.masked_psnr` over the mask
    above half, against the foreground on black."""
    pred = rng.uniform(-0.1, 1.1, (3, 20, 24, 3)).astype(np.float32)
    target = rng.uniform(0, 1, (3, 20, 24, 3)).astype(np.float32)
    masks = rng.integers(0, 256, (3, 20, 24)).astype(np.uint8)
    want = face_metrics.masked_psnr(np.clip(pred, 0, 1), target * masks[..., None] / 255.0, masks > 127)
    np.testing.assert_allclose(ceiling.head_psnr(pred, target, masks), want, rtol=1e-5)
    assert not np.allclose(ceiling.head_psnr(pred, target, masks), ceiling.psnr(pred, target), atol=0.1)
