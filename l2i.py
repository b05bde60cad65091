"""Landmark-to-image (L2I) latent diffusion: the second hierarchy of DreamHead (the framework figure's right half).

Frame i is rendered from its dense (canonical) landmarks with a latent diffusion model whose denoiser
[L2I: eps_theta] sees the noisy latent [L2I: z_t] together with four condition images, all encoded by the
frozen VAE encoder [L2I: E] (the "spatial-temporal correspondence" condition, [L2I: Correspondence]):

    I_mask   frame i with the mouth box blacked out          -> E(I_mask)     [L2I: I_mask]
    I_ref    the reference frame i - tau                      -> E(I_ref)      [L2I: I_ref / I^P_ref]
    I^P_ref  the canonical landmark image of frame i - tau    -> E(I^P_ref)
    I^P_i    the canonical landmark image of frame i          -> E(I^P_i)      [L2I: I^P_i]

The objective is noise prediction ||eps - eps_theta(z_t, t, c)||^2 (inferred from the eps_theta label). How the
four latents enter eps_theta is not known; summaries of the paper say "self-attention based conditioning". Our
two readings, switched by `L2IConfig.conditioning` (guess; docs/paper.md):

- "joint_attn" (default): every latent is a *slot* of one UNet. slot0 = concat_c(z_t, E(I_mask)); slots 1..3 =
  E(I_ref), E(I^P_ref), E(I^P_i), zero-padded to the same channel count, plus a learned slot embedding.
  Convolutions run per slot (slots folded into the batch); every self-attention layer sees the tokens of all
  slots of a sample at once, so the (not pixel-aligned) canonical landmarks and the photos meet through attention.
  Only slot0's output is the eps prediction.
- "ref_attn" (reference attention, as ReferenceNet-style renderers do): a condition encoder turns E(I_ref),
  E(I^P_ref), E(I^P_i) into feature maps whose tokens join the keys and values of every self-attention layer of a
  denoiser that runs on concat_c(z_t, E(I_mask)) alone. The landmarks still meet the frame only in self-attention.
- "channel" (ablation, DiffTalk-like): one input concat_c(z_t, E(I_mask), E(I_ref), E(I^P_ref), E(I^P_i)).

`use_reference=False` drops the reference pair (ablation "without the reference pair"). Classifier-free guidance
on the landmark conditions (guess): in training I^P_i and I^P_ref are replaced by a learned null latent with
probability `cfg_dropout`; sampling mixes the two predictions with diffusion.cfg_combine.

Also here: `L2IFrames` (training pairs from clips in the clip format), `L2ILatents` (the same items with every
condition pre-encoded once by E, so training needs no VAE pass), `condition_images`, `reference_images` and
`encode_conditions` (the same conditions at inference) and `paste_back` (a decoded frame blended into the source
inside a feathered mouth mask, so everything outside the mouth keeps the source pixels).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clips
import diffusion
import landmarks
from cli import UsageError
from common import Config, SampleRandom, TrainConfig, atomic_write, option, to_tensor_image, train_settings

COND_KEYS = ("mask", "ref", "ref_lmk", "lmk")  # condition latents, in slot order
REFERENCE_KEYS = ("ref", "ref_lmk")  # the reference pair (dropped by use_reference=False)
LANDMARK_KEYS = ("ref_lmk", "lmk")  # dropped together for classifier-free guidance
CONDITIONINGS = ("joint_attn", "ref_attn", "channel")


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class L2IConfig(Config):
    """The L2I model and its training settings. Everything not drawn in the figure is our guess (docs/paper.md)."""

    # geometry
    image_size: int = option(64, "Side in pixels of the frames L2I renders (the VAE's resolution).")
    latent_channels: int = option(4, "Channels of the VAE latents.")
    latent_size: int = option(16, "Side of the VAE latents.")
    # conditioning (the figure's condition images; how they enter the UNet is our guess)
    conditioning: str = option("joint_attn", "How the conditions meet z_t: joint_attn (every latent a slot of one "
                               "self-attention, the paper's reading), ref_attn (a condition encoder whose tokens "
                               "join the keys and values of the frame's self-attention, as ReferenceNet-style "
                               "renderers do) or channel (concatenated, the ablation).")
    use_reference: bool = option(True, "The reference pair I_ref, I^P_ref is used; false is the ablation without it.")
    tau_min: int = option(1, "Smallest reference offset |tau| in frames during training.")
    tau_max: int = option(25, "Largest reference offset |tau| in frames during training; a far reference shows "
                          "another mouth shape, so the mouth must come from the landmarks [guess].")
    tau_both_sides: bool = option(True, "The training reference may lie before or after frame i.")
    mask_expand: float = option(0.15, "Relative growth of the mouth box that is blacked out, in training and "
                                "sampling.")
    face_iod: float = option(0.0, "Framing: 0 keeps the frames as rendered, a value > 0 cuts face crops with the "
                             "eyes that fraction of the side apart; must equal the VAE's, and sample.py frames "
                             "faces with it.")
    cfg_dropout: float = option(0.1, "Probability of dropping both landmark conditions in training, for guidance.")
    guidance: float = option(1.0, "Classifier-free guidance scale on the landmarks at sampling; 1 turns it off.")
    # denoiser
    channels: tuple = option((32, 64), "UNet widths, one per resolution level, given as 32,64.")
    num_res_blocks: int = option(1, "ResBlocks per level.")
    attn_resolutions: tuple = option((8,), "Latent sides with self-attention, given as 8 or 32,16,8 (the middle "
                                     "block always has it).")
    heads: int = option(4, "Heads of every self-attention.")
    norm_groups: int = option(8, "Groups of every GroupNorm.")
    attn_pos_emb: bool = option(True, "A learned 2-D position embedding is added before each attention [guess].")
    dropout: float = option(0.0, "Dropout inside the ResBlocks.")
    # diffusion (eps prediction)
    num_train_timesteps: int = option(1000, "Diffusion timesteps T of the training chain.")
    beta_schedule: str = option("scaled_linear", "Noise schedule: linear, scaled_linear (latent diffusion) or "
                                "cosine.")
    beta_start: float = option(0.00085, "First beta of the schedule.")
    beta_end: float = option(0.012, "Last beta of the schedule.")
    sample_steps: int = option(25, "DDIM steps at inference.")
    eta: float = option(0.0, "DDIM eta; 0 is deterministic.")
    mouth_loss_weight: float = option(2.0, "Loss weight inside the mouth box (on the latent grid); 1 is plain "
                                      "eps-MSE.")
    train: TrainConfig = train_settings()

    PRESETS = {
        # 64 px, CPU, under an hour; 10 DDIM steps render in real time on 2 cores with the opening correlation of 25
        "tiny": dict(sample_steps=10, train=dict(lr=5e-4, betas=(0.9, 0.999), weight_decay=0.01, warmup=200,
                                                 steps=12_000, batch_size=8, ema_decay=0.999, grad_clip=1.0)),
        "paper": dict(image_size=256, latent_size=32, channels=(128, 256, 512, 512), num_res_blocks=2,
                      attn_resolutions=(32, 16, 8), heads=8, norm_groups=32, tau_min=1, tau_max=60, sample_steps=50,
                      mouth_loss_weight=1.0,
                      train=dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, warmup=1000, steps=300_000,
                                 batch_size=64, ema_decay=0.9999, grad_clip=1.0)),  # 256 px, GPU
    }

    def __post_init__(self):
        super().__post_init__()
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.latent_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"latent_size {self.latent_size} is not divisible by 2^{len(self.channels) - 1}")
        for ch in self.channels:
            if ch % self.norm_groups or ch % self.heads:
                raise ValueError(f"channel count {ch} must be divisible by norm_groups and heads")
        if not 0 <= self.tau_min <= self.tau_max:
            raise ValueError(f"need 0 <= tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")

    @property
    def cond_keys(self) -> tuple:
        """The condition latents this configuration uses, in slot order."""
        return tuple(k for k in COND_KEYS if self.use_reference or k not in REFERENCE_KEYS)


def check_vae_matches(vae_config, config: L2IConfig) -> None:
    """UsageError unless the VAE's resolution, latent shape and framing are the ones this L2I model works on."""
    size, s = config.image_size, config.latent_size
    if vae_config.resolution != size or tuple(vae_config.latent_shape) != (config.latent_channels, s, s):
        raise UsageError(f"the VAE ({vae_config.resolution} px -> {tuple(vae_config.latent_shape)}) does not match "
                         f"the L2I model ({size} px -> {config.latent_channels}x{s}x{s}); give the VAE the L2I "
                         "model was trained with (--vae), or a matching preset")
    if vae_config.face_iod != config.face_iod:
        raise UsageError(f"the VAE was trained on faces framed with face_iod {vae_config.face_iod:g}, the L2I model "
                         f"with {config.face_iod:g}; give the VAE the L2I model was trained with, or pass "
                         f"--face-iod {vae_config.face_iod:g}")


