"""Avatar folders and audio-driven animation: a person's avatar in one self-contained folder, and audio -> MP4.

    avatar/avatar.json                  {"kind": "uhap_avatar", "subject", "fps", "image_size": [W, H], ...}
    avatar/prior/                       the prior's inference bundle (`uhap_jax.export.export_bundle`)
    avatar/identity/scan_maps.npy       the identity conditioning: neutral-scan UV maps [R, R, 6]
    avatar/identity/bias_maps.npz       personalised avatars only: the fitted decoder bias maps (bias_0, ...)
    avatar/speech/config.json           the speech model's architecture (AudioToLatent and its encoder)
    avatar/speech/params/               orbax checkpoint of the speech model's weights (a pure dict)
    avatar/calibration/camera_params.json   the subject's capture cameras, for `--camera <serial>`

Nothing refers back to the training workdirs or the dataset, and every array loads replicated on one device,
so an avatar renders on any machine. Personalisation writes the same format with its fine-tuned identity.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from data_pipelines import audio_io, layout
from kernels import binning
from uhap_jax import export
from uhap_jax.artifacts import output_dirs
from uhap_jax.config_utils import read_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.inference import camera_paths, ply, speech_windows, video
from uhap_jax.models.audio_encoder import SAMPLE_RATE, AudioEncoder, AudioEncoderConfig
from uhap_jax.models.audio_to_latent import AudioToLatent, AudioToLatentConfig, FrozenParam
from uhap_jax.models.prior import UHAP, scan_uv_maps
from uhap_jax.train import audio_stage, prior_stage
from uhap_jax.train.checkpoint import restore_latest

logger = logging.getLogger(__name__)

AVATAR_FILE = "avatar.json"
PRIOR_DIR = "prior"
SCAN_MAPS_FILE = Path("identity") / "scan_maps.npy"
SPEECH_CONFIG_FILE = Path("speech") / "config.json"
SPEECH_PARAMS_DIR = Path("speech") / "params"
CAPACITY_HEADROOM = 1.25  # pair slots above the first frames' need, for mouths that open wider later
_WEIGHTS = (nnx.Param, FrozenParam)


@dataclasses.dataclass(frozen=True, eq=False)
class Avatar:
    """A loaded avatar: the prior, one identity's scan maps, the speech model and the render defaults."""

    directory: Path
    subject: str
    fps: float
    image_size: tuple[int, int]  # (W, H)
    prior: UHAP
    scan_maps: np.ndarray  # [R, R, 6]
    speech: AudioToLatent


# ------------------------------------------------------------------------------------- the speech model


def _replicated() -> NamedSharding:
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    return NamedSharding(mesh, PartitionSpec())


def restore_speech(audio_workdir: str | Path, prior: UHAP, fps: float) -> tuple[AudioToLatent, int]:
    """The speech model of the latest checkpoint of an audio workdir (`uhap train audio`), and its step.

    The checkpoint holds the speech model beside the frozen prior it was trained against; `prior` fixes the
    latent size and fills the prior's half of the structure. `fps` is that of the training data.
    """
    workdir = Path(audio_workdir)
    config = read_config(workdir / "config.json")
    model, step = restore_latest(workdir, audio_stage.build_model(config, prior, fps),
                                 prior_stage.make_optimizer(config), _replicated().mesh, what="speech-model",
                                 expect=f"{workdir / 'config.json'} and the prior")  # fmt: skip
    speech = model.speech
    speech.eval()
    return speech, step


def save_speech(speech: AudioToLatent, directory: Path) -> None:
    """The speech model's architecture as JSON and its weights (trained and frozen) as an orbax checkpoint."""
    description = {
        "model": dataclasses.asdict(speech.config),
        "encoder": dataclasses.asdict(speech.encoder.config),
        "normalize_waveform": bool(speech.encoder.normalize_waveform),
    }
    (directory / SPEECH_CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
    (directory / SPEECH_CONFIG_FILE).write_text(json.dumps(description, indent=1))
    weights = nnx.to_pure_dict(nnx.state(speech, _WEIGHTS))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.absolute() / SPEECH_PARAMS_DIR, weights)


def load_speech(directory: Path) -> AudioToLatent:
    """The speech model that `save_speech` wrote into `directory`, in eval mode, on one device."""
    config_file = directory / SPEECH_CONFIG_FILE
    description = _read_json(config_file)
    try:
        encoder_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in description["encoder"].items()}
        model_config = AudioToLatentConfig(**description["model"])
        encoder_config = AudioEncoderConfig(**encoder_fields)
        normalize = bool(description["normalize_waveform"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: not a speech-model description ({error})") from error
    rngs = nnx.Rngs(0)
    encoder = AudioEncoder(encoder_config, normalize_waveform=normalize, rngs=rngs)
    speech = AudioToLatent(model_config, encoder, rngs=rngs)
    speech.eval()
    weights = nnx.state(speech, _WEIGHTS)
    replicated = _replicated()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), nnx.to_pure_dict(weights)
    )
    params_dir = directory / SPEECH_PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: the avatar has no speech-model weights")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            values = checkpointer.restore(params_dir.absolute(), abstract)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{params_dir}: does not match {config_file}: {error}") from error
    nnx.replace_by_pure_dict(weights, values)
    nnx.update(speech, weights)
    return speech


