"""Tests for landmarks.py: MediaPipe detection, canonical pose, drawing, mouth mask, measures."""
import numpy as np
import pytest
import skimage.data
from scipy.spatial.transform import Rotation

import landmarks as L
from cli import UsageError


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()  # (512, 512, 3) uint8, one frontal face


@pytest.fixture(scope="module")
def astronaut_points(astronaut):
    return L.detect_image(astronaut)


def random_similarity(rng, max_deg=30.0):
    R = Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
    return R, rng.uniform(20.0, 200.0), rng.uniform(-300.0, 300.0, 3)


NOSE_TIP, CHIN = 4, 152  # the most forward nose point and the chin of the FaceMesh
LEFT_EYE, RIGHT_EYE = np.unique(L.LEFT_EYE_EDGES), np.unique(L.RIGHT_EYE_EDGES)

# ---------------------------------------------------------------- topology and template


def test_index_sets_match_mediapipe_topology():
    assert L.LIPS.shape == (40,) and L.LIPS.dtype == np.int64
    assert len(L.LIPS_OUTER) == len(L.LIPS_INNER) == 20
    assert set(L.LIPS_OUTER) | set(L.LIPS_INNER) == set(L.LIPS)
    assert {0, 17, 61, 291} <= set(L.LIPS_OUTER) and {13, 14, 78, 308} <= set(L.LIPS_INNER)
    irises = set(np.unique(L.LEFT_IRIS_EDGES)) | set(np.unique(L.RIGHT_IRIS_EDGES)) | {468, 473}  # + the centres
    assert irises == set(range(468, 478))
    assert L.TESSELLATION_EDGES.max() < 468 and L.TESSELLATION_EDGES.shape[1] == 2
    assert len(L.FACE_OVAL) == 36


def mirror_pairs(template: np.ndarray) -> np.ndarray:
    """mirror[i] = the template point nearest to the reflection x -> -x of point i."""
    from scipy.spatial import cKDTree
    return cKDTree(template).query(template * [-1.0, 1.0, 1.0])[1].astype(np.int64)


MIRROR = mirror_pairs(L.CANONICAL_TEMPLATE)


def test_template_is_frontal_symmetric_and_normalised():
    T = L.CANONICAL_TEMPLATE.astype(np.float64)
    assert T.shape == (478, 3) and L.CANONICAL_TEMPLATE.dtype == np.float32
    assert L.inter_ocular(T) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(T[L.RIGID].mean(axis=0), 0.0, atol=1e-5)
    mirrored = T[MIRROR] * [-1, 1, 1]
    assert np.abs(mirrored - T).max() < 1e-5  # mirror-symmetric about x = 0
    assert np.array_equal(MIRROR[MIRROR], np.arange(478))  # an involution
    assert MIRROR[33] == 263 and MIRROR[468] == 473 and MIRROR[61] == 291 and MIRROR[13] == 13
    assert sorted(MIRROR[L.RIGID]) == sorted(L.RIGID)
    # upright and facing the camera: eyes above nose tip above mouth above chin, nose tip closest
    assert T[33, 1] < T[NOSE_TIP, 1] < T[13, 1] < T[CHIN, 1]
    assert T[NOSE_TIP, 2] == T[:468, 2].min()
    # the mirror pairing maps almost every mesh edge onto a mesh edge
    edges = {tuple(e) for e in L.TESSELLATION_EDGES.tolist()}
    mapped = {tuple(sorted(e)) for e in MIRROR[L.TESSELLATION_EDGES].tolist()}
    assert len(edges & mapped) > 0.98 * len(edges)


# ---------------------------------------------------------------- detection


def test_detect_astronaut(astronaut, astronaut_points):
    P = astronaut_points
    assert P.shape == (478, 3) and P.dtype == np.float32
    assert (P[:, 0] >= 0).all() and (P[:, 0] < 512).all() and (P[:, 1] >= 0).all() and (P[:, 1] < 512).all()
    assert P[L.LIPS, 1].min() > max(P[LEFT_EYE, 1].max(), P[RIGHT_EYE, 1].max())
    assert 40 < L.inter_ocular(P) < 100  # her eyes are ~60 px apart in this photo
    assert P[263, 0] > P[33, 0]  # MediaPipe "left" = subject's left = image right


def test_grayscale_and_rgba_inputs(astronaut, astronaut_points):
    gray = (astronaut @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)  # (H, W)
    rgba = np.concatenate([astronaut, np.full((512, 512, 1), 255, np.uint8)], axis=2)
    for image in (gray, rgba):
        P = L.detect_image(image)
        assert P.shape == (478, 3)
        assert np.abs(P[:, :2] - astronaut_points[:, :2]).mean() < 3.0


