"""Train one DreamHead stage: `python train.py --stage vae|a2l|l2i [--preset tiny|paper] [--flags]`.

The paper trains its cascade stage by stage (Sec. 3): the A2L diffusion model (audio -> dense landmarks) and the
L2I latent diffusion model (landmarks -> image) whose frozen autoencoder comes first. Here every stage shares
one plain training loop (nanoGPT style, no framework):

    AdamW, linear warm-up + cosine decay (`dreamhead.lr_at`), gradient clipping, EMA of the weights,
    optional bf16 autocast on CUDA, DDP under torchrun (NCCL on GPUs, gloo on CPU), rank-0 logging,
    periodic held-out evaluation, a loss-curve PNG and sample pictures, resume, and a checkpoint on Ctrl-C.

Flags: every field of the stage's config dataclass (`VAEConfig`, `A2LConfig`, `L2IConfig`) is a flag whose
default comes from the chosen preset, plus the run flags below. With no data flag the stage trains on
synthetic talking heads (data.py) generated into cache/ on first use. The checkpoint is one dict
{stage, config, model, ema, optimizer, step, extra, history} from which sample.py rebuilds everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from dreamhead import (EMA, UsageError, atomic_write, load_checkpoint, lr_at, pick_device, run_cli, save_checkpoint,
                       save_png)

STAGES = ("vae", "a2l", "l2i")
RUN_FLAGS_HELP = "run flags (not part of the model config)"


# ----------------------------------------------------------------------------------------------------------
# Command line: dataclass fields -> flags
# ----------------------------------------------------------------------------------------------------------

def config_class(stage: str):
    if stage == "vae":
        from vae import VAEConfig
        return VAEConfig
    if stage == "a2l":
        from a2l import A2LConfig
        return A2LConfig
    from l2i import L2IConfig
    return L2IConfig


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[s.lower()]
    if isinstance(default, tuple):
        kind = type(default[0]) if default else int
        return lambda s: tuple(kind(v) for v in s.split(",") if v)
    return type(default)


def field_notes(cls) -> dict:
    """{field: its comment in the dataclass source} (comment lines that follow a field continue its note), so
    every config flag's --help says what it does and where the idea comes from, from one place."""
    import inspect
    import re
    notes, last, indent = {}, None, 0
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"(\s+)(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if field:
            indent, last = len(field.group(1)), field.group(2)
            notes[last] = (field.group(3) or "").strip()
        elif last and re.match(r"\s{%d,}#" % (indent + 1), line):
            notes[last] = (notes[last] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            last = None
    return notes


def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=STAGES, default=None)
    pre.add_argument("--preset", default="tiny")
    known, _ = pre.parse_known_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[pre])
    run = p.add_argument_group(RUN_FLAGS_HELP)
    run.add_argument("--data", default=None, help="folder of clips (clip_*.npz + .mp4, data.py format); "
                     "default: synthetic talking heads generated into --cache on first use")
    run.add_argument("--eval-data", default=None, help="held-out clips folder (default: synthetic test split)")
    run.add_argument("--clips", type=int, default=64, help="synthetic training clips to generate")
    run.add_argument("--eval-clips", type=int, default=20, help="synthetic held-out clips to generate")
    run.add_argument("--cache", default="cache", help="where generated data and decoded frames are cached")
    run.add_argument("--out", default=None, help="run folder (default: runs/<stage>)")
    run.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    run.add_argument("--init", default=None, metavar="CKPT", help="start from this checkpoint's EMA weights (same "
                     "stage and architecture) with a fresh optimizer at step 0; e.g. the VAE's --finetune-decoder")
    run.add_argument("--export", default=None, metavar="PATH", help="do not train: write <out>/ckpt.pt for "
                     "sampling only to PATH (EMA weights, no optimizer state; how checkpoints/*_tiny.pt are made)")
    run.add_argument("--vae", default=None, help="VAE checkpoint for --stage l2i (default: checkpoints/vae_tiny.pt "
                     "if present, else runs/vae/ckpt.pt)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                     help="bf16 autocast (auto: on for CUDA, off on CPU)")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1 by default: "
                     "the tiny presets' small ops ran 3-30x faster on 1 thread than on 2 on a shared 2-core machine")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-every", type=int, default=50)
    run.add_argument("--eval-every", type=int, default=500)
    run.add_argument("--save-every", type=int, default=500)
    if known.stage is None:
        p.error("--stage is required: vae, a2l or l2i")
    cls = config_class(known.stage)
    try:
        base = cls.preset(known.preset)
    except ValueError as err:
        p.error(str(err))
    model = p.add_argument_group(f"{cls.__name__} fields (defaults from preset {known.preset!r})")
    notes = field_notes(cls)
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name)
        note = notes.get(f.name, "")
        model.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, type=_flag_type(default),
                           default=default, help=f"{note} (default {default})" if note else f"default {default}")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, "cfg_" + f.name) for f in dataclasses.fields(cls)}
    args.config = cls(**overrides)
    args.out = args.out or os.path.join("runs", args.stage)
    return args


