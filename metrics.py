"""Evaluation measures shared by training and `evaluate.py`: image PSNR and SSIM, landmark-sequence metrics, the
mouth opening and landmarks MediaPipe reads from rendered frames, audio-visual sync and silence, the opening plot.

Not a box of the paper's figure; these are how the stages are measured (the paper reports lip-sync,
landmark and image metrics on HDTF / MEAD, see docs/paper.md):
  - PSNR (torch, [-1, 1] tensors: `psnr`; numpy uint8 / float images: `image_psnr`) and SSIM (`ssim`, Wang et
    al. 2004: Gaussian window sigma 1.5 truncated at 11 taps, K1 0.01, K2 0.03, population covariances; the
    definition of skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)), optionally inside a box (the mouth box);
  - lip LMD and full-face LMD on the 478 points after a similarity fit of the prediction to the truth on the
    non-lip points (`fitted_errors`, % of the truth's inter-ocular distance, IOD), the mouth-opening correlation,
    jitter (the paper credits diffusion with removing it; `canonical_jitter` for detected landmarks);
  - audio-visual offset (`av_offset`: the lag in [-15, 15] frames maximising the correlation of the mouth
    opening with the speech envelope, `speech_envelope`) and silence behaviour (`silence_ratio`: mean opening
    during pauses of >= 0.3 s over the mean during speech);
  - the mouth's sharpness on outputs pasted into a real photo (`mouth_sharpness`: the fine detail of each frame's
    lips, `lip_regions`, over that of the face skin the paste leaves as it was, `skin_region`).
"""
from __future__ import annotations

import cv2
import matplotlib
import numpy as np
import scipy.ndimage
import torch
from tqdm import tqdm

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


def detect_landmarks(frames: np.ndarray, detect_size: int = 256, upscale: str = "cubic",
                     progress: bool = False) -> np.ndarray:
    """The 478 landmarks MediaPipe finds on each frame (T, H, W, 3), (T, 478, 3) in the frame's own pixels (z
    scaled like x); the frames are resized to detect_size px first with `upscale` (a key of UPSCALE; MediaPipe
    does not find 64 px faces). NaN rows where no face is found."""
    if upscale not in UPSCALE:
        raise ValueError(f"unknown upscale {upscale!r}; valid: {sorted(UPSCALE)}")
    interpolation = getattr(cv2, UPSCALE[upscale])
    out = np.full((len(frames), landmarks.NUM_LANDMARKS, 3), np.nan)
    with landmarks.FaceMeshDetector(static_image_mode=True, max_num_faces=1) as detector:
        for i, frame in enumerate(tqdm(frames, desc="MediaPipe", unit="frame", disable=not progress)):
            big = cv2.resize(frame, (detect_size, detect_size), interpolation=interpolation)
            P = detector.detect(big)
            if P is not None:
                h, w = frame.shape[:2]
                out[i] = P * np.array([w, h, w]) / detect_size
    return out


def measured_opening(frames: np.ndarray, detect_size: int = 256, upscale: str = "cubic") -> np.ndarray:
    """Mouth opening / inter-ocular distance that MediaPipe measures on each frame (T, H, W, 3) (detect_landmarks);
    NaN where no face is found."""
    return opening_per_iod(detect_landmarks(frames, detect_size, upscale))


def opening_per_iod(P: np.ndarray) -> np.ndarray:
    """Mouth opening in units of inter-ocular distance, (..., 478, 3) -> (...); NaN stays NaN."""
    return landmarks.mouth_opening(P) / landmarks.inter_ocular(P)


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


# ------------------------------------------------------------------------------------------------------------
# Images as numpy arrays (uint8, or float with a data range): PSNR and SSIM, as scikit-image defines them
# ------------------------------------------------------------------------------------------------------------

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03  # an 11-tap Gaussian window (Wang et al. 2004)
SSIM_WINDOW = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1


