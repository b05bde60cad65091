"""evaluate.py: the measures behind the README's VAE / L2I / cascade numbers."""
import cv2
import numpy as np

import data
import evaluate
import landmarks
from vae import AutoencoderKL, VAEConfig


def test_mediapipe_opening_follows_the_rendered_mouth_and_marks_missing_faces():
    clip = data.make_clip(0, 0, "test", size=128, seconds=3.0)
    frames, P = clip["frames"], clip["landmarks"]
    truth = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    pick = np.argsort(truth)[np.linspace(0, len(truth) - 1, 12).astype(int)]  # closed to wide open
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames[pick]])
    measured = evaluate.measured_opening(np.concatenate([small, np.full((1, 64, 64, 3), 127, np.uint8)]))
    assert np.isnan(measured[-1]) and np.isfinite(measured[:-1]).all()  # a blank frame has no face
    assert evaluate._nan_corr(measured[:-1], truth[pick]) > 0.8


def test_vae_psnr_is_reported_over_the_frame_and_the_mouth_box():
    vae = AutoencoderKL(VAEConfig(resolution=32, base_channels=8, norm_groups=4)).eval()
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[:, 10:20, 10:20] = 1
    row = evaluate.evaluate_vae(vae, frames, masks)
    assert row["frames"] == 3 and np.isfinite(row["psnr"]) and np.isfinite(row["psnr_mouth"])


class _LosslessVAE:
    """encode -> mode -> decode gives the frame back: the opening measured on it is the true frames' one."""

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda _: x})()

    def decode(self, z):
        return z


def test_vae_row_reports_how_mediapipe_opening_on_reconstructions_follows_the_truth():
    clip = data.make_clip(0, 1, "test", size=128, seconds=2.0)
    frames = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in clip["frames"][::3]])
    P = clip["landmarks"][::3] / 2  # (T, 478, 3) in 64 px
    truth = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    masks = np.stack([landmarks.mouth_mask(p, (64, 64)) for p in P])
    row = evaluate.evaluate_vae(_LosslessVAE(), frames, masks, opening=truth)
    assert row["psnr"] > 40 and row["opening_corr"] > 0.8
    shuffled = evaluate.evaluate_vae(_LosslessVAE(), frames, masks, opening=truth[::-1].copy())
    assert shuffled["opening_corr"] < row["opening_corr"] - 0.3
