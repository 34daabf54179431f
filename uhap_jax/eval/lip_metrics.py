"""Geometry and lip-sync metrics of talking heads: LVE, FDD, and an audio–mouth cross-correlation sync score.

Vertices are [T, V, 3] in metres (DESIGN: world units), so LVE comes out in m² and FDD in m²; papers quote LVE in
mm² (multiply by 1e6). The sync score needs no learned model, so it runs on our synthetic data; SyncNet's
LSE-D/LSE-C (`uhap_jax.eval.syncnet`) needs the user's weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from uhap_jax.geometry.template import Template


def _vertex_sequence(vertices, name: str) -> np.ndarray:
    vertices = np.asarray(vertices, np.float64)
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"{name} must be [frames, vertices, 3], got shape {vertices.shape}")
    if not np.all(np.isfinite(vertices)):
        raise ValueError(f"{name} holds NaN or inf")
    return vertices


def _vertex_ids(ids, num_vertices: int, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-d array of vertex indices, got {ids.dtype} {ids.shape}")
    outside = ids[(ids < 0) | (ids >= num_vertices)]
    if outside.size:
        raise ValueError(f"{name} indexes vertices {outside.tolist()}, outside the mesh's {num_vertices} vertices")
    return ids


def _same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")


# ----------------------------------------------------------------------------------------- vertex sets


def lip_vertex_ids(template: Template) -> np.ndarray:
    """The template's "lips" region, the vertex set LVE takes its maximum over."""
    return np.flatnonzero(template.region_mask("lips"))


def upper_face_vertex_ids(
    template: Template, regions: Sequence[str] = ("face", "brows"), up_axis: int = 1
) -> np.ndarray:
    """Skin vertices above the midpoint between the top of the lips and the top of the face (eyes, brows, forehead).

    CodeTalker's FDD uses FLAME's eye and forehead masks; a template without such masks gets this geometric
    stand-in. Pass explicit ids to `upper_face_dynamics_deviation` when the template has a better mask.
    """
    height = template.vertices[:, up_axis]
    lips_top = height[template.region_mask("lips")].max()
    skin = np.logical_or.reduce([template.region_mask(name) for name in regions])
    threshold = 0.5 * (lips_top + height[skin].max())
    return np.flatnonzero(skin & (height > threshold))


def mouth_landmark_ids(template: Template) -> tuple[int, int]:
    """(upper_lip_mid, lower_lip_mid): the vertex pair whose distance is the mouth opening."""
    missing = [name for name in ("upper_lip_mid", "lower_lip_mid") if name not in template.landmarks]
    if missing:
        raise KeyError(f"template has no landmark(s) {missing}; pass upper/lower lip vertex ids explicitly")
    return template.landmarks["upper_lip_mid"], template.landmarks["lower_lip_mid"]


# ----------------------------------------------------------------------------------------- LVE and FDD


def lip_vertex_error(pred_vertices, gt_vertices, lip_ids) -> float:
    """LVE: per frame the maximum over lip vertices of the squared L2 error, averaged over frames.

    FaceFormer (Fan et al., CVPR 2022, Sec. 4.2): "the maximal L2 error of all lip vertices for each frame,
    averaged over all frames"; its code squares the distance (sum of squared coordinates), as here.
    """
    pred = _vertex_sequence(pred_vertices, "pred_vertices")
    gt = _vertex_sequence(gt_vertices, "gt_vertices")
    _same_shape(pred, gt)
    lip_ids = _vertex_ids(lip_ids, pred.shape[1], "lip_ids")
    squared_error = np.sum((pred[:, lip_ids] - gt[:, lip_ids]) ** 2, axis=-1)  # [T, L]
    return float(np.mean(np.max(squared_error, axis=1)))


def upper_face_dynamics_deviation(pred_vertices, gt_vertices, neutral_vertices, upper_face_ids) -> float:
    """FDD: how much less (or more) the upper face moves in the prediction than in the ground truth.

    CodeTalker (Xing et al., CVPR 2023, Sec. 4.1, and its `cal_metric.py`): the motion of a vertex is its
    displacement from the neutral face; per upper-face vertex take the standard deviation over time of the
    squared motion norm, average over vertices, and subtract the prediction's value from the ground truth's.
    Positive: the prediction's upper face is stiffer than the ground truth. Papers report it with the sign.
    """
    pred = _vertex_sequence(pred_vertices, "pred_vertices")
    gt = _vertex_sequence(gt_vertices, "gt_vertices")
    _same_shape(pred, gt)
    neutral = np.asarray(neutral_vertices, np.float64)
    if neutral.shape != pred.shape[1:]:
        raise ValueError(f"neutral_vertices must be {pred.shape[1:]}, got {neutral.shape}")
    upper_face_ids = _vertex_ids(upper_face_ids, pred.shape[1], "upper_face_ids")

    def motion_dynamics(vertices: np.ndarray) -> float:
        squared_motion = np.sum((vertices[:, upper_face_ids] - neutral[upper_face_ids]) ** 2, axis=-1)  # [T, U]
        return float(np.mean(np.std(squared_motion, axis=0)))

    return motion_dynamics(gt) - motion_dynamics(pred)


