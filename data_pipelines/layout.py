"""The on-disk capture layout of DESIGN.md (metres, OpenCV axes, distortion-free), read and written here.

```
<root>/dataset.json                          the split: held-out identities, sentences, cameras, ...
<root>/subjects/<id>/calibration/camera_params.json
    {"world_2_cam": {serial: 4x4}, "intrinsics": {serial: 3x3}, "image_size": {serial: [W, H]}}
<root>/subjects/<id>/neutral_scan/mesh.ply   (or mesh.obj) vertices, faces, per-vertex colours
<root>/subjects/<id>/neutral_scan/scan.ply   optional: the raw scan that mesh.ply registers (any topology)
<root>/subjects/<id>/sequences/<seq>/audio.wav
<root>/subjects/<id>/sequences/<seq>/images/cam_<serial>/<frame:05d>.png
<root>/subjects/<id>/sequences/<seq>/masks/cam_<serial>/<frame:05d>.png
<root>/subjects/<id>/sequences/<seq>/meta.json     fps, num_frames, and whatever else the writer adds
<root>/subjects/<id>/sequences/<seq>/vertices.npy  synthetic data only: ground-truth meshes [F, V, 3]
```
Both the synthetic generator and the importers write it, so every check on bad input lives here: each
error is a `LayoutError` whose message names the offending file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import struct
import tempfile
import wave
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipelines import audio_io
from data_pipelines.audio_io import AUDIO_RATE
from data_pipelines.errors import LayoutError

CALIBRATION_FILE = Path("calibration") / "camera_params.json"
DATASET_FILE = "dataset.json"
META_FILE = "meta.json"
VERTICES_FILE = "vertices.npy"
AUDIO_FILE = "audio.wav"
SCAN_DIR = "neutral_scan"
SCAN_FILE = "mesh.ply"  # in the template's topology where a model reads it
RAW_SCAN_FILE = "scan.ply"  # the raw scan, in its own topology, with holes


@dataclasses.dataclass(frozen=True)
class Camera:
    """A distortion-free pinhole camera in OpenCV axes; `world_to_cam` maps world to camera metres."""

    serial: str
    world_to_cam: np.ndarray  # [4, 4] float64
    intrinsics: np.ndarray  # [3, 3] float64, pixels
    width: int
    height: int


# -------------------- JSON files


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LayoutError(f"{path}: file is missing")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayoutError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(payload, dict):
        raise LayoutError(f"{path}: expected a JSON object at the top level, got {type(payload).__name__}")
    return payload


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_matrix(value, shape: tuple[int, ...], path: Path, what: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise LayoutError(f"{path}: {what} is not a numeric matrix ({error})") from error
    if matrix.shape != shape:
        raise LayoutError(f"{path}: {what} has shape {list(matrix.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(matrix)):
        raise LayoutError(f"{path}: {what} contains NaN or inf")
    return matrix


# -------------------- calibration


def write_calibration(subject_dir: Path, cameras: Sequence[Camera]) -> None:
    """Writes `calibration/camera_params.json`; refuses duplicate serials and non-finite matrices."""
    path = Path(subject_dir) / CALIBRATION_FILE
    serials = [camera.serial for camera in cameras]
    if len(set(serials)) != len(serials):
        raise LayoutError(f"{path}: duplicate camera serials in {serials}")
    for camera in cameras:
        _finite_matrix(camera.world_to_cam, (4, 4), path, f"world_2_cam of camera {camera.serial}")
        _finite_matrix(camera.intrinsics, (3, 3), path, f"intrinsics of camera {camera.serial}")
    _write_json(
        path,
        {
            "world_2_cam": {c.serial: np.asarray(c.world_to_cam, np.float64).tolist() for c in cameras},
            "intrinsics": {c.serial: np.asarray(c.intrinsics, np.float64).tolist() for c in cameras},
            "image_size": {c.serial: [int(c.width), int(c.height)] for c in cameras},
        },
    )


def read_calibration(subject_dir: Path) -> dict[str, Camera]:
    """Reads and validates `calibration/camera_params.json` into `{serial: Camera}`, sorted by serial."""
    path = Path(subject_dir) / CALIBRATION_FILE
    payload = _read_json(path)
    for key in ("world_2_cam", "intrinsics", "image_size"):
        if not isinstance(payload.get(key), dict):
            raise LayoutError(f"{path}: missing the {key!r} mapping from camera serial to value")
    extrinsics, intrinsics, sizes = payload["world_2_cam"], payload["intrinsics"], payload["image_size"]
    if not extrinsics:
        raise LayoutError(f"{path}: no cameras in 'world_2_cam'")
    cameras = {}
    for serial in sorted(extrinsics):
        if serial not in intrinsics:
            raise LayoutError(f"{path}: camera {serial} has no intrinsics")
        if serial not in sizes:
            raise LayoutError(f"{path}: camera {serial} has no image_size")
        world_to_cam = _finite_matrix(extrinsics[serial], (4, 4), path, f"world_2_cam of camera {serial}")
        if not np.allclose(world_to_cam[3], [0, 0, 0, 1]):
            last_row = world_to_cam[3].tolist()
            raise LayoutError(f"{path}: world_2_cam of camera {serial} has last row {last_row}")
        rotation = world_to_cam[:3, :3]
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(rotation) <= 0:
            raise LayoutError(f"{path}: world_2_cam of camera {serial} is not a rigid transform")
        k = _finite_matrix(intrinsics[serial], (3, 3), path, f"intrinsics of camera {serial}")
        if k[0, 0] <= 0 or k[1, 1] <= 0 or not np.allclose(k[2], [0, 0, 1]):
            raise LayoutError(f"{path}: intrinsics of camera {serial} are not a pinhole matrix: {k.tolist()}")
        size = sizes[serial]
        if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(s) for s in size)):
            raise LayoutError(f"{path}: image_size of camera {serial} must be [W, H] > 0, not {size}")
        cameras[serial] = Camera(serial, world_to_cam, k, width=size[0], height=size[1])
    extra = (set(intrinsics) | set(sizes)) - set(extrinsics)
    if extra:
        raise LayoutError(f"{path}: cameras {sorted(extra)} have intrinsics or a size but no world_2_cam")
    return cameras


# -------------------- meta files


def write_sequence_meta(seq_dir: Path, *, fps: float, num_frames: int, **extra) -> None:
    """Writes `meta.json`: fps and num_frames, plus any JSON-serialisable extras (head pose, split, ...)."""
    _write_json(Path(seq_dir) / META_FILE, {"fps": float(fps), "num_frames": int(num_frames), **extra})


def read_sequence_meta(seq_dir: Path) -> dict:
    """Reads `meta.json` and checks that fps is a positive number and num_frames a positive int."""
    path = Path(seq_dir) / META_FILE
    meta = _read_json(path)
    fps, num_frames = meta.get("fps"), meta.get("num_frames")
    if not isinstance(fps, int | float) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise LayoutError(f"{path}: 'fps' must be a positive number, got {fps!r}")
    if not _positive_int(num_frames):
        raise LayoutError(f"{path}: 'num_frames' must be a positive int, got {num_frames!r}")
    return meta


def write_dataset_info(root: Path, info: dict) -> None:
    """Writes the top-level `dataset.json` (split: held-out identities, sentences, camera serials, ...)."""
    _write_json(Path(root) / DATASET_FILE, info)


def read_dataset_info(root: Path) -> dict:
    return _read_json(Path(root) / DATASET_FILE)


def write_vertices(seq_dir: Path, vertices: np.ndarray) -> None:
    """Writes ground-truth per-frame mesh vertices `vertices.npy` [F, V, 3] float32 metres."""
    vertices = np.asarray(vertices, np.float32)
    path = Path(seq_dir) / VERTICES_FILE
    if vertices.ndim != 3 or vertices.shape[2] != 3 or not np.all(np.isfinite(vertices)):
        raise LayoutError(f"{path}: vertices must be finite [F,V,3], got {list(vertices.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vertices)


def read_vertices(seq_dir: Path, *, num_frames: int | None = None) -> np.ndarray:
    """Reads `vertices.npy` [F, V, 3]; checks the frame count against `num_frames` when given."""
    path = Path(seq_dir) / VERTICES_FILE
    if not path.is_file():
        raise LayoutError(f"{path}: ground-truth vertices are missing")
    try:
        vertices = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise LayoutError(f"{path}: not a readable .npy array ({error})") from error
    if vertices.ndim != 3 or vertices.shape[2] != 3 or not np.all(np.isfinite(vertices)):
        raise LayoutError(f"{path}: vertices must be finite [F,V,3], got {list(vertices.shape)}")
    if num_frames is not None and len(vertices) != num_frames:
        raise LayoutError(f"{path}: {len(vertices)} frames of vertices, but meta.json says {num_frames}")
    return vertices.astype(np.float32)


# -------------------- audio


def write_audio(path: Path, waveform: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Writes float32 mono in [-1, 1] as 16-bit PCM WAV (clipping, never wrapping)."""
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
        raise LayoutError(f"{path}: expected a mono waveform [T], got shape {list(waveform.shape)}")
    if not np.all(np.isfinite(waveform)):
        raise LayoutError(f"{path}: waveform contains NaN or inf")
    pcm = np.clip(np.round(waveform * 32768.0), -32768, 32767).astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(rate))
        writer.writeframes(pcm.tobytes())


