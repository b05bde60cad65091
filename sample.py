"""Speech + a face -> a talking-head video: `python sample.py audio.wav face.png` (DreamHead inference, Sec. 3.3).

The cascade of paper Fig. 1 (dreamhead.DreamHead) from raw inputs to an mp4:

    detect the face's 478 landmarks (MediaPipe; the largest face) -> crop a square around it, framed like the
    training frames (landmarks.face_crop_box) -> canonicalise (P̄ = the subject's mean canonical mesh)
    -> A2L over the whole audio -> L2I in batches of frames (the face crop is the reference and, with the
    mouth blacked out, the masked target; the reference latents are encoded once) -> each generated crop is
    pasted back into the full frame inside a feathered mouth mask, so everything outside the mouth keeps the
    source's pixels -> H.264 + AAC mp4, 25 fps, frames = ceil(seconds x 25), streamed to disk.

A video instead of a photo dubs it (driving-video mode): head pose, upper face and background follow the
video (its own landmarks tracked, the video looped back and forth when the audio is longer), the mouth
follows the new audio. `--landmarks` replaces A2L by given per-frame landmarks; `--debug` writes
input | landmarks | output side by side.
"""
from __future__ import annotations

import argparse
import os

import cv2
import numpy as np
import torch
from tqdm import tqdm

import landmarks
from dreamhead import DreamHead, UsageError, atomic_write, check_writable, pick_device, run_cli, save_png

ROOT = os.path.dirname(os.path.abspath(__file__))
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
MIN_EYE_DISTANCE = 12  # px in the output frame; below this the mouth is a few pixels and cannot be rendered


def default_checkpoint(stage: str) -> str:
    """The shipped tiny checkpoint of a stage, else the one `train.py --stage STAGE` writes by default."""
    shipped = os.path.join(ROOT, "checkpoints", f"{stage}_tiny.pt")
    return shipped if os.path.exists(shipped) else os.path.join("runs", stage, "ckpt.pt")


def fit_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """(H, W) scaled so the long side is at most max_size, both even (yuv420p needs even sizes)."""
    k = min(1.0, max_size / max(h, w))
    return max(2, int(round(h * k / 2)) * 2), max(2, int(round(w * k / 2)) * 2)


def load_source(path: str, max_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The face source -> (frames uint8 (N, H, W, 3) at 25 fps, landmarks (N, 478, 3) px, scale vs the file).

    A photo gives N = 1; a video is decoded at 25 fps and its face tracked (largest face, gaps filled)."""
    import data
    if path.lower().endswith(VIDEO_EXTENSIONS):
        w0, h0 = data.video_size(path)
        h, w = fit_size(h0, w0, max_size)
        frames = data.read_frames(path, (w, h), fps=25)
        if len(frames) == 0:
            raise UsageError(f"{path} has no video frames; give a video with a visible face")
        P, _ = landmarks.detect_video(frames, progress=True)  # (N, 478, 3); UsageError when no face at all
        return frames, P, w / w0
    image = landmarks.load_image_rgb(path)  # UsageError when missing or unreadable
    P = landmarks.detect_image(image, name=path)  # at full resolution; UsageError when there is no face
    h, w = fit_size(*image.shape[:2], max_size)
    scale = w / image.shape[1]
    if (h, w) != image.shape[:2]:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return image[None], (P * scale)[None], scale


def pingpong(num_frames: int, num_source: int) -> np.ndarray:
    """Source frame for each output frame: 0, 1, .., N-1, N-2, .., 1, 0, 1, .. (a still photo: all 0)."""
    if num_source == 1:
        return np.zeros(num_frames, np.int64)
    period = 2 * num_source - 2
    k = np.arange(num_frames) % period
    return np.where(k < num_source, k, period - k)


def read_landmarks(path: str, num_frames: int, scale: float) -> np.ndarray:
    """--landmarks file: (T >= num_frames, 478, 3) in the source file's pixels -> (num_frames, 478, 3) here."""
    try:
        P = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read landmarks {path} ({type(err).__name__}); give a .npy of shape "
                         "(T, 478, 3)") from None
    if P.ndim != 3 or P.shape[1:] != (478, 3) or not np.isfinite(P).all():
        raise UsageError(f"landmarks {path} must be a finite (T, 478, 3) array, got {P.shape}")
    if len(P) < num_frames:
        raise UsageError(f"landmarks {path} has {len(P)} frames but the audio needs {num_frames}; give one per "
                         "frame at 25 fps")
    return P[:num_frames].astype(np.float32) * scale


