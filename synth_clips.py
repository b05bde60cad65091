"""Synthetic talking-head clips with known ground truth: the project's "shakespeare_char".

Not part of the paper (DreamHead trains on HDTF / MEAD videos, tracked with MediaPipe); the synthetic data source
that lets every stage be trained, tested and measured offline on CPU with exact ground truth. It joins the
speech and motion of `synth_speech.py` to the faces and rendering of `synth_face.py` and writes clips in the
project's clip format (`clips.py`): an mp4 (H.264 + AAC, 25 fps) and an npz with the required fields
(landmarks (T, 478, 3) float32 px, fps, audio int16 mono 16 kHz, sample_rate, frame_size (H, W), identity)
plus the synthetic extras text, phonemes (P, 2) float32 start/end seconds and phoneme_ipa (P,); T =
ceil(duration * 25) with duration = len(audio) / 16000.

A folder of clips records what it was made with in synth.json (`check_settings`), so a folder of other
settings is refused rather than silently extended; pool workers end with their parent (`cli.process_pool`).

`ensure_synthetic` generates a split into the cache on first use; `clips_or_synthetic` is what training and
evaluation call: a clip folder when the user gives one, else the synthetic split.

poses (`synth_speech.POSES`): "small", the slight sway all shipped models and documented numbers were made with
(the default, bit for bit as before), or "wide", heads that turn +-25 deg, nod and tilt +-15 deg, move and change
size like talking-head footage (`synth_speech.wide_pose_track`, drawn with `synth_face.render_clip`'s renderer
for turning heads). It is part of a folder's identity: recorded in synth.json, and the wide sets of the cache
live in folders of their own (root/<split>_wide_<count>_<seed>/). The held-out "posed" test set is split "test"
(the test identities and sentences) with poses "wide".

voices (`voices.ENGINES`): the speech engines a clip's speaker is drawn from, espeak-ng alone by default (bit for
bit as before), or with flite, festival, piper and real recorded prompts (`voices.py`, `install_voices.sh`). Also
part of a folder's identity (synth.json, root/<split>_espeak+flite_<count>_<seed>/); such clips record their
engine in the extra field "voice".

portraits (`PORTRAITS`): "base", the training identities 0-15 made from two portraits (the default, bit for bit as
before), or "all", which also draws the training clips' faces from the ten identities made from five more real
photos (`synth_face.PORTRAIT_IDENTITIES`; root/train_portraits_<count>_<seed>/). The test split keeps its held-out
identities either way, so "all" is for training sets only.
"""
import argparse
import glob
import json
import os

import cv2
import numpy as np
from tqdm import tqdm

import clips
import landmarks
from cli import UsageError, process_pool
from common import atomic_write
from synth_face import EXTRA_IDENTITIES_START, EXTRA_PORTRAITS_START, PORTRAIT_IDENTITIES, TEST_IDENTITIES, TRAIN_IDENTITIES, \
    identity_texture, render_clip, _triangulation
from synth_speech import FPS, POSES, SAMPLE_RATE, articulation, blink_track, head_pose, pose_track, speech_clip, \
    spoken_clip, wide_pose_track
from voices import DEFAULT_VOICES, check_voices, parse_voices

EXAMPLE = dict(seed=0, index=16, split="test")  # the shipped example: a held-out identity (18), a held-out sentence
# Bump when make_clip gives other clips for the same (seed, index, split, size): a folder made by another version
# is refused. 1: before synth.json (the breathy voices f2, f3, f5 were not reproducible); 2: all voices are.
GENERATOR_VERSION = 2
SETTINGS_FILE = "synth.json"
PORTRAITS = ("base", "all")


def appearance_frames(identities, frames_per_identity=12, size=64, seed=0, progress=True, face_iod=0.0,
                      poses="small", portraits="base"):
    """Still frames uint8 (identities * frames_per_identity, size, size, 3) of `identities` extra random
    identities (numbers from EXTRA_IDENTITIES_START: appearance drawn like identities 0-19, never one of them),
    with random speech mouth shapes, blinks and poses. Only the VAE trains on them: an autoencoder that sees 16
    faces learns those faces; it has to see many to learn to compress faces it has never seen. face_iod > 0:
    face crops with that inter-ocular fraction (landmarks.face_crop_box) instead of the rendered framing.
    poses "small": the moderate stills the shipped VAEs saw (twice the clips' small range); "wide": those of
    wide-pose clips. portraits "all": their base photos are any of the seven portraits (synth_face), not only
    astronaut and Grace Hopper."""
    _check_poses(poses)
    _check_portraits(portraits, "train")
    start = EXTRA_IDENTITIES_START if portraits == "base" else EXTRA_PORTRAITS_START
    out = []
    for k in tqdm(range(identities), desc="VAE identities", unit="id", disable=not progress):
        identity = start + seed * 100_000 + k
        rng = np.random.default_rng([seed, identity, 2])
        audio, phonemes, ipa, _ = speech_clip(rng, "train", 2.0, None)
        art = articulation(phonemes, ipa, len(audio) / SAMPLE_RATE, audio)
        pick = np.sort(rng.choice(len(art), min(frames_per_identity, len(art)), replace=False))
        blink = blink_track(rng, len(art))
        if poses == "small":
            pose = pose_track(rng, len(art), max_deg=(8.0, 6.0, 5.0), max_shift=0.04)
        else:
            pose = wide_pose_track(rng, len(art))
        frames, P = render_clip(identity, art[pick], blink[pick], pose[pick])
        if face_iod:  # independent stills: each framed on its own
            out.append(landmarks.crop_clip_faces(frames, P, size, face_iod, smooth=1)[0])
        else:
            out.append(np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]))
        identity_texture.cache_clear()
        _triangulation.cache_clear()
    return np.concatenate(out)


