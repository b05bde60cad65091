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
from common import piped, stderr_text

SAMPLE_RATE = 16000          # Hz, audio rate of every feature below
FPS = 25                     # video frames per second
HOP = 160                    # STFT hop in samples = 10 ms
MEL_PER_FRAME = SAMPLE_RATE // FPS // HOP   # = 4 mel frames per video frame
LOG_FLOOR = 1e-5             # log(max(mel, LOG_FLOOR)); the log-mel value of silence
MIN_SAMPLES = SAMPLE_RATE // FPS             # one video frame of sound: the shortest audio the cascade takes
RATE_RANGE = (4000, 384_000)                 # Hz a sound file may claim (telephone .. studio rates)
MAX_SECONDS = 4 * 3600                       # the longest sound accepted (memory stays flat, time does not)
STREAM_SAMPLES = 60 * SAMPLE_RATE             # samples of the 16 kHz wave streamed at once (a minute of sound)
RAW_BLOCK = 65536                            # frames read from a sound file at once
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
    (linear, so it keeps the volume invariance). `Loudness` is the same rule measured over a stream.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"normalize_loudness expects a mono wave (S,), got shape {wave.shape}")
    loudness = Loudness(target_rms, floor_rms, relative_gate, peak)
    for i in range(0, max(wave.size, 1), STREAM_SAMPLES):
        loudness.add(wave[i:i + STREAM_SAMPLES])
    return np.concatenate([loudness.apply(wave[i:i + STREAM_SAMPLES]) for i in range(0, wave.size, STREAM_SAMPLES)]
                          or [wave])


