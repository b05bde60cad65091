"""The clip format every stage trains on, and video / audio file I/O through the ffmpeg of imageio-ffmpeg.

Not a box of the paper's figure: the paper trains on tracked talking-head videos (HDTF, MEAD); this is how a
video becomes training data here, whatever its source (our synthetic generator, or any ordinary video whose
frames, sound and MediaPipe landmarks were extracted).

A clip is `NAME.npz` with the frames in a video beside it (`NAME.mp4`, or the file its `video` key names):

    required  landmarks    (T, 478, 3) float, MediaPipe points in pixels of the frames (z scaled like x)
              fps          frames per second of the landmarks and the video
              audio        (S,) or (S, C) int16 or float samples ... or audio_path: a sound file beside the npz
              sample_rate  Hz of `audio`
              frame_size   (H, W) of the frames the landmarks are measured in (a single int: square frames)
              identity     who is speaking (a string; clips of one identity share their mean mesh P̄)
    optional  has_audio    False for a video without sound (then no audio): the image stages use it, A2L skips it
              crops        "NAME.crops.npy" beside: uint8 (T, S, S, 3) face crops, with crop_landmarks (T, 478, 3)
                           in their pixels, crop_size S and crop_face_iod (landmarks.crop_clip_faces); the stages
                           read these instead of decoding the video when their framing matches
              anything else, e.g. the synthetic generator's text, phonemes (P, 2) and phoneme_ipa (P,)

A folder of clips is either NAME.npz files side by side, or a prepared folder (`python prepare.py`, from
ordinary videos) whose manifest.json lists its clips with their identity-disjoint split (train / test).

`load_clip` is the one loader of every stage; `save_clip` writes one (the video with its sound track first,
then the npz, each atomically). `clip_frames` decodes the frames of many clips once into a memory-mapped cache.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import zipfile

import cv2
import imageio_ffmpeg
import numpy as np
import soundfile
from tqdm import tqdm

import landmarks
from cli import UsageError, disk_error
from common import NpyWriter, atomic_write, temp_beside

FPS = 25
SAMPLE_RATE = 16000
MAX_FRAME_MISMATCH = 2  # frames a decoded video may differ from its landmarks (container rounding)
REQUIRED_FIELDS = ("landmarks", "fps", "audio", "sample_rate", "frame_size", "identity")
SILENT_FIELDS = ("landmarks", "fps", "frame_size", "identity")  # a clip with has_audio False


# ------------------------------------------------------------------------------------------------------------
# The clip format
# ------------------------------------------------------------------------------------------------------------

def clip_paths(folder: str, split: str | None = None) -> list[str]:
    """The clips (npz files) of a folder, sorted; of a prepared folder (manifest.json), those of `split`
    (train / test; all when None). UsageError when there is none."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            listed = json.load(f)["clips"]
        paths = [os.path.join(folder, c["npz"]) for c in listed if split is None or c["split"] == split]
        if not paths:
            raise UsageError(f"the prepared folder {folder} has no {split or ''} clips; prepare more videos (or "
                             "give others to the test split: prepare.py --test-regex / --test-list)")
        return paths
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if not paths:
        raise UsageError(f"no clips (*.npz with their video beside) in {folder}; make some with "
                         "`python data.py synth`, `python prepare.py VIDEOS OUT` or write them with clips.save_clip")
    return paths


def is_prepared(folder: str | None) -> bool:
    """Whether folder is a prepared folder (prepare.py's manifest.json), whose test split serves for evaluation."""
    return folder is not None and os.path.isfile(os.path.join(folder, "manifest.json"))


def load_clip(npz_path: str) -> dict:
    """A clip as a dict with checked, normalised fields: landmarks float32 (T, 478, 3), fps float, audio
    (S,) or (S, C) samples, sample_rate int, frame_size (H, W) ints, identity str, video (the frames' path);
    optional extras pass through (strings and string lists come back as str / list of str)."""
    if not os.path.isfile(npz_path):
        raise UsageError(f"no clip at {npz_path}; generate data with `python data.py synth` or give a clip folder")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            clip = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"cannot read clip {npz_path} ({type(err).__name__}); rewrite it") from None
    folder = os.path.dirname(os.path.abspath(npz_path))
    if "audio" not in clip and "audio_path" in clip:
        clip["audio"], clip["sample_rate"] = _read_sound(os.path.join(folder, str(clip["audio_path"])), npz_path)
    needed = REQUIRED_FIELDS if clip.get("has_audio", True) else SILENT_FIELDS
    missing = [k for k in needed if k not in clip]
    if missing:
        raise UsageError(f"{npz_path} lacks {', '.join(missing)}; a clip needs {', '.join(REQUIRED_FIELDS)} "
                         "(audio may be an audio_path instead, or absent with has_audio False)")
    clip["video"] = os.path.join(folder, str(clip["video"])) if "video" in clip else npz_path[:-4] + ".mp4"
    return _normalise(clip, npz_path)