# ----------------------------------------------------------------------------------------------------------------
# Denoiser


def _slot0(x: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Keep slot 0 of a slot-folded tensor: (B*S, ...) -> (B, ...)."""
    return x.view(x.shape[0] // n_slots, n_slots, *x.shape[1:])[:, 0]  # (B, ...)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the (timestep + slot) embedding scales and shifts the second norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, h, w)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (N, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SlotAttention(nn.Module):
    """Self-attention over all slots of a sample: (B*S, C, h, w) -> tokens (B, S*h*w, C) -> back.

    With S = 1 this is ordinary spatial self-attention (channel mode). context (B, K, C, h, w), in ref_attn mode:
    condition feature maps whose tokens are extra keys and values, with their own norm and the frame's position
    embedding."""

    def __init__(self, ch: int, heads: int, groups: int, res: int, pos_emb: bool, context: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.norm_context = nn.GroupNorm(groups, ch) if context else None
        self.attn = diffusion.SelfAttention(ch, heads)
        self.pos = nn.Parameter(torch.zeros(1, ch, res, res)) if pos_emb else None
        self.prune_after = False  # set by LatentUNet on the last attention layer: later layers need slot 0 only

    def _tokens(self, x: torch.Tensor, norm: nn.GroupNorm, n: int) -> torch.Tensor:
        """(B*n, C, h, w) -> normed, position-embedded tokens (B, n*h*w, C)."""
        BN, C, h, w = x.shape
        hn = norm(x)
        if self.pos is not None:
            hn = hn + self.pos
        return hn.view(BN // n, n, C, h * w).permute(0, 1, 3, 2).reshape(BN // n, n * h * w, C)  # (B, n*h*w, C)

    def forward(self, x: torch.Tensor, n_slots: int, context: torch.Tensor | None = None) -> torch.Tensor:
        BS, C, h, w = x.shape
        B = BS // n_slots
        tokens = self._tokens(x, self.norm, n_slots)  # (B, S*h*w, C)
        if context is not None:  # (B, K, C, h, w) from ConditionEncoder
            context = self._tokens(context.flatten(0, 1), self.norm_context, context.shape[1])  # (B, K*h*w, C)
        out = self.attn(tokens, context)  # (B, S*h*w, C)
        out = out.view(B, n_slots, h * w, C).permute(0, 1, 3, 2).reshape(BS, C, h, w)  # (B*S, C, h, w)
        return x + out


def down_path(cfg: L2IConfig, res_block, attn=None) -> tuple:
    """The UNet's down path: per level num_res_blocks res_block(in, out), each followed by attn(ch, side) at the
    attention resolutions if given, a stride-2 conv between levels -> (levels, downsamples, channels per level)."""
    res, ch = cfg.latent_size, cfg.channels[0]
    levels, downsamples, level_chs = nn.ModuleList(), nn.ModuleList(), []
    for level, out_ch in enumerate(cfg.channels):
        blocks = nn.ModuleList()
        for _ in range(cfg.num_res_blocks):
            blocks.append(res_block(ch, out_ch))
            ch = out_ch
            if attn is not None and res in cfg.attn_resolutions:
                blocks.append(attn(ch, res))
        levels.append(blocks)
        level_chs.append(ch)
        if level < len(cfg.channels) - 1:
            downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            res //= 2
    return levels, downsamples, level_chs


class ConditionEncoder(nn.Module):
    """ref_attn's condition encoder: the K condition latents (ref, ref_lmk, lmk) -> feature maps at every level of
    the denoiser's down path. One set of weights for all K, told apart by a learned embedding in place of the
    timestep's (the conditions are not noisy), so sampling runs it once per frame, not once per denoising step."""

    def __init__(self, cfg: L2IConfig, keys: tuple, res_block, emb_dim: int):
        super().__init__()
        self.keys = keys
        self.key_emb = nn.Parameter(torch.randn(len(keys), emb_dim) * 0.02)  # (K, D)
        self.conv_in = nn.Conv2d(cfg.latent_channels, cfg.channels[0], 3, padding=1)
        self.levels, self.downsamples, _ = down_path(cfg, res_block)  # the denoiser's ResBlocks, no attention

    def encode(self, x: torch.Tensor, k: int) -> list:
        """One condition latent (N, C, s, s), condition index k -> its feature map per level."""
        emb = self.key_emb[k].expand(len(x), -1)  # (N, D)
        h, feats = self.conv_in(x), []
        for level, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, emb)
            feats.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        return feats

    def forward(self, cond: dict, batch: int) -> dict:
        """cond {key: (1 or batch, C, s, s)} -> {side: (batch, K, ch, side, side)}; batch-1 conditions (a video's
        reference) are encoded once and broadcast."""
        per_key = [self.encode(cond[key], k) for k, key in enumerate(self.keys)]  # K lists of level maps
        stacked = [torch.stack([f.expand(batch, *f.shape[1:]) for f in fs], dim=1) for fs in zip(*per_key)]
        return {f.shape[-1]: f for f in stacked}  # (batch, K, ch, side, side) per side