def read_audio(path: Path, *, target_rate: int = AUDIO_RATE) -> tuple[np.ndarray, list[str]]:
    """Any audio file (WAV of any sample format, MP3, M4A, FLAC, ...) as float32 mono at `target_rate`; notes say
    what was mixed down or resampled. Empty, too short or damaged files are LayoutErrors (`audio_io`)."""
    return audio_io.read_audio(path, target_rate=target_rate)


# -------------------- images


def write_image(path: Path, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] colour or [H, W] grey image as PNG."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise LayoutError(f"{path}: expected uint8 [H,W,3] or [H,W], got {image.dtype} {list(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file of a uint8 [H, W, 3] or [H, W] image, written directly: every row "Up"-filtered and deflated at
    level 1. PIL took ~3x longer per 64^2 frame (its per-row filter search and per-file overhead; files ~2% smaller)
    and holds the GIL, while zlib releases it, so that writer threads encode in parallel."""
    height, width = image.shape[:2]
    rows = np.ascontiguousarray(image).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # the "Up" filter: each byte minus the byte above it (mod 256); row 0 sees zeros above
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    colour_type = 0 if image.ndim == 2 else 2  # grey or RGB, 8 bits a sample
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    data = zlib.compress(filtered.tobytes(), 1)
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def read_image(path: Path) -> np.ndarray:
    """Reads uint8 [H, W, 3] colour or [H, W] grey; a missing or corrupt file is a LayoutError."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: image file is missing")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise LayoutError(f"{path}: corrupt or unreadable image ({error})") from error


# -------------------- neutral scan


def write_neutral_scan(
    subject_dir: Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, *, file_name: str = SCAN_FILE
) -> None:
    """Writes `neutral_scan/mesh.ply` (binary): vertices [V,3] metres, faces [F,3], colours [V,3] in [0,1];
    `file_name=RAW_SCAN_FILE` writes the raw scan beside it."""
    path = Path(subject_dir) / SCAN_DIR / file_name
    vertices, faces, colors = _check_scan(path, vertices, faces, colors)
    vertex_records = np.empty(
        len(vertices), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)]
    )  # x y z float, red green blue uchar
    vertex_records["xyz"] = vertices
    vertex_records["rgb"] = np.round(np.clip(colors, 0.0, 1.0) * 255.0).astype(np.uint8)
    face_records = np.empty(len(faces), dtype=[("count", "u1"), ("indices", "<i4", 3)])
    face_records["count"] = 3
    face_records["indices"] = faces
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode("ascii") + vertex_records.tobytes() + face_records.tobytes())


