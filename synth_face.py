"""Synthetic faces and their rendering: 20 identities made from two real portraits (and 10 training identities
from five more), a 478-point mesh animated with blendshapes, and a piecewise-affine warp of the portrait onto the
animated mesh.

Not part of the paper (it trains on real videos); our data generator, whose frames come with exact landmarks:
a real portrait (skimage's astronaut, matplotlib's Grace Hopper) is warped piecewise-affinely from its detected
mesh to the animated mesh (vectorised: triangle ids rasterised with cv2.fillPoly, one affine map per triangle,
cv2.remap), with a dark mouth cavity and teeth inside the inner lips; the identities differ by face shape, skin
tone, hair colour, background, base photo and mirroring (0-15 train, 16-19 test). Identities 50-59
(`PORTRAIT_IDENTITIES`, training only, `synth_clips` portraits "all") take their base photo from the five crops of
other people's photos in `assets/portraits/` (KPhotoAlbum's demo; `assets/portraits/SOURCES.md`), so that the
renderer sees more real faces than two. The mesh's index sets come
from `landmarks.py`. Landmarks are pixel coordinates (x, y) with z = MediaPipe z scaled like x. Wide head poses
(`synth_speech.wide_pose_track`) are drawn by `render_clip`'s renderer for turning heads.
"""
import functools
import os

import cv2
import matplotlib
import mediapipe as mp
import numpy as np
import skimage.data
from scipy.spatial import Delaunay

import landmarks
from landmarks import (EYE_LIDS, FACE_OVAL_RING, INNER_LIP_RING, LOWER_INNER, LOWER_OUTER, MOUTH_CORNERS,
                       NOSE_LOWER_TIP, UPPER_INNER, UPPER_OUTER)

NUM_IDENTITIES = 20
TRAIN_IDENTITIES = tuple(range(16))
TEST_IDENTITIES = tuple(range(16, 20))
EXTRA_IDENTITIES_START = 100  # appearance-only identities for the VAE (`synth_clips.appearance_frames`), never in clips
BASE_PORTRAITS = ("astronaut", "grace")  # the base photos of identities 0-19 and of the extras
PORTRAITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "portraits")
REAL_PORTRAITS = ("kphotoalbum_bar55_2", "kphotoalbum_new_wave_2", "kphotoalbum_qt_logo_a", "kphotoalbum_qt_logo_b",
                  "kphotoalbum_anne_helene")  # assets/portraits/<name>.jpg
PORTRAIT_IDENTITIES = tuple(range(50, 50 + 2 * len(REAL_PORTRAITS)))  # each real portrait as it is and mirrored
EXTRA_PORTRAITS_START = 10 ** 8  # extras from here on take any of the seven portraits (synth_clips, portraits "all")



# ------------------------------------------------------------------------------------------------------------
# Mesh: face frame, blendshapes
# ------------------------------------------------------------------------------------------------------------


class FaceFrame:
    """2-D face coordinates in inter-ocular units: u along the eyes, v downwards, origin at the mouth."""

    def __init__(self, P):
        ex = P[landmarks.EYE_OUTER_LEFT, :2] - P[landmarks.EYE_OUTER_RIGHT, :2]
        self.iod = float(np.linalg.norm(ex))
        ex = ex / self.iod
        ex = -ex if ex[0] < 0 else ex
        self.axes = np.stack([ex, np.array([-ex[1], ex[0]])])  # (2, 2) rows: u, v directions
        self.origin = P[[13, 14], :2].mean(0)

    def to_uv(self, P):
        return (P[:, :2] - self.origin) @ self.axes.T / self.iod  # (N, 2)

    def to_image(self, d_uvz):
        """Displacement (N, 3) in (u, v, z) IOD units -> pixels (x, y, z)."""
        xy = d_uvz[:, :2] @ self.axes * self.iod
        return np.concatenate([xy, d_uvz[:, 2:3] * self.iod], 1)


