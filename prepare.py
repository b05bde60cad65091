"""Any folder of talking-head videos -> training clips: `python prepare.py VIDEOS_DIR OUT_DIR`.

Not a box of the paper's figure: the paper trains on tracked HDTF / MEAD videos; this is that preparation step.
Every video below VIDEOS_DIR (.mp4 .mov .avi .mkv .webm; any frame rate, size, sound rate or channel count) is
decoded by ffmpeg at exactly 25 fps and its own resolution (streamed through a pipe, twice: once to track, once
to write), its sound at 16 kHz mono. MediaPipe tracks the largest face (478 points); gaps of up to --max-gap
frames are filled, and the track is split where the face is lost for longer, where the shot cuts (the face box
jumps by a fraction of the inter-ocular distance, or the frame's colour histogram jumps) and where another person
appears (the face's canonical shape or colour, before vs after, changes). Pieces of at least --min-seconds are
smoothed (--smooth) and become clips in the clip format (clips.py), in OUT_DIR/clips/:

    NAME.npz        landmarks (T, 478, 3) float32 px, fps 25, audio_path, sample_rate 16000, frame_size (H, W),
                    identity, video, has_audio, canonical (T, 478, 3), transform_R (T, 3, 3), transform_s (T,),
                    transform_t (T, 3), found (T,) (detected, not filled), source, start_frame, crops,
                    crop_boxes (T, 3), crop_landmarks (T, 478, 3) (crop px), crop_size, crop_face_iod
    NAME.wav        16 kHz mono int16 (absent, with no audio_path key, when the video has no sound track)
    NAME.mp4        the clip's 25 fps frames at full resolution (H.264, with its sound)
    NAME.crops.npy  uint8 (T, size, size, 3) face crops, landmarks.crop_clip_faces' framing (the stages' input)

Identity: the video's relative path without its extension ('/' -> '_'), or --identity-regex's group; another
person inside a video is "<identity>~p2", "~p3"... A video is done when OUT_DIR/done/<sha1 of its path>.json
exists (written last); a re-run prepares only the others, and every run rebuilds OUT_DIR/manifest.json (clips
with an identity-disjoint train / test split, skipped files and reasons, a summary) from all markers.
OUT_DIR/prepare.json records the settings; a run with other settings into the same OUT_DIR is refused.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import soundfile
import torch
from tqdm import tqdm

import landmarks
from cli import ArgumentParser, UsageError, float_flag, int_flag, odd_window, process_pool, run_cli
from clips import FPS, SAMPLE_RATE, Mp4Writer, ffmpeg_exe
from common import atomic_write, piped, stderr_text

VERSION = 1
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm")
SETTINGS_FILE = "prepare.json"
CHUNK = 64  # frames per block of the second pass (crops and mp4)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
# Where a track is split. Measured on the synthetic heads re-encoded at 30 fps with black bars (as in
# tests/test_prepare.py): within a shot the largest histogram distance was 0.013, centre move 0.03 IOD, scale change
# 0.04, shape change 0.016 and colour change 0.014; at a cut between two identities 0.28, 0.28, 0.16, 0.047 and 0.15
SCENE_CUT = 0.2  # half the L1 distance of consecutive frames' colour histograms (0 same, 1 disjoint)
BOX_JUMP = 0.5  # face-centre move between consecutive detections, in inter-ocular distances
SCALE_JUMP = 0.3  # |log| of the inter-ocular distance's change between consecutive detections
IDENTITY_WINDOW = 12  # frames on each side whose mean signatures are compared
SHAPE_CHANGE = 0.03  # mean move of the canonical rigid points, in template inter-ocular distances
COLOUR_CHANGE = 0.08  # move of the face's mean RGB (0..1)
HIST_BINS = 16  # per channel, on a 64 x 64 thumbnail


class Skip(Exception):
    """A video that yields no clips for a reason worth recording (unreadable, no frames, no face)."""


# ------------------------------------------------------------------------------------------------------------
# Decoding through ffmpeg
# ------------------------------------------------------------------------------------------------------------

def probe(path: str) -> tuple[int, int, bool]:
    """(width, height, has a sound track) of a video as decode gives it: turned upright as its rotation metadata
    says (ffmpeg does so when decoding), an odd last row or column dropped (H.264 needs even sides); Skip when
    ffmpeg finds no video stream."""
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    match = re.search(r"Stream #\S+.*?Video:.*?(\d{2,5})x(\d{2,5})", info)
    if match is None:
        raise Skip("no video stream ffmpeg can read")
    w, h = int(match.group(1)), int(match.group(2))
    rotation = re.search(r"rotation of (-?[\d.]+) degrees|rotate\s*:\s*(-?\d+)", info)
    if rotation and round(abs(float(rotation.group(1) or rotation.group(2)))) % 180 == 90:
        w, h = h, w
    return w // 2 * 2, h // 2 * 2, re.search(r"Stream #\S+.*?Audio:", info) is not None


def decode(path: str, w: int, h: int, chunk: int = CHUNK):
    """The video's frames at 25 fps, streamed: uint8 blocks (n <= chunk, h, w, 3) RGB, cut to w x h from the top
    left; Skip when it has none."""
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", path, "-map", "0:v:0", "-vf", f"fps={FPS},crop={w}:{h}:0:0",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    size, total = w * h * 3, 0
    with piped(cmd) as (proc, log):
        while data := proc.stdout.read(size * chunk):
            n = len(data) // size
            total += n
            if n:
                yield np.frombuffer(data[:n * size], np.uint8).reshape(n, h, w, 3)  # (n, H, W, 3)
        proc.wait()
        if total == 0:
            error = stderr_text(log).splitlines()
            raise Skip(f"no frames decoded ({error[-1][-150:] if error else 'empty video'})")


def read_sound(path: str) -> np.ndarray:
    """The first sound track as int16 mono (S,) at 16 kHz (ffmpeg downmixes and resamples)."""
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", path, "-map", "0:a:0", "-vn", "-ac", "1", "-ar",
           str(SAMPLE_RATE), "-f", "s16le", "-acodec", "pcm_s16le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    return np.frombuffer(proc.stdout[:len(proc.stdout) // 2 * 2], np.int16)


# ------------------------------------------------------------------------------------------------------------
# Pass 1: track the face and measure where to cut
# ------------------------------------------------------------------------------------------------------------

def colour_histogram(frame: np.ndarray) -> np.ndarray:
    """Per-channel colour histogram of a frame's 64 x 64 thumbnail, each channel summing to 1: (3 * HIST_BINS,)."""
    thumb = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA).reshape(-1, 3) // (256 // HIST_BINS)
    counts = [np.bincount(thumb[:, c], minlength=HIST_BINS) for c in range(3)]
    return np.concatenate(counts).astype(np.float32) / len(thumb)


