"""Train one DreamHead stage: `python train.py --stage vae|a2l|l2i [--preset tiny|paper] [--flags]`.

The paper trains its cascade stage by stage: the A2L diffusion model ([A2L: Audio] -> [A2L: P_0]) and the L2I
latent diffusion model ([L2I: eps_theta], landmarks -> image), whose frozen autoencoder ([L2I: E], [L2I: D])
comes first. Here every stage shares one plain training loop (nanoGPT style, no framework):

    AdamW, linear warm-up + cosine decay (`common.lr_at`), gradient clipping, EMA of the weights,
    optional bf16 autocast on CUDA, DDP under torchrun (NCCL on GPUs, gloo on CPU), rank-0 logging,
    periodic held-out evaluation, a loss-curve PNG and sample pictures, resume, and a checkpoint on Ctrl-C.

Flags: every field of the stage's config dataclass (`VAEConfig`, `A2LConfig`, `L2IConfig`) and of its training
block (`common.TrainConfig`) is a flag whose default comes from the chosen preset and whose help is the field's
sentence, plus the run flags below. With no data flag the stage trains on synthetic talking heads
(synth_clips.py) generated into cache/ on first use; `--data DIR` takes any folder of clips in the clip format
(clips.py), or a folder made by `python prepare.py` from ordinary videos, whose train split it trains on and
whose test split it evaluates on. Data is read from memory-mapped caches by a DataLoader, so memory does not
grow with the dataset.

Batches: each step's global batch (batch_size x processes items, each with its own seed) is a function of the
run's seed and the step alone (common.step_items); each process takes its slice, in `accum` micro-batches, and
every random draw of a sample (augmentation, noise, timestep, condition dropout) comes from its seed. So a run on
N processes computes the same steps as one process with the same global batch, and --resume after any kill
continues exactly as the uninterrupted run. The checkpoint is one dict {stage, version, config, model, ema,
optimizer, step, extra, history} (an L2I checkpoint adds `vae`: the fingerprint and config of the VAE it was
trained on) from which sample.py rebuilds everything. Ctrl-C and SIGTERM save a checkpoint and exit with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import hashlib
import os
import signal
import sys
import time

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import landmarks
from a2l import A2L, A2LConfig, A2LWindows, compute_residual_std, predict_clips
from cli import ArgumentParser, UsageError, float_flag, run_cli
from clips import clip_frames, is_prepared
from common import (EMA, TRAIN_FIELDS, SampleRandom, TrainConfig, atomic_write, fix_mmap_threshold, load_checkpoint,
                    lr_at, pick_device, save_checkpoint, save_png, step_items, to_tensor_image, to_uint8_image,
                    weights_sha1)
from dreamhead import load_model
from l2i import L2I, L2IConfig, L2IFrames, L2ILatents, check_vae_matches
from metrics import landmark_metrics, plot_opening, psnr
from neutral import NeutralFace
from synth_clips import PORTRAITS, appearance_frames, clips_or_synthetic, voices_flag
from vae import AutoencoderKL, FrameDataset, PatchDiscriminator, VAEConfig, discriminator_loss, mouth_weight_map, \
    vae_loss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

CONFIGS = {"vae": VAEConfig, "a2l": A2LConfig, "l2i": L2IConfig}


# ----------------------------------------------------------------------------------------------------------
# Command line: dataclass fields -> flags
# ----------------------------------------------------------------------------------------------------------

BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _boolean(text: str) -> bool:
    if text.lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; give true or false")
    return BOOLEANS[text.lower()]


def _flag_type(default):
    if isinstance(default, bool):
        return _boolean
    if isinstance(default, tuple):
        kind = float_flag if default and isinstance(default[0], float) else int
        return lambda s: tuple(kind(v) for v in s.split(",") if v)
    return float_flag if isinstance(default, float) else type(default)


def _add_fields(group, cls, defaults, prefix: str) -> None:
    """One flag per field of a config dataclass (the nested training block is added on its own), its help the
    field's sentence and its default the preset's value."""
    for f in dataclasses.fields(cls):
        if f.name == "train":
            continue
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument("--" + f.name.replace("_", "-"), dest=prefix + f.name, type=_flag_type(default),
                           default=default, metavar=f.name.upper(), help=f"{f.metadata['help']} (default: {shown})")


def run_flags(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run flags (not part of the model config)")
    run.add_argument("--data", nargs="+", default=None, metavar="FOLDER", help="Folders of training clips in the "
                     "clip format (NAME.npz with NAME.mp4 beside it, clips.py; of a prepared folder, its train split), "
                     "trained on together; by default synthetic talking heads are generated into --cache.")
    run.add_argument("--eval-data", default=None, help="Folder of held-out clips; by default the synthetic test "
                     "split.")
    run.add_argument("--clips", type=int, default=64, help="Synthetic training clips to generate.")
    run.add_argument("--eval-clips", type=int, default=20, help="Synthetic held-out clips to generate.")
    run.add_argument("--poses", default="small", choices=("small", "wide"), help="Head motion of the synthetic "
                     "clips: small (at most 4 degrees, as the shipped models saw) or wide (yaw +-25, pitch and roll "
                     "+-15 degrees, shifts and scale, like talking-head footage; synth_speech.wide_pose_track).")
    run.add_argument("--voices", type=voices_flag, default="espeak", help="Speech engines of the synthetic "
                     "training clips, comma-separated: espeak (as the shipped models heard), flite, festival, piper, "
                     "recorded, or all installed ones (voices.py, install_voices.sh); the held-out split stays espeak.")
    run.add_argument("--portraits", default="base", choices=PORTRAITS, help="Base photos of the synthetic training "
                     "clips' faces: base (astronaut, Grace Hopper, as every shipped model saw) or all (and the five "
                     "real photos of assets/portraits/; synth_face.PORTRAIT_IDENTITIES); the held-out split keeps its "
                     "identities.")
    run.add_argument("--cache", default="cache", help="Folder for generated data, decoded frames and latents.")
    run.add_argument("--out", default=None, help="Run folder; by default runs/<stage>.")
    run.add_argument("--resume", action="store_true", help="Continue the run from <out>/ckpt.pt.")
    run.add_argument("--init", default=None, metavar="CKPT", help="Start from this checkpoint's EMA weights (same "
                     "stage and architecture) with a fresh optimizer at step 0, e.g. for the VAE's "
                     "--finetune-decoder.")
    run.add_argument("--export", default=None, metavar="PATH", help="Do not train: write a sampling-only copy of "
                     "<out>/ckpt.pt (EMA weights, no optimizer state) to PATH, as checkpoints/*_tiny.pt were made; "
                     "its sampling settings (--sample-steps, --eta, --guidance: not learned) are this command's.")
    run.add_argument("--vae", default=None, help="VAE checkpoint of --stage l2i; by default checkpoints/vae_tiny.pt "
                     "with the tiny preset when shipped, else runs/vae/ckpt.pt.")
    run.add_argument("--device", default="auto", help="Device: auto (CUDA when present), cpu or cuda.")
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                     help="Autocast to bf16: auto turns it on for CUDA and off on CPU.")
    run.add_argument("--loader-workers", type=int, default=None, help="DataLoader worker processes reading the "
                     "batches; by default 4 on CUDA and 0 on CPU (the tiny presets' items are cheap to read, and "
                     "workers would take cores from the model).")
    run.add_argument("--threads", type=int, default=1, help="Torch CPU threads, 0 for torch's default; the tiny "
                     "presets' small ops ran 3-30x faster on 1 thread than on 2 on a shared 2-core machine.")
    run.add_argument("--seed", type=int, default=0, help="Seed of the data order, initialisation and noise.")
    run.add_argument("--log-every", type=int, default=50, help="Steps between logged training losses.")
    run.add_argument("--eval-every", type=int, default=500, help="Steps between held-out evaluations and pictures.")
    run.add_argument("--save-every", type=int, default=500, help="Steps between checkpoints.")


def build_parser(stage: str | None, preset: str = "tiny") -> argparse.ArgumentParser:
    """The command line of one stage and preset: run flags, the config's fields and its training settings."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=tuple(CONFIGS), default=None, help="The stage to train: vae, a2l or l2i.")
    p.add_argument("--preset", default="tiny", help="Named preset of the stage's config: tiny (CPU minutes) or paper "
                   "(GPU scale).")
    run_flags(p)
    if stage is None:
        p.error("--stage is required: vae, a2l or l2i")
    cls = CONFIGS[stage]
    try:
        base = cls.preset(preset)
    except ValueError as err:
        p.error(str(err))
    _add_fields(p.add_argument_group(f"{cls.__name__} fields (defaults from preset {preset!r})"), cls, base, "cfg_")
    _add_fields(p.add_argument_group(f"training settings, TrainConfig (defaults from preset {preset!r})"),
                TrainConfig, base.train, "train_")
    return p


