"""Audio-to-landmark (A2L) diffusion: DreamHead's first hierarchy (paper section "A2L", framework figure, left).

From an audio window A^[i-l:i], the subject's mean canonical mesh P̄ and a noisy landmark window P_t^[i-l:i],
a denoiser built as the figure draws it (Projection-In -> N x [Temporal Unit -> Mapping Unit] -> Projection-Out)
predicts the clean window P_0 of dense MediaPipe landmarks (478 x 3 = 1434 values per frame, canonical pose).
Long audio is covered by overlapping windows whose overlap frames are held to the previous window's result.

What is confirmed by the paper ([C] in /work/shared/paper-notes.md section 1): the unit layout, the inputs
(audio window, noisy landmark window, P̄), iterative denoising, dense frontal landmarks. Everything else here is
our guess ([I]/[G]) and sits behind an `A2LConfig` field:
- Audio: the paper uses a pretrained wav2vec2, which cannot be downloaded here (no internet, no weights). We use
  a hand-written 80-bin log-mel front end (hop 10 ms, 4 mel frames per 25 fps video frame, +-2 video frames of
  context) and a small convolutional encoder + transformer trained jointly with the denoiser (`AudioEncoder`).
- Diffusion target: canonical residuals x0 = (P - P̄) / residual_std (per-coordinate, dataset-wide), cosine
  schedule, x0 prediction ("sample"; "epsilon" is a switch), DDIM sampling on a "trailing" grid (starts at T-1).
- Loss (MODA, same authors): MSE with lip points weighted x5 + L1 velocity loss on first differences of the
  un-normalised prediction.
- Classifier-free guidance on audio (audio dropout in training, `guidance` scale at sampling).
- `objective="regression"`: the same network as a deterministic regressor (x_t = 0, t = 0), the paper's
  diffusion-vs-regression ablation.
- Long audio: sliding windows of length l with overlap; overlap frames are replaced at every denoising step by
  the previous result noised to the current level (inpainting by replacement), and copied exactly at the end.
"""
from __future__ import annotations

import bisect
import functools
import math
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import dreamhead
from dreamhead import UsageError

