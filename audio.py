"""Speech in: audio loading, loudness and the log-mel features A2L hears ([A2L: Audio] in docs/paper.md).

The paper feeds A2L features of a pretrained wav2vec2 (inferred from summaries of the paper); no weights can be
downloaded here, so DreamHead computes a hand-written 80-band Slaney log-mel (checked against librosa in the
tests) and trains its audio encoder (`a2l.AudioEncoder`) from scratch [guess]. Time base: 16 kHz audio,
a 10 ms hop, 25 fps video, so each video frame owns 4 mel frames; frame i is the audio of [i/25, (i+1)/25) s.

* `load_audio` / `prepare_wave` / `normalize_loudness`: any file soundfile reads or ffmpeg decodes, any rate and
  channel count -> float32 mono 16 kHz at a fixed loudness (silence stays silence).
* `mel_filterbank`, `mel_spectrogram`, `log_mel`: the features, written by hand (librosa's defaults).
* `padded_log_mel`, `unfold_context`, `mel_context`: per-video-frame windows of +-k frames of context.
"""
from __future__ import annotations

import functools
import math
import os
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from cli import UsageError

SAMPLE_RATE = 16000          # Hz, audio rate of every feature below
FPS = 25                     # video frames per second
HOP = 160                    # STFT hop in samples = 10 ms
MEL_PER_FRAME = SAMPLE_RATE // FPS // HOP   # = 4 mel frames per video frame
LOG_FLOOR = 1e-5             # log(max(mel, LOG_FLOOR)); the log-mel value of silence
MIN_SAMPLES = SAMPLE_RATE // FPS             # one video frame of sound: the shortest audio the cascade takes
RATE_RANGE = (4000, 384_000)                 # Hz a sound file may claim (telephone .. studio rates)
MAX_SECONDS = 4 * 3600                       # the longest sound accepted (memory stays flat, time does not)
CHUNK_BLOCKS = 3000                          # 20 ms loudness blocks scaled at once (a minute of sound)
CHUNK_MEL_FRAMES = 6000                      # log-mel frames computed at once (a minute of sound)

# ----------------------------------------------------------------------------------------------------------------
# Audio loading and loudness
# ----------------------------------------------------------------------------------------------------------------

