"""Training-audio augmentation for A2L, so it hears what real recordings do: our addition, not the paper's.

The paper describes no augmentation of its training audio; DreamHead's A2L hears a hand-made log-mel (audio.py), which
a quiet, noisy, reverberant or telephone recording moves far from anything the clean training speech gave it.
Here each trick of speech-recognition practice is one function on a 16 kHz float wave (numpy / scipy / torch only,
vectorised: no Python loop over samples), and `augment_window` applies those an item's seed fires to the audio
around one training window, keeping the audio and the window's landmarks aligned:

* `gain_clip`: a random level, stored as 16-bit samples, clipped (volume perturbation, Ko et al. 2015).
* `add_noise` with `noise` (white, pink, synthetic babble) at 0-20 dB SNR (MUSAN-style, Snyder et al. 2018).
* `reverb` with `room_impulse_response`: exponentially decaying noise RIRs of random RT60 (Polack's model, as the
  simulated RIRs of Ko et al. 2017).
* `telephone` (8 kHz, 300-3400 Hz, G.711 mu-law) and `codec` (a lowpass and coarse mu-law).
* speed (`resample_poly`: timing and pitch, Ko et al. 2015; the landmarks are resampled in time with it) and
  `pitch_shift` (granular overlap-add: pitch only, every grain stays where it was, so the frames keep their audio).
* lengthened pauses (`insert_silence`: a frame where the speaker is silent with the mouth closed is held while
  silence is inserted after it) and `breath` (breathing-like noise inside a pause, the mouth staying closed).

The window's augmented audio is cut from an augmented excerpt (the window and half a second either side), which is then
loudness-normalised as the cascade normalises a recording (audio.normalize_loudness), so A2L hears what sample.py
would make of such a recording. `loudness_copies` is the matching robustness probe for evaluation.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy.signal import butter, fftconvolve, resample_poly, sosfilt, sosfiltfilt

from audio import FPS, HOP, LOG_FLOOR, MEL_PER_FRAME, SAMPLE_RATE, log_mel, normalize_loudness

SR = SAMPLE_RATE
FRAME = SR // FPS              # 640 samples per video frame
HALF_FFT = 256                 # n_fft // 2: how far a centred STFT frame reaches either side of its centre
MARGIN = SR // 2               # samples of excerpt on each side of a window: reverb tails, the loudness measure
GAIN_DB = (-40.0, 20.0)        # level change; above about +6 dB the peaks of normalised speech clip
SNR_DB = (0.0, 20.0)           # background noise (MUSAN's noise SNRs are 0-15 dB, babble 13-20 dB)
NOISES = ("white", "pink", "babble")
RT60_S = (0.2, 0.8)            # reverberation time: small office to large room
DRR_DB = (-3.0, 12.0)          # direct-to-reverberant energy ratio
CODEC_HZ = (3000.0, 7000.0)    # codec bandwidth: narrowband to wideband (G.722's 7 kHz)
CODEC_BITS = (4, 8)            # mu-law bits: 8 is G.711, fewer a lower bitrate
SPEED_UP, SPEED_DOWN = 50, (45, 55)   # speed factor s = down / up in [0.9, 1.1] (Ko et al. 2015: 0.9, 1.0, 1.1)
PITCH_SEMITONES = 2.0          # pitch shift range, +-
GRAIN = 1024                   # samples of a pitch-shift grain (64 ms, half-overlapping)
SILENCE_FRAMES = (2, 40)       # frames of silence one insertion adds (80 ms to 1.6 s)
SILENT_RMS = 2e-3              # a frame is silent below this RMS (normalised speech has 0.05: -28 dB)
BREATH_DB = (-35.0, -20.0)     # breath level against the speech
BREATH_S = (0.25, 0.7)         # breath length
BREATH_MIN_FRAMES = 8          # the shortest pause a breath goes in
MU = 255.0                     # G.711 mu-law


@dataclasses.dataclass(frozen=True)
class Settings:
    """Probability of each augmentation per training window (A2LConfig's aug_* fields); all 0: no augmentation."""
    gain: float = 0.0
    noise: float = 0.0
    reverb: float = 0.0
    telephone: float = 0.0
    codec: float = 0.0
    speed: float = 0.0
    pitch: float = 0.0
    silence: float = 0.0
    breath: float = 0.0

    @property
    def probabilities(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in NAMES])

    @property
    def active(self) -> bool:
        return bool((self.probabilities > 0).any())


