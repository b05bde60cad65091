"""The DreamHead cascade ([Cascade] in docs/paper.md): speech and a face in, a talking-head video out.

The two hierarchies joined, from raw inputs to frames, in one object a Python user can call:

    from dreamhead import DreamHead
    model = DreamHead.from_checkpoints()                    # the shipped tiny checkpoints
    talk = model.generate("speech.wav", "face.png")         # face detection, crop and P̄ run here
    for frames in talk:                                      # A2L, L2I, paste-back: uint8 (b, H, W, 3) batches
        ...
    model.write_video("out.mp4", talk)                       # or stream them to an mp4 (what sample.py does)

Per video: MediaPipe finds the face's 478 landmarks (the largest face; a video is tracked), a square crop is
framed the way the training frames are (landmarks.face_crop_box with the models' face_iod), and the face's mean
canonical mesh becomes P̄. Then everything streams, in order: the sound is read a minute at a time into log-mel
rows, A2L (a2l.A2L.stream, overlapping windows) turns them into canonical landmarks window by window, and per
frame batch L2I (l2i.L2I.sample, decoding through the frozen VAE) renders the crop from its landmark image, the
reference pair (the first source frame and its landmark image, encoded once per video) and the crop with its
mouth blacked out; each generated crop is pasted back into its full frame inside a feathered mouth mask, so
everything outside the mouth keeps the source's pixels, and inside it the photo's own fine detail, warped onto the
driving landmarks, is added to the upscaled render (`transfer_detail`, `--detail`; not in the paper). No array
grows with the audio's length beyond a few numbers per frame (the source index). A video instead of a photo is
dubbed: head pose, upper face and background follow the video (looped back and forth when the audio is longer),
the mouth follows the new audio.

Also here: `load_model`, which rebuilds any stage from its one-dict checkpoint.
"""
from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from tqdm import tqdm

import clips
import landmarks
from a2l import A2L, A2LConfig
from adapt import FRAMES as ADAPT_FRAMES, RENDER_SIZE, adapt_l2i, synthetic_speech
from audio import SAMPLE_RATE, MelContext, Speech, log_mel_rows
from cli import UsageError
from common import atomic_write, load_checkpoint, pick_device, to_tensor_image, to_uint8_image, weights_sha1
from l2i import L2I, L2IConfig, check_vae_matches, condition_images, encode_conditions, paste_back, reference_images
from synth_face import mesh_triangles, mouth_layer, over, warp_frame
from vae import AutoencoderKL, VAEConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = {"vae": (AutoencoderKL, VAEConfig), "a2l": (A2L, A2LConfig), "l2i": (L2I, L2IConfig)}
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
MIN_EYE_DISTANCE = 12  # px in the output frame; below this the mouth is a few pixels and cannot be rendered
MAX_WEIGHT = 1e4  # trained weights stay within a few units (the shipped ones: 1.5); a flipped exponent bit does not
CHUNK = 1024  # frames of given landmarks canonicalised at once (memory vs speed)
DETAIL = 0.5  # generated px below which the photo's warped detail goes into the pasted mouth (transfer_detail); 0: none


def default_checkpoint(stage: str) -> str:
    """The shipped tiny checkpoint of a stage, else the one `train.py --stage STAGE` writes by default."""
    shipped = os.path.join(ROOT, "checkpoints", f"{stage}_tiny.pt")
    return shipped if os.path.exists(shipped) else os.path.join("runs", stage, "ckpt.pt")


def load_model(path: str, stage: str, device="cpu", weights: str = "ema") -> torch.nn.Module:
    """Rebuild a stage's model from its one-dict checkpoint (config + weights), in eval mode on `device`.

    weights: "ema" (the default for sampling, as every diffusion reference does) or "model" (raw weights).
    An L2I model carries `trained_with_vae` ({sha1, config} of its VAE, or None for older checkpoints)."""
    ckpt = load_checkpoint(path, stage)
    model_class, config_class = STAGES[stage]
    try:
        model = model_class(config_class.from_checkpoint(ckpt["config"]))
        model.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"{path} does not match this code's {stage} model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}); retrain it or update the code") from None
    bad = [k for k, v in ckpt[weights].items() if v.is_floating_point() and v.numel()
           and not (torch.isfinite(v).all() and float(v.abs().max()) <= MAX_WEIGHT)]
    if bad:
        raise UsageError(f"{path} has damaged weights: NaN, infinite or above {MAX_WEIGHT:g} in {bad[0]}"
                         f"{' and more' if len(bad) > 1 else ''} (a flipped bit or a diverged run); re-download or "
                         "retrain it")
    if stage == "l2i":
        model.trained_with_vae = ckpt.get("vae")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Inputs: the face source, the per-frame plan
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Face:
    """The face source: frames uint8 (N, H, W, 3) at 25 fps (a photo: N = 1), their landmarks (N, 478, 3) in
    those pixels, `usable` (N,) whether a face was found on the frame (or in a short gap), and `scale`, the size
    of these frames over the file's (the output is at most max_size px)."""
    frames: np.ndarray
    P: np.ndarray
    usable: np.ndarray
    scale: float


