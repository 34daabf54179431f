"""The synthetic generator writes a complete, valid capture layout whose images follow the speech."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from configs import prior as prior_config
from data_pipelines import layout, synth
from uhap_jax.commands import data as data_command
from uhap_jax.config_utils import UsageError
from uhap_jax.geometry import template as template_lib
from uhap_jax.geometry.texels import TexelLayout, scan_uv_maps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two identities (one held out), two sentences each plus a monocular clip, four cameras at 64^2."""
    root = tmp_path_factory.mktemp("synth") / "data"
    config = synth.synth_config("tiny")
    # A fixed seed: the lip-sync test below is statistical (a correlation threshold), so it must not flake.
    config.update(
        seed=0, num_identities=2, num_held_out_identities=1, sentences_per_identity=2, max_seconds=1.6,
        num_cameras=4, held_out_cameras=(1,), images_per_batch=8,
    )  # fmt: skip
    synth._render_images.clear_cache()
    info = synth.generate(root, config, progress=False)
    return root, config, info, synth._render_images._cache_size()


def test_all_sequences_share_one_render_program(dataset):
    """Rig and monocular sequences of any length run one compiled renderer (recompiles made synth slow)."""
    *_, render_programs = dataset
    assert render_programs == 1


def test_clip_lengths_share_compilations(rng):
    """The per-clip helpers compile once for every clip length (compiled op by op per length, they made synth
    slow), and the noise keys are `jax.random.split`'s for any count."""
    compiles = []

    def listen(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for num_frames in (40, 37, 50):
            rotation_vectors = rng.normal(0.0, 0.05, (num_frames, 3)).astype(np.float32)
            turned = synth.head_turn(rotation_vectors, 30.0)
            keys = synth._noise_keys(7, num_frames * 8)
            if num_frames == 40:
                compiles.clear()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    expected = jax.random.key_data(jax.random.split(jax.random.key(7), num_frames * 8))
    np.testing.assert_array_equal(keys, expected)
    assert turned.shape == (50, 3) and np.abs(np.rad2deg(turned[:, 1])).max() > 25.0


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _reference_image(vertices, rotation, jaw, view, intrinsics, look_arrays, sampler_arrays, size, capacity, res):
    """One image as `Renderer` draws it, before the camera response: rgb, alpha and the pairs it needs."""
    sampler = synth.SurfaceSampler(*sampler_arrays, res)
    scene = synth._scene(sampler, synth.shading.Look(*look_arrays), vertices, rotation, jaw, view)
    out = kernels.rasterize(*scene, view[None], intrinsics[None], width=size, height=size, capacity=capacity,
                            backend="pallas")  # fmt: skip
    return out.rgb[0], out.alpha[0], out.stats.n_pairs[0]


def _small_scene(rng, size=32, num_frames=3):
    config = synth.synth_config("tiny")
    config.update(image_size=size, num_cameras=2, hair_strands=60, brow_strands=10, ear_points=30, neck_points=60)
    cameras = synth.camera_rig(config, rng)
    template = template_lib.procedural_head(24)
    sampler = synth.SurfaceSampler.build(template, 32)
    voice = synth.voices.draw_voice(rng)
    identity = synth.make_identity(template, 0, rng, sampler, synth.counts(config), voice)
    vertices = identity.template.vertices + rng.normal(0.0, 1e-3, (num_frames, len(template.vertices), 3))
    return cameras, template, sampler, identity, vertices.astype(np.float32)


def test_renderer_batches_images_and_grows_capacity(rng):
    """(frame, camera) images batched across frames, with a padded last batch, equal one rasterize call each
    through the camera response (gain, then noise of the given seed); a pair capacity too small for the scene
    grows and renders again instead of truncating."""
    size, num_frames = 32, 3
    cameras, _, sampler, identity, vertices = _small_scene(rng, size, num_frames)
    rotation = np.asarray(synth.rotations.axis_angle_to_matrix(jnp.asarray(rng.normal(0, 0.05, (num_frames, 3)),
                                                                            jnp.float32)))  # fmt: skip
    jaw = rng.uniform(0, 1, num_frames).astype(np.float32)
    gains = rng.uniform(0.8, 1.2, (num_frames, 2, 3)).astype(np.float32)
    look_arrays = synth._look_arrays(identity.look)
    arrays = (sampler.faces, sampler.uvs, sampler.face_ids, sampler.barys, sampler.outward)
    expected_rgb, most_pairs = [], 0
    for frame in range(num_frames):
        for c, camera in enumerate(cameras):
            view = jnp.asarray(camera.world_to_cam, jnp.float32)
            intrinsics = jnp.asarray(camera.intrinsics, jnp.float32)
            rgb, _, pairs = _reference_image(vertices[frame], rotation[frame], jaw[frame], view, intrinsics,
                                             look_arrays, arrays, size, 60000, sampler.resolution)  # fmt: skip
            expected_rgb.append(np.asarray(rgb) * gains[frame, c])
            most_pairs = max(most_pairs, int(pairs))
    renderer = synth.Renderer(sampler, images_per_batch=4, backend="pallas")
    renderer.capacity = most_pairs // 2 + 1  # the busiest image overflows once
    rgb, alpha = renderer(vertices, rotation, jaw, cameras, identity.look, gains, (1,), (0.0, 0.0))
    assert renderer.capacity >= most_pairs
    assert rgb.shape == (num_frames, 2, size, size, 3) and alpha.shape == (num_frames, 2, size, size)
    expected = np.round(np.clip(np.stack(expected_rgb), 0, 1) * 255)
    assert np.abs(rgb.reshape(-1, size, size, 3).astype(float) - expected).max() <= 1.0
    assert 0.05 < np.mean(alpha > 128) < 0.9
    # Sensor noise: another seed gives another image, of the same mean.
    noisy_a, _ = renderer(vertices, rotation, jaw, cameras, identity.look, gains, (1,), (0.02, 0.02))
    noisy_b, _ = renderer(vertices, rotation, jaw, cameras, identity.look, gains, (2,), (0.02, 0.02))
    assert np.mean(noisy_a != noisy_b) > 0.3
    assert abs(noisy_a.astype(float).mean() - noisy_b.astype(float).mean()) < 1.0


def test_layout_is_complete_and_valid(dataset):
    root, config, info, _ = dataset
    on_disk = layout.read_dataset_info(root)
    assert on_disk == json.loads(json.dumps(info))
    assert on_disk["identities"] == {"train": ["id000"], "held_out": ["id001"]}
    assert on_disk["held_out_cameras"] == [on_disk["cameras"][1]]
    assert set(on_disk["held_out_sentences"]) == {len(synth.SENTENCES) - 2, len(synth.SENTENCES) - 1}
    assert on_disk["monocular_sequences"] == ["id000/mono_00", "id001/mono_00"]
    # No held-out voice is heard in training, and the held-out sentences are spoken by the held-out voice.
    train_variants = {name.partition("+")[2] for name in on_disk["voices"]["train"]}
    assert not train_variants & {name.partition("+")[2] for name in on_disk["voices"]["held_out"]}
    entries = [entry for sequences in on_disk["sequences"].values() for entry in sequences.values()]
    held_out_sentences = [entry for entry in entries if entry["split"] == "held_out_sentence"]
    assert held_out_sentences and all(e["voice"] == on_disk["voices"]["held_out_sentence_voice"]
                                      for e in held_out_sentences)  # fmt: skip
    template = template_lib.procedural_head(config.template_resolution)
    assert layout.list_subjects(root) == ["id000", "id001"]
    for subject in layout.list_subjects(root):
        subject_dir = layout.subject_dir(root, subject)
        cams = layout.read_calibration(subject_dir)
        assert len(cams) == config.num_cameras + 1 and synth.MONO_SERIAL in cams
        scan_vertices, scan_faces, scan_colours = layout.read_neutral_scan(subject_dir)
        assert scan_vertices.shape == template.vertices.shape and scan_faces.shape == template.faces.shape
        assert scan_colours.std() > 0.05
        raw_vertices, raw_faces, _ = layout.read_raw_scan(subject_dir)
        assert len(raw_vertices) != len(scan_vertices) and raw_faces.max() < len(raw_vertices)
        for seq in layout.list_sequences(subject_dir):
            seq_dir = subject_dir / "sequences" / seq
            meta = layout.read_sequence_meta(seq_dir)
            frames = meta["num_frames"]
            audio, notes = layout.read_audio(seq_dir / layout.AUDIO_FILE)
            assert notes == [] and abs(len(audio) / 16000 - frames / meta["fps"]) <= 1 / meta["fps"]
            vertices = layout.read_vertices(seq_dir, num_frames=frames)
            assert vertices.shape[1:] == template.vertices.shape
            expressions = np.load(seq_dir / "expressions.npy")
            assert expressions.shape == (frames, len(meta["expression_names"]))
            assert len(meta["head_pose"]["rotation_vector"]) == frames
            assert meta["cameras"] == ([synth.MONO_SERIAL] if meta["monocular"] else on_disk["cameras"])
            for serial in meta["cameras"]:
                images = layout.frame_paths(seq_dir, serial)
                masks = layout.frame_paths(seq_dir, serial, kind="masks")
                assert len(images) == len(masks) == frames
                assert layout.read_image(images[-1]).shape == (cams[serial].height, cams[serial].width, 3)
                assert layout.read_image(masks[0]).shape == (cams[serial].height, cams[serial].width)


def test_monocular_sequence_turns_the_head(dataset):
    """The phone-style clip sweeps the head's yaw left and right by about `monocular_turn_deg`; rig sequences
    keep the small motion."""
    root, config, _, _ = dataset
    for subject in layout.list_subjects(root):
        for seq in layout.list_sequences(layout.subject_dir(root, subject)):
            meta = layout.read_sequence_meta(layout.sequence_dir(root, subject, seq))
            rotation = np.rad2deg(np.asarray(meta["head_pose"]["rotation_vector"]))
            if meta["monocular"]:
                assert rotation[:, 1].max() > 0.8 * config.monocular_turn_deg
                assert rotation[:, 1].min() < -0.8 * config.monocular_turn_deg
                assert np.abs(rotation).max() < config.monocular_turn_deg + 6.0
            else:
                assert np.linalg.norm(rotation, axis=1).max() < 6.0


def _frontal_serial(root, subject):
    cams = layout.read_calibration(layout.subject_dir(root, subject))
    rig = [c for s, c in cams.items() if s != synth.MONO_SERIAL]
    return max(rig, key=lambda c: c.world_to_cam[2, 2]).serial, cams  # optical axis closest to +z


def _multiview_sequence(root, subject):
    sequences = layout.list_sequences(layout.subject_dir(root, subject))
    return layout.sequence_dir(root, subject, next(s for s in sequences if s.startswith("sen_")))


def test_alpha_covers_the_head(dataset):
    root, config, *_ = dataset
    template = template_lib.procedural_head(config.template_resolution)
    serial, cams = _frontal_serial(root, "id000")
    seq_dir = _multiview_sequence(root, "id000")
    vertices = layout.read_vertices(seq_dir)
    camera = cams[serial]
    front_skin = template.region_mask("face") & (template.vertices[:, 2] < -0.03)
    for frame in (0, len(vertices) - 1):
        mask = layout.read_image(layout.frame_path(seq_dir, serial, frame, kind="masks"))
        cam_points = vertices[frame, front_skin] @ camera.world_to_cam[:3, :3].T + camera.world_to_cam[:3, 3]
        pixels = cam_points @ camera.intrinsics.T
        cols, rows = (pixels[:, :2] / pixels[:, 2:]).astype(int).T
        assert np.mean(mask[rows, cols] > 200) > 0.97
        assert 0.1 < np.mean(mask > 128) < 0.7
        assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0


def _lagged_correlation(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """corr(a[t + lag], b[t])."""
    if lag < 0:
        return _lagged_correlation(b, a, -lag)
    return float(np.corrcoef(a[lag:], b[: len(b) - lag])[0, 1])


def test_mouth_pixels_follow_audio_energy(dataset):
    """Mouth-window change from the closed mouth tracks the jaw, and (within a frame) the audio energy, in the
    frontal camera of the multi-view clips (the monocular clips' head turns move the mouth window as well)."""
    root, config, *_ = dataset
    template = template_lib.procedural_head(config.template_resolution)
    lip_ids = [template.landmarks["upper_lip_mid"], template.landmarks["lower_lip_mid"]]
    changes, energies = [], []
    clips = [(subject, seq) for subject in ("id000", "id001")
             for seq in layout.list_sequences(layout.subject_dir(root, subject)) if seq.startswith("sen_")]  # fmt: skip
    assert len(clips) == 4
    for subject, seq in clips:
        serial, cams = _frontal_serial(root, subject)
        camera = cams[serial]
        seq_dir = layout.sequence_dir(root, subject, seq)
        meta = layout.read_sequence_meta(seq_dir)
        vertices = layout.read_vertices(seq_dir)
        jaw = np.load(seq_dir / "expressions.npy")[:, meta["expression_names"].index("jaw_open")]
        audio, _ = layout.read_audio(seq_dir / layout.AUDIO_FILE)
        samples_per_frame = int(16000 / meta["fps"])
        windows, energy = [], []
        for frame in range(meta["num_frames"]):
            centre = vertices[frame, lip_ids].mean(0) @ camera.world_to_cam[:3, :3].T + camera.world_to_cam[:3, 3]
            col, row = ((camera.intrinsics @ centre)[:2] / centre[2]).astype(int)
            image = layout.read_image(layout.frame_path(seq_dir, serial, frame)).astype(float)
            windows.append(image[row - 3 : row + 4, col - 4 : col + 4])
            chunk = audio[frame * samples_per_frame : (frame + 1) * samples_per_frame]
            energy.append(np.sqrt(np.mean(chunk**2)) if chunk.size else 0.0)
        windows = np.stack(windows)
        closed = np.median(windows[np.argsort(jaw)[:3]], axis=0)
        change = np.abs(windows - closed).mean(axis=(1, 2, 3))
        print(f"{subject}/{seq}: mouth change vs jaw {np.corrcoef(change, jaw)[0, 1]:.2f}")
        assert np.corrcoef(change, jaw)[0, 1] > 0.4, f"{subject}/{seq}: the mouth pixels do not follow the jaw"
        changes.append(change - change.mean())
        energies.append(np.asarray(energy) - np.mean(energy))
    change, energy = np.concatenate(changes), np.concatenate(energies)
    best = max(_lagged_correlation(change, energy, lag) for lag in (-1, 0, 1))
    # Speech energy and jaw opening agree only loosely frame by frame (loud fricatives, quiet open vowels), and
    # the recorded audio adds a room's reverberation and background noise: compare with the same clips paired
    # out of sync (energy shifted by 8 or more frames), which is what "unrelated" measures here.
    null = [_lagged_correlation(change, np.roll(energy, shift), 0) for shift in range(8, len(energy) - 8, 3)]
    print(f"mouth change vs audio energy: best within one frame {best:.2f}, out of sync 95th percentile "
          f"{np.percentile(null, 95):.2f}")  # fmt: skip
    assert best > 0.15 and best > np.percentile(null, 95)


def test_cli_rejects_bad_override(tmp_path):
    parser = __import__("uhap_jax.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "x")])
    args.config_overrides = ["--config.no_such_field=3"]
    with pytest.raises(UsageError, match="no_such_field"):
        data_command.run_synth(args)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_generator_surface_is_four_times_denser_than_the_model(preset):
    """The generator's surface samples outnumber the prior's texel Gaussians at least 4x in every preset: on the
    template's surface, and on the neck (the template's neck is the model's; the capture draws its own)."""
    config = synth.synth_config(preset)
    model = prior_config.get_config(preset).model
    assert (config.model_uv_resolution, config.template_resolution) == (model.uv_resolution, model.template_resolution)
    template = template_lib.procedural_head(config.template_resolution)
    face_ids = template_lib.uv_sample(template, config.model_uv_resolution)[0]
    on_neck = template.region_mask("neck")[template.faces[face_ids, 0]]
    generator = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    assert not template.region_mask("neck")[template.faces[generator.face_ids, 0]].any()
    assert len(generator.face_ids) >= 4 * int((~on_neck).sum())
    assert config.neck_points >= 4 * int(on_neck.sum()) > 0


def test_identity_look_has_what_the_template_texels_cannot_hold(rng):
    """Albedo varies within the model's texels; the skin is displaced off the mesh; hair, ears and neck lie
    off the template surface; every count is the preset's, whatever the identity."""
    config = synth.synth_config("tiny")
    template = template_lib.procedural_head(config.template_resolution)
    sampler = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    looks = [synth.make_identity(template, i, np.random.default_rng(rng.integers(2**31)), sampler,
                                 synth.counts(config), synth.voices.draw_voice(rng)) for i in range(2)]  # fmt: skip
    assert len({len(identity.look.anchor) for identity in looks}) == 1
    identity = looks[0]
    look = identity.look
    # Albedo detail finer than a model texel: group the generator's samples by the model texel they fall in.
    fine_faces, _, fine_yx = template_lib.uv_sample(template, config.gaussian_uv_resolution)
    fine_yx = fine_yx[~template.region_mask("neck")[template.faces[fine_faces, 0]]]  # the sampler leaves it out
    coarse = (fine_yx * config.model_uv_resolution) // config.gaussian_uv_resolution
    texel = coarse[:, 0] * config.model_uv_resolution + coarse[:, 1]
    region = np.asarray(template.region_names)[template.region_ids[template.faces[sampler.face_ids, 0]]]
    skin = region == "face"
    means = np.zeros((texel.max() + 1, 3))
    np.add.at(means, texel[skin], look.albedo[skin])
    counts = np.bincount(texel[skin], minlength=len(means))[:, None]
    residual = look.albedo[skin] - (means / np.maximum(counts, 1))[texel[skin]]
    assert residual.std() > 0.01, "no albedo detail below the model's texel size"
    assert np.abs(look.displacement[skin]).max() > 5e-5 and np.all(look.displacement[region == "teeth"] == 0)
    # Extra primitives off the surface: hair reaches out, the neck hangs below the chin, ears stand at the sides.
    rest = identity.template.vertices[look.anchor] + look.offset
    surface = template_lib.surface_points(identity.template.vertices, template.faces, sampler.face_ids,
                                          sampler.barys)  # fmt: skip
    distance, _ = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree(np.asarray(surface)).query(rest)
    strands = look.strand > 0.5
    assert np.mean(distance[strands] > 0.005) > 0.3
    assert np.sum(rest[:, 1] < -0.15) >= config.neck_points // 4
    ears = (np.abs(rest[:, 0]) > 0.075) & (np.abs(rest[:, 1]) < 0.02) & (look.strand < 0.5)
    assert np.sum(ears) > config.ear_points // 2


def test_shading_follows_the_world_lights_and_the_view(rng):
    """Lights stay in the world: turning a surface patch changes its diffuse colour, and specular highlights move
    with the viewer; the oral cavity darkens with depth and lightens as the mouth opens."""
    count = 64
    normals = rng.normal(size=(count, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    means = rng.normal(0, 0.05, (count, 3)).astype(np.float32)
    albedo = rng.uniform(0.2, 0.8, (count, 3)).astype(np.float32)
    args = (jnp.zeros(count), jnp.full(count, 0.5), jnp.full(count, 40.0), jnp.ones(count))
    shade = functools.partial(synth.shading.shade, albedo)
    eye = np.array([0.0, 0.0, -0.9], np.float32)
    base = np.asarray(shade(normals, normals, *args, means, eye))
    turned = synth.rotations.axis_angle_to_matrix(jnp.asarray([0.0, 0.6, 0.0]))
    rotated = np.asarray(shade(normals @ np.asarray(turned).T, normals, *args, means, eye))
    assert np.abs(base - rotated).mean() > 0.02
    other_view = np.asarray(shade(normals, normals, *args, means, np.array([0.6, 0.0, -0.6], np.float32)))
    diffuse_only = functools.partial(shade, normals, normals, args[0], jnp.zeros(count), *args[2:], means)
    assert np.abs(base - other_view).max() > 0.05
    # Without specular, flipping to the other side of a two-sided surface changes nothing.
    np.testing.assert_allclose(np.asarray(diffuse_only(eye)),
                               np.asarray(shade(-normals, normals, args[0], jnp.zeros(count), *args[2:], means, eye)),
                               atol=1e-6)  # fmt: skip
    depth = jnp.asarray(np.sort(rng.uniform(0.0, 0.03, 16)))
    closed, opened = synth.shading.cavity_light(depth, 0.0), synth.shading.cavity_light(depth, 1.0)
    assert np.all(np.diff(np.asarray(closed)) <= 0) and np.all(np.asarray(opened) >= np.asarray(closed))
    assert float(synth.shading.cavity_light(jnp.asarray([-1.0]), 0.3)[0]) == 1.0


def test_camera_response_gain_and_noise(rng):
    """The sensor multiplies by the camera's gain and adds zero-mean noise of sqrt(read^2 + shot^2 x) spread."""
    level = float(rng.uniform(0.2, 0.6))
    image = jnp.full((128, 128, 3), level)
    gain = jnp.asarray(rng.uniform(0.8, 1.2, 3), jnp.float32)
    out = np.asarray(synth.shading.camera_response(image, gain, jax.random.key(int(rng.integers(1000))), 0.01, 0.03))
    expected = level * np.asarray(gain)
    np.testing.assert_allclose(out.mean((0, 1)), expected, atol=3e-3)
    np.testing.assert_allclose(out.std((0, 1)), np.sqrt(0.01**2 + 0.03**2 * expected), rtol=0.05)


def test_neutral_scan_is_a_noisy_holey_resampled_capture(rng):
    """The raw scan is not the template's vertices (resampled, ~0.5 mm noise, holes in hair, under the chin,
    around the ears, no mouth inside); its registration is in the template's topology, close to the true
    surface but not the generator's mesh, and the prior's scan maps take it."""
    config = synth.synth_config("tiny")
    template = template_lib.procedural_head(config.template_resolution)
    sampler = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    identity = synth.make_identity(template, 0, np.random.default_rng(rng.integers(2**31)), sampler,
                                   synth.counts(config), synth.voices.draw_voice(rng))  # fmt: skip
    raw = synth.scan_identity(template, identity, sampler, config.scan_resolution, rng)
    truth = identity.template.vertices
    kd_tree = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree
    to_vertices, _ = kd_tree(truth).query(raw.vertices)
    assert len(raw.vertices) != len(truth) and np.mean(to_vertices < 1e-5) < 0.01
    dense = np.asarray(template_lib.surface_points(truth, template.faces, *template_lib.uv_sample(template, 192)[:2]))
    to_surface, _ = kd_tree(dense).query(raw.vertices)
    assert 2e-4 < np.median(to_surface) < 1e-3, "about 0.5 mm of noise (and relief) off the true surface"
    scalp = truth[template.region_mask("scalp")]
    near_scalp, _ = kd_tree(raw.vertices).query(scalp[scalp[:, 1] > 0.08])
    assert near_scalp.min() > 0.003, "no returns from the hair"
    # No return from inside the mouth: every scan point lies nearer the skin than the teeth and tongue (less 0.5 mm
    # of noise). Distance from the teeth alone is no test: some identities' teeth sit within 2 mm of their lips.
    face_ids, barys = template_lib.uv_sample(template, 192)[:2]
    region = np.asarray(template.region_names)[template.region_ids[template.faces[face_ids, 0]]]
    to_mouth, _ = kd_tree(dense[np.isin(region, ("teeth", "tongue"))]).query(raw.vertices)
    to_skin, _ = kd_tree(dense[np.isin(region, ("face", "lips", "brows", "scalp"))]).query(raw.vertices)
    assert not np.any(to_mouth < to_skin - 5e-4), "a return from inside the mouth"
    x, y, z = raw.vertices.T
    assert not np.any((y < -0.09) & (z > -0.04)), "a hole under the chin"
    assert raw.faces.max() < len(raw.vertices) and len(raw.faces) > len(raw.vertices)
    registered, colours = synth.scanner.register(template, raw)
    skin = template.region_mask("face") | template.region_mask("lips")
    fit, _ = kd_tree(dense).query(registered[skin])
    assert np.median(fit) < 1.5e-3 and not np.allclose(registered, truth, atol=1e-4)
    texels = TexelLayout.build(template, 32)
    maps = scan_uv_maps(texels, template, registered, colours, "registered scan")
    assert maps.shape == (32, 32, 6) and np.isfinite(maps).all()


def test_registered_lips_land_on_the_identitys_lips(rng):
    """The lips end where the identity's are, not part of the way from the template's: on four fresh identities,
    the registered lips' centroid within 2.5 mm of the true one and their RMS error under 3 mm (60 draws: at most
    1.6 and 2.2 mm; before the lips started at their colour's centroid, 3.3 mm and 3.7 mm on average)."""
    config = synth.synth_config("tiny")
    template = template_lib.procedural_head(config.template_resolution)
    sampler = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    lips = template.region_mask("lips")
    for index in range(4):
        identity = synth.make_identity(template, index, np.random.default_rng(rng.integers(2**31)), sampler,
                                       synth.counts(config), synth.voices.draw_voice(rng))  # fmt: skip
        raw = synth.scan_identity(template, identity, sampler, config.scan_resolution, rng)
        error = (synth.scanner.register(template, raw)[0] - identity.template.vertices)[lips]
        assert np.linalg.norm(error.mean(0)) < 2.5e-3, error.mean(0)
        assert np.sqrt(np.mean(np.sum(error**2, -1))) < 3e-3


def test_registration_puts_the_lips_where_the_scans_lip_colour_is():
    """Nearest points fix the surface, not where the lips land on it: matching the template's lips to the scan's
    lip-coloured points brings them nearer the identity's true lips than geometry alone, on each of four. The
    points taken for lips are the true lips' (not skin), and a scan without lip colour falls back to geometry."""
    # Fixed identities: the gain is an average one. Over 232 draws of 4 fresh identities, 7 of the 928 came out
    # 0.2-0.43 mm worse with lip colour and one draw's mean gained under 5% (8 draws failed here). This draw's four
    # gain 0.41-1.62 mm each (mean ratio 0.78; the median draw's 0.80).
    rng = np.random.default_rng(4)
    config = synth.synth_config("tiny")
    template = template_lib.procedural_head(config.template_resolution)
    sampler = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    lips = template.region_mask("lips")
    kd_tree = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree
    guided, geometric = [], []
    for index in range(4):
        identity = synth.make_identity(template, index, np.random.default_rng(rng.integers(2**31)), sampler,
                                       synth.counts(config), synth.voices.draw_voice(rng))  # fmt: skip
        raw = synth.scan_identity(template, identity, sampler, config.scan_resolution, rng)
        truth = identity.template.vertices
        for errors, colour in ((guided, True), (geometric, False)):
            registered = synth.scanner.register(template, raw, lip_colour=colour)[0]
            errors.append(np.sqrt(np.mean(np.sum((registered - truth)[lips] ** 2, -1))))
        chosen = synth.scanner.lip_coloured_points(raw, truth[lips].mean(0))
        assert chosen.sum() >= synth.scanner.MIN_LIP_POINTS
        to_lips, _ = kd_tree(truth[lips]).query(raw.vertices[chosen])
        to_rest, _ = kd_tree(truth[~lips]).query(raw.vertices[chosen])
        assert np.mean(to_lips < to_rest) > 0.9, "the lip-coloured points are the lips"
        grey = dataclasses.replace(raw, colours=np.full_like(raw.colours, 0.5))
        np.testing.assert_array_equal(synth.scanner.register(template, grey)[0],
                                      synth.scanner.register(template, grey, lip_colour=False)[0])  # fmt: skip
    guided, geometric = np.array(guided), np.array(geometric)
    assert np.all(guided <= geometric + 2e-4), (guided, geometric)
    assert guided.mean() < 0.95 * geometric.mean(), (guided, geometric)


def test_phone_clip_lens_exposure_and_motion_blur(rng):
    """The phone's lens is wider than the rig's; its exposure wanders smoothly; motion blur smears along the
    motion and leaves a still frame as it was."""
    config = synth.synth_config("tiny")
    rig_camera, phone = synth.camera_rig(config, rng)[0], synth.monocular_camera(config, rng)
    fov = lambda camera: 2 * np.degrees(np.arctan(camera.height / 2 / camera.intrinsics[1, 1]))  # noqa: E731
    assert fov(phone) > 2 * fov(rig_camera)
    assert np.linalg.norm(phone.world_to_cam[:3, 3]) < 0.6 * np.linalg.norm(rig_camera.world_to_cam[:3, 3])
    drift = synth.exposure_drift(200, 0.12, rng)
    assert 0.05 < drift.max() - drift.min() < 0.3
    # Smooth: the frame-to-frame change varies slowly. The largest step is no measure of that, since the drift is a
    # random walk scaled to unit spread, whose steps grow as its raw spread happens to shrink (it passed 0.03 at 1.8%
    # of seeds). Second differences over first are scale-free: 0.17 median, <= 0.33 in 20,000 seeds for the
    # Hann-smoothed walk; >= 1.1 for an unsmoothed one, sqrt(3) for frame-independent noise.
    assert np.std(np.diff(drift, 2)) < 0.6 * np.std(np.diff(drift))
    image = np.zeros((2, 16, 16), np.uint8)
    image[:, :, 8:] = 255
    blurred = synth.motion_blur(image, np.array([[4.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(blurred[1], image[1])
    edge = blurred[0, 8].astype(int)
    assert 0 < edge[7] < 255 and 0 < edge[8] < 255 and edge[0] == 0 and edge[-1] == 255
