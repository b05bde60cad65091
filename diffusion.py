"""Diffusion maths and the network blocks both of DreamHead's stages share (ground floor: imports nothing of ours).

DreamHead (Hong et al., 2024, arXiv 2409.10281) is a *hierarchical* diffusion cascade: an audio-to-landmark
(A2L) diffusion model (`a2l.py`) followed by a landmark-to-image (L2I) latent diffusion model (`l2i.py`); in the
paper's framework figure both boxes are denoisers iterated over "(T-1) diffusion steps". This file holds what
the two have in common, written by hand in plain PyTorch:

* `NoiseScheduler`: the forward process q(x_t | x_0) and the DDPM / DDIM reverse steps.
    - DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (eqs. 4, 6, 7, 15).
    - DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (eqs. 12, 16).
    - cosine schedule: Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17).
    - v-prediction: Salimans & Ho 2022, "Progressive Distillation" (section 4, appendix D).
  Conventions follow the diffusers `DDPMScheduler` / `DDIMScheduler` so the two can be cross-checked
  (`tests/test_scheduler.py` does): timesteps 0..T-1, "leading" spacing by default, the same method names
  (`add_noise`, `set_timesteps`, `step`, `get_velocity`, `previous_timestep`).
* Classifier-free guidance (Ho & Salimans 2022): `cfg_combine` at sampling time (the stages' losses drop their
  conditions with each sample's own draw, common.SampleRandom).
* Blocks: sinusoidal timestep embedding (Vaswani et al. 2017; as used in DDPM), multi-head self-attention on
  `F.scaled_dot_product_attention` (the A2L Temporal Unit and the L2I self-attention), and AdaLN modulation
  (Peebles & Xie 2023, DiT) used by the A2L units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")
SAMPLERS = ("ddim", "ddpm")


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_1..beta_T as a float64 tensor of shape (T,), index t = 0..T-1.

    linear:        Ho et al. 2020, section 4 (1e-4 .. 0.02 for T = 1000).
    scaled_linear: linear in sqrt(beta), the latent-diffusion / Stable Diffusion schedule (0.00085 .. 0.012).
    cosine:        Nichol & Dhariwal 2021, eq. 17, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008,
                   betas clipped at 0.999 ("squaredcos_cap_v2" in diffusers).
    """
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) so it broadcasts against `like` (B, ...)."""
    out = values.to(like.device)[t.to(like.device).long()]  # (B,)
    return out.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t_prev}
    pred_original_sample: torch.Tensor  # x0_pred

    def __iter__(self):  # allows `x_prev, x0_pred = scheduler.step(...)`
        return iter((self.prev_sample, self.pred_original_sample))


class NoiseScheduler:
    """DDPM forward process and DDPM / DDIM reverse steps over T discrete timesteps 0..T-1.

    Buffers are kept in float64 and results are cast back to the input dtype:
        betas            beta_t
        alphas           alpha_t = 1 - beta_t
        alphas_cumprod   \\bar{alpha}_t = prod_{s<=t} alpha_s
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction_type: str = "epsilon", clip_sample: bool = False,
                 clip_sample_range: float = 1.0, set_alpha_to_one: bool = True, timestep_spacing: str = "leading"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = timestep_spacing
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # DDIM's \bar{alpha} for the step past t = 0: 1 (set_alpha_to_one) or \bar{alpha}_0, as in diffusers.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # full chain until set_timesteps

    # ---- forward process ---------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Ho et al. eq. 4); t: (B,) ints."""
        abar = _gather(self.alphas_cumprod, t, x0)
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0  (Salimans & Ho 2022, section 4)."""
        abar = _gather(self.alphas_cumprod, t, x0)
        return (abar.sqrt() * noise - (1 - abar).sqrt() * x0).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses for this scheduler's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.get_velocity(x0, noise, t)

    def predict_x0_eps(self, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor):
        """(x0_pred, eps_pred) from the network output at step t (t: int or (B,) tensor).

        epsilon: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)            (Ho et al. eq. 15)
        sample:  eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        v:       x0 = sqrt(abar) x_t - sqrt(1 - abar) v,  eps = sqrt(abar) v + sqrt(1 - abar) x_t
        x0_pred is clipped to +-clip_sample_range when clip_sample is set (eps is left unclipped, as in diffusers).
        """
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        abar = _gather(self.alphas_cumprod, t, x_t)
        out, x = model_output.double(), x_t.double()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        else:
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
            eps = abar.sqrt() * out + (1 - abar).sqrt() * x
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def predict_x0(self, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x0_pred alone (e.g. for losses on the clean sample when the network predicts eps or v)."""
        return self.predict_x0_eps(model_output, t, x_t)[0].to(x_t.dtype)

    # ---- reverse process ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose the sampling timesteps (descending), as diffusers does (Lin et al. 2024, Table 2).

        leading:  [0, r, 2r, ...] reversed with r = T // n  -> ends at t = 0.
        trailing: round(T, T - T/n, ...) - 1                 -> starts at t = T - 1.
        """
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        if self.timestep_spacing == "leading":
            ts = np.arange(0, num_inference_steps)[::-1] * (T // num_inference_steps)
        else:
            ts = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts.copy()).long()
        return self.timesteps

    def previous_timestep(self, t: int) -> int:
        """The next timestep in `self.timesteps` after t, or -1 after the last one.

        diffusers' DDPMScheduler does exactly this. Its DDIMScheduler uses t - T // n instead, which is the
        same timestep for "leading" spacing and for "trailing" spacing when n divides T, and falls off the
        grid otherwise; we keep the grid.
        """
        idx = (self.timesteps == int(t)).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {t} is not in the sampling grid; call set_timesteps first")
        i = int(idx[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _alpha_bar(self, t: int, final: float) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else final

    def ddim_variance(self, t: int, t_prev: int) -> float:
        """sigma_t^2 / eta^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  (Song et al. eq. 16)."""
        abar_t = self._alpha_bar(t, self.final_alpha_cumprod)
        abar_prev = self._alpha_bar(t_prev, self.final_alpha_cumprod)
        return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)

    def ddpm_variance(self, t: int, t_prev: int) -> float:
        """Fixed-small posterior variance beta~_t = (1 - abar_prev) / (1 - abar_t) * beta_t (Ho et al. eq. 7),
        with beta_t = 1 - abar_t / abar_prev so respaced chains stay consistent; clamped at 1e-20."""
        abar_t, abar_prev = self._alpha_bar(t, 1.0), self._alpha_bar(t_prev, 1.0)
        return max((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), 1e-20)

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, sampler: str = "ddim",
             noise: torch.Tensor | None = None) -> StepOutput:
        """One reverse step x_t -> x_{t_prev}; returns (prev_sample, x0_pred).

        ddim: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
              sigma = eta * sqrt(ddim_variance)  (Song et al. eq. 12; eta = 0 is deterministic).
        ddpm: ancestral sampling from the posterior q(x_prev | x_t, x0_pred) (Ho et al. eqs. 6-7) with the
              fixed-small variance; no noise is added at the final step.
        `noise` overrides the Gaussian z (otherwise drawn with `generator`, shape of model_output).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        t = int(t)
        t_prev = self.previous_timestep(t)
        x0, eps = self.predict_x0_eps(model_output, t, x_t)
        x = x_t.double()

        def draw():
            z = noise if noise is not None else torch.randn(
                model_output.shape, generator=generator, dtype=model_output.dtype,
                device=generator.device if generator is not None else model_output.device)
            return z.to(x.device).double()

        if sampler == "ddim":
            abar_prev = self._alpha_bar(t_prev, self.final_alpha_cumprod)
            sigma = eta * self.ddim_variance(t, t_prev) ** 0.5
            x_prev = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
            if eta > 0:
                x_prev = x_prev + sigma * draw()
        else:
            abar_t, abar_prev = self._alpha_bar(t, 1.0), self._alpha_bar(t_prev, 1.0)
            alpha_t = abar_t / abar_prev  # alpha of the (respaced) step
            coef_x0 = abar_prev**0.5 * (1 - alpha_t) / (1 - abar_t)  # posterior_mean_coef1, eq. 7
            coef_xt = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)  # posterior_mean_coef2, eq. 7
            x_prev = coef_x0 * x0 + coef_xt * x
            if t > 0:
                x_prev = x_prev + self.ddpm_variance(t, t_prev) ** 0.5 * draw()
        return StepOutput(x_prev.to(x_t.dtype), x0.to(x_t.dtype))


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)
# ----------------------------------------------------------------------------------------------------------