def _check_poses(poses):
    if poses not in POSES:
        raise UsageError(f"unknown poses {poses!r}; use one of {', '.join(POSES)}")


def _check_portraits(portraits, split):
    if portraits not in PORTRAITS:
        raise UsageError(f"unknown portraits {portraits!r}; use one of {', '.join(PORTRAITS)}")
    if portraits != "base" and split != "train":
        raise UsageError(f"--portraits {portraits} adds training identities; the {split} split keeps its held-out "
                         "ones, so leave --portraits base for it")


def _check_voices(voices):
    """voices (voices.ENGINES, each installed) in their canonical order; else a UsageError saying what to do."""
    try:
        return check_voices(tuple(voices))
    except ValueError as err:
        raise UsageError(str(err)) from None


def voices_flag(text):
    """An argparse type: a --voices value (voices.parse_voices) as a tuple of installed engines."""
    try:
        return parse_voices(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _voices_name(voices, sep="_"):
    """'' for espeak-ng alone, else sep + the engines joined by '+' (a folder name's part, a progress label)."""
    return "" if tuple(voices) == DEFAULT_VOICES else sep + "+".join(voices)


def pick_identity(rng, split, portraits="base"):
    """A random identity of the split: train 0-15 (portraits "all": and PORTRAIT_IDENTITIES), test 16-19 (held
    out)."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; use 'train' or 'test'")
    _check_portraits(portraits, split)
    ids = (TRAIN_IDENTITIES + (PORTRAIT_IDENTITIES if portraits == "all" else ())) if split == "train" \
        else TEST_IDENTITIES
    return int(ids[rng.integers(len(ids))])


def make_clip(seed, index, split="train", size=256, seconds=None, text=None, poses="small", voices=DEFAULT_VOICES,
              portraits="base"):
    """One clip in the clip format (clips.py) plus its frames, deterministic in (seed, index, split, poses,
    voices, portraits); poses "small" and "wide" share the identity, speech, mouth and blinks, and differ in the
    head track.
    With voices other than the default (espeak-ng alone) the clip records the engine that spoke it ("voice")."""
    _check_poses(poses)
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    identity = pick_identity(rng, split, portraits)
    audio, phonemes, ipa, text, engine = spoken_clip(rng, split, seconds, text, voices)
    duration = len(audio) / SAMPLE_RATE
    art = articulation(phonemes, ipa, duration, audio)
    frames_n = len(art)
    frames, meshes = render_clip(identity, art, blink_track(rng, frames_n), head_pose(rng, frames_n, poses), size)
    return {"frames": frames, "landmarks": meshes, "fps": FPS, "identity": str(identity), "audio": audio,
            "sample_rate": SAMPLE_RATE, "text": text, "phonemes": phonemes, "phoneme_ipa": np.array(ipa),
            "frame_size": (size, size), **({} if tuple(voices) == DEFAULT_VOICES else {"voice": engine})}


def _synth_one(job):
    cv2.setNumThreads(1)
    out, seed, index, split, size, poses, voices, portraits = job
    stem = os.path.join(out, f"clip_{index:04d}")
    if not (os.path.exists(stem + ".npz") and os.path.exists(stem + ".mp4")):
        clips.save_clip(stem, make_clip(seed, index, split, size, poses=poses, voices=voices, portraits=portraits))
    return stem + ".npz"


# ------------------------------------------------------------------------------------------------------------
# The settings a folder was generated with (synth.json)
# ------------------------------------------------------------------------------------------------------------

def _read_settings(path):
    try:
        with open(path) as f:
            found = json.load(f)
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
        return found
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path} ({err}); delete the folder or generate into another one") from None


def check_settings(out, seed, split, size, poses="small", voices=DEFAULT_VOICES, portraits="base"):
    """Refuse the folder `out` when its synth.json records other settings; write synth.json into a folder
    without clips. A folder with clips and no synth.json (made before the file existed) is accepted as it is:
    nothing says what it was made with; a synth.json without poses (made before wide poses) means "small",
    one without voices (espeak-ng alone: made before other engines, or with the default, which is not written),
    one without portraits "base" (likewise)."""
    wanted = {"generator": GENERATOR_VERSION, "seed": int(seed), "split": split, "size": int(size), "poses": poses,
              "voices": list(voices), "portraits": portraits}
    defaults = {"poses": "small", "voices": list(DEFAULT_VOICES), "portraits": "base"}
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        found = {**defaults, **_read_settings(path)}
        differs = [f"{key} {found.get(key)} (not {value})" for key, value in wanted.items() if found.get(key) != value]
        if differs:
            raise UsageError(f"{out} holds clips made with other settings: {', '.join(differs)} per its "
                             f"{SETTINGS_FILE}; delete the folder or generate into another one")
    elif not glob.glob(os.path.join(out, "clip_*")):
        written = {k: v for k, v in wanted.items() if k == "poses" or v != defaults.get(k)}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(written, f, indent=1)
        atomic_write(path, write)


def synth(out, count, seed=0, split="train", size=256, workers=2, progress=True, poses="small",
          voices=DEFAULT_VOICES, portraits="base"):
    """Generate `count` clips into `out` (existing ones are kept); returns the npz paths in order.

    `out` records the settings in synth.json; a folder made with other settings is refused (UsageError)."""
    if count < 1 or size < 64:
        raise UsageError("need --clips >= 1 and --size >= 64")
    _check_poses(poses)
    _check_portraits(portraits, split)
    voices = _check_voices(voices)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {out}: {err.strerror}; choose a writable --out folder") from None
    check_settings(out, seed, split, size, poses, voices, portraits)
    jobs = [(out, seed, i, split, size, poses, voices, portraits) for i in range(count)]
    paths = []
    desc = f"synth {split}" + ("" if poses == "small" else f" {poses} poses") + _voices_name(voices, " ") + \
        ("" if portraits == "base" else f" {portraits} portraits")
    with tqdm(total=count, desc=desc, unit="clip", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                paths.append(_synth_one(job))
                bar.update()
            return paths
        # leaving this block by an exception (Ctrl-C; SIGTERM, which run_cli turns into KeyboardInterrupt)
        # terminates the workers: Pool.__exit__ calls terminate()
        with process_pool(workers) as pool:
            for path in pool.imap(_synth_one, jobs):
                paths.append(path)
                bar.update()
    return paths


def synthetic_folder(split="train", count=64, seed=0, root="cache/synth", size=256, poses="small",
                     voices=DEFAULT_VOICES, portraits="base"):
    """The cache folder of a synthetic set: root/<split>_<count>_<seed>[_<size>px] for small poses, espeak-ng
    alone and the base portraits (as before poses, voices and portraits existed, so those caches stay valid), with
    _<poses> for other poses, _<engine>+<engine>... for other voices and _portraits for portraits "all" after the
    split (root/train_wide_espeak+piper_portraits_64_0)."""
    _check_poses(poses)
    name = split + ("" if poses == "small" else f"_{poses}") + _voices_name(_check_voices(voices)) + \
        ("" if portraits == "base" else "_portraits") + f"_{count}_{seed}"
    return os.path.join(root, name + ("" if size == 256 else f"_{size}px"))


def ensure_synthetic(split="train", count=64, seed=0, root="cache/synth", size=256, workers=2, poses="small",
                     voices=DEFAULT_VOICES, portraits="base"):
    """Paths of `count` synthetic clips in `synthetic_folder`, generated on first use."""
    voices = _check_voices(voices)
    folder = synthetic_folder(split, count, seed, root, size, poses, voices, portraits)
    paths = [os.path.join(folder, f"clip_{i:04d}.npz") for i in range(count)]
    if all(os.path.exists(p) and os.path.exists(p[:-4] + ".mp4") for p in paths):
        check_settings(folder, seed, split, size, poses, voices, portraits)
        return paths
    # the defaults as synth's callers always saw them
    more = {**({} if voices == DEFAULT_VOICES else {"voices": voices}),
            **({} if portraits == "base" else {"portraits": portraits})}
    return synth(folder, count, seed, split, size, workers, poses=poses, **more)


def clips_or_synthetic(folder: str | None, split: str, count: int, seed: int = 0, cache: str = "cache",
                       poses: str = "small", voices: tuple = DEFAULT_VOICES, portraits: str = "base") -> list[str]:
    """The clips of `folder` (clips.clip_paths; of a prepared folder, those of `split`), or `count` synthetic
    clips of `split` with head poses `poses` spoken by `voices` (voices.ENGINES), faces from `portraits`
    (PORTRAITS; "all" for the training split only), generated on first use (split "test", poses "wide": the
    held-out posed set). poses, voices and portraits only choose among synthetic sets: a folder's clips are what
    they are."""
    if folder is not None:
        return clips.clip_paths(folder, split if clips.is_prepared(folder) else None)
    return ensure_synthetic(split, count, seed, root=os.path.join(cache, "synth"), poses=poses, voices=voices,
                            portraits=portraits)