def parse_args(argv=None):
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=tuple(CONFIGS), default=None)
    pre.add_argument("--preset", default="tiny")
    known, _ = pre.parse_known_args(argv)
    args = build_parser(known.stage, known.preset).parse_args(argv)
    cls = CONFIGS[args.stage]
    train = TrainConfig(**{k: getattr(args, "train_" + k) for k in TRAIN_FIELDS})
    overrides = {f.name: getattr(args, "cfg_" + f.name) for f in dataclasses.fields(cls) if f.name != "train"}
    args.config = cls(**overrides, train=train)
    args.out = args.out or os.path.join("runs", args.stage)
    return args


# ----------------------------------------------------------------------------------------------------------
# Data shared by the stages
# ----------------------------------------------------------------------------------------------------------

def train_clips(args) -> list[str]:
    """The training clips: --data's (a prepared folder's train split), or the synthetic training split spoken
    by --voices with faces from --portraits."""
    if args.data is None:
        print(f"synthetic training speech: {', '.join(args.voices)}")
        return clips_or_synthetic(None, "train", args.clips, args.seed, args.cache, poses=args.poses,
                                  voices=args.voices, portraits=args.portraits)
    return [p for folder in args.data for p in clips_or_synthetic(folder, "train", args.clips)]


def eval_clips(args) -> list[str]:
    """The held-out clips: --eval-data's, or the test split of the first prepared --data folder, or the synthetic
    test split."""
    folder = args.eval_data or next((d for d in args.data or () if is_prepared(d)), None)
    return clips_or_synthetic(folder, "test", args.eval_clips, args.seed, args.cache, poses=args.poses)


