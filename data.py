"""The data command line: synthetic talking heads and the canonical template (not part of the paper).

    python data.py synth    --out DIR --clips N --seed S [--split train|test] [--size 256] [--workers 2]
                            [--poses small|wide] [--voices espeak,flite,festival,piper,recorded|all]
                            [--portraits base|all]
    python data.py verify   --dir DIR [--clips 20]      the generator against its own ground truth
    python data.py sheet    --out docs/data_contact_sheet.png [--video docs/data_sample.mp4]
    python data.py poses    --out docs/poses_wide.png   extreme head poses of a few identities
    python data.py example  [--out examples]            the shipped example face, speech and truth
    python data.py template [--out assets/canonical_template.npy]
    python data.py detect   PHOTO [--out PANEL.png]     landmarks, pose and mouth box of one photo

`synth` records its settings (seed, split, size, poses, generator version) in DIR/synth.json and refuses a DIR made
with other settings; a second run with the same ones only adds the clips that are missing. --poses small (the
default) is the slight head sway every shipped model was trained on; wide turns heads like talking-head footage
(synth_clips.py). --voices espeak (the default, the shipped models' speech) picks each clip's speaker from those
engines (voices.py; `bash install_voices.sh` installs the others; all = every installed one). --portraits all also
draws training faces from five real photos shipped in assets/portraits/ (synth_face.py), base (the default) only
from the two of every shipped model before them.

The generator itself lives in synth_speech.py (speech and motion), synth_face.py (faces and rendering) and
synth_clips.py (clips); the canonical template is [A2L: landmarks P]'s frontal reference (landmarks.py).
"""
import glob
import os
import time
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import skimage.data
import soundfile
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

import landmarks
from cli import ArgumentParser, UsageError, int_flag, run_cli
from clips import load_clip, read_frames, write_mp4
from common import atomic_write, save_png
from landmarks import EYE_OUTER_LEFT, EYE_OUTER_RIGHT, RIGID, detect_image, load_image_rgb
from synth_clips import EXAMPLE, PORTRAITS, make_clip, synth, voices_flag
from synth_face import render_clip
from synth_speech import FPS, POSES, SAMPLE_RATE, articulation, bilabial_closures, pose_track, silences, speech_clip


# ------------------------------------------------------------------------------------------------------------
# Verification and pictures of the synthetic data
# ------------------------------------------------------------------------------------------------------------

def rms_envelope(audio, sample_rate, frames, fps=FPS):
    """RMS of the audio in each frame's window [i / fps, (i + 1) / fps)."""
    hop = sample_rate // fps
    x = np.pad(audio.astype(np.float64), (0, max(0, frames * hop - len(audio))))[:frames * hop]
    return np.sqrt((x.reshape(frames, hop) ** 2).mean(1))  # (T,)


def frames_in(intervals, frames, fps=FPS):
    """Frame indices whose centres fall in any interval, plus the frame nearest to each interval's centre."""
    centres = (np.arange(frames) + 0.5) / fps
    out = []
    for start, end in intervals:
        inside = np.nonzero((centres >= start) & (centres <= end))[0].tolist()
        nearest = int(np.clip(np.floor((start + end) / 2 * fps), 0, frames - 1))
        out.append(sorted(set(inside + [nearest])))
    return out


def ground_truth_checks(clip):
    """Mouth-opening checks of one clip: max relative opening in long silences and at bilabials, and
    the correlation of the opening with the audio RMS envelope."""
    opening = np.asarray(landmarks.mouth_opening(clip["landmarks"]), np.float64)
    rel = opening / max(opening.max(), 1e-9)
    T = len(rel)
    duration = len(clip["audio"]) / clip["sample_rate"]
    long_silences = [(s, e) for s, e in silences(clip["phonemes"], duration) if e - s > 0.2]
    bilabials = bilabial_closures(clip["phonemes"], clip["phoneme_ipa"])
    silence_max = max([rel[f].max() for f in frames_in(long_silences, T)], default=0.0)
    bilabial_max = max([rel[f].max() for f in frames_in(bilabials, T)], default=0.0)
    rms = rms_envelope(clip["audio"], clip["sample_rate"], T)
    return {"silence_max": float(silence_max), "bilabial_max": float(bilabial_max),
            "corr": float(np.corrcoef(opening, rms)[0, 1]), "silences": len(long_silences),
            "bilabials": len(bilabials)}


def pose_range(P):
    """Largest |pitch|, |yaw|, |roll| (degrees) of landmarks P (T, 478, 3) over the clip, as canonicalize sees them."""
    return np.abs(landmarks.pose_angles(landmarks.canonicalize(P)[1]["R"])).max(0)


