"""KL-regularised image autoencoder: the frozen encoder [L2I: E] and decoder [L2I: D] of DreamHead's L2I stage.

The L2I stage is a latent diffusion model: every condition image (masked frame, reference frame, two landmark
renderings) goes through one frozen encoder E, the denoiser works on latents, and a frozen decoder D turns the
denoised latent back into a frame (docs/paper.md).

The paper does not say which autoencoder it used; most likely the pretrained Stable Diffusion VAE
(`AutoencoderKL`, f = 8, 4 latent channels, scale 0.18215). That network cannot be downloaded here, so we
train our own autoencoder of the same family from scratch (our choice, not the paper's):

- architecture after the latent-diffusion first stage (Rombach et al. 2022, "High-Resolution Image Synthesis
  with Latent Diffusion Models", Sec. 3.1 and App. G; Esser et al. 2021, "Taming Transformers"): ResBlocks
  with GroupNorm + SiLU, strided-conv (or average-pool) downsampling, nearest-neighbour upsampling + conv,
  self-attention at the lowest resolution, a diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)));
- loss = L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (LDM's "KL-reg"), optionally plus a
  PatchGAN discriminator with hinge loss (Isola et al. 2017) and LDM's adaptive weight.
  LDM also uses an LPIPS perceptual loss; LPIPS needs a pretrained VGG/AlexNet that cannot be downloaded
  here, so it is left out. A cheap stand-in is available behind `edge_weight`: an L1 loss on Sobel image
  gradients (our guess; it sharpens edges such as lips and teeth a little, it is not a perceptual metric);
- latents are multiplied by `scale_factor` = 1 / std(latents) before diffusion (LDM's `scale_by_std`);
  SD's 0.18215 is this number for the SD VAE.

Presets: "tiny" (64 px, f = 4, latents 4x16x16, CPU minutes) and "paper" (256 px, f = 8, latents 4x32x32,
SD-VAE widths, GPU). Also here: the VAE's training data (`FrameDataset` with its augmentations).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import cv2
import numpy as np
import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F

import landmarks
from cli import UsageError
from common import Config, SampleRandom, TrainConfig, option, to_tensor_image, train_settings
from diffusion import SelfAttention


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------

@dataclass
class VAEConfig(Config):
    """Autoencoder shape, loss weights, data augmentation and training settings (defaults: a small f = 4 model)."""

    # architecture
    resolution: int = option(64, "Training image size H = W in pixels; the networks are fully convolutional.")
    in_channels: int = option(3, "Colour channels of the images.")
    latent_channels: int = option(4, "Channels of the latent z.")
    base_channels: int = option(64, "Width of the first level; level k has base_channels x channel_mult[k].")
    channel_mult: tuple = option((1, 2, 2), "Width multipliers per level, given as 1,2,2; len - 1 "
                                 "downsamplings give the factor 2^(len - 1).")
    num_res_blocks: int = option(1, "ResBlocks per level in the encoder (the decoder uses one more, as LDM).")
    attention: bool = option(True, "The middle block at the lowest resolution has self-attention.")
    attention_heads: int = option(1, "Heads of that self-attention.")
    norm_groups: int = option(32, "Groups of every GroupNorm.")
    dropout: float = option(0.0, "Dropout inside the ResBlocks.")
    downsample: str = option("conv", "Downsampling: conv (stride-2 3x3 conv, as LDM) or avgpool.")
    # loss
    kl_weight: float = option(1e-6, "Weight of the KL term on LDM's scale (KL summed over latent dims against "
                              "L1 summed over pixels).")
    edge_weight: float = option(0.0, "Weight of an L1 loss on Sobel gradients, a cheap stand-in for LPIPS (our "
                                "guess).")
    mouth_weight: float = option(1.0, "L1 weight 1 + (w - 1) p(x, y), p being how often pixel (x, y) lies in the "
                                 "mouth box of the training crops (our guess; 1 is plain L1, 4 measured worse).")
    adversarial: bool = option(False, "Adds LDM's PatchGAN discriminator with hinge loss and adaptive weight.")
    disc_weight: float = option(0.5, "Weight of the adversarial term (times LDM's adaptive weight).")
    disc_start: int = option(50001, "Step at which the adversarial loss switches on.")
    disc_channels: int = option(64, "Width of the discriminator's first layer.")
    disc_layers: int = option(3, "Strided layers of the discriminator.")
    disc_mouth_weight: float = option(1.0, "Both players average the discriminator's patch logits with weights "
                                      "1 + (w - 1) p, p as for mouth_weight (our guess; 10 did not beat 1).")
    finetune_decoder: bool = option(False, "Trains only post_quant_conv and the decoder from `train.py --init`, so "
                                    "the encoder, the latents and every L2I trained on them stay valid (as "
                                    "Stability AI's sd-vae-ft-mse fine-tuned only SD's decoder).")
    # data augmentation
    hflip: bool = option(True, "Frames are flipped left-right at random.")
    colour_jitter: float = option(0.0, "Probability of a random RGB permutation and per-channel gain (our guess: "
                                  "held-out faces bring colours unseen in training).")
    extra_identities: int = option(0, "Extra random synthetic identities rendered for the VAE only (our guess: "
                                   "16 faces get memorised, new faces need many faces).")
    extra_portraits: str = option("base", "Base photos of the extra identities: base (astronaut, Grace Hopper) or all "
                                  "(and the five real photos of assets/portraits/; our guess: real faces come "
                                  "closer to users' photos than two recoloured ones).")
    crop_scale: float = option(1.0, "Random resized crops with a side in [crop_scale, 1] of the frame, from frames "
                               "stored at twice the resolution; 1 turns them off (our guess).")
    natural_mix: float = option(0.0, "Fraction of each batch replaced by random crops of the photos shipped with "
                                "scikit-image (our guess: SD's VAE generalises because it saw generic images).")
    natural_dir: str = option("", "A folder of your own photographs (jpg, png, webp, searched recursively) whose "
                              "random crops join scikit-image's in the natural mix (our guess: generic photos teach "
                              "generic compression, e.g. Debian's plasma-workspace-wallpapers).")
    face_iod: float = option(0.0, "Framing: 0 keeps the frames as rendered (eyes 0.263 of the side apart), a value "
                             "> 0 cuts face crops with the eyes that fraction apart (landmarks.face_crop_box).")
    train: TrainConfig = train_settings()

    PRESETS = {
        # 64 px -> 4x16x16, 0.95 M params, ~0.5 s/step at batch 8 on one core (83 min for 9000 steps); held-out
        # numbers in docs/experiments.md ("VAE").
        "tiny": dict(resolution=64, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                     kl_weight=1e-6, edge_weight=0.0, disc_channels=32, disc_layers=2, disc_start=2001,
                     colour_jitter=0.5, natural_mix=0.2, extra_identities=400,
                     train=dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup=450, steps=9000, batch_size=8,
                                ema_decay=0.999, grad_clip=1.0)),
        # 256 px -> 4x32x32 with SD-VAE widths (SD: 2 res blocks per level, kl 1e-6, disc from 50k steps).
        "paper": dict(resolution=256, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      norm_groups=32, kl_weight=1e-6, edge_weight=0.0, adversarial=True, disc_weight=0.5,
                      disc_start=50001, disc_channels=64, disc_layers=3,
                      train=dict(lr=4.5e-6 * 8, betas=(0.5, 0.9), weight_decay=0.0, warmup=500, steps=200_000,
                                 batch_size=8, ema_decay=0.999, grad_clip=1.0)),
    }

    def __post_init__(self):
        super().__post_init__()
        if len(self.channel_mult) < 1:
            raise ValueError("channel_mult needs at least one level")
        if self.downsample not in ("conv", "avgpool"):
            raise ValueError(f"downsample must be 'conv' or 'avgpool', got {self.downsample!r}")
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width {widths} must be divisible by norm_groups={self.norm_groups}")
        if self.resolution % self.downsampling_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the factor "
                             f"{self.downsampling_factor}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsampling_factor

    @property
    def latent_shape(self) -> tuple:
        return (self.latent_channels, self.latent_resolution, self.latent_resolution)


# --------------------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------------------

class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder output `parameters` (B, 2C, h, w)."""

    def __init__(self, parameters: torch.Tensor):
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"parameters must be (B, 2C, ...), got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)            # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; the noise (B, C, h, w) is drawn here unless given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def _sum_dims(self):
        return tuple(range(1, self.mean.ndim))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample (B,), summed over latent dims: 0.5 * sum(mu^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=self._sum_dims())


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, with a 1x1 skip when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Residual self-attention over the h*w positions of a feature map: GroupNorm, then the shared
    `dreamhead.SelfAttention` (SDPA) on the flattened tokens."""

    def __init__(self, channels: int, groups: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)               # (B, h*w, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)    # (B, C, h, w)
        return x + out


class Downsample(nn.Module):
    """Halve h, w: stride-2 3x3 conv with LDM's asymmetric (0, 1, 0, 1) padding, or 2x2 average pooling."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if mode == "conv" else None

    def forward(self, x):
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h, w: nearest-neighbour interpolation then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(ch: int, cfg: VAEConfig) -> nn.Sequential:
    layers = [ResBlock(ch, ch, cfg.norm_groups, cfg.dropout)]
    if cfg.attention:
        layers.append(SpatialSelfAttention(ch, cfg.norm_groups, cfg.attention_heads))
    layers.append(ResBlock(ch, ch, cfg.norm_groups, cfg.dropout))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """x (B, 3, H, W) -> Gaussian parameters (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        blocks, ch = [], cfg.base_channels
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, cfg.norm_groups, cfg.dropout))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch, cfg.downsample))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(ch, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))                       # (B, C_low, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))                 # (B, 2 * z_ch, H/f, W/f)


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x_rec (B, 3, h*f, w*f) (unbounded; the data lives in [-1, 1])."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, cfg)
        blocks = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level], cfg.norm_groups, cfg.dropout))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))                         # (B, C_base, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))                 # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """E and D with the 1x1 "quant" convs of LDM, a Gaussian posterior and LDM's latent `scale_factor`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    # ---- shape checks ------------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor):
        f = self.config.downsampling_factor
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError("images must be a float tensor in [-1, 1] (use FrameDataset for uint8 frames)")
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W) with H, W divisible by {f}, "
                             f"got {tuple(x.shape)}")

    def _check_latent(self, z: torch.Tensor):
        if not torch.is_tensor(z) or z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, h, w), got {shape}")

    # ---- E and D -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> q(z|x) over (B, latent_channels, H/f, W/f)."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))     # (B, 2 * z_ch, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) (unscaled) -> x_rec (B, 3, h*f, w*f)."""
        self._check_latent(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator=None, noise=None):
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ---- latent interface used by L2I --------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion latents: posterior mode times scale_factor, (B, latent_channels, H/f, W/f)."""
        return self.encode(x).mode() * self.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode_latents: decode(z / scale_factor)."""
        self._check_latent(z)
        return self.decode(z / self.scale_factor)

    @torch.no_grad()
    def measure_scale_factor(self, x_batches_or_latents) -> float:
        """Set scale_factor = 1 / std of the (unscaled) latents, LDM's `scale_by_std`; returns it.

        Accepts one tensor or an iterable of tensors; each is either images (B, in_channels, H, W),
        encoded here with the posterior mode, or already-encoded unscaled latents (B, latent_channels, h, w).
        """
        batches = [x_batches_or_latents] if torch.is_tensor(x_batches_or_latents) else x_batches_or_latents
        latents = [self._as_latents(batch) for batch in batches]
        if not latents:
            raise ValueError("measure_scale_factor needs at least one batch")
        std = torch.cat([z.flatten() for z in latents]).std()
        if not torch.isfinite(std) or std <= 0:
            raise ValueError(f"latent std is {float(std)}; cannot set a scale factor")
        self.scale_factor.fill_(1.0 / float(std))
        return float(self.scale_factor)

    def _as_latents(self, batch: torch.Tensor) -> torch.Tensor:
        """Latents pass through; images (in_channels, or full resolution when the channel counts agree)
        are encoded with the posterior mode."""
        cfg = self.config
        is_latent = batch.ndim == 4 and batch.shape[1] == cfg.latent_channels and (
            cfg.in_channels != cfg.latent_channels or batch.shape[-1] != cfg.resolution)
        if is_latent:
            return batch.to(self.scale_factor.device)
        return self.encode(batch.to(self.scale_factor.device)).mode()



