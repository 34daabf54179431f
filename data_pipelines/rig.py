"""The expression rig of the synthetic heads: timed phonemes -> visemes with coarticulation -> a deformed mesh.

Visemes blend with Cohen-Massaro dominance functions: each phoneme pulls every mouth control toward its target
with a dominance that peaks at the phoneme's centre and decays faster after it than before it (anticipation,
set per identity). Bilabials and labiodentals dominate the lip channels strongly, so the lips do close on
p/b/m and tuck under the teeth on f/v. Blinks, gaze saccades and brow raises on stressed syllables are added on
top. `deform` turns the per-frame controls into vertices: the jaw really rotates the lower face, lower teeth and
tongue about the jaw pivot, which opens the mouth slit and shows the mouth interior; the upper lip lifts off the
teeth on /f v/ and spread vowels, and the tongue's tip rises to the teeth on /t d n l th/.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from data_pipelines.speech import Phoneme
from uhap_jax.geometry.rotations import axis_angle_to_matrix
from uhap_jax.geometry.template import Template

MOUTH_CONTROLS = (
    "jaw_open", "lip_round", "lip_spread", "lip_press", "lip_under_teeth", "upper_lip_raise", "tongue_up",
    "tongue_out",
)  # fmt: skip
EXPRESSION_NAMES = (*MOUTH_CONTROLS, "blink", "gaze_yaw", "gaze_pitch", "brow_raise")

MAX_JAW_ANGLE = 0.2  # radians at jaw_open = 1
MAX_GAZE_ANGLE = 0.35  # radians at gaze = +-1

# Viseme classes: (targets for MOUTH_CONTROLS, dominance for MOUTH_CONTROLS). Spread vowels and /f v/ lift the
# upper lip off the teeth; /t d n l/ raise the tongue's tip to the ridge behind the teeth, /th/ puts it between
# the teeth; bilabials dominate the lips so that they close.
_VISEMES = {
    "rest": ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (0.6, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5)),
    "open_vowel": ((0.9, 0.0, 0.1, 0.0, 0.0, 0.25, 0.0, 0.0), (1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 1.0, 0.5)),
    "mid_vowel": ((0.5, 0.0, 0.2, 0.0, 0.0, 0.2, 0.0, 0.0), (1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 1.0, 0.5)),
    "front_vowel": ((0.25, 0.0, 0.8, 0.0, 0.0, 0.8, 0.0, 0.0), (1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5)),
    "round_vowel": ((0.4, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5)),
    "rounded_consonant": ((0.15, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (0.6, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5)),
    "bilabial": ((0.02, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0), (2.0, 0.5, 0.5, 4.0, 2.0, 4.0, 0.5, 1.0)),
    "labiodental": ((0.08, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0), (1.5, 0.5, 0.5, 2.0, 4.0, 4.0, 0.5, 1.0)),
    "alveolar": ((0.25, 0.0, 0.1, 0.0, 0.0, 0.2, 1.0, 0.0), (0.6, 0.2, 0.2, 0.3, 0.3, 0.5, 4.0, 0.5)),
    "dental": ((0.3, 0.0, 0.15, 0.0, 0.0, 0.4, 1.0, 1.0), (0.8, 0.2, 0.2, 0.3, 0.3, 1.0, 4.0, 4.0)),
    "consonant": ((0.2, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.0), (0.4, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.5)),
}
_OPEN_VOWELS = {"a", "A", "aI", "aU", "V", "a#", "A:", "A@", "aI@", "aU@", "0", "a:"}
_ROUND_VOWELS = {"u", "u:", "U", "o", "o:", "O", "O:", "oU", "OI", "O@", "U@", "o@", "u@", "W"}
_FRONT_VOWELS = {"i", "i:", "I", "I#", "I2", "i@", "e", "eI", "e@", "j", "i@3"}
_MID_VOWELS = {"E", "@", "@2", "@5", "3", "3:", "@L", "e#", "E2", "E@", "a2", "V2"}


def viseme_class(symbol: str) -> str:
    """The viseme class of an eSpeak phoneme mnemonic (stress marks stripped)."""
    core = symbol.lstrip("',%=").rstrip(";")
    if not core or core.startswith("_") or core in ("#", "||", "|"):
        return "rest"
    if core in ("p", "b", "m"):
        return "bilabial"
    if core in ("f", "v"):
        return "labiodental"
    if core in ("w", "W"):
        return "rounded_consonant"
    if core in ("T", "D"):
        return "dental"
    if core[0] in "tdnl":
        return "alveolar"
    for vowels, name in (
        (_OPEN_VOWELS, "open_vowel"),
        (_ROUND_VOWELS, "round_vowel"),
        (_FRONT_VOWELS, "front_vowel"),
        (_MID_VOWELS, "mid_vowel"),
    ):
        if core in vowels:
            return name
    if core[0] in "aA":
        return "open_vowel"
    if core[0] in "oOuU":
        return "round_vowel"
    if core[0] in "iIe":
        return "front_vowel"
    if core[0] in "E@3V":
        return "mid_vowel"
    return "consonant"


@dataclasses.dataclass(frozen=True)
class Style:
    """Per-identity speaking style."""

    anticipation: float = 1.0  # > 1 reaches further ahead of each phoneme
    articulation: float = 1.0  # scales jaw opening and lip shapes
    blink_rate_hz: float = 0.3
    brow_emphasis: float = 0.6


def mouth_controls(phonemes: tuple[Phoneme, ...], duration: float, times: np.ndarray, style: Style = Style()):
    """Cohen-Massaro blending: [T, len(MOUTH_CONTROLS)] MOUTH_CONTROLS at `times` (seconds) from timed phonemes."""
    if not phonemes:
        return np.zeros((len(times), len(MOUTH_CONTROLS)), np.float32)
    starts = np.array([p.start for p in phonemes])
    ends = np.append(starts[1:], max(duration, starts[-1] + 0.05))
    centres = 0.5 * (starts + ends)
    classes = [viseme_class(p.symbol) for p in phonemes]
    targets = np.array([_VISEMES[c][0] for c in classes])  # [P, K]
    alpha = np.array([_VISEMES[c][1] for c in classes])  # [P, K]
    # Rate of decay (1/s): slower before a phoneme (anticipation) than after it (carry-over).
    theta_before = 28.0 / style.anticipation
    theta_after = 40.0
    offset = times[:, None] - centres[None, :]  # [T, P]
    half_width = 0.5 * (ends - starts)[None, :]
    distance = np.maximum(np.abs(offset) - 0.5 * half_width, 0.0)  # flat top over the phoneme's core
    theta = np.where(offset < 0, theta_before, theta_after)
    dominance = alpha[None, :, :] * np.exp(-theta * distance)[..., None]  # [T, P, K]
    blended = (dominance * targets[None]).sum(1) / np.maximum(dominance.sum(1), 1e-6)
    blended[:, 0] *= style.articulation
    blended[:, 1:3] *= style.articulation
    return np.clip(blended, 0.0, 1.0).astype(np.float32)


def expression_track(
    phonemes: tuple[Phoneme, ...], duration: float, fps: float, rng: np.random.Generator, style: Style = Style()
) -> np.ndarray:
    """[F, len(EXPRESSION_NAMES)] per-frame controls for a clip of `duration` seconds at `fps`.

    Frame f is sampled at the centre of its audio window [f / fps, (f + 1) / fps).
    """
    num_frames = frame_count(duration, fps)
    times = (np.arange(num_frames) + 0.5) / fps  # frame f shows the audio of [f, f + 1) / fps
    mouth = mouth_controls(phonemes, duration, times, style)
    blink = _blinks(times, rng, style.blink_rate_hz)
    gaze = _saccades(times, rng)
    stressed = np.array([p.start for p in phonemes if p.symbol.startswith("'")])
    brow = np.zeros_like(times)
    if stressed.size:
        brow = style.brow_emphasis * np.exp(-0.5 * ((times[:, None] - stressed[None] - 0.05) / 0.09) ** 2).max(1)
    track = np.concatenate([mouth, blink[:, None], gaze, np.clip(brow, 0.0, 1.0)[:, None]], axis=1)
    return track.astype(np.float32)


def frame_count(duration: float, fps: float) -> int:
    """The frames of a clip of `duration` seconds at `fps` (at least one)."""
    return max(1, int(round(duration * fps)))


def _blinks(times: np.ndarray, rng: np.random.Generator, rate_hz: float) -> np.ndarray:
    """Blinks at Poisson times, each closing and reopening the eyes over ~0.2 s."""
    blink = np.zeros_like(times)
    t = rng.exponential(1.0 / rate_hz) * 0.5
    while t < times[-1] + 0.2:
        blink = np.maximum(blink, np.clip(1.0 - np.abs(times - t) / 0.1, 0.0, 1.0))
        t += 0.25 + rng.exponential(1.0 / rate_hz)
    return blink


def _saccades(times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[T, 2] gaze yaw/pitch in [-1, 1]: fixations held 0.4-1.5 s, joined by quick (~50 ms) saccades."""
    gaze = np.zeros((len(times), 2))
    current, t = rng.uniform(-0.3, 0.3, 2), 0.0
    while t <= times[-1]:
        target = np.clip(current + rng.normal(0.0, 0.3, 2), -0.8, 0.8)
        ramp = np.clip((times - t) / 0.05, 0.0, 1.0)[:, None]
        gaze = np.where((times >= t)[:, None], current + ramp * (target - current), gaze)
        current, t = target, t + rng.uniform(0.4, 1.5)
    return gaze