# ----------------------------------------------------------------------------------------------------------
# Data shared by the stages
# ----------------------------------------------------------------------------------------------------------

def clip_paths(folder: str | None, split: str, clips: int, seed: int = 0, cache: str = "cache") -> list[str]:
    """npz paths of a clip folder, or of synthetic clips generated on first use."""
    if folder is None:
        from data import ensure_synthetic
        return ensure_synthetic(split, clips, seed, root=os.path.join(cache, "synth"))
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if not paths:
        raise UsageError(f"no clips (*.npz with .mp4 beside) in {folder}; make some with `python data.py synth`")
    return paths


def load_frames(paths: list[str], size: int, cache: str, face_iod: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the clips at size x size, uint8 (N, size, size, 3), and their landmarks scaled to that
    size (N, 478, 3); decoded once and cached as .npy (memory-mapped on later runs). face_iod > 0 cuts face
    crops with that inter-ocular fraction out of the full-resolution frames (VAEConfig.face_iod)."""
    from data import load_clip, read_frames
    from landmarks import crop_clip_faces
    framing = [face_iod] if face_iod else []  # the rendered framing keeps its cache keys
    key = hashlib.sha1(json.dumps([os.path.abspath(p) for p in paths] + [size] + framing).encode()).hexdigest()[:12]
    f_path, l_path = (os.path.join(cache, "frames", f"{key}_{n}.npy") for n in ("frames", "landmarks"))
    if not (os.path.exists(f_path) and os.path.exists(l_path)):
        frames, lmks = [], []
        for p in paths:
            clip = load_clip(p)
            video = read_frames(p[:-4] + ".mp4", None if face_iod else size)  # (T, H, W, 3)
            T = min(len(video), len(clip["landmarks"]))
            P = clip["landmarks"][:T] * (video.shape[1] / clip["frame_size"])  # pixel coords of `video`
            video, P = crop_clip_faces(video[:T], P, size, face_iod) if face_iod else (video[:T], P)
            frames.append(video)
            lmks.append(P)
        atomic_write(f_path, lambda tmp: np.save(open(tmp, "wb"), np.concatenate(frames)))
        atomic_write(l_path, lambda tmp: np.save(open(tmp, "wb"), np.concatenate(lmks).astype(np.float32)))
    return np.load(f_path, mmap_mode="r"), np.load(l_path)


def extra_identity_frames(identities: int, size: int, seed: int, cache: str, face_iod: float = 0.0) -> np.ndarray:
    """data.appearance_frames (12 stills of each of `identities` extra random identities), cached as .npy."""
    from data import appearance_frames
    framing = f"_iod{face_iod:g}" if face_iod else ""
    path = os.path.join(cache, "frames", f"identities_{identities}_{size}_{seed}{framing}.npy")
    if not os.path.exists(path):
        frames = appearance_frames(identities, 12, size, seed, face_iod=face_iod)
        atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), frames))
    return np.load(path)


# ----------------------------------------------------------------------------------------------------------
# Stages: each gives the model, a batch, the loss, held-out evaluation and a picture
# ----------------------------------------------------------------------------------------------------------

class VAEStage:
    """The frozen E / D of L2I (Fig. 2), trained first: L1 + KL (+ optional PatchGAN), see vae.py."""

    def __init__(self, args, device):
        import landmarks
        from vae import FrameDataset, mouth_weight_map
        self.args, self.cfg, self.device = args, args.config, device
        size = self.cfg.resolution
        paths = clip_paths(args.data, "train", args.clips, args.seed, args.cache)
        stored = size * (2 if self.cfg.crop_scale < 1 else 1)
        frames, P = load_frames(paths, stored, args.cache, self.cfg.face_iod)
        some = P[np.linspace(0, len(P) - 1, min(1000, len(P))).astype(int)] * (size / stored)
        # where the mouth lies in the aligned crops (from 1,000 training frames), for the L1 and for D
        self.pixel_weight, self.disc_weight_map = (
            mouth_weight_map(some, size, w).to(device) if w != 1.0 else None
            for w in (self.cfg.mouth_weight, self.cfg.disc_mouth_weight))
        if self.cfg.extra_identities:
            frames = np.concatenate([frames, extra_identity_frames(self.cfg.extra_identities, stored, args.seed,
                                                                   args.cache, self.cfg.face_iod)])
        self.train = FrameDataset(frames, hflip=self.cfg.hflip, colour_jitter=self.cfg.colour_jitter,
                                  natural_mix=self.cfg.natural_mix, seed=args.seed, crop_scale=self.cfg.crop_scale,
                                  size=size)
        e_paths = clip_paths(args.eval_data, "test", args.eval_clips, args.seed, args.cache)
        e_frames, e_lmks = load_frames(e_paths, size, args.cache, self.cfg.face_iod)
        pick = np.linspace(0, len(e_frames) - 1, min(256, len(e_frames))).astype(int)
        self.eval_x = FrameDataset.to_tensor(np.asarray(e_frames[pick]))  # (E, 3, size, size)
        masks = [landmarks.mouth_mask(P, (size, size)) for P in e_lmks[pick]]  # E x (size, size)
        self.eval_mask = torch.from_numpy(np.stack(masks))[:, None]  # (E, 1, size, size)
        self.disc = None

    def build(self):
        from vae import AutoencoderKL, PatchDiscriminator
        model = AutoencoderKL(self.cfg)
        if self.cfg.finetune_decoder:
            if not self.args.init and not self.args.resume:
                raise UsageError("--finetune-decoder needs the VAE to fine-tune: pass --init CKPT")
            model.encoder.requires_grad_(False)
            model.quant_conv.requires_grad_(False)
        if self.cfg.adversarial:
            self.disc = PatchDiscriminator(3, self.cfg.disc_channels, self.cfg.disc_layers).to(self.device)
            if dist.is_initialized():  # every rank starts from rank 0's discriminator (DDP does this for the model)
                for p in self.disc.parameters():
                    dist.broadcast(p.data, 0)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)
        return model

    def batch(self, gen):
        return self.train.random_batch(self.cfg.batch_size, gen).to(self.device)

    def loss(self, model, x, step):
        from vae import vae_loss
        if self.disc is None:
            return vae_loss(model, x, None, step, pixel_weight=self.pixel_weight)
        loss, logs, x_rec = vae_loss(model, x, self.disc, step, return_rec=True, pixel_weight=self.pixel_weight,
                                     disc_weight_map=self.disc_weight_map)
        return loss, logs, lambda: self._disc_step(model, x, x_rec, step, logs)

    def _disc_step(self, model, x, x_rec, step, logs):
        from vae import discriminator_loss
        self.disc_opt.zero_grad(set_to_none=True)  # the generator term wrote gradients here
        d_loss, d_logs = discriminator_loss(model, self.disc, x, x_rec, step, self.disc_weight_map)
        d_loss.backward()
        if dist.is_initialized():  # the discriminator is not inside DDP: average its gradients by hand
            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        self.disc_opt.step()
        logs.update(d_logs)

    @torch.no_grad()
    def evaluate(self, model):
        from vae import psnr
        rec = torch.cat([model.decode(model.encode(x.to(self.device)).mode()).cpu()
                         for x in self.eval_x.split(32)])
        return {"psnr": psnr(rec, self.eval_x), "psnr_mouth": psnr(rec, self.eval_x, mask=self.eval_mask)}

    @torch.no_grad()
    def picture(self, model, path):
        from vae import to_uint8
        x = self.eval_x[:8].to(self.device)
        rec = model.decode(model.encode(x).mode())
        rows = [np.concatenate(list(to_uint8(t)), axis=1) for t in (x, rec)]  # truth / reconstruction
        save_png(path, np.concatenate(rows, axis=0))

    def finish(self, model):
        """LDM's scale_by_std: latents are multiplied by 1 / std before diffusion (kept as it was when only the
        decoder is fine-tuned: the latents did not change)."""
        if not self.cfg.finetune_decoder:
            with torch.no_grad():
                model.measure_scale_factor([self.train.random_batch(32).to(self.device) for _ in range(8)])
        out = {"scale_factor": float(model.scale_factor)}
        if self.disc is not None:  # so --resume continues the adversarial game instead of restarting it
            out.update(discriminator=self.disc.state_dict(), disc_optimizer=self.disc_opt.state_dict())
        return out

    def restore(self, extra: dict) -> None:
        if self.disc is not None and "discriminator" in extra:
            self.disc.load_state_dict(extra["discriminator"])
            self.disc_opt.load_state_dict(extra["disc_optimizer"])


class A2LStage:
    """Audio-to-landmark diffusion (Sec. 3.1): windows of canonical landmarks from audio and P̄, see a2l.py."""

    def __init__(self, args, device):
        from a2l import A2LWindows, compute_residual_std
        self.args, self.cfg, self.device = args, args.config, device
        kw = dict(context_frames=self.cfg.context_frames, n_mels=self.cfg.n_mels)
        self.train = A2LWindows(clip_paths(args.data, "train", args.clips, args.seed, args.cache),
                                self.cfg.window, train=True, **kw)
        eval_paths = clip_paths(args.eval_data, "test", args.eval_clips, args.seed, args.cache)
        self.eval = A2LWindows(eval_paths[:4], self.cfg.window, train=False, **kw)  # 4 clips: a quick check
        self.residual_std = compute_residual_std(self.train)

    def build(self):
        from a2l import A2L
        model = A2L(self.cfg)
        model.set_residual_std(self.residual_std)
        return model

    def batch(self, gen):
        idx = torch.randint(len(self.train), (self.cfg.batch_size,), generator=gen).tolist()
        batch = torch.utils.data.default_collate([self.train[i] for i in idx])
        return {k: v.to(self.device) for k, v in batch.items()}

    def loss(self, model, batch, step):
        return model.loss(batch)

    def evaluate(self, model):
        from evaluate import a2l_predictions, landmark_metrics
        self.results = a2l_predictions(model, self.eval, seed=0)
        return landmark_metrics([r["pred"] for r in self.results], [r["truth"] for r in self.results])

    def picture(self, model, path):
        from evaluate import plot_opening
        plot_opening(self.results[0], path, "held-out clip: mouth opening (IOD)")


class L2IStage:
    """Landmark-to-image latent diffusion (Sec. 3.2, Fig. 2) on latents of a frozen, already trained VAE.

    Every condition image is a function of one frame, so each frame's E(frame), E(masked frame) and
    E(landmark image) are encoded once (`l2i.L2ILatents`) and training never runs the VAE.
    """

    def __init__(self, args, device):
        from l2i import L2IFrames
        from dreamhead import load_model
        self.args, self.cfg, self.device = args, args.config, device
        self.vae = load_model(self.vae_path(args), "vae", device)
        if self.vae.cfg.resolution != self.cfg.image_size or self.vae.cfg.latent_shape[1] != self.cfg.latent_size:
            raise UsageError(f"the VAE works at {self.vae.cfg.resolution} px -> {self.vae.cfg.latent_shape}, but "
                             f"L2I expects {self.cfg.image_size} px -> latents of {self.cfg.latent_size}; "
                             "use a matching --vae checkpoint or preset")
        cfg = self.cfg
        if self.vae.cfg.face_iod != cfg.face_iod:
            raise UsageError(f"the VAE was trained on frames framed with --face-iod {self.vae.cfg.face_iod:g}, L2I "
                             f"asks for {cfg.face_iod:g}; pass --face-iod {self.vae.cfg.face_iod:g} or a matching --vae")
        kw = dict(size=cfg.image_size, tau_min=cfg.tau_min, tau_max=cfg.tau_max, mask_expand=cfg.mask_expand,
                  face_iod=cfg.face_iod)
        paths = clip_paths(args.data, "train", args.clips, args.seed, args.cache)
        self.train = self.encoded(L2IFrames(paths, train=True, tau_both_sides=cfg.tau_both_sides, **kw), paths)
        paths = clip_paths(args.eval_data, "test", args.eval_clips, args.seed, args.cache)[:4]
        self.eval_frames = L2IFrames(paths, train=False, **kw)
        self.eval_latents = self.encoded(self.eval_frames, paths)
        self.eval_idx = np.linspace(0, len(self.eval_frames) - 1, 16).astype(int).tolist()

    def encoded(self, frames, paths: list[str]):
        """L2ILatents of these frames, cached on disk per VAE checkpoint (encoding is most of the set-up time)."""
        from l2i import L2ILatents
        with open(self.vae_path(self.args), "rb") as f:
            vae_sha = hashlib.sha1(f.read()).hexdigest()
        framing = [frames.face_iod] if frames.face_iod else []  # the rendered framing keeps its cache keys
        key = hashlib.sha1(json.dumps([[os.path.abspath(p) for p in paths], frames.size, frames.mask_expand,
                                       vae_sha] + framing).encode())
        path = os.path.join(self.args.cache, "l2i_latents", key.hexdigest()[:12] + ".pt")
        if os.path.exists(path):
            return L2ILatents(frames, None, latents=torch.load(path, weights_only=True))
        dataset = L2ILatents(frames, self.vae)
        atomic_write(path, lambda tmp: torch.save(dataset.latents, tmp))
        return dataset

    @staticmethod
    def vae_path(args) -> str:
        if args.vae:
            return args.vae
        shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "vae_tiny.pt")
        return shipped if args.preset == "tiny" and os.path.exists(shipped) else os.path.join("runs", "vae", "ckpt.pt")

    def build(self):
        from l2i import L2I
        return L2I(self.cfg)

    def _collate(self, dataset, idx):
        batch = torch.utils.data.default_collate([dataset[i] for i in idx])
        return {k: v.to(self.device) for k, v in batch.items() if v.dtype.is_floating_point}

    def batch(self, gen):
        return self._collate(self.train, torch.randint(len(self.train), (self.cfg.batch_size,), generator=gen).tolist())

    def loss(self, model, batch, step):
        return model.loss(batch["z0"], batch)

    @torch.no_grad()
    def generate(self, model):
        """Generated frames for the fixed held-out items, with their targets, references and mouth masks."""
        cond = self._collate(self.eval_latents, self.eval_idx)
        z0 = model.sample(cond, generator=torch.Generator().manual_seed(0))
        items = [self.eval_frames[i] for i in self.eval_idx]
        stack = lambda key: torch.stack([it[key] for it in items])  # (N, C, size, size)
        return self.vae.decode_latents(z0).clamp(-1, 1).cpu(), stack("target"), stack("ref"), stack("lmk"), stack("mouth")

    def evaluate(self, model):
        """Mouth-box PSNR of generated frames, beside the baseline that copies the reference frame's mouth."""
        from vae import psnr
        self.samples = gen, target, ref, _, mouth = self.generate(model)
        return {"psnr_mouth": psnr(gen, target, mask=mouth), "psnr_mouth_copy_ref": psnr(ref, target, mask=mouth)}

    def picture(self, model, path):
        """Rows: reference | target landmark image | generated | truth (the samples of the last evaluate)."""
        from vae import to_uint8
        gen, target, ref, lmk, _ = self.samples
        rows = [np.concatenate(list(to_uint8(x[:8])), axis=1) for x in (ref, lmk, gen, target)]
        save_png(path, np.concatenate(rows, axis=0))


