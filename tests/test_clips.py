"""clips.py: the clip format any video can fill, and every stage training on a clip made from an ordinary video."""
import os
import subprocess

import numpy as np
import pytest
import soundfile as sf

import clips
import landmarks
import synth_clips
import train
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory):
    """Two clips made the way a user would from ordinary videos: a talking-head mp4 (non-square, its own sound
    track) whose frames are decoded, whose audio is extracted with ffmpeg and whose landmarks MediaPipe detects;
    no synthetic field anywhere. One clip keeps its samples in the npz, the other names a wav beside it."""
    root = tmp_path_factory.mktemp("ordinary")
    for k in range(2):
        made = synth_clips.make_clip(0, k, "train", size=128, seconds=1.3)
        frames = np.pad(made["frames"], ((0, 0), (16, 16), (0, 0), (0, 0)), mode="edge")  # (T, 160, 128, 3)
        video = str(root / f"talk{k}.mp4")
        clips.write_mp4(video, frames, made["audio"])  # the "ordinary video": H.264 + AAC
        wav = str(root / f"talk{k}.wav")
        subprocess.run([clips.ffmpeg_exe(), "-loglevel", "error", "-i", video, "-ar", "16000", "-ac", "1", wav],
                       check=True)
        decoded = clips.read_frames(video)  # (T, 160, 128, 3)
        P, found = landmarks.detect_video(decoded)
        assert found.all()
        audio, rate = sf.read(wav, dtype="int16")
        clip = {"landmarks": P, "fps": 25, "sample_rate": rate, "frame_size": decoded.shape[1:3],
                "identity": f"speaker-{k}", "video": os.path.basename(video)}
        clip.update({"audio": audio} if k == 0 else {"audio_path": os.path.basename(wav)})
        if k == 1:
            clip = {key: v for key, v in clip.items() if key not in ("audio", "sample_rate")}
            np.savez(root / f"talk{k}.npz", **clip)  # audio_path only: save_clip needs the samples
        else:
            clips.save_clip(str(root / f"talk{k}"), clip)
    return str(root)


def test_an_ordinary_clip_loads_with_the_required_fields_only(ordinary):
    paths = clips.clip_paths(ordinary)
    assert len(paths) == 2
    for path in paths:
        with np.load(path) as z:
            assert not {"text", "phonemes", "phoneme_ipa"} & set(z.files)
        clip = clips.load_clip(path)
        assert clip["frame_size"] == (160, 128) and clip["identity"].startswith("speaker-")
        assert clip["sample_rate"] == 16000 and len(clip["audio"]) > 16000
        frames, P = clips.decoded_clip(clip, 64)
        assert frames.shape[1:] == (64, 64, 3) and P.shape == (len(frames), 478, 3)
        assert P[..., 0].max() < 64 and P[..., 1].max() < 64  # each axis scaled on its own


def test_missing_fields_are_one_clear_line(tmp_path):
    np.savez(tmp_path / "bare.npz", landmarks=np.zeros((3, 478, 3), np.float32), fps=25)
    with pytest.raises(UsageError, match="lacks audio, sample_rate, frame_size, identity"):
        clips.load_clip(str(tmp_path / "bare.npz"))
    with pytest.raises(UsageError, match="no clips"):
        clips.clip_paths(str(tmp_path / "empty"))


def _stage(ordinary, tmp_path, *flags):
    return train.train(train.parse_args([*flags, "--data", ordinary, "--eval-data", ordinary, "--cache",
                                         str(tmp_path / "cache"), "--steps", "2", "--batch-size", "2",
                                         "--log-every", "1", "--eval-every", "2", "--save-every", "2"]))


def test_every_stage_trains_on_clips_from_ordinary_videos(ordinary, tmp_path):
    vae = _stage(ordinary, tmp_path, "--stage", "vae", "--resolution", "32", "--base-channels", "8", "--norm-groups",
                 "4", "--extra-identities", "0", "--natural-mix", "0", "--out", str(tmp_path / "vae"))
    a2l = _stage(ordinary, tmp_path, "--stage", "a2l", "--width", "32", "--pairs", "1", "--heads", "2", "--window",
                 "8", "--overlap", "2", "--sample-steps", "2", "--out", str(tmp_path / "a2l"))
    l2i = _stage(ordinary, tmp_path, "--stage", "l2i", "--vae", vae, "--image-size", "32", "--latent-size", "8",
                 "--sample-steps", "2", "--out", str(tmp_path / "l2i"))
    for path, stage in ((vae, "vae"), (a2l, "a2l"), (l2i, "l2i")):
        ckpt = train.load_checkpoint(path, stage)
        evals = [h for h in ckpt["history"] if h["kind"] == "eval"]
        assert ckpt["step"] == 2 and evals and all(np.isfinite(v) for k, v in evals[-1].items() if k != "kind")