def _mouth_side(P, frame):
    """Signed distance from the mouth line (IOD units, > 0 below), with the lip contours labelled."""
    uv = frame.to_uv(P)
    mids = np.concatenate([(uv[list(UPPER_INNER)] + uv[list(LOWER_INNER)]) / 2, uv[[78, 308]]])
    order = np.argsort(mids[:, 0])
    side = uv[:, 1] - np.interp(uv[:, 0], mids[order, 0], mids[order, 1])
    for idx, sign in ((UPPER_INNER + UPPER_OUTER, -1), (LOWER_INNER + LOWER_OUTER, 1)):
        side[list(idx)] = sign * np.maximum(sign * side[list(idx)], 0.05)
    side[list(MOUTH_CORNERS)] = 0.0
    return side


def _propagate(P, frame, controls, disp, candidates, sigma):
    """Spread control displacements (C, 3) to candidate points with a Gaussian of distance (IOD units)."""
    out = np.zeros((len(P), 3))
    uv = frame.to_uv(P)
    dist = np.linalg.norm(uv[candidates][:, None] - uv[list(controls)][None], axis=-1)  # (N, C)
    nearest = dist.argmin(1)
    weight = np.exp(-(dist.min(1) / sigma) ** 2)
    out[candidates] = weight[:, None] * disp[nearest]
    out[list(controls)] = disp
    return out


def close_mouth(P):
    """Bring the inner lips together (the neutral, closed mouth), dragging nearby skin along."""
    frame = FaceFrame(P)
    side = _mouth_side(P, frame)
    gap = P[list(LOWER_INNER)] - P[list(UPPER_INNER)]  # (9, 3)
    others = np.setdiff1d(np.arange(len(P)), UPPER_INNER + LOWER_INNER + MOUTH_CORNERS)
    up = _propagate(P, frame, UPPER_INNER, gap / 2, others[side[others] < 0], 0.1)
    down = _propagate(P, frame, LOWER_INNER, -gap / 2, others[side[others] > 0], 0.1)
    return P + up + down


def blendshapes(N):
    """Displacement fields (478, 3) px on the neutral mesh N: 'open', 'spread', 'pout', 'blink'."""
    frame = FaceFrame(N)
    uv, side = frame.to_uv(N), _mouth_side(N, frame)
    u, corner_u = uv[:, 0], np.abs(frame.to_uv(N[[61, 291]])[:, 0]).mean()
    lower = 1 / (1 + np.exp(-side / 0.015))
    jaw = np.sqrt(np.clip(1 - (u / 1.15) ** 2, 0, 1))
    lip_profile = np.clip(1 - 0.55 * (u / corner_u) ** 2, 0, 1)
    low_w = lower * jaw * (lip_profile + (1 - lip_profile) * np.clip(side / 0.35, 0, 1))
    up_w = (1 - lower) * np.exp(-(side / 0.2) ** 2) * lip_profile
    J = 0.3  # lip gap at full opening, in IOD
    d_open = np.stack([np.zeros_like(u), J * (0.85 * low_w - 0.15 * up_w), 0.1 * J * low_w], 1)
    lips = np.exp(-(u / 0.5) ** 2 - (side / 0.22) ** 2)
    d_spread = np.stack([0.14 * u * lips, -0.08 * side * lips, np.zeros_like(u)], 1)
    d_pout = np.stack([np.zeros_like(u), 0.06 * side * lips, -0.08 * lips], 1)
    d_blink = np.zeros((len(N), 3))
    for upper, lower_lid in EYE_LIDS:
        gap = N[list(lower_lid)] - N[list(upper)]
        centre_v = uv[list(upper + lower_lid), 1].mean()
        contour = set(upper + lower_lid)
        above = np.array([i for i in range(468) if uv[i, 1] < centre_v and i not in contour])
        d_blink += _propagate(N, frame, upper, 0.9 * gap, above, 0.12)
        d_blink[list(lower_lid)] -= 0.1 * gap
    shapes = {"open": d_open, "spread": d_spread, "pout": d_pout}
    shapes = {k: frame.to_image(v) for k, v in shapes.items()}
    shapes["blink"] = d_blink
    return shapes


