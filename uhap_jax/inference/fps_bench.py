"""How fast a UHAP avatar animates from speech: frames/s of the speech model, decode and decode + render.

    uhap bench animate --prior-config configs/prior.py:base --audio-config configs/audio.py:base \
        --frames 256 --size 512 --batch 1,8,32

The pipeline timed is `uhap animate`'s: a 16 kHz waveform lasting frames / fps -> the speech model (AudioToLatent)
-> expression codes, read back to the host -> decode (z -> Gaussians) -> render -> every frame read back to the
host. `benchmark_animation` times decode and decode + render of given codes; `benchmark_end_to_end` puts the
speech model in front. Untrained models of a preset's shapes cost what trained ones cost in the networks (same
shapes, same FLOPs); the rasterizer's cost depends on the Gaussians' sizes, which is why the pair capacity is a
stated policy (see `benchmark_animation`).

Method: each jitted function's first call (compilation plus one batch) is timed apart; one untimed pass over all
frames warms up; then `repeats` timed passes, each ended by a host read, and the median pass is reported. The
end-to-end rate is frames / (speech-model time + decode-and-render time), both from the same repeat.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uhap_jax.inference.camera_paths import CameraPath, orbit
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import CAPACITY_HEADROOM, sized_capacity

CapacityPolicy = Literal["widest", "measured"]
HostDtype = Literal["uint8", "float32"]
_WIDEST_HEADROOM = 1.5  # the prior train stage's bound: every scale at its maximum, x 1.5


def _batches(frames: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, frames)) for start in range(0, frames, batch_size)]


def _padded(values: np.ndarray, rows: slice, batch_size: int) -> np.ndarray:
    """values[rows], the last row repeated up to `batch_size`, so that every batch has one shape."""
    chunk = values[rows]
    return np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])


def _median_pass(run: Callable[[], float], repeats: int) -> float:
    """One untimed warm-up pass, then the median of `repeats` timed ones (seconds)."""
    run()
    return statistics.median(run() for _ in range(repeats))


class _Renderer:
    """Jitted decode and decode + render of one identity along `path`, in batches of `batch_size` frames."""

    def __init__(self, model: UHAP, scan_maps: np.ndarray, path: CameraPath, z_first: np.ndarray, *,
                 batch_size: int, capacity: CapacityPolicy, capacity_headroom: float | None,
                 host_dtype: HostDtype):  # fmt: skip
        if batch_size <= 0:
            raise ValueError(f"fps bench: batch size must be positive, got {batch_size}")
        if capacity not in ("widest", "measured"):
            raise ValueError(f"fps bench: capacity policy {capacity!r} is not 'widest' or 'measured'")
        if host_dtype not in ("uint8", "float32"):
            raise ValueError(f"fps bench: host dtype {host_dtype!r} is not 'uint8' or 'float32'")
        self.frames, self.batch_size, self.path = len(path), batch_size, path
        graphdef, state = nnx.split(model)
        self.state = state
        rest = jnp.zeros((batch_size, 3), jnp.float32)  # head rotation vector and translation
        identity = jnp.broadcast_to(jnp.asarray(scan_maps, jnp.float32), (batch_size, *np.shape(scan_maps)))
        size = {"width": path.width, "height": path.height}
        # Cameras per batch, on the device once: the path is known before the first frame.
        self.cameras = [
            (jnp.asarray(_padded(path.world_to_cam.astype(np.float32), rows, batch_size)[:, None]),
             jnp.asarray(_padded(path.intrinsics.astype(np.float32), rows, batch_size)[:, None]))
            for rows in _batches(self.frames, batch_size)
        ]  # fmt: skip

        @jax.jit
        def decode(state, z_batch):
            return nnx.merge(graphdef, state).decode(z_batch, identity, rest, rest)

        first = jnp.asarray(_padded(np.asarray(z_first, np.float32), slice(0, batch_size), batch_size))
        start = time.perf_counter()
        gaussians = jax.block_until_ready(decode(state, first))
        self.decode_compile_s = time.perf_counter() - start
        views, ks = self.cameras[0]
        if capacity == "widest":
            headroom = _WIDEST_HEADROOM if capacity_headroom is None else capacity_headroom
            widest = gaussians._replace(scales=gaussians.scales * model.max_scale_ratio)
            self.capacity = int(model.capacity_for(widest, views, ks, **size) * headroom)
        else:
            headroom = CAPACITY_HEADROOM if capacity_headroom is None else capacity_headroom
            self.capacity = sized_capacity(model, gaussians, views, ks, **size, headroom=headroom).value
        self.capacity = max(self.capacity, 1)

        @jax.jit
        def decode_render(state, z_batch, views, ks):
            avatar = nnx.merge(graphdef, state)
            out = avatar.render(avatar.decode(z_batch, identity, rest, rest), views, ks, **size,
                                capacity=self.capacity)  # fmt: skip
            rgb = out.rgb[:, 0]
            bad = jnp.any(out.stats.overflow) | ~jnp.all(jnp.isfinite(rgb))
            if host_dtype == "uint8":  # what a video writer takes (video.to_uint8), made on the device
                rgb = jnp.round(jnp.clip(rgb, 0.0, 1.0) * 255.0).astype(jnp.uint8)
            return rgb, bad

        self.decode, self.decode_render = decode, decode_render
        start = time.perf_counter()
        jax.block_until_ready(decode_render(state, first, views, ks))
        self.decode_render_compile_s = time.perf_counter() - start

    def _z_batches(self, z: np.ndarray) -> list[jax.Array]:
        z = np.asarray(z, np.float32)
        return [jnp.asarray(_padded(z, rows, self.batch_size)) for rows in _batches(self.frames, self.batch_size)]

    def decode_pass(self, z: np.ndarray) -> float:
        """Seconds to decode every frame; the Gaussians stay on the device (as they do before rendering)."""
        start = time.perf_counter()
        outputs = [self.decode(self.state, z_batch) for z_batch in self._z_batches(z)]
        jax.block_until_ready(outputs)
        return time.perf_counter() - start

    def render_pass(self, z: np.ndarray) -> float:
        """Seconds to decode, render and read back every frame. One batch stays in flight while the previous
        one is read, as a video writer fed from a queue would; an overflowed or non-finite batch is an error."""
        start = time.perf_counter()
        pending = None
        for index, (z_batch, (views, ks)) in enumerate(zip(self._z_batches(z), self.cameras)):
            launched = (index, self.decode_render(self.state, z_batch, views, ks))
            if pending is not None:
                self._read(*pending)
            pending = launched
        self._read(*pending)
        return time.perf_counter() - start

    def _read(self, index: int, result: tuple[jax.Array, jax.Array]) -> np.ndarray:
        images, bad = jax.device_get(result)
        if bad:
            first = index * self.batch_size
            last = min(first + self.batch_size, self.frames) - 1
            raise RuntimeError(f"fps bench: frames {first}..{last} overflowed capacity {self.capacity} "
                               f"(NaN images); rerun with more capacity headroom")  # fmt: skip
        return images


def _device() -> str:
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()})"


def benchmark_animation(
    model: UHAP,
    scan_maps: np.ndarray,
    z: np.ndarray,
    path: CameraPath,
    *,
    batch_size: int = 1,
    capacity_headroom: float | None = None,
    capacity: CapacityPolicy = "widest",
    host_dtype: HostDtype = "float32",
    repeats: int = 3,
) -> dict[str, float | int | str]:
    """Times decode and decode + render of `z` [T, z_dim] for one identity (`scan_maps` [R, R, 6]).

    Frame t is seen by camera t of `path`, with the head pose at rest. The pair capacity (static, per camera):
    "widest" is the prior train stage's bound, every scale at its maximum x `capacity_headroom` (default 1.5),
    safe for any trained model of the preset; "measured" is `uhap animate`'s, the first batch's pairs x
    `capacity_headroom` (default models.render.CAPACITY_HEADROOM), bucketed. An overflow (NaN images) is an error,
    never a fast wrong number. `host_dtype`: frames read back as float32 or as uint8 made on the device.
    """
    frames = len(z)
    if len(path) != frames:
        raise ValueError(f"fps bench: {frames} z frames but the camera path has {len(path)} cameras")
    renderer = _Renderer(model, scan_maps, path, z, batch_size=batch_size, capacity=capacity,
                         capacity_headroom=capacity_headroom, host_dtype=host_dtype)  # fmt: skip
    decode_s = _median_pass(lambda: renderer.decode_pass(z), repeats)
    render_s = _median_pass(lambda: renderer.render_pass(z), repeats)
    return {
        "device": _device(),
        "gaussians": model.layout.num_gaussians,
        "image_size": f"{path.width}x{path.height}",
        "frames": frames,
        "batch": batch_size,
        "capacity": renderer.capacity,
        "decode_fps": frames / decode_s,
        "decode_render_fps": frames / render_s,
        "decode_compile_s": renderer.decode_compile_s,
        "decode_render_compile_s": renderer.decode_render_compile_s,
    }


def benchmark_end_to_end(
    speech,
    model: UHAP,
    scan_maps: np.ndarray,
    waveform: np.ndarray,
    path: CameraPath,
    *,
    batch_size: int = 1,
    capacity_headroom: float | None = None,
    capacity: CapacityPolicy = "measured",
    host_dtype: HostDtype = "uint8",
    repeats: int = 3,
) -> dict[str, float | int | str]:
    """Times speech -> codes -> decode -> render -> host for one clip: `waveform` [S] at 16 kHz, one frame per
    camera of `path` at the speech model's fps (`speech`: an `AudioToLatent` in eval mode).

    The speech model runs once over the whole clip (as `uhap animate` runs it) and its codes are read back;
    frames are then decoded and rendered in batches of `batch_size`. Rates are frames / median seconds:
    `audio_ms` is the speech model's time per clip, `end_to_end_fps` = frames / (speech + decode and render),
    both measured in the same repeat, so it is below `decode_render_fps` by construction.
    """
    from uhap_jax.models.audio_encoder import SAMPLE_RATE

    frames, fps = len(path), float(speech.config.fps)
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"fps bench: the waveform must be [samples] at 16 kHz, got shape {waveform.shape}")
    if waveform.size < round(frames / fps * SAMPLE_RATE):
        raise ValueError(f"fps bench: {frames} frames at {fps:g} fps need {frames / fps:.3f} s of audio, "
                         f"the waveform holds {waveform.size / SAMPLE_RATE:.3f} s")  # fmt: skip
    speech_graphdef, speech_state = nnx.split(speech)
    run_speech = jax.jit(lambda state, audio: nnx.merge(speech_graphdef, state)(audio, frames)[0])
    audio = jnp.asarray(waveform)[None]

    start = time.perf_counter()
    codes = np.asarray(jax.device_get(run_speech(speech_state, audio)))
    audio_compile_s = time.perf_counter() - start
    if not np.all(np.isfinite(codes)):
        raise RuntimeError("fps bench: the speech model gave non-finite codes")
    renderer = _Renderer(model, scan_maps, path, codes, batch_size=batch_size, capacity=capacity,
                         capacity_headroom=capacity_headroom, host_dtype=host_dtype)  # fmt: skip

    def audio_pass() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = np.asarray(jax.device_get(run_speech(speech_state, audio)))
        return time.perf_counter() - start, out

    audio_pass(), renderer.decode_pass(codes), renderer.render_pass(codes)  # warm-up
    audio_times, decode_times, render_times, total_times = [], [], [], []
    for _ in range(repeats):
        audio_s, codes = audio_pass()
        render_s = renderer.render_pass(codes)
        decode_times.append(renderer.decode_pass(codes))
        audio_times.append(audio_s)
        render_times.append(render_s)
        total_times.append(audio_s + render_s)
    median = statistics.median
    return {
        "device": _device(),
        "gaussians": model.layout.num_gaussians,
        "image_size": f"{path.width}x{path.height}",
        "frames": frames,
        "clip_s": frames / fps,
        "batch": batch_size,
        "capacity": renderer.capacity,
        "host": host_dtype,
        "audio_ms": 1e3 * median(audio_times),
        "decode_fps": frames / median(decode_times),
        "decode_render_fps": frames / median(render_times),
        "end_to_end_fps": frames / median(total_times),
        "audio_compile_s": audio_compile_s,
        "decode_compile_s": renderer.decode_compile_s,
        "decode_render_compile_s": renderer.decode_render_compile_s,
    }


# ------------------------------------------------------------------------------------- models from configs


def build_prior(config, seed: int = 0) -> tuple[UHAP, np.ndarray]:
    """An untrained prior of `config` (a prior stage config) and one identity's scan maps (the template)."""
    from uhap_jax.geometry import template as template_lib
    from uhap_jax.geometry.texels import scan_uv_maps

    template = template_lib.procedural_head(config.model.template_resolution)
    model = UHAP(template, config.model, rngs=nnx.Rngs(seed))
    albedo = np.random.default_rng(seed).uniform(0.2, 0.8, template.vertices.shape).astype(np.float32)
    return model, scan_uv_maps(model.layout, template, template.vertices, albedo, "the template")