def deform(template: Template, expressions: jnp.ndarray) -> jnp.ndarray:
    """Vertices [F, V, 3] of the template under per-frame controls [F, len(EXPRESSION_NAMES)] (jnp, jit-able)."""
    controls = {name: jnp.asarray(expressions)[:, i, None, None] for i, name in enumerate(EXPRESSION_NAMES)}
    w = {name: jnp.asarray(value)[None, :, None] for name, value in template.weights.items()}
    rest = jnp.asarray(template.vertices)[None]
    x_axis, y_axis, z_axis = (jnp.eye(3)[i] for i in range(3))
    lips = w["lip_upper"] + w["lip_lower"]
    mouth = jnp.asarray(template.anchors["mouth_center"])

    # Lip shapes, before the jaw moves the lower lip.
    to_centre = (rest - mouth) * x_axis
    offset = -0.35 * controls["lip_round"] * lips * to_centre - 0.007 * controls["lip_round"] * lips * z_axis
    offset += 0.25 * controls["lip_spread"] * lips * to_centre + 0.002 * controls["lip_spread"] * lips * z_axis
    press = controls["lip_press"]
    offset += 0.002 * press * lips * z_axis  # pressed lips roll inward
    tuck = controls["lip_under_teeth"]
    offset += tuck * w["lip_lower"] * (0.001 * y_axis + 0.008 * z_axis)
    # The upper lip lifts off the upper teeth (spread vowels, /f v/), unless the lips press together.
    pressed = jnp.clip((press - 0.5) / 0.4, 0.0, 1.0)
    offset += controls["upper_lip_raise"] * (1.0 - pressed) * w["lip_upper"] * (0.0045 * y_axis - 0.001 * z_axis)
    tip = _tongue_tip(template)[None, :, None]
    shaped = rest + offset + controls["tongue_up"] * tip * (0.0095 * y_axis - 0.004 * z_axis)
    shaped += controls["tongue_out"] * tip * (-0.0025 * y_axis - 0.016 * z_axis)  # between the teeth, /th/

    # The jaw: pressing or tucking lips hold the lower lip up against the jaw's rotation.
    engaged = jnp.clip((jnp.maximum(press, tuck) - 0.5) / 0.4, 0.0, 1.0)
    lower_lip_hold = engaged * jnp.clip(w["lip_lower"] / 0.5, 0.0, 1.0)
    angle = controls["jaw_open"] * MAX_JAW_ANGLE * w["jaw"] * (1.0 - lower_lip_hold)  # [F, V, 1]
    pivot = jnp.asarray(template.anchors["jaw_pivot"])
    rotation = axis_angle_to_matrix(-angle * x_axis)  # [F, V, 3, 3]; a -x rotation drops the chin
    vertices = jnp.einsum("fvij,fvj->fvi", rotation, shaped - pivot) + pivot

    # Eyelids close over the eyeballs; brows rise.
    eyelids = w["eyelid_left"] + w["eyelid_right"]
    vertices += controls["blink"] * eyelids * (-0.014 * z_axis - 0.002 * y_axis)
    vertices += 0.006 * controls["brow_raise"] * w["brow"] * y_axis

    # Gaze turns each eyeball about its centre: +yaw looks toward +x, +pitch looks up.
    gaze = jnp.concatenate([controls["gaze_pitch"], -controls["gaze_yaw"], jnp.zeros_like(controls["blink"])], -1)
    eye_rotation = axis_angle_to_matrix(MAX_GAZE_ANGLE * gaze[:, 0])[:, None]  # [F, 1, 3, 3]
    for side in ("left", "right"):
        centre = jnp.asarray(template.anchors[f"eye_{side}"])
        turned = jnp.einsum("fvij,fvj->fvi", eye_rotation, vertices - centre) + centre
        vertices = jnp.where(w[f"eyeball_{side}"] > 0.5, turned, vertices)
    return vertices


def _tongue_tip(template: Template) -> jnp.ndarray:
    """[V] weight of the tongue's tip: 1 at its front edge, falling to 0 halfway back; 0 off the tongue
    (jnp: the vertices may be traced, as when an identity's shape is a jit argument)."""
    tongue = template.region_mask("tongue")
    z = jnp.asarray(template.vertices)[:, 2]
    front, back = jnp.min(jnp.where(tongue, z, jnp.inf)), jnp.max(jnp.where(tongue, z, -jnp.inf))
    along = jnp.clip((z - front) / jnp.maximum(back - front, 1e-9), 0.0, 1.0)
    return jnp.where(tongue, jnp.clip(1.0 - 2.0 * along, 0.0, 1.0) ** 1.5, 0.0)


def lip_gap(template: Template, vertices: jnp.ndarray) -> jnp.ndarray:
    """[F] vertical opening between the middle of the upper and lower lip, in metres."""
    upper = vertices[..., template.landmarks["upper_lip_mid"], 1]
    lower = vertices[..., template.landmarks["lower_lip_mid"], 1]
    return upper - lower
