"""Dense facial landmarks: 478-point MediaPipe FaceMesh, the canonical pose, landmark images, mouth box, face
crops and landmark measures (the layer under both stages; citations use the figure's boxes, docs/paper.md).

- [A2L: P_0] the A2L stage predicts *dense* landmarks, the MediaPipe FaceMesh topology with iris
  refinement (468 mesh + 10 iris points = 478, 3D), in a canonical, frontal pose so that expression is
  separated from head pose and position (confirmed). MODA (same authors) fits the pose with an external
  estimator; we have none offline, so our canonical pose is a per-frame similarity transform (rotation R,
  isotropic scale s, translation t) fitted by Umeyama/Procrustes (with scale, no reflection) on RIGID points
  (eye corners, nose bridge, forehead, temples) to a fixed frontal template (guess). The transform is kept so
  that it can be inverted.
- [L2I: I^P_i] and [L2I: I_ref / I^P_ref]: landmark images are MediaPipe meshes on a plain (white) canvas with
  coloured contours, drawn from canonical landmarks (inferred from the figure); [L2I: I_mask] the masked frame
  has a black box from under the nose to the chin, cheek to cheek (`mouth_box`; guess).
- Measures: lip LMD, mouth opening and jitter (mean |second difference|).

Coordinates and units
- Image landmarks (`detect*`): pixels; x to the right, y down, z = MediaPipe's relative depth scaled like x
  (z * image width), larger z = farther from the camera. This frame is right-handed.
- Canonical landmarks: same axis directions, the face frontal and upright, origin at the centroid of the
  RIGID points of the template, unit = inter-ocular distance (IOD) of the template, measured between the
  outer eye corners 33 and 263. We use the eye corners rather than the iris centres 468/473 because the
  irises move with gaze; the corners are fixed to the skull.
- "Left"/"right" in index names follow MediaPipe: the subject's left (the image's right side for a
  frontal face).

The template (assets/canonical_template.npy, rebuilt by `python data.py template`): MediaPipe detections on
two real frontal photos (skimage's astronaut, matplotlib's Grace Hopper), each frontalised (yaw and roll
removed using the face's mirror symmetry; the photos' own pitch is kept), centred and scaled to IOD 1,
averaged, then mirror-symmetrised with the mesh's left/right point pairing (found by matching mirrored
positions), re-centred at the RIGID centroid and rescaled to IOD = 1.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import cv2
import mediapipe as mp
import numpy as np
from tqdm import tqdm

from cli import UsageError

# ----------------------------------------------------------------------------------------------------
# Topology (MediaPipe FaceMesh, from mp.solutions.face_mesh_connections, shipped in the wheel)
# ----------------------------------------------------------------------------------------------------
NUM_LANDMARKS = 478  # 468 mesh points + 10 iris points (refine_landmarks=True)

_FMC = mp.solutions.face_mesh_connections


def _edges(connections) -> np.ndarray:
    """frozenset of (i, j) pairs -> sorted (E, 2) int64 array (sorted so drawing is deterministic)."""
    return np.array(sorted(tuple(sorted(e)) for e in connections), dtype=np.int64)


def _points(edges: np.ndarray) -> np.ndarray:
    return np.unique(edges).astype(np.int64)


def _component(edges: np.ndarray, seed: int) -> np.ndarray:
    """Points connected to `seed` through `edges` (used to split the lip contour into outer/inner loops)."""
    found, frontier = {seed}, [seed]
    while frontier:
        p = frontier.pop()
        for a, b in edges[(edges == p).any(axis=1)]:
            for q in (int(a), int(b)):
                if q not in found:
                    found.add(q)
                    frontier.append(q)
    return np.array(sorted(found), dtype=np.int64)


TESSELLATION_EDGES = _edges(_FMC.FACEMESH_TESSELATION)  # (1322, 2) undirected, unique
LIPS_EDGES = _edges(_FMC.FACEMESH_LIPS)
LEFT_EYE_EDGES = _edges(_FMC.FACEMESH_LEFT_EYE)
RIGHT_EYE_EDGES = _edges(_FMC.FACEMESH_RIGHT_EYE)
LEFT_EYEBROW_EDGES = _edges(_FMC.FACEMESH_LEFT_EYEBROW)
RIGHT_EYEBROW_EDGES = _edges(_FMC.FACEMESH_RIGHT_EYEBROW)
LEFT_IRIS_EDGES = _edges(_FMC.FACEMESH_LEFT_IRIS)
RIGHT_IRIS_EDGES = _edges(_FMC.FACEMESH_RIGHT_IRIS)
FACE_OVAL_EDGES = _edges(_FMC.FACEMESH_FACE_OVAL)

MOUTH_TOP_INNER = 13  # inner upper-lip mid-point
MOUTH_BOTTOM_INNER = 14  # inner lower-lip mid-point
MOUTH_LEFT = 61  # mouth corners (61 on the image's left for a frontal face)
MOUTH_RIGHT = 291
EYE_OUTER_RIGHT = 33  # subject's right outer eye corner; the IOD pair is (33, 263)
EYE_OUTER_LEFT = 263
NOSE_LOWER_TIP = 1  # just below the nose tip (4); the synthetic faces scale the nose around it
NOSE_BASE = 2  # subnasale, just under the nose

LIPS = _points(LIPS_EDGES)  # (40,)
LIPS_OUTER = _component(LIPS_EDGES, MOUTH_LEFT)  # (20,)
LIPS_INNER = _component(LIPS_EDGES, 78)  # (20,) 78 = inner-loop corner next to 61
FACE_OVAL = _points(FACE_OVAL_EDGES)  # (36,)
# Points that do not move with speech; closed under the left/right mirror pairing.
RIGID = np.array(
    [33, 133, 263, 362,  # eye corners (outer, inner)
     168, 6, 197, 195,  # nose bridge
     10, 151, 9, 108, 337, 109, 338, 67, 297,  # forehead
     54, 284, 21, 251, 162, 389, 127, 356],  # temples
    dtype=np.int64)
# Lower face-oval points (jaw, from the cheeks at mouth level to the chin), used by mouth_box.
JAW = np.array([58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288], dtype=np.int64)
# Ordered contours (drawing order matters for polygons), used by the synthetic faces (synth_face.py).
FACE_OVAL_RING = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
                  148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)  # FACE_OVAL, in order
INNER_LIP_RING = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
UPPER_INNER = (191, 80, 81, 82, 13, 312, 311, 310, 415)  # inner lip contours, corner to corner
LOWER_INNER = (95, 88, 178, 87, 14, 317, 402, 318, 324)
UPPER_OUTER = (185, 40, 39, 37, 0, 267, 269, 270, 409)
LOWER_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
MOUTH_CORNERS = (78, 308, MOUTH_LEFT, MOUTH_RIGHT)  # inner, then outer corners
EYE_LIDS = (  # per eye (upper lid contour, lower lid contour), pairwise aligned, corners excluded
    ((246, 161, 160, 159, 158, 157, 173), (7, 163, 144, 145, 153, 154, 155)),
    ((466, 388, 387, 386, 385, 384, 398), (249, 390, 373, 374, 380, 381, 382)),
)

ASSETS = Path(__file__).resolve().parent / "assets"
TEMPLATE_PATH = ASSETS / "canonical_template.npy"

# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _check_points(P, name: str = "P", dims: tuple = (3,)) -> np.ndarray:
    P = np.asarray(P)
    if P.ndim < 2 or P.shape[-2] != NUM_LANDMARKS or P.shape[-1] not in dims:
        raise ValueError(f"{name} must have shape (..., {NUM_LANDMARKS}, {'|'.join(map(str, dims))}), "
                         f"got {P.shape}")
    return P


def to_rgb_uint8(image, name: str = "the image") -> np.ndarray:
    """Grayscale (H,W) / (H,W,1), RGB (H,W,3) or RGBA (H,W,4) -> contiguous uint8 RGB (H,W,3).
    Float images are taken to be in [0, 1]. The alpha channel is dropped."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)  # (H, W, 3)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise UsageError(f"{name} has shape {image.shape}; expected an (H,W) grayscale, (H,W,3) RGB "
                         f"or (H,W,4) RGBA image")
    image = image[..., :3]
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(np.rint(image * 255.0), 0, 255)
    elif image.dtype != np.uint8:
        raise UsageError(f"{name} has dtype {image.dtype}; expected uint8 (0-255) or float (0-1)")
    return np.ascontiguousarray(image, dtype=np.uint8)


