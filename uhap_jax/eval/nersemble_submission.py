"""NeRSemble dynamic novel-view-synthesis benchmark: a trained prior's renders in the official submission layout.

The submission is one .zip holding `{participant:03d}/{sequence}/cam_{serial}.mp4` for each benchmark
(participant, sequence) and each of its three hold-out cameras, every video 1100 x 1604 (W x H) at 73 fps with one
frame per timestep of the sequence, H.264 (crf 14, yuv420p), the background black. This is what the public
toolkit (`nersemble-benchmark` 0.2.0 on PyPI: `NVSSubmissionDataWriter`, `NVSSubmissionDataReader`) writes and
checks; its constants are restated here (`NVS`), nothing is imported from it.

`render_sequence` renders a capture-layout sequence (e.g. imported with `uhap data import nersemble`) at the
hold-out cameras: each frame's code from the prior's encoder on the sequence's training cameras (and its tracked
meshes when the prior reads them and the sequence has them), the identity from the given UV maps, the head pose
from `meta.json` (identity pose without one). The hold-out cameras' calibration comes from the participant's
`camera_params.json` (their images are withheld), their intrinsics scaled to the submission's frame size.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from data_pipelines import layout
from uhap_jax.eval import benchmark
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import UHAP


@dataclasses.dataclass(frozen=True)
class SubmissionSpec:
    """What a submission must hold: frame size, rate, the (participant, sequence) pairs, the cameras, the frame
    counts (None: unchecked) and the encoder's quality."""

    width: int
    height: int
    fps: float
    sequences: dict[int, str]
    serials: tuple[str, ...]
    frame_counts: dict[int, int] | None = None
    crf: int = 14

    def path(self, participant: int, sequence: str, serial: str) -> str:
        return f"{participant:03d}/{sequence}/cam_{serial}.mp4"

    def expected(self) -> list[str]:
        return [self.path(p, q, s) for p, q in self.sequences.items() for s in self.serials]


# nersemble-benchmark 0.2.0: BENCHMARK_NVS_IDS_AND_SEQUENCES, BENCHMARK_NVS_HOLD_OUT_SERIALS, the NVS writer's
# (fps, width, height) = (73, 1100, 1604) and its README's frame counts.
NVS = SubmissionSpec(
    width=1100, height=1604, fps=73.0,
    sequences={388: "GLASSES", 422: "EXP-2-eyes", 443: "FREE", 445: "EXP-6-tongue-1", 475: "HAIR"},
    serials=("222200046", "222200037", "222200039"),
    frame_counts={388: 1118, 422: 517, 443: 1108, 445: 514, 475: 259},
)  # fmt: skip


class SubmissionWriter:
    """Writes the submission .zip; it appears under its name only once closed without an error."""

    def __init__(self, path: str | Path, spec: SubmissionSpec = NVS):
        self.path, self.spec = Path(path), spec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._zip = zipfile.ZipFile(self._partial, "w", zipfile.ZIP_STORED)
        self.written: list[str] = []

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._zip.close()
        if kind is None:
            self._partial.replace(self.path)
        else:
            self._partial.unlink(missing_ok=True)

    def add_video(self, participant: int, sequence: str, serial: str, frames: Iterable[np.ndarray]) -> str:
        """Encodes uint8 RGB frames [H, W, 3] of one camera into `{participant:03d}/{sequence}/cam_{serial}.mp4`."""
        spec = self.spec
        if spec.sequences.get(participant) != sequence:
            raise ValueError(f"participant {participant} / sequence {sequence!r} is not in the benchmark "
                             f"({spec.sequences})")  # fmt: skip
        if serial not in spec.serials:
            raise ValueError(f"camera {serial} is not a hold-out camera of the benchmark {spec.serials}")
        name = spec.path(participant, sequence, serial)
        staging = self._partial.with_name(f".{participant:03d}_{sequence}_{serial}.mp4")
        writer = imageio_ffmpeg.write_frames(
            str(staging), (spec.width, spec.height), fps=spec.fps, codec="libx264", quality=None,
            macro_block_size=1, output_params=["-crf", str(spec.crf)], ffmpeg_log_level="error",
        )  # fmt: skip
        writer.send(None)
        count = 0
        try:
            for frame in frames:
                frame = np.asarray(frame)
                if frame.dtype != np.uint8 or frame.shape != (spec.height, spec.width, 3):
                    raise ValueError(f"{name}: frame {count} is {frame.dtype} {list(frame.shape)}, the benchmark "
                                     f"needs uint8 [{spec.height}, {spec.width}, 3]")  # fmt: skip
                writer.send(np.ascontiguousarray(frame))
                count += 1
            writer.close()
            expected = (spec.frame_counts or {}).get(participant)
            if expected is not None and count != expected:
                raise ValueError(f"{name}: {count} frames, the benchmark's sequence has {expected}")
            self._zip.write(staging, name)
        finally:
            writer.close()
            staging.unlink(missing_ok=True)
        self.written.append(name)
        return name