@dataclass
class Plan:
    """Everything decided before rendering; the driving landmarks themselves are made as rendering goes.

    source (T,): the source frame output frame t starts from (T = ceil(seconds x 25)); boxes (N, 3): each source
    frame's face box (x0, y0, side) in frame pixels; source_mouth (N, 4): each source frame's mouth box in crop
    pixels (x0, y0, x1, y1); pose: the source's head pose per source frame (landmarks.canonicalize); canonical: a
    function that starts a fresh pass over the canonical landmarks to render, (n, 478, 3) chunks of frames 0..T-1
    in order (A2L's stream, or the given landmarks canonicalised); given: the landmarks in frame pixels when they
    were given instead of A2L's (else None); size / expand: the crop size and mouth-box margin of the L2I model.
    `chunks()` runs a pass: no array holds 478 points per output frame, so memory does not grow with T."""
    source: np.ndarray
    boxes: np.ndarray
    source_mouth: np.ndarray
    pose: dict
    canonical: Callable[[], Iterator[np.ndarray]]
    size: int
    expand: float
    given: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self.source)

    def image_landmarks(self, start: int, P_canon: np.ndarray) -> np.ndarray:
        """The driving landmarks of frames start.. (P_canon (n, 478, 3)) in the frame's pixels and the source's
        head pose: (n, 478, 3)."""
        idx = slice(start, start + len(P_canon))
        if self.given is not None:
            return self.given[idx]
        return landmarks.uncanonicalize(P_canon, {k: v[self.source[idx]] for k, v in self.pose.items()})

    def chunks(self):
        """(start, P_canon (n, 478, 3), mouth (n, 4)) for frames 0..T-1 in order, as `canonical` makes them: the
        mouth box blacked out and pasted back covers the source frame's mouth and the driving one's (crop px)."""
        start = 0
        for P_canon in self.canonical():
            idx = slice(start, start + len(P_canon))
            crop_P = landmarks.to_crop(self.image_landmarks(start, P_canon), self.boxes[self.source[idx]], self.size)
            driving = landmarks.mouth_boxes(crop_P, self.size, self.expand)  # (n, 4)
            yield start, P_canon, landmarks.union_boxes(self.source_mouth[self.source[idx]], driving)
            start += len(P_canon)
        if start != self.num_frames:
            raise RuntimeError(f"the landmark stream made {start} frames for a plan of {self.num_frames}")

    def batches(self, size: int):
        """`chunks` regrouped into batches (start, P_canon, mouth) in order: 1, 2, 4, .. frames up to `size`, then
        `size` (the last one shorter), so the first frames come out after a one-frame batch of work."""
        parts, have, start, want = [], 0, 0, 1
        for _, P_canon, mouth in self.chunks():
            parts.append((P_canon, mouth))
            have += len(P_canon)
            while have >= want:
                P_all, mouth_all = (np.concatenate(a) for a in zip(*parts))
                yield start, P_all[:want], mouth_all[:want]
                parts, have, start = [(P_all[want:], mouth_all[want:])], have - want, start + want
                want = min(2 * want, size)
        if have:
            P_all, mouth_all = (np.concatenate(a) for a in zip(*parts))
            yield start, P_all, mouth_all


def fit_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """(H, W) scaled so the long side is at most max_size, both even (yuv420p needs even sizes)."""
    k = min(1.0, max_size / max(h, w))
    return max(2, int(round(h * k / 2)) * 2), max(2, int(round(w * k / 2)) * 2)


