"""Multiface (Meta Reality Labs, Mugsy captures) → capture layout.

Source layout of one participant folder (e.g. `m--20180227--0000--6795937--GHS`):
```
KRT                                         per camera: name; 3 rows of K; k1 k2 p1 p2 k3; 3 rows [R | t]
                                            (world to camera, OpenCV axes, millimetres); a blank line
images/<EXP>/<camera>/<frame:06d>.png       30 fps captures, lens distortion still in them
audio/<EXP>.wav                             speech sentences only, any rate and channel count
tracked_mesh/<EXP>/<frame>.bin|.obj         float32 vertices in head space (mm), and
tracked_mesh/<EXP>/<frame>_transform.txt    the 3x4 head pose [R | t] taking head space to world (mm)
```
The importer turns millimetres into metres, removes the lens distortion (same K afterwards), resamples
the audio to 16 kHz mono, and writes tracked meshes as world-space `vertices.npy`, head poses in meta.json.
Audio is taken to start at the first frame of its expression.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data_pipelines import layout
from data_pipelines.importers import common, lens
from data_pipelines.layout import LayoutError

CAPTURE_FPS = 30.0
MILLIMETRES_PER_METRE = 1000.0
FORMAT_NAME = "multiface"


@dataclasses.dataclass(frozen=True)
class KrtCamera:
    """One KRT block, already in metres: K [3,3], distortion (k1 k2 p1 p2 k3), world_to_cam [4,4]."""

    name: str
    intrinsics: np.ndarray
    distortion: np.ndarray
    world_to_cam: np.ndarray


@dataclasses.dataclass(frozen=True)
class MultifaceOptions:
    sequences: Sequence[str] | None = None  # import only these expressions; None: every one
    max_audio_overhang_s: float = 0.5


def _numbers(path: Path, number: int, line: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise LayoutError(f"{path}:{number}: {what} needs {count} numbers, got {line.strip()!r}")
    if not np.all(np.isfinite(values)):
        raise LayoutError(f"{path}:{number}: {what} contains NaN or inf")
    return values


def read_krt(path: Path) -> dict[str, KrtCamera]:
    """Parses a KRT file; every malformed block is a LayoutError with the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: camera calibration (KRT) is missing")
    lines = path.read_text().splitlines()
    cameras: dict[str, KrtCamera] = {}
    index = 0
    while index < len(lines):
        name = lines[index].strip()
        if not name:
            index += 1
            continue
        if len(lines) < index + 8:
            raise LayoutError(f"{path}:{index + 1}: the file ends inside the block of camera {name}")
        rows = [(index + 2 + r, lines[index + 1 + r]) for r in range(7)]
        k = [_numbers(path, n, text, 3, f"camera {name}: an intrinsics row") for n, text in rows[:3]]
        distortion = _numbers(path, rows[3][0], rows[3][1], 5, f"camera {name}: the distortion row")
        extrinsic = np.array([_numbers(path, n, text, 4, f"camera {name}: an [R|t] row") for n, text in rows[4:]])
        intrinsics = np.array(k)
        common.check_intrinsics(intrinsics, Path(f"{path}:{index + 2}"), f"camera {name}")
        common.check_rotation(extrinsic[:, :3], Path(f"{path}:{index + 6}"), f"camera {name}'s [R|t]")
        if name in cameras:
            raise LayoutError(f"{path}:{index + 1}: camera {name} appears twice")
        world_to_cam = common.rigid_world_to_cam(extrinsic[:, :3], extrinsic[:, 3] / MILLIMETRES_PER_METRE)
        cameras[name] = KrtCamera(name, intrinsics, np.array(distortion), world_to_cam)
        index += 8
    if not cameras:
        raise LayoutError(f"{path}: no camera blocks")
    return cameras


def find_participants(src: Path) -> tuple[list[Path], list[tuple[Path, LayoutError]]]:
    """`src` itself when it holds a KRT file, else its folders: participants, and the unusable ones."""
    return common.find_participant_dirs(src, Path("KRT"), "Multiface")