def test_blank_image_raises_usage_error():
    with pytest.raises(UsageError, match="no face found in .*frontal face"):
        L.detect_image(np.full((128, 128, 3), 200, np.uint8))
    with pytest.raises(UsageError, match="expected"):
        L.detect_image(np.zeros((4, 4, 5), np.uint8))


def test_two_faces_returns_the_larger(astronaut):
    import cv2

    crop = astronaut[0:260, 100:360]  # (260, 260, 3) the face with margin
    small = cv2.resize(crop, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)  # (156, 156, 3)
    for big_on_left in (True, False):
        canvas = np.full((260, 436, 3), 255, np.uint8)
        if big_on_left:
            canvas[:, :260], canvas[50:206, 280:] = crop, small
        else:
            canvas[50:206, :156], canvas[:, 176:] = small, crop
        with L.FaceMeshDetector(static_image_mode=True) as detector:
            P = detector.detect(canvas)
        assert L.inter_ocular(P) > 50  # the full-size face (the small one has ~36 px)
        assert (P[:, 0].mean() < 218) == big_on_left


def test_detect_video_tracks_and_fills_gaps(astronaut):
    crop = astronaut[0:256, 96:352]  # (256, 256, 3)
    frames = [np.roll(crop, 2 * i, axis=1) for i in range(6)]
    frames[2] = np.full_like(crop, 128)  # one frame without a face
    P, found = L.detect_video(np.stack(frames), max_gap=1)
    assert P.shape == (6, 478, 3) and P.dtype == np.float32 and found.all()
    nose_x = P[:, NOSE_TIP, 0]
    assert np.all(np.diff(nose_x[[0, 1, 3, 4, 5]]) > 0.5)  # follows the 2 px/frame shift
    assert nose_x[2] == pytest.approx((nose_x[1] + nose_x[3]) / 2, abs=1e-3)  # interpolated
    with pytest.raises(UsageError, match="no face found in any"):
        L.detect_video([np.full((64, 64, 3), 128, np.uint8)] * 2)


def test_fill_gaps_interpolates_holds_and_flags_long_gaps():
    T = 12
    P = np.zeros((T, 478, 3))
    P[:, :, 0] = np.arange(T)[:, None]
    found = np.ones(T, bool)
    found[[0, 4, 5, 8, 9, 10, 11]] = False
    filled, usable = L.fill_gaps(np.where(found[:, None, None], P, np.nan), found, max_gap=2)
    assert np.isfinite(filled).all()
    assert np.allclose(filled[1:8, 0, 0], np.arange(1, 8))  # linear inside
    assert filled[0, 0, 0] == 1 and np.all(filled[8:, 0, 0] == 7)  # held at the ends
    assert usable.tolist() == [True] * 8 + [False] * 4  # trailing gap of 4 > max_gap


# ---------------------------------------------------------------- canonical pose


def test_canonical_round_trip(rng=np.random.default_rng(0)):
    T = L.CANONICAL_TEMPLATE.astype(np.float64)
    seq = []
    for _ in range(8):
        R, s, t = random_similarity(rng)
        seq.append(s * (T + rng.normal(0, 0.02, T.shape)) @ R.T + t)
    seq = np.stack(seq)  # (8, 478, 3)
    C, tr = L.canonicalize(seq)
    assert tr["R"].shape == (8, 3, 3) and tr["s"].shape == (8,) and tr["t"].shape == (8, 3)
    assert np.abs(L.uncanonicalize(C, tr) - seq).max() < 1e-5
    C1, tr1 = L.canonicalize(seq[3])  # single frame: transform without the time axis
    assert tr1["R"].shape == (3, 3) and np.abs(L.uncanonicalize(C1, tr1) - seq[3]).max() < 1e-5
    assert np.allclose(np.linalg.det(tr["R"]), 1.0)  # rotations, no reflections


def test_canonical_is_pose_invariant(astronaut_points, rng=np.random.default_rng(1)):
    P = astronaut_points.astype(np.float64)
    ref, _ = L.canonicalize(P)
    for _ in range(10):
        R, s, t = random_similarity(rng, max_deg=30.0)
        C, _ = L.canonicalize(s * P @ R.T + t)
        assert np.linalg.norm(C - ref, axis=-1).max() < 0.01  # canonical unit = IOD
    assert np.linalg.norm(ref[L.RIGID] - L.CANONICAL_TEMPLATE[L.RIGID], axis=-1).mean() < 0.1