def face_colour(frame: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Mean RGB (0..1) of the box from the outer eye corners down to the upper lip (cheeks and nose): (3,)."""
    h, w = frame.shape[:2]
    x0, x1 = sorted(P[[landmarks.EYE_OUTER_RIGHT, landmarks.EYE_OUTER_LEFT], 0])
    y0 = P[[landmarks.EYE_OUTER_RIGHT, landmarks.EYE_OUTER_LEFT], 1].mean()
    y1 = P[landmarks.MOUTH_TOP_INNER, 1]
    x0, x1 = int(np.clip(x0, 0, w - 1)), int(np.clip(x1, 1, w))
    y0, y1 = int(np.clip(y0, 0, h - 1)), int(np.clip(y1, 1, h))
    box = frame[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    return box.reshape(-1, 3).mean(axis=0) / 255.0


def track(path: str, w: int, h: int) -> dict:
    """Pass 1 over the video: points (T, 478, 3) (zeros where no face), detected (T,) bool, hist (T, 48),
    colour (T, 3) of the face (NaN where none)."""
    points, detected, hists, colours = [], [], [], []
    with landmarks.FaceMeshDetector(static_image_mode=False, max_num_faces=1) as detector:
        for block in decode(path, w, h):
            for frame in block:
                P = detector.detect(frame)
                detected.append(P is not None)
                points.append(P if P is not None else np.zeros((landmarks.NUM_LANDMARKS, 3), np.float32))
                hists.append(colour_histogram(frame))
                colours.append(face_colour(frame, P) if P is not None else np.full(3, np.nan))
    return {"points": np.stack(points), "detected": np.array(detected), "hist": np.stack(hists),
            "colour": np.stack(colours)}


def shot_cuts(t: dict) -> np.ndarray:
    """Frames that start a new shot: the colour histogram jumps, or the face box jumps between consecutive
    detections (centre by BOX_JUMP inter-ocular distances, size by SCALE_JUMP in log). Sorted frame indices."""
    scene = 0.5 * np.abs(np.diff(t["hist"], axis=0)).sum(axis=1) / 3  # (T-1,) in [0, 1]
    cuts = set((np.nonzero(scene > SCENE_CUT)[0] + 1).tolist())
    hits = np.nonzero(t["detected"])[0]
    P = t["points"][hits]  # (D, 478, 3)
    iod = landmarks.inter_ocular(P)  # (D,)
    centre = P[:, :, :2].mean(axis=1)  # (D, 2)
    move = np.linalg.norm(np.diff(centre, axis=0), axis=1) / np.minimum(iod[1:], iod[:-1])  # (D-1,)
    scale = np.abs(np.diff(np.log(iod)))
    cuts |= set(hits[1:][(move > BOX_JUMP) | (scale > SCALE_JUMP)].tolist())
    return np.array(sorted(cuts), int)


def signature(P: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Who a face is, per frame: its canonical rigid points (T, R, 3) (canonical units: inter-ocular distance 1),
    and the face colour (T, 3)."""
    return landmarks.canonicalize(P)[0][:, landmarks.RIGID], colour


def difference(shape_a, colour_a, shape_b, colour_b) -> np.ndarray:
    """How far apart two signatures (mean rigid shapes (..., R, 3), mean colours (..., 3)) are: the mean of the
    shape and colour distances in units of SHAPE_CHANGE and COLOUR_CHANGE (> 1: another person), (...).
    Either one alone must be twice its threshold: MediaPipe's shape wobbles on a turned face, colour under light."""
    d_shape = np.linalg.norm(shape_a - shape_b, axis=-1).mean(axis=-1)
    return (d_shape / SHAPE_CHANGE + np.linalg.norm(colour_a - colour_b, axis=-1) / COLOUR_CHANGE) / 2


def identity_change(shape: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Score per frame t (T,) of a new person starting at t: the difference of the mean signatures of the
    IDENTITY_WINDOW frames before and after t; zero where either window is incomplete."""
    W, T = IDENTITY_WINDOW, len(shape)
    score = np.zeros(T)
    if T < 2 * W:
        return score
    prefix = lambda X: np.cumsum(np.concatenate([np.zeros_like(X[:1]), X]), axis=0)  # (T+1, ...)
    S, C = prefix(shape.astype(np.float64)), prefix(colour.astype(np.float64))
    t = np.arange(W, T - W + 1)
    window = lambda X, a, b: (X[b] - X[a]) / W  # mean over frames a..b-1
    score[t] = difference(window(S, t - W, t), window(C, t - W, t), window(S, t, t + W), window(C, t, t + W))
    return score


def person_cuts(score: np.ndarray) -> list[int]:
    """Frames where a new person starts: the peaks of identity_change over 1, at least a window apart."""
    cuts = []
    for t in np.argsort(-score):
        if score[t] <= 1:
            break
        if all(abs(t - c) >= IDENTITY_WINDOW for c in cuts):
            cuts.append(int(t))
    return sorted(cuts)


def segments(t: dict, max_gap: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(filled points (T, 478, 3), filled face colour (T, 3), [(start, end)] pieces of one face in one shot)."""
    P, usable = landmarks.fill_gaps(t["points"], t["detected"], max_gap)
    colour = np.where(np.isnan(t["colour"]), 0.0, t["colour"])
    colour = landmarks.fill_gaps(colour[:, None, :], t["detected"], max_gap)[0][:, 0]  # (T, 3)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], usable.astype(int), [0]])))  # run starts / ends
    pieces = []
    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
        cuts = [int(c) + a for c in shot_cuts({k: v[a:b] for k, v in t.items()})]
        for s, e in zip([a] + cuts, cuts + [b]):
            shape, col = signature(P[s:e], colour[s:e])
            inner = [s + c for c in person_cuts(identity_change(shape, col))]
            pieces += list(zip([s] + inner, inner + [e]))
    return P, colour, pieces


def persons(P: np.ndarray, colour: np.ndarray, pieces: list) -> list[int]:
    """Person number (1, 2, ...) of each piece: the first earlier person whose mean signature differs by at most
    1 from the piece's, else a new one."""
    known, out = [], []
    for s, e in pieces:
        shape, col = signature(P[s:e], colour[s:e])
        mean = (shape.mean(axis=0), col.mean(axis=0))
        same = [k for k, other in enumerate(known) if difference(*mean, *other) <= 1]
        if not same:
            known.append(mean)
        out.append(same[0] + 1 if same else len(known))
    return out


# ------------------------------------------------------------------------------------------------------------
# Pass 2: write the clips
# ------------------------------------------------------------------------------------------------------------

def clip_fields(P: np.ndarray, detected: np.ndarray, size: int, face_iod: float) -> dict:
    """The tracked fields of one piece from its filled, smoothed points P (T, 478, 3)."""
    canon, transform = landmarks.canonicalize(P)
    boxes = landmarks.clip_face_boxes(P, face_iod)  # (T, 3), as landmarks.crop_clip_faces frames them
    return {"landmarks": P.astype(np.float32), "canonical": canon.astype(np.float32),
            "transform_R": transform["R"], "transform_s": transform["s"], "transform_t": transform["t"],
            "found": detected, "crop_boxes": boxes, "crop_landmarks": landmarks.to_crop(P, boxes, size),
            "crop_size": size, "crop_face_iod": face_iod}


def batches(frames, n: int, size: int = CHUNK):
    """The next n frames of an iterator of single frames, stacked in blocks of up to `size`: (k, H, W, 3)."""
    while n > 0:
        block = list(itertools.islice(frames, min(size, n)))
        if not block:
            raise RuntimeError("the second decoding gave fewer frames than the first")
        n -= len(block)
        yield np.stack(block)


def write_clip(stem: str, fields: dict, frames, sound: np.ndarray | None) -> None:
    """stem.wav (when there is sound), stem.mp4, stem.crops.npy and last stem.npz, each atomically; frames: an
    iterator of the piece's frames (H, W, 3), read once."""
    T, size = len(fields["landmarks"]), fields["crop_size"]
    H, W = fields["frame_size"]
    name = os.path.basename(stem)
    if sound is not None:
        atomic_write(stem + ".wav", lambda tmp: soundfile.write(tmp, sound, SAMPLE_RATE, "PCM_16", format="WAV"))
        fields.update(audio_path=name + ".wav", sample_rate=SAMPLE_RATE)

    def write_crops(tmp):
        crops = np.lib.format.open_memmap(tmp, "w+", np.uint8, (T, size, size, 3))
        done = 0
        for block in batches(frames, T):
            video.write(block)
            crops[done:done + len(block)] = landmarks.crop_faces(block, fields["crop_boxes"][done:done + len(block)],
                                                                 size)
            done += len(block)
        crops.flush()

    with Mp4Writer(stem + ".mp4", (H, W), audio=sound, sample_rate=SAMPLE_RATE, fps=FPS) as video:
        atomic_write(stem + ".crops.npy", write_crops)
    fields.update(video=name + ".mp4", crops=name + ".crops.npy")

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in fields.items()})
    atomic_write(stem + ".npz", write_npz)


