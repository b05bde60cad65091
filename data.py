"""Synthetic talking heads with known ground truth: the project's "shakespeare_char".

Not part of the paper (DreamHead trains on HDTF/MEAD videos, tracked with MediaPipe); this is our own data
generator so the whole cascade (A2L audio -> 478 landmarks, L2I landmarks -> image) can be trained, tested and
benchmarked offline on CPU with data whose ground truth is exact:

- speech: espeak-ng (the `espeakng-loader` wheel, through ctypes) speaks random sentences from a small grammar
  with random voices, variants, pitch and rate; phoneme events give IPA labels and timings;
- motion: per-phoneme viseme targets (jaw opening, lip spread/rounding) with coarticulation (a zero-phase
  critically damped filter), a closure envelope that shuts the lips at bilabials and in silences, natural
  blinks and a small smooth head pose, applied as blendshapes to a 478-point MediaPipe mesh;
- pictures: a real portrait (skimage's astronaut, matplotlib's Grace Hopper) is warped piecewise-affinely from
  its detected mesh to the animated mesh (vectorised: triangle ids rasterised with cv2.fillPoly, one affine
  map per triangle, cv2.remap), with a dark mouth cavity and teeth inside the inner lips; 20 identities differ
  by face shape, skin tone, hair colour, background, base photo and mirroring (0-15 train, 16-19 test).

Each clip is an mp4 (H.264 + AAC, 25 fps) and an npz beside it with keys: landmarks (T, 478, 3) float32 px,
fps, identity, audio (int16 mono 16 kHz), sample_rate, text, phonemes (P, 2) float32 start/end seconds,
phoneme_ipa (P,) IPA strings, frame_size; T = ceil(duration * 25) with duration = len(audio) / 16000.

Time convention: frame i shows time (i + 0.5) / fps (its centre), so frame i lines up with the audio window
[i / fps, (i + 1) / fps). Landmarks are pixel coordinates (x, y) with z = MediaPipe z scaled like x.

CLI:  python data.py synth  --out DIR --clips N --seed S [--split train|test] [--size 256] [--workers 2]
      python data.py verify --dir DIR [--clips 20]
      python data.py sheet  --out docs/data_contact_sheet.png [--video docs/data_sample.mp4]
"""

import argparse
import ctypes
import functools
import glob
import math
import multiprocessing
import os
import pickle
import re
import subprocess
import zlib

import cv2
import numpy as np
from scipy.signal import lfilter, resample_poly
from scipy.spatial import Delaunay

import landmarks
from dreamhead import UsageError, atomic_write, run_cli, save_png, temp_beside

FPS = 25
SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
NUM_IDENTITIES = 20
TRAIN_IDENTITIES = tuple(range(16))
TEST_IDENTITIES = tuple(range(16, 20))
CLIP_SECONDS = (3.0, 8.0)
EXTRA_IDENTITIES_START = 100  # appearance-only identities for the VAE (`appearance_frames`), never in clips

# ------------------------------------------------------------------------------------------------------------
# Speech: espeak-ng through ctypes
# ------------------------------------------------------------------------------------------------------------

_EVENT_END, _EVENT_PHONEME = 0, 7
_ESPEAK_RATE_PARAM, _ESPEAK_PITCH_PARAM, _ESPEAK_RANGE_PARAM = 1, 3, 4
VOICES = ("en-us", "en", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland", "en-029")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "adam", "anika", "ed", "linda", "max", "steph")


class _EspeakEventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EspeakEventId)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_EspeakEvent))


class _Espeak:
    """One initialised espeak-ng per process (synchronous output, phoneme events with IPA names)."""

    def __init__(self):
        import espeakng_loader
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 1 | 2)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected {ESPEAK_RATE} Hz")
        self.chunks, self.events = [], []
        self._callback = _SynthCallback(self._collect)  # keep a reference: ctypes must not free it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events):
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_END:
            if events[i].type == _EVENT_PHONEME:
                ipa = events[i].id.string.decode("utf-8", "replace")
                self.events.append((events[i].audio_position / 1000.0, ipa))
            i += 1
        return 0

    def speak(self, text, voice="en-us", rate=175, pitch=50, pitch_range=50):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_ESPEAK_RATE_PARAM, rate), (_ESPEAK_PITCH_PARAM, pitch),
                             (_ESPEAK_RANGE_PARAM, pitch_range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self.chunks, self.events = [], []
        ctypes.CDLL(None).srand(1)  # the Klatt voices draw noise from libc's rand()
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
        self.lib.espeak_Synchronize()
        wav = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return wav.astype(np.int16), list(self.events)


@functools.lru_cache(maxsize=1)
def _espeak():
    return _Espeak()


def _in_fresh_process(fn, *args):
    """fn(*args) in a forked child, whose espeak-ng starts from the state of a never-used library.

    espeak-ng keeps hidden state between utterances (the pitch flutter phase), so the same text would not
    give the same samples twice in one process; the parent never initialises espeak, each call does.
    """
    if not hasattr(os, "fork"):
        return fn(*args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, send, exit without running the parent's cleanup
        os.close(read_end)
        try:
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as err:  # noqa: BLE001 - re-raised in the parent
            payload = pickle.dumps((False, f"{type(err).__name__}: {err}"))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError("espeak-ng child process died without an answer")
    ok, result = pickle.loads(payload)
    if not ok:
        raise RuntimeError(f"espeak-ng synthesis failed: {result}")
    return result


def _synthesize(text, voice, rate, pitch, pitch_range):
    wav, events = _espeak().speak(text, voice, rate, pitch, pitch_range)
    duration = len(wav) / ESPEAK_RATE
    phonemes = []
    for k, (start, ipa) in enumerate(events):
        end = events[k + 1][0] if k + 1 < len(events) else duration
        if ipa.strip("_ ") and end > start:
            phonemes.append((start, min(end, duration), ipa))
    return wav, phonemes


def synthesize(text, voice="en-us", rate=175, pitch=50, pitch_range=50):
    """Speak `text` with espeak-ng (deterministic: each call runs in a fresh forked process).

    Returns (wav int16 (N,) at 22050 Hz, phonemes [(start_s, end_s, ipa), ...]) where pauses are left out,
    so the gaps between phonemes are silences. Stress marks are kept in the IPA strings.
    """
    return _in_fresh_process(_synthesize, text, voice, rate, pitch, pitch_range)


# ------------------------------------------------------------------------------------------------------------
# Sentences: a small grammar, with a held-out pool for the test split
# ------------------------------------------------------------------------------------------------------------

_WORDS = {
    "det": "the a my your our their this that every one".split(),
    "adj": ("big small old young quiet happy bright purple brave busy calm cheap deep empty famous gentle "
            "heavy hungry lazy loud modern narrow polite proud rapid smooth sharp soft tall warm wild").split(),
    "noun": ("baby bottle banana mother father teacher pilot farmer monkey puppy market museum boat bus "
             "garden window kitchen piano apple orange bird moon ocean forest mirror pepper button ribbon "
             "wagon island painter robot camera blanket basket violin doctor sheep tiger").split(),
    "verb": ("bought opened painted pushed moved watched kept played pulled found carried helped fixed "
             "washed visited passed followed wrapped loved caught shared dropped picked borrowed").split(),
    "adv": "quickly slowly happily quietly often barely gently proudly calmly boldly".split(),
    "prep": "near behind beside above below under past inside".split(),
    "time": ("today yesterday tomorrow at noon by midnight every morning on monday in april "
             "before breakfast after supper").split(" "),
}
_TEMPLATES = (
    "det adj noun verb det noun",
    "det noun adv verb det adj noun prep det noun",
    "det adj noun verb det noun time",
    "time det noun verb det adj noun",
    "det noun prep det noun verb det adj noun",
    "det noun verb det adj noun adv",
)


def make_sentence(rng):
    """One random sentence from the grammar (capitalised, with a full stop)."""
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))].split()
    words = [_WORDS[slot][rng.integers(len(_WORDS[slot]))] for slot in template]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _sentence_split(text):
    return "test" if zlib.crc32(text.encode()) % 5 == 0 else "train"


