"""Tiny capture layouts written with random content: the prior stage's, and the audio stage's (with audio, a
held-out sentence and a held-out identity); the metrics rows a run writes."""

import json
import wave
from pathlib import Path

import numpy as np

from data_pipelines import layout
from helpers.models import random_cameras
from uhap_jax.geometry import template as template_lib

SIZE, FRAMES, NUM_CAMERAS, FPS = 32, 4, 4, 25.0
HELD_OUT_CAMERA = "cam2"
TINY_MODEL = [
    "--config.model.template_resolution=24",
    "--config.model.uv_resolution=16",
    "--config.model.z_dim=8",
    "--config.model.decoder_channels=(8, 8)",
    "--config.model.expression_channels=(4, 8)",
    "--config.model.expression_hidden=16",
    "--config.model.color_features=4",
    "--config.model.color_hidden=8",
]


def write_prior_layout(root: Path, rng: np.random.Generator) -> None:
    """Two subjects (one held out) with one 4-frame sequence seen by 4 cameras (one held out), 32x32 images."""
    sequences = (("id000", "sen_00", "train", None), ("id001", "sen_00", "held_out_identity", None))
    write_capture(root, rng, sequences, frames=FRAMES, mask_keep=0.5, audio=False)


def write_capture(root: Path, rng: np.random.Generator, sequences, *, frames: int, mask_keep: float,
                  audio: bool) -> None:  # fmt: skip
    """Subjects id000 (training) and id001 (held out) on one rig of 4 random cameras (cam2 held out), each with
    the template plus noise as its neutral scan; `sequences` (subject, sequence, split, sentence index or None) of
    `frames` random 32x32 images, masks keeping about `mask_keep` of the pixels, head poses and, with `audio`,
    speech-like audio (the STEREO sequence's a 44.1 kHz stereo file)."""
    head = template_lib.procedural_head(24)
    views, intrinsics = random_cameras(rng, NUM_CAMERAS, SIZE)
    serials = [f"cam{i}" for i in range(NUM_CAMERAS)]
    rig = [layout.Camera(s, v.astype(np.float64), k.astype(np.float64), SIZE, SIZE)
           for s, v, k in zip(serials, views, intrinsics)]  # fmt: skip
    info = {}
    for subject in ("id000", "id001"):
        subject_dir = layout.subject_dir(root, subject)
        layout.write_calibration(subject_dir, rig)
        scan = head.vertices + rng.normal(0.0, 0.002, head.vertices.shape)
        layout.write_neutral_scan(subject_dir, scan, head.faces, rng.uniform(0.0, 1.0, head.vertices.shape))
    for subject, sequence, split, sentence in sequences:
        seq_dir = layout.sequence_dir(root, subject, sequence)
        for frame in range(frames):
            for serial in serials:
                layout.write_image(layout.frame_path(seq_dir, serial, frame),
                                   rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))  # fmt: skip
                mask = np.where(rng.uniform(size=(SIZE, SIZE)) > 1.0 - mask_keep, 255, 0).astype(np.uint8)
                layout.write_image(layout.frame_path(seq_dir, serial, frame, kind="masks"), mask)
        if audio and (subject, sequence) == STEREO:
            left, right = speech_like(rng, frames / FPS, 44_100), speech_like(rng, frames / FPS, 44_100)
            write_stereo_wav(seq_dir / layout.AUDIO_FILE, left, right, 44_100)
        elif audio:
            layout.write_audio(seq_dir / layout.AUDIO_FILE, speech_like(rng, frames / FPS, layout.AUDIO_RATE))
        head_pose = {"rotation_vector": rng.normal(0.0, 0.03, (frames, 3)).tolist(),
                     "translation": rng.normal(0.0, 0.002, (frames, 3)).tolist()}  # fmt: skip
        layout.write_sequence_meta(seq_dir, fps=FPS, num_frames=frames, head_pose=head_pose)
        entry = {"split": split} if sentence is None else {"split": split, "sentence_index": sentence}
        info.setdefault(subject, {})[sequence] = entry
    layout.write_dataset_info(
        root,
        {"identities": {"train": ["id000"], "held_out": ["id001"]}, "cameras": serials,
         "held_out_cameras": [HELD_OUT_CAMERA], "sequences": info},
    )  # fmt: skip


def rows(workdir: Path) -> list[dict]:
    """The rows of `<workdir>/metrics.jsonl`."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


SPEECH_FRAMES = 12
# (subject, sequence, split, sentence); the stereo 44.1 kHz file is the held-out sentence's.
SEQUENCES = (
    ("id000", "sen_00", "train", 0),
    ("id000", "sen_01", "held_out_sentence", 1),
    ("id001", "sen_02", "held_out_identity", 2),
)
STEREO = ("id000", "sen_01")
PRIOR_OVERRIDES = [
    "data.num_views=2",
    "model.template_resolution=24",
    "model.uv_resolution=32",  # the 24-row template's lips need 32²: 16² has no lip texel
    "model.z_dim=8",
    "model.decoder_channels=(8, 8, 8)",
    "model.expression_channels=(4, 8)",
    "model.expression_hidden=16",
    "model.color_features=4",
    "model.color_hidden=8",
]
SMALL_SPEECH_MODEL = [
    "--config.model.width=16", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=32", "--config.encoder.hidden_size=16", "--config.encoder.num_hidden_layers=1",
    "--config.encoder.num_attention_heads=2", "--config.encoder.intermediate_size=32",
    "--config.encoder.conv_dim=(8, 8, 8, 8, 8, 8, 8)",
]  # fmt: skip
SPEECH_OVERRIDES = [
    "model.width=16", "model.num_layers=1", "model.num_heads=2", "model.mlp_dim=32", "encoder.hidden_size=16",
    "encoder.num_hidden_layers=1", "encoder.num_attention_heads=2", "encoder.intermediate_size=32",
    "encoder.conv_dim=(8, 8, 8, 8, 8, 8, 8)", "loss.lip=0.0",
]  # fmt: skip


def speech_like(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Noise under a syllable-rate envelope, so that audio energy varies from frame to frame."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t + rng.uniform(0, 2 * np.pi))
    return (0.3 * envelope * rng.normal(size=t.size)).clip(-1, 1).astype(np.float32)


def write_stereo_wav(path: Path, left: np.ndarray, right: np.ndarray, rate: int) -> None:
    """A 16-bit stereo WAV."""
    pcm = np.round(np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())


def write_speech_layout(root: Path, rng: np.random.Generator) -> None:
    """Two subjects with random 32x32 frames from 4 cameras (one held out), audio, head pose and a split."""
    write_capture(root, rng, SEQUENCES, frames=SPEECH_FRAMES, mask_keep=0.7, audio=True)
