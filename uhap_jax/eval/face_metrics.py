"""The benchmark's per-frame metrics: image quality over the head mask and over a mouth crop, LPIPS, lip-vertex
error and upper-face dynamics against ground-truth tracked meshes, and lip sync.

- PSNR / SSIM over the head mask: squared error (or the SSIM map, Wang et al. 2004, 11x11 Gaussian window at
  "valid" positions) averaged over the pixels where the ground-truth mask is set, on images composited on black.
- The mouth crop: one square box per clip around the ground-truth lip points projected into the camera (the
  same box for every method scored on that clip), with a margin; PSNR / SSIM / LPIPS on the crop.
- LPIPS (VGG, Zhang et al. 2018) only from a weights file the user gives (`models.losses.load_lpips`); without
  it the value is `None` and prints as `LPIPS_MISSING`, never 0.
- LVE (mm²): FaceFormer's and CodeTalker's definition, per frame the maximal squared L2 error over the lip
  vertices, averaged over frames (`lip_metrics.lip_vertex_error`). The lip "vertices" here are the points of the
  template's "lips" region at the prior's lip texels (`lip_texel_ids`): the avatar's Gaussian centres there,
  and the ground-truth tracked mesh's surface at the same (face, barycentric) points, both in head space.
- FDD (mm²): CodeTalker's upper-face dynamics deviation; each side's motion is measured from its own neutral
  (the avatar's neutral code; the subject's neutral scan), over the upper-face texels (`upper_face_texel_ids`).
- Lip sync: SyncNet's LSE-D / LSE-C (`eval.syncnet`) when its weights are given, and always our audio-mouth
  proxy: the lag of peak correlation between the audio's RMS envelope and the mouth opening, and its confidence
  (peak minus median correlation over lags; `lip_metrics.lip_sync_offset`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from uhap_jax.eval import lip_metrics, syncnet
from uhap_jax.geometry import template as template_lib
from uhap_jax.models import image_metrics

LPIPS_MISSING = "n/a (no weights: --lpips-weights)"
SYNCNET_MISSING = "n/a (no weights: --syncnet-weights)"
_MM2 = 1e6  # m² -> mm²


# ------------------------------------------------------------------------------------- images


def _images(pred, target, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, target, mask = (np.asarray(x, np.float64) for x in (pred, target, mask))
    if pred.shape != target.shape or pred.ndim < 3 or pred.shape[-1] != 3 or mask.shape != pred.shape[:-1]:
        raise ValueError(f"need pred and target [..., H, W, 3] and a mask [..., H, W]; got {pred.shape}, "
                         f"{target.shape}, {mask.shape}")  # fmt: skip
    return pred, target, mask


def masked_psnr(pred, target, mask, max_value: float = 1.0) -> np.ndarray:
    """PSNR (dB) per image [...] over the pixels where `mask` [..., H, W] (in [0, 1]) is set, weighted by it."""
    pred, target, mask = _images(pred, target, mask)
    weight = np.sum(mask, axis=(-2, -1)) * 3
    if np.any(weight <= 0):
        raise ValueError("masked_psnr: a mask is empty")
    mse = np.sum(mask[..., None] * (pred - target) ** 2, axis=(-3, -2, -1)) / weight
    return 10.0 * np.log10(max_value**2 / np.maximum(mse, 1e-12))


def masked_ssim(pred, target, mask, max_value: float = 1.0, chunk: int = 8) -> np.ndarray:
    """SSIM per image [...], its map averaged over window centres where `mask` is set (weighted by it).

    Computed by XLA in float32 on the default device, `chunk` images per call: numpy in float64 took ~0.8 s per
    512² image on a 2-core CPU, ~10 minutes of host time for the GPU demo's benchmark (docs/benchmarks.md,
    session 25)."""
    pred, target, mask = _images(pred, target, mask)
    half = image_metrics.SSIM_WINDOW // 2
    centres = mask[..., half : mask.shape[-2] - half, half : mask.shape[-1] - half]
    if np.any(np.sum(centres, axis=(-2, -1)) <= 0):
        raise ValueError("masked_ssim: a mask covers no window centre")
    lead = pred.shape[:-3]
    flat = [x.reshape(-1, *x.shape[len(lead) :]).astype(np.float32) for x in (pred, target, centres)]
    count, values = len(flat[0]), []
    for start in range(0, count, chunk):
        index = np.minimum(np.arange(start, start + chunk), count - 1)  # pad with the last image: one program
        values.append(np.asarray(_masked_ssim(*(x[index] for x in flat), max_value))[: count - start])
    return np.concatenate(values).astype(np.float64).reshape(lead)


@functools.partial(jax.jit, static_argnums=3)
def _masked_ssim(pred: jax.Array, target: jax.Array, centres: jax.Array, max_value: float) -> jax.Array:
    values = image_metrics.ssim_map(pred, target, max_value)
    return jnp.sum(centres * values, axis=(-2, -1)) / jnp.sum(centres, axis=(-2, -1))


# ------------------------------------------------------------------------------------- the mouth crop


def project(points, world_to_cam, intrinsics) -> np.ndarray:
    """World points [..., N, 3] -> pixel coordinates [..., N, 2] (x right, y down) in a pinhole camera."""
    points = np.asarray(points, np.float64)
    world_to_cam, intrinsics = np.asarray(world_to_cam, np.float64), np.asarray(intrinsics, np.float64)
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    if np.any(cam[..., 2] <= 0):
        raise ValueError("project: a point lies behind the camera")
    pixels = cam @ intrinsics.T
    return pixels[..., :2] / pixels[..., 2:3]


@dataclasses.dataclass(frozen=True)
class Box:
    """A square pixel box: rows top..top+size, columns left..left+size."""

    top: int
    left: int
    size: int

    def crop(self, images: np.ndarray) -> np.ndarray:
        """[..., H, W, ...] -> [..., size, size, ...] (the two axes after the leading ones of `lead`)."""
        return images[..., self.top : self.top + self.size, self.left : self.left + self.size, :]

    def crop_mask(self, masks: np.ndarray) -> np.ndarray:
        return masks[..., self.top : self.top + self.size, self.left : self.left + self.size]


def mouth_box(pixels, width: int, height: int, margin: float = 0.6, min_size: int = 16) -> Box:
    """The square box around projected lip points [T, L, 2] of a whole clip, `margin` times their extent wider
    on each side, at least `min_size` pixels, moved (not shrunk) to lie inside the W x H image."""
    pixels = np.asarray(pixels, np.float64).reshape(-1, 2)
    if min(width, height) < min_size:
        raise ValueError(f"mouth_box: a {width}x{height} image is smaller than the {min_size}-pixel crop")
    lo, hi = pixels.min(0), pixels.max(0)
    centre = 0.5 * (lo + hi)
    size = int(np.clip(np.ceil(np.max(hi - lo) * (1 + 2 * margin)), min_size, min(width, height)))
    left = int(np.clip(np.round(centre[0] - size / 2), 0, width - size))
    top = int(np.clip(np.round(centre[1] - size / 2), 0, height - size))
    return Box(top, left, size)


def resize(images, size: int) -> np.ndarray:
    """[..., h, w, 3] -> [..., size, size, 3], bilinear (antialiased when shrinking)."""
    images = jnp.asarray(images, jnp.float32)
    return np.asarray(jax.image.resize(images, (*images.shape[:-3], size, size, images.shape[-1]), "linear"))


# ------------------------------------------------------------------------------------- LPIPS


def lpips(model, pred, target, min_size: int = 64) -> np.ndarray | None:
    """LPIPS per image [B] of [B, H, W, 3] images in [0, 1] (resized up to `min_size` when smaller, as VGG's five
    levels need); None without a model (`models.losses.load_lpips`): the value is then unknown, never 0."""
    if model is None:
        return None
    pred, target = np.asarray(pred, np.float32), np.asarray(target, np.float32)
    if min(pred.shape[-3:-1]) < min_size:
        pred, target = resize(pred, min_size), resize(target, min_size)
    return np.asarray(model(jnp.asarray(pred), jnp.asarray(target)), np.float64)


def format_value(value: float | None, missing: str = LPIPS_MISSING, digits: int = 3) -> str:
    """A metric for a table: the number, or why there is none."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return missing
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------- geometry