def _image_pair(x, y, data_range, box) -> tuple[np.ndarray, np.ndarray, float]:
    """Two (H, W) or (H, W, C) images as float64, cut to box (x0, y0, x1, y1; x1 / y1 exclusive), and their
    data range (255 for uint8; a float image must name its own)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim not in (2, 3):
        raise ValueError(f"need two images of one shape (H, W) or (H, W, C), got {x.shape} and {y.shape}")
    if data_range is None:
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError("float images need data_range (1.0 for [0, 1], 2.0 for [-1, 1], 255.0 for [0, 255])")
        data_range = 255.0
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        x, y = x[y0:y1, x0:x1], y[y0:y1, x0:x1]
    return x.astype(np.float64), y.astype(np.float64), float(data_range)


def image_psnr(x, y, data_range=None, box=None) -> float:
    """PSNR in dB of one image pair (H, W[, C]): 10 log10(data_range^2 / MSE) (inf when identical), inside `box`
    when given; skimage.metrics.peak_signal_noise_ratio."""
    x, y, data_range = _image_pair(x, y, data_range, box)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(x, y, data_range=None, box=None) -> float:
    """Mean structural similarity of one image pair (H, W[, C]) (Wang et al. 2004), per channel then averaged,
    over the pixels at least 5 px inside the image (or inside `box`, cut out first: the window reflects at its
    edges); the box must be at least 11 px on each side. skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=..., channel_axis=-1)."""
    x, y, R = _image_pair(x, y, data_range, box)
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs at least {SSIM_WINDOW} x {SSIM_WINDOW} px, got {x.shape[:2]}")
    sigma = (SSIM_SIGMA, SSIM_SIGMA) + (0,) * (x.ndim - 2)  # no blur across channels

    def blur(a):
        return scipy.ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=SSIM_TRUNCATE)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    C1, C2 = (SSIM_K1 * R) ** 2, (SSIM_K2 * R) ** 2
    S = (2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))
    pad = (SSIM_WINDOW - 1) // 2
    return float(S[pad:-pad, pad:-pad].mean())  # the mean over channels of each channel's mean


def image_scores(gen: np.ndarray, truth: np.ndarray, boxes=None) -> dict:
    """Mean PSNR and SSIM of uint8 image pairs (N, H, W, 3), over the whole images or inside per-image boxes
    (N, 4); PSNR is averaged over the finite values (an identical pair gives inf)."""
    boxes = [None] * len(gen) if boxes is None else boxes
    p = np.array([image_psnr(g, t, box=b) for g, t, b in zip(gen, truth, boxes)])
    s = [ssim(g, t, box=b) for g, t, b in zip(gen, truth, boxes)]
    return {"psnr": float(p[np.isfinite(p)].mean()) if np.isfinite(p).any() else float("inf"),
            "ssim": float(np.mean(s))}


# ------------------------------------------------------------------------------------------------------------
# Landmarks: errors after a similarity fit, jitter of detected landmarks
# ------------------------------------------------------------------------------------------------------------

NON_LIPS = np.setdiff1d(np.arange(landmarks.NUM_LANDMARKS), landmarks.LIPS)  # (438,) the points a fit may use


def similarity_fit(pred: np.ndarray, truth: np.ndarray, points: np.ndarray = NON_LIPS) -> np.ndarray:
    """pred (T, 478, 3) moved onto truth (T, 478, 3) by the least-squares similarity (rotation, scale, shift;
    landmarks.umeyama) of its `points`, frame by frame; frames with a non-finite prediction stay NaN."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(pred).all(axis=(-2, -1))  # (T,)
    out = np.full(pred.shape, np.nan)
    if ok.any():
        R, s, t = landmarks.umeyama(pred[ok][:, points], truth[ok][:, points])
        out[ok] = s[:, None, None] * np.einsum("tij,tnj->tni", R, pred[ok]) + t[:, None]
    return out


def fitted_errors(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame, after `similarity_fit` on the non-lip points (head pose and framing do not count): the lip LMD
    (40 lip points) and the full-face LMD (all 478) in units of the truth's inter-ocular distance, (T,) each (NaN
    where nothing was predicted), and the fitted prediction (T, 478, 3)."""
    fitted = similarity_fit(pred, truth)
    iod = landmarks.inter_ocular(truth)
    face = np.linalg.norm(fitted - truth, axis=-1).mean(-1) / iod
    return landmarks.lip_lmd(fitted, truth) / iod, face, fitted


def fitted_lip_error(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the lip error (in IOD) and the mouth opening (in IOD) of `pred` (T, 478, 3) after a similarity
    fit of its non-lip points onto the truth's (metrics.fitted_errors), so head pose and framing do not count."""
    lip, _, fitted = fitted_errors(pred, truth)
    return lip, landmarks.mouth_opening(fitted) / landmarks.inter_ocular(truth)