def build_speech(config, z_dim: int, fps: float, seed: int = 0):
    """The speech model of `config` (an audio stage config) in eval mode, and a note on its encoder.

    "scratch" builds the configured encoder; "frozen"/"finetune" load `config.encoder_path` when it is set, and
    otherwise build a randomly initialised encoder of wav2vec2-base's size (transformers' default
    Wav2Vec2Config: 12 layers x 768, conv stack 7 x 512), which costs what the pretrained one costs.
    """
    import transformers

    from uhap_jax.models.audio_to_latent import AudioToLatentConfig, build_audio_to_latent

    model_config = dataclasses.replace(AudioToLatentConfig.from_config_dict(config.model), latent_dim=z_dim, fps=fps)
    rngs = nnx.Rngs(seed)
    mode = model_config.encoder_mode
    if mode == "scratch":
        hf_config = transformers.Wav2Vec2Config(**config.encoder.to_dict())
        speech = build_audio_to_latent(model_config, rngs=rngs, encoder_hf_config=hf_config)
        source = "scratch, as configured"
    elif config.encoder_path:
        speech = build_audio_to_latent(model_config, rngs=rngs, encoder_path=config.encoder_path)
        source = f"{mode}, loaded from {config.encoder_path}"
    else:
        hf_config = transformers.Wav2Vec2Config()  # wav2vec2-base's architecture
        scratch = dataclasses.replace(model_config, encoder_mode="scratch")
        speech = build_audio_to_latent(scratch, rngs=rngs, encoder_hf_config=hf_config)
        source = f"{mode} with no encoder_path: random weights of wav2vec2-base's size"
    speech.eval()
    encoder = speech.encoder.config
    note = (f"speech model: encoder {encoder.model_type} {encoder.num_hidden_layers} x {encoder.hidden_size} "
            f"({source}), transformer {model_config.num_layers} x {model_config.width}, {fps:g} fps")  # fmt: skip
    return speech, note