# ------------------------------------------------------------------------------------- avatar folders


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the avatar folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _subject_fps(subject_dir: Path) -> float:
    """The frame rate of the subject's sequences (which the speech model was trained at); they must agree."""
    rates = {float(layout.read_sequence_meta(subject_dir / "sequences" / name)["fps"])
             for name in layout.list_sequences(subject_dir)}  # fmt: skip
    if len(rates) != 1:
        found = sorted(rates) or "no sequence"
        raise ValueError(f"{subject_dir}: cannot tell the avatar's fps from its sequences ({found}); pass fps")
    return rates.pop()


def make_avatar(
    prior_workdir: str | Path,
    audio_workdir: str | Path,
    dataset_root: str | Path,
    subject_id: str,
    out: str | Path,
    *,
    fps: float | None = None,
    image_size: tuple[int, int] = (512, 512),
) -> Path:
    """An avatar folder for a dataset subject: the prior, the subject's scan maps, the speech model, cameras.

    `fps` defaults to that of the subject's sequences. `out` is replaced only once it is complete.
    """
    subject_dir = layout.subject_dir(Path(dataset_root), subject_id)
    if not subject_dir.is_dir():
        raise FileNotFoundError(f"{subject_dir}: no such subject in the dataset")
    fps = float(fps) if fps is not None else _subject_fps(subject_dir)
    prior, config, _ = export.restore_prior(prior_workdir)
    template = template_lib.procedural_head(config.model.template_resolution)
    vertices, _, colours = layout.read_neutral_scan(subject_dir)
    scan_maps = scan_uv_maps(prior.layout, template, vertices, colours, str(subject_dir / layout.SCAN_DIR))
    speech, speech_step = restore_speech(audio_workdir, prior, fps)
    if speech.config.latent_dim != prior.z_dim:
        raise ValueError(f"{audio_workdir}: the speech model predicts {speech.config.latent_dim}-d codes, the "
                         f"prior in {prior_workdir} takes {prior.z_dim}")  # fmt: skip

    out = Path(out)
    with output_dirs.replacing(out, "avatar", inputs=[prior_workdir, audio_workdir, dataset_root]) as staging:
        export.export_bundle(prior_workdir, staging / PRIOR_DIR)
        (staging / SCAN_MAPS_FILE).parent.mkdir(parents=True)
        np.save(staging / SCAN_MAPS_FILE, np.asarray(scan_maps, np.float32))
        save_speech(speech, staging)
        layout.write_calibration(staging, list(layout.read_calibration(subject_dir).values()))
        manifest = {
            "kind": "uhap_avatar", "subject": subject_id, "fps": fps, "image_size": [int(s) for s in image_size],
            "speech_step": speech_step, "sources": {"prior": str(Path(prior_workdir).absolute()),
                                                    "speech": str(Path(audio_workdir).absolute())},
        }  # fmt: skip
        (staging / AVATAR_FILE).write_text(json.dumps(manifest, indent=1))
    return out