def reshape_identity(P, params):
    """Face shape of one identity: jaw width, face length, eye spacing, nose and mouth size."""
    frame = FaceFrame(P)
    uv = frame.to_uv(P)
    nose_v = uv[NOSE_LOWER_TIP, 1]
    below = np.clip((uv[:, 1] - nose_v) / (-nose_v + 1e-6), 0, None)  # 0 at the nose, 1 at the mouth
    d = np.zeros((len(P), 3))
    d[:, 0] += params["jaw_width"] * uv[:, 0] * np.clip(below, 0, 1.6)
    d[:, 1] += params["face_length"] * np.clip(uv[:, 1] - nose_v, 0, None)
    for sign, (upper, lower_lid) in zip((-1, 1), EYE_LIDS):
        centre = uv[list(upper + lower_lid)].mean(0)
        d[:, 0] += sign * params["eye_spacing"] * np.exp(-((uv - centre) ** 2).sum(1) / 0.35 ** 2)
    for centre, key, sigma in ((uv[NOSE_LOWER_TIP], "nose_scale", 0.3), (uv[[13, 14]].mean(0), "mouth_scale", 0.35)):
        w = np.exp(-((uv - centre) ** 2).sum(1) / sigma ** 2)[:, None]
        d[:, :2] += params[key] * (uv - centre) * w
    return P + frame.to_image(d)


def rotation(yaw, pitch, roll):
    """3x3 rotation from degrees (yaw about y, pitch about x, roll about z)."""
    y, p, r = np.radians([yaw, pitch, roll])
    Ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    Rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def animate(N, shapes, art, blink, pose, size):
    """Animated meshes (T, 478, 3) px from the neutral mesh and per-frame tracks; pose (T, 5) yaw, pitch, roll
    degrees and tx, ty frame fractions, or (T, 6) with a scale change (size / neutral size - 1) as well."""
    opening, spread = art[:, 0, None, None], art[:, 1, None, None]  # (T, 1, 1)
    P = (N[None] + opening * shapes["open"] + np.maximum(spread, 0) * shapes["spread"]
         + np.minimum(spread, 0) * (shapes["spread"] - shapes["pout"]) + blink[:, None, None] * shapes["blink"])
    centre = N.mean(0)
    out = np.empty_like(P)
    for t in range(len(P)):
        out[t] = head_motion(P[t], pose[t], centre, size)
    return out.astype(np.float32)


def head_motion(X, pose_t, centre, size):
    """Points X (N, 3) px moved by one frame's head pose (5 or 6 values, `animate`) about `centre`."""
    R = rotation(*pose_t[:3])
    if len(pose_t) > 5:  # a scale change (wide poses): the head comes closer or moves away
        R = R * (1 + pose_t[5])
    out = (X - centre) @ R.T + centre
    out[:, :2] += pose_t[3:5] * size
    return out


# ------------------------------------------------------------------------------------------------------------
# Identities: base portraits, recolouring, backgrounds
# ------------------------------------------------------------------------------------------------------------

def _portrait(name):
    if name == "astronaut":
        return skimage.data.astronaut()
    folder = os.path.join(matplotlib.get_data_path(), "sample_data") if name == "grace" else PORTRAITS_DIR
    path = os.path.join(folder, "grace_hopper.jpg" if name == "grace" else name + ".jpg")
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


@functools.lru_cache(maxsize=2 * (len(BASE_PORTRAITS) + len(REAL_PORTRAITS)))
def _base_photo(name, mirror):
    """(photo RGB, detected 478-point mesh px, person mask 0..1) of one base portrait."""
    photo = _portrait(name)
    photo = np.ascontiguousarray(photo[:, ::-1]) if mirror else photo
    mesh = landmarks.detect_image(photo)
    if mesh is None:
        raise RuntimeError(f"MediaPipe found no face on the {name} portrait")
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        person = seg.process(photo).segmentation_mask.astype(np.float32)
    return photo, np.asarray(mesh, np.float64), person