# ----------------------------------------------------------------------------------------- lip sync


def audio_rms_envelope(waveform, sample_rate: int, fps: float, num_frames: int | None = None) -> np.ndarray:
    """The RMS of the audio during each video frame: frame k spans [k / fps, (k + 1) / fps) seconds.

    Any fps works (29.97 included): window edges are rounded to the nearest sample. `num_frames` defaults to
    the whole frames the audio covers; asking for more than that is an error.
    """
    waveform = np.asarray(waveform, np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [samples], got shape {waveform.shape}")
    if not 0 < fps <= sample_rate:
        raise ValueError(f"fps must be in (0, sample_rate={sample_rate}], got {fps}")
    covered = int(np.floor(waveform.size * fps / sample_rate)) + 1
    while round(covered * sample_rate / fps) > waveform.size:  # frames whose rounded end lies in the audio
        covered -= 1
    num_frames = covered if num_frames is None else num_frames
    if num_frames > covered or num_frames < 1:
        raise ValueError(
            f"{waveform.size} samples at {sample_rate} Hz cover {covered} frames at {fps} fps, "
            f"not the {num_frames} asked for"
        )
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
    sums = np.concatenate([[0.0], np.cumsum(waveform**2)])
    return np.sqrt((sums[edges[1:]] - sums[edges[:-1]]) / np.diff(edges))


def mouth_opening(vertices, upper_lip_ids, lower_lip_ids) -> np.ndarray:
    """[T] the distance between paired upper- and lower-lip vertices, averaged over the pairs."""
    vertices = _vertex_sequence(vertices, "vertices")
    upper = _vertex_ids(np.atleast_1d(upper_lip_ids), vertices.shape[1], "upper_lip_ids")
    lower = _vertex_ids(np.atleast_1d(lower_lip_ids), vertices.shape[1], "lower_lip_ids")
    if upper.shape != lower.shape:
        raise ValueError(f"upper_lip_ids {upper.shape} and lower_lip_ids {lower.shape} must pair up one to one")
    return np.mean(np.linalg.norm(vertices[:, upper] - vertices[:, lower], axis=-1), axis=1)


@dataclasses.dataclass(frozen=True)
class LipSync:
    """offset: frames by which the mouth lags the audio (negative: it leads), the lag of peak correlation.
    confidence: the peak correlation minus the median over all lags (as SyncNet's median minus minimum distance).
    lags, correlations: the Pearson correlation of mouth opening and audio envelope at each lag.
    """

    offset: int
    confidence: float
    lags: np.ndarray
    correlations: np.ndarray


def lip_sync_offset(audio_envelope, mouth_opening_per_frame, max_lag: int = 10) -> LipSync:
    """Cross-correlates the audio energy envelope with the mouth opening over lags of ±max_lag frames.

    At lag d, frame t of the mouth is compared with frame t − d of the audio, over the frames where both exist.
    Loud frames open the mouth, so in sync the peak is at lag 0, with SyncNet's sign convention for the offset
    (Chung & Zisserman, "Out of time", ACCV 2016 workshops: video frame t matches audio frame t − offset).
    """
    audio = np.asarray(audio_envelope, np.float64)
    mouth = np.asarray(mouth_opening_per_frame, np.float64)
    if audio.ndim != 1 or audio.shape != mouth.shape:
        raise ValueError(f"envelope {audio.shape} and mouth opening {mouth.shape} must be equal-length 1-d arrays")
    if max_lag < 0 or audio.size < 2 * max_lag + 3:
        raise ValueError(f"{audio.size} frames are too few for lags of ±{max_lag} (need {2 * max_lag + 3})")
    lags = np.arange(-max_lag, max_lag + 1)
    correlations = np.array([_pearson(*_overlap(mouth, audio, lag)) for lag in lags])
    peak = int(np.argmax(correlations))
    return LipSync(int(lags[peak]), float(correlations[peak] - np.median(correlations)), lags, correlations)


def _overlap(mouth: np.ndarray, audio: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """mouth[t] beside audio[t - lag] for every t where both exist."""
    if lag >= 0:
        return mouth[lag:], audio[: audio.size - lag]
    return mouth[: mouth.size + lag], audio[-lag:]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant (it carries no timing)."""
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.sum(x**2) * np.sum(y**2))
    return float(np.sum(x * y) / norm) if norm > 0 else 0.0