def detection_checks(clip, frames):
    """MediaPipe detection rate on rendered frames and lip error (% IOD) of the found frames."""
    P, found = landmarks.detect_video(frames, max_gap=0, smooth=False)
    gt = clip["landmarks"]
    found = np.asarray(found, bool)
    if not found.any():
        return {"detected": 0.0, "lip_error": float("nan")}
    lip = list(landmarks.LIPS)
    err = np.linalg.norm(P[found][:, lip, :2] - gt[found][:, lip, :2], axis=-1).mean(1)  # (F,)
    iod = np.asarray(landmarks.inter_ocular(gt[found]), np.float64)
    return {"detected": float(found.mean()), "lip_error": float((err / iod).mean() * 100)}


def verify(folder, clips=20):
    """Measure the synthetic data against its ground truth and print a report; returns the summary."""
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))[:clips]
    if not paths:
        raise UsageError(f"no clips (*.npz) in {folder}; run `python data.py synth --out {folder}` first")
    rows = []
    for path in tqdm(paths, desc="verify", unit="clip"):
        clip = load_clip(path)
        frames = read_frames(path[:-4] + ".mp4")
        if len(frames) != len(clip["landmarks"]):
            raise UsageError(f"{path}: video has {len(frames)} frames, landmarks {len(clip['landmarks'])}")
        rows.append({**ground_truth_checks(clip), **detection_checks(clip, frames), "frames": len(frames),
                     "name": os.path.basename(path)[:-4], "identity": clip["identity"],
                     "pose": pose_range(clip["landmarks"]), "voice": str(clip.get("voice", "espeak"))})
    print(f"{'clip':<12}{'id':>4}{'frames':>8}{'detected%':>11}{'lip%IOD':>9}{'silence%':>10}{'bilabial%':>11}"
          f"{'corr':>7}  max |pitch| |yaw| |roll| deg  voice")
    for r in rows:
        print(f"{r['name']:<12}{r['identity']:>4}{r['frames']:>8}{r['detected'] * 100:>11.1f}{r['lip_error']:>9.2f}"
              f"{r['silence_max'] * 100:>10.1f}{r['bilabial_max'] * 100:>11.1f}{r['corr']:>7.3f}"
              f"  {r['pose'][0]:5.1f} {r['pose'][1]:5.1f} {r['pose'][2]:5.1f}      {r['voice']}")
    frames_total = sum(r["frames"] for r in rows)
    summary = {
        "clips": len(rows), "frames": frames_total,
        "detection_rate": sum(r["detected"] * r["frames"] for r in rows) / frames_total,
        "lip_error_pct_iod": float(np.nanmean([r["lip_error"] for r in rows])),
        "silence_open_max": max(r["silence_max"] for r in rows),
        "bilabial_open_max": max(r["bilabial_max"] for r in rows),
        "corr_min": min(r["corr"] for r in rows), "corr_mean": float(np.mean([r["corr"] for r in rows])),
        "pose_max_deg": np.max([r["pose"] for r in rows], 0).tolist(),  # pitch, yaw, roll
    }
    print(f"clips {summary['clips']}, frames {frames_total}")
    print(f"MediaPipe detection rate        {summary['detection_rate'] * 100:.2f} %   (target >= 98)")
    print(f"lip landmark error (40 points)  {summary['lip_error_pct_iod']:.2f} % IOD (target <= 5)")
    print(f"GT opening in silences > 200 ms {summary['silence_open_max'] * 100:.1f} % of clip max (target < 10)")
    print(f"GT opening at bilabials         {summary['bilabial_open_max'] * 100:.1f} % of clip max (target < 10)")
    print(f"corr(opening, RMS 40 ms)        min {summary['corr_min']:.3f}, mean {summary['corr_mean']:.3f} "
          f"(target >= 0.5)")
    pitch, yaw, roll = summary["pose_max_deg"]
    print(f"head pose reached (GT)          |pitch| {pitch:.1f}, |yaw| {yaw:.1f}, |roll| {roll:.1f} deg")
    summary["corr_by_voice"] = _by_voice(rows, "corr")
    if len(summary["corr_by_voice"]) > 1:
        print("corr(opening, RMS) by voice     " + ", ".join(
            f"{v} {np.mean(c):.3f} ({len(c)})" for v, c in summary["corr_by_voice"].items()))
    return summary