def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Guided prediction uncond + s (cond - uncond); s = 1 gives the conditional prediction. rescale = phi > 0
    (guidance rescale, Lin et al. 2024, Sec. 3.4): the guided prediction scaled to the conditional one's standard
    deviation over each sample, mixed with the plain guided one as phi * rescaled + (1 - phi) * guided, so guidance
    sharpens the prediction without inflating it."""
    guided = uncond + scale * (cond - uncond)
    if rescale == 0:
        return guided
    dims = tuple(range(1, cond.ndim))  # every axis but the batch
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


# ----------------------------------------------------------------------------------------------------------
# Shared blocks
# ----------------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half)."""
    if t.dim() != 1:
        raise ValueError(f"timesteps must be (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a 2-layer MLP (as in DDPM's UNet and DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence (B, N, C) through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). context (B, M, C): extra tokens that x attends to besides itself (keys and
        values from the same projection, as ReferenceNet-style "reference attention" does); they are not updated."""
        if x.dim() != 3:
            raise ValueError(f"SelfAttention expects (B, N, C), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, N, C/h)
        if context is not None:  # keys and values only: the context tokens ask no queries
            M = context.shape[1]
            kv = F.linear(context, self.qkv.weight[C:], self.qkv.bias[C:])  # (B, M, 2C)
            kc, vc = kv.reshape(B, M, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, M, C/h) each
            k, v = torch.cat([k, kc], dim=2), torch.cat([v, vc], dim=2)  # (B, h, N+M, C/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class AdaLayerNorm(nn.Module):
    """Adaptive LayerNorm (DiT, Peebles & Xie 2023): LN(x) * (1 + scale(c)) + shift(c).

    The modulation is zero-initialised, so at initialisation the block is a plain affine-free LayerNorm.
    x: (B, N, dim), c: (B, cond_dim).
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or c.shape[0] != x.shape[0]:
            raise ValueError(f"AdaLayerNorm expects x (B, N, C) and c (B, D), got {tuple(x.shape)}, {tuple(c.shape)}")
        shift, scale = self.modulation(c).chunk(2, dim=-1)  # (B, dim) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]
