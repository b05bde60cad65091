"""Speech + a face -> a talking-head video: `python sample.py audio.wav face.png` (DreamHead inference).

A thin command line around the cascade in dreamhead.py ([Cascade]): `DreamHead.from_checkpoints` builds it,
`generate` detects the face, crops it, builds P̄ and runs A2L, and `write_video` renders with L2I, pastes the
mouth back and streams an H.264 + AAC mp4 (25 fps, frames = ceil(seconds x 25)) with the user's own sound to a
temporary file that is renamed into place. A video instead of a photo dubs it (driving-video mode).
`--landmarks` replaces A2L by given per-frame landmarks; `--debug` writes input | landmarks | output side by side.

Flags and the input paths are checked before torch, MediaPipe and the models load (they are imported after the
arguments are parsed), so `--help` and bad flags answer at once; every failure is one line on stderr (cli.py).
"""
from __future__ import annotations

import os

from cli import ArgumentParser, UsageError, float_flag, int_flag, nonnegative_float, odd_window, run_cli, \
    seed_flag


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("audio", help="speech: wav / flac / ogg / m4a, or a video whose sound is used; any sample rate "
                   "or channel count")
    p.add_argument("face", help="a photo with a clearly visible face (png / jpg, any size; the largest face is "
                   "used) or a video to dub (mp4 / mov / avi / mkv / webm)")
    p.add_argument("--out", default="out.mp4", help="output mp4 (written to a temporary file, then renamed)")
    for stage in ("a2l", "vae", "l2i"):
        p.add_argument(f"--{stage}", default=None, help=f"{stage.upper()} checkpoint (default: "
                       f"checkpoints/{stage}_tiny.pt when shipped, else runs/{stage}/ckpt.pt)")
    p.add_argument("--steps", type=int_flag(1), default=None, help="DDIM steps of both stages, at most each "
                   "model's diffusion timesteps (default: each config's)")
    p.add_argument("--guidance", type=float_flag, default=None, help="classifier-free guidance scale of both "
                   "stages (Ho & Salimans 2022; 1 = off; default: each config's)")
    p.add_argument("--seed", type=seed_flag, default=0, help="the same seed gives the same video (0 .. 2^64-1)")
    p.add_argument("--batch", type=int_flag(1), default=16, help="most frames per L2I batch (memory vs speed; "
                   "batches start at 1 frame and double, so the first frames come early)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--workers", type=int_flag(1), default=None, help="L2I batches rendered at once in threads, "
                   "each on cores / workers torch threads (default: 2 on CPU with 2+ cores, 1 on CUDA; measured in "
                   "the README)")
    p.add_argument("--smooth", type=odd_window, default=0, help="odd centred moving-average window over the "
                   "predicted landmarks (0 = off)")
    p.add_argument("--max-size", type=int_flag(64), default=720, help="long side of the output video in px (it "
                   "only shrinks larger inputs)")
    p.add_argument("--crop-filter", choices=("bilinear", "area"), default="bilinear", help="how the face crop is "
                   "shrunk to the model's size: bilinear sampling keeps aliased, crisper detail; area averages like "
                   "the training frames. With the shipped models bilinear reads better (README)")
    p.add_argument("--detail", type=nonnegative_float, default=0.5, help="size in generated px below which the "
                   "pasted mouth's fine detail comes from the photo itself, warped onto the driving landmarks with "
                   "the mouth drawn inside the inner lips (detail transfer, Petschnigg et al. 2004); default 0.5; 0 "
                   "pastes the upscaled render as it is (README)")
    p.add_argument("--adapt", type=int_flag(0), default=0, help="first fine-tune L2I for this many steps on "
                   "talking frames the synthetic renderer makes of this face, as DreamBooth fine-tunes on one subject "
                   "(Ruiz et al. 2023); 0 = off; 1500 takes about a minute on 2 cores (README)")
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
    for flag, path in (("audio", args.audio), ("face", args.face), ("--landmarks", args.landmarks)):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"the {flag} file {path} does not exist; check the path")
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"the {flag} path {path} is a folder, not a file; give a file")
    return args


def strip_picture(talk, count: int = 8):
    """(on_frames callback, picture): collects `count` evenly spaced output frames as two rows of four."""
    import numpy as np
    at, kept = set(np.linspace(0, talk.num_frames - 1, min(count, talk.num_frames)).round().astype(int).tolist()), []

    def on_frames(start, frames):
        kept.extend(f for i, f in enumerate(frames, start) if i in at)

    def picture():
        rows = [np.concatenate(kept[k:k + 4] + [np.zeros_like(kept[0])] * (4 - len(kept[k:k + 4])), axis=1)
                for k in range(0, len(kept), 4)]
        return np.concatenate(rows, axis=0)
    return on_frames, picture


def main(argv=None):
    args = parse_args(argv)
    # heavy imports only now, after the arguments (and the input paths) were checked
    from audio import Speech
    from common import check_writable, save_png
    from dreamhead import DreamHead, default_workers, load_face, load_landmarks, share_cores
    for path in [args.out] + [p for p in (args.save_landmarks, args.strip) if p]:
        check_writable(path)  # fail now, not after the work
    print(f"reading {args.audio}", flush=True)
    speech = Speech(args.audio)  # read through once; UsageError on missing / corrupt / too short / NaN audio
    print(f"finding the face in {args.face}", flush=True)
    face = load_face(args.face, args.max_size)  # UsageError when unreadable, face-less or too small
    given = load_landmarks(args.landmarks) if args.landmarks else None
    print("loading the models", flush=True)
    model = DreamHead.from_checkpoints(args.a2l, args.vae, args.l2i, args.device)
    workers = args.workers or default_workers(model.device)
    share_cores(workers)
    talk = model.generate(speech, face, given, steps=args.steps, guidance=args.guidance, seed=args.seed,
                          batch=args.batch, smooth=args.smooth, crop_filter=args.crop_filter, debug=args.debug,
                          workers=workers, detail=args.detail, adapt=args.adapt)
    if args.save_landmarks:
        talk.save_landmarks(args.save_landmarks)
    on_frames, picture = strip_picture(talk) if args.strip else (None, None)
    model.write_video(args.out, talk, progress=True, on_frames=on_frames)
    if args.strip:
        save_png(args.strip, picture())
    print(f"wrote {args.out}: {talk.num_frames} frames at 25 fps for {talk.seconds:.2f} s of audio")


if __name__ == "__main__":
    run_cli(main)
