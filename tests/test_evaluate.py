"""evaluate.py: the measures behind the README's VAE / L2I / cascade numbers."""
import cv2
import numpy as np
import pytest
import torch

import evaluate
import landmarks
import metrics
import synth_clips
from vae import AutoencoderKL, VAEConfig


@pytest.mark.parametrize("upscale", sorted(metrics.UPSCALE))
def test_mediapipe_opening_follows_the_rendered_mouth_and_marks_missing_faces(upscale):
    clip = synth_clips.make_clip(0, 0, "test", size=128, seconds=3.0)
    frames, P = clip["frames"], clip["landmarks"]
    truth = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    pick = np.argsort(truth)[np.linspace(0, len(truth) - 1, 12).astype(int)]  # closed to wide open
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames[pick]])
    blank = np.full((1, 64, 64, 3), 127, np.uint8)
    measured = metrics.measured_opening(np.concatenate([small, blank]), upscale=upscale)
    assert np.isnan(measured[-1]) and np.isfinite(measured[:-1]).all()  # a blank frame has no face
    assert metrics.nan_corr(measured[:-1], truth[pick]) > 0.8
    with pytest.raises(ValueError, match="unknown upscale"):
        metrics.measured_opening(blank, upscale="nearest")


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
    clip = synth_clips.make_clip(0, 1, "test", size=128, seconds=2.0)
    frames = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in clip["frames"][::3]])
    P = clip["landmarks"][::3] / 2  # (T, 478, 3) in 64 px
    truth = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    masks = np.stack([landmarks.mouth_mask(p, (64, 64)) for p in P])
    identity = np.repeat([3, 7], [len(truth) // 2, len(truth) - len(truth) // 2])
    row = evaluate.evaluate_vae(_LosslessVAE(), frames, masks, opening=truth, identity=identity)
    assert row["psnr"] > 40 and row["opening_corr"] > 0.8
    assert {"opening_corr_id3", "opening_corr_id7"} <= set(row) and row["opening_corr_id3"] > 0.5
    shuffled = evaluate.evaluate_vae(_LosslessVAE(), frames, masks, opening=truth[::-1].copy())
    assert shuffled["opening_corr"] < row["opening_corr"] - 0.3


def test_l2i_row_has_the_baselines_ceilings_and_one_correlation_per_identity():
    import torch

    import l2i
    torch.manual_seed(0)
    ae = AutoencoderKL(VAEConfig(resolution=32, base_channels=8, norm_groups=4)).eval().requires_grad_(False)
    made = [synth_clips.make_clip(0, k, "test", size=64, seconds=0.6) for k in (0, 1)]
    frames = l2i.L2IFrames(made, size=32, tau_min=3, tau_max=3, train=False)
    cfg = l2i.L2IConfig(image_size=32, latent_size=8, channels=(16, 32), attn_resolutions=(4,), conditioning="channel")
    row = evaluate.evaluate_l2i(l2i.L2I(cfg).eval(), ae, l2i.L2ILatents(frames, ae), every=3, steps=2,
                                identities=[5, 9])
    assert row["frames"] == len(range(0, len(frames), 3))
    assert all(np.isfinite(row[k]) for k in ("psnr_mouth", "psnr_mouth_copy_ref", "psnr_mouth_vae", "psnr"))
    assert 0.0 <= row["detected"] <= 1.0
    assert {"opening_corr", "opening_corr_truth_frames", "opening_corr_vae", "opening_corr_id5",
            "opening_corr_id9"} <= set(row)


def test_fitted_lip_error_ignores_head_pose_and_sees_the_mouth():
    """The user-path measure (evaluate.py photo): a moved, turned, scaled head costs nothing, an opened mouth does."""
    from scipy.spatial.transform import Rotation
    truth = np.repeat(landmarks.CANONICAL_TEMPLATE[None].astype(np.float64) * 60 + 100, 3, axis=0)  # (3, 478, 3)
    R = Rotation.from_euler("xyz", [5, 20, -10], degrees=True).as_matrix()
    moved = 1.3 * truth @ R.T + np.array([15.0, -7.0, 3.0])
    error, opening = metrics.fitted_lip_error(moved, truth)
    assert error.max() < 1e-6
    np.testing.assert_allclose(opening, landmarks.mouth_opening(truth) / landmarks.inter_ocular(truth), atol=1e-6)
    opened = moved.copy()
    opened[:, landmarks.LOWER_INNER, 1] += 10.0  # the lower lip drops
    assert metrics.fitted_lip_error(opened, truth)[0].min() > 0.01


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A tiny `evaluate.py report` run: one held-out clip (with a pause), 2 DDIM steps, the shipped models."""
    import json

    import clips
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "data").mkdir()
    clips.save_clip(str(tmp / "data" / "clip_0"), synth_clips.make_clip(0, 1, "test", size=256))
    evaluate.main(["report", "--data", str(tmp / "data"), "--steps", "2", "--every", "6",
                   "--json", str(tmp / "eval.json"), "--table", str(tmp / "eval.md")])
    return json.load(open(tmp / "eval.json")), (tmp / "eval.md").read_text()


# what each column measures: images (crops vs the truth) and / or landmarks (MediaPipe or A2L vs the truth)
IMAGE = {"psnr_face", "ssim_face", "psnr_mouth", "ssim_mouth", "fid"}
SYNC = {"lip_lmd_pct_iod", "face_lmd_pct_iod", "opening_corr", "jitter", "av_offset_frames", "av_offset_abs_frames",
        "av_corr", "silence_ratio", "detected"}


def test_report_json_has_every_measure_finite_and_the_table_is_written(report):
    rows, table = report
    expected = {"cascade": IMAGE | SYNC, "a2l": SYNC - {"detected"}, "vae": IMAGE,
                "ground_truth": SYNC - {"detected"} | {"fid"},
                "l2i": IMAGE | {"detected"}, "real_frames": SYNC}
    for column, keys in expected.items():
        missing = keys - set(rows[column])
        assert not missing, f"{column} lacks {missing}"
        bad = {k: rows[column][k] for k in keys if not isinstance(rows[column][k], float)}
        assert not bad, f"{column}: not finite {bad}"  # NaN / inf are written as null
    assert {"lip_lmd_pct_iod", "face_lmd_pct_iod", "opening_corr"} <= set(rows["l2i"])  # null if no face was found
    assert rows["ground_truth"]["lip_lmd_pct_iod"] < 1e-6 and rows["ground_truth"]["opening_corr"] > 0.999
    assert rows["settings"]["clips_with_sound"] == 1 and rows["settings"]["seconds_per_clip_cascade"] > 0
    assert 0 <= rows["cascade"]["ssim_face"] <= 1 and rows["cascade"]["fid"] >= 0
    lines = table.strip().splitlines()
    assert lines[0].startswith("| measure | cascade") and len(lines) == 2 + len(evaluate.REPORT_METRICS)
    assert "DreamHead-FID (not comparable with Inception FID)" in table


def test_report_refuses_clips_without_sound(tmp_path):
    import clips
    from cli import UsageError
    clip = synth_clips.make_clip(0, 1, "test", size=128, seconds=1.0)
    clips.save_clip(str(tmp_path / "clip_0"), {**clip, "has_audio": False})
    with pytest.raises(UsageError, match="has sound"):
        evaluate.main(["report", "--data", str(tmp_path), "--steps", "1"])


def test_real_report_measures_every_pair_and_the_strip(tmp_path):
    import json
    import os
    import shutil

    from cli import UsageError
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "examples", "face.png"), tmp_path / "face.png")
    shutil.copy(os.path.join(root, "examples", "speech.wav"), tmp_path / "speech.wav")
    evaluate.main(["real", "--inputs", str(tmp_path), "--steps", "2", "--json", str(tmp_path / "real.json"),
                   "--strip", str(tmp_path / "strip.png"), "--adapt", "5"])  # 5 steps of adaptation: the path runs
    rows = json.load(open(tmp_path / "real.json"))
    assert set(rows) == {"face.png + speech.wav", "mean"}
    row = rows["mean"]
    assert row["frames"] == 120 and row["detected"] > 0.9
    assert -1 <= row["envelope_corr"] <= 1 and row["pause_ratio"] >= 0
    assert 0 < row["sharpness"] and row["photo_sharpness"] > 1                      # the photo's lips have edges
    assert row["quiet_change"] < 1e-3 and 0 <= row["loud_clipped_change"] < 1     # loudness is normalised away
    assert abs(row["round_trip_opening"] - row["photo_opening"]) < 0.03          # the VAE keeps a synthetic mouth
    strip = cv2.imread(str(tmp_path / "strip.png"))
    assert strip.shape[1] == 7 * (strip.shape[1] // 7)                               # photo + 6 frames
    (tmp_path / "speech.wav").unlink()
    with pytest.raises(UsageError, match="recording"):
        evaluate.main(["real", "--inputs", str(tmp_path)])


class _PoolingVAE(_LosslessVAE):
    """Averages k x k blocks: a VAE that loses fine detail (k = 1: lossless). Framed like the rendered frames."""

    def __init__(self, k: int):
        self.k, self.config = k, VAEConfig()

    def decode(self, z):
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, self.k), scale_factor=self.k,
                                               mode="bilinear") if self.k > 1 else z


def test_real_round_trips_report_the_mouth_opening_a_vae_keeps_on_a_real_photo():
    photos, _ = evaluate.real_inputs("examples/real")
    jesper = [p for p in photos if "jesper" in p]  # the photo whose mouth is open
    lossless = evaluate.real_round_trips(_PoolingVAE(1), jesper)["kphotoalbum_jesper.jpg"]
    assert lossless["opening_crop"] > 0.08 and lossless["opening_rec"] == pytest.approx(lossless["opening_crop"])
    assert lossless["psnr"] > 60
    blurred = evaluate.real_round_trips(_PoolingVAE(4), jesper)["kphotoalbum_jesper.jpg"]  # 4 x 4 blocks: 21 dB
    assert blurred["psnr"] < 25 and blurred["opening_rec"] < 0.5 * lossless["opening_crop"]  # the mouth closes
