"""metrics.py: PSNR and SSIM as scikit-image computes them, the fitted landmark errors, AV offset and silence."""
import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import landmarks
import metrics


def _pairs():
    """(name, x, y, data_range): random and structured images, uint8 and float, gray and colour."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :56]
    structured = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)  # (48, 56)
    shifted = np.roll(structured, 2, axis=1)
    colour = np.stack([structured, shifted, structured[::-1]], -1)  # (48, 56, 3)
    noisy = np.clip(colour + rng.normal(0, 12, colour.shape), 0, 255).astype(np.uint8)
    random_u8 = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    near_u8 = np.clip(random_u8.astype(int) + rng.integers(-20, 21, random_u8.shape), 0, 255).astype(np.uint8)
    f = rng.random((37, 41))
    return [("structured gray uint8", structured, shifted, None),
            ("structured colour uint8", colour, noisy, None),
            ("random colour uint8", random_u8, near_u8, None),
            ("random gray float [0, 1]", f, np.clip(f + rng.normal(0, 0.1, f.shape), 0, 1), 1.0),
            ("structured colour float [-1, 1]", colour / 127.5 - 1, noisy / 127.5 - 1, 2.0)]


@pytest.mark.parametrize("box", [None, (5, 7, 30, 33)])
@pytest.mark.parametrize("name,x,y,data_range", _pairs(), ids=[p[0] for p in _pairs()])
def test_psnr_and_ssim_agree_with_scikit_image(name, x, y, data_range, box):
    rng_kw = {} if data_range is None else {"data_range": data_range}
    cut = (slice(None), slice(None)) if box is None else (slice(box[1], box[3]), slice(box[0], box[2]))
    channel = {"channel_axis": -1} if x.ndim == 3 else {}
    want_ssim = structural_similarity(x[cut], y[cut], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=data_range or 255, **channel)
    want_psnr = peak_signal_noise_ratio(x[cut], y[cut], **rng_kw)
    assert abs(metrics.ssim(x, y, data_range, box) - want_ssim) < 1e-3
    assert abs(metrics.image_psnr(x, y, data_range, box) - want_psnr) < 1e-3


def test_image_measures_refuse_what_they_cannot_score():
    x = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(x, x)
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(x, x, 1.0, box=(0, 0, 8, 20))
    assert metrics.image_psnr(x, x, 1.0) == float("inf")
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    row = metrics.image_scores(frames, frames, boxes=[(2, 2, 20, 20)] * 3)
    assert row["psnr"] == float("inf") and abs(row["ssim"] - 1) < 1e-9


def _face(frames=4):
    """A sequence of the canonical template at a pixel scale, (frames, 478, 3)."""
    return np.repeat(landmarks.CANONICAL_TEMPLATE[None].astype(np.float64) * 60 + 100, frames, axis=0)


def test_fitted_lmd_ignores_rotation_scale_and_shift_of_the_prediction():
    truth = _face()
    rng = np.random.default_rng(2)
    pred = truth + rng.normal(0, 1.0, truth.shape)  # some error to keep
    lip, face, _ = metrics.fitted_errors(pred, truth)
    R = Rotation.from_euler("xyz", [10, -25, 15], degrees=True).as_matrix()
    moved = 0.7 * pred @ R.T + np.array([40.0, -12.0, 5.0])
    lip_m, face_m, _ = metrics.fitted_errors(moved, truth)
    np.testing.assert_allclose(lip_m, lip, rtol=1e-6)
    np.testing.assert_allclose(face_m, face, rtol=1e-6)
    assert lip.min() > 0 and face.min() > 0
    missed = moved.copy()
    missed[1] = np.nan  # no detection on frame 1: NaN there, the others unchanged
    lip_n, _, _ = metrics.fitted_errors(missed, truth)
    assert np.isnan(lip_n[1]) and np.allclose(np.delete(lip_n, 1), np.delete(lip, 1))


def test_canonical_jitter_is_zero_for_a_moving_still_face_and_skips_missed_frames():
    truth = _face(6)
    moving = truth + np.linspace(0, 30, 6)[:, None, None]  # a shifting head: no motion in canonical space
    assert metrics.canonical_jitter(moving) < 1e-9
    shaking = truth.copy()
    shaking[::2, landmarks.LIPS] += 3.0
    shaking[3] = np.nan
    assert np.isfinite(metrics.canonical_jitter(shaking)) and metrics.canonical_jitter(shaking) > 0.01


def test_speech_envelope_is_the_rms_of_each_frame_window():
    sr, fps = 16000, 25
    audio = np.zeros(sr, np.float32)
    audio[640:1280] = 0.5  # frame 1
    env = metrics.speech_envelope(audio, sr, 26, fps)  # one frame past the end: silent
    assert env.shape == (26,) and abs(env[1] - 0.5) < 1e-9 and env[0] == 0 and env[-1] == 0
    stereo_int16 = (np.stack([audio, audio], 1) * 32768).astype(np.int16)
    np.testing.assert_allclose(metrics.speech_envelope(stereo_int16, sr, 26, fps), env, atol=1e-4)


@pytest.mark.parametrize("shift", [-6, 0, 4, 11])
def test_av_offset_recovers_a_known_shift(shift):
    rng = np.random.default_rng(3)
    envelope = np.convolve(rng.random(260), np.ones(5) / 5, mode="same")  # a smooth syllabic envelope
    opening = np.roll(envelope, shift)[20:-20] + rng.normal(0, 0.01, 220)  # the mouth `shift` frames late
    opening[::17] = np.nan  # missed detections are left out
    lag, r = metrics.av_offset(opening, envelope[20:-20])
    assert lag == shift and r > 0.9


def test_silence_ratio_on_a_constructed_example():
    fps = 25
    envelope = np.full(100, 0.2)
    envelope[30:45] = 0.001  # a 0.6 s pause
    envelope[70:74] = 0.001  # a 0.16 s gap: too short to count, and not speech either
    opening = np.full(100, 0.4)
    opening[30:45] = 0.1
    opening[70:74] = 5.0
    assert metrics.pauses(envelope, fps).sum() == 15
    assert abs(metrics.silence_ratio(opening, envelope, fps) - 0.25) < 1e-9
    assert np.isnan(metrics.silence_ratio(opening, np.full(100, 0.2), fps))  # no pause: nothing to say


# ------------------------------------------------------------------------------------------------------------
# DreamHead-FID (fid.py) with the shipped feature network
# ------------------------------------------------------------------------------------------------------------

def test_frechet_distance_of_known_gaussians_and_of_singular_covariances():
    import fid
    assert abs(fid.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) - 10.0) < 1e-9  # 9 + 4 + 1 - 2 * 2
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 32))  # fewer samples than features: singular covariances
    d = fid.frechet_distance(*fid.gaussian_stats(a), *fid.gaussian_stats(a + 1.0))
    assert np.isfinite(d) and abs(d - 32.0) < 1e-3  # the shift alone: |1|^2 x 32 features
    assert fid.frechet_distance(*fid.gaussian_stats(a), *fid.gaussian_stats(a)) < 1e-6


@pytest.fixture(scope="module")
def face_sets():
    """Face crops (64 px, framed like L2I's) of two held-out clips of one identity and one of another."""
    import synth_clips
    made = {k: synth_clips.make_clip(0, k, "test", size=128) for k in (0, 3, 1)}
    assert made[0]["identity"] == made[3]["identity"] != made[1]["identity"]
    crops = {k: landmarks.crop_clip_faces(c["frames"], c["landmarks"], 64, landmarks.FACE_IOD_FRACTION)[0]
             for k, c in made.items()}
    same = np.concatenate([crops[0], crops[3]])
    order = np.random.default_rng(5).permutation(len(same))
    return same[order[: len(same) // 2]], same[order[len(same) // 2:]], crops[1]


def test_dreamhead_fid_is_small_for_halves_of_a_set_and_grows_with_corruption(face_sets):
    import cv2

    import fid
    net = fid.load_feature_net("checkpoints/fid_tiny.pt")
    half_a, half_b, other = face_sets
    rng = np.random.default_rng(6)
    same = fid.fid(half_a, half_b, net)
    blurred = [fid.fid(half_a, np.stack([cv2.GaussianBlur(f, (0, 0), s) for f in half_b]), net) for s in (0.7, 1.4, 2.8)]
    noisy = [fid.fid(half_a, np.clip(half_b + rng.normal(0, s, half_b.shape), 0, 255).astype(np.uint8), net)
             for s in (6, 16, 40)]
    assert same < blurred[0] < blurred[1] < blurred[2], (same, blurred)
    assert same < noisy[0] < noisy[1] < noisy[2], (same, noisy)
    assert fid.fid(half_a, other, net) > 2 * same


def _portrait_with_paste(blur: float):
    """A textured photo with the face-oval hull of the canonical template, and 3 frames whose box around the mouth
    is replaced by a copy blurred by `blur` px: (photo, frames, P_photo)."""
    rng = np.random.default_rng(3)
    photo = rng.integers(60, 200, (160, 160, 3)).astype(np.uint8)
    P = landmarks.CANONICAL_TEMPLATE * 40 + np.array([80, 70, 0])                 # IOD 40 px, centred
    x0, y0, x1, y1 = (int(v) for v in landmarks.mouth_box(P, (160, 160), 0.3))
    frames = np.repeat(photo[None], 3, axis=0)
    soft = cv2.GaussianBlur(photo, (0, 0), blur) if blur > 0 else photo
    frames[:, y0:y1, x0:x1] = soft[y0:y1, x0:x1] ^ 1                                # every pixel differs
    return photo, frames, P


def test_mouth_sharpness_looks_at_the_lips_and_drops_with_a_blurred_paste():
    photo, sharp, P = _portrait_with_paste(0.0)
    changed = (sharp != photo).any(axis=(0, -1))                                # the pasted region
    skin = metrics.skin_region(changed, P)
    lips = metrics.lip_regions(np.stack([P, P + [0, 3, 0]]), photo.shape[:2])  # (2, H, W); the second 3 px lower
    assert lips.shape == (2, 160, 160) and lips.any(axis=(1, 2)).all() and not (lips & skin).any()
    assert lips[0, int(P[13, 1]), int(P[13, 0])] and lips[1, int(P[14, 1]) + 3, int(P[14, 0])]  # lips' middle
    eyes = P[list(np.r_[landmarks.LEFT_EYE_EDGES.ravel(), landmarks.RIGHT_EYE_EDGES.ravel()]), 1].max()
    assert changed[lips[0]].all() and not changed[skin].any() and (np.flatnonzero(skin.any(1)) > eyes).all()
    _, soft, _ = _portrait_with_paste(2.0)
    sharp_ratio = metrics.mouth_sharpness(sharp, lips[0], skin)
    soft_ratio = metrics.mouth_sharpness(soft, lips[0], skin)
    assert sharp_ratio.shape == (3,) and np.all(sharp_ratio > 0.5) and np.all(soft_ratio < 0.2 * sharp_ratio)
    per_frame = metrics.mouth_sharpness(sharp[:2], lips, skin)  # a mask per frame
    assert per_frame.shape == (2,) and np.allclose(per_frame[0], sharp_ratio[0])
    with pytest.raises(ValueError, match="nothing was pasted"):
        metrics.skin_region(np.zeros(photo.shape[:2], bool), P)