NAMES = tuple(f.name for f in dataclasses.fields(Settings))


# ----------------------------------------------------------------------------------------------------------------
# Level, noise, room, channel
# ----------------------------------------------------------------------------------------------------------------

def gain_clip(x: np.ndarray, gain_db: float) -> np.ndarray:
    """x at gain_db, rounded to 16-bit samples and clipped to [-1, 1]: a quiet recording's quantisation noise, a
    loud one's clipping (a pure gain alone is undone by the loudness normalisation)."""
    y = np.asarray(x, np.float64) * 10.0 ** (gain_db / 20.0)
    return np.clip(np.round(y * 32767.0) / 32767.0, -1.0, 1.0)


def loudness_copies(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The robustness probe of a wave (S,): its -20 dB copy and its +10 dB copy clipped to [-1, 1], float32."""
    wave = np.asarray(wave, np.float32)
    return wave * np.float32(0.1), np.clip(wave * np.float32(10.0 ** 0.5), -1.0, 1.0)


def active_power(x: np.ndarray, relative_gate: float = 1e-2) -> float:
    """Mean power over the 20 ms blocks louder than relative_gate x the loudest (normalize_loudness's gate)."""
    block = SR // 50
    n = max(1, math.ceil(x.size / block))
    power = (np.pad(np.asarray(x, np.float64), (0, n * block - x.size)) ** 2).reshape(n, block).mean(1)  # (n,)
    return float(power[power > relative_gate ** 2 * power.max()].mean()) if power.max() > 0 else 0.0


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise (n,): white, pink (1/f power) or babble (3-7 synthetic talkers)."""
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        f = np.fft.rfftfreq(n)
        weights = np.zeros_like(f)
        weights[1:] = 1.0 / np.sqrt(f[1:])                                        # power 1/f, no DC
        x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * weights, n)
    elif kind == "babble":
        x = babble(n, int(rng.integers(3, 8)), rng)
    else:
        raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(NOISES)}")
    return x / math.sqrt(max(float((x ** 2).mean()), 1e-20))


def babble(n: int, talkers: int, rng: np.random.Generator) -> np.ndarray:
    """Several synthetic talkers at once (n,): each a sawtooth buzz at a drifting pitch (90-250 Hz) gated by a random
    syllable envelope (about 4 Hz), plus breath noise under the envelopes, lowpassed like a vocal tract."""
    f0 = rng.uniform(90, 250, (talkers, 1)) * (1 + 0.15 * _smooth_random(rng, talkers, n, 5.0))  # (talkers, n)
    buzz = 2.0 * (np.cumsum(f0, axis=1) / SR % 1.0) - 1.0                                # (talkers, n) sawtooth
    envelope = np.maximum(_smooth_random(rng, talkers, n, 8.0), 0.0)                   # (talkers, n)
    voices = (buzz * envelope).sum(0) + 0.3 * rng.standard_normal(n) * envelope.sum(0)  # (n,)
    return sosfilt(butter(2, 1500, fs=SR, output="sos"), voices)


def _smooth_random(rng: np.random.Generator, rows: int, n: int, rate_hz: float) -> np.ndarray:
    """Standard normal values at `rate_hz` knots, linearly interpolated to (rows, n) samples."""
    knots = rng.standard_normal((rows, int(n * rate_hz / SR) + 2))
    grid = np.arange(knots.shape[1]) * (SR / rate_hz)
    return np.stack([np.interp(np.arange(n), grid, row) for row in knots])          # one row per talker


def add_noise(x: np.ndarray, noise_wave: np.ndarray, snr_db: float) -> np.ndarray:
    """x plus noise_wave scaled so x's active power (`active_power`) over the noise's mean power is snr_db."""
    scale = math.sqrt(active_power(x) / 10.0 ** (snr_db / 10.0) / max(float((noise_wave ** 2).mean()), 1e-20))
    return x + scale * noise_wave


def room_impulse_response(rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic RIR (rt60 s long): a unit direct path at sample 0 (no delay: the audio stays on its frames), then
    after a 2-8 ms pre-delay Gaussian noise decaying 60 dB in rt60 s (Polack), its energy 1 / 10^(drr_db / 10)."""
    n = max(int(rt60 * SR), 2)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * np.exp(-3.0 * math.log(10.0) * t / rt60)   # amplitude -60 dB at rt60
    tail[:int(rng.uniform(0.002, 0.008) * SR)] = 0.0
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / float((tail ** 2).sum()))
    tail[0] = 1.0
    return tail


def reverb(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """x convolved with a room impulse response, cut to x's length."""
    return fftconvolve(x, rir)[:x.size]


def mu_law(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """x companded with mu-law (mu = 255), quantised to `bits` bits and expanded back (bits 8: G.711)."""
    levels = 2 ** (bits - 1) - 1
    y = np.sign(x) * np.log1p(MU * np.abs(np.clip(x, -1, 1))) / math.log1p(MU)
    y = np.round(y * levels) / levels
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(MU)) / MU


def telephone(x: np.ndarray) -> np.ndarray:
    """A telephone line at 16 kHz: down to 8 kHz, 300-3400 Hz band filter, G.711 mu-law, the band filter again (the
    receiver's) and back up to 16 kHz; zero-phase filters, so nothing moves in time."""
    band = butter(4, (300.0, 3400.0), btype="bandpass", fs=SR // 2, output="sos")
    narrow = sosfiltfilt(band, resample_poly(x, 1, 2))
    return resample_poly(sosfiltfilt(band, mu_law(narrow)), 2, 1)[:x.size]


def codec(x: np.ndarray, cutoff_hz: float, bits: int) -> np.ndarray:
    """A low-bitrate codec's damage: a zero-phase lowpass at cutoff_hz, then mu-law at `bits` bits."""
    return mu_law(sosfiltfilt(butter(8, cutoff_hz, fs=SR, output="sos"), x), bits)


# ----------------------------------------------------------------------------------------------------------------
# Speaker: pitch, pauses, breaths
# ----------------------------------------------------------------------------------------------------------------

def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
    """x with its pitch moved by `semitones` and its timing kept: grain m (GRAIN samples, Hann, half-overlapping)
    is read around sample m * GRAIN / 2 at rate 2^(semitones / 12) and added back centred where it was, so no
    sound moves more than a fraction of a grain (granular pitch shifting)."""
    rate, H = 2.0 ** (semitones / 12.0), GRAIN // 2
    M = x.size // H + 2
    centres = np.arange(M)[:, None] * H                                           # (M, 1)
    pos = centres + (np.arange(GRAIN)[None] - H) * rate                           # (M, GRAIN) read positions
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    padded = np.concatenate([x, [0.0, 0.0]])                                      # reads past the end: zeros
    ok0, ok1 = (i0 >= 0) & (i0 < x.size), (i0 >= -1) & (i0 < x.size - 1)
    grains = np.where(ok0, padded[np.clip(i0, 0, x.size)], 0) * (1 - frac) \
        + np.where(ok1, padded[np.clip(i0 + 1, 0, x.size)], 0) * frac
    grains *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(GRAIN) / GRAIN)            # periodic Hann: sums to 1
    # grain m covers samples (m - 1) H .. (m + 1) H: block j gets grain j's second half and grain j+1's first
    blocks = grains[:-1, H:] + grains[1:, :H]                                     # (M - 1, H)
    return blocks.reshape(-1)[:x.size]


def silent_frames(wave: np.ndarray, T: int) -> np.ndarray:
    """(T,) True where video frame i's audio (samples 640 i .. 640 (i+1)) has an RMS under SILENT_RMS."""
    frames = np.zeros(T * FRAME, np.float64)
    n = min(wave.size, T * FRAME)
    frames[:n] = wave[:n]
    return np.sqrt((frames.reshape(T, FRAME) ** 2).mean(1)) < SILENT_RMS                # (T,)


def insert_silence(T: int, rest: np.ndarray, L: int, rng: np.random.Generator):
    """Lengthen a pause: after a random rest frame r (silent, mouth closed) n silent copies of it are inserted.
    Returns (src, quiet, u): the new sequence's source frames (T + n,), True on the inserted (silent) ones, and a
    window start u whose L frames show some of them; None when the clip has no rest frame."""
    candidates = np.flatnonzero(rest)
    if candidates.size == 0:
        return None
    r, n = int(rng.choice(candidates)), int(rng.integers(SILENCE_FRAMES[0], SILENCE_FRAMES[1] + 1))
    src = np.concatenate([np.arange(r + 1), np.full(n, r), np.arange(r + 1, T)])   # (T + n,)
    quiet = np.zeros(T + n, bool)
    quiet[r + 1:r + 1 + n] = True
    u = int(rng.integers(max(0, r - L + 2), min(r + n, T + n - L) + 1))
    return src, quiet, u


def breath(x: np.ndarray, pause: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x with one breath (band-passed noise under a raised-cosine envelope, BREATH_DB under the speech) inside a
    pause: a run of at least BREATH_MIN_FRAMES frames of samples where `pause` (x.shape) is True, the speaker's
    mouth closed. x as it was when it has no such pause."""
    edges = np.diff(np.concatenate([[0], pause.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)        # runs of pause samples
    long = (ends - starts) >= BREATH_MIN_FRAMES * FRAME
    if not long.any():
        return x
    k = int(rng.choice(np.flatnonzero(long)))
    run = int(ends[k] - starts[k])
    n = min(int(rng.uniform(*BREATH_S) * SR), run)
    at = int(starts[k]) + int(rng.integers(0, run - n + 1))
    sound = sosfilt(butter(2, (500.0, 3000.0), btype="bandpass", fs=SR, output="sos"), rng.standard_normal(n))
    sound *= np.sin(np.pi * np.arange(n) / n) ** 2
    level = math.sqrt(active_power(x)) * 10.0 ** (rng.uniform(*BREATH_DB) / 20.0)
    y = x.copy()
    y[at:at + n] += sound * level / math.sqrt(max(float((sound ** 2).mean()), 1e-20))
    return y


# ----------------------------------------------------------------------------------------------------------------
# One training window
# ----------------------------------------------------------------------------------------------------------------

def augment_window(wave: np.ndarray, P: np.ndarray, rest: np.ndarray, start: int, L: int, k: int,
                   settings: Settings, rng: np.random.Generator, n_mels: int = 80):
    """The augmentations `settings` fires (one uniform draw each from rng, in NAMES order) applied to the window of
    L frames at `start` of a clip: wave (S,) its 16 kHz loudness-normalised audio, P (T, ...) its landmarks, rest
    (T,) its silent closed-mouth frames, k the frames of audio context. Returns (landmarks (L, ...) float32, padded
    log-mel (4 (L + 2k), n_mels) of the window as padded_log_mel's rows 4 start .. 4 (start + L + 2k), the audio
    they were made from ((L + 2k) 640 + 512,) float32: the window's L frames of 640 samples, k frames either side
    and an STFT frame's reach beyond), or None when no augmentation fired (the item is then the unaugmented one)."""
    fire = dict(zip(NAMES, rng.random(len(NAMES)) < settings.probabilities))
    if not any(fire.values()):
        return None
    src, quiet, u, down = _timeline(P.shape[0], rest, start, L, fire, rng)
    s = down / SPEED_UP
    landmarks = _resample_frames(P, src, u + (np.arange(L) + 0.5) * s - 0.5)              # (L, ...)
    R = wave.size + (src.size - P.shape[0]) * FRAME                   # samples of the longer recording
    pre, post = k * FRAME + HALF_FFT, (L + k) * FRAME + HALF_FFT      # output samples either side of the window
    q = -(-(pre + MARGIN) // SPEED_UP)                                # the window starts at output sample q * up
    A = u * FRAME - q * down                                          # the excerpt's first sample, before speed
    x, pause = _gather(wave, src, quiet, rest, A, A + math.ceil((q * SPEED_UP + post + MARGIN) * s) + 1)
    x = _room_and_channel(_speaker(x, pause, fire, down, rng), fire, rng)
    at = A + np.arange(x.size) * s                                    # where each sample was in the recording
    x = normalize_loudness(np.where((at >= 0) & (at < R), x, 0.0).astype(np.float32))
    segment = np.ascontiguousarray(x[q * SPEED_UP - pre:q * SPEED_UP + post])          # ((L + 2k) 640 + 512,)
    mel = log_mel(torch.from_numpy(segment), n_mels=n_mels, center=False)[:MEL_PER_FRAME * (L + 2 * k)]
    rows = np.arange(mel.shape[0]) - MEL_PER_FRAME * k                # mel frame of each row, from the window start
    f = np.floor((u * FRAME + rows * HOP * s) / HOP + 0.5)            # the longer recording's mel frame
    outside = torch.from_numpy((f < 0) | (f >= min(1 + R // HOP, MEL_PER_FRAME * src.size)))
    mel[outside] = math.log(LOG_FLOOR)                                # beyond the recording: padded_log_mel's silence
    return landmarks.astype(np.float32), mel, segment


def _timeline(T: int, rest: np.ndarray, start: int, L: int, fire: dict, rng: np.random.Generator):
    """The window's frames: (src, quiet, u, down) with the recording's frame e the clip's frame src[e] (silent
    where quiet[e]; `insert_silence`), the window starting at its frame u and played at speed down / SPEED_UP,
    so window frame j shows the recording at frame u + (j + 1/2) s - 1/2."""
    timeline = insert_silence(T, rest, L, rng) if fire["silence"] else None
    src, quiet, u = timeline or (np.arange(T), np.zeros(T, bool), start)
    down = int(rng.integers(SPEED_DOWN[0], SPEED_DOWN[1] + 1)) if fire["speed"] else SPEED_UP
    down = min(down, SPEED_UP * src.size // L)                        # a clip this short cannot be sped up so much
    return src, quiet, min(u, math.floor(src.size - 0.5 - (L - 0.5) * down / SPEED_UP)), down


def _resample_frames(P: np.ndarray, src: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Frames of the sequence P[src] at fractional positions pos (L,), linearly interpolated: (L, ...)."""
    pos = np.clip(pos, 0, src.size - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, src.size - 1)
    frac = (pos - i0).reshape(-1, *[1] * (P.ndim - 1))
    return np.asarray(P[src[i0]], np.float64) * (1 - frac) + np.asarray(P[src[i1]], np.float64) * frac


def _gather(wave: np.ndarray, src: np.ndarray, quiet: np.ndarray, rest: np.ndarray, a: int, b: int):
    """Samples a .. b-1 of the recording whose frame e is the clip's frame src[e] (silent where quiet[e]; zeros
    outside the recording) and whether each lies in a rest frame: ((b - a,) float64, (b - a,) bool)."""
    x = np.arange(a, b)
    e = np.floor_divide(x, FRAME)                                     # frame of each sample
    ec = np.clip(e, 0, src.size - 1)
    orig = src[ec] * FRAME + (x - e * FRAME)
    inside = (e >= 0) & (e < src.size)
    ok = inside & ~quiet[ec] & (orig < wave.size)
    return np.where(ok, np.asarray(wave)[np.where(ok, orig, 0)], 0.0).astype(np.float64), inside & rest[src[ec]]


def _speaker(x: np.ndarray, pause: np.ndarray, fire: dict, down: int, rng: np.random.Generator) -> np.ndarray:
    """The talker's part, in the order a voice makes it: a breath in a pause (pause: x.shape, True in rest frames),
    a pitch shift, then the speed change (x at speed down / SPEED_UP)."""
    if fire["breath"]:
        x = breath(x, pause, rng)
    if fire["pitch"]:
        x = pitch_shift(x, rng.uniform(-PITCH_SEMITONES, PITCH_SEMITONES))
    return resample_poly(x, SPEED_UP, down) if down != SPEED_UP else x


def _room_and_channel(x: np.ndarray, fire: dict, rng: np.random.Generator) -> np.ndarray:
    """What lies between the talker and the file, in order: the room, the background noise, the line or codec, the
    recording level."""
    if fire["reverb"]:
        x = reverb(x, room_impulse_response(rng.uniform(*RT60_S), rng.uniform(*DRR_DB), rng))
    if fire["noise"]:
        x = add_noise(x, noise(NOISES[int(rng.integers(len(NOISES)))], x.size, rng), rng.uniform(*SNR_DB))
    if fire["telephone"]:
        x = telephone(x)
    if fire["codec"]:
        x = codec(x, rng.uniform(*CODEC_HZ), int(rng.integers(CODEC_BITS[0], CODEC_BITS[1] + 1)))
    if fire["gain"]:
        x = gain_clip(x, rng.uniform(*GAIN_DB))
    return x
