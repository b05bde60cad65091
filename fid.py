"""DreamHead-FID: a Frechet distance between sets of face crops, in the features of a small network this project
trains itself and ships (checkpoints/fid_tiny.pt). DreamHead-FID, not comparable with Inception FID.

Not a box of the paper's figure: the papers report FID (Heusel et al. 2017) with an ImageNet Inception-v3,
whose weights this offline project cannot fetch. The same statistic is computed here with `FeatureNet`: four
convolution stages on 64 px face crops (64 -> 32 -> 16 -> 8 -> 4 px), global average pooling to 128 features,
trained (`train_feature_net`; the command is `python evaluate.py fid-net`) to tell apart hundreds of synthetic
identities' stills under light augmentation (flips, shifts of a few pixels, brightness and contrast), so its
features carry face appearance; blur and noise, never in its augmentation, move them. Numbers are comparable
only with other numbers of the same checkpoint.

    d^2 = |mu_1 - mu_2|^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))     (`frechet_distance`)
"""
from __future__ import annotations

import math
import os
import warnings

import cv2
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cli import UsageError
from common import load_checkpoint, lr_at, save_checkpoint, to_tensor_image

STAGE = "fid"  # the checkpoint's stage name
SIZE = 64  # px of the face crops the network sees


class FeatureNet(nn.Module):
    """Face crop (B, 3, 64, 64) in [-1, 1] -> features (B, channels[-1]): per stage two 3x3 convolutions with
    batch norm and ReLU, then 2x average pooling; the last map is averaged over space."""

    def __init__(self, channels=(16, 32, 64, 128), size: int = SIZE):
        super().__init__()
        self.channels, self.size = tuple(channels), size
        layers, c_in = [], 3
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c_in = c
        self.stages = nn.Sequential(*layers)

    @property
    def dim(self) -> int:
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))  # (B, C)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of a batch (B, 3, S, S): horizontal flips, shifts of up to 4 px (edge replication),
    brightness +-0.1 and contrast x [0.9, 1.1]. No blur and no noise: the features must notice those."""
    B, _, S, _ = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dx, dy = (torch.randint(0, 9, (B,), generator=gen) for _ in range(2))
    x = torch.stack([p[:, j:j + S, i:i + S] for p, i, j in zip(padded, dx.tolist(), dy.tolist())])
    gain = 0.9 + 0.2 * torch.rand(B, 1, 1, 1, generator=gen)
    bias = 0.2 * torch.rand(B, 1, 1, 1, generator=gen) - 0.1
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * gain + mean + bias).clamp(-1, 1)


def train_feature_net(frames: np.ndarray, labels: np.ndarray, steps: int = 600, batch: int = 64, lr: float = 2e-3,
                      seed: int = 0, progress: bool = True) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet with a linear identity classifier on top (cross-entropy) on stills uint8 (N, 64, 64,
    3) with identity labels (N,) 0..K-1; AdamW with warm-up and cosine decay. The last frame of each identity is
    held out: returns the network (eval mode, without the classifier) and {"steps", "loss", "held_out_accuracy"}."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = np.asarray(labels)
    last = np.r_[labels[1:] != labels[:-1], True]  # the last still of each identity
    x, y = to_tensor_image(np.asarray(frames)), torch.as_tensor(labels, dtype=torch.long)
    train_idx, held = np.flatnonzero(~last), np.flatnonzero(last)
    net = FeatureNet()
    head = nn.Linear(net.dim, int(labels.max()) + 1)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    net.train()
    losses = []
    for step in tqdm(range(steps), desc="DreamHead-FID features", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, max(1, steps // 20), steps)
        pick = torch.from_numpy(train_idx[torch.randint(len(train_idx), (batch,), generator=gen).numpy()])
        loss = F.cross_entropy(head(net(augment(x[pick], gen))), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = float((head(net(x[held])).argmax(1) == y[held]).float().mean())
    return net, {"steps": steps, "loss": float(np.mean(losses[-20:])), "held_out_accuracy": accuracy}


def save_feature_net(net: FeatureNet, path: str, record: dict) -> None:
    """The network as a one-dict checkpoint (stage "fid"), with what trained it (`record`)."""
    save_checkpoint({"stage": STAGE, "config": {"channels": list(net.channels), "size": net.size},
                     "model": net.state_dict(), "train": record}, path)


def load_feature_net(path: str) -> FeatureNet:
    """A FeatureNet from a checkpoint of `save_feature_net`, in eval mode; UsageError for a missing or bad file."""
    if not os.path.isfile(path):
        raise UsageError(f"no DreamHead-FID network at {path}; train one with `python evaluate.py fid-net --out "
                         f"{path}` or pass the shipped checkpoints/fid_tiny.pt")
    ckpt = load_checkpoint(path, STAGE)
    net = FeatureNet(**ckpt["config"])
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UsageError(f"{path}: the weights do not fit a FeatureNet ({str(err).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features(net: FeatureNet, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Features (N, dim) float64 of face crops uint8 (N, H, W, 3), resized to the network's size first."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"need face crops uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    out = []
    for start in range(0, len(frames), batch):
        part = frames[start:start + batch]
        if part.shape[1:3] != (net.size, net.size):
            part = np.stack([cv2.resize(f, (net.size, net.size), interpolation=cv2.INTER_AREA) for f in part])
        out.append(net(to_tensor_image(part)).double().numpy())
    return np.concatenate(out)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D); N >= 2."""
    if len(feats) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 frames per set, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrtm(A: np.ndarray, check: bool = True) -> np.ndarray | None:
    """The real part of scipy.linalg.sqrtm(A); None (with check) when it is not finite or does not square back to
    A within 1e-3 of A's scale (a singular A)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(A)
    if check and (not np.isfinite(root).all() or
                  np.abs(root @ root - A).max() > 1e-3 * max(np.abs(A).max(), 1e-12)):
        return None
    return np.real(root)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2). The matrix square root
    (scipy.linalg.sqrtm) is guarded: when it is not finite or inaccurate (near-singular covariances, as with fewer
    frames than features) eps x the mean variance (+ eps) is added to both diagonals; the imaginary part that
    rounding leaves is dropped."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, np.float64)) for a in (mu1, mu2, sigma1, sigma2))
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        offset = eps * np.trace(sigma1 + sigma2) / (2 * len(sigma1)) * np.eye(len(sigma1)) + eps * np.eye(len(sigma1))
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset), check=False)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return max(value, 0.0) if math.isfinite(value) else float("nan")


def fid(frames_a: np.ndarray, frames_b: np.ndarray, net: FeatureNet) -> float:
    """DreamHead-FID between two sets of face crops uint8 (N, H, W, 3) and (M, H, W, 3)."""
    return frechet_distance(*gaussian_stats(features(net, frames_a)), *gaussian_stats(features(net, frames_b)))