def load_face(path: str, max_size: int = 720) -> Face:
    """A photo (N = 1) or a video (decoded at 25 fps, its face tracked: largest face, gaps filled) as a Face;
    UsageError when it is missing, unreadable, has no face, or the face is too small to render."""
    if path.lower().endswith(VIDEO_EXTENSIONS):
        w0, h0 = clips.video_size(path)
        h, w = fit_size(h0, w0, max_size)
        frames = clips.read_frames(path, (w, h), fps=25)
        if len(frames) == 0:
            raise UsageError(f"{path} has no video frames; give a video with a visible face")
        P, usable = landmarks.detect_video(frames, progress=True)  # (N, 478, 3); UsageError when no face at all
        face = Face(frames, P, usable, w / w0)
    else:
        image = landmarks.load_image_rgb(path)  # UsageError when missing or unreadable
        P = landmarks.detect_image(image, name=path)  # at full resolution; UsageError when there is no face
        h, w = fit_size(*image.shape[:2], max_size)
        scale = w / image.shape[1]
        if (h, w) != image.shape[:2]:
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        face = Face(image[None], (P * scale)[None], np.ones(1, bool), scale)
    eyes = float(landmarks.inter_ocular(face.P[face.usable]).min())
    if eyes < MIN_EYE_DISTANCE:
        raise UsageError(f"the face in {path} is too small: its eyes are {eyes:.0f} px apart in the "
                         f"{face.frames.shape[2]}x{face.frames.shape[1]} output (at least {MIN_EYE_DISTANCE} "
                         "needed; --max-size only shrinks); use a photo or video where the face is larger")
    return face


def load_landmarks(path: str) -> np.ndarray:
    """A --landmarks file: a finite (T, 478, 3) .npy in the face file's pixels."""
    try:
        P = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read landmarks {path} ({type(err).__name__}); give a .npy of shape "
                         "(T, 478, 3)") from None
    if P.ndim != 3 or P.shape[1:] != (478, 3) or not np.isfinite(P).all():
        raise UsageError(f"landmarks {path} must be a finite (T, 478, 3) array, got {P.shape}")
    flat = np.flatnonzero(landmarks.inter_ocular(P) < 1e-3)
    if len(flat):
        raise UsageError(f"landmarks {path}: frame {flat[0]} has its eyes on top of each other ({len(flat)} such "
                         "frames); give MediaPipe landmarks of a face, one per frame")
    return P.astype(np.float32)


def pingpong(num_frames: int, num_source: int) -> np.ndarray:
    """Source frame for each output frame: 0, 1, .., N-1, N-2, .., 1, 0, 1, .. (a still photo: all 0)."""
    if num_source == 1:
        return np.zeros(num_frames, np.int64)
    period = 2 * num_source - 2
    k = np.arange(num_frames) % period
    return np.where(k < num_source, k, period - k)


def transfer_detail(patch: np.ndarray, source: np.ndarray, offset, scale: float, meshes, triangles: np.ndarray,
                    size: float = DETAIL) -> np.ndarray:
    """The photo's own fine detail, moved to where the driving landmarks put it, added to an upscaled generated
    patch: the render keeps the coarse shapes and colours, the photo brings the grain and edges its pixels lack.

    Detail transfer (Petschnigg et al. 2004, flash / no-flash pairs: one image's coarse layer plus another's
    detail layer) with the detail layer taken from the source region warped piecewise-affinely from its
    landmarks onto the driving ones (the synthetic renderer's warp, `synth_face.warp_frame`, over `triangles` of
    the mesh, none bridging the lips) and the mouth cavity drawn inside the driving inner lips
    (`synth_face.mouth_layer`, its teeth tapered to the corners): out = patch + warped - blur(warped), the blur a
    Gaussian of `size` generated px (`scale` source px each), and the drawn mouth laid over that whole (the L2I's
    coarse layer mostly opens less than the landmarks, and its detail alone drew a bright rim round a pale slit).
    The upscaled patch has almost nothing finer than a generated px of its own; past that size the two add.
    patch, source uint8 (h, w, 3) of the same region at `offset` (x0, y0) in the frame; meshes: the source's and
    the driving landmarks (478, 3) in frame px -> uint8 (h, w, 3)."""
    h, w = patch.shape[:2]
    src, dst = (np.asarray(m, np.float64) - [offset[0], offset[1], 0.0] for m in meshes)  # (478, 3) region px
    corners = dst[triangles, :2]  # (K, 3, 2): only the triangles that reach into the region are drawn
    near = (corners.max(1) >= 0).all(1) & (corners.min(1) < [w, h]).all(1)
    mouth = mouth_layer(dst, float(landmarks.inter_ocular(dst)), (h, w), taper=True)
    warped = over(warp_frame(source.astype(np.float32), src[:, :2], triangles[near], dst[:, :2], dst[:, 2]), mouth)
    detail = warped - cv2.GaussianBlur(warped, (0, 0), max(0.5, size * scale))
    return np.clip(np.round(over(patch.astype(np.float32) + detail, mouth)), 0, 255).astype(np.uint8)


