"""Avatar folders: a person's avatar in one self-contained folder (the one avatar format; `uhap animate` reads it).

    avatar/avatar.json                  {"kind": "uhap_avatar", "subject", "fps", "image_size": [W, H], ...}
    avatar/prior/                       the prior's inference bundle (`uhap_jax.artifacts.bundles`)
    avatar/identity/scan_maps.npy       the identity conditioning: neutral-scan UV maps [R, R, 6]
    avatar/identity/bias_maps.npz       personalised avatars only: the fitted decoder bias maps (bias_0, ...)
    avatar/speech/config.json           the speech model's architecture (AudioToLatent and its encoder)
    avatar/speech/params/               orbax checkpoint of the speech model's weights (a pure dict)
    avatar/calibration/camera_params.json   the subject's capture cameras, for `--camera <serial>`

Nothing refers back to the training workdirs or the dataset, and every array loads replicated on one device,
so an avatar renders on any machine. `make_avatar` writes one for a dataset subject; personalisation writes the
same format with its fine-tuned identity (`write_avatar`), whose bias maps `load_avatar` attaches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import layout
from uhap_jax.artifacts import output_dirs
from uhap_jax.artifacts.bundles import load_bundle
from uhap_jax.artifacts.checkpoints import single_device_mesh
from uhap_jax.artifacts.priors import export_bundle, load_prior, restore_speech
from uhap_jax.geometry.texels import scan_uv_maps
from uhap_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from uhap_jax.models.audio_to_latent import AudioToLatent, AudioToLatentConfig, FrozenParam
from uhap_jax.models.personal import IdentityBias, bias_shapes
from uhap_jax.models.prior import UHAP

AVATAR_FILE = "avatar.json"
PRIOR_DIR = "prior"
SCAN_MAPS_FILE = Path("identity") / "scan_maps.npy"
BIAS_MAPS_FILE = Path("identity") / "bias_maps.npz"
SPEECH_CONFIG_FILE = Path("speech") / "config.json"
SPEECH_PARAMS_DIR = Path("speech") / "params"
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
    replicated = NamedSharding(single_device_mesh(), PartitionSpec())
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
    prior, _, template, _ = load_prior(prior_workdir)
    vertices, _, colours = layout.read_neutral_scan(subject_dir)
    scan_maps = scan_uv_maps(prior.layout, template, vertices, colours, str(subject_dir / layout.SCAN_DIR))
    speech, speech_step = restore_speech(audio_workdir, prior, fps)
    if speech.config.latent_dim != prior.z_dim:
        raise ValueError(f"{audio_workdir}: the speech model predicts {speech.config.latent_dim}-d codes, the "
                         f"prior in {prior_workdir} takes {prior.z_dim}")  # fmt: skip

    manifest = {
        "kind": "uhap_avatar", "subject": subject_id, "fps": fps, "image_size": [int(s) for s in image_size],
        "speech_step": speech_step, "sources": {"prior": str(Path(prior_workdir).absolute()),
                                                "speech": str(Path(audio_workdir).absolute())},
    }  # fmt: skip
    return write_avatar(Path(out), lambda folder: export_bundle(prior_workdir, folder), scan_maps, None, speech,
                        list(layout.read_calibration(subject_dir).values()), manifest,
                        inputs=[prior_workdir, audio_workdir, dataset_root])  # fmt: skip


def write_avatar(out: Path, write_prior: Callable[[Path], object], scan_maps: np.ndarray,
                 bias_maps: list[np.ndarray] | None, speech: AudioToLatent, cameras: list[layout.Camera],
                 manifest: dict, *, inputs: list) -> Path:  # fmt: skip
    """An avatar folder: `write_prior(folder)` writes the prior's bundle, then the identity (scan maps, and a
    personalised avatar's bias maps), the speech model, the cameras and `manifest` (avatar.json). `out` is
    replaced only once complete, and only when it is missing, empty or an avatar, never one of `inputs`
    (`output_dirs`)."""
    with output_dirs.replacing(out, "avatar", inputs=inputs) as staging:
        write_prior(staging / PRIOR_DIR)
        (staging / SCAN_MAPS_FILE).parent.mkdir(parents=True)
        np.save(staging / SCAN_MAPS_FILE, np.asarray(scan_maps, np.float32))
        if bias_maps is not None:
            maps = {f"bias_{i}": np.asarray(b, np.float32) for i, b in enumerate(bias_maps)}
            np.savez(staging / BIAS_MAPS_FILE, **maps)
        save_speech(speech, staging)
        layout.write_calibration(staging, cameras)
        (staging / AVATAR_FILE).write_text(json.dumps(manifest, indent=1))
    return out


def attach_identity(prior: UHAP, avatar_dir: str | Path) -> UHAP:
    """`prior` with the avatar's `identity/bias_maps.npz` in place of its IdentityEncoder (in place; returned).

    An avatar without that file (`make_avatar`) leaves the prior as it is.
    """
    path = Path(avatar_dir) / BIAS_MAPS_FILE
    if not path.is_file() or isinstance(prior.identity_encoder, IdentityBias):
        return prior
    expected = bias_shapes(prior)
    try:
        with np.load(path, allow_pickle=False) as stored:
            maps = [stored[f"bias_{i}"] for i in range(len(expected))]
            extra = sorted(set(stored.files) - {f"bias_{i}" for i in range(len(expected))})
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path}: needs arrays bias_0..bias_{len(expected) - 1} for the prior ({error})") from error
    shapes = [tuple(m.shape) for m in maps]
    if shapes != expected or extra or not all(np.all(np.isfinite(m)) for m in maps):
        raise ValueError(f"{path}: bias maps {shapes} (extra {extra}) do not fit the prior's decoder, which takes "
                         f"finite maps {expected}")  # fmt: skip
    prior.identity_encoder = IdentityBias(maps)
    return prior


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
    prior, _ = load_bundle(path / PRIOR_DIR)
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