def test_canonical_agrees_on_a_rotated_photo(astronaut, astronaut_points):
    import cv2

    M = cv2.getRotationMatrix2D((225.0, 125.0), 20.0, 1.0)
    rotated = cv2.warpAffine(astronaut, M, (512, 512), borderMode=cv2.BORDER_REFLECT)
    C_rot, tr = L.canonicalize(L.detect_image(rotated))
    C_ref, tr_ref = L.canonicalize(astronaut_points)
    assert np.linalg.norm(C_rot - C_ref, axis=-1).mean() < 0.04  # measured ~0.018 IOD
    roll_change = L.pose_angles(tr["R"])[2] - L.pose_angles(tr_ref["R"])[2]
    assert roll_change == pytest.approx(-20.0, abs=2.0)  # cv2 turns +20 deg counter-clockwise


# ---------------------------------------------------------------- smoothing and measures


def test_smoothing_keeps_length_and_reduces_jitter(rng=np.random.default_rng(2)):
    T = 40
    clean = L.CANONICAL_TEMPLATE[None] + np.linspace(0, 1, T)[:, None, None]  # (T, 478, 3) slow drift
    noisy = clean + rng.normal(0, 0.05, clean.shape)
    smooth = L.smooth_landmarks(noisy, 5)
    assert smooth.shape == noisy.shape
    assert L.jitter(smooth) < 0.3 * L.jitter(noisy)
    assert np.abs(smooth - clean).mean() < np.abs(noisy - clean).mean()
    assert np.array_equal(L.smooth_landmarks(noisy, 1), noisy)
    assert np.allclose(L.smooth_landmarks(clean, 7), clean, atol=1e-6)  # linear motion is kept
    with pytest.raises(ValueError):
        L.smooth_landmarks(noisy, 4)


@pytest.mark.parametrize("sizes", [[61], [1] * 61, [7, 20, 1, 3, 30], [2, 59]])
def test_smoothing_a_stream_equals_smoothing_the_whole(sizes, rng=np.random.default_rng(3)):
    P = rng.normal(0, 1, (61, 478, 3)).astype(np.float32)
    chunks = np.split(P, np.cumsum(sizes)[:-1])
    for window in (0, 3, 9):
        streamed = list(L.smooth_stream(iter(chunks), window))
        assert all(len(c) for c in streamed)
        np.testing.assert_allclose(np.concatenate(streamed), L.smooth_landmarks(P, window), rtol=0, atol=1e-5)


def test_measures_on_constructed_inputs():
    P = np.zeros((2, 478, 3))
    P[:, 33], P[:, 263] = [0, 0, 0], [3, 4, 0]
    P[:, 13], P[:, 14] = [0, 10, 0], [0, 12, 0]
    P[1, 14] = [0, 15, 0]
    P[:, 61], P[:, 291] = [-2, 11, 0], [2, 11, 0]
    assert np.allclose(L.inter_ocular(P), [5, 5])
    assert np.allclose(L.mouth_opening(P), [2, 5])
    assert np.allclose(L.mouth_width(P), [4, 4])
    Q = P.copy()
    Q[:, L.LIPS, 2] += 2.0
    assert np.allclose(L.lip_lmd(P, Q), [2, 2])
    Q[:, NOSE_TIP, 0] += 1.0  # not a lip point
    assert np.allclose(L.lip_lmd(P, Q), [2, 2])
    seq = np.zeros((5, 478, 3))
    seq[:, :, 0] = np.array([0, 1, 2, 3, 4])[:, None]  # constant velocity: no jitter
    assert L.jitter(seq) == pytest.approx(0.0)
    seq[2, :, 1] = 1.0  # a 1-unit blip in frame 2: second differences 1, 2, 1 -> mean 4/3
    assert L.jitter(seq) == pytest.approx(4 / 3)
    assert L.jitter(np.stack([seq, seq])).shape == (2,)


# ---------------------------------------------------------------- drawing and mouth mask