def write_json(path: str, value) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
    atomic_write(path, write)


# ------------------------------------------------------------------------------------------------------------
# One video
# ------------------------------------------------------------------------------------------------------------

def prepare_video(job: dict) -> dict:
    """Prepare one video (a pool job): its clips, then its done marker, which is returned."""
    clips_dir = os.path.join(job["out"], "clips")
    remove_partial(clips_dir, job["stem"])
    record = {"source": job["source"], "clips": [], "skipped": None, "frames": 0, "faces_missed": 0,
              "dropped_short": 0}
    try:
        make_clips(job, clips_dir, record)
    except Skip as why:
        record["skipped"] = str(why)
    write_json(marker_path(job["out"], job["source"]), record)
    return record


def remove_partial(clips_dir: str, stem: str) -> None:
    """Delete what an interrupted run left of a video's clips (its files and their temporary files)."""
    own = re.compile(rf"^\.?{re.escape(stem)}(~p\d+)?_\d{{3}}\.")
    for name in os.listdir(clips_dir) if os.path.isdir(clips_dir) else []:
        if own.match(name):
            os.remove(os.path.join(clips_dir, name))


def make_clips(job: dict, clips_dir: str, record: dict) -> None:
    """Track the video, cut it into pieces and write those of at least min_seconds; the counts go to record."""
    s, path = job["settings"], os.path.join(job["root"], job["source"])
    w, h, has_audio = probe(path)
    t = track(path, w, h)
    record.update(frames=len(t["detected"]), faces_missed=int((~t["detected"]).sum()))
    if not t["detected"].any():
        raise Skip(f"no face found in any of its {len(t['detected'])} frames")
    P, colour, pieces = segments(t, s["max_gap"])
    kept = [(a, b) for a, b in pieces if b - a >= round(s["min_seconds"] * FPS)]
    record["dropped_short"] = len(pieces) - len(kept)
    if not kept:
        raise Skip(f"no stretch of one tracked face of at least {s['min_seconds']:g} s")
    sound = read_sound(path) if has_audio else np.zeros(0, np.int16)
    frames = decode(path, w, h)
    try:
        stream = (f for block in frames for f in block)  # (H, W, 3) frames of the second pass, in order
        record["clips"] = write_pieces(job, clips_dir, stream, (h, w), sound, P, t["detected"], kept,
                                       persons(P, colour, kept))
    finally:
        frames.close()  # stops ffmpeg


