"""DreamHead core: the diffusion maths both stages share, the shared network blocks, and run utilities.

DreamHead (Hong et al., 2024, arXiv 2409.10281) is a *hierarchical* diffusion cascade: an audio-to-landmark
(A2L) diffusion model (`a2l.py`) followed by a landmark-to-image (L2I) latent diffusion model (`l2i.py`).
This file holds what both hierarchies have in common, written by hand in plain PyTorch:

* `NoiseScheduler`: the forward process q(x_t | x_0) and the DDPM / DDIM reverse steps.
    - DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (eqs. 4, 6, 7, 15).
    - DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (eqs. 12, 16).
    - cosine schedule: Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17).
    - v-prediction: Salimans & Ho 2022, "Progressive Distillation" (section 4, appendix D).
  Conventions follow the diffusers `DDPMScheduler` / `DDIMScheduler` so the two can be cross-checked
  (`tests/test_scheduler.py` does): timesteps 0..T-1, "leading" spacing by default, the same method names
  (`add_noise`, `set_timesteps`, `step`, `get_velocity`, `previous_timestep`).
* Classifier-free guidance (Ho & Salimans 2022): `drop_condition_mask` at training time, `cfg_combine` at
  sampling time.
* Blocks: sinusoidal timestep embedding (Vaswani et al. 2017; as used in DDPM), multi-head self-attention on
  `F.scaled_dot_product_attention`, and AdaLN modulation (Peebles & Xie 2023, DiT) used by the A2L units.
* Run utilities shared by `train.py` and `sample.py`: the user-error type, atomic checkpoint writes,
  checkpoint loading with clear errors, EMA, the learning-rate schedule and device choice.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(Exception):
    """Bad user input: the CLI prints the message as one line and exits with code 2 (see `run_cli`)."""


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

def drop_condition_mask(batch: int, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool, True where the condition is dropped (replaced by the null condition) during training."""
    if p <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.rand(batch, generator=generator, device=device) < p


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided prediction uncond + s (cond - uncond); s = 1 gives the conditional prediction."""
    return uncond + scale * (cond - uncond)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"SelfAttention expects (B, N, C), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, N, C/h)
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


# ----------------------------------------------------------------------------------------------------------
# Run utilities (train.py, sample.py)
# ----------------------------------------------------------------------------------------------------------

def run_cli(main) -> None:
    """Run a CLI entry point; a UsageError becomes one line on stderr and exit code 2 (no traceback), Ctrl-C
    outside a training loop (which saves a checkpoint itself) one line and exit code 130."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def temp_beside(path: str, suffix: str = ".tmp") -> str:
    """Create an empty temporary file in path's folder (made if missing) and return its name; UsageError when
    the folder cannot be written, so a bad output path fails before any work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=suffix)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}; choose a writable output path") from None
    os.close(fd)
    return tmp


def check_writable(path: str) -> None:
    """UsageError now (not after minutes of work) when `path` cannot be written."""
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a folder; give a file name")
    os.remove(temp_beside(path))


def atomic_write(path: str, write_fn) -> None:
    """Call write_fn(tmp_path) on a temporary file beside `path`, then rename it into place.

    A crash or Ctrl-C leaves either the old file or the new one, never a truncated file.
    """
    tmp = temp_beside(path)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(path: str, image: np.ndarray) -> None:
    """Write an RGB uint8 image (H, W, 3) as a PNG, atomically."""
    import cv2
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))  # RGB -> BGR for OpenCV
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(png.tobytes()))


def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write the one-dict checkpoint {stage, config, model, ema, optimizer, step, ...} atomically."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str, stage: str | None = None) -> dict:
    """Load a checkpoint with `weights_only=True` (no code execution); bad files raise UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found; train one with `python train.py --stage {stage or '...'}` "
                         "or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / corrupt / foreign files
        raise UsageError(f"checkpoint {path} is corrupt or not a DreamHead checkpoint "
                         f"({type(err).__name__}); re-download or retrain it") from None
    if not isinstance(ckpt, dict) or not {"stage", "config", "model"} <= set(ckpt):
        raise UsageError(f"{path} is not a DreamHead checkpoint (missing stage/config/model)")
    if stage is not None and ckpt["stage"] != stage:
        raise UsageError(f"{path} is a {ckpt['stage']!r} checkpoint, but a {stage!r} checkpoint is needed here")
    return ckpt