def stage_runner(args, device):
    if args.stage == "vae":
        return VAEStage(args, device)
    if args.stage == "a2l":
        return A2LStage(args, device)
    return L2IStage(args, device)


# ----------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------

def plot_history(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    keys = [k for k in (evals[0] if evals else {}) if k not in ("kind", "step")]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3), squeeze=False)
    axes[0, 0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0, 0].set(title="train loss", xlabel="step", yscale="log")
    for ax, k in zip(axes[0, 1:], keys):
        ax.plot([h["step"] for h in evals], [h[k] for h in evals], marker="o")
        ax.set(title=f"held-out {k}", xlabel="step")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------

class StageLoss(torch.nn.Module):
    """The stage's loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, step: int):
        return self.loss_fn(self.model, batch, step)


def setup_distributed(device_name: str):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    cfg = args.config
    torch.manual_seed(args.seed + rank)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    stage = stage_runner(args, device)
    model = stage.build().to(device)
    if args.init and not args.resume:
        try:
            model.load_state_dict(load_checkpoint(args.init, args.stage)["ema"])
        except RuntimeError:
            raise UsageError(f"--init {args.init} has another architecture than this run's config; pass the same "
                             "--preset and model flags it was trained with") from None
    ema = EMA(model, getattr(cfg, "ema_decay", 0.999))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=getattr(cfg, "betas", (0.9, 0.999)),
                            weight_decay=getattr(cfg, "weight_decay", 0.0))
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step, history, extra = 0, [], {}
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, args.stage)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if ckpt["optimizer"] is None:
            raise UsageError(f"{ckpt_path} is an exported checkpoint without optimizer state; resume from the "
                             "training run's own ckpt.pt")
        opt.load_state_dict(ckpt["optimizer"])
        step, history, extra = ckpt["step"], ckpt.get("history", []), ckpt.get("extra", {})
        if hasattr(stage, "restore"):
            stage.restore(extra)
        ema.num_updates = step
    loss_module = StageLoss(model, stage.loss)
    if world > 1:  # gradients are all-reduced only through DDP's forward, so the loss runs inside it
        loss_module = torch.nn.parallel.DistributedDataParallel(loss_module)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    warmup = getattr(cfg, "warmup", min(500, cfg.steps // 20))
    os.makedirs(args.out, exist_ok=True)

    def checkpoint():
        if rank != 0:
            return
        extra.update(stage.finish(model) if hasattr(stage, "finish") else {})
        ema.copy_buffers(model)  # buffers that finish() set (e.g. the VAE's scale factor) go into the EMA too
        save_checkpoint({"stage": args.stage, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
                         "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step, "extra": extra,
                         "history": history, "version": 1}, ckpt_path)
        plot_history(history, os.path.join(args.out, "loss.png"))

    def evaluate():
        if rank != 0:
            return
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.state_dict())  # evaluate and draw the EMA weights, as sampling does
        model.eval()
        metrics = stage.evaluate(model)
        stage.picture(model, os.path.join(args.out, f"samples_{step:06d}.png"))
        model.load_state_dict(backup)
        model.train()
        history.append({"kind": "eval", "step": step, **metrics})
        print(f"[eval] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc=f"train {args.stage}", unit="step")
    t0, logs_acc = time.time(), []
    try:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.lr, warmup, cfg.steps)
            batch = stage.batch(gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = loss_module(batch, step)
            loss, logs = out[0], out[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, getattr(cfg, "grad_clip", 1.0))
            opt.step()
            if len(out) > 2:  # a second optimiser of the stage (the VAE's discriminator)
                out[2]()
            ema.update(model)
            step += 1
            bar.update()
            logs_acc.append(logs["loss"] if "loss" in logs else float(loss))
            if step % args.log_every == 0 or step == cfg.steps:
                history.append({"kind": "train", "step": step, "loss": float(np.mean(logs_acc)),
                                "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                                "sec_per_step": (time.time() - t0) / len(logs_acc)})
                bar.set_postfix(loss=f"{np.mean(logs_acc):.4g}")
                t0, logs_acc = time.time(), []
            if step % args.eval_every == 0 or step == cfg.steps:
                evaluate()
            if step % args.save_every == 0 or step == cfg.steps:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)")
        sys.exit(130)
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return ckpt_path if rank == 0 else None


def export(src: str, dst: str, stage: str) -> None:
    """A sampling-only copy of a checkpoint: the EMA weights as both `model` and `ema` (stored once), no
    optimizer state; config, step, extra and history stay, so load_model and the README numbers still work."""
    ckpt = load_checkpoint(src, stage)
    ckpt.update(model=ckpt["ema"], optimizer=None)
    save_checkpoint(ckpt, dst)
    print(f"exported {src} (step {ckpt['step']}) -> {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return export(os.path.join(args.out, "ckpt.pt"), args.export, args.stage)
    path = train(args)
    if path:
        print(f"saved {path}")


if __name__ == "__main__":
    run_cli(main)