def write_pieces(job, clips_dir, stream, frame_size, sound, P, detected, pieces, people) -> list[dict]:
    """Write each piece (a, b) of person people[i] as a clip, reading its frames from `stream`; their manifest
    entries."""
    s, counts, at, entries = job["settings"], {}, 0, []
    for (a, b), person in zip(pieces, people):
        collections.deque(itertools.islice(stream, a - at), maxlen=0)  # skip to the piece
        suffix = "" if person == 1 else f"~p{person}"
        counts[person] = counts.get(person, -1) + 1
        name = f"{job['stem']}{suffix}_{counts[person]:03d}"
        fields = clip_fields(landmarks.smooth_landmarks(P[a:b], s["smooth"]), detected[a:b], s["size"], s["face_iod"])
        fields.update(fps=FPS, frame_size=frame_size, identity=job["identity"] + suffix, has_audio=sound.size > 0,
                      source=job["source"], start_frame=a)
        write_clip(os.path.join(clips_dir, name), fields, stream, piece_sound(sound, a, b))
        at = b
        entries.append({"name": name, "npz": f"clips/{name}.npz", "identity": fields["identity"], "frames": b - a,
                        "seconds": (b - a) / FPS, "has_audio": bool(sound.size), "source": job["source"],
                        "start_frame": a})
    return entries