def union_boxes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boxes (T, 4) = (x0, y0, x1, y1) covering both a and b."""
    return np.concatenate([np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])], axis=1)


def mouth_boxes(P: np.ndarray, size: int) -> np.ndarray:
    """mouth_box of every frame of P (T, 478, 3) in size-px crops: (T, 4) int."""
    return np.array([landmarks.mouth_box(p, (size, size)) for p in P], np.int64)


def paste(source: np.ndarray, crop_box, generated: np.ndarray, mouth_box) -> np.ndarray:
    """Blend one generated crop back into its full source frame inside the feathered mouth box.

    crop_box (x0, y0, side) in source px; generated uint8 (S, S, 3); mouth_box (x0, y0, x1, y1) in crop px.
    Only the region around the mouth is touched; pixels outside the feathered box stay the source's."""
    from l2i import paste_back
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("audio", help="speech: wav / flac / ogg, any sample rate or channel count")
    p.add_argument("face", help="a photo with a clearly visible face (png / jpg, any size; the largest face is "
                   "used) or a video to dub (mp4 / mov / avi / mkv / webm)")
    p.add_argument("--out", default="out.mp4", help="output mp4 (written to a temporary file, then renamed)")
    for stage in ("a2l", "vae", "l2i"):
        p.add_argument(f"--{stage}", default=None, help=f"{stage.upper()} checkpoint (default: "
                       f"checkpoints/{stage}_tiny.pt when shipped, else runs/{stage}/ckpt.pt)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of both stages (default: each config's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale of both stages "
                   "(Ho & Salimans 2022; 1 = off; default: each config's)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same video")
    p.add_argument("--batch", type=int, default=16, help="frames per L2I batch (memory vs speed)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--smooth", type=int, default=0, help="odd centred moving-average window over the predicted "
                   "landmarks (0 = off)")
    p.add_argument("--max-size", type=int, default=720, help="long side of the output video in px")
    p.add_argument("--crop-filter", choices=("bilinear", "area"), default="bilinear", help="how the face crop is "
                   "shrunk to the model's size: bilinear sampling keeps aliased, crisper detail; area averages like "
                   "the training frames. With the shipped models bilinear reads better (MediaPipe opening "
                   "correlation on 4 held-out clips 0.69 / 0.76 at seeds 0 / 1, area 0.61 / 0.64; README)")
    p.add_argument("--save-landmarks", default=None, help="write the driving landmarks in the face file's pixel "
                   "coordinates, (T, 478, 3) float32, to this .npy")
    p.add_argument("--landmarks", default=None, help="drive L2I with these landmarks instead of A2L's: a .npy "
                   "(T, 478, 3) in the face file's pixel coordinates, one per 25 fps frame")
    p.add_argument("--debug", action="store_true", help="write input | landmarks | output side by side")
    p.add_argument("--strip", default=None, metavar="PNG", help="also save 8 evenly spaced output frames as a PNG "
                   "(two rows of four)")
    args = p.parse_args(argv)
    if not args.out.endswith(".mp4"):
        raise UsageError(f"--out {args.out} must end in .mp4")
    for name in ("batch", "max_size") + (("steps",) if args.steps is not None else ()):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_size < 64:
        raise UsageError(f"--max-size must be at least 64 px, got {args.max_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from a2l import frames_for_duration, load_audio
    from data import Mp4Writer
    for path in [args.out] + [p for p in (args.save_landmarks, args.strip) if p]:
        check_writable(path)  # fail now, not after the work
    wave = load_audio(args.audio)  # (S,) 16 kHz mono; UsageError on missing / corrupt / empty / NaN audio
    T = frames_for_duration(len(wave))
    frames, P_src, scale = load_source(args.face, args.max_size)  # (N, H, W, 3), (N, 478, 3)
    eyes = float(landmarks.inter_ocular(P_src).min())
    if eyes < MIN_EYE_DISTANCE:
        raise UsageError(f"the face in {args.face} is too small: its eyes are {eyes:.0f} px apart in the "
                         f"{frames.shape[2]}x{frames.shape[1]} output (at least {MIN_EYE_DISTANCE} needed); use a "
                         "larger --max-size or a photo where the face fills more of the frame")
    model = DreamHead.load(args.a2l or default_checkpoint("a2l"), args.vae or default_checkpoint("vae"),
                           args.l2i or default_checkpoint("l2i"), pick_device(args.device))
    size = model.size

    src = pingpong(T, len(frames))  # (T,) source frame of each output frame
    crop_box = landmarks.clip_face_boxes(P_src, model.face_iod)  # (N, 3), steadied over 9 frames for videos
    P_src_t, box_t = P_src[src], crop_box[src]  # (T, 478, 3), (T, 3)
    _, pose = landmarks.canonicalize(P_src_t)  # per output frame: the source's head pose
    if args.landmarks:
        P_img = read_landmarks(args.landmarks, T, scale)  # (T, 478, 3) source px
        P_canon, _ = landmarks.canonicalize(P_img)
    else:
        p_bar = landmarks.canonicalize(P_src)[0].mean(0)  # (478, 3): the subject's mean canonical mesh
        P_canon = model.audio_to_landmarks(wave, p_bar, args.steps, args.guidance, args.seed, progress=True)
        if args.smooth > 1:
            P_canon = landmarks.smooth_landmarks(P_canon, args.smooth)
        P_img = landmarks.uncanonicalize(P_canon, pose)  # (T, 478, 3) in the source's pose
    if args.save_landmarks:
        atomic_write(args.save_landmarks, lambda tmp: np.save(open(tmp, "wb"), (P_img / scale).astype(np.float32)))

    crops = landmarks.crop_faces(frames, crop_box, size, area=args.crop_filter == "area")  # (N, S, S, 3)
    boxes = union_boxes(mouth_boxes(landmarks.to_crop(P_src_t, box_t, size), size),
                        mouth_boxes(landmarks.to_crop(P_img, box_t, size), size))  # (T, 4) crop px
    ref_canon = landmarks.canonicalize(P_src[0])[0]  # the reference pair: the first source frame
    renders = model.render(crops, src, boxes, P_canon, crops[0], ref_canon,
                           steps=args.steps, guidance=args.guidance, seed=args.seed, batch=args.batch)
    H, W = frames.shape[1:3]
    audio16 = np.clip(wave * 32767, -32768, 32767).astype(np.int16)
    strip_at, strip = set(np.linspace(0, T - 1, min(8, T)).round().astype(int).tolist()), []
    with Mp4Writer(args.out, (H, 3 * W if args.debug else W), audio16) as video, \
            tqdm(total=T, desc="frames", unit="frame") as bar:
        done = 0
        for generated in renders:  # (b, S, S, 3)
            out = []
            for g in generated:  # paste-back touches only the mouth region of each frame
                i = done + len(out)
                frame = paste(frames[src[i]], box_t[i], g, boxes[i])
                out.append(debug_frame(frames[src[i]], P_img[i], frame) if args.debug else frame)
                if i in strip_at:
                    strip.append(out[-1])
            video.write(np.stack(out))
            done += len(out)
            bar.update(len(out))
    if args.strip:  # two rows of four
        rows = [np.concatenate(strip[k:k + 4] + [np.zeros_like(strip[0])] * (4 - len(strip[k:k + 4])), axis=1)
                for k in range(0, len(strip), 4)]
        save_png(args.strip, np.concatenate(rows, axis=0))
    print(f"wrote {args.out}: {T} frames at 25 fps for {len(wave) / 16000:.2f} s of audio")


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    run_cli(main)