def canonical_jitter(P: np.ndarray) -> float:
    """Jitter (landmarks.jitter: mean |second difference over time|) of a sequence (T, 478, 3) in canonical units
    (IOD = 1, head pose removed), over the frame triples where all three frames are finite (detected)."""
    ok = np.isfinite(P).all(axis=(-2, -1))
    canon = np.full(np.shape(P), np.nan)
    if ok.any():
        canon[ok] = landmarks.canonicalize(np.asarray(P, np.float64)[ok])[0]
    accel = np.linalg.norm(np.diff(canon, n=2, axis=0), axis=-1).mean(-1)  # (T-2,), NaN across a missed frame
    return float(np.nanmean(accel)) if np.isfinite(accel).any() else float("nan")


# ------------------------------------------------------------------------------------------------------------
# Audio-visual sync and silence
# ------------------------------------------------------------------------------------------------------------

def speech_envelope(audio: np.ndarray, sample_rate: int, frames: int, fps: float = 25.0) -> np.ndarray:
    """RMS of the sound in each video frame's window [t / fps, (t + 1) / fps), (frames,); int16 samples are
    scaled to [-1, 1), channels are averaged; a window past the sound's end is silent."""
    x = np.asarray(audio)
    x = x / 32768.0 if x.dtype == np.int16 else x.astype(np.float64)
    x = x.mean(axis=1) if x.ndim == 2 else x
    edges = np.minimum(np.round(np.arange(frames + 1) * sample_rate / fps).astype(np.int64), len(x))
    energy = np.concatenate([[0.0], np.cumsum(x ** 2)])[edges]  # running sum of squares at each frame edge
    counts = np.maximum(np.diff(edges), 1)
    return np.sqrt(np.diff(energy) / counts)