class LatentUNet(nn.Module):
    """[L2I: eps_theta]: a latent UNet with ResBlocks, skips and self-attention at low resolutions.

    forward(z_t (B, 4, h, w), t (B,) or int, cond {key: (B or 1, 4, h, w)}) -> eps_hat (B, 4, h, w).
    Condition latents with batch 1 are broadcast over the B frames with `expand` (no copy). In ref_attn mode
    `context` = condition_context(cond, B) may be passed in, computed once for all denoising steps."""

    def __init__(self, cfg: L2IConfig):
        super().__init__()
        self.config = cfg
        C = cfg.latent_channels
        self.cond_keys = cfg.cond_keys
        self.joint = cfg.conditioning == "joint_attn"
        self.reference_attention = cfg.conditioning == "ref_attn"
        self.n_slots = len(self.cond_keys) if self.joint else 1  # mask shares slot 0 with z_t
        in_ch = C * (1 + len(self.cond_keys)) if cfg.conditioning == "channel" else 2 * C
        ch0, groups, emb_dim = cfg.channels[0], cfg.norm_groups, 4 * cfg.channels[0]
        self.time_embed = diffusion.TimestepEmbedder(emb_dim)
        self.slot_emb = nn.Parameter(torch.randn(self.n_slots, emb_dim) * 0.02)  # added to the t-embedding
        self.slot_in = nn.Parameter(torch.randn(self.n_slots, ch0, 1, 1) * 0.02)  # added to the input features
        self.conv_in = nn.Conv2d(in_ch, ch0, 3, padding=1)

        res_block = functools.partial(ResBlock, emb_dim=emb_dim, groups=groups, dropout=cfg.dropout)  # (in, out)
        def attn(ch, res):
            return SlotAttention(ch, cfg.heads, groups, res, cfg.attn_pos_emb, context=self.reference_attention)

        self.cond_encoder = (ConditionEncoder(cfg, self.cond_keys[1:], res_block, emb_dim)
                             if self.reference_attention else None)

        self.down_levels, self.downsamples, skip_chs = down_path(cfg, res_block, attn)
        res, ch = cfg.latent_size // 2 ** (len(cfg.channels) - 1), skip_chs[-1]
        self.mid = nn.ModuleList([res_block(ch, ch), attn(ch, res), res_block(ch, ch)])
        self.up_levels, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            out_ch = cfg.channels[level]
            blocks = nn.ModuleList()
            for j in range(cfg.num_res_blocks):
                blocks.append(res_block(ch + skip_chs[level] if j == 0 else ch, out_ch))
                ch = out_ch
                if res in cfg.attn_resolutions:
                    blocks.append(attn(ch, res))
            self.up_levels.append(blocks)
            if level > 0:
                self.upsamples.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # after the last attention layer nothing moves information between slots any more
        later = [*self.mid, *(block for blocks in self.up_levels for block in blocks)]
        [m for m in later if isinstance(m, SlotAttention)][-1].prune_after = True

    def expand_cond(self, cond: dict, batch: int) -> dict:
        """Check the condition latents and broadcast batch-1 entries to `batch` (a view, not a copy)."""
        C, s = self.config.latent_channels, self.config.latent_size
        out = {}
        for k in self.cond_keys:
            if k not in cond:
                raise ValueError(f"condition {k!r} missing; expected keys {self.cond_keys}")
            v = cond[k]
            if v.dim() != 4 or v.shape[1:] != (C, s, s) or v.shape[0] not in (1, batch):
                raise ValueError(f"condition {k!r} must be (1 or {batch}, {C}, {s}, {s}), got {tuple(v.shape)}")
            out[k] = v.expand(batch, C, s, s)
        return out

    def _inputs(self, z_t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Stack z_t and the condition latents into the UNet input: (B*S, 2C, h, w) or (B, C*(1+K), h, w)."""
        B = z_t.shape[0]
        c = self.expand_cond(cond, B)
        if self.reference_attention:
            return torch.cat([z_t, c["mask"]], dim=1)  # (B, 2C, h, w); the rest comes in as context
        if not self.joint:
            return torch.cat([z_t, *(c[k] for k in self.cond_keys)], dim=1)  # (B, C*(1+K), h, w)
        zeros = torch.zeros_like(z_t)
        slots = [torch.cat([z_t, c["mask"]], 1)] + [torch.cat([c[k], zeros], 1) for k in self.cond_keys[1:]]
        x = torch.stack(slots, dim=1)  # (B, S, 2C, h, w)
        return x.flatten(0, 1)  # (B*S, 2C, h, w)

    def condition_context(self, cond: dict, batch: int) -> dict | None:
        """ref_attn: the condition encoder's feature maps {side: (batch, K, ch, side, side)}; None in other modes."""
        if not self.reference_attention:
            return None
        self.expand_cond(cond, batch)  # shape checks
        return self.cond_encoder(cond, batch)

    def forward(self, z_t: torch.Tensor, t, cond: dict, context: dict | None = None) -> torch.Tensor:
        C, s = self.config.latent_channels, self.config.latent_size
        if z_t.dim() != 4 or z_t.shape[1:] != (C, s, s):
            raise ValueError(f"z_t must be (B, {C}, {s}, {s}), got {tuple(z_t.shape)}")
        B, S = z_t.shape[0], self.n_slots
        t = torch.as_tensor(t, device=z_t.device).long().expand(B)  # (B,)
        x = self._inputs(z_t, cond)
        context = self.condition_context(cond, B) if context is None else context
        emb = (self.time_embed(t)[:, None] + self.slot_emb[None]).flatten(0, 1)  # (B*S, D)
        h = self.conv_in(x)  # (B*S, ch0, h, w)
        h = (h.view(B, S, *h.shape[1:]) + self.slot_in[None]).flatten(0, 1)  # (B*S, ch0, h, w)
        skips = []
        for level, blocks in enumerate(self.down_levels):
            h, _, _ = self._run(blocks, h, emb, S, context)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        h, emb, n_slots = self._run(self.mid, h, emb, S, context)  # n_slots drops to 1 after the last attention layer
        for i, blocks in enumerate(self.up_levels):
            skip = skips.pop()
            if n_slots != S:
                skip = _slot0(skip, S)
            h = torch.cat([h, skip], dim=1)
            h, emb, n_slots = self._run(blocks, h, emb, n_slots, context)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        eps = self.conv_out(F.silu(self.norm_out(h)))
        return eps if n_slots == 1 else _slot0(eps, n_slots)  # (B, C, h, w)

    @staticmethod
    def _run(blocks, h, emb, n_slots, context=None):
        """Apply ResBlocks / SlotAttentions in order (ref_attn: with the context at their side); after the layer
        marked prune_after keep slot 0 only."""
        for block in blocks:
            if isinstance(block, ResBlock):
                h = block(h, emb)
                continue
            h = block(h, n_slots, None if context is None else context[h.shape[-1]])
            if block.prune_after and n_slots > 1:
                h, emb, n_slots = _slot0(h, n_slots), _slot0(emb, n_slots), 1
        return h, emb, n_slots


# ----------------------------------------------------------------------------------------------------------------
# Diffusion wrapper


class L2I(nn.Module):
    """The L2I latent diffusion model: LatentUNet + NoiseScheduler (eps prediction) + learned null landmark latent.

    Condition dicts hold VAE latents: mask=E(I_mask), ref=E(I_ref), ref_lmk=E(I^P_ref), lmk=E(I^P_i), each
    (B or 1, 4, h, w); optional "mouth" (B, 1, H, W) = mouth-box mask at any resolution (loss weighting only)."""

    def __init__(self, cfg: L2IConfig):
        super().__init__()
        self.config = cfg
        self.unet = LatentUNet(cfg)
        self.scheduler = diffusion.NoiseScheduler(
            num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon",
        )
        C, s = cfg.latent_channels, cfg.latent_size
        self.null_lmk = nn.Parameter(torch.zeros(1, C, s, s))  # E(I^P) replacement for classifier-free guidance

    def drop_landmarks(self, cond: dict, drop: torch.Tensor) -> dict:
        """Replace both landmark latents by the learned null latent where drop (B,) bool is True."""
        out = dict(cond)
        keep = ~drop.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        for k in LANDMARK_KEYS:
            if k in cond:
                out[k] = torch.where(keep, cond[k], self.null_lmk)  # (B, C, h, w)
        return out

    def null_condition(self, cond: dict) -> dict:
        """The unconditional input of classifier-free guidance: landmark latents -> null (batch 1, broadcast)."""
        return {**cond, **{k: self.null_lmk for k in LANDMARK_KEYS if k in cond}}

    def loss(self, z0: torch.Tensor, cond: dict):
        """The eps-MSE of [L2I: eps_theta] (optionally weighted inside the mouth box). Every random draw comes from
        the samples' seeds cond["seed"] (B,) (fresh ones when absent). Returns (loss, logs)."""
        C, s = self.config.latent_channels, self.config.latent_size
        if z0.dim() != 4 or z0.shape[1:] != (C, s, s):
            raise ValueError(f"z0 must be (B, {C}, {s}, {s}), got {tuple(z0.shape)}")
        B = z0.shape[0]
        rng = SampleRandom(cond["seed"], z0.device) if "seed" in cond else SampleRandom.fresh(B, z0.device)
        noise = rng.randn(C, s, s).to(z0.dtype)                          # (B, C, s, s)
        t = rng.randint(self.config.num_train_timesteps)                 # (B,)
        z_t = self.scheduler.add_noise(z0, noise, t)
        drop = torch.zeros(B, dtype=torch.bool, device=z0.device)
        if self.training and self.config.cfg_dropout > 0:
            drop = rng.rand() < self.config.cfg_dropout                  # (B,) True: landmarks dropped
            cond = self.drop_landmarks(cond, drop)
        eps_hat = self.unet(z_t, t, cond)
        err = (eps_hat - self.scheduler.training_target(z0, noise, t)) ** 2  # (B, C, h, w)
        weight = self._loss_weight(cond.get("mouth"), z0)
        loss = (err * weight).mean() / weight.mean()
        logs = {"loss": loss.item(), "mse": err.mean().item(), "cfg_drop_frac": drop.float().mean().item()}
        return loss, logs

    def _loss_weight(self, mouth, z0):
        """1 outside, mouth_loss_weight inside the mouth box downsampled to the latent grid: (B, 1, h, w)."""
        if mouth is None or self.config.mouth_loss_weight == 1.0:
            return torch.ones_like(z0[:, :1])
        m = F.adaptive_avg_pool2d(mouth.to(z0.dtype), z0.shape[-2:])  # (B, 1, h, w)
        return 1.0 + (self.config.mouth_loss_weight - 1.0) * m

    @torch.no_grad()
    def sample(self, cond: dict, steps: int | None = None, eta: float | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None, progress: bool = False,
               z_T: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling of z0 for a batch of frames (the figure's "(T-1) diffusion steps").

        z_T: optional starting noise (B or 1, C, h, w); one noise shared by every frame of a video keeps the
        frames from flickering and makes the result independent of how frames are batched [our choice].
        The batch is the largest condition batch; batch-1 entries (the shared reference) are broadcast.
        guidance != 1 adds an unconditional pass (landmarks -> null) per step: eps = cfg_combine(c, u, guidance)."""
        steps = steps or self.config.sample_steps
        eta = self.config.eta if eta is None else eta
        guidance = self.config.guidance if guidance is None else guidance
        B = max(cond[k].shape[0] for k in self.config.cond_keys)
        C, s = self.config.latent_channels, self.config.latent_size
        device = self.null_lmk.device
        noise_device = generator.device if generator is not None else device
        if z_T is None:
            z_T = torch.randn((B, C, s, s), generator=generator, device=noise_device)
        z = z_T.to(device).expand(B, C, s, s).contiguous()  # (B, C, h, w)
        uncond = self.null_condition(cond) if guidance != 1.0 else None
        context = self.unet.condition_context(cond, B)  # ref_attn: the conditions' features, once for all steps
        uncond_context = None if uncond is None else self.unet.condition_context(uncond, B)
        self.scheduler.set_timesteps(steps)
        for t in tqdm(self.scheduler.timesteps.tolist(), desc="L2I DDIM", disable=not progress, leave=False):
            t_batch = torch.full((B,), t, dtype=torch.long, device=device)
            eps = self.unet(z, t_batch, cond, context)
            if uncond is not None:
                eps = diffusion.cfg_combine(eps, self.unet(z, t_batch, uncond, uncond_context), guidance)
            z, _ = self.scheduler.step(eps, t, z, eta=eta, generator=generator)
        return z


def encode_conditions(vae, images: dict, batch_size: int = 64) -> dict:
    """Encode the condition images (COND_KEYS; [-1, 1], (B or 1, 3, H, W)) with the frozen encoder E, in chunks
    of batch_size, on the VAE's device: {key: latent (B or 1, C, h, w)}. Other keys (e.g. mouth) are skipped."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        return {k: torch.cat([vae.encode_latents(x.to(device)) for x in v.split(batch_size)])
                for k, v in images.items() if k in COND_KEYS}


# ----------------------------------------------------------------------------------------------------------------
# Condition images and data


def landmark_image(P_canon: np.ndarray, size: int) -> np.ndarray:
    """Canonical landmarks (478, 3) -> the rendered mesh on a white canvas, uint8 (size, size, 3)
    (for a sequence (T, 478, 3) use landmarks.draw_landmark_images on canonical_to_canvas)."""
    return landmarks.draw_landmark_image(landmarks.canonical_to_canvas(P_canon, size), size)


def condition_images(frames: np.ndarray, boxes, P_canon: np.ndarray) -> dict:
    """[L2I: I_mask] and [L2I: I^P_i] of a batch of frames at inference, built as L2IFrames builds training items:
    frames uint8 (B, S, S, 3), their mouth boxes (B, 4) in pixels, canonical landmarks (B, 478, 3) ->
    {"mask", "lmk"}: float tensors (B, 3, S, S) in [-1, 1]."""
    size = frames.shape[1]
    masked = np.stack([landmarks.apply_mouth_mask(f, b) for f, b in zip(frames, boxes)])  # (B, S, S, 3)
    lmk = landmarks.draw_landmark_images(landmarks.canonical_to_canvas(P_canon, size), size)  # (B, S, S, 3)
    return {"mask": to_tensor_image(masked), "lmk": to_tensor_image(lmk)}


def reference_images(frame: np.ndarray, P_canon: np.ndarray) -> dict:
    """[L2I: I_ref / I^P_ref] at inference: one reference frame uint8 (S, S, 3) and its canonical landmarks
    (478, 3) -> {"ref", "ref_lmk"}: float tensors (1, 3, S, S), broadcast over the frames by the model."""
    return {"ref": to_tensor_image(frame[None]), "ref_lmk": to_tensor_image(landmark_image(P_canon, len(frame))[None])}


def _box_mask(box, size: int) -> np.ndarray:
    """(x0, y0, x1, y1) -> float32 (1, size, size) with 1 inside the box."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros((1, size, size), np.float32)
    m[:, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1.0
    return m


class L2IFrames(torch.utils.data.Dataset):
    """Training/eval pairs for L2I: frame i, a reference frame i +- tau and the condition images.

    sources: clips in the clip format, as npz paths (clips.load_clip) or as loaded dicts (landmarks, frame_size
    and either "frames" uint8 (T, H, W, 3) or "video", a path). Frames are resized whole to `size`, or with
    face_iod > 0 face crops framed by landmarks.face_crop_box are cut out of the full-resolution frames
    (L2IConfig.face_iod); clips.decoded_clip does either.
    Items are dicts of float tensors in [-1, 1]: target, mask, ref, ref_lmk, lmk (3, size, size), plus
    mouth (1, size, size) in {0, 1} and the integer indices clip, frame, ref_frame.
    train=True draws tau uniformly in [tau_min, tau_max] (either side of i when tau_both_sides); train=False uses
    tau_max before i (after i near the clip start), so items are deterministic.
    All landmark images are drawn once here, so __getitem__ only slices arrays."""

    def __init__(self, sources, size: int, tau_min: int, tau_max: int, train: bool = True,
                 mask_expand: float = 0.15, tau_both_sides: bool = True, face_iod: float = 0.0):
        if not 0 <= tau_min <= tau_max:
            raise ValueError(f"need 0 <= tau_min <= tau_max, got {tau_min}, {tau_max}")
        self.size, self.tau_min, self.tau_max, self.train = size, tau_min, tau_max, train
        self.face_iod = face_iod
        self.mask_expand, self.tau_both_sides = mask_expand, tau_both_sides
        self.clips = [self._prepare(c) for c in tqdm(sources, desc="L2I frames", leave=False, disable=len(sources) < 4)]
        self.index = [(c, i) for c, clip in enumerate(self.clips) for i in range(len(clip["frames"]))]

    def _prepare(self, source) -> dict:
        size = self.size
        clip = source if isinstance(source, dict) else clips.load_clip(str(source))
        frames, P_px = clips.decoded_clip(clip, size, self.face_iod)  # (T, size, size, 3), (T, 478, 3) in their px
        # the canonical pose fit is scale-free: fit it on the landmarks as measured (crop pixels for face crops)
        P_canon, _ = landmarks.canonicalize(P_px if self.face_iod else np.asarray(clip["landmarks"][:len(P_px)],
                                                                                  np.float32))  # (T, 478, 3)
        lmk_images = landmarks.draw_landmark_images(landmarks.canonical_to_canvas(P_canon, size), size)
        boxes = [landmarks.mouth_box(p, (size, size), self.mask_expand) for p in P_px]
        return {"frames": frames, "P_px": P_px, "lmk_images": lmk_images, "boxes": boxes}

    def __len__(self) -> int:
        return len(self.index)

    def reference_index(self, i: int, T: int, generator: torch.Generator | None = None) -> int:
        """The reference frame j = i +- tau for target i in a clip of T frames (the other side near the ends);
        in training drawn from `generator` (a training item's seed)."""
        if self.train:
            tau = int(torch.randint(self.tau_min, self.tau_max + 1, (), generator=generator).item())
            sign = -1 if not self.tau_both_sides or torch.rand((), generator=generator).item() < 0.5 else 1
        else:
            tau, sign = self.tau_max, -1
        j = i + sign * tau
        if not 0 <= j < T:
            j = i - sign * tau  # the other side
        return int(min(max(j, 0), T - 1))

    def __getitem__(self, idx: int) -> dict:
        c, i = self.index[idx]
        clip = self.clips[c]
        j = self.reference_index(i, len(clip["frames"]))
        box = clip["boxes"][i]
        images = {
            "target": clip["frames"][i],
            "mask": landmarks.apply_mouth_mask(clip["frames"][i], box),
            "ref": clip["frames"][j],
            "ref_lmk": clip["lmk_images"][j],
            "lmk": clip["lmk_images"][i],
        }
        item = {k: to_tensor_image(v) for k, v in images.items()}  # (3, size, size) each
        item["mouth"] = torch.from_numpy(_box_mask(box, self.size))
        item.update(clip=c, frame=i, ref_frame=j)
        return item


class L2ILatents(torch.utils.data.Dataset):
    """L2IFrames with every condition pre-encoded by the frozen VAE encoder E (its posterior mode, so exact).

    E is deterministic and every condition image is a function of one frame (I_mask, I^P of frame i; I_ref,
    I^P_ref of frame j), so three latents per frame are enough: E(frame), E(masked frame), E(landmark image).
    Training then needs no VAE pass at all. Items: z0 = E(I_i), mask, ref, ref_lmk, lmk (C, h, w) latents,
    mouth (1, size, size) and clip, frame, ref_frame; `L2I.loss(item["z0"], item)` takes a collated batch as is.
    A training item is an (index, seed) pair (common.step_items): the reference frame is drawn from the seed,
    which the item carries on to the loss. Memory: 3 latents per frame (about 12 kB at 4x16x16) on CPU; built
    with `cached`, they live memory-mapped on disk instead, so a dataset larger than memory trains in flat memory.
    """

    def __init__(self, frames: L2IFrames, vae, batch_size: int = 64):
        self.frames = frames
        device = next(vae.parameters()).device
        self.latents = []  # per clip: (T, 3, C, h, w) float32, E of [frame, masked frame, landmark image]
        for clip in tqdm(frames.clips, desc="L2I encode", leave=False, disable=len(frames.clips) < 4):
            masked = np.stack([landmarks.apply_mouth_mask(f, b) for f, b in zip(clip["frames"], clip["boxes"])])
            images = (clip["frames"], masked, clip["lmk_images"])
            self.latents.append(torch.stack([self._encode(vae, v, batch_size, device) for v in images], 1))

    @classmethod
    def cached(cls, paths: list[str], vae, key: str, cache: str, **frame_kw) -> "L2ILatents":
        """The latents of clips encoded one clip at a time into `cache` (.npy files per clip, keyed by the clip
        file, `key` (the VAE checkpoint) and the framing in frame_kw (L2IFrames' arguments)), memory-mapped."""
        self = cls.__new__(cls)
        self.frames = _ClipIndex(frame_kw)
        self.latents = []
        for path in tqdm(paths, desc="L2I latents", unit="clip", leave=False, disable=len(paths) < 4):
            stat = os.stat(path)
            framing = [frame_kw["size"], frame_kw.get("mask_expand", 0.15), frame_kw.get("face_iod", 0.0)]
            name = hashlib.sha1(json.dumps([os.path.abspath(path), stat.st_mtime_ns, stat.st_size, key,
                                            framing]).encode()).hexdigest()[:16]
            stem = os.path.join(cache, "l2i_latents", name)
            if not os.path.exists(stem + ".boxes.npy"):
                one = cls(L2IFrames([path], **{**frame_kw, "train": False}), vae)
                atomic_write(stem + ".latents.npy", lambda tmp: np.save(open(tmp, "wb"), one.latents[0].numpy()))
                boxes = np.asarray(one.frames.clips[0]["boxes"], np.int64)  # (T, 4)
                atomic_write(stem + ".boxes.npy", lambda tmp: np.save(open(tmp, "wb"), boxes))  # last: done
            self.latents.append(torch.from_numpy(np.load(stem + ".latents.npy", mmap_mode="c")))
            self.frames.add(np.load(stem + ".boxes.npy"))
        return self

    @staticmethod
    def _encode(vae, images: np.ndarray, batch_size: int, device) -> torch.Tensor:
        with torch.no_grad():
            chunks = [vae.encode_latents(to_tensor_image(images[i:i + batch_size]).to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)]
        return torch.cat(chunks)  # (T, C, h, w)

    def __len__(self) -> int:
        return len(self.frames.index)

    def __getitem__(self, item) -> dict:
        idx, seed = item if isinstance(item, tuple) else (item, None)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        c, i = self.frames.index[idx]
        z = self.latents[c]  # (T, 3, C, h, w)
        j = self.frames.reference_index(i, len(z), gen)
        mouth = torch.from_numpy(_box_mask(self.frames.clips[c]["boxes"][i], self.frames.size))
        # copies: a view would carry the whole memory-mapped clip into a DataLoader worker's shared memory
        out = {"z0": z[i, 0].clone(), "mask": z[i, 1].clone(), "ref": z[j, 0].clone(), "ref_lmk": z[j, 2].clone(),
               "lmk": z[i, 2].clone(), "mouth": mouth, "clip": c, "frame": i, "ref_frame": j}
        return out if seed is None else {**out, "seed": seed}


class _ClipIndex(L2IFrames):
    """What L2ILatents reads of its L2IFrames (frame index, mouth boxes, reference choice) without the frames."""

    def __init__(self, kw: dict):
        self.size, self.tau_min, self.tau_max = kw["size"], kw["tau_min"], kw["tau_max"]
        self.train, self.tau_both_sides = kw.get("train", True), kw.get("tau_both_sides", True)
        self.clips, self.index = [], []

    def add(self, boxes: np.ndarray) -> None:
        self.index += [(len(self.clips), i) for i in range(len(boxes))]
        self.clips.append({"boxes": boxes})


def paste_back(generated: np.ndarray, source: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """Blend generated frame(s) into the source inside a feathered mouth mask (our guess, docs/paper.md).

    generated, source: uint8 (T, H, W, 3) or (H, W, 3); soft_mask: float (H, W) or (T, H, W) in [0, 1].
    Pixels where the mask is 0 are the source's pixels exactly."""
    generated, source = np.asarray(generated), np.asarray(source)
    if generated.shape != source.shape or generated.shape[-1] != 3:
        raise ValueError(f"generated {generated.shape} and source {source.shape} must be equal (..., H, W, 3)")
    m = np.clip(np.asarray(soft_mask, np.float32), 0.0, 1.0)
    if m.shape[-2:] != source.shape[-3:-1]:
        raise ValueError(f"soft_mask {m.shape} does not match frame size {source.shape[-3:-1]}")
    m = m[..., None]  # (..., H, W, 1)
    blended = source.astype(np.float32) * (1.0 - m) + generated.astype(np.float32) * m
    blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return np.where(m > 0, blended, source)