def _check_scan(path: Path, vertices, faces, colors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices, np.float32)
    faces = np.asarray(faces, np.int64)
    colors = np.asarray(colors, np.float32)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.all(np.isfinite(vertices)):
        raise LayoutError(f"{path}: vertices must be finite [V,3], got {list(vertices.shape)}")
    in_range = faces.size == 0 or (faces.min() >= 0 and faces.max() < len(vertices))
    if faces.ndim != 2 or faces.shape[1] != 3 or not in_range:
        raise LayoutError(f"{path}: faces must be [F,3] indices into {len(vertices)} vertices")
    if colors.shape != vertices.shape or not np.all(np.isfinite(colors)):
        raise LayoutError(f"{path}: colours must be finite [V,3] like the vertices, got {list(colors.shape)}")
    return vertices, faces, colors


def read_neutral_scan(subject_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads `neutral_scan/mesh.ply` (as written here) or `mesh.obj` (`v x y z r g b`, triangle `f` lines).

    Returns vertices [V,3] float32 metres, faces [F,3] int32, colours [V,3] float32 in [0,1].
    """
    scan_dir = Path(subject_dir) / SCAN_DIR
    ply, obj = scan_dir / "mesh.ply", scan_dir / "mesh.obj"
    if ply.is_file():
        vertices, faces, colors = _read_ply(ply)
        path = ply
    elif obj.is_file():
        vertices, faces, colors = _read_colored_obj(obj)
        path = obj
    else:
        raise LayoutError(f"{scan_dir}: no neutral scan (expected mesh.ply or mesh.obj)")
    vertices, faces, colors = _check_scan(path, vertices, faces, colors)
    return vertices, faces.astype(np.int32), colors


def read_raw_scan(subject_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads the optional raw scan `neutral_scan/scan.ply` (any topology): vertices, faces, colours."""
    path = Path(subject_dir) / SCAN_DIR / RAW_SCAN_FILE
    if not path.is_file():
        raise LayoutError(f"{path}: no raw scan (it is optional; mesh.ply is the registered scan)")
    vertices, faces, colors = _check_scan(path, *_read_ply(path))
    return vertices, faces.astype(np.int32), colors


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise LayoutError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    expected_props = ["x", "y", "z", "red", "green", "blue"]
    if "format binary_little_endian 1.0" not in header:
        raise LayoutError(f"{path}: only binary_little_endian PLY is supported")
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element ")}
    props = [line.split()[-1] for line in header if line.startswith("property ") and " list " not in line]
    if props != expected_props or "vertex" not in counts or "face" not in counts:
        raise LayoutError(f"{path}: expected vertex x y z red green blue and a face list, got {props}")
    body = data[end + len("end_header\n") :]
    vertex_dtype = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)])
    face_dtype = np.dtype([("count", "u1"), ("indices", "<i4", 3)])
    expected_size = counts["vertex"] * vertex_dtype.itemsize + counts["face"] * face_dtype.itemsize
    if len(body) != expected_size:
        raise LayoutError(f"{path}: truncated or non-triangle PLY ({len(body)} bytes, need {expected_size})")
    vertex_records = np.frombuffer(body, vertex_dtype, counts["vertex"])
    faces_offset = counts["vertex"] * vertex_dtype.itemsize
    face_records = np.frombuffer(body, face_dtype, counts["face"], offset=faces_offset)
    if np.any(face_records["count"] != 3):
        raise LayoutError(f"{path}: only triangle faces are supported")
    return vertex_records["xyz"], face_records["indices"], vertex_records["rgb"].astype(np.float32) / 255.0