def identity_params(identity):
    """Deterministic appearance of identity `identity` (0..19, PORTRAIT_IDENTITIES, or an extra)."""
    real = identity in PORTRAIT_IDENTITIES or identity >= EXTRA_PORTRAITS_START
    if not (0 <= identity < NUM_IDENTITIES or real or identity >= EXTRA_IDENTITIES_START):
        raise ValueError(f"identity must be in 0..{NUM_IDENTITIES - 1}, {PORTRAIT_IDENTITIES[0]}.."
                         f"{PORTRAIT_IDENTITIES[-1]} or >= {EXTRA_IDENTITIES_START}, got {identity}")
    rng = np.random.default_rng(1000 + identity)
    if identity >= EXTRA_PORTRAITS_START:
        photos, k = BASE_PORTRAITS + REAL_PORTRAITS, identity
    else:
        photos, k = (REAL_PORTRAITS, identity - PORTRAIT_IDENTITIES[0]) if real else (BASE_PORTRAITS, identity)
    photo, mirror = photos[k % len(photos)], bool((k // len(photos)) % 2)
    return {
        "photo": photo, "mirror": mirror,
        "crop_scale": rng.uniform(3.6, 4.3), "crop_dx": rng.uniform(-0.2, 0.2), "crop_dy": rng.uniform(0.1, 0.35),
        "jaw_width": rng.uniform(-0.1, 0.1), "face_length": rng.uniform(-0.07, 0.07),
        "eye_spacing": rng.uniform(-0.04, 0.04), "nose_scale": rng.uniform(-0.15, 0.15),
        "mouth_scale": rng.uniform(-0.12, 0.12),
        "skin_lab": (rng.uniform(-30, 12), rng.uniform(8, 20), rng.uniform(10, 28)),
        "hair_lab": (rng.uniform(25, 170), rng.uniform(-5, 30), rng.uniform(-10, 45)),
        "background": ("solid", "vertical", "horizontal", "stripes", "noise")[identity % 5],
        "bg_colours": rng.uniform(20, 235, (2, 3)),
        "bg_seed": int(rng.integers(1 << 30)),
    }


def _background(params, size):
    rng = np.random.default_rng(params["bg_seed"])
    a, b = params["bg_colours"]
    ramp = np.linspace(0, 1, size)
    kind = params["background"]
    if kind == "solid":
        mix = np.full((size, size), 0.15) + 0.05 * ramp[None]
    elif kind == "vertical":
        mix = np.repeat(ramp[:, None], size, 1)
    elif kind == "horizontal":
        mix = np.repeat(ramp[None], size, 0)
    elif kind == "stripes":
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * (ramp[None] + ramp[:, None]) * rng.uniform(3, 7))
    else:
        noise = cv2.resize(rng.uniform(0, 1, (8, 8)), (size, size), interpolation=cv2.INTER_CUBIC)
        mix = np.clip(noise, 0, 1)
    return (a * (1 - mix[..., None]) + b * mix[..., None]).astype(np.float32)


def _recolour(img, mask, target_lab, keep_l):
    """Shift the Lab colour of the masked pixels towards target (L offset if keep_l, else mean L)."""
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    mask = mask.astype(np.float32)
    weights = mask / max(mask.sum(), 1e-6)
    mean = (lab * weights[..., None]).sum((0, 1))
    shift = np.array(target_lab, np.float32) - np.array([0, mean[1], mean[2]])
    shift[0] = target_lab[0] if keep_l else (target_lab[0] / 255 * 100 - mean[0])
    lab = (lab + mask[..., None] * shift).astype(np.float32)
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255, 0, 255)