# --------------------------------------------------------------------------------------------------------
# Discriminator and losses
# --------------------------------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; LDM's NLayerDiscriminator): one real/fake logit per image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)                                             # (B, 1, h', w') logits


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses per channel: (B, C, H, W) -> (B, 2C, H, W)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)                   # (2, 1, 3, 3)
    c = x.shape[1]
    weight = kernels.repeat(c, 1, 1, 1)                                # (2C, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c) / 8.0


def _adaptive_disc_weight(rec_loss, g_loss, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """LDM's balance: ||d rec / d w_last|| / ||d g / d w_last||, clamped, times disc_weight."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(rec_grad) / (torch.norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


def weighted_mean(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of v (B, C, h, w) weighted by weight (1, 1, H, W), area-resized to (h, w); the plain mean if None."""
    if weight is None:
        return v.mean()
    w = F.interpolate(weight, size=v.shape[-2:], mode="area")  # (1, 1, h, w)
    return (v * w).mean() / w.mean()


def vae_loss(model: AutoencoderKL, x: torch.Tensor, disc: PatchDiscriminator | None = None, step: int = 0,
             return_rec: bool = False, pixel_weight: torch.Tensor | None = None,
             disc_weight_map: torch.Tensor | None = None, rng: SampleRandom | None = None):
    """Autoencoder objective for one batch x (B, 3, H, W) in [-1, 1]; returns (loss, logs).

    loss = mean w |x - x_rec| / mean w + edge_weight * mean |sobel(x) - sobel(x_rec)|
           + kl_weight * mean_b KL_b / (3 H W)            (KL_b summed over latent dims)
           + d_weight * (-mean_v D(x_rec))                (only with cfg.adversarial, disc, step >= disc_start)
    Dividing the KL by the number of pixel values keeps LDM's meaning of kl_weight (LDM sums the L1 over
    pixels and the KL over latent dims). d_weight is LDM's adaptive weight times disc_weight. The
    generator term also writes gradients into `disc`: zero them before the discriminator's own step.
    w is pixel_weight (1, 1, H, W) (mouth_weight_map), or 1; mean_v weights D's patch logits by disc_weight_map
    (1, 1, H, W) (weighted_mean). logs holds floats. With return_rec=True the
    result is (loss, logs, x_rec.detach()), so the discriminator step can reuse the reconstruction instead of
    running the autoencoder again. rng: the batch's per-sample random draws (common.SampleRandom; fresh ones by
    default) for the posterior sample.
    """
    cfg = model.config
    rng = rng or SampleRandom.fresh(len(x))
    f = cfg.downsampling_factor
    noise = rng.randn(cfg.latent_channels, x.shape[-2] // f, x.shape[-1] // f)  # (B, C, h, w)
    x_rec, posterior = model(x, sample_posterior=True, noise=noise)
    rec = (x - x_rec).abs()  # (B, 3, H, W)
    rec = weighted_mean(rec, pixel_weight)
    edge = (sobel_edges(x) - sobel_edges(x_rec)).abs().mean() if cfg.edge_weight > 0 else x.new_zeros(())
    rec_total = rec + cfg.edge_weight * edge
    kl = posterior.kl().mean()
    loss = rec_total + cfg.kl_weight * kl / x[0].numel()
    logs = {"rec": rec.item(), "edge": edge.item(), "kl": kl.item()}
    if cfg.adversarial and disc is not None and step >= cfg.disc_start:
        g_loss = -weighted_mean(disc(x_rec), disc_weight_map)
        if torch.is_grad_enabled() and rec_total.requires_grad:
            d_weight = _adaptive_disc_weight(rec_total, g_loss, model.decoder.conv_out.weight, cfg.disc_weight)
        else:
            d_weight = torch.tensor(cfg.disc_weight)
        loss = loss + d_weight * g_loss
        logs.update(g_loss=g_loss.item(), d_weight=float(d_weight))
    logs["loss"] = loss.item()
    return (loss, logs, x_rec.detach()) if return_rec else (loss, logs)


def mouth_weight_map(P_px: np.ndarray, size: int, mouth_weight: float) -> torch.Tensor:
    """(1, 1, size, size) L1 weights 1 + (mouth_weight - 1) * p, where p is the fraction of the faces P_px
    (N, 478, 2|3), in pixels of size x size crops, whose mouth box covers each pixel (see VAEConfig.mouth_weight)."""
    p = np.mean([landmarks.mouth_mask(P, (size, size)) for P in P_px], axis=0)  # (size, size)
    return 1.0 + (mouth_weight - 1.0) * torch.from_numpy(p.astype(np.float32))[None, None]


def discriminator_loss(model: AutoencoderKL, disc: PatchDiscriminator, x: torch.Tensor,
                       x_rec: torch.Tensor | None = None, step: int = 0, weight_map: torch.Tensor | None = None):
    """Hinge loss for the discriminator's own step: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), the
    means over patches weighted by weight_map (1, 1, H, W) when given (VAEConfig.disc_mouth_weight).

    x_rec is taken as given (detached) or, when None, computed here without gradients. Before
    cfg.disc_start the loss is multiplied by 0 (LDM's disc_factor), so the step is a no-op.
    Returns (loss, logs).
    """
    if x_rec is None:
        with torch.no_grad():
            x_rec, _ = model(x, sample_posterior=True)
    logits_real = disc(x)
    logits_fake = disc(x_rec.detach())
    hinge = 0.5 * (weighted_mean(F.relu(1.0 - logits_real), weight_map)
                   + weighted_mean(F.relu(1.0 + logits_fake), weight_map))
    factor = 1.0 if step >= model.config.disc_start else 0.0
    loss = factor * hinge
    logs = {"d_loss": hinge.item(), "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item()}
    return loss, logs


# --------------------------------------------------------------------------------------------------------
# Data and metric
# --------------------------------------------------------------------------------------------------------

class FrameDataset(torch.utils.data.Dataset):
    """Training frames for the autoencoder: uint8 arrays (N_k, H, W, 3) (memory-mapped caches, or several
    arrays read as one, e.g. the clips' frames and extra identities' stills), items augmented per sample.

    Item (index, seed) -> {"x": (3, size, size) in [-1, 1], "seed"}: with probability natural_mix a photo crop
    instead of the frame; else a random square crop of side in [crop_scale, 1] x H (the whole frame at 1)
    resized to size; a horizontal flip with probability 1/2 (hflip); colour jitter with probability
    colour_jitter. Every draw comes from the item's seed (common.step_items), and the seed travels on to the
    loss, which draws the rest of the sample's randomness from it."""

    def __init__(self, frames, hflip: bool = False, colour_jitter: float = 0.0,
                 natural_mix: float = 0.0, seed: int = 0, crop_scale: float = 1.0, size: int | None = None,
                 natural_dir: str = ""):
        self.sources = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        for f in self.sources:
            if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or f.shape[1:] != self.sources[0].shape[1:]:
                raise ValueError(f"frames must be uint8 arrays (N, H, W, 3) of one size, got {f.dtype} {f.shape}")
        self.offsets = np.cumsum([0] + [len(f) for f in self.sources])  # item k lives in source searchsorted(k)
        if self.offsets[-1] == 0:
            raise ValueError("frames must not be empty")
        self.hflip = hflip
        self.colour_jitter = colour_jitter
        self.natural_mix = natural_mix
        self.size = size or self.sources[0].shape[1]  # output side; frames may be stored larger for crop_scale < 1
        self.crop_scale = crop_scale
        self.natural = natural_crops(self.size, 4096, seed, natural_dir) if natural_mix > 0 else None

    def __len__(self):
        return int(self.offsets[-1])

    def frame(self, index: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return np.asarray(self.sources[k][index - self.offsets[k]])  # (H, W, 3)

    def __getitem__(self, item) -> dict:
        index, seed = item
        gen = torch.Generator().manual_seed(seed)
        if self.natural is not None and float(torch.rand((), generator=gen)) < self.natural_mix:
            x = to_tensor_image(self.natural[int(torch.randint(len(self.natural), (), generator=gen))])
        else:
            x = self.random_crops(to_tensor_image(self.frame(index))[None], gen)[0]  # (3, size, size)
        if self.hflip and float(torch.rand((), generator=gen)) < 0.5:
            x = x.flip(-1)
        if self.colour_jitter > 0:
            x = jitter_colours(x[None], self.colour_jitter, gen)[0]
        return {"x": x, "seed": seed}

    def random_crops(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, size, size): random square crops of side in [crop_scale, 1] x H at random
        places (the whole frame when crop_scale = 1), resized with antialiasing like the area-resized frames."""
        B, _, H, _ = x.shape
        if self.crop_scale >= 1:
            return x if H == self.size else F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
        sides = (H * (self.crop_scale + (1 - self.crop_scale) * torch.rand(B, generator=generator))).long()
        out = []
        for img, side in zip(x, sides.tolist()):  # B crops of different sizes: one interpolate each
            y0, x0 = (int(torch.randint(H - side + 1, (), generator=generator)) for _ in range(2))
            crop = img[None, :, y0:y0 + side, x0:x0 + side]  # (1, 3, side, side)
            out.append(F.interpolate(crop, size=self.size, mode="bilinear", antialias=True))
        return torch.cat(out)  # (B, 3, size, size)

    def random_batch(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch (B, 3, size, size) of items drawn with replacement, for loops without a DataLoader."""
        index = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
        return torch.stack([self[item]["x"] for item in zip(index, seeds)])


NATURAL_IMAGES = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "brick", "camera", "coins", "grass", "gravel", "moon", "clock", "horse", "page", "text", "cat", "logo")


def natural_crops(size: int, count: int, seed: int = 0, folder: str = "") -> np.ndarray:
    """count random square crops (count, size, size, 3) uint8 of the photos that ship inside scikit-image
    (no download) and of those in `folder` (if given), at random scales; grayscale photos get a random tint so
    every colour is covered."""
    rng = np.random.default_rng(seed)
    photos = [(img, False) for img in folder_photos(folder)] if folder else []  # (RGB image, whether grayscale)
    for name in NATURAL_IMAGES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        photos.append((np.repeat(img[..., None], 3, -1), True) if img.ndim == 2 else (img[..., :3], False))
    out = np.empty((count, size, size, 3), np.uint8)
    for k in range(count):
        img, gray = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(size, h, w) // 2, min(h, w) + 1))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = cv2.resize(img[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
        tint = rng.uniform(0.3, 1.0, 3) if gray else np.ones(3)
        out[k] = np.clip(crop * tint, 0, 255).astype(np.uint8)
    return out


def folder_photos(folder: str) -> list[np.ndarray]:
    """The photographs (jpg, jpeg, png, webp) under `folder`, RGB uint8, in sorted path order; UsageError when there
    are none."""
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
    photos = [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]
    photos = [img[..., ::-1] for img in photos if img is not None and min(img.shape[:2]) >= 64]
    if not photos:
        raise UsageError(f"{folder} holds no readable photo of at least 64 px (jpg, png, webp); give a folder of "
                         "photographs to --natural-dir, or leave it empty")
    return photos


def jitter_colours(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per image (B, 3, H, W) in [-1, 1]: permute the RGB channels and scale each by a gain
    in [0.8, 1.2] (in [0, 1] intensity), so the autoencoder sees colours beyond the training identities'."""
    B = x.shape[0]
    pick = torch.rand(B, generator=generator) < p
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(B)])  # (B, 3)
    gain = 0.8 + 0.4 * torch.rand(B, 3, 1, 1, generator=generator)  # (B, 3, 1, 1)
    jittered = ((torch.gather(x, 1, perm[:, :, None, None].expand_as(x)) + 1) * gain - 1).clamp(-1, 1)
    return torch.where(pick[:, None, None, None], jittered, x)