def _nearest_vertex(layout, template: template_lib.Template) -> np.ndarray:
    return template.faces[layout.face_ids, np.argmax(layout.barys, axis=1)]


def lip_texel_ids(layout, template: template_lib.Template) -> np.ndarray:
    """Gaussians (texels of `layout`, a `models.prior.TexelLayout`) nearest to a vertex of the "lips" region."""
    ids = np.flatnonzero(template.region_mask("lips")[_nearest_vertex(layout, template)])
    if ids.size == 0:
        raise ValueError(f"no texel of the {layout.resolution}² UV layout lies on the template's lips region")
    return ids


def upper_face_texel_ids(layout, template: template_lib.Template) -> np.ndarray:
    """Texels nearest to an upper-face vertex (`lip_metrics.upper_face_vertex_ids`: eyes, brows, forehead)."""
    upper = np.zeros(len(template.vertices), bool)
    upper[lip_metrics.upper_face_vertex_ids(template)] = True
    ids = np.flatnonzero(upper[_nearest_vertex(layout, template)])
    if ids.size == 0:
        raise ValueError(f"no texel of the {layout.resolution}² UV layout lies on the upper face")
    return ids


def lip_halves(points: np.ndarray, up_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Positions in lip points [L, 3] (neutral, head space) of the upper and lower lip: above or below mid-height."""
    height = np.asarray(points)[:, up_axis]
    upper = height > 0.5 * (height.min() + height.max())
    if upper.all() or not upper.any():
        raise ValueError("the lip points do not split into an upper and a lower lip")
    return np.flatnonzero(upper), np.flatnonzero(~upper)


def surface_at_texels(vertices, template: template_lib.Template, layout) -> np.ndarray:
    """Meshes [..., V, 3] in the template's topology -> their surface at each texel's (face, barycentric) point."""
    vertices = np.asarray(vertices, np.float64)
    if vertices.shape[-2] != len(template.vertices):
        raise ValueError(f"meshes of {vertices.shape[-2]} vertices, but the template has {len(template.vertices)}; "
                         "tracked meshes must be in the template's topology")  # fmt: skip
    corners = vertices[..., template.faces[layout.face_ids], :]  # [..., N, 3, 3]
    return np.einsum("nk,...nkd->...nd", layout.barys, corners)


def lve_mm2(pred_points, gt_points) -> float:
    """LVE (mm²) of lip points [T, L, 3] in metres: mean over frames of the largest squared lip-point error."""
    pred_points = np.asarray(pred_points)
    return _MM2 * lip_metrics.lip_vertex_error(pred_points, gt_points, np.arange(pred_points.shape[1]))


def lve_motion_mm2(pred_points, gt_points) -> float:
    """LVE (mm²) with each lip point's mean error over the clip removed: the avatar's static lip-shape error (its
    identity, which audio cannot change) taken out, the error of the motion is left. Not FaceFormer's LVE: a
    diagnostic beside it, which says how much of the LVE the speech model could remove."""
    pred, gt = np.asarray(pred_points, np.float64), np.asarray(gt_points, np.float64)
    return lve_mm2(pred - np.mean(pred - gt, axis=0, keepdims=True), gt)


def fdd_mm2(pred_points, gt_points, pred_neutral, gt_neutral) -> float:
    """FDD (mm²) of upper-face points [T, U, 3] in metres, each side's motion measured from its own neutral [U, 3].

    CodeTalker: per point the standard deviation over time of the squared motion norm, averaged over points;
    the ground truth's minus the prediction's (positive: the prediction's upper face moves too little).
    """
    pred, gt = np.asarray(pred_points, np.float64), np.asarray(gt_points, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"fdd: prediction {pred.shape} and ground truth {gt.shape} must be equal [T, U, 3]")

    def dynamics(points: np.ndarray, neutral) -> float:
        return float(np.mean(np.std(np.sum((points - np.asarray(neutral)) ** 2, axis=-1), axis=0)))

    return _MM2 * (dynamics(gt, gt_neutral) - dynamics(pred, pred_neutral))


# ------------------------------------------------------------------------------------- lip sync


def mouth_opening(lip_points, halves: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[T] the distance between the upper- and the lower-lip centroids of lip points [T, L, 3]."""
    lip_points = np.asarray(lip_points, np.float64)
    upper, lower = halves
    return np.linalg.norm(lip_points[:, upper].mean(1) - lip_points[:, lower].mean(1), axis=-1)


def audio_mouth_sync(waveform, sample_rate: int, fps: float, opening, max_lag: int) -> lip_metrics.LipSync:
    """The proxy: lag (frames; positive = the mouth lags) and confidence of audio envelope vs mouth opening."""
    opening = np.asarray(opening, np.float64)
    envelope = lip_metrics.audio_rms_envelope(waveform, sample_rate, fps, len(opening))
    return lip_metrics.lip_sync_offset(envelope, opening, max_lag)


def pooled_sync(curves: list[np.ndarray], max_lag: int) -> tuple[int, float]:
    """Offset and confidence of the correlation-per-lag curves averaged over clips."""
    mean = np.mean(np.stack(curves), axis=0)
    peak = int(np.argmax(mean))
    return peak - max_lag, float(mean[peak] - np.median(mean))


def syncnet_scores(model, face_crops, waveform, fps: float) -> syncnet.SyncScores | None:
    """LSE-D / LSE-C of RGB face crops [T, h, w, 3] in [0, 1] (resized to SyncNet's 224²) with 16 kHz audio;
    None without a model (`syncnet.load_syncnet`)."""
    if model is None:
        return None
    crops = np.clip(resize(face_crops, syncnet.CROP_SIZE), 0.0, 1.0) * 255.0
    return syncnet.lip_sync_error(model, crops, np.asarray(waveform, np.float64), fps=fps)