@functools.lru_cache(maxsize=2)
def sentence_pool(split, size=4000):
    """Deterministic, disjoint sentence pools: a sentence belongs to 'test' when crc32(text) % 5 == 0."""
    rng = np.random.default_rng(12345)
    pool = sorted({make_sentence(rng) for _ in range(size)})
    return tuple(s for s in pool if _sentence_split(s) == split)


def speech_clip(rng, split="train", seconds=None, text=None):
    """Random multi-phrase utterance: 3-8 s of 16 kHz speech with pauses between phrases.

    With `text`, speaks just that phrase (between short silences) and the 3-8 s limits do not apply.
    Returns (audio int16 (N,), phonemes float32 (P, 2) start/end seconds, ipa list, text).
    """
    seconds = rng.uniform(*CLIP_SECONDS) if seconds is None else seconds
    voice = VOICES[rng.integers(len(VOICES))]
    variant = VARIANTS[rng.integers(len(VARIANTS))]
    voice = voice + ("+" + variant if variant else "")
    rate, pitch, pitch_range = rng.integers(140, 200), rng.integers(30, 75), rng.integers(30, 80)
    pool = sentence_pool(split)
    pieces = [np.zeros(int(rng.uniform(0.15, 0.4) * ESPEAK_RATE), np.int16)]
    offset = len(pieces[0]) / ESPEAK_RATE
    phonemes, texts = [], []
    while offset < seconds and not (text is not None and texts):
        sentence = pool[rng.integers(len(pool))] if text is None else text
        wav, phons = synthesize(sentence, voice, rate, pitch, pitch_range)
        if texts and offset + len(wav) / ESPEAK_RATE > CLIP_SECONDS[1] - 0.2:
            break
        texts.append(sentence)
        phonemes += [(s + offset, e + offset, ipa) for s, e, ipa in phons]
        pause = np.zeros(int(rng.uniform(0.25, 0.7) * ESPEAK_RATE), np.int16)
        pieces += [wav, pause]
        offset += (len(wav) + len(pause)) / ESPEAK_RATE
    wav = np.concatenate(pieces)
    target = int(round((offset if text is not None else np.clip(offset, *CLIP_SECONDS)) * ESPEAK_RATE))
    wav = np.pad(wav, (0, max(0, target - len(wav))))[:target]
    audio = resample_poly(wav.astype(np.float64), 320, 441)  # 22050 -> 16000 Hz
    audio = np.clip(np.round(audio), -32768, 32767).astype(np.int16)
    duration = len(audio) / SAMPLE_RATE
    phonemes = [(s, min(e, duration), ipa) for s, e, ipa in phonemes if s < duration]
    times = np.array([(s, e) for s, e, _ in phonemes], np.float32).reshape(-1, 2)  # (P, 2)
    return audio, times, [ipa for _, _, ipa in phonemes], " ".join(texts)


# ------------------------------------------------------------------------------------------------------------
# Visemes: phoneme -> (jaw opening, lip spread) targets, coarticulation, closures, blinks, head pose
# ------------------------------------------------------------------------------------------------------------

BILABIALS = ("p", "b", "m")
# (opening 0..1, spread -1 rounded .. +1 spread) per IPA symbol (first matching prefix wins)
_VISEME_TABLE = (
    ("tʃ", 0.2, -0.5), ("dʒ", 0.2, -0.5), ("ʃ", 0.2, -0.6), ("ʒ", 0.2, -0.6),
    ("p", 0.0, 0.0), ("b", 0.0, 0.0), ("m", 0.0, 0.0),
    ("f", 0.08, 0.1), ("v", 0.08, 0.1), ("θ", 0.2, 0.2), ("ð", 0.2, 0.2),
    ("w", 0.12, -1.0), ("ɹ", 0.22, -0.4), ("r", 0.22, -0.4),
    ("aɪ", 0.95, 0.1), ("aʊ", 0.95, -0.2), ("a", 1.0, 0.1), ("ɑ", 1.0, 0.0), ("æ", 0.85, 0.4), ("ɐ", 0.75, 0.0),
    ("ʌ", 0.7, 0.0), ("ɔ", 0.7, -0.7), ("ɒ", 0.8, -0.5), ("oʊ", 0.55, -0.8), ("o", 0.55, -0.8), ("əʊ", 0.5, -0.6),
    ("u", 0.3, -1.0), ("ʊ", 0.35, -0.8), ("i", 0.3, 0.9), ("ɪ", 0.38, 0.7), ("eɪ", 0.5, 0.7), ("e", 0.5, 0.6),
    ("ɛ", 0.6, 0.5), ("ɜ", 0.5, 0.0), ("ɚ", 0.45, -0.3), ("ə", 0.45, 0.0), ("ᵻ", 0.35, 0.3), ("ɐ", 0.7, 0.0),
    ("j", 0.25, 0.6), ("h", 0.4, 0.0), ("s", 0.15, 0.5), ("z", 0.15, 0.5), ("t", 0.22, 0.3), ("d", 0.22, 0.3),
    ("n", 0.22, 0.2), ("l", 0.28, 0.2), ("ɾ", 0.25, 0.2), ("k", 0.3, 0.1), ("ɡ", 0.3, 0.1), ("g", 0.3, 0.1),
    ("ŋ", 0.28, 0.1), ("ʔ", 0.2, 0.0), ("x", 0.3, 0.0),
)


def viseme_target(ipa):
    """(opening, spread) target of one IPA phoneme string (stress and length marks ignored)."""
    core = re.sub("[ˈˌː̃ʲ]", "", ipa)
    for prefix, opening, spread in _VISEME_TABLE:
        if core.startswith(prefix):
            return opening, spread
    return 0.35, 0.0


def is_bilabial(ipa):
    return re.sub("[ˈˌː]", "", ipa) in BILABIALS


def silences(phonemes, duration):
    """(start, end) of every gap without a phoneme, including the lead-in and the tail, in seconds."""
    gaps, cursor = [], 0.0
    for start, end in np.asarray(phonemes, np.float64).reshape(-1, 2):
        if start - cursor > 1e-3:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    if duration - cursor > 1e-3:
        gaps.append((cursor, duration))
    return gaps


def bilabial_closures(phonemes, ipa):
    """Lip closure of each bilabial: a stop (p, b) closes 50 ms before its release (the espeak event marks
    the burst), a nasal (m) stays closed through its whole event."""
    closures = []
    for (start, end), label in zip(np.asarray(phonemes, np.float64).reshape(-1, 2), ipa):
        if is_bilabial(label):
            nasal = re.sub("[ˈˌː]", "", label) == "m"
            closures.append((start - 0.02, max(end, start + 0.04)) if nasal else (start - 0.05, start + 0.01))
    return closures


def closure_intervals(phonemes, ipa, duration):
    """Intervals where the lips must be shut: every silence and every bilabial closure."""
    return list(silences(phonemes, duration)) + bilabial_closures(phonemes, ipa)


def _critically_damped(x, dt, tau):
    """Zero-phase critically damped smoothing: two first-order lowpasses, run forward and then backward."""
    a = dt / (tau + dt)
    y = np.asarray(x, np.float64)
    for _ in range(2):
        for _direction in range(2):
            y, _ = lfilter([a], [1, a - 1], y, zi=[(1 - a) * y[0]])  # y[i] = y[i-1] + a (x[i] - y[i-1])
            y = y[::-1]
    return y


