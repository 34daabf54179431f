"""Real speech from eSpeak NG (the `espeakng-loader` wheel ships the library and its data) through ctypes.

`synthesize` returns 16 kHz mono audio and the phoneme events eSpeak reports while it speaks (phoneme names
in eSpeak's ASCII mnemonics, start times in seconds), so that the rig can move the mouth in sync with the sound.
eSpeak keeps global state, so one lock serialises every call in the process, and each call loads the library
afresh (`_Engine`): its static state would otherwise carry from one utterance into the next.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import threading
from fractions import Fraction

import espeakng_loader
import numpy as np
from scipy import signal

AUDIO_RATE = 16000

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds from the start of the text
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclasses.dataclass(frozen=True)
class Voice:
    """eSpeak voice settings; vary them per identity so that speakers sound different."""

    name: str = "en-us"
    rate_wpm: int = 160  # words per minute (eSpeak accepts 80..450)
    pitch: int = 50  # base pitch 0..99
    pitch_range: int = 50  # intonation range 0..99


@dataclasses.dataclass(frozen=True)
class Phoneme:
    symbol: str  # eSpeak mnemonic, e.g. "p", "aI", "@", "_" for a pause
    start: float  # seconds from the start of the audio
    word_index: int  # index of the word it belongs to (-1 before the first word)


@dataclasses.dataclass(frozen=True)
class Utterance:
    text: str
    audio: np.ndarray  # [T] float32 mono at 16 kHz
    phonemes: tuple[Phoneme, ...]

    @property
    def duration(self) -> float:
        return len(self.audio) / AUDIO_RATE


class _Engine:
    """A fresh load of the library, initialised, with a callback that collects samples and events; `close`
    unloads it.

    eSpeak NG keeps state in static variables from one utterance to the next, and `espeak_Terminate` does not reset
    it: in one process the same text and voice came out a few samples longer or shorter, with phoneme times 1 ms
    apart, depending on what was spoken before (so a seeded dataset depended on what the process had said
    earlier). Unloading the library after each utterance (~6 ms to load again) makes the audio depend only on the
    text and the voice.
    """

    def __init__(self):
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_PHONEME_EVENTS
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with data at {data_path.decode()}")
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int, str]] = []
        self._callback = _SynthCallback(self._on_synth)  # kept alive as long as the engine
        self.lib.espeak_SetSynthCallback(self._callback)

    def close(self) -> None:
        """Frees eSpeak's memory and unloads the library, so that the next `_Engine` starts from a clean state."""
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)

    def _on_synth(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        index = 0
        while events[index].type != _EVENT_LIST_TERMINATED:
            event = events[index]
            if event.type == _EVENT_PHONEME:
                symbol = event.id.string.decode("ascii", errors="replace")
                self.events.append((event.type, event.audio_position, symbol))
            elif event.type == _EVENT_WORD:
                self.events.append((event.type, event.audio_position, ""))
            index += 1
        return 0


_LOCK = threading.Lock()


def synthesize(text: str, voice: Voice = Voice()) -> Utterance:
    """Speaks `text` with `voice`; returns 16 kHz float32 audio and timed phonemes, sorted by start time."""
    if not text.strip():
        raise ValueError("synthesize: text is empty")
    with _LOCK:
        engine = _Engine()
        try:
            samples, events = _speak(engine, text, voice)
        finally:
            engine.close()
    audio = samples.astype(np.float32) / 32768.0
    ratio = Fraction(AUDIO_RATE, engine.sample_rate)
    audio = signal.resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return Utterance(text=text, audio=audio, phonemes=_phonemes(events, len(audio) / AUDIO_RATE))


def _speak(engine: _Engine, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """eSpeak's int16 samples and phoneme/word events for `text` in `voice`, on a fresh engine."""
    if engine.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
        raise ValueError(f"synthesize: eSpeak NG has no voice {voice.name!r}")
    for parameter, value in (
        (_PARAM_RATE, voice.rate_wpm),
        (_PARAM_PITCH, voice.pitch),
        (_PARAM_RANGE, voice.pitch_range),
        (_PARAM_VOLUME, 100),
    ):
        engine.lib.espeak_SetParameter(parameter, int(value), 0)
    # eSpeak seeds its noise generator (the breathy variants' noise) from the clock unless told a seed.
    engine.lib.espeak_ng_SetRandSeed(0)
    encoded = text.encode("utf-8") + b"\0"
    buffer = ctypes.create_string_buffer(encoded)
    status = engine.lib.espeak_Synth(buffer, len(encoded), 0, 0, 0, _CHARS_UTF8, None, None)
    if status != 0:
        raise RuntimeError(f"synthesize: espeak_Synth failed with status {status} for {text!r}")
    engine.lib.espeak_Synchronize()
    samples = np.concatenate(engine.chunks) if engine.chunks else np.zeros(0, np.int16)
    return samples, list(engine.events)


def _phonemes(events: list[tuple[int, int, str]], duration: float) -> tuple[Phoneme, ...]:
    phonemes, word = [], -1
    for kind, position_ms, symbol in sorted(events, key=lambda e: e[1]):
        if kind == _EVENT_WORD:
            word += 1
        elif symbol:
            phonemes.append(Phoneme(symbol=symbol, start=min(position_ms / 1000.0, duration), word_index=word))
    return tuple(phonemes)