def test_drawing_shape_content_determinism():
    xy = L.canonical_to_canvas(L.CANONICAL_TEMPLATE, 64)
    assert xy.shape == (478, 2)
    assert xy.min() > 2 and xy.max() < 62  # the whole face fits with a margin
    img = L.draw_landmark_image(xy, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img != 255).any(axis=2).mean() > 0.2
    assert np.array_equal(img, L.draw_landmark_image(xy, 64))
    coloured = (img.max(axis=2).astype(int) - img.min(axis=2)) > 60
    assert coloured.sum() > 20  # contours are drawn in colour
    batch = L.draw_landmark_images(np.stack([xy, xy + 1]), 64)
    assert batch.shape == (2, 64, 64, 3) and np.array_equal(batch[0], img)
    assert not np.array_equal(batch[0], batch[1])
    open_mouth = L.CANONICAL_TEMPLATE.copy()
    open_mouth[L.MOUTH_BOTTOM_INNER, 1] += 0.3
    assert not np.array_equal(img, L.draw_landmark_image(L.canonical_to_canvas(open_mouth, 64), 64))


def test_mouth_box_and_mask(astronaut, astronaut_points):
    P = astronaut_points
    x0, y0, x1, y1 = L.mouth_box(P, astronaut.shape[:2])
    lips = P[L.LIPS, :2]
    assert (lips[:, 0] >= x0).all() and (lips[:, 0] < x1).all()
    assert (lips[:, 1] >= y0).all() and (lips[:, 1] < y1).all()
    assert y0 > P[NOSE_TIP, 1] and y1 > P[CHIN, 1]
    assert y0 > P[LEFT_EYE, 1].max()
    masked = L.apply_mouth_mask(astronaut, (x0, y0, x1, y1))
    assert (masked[y0:y1, x0:x1] == 0).all() and np.array_equal(masked[:y0], astronaut[:y0])
    mask = L.mouth_mask(P, astronaut.shape[:2])
    assert mask.dtype == np.float32 and mask.shape == (512, 512)
    assert mask.sum() == (x1 - x0) * (y1 - y0) and mask[y0:y1, x0:x1].min() == 1.0
    soft = L.mouth_mask(P, astronaut.shape[:2], feather=4)
    assert 0.0 <= soft.min() and soft.max() <= 1.0
    assert soft[(y0 + y1) // 2, (x0 + x1) // 2] == pytest.approx(1.0, abs=1e-3)
    assert 0.1 < soft[y0, (x0 + x1) // 2] < 0.9  # soft edge
    edge = L.mouth_box(P + np.array([400, 0, 0], np.float32), (512, 512))
    assert edge[2] == 512  # clipped to the image


# ---------------------------------------------------------------- face crops


def test_crop_faces_area_averages_when_shrinking_or_samples_bilinearly():
    stripes = np.zeros((1, 256, 256, 3), np.uint8)
    stripes[:, :, ::2] = 255  # 1-px columns: bilinear sampling at 1/4 scale aliases them to 0 / 255
    out = L.crop_faces(stripes, np.array([[0.0, 0.0, 256.0]]), 64)
    assert out.shape == (1, 64, 64, 3) and np.abs(out.astype(float) - 127.5).max() < 2
    sampled = L.crop_faces(stripes, np.array([[0.0, 0.0, 256.0]]), 64, area=False)
    assert np.abs(sampled.astype(float) - 127.5).min() > 100
    big = L.crop_faces(stripes, np.array([[100.5, 100.5, 32.0], [0.0, 0.0, 8.0]]), 64)  # enlarging: one warp
    assert big.shape == (2, 64, 64, 3)


def test_face_crop_box_puts_the_eyes_at_the_asked_fraction_and_crops_follow():
    P = L.CANONICAL_TEMPLATE * np.float32(60.0) + np.array([128.0, 120.0, 0.0], np.float32)  # (478, 3) px
    iod = float(L.inter_ocular(P))
    x0, y0, side = L.face_crop_box(P)  # the rendered framing
    np.testing.assert_allclose(iod / side, L.FACE_IOD_FRACTION)
    eyes = (P[33, :2] + P[263, :2]) / 2
    np.testing.assert_allclose((eyes - [x0, y0]) / side, L.FACE_EYE_XY)
    clip = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    crops, P_crop = L.crop_clip_faces(clip, np.stack([P] * 3), 64, 0.4)
    assert crops.shape == (3, 64, 64, 3) and P_crop.shape == (3, 478, 3)
    np.testing.assert_allclose(L.inter_ocular(P_crop), 0.4 * 64, rtol=1e-5)
    np.testing.assert_allclose((P_crop[:, 33, 1] + P_crop[:, 263, 1]) / 2, (0.35 - L.FACE_EYE_RISE * 0.137) * 64,
                               rtol=1e-5)
    assert P_crop[:, L.LIPS, 1].max() < 64  # the mouth stays inside the tighter crop
    with pytest.raises(ValueError, match="iod_fraction"):
        L.face_crop_box(P, 0.9)