def _read_colored_obj(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vertices, colors, faces = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            if len(parts) != 7:
                raise LayoutError(f"{path}:{number}: neutral-scan vertices need colours ('v x y z r g b')")
            vertices.append([float(p) for p in parts[1:4]])
            colors.append([float(p) for p in parts[4:7]])
        elif parts[0] == "f":
            if len(parts) != 4:
                raise LayoutError(f"{path}:{number}: only triangle faces are supported")
            faces.append([int(p.split("/")[0]) - 1 for p in parts[1:]])
    return np.asarray(vertices), np.asarray(faces).reshape(-1, 3), np.asarray(colors)


# -------------------- directories


@contextlib.contextmanager
def staged_dir(final_dir: Path) -> Iterator[Path]:
    """Yields an empty temp dir beside `final_dir` and moves it into place only if the block succeeds.

    A crash or an exception leaves no half-written `final_dir`; an existing `final_dir` is replaced only then
    (`replace_dir`).
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.staging-", dir=final_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final_dir)


def replace_dir(staging: Path, final_dir: Path) -> None:
    """Moves the finished `staging` folder to `final_dir` (same file system). An existing `final_dir` is moved
    aside first and deleted last, so an interruption leaves the old or the new folder, never neither (at worst
    the old one under `.<name>.old-*` beside it)."""
    staging, final_dir = Path(staging), Path(final_dir)
    if not final_dir.exists():
        staging.rename(final_dir)
        return
    aside_parent = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
    aside = aside_parent / final_dir.name
    final_dir.rename(aside)
    try:
        staging.rename(final_dir)
    except BaseException:
        aside.rename(final_dir)  # the old folder goes back: never left missing by us
        shutil.rmtree(aside_parent, ignore_errors=True)
        raise
    shutil.rmtree(aside_parent, ignore_errors=True)


def subject_dir(root: Path, subject: str) -> Path:
    return Path(root) / "subjects" / subject


def sequence_dir(root: Path, subject: str, sequence: str) -> Path:
    return subject_dir(root, subject) / "sequences" / sequence


def list_subjects(root: Path) -> list[str]:
    """Subject ids under `root/subjects`, sorted."""
    subjects = Path(root) / "subjects"
    if not subjects.is_dir():
        raise LayoutError(f"{subjects}: no subjects directory")
    return sorted(p.name for p in subjects.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_sequences(subject_path: Path) -> list[str]:
    """Sequence names under `subject_path/sequences`, sorted."""
    sequences = Path(subject_path) / "sequences"
    if not sequences.is_dir():
        raise LayoutError(f"{sequences}: no sequences directory")
    return sorted(p.name for p in sequences.iterdir() if p.is_dir() and not p.name.startswith("."))


def frame_path(seq_dir: Path, serial: str, frame: int, *, kind: str = "images") -> Path:
    """`<seq>/<kind>/cam_<serial>/<frame:05d>.png`, where kind is "images" or "masks"."""
    if kind not in ("images", "masks"):
        raise ValueError(f"kind must be 'images' or 'masks', got {kind!r}")
    return Path(seq_dir) / kind / f"cam_{serial}" / f"{frame:05d}.png"


def frame_paths(seq_dir: Path, serial: str, *, kind: str = "images") -> list[Path]:
    """Every frame file of one camera, sorted by frame index; a missing camera folder is a LayoutError."""
    folder = frame_path(seq_dir, serial, 0, kind=kind).parent
    if not folder.is_dir():
        raise LayoutError(f"{folder}: no {kind} for camera {serial}")
    return sorted(folder.glob("[0-9]*.png"), key=lambda p: int(p.stem))