def load_image_rgb(path) -> np.ndarray:
    """Read an image file as uint8 RGB (H,W,3); UsageError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image file {path} does not exist; give the path of a .png/.jpg photo")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UsageError(f"cannot read {path} as an image; use a .png or .jpg file")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    return to_rgb_uint8(image, str(path))


# ----------------------------------------------------------------------------------------------------
# Detection (MediaPipe legacy solution; the models ship in the mediapipe 0.10.21 wheel)
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr():
    """Silence the process's stderr (file descriptor 2) for a while: MediaPipe's C++ graph logs warnings that
    look like errors (TFLite delegates, feedback tensors) and no environment variable turns them off. Python's
    own messages in the meantime (warnings) are lost too, so keep the window to MediaPipe's work."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class FaceMeshDetector:
    """MediaPipe FaceMesh with iris refinement (478 points).

    static_image_mode=True runs the face detector on every image (photos); False tracks the face from the
    previous frame (videos: faster and steadier). Use as a context manager or call close().
    """

    def __init__(self, static_image_mode: bool, max_num_faces: int = 4,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        # stderr stays silent from here to close(): MediaPipe's graph threads log on their own time, also just
        # after process() has returned; close() joins them
        self._quiet = contextlib.ExitStack()
        self._quiet.enter_context(quiet_stderr())
        try:
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_image_mode, max_num_faces=max_num_faces, refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence)
        except BaseException:
            self._quiet.close()
            raise

    def detect(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """uint8 RGB (H,W,3) -> float32 (478,3) pixel landmarks of the largest face, or None."""
        image_rgb = np.asarray(image_rgb)
        if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"detect expects uint8 RGB (H,W,3), got {image_rgb.dtype} {image_rgb.shape}")
        result = self._mesh.process(np.ascontiguousarray(image_rgb))
        if not result.multi_face_landmarks:
            return None
        h, w = image_rgb.shape[:2]
        faces = [np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float64)
                 for face in result.multi_face_landmarks]  # each (478, 3), normalised [0,1] x/y
        faces = [f * np.array([w, h, w]) for f in faces if len(f) == NUM_LANDMARKS]
        if not faces:
            return None
        areas = [np.prod(f[:, :2].max(axis=0) - f[:, :2].min(axis=0)) for f in faces]
        return faces[int(np.argmax(areas))].astype(np.float32)

    def close(self) -> None:
        try:
            self._mesh.close()
        finally:
            self._quiet.close()

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NO_FACE_HINT = "use a photo with one clearly visible, roughly frontal face at least ~100 px wide"