def phoneme_effort(phonemes, audio, sample_rate=SAMPLE_RATE, gamma=1.0):
    """Articulatory effort per phoneme from its loudness: (RMS / 90th-percentile RMS) ** gamma, in 0.3..1.1.

    Loud (stressed) vowels open wider than weak ones; one number per phoneme, so the mouth still moves with
    the phonemes rather than with the raw envelope.
    """
    x = np.asarray(audio, np.float64)
    rms = np.array([np.sqrt(np.mean(x[int(s * sample_rate):max(int(e * sample_rate), int(s * sample_rate) + 1)]
                                     ** 2)) for s, e in np.asarray(phonemes, np.float64).reshape(-1, 2)])
    if len(rms) == 0:
        return rms
    return np.clip((rms / max(np.percentile(rms, 90), 1e-9)) ** gamma, 0.3, 1.1)


def articulation(phonemes, ipa, duration, audio=None, fps=FPS, tau=0.012, step=0.005):
    """Per-frame (opening, spread) (T, 2) following the phonemes, at frame centres (i + 0.5) / fps.

    Each phoneme holds its viseme target (diphthongs move between two targets; with `audio` the opening is
    scaled by the phoneme's effort), the targets are smoothed with a critically damped filter
    (coarticulation), then multiplied by a closure envelope that is 0 in silences and at bilabial closures
    and rises with a raised cosine over 35 ms around them.
    """
    if np.shape(phonemes) != (len(ipa), 2):
        raise ValueError(f"phonemes must be (P, 2) with one IPA label each, got {np.shape(phonemes)}, {len(ipa)}")
    grid = np.arange(0.0, duration + step, step)
    targets = np.zeros((len(grid), 2))
    effort = np.ones(len(ipa)) if audio is None else phoneme_effort(phonemes, audio)
    for (start, end), label, gain in zip(np.asarray(phonemes, np.float64).reshape(-1, 2), ipa, effort):
        first, last = viseme_target(label), viseme_target(re.sub("[ˈˌː]", "", label)[-1:] or label)
        inside = (grid >= start) & (grid < end)
        frac = (grid[inside] - start) / max(end - start, 1e-6)
        mix = np.clip((frac - 0.4) / 0.6, 0, 1)[:, None] if len(label.strip("ˈˌː")) > 1 else 0.0
        targets[inside] = ((1 - mix) * np.array(first) + mix * np.array(last)) * np.array([gain, 1.0])
    smooth = np.stack([_critically_damped(targets[:, k], step, tau) for k in range(2)], 1)
    envelope = np.ones(len(grid))
    ramp = 0.035
    for start, end in closure_intervals(phonemes, ipa, duration):
        dist = np.maximum(start - grid, grid - end)  # <= 0 inside the interval
        bump = np.where(dist <= 0, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip(dist / ramp, 0, 1)))
        envelope = np.minimum(envelope, 1 - bump)
    smooth[:, 0] *= envelope
    smooth[:, 1] *= 0.3 + 0.7 * envelope
    frames = math.ceil(duration * fps - 1e-9)  # T = ceil(duration * fps)
    centres = (np.arange(frames) + 0.5) / fps
    return np.stack([np.interp(centres, grid, smooth[:, k]) for k in range(2)], 1).astype(np.float32)


def blink_track(rng, frames, fps=FPS):
    """Eyelid closure 0..1 per frame: blinks every 2-6 s, 80 ms closing, 170 ms opening."""
    closure = np.zeros(frames)
    t = (np.arange(frames) + 0.5) / fps
    start = rng.uniform(0.3, 2.5)
    while start < frames / fps:
        close, reopen = 0.08, rng.uniform(0.13, 0.22)
        rel = t - start
        shape = np.where(rel < 0, 0, np.where(rel < close, rel / close, 1 - (rel - close) / reopen))
        closure = np.maximum(closure, np.clip(shape, 0, 1))
        start += rng.uniform(2.0, 6.0)
    return closure.astype(np.float32)


def pose_track(rng, frames, fps=FPS, max_deg=(4.0, 3.0, 2.5), max_shift=0.015):
    """Smooth small head motion per frame: (yaw, pitch, roll) in degrees and (tx, ty) in frame fractions."""
    t = np.arange(frames) / fps
    out = np.zeros((frames, 5))
    for k, amp in enumerate(max_deg + (max_shift, max_shift)):
        freqs, phases, weights = rng.uniform(0.08, 0.5, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.3, 1, 3)
        wave = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
        out[:, k] = amp * wave / weights.sum()
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Mesh: index sets, face frame, blendshapes
# ------------------------------------------------------------------------------------------------------------

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
INNER_LIP_RING = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
UPPER_INNER = (191, 80, 81, 82, 13, 312, 311, 310, 415)
LOWER_INNER = (95, 88, 178, 87, 14, 317, 402, 318, 324)
UPPER_OUTER = (185, 40, 39, 37, 0, 267, 269, 270, 409)
LOWER_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
MOUTH_CORNERS = (78, 308, 61, 291)
EYES = (  # (upper lid contour, lower lid contour), pairwise aligned, corners excluded
    ((246, 161, 160, 159, 158, 157, 173), (7, 163, 144, 145, 153, 154, 155)),
    ((466, 388, 387, 386, 385, 384, 398), (249, 390, 373, 374, 380, 381, 382)),
)
NOSE_TIP = 1
EYE_OUTER = (33, 263)


class FaceFrame:
    """2-D face coordinates in inter-ocular units: u along the eyes, v downwards, origin at the mouth."""

    def __init__(self, P):
        ex = P[EYE_OUTER[1], :2] - P[EYE_OUTER[0], :2]
        self.iod = float(np.linalg.norm(ex))
        ex = ex / self.iod
        ex = -ex if ex[0] < 0 else ex
        self.axes = np.stack([ex, np.array([-ex[1], ex[0]])])  # (2, 2) rows: u, v directions
        self.origin = P[[13, 14], :2].mean(0)

    def to_uv(self, P):
        return (P[:, :2] - self.origin) @ self.axes.T / self.iod  # (N, 2)

    def to_image(self, d_uvz):
        """Displacement (N, 3) in (u, v, z) IOD units -> pixels (x, y, z)."""
        xy = d_uvz[:, :2] @ self.axes * self.iod
        return np.concatenate([xy, d_uvz[:, 2:3] * self.iod], 1)


def _mouth_side(P, frame):
    """Signed distance from the mouth line (IOD units, > 0 below), with the lip contours labelled."""
    uv = frame.to_uv(P)
    mids = np.concatenate([(uv[list(UPPER_INNER)] + uv[list(LOWER_INNER)]) / 2, uv[[78, 308]]])
    order = np.argsort(mids[:, 0])
    side = uv[:, 1] - np.interp(uv[:, 0], mids[order, 0], mids[order, 1])
    for idx, sign in ((UPPER_INNER + UPPER_OUTER, -1), (LOWER_INNER + LOWER_OUTER, 1)):
        side[list(idx)] = sign * np.maximum(sign * side[list(idx)], 0.05)
    side[list(MOUTH_CORNERS)] = 0.0
    return side


def _propagate(P, frame, controls, disp, candidates, sigma):
    """Spread control displacements (C, 3) to candidate points with a Gaussian of distance (IOD units)."""
    out = np.zeros((len(P), 3))
    uv = frame.to_uv(P)
    dist = np.linalg.norm(uv[candidates][:, None] - uv[list(controls)][None], axis=-1)  # (N, C)
    nearest = dist.argmin(1)
    weight = np.exp(-(dist.min(1) / sigma) ** 2)
    out[candidates] = weight[:, None] * disp[nearest]
    out[list(controls)] = disp
    return out