def _frame_ids(expression_dir: Path, cameras: list[str]) -> list[str]:
    """The frame stems every camera must have; a camera short of one is a LayoutError naming the file."""
    per_camera = {}
    for camera in cameras:
        stems = [p.stem for p in (expression_dir / camera).glob("*.png")]
        bad = [s for s in stems if not s.isdigit()]
        if bad:
            raise LayoutError(f"{expression_dir / camera / (bad[0] + '.png')}: frame names must be numbers")
        per_camera[camera] = set(stems)
    every = sorted(set().union(*per_camera.values()), key=int)
    for camera, stems in per_camera.items():
        for stem in every:
            if stem not in stems:
                raise LayoutError(
                    f"{expression_dir / camera / (stem + '.png')}: image file is missing "
                    f"(camera {camera} has {len(stems)} of the expression's {len(every)} frames)"
                )
    if not every:
        raise LayoutError(f"{expression_dir}: no frames")
    steps = set(np.diff([int(s) for s in every]).tolist())
    if len(steps) > 1:
        raise LayoutError(f"{expression_dir}: frame numbers are irregularly spaced (steps {sorted(steps)})")
    return every


def _read_vertices(mesh_dir: Path, stem: str) -> np.ndarray:
    binary, obj = mesh_dir / f"{stem}.bin", mesh_dir / f"{stem}.obj"
    if binary.is_file():
        flat = np.fromfile(binary, dtype="<f4")
        if flat.size == 0 or flat.size % 3:
            raise LayoutError(f"{binary}: {flat.size} floats, not a whole number of xyz vertices")
        vertices, source = flat.reshape(-1, 3).astype(np.float64), binary
    elif obj.is_file():
        rows = [line.split()[1:4] for line in obj.read_text().splitlines() if line.startswith("v ")]
        try:
            vertices, source = np.array(rows, np.float64).reshape(-1, 3), obj
        except ValueError as error:
            raise LayoutError(f"{obj}: unreadable vertex lines ({error})") from error
    else:
        raise LayoutError(f"{binary}: tracked mesh is missing (neither .bin nor .obj)")
    if not np.all(np.isfinite(vertices)):
        raise LayoutError(f"{source}: vertices contain NaN or inf")
    return vertices


def _read_head_pose(mesh_dir: Path, stem: str) -> np.ndarray:
    """`<frame>_transform.txt` [R | t] (mm) → 4x4 head-to-world in metres."""
    path = mesh_dir / f"{stem}_transform.txt"
    if not path.is_file():
        raise LayoutError(f"{path}: head pose of a tracked mesh is missing")
    try:
        values = np.loadtxt(path, ndmin=2)
    except ValueError as error:
        raise LayoutError(f"{path}: not a numeric matrix ({error})") from error
    pose = common.finite_array(values[:3], (3, 4), path, "the head pose")
    return common.rigid_world_to_cam(pose[:, :3], pose[:, 3] / MILLIMETRES_PER_METRE)


def _write_tracked_meshes(mesh_dir: Path, stems: list[str], seq_dir: Path) -> list[list[list[float]]]:
    """World-space vertices in metres into vertices.npy; returns the head poses for meta.json."""
    vertices, poses = [], []
    for stem in stems:
        head_vertices = _read_vertices(mesh_dir, stem) / MILLIMETRES_PER_METRE
        if vertices and head_vertices.shape != vertices[0].shape:
            raise LayoutError(
                f"{mesh_dir / stem}: {len(head_vertices)} vertices, but frame {stems[0]} has {len(vertices[0])}"
            )
        pose = _read_head_pose(mesh_dir, stem)
        vertices.append(head_vertices @ pose[:3, :3].T + pose[:3, 3])
        poses.append(pose.tolist())
    layout.write_vertices(seq_dir, np.stack(vertices))
    return poses