def extra_identity_frames(identities: int, size: int, seed: int, cache: str, face_iod: float = 0.0,
                          poses: str = "small", portraits: str = "base") -> np.ndarray:
    """synth_clips.appearance_frames (12 stills of each of `identities` extra random identities), cached as .npy."""
    framing = (f"_iod{face_iod:g}" if face_iod else "") + ("" if poses == "small" else f"_{poses}") + \
        ("" if portraits == "base" else f"_portraits_{portraits}")
    path = os.path.join(cache, "frames", f"identities_{identities}_{size}_{seed}{framing}.npy")
    if not os.path.exists(path):
        frames = appearance_frames(identities, 12, size, seed, face_iod=face_iod, poses=poses, portraits=portraits)
        atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), frames))
    return np.load(path)


# ----------------------------------------------------------------------------------------------------------
# Stages: each gives the model, a batch, the loss, held-out evaluation and a picture
# ----------------------------------------------------------------------------------------------------------

class VAEStage:
    """[L2I: E] and [L2I: D], trained first: L1 + KL (+ optional PatchGAN), see vae.py."""

    def __init__(self, args, device):
        self.args, self.config, self.device = args, args.config, device
        size = self.config.resolution
        paths = train_clips(args)
        stored = size * (2 if self.config.crop_scale < 1 else 1)
        frames, P = clip_frames(paths, stored, args.cache, self.config.face_iod)
        some = P[np.linspace(0, len(P) - 1, min(1000, len(P))).astype(int)] * (size / stored)
        # where the mouth lies in the aligned crops (from 1,000 training frames), for the L1 and for D
        self.pixel_weight, self.disc_weight_map = (
            mouth_weight_map(some, size, w).to(device) if w != 1.0 else None
            for w in (self.config.mouth_weight, self.config.disc_mouth_weight))
        if self.config.extra_identities:  # read beside the clips' frames (FrameDataset), never copied into RAM
            frames = [frames, extra_identity_frames(self.config.extra_identities, stored, args.seed, args.cache,
                                                    self.config.face_iod, args.poses,
                                                    self.config.extra_portraits)]
        self.train = FrameDataset(frames, hflip=self.config.hflip, colour_jitter=self.config.colour_jitter,
                                  natural_mix=self.config.natural_mix, natural_dir=self.config.natural_dir,
                                  seed=args.seed, crop_scale=self.config.crop_scale, size=size)
        e_paths = eval_clips(args)
        e_frames, e_lmks = clip_frames(e_paths, size, args.cache, self.config.face_iod)
        pick = np.linspace(0, len(e_frames) - 1, min(256, len(e_frames))).astype(int)
        self.eval_x = to_tensor_image(np.asarray(e_frames[pick]))  # (E, 3, size, size)
        masks = [landmarks.mouth_mask(P, (size, size)) for P in e_lmks[pick]]  # E x (size, size)
        self.eval_mask = torch.from_numpy(np.stack(masks))[:, None]  # (E, 1, size, size)
        self.disc = None

    def build(self):
        model = AutoencoderKL(self.config)
        if self.config.finetune_decoder:
            if not self.args.init and not self.args.resume:
                raise UsageError("--finetune-decoder needs the VAE to fine-tune: pass --init CKPT")
            model.encoder.requires_grad_(False)
            model.quant_conv.requires_grad_(False)
        if self.config.adversarial:
            self.disc = PatchDiscriminator(3, self.config.disc_channels, self.config.disc_layers).to(self.device)
            if dist.is_initialized():  # every rank starts from rank 0's discriminator (DDP does this for the model)
                for p in self.disc.parameters():
                    dist.broadcast(p.data, 0)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.config.train.lr,
                                              betas=self.config.train.betas)
        return model

    def loss(self, model, batch, step):
        x, rng = batch["x"], SampleRandom(batch["seed"], self.device)
        if self.disc is None:
            return vae_loss(model, x, None, step, pixel_weight=self.pixel_weight, rng=rng)
        self.disc.requires_grad_(False)  # the generator term's gradient reaches x_rec through D, not D's weights
        try:
            loss, logs, x_rec = vae_loss(model, x, self.disc, step, return_rec=True, pixel_weight=self.pixel_weight,
                                         disc_weight_map=self.disc_weight_map, rng=rng)
        finally:
            self.disc.requires_grad_(True)
        return loss, logs, lambda micro, accum: self._disc_step(model, x, x_rec, step, logs, micro, accum)

    def _disc_step(self, model, x, x_rec, step, logs, micro: int, accum: int):
        """The discriminator's gradient of micro-batch `micro` of `accum`; its step after the last one."""
        if micro == 0:
            self.disc_opt.zero_grad(set_to_none=True)
        d_loss, d_logs = discriminator_loss(model, self.disc, x, x_rec, step, self.disc_weight_map)
        (d_loss / accum).backward()
        logs.update(d_logs)
        if micro < accum - 1:
            return
        if dist.is_initialized():  # the discriminator is not inside DDP: average its gradients by hand
            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        self.disc_opt.step()

    @torch.no_grad()
    def evaluate(self, model):
        rec = torch.cat([model.decode(model.encode(x.to(self.device)).mode()).cpu()
                         for x in self.eval_x.split(32)])
        return {"psnr": psnr(rec, self.eval_x), "psnr_mouth": psnr(rec, self.eval_x, mask=self.eval_mask)}

    @torch.no_grad()
    def picture(self, model, path):
        x = self.eval_x[:8].to(self.device)
        rec = model.decode(model.encode(x).mode())
        rows = [np.concatenate(list(to_uint8_image(t)), axis=1) for t in (x, rec)]  # truth / reconstruction
        save_png(path, np.concatenate(rows, axis=0))

    def finish(self, model):
        """LDM's scale_by_std: latents are multiplied by 1 / std before diffusion (kept as it was when only the
        decoder is fine-tuned: the latents did not change)."""
        if not self.config.finetune_decoder:  # on frames of its own generator: saving draws nothing from training's
            frames = torch.Generator().manual_seed(0)  # random streams, so a resumed run stays the uninterrupted one
            with torch.no_grad():
                model.measure_scale_factor([self.train.random_batch(32, frames).to(self.device) for _ in range(8)])
        out = {"scale_factor": float(model.scale_factor)}
        if self.disc is not None:  # so --resume continues the adversarial game instead of restarting it
            out.update(discriminator=self.disc.state_dict(), disc_optimizer=self.disc_opt.state_dict())
        return out

    def restore(self, extra: dict) -> None:
        if self.disc is not None and "discriminator" in extra:
            self.disc.load_state_dict(extra["discriminator"])
            self.disc_opt.load_state_dict(extra["disc_optimizer"])