def piece_sound(sound: np.ndarray, a: int, b: int) -> np.ndarray | None:
    """The samples of frames a..b (S,) int16, zero-padded past the end of the track; None without sound."""
    if sound.size == 0:
        return None
    piece = sound[a * SAMPLES_PER_FRAME:b * SAMPLES_PER_FRAME]
    return np.pad(piece, (0, (b - a) * SAMPLES_PER_FRAME - len(piece)))


def marker_path(out: str, source: str) -> str:
    return os.path.join(out, "done", hashlib.sha1(source.encode()).hexdigest() + ".json")


# ------------------------------------------------------------------------------------------------------------
# The run: settings, videos, workers, manifest
# ------------------------------------------------------------------------------------------------------------

def shard_flag(text: str) -> tuple[int, int]:
    """An argparse type: i/n with 0 <= i < n."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n with 0 <= i < n (e.g. 0/4)")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("videos", help="folder searched recursively for .mp4 .mov .avi .mkv .webm videos")
    p.add_argument("out", help="output folder: clips/, done/, manifest.json, prepare.json")
    p.add_argument("--size", type=int_flag(16, 1024), default=128, help="side of the face crops in px")
    p.add_argument("--face-iod", type=float_flag, default=0.4, help="inter-ocular distance as a fraction of the "
                   "crop side (landmarks.face_crop_box; 0.1 to 0.6)")
    p.add_argument("--min-seconds", type=float_flag, default=2.0, help="shortest clip kept; shorter pieces are "
                   "dropped and counted")
    p.add_argument("--max-gap", type=int_flag(0), default=5, help="most frames without a detection that are "
                   "filled by interpolation; a longer loss of the face splits the clip")
    p.add_argument("--smooth", type=odd_window, default=5, help="odd centred moving-average window over the "
                   "landmarks of each clip (0 = off)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-regex", default=None, help="identities this regular expression finds go to test")
    split.add_argument("--test-list", default=None, help="a file of identities or relative video paths, one a "
                       "line, that go to test")
    split.add_argument("--test-fraction", type=float_flag, default=0.1, help="fraction of identities that go to "
                       "test, chosen by a hash of the identity (stable across runs and shards)")
    p.add_argument("--identity-regex", default=None, help="regular expression with one group, searched in the "
                   "relative video path: the group is the identity (default: the path without extension)")
    p.add_argument("--workers", type=int_flag(1), default=2, help="videos prepared at once in processes")
    p.add_argument("--shard", type=shard_flag, default=(0, 1), help="i/n: prepare only the videos whose sorted "
                   "index modulo n is i (n machines, n runs)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.videos):
        raise UsageError(f"no folder {args.videos}; give the folder that holds the videos")
    if not 0.1 <= args.face_iod <= 0.6 or args.min_seconds <= 0 or not 0 <= args.test_fraction <= 1:
        raise UsageError("need --face-iod in [0.1, 0.6], --min-seconds > 0 and --test-fraction in [0, 1]")
    for flag, regex in (("--test-regex", args.test_regex), ("--identity-regex", args.identity_regex)):
        try:
            groups = re.compile(regex).groups if regex is not None else 1
        except re.error as err:
            raise UsageError(f"{flag} {regex!r} is not a regular expression ({err})") from None
        if flag == "--identity-regex" and groups != 1:
            raise UsageError(f"--identity-regex {regex!r} needs exactly one group, e.g. '^([^/]+)/'")
    if args.test_list is not None and not os.path.isfile(args.test_list):
        raise UsageError(f"no file {args.test_list} for --test-list; give a file of identities or video paths")
    return args


def test_list(path: str) -> list[str]:
    with open(path) as f:
        return sorted({line.strip() for line in f if line.strip() and not line.startswith("#")})


def output_settings(args) -> dict:
    """Every setting that changes what is written (not --workers or --shard)."""
    if args.test_regex is not None:
        split = {"test_regex": args.test_regex}
    else:
        split = {"test_list": test_list(args.test_list)} if args.test_list else {"test_fraction": args.test_fraction}
    return {"version": VERSION, "size": args.size, "face_iod": args.face_iod, "min_seconds": args.min_seconds,
            "max_gap": args.max_gap, "smooth": args.smooth, "identity_regex": args.identity_regex, **split}


def check_settings(out: str, settings: dict) -> None:
    """Refuse OUT_DIR when its prepare.json records other settings; write it into a new one."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.exists(path):
        write_json(path, settings)
        return
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path} ({err}); delete {out} or prepare into another folder") from None
    differs = [f"{k} {found.get(k)!r} (not {v!r})" for k, v in settings.items() if found.get(k) != v]
    differs += [f"{k} {found[k]!r}" for k in found if k not in settings]
    if differs:
        raise UsageError(f"{out} was prepared with other settings: {', '.join(differs)} per its {SETTINGS_FILE}; "
                         "use those or prepare into another folder")