def _frames_and_voices(paths):
    """(frames in all the clips, {engine: clips}) of synthetic clips (no "voice" field: espeak-ng)."""
    frames, voices = 0, {}
    for path in paths:
        with np.load(path) as z:
            frames += len(z["landmarks"])
            voice = str(z["voice"]) if "voice" in z.files else "espeak"
        voices[voice] = voices.get(voice, 0) + 1
    return frames, voices


def _by_voice(rows, key):
    """{voice: [row[key], ...]} in the order the voices first appear."""
    out = {}
    for r in rows:
        out.setdefault(r["voice"], []).append(r[key])
    return out


def _draw_points(image, points, lips_colour=(255, 40, 40), colour=(40, 255, 80)):
    out = image.copy()
    lip = set(landmarks.LIPS)
    for i, (x, y) in enumerate(np.round(points[:, :2]).astype(int)):
        cv2.circle(out, (int(x), int(y)), 1, lips_colour if i in lip else colour, -1, cv2.LINE_AA)
    return out


def contact_sheet(out, video=None, size=256, seed=7, cell_px=192):
    """Contact sheet of 8 identities (a closed and an open frame each, GT landmarks drawn on the second),
    and optionally a short sample mp4 (frame | GT landmark drawing) with its audio."""
    cells = []
    for identity in tqdm(range(8), desc="sheet", unit="identity"):
        rng = np.random.default_rng([seed, identity])
        audio, phonemes, ipa, _ = speech_clip(rng, "train", 3.0)
        art = articulation(phonemes, ipa, len(audio) / SAMPLE_RATE)
        pick = [int(np.argmin(art[:, 0] + 10 * (np.arange(len(art)) < 5))), int(np.argmax(art[:, 0]))]
        frames, meshes = render_clip(identity, art[pick], np.zeros(2, np.float32),
                                     pose_track(rng, 2), size)
        cell = np.concatenate([frames[0], _draw_points(frames[1], meshes[1])], 1)
        cells.append(cv2.resize(cell, (cell_px * 2, cell_px), interpolation=cv2.INTER_AREA))
    rows = [np.concatenate(cells[i:i + 2], 1) for i in range(0, 8, 2)]
    sheet = np.concatenate(rows, 0)
    save_png(out, sheet)
    if video:
        clip = make_clip(seed, 0, "train", size, seconds=3.0)
        drawn = np.stack([landmarks.draw_landmark_image(m[:, :2], size) for m in clip["landmarks"]])
        drawn = drawn if drawn.ndim == 4 else np.repeat(drawn[..., None], 3, -1)
        write_mp4(video, np.concatenate([clip["frames"], drawn.astype(np.uint8)], 2), clip["audio"], crf=30)


EXTREME_POSES = ((-25, 0, 0), (0, 0, 0), (25, 0, 0), (0, -15, 0), (0, 15, 0), (0, 0, -15), (0, 0, 15))


def pose_sheet(out, identities=(0, 17, 18), size=256, cell_px=112, poses=EXTREME_POSES):
    """Contact sheet of the wide poses' extremes: a row per identity, a column per (yaw, pitch, roll) of
    `poses` (a half-open mouth, the renderer for turning heads), the last column all three at once with a
    10 % larger head; each frame's middle 80 %, colours to 5 bits (a PNG under 300 kB)."""
    pose = np.zeros((len(poses) + 1, 6), np.float32)
    pose[:-1, :3] = poses
    pose[-1] = (25, -15, 15, 0, 0, 0.1)
    art = np.tile(np.array([[0.4, 0.0]], np.float32), (len(pose), 1))
    rows = []
    for identity in tqdm(identities, desc="poses", unit="identity"):
        frames, _ = render_clip(identity, art, np.zeros(len(pose), np.float32), pose, size)
        margin = size // 10
        rows.append(np.concatenate([cv2.resize(f[margin:-margin, margin:-margin], (cell_px, cell_px),
                                               interpolation=cv2.INTER_AREA) for f in frames], 1))
    save_png(out, np.concatenate(rows, 0) & 0xF8)


def example(out="examples"):
    """The shipped example inputs: out/face.png (the clip's first frame), out/speech.wav (16 kHz) and
    out/truth.npz (the clip's true landmarks, for `evaluate.py sample`), from test clip EXAMPLE."""
    clip = make_clip(**EXAMPLE)
    os.makedirs(out, exist_ok=True)
    save_png(os.path.join(out, "face.png"), clip["frames"][0])
    atomic_write(os.path.join(out, "speech.wav"),
                 lambda tmp: soundfile.write(tmp, clip["audio"], SAMPLE_RATE, subtype="PCM_16", format="WAV"))
    atomic_write(os.path.join(out, "truth.npz"), lambda tmp: np.savez_compressed(
        open(tmp, "wb"), landmarks=clip["landmarks"].astype(np.float16), text=clip["text"]))
    print(f"wrote {out}/face.png, speech.wav, truth.npz: identity {clip['identity']}, {clip['text']!r}")


