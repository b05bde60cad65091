"""sample.py: audio + face -> an H.264/AAC mp4 with every frame, and one-line errors that leave nothing behind."""
import math
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import soundfile as sf

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny A2L checkpoint trained for 2 steps, a 1.3 s wav at 44.1 kHz stereo and a face png."""
    root = tmp_path_factory.mktemp("sample")
    for split in ("train", "test"):
        (root / split).mkdir()
        data.write_clip(str(root / split / "clip_0000"), data.make_clip(0, 0, split, size=128, seconds=1.3))
    ckpt = train.train(train.parse_args([
        "--stage", "a2l", "--width", "32", "--pairs", "1", "--heads", "2", "--window", "8", "--overlap", "2",
        "--batch-size", "2", "--steps", "2", "--sample-steps", "2", "--eval-every", "2", "--save-every", "2",
        "--data", str(root / "train"), "--eval-data", str(root / "test"), "--out", str(root / "a2l")]))
    clip = data.load_clip(str(root / "test" / "clip_0000.npz"))
    audio = clip["audio"].astype(np.float32) / 32768
    stereo = np.stack([audio, audio], 1)
    from scipy.signal import resample_poly
    sf.write(root / "speech.wav", resample_poly(stereo, 441, 160, axis=0), 44100)
    frame = data.read_frames(str(root / "test" / "clip_0000.mp4"))[0]
    cv2.imwrite(str(root / "face.png"), frame[..., ::-1])
    return {"root": root, "ckpt": ckpt, "wav": str(root / "speech.wav"), "face": str(root / "face.png"),
            "seconds": len(audio) / 16000}


def run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_writes_h264_aac_mp4_with_every_frame_and_landmarks(inputs, tmp_path):
    out, lm = str(tmp_path / "out.mp4"), str(tmp_path / "lm.npy")
    proc = run(inputs["wav"], inputs["face"], "--a2l", inputs["ckpt"], "--out", out, "--save-landmarks", lm)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = subprocess.run([data.ffmpeg_exe(), "-i", out], capture_output=True, text=True).stderr
    assert re.search(r"Video: h264", probe) and re.search(r"Audio: aac", probe)
    expected = math.ceil(inputs["seconds"] * 25)
    assert len(data.read_frames(out)) == expected
    P = np.load(lm)
    assert P.shape == (expected, 478, 3) and np.isfinite(P).all()
    again = str(tmp_path / "again.npy")
    run(inputs["wav"], inputs["face"], "--a2l", inputs["ckpt"], "--out", str(tmp_path / "b.mp4"),
        "--save-landmarks", again)
    np.testing.assert_array_equal(np.load(again), P)  # same seed, same landmarks


@pytest.mark.parametrize("case", ["missing_audio", "empty_audio", "nan_audio", "no_face", "bad_checkpoint",
                                  "unwritable_out"])
def test_bad_input_is_one_line_exit_2_and_no_output(inputs, tmp_path, case):
    wav, face, ckpt, out = inputs["wav"], inputs["face"], inputs["ckpt"], str(tmp_path / "out.mp4")
    if case == "missing_audio":
        wav = str(tmp_path / "nope.wav")
    elif case == "empty_audio":
        wav = str(tmp_path / "empty.wav")
        open(wav, "wb").close()
    elif case == "nan_audio":
        wav = str(tmp_path / "nan.wav")
        sf.write(wav, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    elif case == "no_face":
        face = str(tmp_path / "blank.png")
        cv2.imwrite(face, np.full((200, 200, 3), 127, np.uint8))
    elif case == "bad_checkpoint":
        ckpt = str(tmp_path / "bad.pt")
        with open(ckpt, "wb") as f:
            f.write(b"not a checkpoint")
    else:
        out = "/proc/forbidden/out.mp4"
    proc = run(wav, face, "--a2l", ckpt, "--out", out)
    assert proc.returncode == 2, (case, proc.stderr[-1500:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