def find_videos(root: str, out: str) -> list[str]:
    """Relative paths ('/'-separated) of the videos below root, sorted; none from the output folder `out`."""
    inside_out = os.path.join(os.path.abspath(out), "")
    found = [p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p)
             and p.lower().endswith(VIDEO_EXTENSIONS) and not os.path.abspath(p).startswith(inside_out)]
    return sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in found)


def video_stems(sources: list[str]) -> dict:
    """A file-name-safe stem per video, unique: the path without extension, '/' -> '_' (plus the extension
    where two videos would share one)."""
    safe = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    stems = {s: safe(os.path.splitext(s)[0]) for s in sources}
    clash = collections.Counter(stems.values())
    return {s: stem if clash[stem] == 1 else safe(s.replace(".", "_")) for s, stem in stems.items()}


def identity_of(source: str, regex: str | None) -> str:
    if regex is None:
        return os.path.splitext(source)[0].replace("/", "_")
    match = re.search(regex, source)
    if match is None or not match.group(1):
        raise UsageError(f"--identity-regex {regex!r} finds no identity in {source}; give one that matches every "
                         "video path")
    return match.group(1)


def test_identities(clips: list[dict], settings: dict) -> set:
    """The identities that go to test (so no identity is in both splits)."""
    if "test_regex" in settings:
        return {c["identity"] for c in clips if re.search(settings["test_regex"], c["identity"])}
    if "test_list" in settings:
        listed = set(settings["test_list"])
        return {c["identity"] for c in clips if c["identity"] in listed or c["source"] in listed}
    hashed = lambda i: int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 2**32
    return {c["identity"] for c in clips if hashed(c["identity"]) < settings["test_fraction"]}