@functools.lru_cache(maxsize=8)
def identity_texture(identity, size=256):
    """Texture of one identity: (image float32 (size, size, 3), photo mesh px (478, 3), neutral mesh N).

    The photo is mirrored, cropped and recoloured; its detected mesh is where the texture comes from, and
    N (closed mouth, identity face shape) is where the texture goes before animation.
    """
    params = identity_params(identity)
    photo, mesh, person = _base_photo(params["photo"], params["mirror"])
    frame = FaceFrame(mesh)
    side = params["crop_scale"] * frame.iod
    centre = mesh[list(FACE_OVAL_RING), :2].mean(0) + frame.iod * np.array([params["crop_dx"], params["crop_dy"]])
    scale = size / side
    M = np.array([[scale, 0, size / 2 - scale * centre[0]], [0, scale, size / 2 - scale * centre[1]]])
    image = cv2.warpAffine(photo, M, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    person = cv2.warpAffine(person, M, (size, size), borderMode=cv2.BORDER_REPLICATE)
    tex_mesh = np.concatenate([mesh[:, :2] * scale + M[:, 2], mesh[:, 2:] * scale], 1)
    image = image.astype(np.float32)
    face = np.zeros((size, size), np.float32)
    cv2.fillPoly(face, [np.round(tex_mesh[list(FACE_OVAL_RING), :2]).astype(np.int32)], 1.0)
    ff = FaceFrame(tex_mesh)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2).astype(np.float64)
    uv = ff.to_uv(grid)  # (size * size, 2)
    brow_v = ff.to_uv(tex_mesh[[105, 334]])[:, 1].mean()
    head = ((uv[:, 0] / 1.3) ** 2 + ((uv[:, 1] - brow_v) / 1.4) ** 2 < 1) & (uv[:, 1] < brow_v + 0.9)
    hair = head.reshape(size, size) * (person > 0.5) * (1 - cv2.dilate(face, np.ones((5, 5))))
    lab = cv2.cvtColor(image / 255, cv2.COLOR_RGB2LAB)
    skin_ref = lab[face > 0].mean(0)
    skin_like = np.exp(-(((lab[..., 1:] - skin_ref[1:]) ** 2).sum(-1)) / 12.0 ** 2) * person * (1 - hair)
    skin = cv2.GaussianBlur(np.maximum(face, skin_like).astype(np.float32), (0, 0), size / 128)
    image = _recolour(image, skin, params["skin_lab"], keep_l=True)
    hair = cv2.GaussianBlur(hair.astype(np.float32), (0, 0), size / 128)
    image = _recolour(image, hair, params["hair_lab"], keep_l=False)
    alpha = cv2.GaussianBlur(person, (0, 0), size / 256)[..., None]
    image = alpha * image + (1 - alpha) * _background(params, size)
    neutral = reshape_identity(close_mouth(tex_mesh), params)
    return np.clip(image, 0, 255).astype(np.float32), tex_mesh, neutral


# ------------------------------------------------------------------------------------------------------------
# Rendering: piecewise-affine warp of the texture onto the animated mesh
# ------------------------------------------------------------------------------------------------------------

def _anchors(mesh, size):
    """Outer control points (texture px) and how much each follows the head (1 face .. 0 frame border)."""
    oval = mesh[list(FACE_OVAL_RING), :2]
    centre = oval.mean(0)
    radius = np.linalg.norm(oval - centre, axis=1).mean()
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1)
    points, follow = [], []
    for factor, weight in ((1.35, 0.85), (1.9, 0.45)):
        points.append(centre + factor * radius * ring)
        follow.append(np.full(len(ring), weight))
    edge = np.linspace(-2, size + 1, 9)
    border = np.concatenate([np.stack([edge, np.full(9, -2.0)], 1), np.stack([edge, np.full(9, size + 1.0)], 1),
                             np.stack([np.full(7, -2.0), edge[1:-1]], 1),
                             np.stack([np.full(7, size + 1.0), edge[1:-1]], 1)])
    points.append(border)
    follow.append(np.zeros(len(border)))
    return np.concatenate(points), np.concatenate(follow)


@functools.lru_cache(maxsize=8)
def _triangulation(identity, size):
    """Triangles (K, 3) over mesh points 0..477 and anchors 478.. (Delaunay in texture space)."""
    return triangulate(identity_texture(identity, size)[1], size)