def close_mouth(P):
    """Bring the inner lips together (the neutral, closed mouth), dragging nearby skin along."""
    frame = FaceFrame(P)
    side = _mouth_side(P, frame)
    gap = P[list(LOWER_INNER)] - P[list(UPPER_INNER)]  # (9, 3)
    others = np.setdiff1d(np.arange(len(P)), UPPER_INNER + LOWER_INNER + MOUTH_CORNERS)
    up = _propagate(P, frame, UPPER_INNER, gap / 2, others[side[others] < 0], 0.1)
    down = _propagate(P, frame, LOWER_INNER, -gap / 2, others[side[others] > 0], 0.1)
    return P + up + down


def blendshapes(N):
    """Displacement fields (478, 3) px on the neutral mesh N: 'open', 'spread', 'pout', 'blink'."""
    frame = FaceFrame(N)
    uv, side = frame.to_uv(N), _mouth_side(N, frame)
    u, corner_u = uv[:, 0], np.abs(frame.to_uv(N[[61, 291]])[:, 0]).mean()
    lower = 1 / (1 + np.exp(-side / 0.015))
    jaw = np.sqrt(np.clip(1 - (u / 1.15) ** 2, 0, 1))
    lip_profile = np.clip(1 - 0.55 * (u / corner_u) ** 2, 0, 1)
    low_w = lower * jaw * (lip_profile + (1 - lip_profile) * np.clip(side / 0.35, 0, 1))
    up_w = (1 - lower) * np.exp(-(side / 0.2) ** 2) * lip_profile
    J = 0.3  # lip gap at full opening, in IOD
    d_open = np.stack([np.zeros_like(u), J * (0.85 * low_w - 0.15 * up_w), 0.1 * J * low_w], 1)
    lips = np.exp(-(u / 0.5) ** 2 - (side / 0.22) ** 2)
    d_spread = np.stack([0.14 * u * lips, -0.08 * side * lips, np.zeros_like(u)], 1)
    d_pout = np.stack([np.zeros_like(u), 0.06 * side * lips, -0.08 * lips], 1)
    d_blink = np.zeros((len(N), 3))
    for upper, lower_lid in EYES:
        gap = N[list(lower_lid)] - N[list(upper)]
        centre_v = uv[list(upper + lower_lid), 1].mean()
        contour = set(upper + lower_lid)
        above = np.array([i for i in range(468) if uv[i, 1] < centre_v and i not in contour])
        d_blink += _propagate(N, frame, upper, 0.9 * gap, above, 0.12)
        d_blink[list(lower_lid)] -= 0.1 * gap
    shapes = {"open": d_open, "spread": d_spread, "pout": d_pout}
    shapes = {k: frame.to_image(v) for k, v in shapes.items()}
    shapes["blink"] = d_blink
    return shapes


def reshape_identity(P, params):
    """Face shape of one identity: jaw width, face length, eye spacing, nose and mouth size."""
    frame = FaceFrame(P)
    uv = frame.to_uv(P)
    nose_v = uv[NOSE_TIP, 1]
    below = np.clip((uv[:, 1] - nose_v) / (-nose_v + 1e-6), 0, None)  # 0 at the nose, 1 at the mouth
    d = np.zeros((len(P), 3))
    d[:, 0] += params["jaw_width"] * uv[:, 0] * np.clip(below, 0, 1.6)
    d[:, 1] += params["face_length"] * np.clip(uv[:, 1] - nose_v, 0, None)
    for sign, (upper, lower_lid) in zip((-1, 1), EYES):
        centre = uv[list(upper + lower_lid)].mean(0)
        d[:, 0] += sign * params["eye_spacing"] * np.exp(-((uv - centre) ** 2).sum(1) / 0.35 ** 2)
    for centre, key, sigma in ((uv[NOSE_TIP], "nose_scale", 0.3), (uv[[13, 14]].mean(0), "mouth_scale", 0.35)):
        w = np.exp(-((uv - centre) ** 2).sum(1) / sigma ** 2)[:, None]
        d[:, :2] += params[key] * (uv - centre) * w
    return P + frame.to_image(d)


def rotation(yaw, pitch, roll):
    """3x3 rotation from degrees (yaw about y, pitch about x, roll about z)."""
    y, p, r = np.radians([yaw, pitch, roll])
    Ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    Rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def animate(N, shapes, art, blink, pose, size):
    """Animated meshes (T, 478, 3) px from the neutral mesh and per-frame tracks."""
    opening, spread = art[:, 0, None, None], art[:, 1, None, None]  # (T, 1, 1)
    P = (N[None] + opening * shapes["open"] + np.maximum(spread, 0) * shapes["spread"]
         + np.minimum(spread, 0) * (shapes["spread"] - shapes["pout"]) + blink[:, None, None] * shapes["blink"])
    centre = N.mean(0)
    out = np.empty_like(P)
    for t in range(len(P)):
        R = rotation(*pose[t, :3])
        out[t] = (P[t] - centre) @ R.T + centre
        out[t, :, :2] += pose[t, 3:] * size
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Identities: base portraits, recolouring, backgrounds
# ------------------------------------------------------------------------------------------------------------

def _portrait(name):
    if name == "astronaut":
        import skimage.data
        return skimage.data.astronaut()
    import matplotlib
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


@functools.lru_cache(maxsize=4)
def _base_photo(name, mirror):
    """(photo RGB, detected 478-point mesh px, person mask 0..1) of one base portrait."""
    photo = _portrait(name)
    photo = np.ascontiguousarray(photo[:, ::-1]) if mirror else photo
    mesh = landmarks.detect_image(photo)
    if mesh is None:
        raise RuntimeError(f"MediaPipe found no face on the {name} portrait")
    import mediapipe as mp
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        person = seg.process(photo).segmentation_mask.astype(np.float32)
    return photo, np.asarray(mesh, np.float64), person


def identity_params(identity):
    """Deterministic appearance of identity `identity` (0..19)."""
    if not (0 <= identity < NUM_IDENTITIES or identity >= EXTRA_IDENTITIES_START):
        raise ValueError(f"identity must be in 0..{NUM_IDENTITIES - 1} or >= {EXTRA_IDENTITIES_START}, got {identity}")
    rng = np.random.default_rng(1000 + identity)
    return {
        "photo": ("astronaut", "grace")[identity % 2], "mirror": bool((identity // 2) % 2),
        "crop_scale": rng.uniform(3.6, 4.3), "crop_dx": rng.uniform(-0.2, 0.2), "crop_dy": rng.uniform(0.1, 0.35),
        "jaw_width": rng.uniform(-0.1, 0.1), "face_length": rng.uniform(-0.07, 0.07),
        "eye_spacing": rng.uniform(-0.04, 0.04), "nose_scale": rng.uniform(-0.15, 0.15),
        "mouth_scale": rng.uniform(-0.12, 0.12),
        "skin_lab": (rng.uniform(-30, 12), rng.uniform(8, 20), rng.uniform(10, 28)),
        "hair_lab": (rng.uniform(25, 170), rng.uniform(-5, 30), rng.uniform(-10, 45)),
        "background": ("solid", "vertical", "horizontal", "stripes", "noise")[identity % 5],
        "bg_colours": rng.uniform(20, 235, (2, 3)),
        "bg_seed": int(rng.integers(1 << 30)),
    }


def _background(params, size):
    rng = np.random.default_rng(params["bg_seed"])
    a, b = params["bg_colours"]
    ramp = np.linspace(0, 1, size)
    kind = params["background"]
    if kind == "solid":
        mix = np.full((size, size), 0.15) + 0.05 * ramp[None]
    elif kind == "vertical":
        mix = np.repeat(ramp[:, None], size, 1)
    elif kind == "horizontal":
        mix = np.repeat(ramp[None], size, 0)
    elif kind == "stripes":
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * (ramp[None] + ramp[:, None]) * rng.uniform(3, 7))
    else:
        noise = cv2.resize(rng.uniform(0, 1, (8, 8)), (size, size), interpolation=cv2.INTER_CUBIC)
        mix = np.clip(noise, 0, 1)
    return (a * (1 - mix[..., None]) + b * mix[..., None]).astype(np.float32)


def _recolour(img, mask, target_lab, keep_l):
    """Shift the Lab colour of the masked pixels towards target (L offset if keep_l, else mean L)."""
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    mask = mask.astype(np.float32)
    weights = mask / max(mask.sum(), 1e-6)
    mean = (lab * weights[..., None]).sum((0, 1))
    shift = np.array(target_lab, np.float32) - np.array([0, mean[1], mean[2]])
    shift[0] = target_lab[0] if keep_l else (target_lab[0] / 255 * 100 - mean[0])
    lab = (lab + mask[..., None] * shift).astype(np.float32)
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255, 0, 255)


