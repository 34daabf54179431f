"""A tiny capture layout of known content and its prepared TFDS records, shared by the builder and loader tests."""

from pathlib import Path

import numpy as np

from data_pipelines import layout, tfds_builder

FPS = 25.0
SIZE = (16, 12)  # W, H


def write_tiny_layout(root: Path, rng: np.random.Generator, *, num_frames: tuple[int, ...] = (5, 4)) -> dict:
    """Two subjects, three cameras, masks for one camera, audio for the first subject only."""
    truth = {}
    for subject, frames in zip(["subj_a", "subj_b"], num_frames):
        subject_dir = layout.subject_dir(root, subject)
        cameras = []
        for serial in ["cam0", "cam1", "cam2"]:
            world_to_cam = np.eye(4)
            world_to_cam[:3, 3] = rng.uniform(-0.1, 0.1, 3) + [0, 0, 1]
            k = np.array([[20.0 + rng.uniform(), 0, 8.0], [0, 20.0, 6.0], [0, 0, 1]])
            cameras.append(layout.Camera(serial, world_to_cam, k, *SIZE))
        layout.write_calibration(subject_dir, cameras)
        seq_dir = subject_dir / "sequences" / "seq0"
        images = rng.integers(0, 256, (frames, len(cameras), SIZE[1], SIZE[0], 3), np.uint8)
        masks = rng.integers(0, 256, (frames, SIZE[1], SIZE[0]), np.uint8)
        for frame in range(frames):
            for c, camera in enumerate(cameras):
                layout.write_image(layout.frame_path(seq_dir, camera.serial, frame), images[frame, c])
            layout.write_image(layout.frame_path(seq_dir, "cam1", frame, kind="masks"), masks[frame])
        waveform = None
        if subject == "subj_a":
            waveform = rng.uniform(-0.5, 0.5, round(frames / FPS * layout.AUDIO_RATE)).astype(np.float32)
            layout.write_audio(seq_dir / layout.AUDIO_FILE, waveform)
            waveform, _ = layout.read_audio(seq_dir / layout.AUDIO_FILE)  # as quantised to 16 bits
        layout.write_sequence_meta(seq_dir, fps=FPS, num_frames=frames)
        truth[subject] = dict(cameras=cameras, images=images, masks=masks, waveform=waveform)
    return truth


def prepare_tiny(tmp_path: Path, rng: np.random.Generator, audio_window_s: float = 0.1) -> tuple[Path, dict]:
    """`write_tiny_layout` prepared into TFDS records under `tmp_path`: their folder and the truth."""
    truth = write_tiny_layout(tmp_path / "layout", rng)
    dataset_dir = tfds_builder.prepare(tmp_path / "layout", tmp_path / "tfds", audio_window_s=audio_window_s)
    return dataset_dir, truth