def paste(source: np.ndarray, crop_box, generated: np.ndarray, mouth_box, detail: float = 0.0, meshes=(),
          triangles: np.ndarray | None = None) -> np.ndarray:
    """Blend one generated crop back into its full source frame inside the feathered mouth box.

    crop_box (x0, y0, side) in source px; generated uint8 (S, S, 3); mouth_box (x0, y0, x1, y1) in crop px;
    detail: the size in generated px below which `transfer_detail` takes the detail from the source warped from
    its landmarks onto the driving ones (meshes: two (478, 3) in source px) over `triangles`
    (`synth_face.mesh_triangles`, of the first mesh when None: pass them to reuse them across frames); 0: the
    upscaled crop as it is. Only the region around the mouth is touched; pixels outside the feathered box stay the
    source's."""
    H, W = source.shape[:2]
    x0, y0, side = crop_box
    k = side / generated.shape[0]  # source px per crop px
    box = np.array([x0, y0, x0, y0]) + np.asarray(mouth_box, np.float64) * k  # mouth box in source px
    feather = max(1.0, 0.06 * (box[2] - box[0]))
    pad = 3 * feather
    rx0, ry0 = int(max(0, np.floor(box[0] - pad))), int(max(0, np.floor(box[1] - pad)))
    rx1, ry1 = int(min(W, np.ceil(box[2] + pad))), int(min(H, np.ceil(box[3] + pad)))
    out = source.copy()
    if rx1 <= rx0 or ry1 <= ry0:
        return out
    M = np.array([[k, 0.0, x0 - rx0], [0.0, k, y0 - ry0]])  # crop px -> region px
    patch = cv2.warpAffine(generated, M, (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    if detail > 0:
        triangles = mesh_triangles(meshes[0]) if triangles is None else triangles  # (K, 3)
        patch = transfer_detail(patch, source[ry0:ry1, rx0:rx1], (rx0, ry0), k, meshes, triangles, detail)
    mask = np.zeros((ry1 - ry0, rx1 - rx0), np.float32)
    bx0, by0, bx1, by1 = (int(round(v)) for v in box - [rx0, ry0, rx0, ry0])
    mask[max(by0, 0):by1, max(bx0, 0):bx1] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=feather, borderType=cv2.BORDER_CONSTANT)
    out[ry0:ry1, rx0:rx1] = paste_back(patch, source[ry0:ry1, rx0:rx1], mask)
    return out


def debug_frame(source: np.ndarray, P: np.ndarray, output: np.ndarray) -> np.ndarray:
    """input | the landmarks driving the frame (mesh on white) | output, side by side: (H, 3W, 3)."""
    mesh = landmarks.draw_mesh(np.full_like(source, 255), P[:, :2])
    return np.concatenate([source, mesh, output], axis=1)


# ----------------------------------------------------------------------------------------------------------
# The cascade
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Talk:
    """One generated video, made lazily: iterate it for uint8 output frames (b, H, W, 3) in order (input |
    landmarks | output with debug=True); A2L, L2I and paste-back run as the frames are asked for, so memory stays
    flat in the audio's length. speech: the model's input (audio.Speech); audio_file: the user's sound file, which
    becomes the video's sound track as it is (the 16 kHz wave when there is none). `landmarks` / `save_landmarks`:
    the driving landmarks (T, 478, 3) in the face file's pixels (what --save-landmarks writes; a pass of A2L of
    its own, giving the same landmarks as the rendering pass)."""
    model: "DreamHead"
    face: Face
    plan: Plan
    speech: Speech
    options: dict
    audio_file: str | None = None

    @property
    def num_frames(self) -> int:
        return self.plan.num_frames

    @property
    def seconds(self) -> float:
        return self.speech.seconds

    @property
    def frame_size(self) -> tuple[int, int]:
        H, W = self.face.frames.shape[1:3]
        return (H, 3 * W) if self.options.get("debug") else (H, W)

    def landmark_chunks(self):
        """(start, landmarks (n, 478, 3) float32 in the face file's pixels) in order."""
        for start, P_canon, _ in self.plan.chunks():
            yield start, (self.plan.image_landmarks(start, P_canon) / self.face.scale).astype(np.float32)

    @property
    def landmarks(self) -> np.ndarray:
        return np.concatenate([P for _, P in self.landmark_chunks()])

    def save_landmarks(self, path: str) -> None:
        """Write the driving landmarks as a (T, 478, 3) float32 .npy, chunk by chunk, through a temporary file."""
        def write(tmp):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.num_frames, 478, 3))
            for start, P in self.landmark_chunks():
                out[start:start + len(P)] = P
                out.flush()
            del out
        atomic_write(path, write)

    def __iter__(self):
        return self.model.render(self.face, self.plan, **self.options)