def read_video(data: bytes) -> tuple[np.ndarray, float]:
    """An MP4's frames [T, H, W, 3] uint8 and frame rate."""
    with _temporary(data) as path:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames), float(meta["fps"])


class _temporary:
    """`data` in a temporary file for ffmpeg, removed afterwards."""

    def __init__(self, data: bytes):
        handle = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False)
        handle.write(data)
        handle.close()
        self.path = Path(handle.name)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def check_submission(path: str | Path, spec: SubmissionSpec = NVS) -> list[str]:
    """What the toolkit's reader would flag: missing videos, wrong frame counts, wrong sizes (empty if none)."""
    problems = []
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for name in spec.expected():
            if name not in names:
                problems.append(f"{name}: missing")
                continue
            frames, fps = read_video(archive.read(name))
            participant = int(name.split("/")[0])
            expected = (spec.frame_counts or {}).get(participant)
            if expected is not None and len(frames) != expected:
                problems.append(f"{name}: {len(frames)} frames, expected {expected}")
            if frames.shape[1:3] != (spec.height, spec.width):
                problems.append(f"{name}: {frames.shape[2]}x{frames.shape[1]}, expected {spec.width}x{spec.height}")
            if abs(fps - spec.fps) > 1e-3:
                problems.append(f"{name}: {fps} fps, expected {spec.fps}")
    return problems


def scaled_camera(camera: layout.Camera, width: int, height: int) -> layout.Camera:
    """The camera rendering a width x height image of the same view (intrinsics scaled per axis)."""
    k = np.array(camera.intrinsics, np.float64)
    k[0] *= width / camera.width
    k[1] *= height / camera.height
    return dataclasses.replace(camera, intrinsics=k, width=width, height=height)


def render_sequence(prior: UHAP, scan_maps: np.ndarray, template: template_lib.Template, tracked_mesh: bool,
                    root: Path, subject: str, sequence: str, cameras: Sequence[layout.Camera],
                    input_cameras: Sequence[str], spec: SubmissionSpec = NVS, batch_size: int = 4,
                    ) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """(serial, uint8 frames [T, H, W, 3]) at each hold-out camera of a capture-layout sequence, at the spec's
    frame size: codes from the prior's encoder on `input_cameras`, identity `scan_maps`, head pose from meta.json."""
    seq_dir = layout.sequence_dir(root, subject, sequence)
    meta = layout.read_sequence_meta(seq_dir)
    count = meta["num_frames"]
    pose = meta.get("head_pose")
    head_pose = (np.concatenate([np.asarray(pose["rotation_vector"]), np.asarray(pose["translation"])], -1)
                 if pose is not None else np.zeros((count, 6))).astype(np.float32)  # fmt: skip
    has_mesh = (seq_dir / layout.VERTICES_FILE).is_file()
    vertices = layout.read_vertices(seq_dir, num_frames=count) if has_mesh else None
    calibration = layout.read_calibration(layout.subject_dir(root, subject))
    inputs = benchmark.camera_frames(seq_dir, input_cameras, np.arange(count), "images")
    clip = benchmark.Clip(
        subject, sequence, sequence, "", float(meta["fps"]), np.zeros(0, np.float32), head_pose, vertices, (),
        np.zeros(0), np.zeros(0), tuple(calibration[s] for s in input_cameras), inputs,
    )  # fmt: skip
    codes = benchmark.encode_clip(prior, clip, scan_maps, template, tracked_mesh and has_mesh, batch_size)
    for camera in cameras:
        renderer = benchmark.Renderer(prior, scan_maps, [scaled_camera(camera, spec.width, spec.height)], batch_size)
        images, _ = renderer(codes, head_pose)
        yield camera.serial, np.round(images[:, 0] * 255.0).astype(np.uint8)


def write_submission(out: str | Path, renders: Iterable[tuple[int, str, Iterator[tuple[str, np.ndarray]]]],
                     spec: SubmissionSpec = NVS) -> Path:  # fmt: skip
    """The .zip from (participant, sequence, `render_sequence(...)`) triples (`check_submission` reads it back)."""
    out = Path(out)
    with SubmissionWriter(out, spec) as writer:
        for participant, sequence, cameras in renders:
            for serial, frames in cameras:
                writer.add_video(participant, sequence, serial, frames)
    return out