class A2LStage:
    """Audio-to-landmark diffusion ([A2L: Audio] -> [A2L: P_0]): windows of canonical landmarks from audio and
    P̄, see a2l.py."""

    def __init__(self, args, device):
        self.args, self.config, self.device = args, args.config, device
        kw = dict(context_frames=self.config.context_frames, n_mels=self.config.n_mels)
        self.train = A2LWindows(train_clips(args), self.config.window, train=True,
                                random_frame_p=self.config.pbar_frame_prob, cache=args.cache,
                                augmentation=self.config.augmentation(), **kw)
        eval_paths = eval_clips(args)
        self.eval = A2LWindows(eval_paths[:4], self.config.window, train=False, **kw)  # 4 clips: a quick check
        self.residual_std = compute_residual_std(self.train)
        c, self.neutral = self.config, None
        if c.neutral_modes:  # P̄'s neutral face, fitted once on the training clips
            self.neutral = NeutralFace(c.n_coords, c.neutral_modes, c.neutral_noise)
            self.neutral.fit((clip["P"], clip["identity"]) for clip in self.train.clips)

    def build(self):
        model = A2L(self.config)
        model.set_residual_std(self.residual_std)
        if self.neutral is not None:
            model.neutral.load_state_dict(self.neutral.state_dict())
        return model

    def loss(self, model, batch, step):
        return model.loss(batch)

    def evaluate(self, model):
        self.results = predict_clips(model, self.eval, seed=0)
        return landmark_metrics([r["pred"] for r in self.results], [r["truth"] for r in self.results])

    def picture(self, model, path):
        plot_opening(self.results[0], path, "held-out clip: mouth opening (IOD)")