class MaskedLatents:
    """The latents of I_mask (a source crop with its mouth box blacked out), each distinct (source frame, box)
    encoded once: a photo's frames differ only by their mouth box, which takes a few values over a video (the
    example: 8 in 120 frames), so most frames reuse one. Holds at most `limit` latents (a few KB each); safe to
    call from several render workers at once."""

    def __init__(self, vae, limit: int = 1024):
        self.vae, self.limit, self.cache, self.lock = vae, limit, {}, threading.Lock()

    def __call__(self, source: np.ndarray, boxes: np.ndarray, images: torch.Tensor) -> torch.Tensor:
        """source (b,), boxes (b, 4) and the masked images (b, 3, S, S) -> their latents (b, C, h, w)."""
        keys = [(int(s), *map(int, b)) for s, b in zip(source, boxes)]
        with self.lock:
            found = {k: self.cache[k] for k in keys if k in self.cache}
        missing = [k for k in dict.fromkeys(keys) if k not in found]  # in order, once each
        if missing:
            rows = [keys.index(k) for k in missing]
            found.update(zip(missing, encode_conditions(self.vae, {"mask": images[rows]})["mask"]))
            with self.lock:
                if len(self.cache) + len(missing) > self.limit:
                    self.cache.clear()
                self.cache.update((k, found[k]) for k in missing)
        return torch.stack([found[k] for k in keys])


def ordered_map(fn, items, workers: int):
    """fn over items in `workers` threads, results in order, at most 2 x workers items in flight (workers <= 1:
    in this thread). torch ops release the GIL, so single-threaded torch calls in parallel threads use several
    cores where the tiny models are too small for torch's own intra-op threads to pay (bench.py)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool, pending = ThreadPoolExecutor(workers), collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers(device) -> int:
    """Render workers for `device`: on CPU 2 when there are 2 cores or more (measured on 2 cores: two one-thread
    workers 38 frames/s at 10 DDIM steps against 25 for one worker on two torch threads; README), on CUDA 1."""
    return 1 if torch.device(device).type == "cuda" else min(2, os.cpu_count() or 1)


def share_cores(workers: int) -> None:
    """Give each of `workers` render workers an equal share of torch's intra-op threads (at most one per core;
    fewer when OMP_NUM_THREADS or an earlier set_num_threads asked for fewer)."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1) // workers))