def detect_image(image, name: str | None = None) -> np.ndarray:
    """Landmarks (478,3) float32 in pixels of the largest face in a photo.

    image: uint8 RGB (H,W,3), grayscale (H,W), RGBA (H,W,4), a float image in [0,1], or a file path.
    Raises UsageError when no face is found.
    """
    if isinstance(image, (str, os.PathLike)):
        name = name or str(image)
        image = load_image_rgb(image)
    name = name or "the image"
    image = to_rgb_uint8(image, name)
    with FaceMeshDetector(static_image_mode=True) as detector:
        P = detector.detect(image)
    if P is None:
        raise UsageError(f"no face found in {name}; {_NO_FACE_HINT}")
    return P


def fill_gaps(P: np.ndarray, found: np.ndarray, max_gap: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Fill frames without a detection. P: (T,478,3) (values of missing frames are ignored), found: (T,).

    Interior gaps are linearly interpolated between the detections on either side; leading/trailing gaps
    hold the first/last detection. Returns (P_filled (T,478,3), usable (T,) bool) where usable = detected or
    inside a gap of at most max_gap frames. Frames in longer gaps are still filled (so the array stays
    finite) but marked False.
    """
    found = np.asarray(found, dtype=bool)
    if not found.any():
        raise ValueError("fill_gaps needs at least one detected frame")
    T = len(found)
    t = np.arange(T)
    hits = t[found]  # detected frame indices, ascending
    pos = np.searchsorted(hits, t)  # index of the first detection at or after t
    nxt = hits[np.minimum(pos, len(hits) - 1)]
    prv = hits[np.maximum(pos - 1, 0)]
    nxt = np.where(pos >= len(hits), hits[-1], nxt)  # trailing gap: hold the last detection
    prv = np.where(pos == 0, nxt, prv)  # leading gap / first detection: hold
    prv = np.where(found, t, prv)
    nxt = np.where(found, t, nxt)
    span = nxt - prv
    w = np.where(span > 0, (t - prv) / np.maximum(span, 1), 0.0)[:, None, None]  # (T, 1, 1)
    P64 = np.asarray(P, dtype=np.float64)
    filled = (1.0 - w) * P64[prv] + w * P64[nxt]  # (T, 478, 3)
    gap_len = np.where(pos == 0, hits[0], np.where(pos >= len(hits), T - 1 - hits[-1], span - 1))
    usable = found | (gap_len <= max_gap)
    return filled.astype(np.asarray(P).dtype), usable


def smooth_landmarks(P: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over time (axis -3) of (...,T,478,3) landmarks; window odd, 0/1 = off
    (see `moving_average`)."""
    P = _check_points(P)
    if P.ndim < 3:
        raise ValueError(f"smooth_landmarks expects (..., T, {NUM_LANDMARKS}, 3), got {P.shape}")
    return moving_average(P, window, axis=-3)


def smooth_stream(chunks, window: int):
    """smooth_landmarks over a sequence that arrives in chunks (n_i, 478, 3), yielded in order, each frame once the
    window//2 frames after it have arrived: the same as smoothing the whole sequence (within float rounding),
    holding only a chunk and 2 x window//2 frames."""
    if window in (0, 1):
        yield from chunks
        return
    half, held, past = window // 2, None, 0  # held: frames not yet yielded, after `past` frames of context
    for chunk in chunks:
        held = chunk if held is None else np.concatenate([held, chunk])
        ready = len(held) - half  # frames whose half-window ahead is complete
        if ready > past:
            yield smooth_landmarks(held, window)[past:ready]
            cut = max(0, ready - half)
            held, past = held[cut:], ready - cut
    if held is not None and len(held) > past:
        yield smooth_landmarks(held, window)[past:]


def moving_average(X: np.ndarray, window: int, axis: int = 0) -> np.ndarray:
    """Centred moving average of any array along `axis` (time); window odd, 0/1 = off.

    Near the ends the window shrinks symmetrically (half-width min(window//2, t, T-1-t)), so the length
    stays T, no padding values are invented, and linear motion is kept exactly (the first and last frames
    are left as they are).
    """
    X = np.asarray(X)
    if window in (0, 1):
        return X.copy()
    if window < 0 or window % 2 == 0:
        raise ValueError(f"smoothing window must be an odd positive number (or 0/1 = off), got {window}")
    half = window // 2
    Y = np.moveaxis(np.asarray(X, dtype=np.float64), axis, 0)  # (T, ...)
    T = len(Y)
    csum = np.concatenate([np.zeros_like(Y[:1]), np.cumsum(Y, axis=0)])  # (T+1, ...)
    t = np.arange(T)
    half_t = np.minimum(np.minimum(t, T - 1 - t), half)  # symmetric window, shrunk at the ends
    lo, hi = t - half_t, t + half_t + 1
    count = (hi - lo).reshape((T,) + (1,) * (Y.ndim - 1))
    out = (csum[hi] - csum[lo]) / count  # (T, ...)
    return np.moveaxis(out, 0, axis).astype(X.dtype)


def detect_video(frames, max_gap: int = 5, smooth: int = 0, progress: bool = False,
                 max_num_faces: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Track landmarks through a video.

    frames: (T,H,W,3) uint8 RGB array or an iterable of frames (grayscale/RGBA frames are converted).
    Returns (landmarks (T,478,3) float32 pixels, found (T,) bool). Missing detections are filled by
    `fill_gaps` (linear interpolation inside, hold at the ends); found[t] is True when frame t had a
    detection or lies in a gap of at most max_gap frames, False for frames in longer gaps (filled anyway).
    smooth: odd centred moving-average window over time applied after filling (0/1 = off).
    max_num_faces: faces tracked (the largest is returned). In tracking mode MediaPipe re-runs its face
    detector on every frame while fewer than max_num_faces faces are tracked, so the default 1 (one talking
    head) is about twice as fast as 4.
    Raises UsageError when no frame has a face.
    """
    detections = []
    with FaceMeshDetector(static_image_mode=False, max_num_faces=max_num_faces) as detector:
        for i, frame in enumerate(tqdm(frames, desc="landmarks", unit="frame", disable=not progress,
                                            file=sys.stdout)):
            detections.append(detector.detect(to_rgb_uint8(frame, f"video frame {i}")))
    if not detections:
        raise UsageError("the video has no frames; give a video with at least one frame")
    found = np.array([d is not None for d in detections])
    if not found.any():
        raise UsageError(f"no face found in any of the {len(found)} video frames; {_NO_FACE_HINT}")
    P = np.stack([d if d is not None else np.zeros((NUM_LANDMARKS, 3), np.float32)
                  for d in detections])  # (T, 478, 3)
    P, usable = fill_gaps(P, found, max_gap)
    return smooth_landmarks(P, smooth).astype(np.float32), usable


# ----------------------------------------------------------------------------------------------------
# Canonical pose: similarity transform fitted on RIGID points (Umeyama 1991)
# ----------------------------------------------------------------------------------------------------


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ s * R @ src + t (rotation, no reflection), batched.

    src, dst: (..., N, 3). Returns R (..., 3, 3), s (...), t (..., 3). Umeyama, PAMI 1991, eqs. 40-42.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_src, mu_dst = src.mean(axis=-2), dst.mean(axis=-2)  # (..., 3)
    src_c, dst_c = src - mu_src[..., None, :], dst - mu_dst[..., None, :]  # (..., N, 3)
    var_src = (src_c ** 2).sum(axis=(-2, -1)) / src.shape[-2]  # (...)
    sigma = np.einsum("...ni,...nj->...ij", dst_c, src_c) / src.shape[-2]  # (..., 3, 3) covariance
    U, D, Vt = np.linalg.svd(sigma)
    d = np.sign(np.linalg.det(U) * np.linalg.det(Vt))  # -1 would be a reflection
    d = np.where(d == 0, 1.0, d)
    S = np.ones(D.shape)
    S[..., 2] = d
    R = U @ (S[..., :, None] * Vt)  # U diag(S) Vt, (..., 3, 3)
    s = (D * S).sum(axis=-1) / var_src  # (...)
    t = mu_dst - s[..., None] * np.einsum("...ij,...j->...i", R, mu_src)  # (..., 3)
    return R, s, t


def _apply_similarity(P, R, s, t):
    """s * R @ p + t for every point; P (..., N, 3), R (..., 3, 3), s (...), t (..., 3)."""
    return s[..., None, None] * np.einsum("...ij,...nj->...ni", R, P) + t[..., None, :]


def canonicalize(P, template: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Remove head pose, position and size: P (...,478,3) -> (P_canon (...,478,3), transform).

    Per frame, a similarity (R, s, t) is fitted on the RIGID points so that s*R@p + t ~ template; it is
    applied to all 478 points. transform = {"R": (...,3,3), "s": (...), "t": (...,3)} float64 arrays with
    the leading shape of P (e.g. (T,) for a (T,478,3) sequence, () for one frame); store it in an npz or a
    torch checkpoint as is. P_canon keeps P's float dtype (float32 unless P is float64); the fit is float64.
    """
    P = _check_points(P)
    template = _template() if template is None else _check_points(template, "template")
    P64 = np.asarray(P, dtype=np.float64)
    R, s, t = umeyama(P64[..., RIGID, :], np.broadcast_to(template[RIGID], P64[..., RIGID, :].shape))
    out_dtype = P.dtype if np.issubdtype(P.dtype, np.floating) else np.float32
    return _apply_similarity(P64, R, s, t).astype(out_dtype), {"R": R, "s": s, "t": t}


def uncanonicalize(P_canon, transform: dict) -> np.ndarray:
    """Inverse of canonicalize: p = R^T (p_canon - t) / s, with the transform's leading shape."""
    P_canon = _check_points(P_canon, "P_canon")
    R, s, t = (np.asarray(transform[k], dtype=np.float64) for k in ("R", "s", "t"))
    if R.shape[-2:] != (3, 3) or t.shape[-1:] != (3,) or R.shape[:-2] != s.shape or t.shape[:-1] != s.shape:
        raise ValueError(f"transform must hold R (...,3,3), s (...), t (...,3); got "
                         f"{R.shape}, {s.shape}, {t.shape}")
    X = np.asarray(P_canon, dtype=np.float64) - t[..., None, :]  # (..., 478, 3)
    P = np.einsum("...ji,...nj->...ni", R, X) / s[..., None, None]  # R^T x / s
    out_dtype = P_canon.dtype if np.issubdtype(P_canon.dtype, np.floating) else np.float32
    return P.astype(out_dtype)


def pose_angles(R: np.ndarray) -> np.ndarray:
    """Head rotation of a canonicalize transform as (pitch, yaw, roll) degrees, (..., 3); for summaries.

    R maps the image face to the canonical one, so the head's rotation in the image is R^T, decomposed as
    R^T = Rz(roll) @ Ry(yaw) @ Rx(pitch) about the image x (right), y (down) and z (away) axes.
    """
    H = np.swapaxes(np.asarray(R, dtype=np.float64), -1, -2)
    yaw = np.arcsin(np.clip(-H[..., 2, 0], -1.0, 1.0))
    pitch = np.arctan2(H[..., 2, 1], H[..., 2, 2])
    roll = np.arctan2(H[..., 1, 0], H[..., 0, 0])
    return np.degrees(np.stack([pitch, yaw, roll], axis=-1))


def _load_template() -> np.ndarray | None:
    if not TEMPLATE_PATH.is_file():
        return None  # only while regenerating it with `python data.py template`
    return _check_points(np.load(TEMPLATE_PATH).astype(np.float32), "canonical template")


def _template() -> np.ndarray:
    if CANONICAL_TEMPLATE is None:
        raise RuntimeError(f"{TEMPLATE_PATH} is missing; run `python data.py template`")
    return CANONICAL_TEMPLATE


CANONICAL_TEMPLATE = _load_template()  # (478, 3) float32, canonical units (IOD = 1), frontal, symmetric

# ----------------------------------------------------------------------------------------------------
# Drawing landmark images ([L2I: I^P_i]: mesh on a plain canvas, contours coloured)
# ----------------------------------------------------------------------------------------------------

CANVAS_FILL = 0.78  # the template's larger bounding-box side covers this fraction of the canvas
if CANONICAL_TEMPLATE is not None:
    _lo, _hi = CANONICAL_TEMPLATE[:, :2].min(axis=0), CANONICAL_TEMPLATE[:, :2].max(axis=0)
    _CANVAS_CENTER = (_lo + _hi) / 2  # canonical (x, y) put at the canvas centre
    _CANVAS_EXTENT = float((_hi - _lo).max())

# (edges, RGB colour, is_contour); later groups are drawn over earlier ones.
_DRAW_GROUPS = [
    (TESSELLATION_EDGES, (190, 190, 190), False),
    (FACE_OVAL_EDGES, (70, 70, 70), True),
    (np.concatenate([RIGHT_EYE_EDGES, RIGHT_EYEBROW_EDGES]), (230, 40, 40), True),
    (np.concatenate([LEFT_EYE_EDGES, LEFT_EYEBROW_EDGES]), (30, 170, 30), True),
    (np.concatenate([RIGHT_IRIS_EDGES, LEFT_IRIS_EDGES]), (30, 110, 255), True),
    (LIPS_EDGES[np.isin(LIPS_EDGES, LIPS_OUTER).all(axis=1)], (200, 0, 170), True),
    (LIPS_EDGES[np.isin(LIPS_EDGES, LIPS_INNER).all(axis=1)], (255, 140, 0), True),
]
_SHIFT = 4  # sub-pixel precision bits for cv2 drawing


def canonical_to_canvas(P_canon, size: int) -> np.ndarray:
    """Canonical landmarks (...,478,2|3) -> pixel (x, y) (...,478,2) on a size x size canvas.

    Fixed scale and offset (from the template), so the whole face fits with a margin and frames of a
    sequence stay comparable.
    """
    P_canon = _check_points(P_canon, "P_canon", (2, 3))
    _template()
    scale = CANVAS_FILL * size / _CANVAS_EXTENT
    return ((P_canon[..., :2] - _CANVAS_CENTER) * scale + size / 2.0).astype(np.float32)


def draw_mesh(canvas: np.ndarray, points_xy, thickness: int | None = None) -> np.ndarray:
    """Draw the mesh (tessellation + coloured contours) onto an RGB uint8 canvas in place; returns it.

    thickness: tessellation line width in pixels (default: 1 per 256 px of canvas); contours get one more
    pixel from 512 px up.
    """
    points_xy = _check_points(points_xy, "points_xy", (2, 3))[:, :2]
    if not np.isfinite(points_xy).all():
        raise ValueError("points_xy contains NaN or inf")
    fixed = np.rint(np.asarray(points_xy, dtype=np.float64) * (1 << _SHIFT)).astype(np.int32)  # (478, 2)
    base = thickness or max(1, int(round(min(canvas.shape[:2]) / 256)))
    for edges, colour, is_contour in _DRAW_GROUPS:
        lines = fixed[edges]  # (E, 2 endpoints, 2 coords)
        thickness = base + 1 if is_contour and base > 1 else base
        cv2.polylines(canvas, lines, False, colour, thickness, cv2.LINE_AA, _SHIFT)
    return canvas


def draw_landmark_image(points_xy, size: int, background: int = 255) -> np.ndarray:
    """Landmark image uint8 (size,size,3): the mesh at pixel coords points_xy (478,2) on a plain canvas."""
    canvas = np.full((size, size, 3), background, dtype=np.uint8)
    return draw_mesh(canvas, points_xy)


def draw_landmark_images(points, size: int, background: int = 255) -> np.ndarray:
    """Batch of landmark images: points (T,478,2|3) pixels -> (T,size,size,3) uint8."""
    points = _check_points(points, "points", (2, 3))
    if points.ndim != 3:
        raise ValueError(f"points must have shape (T, {NUM_LANDMARKS}, 2), got {points.shape}")
    out = np.empty((len(points), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(points):
        out[i] = draw_landmark_image(p, size, background)
    return out


# ----------------------------------------------------------------------------------------------------
# Mouth mask for the L2I masked frame (I_mask) and paste-back
# ----------------------------------------------------------------------------------------------------


def mouth_box(P, image_hw: tuple[int, int], expand: float = 0.15) -> tuple[int, int, int, int]:
    """Axis-aligned lower-face box (x0, y0, x1, y1), x1/y1 exclusive, from pixel landmarks P (478,2|3).

    From the base of the nose (point 2) down to the chin, cheek to cheek (lip and jaw points); widened by
    `expand` x width on each side and lengthened by `expand` x height below the chin. The top edge is not
    moved up, so the nose and eyes stay visible. Clipped to the image.
    """
    P = _check_points(P, "P", (2, 3))
    if P.ndim != 2:
        raise ValueError(f"mouth_box takes one face (478, 2|3), got {P.shape}")
    h, w = int(image_hw[0]), int(image_hw[1])
    pts = P[np.concatenate([LIPS, JAW]), :2].astype(np.float64)
    x0, x1 = pts[:, 0].min(), pts[:, 0].max()
    y0, y1 = min(P[NOSE_BASE, 1], pts[:, 1].min()), pts[:, 1].max()
    dx, dy = expand * (x1 - x0), expand * (y1 - y0)
    box = (int(np.floor(x0 - dx)), int(np.floor(y0)), int(np.ceil(x1 + dx)) + 1, int(np.ceil(y1 + dy)) + 1)
    return (min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h))


def mouth_boxes(P: np.ndarray, size: int, expand: float) -> np.ndarray:
    """mouth_box of every frame of P (T, 478, 3) in size-px crops: (T, 4) int."""
    return np.array([mouth_box(p, (size, size), expand) for p in P], np.int64)


def union_boxes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boxes (T, 4) = (x0, y0, x1, y1) covering both a and b (either may be one box (1, 4), broadcast)."""
    return np.concatenate([np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])], axis=1)


def mouth_mask(P, image_hw: tuple[int, int], feather: float = 0, expand: float = 0.15) -> np.ndarray:
    """float32 (H,W) mask: 1 inside mouth_box, 0 outside; feather > 0 blurs the edge with a Gaussian of
    that sigma in pixels (the soft edge straddles the box border), for blending a generated frame back."""
    h, w = int(image_hw[0]), int(image_hw[1])
    x0, y0, x1, y1 = mouth_box(P, (h, w), expand)
    mask = np.zeros((h, w), dtype=np.float32)
    mask[y0:y1, x0:x1] = 1.0
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=float(feather), borderType=cv2.BORDER_CONSTANT)
    return np.clip(mask, 0.0, 1.0)


def apply_mouth_mask(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Copy of image (H,W[,C]) with the box (x0, y0, x1, y1) set to black (the L2I input I_mask)."""
    out = np.array(image, copy=True)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = 0
    return out


# ----------------------------------------------------------------------------------------------------
# Face crop: frame any photo the way the training frames are framed
# ----------------------------------------------------------------------------------------------------

# Framing of the synthetic training frames, measured over 36 clips (16 train, 20 held out): inter-ocular
# distance = 0.263 (std 0.016) of the frame side, eye midpoint at (0.50, 0.35) of the frame.
FACE_IOD_FRACTION = 0.263
FACE_EYE_XY = (0.50, 0.35)
# Tighter crops (VAEConfig / L2IConfig.face_iod > 0) move the eyes up by this much per unit of IOD fraction, so
# the open jaw stays inside: 0.35 of the side at the rendered framing, 0.25 at an IOD of 0.4 (our choice).
FACE_EYE_RISE = 0.73


def face_crop_box(P, iod_fraction: float = FACE_IOD_FRACTION) -> np.ndarray:
    """Square crop(s) (..., 3) = (x0, y0, side) in pixels that frame the face(s) P (..., 478, 2|3) with the
    inter-ocular distance iod_fraction of the side (default: like the rendered training frames). The box may
    extend past the image border (`crop_faces` pads by replicating edges)."""
    P = _check_points(P, "P", (2, 3))
    if not 0.1 <= iod_fraction <= 0.6:
        raise ValueError(f"iod_fraction must be in [0.1, 0.6] (eyes that far apart, as a fraction of the crop), "
                         f"got {iod_fraction}")
    side = inter_ocular(P) / iod_fraction  # (...,)
    eyes = (P[..., 33, :2] + P[..., 263, :2]) / 2.0  # (..., 2)
    x0 = eyes[..., 0] - FACE_EYE_XY[0] * side
    y0 = eyes[..., 1] - (FACE_EYE_XY[1] - FACE_EYE_RISE * (iod_fraction - FACE_IOD_FRACTION)) * side
    return np.stack([x0, y0, side], axis=-1).astype(np.float64)  # (..., 3)


def clip_face_boxes(P, iod_fraction: float = FACE_IOD_FRACTION, smooth: int = 9) -> np.ndarray:
    """face_crop_box of every frame of a clip P (T, 478, 2|3), steadied by a centred moving average over
    `smooth` frames (a video's crop should not shake with the detector): (T, 3)."""
    boxes = face_crop_box(P, iod_fraction)  # (T, 3)
    return moving_average(boxes, smooth) if len(boxes) > 1 and smooth > 1 else boxes


def crop_clip_faces(frames: np.ndarray, P: np.ndarray, size: int, iod_fraction: float,
                    smooth: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Face crops of a clip (T, H, W, 3) with its landmarks P (T, 478, 3) in its pixels, boxed by clip_face_boxes
    like sample.py's crops of a video: (crops uint8 (T, size, size, 3), landmarks (T, 478, 3) in crop pixels)."""
    boxes = clip_face_boxes(P, iod_fraction, smooth)  # (T, 3)
    return crop_faces(frames, boxes, size), to_crop(P, boxes, size)


def crop_faces(images: np.ndarray, boxes: np.ndarray, size: int, area: bool = True) -> np.ndarray:
    """Cut square boxes (T, 3) = (x0, y0, side) out of images (T or 1, H, W, 3) and resize them to size px:
    uint8 (T, size, size, 3), edge replication outside the image. Shrinking with area=True cuts the box at the
    image's own scale and then area-averages, like the ffmpeg scaling that made the training frames; area=False
    is one bilinear warp, which samples instead of averaging (cv2.warpAffine has no area filter) and so keeps
    aliased detail (sample.py --crop-filter). Enlarging is one bilinear warp either way."""
    boxes = np.atleast_2d(boxes)
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x0, y0, side) in enumerate(boxes):  # one affine warp per frame (cv2 has no batched warp)
        image = images[i if len(images) > 1 else 0]
        cut = max(size, int(np.ceil(side))) if area else size  # px of the warped box
        k = cut / side
        M = np.array([[k, 0.0, -x0 * k], [0.0, k, -y0 * k]])
        crop = cv2.warpAffine(image, M, (cut, cut), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[i] = crop if cut == size else cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return out


def to_crop(P, boxes, size: int) -> np.ndarray:
    """Landmarks (..., 478, 3) in image pixels -> pixels of the size-px crops `boxes` (..., 3) (z scaled alike)."""
    boxes = np.asarray(boxes, np.float64)
    k = (size / boxes[..., 2])[..., None, None]  # (..., 1, 1)
    offset = np.stack([boxes[..., 0], boxes[..., 1], np.zeros_like(boxes[..., 0])], -1)[..., None, :]
    return ((np.asarray(P, np.float64) - offset) * k).astype(np.float32)  # (..., 478, 3)


# ----------------------------------------------------------------------------------------------------
# Measures (evaluation; plain numpy, broadcast over leading dims)
# ----------------------------------------------------------------------------------------------------


def _dist(P, i: int, j: int) -> np.ndarray:
    P = _check_points(P)
    return np.linalg.norm(np.asarray(P[..., i, :], np.float64) - P[..., j, :], axis=-1)


def inter_ocular(P) -> np.ndarray:
    """Distance between the outer eye corners 33 and 263, (...)."""
    return _dist(P, EYE_OUTER_RIGHT, EYE_OUTER_LEFT)


def mouth_opening(P) -> np.ndarray:
    """Distance between the inner lip mid-points 13 and 14, (...)."""
    return _dist(P, MOUTH_TOP_INNER, MOUTH_BOTTOM_INNER)


def mouth_width(P) -> np.ndarray:
    """Distance between the mouth corners 61 and 291, (...)."""
    return _dist(P, MOUTH_LEFT, MOUTH_RIGHT)


def lip_lmd(P_pred, P_true) -> np.ndarray:
    """Lip landmark distance: mean L2 distance over the 40 LIPS points, (...)."""
    P_pred, P_true = _check_points(P_pred, "P_pred"), _check_points(P_true, "P_true")
    diff = np.asarray(P_pred[..., LIPS, :], np.float64) - P_true[..., LIPS, :]
    return np.linalg.norm(diff, axis=-1).mean(axis=-1)


def jitter(P_seq) -> np.ndarray:
    """Mean L2 norm of the second difference over time of all points, (...,T,478,3) -> (...); T >= 3."""
    P_seq = _check_points(P_seq, "P_seq")
    if P_seq.ndim < 3 or P_seq.shape[-3] < 3:
        raise ValueError(f"jitter needs (..., T>=3, {NUM_LANDMARKS}, 3), got {P_seq.shape}")
    accel = np.diff(np.asarray(P_seq, np.float64), n=2, axis=-3)  # (..., T-2, 478, 3)
    return np.linalg.norm(accel, axis=-1).mean(axis=(-2, -1))