class L2IStage:
    """Landmark-to-image latent diffusion ([L2I: eps_theta]) on latents of a frozen, already trained VAE.

    Every condition image is a function of one frame, so each frame's E(frame), E(masked frame) and
    E(landmark image) are encoded once (`l2i.L2ILatents`) and training never runs the VAE.
    """

    def __init__(self, args, device):
        self.args, self.config, self.device = args, args.config, device
        self.vae = load_model(self.vae_path(args), "vae", device)
        check_vae_matches(self.vae.config, self.config)
        cfg = self.config
        kw = dict(size=cfg.image_size, tau_min=cfg.tau_min, tau_max=cfg.tau_max, mask_expand=cfg.mask_expand,
                  face_iod=cfg.face_iod)
        with open(self.vae_path(args), "rb") as f:
            vae_sha = hashlib.sha1(f.read()).hexdigest()  # the latents' cache is per VAE checkpoint
        paths = train_clips(args)
        self.train = L2ILatents.cached(paths, self.vae, vae_sha, args.cache, train=True,
                                       tau_both_sides=cfg.tau_both_sides, **kw)
        paths = eval_clips(args)[:4]
        self.eval_frames = L2IFrames(paths, train=False, **kw)
        self.eval_latents = L2ILatents(self.eval_frames, self.vae)
        self.eval_idx = np.linspace(0, len(self.eval_frames) - 1, 16).astype(int).tolist()

    @staticmethod
    def vae_path(args) -> str:
        if args.vae:
            return args.vae
        shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "vae_tiny.pt")
        return shipped if args.preset == "tiny" and os.path.exists(shipped) else os.path.join("runs", "vae", "ckpt.pt")

    def build(self):
        return L2I(self.config)

    def record(self) -> dict:
        """What the checkpoint must say about the run's inputs: the VAE whose latents L2I learned."""
        return {"vae": {"sha1": weights_sha1(self.vae.state_dict()), "config": self.vae.config.to_dict()}}

    def _collate(self, dataset, idx):
        batch = torch.utils.data.default_collate([dataset[i] for i in idx])
        return {k: v.to(self.device) for k, v in batch.items() if v.dtype.is_floating_point}

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
        self.samples = gen, target, ref, _, mouth = self.generate(model)
        return {"psnr_mouth": psnr(gen, target, mask=mouth), "psnr_mouth_copy_ref": psnr(ref, target, mask=mouth)}

    def picture(self, model, path):
        """Rows: reference | target landmark image | generated | truth (the samples of the last evaluate)."""
        gen, target, ref, lmk, _ = self.samples
        rows = [np.concatenate(list(to_uint8_image(x[:8])), axis=1) for x in (ref, lmk, gen, target)]
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