def import_participant(
    participant_dir: Path,
    out_root: Path,
    options: MultifaceOptions,
    on_bad_sequence: Callable[[str, LayoutError], None] | None = None,
) -> list[str]:
    """Imports one participant into `out_root/subjects/<folder name>`; all or nothing. Returns notes.

    An expression that fails is an error, or, given `on_bad_sequence`, reported to it and left out.
    """
    participant = _Participant(Path(participant_dir), read_krt(Path(participant_dir) / "KRT"), options)
    expressions = common.select_subdirs(participant.directory / "images", options.sequences, "expressions")
    notes: list[str] = []
    subject = participant.directory.name
    with layout.staged_dir(layout.subject_dir(out_root, subject)) as staging:
        imported = 0
        for expression in expressions:
            cameras = dict(participant.cameras)
            try:
                notes += participant.write_expression(expression, staging / "sequences" / expression)
            except LayoutError as error:
                if on_bad_sequence is None:
                    raise
                participant.cameras = cameras  # the failed expression's cameras are not kept
                shutil.rmtree(staging / "sequences" / expression, ignore_errors=True)
                on_bad_sequence(f"{subject}/{expression}", error)
                continue
            imported += 1
        if not imported:
            raise LayoutError(f"{participant_dir}: none of its {len(expressions)} expressions could be imported")
        layout.write_calibration(staging, list(participant.cameras.values()))
    return notes


@dataclasses.dataclass
class _Participant:
    directory: Path
    krt: dict[str, KrtCamera]
    options: MultifaceOptions
    cameras: dict[str, layout.Camera] = dataclasses.field(default_factory=dict)

    def _read_image(self, path: Path, name: str) -> np.ndarray:
        """Reads one source image and holds every image of camera `name` to the size of its first one."""
        image = layout.read_image(path)
        height, width = image.shape[:2]
        krt = self.krt[name]
        if name not in self.cameras:
            krt_file = self.directory / "KRT"
            hint = "the KRT file belongs to other images"
            self.cameras[name] = common.checked_camera(name, krt.world_to_cam, krt.intrinsics, width, height,
                                                       krt_file, hint)  # fmt: skip
        camera = self.cameras[name]
        if (width, height) != (camera.width, camera.height):
            known = f"{camera.width}x{camera.height}"
            raise LayoutError(f"{path}: {width}x{height} pixels, but camera {name} is {known} elsewhere")
        return image

    def _write_camera(self, expression_dir: Path, name: str, stems: list[str], seq_dir: Path) -> None:
        """Undistorts one camera's frames; one sampling map per camera keeps memory to a single map."""
        sampling = None
        for index, stem in enumerate(stems):
            image = self._read_image(expression_dir / name / f"{stem}.png", name)
            if sampling is None:
                krt = self.krt[name]
                sampling = lens.undistortion_map(krt.intrinsics, krt.distortion, image.shape[1], image.shape[0])
            layout.write_image(layout.frame_path(seq_dir, name, index), lens.undistort_image(image, sampling))

    def write_expression(self, expression: str, seq_dir: Path) -> list[str]:
        """Undistorted images, audio, tracked meshes and meta.json of one expression; returns notes."""
        expression_dir = self.directory / "images" / expression
        names = sorted(p.name for p in expression_dir.iterdir() if p.is_dir())
        for name in names:
            if name not in self.krt:
                raise LayoutError(f"{expression_dir / name}: camera {name} is missing from {self.directory / 'KRT'}")
        stems = _frame_ids(expression_dir, names)
        for name in names:
            self._write_camera(expression_dir, name, stems, seq_dir)
        fps = CAPTURE_FPS / (int(stems[1]) - int(stems[0]) if len(stems) > 1 else 1)
        notes: list[str] = []
        audio_path = self.directory / "audio" / f"{expression}.wav"
        if audio_path.is_file():
            waveform, notes = layout.read_audio(audio_path)
            waveform, fit_notes = common.fit_audio_to_frames(
                waveform,
                num_frames=len(stems),
                fps=fps,
                source=audio_path,
                max_overhang_s=self.options.max_audio_overhang_s,
            )
            notes += fit_notes
            layout.write_audio(seq_dir / layout.AUDIO_FILE, waveform)
        extra = {}
        mesh_dir = self.directory / "tracked_mesh" / expression
        if mesh_dir.is_dir():
            extra["head_pose"] = _write_tracked_meshes(mesh_dir, stems, seq_dir)
        layout.write_sequence_meta(
            seq_dir,
            fps=fps,
            num_frames=len(stems),
            source=FORMAT_NAME,
            source_frames=[int(s) for s in stems],
            cameras=names,
            has_audio=audio_path.is_file(),
            undistorted=True,
            notes=notes,
            **extra,
        )
        return notes
