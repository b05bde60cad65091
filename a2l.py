"""Audio-to-landmark (A2L) diffusion: DreamHead's first hierarchy (the framework figure's left half).

From an audio window A^[i-l:i], the subject's mean canonical mesh P̄ and a noisy landmark window P_t^[i-l:i],
a denoiser built as the figure draws it ([A2L: Projection-In] -> N x [[A2L: Temporal Unit] -> [A2L: Mapping
Unit]] -> [A2L: Projection-Out]) predicts the clean window P_0 of dense MediaPipe landmarks (478 x 3 = 1434
values per frame, canonical pose). Long audio is covered by overlapping windows whose overlap frames are held
to the previous window's result.

Confirmed by the paper (docs/paper.md): the unit layout, the inputs (audio window, noisy landmark window, P̄),
iterative denoising, dense frontal landmarks. Everything else here is our guess and sits behind an
`A2LConfig` field:
- Audio: the paper uses a pretrained wav2vec2, which cannot be downloaded here (no internet, no weights). We use
  a hand-written 80-bin log-mel front end (`audio.py`: hop 10 ms, 4 mel frames per 25 fps video frame, +-2 video
  frames of context) and a small convolutional encoder + transformer trained jointly with the denoiser
  (`AudioEncoder`).
- Diffusion target: canonical residuals x0 = (P - P̄) / residual_std (per-coordinate, dataset-wide), cosine
  schedule, x0 prediction ("sample"; "epsilon" is a switch), DDIM sampling on a "trailing" grid (starts at T-1).
- Loss (MODA, same authors): MSE with lip points weighted x5 + L1 velocity loss on first differences of the
  un-normalised prediction.
- Classifier-free guidance on audio (audio dropout in training, `guidance` scale at sampling).
- `objective="regression"`: the same network as a deterministic regressor (x_t = 0, t = 0), the paper's
  diffusion-vs-regression ablation.
- P̄ from one photo: P̄ passes through its neutral face (`neutral.NeutralFace`, fitted on the training clips) in
  training and sampling alike, so the open mouth or smile of the one photo sample.py gets is not taken for the
  subject's rest pose.
- Long audio: sliding windows of length l with overlap; overlap frames are replaced at every denoising step by
  the previous result noised to the current level (inpainting by replacement), and copied exactly at the end.

Also here: `A2LWindows` (training windows from clips in the clip format), `compute_residual_std` and
`predict_clips` (every held-out clip generated whole, for training-time checks and `evaluate.py a2l`).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import augment
import clips
import diffusion
import landmarks
from audio import FPS, MEL_PER_FRAME, MelContext, padded_log_mel, prepare_wave, unfold_context
from cli import UsageError
from common import Config, SampleRandom, TrainConfig, atomic_write, option, train_settings
from neutral import NeutralFace


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class A2LConfig(Config):
    """The A2L model and its training settings; presets `A2LConfig.preset("tiny" | "paper")`."""
    # features
    n_points: int = option(landmarks.NUM_LANDMARKS, "Landmarks per frame (MediaPipe FaceMesh with irises).")
    n_mels: int = option(80, "Mel bands of the log-mel audio features.")
    context_frames: int = option(2, "Video frames of audio context on each side of a frame [guess].")
    # network [guess]
    width: int = option(128, "Token width d of the audio encoder and of every unit.")
    pairs: int = option(2, "Number N of (Temporal Unit, Mapping Unit) pairs.")
    heads: int = option(4, "Attention heads of every self-attention.")
    audio_layers: int = option(1, "Transformer blocks over the window's audio tokens.")
    temporal_conv: bool = option(True, "Each Temporal Unit adds a depthwise convolution (k = 3) after attention.")
    window: int = option(16, "Window length l in frames, in training and sampling.")
    overlap: int = option(4, "Frames each window holds from the previous one when sampling long audio.")
    # diffusion [guess]
    objective: str = option("diffusion", "Either diffusion or regression; regression is the ablation that "
                            "predicts once from x_t = 0 at t = 0.")
    num_train_timesteps: int = option(100, "Diffusion timesteps T of the training chain.")
    beta_schedule: str = option("cosine", "Noise schedule: linear, scaled_linear or cosine (Nichol & Dhariwal).")
    prediction_type: str = option("sample", "What the denoiser predicts: sample (x0) or epsilon.")
    sample_steps: int = option(10, "DDIM steps at inference.")
    timestep_spacing: str = option("trailing", "DDIM grid: trailing starts at t = T-1 (pure noise); with T = 100 "
                                   "and 10 steps leading starts at t = 90 and gave 1.5x the lip error.")
    eta: float = option(0.0, "DDIM eta; 0 is deterministic.")
    guidance: float = option(1.0, "Classifier-free guidance scale on the audio at sampling (Ho & Salimans 2022); "
                             "1 turns it off. The tiny preset samples with 1.5: on recorded speech the mouth "
                             "follows the voice more and closes more in pauses (docs/experiments.md).")
    guidance_rescale: float = option(0.0, "Guidance rescale phi (Lin et al. 2024): the guided x0 scaled back to the "
                                     "conditional one's spread, mixed in with weight phi, so guidance does not "
                                     "widen the motion; the tiny preset uses 0.7.")
    # loss (MODA's recipe)
    lip_weight: float = option(5.0, "Loss weight of the 40 lip points against 1 for the others (MODA).")
    velocity_weight: float = option(1.0, "Weight of the L1 loss on first differences over time (MODA).")
    audio_dropout: float = option(0.1, "Probability of dropping the audio condition in training, for guidance.")
    pbar_frame_prob: float = option(0.0, "Probability that a training window's P̄ is one random frame of its clip "
                                    "instead of the identity's mean mesh, so A2L learns to start from the single "
                                    "photo sample.py gets, whose mouth may be open (our choice; 0 is off).")
    # training-audio augmentation (augment.py; our addition, off by default): probability per training window
    aug_all: float = option(0.0, "Every aug probability below is at least this, so 0.3 turns them all on at once "
                            "(our convenience preset; 0 is off).")
    aug_gain: float = option(0.0, "Probability of a -40 to +20 dB level change stored as 16-bit samples and clipped "
                             "to [-1, 1] (volume perturbation, Ko et al. 2015).")
    aug_noise: float = option(0.0, "Probability of white, pink or synthetic babble noise at 0-20 dB SNR (MUSAN-style "
                              "noise augmentation, Snyder et al. 2018, x-vectors).")
    aug_reverb: float = option(0.0, "Probability of reverberation by a synthetic room impulse response, decaying noise "
                               "of RT60 0.2-0.8 s (Ko et al. 2017, reverberant speech).")
    aug_telephone: float = option(0.0, "Probability of a telephone line: 8 kHz, 300-3400 Hz and 8-bit mu-law (ITU-T "
                                  "G.711 telephone practice).")
    aug_codec: float = option(0.0, "Probability of low-bitrate codec damage, a 3-7 kHz lowpass and 4-8 bit mu-law "
                              "(after ITU-T G.711 and G.722).")
    aug_speed: float = option(0.0, "Probability of a 0.9-1.1x speed change, the landmarks resampled in time with it "
                              "(speed perturbation, Ko et al. 2015).")
    aug_pitch: float = option(0.0, "Probability of a pitch shift of up to 2 semitones that keeps the timing "
                              "(granular overlap-add; pitch-shift augmentation, Schlueter and Grill 2015).")
    aug_silence: float = option(0.0, "Probability of lengthening a pause by 2-40 silent frames that hold a silent "
                                "closed-mouth frame (our choice, for real recordings' pauses and lead-in silence).")
    aug_breath: float = option(0.0, "Probability of breathing-like noise 20-35 dB under the speech in a pause of 8 "
                               "or more silent closed-mouth frames, the mouth staying closed (our choice).")
    neutral_modes: int = option(6, "Articulation modes removed from P̄ to get the neutral face of one photo "
                                "(neutral.NeutralFace: a linear identity + articulation model as in 3D morphable "
                                "models, fitted on the training clips; our addition); 0 is off.")
    neutral_noise: float = option(1e-4, "Variance (IOD^2) of the face detail no training identity spans, in the "
                                  "neutral face's identity prior.")
    train: TrainConfig = train_settings()

    LEGACY = {"neutral_modes": 0}  # checkpoints from before neutral.py were trained without a neutral face
    PRESETS = {
        "tiny": dict(guidance=1.5, guidance_rescale=0.7,  # CPU minutes; the guidance: docs/experiments.md
                     train=dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01, warmup=50, steps=10_000, batch_size=16,
                                ema_decay=0.999, grad_clip=1.0)),
        "paper": dict(width=512, pairs=8, heads=8, audio_layers=2, window=32, overlap=8, num_train_timesteps=1000,
                      sample_steps=50, train=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, warmup=1000,
                                                  steps=200_000, batch_size=64, ema_decay=0.9999, grad_clip=1.0)),
    }

    @property
    def ctx_mel_frames(self) -> int:
        """Mel frames in one video frame's audio context: (2 * context_frames + 1) * 4."""
        return (2 * self.context_frames + 1) * MEL_PER_FRAME

    @property
    def n_coords(self) -> int:
        return self.n_points * 3

    def augmentation(self) -> augment.Settings:
        """The aug_* probabilities (each at least aug_all) for A2LWindows."""
        return augment.Settings(**{name: max(getattr(self, "aug_" + name), self.aug_all) for name in augment.NAMES})

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("diffusion", "regression"):
            raise ValueError(f"objective must be 'diffusion' or 'regression', got {self.objective!r}")
        if self.prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"prediction_type must be 'sample' or 'epsilon', got {self.prediction_type!r}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window), got overlap={self.overlap} window={self.window}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        for name in ("all", *augment.NAMES):
            if not 0 <= getattr(self, "aug_" + name) <= 1:
                raise ValueError(f"aug_{name} is a probability in [0, 1], got {getattr(self, 'aug_' + name)}")


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