def load_avatar(path: str | Path) -> Avatar:
    """An avatar folder (`make_avatar`, or personalisation) with every part checked against the others."""
    path = Path(path)
    manifest_file = path / AVATAR_FILE
    manifest = _read_json(manifest_file)
    if manifest.get("kind") != "uhap_avatar":
        raise ValueError(f"{manifest_file}: kind {manifest.get('kind')!r} is not 'uhap_avatar'")
    try:
        fps = float(manifest["fps"])
        width, height = (int(s) for s in manifest["image_size"])
        subject = str(manifest["subject"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{manifest_file}: needs subject, fps and image_size [W, H] ({error!r})") from error
    if not (fps > 0 and width > 0 and height > 0):
        raise ValueError(f"{manifest_file}: fps and image size must be positive, got {fps} and {width}x{height}")
    prior, _ = export.load_bundle(path / PRIOR_DIR)
    from uhap_jax.train.personalize_stage import attach_identity  # lazy: personalize_stage imports this module

    prior = attach_identity(prior, path)  # a personalised avatar's bias maps replace its IdentityEncoder
    scan_file = path / SCAN_MAPS_FILE
    if not scan_file.is_file():
        raise FileNotFoundError(f"{scan_file}: missing from the avatar folder")
    scan_maps = np.load(scan_file)
    resolution = prior.layout.resolution
    if scan_maps.shape != (resolution, resolution, 6) or not np.all(np.isfinite(scan_maps)):
        raise ValueError(f"{scan_file}: expected finite UV maps [{resolution}, {resolution}, 6] for the prior, got "
                         f"{list(scan_maps.shape)}")  # fmt: skip
    speech = load_speech(path)
    if speech.config.latent_dim != prior.z_dim:
        raise ValueError(f"{path / SPEECH_CONFIG_FILE}: predicts {speech.config.latent_dim}-d codes, the prior "
                         f"takes {prior.z_dim}")  # fmt: skip
    if not math.isclose(speech.config.fps, fps):
        raise ValueError(f"{manifest_file}: fps {fps:g}, but the speech model runs at {speech.config.fps:g}")
    return Avatar(path, subject, fps, (width, height), prior, scan_maps.astype(np.float32), speech)


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


def _render_fn(prior: UHAP, width: int, height: int, capacity: int):
    """jit: codes [B, z], scan maps, cameras [B, 4, 4] / [B, 3, 3] -> uint8 images [B, H, W, 3], stats, Gaussians."""
    graphdef, state = nnx.split(prior)

    def render(state, z, scan_maps, world_to_cam, intrinsics):
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

    compiled = jax.jit(render)
    return lambda *args: compiled(state, *args)


def _gaussians_fn(prior: UHAP):
    graphdef, state = nnx.split(prior)

    def decode(state, z, scan_maps):
        rest = jnp.zeros((z.shape[0], 3), z.dtype)
        return nnx.merge(graphdef, state).decode(z, jnp.broadcast_to(scan_maps, (z.shape[0], *scan_maps.shape)),
                                                 rest, rest)  # fmt: skip

    compiled = jax.jit(decode)
    return lambda z, scan_maps: compiled(state, z, scan_maps)


class FrameRenderer:
    """Renders codes along a camera path in fixed-size batches (one compilation), growing the pair capacity
    and re-rendering a batch whenever it overflowed: a frame is never truncated, and never silently dropped."""

    def __init__(self, avatar: Avatar, path: camera_paths.CameraPath, batch_size: int, capacity: int | None = None,
                 keep_gaussians: bool = False):  # fmt: skip
        """`capacity`: the pair capacity to start from (default: sized from the first batch); `keep_gaussians`:
        bring each frame's Gaussians back to the host too (for PLY output)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.avatar, self.path, self.batch_size = avatar, path, batch_size
        self.keep_gaussians = keep_gaussians
        self.capacity = 0
        self._render = None
        if capacity is not None:
            self.capacity = int(capacity)
            self._render = _render_fn(avatar.prior, path.width, path.height, self.capacity)

    def _size_capacity(self, z: np.ndarray, frames: np.ndarray) -> None:
        gaussians = _gaussians_fn(self.avatar.prior)(z, self.avatar.scan_maps)
        path = self.path
        needed = self.avatar.prior.capacity_for(
            gaussians, path.world_to_cam[frames][:, None].astype(np.float32),
            path.intrinsics[frames][:, None].astype(np.float32), width=path.width, height=path.height,
        )  # fmt: skip
        self._grow(needed)

    def _grow(self, needed: int) -> None:
        self.capacity = binning.bucket_capacity(math.ceil(needed * CAPACITY_HEADROOM))
        self._render = _render_fn(self.avatar.prior, self.path.width, self.path.height, self.capacity)

    def __call__(self, codes: np.ndarray) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        """Yields (uint8 image [H, W, 3], the frame's Gaussian fields or None) for every code, in order."""
        num_frames = len(codes)
        for start in range(0, num_frames, self.batch_size):
            frames = np.minimum(np.arange(start, start + self.batch_size), num_frames - 1)  # pad with the last
            z = codes[frames].astype(np.float32)
            if self._render is None:
                self._size_capacity(z, frames)
            views = self.path.world_to_cam[frames].astype(np.float32)
            ks = self.path.intrinsics[frames].astype(np.float32)
            images, n_pairs, overflow, fields = self._render(z, self.avatar.scan_maps, views, ks)
            if np.any(overflow):
                needed = int(np.max(n_pairs))
                logger.info("frames %d+: %d pairs overflow capacity %d; re-rendering with more", start, needed,
                            self.capacity)  # fmt: skip
                self._grow(needed)
                images, n_pairs, overflow, fields = self._render(z, self.avatar.scan_maps, views, ks)
                if np.any(overflow):
                    raise kernels.CapacityOverflowError(int(np.max(n_pairs)), self.capacity)
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