def triangulate(tex_mesh, size):
    """`_triangulation` of any texture mesh (478, 3) px: the triangles that do not bridge the lips."""
    anchors, _ = _anchors(tex_mesh, size)
    return _apart_lips(Delaunay(np.concatenate([tex_mesh[:, :2], anchors])).simplices)


def mesh_triangles(mesh):
    """Triangles (K, 3) over the 478 points of a mesh (478, 2|3) alone (Delaunay), none bridging the lips."""
    return _apart_lips(Delaunay(np.asarray(mesh)[:, :2]).simplices)


def _apart_lips(tri):
    """The triangles (K, 3) that join neither the upper and the lower inner lip nor lie inside the mouth."""
    upper, lower = set(UPPER_INNER), set(LOWER_INNER)
    across = np.array([any(v in upper for v in t) and any(v in lower for v in t) for t in tri])
    inner = np.array([all(v in INNER_LIP_RING for v in t) for t in tri])
    return tri[~(across | inner)]


def _anchor_depth(anchors, mesh):
    """A depth for each anchor: that of the nearest face-oval point (the hair and ears lie around the face)."""
    oval = mesh[list(FACE_OVAL_RING)]
    nearest = np.linalg.norm(anchors[:, None] - oval[None, :, :2], axis=-1).argmin(1)
    return oval[nearest, 2]


def _anchor_targets(anchors, follow, mesh_t, neutral, size):
    """Move anchors with the head: the least-squares similarity of the rigid points, partially."""
    src, dst = neutral[landmarks.RIGID, :2], mesh_t[landmarks.RIGID, :2]
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]  # least-squares similarity, complex form
    a = np.sum((zd - zd.mean()) * np.conj(zs - zs.mean())) / np.sum(np.abs(zs - zs.mean()) ** 2)
    za = a * (anchors[:, 0] + 1j * anchors[:, 1] - zs.mean()) + zd.mean()
    moved = np.stack([za.real, za.imag], 1)
    return anchors + follow[:, None] * (moved - anchors)


def _triangle_affines(dst, src):
    """Affine maps (K, 2, 3) taking each target triangle dst (K, 3, 2) onto its source triangle src."""
    e1, e2 = dst[:, 1] - dst[:, 0], dst[:, 2] - dst[:, 0]  # (K, 2)
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = np.where(np.abs(det) < 1e-9, 1e-9, det)
    inv = np.stack([np.stack([e2[:, 1], -e2[:, 0]], 1), np.stack([-e1[:, 1], e1[:, 0]], 1)], 1) / det[:, None, None]
    src_edges = np.stack([src[:, 1] - src[:, 0], src[:, 2] - src[:, 0]], 2)  # (K, 2, 2) columns = edges
    linear = src_edges @ inv  # (K, 2, 2): texture offset per target offset
    offset = src[:, 0] - np.einsum("kij,kj->ki", linear, dst[:, 0])
    return np.concatenate([linear, offset[:, :, None]], 2)


def _signed_area(points):
    """Twice the signed area of triangles (K, 3, 2) (> 0 counter-clockwise in x right, y down)."""
    e1, e2 = points[:, 1] - points[:, 0], points[:, 2] - points[:, 0]
    return e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]


def paint_order(tex_points, tri, target_points, depth, facing=False):
    """Order to paint triangles in: far first, near last (mean vertex depth). facing: triangles turned away
    from the camera (their target winding flipped against the texture's) go under all that face it, and those
    with an anchor (background, hair) under both, so a far cheek or the far side of the nose turned behind
    nearer parts never paints over them, whatever the depth sort of large triangles says."""
    order = np.argsort(-depth[tri].mean(1))
    if not facing:
        return order
    away = _signed_area(target_points[tri]) * _signed_area(tex_points[tri]) <= 0
    layer = np.where((tri >= landmarks.NUM_LANDMARKS).any(1), 0, np.where(away, 1, 2))
    return order[np.argsort(layer[order], kind="stable")]