@functools.lru_cache(maxsize=8)
def identity_texture(identity, size=256):
    """Texture of one identity: (image float32 (size, size, 3), photo mesh px (478, 3), neutral mesh N).

    The photo is mirrored, cropped and recoloured; its detected mesh is where the texture comes from, and
    N (closed mouth, identity face shape) is where the texture goes before animation.
    """
    params = identity_params(identity)
    photo, mesh, person = _base_photo(params["photo"], params["mirror"])
    frame = FaceFrame(mesh)
    side = params["crop_scale"] * frame.iod
    centre = mesh[list(FACE_OVAL), :2].mean(0) + frame.iod * np.array([params["crop_dx"], params["crop_dy"]])
    scale = size / side
    M = np.array([[scale, 0, size / 2 - scale * centre[0]], [0, scale, size / 2 - scale * centre[1]]])
    image = cv2.warpAffine(photo, M, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    person = cv2.warpAffine(person, M, (size, size), borderMode=cv2.BORDER_REPLICATE)
    tex_mesh = np.concatenate([mesh[:, :2] * scale + M[:, 2], mesh[:, 2:] * scale], 1)
    image = image.astype(np.float32)
    face = np.zeros((size, size), np.float32)
    cv2.fillPoly(face, [np.round(tex_mesh[list(FACE_OVAL), :2]).astype(np.int32)], 1.0)
    ff = FaceFrame(tex_mesh)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2).astype(np.float64)
    uv = ff.to_uv(grid)  # (size * size, 2)
    brow_v = ff.to_uv(tex_mesh[[105, 334]])[:, 1].mean()
    head = ((uv[:, 0] / 1.3) ** 2 + ((uv[:, 1] - brow_v) / 1.4) ** 2 < 1) & (uv[:, 1] < brow_v + 0.9)
    hair = head.reshape(size, size) * (person > 0.5) * (1 - cv2.dilate(face, np.ones((5, 5))))
    lab = cv2.cvtColor(image / 255, cv2.COLOR_RGB2LAB)
    skin_ref = lab[face > 0].mean(0)
    skin_like = np.exp(-(((lab[..., 1:] - skin_ref[1:]) ** 2).sum(-1)) / 12.0 ** 2) * person * (1 - hair)
    skin = cv2.GaussianBlur(np.maximum(face, skin_like).astype(np.float32), (0, 0), size / 128)
    image = _recolour(image, skin, params["skin_lab"], keep_l=True)
    hair = cv2.GaussianBlur(hair.astype(np.float32), (0, 0), size / 128)
    image = _recolour(image, hair, params["hair_lab"], keep_l=False)
    alpha = cv2.GaussianBlur(person, (0, 0), size / 256)[..., None]
    image = alpha * image + (1 - alpha) * _background(params, size)
    neutral = reshape_identity(close_mouth(tex_mesh), params)
    return np.clip(image, 0, 255).astype(np.float32), tex_mesh, neutral


# ------------------------------------------------------------------------------------------------------------
# Rendering: piecewise-affine warp of the texture onto the animated mesh
# ------------------------------------------------------------------------------------------------------------

def _anchors(mesh, size):
    """Outer control points (texture px) and how much each follows the head (1 face .. 0 frame border)."""
    oval = mesh[list(FACE_OVAL), :2]
    centre = oval.mean(0)
    radius = np.linalg.norm(oval - centre, axis=1).mean()
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1)
    points, follow = [], []
    for factor, weight in ((1.35, 0.85), (1.9, 0.45)):
        points.append(centre + factor * radius * ring)
        follow.append(np.full(len(ring), weight))
    edge = np.linspace(-2, size + 1, 9)
    border = np.concatenate([np.stack([edge, np.full(9, -2.0)], 1), np.stack([edge, np.full(9, size + 1.0)], 1),
                             np.stack([np.full(7, -2.0), edge[1:-1]], 1),
                             np.stack([np.full(7, size + 1.0), edge[1:-1]], 1)])
    points.append(border)
    follow.append(np.zeros(len(border)))
    return np.concatenate(points), np.concatenate(follow)


@functools.lru_cache(maxsize=8)
def _triangulation(identity, size):
    """Triangles (K, 3) over mesh points 0..477 and anchors 478.. (Delaunay in texture space)."""
    _, tex_mesh, _ = identity_texture(identity, size)
    anchors, _ = _anchors(tex_mesh, size)
    points = np.concatenate([tex_mesh[:, :2], anchors])
    tri = Delaunay(points).simplices
    upper, lower = set(UPPER_INNER), set(LOWER_INNER)
    across = np.array([any(v in upper for v in t) and any(v in lower for v in t) for t in tri])
    inner = np.array([all(v in INNER_LIP_RING for v in t) for t in tri])
    return tri[~(across | inner)]


def _anchor_targets(anchors, follow, mesh_t, neutral, size):
    """Move anchors with the head: the least-squares similarity of the rigid points, partially."""
    src, dst = neutral[landmarks.RIGID, :2], mesh_t[landmarks.RIGID, :2]
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]  # least-squares similarity, complex form
    a = np.sum((zd - zd.mean()) * np.conj(zs - zs.mean())) / np.sum(np.abs(zs - zs.mean()) ** 2)
    za = a * (anchors[:, 0] + 1j * anchors[:, 1] - zs.mean()) + zd.mean()
    moved = np.stack([za.real, za.imag], 1)
    return anchors + follow[:, None] * (moved - anchors)


def _triangle_affines(dst, src):
    """Affine maps (K, 2, 3) taking each target triangle dst (K, 3, 2) onto its source triangle src."""
    e1, e2 = dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]  # (K, 2)
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = np.where(np.abs(det) < 1e-9, 1e-9, det)
    inv = np.stack([np.stack([e2[:, 1], -e2[:, 0]], 1), np.stack([-e1[:, 1], e1[:, 0]], 1)], 1) / det[:, None, None]
    src_edges = np.stack([src[:, 1] - src[:, 0], src[:, 2] - src[:, 0]], 2)  # (K, 2, 2) columns = edges
    linear = src_edges @ inv  # (K, 2, 2): texture offset per target offset
    offset = src[:, 0] - np.einsum("kij,kj->ki", linear, dst[:, 0])
    return np.concatenate([linear, offset[:, :, None]], 2)


