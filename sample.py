"""Speech + a face -> a video: `python sample.py audio.wav face.png [--out out.mp4]` (DreamHead inference).

The paper's inference (Sec. 3.3) runs A2L over the whole audio with the subject's landmarks as P̄, then L2I
renders every frame from the predicted landmarks, the reference frame and the masked target. What runs today
is the first hierarchy, end to end from raw inputs:

    detect the face's 478 landmarks -> canonicalise them (P̄ = the face's own canonical mesh)
    -> A2L over the whole audio (overlapping windows, a2l.A2L.generate) -> back to the face's pose
    -> an mp4 (H.264 + AAC, 25 fps, frames = ceil(duration x 25)) of the predicted mesh drawn on the face,
       beside the canonical landmark image L2I will be conditioned on, with the audio muxed in.

The photoreal L2I rendering is not wired in yet (README status table); `--save-landmarks` writes the predicted
per-frame landmarks in image coordinates (T, 478, 3) for other renderers.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import landmarks
from dreamhead import UsageError, atomic_write, load_model, pick_device, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))


def default_a2l() -> str:
    shipped = os.path.join(ROOT, "checkpoints", "a2l_tiny.pt")
    return shipped if os.path.exists(shipped) else os.path.join("runs", "a2l", "ckpt.pt")


def predict_landmarks(model, wave: np.ndarray, face_landmarks: np.ndarray, steps=None, seed=0, smooth=0):
    """A2L for a whole utterance: (T, 478, 3) landmarks in the face image's coordinates, T = ceil(s x 25)."""
    from a2l import mel_context
    cfg = model.config
    p_canon, transform = landmarks.canonicalize(face_landmarks)  # P̄: the face's own canonical mesh
    mel_ctx = mel_context(wave, context_frames=cfg.context_frames, n_mels=cfg.n_mels)  # (T, C, 80)
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    pred = model.generate(mel_ctx, torch.as_tensor(p_canon), steps=steps, generator=gen, progress=True)
    pred = landmarks.smooth_landmarks(pred.numpy(), smooth) if smooth > 1 else pred.numpy()  # (T, 478, 3)
    return landmarks.uncanonicalize(pred, transform), pred


def render_preview(image: np.ndarray, P_img: np.ndarray, P_canon: np.ndarray, height: int = 384) -> np.ndarray:
    """Frames (T, height, W + height, 3): the predicted mesh on the face | the canonical landmark image."""
    import cv2
    scale = height / image.shape[0]
    width = int(round(image.shape[1] * scale / 2)) * 2  # even sizes for yuv420p
    base = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    canon = landmarks.draw_landmark_images(landmarks.canonical_to_canvas(P_canon, height), height)  # (T, h, h, 3)
    frames = np.empty((len(P_img), height, width + height, 3), np.uint8)
    for i, P in enumerate(P_img):  # drawing is per frame; everything before it is batched
        frames[i, :, :width] = landmarks.draw_mesh(base.copy(), P[:, :2] * scale)
        frames[i, :, width:] = canon[i]
    return frames


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("audio", help="speech: wav / flac / ogg, any sample rate or channel count")
    p.add_argument("face", help="a photo with one clearly visible face: png / jpg, any size")
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--a2l", default=None, help="A2L checkpoint (default: checkpoints/a2l_tiny.pt when shipped, "
                   "else runs/a2l/ckpt.pt)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's config)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same landmarks")
    p.add_argument("--smooth", type=int, default=0, help="odd centred moving-average window over frames (0 = off)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--save-landmarks", default=None, help="write the predicted landmarks in image coordinates, "
                   "(T, 478, 3) float32, to this .npy")
    args = p.parse_args(argv)
    if not args.out.endswith(".mp4"):
        raise UsageError(f"--out {args.out} must end in .mp4")

    from a2l import load_audio
    from data import write_mp4
    wave = load_audio(args.audio)  # (S,) 16 kHz mono, loudness-normalised; UsageError on bad audio
    image = landmarks.load_image_rgb(args.face)
    face = landmarks.detect_image(image)  # (478, 3) px; UsageError when there is no face
    if landmarks.inter_ocular(face) < 12:
        raise UsageError(f"the face in {args.face} is too small (eyes {landmarks.inter_ocular(face):.0f} px "
                         "apart); use a photo where the face is at least ~60 px wide")
    model = load_model(args.a2l or default_a2l(), "a2l", pick_device(args.device))
    P_img, P_canon = predict_landmarks(model, wave, face, args.steps, args.seed, args.smooth)
    frames = render_preview(image, P_img, P_canon)
    audio16 = np.clip(wave * 32767, -32768, 32767).astype(np.int16)
    write_mp4(args.out, frames, audio16)
    if args.save_landmarks:
        atomic_write(args.save_landmarks, lambda tmp: np.save(open(tmp, "wb"), P_img.astype(np.float32)))
    print(f"wrote {args.out}: {len(frames)} frames at 25 fps for {len(wave) / 16000:.2f} s of audio")


if __name__ == "__main__":
    run_cli(main)