def run(
    prior_spec: str,
    audio_spec: str,
    *,
    frames: int,
    size: int,
    batches: list[int],
    prior_overrides: list[str] | None = None,
    audio_overrides: list[str] | None = None,
    fps: float = 25.0,
    capacity: CapacityPolicy = "measured",
    host_dtype: HostDtype = "uint8",
    repeats: int = 5,
    seed: int = 0,
) -> tuple[list[dict], str]:
    """Builds untrained models of the two presets and times the pipeline once per batch size: rows and a note."""
    from uhap_jax.config_utils import load_config
    from uhap_jax.models.audio_encoder import SAMPLE_RATE

    if frames <= 0 or size <= 0:
        raise ValueError(f"fps bench: frames and size must be positive, got {frames} and {size}")
    prior_config = load_config(prior_spec, prior_overrides)
    audio_config = load_config(audio_spec, audio_overrides)
    model, scan_maps = build_prior(prior_config, seed)
    speech, note = build_speech(audio_config, model.z_dim, fps, seed)
    rng = np.random.default_rng(seed)
    # Noise at speech level: the networks' cost does not depend on the samples' values.
    waveform = (0.1 * rng.standard_normal(round(frames / fps * SAMPLE_RATE))).astype(np.float32)
    path = orbit(frames, width=size, height=size, arc_deg=60.0)
    rows = [
        benchmark_end_to_end(speech, model, scan_maps, waveform, path, batch_size=batch, capacity=capacity,
                             host_dtype=host_dtype, repeats=repeats)
        for batch in batches
    ]  # fmt: skip
    return rows, note


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)