# ------------------------------------------------------------------------------------------------------------
# The canonical template (run once: `python data.py template`)
# ------------------------------------------------------------------------------------------------------------

def _frontal_frame(P: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Rotate P (478,3) so its symmetry plane is x = 0 and x points to the subject's left.

    The x axis is the main direction of the vectors between mirror pairs; z is the camera's viewing axis
    made orthogonal to x (this keeps the photo's pitch), y = z cross x (down). Origin on the symmetry plane.
    """
    paired = mirror != np.arange(len(P))
    _, _, Vt = np.linalg.svd(P[paired] - P[mirror][paired], full_matrices=False)
    ex = Vt[0] * np.sign(Vt[0] @ (P[EYE_OUTER_LEFT] - P[EYE_OUTER_RIGHT]))
    ez = np.array([0.0, 0.0, 1.0]) - ex[2] * ex
    ez /= np.linalg.norm(ez)
    ey = np.cross(ez, ex)
    origin = ((P + P[mirror]) / 2).mean(axis=0)
    return (P - origin) @ np.stack([ex, ey, ez]).T  # rows of the rotation are the new axes


def find_mirror_pairs(P: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Left/right pairing of the mesh points from one roughly frontal face P (478,3).

    Returns mirror (478,) with mirror[i] = index of the point mirroring i (mirror[i] == i on the midline),
    found by optimally matching each point to the mirror image (x -> -x) of the frontalised face
    (Hungarian assignment), alternating with re-estimating the frontal frame from the pairs.
    """
    P = np.asarray(P, dtype=np.float64)
    mirror = np.arange(len(P))
    for a, b in [(33, 263), (133, 362), (61, 291), (234, 454)]:  # seed pairs to start the frame
        mirror[a], mirror[b] = b, a
    for _ in range(iterations):
        F = _frontal_frame(P, mirror)
        cost = np.linalg.norm(F[:, None, :] - (F * [-1.0, 1.0, 1.0])[None, :, :], axis=-1)  # (478, 478)
        _, new = linear_sum_assignment(cost)
        if np.array_equal(new, mirror):
            break
        mirror = new
    if not np.array_equal(mirror[mirror], np.arange(len(P))):
        raise RuntimeError("mirror matching did not give a symmetric pairing; use a more frontal photo")
    return mirror


def _normalise(P: np.ndarray) -> np.ndarray:
    """Centre at the RIGID centroid and scale to inter-ocular distance 1."""
    P = P - P[RIGID].mean(axis=0)
    return P / np.linalg.norm(P[EYE_OUTER_LEFT] - P[EYE_OUTER_RIGHT])


def template_photos() -> list[tuple[str, np.ndarray]]:
    """The two frontal sample photos shipped with scikit-image and matplotlib."""
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [("skimage astronaut", skimage.data.astronaut()), ("matplotlib grace_hopper", load_image_rgb(hopper))]


def make_canonical_template(photos: list[tuple[str, np.ndarray]] | None = None) -> np.ndarray:
    """Build the frontal, mirror-symmetric canonical template (478,3) float32 (see the module docstring)."""
    faces = [detect_image(image, name) for name, image in (photos or template_photos())]
    mirror = find_mirror_pairs(faces[0])
    for P in faces[1:]:
        if not np.array_equal(find_mirror_pairs(P), mirror):
            raise RuntimeError("the template photos disagree on the mirror pairing")
    mean = np.mean([_normalise(_frontal_frame(P.astype(np.float64), mirror)) for P in faces], axis=0)
    sym = (mean + mean[mirror] * [-1.0, 1.0, 1.0]) / 2  # mirror-symmetrise (x -> -x, swap pairs)
    return _normalise(sym).astype(np.float32)


def save_canonical_template(path: str = str(landmarks.TEMPLATE_PATH)) -> np.ndarray:
    template = make_canonical_template()
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), template))
    return template


