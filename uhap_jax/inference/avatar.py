"""Audio-driven animation of an avatar folder (`uhap_jax.artifacts.avatars`): audio -> codes -> frames -> MP4."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from data_pipelines import audio_io, layout
from uhap_jax.artifacts.avatars import Avatar
from uhap_jax.inference import camera_paths, ply, speech_windows, video
from uhap_jax.models.audio_encoder import SAMPLE_RATE
from uhap_jax.models.audio_to_latent import AudioToLatent
from uhap_jax.models.prior import UHAP
from uhap_jax.models.render import CAPACITY_HEADROOM, render_fitting, sized_capacity

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- animation


@dataclasses.dataclass(frozen=True)
class Animation:
    """What `animate` wrote, and its speed: frames per second of wall time for rendering and encoding,
    compilation included."""

    video: Path
    num_frames: int
    render_seconds: float
    capacity: int
    ply_files: tuple[Path, ...] = ()

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.render_seconds


def read_speech(audio_file: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """An audio file (WAV, MP3, M4A, FLAC, ...) -> (16 kHz mono for the speech model, mono at the file's own rate
    for the video, that rate). Mixing down and resampling are logged, never silent."""
    decoded = audio_io.decode_audio(audio_file)
    model_audio, notes = audio_io.to_mono(decoded, SAMPLE_RATE, Path(audio_file))
    for note in notes:
        logger.info("audio input: %s", note)
    track, _ = audio_io.to_mono(decoded, decoded.rate, Path(audio_file))
    return model_audio, track, decoded.rate


def predict_codes(speech: AudioToLatent, waveform: np.ndarray, fps: float) -> np.ndarray:
    """16 kHz mono audio -> expression codes [T, z_dim], one per video frame; T = duration x fps, rounded. Long
    audio runs in overlapping windows (`speech_windows`), so memory does not grow with its length."""
    return speech_windows.predict_codes(speech, waveform, fps)


def _render_fn(prior: UHAP, width: int, height: int):
    """jit: capacity, codes [B, z], scan maps, cameras [B, 4, 4] / [B, 3, 3] -> uint8 images [B, H, W, 3], pair
    counts, overflow flags, Gaussians (compiled once per capacity)."""
    graphdef, state = nnx.split(prior)

    def render(capacity, state, z, scan_maps, world_to_cam, intrinsics):
        model = nnx.merge(graphdef, state)
        rest = jnp.zeros((z.shape[0], 3), z.dtype)  # the head pose at rest
        gaussians = model.decode(z, jnp.broadcast_to(scan_maps, (z.shape[0], *scan_maps.shape)), rest, rest)
        views, ks = world_to_cam[:, None], intrinsics[:, None]
        out = model.render(gaussians, views, ks, width=width, height=height, capacity=capacity)
        colours = model.colours(gaussians, views)[:, 0]
        fields = (gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, colours)
        # 8-bit on the device: a quarter of the bytes to bring back (the copy bounds the frame rate on a GPU).
        images = jnp.round(jnp.clip(out.rgb[:, 0], 0.0, 1.0) * 255.0).astype(jnp.uint8)
        return images, out.stats.n_pairs, out.stats.overflow, fields

    compiled = jax.jit(render, static_argnums=0)
    return lambda capacity, *args: compiled(capacity, state, *args)


def _gaussians_fn(prior: UHAP):
    graphdef, state = nnx.split(prior)

    def decode(state, z, scan_maps):
        rest = jnp.zeros((z.shape[0], 3), z.dtype)
        return nnx.merge(graphdef, state).decode(z, jnp.broadcast_to(scan_maps, (z.shape[0], *scan_maps.shape)),
                                                 rest, rest)  # fmt: skip

    compiled = jax.jit(decode)
    return lambda z, scan_maps: compiled(state, z, scan_maps)


class FrameRenderer:
    """Renders codes along a camera path in fixed-size batches (one compilation per capacity), growing the pair
    capacity and re-rendering a batch that outgrew it (`models.render.render_fitting`): a frame is never
    truncated, and never silently dropped."""

    def __init__(self, avatar: Avatar, path: camera_paths.CameraPath, batch_size: int, capacity: int | None = None,
                 keep_gaussians: bool = False):  # fmt: skip
        """`capacity`: the pair capacity to start from (default: sized from the first batch); `keep_gaussians`:
        bring each frame's Gaussians back to the host too (for PLY output)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.avatar, self.path, self.batch_size = avatar, path, batch_size
        self.keep_gaussians = keep_gaussians
        self._render = _render_fn(avatar.prior, path.width, path.height)
        self._capacity = None
        if capacity is not None:
            self._capacity = kernels.AdaptiveCapacity(headroom=CAPACITY_HEADROOM)
            self._capacity.value = int(capacity)  # as given, not bucketed

    @property
    def capacity(self) -> int:
        """The pair capacity per camera now (0 before the first batch sized it)."""
        return 0 if self._capacity is None else self._capacity.value

    def _size_capacity(self, z: np.ndarray, frames: np.ndarray) -> kernels.AdaptiveCapacity:
        gaussians = _gaussians_fn(self.avatar.prior)(z, self.avatar.scan_maps)
        path = self.path
        return sized_capacity(
            self.avatar.prior, gaussians, path.world_to_cam[frames][:, None].astype(np.float32),
            path.intrinsics[frames][:, None].astype(np.float32), width=path.width, height=path.height,
            headroom=CAPACITY_HEADROOM,
        )  # fmt: skip

    def __call__(self, codes: np.ndarray) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        """Yields (uint8 image [H, W, 3], the frame's Gaussian fields or None) for every code, in order."""
        num_frames = len(codes)
        for start in range(0, num_frames, self.batch_size):
            frames = np.minimum(np.arange(start, start + self.batch_size), num_frames - 1)  # pad with the last
            z = codes[frames].astype(np.float32)
            if self._capacity is None:
                self._capacity = self._size_capacity(z, frames)
            views = self.path.world_to_cam[frames].astype(np.float32)
            ks = self.path.intrinsics[frames].astype(np.float32)
            images, _, _, fields = render_fitting(
                lambda capacity, z=z, views=views, ks=ks: self._render(capacity, z, self.avatar.scan_maps, views, ks),
                self._capacity,
                lambda out: int(np.max(out[1])),
            )  # fmt: skip
            images = np.asarray(images)
            fields = [np.asarray(f) for f in fields] if self.keep_gaussians else None
            for offset in range(min(self.batch_size, num_frames - start)):
                yield images[offset], fields and tuple(f[offset] for f in fields)