class Loudness:
    """normalize_loudness's gain, measured over a wave fed a block at a time (`add`, blocks of whole 20 ms units but
    the last), then applied a block at a time (`apply`): the statistics are one RMS per 20 ms and the peak."""

    def __init__(self, target_rms: float = 0.05, floor_rms: float = 1e-5, relative_gate: float = 1e-2,
                 peak: float = 0.99):
        self.target_rms, self.floor_rms, self.relative_gate, self.peak = target_rms, floor_rms, relative_gate, peak
        self.block_rms, self.top = [], 0.0

    def add(self, samples: np.ndarray) -> None:
        self.block_rms.append(_block_rms(samples, SAMPLE_RATE // 50))
        self.top = max(self.top, float(np.abs(samples).max(initial=0.0)))

    @functools.cached_property
    def scale(self) -> tuple[float, float]:
        """(gain, limit): every sample becomes x * gain * limit (limit < 1 when the peak would pass `peak`; gain 0
        for silence); fixed once it is first read."""
        block_rms = np.concatenate(self.block_rms)
        loudest = float(block_rms.max()) if block_rms.size else 0.0
        if loudest < self.floor_rms:
            return 0.0, 1.0
        active = block_rms > self.relative_gate * loudest
        gain = self.target_rms / math.sqrt(float((block_rms[active] ** 2).mean()))
        top = self.top * gain  # = max |x * gain|: rounding a product by a positive gain is monotonic
        return gain, (self.peak / top if top > self.peak else 1.0)

    def apply(self, samples: np.ndarray) -> np.ndarray:
        gain, limit = self.scale
        if gain == 0.0:
            return np.zeros(len(samples), np.float32)
        scaled = samples.astype(np.float64) * gain
        if limit != 1.0:
            scaled *= limit
        return scaled.astype(np.float32)


def _block_rms(samples: np.ndarray, block: int) -> np.ndarray:
    """RMS of each `block`-sample block (the last one zero-padded), computed in float64: (ceil(S / block),)."""
    n = max(1, math.ceil(samples.size / block))
    padded = np.zeros(n * block, dtype=np.float64)
    padded[:samples.size] = samples
    return np.sqrt((padded.reshape(n, block) ** 2).mean(axis=1))


class Speech:
    """A sound as the model hears it, read as a stream: float32 mono 16 kHz at a fixed loudness, a minute at a time.

    source: a path (any file soundfile reads, wav / flac / ogg, or ffmpeg decodes: m4a / AAC voice memos, the sound
    track of a video) or an array (S,) / (S, channels) of int or float samples at `sample_rate`.
    Opening reads it once: the header's rate and length are checked before any sample is read, then every sample
    (finite, at least one video frame of sound) while the loudness gain is measured. `blocks()` reads it again and
    yields the normalised wave in blocks of STREAM_SAMPLES, so no length of audio is held whole; `wave()` is all of
    it (S,). normalize=False takes an array that already is the model's input (16 kHz float32) as it is."""

    def __init__(self, source, sample_rate: int | None = None, normalize: bool = True, name: str = "audio"):
        if isinstance(source, (str, os.PathLike)):
            self.path, self.name = _check_file(os.fspath(source)), os.fspath(source)
            self.samples, self.rate, self.channels = None, *_probe(self.path)
        else:
            self.path, self.name = None, name  # name: what errors call an array (e.g. the clip it came from)
            self.samples = np.asarray(source)
            if self.samples.ndim not in (1, 2):
                raise UsageError(f"{name}: expected mono or multi-channel audio, got array of shape "
                                 f"{self.samples.shape}")
            if sample_rate is None or sample_rate <= 0:
                raise UsageError(f"{name}: invalid sample rate {sample_rate}")
            self.rate = int(sample_rate)
        self.loudness = Loudness() if normalize else None
        self.num_samples = 0
        for block in self._wave16():  # the first reading: checks every sample, measures the loudness
            self.num_samples += len(block)
            if self.loudness is not None:
                self.loudness.add(block)
        if self.num_samples == 0:
            raise UsageError(f"{self.name}: the audio has no samples (zero length); give a file with sound in it")
        if self.num_samples < MIN_SAMPLES:
            raise UsageError(f"{self.name} holds {self.num_samples / SAMPLE_RATE * 1000:.0f} ms of sound; give at "
                             f"least one video frame ({1000 // FPS} ms)")

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return frames_for_duration(self.num_samples)

    def blocks(self):
        """The normalised 16 kHz wave in order: float32 blocks of STREAM_SAMPLES samples (the last one shorter)."""
        for block in self._wave16():
            yield block if self.loudness is None else self.loudness.apply(block)

    def wave(self) -> np.ndarray:
        """The whole normalised wave, float32 (S,) at 16 kHz."""
        return np.concatenate(list(self.blocks()))

    def _wave16(self):
        """Mono 16 kHz float32 blocks of STREAM_SAMPLES, not yet normalised."""
        raw = _read_file(self.path, self.rate, self.channels) if self.path else \
            (self.samples[i:i + RAW_BLOCK] for i in range(0, len(self.samples), RAW_BLOCK))
        mono = (_mono(block, self.name) for block in raw)
        return _rechunk(_resample(mono, self.rate), STREAM_SAMPLES)


def _mono(x: np.ndarray, name: str) -> np.ndarray:
    """One block (S,) or (S, channels) of int/float samples -> finite mono float (S,) (float32 when it was
    float32 or int16 mono, else float64 for the channel average and the resampling)."""
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dtype == np.float32 and x.ndim == 1:
        pass  # already float32 mono: a float64 copy would change nothing (and double the memory)
    elif x.dtype == np.int16 and x.ndim == 1:
        x = x.astype(np.float32) / 32768.0                    # exact: int16 / 2^15 is a float32
    else:
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
        x = x.astype(np.float64)
        if x.ndim == 2:
            x = x.mean(axis=1)                                 # (S,) average of channels
    if not np.isfinite(x).all():
        raise UsageError(f"{name}: the audio contains NaN or infinite samples; re-export it as PCM")
    return x


def _resample(blocks, rate: int):
    """A stream of mono blocks at `rate` -> the same sound at 16 kHz, equal (within float rounding) to
    scipy's resample_poly of the whole signal: each piece of about 10 s is resampled with enough input on either
    side for the polyphase filter's reach (10 x max(up, down) samples of the upsampled signal), then trimmed."""
    if rate == SAMPLE_RATE:
        yield from blocks
        return
    g = math.gcd(rate, SAMPLE_RATE)
    up, down = SAMPLE_RATE // g, rate // g
    reach = down * math.ceil((10 * max(up, down) / up + 2) / down)  # input samples of context, a multiple of down
    step = down * max(1, 10 * rate // down)                          # input samples per piece, a multiple of down
    buf, buf0, pending, a = np.zeros(0), 0, [], 0  # buf holds input samples buf0..; a: the next piece's start
    for block in blocks:
        pending.append(block)
        if buf0 + len(buf) + sum(map(len, pending)) < a + step + reach:
            continue
        buf, pending = np.concatenate([buf, *pending]), []
        while buf0 + len(buf) >= a + step + reach:
            s0 = max(0, a - reach)
            y = resample_poly(buf[s0 - buf0:a + step + reach - buf0], up, down)
            yield y[(a - s0) * up // down:(a + step - s0) * up // down]
            a += step
            cut = max(0, a - reach - buf0)
            buf, buf0 = buf[cut:], buf0 + cut
    buf = np.concatenate([buf, *pending])
    end = buf0 + len(buf)
    if end > a:  # the last piece runs to the end: ceil(end * up / down) output samples in all
        s0 = max(0, a - reach)
        y = resample_poly(buf[s0 - buf0:], up, down)
        yield y[(a - s0) * up // down:-(-(end - s0) * up // down)]


def _rechunk(blocks, size: int):
    """Blocks of any lengths -> float32 blocks of exactly `size` samples (the last one shorter, none empty)."""
    pending, have = [], 0
    for block in blocks:
        pending.append(np.asarray(block, np.float32))
        have += len(block)
        while have >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, have = [joined[size:]], have - size
    if have:
        yield np.concatenate(pending)


def load_audio(path: str) -> np.ndarray:
    """Read speech from any file soundfile reads (wav, flac, ogg) or ffmpeg decodes (m4a / AAC voice memos, the
    sound track of a video) -> float32 mono (S,) at 16 kHz, loudness-normalised (all of `Speech(path)`)."""
    return Speech(path).wave()


def prepare_wave(samples: np.ndarray, sample_rate: int, source: str = "audio") -> np.ndarray:
    """Any (S,) or (S, channels) int/float array at any rate -> normalised float32 mono (S',) at 16 kHz."""
    return Speech(samples, sample_rate, name=source).wave()


def _check_file(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"audio file not found: {path}; check the path")
    if not os.path.isfile(path):
        raise UsageError(f"audio path is not a file: {path}; give a sound file")
    return path


def check_audio_header(path: str, sample_rate: float, seconds: float) -> None:
    """UsageError, before anything is allocated, for a header that claims an absurd rate or length."""
    if not RATE_RANGE[0] <= sample_rate <= RATE_RANGE[1]:
        raise UsageError(f"{path} claims a sample rate of {sample_rate:g} Hz; give audio between {RATE_RANGE[0]} "
                         f"and {RATE_RANGE[1]} Hz")
    if seconds > MAX_SECONDS:
        raise UsageError(f"{path} claims {seconds / 3600:.1f} hours of sound; give at most {MAX_SECONDS // 3600} "
                         "hours (split longer recordings)")


def _probe(path: str) -> tuple[int, int | None]:
    """(rate, channels) of a sound file from its header: soundfile's, else ffmpeg's (channels None: soundfile reads
    it), after check_audio_header."""
    try:
        info = sf.info(path)
    except Exception:  # soundfile raises LibsndfileError/RuntimeError/TypeError on files it does not know
        return _probe_with_ffmpeg(path)
    check_audio_header(path, info.samplerate, info.frames / max(info.samplerate, 1))
    return int(info.samplerate), None


def _probe_with_ffmpeg(path: str) -> tuple[int, int]:
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
    return rate, {"mono": 1, "stereo": 2}.get(stream.group(2).strip(), 1)  # other layouts: ffmpeg downmixes


def _read_file(path: str, rate: int, channels: int | None):
    """Raw blocks (n, channels) float32 of a sound file at its own rate: soundfile's reader, or (channels given)
    the first audio stream ffmpeg decodes, piped (so the same sound as a wav gives the same samples)."""
    if channels is None:
        try:
            yield from sf.blocks(path, blocksize=RAW_BLOCK, dtype="float32", always_2d=True)
        except Exception as err:
            raise UsageError(f"cannot read audio file {path}: {str(err).strip() or type(err).__name__}; "
                             "give a valid sound file") from None
        return
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", path, "-map", "0:a:0", "-vn", "-f", "f32le",
           "-acodec", "pcm_f32le", "-ar", str(rate), "-ac", str(channels), "-"]
    frame_bytes = 4 * channels
    with piped(cmd) as (proc, log):
        while chunk := proc.stdout.read(RAW_BLOCK * frame_bytes):
            whole = len(chunk) // frame_bytes * frame_bytes
            yield np.frombuffer(chunk[:whole], np.float32).reshape(-1, channels)  # (n, channels)
        if proc.wait() != 0:
            raise UsageError(f"cannot read audio file {path}: {stderr_text(log)[-200:] or 'ffmpeg failed'}")


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
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono wave (S,), got shape {wave.shape}")
    return torch.cat(list(log_mel_rows([wave], wave.size, num_frames, context_frames, n_mels)))


def log_mel_rows(blocks, num_samples: int, num_frames: int | None = None, context_frames: int = 2,
                 n_mels: int = 80):
    """The rows of padded_log_mel in order, computed from the wave's blocks (Speech.blocks()) as they come: a
    minute of mel frames at a time from just the samples they cover, so long audio is never held whole. Audio of
    at most CHUNK_MEL_FRAMES frames is taken in one piece (centred frames of the whole wave, as log_mel)."""
    n_video = frames_for_duration(num_samples) if num_frames is None else int(num_frames)
    pad = MEL_PER_FRAME * context_frames
    keep = min(1 + num_samples // HOP, MEL_PER_FRAME * n_video)                      # mel frames kept
    silence = math.log(LOG_FLOOR)
    yield torch.full((pad, n_mels), silence)
    if keep <= CHUNK_MEL_FRAMES:
        yield log_mel(torch.as_tensor(np.concatenate(list(blocks) or [np.zeros(0, np.float32)])),
                      n_mels=n_mels)[:keep]                                           # (keep, n_mels)
    else:
        yield from _chunked_log_mel(iter(blocks), keep, n_mels)
    yield torch.full((MEL_PER_FRAME * n_video - keep + pad, n_mels), silence)


def _chunked_log_mel(blocks, keep: int, n_mels: int, n_fft: int = 512):
    """Mel frames 0..keep-1 of log_mel(wave), CHUNK_MEL_FRAMES at a time, pulling the wave's blocks as needed."""
    buf, buf0 = torch.zeros(0), 0  # buf holds samples buf0 ..
    for f0 in range(0, keep, CHUNK_MEL_FRAMES):
        f1 = min(f0 + CHUNK_MEL_FRAMES, keep)
        need = [buf]
        have = buf0 + len(buf)
        while have < (f1 - 1) * HOP + n_fft // 2 + 1 and (block := next(blocks, None)) is not None:
            need.append(torch.as_tensor(block))
            have += len(block)
        buf = torch.cat(need)
        yield _log_mel_frames(buf, buf0, f0, f1, n_mels, n_fft)
        cut = max(0, f1 * HOP - n_fft // 2 - buf0)  # samples no later frame needs
        buf, buf0 = buf[cut:], buf0 + cut


def _log_mel_frames(samples: torch.Tensor, start: int, f0: int, f1: int, n_mels: int,
                    n_fft: int = 512) -> torch.Tensor:
    """Frames f0..f1-1 of log_mel(wave) (centred frames, zeros beyond the ends) from samples = wave[start:...]
    holding the samples they cover: (f1 - f0, n_mels)."""
    lo, hi = f0 * HOP - n_fft // 2, (f1 - 1) * HOP + n_fft // 2 + 1                 # samples of the frames
    segment = torch.zeros(hi - lo, dtype=samples.dtype)
    a, b = max(lo, start), min(hi, start + samples.numel())
    segment[a - lo:b - lo] = samples[a - start:b - start]
    return log_mel(segment, n_fft=n_fft, n_mels=n_mels, center=False)               # (f1 - f0, n_mels)


def unfold_context(padded: torch.Tensor, context_frames: int = 2) -> torch.Tensor:
    """(4T + 8k, n_mels) from `padded_log_mel` -> per-video-frame windows (T, (2k+1)*4, n_mels); frame i gets
    mel frames 4(i-k) .. 4(i+k+1)-1. Vectorised with unfold (no loop over frames)."""
    size = (2 * context_frames + 1) * MEL_PER_FRAME
    windows = padded.unfold(0, size, MEL_PER_FRAME)                                  # (T, n_mels, C)
    return windows.transpose(1, 2).contiguous()                                     # (T, C, n_mels)


class MelContext:
    """The per-frame context windows of `mel_context`, unfolded only for the frames asked for: slices like the
    (T, (2k+1)*4, n_mels) tensor (`ctx[s:e]`), so long audio never holds every frame's window at once (they
    overlap 2k+1 times). From a padded log-mel (4T + 8k, n_mels) (`padded_log_mel`), or streamed from its rows
    (`log_mel_rows`, num_frames = T): then slices must start in order (each at or after the last one's start) and
    only the rows from the last start on are held."""

    def __init__(self, padded, context_frames: int = 2, num_frames: int | None = None, n_mels: int = 80):
        self.context_frames = context_frames
        if isinstance(padded, torch.Tensor):
            n_mels, T = padded.shape[1], (padded.shape[0] - 2 * MEL_PER_FRAME * context_frames) // MEL_PER_FRAME
            self.padded, self.rows = padded, None
        else:
            self.padded, self.rows, T = torch.zeros(0, n_mels), iter(padded), int(num_frames)
        self.row0 = 0  # padded row of self.padded[0]
        self.shape = (T, (2 * context_frames + 1) * MEL_PER_FRAME, n_mels)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, frames: slice) -> torch.Tensor:
        start, stop, _ = frames.indices(self.shape[0])
        k = self.context_frames
        lo, hi = MEL_PER_FRAME * start, MEL_PER_FRAME * (stop + 2 * k)              # padded rows of the windows
        if self.rows is not None:
            self._advance(lo, hi)
        return unfold_context(self.padded[lo - self.row0:hi - self.row0], k)          # (n, C, M)

    def _advance(self, lo: int, hi: int) -> None:
        if lo < self.row0:
            raise ValueError(f"a streamed MelContext reads forward only: rows from {lo} asked after {self.row0}")
        held = [self.padded[lo - self.row0:]]
        have = self.row0 + len(self.padded)
        while have < hi and (rows := next(self.rows, None)) is not None:
            held.append(rows)
            have += len(rows)
        self.padded, self.row0 = torch.cat(held), lo


def mel_context(wave, num_frames: int | None = None, context_frames: int = 2, n_mels: int = 80) -> torch.Tensor:
    """Per-video-frame audio context windows (T, (2k+1)*4, n_mels) from a 16 kHz wave (S,).

    Video frame i owns mel frames 4i..4i+3 (10 ms hop, 25 fps), i.e. the audio of [i/25, (i+1)/25) s; its
    context covers video frames i-k..i+k. T = frames_for_duration(S) unless `num_frames` is given. Beyond the
    audio the log-mel of silence is used.
    """
    return unfold_context(padded_log_mel(wave, num_frames, context_frames, n_mels), context_frames)
