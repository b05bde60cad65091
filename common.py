"""Run utilities every part of DreamHead shares (ground floor: imports only cli.py's error type).

Not a box of the paper's figure: this is the machinery around it.

* Files and images: `piped` (a decoder's output read as it comes), `atomic_write` (a temporary file beside the
  target, renamed into place, so a crash never leaves a truncated output), `check_writable`, `save_png`, and the
  uint8 <-> [-1, 1] tensor conversions `to_tensor_image` / `to_uint8_image`.
* Configs: `option` (a dataclass field with its `--help` sentence), `Config` (named presets and dict round
  trips shared by `VAEConfig`, `A2LConfig` and `L2IConfig`) and `TrainConfig`, the one block of training
  settings every stage config carries (`config.train`), so every checkpoint records how it was trained.
* Checkpoints: one dict `{stage, version, config, model, ema, optimizer, step, extra, history}`
  (`save_checkpoint`, `load_checkpoint`, which checks the version and upgrades older layouts), `weights_sha1`
  (a fingerprint of a model's weights, how an L2I checkpoint names the VAE it was trained on).
* Training: `EMA` of the weights, the learning-rate schedule `lr_at`, `pick_device`, and the random draws that
  make a step the same on any number of processes and after any resume: `step_items` (a step's global batch of
  items and sample seeds) and `SampleRandom` (each sample's draws from its own seed).
* Caches larger than memory: `NpyWriter` writes an .npy array piece by piece (read back memory-mapped);
  `fix_mmap_threshold` keeps glibc's heap from fragmenting while they are built.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import math
import os
import subprocess
import tempfile
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn as nn

from cli import UsageError

CHECKPOINT_VERSION = 2  # 1: training settings flat in the config, no record of the VAE under an L2I model


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def piped(cmd: list[str]):
    """Run cmd (an ffmpeg decoder) with its stdout as a pipe to read and its stderr in a temporary file (a file,
    not a pipe: the child cannot block on a full stderr): yields (process, stderr file). Leaving the block kills
    a child the reader stopped reading early, and reaps it."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def stderr_text(log) -> str:
    """What a `piped` child wrote to its stderr file."""
    log.seek(0)
    return log.read().decode(errors="replace").strip()