SAMPLE_RATE = 16000          # Hz, audio rate of every feature below
FPS = 25                     # video frames per second
HOP = 160                    # STFT hop in samples = 10 ms
MEL_PER_FRAME = SAMPLE_RATE // FPS // HOP   # = 4 mel frames per video frame
N_POINTS = 478               # MediaPipe FaceMesh with iris refinement
LOG_FLOOR = 1e-5             # log(max(mel, LOG_FLOOR)); the log-mel value of silence
# MediaPipe FACEMESH_LIPS (outer + inner lip contours), 40 points; weighted x lip_weight in the loss.
LIP_INDICES = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191,
               267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class A2LConfig:
    """A2L model + training hyperparameters. Presets: `A2LConfig.preset("tiny" | "paper")`."""
    # features
    n_points: int = N_POINTS
    n_mels: int = 80
    context_frames: int = 2          # +- video frames of audio context per frame [G]
    # network [G]: width d, number of (Temporal Unit, Mapping Unit) pairs, heads
    width: int = 128
    pairs: int = 2
    heads: int = 4
    audio_layers: int = 1            # transformer blocks over the window's audio tokens
    temporal_conv: bool = True       # depthwise conv (k=3) after attention in each Temporal Unit
    window: int = 16                 # l, frames per window
    overlap: int = 4                 # frames held from the previous window when sampling long audio
    # diffusion [G]
    objective: str = "diffusion"     # "diffusion" | "regression" (ablation: x_t = 0, t = 0, one pass)
    num_train_timesteps: int = 100
    beta_schedule: str = "cosine"
    prediction_type: str = "sample"  # "sample" (x0) | "epsilon"
    sample_steps: int = 10           # DDIM steps at inference
    timestep_spacing: str = "trailing"   # DDIM grid; "trailing" starts at t = T-1 (pure noise). With T = 100 and
    #                                      10 steps "leading" starts at t = 90: 1.5x the lip error on our toy data
    eta: float = 0.0
    guidance: float = 1.0            # classifier-free guidance on audio; 1.0 = off
    # loss [I] (MODA)
    lip_weight: float = 5.0
    velocity_weight: float = 1.0
    audio_dropout: float = 0.1       # probability of dropping the audio condition in training (CFG)
    # training loop (read by train.py)
    lr: float = 1e-3
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup: int = 50
    steps: int = 10000
    batch_size: int = 16
    ema_decay: float = 0.999
    grad_clip: float = 1.0

    PRESETS = ("tiny", "paper")

    @property
    def ctx_mel_frames(self) -> int:
        """Mel frames in one video frame's audio context: (2 * context_frames + 1) * 4."""
        return (2 * self.context_frames + 1) * MEL_PER_FRAME

    @property
    def n_coords(self) -> int:
        return self.n_points * 3

    @classmethod
    def preset(cls, name: str) -> "A2LConfig":
        if name == "tiny":   # CPU minutes
            return cls()
        if name == "paper":  # GPU scale, blueprint 6.3
            return cls(width=512, pairs=8, heads=8, audio_layers=2, window=32, overlap=8,
                       num_train_timesteps=1000, sample_steps=50, lr=1e-4, warmup=1000, steps=200_000,
                       batch_size=64, ema_decay=0.9999)
        raise ValueError(f"unknown A2L preset {name!r}; valid presets: {', '.join(cls.PRESETS)}")

    def __post_init__(self):
        if self.objective not in ("diffusion", "regression"):
            raise ValueError(f"objective must be 'diffusion' or 'regression', got {self.objective!r}")
        if self.prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"prediction_type must be 'sample' or 'epsilon', got {self.prediction_type!r}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window), got overlap={self.overlap} window={self.window}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        self.betas = tuple(self.betas)


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
    padded = np.zeros(n_blocks * block, dtype=np.float64)
    padded[:wave.size] = wave
    block_rms = np.sqrt((padded.reshape(n_blocks, block) ** 2).mean(axis=1))   # (n_blocks,)
    loudest = float(block_rms.max()) if block_rms.size else 0.0
    if loudest < floor_rms:
        return np.zeros_like(wave)
    active = block_rms > relative_gate * loudest
    gain = target_rms / math.sqrt(float((block_rms[active] ** 2).mean()))
    out = wave.astype(np.float64) * gain
    top = float(np.abs(out).max())
    if top > peak:
        out *= peak / top
    return out.astype(np.float32)


def prepare_wave(samples: np.ndarray, sample_rate: int, source: str = "audio") -> np.ndarray:
    """Any (S,) or (S, channels) int/float array at any rate -> normalised float32 mono (S',) at 16 kHz."""
    from scipy.signal import resample_poly
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)                                     # (S,) average of channels
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
    return normalize_loudness(x.astype(np.float32))