def camera_path(avatar: Avatar, camera: str, num_frames: int, size: int | None) -> camera_paths.CameraPath:
    """`front`, `orbit[:<degrees>]` or a capture camera's serial, rendered `size` pixels high (square for the
    front and orbit paths; a capture camera keeps its aspect ratio). Default size: the avatar's."""
    width, height = avatar.image_size
    if size is not None:
        width, height = size, size
    kind = camera.partition(":")[0]
    if kind in ("front", "orbit"):
        return camera_paths.from_spec(camera, num_frames, width=width, height=height)
    calibration = layout.read_calibration(avatar.directory)
    if camera not in calibration:
        raise ValueError(f"--camera {camera!r}: not 'front', 'orbit' or a camera of "
                         f"{avatar.directory / layout.CALIBRATION_FILE} ({sorted(calibration)})")  # fmt: skip
    chosen = calibration[camera]
    if size is None:
        width, height = chosen.width, chosen.height
    else:
        width = round(size * chosen.width / chosen.height)
    return camera_paths.capture(avatar.directory, camera, num_frames, size=(width, height))


def animate(
    avatar: Avatar,
    audio_file: str | Path,
    out: str | Path,
    *,
    camera: str = "front",
    size: int | None = None,
    ply_dir: str | Path | None = None,
    batch_size: int = 8,
) -> Animation:
    """Audio -> speech model -> codes at the avatar's fps -> decoded, rendered frames -> H.264 MP4 with the
    file's own audio (mixed to mono); optionally one INRIA PLY per frame in `ply_dir`."""
    audio_file = Path(audio_file)
    model_audio, track, rate = read_speech(audio_file)
    codes = predict_codes(avatar.speech, model_audio, avatar.fps)
    path = camera_path(avatar, camera, len(codes), size)
    renderer = FrameRenderer(avatar, path, batch_size, keep_gaussians=ply_dir is not None)
    ply_files = []

    def frames() -> Iterator[np.ndarray]:
        for index, (image, fields) in enumerate(renderer(codes)):
            if ply_dir is not None:
                ply_files.append(ply.write_ply(Path(ply_dir) / f"frame_{index:05d}.ply", *fields))
            yield image

    started = time.perf_counter()
    written = video.write_video(Path(out), frames(), track, fps=avatar.fps, sample_rate=rate)
    seconds = time.perf_counter() - started
    return Animation(written, len(codes), seconds, renderer.capacity, tuple(ply_files))