def detect(image_path: str, out: str | None, size: int) -> None:
    image = load_image_rgb(image_path)
    P = detect_image(image, image_path)
    P_canon, transform = landmarks.canonicalize(P)
    pitch, yaw, roll = landmarks.pose_angles(transform["R"])
    box = landmarks.mouth_box(P, image.shape[:2])
    print(f"{image_path}: {image.shape[1]}x{image.shape[0]} px, {landmarks.NUM_LANDMARKS} landmarks")
    print(f"  face box x {P[:, 0].min():.0f}-{P[:, 0].max():.0f}, y {P[:, 1].min():.0f}-{P[:, 1].max():.0f}; "
          f"inter-ocular {float(landmarks.inter_ocular(P)):.1f} px")
    print(f"  head pose pitch {pitch:.1f}, yaw {yaw:.1f}, roll {roll:.1f} deg; mouth box {box}")
    print(f"  canonical (IOD units): mouth opening {float(landmarks.mouth_opening(P_canon)):.3f}, "
          f"width {float(landmarks.mouth_width(P_canon)):.3f}")
    if out:
        h = image.shape[0]
        overlay = landmarks.draw_mesh(image.copy(), P, thickness=1)
        canon = landmarks.draw_landmark_image(landmarks.canonical_to_canvas(P_canon, size), size)
        canon = cv2.resize(canon, (h, h), interpolation=cv2.INTER_AREA)  # (H, H, 3)
        masked = landmarks.apply_mouth_mask(image, box)
        panel = np.concatenate([overlay, canon, masked], axis=1)  # (H, 2W + H, 3)
        save_png(out, panel)
        print(f"  wrote {out} (mesh on photo | canonical landmark image | masked frame)")


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate clips (mp4 + npz)")
    s.add_argument("--out", required=True)
    s.add_argument("--clips", type=int_flag(1), default=64)
    s.add_argument("--seed", type=int_flag(0), default=0)
    s.add_argument("--split", choices=("train", "test"), default="train")
    s.add_argument("--size", type=int_flag(64), default=256)
    s.add_argument("--workers", type=int_flag(1), default=2)
    s.add_argument("--poses", choices=POSES, default="small",
                   help="head motion: small (the shipped models' slight sway) or wide (turning heads)")
    s.add_argument("--voices", type=voices_flag, default="espeak",
                   help="speech engines, comma-separated: espeak (the default), flite, festival, piper, recorded; "
                        "all = every installed one (install_voices.sh)")
    s.add_argument("--portraits", choices=PORTRAITS, default="base",
                   help="base photos of the training faces: base (astronaut, Grace Hopper) or all (and the five "
                        "real photos in assets/portraits/; training split only)")
    v = sub.add_parser("verify", help="measure detection, lip error and mouth/audio agreement")
    v.add_argument("--dir", required=True)
    v.add_argument("--clips", type=int_flag(1), default=20)
    c = sub.add_parser("sheet", help="contact sheet png (and a short sample mp4)")
    c.add_argument("--out", default="docs/data_contact_sheet.png")
    c.add_argument("--video", default=None)
    c.add_argument("--size", type=int_flag(64), default=256)
    o = sub.add_parser("poses", help="contact sheet png of extreme wide head poses")
    o.add_argument("--out", default="docs/poses_wide.png")
    e = sub.add_parser("example", help="the example inputs shipped in examples/ (a held-out face and sentence)")
    e.add_argument("--out", default="examples")
    t = sub.add_parser("template", help="rebuild the canonical template from the two sample photos")
    t.add_argument("--out", default=str(landmarks.TEMPLATE_PATH))
    d = sub.add_parser("detect", help="detect the landmarks of a photo and print a summary")
    d.add_argument("image")
    d.add_argument("--out", help="PNG: mesh on the photo | canonical landmark image | masked frame")
    d.add_argument("--size", type=int_flag(64), default=256, help="canonical landmark image size")
    args = parser.parse_args(argv)
    if args.command == "example":
        example(args.out)
    elif args.command == "template":
        template = save_canonical_template(args.out)
        print(f"wrote {args.out}: {template.shape}, inter-ocular {float(landmarks.inter_ocular(template)):.4f}")
    elif args.command == "detect":
        detect(args.image, args.out, args.size)
    elif args.command == "synth":
        start = time.time()
        paths = synth(args.out, args.clips, args.seed, args.split, args.size, args.workers, poses=args.poses,
                      voices=args.voices, portraits=args.portraits)
        frames, engines = _frames_and_voices(paths)
        elapsed = time.time() - start
        print(f"{len(paths)} clips, {frames} frames in {elapsed:.1f} s ({frames / elapsed:.1f} frames/s) -> {args.out}")
        print("speech engines: " + ", ".join(f"{e} {n} clips" for e, n in engines.items()))
    elif args.command == "verify":
        verify(args.dir, args.clips)
    elif args.command == "poses":
        pose_sheet(args.out)
    else:
        contact_sheet(args.out, args.video, args.size)


if __name__ == "__main__":
    run_cli(main)