def positional_encoding(length: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal encoding of window positions 0..length-1 -> (length, dim)."""
    return diffusion.timestep_embedding(torch.arange(length, device=device), dim)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + MLP (used over the audio tokens; no diffusion-step conditioning)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = diffusion.SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class AudioEncoder(nn.Module):
    """Stand-in for the paper's pretrained wav2vec2 (not downloadable here): each video frame's log-mel context
    (C = (2k+1) * 4 mel frames, 80) -> a stride-4 conv that turns the 4 mel frames of each video frame into one
    vector (a 4 x 80 stacking) -> a k=3 conv across the 2k+1 context frames -> flatten -> linear
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
        self.norm = diffusion.AdaLayerNorm(dim, dim)
        self.attn = diffusion.SelfAttention(dim, heads)
        self.conv_norm = diffusion.AdaLayerNorm(dim, dim) if conv else None
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
        self.norm = diffusion.AdaLayerNorm(dim, dim)
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
        self.step_embedder = diffusion.TimestepEmbedder(c.width)
        self.units = nn.ModuleList()
        for _ in range(c.pairs):
            self.units.append(TemporalUnit(c.width, c.heads, c.temporal_conv))
            self.units.append(MappingUnit(c.width))
        # Projection-Out (zero-initialised: the untrained model predicts the mean residual)
        self.norm_out = diffusion.AdaLayerNorm(c.width, c.width)
        self.proj_out = nn.Linear(c.width, K3)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.scheduler = diffusion.NoiseScheduler(num_train_timesteps=c.num_train_timesteps,
                                                  beta_schedule=c.beta_schedule, prediction_type=c.prediction_type,
                                                  timestep_spacing=c.timestep_spacing)
        self.register_buffer("residual_std", torch.ones(K3))       # (1434,), set from data
        # P̄ -> its neutral face, fitted on the training data (off: P̄ as given)
        self.neutral = NeutralFace(K3, c.neutral_modes, c.neutral_noise) if c.neutral_modes else nn.Identity()
        weights = torch.ones(c.n_points, 3)
        weights[landmarks.LIPS[landmarks.LIPS < c.n_points]] = c.lip_weight
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
        """batch: landmarks (B, L, 478, 3) canonical, p_bar (B, 478, 3), mel_ctx (B, L, C, 80), and the samples'
        seeds (B,) that every random draw of the loss comes from (fresh ones when absent).
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
        p_bar = self.neutral(p_bar)                                  # (B, 478, 3): as sampling sees it
        rng = SampleRandom(batch["seed"], device) if "seed" in batch else SampleRandom.fresh(B, device)
        x0 = self.normalise(P, p_bar)                                # (B, L, 1434)
        if c.objective == "diffusion":
            t = rng.randint(c.num_train_timesteps)                   # (B,)
            noise = rng.randn(*x0.shape[1:])                         # (B, L, 1434)
            x_t = self.scheduler.add_noise(x0, noise, t)
            target = self.scheduler.training_target(x0, noise, t)
        else:
            t = torch.zeros(B, dtype=torch.long, device=device)
            x_t = torch.zeros_like(x0)
            target = x0
        drop = None
        if self.training and c.audio_dropout > 0:
            drop = rng.rand() < c.audio_dropout                      # (B,) True: audio dropped
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
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([mel_ctx, mel_ctx]),  # -> (2B, L, 1434)
                    torch.cat([p_bar, p_bar]), drop, None if audio is None else torch.cat([audio, audio]))
        cond, uncond = both.chunk(2)
        return diffusion.cfg_combine(cond, uncond, guidance, self.config.guidance_rescale)

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
        p_bar = self.neutral(p_bar.reshape(B, c.n_points, 3))         # (B, 478, 3), its neutral face
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
        """Landmarks for audio of any length, all at once: canonical landmarks (T, 478, 3) (see `stream`)."""
        return torch.cat(list(self.stream(mel_ctx_full, p_bar, steps, eta, guidance, generator, progress)))

    @torch.no_grad()
    def stream(self, mel_ctx_full, p_bar, steps=None, eta=None, guidance=None, generator=None, progress=False):
        """Landmarks for audio of any length, yielded in order as each window is sampled ([A2L: Loop]): canonical
        landmarks (n, 478, 3) on CPU, the new frames of each window, T in all.
        mel_ctx_full (T, C, 80) from `mel_context` (or an audio.MelContext, which unfolds each window only when it is
        sampled and may stream its mel rows), p_bar (478, 3). Windows of length l overlap by `overlap` frames and run
        one after another, each continuing the frames it shares with the last one; the last window is shifted back
        to end at T. Only the last window's frames are held, so memory does not grow with T."""
        c = self.config
        if not isinstance(mel_ctx_full, MelContext):
            mel_ctx_full = torch.as_tensor(mel_ctx_full)
        p_bar = torch.as_tensor(p_bar, dtype=torch.float32).reshape(1, c.n_points, 3)   # (1, 478, 3)
        if mel_ctx_full.ndim != 3 or tuple(mel_ctx_full.shape[1:]) != (c.ctx_mel_frames, c.n_mels):
            raise ValueError(f"mel_ctx_full must be (T, {c.ctx_mel_frames}, {c.n_mels}), "
                             f"got {tuple(mel_ctx_full.shape)}")
        T = mel_ctx_full.shape[0]
        if T == 0:
            raise ValueError("mel_ctx_full has no frames")
        L = min(c.window, T)                                          # audio shorter than a window: one window
        recent = torch.empty(0, c.n_points, 3)                        # (<= L, 478, 3): the frames before `done`
        done = 0
        starts = window_starts(T, L, min(c.overlap, L - 1))
        for s in tqdm(starts, desc="A2L windows", unit="win", file=sys.stdout, disable=not progress):
            held = done - s
            prefix = recent[len(recent) - held:][None] if held > 0 else None  # (1, held, 478, 3)
            window = self.sample_window(mel_ctx_full[s:s + L][None], p_bar, steps, eta, guidance, generator,
                                        prefix)                       # (1, L, 478, 3)
            new = window[0, max(held, 0):].cpu()                      # (s + L - done, 478, 3)
            yield new
            recent = torch.cat([recent, new])[-L:]
            done = s + L


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
    """Windows of (canonical landmarks, P̄, mel context) from clips in the clip format (clips.load_clip).

    Canonical landmarks and the padded log-mel are computed once per clip (the per-frame context windows are
    unfolded from it per item: 5x less memory than caching them); with `cache` (a folder) they are stored there
    as .npy files and read back memory-mapped, so a dataset larger than memory trains in flat memory. Clips
    without sound (has_audio False, e.g. a silent video in a prepared folder) are skipped. P̄ = mean canonical
    mesh of the clip's identity over all given clips, or with p_bar="first_frame" the clip's first frame (what
    sample.py has: one photo). Train items are (index, seed) pairs (common.step_items): a random window start
    in the clip the index falls in (len = sum of ceil(T / L) over clips) and, with probability random_frame_p,
    a random frame of the clip as P̄ (A2LConfig.pbar_frame_prob), both drawn from the seed, which the item
    carries on to the loss. Eval items are plain indices of fixed windows tiling each clip, the last one shifted
    to its end. Items: dict(landmarks (L, 478, 3), p_bar (478, 3), mel_ctx (L, C, 80)[, seed]).
    With `augmentation` (augment.Settings) a train item whose seed fires an augmentation hears its window's augmented
    audio (augment.augment_window, from the clip's stored wave; its own generator of the seed) and gets the
    landmarks that go with it; the other items, and every eval item, are as without.
    """

    def __init__(self, npz_paths, window: int, train: bool = True, context_frames: int = 2, n_mels: int = 80,
                 p_bar: str = "identity", random_frame_p: float = 0.0, cache: str | None = None,
                 augmentation: augment.Settings | None = None):
        if p_bar not in ("identity", "first_frame"):
            raise ValueError(f"p_bar must be 'identity' or 'first_frame', got {p_bar!r}")
        npz_paths = list(npz_paths)
        self.window, self.train, self.context_frames, self.n_mels = window, train, context_frames, n_mels
        self.p_bar_mode, self.random_frame_p = p_bar, random_frame_p
        self.augment = augmentation if train and augmentation is not None and augmentation.active else None
        self.clips = []  # dicts: P (T, 478, 3) canonical float32, mel (4T + 8k, 80) padded log-mel, wave (S,) the
        #                  16 kHz audio it was made from, rest (T,) silent closed-mouth frames, identity, sums
        for path in tqdm(npz_paths, desc="A2L clips", leave=False, disable=len(npz_paths) < 8):
            clip = _cached_clip(str(path), context_frames, n_mels, cache)
            if clip is None:
                continue
            if clip["P"].shape[0] < window:
                warnings.warn(f"{path}: {clip['P'].shape[0]} frames < window {window}; clip skipped")
                continue
            self.clips.append(clip)
        if not self.clips:
            raise UsageError(f"no clip with sound and at least {window} frames among {len(npz_paths)} files; "
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

    def _set_p_bar(self):
        sums, counts = {}, {}
        for clip in self.clips:
            key = clip["identity"]
            sums[key] = sums.get(key, 0) + clip["sum"]          # (478, 3) float64
            counts[key] = counts.get(key, 0) + clip["P"].shape[0]
        self.identity_stats = {k: (sums[k], counts[k]) for k in sums}
        for clip in self.clips:
            identity_mean = torch.from_numpy((sums[clip["identity"]] / counts[clip["identity"]]).astype(np.float32))
            clip["p_bar"] = clip["P"][0].clone() if self.p_bar_mode == "first_frame" else identity_mean

    def __len__(self):
        return self._cum[-1] if self.train else len(self.items)

    def __getitem__(self, item):
        extra = {}
        if self.train:
            index, seed = item
            gen = torch.Generator().manual_seed(seed)
            k = bisect.bisect_right(self._cum, index)
            T = self.clips[k]["P"].shape[0]
            start = int(torch.randint(0, T - self.window + 1, (), generator=gen))
            extra["seed"] = seed
        else:
            k, start = self.items[item]
        clip = self.clips[k]
        end = start + self.window
        heard = self._augmented(clip, start, seed) if self.augment is not None else None
        P, mel = heard or (clip["P"][start:end].clone(),
                           clip["mel"][MEL_PER_FRAME * start:MEL_PER_FRAME * (end + 2 * self.context_frames)])
        mel_ctx = unfold_context(mel, self.context_frames)            # (L, C, 80)
        p_bar = clip["p_bar"]
        if self.train and self.random_frame_p > 0 and float(torch.rand((), generator=gen)) < self.random_frame_p:
            p_bar = clip["P"][int(torch.randint(0, clip["P"].shape[0], (), generator=gen))]  # one frame, a photo's
        return {"landmarks": P, "p_bar": p_bar.clone(), "mel_ctx": mel_ctx, **extra}

    def _augmented(self, clip: dict, start: int, seed: int):
        """(landmarks (L, 478, 3), padded log-mel rows (4 (L + 2k), 80)) of the window at `start` as `augment` makes
        them for this seed (from a generator of its own: the item's other draws stay as they were), or None."""
        out = augment.augment_window(clip["wave"].numpy(), clip["P"].numpy(), clip["rest"], start, self.window,
                                     self.context_frames, self.augment, np.random.default_rng([seed, 1]), self.n_mels)
        return None if out is None else (torch.from_numpy(out[0]), out[1])  # the audio out[2] is not needed


def _features(path: str, context_frames: int, n_mels: int) -> dict | None:
    """Canonical landmarks (T, 478, 3), padded log-mel, 16 kHz wave and rest frames (`_rest_frames`) of one clip;
    None for a clip without sound."""
    clip = clips.load_clip(path)
    if not clip["has_audio"]:
        return None
    P = clip["landmarks"]
    if clip["fps"] != FPS:
        raise UsageError(f"{path}: clip is {clip['fps']:g} fps, A2L expects {FPS} fps")
    P_canon, _ = landmarks.canonicalize(P)
    audio = clip["audio"]
    wave = prepare_wave(audio.reshape(audio.shape[0], -1), clip["sample_rate"], source=path)
    mel = padded_log_mel(wave, num_frames=P.shape[0], context_frames=context_frames, n_mels=n_mels)
    return {"P": np.asarray(P_canon, dtype=np.float32), "mel": mel.numpy(), "wave": wave,
            "rest": _rest_frames(P_canon, wave), "identity": clip["identity"]}


def _rest_frames(P_canon: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """(T,) True on the frames where the speaker is silent (augment.silent_frames) with the mouth closed: its
    opening within 0.02 IOD of the clip's 10th percentile (canonical units: IOD 1)."""
    opening = landmarks.mouth_opening(P_canon)                        # (T,)
    return augment.silent_frames(wave, len(P_canon)) & (opening <= np.quantile(opening, 0.1) + 0.02)


CACHED = ("P", "mel", "wave")  # the arrays of a clip stored in the cache and memory-mapped (in its key: a cache of
#                                 fewer arrays is not read)


def _cached_clip(path: str, context_frames: int, n_mels: int, cache: str | None) -> dict | None:
    """_features of a clip as torch tensors with the per-coordinate sums P̄ and the residual std are made of
    (so no pass over every frame is needed later); with `cache`, stored there once and memory-mapped."""
    if cache is None:
        feats = _features(path, context_frames, n_mels)
        if feats is None:
            return None
        P = feats["P"].astype(np.float64)
        meta = {"identity": feats["identity"], "rest": feats["rest"], "sum": P.sum(0), "sumsq": (P ** 2).sum(0)}
        return {**{name: torch.from_numpy(feats[name]) for name in CACHED}, **meta}
    stat = os.stat(path)
    key = hashlib.sha1(json.dumps([os.path.abspath(path), stat.st_mtime_ns, stat.st_size, context_frames,
                                   n_mels, CACHED]).encode()).hexdigest()[:16]
    stem = os.path.join(cache, "a2l", key)
    if not os.path.exists(stem + ".meta.npz"):
        feats = _features(path, context_frames, n_mels)
        if feats is None:
            meta = {"silent": True}
        else:
            P = feats["P"].astype(np.float64)
            meta = {"silent": False, "identity": feats["identity"], "rest": feats["rest"], "sum": P.sum(0),
                    "sumsq": (P ** 2).sum(0)}
            for name in CACHED:
                atomic_write(f"{stem}.{name}.npy", lambda tmp: np.save(open(tmp, "wb"), feats[name]))
        atomic_write(stem + ".meta.npz", lambda tmp: np.savez(open(tmp, "wb"), **meta))  # last: marks it done
    with np.load(stem + ".meta.npz") as z:
        meta = {k: z[k] for k in z.files}
    if meta["silent"]:
        return None
    mapped = {name: torch.from_numpy(np.load(f"{stem}.{name}.npy", mmap_mode="c")) for name in CACHED}
    return {**mapped, "identity": str(meta["identity"]), "rest": meta["rest"], "sum": meta["sum"],
            "sumsq": meta["sumsq"]}


def compute_residual_std(dataset: A2LWindows, rel_floor: float = 0.05) -> torch.Tensor:
    """Per-coordinate std (1434,) of P - P̄ (P̄ the identity's mean) over every frame of every clip, from the
    clips' stored sums (no pass over the frames). Coordinates that barely move are floored at rel_floor x the
    largest std, so near-rigid points are not blown up to unit-variance noise."""
    sumsq = {}
    for clip in dataset.clips:
        sumsq[clip["identity"]] = sumsq.get(clip["identity"], 0) + clip["sumsq"]
    squares = sum(sumsq[k] - total ** 2 / n for k, (total, n) in dataset.identity_stats.items())  # (478, 3)
    frames = sum(n for _, n in dataset.identity_stats.values())
    var = np.maximum(squares, 0).reshape(-1) / max(frames - 1, 1)  # the residuals' mean is 0 by construction
    std = torch.from_numpy(np.sqrt(var).astype(np.float32))
    return std.clamp_min(max(float(std.max()) * rel_floor, 1e-6))


@torch.no_grad()
def predict_clips(model: A2L, dataset: A2LWindows, steps=None, seed=0, max_clips=None) -> list[dict]:
    """Generate every clip of an A2LWindows dataset whole: [{truth, pred, p_bar}] canonical (T, 478, 3) arrays."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for clip in dataset.clips[:max_clips]:
        mel_ctx = unfold_context(clip["mel"], dataset.context_frames)  # (T, C, 80)
        pred = model.generate(mel_ctx, clip["p_bar"], steps=steps, generator=gen)  # (T, 478, 3)
        out.append({"truth": clip["P"].numpy(), "pred": pred.numpy(), "p_bar": clip["p_bar"].numpy()})
    return out
