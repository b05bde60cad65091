"""Synthetic speech and motion for the synthetic talking heads: espeak-ng sentences with phoneme timings, and the
mouth, blink and head tracks that follow them.

Not part of the paper (it trains on HDTF / MEAD videos); our data generator, so the cascade can be trained and
measured offline with exact ground truth (`synth_clips.make_clip` puts the pieces together):

- speech: espeak-ng (the `espeakng-loader` wheel, through ctypes) speaks random sentences from a small grammar
  with random voices, variants, pitch and rate; phoneme events give IPA labels and timings. `speech_clip`'s
  voices add other engines (flite, festival, piper and recorded prompts, `voices.py`), one drawn per clip;
- motion: per-phoneme viseme targets (jaw opening, lip spread/rounding) with coarticulation (a zero-phase
  critically damped filter), a closure envelope that shuts the lips at bilabials and in silences, natural
  blinks and a smooth head pose (`synth_face.animate` applies them to the mesh): `pose_track`, the small sway
  of the shipped models (poses "small"), or `wide_pose_track`, heads that turn, nod, tilt, move and come closer
  like people in talking-head footage (poses "wide"; `head_pose` picks one).

Time convention: frame i shows time (i + 0.5) / fps (its centre), so frame i lines up with the audio window
[i / fps, (i + 1) / fps).
"""
import ctypes
import functools
import math
import re
import zlib

import espeakng_loader
import numpy as np
from scipy.signal import lfilter, resample_poly

import voices as voice_sources
from voices import DEFAULT_VOICES, in_fresh_process

FPS = 25
SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
CLIP_SECONDS = (3.0, 8.0)
OTHER_ENGINES_RMS = 3500  # int16 RMS of every utterance of the engines other than espeak-ng (about espeak's)


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
        # espeak_Initialize seeds espeak-ng's own generator with time(NULL), and the breath noise of the breathy
        # variants (f2, f3, f5) draws from it: without a fixed seed their samples change from second to second
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(1))
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
        self.lib.espeak_Synchronize()
        wav = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return wav.astype(np.int16), list(self.events)


@functools.lru_cache(maxsize=1)
def _espeak():
    return _Espeak()


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
    """Speak `text` with espeak-ng (deterministic: each call runs in a fresh forked process, with espeak-ng's
    noise generators seeded), for every voice in VOICES with every variant in VARIANTS.

    Returns (wav int16 (N,) at 22050 Hz, phonemes [(start_s, end_s, ipa), ...]) where pauses are left out,
    so the gaps between phonemes are silences. Stress marks are kept in the IPA strings.
    """
    return in_fresh_process(_synthesize, text, voice, rate, pitch, pitch_range)


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