class DreamHead:
    """A2L (a2l.A2L) turns speech into canonical landmarks with the subject's mean mesh as P̄; L2I (l2i.L2I,
    decoding through the frozen VAE) renders each frame from its landmark image, a reference frame with its
    landmark image and the frame with the mouth blacked out. The three models must belong together: the VAE's
    framing and latent shape must be the L2I model's, and an L2I checkpoint that names its VAE must get it."""

    def __init__(self, a2l, vae, l2i):
        self.a2l, self.vae, self.l2i = a2l, vae, l2i
        vae.to(memory_format=torch.channels_last)  # its convolutions run 20-25 % faster so on CPU (README, Speed)
        check_vae_matches(vae.config, l2i.config)
        trained_with = getattr(l2i, "trained_with_vae", None)
        if trained_with and trained_with["sha1"] != weights_sha1(vae.state_dict()):
            raise UsageError(f"the L2I model was trained on the latents of another VAE (weights "
                             f"{trained_with['sha1'][:12]}, this one {weights_sha1(vae.state_dict())[:12]}); "
                             "give the VAE the L2I model was trained with (--vae)")

    @classmethod
    def from_checkpoints(cls, a2l: str | None = None, vae: str | None = None, l2i: str | None = None,
                         device="auto") -> "DreamHead":
        """The cascade from three checkpoint files (default: the shipped tiny ones) on `device` (auto: CUDA
        when present)."""
        device = pick_device(device) if isinstance(device, str) else device
        return cls(load_model(a2l or default_checkpoint("a2l"), "a2l", device),
                   load_model(vae or default_checkpoint("vae"), "vae", device),
                   load_model(l2i or default_checkpoint("l2i"), "l2i", device))

    @property
    def size(self) -> int:
        return self.l2i.config.image_size

    @property
    def face_iod(self) -> float:
        """Eye distance / side of the face crops the L2I model was trained on (landmarks.face_crop_box)."""
        return self.l2i.config.face_iod or landmarks.FACE_IOD_FRACTION

    @property
    def device(self) -> torch.device:
        return self.l2i.null_lmk.device

    # ---- A2L ------------------------------------------------------------------------------------------
    def landmark_stream(self, speech: Speech, p_bar: np.ndarray, steps=None, guidance=None, seed: int = 0,
                        smooth: int = 0):
        """A2L over a whole utterance, streamed: canonical landmarks (n, 478, 3) chunks of frames 0..T-1 in order,
        T = ceil(seconds x 25); the log-mel is computed from the audio as the windows reach it."""
        cfg = self.a2l.config
        rows = log_mel_rows(speech.blocks(), speech.num_samples, context_frames=cfg.context_frames,
                            n_mels=cfg.n_mels)  # the (4T + 8k, 80) padded log-mel, a minute at a time
        mel_ctx = MelContext(rows, cfg.context_frames, speech.num_frames, cfg.n_mels)  # (T, C, 80), read forward
        gen = torch.Generator(self.device).manual_seed(seed)
        stream = (P.numpy() for P in self.a2l.stream(mel_ctx, torch.as_tensor(p_bar, dtype=torch.float32),
                                                     steps=steps, guidance=guidance, generator=gen))
        return landmarks.smooth_stream(stream, smooth)

    def plan(self, speech: Speech, face: Face, landmarks_px: np.ndarray | None = None, steps=None, guidance=None,
             seed: int = 0, smooth: int = 0) -> Plan:
        """Crop boxes, P̄, the source mouth boxes and how the driving landmarks are made: A2L's, or `landmarks_px`
        (>= T, 478, 3) in the face file's pixels."""
        T = speech.num_frames
        source = pingpong(T, len(face.frames))  # (T,) source frame of each output frame
        boxes = landmarks.clip_face_boxes(face.P, self.face_iod)  # (N, 3), steadied over 9 frames for videos
        source_canon, pose = landmarks.canonicalize(face.P)  # (N, 478, 3) and the head pose of each source frame
        given = None
        if landmarks_px is not None:
            if len(landmarks_px) < T:
                raise UsageError(f"the landmarks have {len(landmarks_px)} frames but the audio needs {T}; give "
                                 "one per frame at 25 fps")
            given = landmarks_px[:T].astype(np.float32) * face.scale  # (T, 478, 3) in frame px

            def canonical():
                return (landmarks.canonicalize(given[i:i + CHUNK])[0] for i in range(0, T, CHUNK))
        else:
            p_bar = source_canon[face.usable].mean(0)  # (478, 3): the mean canonical mesh of the source

            def canonical():
                return self.landmark_stream(speech, p_bar, steps, guidance, seed, smooth)
        expand, size = self.l2i.config.mask_expand, self.size
        source_mouth = landmarks.mouth_boxes(landmarks.to_crop(face.P, boxes, size), size, expand)  # (N, 4) crop px
        return Plan(source, boxes, source_mouth, pose, canonical, size, expand, given)

    # ---- L2I ------------------------------------------------------------------------------------------
    def render_crops(self, crops: np.ndarray, source: np.ndarray, batches, ref_crop: np.ndarray,
                     ref_P_canon: np.ndarray, steps=None, guidance=None, seed: int = 0, workers: int = 1):
        """L2I, batch by batch; yields uint8 (b, size, size, 3) generated crops in order.

        crops: uint8 (N, size, size, 3) source crops and source (T,) int: the crop each frame starts from (a still
        photo: N = 1 and all zeros), so a looped video is never copied out to T frames;
        batches: (start, P_canon (b, 478, 3), mouth (b, 4)) in order (Plan.batches): the canonical landmarks to
        render and the mouth boxes (x0, y0, x1, y1, crop px) blacked out to make I_mask;
        ref_crop (size, size, 3) and ref_P_canon (478, 3): the reference pair, encoded once for the whole video;
        workers: batches rendered at once, in threads (`ordered_map`).
        The same seed gives the same frames whatever the batch size and workers (one starting noise for every
        frame; DDIM noise with eta > 0 is drawn per batch from the seed and the batch's first frame)."""
        size = self.size
        if crops.shape[1:] != (size, size, 3):
            raise ValueError(f"need crops (N, {size}, {size}, 3), got {crops.shape}")
        reference = encode_conditions(self.vae, reference_images(ref_crop, ref_P_canon))  # (1, C, h, w), once
        cfg = self.l2i.config
        z_T = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                          generator=torch.Generator(self.device).manual_seed(seed), device=self.device)
        masked = MaskedLatents(self.vae)

        @torch.no_grad()  # here, not on render_crops: grad mode is per thread and this runs in the workers
        def render(batch):
            start, P_canon, mouth = batch
            src = source[start:start + len(P_canon)]
            images = condition_images(crops[src], mouth, P_canon)  # (b, 3, S, S) each
            cond = {**reference, "mask": masked(src, mouth, images.pop("mask")), **encode_conditions(self.vae, images)}
            gen = torch.Generator(self.device).manual_seed((seed + 1 + start) % 2**64)  # used only when eta > 0
            z0 = self.l2i.sample(cond, steps=steps, guidance=guidance, generator=gen, z_T=z_T)  # (b, C, h, w)
            return to_uint8_image(self.vae.decode_latents(z0))  # (b, size, size, 3)
        yield from ordered_map(render, batches, workers)

    def render(self, face: Face, plan: Plan, steps=None, guidance=None, seed: int = 0, batch: int = 16,
               crop_filter: str = "bilinear", debug: bool = False, workers: int = 1, detail: float = DETAIL):
        """The output frames of a plan, uint8 (b, H, W, 3) per batch in order: each generated crop pasted back
        into its source frame (debug: input | landmarks | output side by side). crop_filter: how the face crop
        is shrunk to the model's size (bilinear sampling or area averaging, landmarks.crop_faces); workers:
        batches rendered at once in threads while this one pastes (`ordered_map`); detail: the size in generated px
        below which the photo's own detail, warped onto the driving landmarks, goes into the pasted mouth
        (`transfer_detail`; 0: none)."""
        crops = landmarks.crop_faces(face.frames, plan.boxes, self.size, area=crop_filter == "area")  # (N, S, S, 3)
        ref = int(np.flatnonzero(face.usable)[0])  # the reference pair: the first source frame with a face
        ref_canon = landmarks.canonicalize(face.P[ref])[0]
        triangles = mesh_triangles(face.P[ref]) if detail > 0 else None  # (K, 3), the same for every frame
        batches, rendering = itertools.tee(plan.batches(batch))  # tee holds the one batch between the two loops
        for (start, P_canon, mouth), generated in zip(batches, self.render_crops(
                crops, plan.source, rendering, crops[ref], ref_canon, steps, guidance, seed, workers)):  # (b, S, S, 3)
            driving = plan.image_landmarks(start, P_canon) if debug or detail > 0 else None  # (b, 478, 3) frame px
            out = []
            for j, g in enumerate(generated):  # paste-back touches only the mouth region of each frame
                s = plan.source[start + j]
                meshes = (face.P[s], driving[j]) if detail > 0 else ()
                # a driving-video frame without a face keeps its pixels: there is no mouth to put anything on
                frame = (paste(face.frames[s], plan.boxes[s], g, mouth[j], detail, meshes, triangles)
                         if face.usable[s] else face.frames[s])
                out.append(debug_frame(face.frames[s], driving[j], frame) if debug else frame)
            yield np.stack(out)

    def round_trip(self, face: Face, crop_filter: str = "bilinear") -> np.ndarray:
        """The first source frame with its face crop sent through the VAE alone (E then D, no L2I) and pasted back
        in its mouth box as `render` pastes: uint8 (H, W, 3). No L2I on this VAE can show more of the mouth."""
        box = landmarks.clip_face_boxes(face.P[:1], self.face_iod)  # (1, 3)
        crop = landmarks.crop_faces(face.frames[:1], box, self.size, area=crop_filter == "area")  # (1, S, S, 3)
        mouth = landmarks.mouth_boxes(landmarks.to_crop(face.P[:1], box, self.size), self.size,
                                      self.l2i.config.mask_expand)
        with torch.no_grad():
            z = self.vae.encode_latents(to_tensor_image(crop).to(self.device))  # (1, C, h, w)
            decoded = to_uint8_image(self.vae.decode_latents(z))[0]  # (S, S, 3)
        return paste(face.frames[0], box[0], decoded, mouth[0])

    def adapted(self, face: Face, steps: int, crop_filter: str = "bilinear", seed: int = 0) -> "DreamHead":
        """This cascade with its L2I fine-tuned for `steps` steps on the face's reference frame, cut as `render`
        cuts it, warped onto A2L's landmarks for synthetic speech (adapt.py); self is left as it was."""
        ref = int(np.flatnonzero(face.usable)[0])
        plan = self.plan(Speech(synthetic_speech(ADAPT_FRAMES, seed), SAMPLE_RATE, normalize=False), face, seed=seed)
        box = plan.boxes[ref:ref + 1]  # (1, 3)
        motion = np.concatenate(list(plan.canonical()))  # (T, 478, 3) canonical, from A2L
        P = landmarks.uncanonicalize(motion, {k: v[[ref] * len(motion)] for k, v in plan.pose.items()})  # (T, 478, 3)
        crop = landmarks.crop_faces(face.frames[ref:ref + 1], box, self.size, area=crop_filter == "area")[0]
        hi_crop = landmarks.crop_faces(face.frames[ref:ref + 1], box, RENDER_SIZE)[0]
        l2i = adapt_l2i(self.l2i, self.vae, crop, landmarks.to_crop(face.P[ref:ref + 1], box, self.size)[0], hi_crop,
                        landmarks.to_crop(face.P[ref:ref + 1], box, RENDER_SIZE)[0],
                        landmarks.to_crop(P, np.repeat(box, len(P), 0), RENDER_SIZE), steps, seed=seed)
        return DreamHead(self.a2l, self.vae, l2i)

    # ---- the whole cascade ----------------------------------------------------------------------------
    def generate(self, audio, face, landmarks_px: np.ndarray | None = None, max_size: int = 720, steps=None,
                 guidance=None, seed: int = 0, batch: int = 16, smooth: int = 0, crop_filter: str = "bilinear",
                 debug: bool = False, workers: int | None = None, detail: float = DETAIL, adapt: int = 0) -> Talk:
        """Speech (a sound file's path, an audio.Speech, or a 16 kHz mono float wave that is the model's input as
        it is) and a face (a photo or video path, or a Face) -> a Talk: face detection, the crop and P̄ run now
        (and with adapt > 0 that many steps of fine-tuning L2I on the face, `adapted`), A2L, L2I and paste-back
        as it is iterated. steps / guidance apply to both stages (None: each config's); the same seed gives the
        same video; workers: L2I batches rendered at once (default_workers)."""
        self.check_steps(steps)
        if isinstance(audio, (str, os.PathLike)):
            audio = Speech(audio)
        elif not isinstance(audio, Speech):
            audio = Speech(np.asarray(audio, np.float32), SAMPLE_RATE, normalize=False)
        face = load_face(os.fspath(face), max_size) if isinstance(face, (str, os.PathLike)) else face
        plan = self.plan(audio, face, landmarks_px, steps, guidance, seed, smooth)
        options = dict(steps=steps, guidance=guidance, seed=seed, batch=batch, crop_filter=crop_filter, debug=debug,
                       detail=detail, workers=default_workers(self.device) if workers is None else workers)
        model = self.adapted(face, adapt, crop_filter, seed) if adapt else self
        return Talk(model, face, plan, audio, options, audio.path)

    def check_steps(self, steps) -> None:
        """UsageError when `steps` DDIM steps exceed a stage's diffusion timesteps (the sampling grid's limit)."""
        for name, model in (("A2L", self.a2l), ("L2I", self.l2i)):
            limit = model.config.num_train_timesteps
            if steps is not None and not 1 <= steps <= limit:
                raise UsageError(f"--steps {steps} is outside the {name} model's 1..{limit} diffusion timesteps; "
                                 f"give at most {limit}")

    def write_video(self, path: str, talk: Talk, progress: bool = False, on_frames=None) -> None:
        """Stream a Talk into an H.264 + AAC mp4 at 25 fps (the user's sound file as the sound track, or the 16 kHz
        wave), written to a temporary file and renamed into place; on_frames(start, frames) sees every batch
        before it is written."""
        audio16 = None if talk.audio_file else np.clip(talk.speech.wave() * 32767, -32768, 32767).astype(np.int16)
        with clips.Mp4Writer(path, talk.frame_size, audio16, SAMPLE_RATE, audio_file=talk.audio_file) as video, \
                tqdm(total=talk.num_frames, desc="frames", unit="frame", disable=not progress,
                     file=sys.stdout) as bar:
            done = 0
            for frames in talk:
                if on_frames is not None:
                    on_frames(done, frames)
                video.write(frames)
                done += len(frames)
                bar.update(len(frames))
