"""Gaussians <-> the 3D Gaussian Splatting PLY of Kerbl et al. (INRIA layout), readable by common splat viewers.

One binary little-endian `vertex` element, float32 properties in INRIA order: x y z, nx ny nz (zero),
f_dc_0..2 (colour as the degree-0 spherical-harmonic coefficient), opacity (logit), scale_0..2 (log),
rot_0..3 (wxyz, normalised). Colours are view-independent here: pass one camera's colours of a
view-dependent avatar. Files are written beside their destination and moved into place when complete.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
OPACITY_EPS = 1e-6
PROPERTY_NAMES = (
    *("x", "y", "z"),
    *("nx", "ny", "nz"),
    *("f_dc_0", "f_dc_1", "f_dc_2"),
    "opacity",
    *("scale_0", "scale_1", "scale_2"),
    *("rot_0", "rot_1", "rot_2", "rot_3"),
)
_PLY_TYPES = {  # both spellings of each PLY scalar type -> numpy type code
    name: code
    for names, code in [
        ("char int8", "i1"),
        ("uchar uint8", "u1"),
        ("short int16", "i2"),
        ("ushort uint16", "u2"),
        ("int int32", "i4"),
        ("uint uint32", "u4"),
        ("float float32", "f4"),
        ("double float64", "f8"),
    ]
    for name in names.split()
}
_ENDIAN = {"binary_little_endian": "<", "binary_big_endian": ">"}
_MAX_HEADER_BYTES = 1 << 16


class PlyGaussians(NamedTuple):
    """Gaussians read back from a PLY, in the rasterizer's conventions.

    float64, so that the activations undo the file's float32 encoding without rounding: writing them again
    reproduces every field bit for bit but the quaternions, which re-normalising may move by an ulp.
    """

    means: np.ndarray  # [N, 3]
    quats: np.ndarray  # [N, 4] wxyz, normalised
    scales: np.ndarray  # [N, 3] linear
    opacities: np.ndarray  # [N] in (0, 1)
    colors: np.ndarray  # [N, 3]


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def gaussian_fields(means, quats, scales, opacities, colors, source: str = "Gaussians") -> np.ndarray:
    """The PLY's vertex records: a structured float32 array [N] with `PROPERTY_NAMES` as fields.

    Opacities in [0, 1] are clipped to [1e-6, 1 - 1e-6] so that their logit is finite (a float32 sigmoid
    saturates to exactly 1; the rasterizer clamps alpha at 0.999 anyway); scales must be positive.
    """
    arrays = [np.asarray(a, np.float64) for a in (means, quats, scales, opacities, colors)]
    means, quats, scales, opacities, colors = arrays
    count = len(means)
    shapes = {
        "means": (count, 3),
        "quats": (count, 4),
        "scales": (count, 3),
        "opacities": (count,),
        "colors": (count, 3),
    }
    for (name, shape), array in zip(shapes.items(), arrays):
        if array.shape != shape:
            raise ValueError(f"{source}: {name} has shape {list(array.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{source}: {name} holds NaN or inf")
    if np.any(opacities < 0) or np.any(opacities > 1):
        raise ValueError(f"{source}: opacities must lie in [0, 1]; range is [{opacities.min()}, {opacities.max()}]")
    opacities = np.clip(opacities, OPACITY_EPS, 1.0 - OPACITY_EPS)
    if np.any(scales <= 0):
        raise ValueError(f"{source}: scales must be positive; the smallest is {scales.min()}")
    norms = np.linalg.norm(quats, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{source}: quats holds a zero quaternion")
    normals = np.zeros_like(means)  # unused by 3DGS, kept for the layout viewers expect
    sh_dc = (colors - 0.5) / SH_C0
    columns = np.concatenate([means, normals, sh_dc, _logit(opacities)[:, None], np.log(scales), quats / norms], -1)
    records = np.empty(count, dtype=[(name, "<f4") for name in PROPERTY_NAMES])
    for index, name in enumerate(PROPERTY_NAMES):
        records[name] = columns[:, index]
    return records


def write_ply(path: Path, means, quats, scales, opacities, colors) -> Path:
    """Writes one frame of N Gaussians ([N, 3], [N, 4] wxyz, [N, 3] linear, [N], [N, 3]) to `path`."""
    path = Path(path)
    records = gaussian_fields(means, quats, scales, opacities, colors, source=str(path))
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(records)}"]
    header += [f"property float {name}" for name in PROPERTY_NAMES] + ["end_header"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(partial, "wb") as file:
            file.write(("\n".join(header) + "\n").encode("ascii"))
            file.write(records.tobytes())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_ply_frames(directory: Path, means, quats, scales, opacities, colors, *, first_frame: int = 0) -> list[Path]:
    """One PLY per frame, `<directory>/frame_<index:05d>.ply`, from arrays with a leading frame axis [T, ...]."""
    directory = Path(directory)
    frames = [np.asarray(a) for a in (means, quats, scales, opacities, colors)]
    if len({len(a) for a in frames}) != 1:
        raise ValueError(f"{directory}: the arrays disagree on the number of frames: {[len(a) for a in frames]}")
    return [
        write_ply(directory / f"frame_{first_frame + t:05d}.ply", *(a[t] for a in frames))
        for t in range(len(frames[0]))
    ]


def _parse_header(data: bytes, path: Path) -> tuple[int, np.dtype, int]:
    """The vertex count, the record dtype and the byte offset of the data of a binary PLY."""
    end = data.find(b"end_header\n", 0, _MAX_HEADER_BYTES)
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file (no 'ply' magic or no 'end_header' line)")
    lines = [line.strip() for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]]
    count, endian, fields, element = None, None, [], None
    for line in lines:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) != 3 or words[1] not in _ENDIAN:
                raise ValueError(f"{path}: unsupported PLY format {line!r} (need binary, not ascii)")
            endian = _ENDIAN[words[1]]
        elif words[0] == "element":
            if element is not None or len(words) != 3 or words[1] != "vertex":
                raise ValueError(f"{path}: expected a single 'vertex' element, found {line!r}")
            if not words[2].isdigit():
                raise ValueError(f"{path}: the vertex count in {line!r} is not a non-negative integer")
            element, count = "vertex", int(words[2])
        elif words[0] == "property":
            if element is None or len(words) != 3 or words[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unsupported property line {line!r} (lists are not supported)")
            fields.append((words[2], _PLY_TYPES[words[1]]))
        else:
            raise ValueError(f"{path}: unexpected header line {line!r}")
    if endian is None or count is None:
        raise ValueError(f"{path}: the header lacks a 'format' or an 'element vertex' line")
    return count, np.dtype([(name, endian + kind) for name, kind in fields]), end + len(b"end_header\n")


def read_ply_fields(path: Path) -> np.ndarray:
    """The raw vertex records of a binary PLY as a structured array [N] (any property order and types)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PLY file is missing")
    data = path.read_bytes()
    count, dtype, offset = _parse_header(data, path)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: the header promises {count} vertices of {dtype.itemsize} bytes, but {len(data) - offset} "
            "bytes follow it"
        )
    return np.frombuffer(data, dtype, count, offset)


def read_ply(path: Path) -> PlyGaussians:
    """Reads a 3DGS PLY (ours or another tool's: extra properties such as f_rest_* are ignored)."""
    records = read_ply_fields(path)
    missing = [name for name in PROPERTY_NAMES if name not in (records.dtype.names or ())]
    if missing:
        raise ValueError(f"{path}: not a 3D Gaussian PLY; properties {missing} are missing")

    def columns(*names: str) -> np.ndarray:
        return np.stack([records[name].astype(np.float64) for name in names], axis=-1)

    quats = columns("rot_0", "rot_1", "rot_2", "rot_3")
    return PlyGaussians(
        means=columns("x", "y", "z"),
        quats=quats / np.linalg.norm(quats, axis=-1, keepdims=True),
        scales=np.exp(columns("scale_0", "scale_1", "scale_2")),
        opacities=_sigmoid(records["opacity"].astype(np.float64)),
        colors=0.5 + SH_C0 * columns("f_dc_0", "f_dc_1", "f_dc_2"),
    )