def _to_rate(wav, rate, target=SAMPLE_RATE):
    """int16 wav at `rate` resampled to `target` Hz (polyphase), rounded and clipped back to int16."""
    if rate == target:
        return wav
    g = math.gcd(target, rate)
    out = resample_poly(wav.astype(np.float64), target // g, rate // g)  # 22050 -> 16000 Hz: 320 / 441
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def _level(wav, rms=OTHER_ENGINES_RMS, peak=30000):
    """wav scaled to RMS `rms` (the other engines speak about as loud as espeak-ng), less where its loudest
    sample would pass `peak`."""
    x = wav.astype(np.float64)
    if not len(x) or not x.any():
        return wav
    gain = min(rms / np.sqrt(np.mean(x ** 2)), peak / np.abs(x).max())
    return np.round(x * gain).astype(np.int16)


def _espeak_speaker(rng):
    voice = VOICES[rng.integers(len(VOICES))]
    variant = VARIANTS[rng.integers(len(VARIANTS))]
    voice = voice + ("+" + variant if variant else "")
    rate, pitch, pitch_range = rng.integers(140, 200), rng.integers(30, 75), rng.integers(30, 80)

    def say(sentence):
        return synthesize(sentence, voice, rate, pitch, pitch_range) + (sentence,)
    return say, ESPEAK_RATE


def _speaker(rng, engine, split):
    """(say(item) -> (wav int16 at rate, phonemes, text), rate, the split's items) of a random voice of the
    engine: sentences of the split's pool, or for "recorded" the split's Asterisk prompts."""
    if engine == "espeak":
        return _espeak_speaker(rng) + (sentence_pool(split),)
    if engine == "recorded":
        def say(prompt):
            wav, rate, phons = voice_sources.recorded(*prompt[1:])
            return _level(_to_rate(wav, rate)), phons, prompt[2]
        return say, SAMPLE_RATE, voice_sources.recorded_prompts(split)
    speak = voice_sources.speaker(engine, rng)

    def say(sentence):
        wav, rate, phons = speak(sentence)
        return _level(_to_rate(wav, rate)), phons, sentence
    return say, SAMPLE_RATE, sentence_pool(split)


def pick_engine(rng, voices=DEFAULT_VOICES, text=None):
    """The engine of one clip: one of `voices` (voices.ENGINES), drawn from rng only when there are several;
    with a given text, recorded speech (which says only its prompts) is not a choice."""
    unknown = [v for v in voices if v not in voice_sources.ENGINES]
    if unknown:
        raise ValueError(f"unknown voice sources {unknown}; use some of {voice_sources.ENGINES}")
    choices = [v for v in voices if text is None or v != "recorded"]
    if not choices:
        raise ValueError("recorded speech cannot say a given text; add a synthesiser to voices")
    return choices[0] if len(choices) == 1 else choices[rng.integers(len(choices))]


def spoken_clip(rng, split="train", seconds=None, text=None, voices=DEFAULT_VOICES):
    """Random multi-phrase utterance: 3-8 s of 16 kHz speech with pauses between phrases, spoken by one engine
    of `voices` (`pick_engine`; the default, espeak-ng alone, draws exactly what it drew before engines existed).

    With `text`, speaks just that phrase (between short silences) and the 3-8 s limits do not apply. Recorded
    speech joins a few real prompts (the split's, `voices.recorded_prompts`) with pauses.
    Returns (audio int16 (N,), phonemes float32 (P, 2) start/end seconds, ipa list, text, engine).
    """
    seconds = rng.uniform(*CLIP_SECONDS) if seconds is None else seconds
    engine = pick_engine(rng, voices, text)
    say, rate, pool = _speaker(rng, engine, split)
    pieces = [np.zeros(int(rng.uniform(0.15, 0.4) * rate), np.int16)]
    offset = len(pieces[0]) / rate
    phonemes, texts = [], []
    while offset < seconds and not (text is not None and texts):
        wav, phons, sentence = say(pool[rng.integers(len(pool))] if text is None else text)
        if texts and offset + len(wav) / rate > CLIP_SECONDS[1] - 0.2:
            break
        texts.append(sentence)
        phonemes += [(s + offset, e + offset, ipa) for s, e, ipa in phons]
        pause = np.zeros(int(rng.uniform(0.25, 0.7) * rate), np.int16)
        pieces += [wav, pause]
        offset += (len(wav) + len(pause)) / rate
    wav = np.concatenate(pieces)
    target = int(round((offset if text is not None else np.clip(offset, *CLIP_SECONDS)) * rate))
    audio = _to_rate(np.pad(wav, (0, max(0, target - len(wav))))[:target], rate)
    duration = len(audio) / SAMPLE_RATE
    phonemes = [(s, min(e, duration), ipa) for s, e, ipa in phonemes if s < duration]
    times = np.array([(s, e) for s, e, _ in phonemes], np.float32).reshape(-1, 2)  # (P, 2)
    return audio, times, [ipa for _, _, ipa in phonemes], " ".join(texts), engine


def speech_clip(rng, split="train", seconds=None, text=None, voices=DEFAULT_VOICES):
    """`spoken_clip` without the engine: (audio int16 (N,), phonemes float32 (P, 2), ipa list, text)."""
    return spoken_clip(rng, split, seconds, text, voices)[:4]


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


POSES = ("small", "wide")  # the head-motion setting of a synthetic clip (`python data.py synth --poses`)


def _soft_limit(x, amp, knee=0.8):
    """x unchanged within +-knee * amp, then bent smoothly (tanh, C1) towards +-amp, never past it."""
    a = np.abs(x) / amp
    bent = knee + (1 - knee) * np.tanh((a - knee) / (1 - knee))
    return np.sign(x) * amp * np.where(a <= knee, a, bent)


def _sinusoids(rng, t, low=0.08, high=0.4, n=3):
    """Sum of n random slow sinusoids (frequencies low..high Hz), peak 1 over t."""
    freqs, phases, weights = rng.uniform(low, high, n), rng.uniform(0, 2 * np.pi, n), rng.uniform(0.3, 1, n)
    wave = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
    return wave / max(np.abs(wave).max(), 1e-9)


def _turns(rng, t, amp):
    """Look from place to place: holds of 0.6-2.5 s joined by raised-cosine turns of 0.5-1.2 s, to targets
    mostly on the other side of the range (up to +-amp)."""
    current = rng.uniform(-1, 1) * amp
    x = np.full(len(t), current)
    start = rng.uniform(0.2, 1.5)
    while start < t[-1]:
        if rng.random() < 0.75:
            target = -np.sign(current) * rng.uniform(0.3, 1.0) * amp
        else:
            target = rng.uniform(-1, 1) * amp
        duration = rng.uniform(0.5, 1.2)
        s = np.clip((t - start) / duration, 0, 1)
        x = x + (target - current) * (0.5 - 0.5 * np.cos(np.pi * s))
        current = target
        start += duration + rng.uniform(0.6, 2.5)
    return x


def wide_pose_track(rng, frames, fps=FPS, max_deg=(25.0, 15.0, 15.0), max_shift=0.04, max_scale=0.1):
    """Head motion of talking-head footage: (yaw, pitch, roll) degrees, (tx, ty) frame fractions and a scale
    change (size / neutral size - 1) per frame, (T, 6).

    Yaw and pitch look from place to place (`_turns`) with a slow sway of a fifth of the range on top; roll,
    shift and scale are slow sinusoids stretched so each reaches 50-100 % of its range within the clip. Every
    channel stays within its range (`_soft_limit`), so a 4-8 s clip visits a good part of +-25 deg yaw,
    +-15 pitch, +-15 roll, +-4 % shift and +-10 % scale."""
    t = np.arange(frames) / fps
    out = np.zeros((frames, 6))
    for k, amp in enumerate(max_deg[:2]):
        out[:, k] = _soft_limit(_turns(rng, t, amp) + 0.2 * amp * _sinusoids(rng, t), amp)
    for k, amp in zip(range(2, 6), (max_deg[2], max_shift, max_shift, max_scale)):
        out[:, k] = amp * rng.uniform(0.5, 1.0) * _sinusoids(rng, t)
    return out.astype(np.float32)


def head_pose(rng, frames, poses="small", fps=FPS):
    """The head track of a clip: `pose_track` (T, 5) for poses "small", `wide_pose_track` (T, 6) for "wide"."""
    if poses == "small":
        return pose_track(rng, frames, fps)
    if poses == "wide":
        return wide_pose_track(rng, frames, fps)
    raise ValueError(f"poses must be one of {POSES}, got {poses!r}")