class NpyWriter:
    """Write one .npy array row block by row block, so a cache larger than memory never exists whole:
    `with NpyWriter(path, (H, W, 3), np.uint8) as w: w.write(rows)` gives an (N, H, W, 3) array, N being the
    rows written. The file appears under `path` only when the block closes without error (a temporary beside
    it until then, as atomic_write); the header, of fixed length, is rewritten with N at the end."""
    HEADER = 256  # bytes of magic + header, a multiple of 64 as the .npy format asks

    def __init__(self, path: str, row_shape: tuple, dtype):
        self.path, self.row_shape, self.dtype = path, tuple(int(n) for n in row_shape), np.dtype(dtype)
        self.rows = 0

    def _header(self) -> bytes:
        info = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                "shape": (self.rows, *self.row_shape)}
        text = repr(info).encode("latin1")
        body = self.HEADER - 10  # magic (6) + version (2) + length (2)
        return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + text.ljust(body - 1) + b"\n"

    def __enter__(self):
        self.tmp = temp_beside(self.path)
        self.file = open(self.tmp, "wb")
        self.file.write(self._header())
        return self

    def write(self, rows) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows {rows.shape} do not match the row shape {self.row_shape}")
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.seek(0)
                self.file.write(self._header())
            self.file.close()
            if exc_type is None:
                os.chmod(self.tmp, 0o644)
                os.replace(self.tmp, self.path)
        finally:
            self.file.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def save_png(path: str, image: np.ndarray) -> None:
    """Write an RGB uint8 image (H, W, 3) as a PNG, atomically."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))  # RGB -> BGR for OpenCV
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(png.tobytes()))


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float tensor in [-1, 1], (..., 3, H, W)."""
    x = torch.from_numpy(np.array(img, dtype=np.float32)) / 127.5 - 1.0  # np.array copies: writable
    return x.movedim(-1, -3)  # (..., 3, H, W)


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """float tensor in [-1, 1], (..., 3, H, W) -> uint8 (..., H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


# ----------------------------------------------------------------------------------------------------------
# Configs: one dataclass per model, named presets, one shared block of training settings
# ----------------------------------------------------------------------------------------------------------

def option(default, help: str):
    """A config field with the sentence `train.py --help` prints for its flag (a tuple default for sequences)."""
    return dataclasses.field(default=default, metadata={"help": help})


class Config:
    """Base of the config dataclasses: `preset(name)` builds the dataclass defaults overridden by
    `PRESETS[name]` (a dict of field values; a nested dict for the `train` block), and `from_dict` / `to_dict`
    round-trip a checkpoint's config (lists from a checkpoint come back as tuples, dicts as TrainConfig)."""

    PRESETS: ClassVar[dict] = {}
    LEGACY: ClassVar[dict] = {}  # values of fields that checkpoints written before the field existed lack

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, tuple) and isinstance(value, list):
                setattr(self, f.name, tuple(value))
            elif f.name == "train" and isinstance(value, dict):
                self.train = TrainConfig(**value)

    @classmethod
    def preset(cls, name: str):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; valid presets: {', '.join(cls.PRESETS)}")
        return cls.from_dict(cls.PRESETS[name])

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, values: dict):
        """The config a checkpoint recorded; fields it predates take their LEGACY value, not today's default."""
        return cls.from_dict({**cls.LEGACY, **values})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainConfig(Config):
    """Training settings shared by every stage (AdamW, warm-up + cosine decay, clipping, EMA); each stage's
    presets set them, `train.py` turns them into flags and every checkpoint records them."""

    lr: float = option(1e-4, "Peak learning rate of AdamW, reached after the warm-up.")
    betas: tuple = option((0.9, 0.999), "AdamW's two moment decay rates, given as b1,b2.")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay.")
    warmup: int = option(500, "Steps of linear learning-rate warm-up before the cosine decay.")
    steps: int = option(10_000, "Optimizer steps in the whole run; the cosine decay ends here.")
    batch_size: int = option(8, "Training samples per optimizer step on each process (the global batch is this "
                             "times the number of processes).")
    accum: int = option(1, "Micro-batches each process splits its batch into, adding their gradients before the "
                        "step (gradient accumulation: the same step in 1/accum of the activation memory).")
    ema_decay: float = option(0.999, "Decay of the exponential moving average of the weights that sampling uses.")
    grad_clip: float = option(1.0, "Gradients are clipped to this global L2 norm before each step.")


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def train_settings():
    """The `train` field of a stage config: its TrainConfig block (the preset fills it in)."""
    return dataclasses.field(default_factory=TrainConfig, metadata={"help": "Training settings (TrainConfig)."})


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write the one-dict checkpoint {stage, version, config, model, ema, optimizer, step, ...} atomically."""
    atomic_write(path, lambda tmp: torch.save({"version": CHECKPOINT_VERSION, **ckpt}, tmp))


def _upgrade_v1(ckpt: dict) -> dict:
    """Version 1 kept the training settings flat in the config; move them into its `train` block, filling in
    what train.py used for the fields a stage lacked (the VAE had no warm-up, weight decay or EMA decay fields, L2I
    no betas)."""
    config = dict(ckpt["config"])
    train = {k: config.pop(k) for k in TRAIN_FIELDS if k in config}
    used = {"warmup": min(500, train.get("steps", 0) // 20), "weight_decay": 0.0, "ema_decay": 0.999,
            "betas": (0.9, 0.999), "grad_clip": 1.0}
    train = {**used, **train}
    return {**ckpt, "config": {**config, "train": train}, "version": CHECKPOINT_VERSION}


def load_checkpoint(path: str, stage: str | None = None) -> dict:
    """Load a checkpoint with `weights_only=True` (no code execution) and check its stage and version; bad files
    raise UsageError. Version-1 checkpoints are upgraded in memory."""
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
    version = ckpt.get("version", 1)
    if version == 1:
        ckpt = _upgrade_v1(ckpt)
    elif version != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint version {version!r}, this code reads versions 1 and "
                         f"{CHECKPOINT_VERSION}; update the code or retrain")
    return ckpt


def weights_sha1(state_dict: dict) -> str:
    """SHA-1 over the names, shapes and bytes of a state dict: the same weights give the same fingerprint
    however the checkpoint around them was saved."""
    digest = hashlib.sha1()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------------

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


def step_items(seed: int, step: int, num_items: int, global_batch: int) -> list[tuple[int, int]]:
    """The global batch of optimizer step `step`: global_batch (item index, sample seed) pairs drawn with
    replacement from a generator seeded by (seed, step) alone. Each process takes its slice and each sample
    draws all its randomness (augmentation, noise, timestep, condition dropout) from its own seed
    (`SampleRandom`), so a batch is the same on one process or split over many, and resuming at any step
    replays exactly what an uninterrupted run would have drawn."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(num_items, (global_batch,), generator=gen)
    seeds = torch.randint(2**62, (global_batch,), generator=gen)
    return list(zip(index.tolist(), seeds.tolist()))


class SampleRandom:
    """Random draws for a batch whose samples each carry a seed (B,): every draw is made per sample from that
    sample's own generator and stacked, so sample b's numbers do not depend on the batch it sits in."""

    def __init__(self, seeds, device=None):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in torch.as_tensor(seeds).tolist()]
        self.device = device

    @classmethod
    def fresh(cls, batch: int, device=None) -> "SampleRandom":
        """Seeds from torch's global generator, for callers outside the training loop (tests, notebooks)."""
        return cls(torch.randint(2**62, (batch,)), device)

    def _stack(self, draw) -> torch.Tensor:
        return torch.stack([draw(g) for g in self.generators]).to(self.device)

    def randn(self, *shape) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return self._stack(lambda g: torch.randn(shape, generator=g))

    def rand(self, *shape) -> torch.Tensor:
        """(B, *shape) uniform in [0, 1)."""
        return self._stack(lambda g: torch.rand(shape, generator=g))

    def randint(self, high: int, *shape) -> torch.Tensor:
        """(B, *shape) integers in [0, high)."""
        return self._stack(lambda g: torch.randint(high, shape, generator=g))


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fix_mmap_threshold(size: int = 1 << 20) -> bool:
    """Keep glibc's malloc from raising its mmap threshold: by default each freed large block raises it (up to
    32 MB), after which a per-clip cache build's large buffers come from the heap and fragment it, so peak memory
    grows with the number of clips (measured: the L2I latents of 40 clips peaked at 844 MB against 690 MB for 8;
    with the threshold fixed at 1 MB, 561 against 546). Blocks above `size` are mapped and returned to the
    system when freed. False where the C library has no mallopt (not glibc)."""
    try:
        return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, size) == 1
    except (OSError, AttributeError):
        return False


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; an unavailable CUDA request is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