def _read_sound(path: str, clip: str):
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises several types for missing / foreign files
        raise UsageError(f"{clip}: cannot read its audio_path {path} ({type(err).__name__})") from None
    return audio, rate


def _normalise(clip: dict, name: str) -> dict:
    P = np.asarray(clip["landmarks"], np.float32)
    if P.ndim != 3 or P.shape[1:] != (landmarks.NUM_LANDMARKS, 3) or len(P) == 0 or not np.isfinite(P).all():
        raise UsageError(f"{name}: landmarks must be a finite (T, {landmarks.NUM_LANDMARKS}, 3) array, got "
                         f"{P.shape}")
    size = np.asarray(clip["frame_size"]).reshape(-1)
    if size.size not in (1, 2) or (size <= 0).any():
        raise UsageError(f"{name}: frame_size must be (H, W) or one side, got {clip['frame_size']}")
    out = {**clip, "landmarks": P, "fps": float(clip["fps"]), "frame_size": (int(size[0]), int(size[-1])),
           "identity": str(clip["identity"]), "has_audio": bool(clip.get("has_audio", True))}
    if out["has_audio"]:
        audio = np.asarray(clip["audio"])
        if audio.ndim not in (1, 2) or audio.size == 0:
            raise UsageError(f"{name}: audio must be (S,) or (S, channels) samples, got {audio.shape}")
        out.update(audio=audio, sample_rate=int(clip["sample_rate"]))
    if "crops" in clip:
        out["crops"] = os.path.join(os.path.dirname(os.path.abspath(name)), str(clip["crops"]))
    for key, value in clip.items():  # extras: numpy strings back to Python strings
        if key not in REQUIRED_FIELDS + ("crops",) and isinstance(value, np.ndarray) and value.dtype.kind == "U":
            out[key] = str(value) if value.ndim == 0 else [str(s) for s in value]
    return out


def save_clip(stem: str, clip: dict) -> None:
    """Write stem.mp4 (clip["frames"] uint8 (T, H, W, 3) with the audio as its sound track) and stem.npz (every
    other field), each atomically. Without "frames" only the npz is written (its video must exist)."""
    missing = [k for k in REQUIRED_FIELDS if k not in clip]
    if missing:
        raise ValueError(f"a clip needs {', '.join(REQUIRED_FIELDS)}; missing {', '.join(missing)}")
    if "frames" in clip:
        audio = np.asarray(clip["audio"])
        if audio.dtype != np.int16:  # float samples in [-1, 1]
            audio = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
        write_mp4(stem + ".mp4", clip["frames"], audio, clip["sample_rate"], clip["fps"])

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in clip.items() if k != "frames"})

    atomic_write(stem + ".npz", write)