def _shifted(a: np.ndarray, b: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """a[t] beside b[t - lag] over the frames where both exist."""
    n = len(a)
    return (a[lag:], b[:n - lag]) if lag >= 0 else (a[:n + lag], b[-lag:])


def av_offset(opening: np.ndarray, envelope: np.ndarray, max_lag: int = 15) -> tuple[float, float]:
    """(lag, correlation): the lag in [-max_lag, max_lag] frames at which the mouth opening (T,) correlates best
    with the speech envelope (T,), lag > 0 meaning the mouth follows the sound (opening[t] goes with envelope[t -
    lag]); NaN openings (missed detections) are left out; (NaN, NaN) when no lag gives a correlation."""
    lags = np.arange(-max_lag, max_lag + 1)
    r = np.array([nan_corr(*_shifted(np.asarray(opening, np.float64), envelope, int(k))) for k in lags])
    if not np.isfinite(r).any():
        return float("nan"), float("nan")
    best = int(np.nanargmax(r))
    return float(lags[best]), float(r[best])


def pauses(envelope: np.ndarray, fps: float = 25.0, threshold: float = 0.1, min_seconds: float = 0.3) -> np.ndarray:
    """(T,) bool: the frames of runs of at least min_seconds where the envelope stays below `threshold` x its 95th
    percentile (the speech level, so the measure does not depend on loudness)."""
    quiet = envelope < threshold * np.percentile(envelope, 95)
    out, start, need = np.zeros(len(quiet), bool), None, int(np.ceil(min_seconds * fps - 1e-9))
    for t, q in enumerate(np.append(quiet, False)):  # the sentinel closes a run at the end
        if q and start is None:
            start = t
        elif not q and start is not None:
            out[start:t] = t - start >= need
            start = None
    return out


def silence_ratio(opening: np.ndarray, envelope: np.ndarray, fps: float = 25.0, threshold: float = 0.1) -> float:
    """Mean mouth opening during pauses (`pauses`) over its mean during speech (envelope at or above the
    threshold): near 0 for a mouth that closes when the voice stops; NaN without a pause or without speech."""
    opening = np.asarray(opening, np.float64)
    silent = pauses(envelope, fps, threshold)
    speech = envelope >= threshold * np.percentile(envelope, 95)
    a, b = opening[silent & np.isfinite(opening)], opening[speech & np.isfinite(opening)]
    if not len(a) or not len(b) or b.mean() <= 0:
        return float("nan")
    return float(a.mean() / b.mean())


# ------------------------------------------------------------------------------------------------------------
# Sharpness of the pasted mouth against the face around it
# ------------------------------------------------------------------------------------------------------------

def detail_energy(frames: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Per-pixel energy of the fine detail of uint8 frames (..., H, W, 3): the square of the grey image minus its
    Gaussian blur (sigma px), (..., H, W) float32. Blur, an upscaled patch, removes it; grain and edges carry it."""
    grey = np.asarray(frames, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0  # (..., H, W)
    flat = grey.reshape(-1, *grey.shape[-2:])
    blurred = np.stack([cv2.GaussianBlur(g, (0, 0), sigma) for g in flat]).reshape(grey.shape)
    return (grey - blurred) ** 2


def lip_regions(P: np.ndarray, image_hw: tuple[int, int], grow: float = 0.15) -> np.ndarray:
    """Per frame, the mouth: the hull of the outer lip points of landmarks P (T, 478, 3) px, grown by `grow` x the
    mouth's width so the lips' edges count: (T, H, W) bool."""
    P = np.asarray(P, np.float64)
    masks = np.zeros((len(P), *image_hw), np.uint8)
    outer = list(landmarks.LIPS_OUTER)
    for mask, points in zip(masks, P[:, outer, :2]):  # (20, 2) each; a polygon per frame, no per-pixel loop
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 1)
        width = float(np.ptp(points[:, 0]))
        mask[:] = scipy.ndimage.distance_transform_edt(mask == 0) <= grow * width
    return masks.astype(bool)


def skin_region(changed: np.ndarray, P_photo: np.ndarray) -> np.ndarray:
    """(H, W) bool: the face skin that paste-back leaves as it was, for `mouth_sharpness` on outputs pasted into a
    still photo. The face (hull of the photo's face oval, P_photo (478, 3) px) more than 2 px outside the pasted
    region `changed` ((H, W) bool: where any output frame differs from the photo), below the eyes (above them hair
    often covers the forehead) and a fifth of the eye distance away from eyes and brows."""
    if not changed.any():
        raise ValueError("no frame differs from the photo: nothing was pasted")
    outside = scipy.ndimage.distance_transform_edt(~changed)
    face = np.zeros(changed.shape, np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(np.round(P_photo[list(landmarks.FACE_OVAL_RING), :2]).astype(np.int32)),
                       1)
    eyes = np.zeros(changed.shape, np.uint8)
    for edges in (landmarks.LEFT_EYE_EDGES, landmarks.RIGHT_EYE_EDGES, landmarks.LEFT_EYEBROW_EDGES,
                  landmarks.RIGHT_EYEBROW_EDGES):
        cv2.fillConvexPoly(eyes, cv2.convexHull(np.round(P_photo[np.unique(edges), :2]).astype(np.int32)), 1)
    near_eyes = scipy.ndimage.distance_transform_edt(eyes == 0) <= 0.2 * float(landmarks.inter_ocular(P_photo))
    eye_rows = P_photo[np.unique(np.concatenate([landmarks.LEFT_EYE_EDGES, landmarks.RIGHT_EYE_EDGES])), 1]
    below_eyes = np.arange(changed.shape[0])[:, None] > eye_rows.max()  # (H, 1)
    return (outside > 2) & face.astype(bool) & ~near_eyes & below_eyes


def mouth_sharpness(frames: np.ndarray, mouth: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Per frame, the mean detail energy (`detail_energy`) inside its `mouth` mask ((T, H, W) or one (H, W) for
    all) over that of `skin` ((H, W) bool): frames (T, H, W, 3) -> (T,). A photo's own mouth scores well above 1
    (lips and teeth have edges); a blurred paste scores far below 1."""
    energy = detail_energy(frames)  # (T, H, W)
    mouth = np.broadcast_to(mouth, energy.shape)
    inside = (energy * mouth).sum(axis=(1, 2)) / np.maximum(mouth.sum(axis=(1, 2)), 1)
    return inside / np.maximum(energy[:, skin].mean(axis=1), 1e-12)


def motion_change(opening: np.ndarray, reference: np.ndarray) -> float:
    """Mean |opening - reference| over the reference's range (max - min): how far lip motion moved."""
    return float(np.abs(opening - reference).mean() / max(np.ptp(reference), 1e-9))


def finite_mean(x: np.ndarray) -> float:
    """The mean of the finite values (NaN when there is none)."""
    x = np.asarray(x, np.float64)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")
