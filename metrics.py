"""Evaluation measures shared by training and `evaluate.py`: image PSNR, landmark-sequence metrics, the mouth
opening MediaPipe reads from rendered frames, and the opening plot.

Not a box of the paper's figure; these are how the stages are measured (the paper reports lip-sync,
landmark and image metrics on HDTF / MEAD, see docs/paper.md): lip LMD and full-face accuracy in canonical
space, the mouth-opening correlation, jitter (the paper credits diffusion with removing it), PSNR.
"""
from __future__ import annotations

import cv2
import matplotlib
import numpy as np
import torch

import landmarks
from common import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two series; NaN when either is constant."""
    if a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def landmark_metrics(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Lip LMD (% IOD), mouth-opening correlation (per clip mean, pooled) and jitter of (T, 478, 3) sequences."""
    lmd = np.mean([landmarks.lip_lmd(p, t).mean() for p, t in zip(preds, truths)]) * 100
    open_p = [landmarks.mouth_opening(p) for p in preds]
    open_t = [landmarks.mouth_opening(t) for t in truths]
    per_clip = [corr(p, t) for p, t in zip(open_p, open_t)]
    return {"lip_lmd_pct_iod": float(lmd),
            "opening_corr": float(np.nanmean(per_clip)) if not np.all(np.isnan(per_clip)) else float("nan"),
            "opening_corr_pooled": corr(np.concatenate(open_p), np.concatenate(open_t)),
            "jitter": float(np.mean([landmarks.jitter(p) for p in preds]))}


def plot_opening(result: dict, path: str, title: str) -> None:
    """Predicted against true mouth opening over time (one clip) as a PNG."""
    t = np.arange(len(result["truth"])) / 25
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.plot(t, landmarks.mouth_opening(result["truth"]), label="ground truth", color="black")
    ax.plot(t, landmarks.mouth_opening(result["pred"]), label="A2L prediction", color="tab:red")
    ax.plot(t, np.full_like(t, landmarks.mouth_opening(result["p_bar"])), label="static P̄", color="tab:gray",
            linestyle="--")
    ax.set(xlabel="time (s)", ylabel="mouth opening (IOD)", title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


UPSCALE = {"cubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4"}  # --upscale choices -> OpenCV interpolation


def measured_opening(frames: np.ndarray, detect_size: int = 256, upscale: str = "cubic") -> np.ndarray:
    """Mouth opening / inter-ocular distance that MediaPipe measures on each frame (T, H, W, 3), upscaled to
    detect_size px first with `upscale` (a key of UPSCALE; MediaPipe does not find 64 px faces); NaN where no
    face is found."""
    if upscale not in UPSCALE:
        raise ValueError(f"unknown upscale {upscale!r}; valid: {sorted(UPSCALE)}")
    interpolation = getattr(cv2, UPSCALE[upscale])
    out = np.full(len(frames), np.nan)
    with landmarks.FaceMeshDetector(static_image_mode=True, max_num_faces=1) as detector:
        for i, frame in enumerate(frames):
            big = cv2.resize(frame, (detect_size, detect_size), interpolation=interpolation)
            P = detector.detect(big)
            if P is not None:
                out[i] = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    return out


def nan_corr(a: np.ndarray, b: np.ndarray) -> float:
    """`corr` over the frames where both series are finite (NaN with fewer than 3)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return corr(a[ok], b[ok]) if ok.sum() > 2 else float("nan")


def corr_by_identity(measured: np.ndarray, opening: np.ndarray, identity) -> dict:
    """{"opening_corr_id<k>": correlation over identity k's frames} (identity: (N,) labels, or None -> {})."""
    if identity is None:
        return {}
    identity = np.asarray(identity)
    return {f"opening_corr_id{k}": nan_corr(measured[identity == k], opening[identity == k])
            for k in np.unique(identity)}


def psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"):
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE), per image, then averaged.

    x, y: (B, C, H, W) or (C, H, W). mask: optional weights broadcastable to (B, 1, H, W) (1 = counted),
    e.g. the mouth box. Identical images give inf. reduction "mean" -> float, "none" -> tensor (B,).
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 3:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ValueError(f"psnr expects (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    err = (x.double() - y.double()).pow(2)                              # (B, C, H, W)
    if mask is None:
        mse = err.mean(dim=(1, 2, 3))
    else:
        w = torch.as_tensor(mask, dtype=torch.float64, device=err.device)
        w = torch.broadcast_to(w, (err.shape[0], 1) + err.shape[2:])    # (B, 1, H, W)
        denom = w.sum(dim=(1, 2, 3)) * err.shape[1]
        if (denom <= 0).any():
            raise ValueError("psnr: the mask selects no pixel in some image")
        mse = (err * w).sum(dim=(1, 2, 3)) / denom
    values = 10.0 * torch.log10(4.0 / mse)                              # inf where mse == 0
    if reduction == "none":
        return values
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(values.mean())