def load_audio(path: str) -> np.ndarray:
    """Read any wav/flac/ogg soundfile can read -> float32 mono (S,) at 16 kHz, loudness-normalised."""
    import soundfile as sf
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"audio file not found: {path}; check the path")
    if not os.path.isfile(path):
        raise UsageError(f"audio path is not a file: {path}; give a wav/flac/ogg file")
    try:
        samples, sample_rate = sf.read(path, dtype="float32", always_2d=True)   # (S, channels)
    except Exception as err:   # soundfile raises LibsndfileError/RuntimeError/TypeError on bad files
        raise UsageError(f"cannot read audio file {path}: {str(err).strip() or type(err).__name__}; "
                         "give a valid wav/flac/ogg file") from None
    return prepare_wave(samples, sample_rate, source=path)


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
                    fmin: float = 0.0, fmax: float = 8000.0, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Power mel spectrogram of (S,) or (B, S) -> (..., n_frames, n_mels), n_frames = 1 + S // hop.
    Hann window of `win_length` zero-padded to `n_fft`, centred frames (zero padding at the ends)."""
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        wave = wave.float()
    if wave.ndim not in (1, 2):
        raise ValueError(f"mel_spectrogram expects a wave (S,) or (B, S), got shape {tuple(wave.shape)}")
    window = torch.hann_window(win_length, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop, win_length=win_length, window=window, center=True,
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
    mel = log_mel(wave, n_mels=n_mels)                                               # (n_mel_frames, n_mels)
    pad = MEL_PER_FRAME * context_frames
    padded = torch.full((MEL_PER_FRAME * n_video + 2 * pad, n_mels), math.log(LOG_FLOOR), dtype=mel.dtype)
    keep = min(mel.shape[0], MEL_PER_FRAME * n_video)
    padded[pad:pad + keep] = mel[:keep]
    return padded                                                                   # (4T + 2 pad, n_mels)


def unfold_context(padded: torch.Tensor, context_frames: int = 2) -> torch.Tensor:
    """(4T + 8k, n_mels) from `padded_log_mel` -> per-video-frame windows (T, (2k+1)*4, n_mels); frame i gets
    mel frames 4(i-k) .. 4(i+k+1)-1. Vectorised with unfold (no loop over frames)."""
    size = (2 * context_frames + 1) * MEL_PER_FRAME
    windows = padded.unfold(0, size, MEL_PER_FRAME)                                  # (T, n_mels, C)
    return windows.transpose(1, 2).contiguous()                                     # (T, C, n_mels)


def mel_context(wave, num_frames: int | None = None, context_frames: int = 2, n_mels: int = 80) -> torch.Tensor:
    """Per-video-frame audio context windows (T, (2k+1)*4, n_mels) from a 16 kHz wave (S,).

    Video frame i owns mel frames 4i..4i+3 (10 ms hop, 25 fps), i.e. the audio of [i/25, (i+1)/25) s; its
    context covers video frames i-k..i+k. T = frames_for_duration(S) unless `num_frames` is given. Beyond the
    audio the log-mel of silence is used.
    """
    return unfold_context(padded_log_mel(wave, num_frames, context_frames, n_mels), context_frames)


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

def positional_encoding(length: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal encoding of window positions 0..length-1 -> (length, dim)."""
    return dreamhead.timestep_embedding(torch.arange(length, device=device), dim)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + MLP (used over the audio tokens; no diffusion-step conditioning)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = dreamhead.SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class AudioEncoder(nn.Module):
    """Stand-in for the paper's pretrained wav2vec2 (not downloadable here): each video frame's log-mel context
    (C = (2k+1) * 4 mel frames, 80) -> a stride-4 conv that turns the 4 mel frames of each video frame into one
    vector (the blueprint's 4 x 80 stacking) -> a k=3 conv across the 2k+1 context frames -> flatten -> linear
    -> d-dim token; then transformer blocks over the window's tokens. Trained jointly with the denoiser."""

    MEL_MEAN, MEL_SCALE = -5.0, 4.0   # rough centring of log-mel values (silence = log(1e-5) = -11.5)

    def __init__(self, n_mels: int, ctx_mel_frames: int, dim: int, layers: int, heads: int):
        super().__init__()
        if ctx_mel_frames % MEL_PER_FRAME:
            raise ValueError(f"ctx_mel_frames must be a multiple of {MEL_PER_FRAME}, got {ctx_mel_frames}")
        self.convs = nn.Sequential(
            nn.Conv1d(n_mels, dim, MEL_PER_FRAME, stride=MEL_PER_FRAME), nn.GELU(),
            nn.Conv1d(dim, dim, 3, padding=1), nn.GELU())
        self.proj = nn.Linear(dim * (ctx_mel_frames // MEL_PER_FRAME), dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))

    def forward(self, mel_ctx: torch.Tensor) -> torch.Tensor:
        B, L, C, M = mel_ctx.shape
        x = (mel_ctx - self.MEL_MEAN) / self.MEL_SCALE
        x = x.reshape(B * L, C, M).transpose(1, 2)                 # (B*L, 80, C)
        x = self.convs(x)                                           # (B*L, d, C/4)
        tokens = self.proj(x.flatten(1)).reshape(B, L, -1)          # (B, L, d)
        tokens = tokens + positional_encoding(L, tokens.shape[-1], tokens.device)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens                                               # (B, L, d)


class TemporalUnit(nn.Module):
    """Mixes information along time: AdaLN -> self-attention over the window [-> AdaLN -> depthwise conv k=3]."""

    def __init__(self, dim: int, heads: int, conv: bool):
        super().__init__()
        self.norm = dreamhead.AdaLayerNorm(dim, dim)
        self.attn = dreamhead.SelfAttention(dim, heads)
        self.conv_norm = dreamhead.AdaLayerNorm(dim, dim) if conv else None
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, groups=dim) if conv else None

    def forward(self, h, cond):
        h = h + self.attn(self.norm(h, cond))
        if self.conv is not None:
            h = h + self.conv(self.conv_norm(h, cond).transpose(1, 2)).transpose(1, 2)   # (B, L, d)
        return h


class MappingUnit(nn.Module):
    """Per-frame MLP d -> 4d -> d with AdaLN from the diffusion step."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = dreamhead.AdaLayerNorm(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, cond):
        return h + self.mlp(self.norm(h, cond))


class A2L(nn.Module):
    """Audio encoder + landmark denoiser + noise scheduler. Works on normalised canonical residuals
    x0 = (P - P̄) / residual_std, flattened to (B, L, 1434)."""

    def __init__(self, config: A2LConfig):
        super().__init__()
        self.config = c = config
        K3 = c.n_coords
        self.audio_encoder = AudioEncoder(c.n_mels, c.ctx_mel_frames, c.width, c.audio_layers, c.heads)
        self.null_audio = nn.Parameter(torch.zeros(c.width))        # audio token used when audio is dropped
        # Projection-In: one linear map per input, summed
        self.proj_x = nn.Linear(K3, c.width)
        self.proj_audio = nn.Linear(c.width, c.width)
        self.proj_pbar = nn.Linear(K3, c.width)
        self.step_embedder = dreamhead.TimestepEmbedder(c.width)
        self.units = nn.ModuleList()
        for _ in range(c.pairs):
            self.units.append(TemporalUnit(c.width, c.heads, c.temporal_conv))
            self.units.append(MappingUnit(c.width))
        # Projection-Out (zero-initialised: the untrained model predicts the mean residual)
        self.norm_out = dreamhead.AdaLayerNorm(c.width, c.width)
        self.proj_out = nn.Linear(c.width, K3)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.scheduler = dreamhead.NoiseScheduler(num_train_timesteps=c.num_train_timesteps,
                                                  beta_schedule=c.beta_schedule, prediction_type=c.prediction_type,
                                                  timestep_spacing=c.timestep_spacing)
        self.register_buffer("residual_std", torch.ones(K3))       # (1434,), set from data
        weights = torch.ones(c.n_points, 3)
        weights[[i for i in LIP_INDICES if i < c.n_points]] = c.lip_weight
        self.register_buffer("coord_weights", weights.reshape(K3), persistent=False)   # (1434,)

    # -- data normalisation -------------------------------------------------------------------------------------
    def set_residual_std(self, std) -> None:
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if std.numel() != self.config.n_coords:
            raise ValueError(f"residual std must have {self.config.n_coords} values, got {std.numel()}")
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError("residual std must be finite and positive everywhere")
        self.residual_std.copy_(std.to(self.residual_std.device))

    def normalise(self, P: torch.Tensor, p_bar: torch.Tensor) -> torch.Tensor:
        """Canonical landmarks (B, L, 478, 3) and P̄ (B, 478, 3) -> x0 (B, L, 1434)."""
        B, L = P.shape[:2]
        return (P - p_bar[:, None]).reshape(B, L, -1) / self.residual_std

    def denormalise(self, x0: torch.Tensor, p_bar: torch.Tensor) -> torch.Tensor:
        """x0 (B, L, 1434) and P̄ (B, 478, 3) -> canonical landmarks (B, L, 478, 3)."""
        B, L = x0.shape[:2]
        return (x0 * self.residual_std).reshape(B, L, self.config.n_points, 3) + p_bar[:, None]

    # -- network ------------------------------------------------------------------------------------------------
    def _check_inputs(self, x_t, t, mel_ctx, p_bar):
        c = self.config
        if x_t.ndim != 3 or x_t.shape[-1] != c.n_coords:
            raise ValueError(f"x_t must be (B, L, {c.n_coords}), got {tuple(x_t.shape)}")
        B, L = x_t.shape[:2]
        if tuple(mel_ctx.shape) != (B, L, c.ctx_mel_frames, c.n_mels):
            raise ValueError(f"mel_ctx must be (B={B}, L={L}, {c.ctx_mel_frames}, {c.n_mels}), "
                             f"got {tuple(mel_ctx.shape)}")
        if tuple(p_bar.shape) != (B, c.n_coords):
            raise ValueError(f"p_bar must be (B={B}, {c.n_coords}), got {tuple(p_bar.shape)}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must be (B={B},), got {tuple(t.shape)}")

    def forward(self, x_t, t, mel_ctx, p_bar, drop_audio=None, audio=None):
        """x_t (B, L, 1434), t (B,), mel_ctx (B, L, C, 80), p_bar (B, 1434) or (B, 478, 3),
        drop_audio (B,) bool or None -> model output (B, L, 1434) (x0 or epsilon, per prediction_type).
        audio: audio_encoder(mel_ctx) (B, L, d) when already computed (sampling encodes a window once)."""
        if p_bar.ndim == 3:
            p_bar = p_bar.reshape(p_bar.shape[0], -1)                # (B, 1434)
        self._check_inputs(x_t, t, mel_ctx, p_bar)
        B, L, _ = x_t.shape
        audio = self.audio_encoder(mel_ctx) if audio is None else audio  # (B, L, d)
        if drop_audio is not None:
            audio = torch.where(drop_audio.reshape(B, 1, 1), self.null_audio.to(audio.dtype), audio)
        # P̄ enters in canonical units (inter-ocular distance 1), broadcast over the window
        h = (self.proj_x(x_t) + self.proj_audio(audio) + self.proj_pbar(p_bar)[:, None]
             + positional_encoding(L, self.config.width, x_t.device))   # (B, L, d)
        cond = self.step_embedder(t)                                 # (B, d)
        for unit in self.units:
            h = unit(h, cond)
        out = self.proj_out(self.norm_out(h, cond))                  # (B, L, 1434)
        if self.config.objective == "diffusion" and self.config.prediction_type == "epsilon":
            # skip x_t / sqrt(1 - abar_t) = the eps implied by x0 = 0 (the mean residual): the 1434-d noise cannot
            # pass through the d-wide body, so the network predicts only the correction (our choice, EDM-like)
            abar = self.scheduler.alphas_cumprod.to(x_t.device)[t].float().reshape(B, 1, 1)
            out = out + x_t / (1 - abar).sqrt()
        return out

    # -- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict):
        """batch: landmarks (B, L, 478, 3) canonical, p_bar (B, 478, 3), mel_ctx (B, L, C, 80).
        Returns (loss, logs): weighted MSE on the model target (lips x lip_weight) + velocity_weight x L1 on
        first differences of the un-normalised x0 prediction."""
        c = self.config
        device = self.residual_std.device
        P = batch["landmarks"].to(device)
        p_bar = batch["p_bar"].to(device)
        mel_ctx = batch["mel_ctx"].to(device)
        if P.ndim != 4 or P.shape[2:] != (c.n_points, 3):
            raise ValueError(f"landmarks must be (B, L, {c.n_points}, 3), got {tuple(P.shape)}")
        if tuple(p_bar.shape) != (P.shape[0], c.n_points, 3):
            raise ValueError(f"p_bar must be (B, {c.n_points}, 3), got {tuple(p_bar.shape)}")
        B = P.shape[0]
        x0 = self.normalise(P, p_bar)                                # (B, L, 1434)
        if c.objective == "diffusion":
            t = torch.randint(0, c.num_train_timesteps, (B,), device=device)
            noise = torch.randn_like(x0)
            x_t = self.scheduler.add_noise(x0, noise, t)
            target = self.scheduler.training_target(x0, noise, t)
        else:
            t = torch.zeros(B, dtype=torch.long, device=device)
            x_t = torch.zeros_like(x0)
            target = x0
        drop = None
        if self.training and c.audio_dropout > 0:
            drop = dreamhead.drop_condition_mask(B, c.audio_dropout, device)
        out = self(x_t, t, mel_ctx, p_bar, drop)
        velocity_scale = torch.ones(B, 1, 1, device=device)
        if c.objective == "diffusion" and c.prediction_type == "epsilon":
            x0_pred = self.scheduler.predict_x0(out, t, x_t)
            # x0 from eps divides by sqrt(abar_t) (~0 at the noisiest steps): weight by sqrt(abar_t) so the
            # velocity term stays bounded (our choice)
            velocity_scale = self.scheduler.alphas_cumprod.to(device)[t].sqrt().float().reshape(B, 1, 1)
        else:
            x0_pred = out
        w = self.coord_weights
        mse = ((out - target) ** 2 * w).sum(-1).mean() / w.sum()
        velocity = (velocity_scale * (torch.diff(x0_pred * self.residual_std, dim=1)
                                      - torch.diff(x0 * self.residual_std, dim=1))).abs().mean()
        loss = mse + c.velocity_weight * velocity
        with torch.no_grad():
            lips = w > 1 if c.lip_weight != 1 else torch.ones_like(w, dtype=torch.bool)
            x0_mse_lips = ((x0_pred - x0)[..., lips] ** 2).mean()
        logs = {"loss": float(loss.detach()), "mse": float(mse.detach()), "velocity": float(velocity.detach()),
                "x0_mse_lips": float(x0_mse_lips)}
        return loss, logs

    # -- sampling -----------------------------------------------------------------------------------------------
    def _guided(self, x_t, t, mel_ctx, p_bar, guidance, audio=None):
        if guidance == 1.0:
            return self(x_t, t, mel_ctx, p_bar, None, audio)
        B = x_t.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([mel_ctx, mel_ctx]),
                    torch.cat([p_bar, p_bar]), drop, None if audio is None else torch.cat([audio, audio]))  # (2B, L, 1434)
        cond, uncond = both.chunk(2)
        return dreamhead.cfg_combine(cond, uncond, guidance)

    @torch.no_grad()
    def sample_window(self, mel_ctx, p_bar, steps=None, eta=None, guidance=None, generator=None, prefix=None):
        """Sample one window. mel_ctx (B, L, C, 80), p_bar (B, 478, 3), prefix (B, K, 478, 3) or None: canonical
        landmarks the first K frames are held to (replacement at every step, exact copy at the end).
        Returns canonical landmarks (B, L, 478, 3)."""
        c = self.config
        device = self.residual_std.device
        steps = c.sample_steps if steps is None else steps
        eta = c.eta if eta is None else eta
        guidance = c.guidance if guidance is None else guidance
        mel_ctx, p_bar = mel_ctx.to(device, torch.float32), p_bar.to(device, torch.float32)
        B, L = mel_ctx.shape[:2]
        if p_bar.numel() != B * c.n_coords:
            raise ValueError(f"p_bar must be (B={B}, {c.n_points}, 3), got {tuple(p_bar.shape)}")
        if prefix is not None and (prefix.ndim != 4 or prefix.shape[0] != B or prefix.shape[1] > L):
            raise ValueError(f"prefix must be (B={B}, K<={L}, {c.n_points}, 3), got {tuple(prefix.shape)}")
        p_bar = p_bar.reshape(B, c.n_points, 3)                       # (B, 478, 3)
        p_flat = p_bar.reshape(B, -1)                                 # (B, 1434)
        if c.objective == "regression":
            zeros_t = torch.zeros(B, dtype=torch.long, device=device)
            x0 = self._guided(torch.zeros(B, L, c.n_coords, device=device), zeros_t, mel_ctx, p_flat, guidance)
        else:
            x0 = self._denoise(mel_ctx, p_flat, p_bar, steps, eta, guidance, generator, prefix)
        out = self.denormalise(x0, p_bar)                             # (B, L, 478, 3)
        if prefix is not None:
            out[:, :prefix.shape[1]] = prefix.to(out)
        return out

    def _randn(self, shape, generator):
        gen_device = generator.device if generator is not None else self.residual_std.device
        return torch.randn(shape, generator=generator, device=gen_device).to(self.residual_std.device)

    def _denoise(self, mel_ctx, p_flat, p_bar, steps, eta, guidance, generator, prefix):
        B, L = mel_ctx.shape[:2]
        sched = self.scheduler
        sched.set_timesteps(steps)
        x = self._randn((B, L, self.config.n_coords), generator)     # x_T (B, L, 1434)
        known = None
        if prefix is not None:
            known = self.normalise(prefix.to(x), p_bar)              # (B, K, 1434)
        x0_pred = x
        audio = self.audio_encoder(mel_ctx)                           # (B, L, d): the same at every step
        for t in sched.timesteps:
            t_vec = torch.full((B,), int(t), dtype=torch.long, device=x.device)
            if known is not None:   # hold the overlap: previous result noised to the current level
                x[:, :known.shape[1]] = sched.add_noise(known, self._randn(known.shape, generator), t_vec)
            out = self._guided(x, t_vec, mel_ctx, p_flat, guidance, audio)
            x, x0_pred = sched.step(out, int(t), x, eta=eta, generator=generator)
        return x0_pred

    @torch.no_grad()
    def generate(self, mel_ctx_full, p_bar, steps=None, eta=None, guidance=None, generator=None,
                 progress=False) -> torch.Tensor:
        """Landmarks for audio of any length. mel_ctx_full (T, C, 80) from `mel_context`, p_bar (478, 3).
        Windows of length l overlap by `overlap` frames and run one after another; the last window is shifted
        back to end at T. Only the (T, 478, 3) output grows with T. Returns canonical landmarks (T, 478, 3)."""
        c = self.config
        mel_ctx_full = torch.as_tensor(mel_ctx_full)
        p_bar = torch.as_tensor(p_bar, dtype=torch.float32).reshape(1, c.n_points, 3)   # (1, 478, 3)
        if mel_ctx_full.ndim != 3 or mel_ctx_full.shape[1:] != (c.ctx_mel_frames, c.n_mels):
            raise ValueError(f"mel_ctx_full must be (T, {c.ctx_mel_frames}, {c.n_mels}), "
                             f"got {tuple(mel_ctx_full.shape)}")
        T = mel_ctx_full.shape[0]
        if T == 0:
            raise ValueError("mel_ctx_full has no frames")
        L = min(c.window, T)
        result = torch.empty(T, c.n_points, 3)                        # (T, 478, 3) on CPU
        done = 0
        starts = window_starts(T, L, c.overlap)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="A2L windows", unit="win")
        for s in starts:
            held = done - s
            prefix = result[s:done][None] if held > 0 else None       # (1, held, 478, 3)
            window = self.sample_window(mel_ctx_full[s:s + L][None], p_bar, steps, eta, guidance, generator,
                                        prefix)                       # (1, L, 478, 3)
            result[done:s + L] = window[0, max(held, 0):].cpu()
            done = s + L
        return result


def window_starts(T: int, L: int, overlap: int) -> list[int]:
    """Start frames of windows of length L covering 0..T-1 with `overlap` shared frames; the last window is
    shifted back to end exactly at T."""
    if L > T:
        raise ValueError(f"window {L} longer than sequence {T}")
    stride = L - overlap
    starts = list(range(0, T - L + 1, stride))
    if starts[-1] + L < T:
        starts.append(T - L)
    return starts


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------

class A2LWindows(torch.utils.data.Dataset):
    """Windows of (canonical landmarks, P̄, mel context) from clips written by data.py (.npz with landmarks
    (T, 478, 3) pixel coords, fps, identity, audio int16 16 kHz, sample_rate).

    Canonical landmarks and the padded log-mel are computed once per clip and cached (the per-frame context
    windows are unfolded from it per item: 5x less memory than caching them). P̄ = mean canonical mesh of the
    clip's identity over all given clips (the clip's own mean if it has no identity). Train: random window starts
    (len = sum of ceil(T / L) over clips); eval: fixed windows tiling each clip, the last one shifted to its end.
    Items: dict(landmarks (L, 478, 3), p_bar (478, 3), mel_ctx (L, C, 80), identity).
    """

    def __init__(self, npz_paths, window: int, train: bool = True, context_frames: int = 2, n_mels: int = 80,
                 canonicalize=None):
        if canonicalize is None:
            import landmarks
            canonicalize = landmarks.canonicalize
        npz_paths = list(npz_paths)
        self.window, self.train, self.context_frames = window, train, context_frames
        self.clips = []          # dicts: P (T, 478, 3) canonical float32, mel (4T + 8k, 80) padded log-mel, identity
        for path in npz_paths:
            clip = self._load_clip(os.fspath(path), canonicalize, context_frames, n_mels)
            if clip["P"].shape[0] < window:
                warnings.warn(f"{path}: {clip['P'].shape[0]} frames < window {window}; clip skipped")
                continue
            self.clips.append(clip)
        if not self.clips:
            raise UsageError(f"no clip with at least {window} frames among {len(npz_paths)} files; "
                             "generate longer clips or use a shorter window")
        self._set_p_bar()
        if train:
            counts = [math.ceil(cl["P"].shape[0] / window) for cl in self.clips]
            self.items = None
        else:
            self.items = [(k, s) for k, cl in enumerate(self.clips)
                          for s in window_starts(cl["P"].shape[0], window, 0)]
            counts = None
        self._cum = np.cumsum(counts).tolist() if counts else None

    @staticmethod
    def _load_clip(path, canonicalize, context_frames, n_mels):
        try:
            with np.load(path) as z:
                P = np.asarray(z["landmarks"], dtype=np.float32)
                audio = np.asarray(z["audio"])
                sr = int(z["sample_rate"]) if "sample_rate" in z else SAMPLE_RATE
                fps = float(z["fps"]) if "fps" in z else FPS
                identity = int(z["identity"]) if "identity" in z else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UsageError(f"cannot read clip {path}: {err}; regenerate it with data.py") from None
        if P.ndim != 3 or P.shape[2] != 3:
            raise UsageError(f"{path}: landmarks must be (T, 478, 3), got {P.shape}")
        if fps != FPS:
            raise UsageError(f"{path}: clip is {fps} fps, A2L expects {FPS} fps")
        P_canon, _ = canonicalize(P)
        wave = prepare_wave(audio.reshape(audio.shape[0], -1), sr, source=path)
        mel = padded_log_mel(wave, num_frames=P.shape[0], context_frames=context_frames, n_mels=n_mels)
        return {"P": torch.as_tensor(np.asarray(P_canon, dtype=np.float32)), "mel": mel, "identity": identity}

    def _set_p_bar(self):
        sums, counts = {}, {}
        for clip in self.clips:
            if clip["identity"] is not None:
                key = clip["identity"]
                sums[key] = sums.get(key, 0) + clip["P"].sum(0)      # (478, 3)
                counts[key] = counts.get(key, 0) + clip["P"].shape[0]
        for clip in self.clips:
            key = clip["identity"]
            clip["p_bar"] = sums[key] / counts[key] if key is not None else clip["P"].mean(0)

    def __len__(self):
        return self._cum[-1] if self.train else len(self.items)

    def __getitem__(self, index):
        if self.train:
            k = bisect.bisect_right(self._cum, index)
            T = self.clips[k]["P"].shape[0]
            start = int(torch.randint(0, T - self.window + 1, ()))
        else:
            k, start = self.items[index]
        clip = self.clips[k]
        end = start + self.window
        mel_ctx = unfold_context(clip["mel"][MEL_PER_FRAME * start:MEL_PER_FRAME * (end + 2 * self.context_frames)],
                                 self.context_frames)                  # (L, C, 80)
        return {"landmarks": clip["P"][start:end], "p_bar": clip["p_bar"], "mel_ctx": mel_ctx,
                "identity": -1 if clip["identity"] is None else clip["identity"]}


def compute_residual_std(dataset: A2LWindows, rel_floor: float = 0.05) -> torch.Tensor:
    """Per-coordinate std (1434,) of P - P̄ over every frame of every clip. Coordinates that barely move are
    floored at rel_floor x the largest std, so near-rigid points are not blown up to unit-variance noise."""
    residuals = torch.cat([(clip["P"] - clip["p_bar"]).reshape(clip["P"].shape[0], -1)
                           for clip in dataset.clips])               # (sum T, 1434)
    std = residuals.std(dim=0)
    return std.clamp_min(max(float(std.max()) * rel_floor, 1e-6))