def load_model(path: str, stage: str, device="cpu", weights: str = "ema") -> torch.nn.Module:
    """Rebuild a stage's model from its one-dict checkpoint (config + weights), in eval mode on `device`.

    weights: "ema" (the default for sampling, as every diffusion reference does) or "model" (raw weights).
    """
    ckpt = load_checkpoint(path, stage)
    if stage == "vae":
        from vae import AutoencoderKL as Model, VAEConfig as Config
    elif stage == "a2l":
        from a2l import A2L as Model, A2LConfig as Config
    else:
        from l2i import L2I as Model, L2IConfig as Config
    try:
        model = Model(Config(**ckpt["config"]))
        model.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"{path} does not match this code's {stage} model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}); retrain it or update the code") from None
    return model.to(device).eval()


class EMA:
    """Exponential moving average of a model's parameters (shadow = d * shadow + (1 - d) * param).

    The decay warms up as d_n = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    ExponentialMovingAverage with num_updates), so early averages do not keep the random initialisation.
    Buffers (statistics such as a measured scale factor or a residual std) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float, num_updates: int = 0):
        self.decay = decay
        self.num_updates = num_updates
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n))
        for k, v in model.named_parameters():
            self.shadow[k].lerp_(v.detach(), 1.0 - decay)
        self.copy_buffers(model)
        self.num_updates += 1

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for k, v in model.named_buffers():
            if k in self.shadow:  # persistent buffers only
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; an unavailable CUDA request is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------
# The cascade (paper Fig. 1 and Sec. 3.3 "inference"): audio -> A2L landmarks -> L2I frames
# ----------------------------------------------------------------------------------------------------------

class DreamHead:
    """The two hierarchies joined: A2L (a2l.A2L) turns speech into canonical landmarks with the subject's mean
    mesh as P̄; L2I (l2i.L2I, decoding through the frozen VAE) renders each frame from its landmark image, a
    reference frame with its landmark image and the frame with the mouth blacked out.

    Face crops here are square, `size` px, framed like the training frames (landmarks.face_crop_box); putting
    the result back into the full frame is sample.py's job. Nothing here keeps per-frame state beyond a batch,
    so memory does not grow with the audio's length except for the (T, 478, 3) landmarks."""

    def __init__(self, a2l, vae, l2i):
        self.a2l, self.vae, self.l2i = a2l, vae, l2i
        size, s = l2i.cfg.image_size, l2i.cfg.latent_size
        if vae.cfg.resolution != size or tuple(vae.cfg.latent_shape) != (l2i.cfg.latent_channels, s, s):
            raise UsageError(f"the VAE ({vae.cfg.resolution} px -> {tuple(vae.cfg.latent_shape)}) does not match "
                             f"the L2I model ({size} px -> {l2i.cfg.latent_channels}x{s}x{s}); give the VAE the "
                             "L2I model was trained with")
        if vae.cfg.face_iod != l2i.cfg.face_iod:
            raise UsageError(f"the VAE was trained on faces framed with face_iod {vae.cfg.face_iod:g}, the L2I model "
                             f"with {l2i.cfg.face_iod:g}; give the VAE the L2I model was trained with")

    @classmethod
    def load(cls, a2l_path: str, vae_path: str, l2i_path: str, device="cpu") -> "DreamHead":
        return cls(load_model(a2l_path, "a2l", device), load_model(vae_path, "vae", device),
                   load_model(l2i_path, "l2i", device))

    @property
    def size(self) -> int:
        return self.l2i.cfg.image_size

    @property
    def face_iod(self) -> float:
        """Eye distance / side of the face crops the L2I model was trained on (landmarks.face_crop_box)."""
        import landmarks
        return self.l2i.cfg.face_iod or landmarks.FACE_IOD_FRACTION

    @property
    def device(self) -> torch.device:
        return self.l2i.null_lmk.device

    @torch.no_grad()
    def audio_to_landmarks(self, wave: np.ndarray, p_bar: np.ndarray, steps=None, guidance=None, seed: int = 0,
                           progress: bool = False) -> np.ndarray:
        """A2L over a whole 16 kHz utterance: canonical landmarks (T, 478, 3), T = ceil(seconds x 25)."""
        from a2l import mel_context
        cfg = self.a2l.config
        mel_ctx = mel_context(wave, context_frames=cfg.context_frames, n_mels=cfg.n_mels)  # (T, C, 80)
        gen = torch.Generator(self.device).manual_seed(seed)
        return self.a2l.generate(mel_ctx, torch.as_tensor(p_bar, dtype=torch.float32), steps=steps,
                                 guidance=guidance, generator=gen, progress=progress).numpy()

    @torch.no_grad()
    def render(self, crops: np.ndarray, source: np.ndarray, boxes: np.ndarray, P_canon: np.ndarray, ref_crop: np.ndarray,
               ref_P_canon: np.ndarray, steps=None, guidance=None, seed: int = 0, batch: int = 16):
        """L2I for T frames, batch by batch; yields uint8 (b, size, size, 3) generated crops in order.

        crops: uint8 (N, size, size, 3) source crops and source (T,) int: the crop each frame starts from (a still
        photo: N = 1 and all zeros), so a looped video is never copied out to T frames;
        boxes: (T, 4) mouth boxes (x0, y0, x1, y1) in crop pixels, blacked out to make I_mask;
        P_canon: (T, 478, 3) canonical landmarks to render (A2L output, or given); ref_crop (size, size, 3) and
        ref_P_canon (478, 3): the reference pair, encoded once for the whole video.
        The same seed gives the same frames whatever the batch size (one starting noise for every frame)."""
        import landmarks
        from l2i import encode_conditions, landmark_image, to_tensor_image, to_uint8_image
        size, T = self.size, len(P_canon)
        if crops.shape[1:] != (size, size, 3) or len(source) != T or len(boxes) != T:
            raise ValueError(f"need crops (N, {size}, {size}, 3), source ({T},) and boxes ({T}, 4), got "
                             f"{crops.shape}, {np.shape(source)}, {np.shape(boxes)}")
        reference = encode_conditions(self.vae, {  # (1, C, h, w) each, computed once
            "ref": to_tensor_image(ref_crop[None]), "ref_lmk": to_tensor_image(landmark_image(ref_P_canon, size)[None])})
        gen = torch.Generator(self.device).manual_seed(seed)
        cfg = self.l2i.cfg
        z_T = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=gen,
                          device=self.device)
        for start in range(0, T, batch):
            idx = np.arange(start, min(start + batch, T))
            targets = crops[source[idx]]  # (b, size, size, 3)
            masked = np.stack([landmarks.apply_mouth_mask(f, boxes[i]) for f, i in zip(targets, idx)])
            lmk = landmarks.draw_landmark_images(landmarks.canonical_to_canvas(P_canon[idx], size), size)
            cond = {**reference, **encode_conditions(self.vae, {"mask": to_tensor_image(masked),
                                                                 "lmk": to_tensor_image(lmk)})}
            z0 = self.l2i.sample(cond, steps=steps, guidance=guidance, generator=gen, z_T=z_T)  # (b, C, h, w)
            yield to_uint8_image(self.vae.decode_latents(z0))  # (b, size, size, 3)