def warp_frame(texture, tex_points, tri, target_points, depth):
    """Render texture (H, W, 3) float32 so tex_points land on target_points (piecewise affine).

    Triangle ids are rasterised far-to-near with cv2.fillPoly, each pixel is mapped back to the texture
    by its triangle's affine map, and cv2.remap samples it.
    """
    h, w = texture.shape[:2]
    ids = np.full((h, w), -1, np.int32)
    order = np.argsort(-depth[tri].mean(1))  # far first, near last
    pts = np.round(target_points[tri] * 16).astype(np.int32)  # (K, 3, 2) with 4 fractional bits
    for k in order:
        cv2.fillPoly(ids, [pts[k]], int(k), lineType=cv2.LINE_8, shift=4)
    affine = _triangle_affines(target_points[tri], tex_points[tri])  # (K, 2, 3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    valid = ids >= 0
    A = affine[np.where(valid, ids, 0)]  # (H, W, 2, 3)
    map_x = np.where(valid, A[..., 0, 0] * xs + A[..., 0, 1] * ys + A[..., 0, 2], xs).astype(np.float32)
    map_y = np.where(valid, A[..., 1, 0] * xs + A[..., 1, 1] * ys + A[..., 1, 2], ys).astype(np.float32)
    return cv2.remap(texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def draw_mouth(image, mesh_t, iod):
    """Dark mouth cavity with upper and lower teeth inside the inner-lip contour (in place).

    Drawn 4x supersampled (anti-aliased) in a small box around the mouth only.
    """
    h, w = image.shape[:2]
    gap = float(np.linalg.norm(mesh_t[14, :2] - mesh_t[13, :2]))
    if gap < 0.5:
        return image
    ring = mesh_t[list(INNER_LIP_RING), :2]
    x0, y0 = np.maximum(np.floor(ring.min(0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(ring.max(0)).astype(int) + 3, [w, h])
    if x1 <= x0 or y1 <= y0:
        return image
    scale, origin = 4, np.array([x0, y0])
    box = (y1 - y0) * scale, (x1 - x0) * scale

    def raster(poly):
        mask = np.zeros(box, np.uint8)
        cv2.fillPoly(mask, [np.round((poly - origin) * scale * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        return cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255

    normal = (mesh_t[14, :2] - mesh_t[13, :2]) / gap
    teeth = 0.0
    for inner, frac, limit in ((UPPER_INNER, 0.25, 0.05), (LOWER_INNER, -0.12, 0.025)):
        edge = mesh_t[[78, *inner, 308], :2]
        band = edge + normal * np.sign(frac) * min(abs(frac) * gap, limit * iod)
        teeth = np.maximum(teeth, raster(np.concatenate([edge, band[::-1]])))
    cavity = raster(ring)
    colour = np.array([40, 12, 16], np.float32) * (1 - teeth) + np.array([225, 220, 205], np.float32) * teeth
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch * (1 - cavity) + colour * cavity
    return image


def render_clip(identity, art, blink, pose, size=256):
    """Frames uint8 (T, size, size, 3) and ground-truth landmarks float32 (T, 478, 3) px."""
    T = len(art)
    if art.shape != (T, 2) or np.shape(blink) != (T,) or np.shape(pose) != (T, 5):
        raise ValueError(f"render_clip expects art (T, 2), blink (T,), pose (T, 5), got {art.shape}, "
                         f"{np.shape(blink)}, {np.shape(pose)}")
    texture, tex_mesh, neutral = identity_texture(identity, size)
    shapes = blendshapes(neutral)
    meshes = animate(neutral, shapes, art, blink, pose, size)
    tri = _triangulation(identity, size)
    anchors, follow = _anchors(tex_mesh, size)
    iod = FaceFrame(neutral).iod
    tex_points = np.concatenate([tex_mesh[:, :2], anchors])
    frames = np.empty((len(meshes), size, size, 3), np.uint8)
    far = np.full(len(anchors), float(neutral[:, 2].max()) + iod)
    for t, mesh_t in enumerate(meshes):
        target = np.concatenate([mesh_t[:, :2], _anchor_targets(anchors, follow, mesh_t, neutral, size)])
        image = warp_frame(texture, tex_points, tri, target, np.concatenate([mesh_t[:, 2], far]))
        frames[t] = np.clip(draw_mouth(image, mesh_t, iod), 0, 255).astype(np.uint8)
    return frames, meshes


# ------------------------------------------------------------------------------------------------------------
# Clips: generation, files, loading
# ------------------------------------------------------------------------------------------------------------

def appearance_frames(identities, frames_per_identity=12, size=64, seed=0, progress=True, face_iod=0.0):
    """Still frames uint8 (identities * frames_per_identity, size, size, 3) of `identities` extra random
    identities (numbers from EXTRA_IDENTITIES_START: appearance drawn like identities 0-19, never one of them),
    with random speech mouth shapes, blinks and poses. Only the VAE trains on them: an autoencoder that sees 16
    faces learns those faces; it has to see many to learn to compress faces it has never seen. face_iod > 0:
    face crops with that inter-ocular fraction (landmarks.face_crop_box) instead of the rendered framing."""
    from tqdm import tqdm
    out = []
    for k in tqdm(range(identities), desc="VAE identities", unit="id", disable=not progress):
        identity = EXTRA_IDENTITIES_START + seed * 100_000 + k
        rng = np.random.default_rng([seed, identity, 2])
        audio, phonemes, ipa, _ = speech_clip(rng, "train", 2.0, None)
        art = articulation(phonemes, ipa, len(audio) / SAMPLE_RATE, audio)
        pick = np.sort(rng.choice(len(art), min(frames_per_identity, len(art)), replace=False))
        frames, P = render_clip(identity, art[pick], blink_track(rng, len(art))[pick],
                                pose_track(rng, len(art), max_deg=(8.0, 6.0, 5.0), max_shift=0.04)[pick])
        if face_iod:  # independent stills: each framed on its own
            out.append(landmarks.crop_clip_faces(frames, P, size, face_iod, smooth=1)[0])
        else:
            out.append(np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]))
        identity_texture.cache_clear()
        _triangulation.cache_clear()
    return np.concatenate(out)


def pick_identity(rng, split):
    """A random identity of the split: train 0-15, test 16-19 (held out)."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; use 'train' or 'test'")
    ids = TRAIN_IDENTITIES if split == "train" else TEST_IDENTITIES
    return int(ids[rng.integers(len(ids))])


def make_clip(seed, index, split="train", size=256, seconds=None, text=None):
    """Everything of one clip as arrays, deterministic in (seed, index, split) (see write_clip for keys)."""
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    identity = pick_identity(rng, split)
    audio, phonemes, ipa, text = speech_clip(rng, split, seconds, text)
    duration = len(audio) / SAMPLE_RATE
    art = articulation(phonemes, ipa, duration, audio)
    frames_n = len(art)
    frames, meshes = render_clip(identity, art, blink_track(rng, frames_n), pose_track(rng, frames_n), size)
    return {"frames": frames, "landmarks": meshes, "fps": FPS, "identity": identity, "audio": audio,
            "sample_rate": SAMPLE_RATE, "text": text, "phonemes": phonemes, "phoneme_ipa": np.array(ipa),
            "frame_size": size}


def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


class Mp4Writer:
    """Stream RGB frames into an H.264 (+ AAC) mp4 through the ffmpeg of imageio-ffmpeg, so memory does not grow
    with the video's length. Written to a temporary file beside `path` and renamed into place on a clean
    exit; on an exception the temporary file is removed and nothing is left at `path`.

        with Mp4Writer("out.mp4", (h, w), audio_int16) as video:
            video.write(frames)  # (n, h, w, 3) uint8, any number of times
    """

    def __init__(self, path, size_hw, audio=None, sample_rate=SAMPLE_RATE, fps=FPS, crf=18):
        self.path, self.size_hw, self.audio = os.fspath(path), tuple(int(v) for v in size_hw), audio
        self.sample_rate, self.fps, self.crf = sample_rate, fps, crf
        self.frames = 0

    def __enter__(self):
        import soundfile
        h, w = self.size_hw
        self._tmp = temp_beside(self.path, suffix=".mp4")
        self._wav = None
        cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-r", str(self.fps), "-i", "-"]
        if self.audio is not None:
            self._wav = self._tmp[:-4] + ".wav"
            soundfile.write(self._wav, np.asarray(self.audio, np.int16), self.sample_rate, subtype="PCM_16")
            cmd += ["-i", self._wav, "-c:a", "aac", "-b:a", "64k"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                "-threads", "1", "-movflags", "+faststart", "-f", "mp4", self._tmp]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    def write(self, frames):
        frames = np.ascontiguousarray(frames, np.uint8)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.shape[1:] != (*self.size_hw, 3):
            raise ValueError(f"frames must be (n, {self.size_hw[0]}, {self.size_hw[1]}, 3), got {frames.shape}")
        self._proc.stdin.write(frames.tobytes())
        self.frames += len(frames)

    def __exit__(self, exc_type, exc, tb):
        self._proc.stdin.close()
        err = self._proc.stderr.read().decode(errors="replace")
        code = self._proc.wait()
        if self._wav:
            os.unlink(self._wav)
        if exc_type is None and code == 0 and self.frames > 0:
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self.path)
            return False
        os.unlink(self._tmp)
        if exc_type is None:
            raise RuntimeError(f"ffmpeg failed on {self.path} after {self.frames} frames: {err[-500:]}")
        return False


def write_mp4(path, frames, audio=None, sample_rate=SAMPLE_RATE, fps=FPS, crf=18):
    """H.264 (+ AAC when audio is given) mp4 of all frames (T, H, W, 3) at once, atomically."""
    frames = np.asarray(frames, np.uint8)
    with Mp4Writer(path, frames.shape[1:3], audio, sample_rate, fps, crf) as video:
        video.write(frames)


def write_clip(stem, clip):
    """Write stem.mp4 (video + audio) and stem.npz (ground truth), each atomically."""
    write_mp4(stem + ".mp4", clip["frames"], clip["audio"])

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in clip.items() if k != "frames"})

    atomic_write(stem + ".npz", write)


def load_clip(npz_path):
    """The npz of a clip as a dict: arrays stay numpy, scalars become int/str."""
    if not os.path.exists(npz_path):
        raise UsageError(f"no clip at {npz_path}; generate data with `python data.py synth`")
    with np.load(npz_path, allow_pickle=False) as z:
        clip = {k: z[k] for k in z.files}
    missing = {"landmarks", "fps", "identity", "audio", "sample_rate", "text", "phonemes", "phoneme_ipa",
               "frame_size"} - set(clip)
    if missing:
        raise UsageError(f"{npz_path} is not a synthetic clip (missing {sorted(missing)}); regenerate it")
    for key in ("fps", "identity", "sample_rate", "frame_size"):
        clip[key] = int(clip[key])
    clip["text"] = str(clip["text"])
    clip["phoneme_ipa"] = [str(s) for s in clip["phoneme_ipa"]]
    return clip


def video_size(path):
    """(width, height) of a video's first stream, through ffmpeg; UsageError when it is missing or unreadable."""
    if not os.path.exists(path):
        raise UsageError(f"no video at {path}; check the path")
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True)
    match = re.search(r"Video:.*?(\d{2,5})x(\d{2,5})", probe.stderr)
    if match is None:
        raise UsageError(f"{path} has no readable video stream; re-encode it as H.264 mp4")
    return int(match.group(1)), int(match.group(2))


def read_frames(mp4_path, size=None, fps=None):
    """Decode a video into uint8 (T, H, W, 3) RGB through ffmpeg: size resizes to size x size (an int) or
    to (W, H) (a pair); fps resamples the frame rate (frames dropped or repeated, as ffmpeg's fps filter)."""
    w, h = video_size(mp4_path) if not size else (size, size) if np.isscalar(size) else size
    filters = ([f"fps={fps}"] if fps else []) + ([f"scale={w}:{h}:flags=area"] if size else [])
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", mp4_path, "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-vf", ",".join(filters)] if filters else []
    proc = subprocess.run(cmd + ["-"], capture_output=True)
    if proc.returncode != 0:
        raise UsageError(f"cannot decode {mp4_path}: {proc.stderr.decode(errors='replace')[-200:]}")
    return np.frombuffer(proc.stdout, np.uint8).reshape(-1, h, w, 3)  # (T, H, W, 3)


def _synth_one(job):
    cv2.setNumThreads(1)
    out, seed, index, split, size = job
    stem = os.path.join(out, f"clip_{index:04d}")
    if not (os.path.exists(stem + ".npz") and os.path.exists(stem + ".mp4")):
        write_clip(stem, make_clip(seed, index, split, size))
    return stem + ".npz"


def synth(out, clips, seed=0, split="train", size=256, workers=2, progress=True):
    """Generate `clips` clips into `out` (existing ones are kept); returns the npz paths in order."""
    from tqdm import tqdm
    if clips < 1 or size < 64:
        raise UsageError("need --clips >= 1 and --size >= 64")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {out}: {err.strerror}; choose a writable --out folder") from None
    jobs = [(out, seed, i, split, size) for i in range(clips)]
    bar = tqdm(total=clips, desc=f"synth {split}", unit="clip", disable=not progress)
    if workers <= 1:
        paths = []
        for job in jobs:
            paths.append(_synth_one(job))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            paths = []
            for path in pool.imap(_synth_one, jobs):
                paths.append(path)
                bar.update()
    bar.close()
    return paths


def ensure_synthetic(split="train", clips=64, seed=0, root="cache/synth", size=256, workers=2):
    """Paths of `clips` synthetic clips in root/<split>_<clips>_<seed>/, generated on first use."""
    folder = os.path.join(root, f"{split}_{clips}_{seed}" + ("" if size == 256 else f"_{size}px"))
    paths = [os.path.join(folder, f"clip_{i:04d}.npz") for i in range(clips)]
    if all(os.path.exists(p) and os.path.exists(p[:-4] + ".mp4") for p in paths):
        return paths
    return synth(folder, clips, seed, split, size, workers)


# ------------------------------------------------------------------------------------------------------------
# Verification and pictures
# ------------------------------------------------------------------------------------------------------------

def rms_envelope(audio, sample_rate, frames, fps=FPS):
    """RMS of the audio in each frame's window [i / fps, (i + 1) / fps)."""
    hop = sample_rate // fps
    x = np.pad(audio.astype(np.float64), (0, max(0, frames * hop - len(audio))))[:frames * hop]
    return np.sqrt((x.reshape(frames, hop) ** 2).mean(1))  # (T,)


def frames_in(intervals, frames, fps=FPS):
    """Frame indices whose centres fall in any interval, plus the frame nearest to each interval's centre."""
    centres = (np.arange(frames) + 0.5) / fps
    out = []
    for start, end in intervals:
        inside = np.nonzero((centres >= start) & (centres <= end))[0].tolist()
        nearest = int(np.clip(np.floor((start + end) / 2 * fps), 0, frames - 1))
        out.append(sorted(set(inside + [nearest])))
    return out


def ground_truth_checks(clip):
    """Mouth-opening checks of one clip: max relative opening in long silences and at bilabials, and
    the correlation of the opening with the audio RMS envelope."""
    opening = np.asarray(landmarks.mouth_opening(clip["landmarks"]), np.float64)
    rel = opening / max(opening.max(), 1e-9)
    T = len(rel)
    duration = len(clip["audio"]) / clip["sample_rate"]
    long_silences = [(s, e) for s, e in silences(clip["phonemes"], duration) if e - s > 0.2]
    bilabials = bilabial_closures(clip["phonemes"], clip["phoneme_ipa"])
    silence_max = max([rel[f].max() for f in frames_in(long_silences, T)], default=0.0)
    bilabial_max = max([rel[f].max() for f in frames_in(bilabials, T)], default=0.0)
    rms = rms_envelope(clip["audio"], clip["sample_rate"], T)
    return {"silence_max": float(silence_max), "bilabial_max": float(bilabial_max),
            "corr": float(np.corrcoef(opening, rms)[0, 1]), "silences": len(long_silences),
            "bilabials": len(bilabials)}


def detection_checks(clip, frames):
    """MediaPipe detection rate on rendered frames and lip error (% IOD) of the found frames."""
    P, found = landmarks.detect_video(frames, max_gap=0, smooth=False)
    gt = clip["landmarks"]
    found = np.asarray(found, bool)
    if not found.any():
        return {"detected": 0.0, "lip_error": float("nan")}
    lip = list(landmarks.LIPS)
    err = np.linalg.norm(P[found][:, lip, :2] - gt[found][:, lip, :2], axis=-1).mean(1)  # (F,)
    iod = np.asarray(landmarks.inter_ocular(gt[found]), np.float64)
    return {"detected": float(found.mean()), "lip_error": float((err / iod).mean() * 100)}


def verify(folder, clips=20):
    """Measure the synthetic data against its ground truth and print a report; returns the summary."""
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))[:clips]
    if not paths:
        raise UsageError(f"no clips (*.npz) in {folder}; run `python data.py synth --out {folder}` first")
    from tqdm import tqdm
    rows = []
    for path in tqdm(paths, desc="verify", unit="clip"):
        clip = load_clip(path)
        frames = read_frames(path[:-4] + ".mp4")
        if len(frames) != len(clip["landmarks"]):
            raise UsageError(f"{path}: video has {len(frames)} frames, landmarks {len(clip['landmarks'])}")
        rows.append({**ground_truth_checks(clip), **detection_checks(clip, frames), "frames": len(frames),
                     "name": os.path.basename(path)[:-4], "identity": clip["identity"]})
    print(f"{'clip':<12}{'id':>4}{'frames':>8}{'detected%':>11}{'lip%IOD':>9}{'silence%':>10}{'bilabial%':>11}"
          f"{'corr':>7}")
    for r in rows:
        print(f"{r['name']:<12}{r['identity']:>4}{r['frames']:>8}{r['detected'] * 100:>11.1f}{r['lip_error']:>9.2f}"
              f"{r['silence_max'] * 100:>10.1f}{r['bilabial_max'] * 100:>11.1f}{r['corr']:>7.3f}")
    frames_total = sum(r["frames"] for r in rows)
    summary = {
        "clips": len(rows), "frames": frames_total,
        "detection_rate": sum(r["detected"] * r["frames"] for r in rows) / frames_total,
        "lip_error_pct_iod": float(np.nanmean([r["lip_error"] for r in rows])),
        "silence_open_max": max(r["silence_max"] for r in rows),
        "bilabial_open_max": max(r["bilabial_max"] for r in rows),
        "corr_min": min(r["corr"] for r in rows), "corr_mean": float(np.mean([r["corr"] for r in rows])),
    }
    print(f"clips {summary['clips']}, frames {frames_total}")
    print(f"MediaPipe detection rate        {summary['detection_rate'] * 100:.2f} %   (target >= 98)")
    print(f"lip landmark error (40 points)  {summary['lip_error_pct_iod']:.2f} % IOD (target <= 5)")
    print(f"GT opening in silences > 200 ms {summary['silence_open_max'] * 100:.1f} % of clip max (target < 10)")
    print(f"GT opening at bilabials         {summary['bilabial_open_max'] * 100:.1f} % of clip max (target < 10)")
    print(f"corr(opening, RMS 40 ms)        min {summary['corr_min']:.3f}, mean {summary['corr_mean']:.3f} "
          f"(target >= 0.5)")
    return summary


def _draw_points(image, points, lips_colour=(255, 40, 40), colour=(40, 255, 80)):
    out = image.copy()
    lip = set(landmarks.LIPS)
    for i, (x, y) in enumerate(np.round(points[:, :2]).astype(int)):
        cv2.circle(out, (int(x), int(y)), 1, lips_colour if i in lip else colour, -1, cv2.LINE_AA)
    return out


def contact_sheet(out, video=None, size=256, seed=7, cell_px=192):
    """Contact sheet of 8 identities (a closed and an open frame each, GT landmarks drawn on the second),
    and optionally a short sample mp4 (frame | GT landmark drawing) with its audio."""
    from tqdm import tqdm
    cells = []
    for identity in tqdm(range(8), desc="sheet", unit="identity"):
        rng = np.random.default_rng([seed, identity])
        audio, phonemes, ipa, _ = speech_clip(rng, "train", 3.0)
        art = articulation(phonemes, ipa, len(audio) / SAMPLE_RATE)
        pick = [int(np.argmin(art[:, 0] + 10 * (np.arange(len(art)) < 5))), int(np.argmax(art[:, 0]))]
        frames, meshes = render_clip(identity, art[pick], np.zeros(2, np.float32),
                                     pose_track(rng, 2), size)
        cell = np.concatenate([frames[0], _draw_points(frames[1], meshes[1])], 1)
        cells.append(cv2.resize(cell, (cell_px * 2, cell_px), interpolation=cv2.INTER_AREA))
    rows = [np.concatenate(cells[i:i + 2], 1) for i in range(0, 8, 2)]
    sheet = np.concatenate(rows, 0)
    save_png(out, sheet)
    if video:
        clip = make_clip(seed, 0, "train", size, seconds=3.0)
        drawn = np.stack([landmarks.draw_landmark_image(m[:, :2], size) for m in clip["landmarks"]])
        drawn = drawn if drawn.ndim == 4 else np.repeat(drawn[..., None], 3, -1)
        write_mp4(video, np.concatenate([clip["frames"], drawn.astype(np.uint8)], 2), clip["audio"], crf=30)


EXAMPLE = dict(seed=0, index=16, split="test")  # a held-out identity (18) speaking a held-out sentence


def example(out="examples"):
    """The shipped example inputs: out/face.png (the clip's first frame), out/speech.wav (16 kHz) and
    out/truth.npz (the clip's true landmarks, for `evaluate.py sample`), from test clip EXAMPLE."""
    import soundfile
    clip = make_clip(**EXAMPLE)
    os.makedirs(out, exist_ok=True)
    save_png(os.path.join(out, "face.png"), clip["frames"][0])
    atomic_write(os.path.join(out, "speech.wav"),
                 lambda tmp: soundfile.write(tmp, clip["audio"], SAMPLE_RATE, subtype="PCM_16", format="WAV"))
    atomic_write(os.path.join(out, "truth.npz"), lambda tmp: np.savez_compressed(
        open(tmp, "wb"), landmarks=clip["landmarks"].astype(np.float16), text=clip["text"]))
    print(f"wrote {out}/face.png, speech.wav, truth.npz: identity {clip['identity']}, {clip['text']!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Synthetic talking heads with exact ground truth.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate clips (mp4 + npz)")
    s.add_argument("--out", required=True)
    s.add_argument("--clips", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=("train", "test"), default="train")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2)
    v = sub.add_parser("verify", help="measure detection, lip error and mouth/audio agreement")
    v.add_argument("--dir", required=True)
    v.add_argument("--clips", type=int, default=20)
    c = sub.add_parser("sheet", help="contact sheet png (and a short sample mp4)")
    c.add_argument("--out", default="docs/data_contact_sheet.png")
    c.add_argument("--video", default=None)
    c.add_argument("--size", type=int, default=256)
    e = sub.add_parser("example", help="the example inputs shipped in examples/ (a held-out face and sentence)")
    e.add_argument("--out", default="examples")
    args = parser.parse_args(argv)
    if args.command == "example":
        example(args.out)
    elif args.command == "synth":
        import time
        start = time.time()
        paths = synth(args.out, args.clips, args.seed, args.split, args.size, args.workers)
        frames = sum(len(np.load(p)["landmarks"]) for p in paths)
        elapsed = time.time() - start
        print(f"{len(paths)} clips, {frames} frames in {elapsed:.1f} s ({frames / elapsed:.1f} frames/s) -> {args.out}")
    elif args.command == "verify":
        verify(args.dir, args.clips)
    else:
        contact_sheet(args.out, args.video, args.size)


if __name__ == "__main__":
    run_cli(main)
