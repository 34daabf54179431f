"""eSpeak NG speech with timed phonemes, and the viseme rig that moves the mouth in sync with it."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import kernels
from data_pipelines import rig, speech, synth, voices
from uhap_jax.geometry import cameras as camera_lib
from uhap_jax.geometry import template as template_lib

SENTENCE = "Bob met a happy puppy on the farm."
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head() -> template_lib.Template:
    return template_lib.procedural_head(48)


def _random_voice(rng: np.random.Generator) -> speech.Voice:
    return speech.Voice(
        name=str(rng.choice(["en-us", "en-us+f3", "en-us+m3"])),
        rate_wpm=int(rng.integers(140, 190)),
        pitch=int(rng.integers(25, 80)),
    )


def test_espeak_gives_speech_and_monotone_phonemes(rng):
    utterance = speech.synthesize(SENTENCE, _random_voice(rng))
    audio = utterance.audio
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < utterance.duration < 4.0
    assert np.sqrt(np.mean(audio**2)) > 0.02 and np.abs(audio).max() <= 1.0
    starts = np.array([p.start for p in utterance.phonemes])
    assert len(starts) >= 20
    assert np.all(np.diff(starts) >= 0) and starts[0] >= 0 and starts[-1] <= utterance.duration
    symbols = [p.symbol.lstrip("'") for p in utterance.phonemes]
    assert symbols.count("p") >= 3 and "f" in symbols
    # The audio is really at 16 kHz: a voiced vowel's energy sits below 4 kHz, little of it above 6 kHz.
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / speech.AUDIO_RATE)
    assert spectrum[freqs < 4000].sum() > 10 * spectrum[freqs > 6000].sum()


def test_speech_depends_only_on_text_and_voice(rng, tmp_path):
    """eSpeak NG's static state and its clock-seeded breath noise once made the same text and voice come out
    different after other utterances, and in another process."""
    voice = speech.Voice(name="en-us+f3", rate_wpm=int(rng.integers(140, 190)), pitch=int(rng.integers(25, 80)))
    first = speech.synthesize(SENTENCE, voice)
    speech.synthesize("Peter picked a peck of pickled peppers.", _random_voice(rng))
    again = speech.synthesize(SENTENCE, voice)
    np.testing.assert_array_equal(again.audio, first.audio)
    assert again.phonemes == first.phonemes
    script = (
        "import sys, numpy as np; from data_pipelines import speech; "
        f"np.save(sys.argv[1], speech.synthesize({SENTENCE!r}, speech.{voice!r}).audio)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "audio.npy")], check=True, cwd=REPO)
    np.testing.assert_array_equal(np.load(tmp_path / "audio.npy"), first.audio)


def test_voices_differ(rng):
    low = speech.synthesize("Hello there.", speech.Voice(pitch=int(rng.integers(5, 20))))
    high = speech.synthesize("Hello there.", speech.Voice(pitch=int(rng.integers(80, 99))))
    assert low.audio.shape != high.audio.shape or not np.allclose(low.audio, high.audio)


def test_rig_opens_jaw_on_vowels_and_closes_lips_on_bilabials(head, rng):
    utterance = speech.synthesize(SENTENCE, _random_voice(rng))
    fps = 100.0  # fine time steps, several frames in each phoneme
    style = rig.Style(anticipation=float(rng.uniform(0.7, 1.5)))
    track = rig.expression_track(utterance.phonemes, utterance.duration, fps, rng, style)
    vertices = np.asarray(rig.deform(head, track))
    gap = np.asarray(rig.lip_gap(head, vertices))
    chin_drop = head.vertices[head.landmarks["lower_lip_mid"], 1] - vertices[:, head.landmarks["lower_lip_mid"], 1]
    phonemes = utterance.phonemes
    ends = [p.start for p in phonemes[1:]] + [utterance.duration]
    centres = {"bilabial": [], "open_vowel": []}
    closest = []  # each bilabial's smallest |gap| over its frames
    for phoneme, end in zip(phonemes, ends):
        kind = rig.viseme_class(phoneme.symbol)
        if kind in centres:
            centre = min(int(round(0.5 * (phoneme.start + end) * fps)), len(gap) - 1)
            centres[kind].append(centre)
        if kind == "bilabial":
            frames = np.arange(int(np.ceil(phoneme.start * fps)), min(int(np.floor(end * fps)), len(gap) - 1) + 1)
            closest.append(np.abs(gap[frames if frames.size else [centre]]).min())
    assert len(centres["bilabial"]) >= 5 and len(centres["open_vowel"]) >= 2
    # The lips meet during each p, b, m, not necessarily at its centre: with strong anticipation the closure leads
    # a short bilabial's centre (seed 15157: a 30 ms p, 1.04e-3 apart at its centre, 0.73e-3 a frame earlier).
    assert np.all(np.array(closest) < 1e-3), ("lips must meet on p, b, m", closest)
    assert np.all(gap[centres["open_vowel"]] > 6e-3), "the mouth opens on open vowels"
    assert np.all(chin_drop[centres["open_vowel"]] > 6e-3), "the jaw rotates the lower lip down"
    # Over the clip, the opening follows the jaw control.
    assert np.corrcoef(track[:, 0], gap)[0, 1] > 0.7


def test_blink_covers_eyes_and_gaze_turns_irises(head, rng):
    controls = np.zeros((3, len(rig.EXPRESSION_NAMES)), np.float32)
    blink, yaw = rig.EXPRESSION_NAMES.index("blink"), rig.EXPRESSION_NAMES.index("gaze_yaw")
    controls[1, blink] = 1.0
    controls[2, yaw] = rng.uniform(0.5, 1.0)
    vertices = np.asarray(rig.deform(head, controls))
    iris = head.region_mask("iris")
    lid = head.weights["eyelid_left"] > 0.9
    eye_front = vertices[0, iris, 2].min()
    assert vertices[0, lid, 2].mean() > eye_front, "open: the socket is behind the eye's front"
    assert vertices[1, lid, 2].mean() < eye_front - 1e-3, "closed: the lid is in front of the eye"
    shift = vertices[2, iris, 0].mean() - vertices[0, iris, 0].mean()
    assert shift > 2e-3, "positive yaw turns the irises toward +x"
    np.testing.assert_allclose(vertices[2, ~head.region_mask("iris") & ~head.region_mask("eyeball")],
                               vertices[0, ~head.region_mask("iris") & ~head.region_mask("eyeball")])  # fmt: skip


def _label_renderer(head: template_lib.Template):
    """A zoomed frontal view of the mouth (128^2, 0.6 mm per pixel) that draws teeth red and tongue green."""
    sampler = synth.SurfaceSampler.build(head, 128)  # dense enough to be opaque at this zoom
    region = np.asarray(head.region_names)[head.region_ids[head.faces[sampler.face_ids, 0]]]
    colours = np.stack([region == "teeth", region == "tongue", np.zeros(len(region), bool)], -1).astype(np.float32)
    mouth_y = float(head.anchors["mouth_center"][1])
    view = camera_lib.look_at(np.array([0.0, mouth_y, -0.9]), np.array([0.0, mouth_y, 0.0]))[None].astype(np.float32)
    k = camera_lib.intrinsics_from_fov(5.0, 128, 128)[None].astype(np.float32)

    @jax.jit
    def render(vertices):
        means, quats, scales, normals, _ = sampler.gaussians(vertices)
        opacities = sampler.visible_opacities(means, normals, view)[0]
        out = kernels.rasterize(means, quats, scales, opacities, colours, view, k, width=128, height=128,
                                capacity=80000, backend="reference")  # fmt: skip
        return out.rgb[0].sum((0, 1))  # teeth and tongue pixels (coverage-weighted)

    return render


def test_speech_drives_teeth_tongue_and_lip_shape(head, rng):
    """Teeth show on /f v/ and not on closed /m b p/; the tongue shows between the teeth on /th/; its tip rises
    on /t d n l/; the lips round on /u/ (narrower than on spread /i/)."""
    voice = speech.Voice(name=str(rng.choice(["en-us", "en-gb-x-rp"])), rate_wpm=int(rng.integers(120, 150)))
    utterance = speech.synthesize("Mom fed five sheep, then Bob thanked two tall moose.", voice)
    fps = 100.0
    track = rig.expression_track(utterance.phonemes, utterance.duration, fps, rng)
    vertices = np.asarray(rig.deform(head, track))
    ends = [p.start for p in utterance.phonemes[1:]] + [utterance.duration]
    frames: dict[str, list[int]] = {}
    for phoneme, end in zip(utterance.phonemes, ends):
        frame = min(int(round(0.5 * (phoneme.start + end) * fps)), len(track) - 1)
        frames.setdefault(rig.viseme_class(phoneme.symbol), []).append(frame)
    assert all(len(frames.get(k, [])) >= 2 for k in ("bilabial", "labiodental", "dental", "alveolar", "round_vowel"))
    render = _label_renderer(head)
    seen = {kind: np.stack([np.asarray(render(vertices[f])) for f in frames[kind]]) for kind in
            ("bilabial", "labiodental", "dental")}  # fmt: skip
    teeth, tongue = 0, 1
    assert seen["labiodental"][:, teeth].min() > 20.0, "the upper teeth show on /f v/"
    assert seen["bilabial"][:, teeth].max() < 0.25 * seen["labiodental"][:, teeth].min(), "closed lips hide them"
    assert seen["dental"][:, tongue].min() > 20.0 and seen["bilabial"][:, tongue].max() < 1.0
    tongue_ids = np.flatnonzero(head.region_mask("tongue"))
    lower_teeth = np.flatnonzero(head.region_mask("teeth") & (head.weights["jaw"] > 0.5))
    tip = tongue_ids[np.argsort(head.vertices[tongue_ids, 2])[:8]]  # the front edge
    height = vertices[:, tip, 1].mean(1) - vertices[:, lower_teeth, 1].max(1)
    assert height[frames["alveolar"]].min() > height[frames["round_vowel"]].max() + 0.004
    lips = head.weights["lip_upper"] + head.weights["lip_lower"]
    width = np.sqrt(np.sum(lips * (vertices[..., 0] - vertices[..., 0].mean(1, keepdims=True)) ** 2, 1) / lips.sum())
    spread = frames.get("front_vowel", []) + frames["labiodental"]
    assert width[frames["round_vowel"]].max() < width[spread].min() - 0.001


def test_each_identity_speaks_with_its_own_voice_and_held_out_voices_are_unseen(rng):
    """Voices drawn for identities differ in sound; held-out voices use variants that no training voice uses."""
    assert not set(voices.TRAIN_VARIANTS) & set(voices.HELD_OUT_VARIANTS)
    drawn = [voices.draw_voice(rng) for _ in range(4)]
    held_out = [voices.draw_voice(rng, held_out=True) for _ in range(4)]
    assert all(voices.variant(v) in voices.TRAIN_VARIANTS for v in drawn)
    assert all(voices.variant(v) in voices.HELD_OUT_VARIANTS for v in held_out)
    spectra = []
    for voice in drawn[:3]:
        audio = speech.synthesize("Hello there, how are you?", voice).audio
        power = np.abs(np.fft.rfft(audio, n=32000)) ** 2
        bands = np.add.reduceat(power, np.arange(0, 16000, 500))
        spectra.append(np.log(bands / bands.sum() + 1e-12))
    # Timbre comes from the accent and variant: two draws that share both and differ only by a few pitch steps
    # legitimately sound alike (0.08 apart at the 0.3% of seeds that failed, vs >= 1.3 for different names).
    for a in range(3):
        for b in range(a + 1, 3):
            assert drawn[a].name == drawn[b].name or np.abs(spectra[a] - spectra[b]).mean() > 0.1


def test_recording_adds_room_microphone_and_noise(rng):
    """The recorded clip keeps length and level, stays well below clipping, gains a noise floor where the speech
    is silent, and loses what the microphone filters out above its roll-off."""
    clean = speech.synthesize("Put the blue box above the bed.", _random_voice(rng)).audio
    recording = voices.draw_recording(rng)
    recorded = voices.record(clean, recording, rng)
    assert recorded.dtype == np.float32 and recorded.shape == clean.shape and np.abs(recorded).max() <= 0.99
    assert 0.3 < np.corrcoef(clean, recorded)[0, 1] < 0.995
    silent = np.abs(clean) < 1e-4
    if silent.sum() > 400:
        assert np.sqrt(np.mean(recorded[silent] ** 2)) > 3 * np.sqrt(np.mean(clean[silent] ** 2)) + 1e-5
    freqs = np.fft.rfftfreq(len(clean), 1 / speech.AUDIO_RATE)
    high = freqs > recording.rolloff_hz + 200  # above the microphone's roll-off (always below 8 kHz)

    def share(x):
        power = np.abs(np.fft.rfft(x)) ** 2
        return power[high].sum() / power.sum()

    assert share(recorded) < share(clean)
    impulse = voices.room_impulse_response(recording.rt60, recording.direct_to_reverb_db, rng)
    assert impulse[0] == 1.0 and np.argmax(np.abs(impulse)) == 0
    tail_energy = np.sum(impulse[1:] ** 2)
    np.testing.assert_allclose(10 * np.log10(1.0 / tail_energy), recording.direct_to_reverb_db, atol=1e-6)
