"""Where an animation is seen from: one camera per output frame, in OpenCV axes (x right, y down, z forward).

World axes are those of the capture layout and the synthetic generator: metres, y up, the head centred at
the origin and facing -z, so a front camera sits on the -z axis. Three kinds of path: a fixed front camera,
an orbit around the head at constant distance, and a capture camera picked by serial from a calibration.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from data_pipelines import layout
from data_pipelines.importers.common import scale_intrinsics
from uhap_jax.geometry import cameras

HEAD_CENTRE = (0.0, 0.0, 0.0)
DEFAULT_DISTANCE = 0.9  # metres, as the synthetic capture rig
DEFAULT_FOV_DEG = 20.0


@dataclasses.dataclass(frozen=True)
class CameraPath:
    """Per-frame cameras: `world_to_cam` [T, 4, 4] and `intrinsics` [T, 3, 3] (pixels) for W x H images."""

    world_to_cam: np.ndarray
    intrinsics: np.ndarray
    width: int
    height: int

    def __post_init__(self):
        frames = len(self.world_to_cam)
        if self.world_to_cam.shape != (frames, 4, 4) or self.intrinsics.shape != (frames, 3, 3) or frames == 0:
            raise ValueError(
                f"camera path: need world_to_cam [T,4,4] and intrinsics [T,3,3] with T > 0, got "
                f"{list(self.world_to_cam.shape)} and {list(self.intrinsics.shape)}"
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"camera path: image size must be positive, got {self.width}x{self.height}")

    def __len__(self) -> int:
        return len(self.world_to_cam)


def _eye_on_sphere(centre: np.ndarray, distance: float, azimuth: np.ndarray, elevation: float) -> np.ndarray:
    """Camera positions [K, 3] at `distance` from `centre`; azimuth 0 is in front (-z), positive to +x."""
    offsets = np.stack(
        [
            np.sin(azimuth) * np.cos(elevation),
            np.full_like(azimuth, np.sin(elevation)),
            -np.cos(azimuth) * np.cos(elevation),
        ],
        axis=-1,
    )
    return centre + distance * offsets


def _check_view(num_frames: int, distance: float, fov_deg: float) -> None:
    if num_frames <= 0:
        raise ValueError(f"camera path: num_frames must be positive, got {num_frames}")
    if distance <= 0:
        raise ValueError(f"camera path: distance must be positive, got {distance}")
    if not 0 < fov_deg < 180:
        raise ValueError(f"camera path: fov_deg must lie in (0, 180), got {fov_deg}")


def _looking_at(eyes: np.ndarray, centre: np.ndarray, fov_deg: float, width: int, height: int) -> CameraPath:
    world_to_cam = np.stack([cameras.look_at(eye, centre) for eye in eyes])
    intrinsics = np.broadcast_to(cameras.intrinsics_from_fov(fov_deg, width, height), (len(eyes), 3, 3))
    return CameraPath(world_to_cam, intrinsics.copy(), width, height)


def front(
    num_frames: int,
    *,
    width: int,
    height: int,
    distance: float = DEFAULT_DISTANCE,
    fov_deg: float = DEFAULT_FOV_DEG,
    elevation_deg: float = 0.0,
    centre=HEAD_CENTRE,
) -> CameraPath:
    """A fixed camera in front of the head (raised by `elevation_deg`), the same for every frame."""
    _check_view(num_frames, distance, fov_deg)
    centre = np.asarray(centre, np.float64)
    eye = _eye_on_sphere(centre, distance, np.zeros(1), np.deg2rad(elevation_deg))
    return _looking_at(np.repeat(eye, num_frames, axis=0), centre, fov_deg, width, height)


def orbit(
    num_frames: int,
    *,
    width: int,
    height: int,
    distance: float = DEFAULT_DISTANCE,
    fov_deg: float = DEFAULT_FOV_DEG,
    elevation_deg: float = 10.0,
    arc_deg: float = 360.0,
    centre=HEAD_CENTRE,
) -> CameraPath:
    """Cameras circling the head at constant distance and elevation, always looking at `centre`.

    A full circle (`arc_deg` >= 360) starts in front and takes `num_frames` equal steps without repeating the
    start, so a looped video has no stutter; a partial arc sweeps from -arc/2 to +arc/2, ends included.
    """
    _check_view(num_frames, distance, fov_deg)
    if arc_deg <= 0:
        raise ValueError(f"camera path: arc_deg must be positive, got {arc_deg}")
    if not -90 < elevation_deg < 90:
        raise ValueError(f"camera path: elevation_deg must lie in (-90, 90), got {elevation_deg}")
    if arc_deg >= 360.0:
        azimuths = 2 * np.pi * np.arange(num_frames) / num_frames  # from the front, round to the +x side
    else:
        half = np.deg2rad(arc_deg) / 2
        azimuths = np.linspace(-half, half, num_frames) if num_frames > 1 else np.zeros(1)
    centre = np.asarray(centre, np.float64)
    eyes = _eye_on_sphere(centre, distance, azimuths, np.deg2rad(elevation_deg))
    return _looking_at(eyes, centre, fov_deg, width, height)


def capture(subject_dir: Path, serial: str, num_frames: int, *, size: tuple[int, int] | None = None) -> CameraPath:
    """A capture camera of `subject_dir`'s calibration, the same for every frame.

    `size` (W, H) renders at another resolution with the intrinsics rescaled; the aspect ratio must match
    the calibration's, as stretching the image would distort the face.
    """
    if num_frames <= 0:
        raise ValueError(f"camera path: num_frames must be positive, got {num_frames}")
    calibration = layout.read_calibration(subject_dir)
    source = Path(subject_dir) / layout.CALIBRATION_FILE
    if serial not in calibration:
        raise layout.LayoutError(f"{source}: no camera {serial!r}; it has {sorted(calibration)}")
    camera = calibration[serial]
    width, height = size or (camera.width, camera.height)
    intrinsics = camera.intrinsics
    if (width, height) != (camera.width, camera.height):
        if abs(width / height - camera.width / camera.height) > 1.0 / min(height, camera.height):
            raise ValueError(
                f"{source}: camera {serial} is {camera.width}x{camera.height}; {width}x{height} has another "
                "aspect ratio"
            )
        intrinsics = scale_intrinsics(intrinsics, (camera.width, camera.height), (width, height))
    world_to_cam = np.repeat(camera.world_to_cam[None], num_frames, axis=0)
    return CameraPath(world_to_cam, np.repeat(intrinsics[None], num_frames, axis=0), int(width), int(height))


def from_spec(
    spec: str,
    num_frames: int,
    *,
    width: int,
    height: int,
    distance: float = DEFAULT_DISTANCE,
    fov_deg: float = DEFAULT_FOV_DEG,
    subject_dir: Path | None = None,
) -> CameraPath:
    """A path from a command-line spec: `front`, `orbit`, `orbit:<arc degrees>` or `camera:<serial>`.

    `camera:<serial>` reads the calibration of `subject_dir` and renders at `width` x `height`.
    """
    kind, _, argument = spec.partition(":")
    if kind == "front" and not argument:
        return front(num_frames, width=width, height=height, distance=distance, fov_deg=fov_deg)
    if kind == "orbit":
        try:
            arc = float(argument) if argument else 360.0
        except ValueError:
            raise ValueError(f"camera path {spec!r}: the orbit arc must be a number of degrees") from None
        return orbit(num_frames, width=width, height=height, distance=distance, fov_deg=fov_deg, arc_deg=arc)
    if kind == "camera" and argument:
        if subject_dir is None:
            raise ValueError(f"camera path {spec!r}: a capture camera needs the subject directory")
        return capture(subject_dir, argument, num_frames, size=(width, height))
    raise ValueError(f"camera path {spec!r}: expected 'front', 'orbit', 'orbit:<degrees>' or 'camera:<serial>'")