def normalize_loudness(wave: np.ndarray, target_rms: float = 0.05, floor_rms: float = 1e-5,
                       relative_gate: float = 1e-2, peak: float = 0.99) -> np.ndarray:
    """Scale `wave` (S,) so the RMS over its non-silent 20 ms blocks equals `target_rms`, then limit the peak.

    A block is non-silent when its RMS exceeds `relative_gate` x the loudest block's RMS (a relative gate, so a
    quiet and a loud copy select the same blocks and come out identical). If even the loudest block is below
    `floor_rms` the input is silence and zeros are returned. The peak limit scales the whole signal down
    (linear, so it keeps the volume invariance).
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"normalize_loudness expects a mono wave (S,), got shape {wave.shape}")
    block = SAMPLE_RATE // 50
    n_blocks = max(1, math.ceil(wave.size / block))
    step = CHUNK_BLOCKS * block  # long audio is scaled a chunk at a time: no float64 copy of the whole wave
    block_rms = np.concatenate([_block_rms(wave[i:i + step], block) for i in range(0, n_blocks * block, step)])
    loudest = float(block_rms.max()) if block_rms.size else 0.0
    if loudest < floor_rms:
        return np.zeros_like(wave)
    active = block_rms > relative_gate * loudest
    gain = target_rms / math.sqrt(float((block_rms[active] ** 2).mean()))
    top = float(np.abs(wave).max()) * gain  # = max |x * gain|: rounding a product by a positive gain is monotonic
    out = np.empty_like(wave)
    for i in range(0, wave.size, step):
        scaled = wave[i:i + step].astype(np.float64) * gain
        if top > peak:
            scaled *= peak / top
        out[i:i + step] = scaled
    return out


def _block_rms(samples: np.ndarray, block: int) -> np.ndarray:
    """RMS of each `block`-sample block (the last one zero-padded), computed in float64: (ceil(S / block),)."""
    n = max(1, math.ceil(samples.size / block))
    padded = np.zeros(n * block, dtype=np.float64)
    padded[:samples.size] = samples
    return np.sqrt((padded.reshape(n, block) ** 2).mean(axis=1))


def prepare_wave(samples: np.ndarray, sample_rate: int, source: str = "audio") -> np.ndarray:
    """Any (S,) or (S, channels) int/float array at any rate -> normalised float32 mono (S',) at 16 kHz."""
    x = np.asarray(samples)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]                                            # mono: (S,)
    if x.dtype == np.float32 and x.ndim == 1 and sample_rate == SAMPLE_RATE:
        pass  # already float32 mono at 16 kHz: a float64 copy would change nothing (and double the memory)
    elif x.dtype == np.int16 and x.ndim == 1 and sample_rate == SAMPLE_RATE:
        x = x.astype(np.float32) / 32768.0                    # exact: int16 / 2^15 is a float32
    else:
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
        x = x.astype(np.float64)
        if x.ndim == 2:
            x = x.mean(axis=1)                                 # (S,) average of channels
    if x.ndim != 1:
        raise UsageError(f"{source}: expected mono or multi-channel audio, got array of shape {x.shape}")
    if x.size == 0:
        raise UsageError(f"{source}: the audio has no samples (zero length); give a file with sound in it")
    if not np.isfinite(x).all():
        raise UsageError(f"{source}: the audio contains NaN or infinite samples; re-export it as PCM")
    if sample_rate <= 0:
        raise UsageError(f"{source}: invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        g = math.gcd(int(sample_rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)
    return normalize_loudness(np.asarray(x, np.float32))


def load_audio(path: str) -> np.ndarray:
    """Read speech from any file soundfile reads (wav, flac, ogg) or ffmpeg decodes (m4a / AAC voice memos, the
    sound track of a video) -> float32 mono (S,) at 16 kHz, loudness-normalised. The header's rate and length are
    checked before any sample is read, and the sound must last at least one video frame."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"audio file not found: {path}; check the path")
    if not os.path.isfile(path):
        raise UsageError(f"audio path is not a file: {path}; give a sound file")
    try:
        info = sf.info(path)
    except Exception:  # soundfile raises LibsndfileError/RuntimeError/TypeError on files it does not know
        samples, sample_rate = _decode_with_ffmpeg(path)
    else:
        check_audio_header(path, info.samplerate, info.frames / max(info.samplerate, 1))
        try:
            samples, sample_rate = sf.read(path, dtype="float32", always_2d=True)   # (S, channels)
        except Exception as err:
            raise UsageError(f"cannot read audio file {path}: {str(err).strip() or type(err).__name__}; "
                             "give a valid sound file") from None
    wave = prepare_wave(samples, sample_rate, source=path)
    if len(wave) < MIN_SAMPLES:
        raise UsageError(f"{path} holds {len(wave) / SAMPLE_RATE * 1000:.0f} ms of sound; give at least one video "
                         f"frame ({1000 // FPS} ms)")
    return wave


def check_audio_header(path: str, sample_rate: float, seconds: float) -> None:
    """UsageError, before anything is allocated, for a header that claims an absurd rate or length."""
    if not RATE_RANGE[0] <= sample_rate <= RATE_RANGE[1]:
        raise UsageError(f"{path} claims a sample rate of {sample_rate:g} Hz; give audio between {RATE_RANGE[0]} "
                         f"and {RATE_RANGE[1]} Hz")
    if seconds > MAX_SECONDS:
        raise UsageError(f"{path} claims {seconds / 3600:.1f} hours of sound; give at most {MAX_SECONDS // 3600} "
                         "hours (split longer recordings)")


def _decode_with_ffmpeg(path: str) -> tuple[np.ndarray, int]:
    """(samples float32 (S, channels), rate) of the first audio stream of any file ffmpeg reads, at its own rate
    and channel count (so the same sound as a wav gives the same samples)."""
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True,
                           text=True).stderr
    stream = re.search(r"Audio: [^,]+, (\d+) Hz, ([^,]+),", probe)
    if stream is None:
        raise UsageError(f"cannot read audio file {path}: no sound stream that ffmpeg can decode; give a wav, flac, "
                         "ogg, m4a or a video with sound")
    rate = int(stream.group(1))
    duration = re.search(r"Duration: (\d+):(\d+):([\d.]+)", probe)
    seconds = 0.0 if duration is None else sum(float(v) * k for v, k in zip(duration.groups(), (3600, 60, 1)))
    check_audio_header(path, rate, seconds)
    channels = {"mono": 1, "stereo": 2}.get(stream.group(2).strip())
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", path, "-map", "0:a:0", "-vn", "-f", "f32le",
           "-acodec", "pcm_f32le", "-ar", str(rate)] + (["-ac", str(channels)] if channels else ["-ac", "1"]) + ["-"]
    out = subprocess.run(cmd, capture_output=True)
    if out.returncode != 0:
        raise UsageError(f"cannot read audio file {path}: {out.stderr.decode(errors='replace').strip()[-200:]}")
    return np.frombuffer(out.stdout, np.float32).reshape(-1, channels or 1), rate


def frames_for_duration(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Number of video frames covering `num_samples` of audio: ceil(num_samples / sample_rate * fps)."""
    return -(-int(num_samples) * fps // sample_rate)   # exact integer ceil


# ----------------------------------------------------------------------------------------------------------------
# Log-mel features (written by hand; Slaney mel scale and area normalisation as librosa's defaults)
# ----------------------------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3             # Hz per mel in the linear part of the Slaney scale
_MIN_LOG_HZ = 1000.0          # the scale turns logarithmic above 1 kHz
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz):
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, linear)


def mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, linear)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = 512, n_mels: int = 80, fmin: float = 0.0,
                   fmax: float = 8000.0) -> np.ndarray:
    """Triangular mel filters (n_mels, n_fft//2 + 1), mel points equally spaced on the Slaney scale, each filter
    scaled by 2 / (its bandwidth in Hz) so all have equal area (librosa htk=False, norm="slaney")."""
    bin_hz = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)                               # (F,)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    left, centre, right = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None] - left) / (centre - left)                                 # (n_mels, F)
    falling = (right - bin_hz[None]) / (right - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (right - left)
    weights.setflags(write=False)
    return weights


def mel_spectrogram(wave, n_fft: int = 512, win_length: int = 400, hop: int = HOP, n_mels: int = 80,
                    fmin: float = 0.0, fmax: float = 8000.0, sr: int = SAMPLE_RATE,
                    center: bool = True) -> torch.Tensor:
    """Power mel spectrogram of (S,) or (B, S) -> (..., n_frames, n_mels), n_frames = 1 + S // hop.
    Hann window of `win_length` zero-padded to `n_fft`, centred frames (zero padding at the ends; center=False:
    frame k starts at sample k * hop, n_frames = 1 + (S - n_fft) // hop)."""
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        wave = wave.float()
    if wave.ndim not in (1, 2):
        raise ValueError(f"mel_spectrogram expects a wave (S,) or (B, S), got shape {tuple(wave.shape)}")
    window = torch.hann_window(win_length, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop, win_length=win_length, window=window, center=center,
                      pad_mode="constant", return_complex=True)                      # (..., F, n_frames)
    power = spec.real ** 2 + spec.imag ** 2
    fb = torch.tensor(mel_filterbank(sr, n_fft, n_mels, fmin, fmax), dtype=wave.dtype, device=wave.device)
    return torch.matmul(fb, power).transpose(-1, -2)                                 # (..., n_frames, n_mels)


def log_mel(wave, **kwargs) -> torch.Tensor:
    """log(max(mel power, 1e-5)) of (S,) or (B, S) -> (..., n_frames, n_mels)."""
    return torch.log(torch.clamp(mel_spectrogram(wave, **kwargs), min=LOG_FLOOR))


def padded_log_mel(wave, num_frames: int | None = None, context_frames: int = 2, n_mels: int = 80) -> torch.Tensor:
    """Log-mel of a 16 kHz wave (S,) cut or extended to exactly 4 mel frames per video frame, with 4k frames of
    silence (log 1e-5) before and after: (4T + 8k, n_mels). T = frames_for_duration(S) unless given."""
    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if wave.ndim != 1:
        raise ValueError(f"expected a mono wave (S,), got shape {tuple(wave.shape)}")
    n_video = frames_for_duration(wave.numel()) if num_frames is None else int(num_frames)
    pad = MEL_PER_FRAME * context_frames
    padded = torch.full((MEL_PER_FRAME * n_video + 2 * pad, n_mels), math.log(LOG_FLOOR), dtype=wave.dtype)
    keep = min(1 + wave.numel() // HOP, MEL_PER_FRAME * n_video)                      # mel frames kept
    if keep <= CHUNK_MEL_FRAMES:
        padded[pad:pad + keep] = log_mel(wave, n_mels=n_mels)[:keep]                  # (keep, n_mels)
        return padded                                                               # (4T + 2 pad, n_mels)
    for f0 in range(0, keep, CHUNK_MEL_FRAMES):                                       # long audio, a chunk at a time
        f1 = min(f0 + CHUNK_MEL_FRAMES, keep)
        padded[pad + f0:pad + f1] = _log_mel_frames(wave, f0, f1, n_mels)
    return padded


def _log_mel_frames(wave: torch.Tensor, f0: int, f1: int, n_mels: int, n_fft: int = 512) -> torch.Tensor:
    """Frames f0..f1-1 of log_mel(wave) (centred frames, zeros beyond the ends) from just the samples they
    cover: (f1 - f0, n_mels)."""
    lo, hi = f0 * HOP - n_fft // 2, (f1 - 1) * HOP + n_fft // 2 + 1                 # samples of the frames
    segment = torch.zeros(hi - lo, dtype=wave.dtype)
    a, b = max(lo, 0), min(hi, wave.numel())
    segment[a - lo:b - lo] = wave[a:b]
    return log_mel(segment, n_fft=n_fft, n_mels=n_mels, center=False)               # (f1 - f0, n_mels)


def unfold_context(padded: torch.Tensor, context_frames: int = 2) -> torch.Tensor:
    """(4T + 8k, n_mels) from `padded_log_mel` -> per-video-frame windows (T, (2k+1)*4, n_mels); frame i gets
    mel frames 4(i-k) .. 4(i+k+1)-1. Vectorised with unfold (no loop over frames)."""
    size = (2 * context_frames + 1) * MEL_PER_FRAME
    windows = padded.unfold(0, size, MEL_PER_FRAME)                                  # (T, n_mels, C)
    return windows.transpose(1, 2).contiguous()                                     # (T, C, n_mels)


class MelContext:
    """The per-frame context windows of `mel_context`, unfolded only for the frames asked for: a padded log-mel
    (4T + 8k, n_mels) from `padded_log_mel` that slices like the (T, (2k+1)*4, n_mels) tensor (`ctx[s:e]`), so
    long audio never holds every frame's window at once (they overlap 2k+1 times)."""

    def __init__(self, padded: torch.Tensor, context_frames: int = 2):
        self.padded, self.context_frames = padded, context_frames
        T = (padded.shape[0] - 2 * MEL_PER_FRAME * context_frames) // MEL_PER_FRAME
        self.shape = (T, (2 * context_frames + 1) * MEL_PER_FRAME, padded.shape[1])
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, frames: slice) -> torch.Tensor:
        start, stop, _ = frames.indices(self.shape[0])
        k = self.context_frames
        return unfold_context(self.padded[MEL_PER_FRAME * start:MEL_PER_FRAME * (stop + 2 * k)], k)  # (n, C, M)


def mel_context(wave, num_frames: int | None = None, context_frames: int = 2, n_mels: int = 80) -> torch.Tensor:
    """Per-video-frame audio context windows (T, (2k+1)*4, n_mels) from a 16 kHz wave (S,).

    Video frame i owns mel frames 4i..4i+3 (10 ms hop, 25 fps), i.e. the audio of [i/25, (i+1)/25) s; its
    context covers video frames i-k..i+k. T = frames_for_duration(S) unless `num_frames` is given. Beyond the
    audio the log-mel of silence is used.
    """
    return unfold_context(padded_log_mel(wave, num_frames, context_frames, n_mels), context_frames)