def clip_frames(paths: list[str], size: int, cache: str, face_iod: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the clips at size x size, uint8 (N, size, size, 3), and their landmarks in those pixels
    (N, 478, 3), both memory-mapped from .npy files in `cache`, written clip by clip on first use (memory stays
    that of one clip however many there are). face_iod 0 resizes whole frames; face_iod > 0 cuts face crops
    with that inter-ocular fraction out of the full-resolution frames (landmarks.crop_clip_faces, as
    VAEConfig.face_iod and L2IConfig.face_iod ask), or takes a prepared clip's stored crops."""
    framing = [face_iod] if face_iod else []  # the rendered framing keeps its cache keys
    key = hashlib.sha1(json.dumps([os.path.abspath(p) for p in paths] + [size] + framing).encode()).hexdigest()[:12]
    f_path, l_path = (os.path.join(cache, "frames", f"{key}_{n}.npy") for n in ("frames", "landmarks"))
    if not (os.path.exists(f_path) and os.path.exists(l_path)):
        with NpyWriter(f_path, (size, size, 3), np.uint8) as frames, \
                NpyWriter(l_path, (landmarks.NUM_LANDMARKS, 3), np.float32) as lmks:
            for p in tqdm(paths, desc="frames", unit="clip", leave=False, disable=len(paths) < 8):
                video, P = decoded_clip(load_clip(p), size, face_iod)
                frames.write(video)
                lmks.write(P)
    return np.load(f_path, mmap_mode="r"), np.load(l_path, mmap_mode="r")


def prepared_crops(clip: dict, size: int, face_iod: float) -> tuple[np.ndarray, np.ndarray] | None:
    """A prepared clip's stored face crops resized to size (uint8 (T, size, size, 3)) with their landmarks, when
    they have this framing and at least this size; else None (the video is decoded)."""
    if "crops" not in clip or not face_iod or abs(float(clip["crop_face_iod"]) - face_iod) > 1e-6 \
            or int(clip["crop_size"]) < size:
        return None
    crops = np.load(clip["crops"], mmap_mode="r")  # (T, S, S, 3)
    S = int(clip["crop_size"])
    if S != size:
        crops = np.stack([cv2.resize(np.asarray(c), (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    return np.asarray(crops), np.asarray(clip["crop_landmarks"], np.float32) * np.float32(size / S)


def decoded_clip(clip: dict, size: int, face_iod: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (T, size, size, 3), landmarks (T, 478, 3) in their pixels) of one loaded clip: the frames
    resized whole (face_iod 0; each axis scaled on its own) or face crops (face_iod > 0); clip["frames"] is used
    when present, else its video is decoded. T = the shorter of the video and the landmarks (decoders may round
    a container's length by a frame or two; a larger difference is an error). A prepared clip's stored crops
    serve when their framing matches (prepared_crops)."""
    stored = prepared_crops(clip, size, face_iod)
    if stored is not None:
        return stored
    if "frames" in clip:
        video = np.asarray(clip["frames"])
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
        if not face_iod and video.shape[1:3] != (size, size):
            video = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in video])
    else:
        video = read_frames(clip["video"], None if face_iod else size)  # (T, h, w, 3)
    size_hw = clip["frame_size"] if "frame_size" in clip else np.shape(clip["frames"])[1:3]  # given frames: theirs
    H, W = np.resize(np.asarray(size_hw), 2)  # (H, W); one int for square frames
    T = min(len(video), len(clip["landmarks"]))
    if max(len(video), len(clip["landmarks"])) - T > MAX_FRAME_MISMATCH:
        raise ValueError(f"the video has {len(video)} frames but the landmarks {len(clip['landmarks'])}; "
                         "give one landmark set per frame")
    h, w = video.shape[1:3]
    P = np.asarray(clip["landmarks"][:T], np.float32) * np.array([w / W, h / H, w / W], np.float32)  # px of `video`
    if face_iod:
        return landmarks.crop_clip_faces(video[:T], P, size, face_iod)
    return video[:T], P


# ------------------------------------------------------------------------------------------------------------
# Video and audio files through ffmpeg
# ------------------------------------------------------------------------------------------------------------

def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def video_size(path: str) -> tuple[int, int]:
    """(width, height) of a video's first stream, through ffmpeg; UsageError when it is missing or unreadable."""
    if not os.path.exists(path):
        raise UsageError(f"no video at {path}; check the path")
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True)
    match = re.search(r"Video:.*?(\d{2,5})x(\d{2,5})", probe.stderr)
    if match is None:
        raise UsageError(f"{path} has no readable video stream; re-encode it as H.264 mp4")
    return int(match.group(1)), int(match.group(2))


def read_frames(path: str, size=None, fps=None) -> np.ndarray:
    """Decode a video into uint8 (T, H, W, 3) RGB through ffmpeg: size resizes to size x size (an int) or
    to (W, H) (a pair) with area averaging; fps resamples the frame rate (frames dropped or repeated, as
    ffmpeg's fps filter)."""
    w, h = video_size(path) if not size else (size, size) if np.isscalar(size) else size
    filters = ([f"fps={fps}"] if fps else []) + ([f"scale={w}:{h}:flags=area"] if size else [])
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-vf", ",".join(filters)] if filters else []
    proc = subprocess.run(cmd + ["-"], capture_output=True)
    if proc.returncode != 0:
        raise UsageError(f"cannot decode {path}: {proc.stderr.decode(errors='replace')[-200:]}")
    return np.frombuffer(proc.stdout, np.uint8).reshape(-1, h, w, 3)  # (T, H, W, 3)


class Mp4Writer:
    """Stream RGB frames into an H.264 (+ AAC) mp4 through ffmpeg, so memory does not grow with the video's
    length. Written to a temporary file beside `path` and renamed into place on a clean exit; on any failure or
    interruption the temporary files are removed and nothing is left at `path` (an older file there stays).

        with Mp4Writer("out.mp4", (h, w), audio=int16_samples) as video:   # or audio_file="speech.m4a"
            video.write(frames)  # (n, h, w, 3) uint8, any number of times

    audio: int16 samples at sample_rate, written to a temporary wav for ffmpeg; audio_file: a sound file (or a
    video with sound) whose first audio stream becomes the sound track as it is (its rate and channels kept).
    A full disk or a file-size limit ends in UsageError naming the path and the free space there."""

    def __init__(self, path, size_hw, audio=None, sample_rate=SAMPLE_RATE, fps=FPS, crf=18, audio_file=None):
        self.path, self.size_hw, self.audio = os.fspath(path), tuple(int(v) for v in size_hw), audio
        self.sample_rate, self.fps, self.crf, self.audio_file = sample_rate, fps, crf, audio_file
        self.frames = 0
        self._tmp = self._wav = self._proc = None

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _start(self):
        h, w = self.size_hw
        self._tmp = temp_beside(self.path, suffix=".mp4")
        cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-r", f"{self.fps:g}", "-i", "-"]
        if self.audio_file is not None:
            cmd += ["-i", self.audio_file, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"]
        elif self.audio is not None:
            self._wav = self._tmp[:-4] + ".wav"
            try:
                soundfile.write(self._wav, np.asarray(self.audio, np.int16), self.sample_rate, subtype="PCM_16")
            except OSError as err:  # soundfile reports a full disk as a LibsndfileError (an OSError)
                raise disk_error(self._wav, err) from None
            cmd += ["-i", self._wav, "-c:a", "aac", "-b:a", "64k"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                "-threads", "1", "-movflags", "+faststart", "-f", "mp4", self._tmp]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frames):
        frames = np.ascontiguousarray(frames, np.uint8)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.shape[1:] != (*self.size_hw, 3):
            raise ValueError(f"frames must be (n, {self.size_hw[0]}, {self.size_hw[1]}, 3), got {frames.shape}")
        try:
            self._proc.stdin.write(frames.tobytes())
        except BrokenPipeError:  # ffmpeg stopped: a full disk or a size limit killed it; __exit__ says which
            raise self._failure() from None
        self.frames += len(frames)

    def _failure(self) -> Exception:
        """Why ffmpeg stopped: UsageError for a full disk / size limit, RuntimeError otherwise."""
        code = self._proc.wait()
        err = self._proc.stderr.read().decode(errors="replace")
        too_large = code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in err  # a size limit
        if too_large or "No space left" in err:
            errnum = errno.EFBIG if too_large else errno.ENOSPC
            return disk_error(self.path, OSError(errnum, os.strerror(errnum)))
        return RuntimeError(f"ffmpeg failed on {self.path} after {self.frames} frames (exit {code}): {err[-500:]}")

    def __exit__(self, exc_type, exc, tb):
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        if exc_type is not None:
            self._proc.kill()
            self._cleanup()
            return False
        code = self._proc.wait()
        if code != 0 or self.frames == 0:
            failure = self._failure() if code != 0 else RuntimeError(f"no frames were written to {self.path}")
            self._cleanup()
            raise failure
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        self._cleanup()
        return False

    def _cleanup(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for path in (self._wav, self._tmp):
            if path and os.path.exists(path):
                os.unlink(path)


def write_mp4(path, frames, audio=None, sample_rate=SAMPLE_RATE, fps=FPS, crf=18):
    """H.264 (+ AAC when int16 audio is given) mp4 of all frames (T, H, W, 3) at once, atomically."""
    frames = np.asarray(frames, np.uint8)
    with Mp4Writer(path, frames.shape[1:3], audio, sample_rate, fps, crf) as video:
        video.write(frames)