STALE_TEMPORARIES = (".ckpt.pt.*.tmp", ".loss.png.*.tmp", ".samples_*.png.*.tmp")  # common.temp_beside's names


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporaries of saves that were killed mid-write (SIGKILL, a crash): atomic_write removes its own
    on any exception, so whatever is left in the run folder belongs to no running save."""
    for pattern in STALE_TEMPORARIES:
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            os.remove(path)


class StepSampler(torch.utils.data.Sampler):
    """The batch sampler of a run: for each step from `start`, this process's slice of the step's global batch
    (common.step_items, batch_size x world items), split into `accum` micro-batches of (index, seed) items."""

    def __init__(self, num_items: int, settings: TrainConfig, seed: int, start: int, rank: int, world: int):
        self.num_items, self.seed, self.start, self.total = num_items, seed, start, settings.steps
        self.batch, self.accum, self.rank, self.world = settings.batch_size, settings.accum, rank, world

    def __iter__(self):
        micro = self.batch // self.accum
        for step in range(self.start, self.total):
            items = step_items(self.seed, step, self.num_items, self.batch * self.world)
            mine = items[self.rank * self.batch:(self.rank + 1) * self.batch]
            for m in range(self.accum):
                yield mine[m * micro:(m + 1) * micro]

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum


def batches(dataset, settings: TrainConfig, args, start: int, rank: int, world: int, device):
    """The run's micro-batches from step `start` on, collated by a DataLoader (`--loader-workers` processes read
    the memory-mapped caches in parallel), on the device."""
    if settings.batch_size % settings.accum:
        raise UsageError(f"--batch-size {settings.batch_size} is not divisible by --accum {settings.accum}; give a "
                         "batch that splits into equal micro-batches")
    workers = args.loader_workers if args.loader_workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepSampler(len(dataset), settings, args.seed, start,
                                                                            rank, world),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_mean(values: list[float], device: torch.device) -> float:
    """The mean of the losses logged on every rank (each draws its own batches), not rank 0's alone; every rank
    logs the same number of steps, so the mean of the ranks' means is the mean of all."""
    mean = float(np.mean(values))
    if not dist.is_initialized():
        return mean
    total = torch.tensor(mean, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _interrupt_once(signum, frame):
    """SIGINT and SIGTERM (`kill`, a scheduler's pre-emption) both mean: save a checkpoint and exit 130. Later
    signals are ignored so that they cannot cut that save short: torchrun forwards the Ctrl-C or SIGTERM it got
    to workers that got it already."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def train(args) -> str:
    """Train one stage; returns the checkpoint's path on rank 0 (None on the others). Ctrl-C or SIGTERM saves a
    checkpoint and exits with code 130."""
    previous = {sig: signal.signal(sig, _interrupt_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            # what still holds the group (DDP's reducer, in reference cycles of _train's closures on rank 0) is
            # collected now, not at interpreter exit after the group is gone (the rare abort at DDP exit)
            gc.collect()
            dist.destroy_process_group()


def _train(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    fix_mmap_threshold()  # memory flat in the number of clips while the caches are built
    rank, world, device = setup_distributed(args.device)
    if rank == 0:
        remove_stale_temporaries(args.out)
    cfg = args.config
    torch.manual_seed(args.seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    stage = stage_runner(args, device)
    model = stage.build().to(device)
    if args.init and not args.resume:
        # a checkpoint from before neutral.py lacks the neutral face: this run's fitted one stays
        fitted = {k: v for k, v in model.state_dict().items() if k.startswith("neutral.")}
        try:
            model.load_state_dict({**fitted, **load_checkpoint(args.init, args.stage)["ema"]})
        except RuntimeError:
            raise UsageError(f"--init {args.init} has another architecture than this run's config; pass the same "
                             "--preset and model flags it was trained with") from None
    settings = cfg.train
    ema = EMA(model, settings.ema_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
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
    os.makedirs(args.out, exist_ok=True)

    def checkpoint():
        if rank != 0:
            return
        extra.update(stage.finish(model) if hasattr(stage, "finish") else {})
        ema.copy_buffers(model)  # buffers that finish() set (e.g. the VAE's scale factor) go into the EMA too
        save_checkpoint({"stage": args.stage, "config": cfg.to_dict(), "model": model.state_dict(),
                         "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step, "extra": extra,
                         "history": history, **(stage.record() if hasattr(stage, "record") else {})},
                        ckpt_path)
        plot_history(history, os.path.join(args.out, "loss.png"))

    def evaluate():
        if rank != 0:
            return
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.state_dict())  # evaluate and draw the EMA weights, as sampling does
        model.eval()
        try:
            metrics = stage.evaluate(model)
            stage.picture(model, os.path.join(args.out, f"samples_{step:06d}.png"))
        finally:  # also on Ctrl-C, whose checkpoint must save the trained weights as `model`, not the EMA's
            model.load_state_dict(backup)
            model.train()
        history.append({"kind": "eval", "step": step, **metrics})
        print(f"[eval] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    bar = tqdm(total=settings.steps, initial=step, disable=rank != 0, desc=f"train {args.stage}", unit="step")
    micro_batches = batches(stage.train, settings, args, step, rank, world, device)
    t0, logs_acc, interrupted = time.time(), [], False
    try:
        while step < settings.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, settings.lr, settings.warmup, settings.steps)
            # anything left that draws from torch's own generator (e.g. dropout) starts each step from a seed of
            # the step alone, so a resumed run draws what the uninterrupted one did
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
            opt.zero_grad(set_to_none=True)
            losses = []
            for micro in range(settings.accum):
                sync = world == 1 or micro == settings.accum - 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if sync else loss_module.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        out = loss_module(next(micro_batches), step)
                    (out[0] / settings.accum).backward()
                if len(out) > 2:  # a second optimiser of the stage (the VAE's discriminator)
                    out[2](micro, settings.accum)
                losses.append(out[1]["loss"] if "loss" in out[1] else float(out[0]))
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            opt.step()
            ema.update(model)
            step += 1
            bar.update()
            logs_acc.append(float(np.mean(losses)))
            if step % args.log_every == 0 or step == settings.steps:
                mean = global_mean(logs_acc, device)
                history.append({"kind": "train", "step": step, "loss": mean, "grad_norm": float(grad_norm),
                                "lr": opt.param_groups[0]["lr"], "sec_per_step": (time.time() - t0) / len(logs_acc)})
                bar.set_postfix(loss=f"{mean:.4g}")
                t0, logs_acc = time.time(), []
            if step % args.eval_every == 0 or step == settings.steps:
                evaluate()
            if step % args.save_every == 0 or step == settings.steps:
                checkpoint()
    except KeyboardInterrupt:  # handled below, once its traceback (which may hold DDP's frames) is let go
        interrupted = True
    bar.close()
    del loss_module  # DDP's reducer holds the process group, which train() destroys after this returns or exits
    if interrupted:
        checkpoint()
        if rank == 0:  # the other ranks saved nothing, so they say nothing
            print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)")
        sys.exit(130)
    return ckpt_path if rank == 0 else None


SAMPLING_FIELDS = ("sample_steps", "eta", "guidance", "guidance_rescale")  # fields sampling reads, training not


def export(src: str, dst: str, stage: str, config) -> None:
    """A sampling-only copy of a checkpoint: the EMA weights as both `model` and `ema` (stored once), no
    optimizer state, and the sampling settings of `config` (this command line's); the rest of the config, step,
    extra and history stay, so load_model and the README numbers still work."""
    ckpt = load_checkpoint(src, stage)
    ckpt.update(model=ckpt["ema"], optimizer=None)
    ckpt["config"] = {**ckpt["config"], **{k: getattr(config, k) for k in SAMPLING_FIELDS if hasattr(config, k)}}
    save_checkpoint(ckpt, dst)
    print(f"exported {src} (step {ckpt['step']}) -> {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return export(os.path.join(args.out, "ckpt.pt"), args.export, args.stage, args.config)
    path = train(args)
    if path:
        print(f"saved {path}")


if __name__ == "__main__":
    run_cli(main)