def build_manifest(out: str, settings: dict) -> dict:
    """manifest.json's content from every done marker in OUT_DIR."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "done", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    records.sort(key=lambda r: r["source"])
    clips = [c for r in records for c in r["clips"]]
    test = test_identities(clips, settings)
    clips = [{**c, "split": "test" if c["identity"] in test else "train"} for c in clips]
    skipped = [{"source": r["source"], "reason": r["skipped"]} for r in records if r["skipped"]]
    frames = sum(c["frames"] for c in clips)
    summary = {"videos": len(records), "clips": len(clips), "hours": frames / FPS / 3600, "frames": frames,
               "faces_missed": sum(r["faces_missed"] for r in records),
               "dropped_short": sum(r["dropped_short"] for r in records), "skipped": len(skipped)}
    return {"version": VERSION, "settings": settings, "clips": clips, "skipped": skipped, "summary": summary}


def one_thread() -> None:
    """A worker's set-up: one cv2 / torch thread each (the workers share the cores)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def run_jobs(jobs: list[dict], workers: int):
    """The done markers of the jobs as they finish, in worker processes when workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(prepare_video, jobs)
        return
    # leaving by an exception (Ctrl-C, SIGTERM) terminates the workers: Pool.__exit__ calls terminate()
    with process_pool(min(workers, len(jobs)), one_thread) as pool:
        yield from pool.imap_unordered(prepare_video, jobs)


def main(argv=None):
    args = parse_args(argv)
    settings = output_settings(args)
    sources = find_videos(args.videos, args.out)
    if not sources:
        raise UsageError(f"no videos ({' '.join(VIDEO_EXTENSIONS)}) below {args.videos}")
    identities, stems = {s: identity_of(s, args.identity_regex) for s in sources}, video_stems(sources)
    check_settings(args.out, settings)
    index, count = args.shard
    mine = [s for i, s in enumerate(sources) if i % count == index]
    todo = [s for s in mine if not os.path.exists(marker_path(args.out, s))]
    print(f"{len(todo)} to prepare, {len(mine) - len(todo)} done" + (f" (shard {index}/{count} of "
          f"{len(sources)} videos)" if count > 1 else ""), flush=True)
    jobs = [{"root": args.videos, "out": args.out, "source": s, "stem": stems[s],
             "identity": identities[s], "settings": settings} for s in todo]
    start, frames = time.time(), 0
    for record in tqdm(run_jobs(jobs, args.workers), total=len(jobs), desc="videos", unit="video", file=sys.stdout):
        frames += record["frames"]
        if record["skipped"]:
            tqdm.write(f"skipped {record['source']}: {record['skipped']}", file=sys.stdout)
    manifest = build_manifest(args.out, settings)
    write_json(os.path.join(args.out, "manifest.json"), manifest)
    report(manifest, frames, time.time() - start)


def report(manifest: dict, frames: int, seconds: float) -> None:
    s = manifest["summary"]
    if frames:
        print(f"prepared {frames} frames in {seconds:.1f} s ({frames / seconds:.1f} frames/s)")
    print(f"{s['videos']} videos -> {s['clips']} clips, {s['hours']:.3f} hours ({s['frames']} frames); "
          f"{s['faces_missed']} frames without a face, {s['dropped_short']} pieces too short, {s['skipped']} skipped")
    for skip in manifest["skipped"]:
        print(f"  skipped {skip['source']}: {skip['reason']}")


if __name__ == "__main__":
    run_cli(main)