def warp_frame(texture, tex_points, tri, target_points, depth, facing=False, blurred=None):
    """Render texture (H, W, 3) float32 so tex_points land on target_points (piecewise affine).

    Triangle ids are rasterised in `paint_order` with cv2.fillPoly, each pixel is mapped back to the
    texture by its triangle's affine map, and cv2.remap samples it. blurred (a blurred texture): where a
    triangle magnifies its texture more than 1.4x in some direction (the side of a face turned towards the
    camera, seen edge-on in the photo), the render fades into that of `blurred` (fully from 2.8x), so the
    photo's few pixels of ear, hair and cheek edge smear softly rather than into jagged streaks.
    """
    h, w = texture.shape[:2]
    ids = np.full((h, w), -1, np.int32)
    order = paint_order(tex_points, tri, target_points, depth, facing)
    pts = np.round(target_points[tri] * 16).astype(np.int32)  # (K, 3, 2) with 4 fractional bits
    for k in order:
        cv2.fillPoly(ids, [pts[k]], int(k), lineType=cv2.LINE_8, shift=4)
    affine = _triangle_affines(target_points[tri], tex_points[tri])  # (K, 2, 3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    valid = ids >= 0
    A = affine[np.where(valid, ids, 0)]  # (H, W, 2, 3)
    map_x = np.where(valid, A[..., 0, 0] * xs + A[..., 0, 1] * ys + A[..., 0, 2], xs).astype(np.float32)
    map_y = np.where(valid, A[..., 1, 0] * xs + A[..., 1, 1] * ys + A[..., 1, 2], ys).astype(np.float32)
    image = cv2.remap(texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if blurred is None:
        return image
    magnify = 1 / np.maximum(np.linalg.svd(affine[:, :, :2], compute_uv=False)[:, -1], 1e-6)  # (K,)
    soft = np.where(valid, np.clip((magnify[np.where(valid, ids, 0)] - 1.4) / 1.4, 0, 1), 0).astype(np.float32)
    soft = cv2.GaussianBlur(soft, (0, 0), h / 128)[..., None]
    smooth = cv2.remap(blurred, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return image * (1 - soft) + smooth * soft


def mouth_layer(mesh_t, iod, shape, taper=False):
    """The dark mouth cavity with upper and lower teeth inside the inner-lip contour, drawn 4x supersampled
    (anti-aliased) in a small box around the mouth only: (box (x0, y0, x1, y1), colour (h, w, 3), alpha (h, w, 1))
    float32, or None where the lips are closed or the mouth lies outside an image of `shape` (H, W).

    taper: the teeth bands thin out to nothing at the mouth corners (as teeth recede into the cheeks) instead of
    keeping their thickness along the whole lip, where they outline a narrow opening in white (the paste-back's
    detail transfer; the synthetic data draws them untapered)."""
    h, w = shape
    gap = float(np.linalg.norm(mesh_t[14, :2] - mesh_t[13, :2]))
    if gap < 0.5:
        return None
    ring = mesh_t[list(INNER_LIP_RING), :2]
    x0, y0 = np.maximum(np.floor(ring.min(0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(ring.max(0)).astype(int) + 3, [w, h])
    if x1 <= x0 or y1 <= y0:
        return None
    scale, origin = 4, np.array([x0, y0])
    box = (y1 - y0) * scale, (x1 - x0) * scale

    def raster(poly):
        mask = np.zeros(box, np.uint8)
        cv2.fillPoly(mask, [np.round((poly - origin) * scale * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        return cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255

    normal = (mesh_t[14, :2] - mesh_t[13, :2]) / gap
    teeth = 0.0
    for inner, frac, limit in ((UPPER_INNER, 0.25, 0.05), (LOWER_INNER, -0.12, 0.025)):
        edge = mesh_t[[78, *inner, 308], :2]  # (11, 2) corner to corner
        offset = normal * np.sign(frac) * min(abs(frac) * gap, limit * iod)
        if taper:
            offset = offset * np.sin(np.linspace(0, np.pi, len(edge)))[:, None]  # (11, 2): 0 at the corners
        teeth = np.maximum(teeth, raster(np.concatenate([edge, (edge + offset)[::-1]])))
    cavity = raster(ring)
    colour = np.array([40, 12, 16], np.float32) * (1 - teeth) + np.array([225, 220, 205], np.float32) * teeth
    return (x0, y0, x1, y1), colour, cavity


def over(image, layer):
    """A `mouth_layer` composited over a float image (in place; None leaves it as it is); returns image."""
    if layer is not None:
        (x0, y0, x1, y1), colour, cavity = layer
        image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - cavity) + colour * cavity
    return image


def draw_mouth(image, mesh_t, iod):
    """The mouth cavity and teeth (`mouth_layer`) drawn into a float image (in place); returns image."""
    return over(image, mouth_layer(mesh_t, iod, image.shape[:2]))


def render_clip(identity, art, blink, pose, size=256, turning=None):
    """Frames uint8 (T, size, size, 3) and ground-truth landmarks float32 (T, 478, 3) px.

    pose (T, 5) or (T, 6) (`animate`). turning, the renderer for turning heads (default: on for (T, 6) poses,
    the wide ones; off for (T, 5), which keeps the small-pose clips of the shipped models bit for bit):
    triangles turned away go under those facing the camera (`paint_order`), and the anchors around the face
    turn with the head in 3-D at the depth of the face's edge, partially (`_anchors`' follow), rather than
    following a 2-D similarity of the rigid points, which at large yaw stretches the far side's hair and skin
    into streaks and folds the near side's; and where the near side's edge-on photo pixels are magnified,
    the render softens (`warp_frame`'s blurred)."""
    T = len(art)
    if art.shape != (T, 2) or np.shape(blink) != (T,) or np.shape(pose) not in ((T, 5), (T, 6)):
        raise ValueError(f"render_clip expects art (T, 2), blink (T,), pose (T, 5) or (T, 6), got {art.shape}, "
                         f"{np.shape(blink)}, {np.shape(pose)}")
    turning = np.shape(pose)[1] == 6 if turning is None else turning
    texture, tex_mesh, neutral = identity_texture(identity, size)
    meshes = animate(neutral, blendshapes(neutral), art, blink, pose, size)
    return warp_meshes(texture, tex_mesh, neutral, _triangulation(identity, size), meshes, pose, size, turning), meshes


def warp_meshes(texture, tex_mesh, neutral, tri, meshes, pose, size, turning=False):
    """The texture warped onto each mesh of meshes (T, 478, 3) px with the mouth drawn inside its inner lips:
    uint8 (T, size, size, 3). The border anchors follow the head (pose (T, 5|6), used when turning) or a
    similarity of each mesh's rigid points to the neutral mesh (`_anchor_targets`)."""
    anchors, follow = _anchors(tex_mesh, size)
    iod = FaceFrame(neutral).iod
    tex_points = np.concatenate([tex_mesh[:, :2], anchors])
    frames = np.empty((len(meshes), size, size, 3), np.uint8)
    far = np.full(len(anchors), float(neutral[:, 2].max()) + iod)
    anchors3 = np.concatenate([anchors, _anchor_depth(anchors, tex_mesh)[:, None]], 1)
    centre = neutral.mean(0)
    blurred = cv2.GaussianBlur(texture, (0, 0), size / 128) if turning else None
    for t, mesh_t in enumerate(meshes):
        if turning:
            moved = anchors + follow[:, None] * (head_motion(anchors3, pose[t], centre, size)[:, :2] - anchors)
        else:
            moved = _anchor_targets(anchors, follow, mesh_t, neutral, size)
        target = np.concatenate([mesh_t[:, :2], moved])
        image = warp_frame(texture, tex_points, tri, target, np.concatenate([mesh_t[:, 2], far]), turning, blurred)
        frames[t] = np.clip(draw_mouth(image, mesh_t, iod), 0, 255).astype(np.uint8)
    return frames
