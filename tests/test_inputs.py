"""Every input a user can give ends in a video or in one clear line: the real command lines, one case each.

For each bad input: exit code 2 (130 for a signal), exactly one line on stderr and no traceback, no temporary file
left beside the output, and an output that existed before is unchanged. The good inputs that used to fail (very
short audio, an m4a voice memo, a video's sound track) render.
"""
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import clips
from common import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACE = os.path.join(ROOT, "examples", "face.png")
SPEECH = os.path.join(ROOT, "examples", "speech.wav")
SHIPPED = {s: os.path.join(ROOT, "checkpoints", f"{s}_tiny.pt") for s in ("a2l", "vae", "l2i")}
pytestmark = pytest.mark.skipif(not all(map(os.path.exists, SHIPPED.values())), reason="no shipped checkpoints")
BEFORE = b"an older video that must survive"


def run(*args, preexec_fn=None, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, preexec_fn=preexec_fn,
                          **kw)


def assert_one_line(proc, match: str, code: int = 2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert match in lines[0], lines[0]


def assert_nothing_left(folder, out):
    assert open(out, "rb").read() == BEFORE
    assert not [f for f in os.listdir(folder) if f.startswith(".") and ".tmp" in f or f.endswith(".wav.tmp")]
    assert not [f for f in os.listdir(folder) if f.startswith("." + os.path.basename(out))]


def wav(path, samples, rate=16000, subtype="PCM_16"):
    sf.write(path, samples, rate, subtype=subtype)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, made once."""
    d = tmp_path_factory.mktemp("inputs")
    speech, rate = sf.read(SPEECH, dtype="float32")
    f = {"dir": str(d)}
    f["empty"] = str(d / "empty.wav")
    open(f["empty"], "wb").close()
    f["noise"] = str(d / "noise.wav")
    open(f["noise"], "wb").write(os.urandom(3000))
    f["nan"] = wav(d / "nan.wav", np.full(16000, np.nan, np.float32), subtype="FLOAT")
    f["one_sample"] = wav(d / "one.wav", speech[:1])
    f["20ms"] = wav(d / "20ms.wav", speech[:320])
    rate1 = bytearray(open(SPEECH, "rb").read())
    rate1[24:28] = (1).to_bytes(4, "little")  # the header claims 1 Hz
    f["1hz"] = str(d / "1hz.wav")
    open(f["1hz"], "wb").write(bytes(rate1))
    whole = open(SPEECH, "rb").read()
    f["cut"] = str(d / "cut.wav")
    open(f["cut"], "wb").write(whole[:44 + 200])  # a header that promises 4.8 s, and 100 samples
    f["blank"] = str(d / "blank.png")
    import cv2
    cv2.imwrite(f["blank"], np.full((200, 200, 3), 127, np.uint8))
    canvas = np.full((600, 600, 3), 127, np.uint8)  # found at full size, ~9 px between the eyes at --max-size 100
    canvas[200:400, 200:400] = cv2.resize(cv2.imread(FACE), (200, 200), interpolation=cv2.INTER_AREA)
    f["small_face"] = str(d / "small.png")
    cv2.imwrite(f["small_face"], canvas)
    f["broken_png"] = str(d / "broken.png")
    open(f["broken_png"], "wb").write(b"\x89PNG not really")
    P = np.load(os.path.join(ROOT, "examples", "truth.npz"))["landmarks"].astype(np.float32)  # (120, 478, 3)
    for name, arr in (("lmk_shape", P[:, :10]), ("lmk_nan", np.where(P > 0, np.nan, P)), ("lmk_zero", P * 0),
                      ("lmk_short", P[:5])):
        f[name] = str(d / f"{name}.npy")
        np.save(f[name], arr)
    f["bad_ckpt"] = str(d / "bad.pt")
    open(f["bad_ckpt"], "wb").write(b"not a checkpoint")
    blob = open(SHIPPED["vae"], "rb").read()
    f["half_ckpt"] = str(d / "half.pt")
    open(f["half_ckpt"], "wb").write(blob[: len(blob) // 2])
    ckpt = load_checkpoint(SHIPPED["vae"], "vae")
    ckpt["ema"] = {k: (v.clone().fill_(float("nan")) if k.endswith("conv_in.weight") else v) for k, v in ckpt["ema"].items()}
    f["nan_ckpt"] = str(d / "nan.pt")
    save_checkpoint(ckpt, f["nan_ckpt"])
    ckpt = load_checkpoint(SHIPPED["vae"], "vae")
    ckpt["ema"] = {k: (v + 1e-3 if k.endswith("conv_in.bias") else v) for k, v in ckpt["ema"].items()}
    f["other_vae"] = str(d / "other_vae.pt")
    save_checkpoint(ckpt, f["other_vae"])
    ckpt = load_checkpoint(SHIPPED["l2i"], "l2i")
    weights = ckpt["ema"]["unet.conv_in.weight"].clone()
    weights.view(torch.int32).view(-1)[7] ^= 1 << 30  # the exponent's top bit of one weight
    ckpt["ema"] = {**ckpt["ema"], "unet.conv_in.weight": weights}
    f["flipped_ckpt"] = str(d / "flipped.pt")
    save_checkpoint(ckpt, f["flipped_ckpt"])
    f["v99"] = str(d / "v99.pt")
    torch.save({**load_checkpoint(SHIPPED["a2l"], "a2l"), "version": 99}, f["v99"])
    return f


SAMPLE_CASES = {  # name: (extra arguments or a function of the files giving (audio, face, extra), expected text)
    "missing_audio": (lambda f: (f["dir"] + "/nope.wav", FACE, []), "does not exist"),
    "audio_is_a_folder": (lambda f: (f["dir"], FACE, []), "is a folder"),
    "empty_audio": (lambda f: (f["empty"], FACE, []), "cannot read audio"),
    "corrupt_audio": (lambda f: (f["noise"], FACE, []), "cannot read audio"),
    "nan_audio": (lambda f: (f["nan"], FACE, []), "NaN or infinite"),
    "one_sample_audio": (lambda f: (f["one_sample"], FACE, []), "give at least one video frame"),
    "20ms_audio": (lambda f: (f["20ms"], FACE, []), "give at least one video frame"),
    "1hz_header": (lambda f: (f["1hz"], FACE, []), "claims a sample rate of 1 Hz"),
    "cut_short_wav": (lambda f: (f["cut"], FACE, []), "give at least one video frame"),
    "missing_face": (lambda f: (SPEECH, f["dir"] + "/nope.png", []), "does not exist"),
    "unreadable_image": (lambda f: (SPEECH, f["broken_png"], []), "cannot read"),
    "no_face": (lambda f: (SPEECH, f["blank"], []), "no face found"),
    "face_too_small": (lambda f: (SPEECH, f["small_face"], ["--max-size", "100"]), "too small"),
    "landmarks_missing": (lambda f: (SPEECH, FACE, ["--landmarks", f["dir"] + "/no.npy"]), "does not exist"),
    "landmarks_shape": (lambda f: (SPEECH, FACE, ["--landmarks", f["lmk_shape"]]), "must be a finite"),
    "landmarks_nan": (lambda f: (SPEECH, FACE, ["--landmarks", f["lmk_nan"]]), "must be a finite"),
    "landmarks_all_zero": (lambda f: (SPEECH, FACE, ["--landmarks", f["lmk_zero"]]), "eyes on top of each other"),
    "landmarks_too_few": (lambda f: (SPEECH, FACE, ["--landmarks", f["lmk_short"]]), "have 5 frames"),
    "guidance_nan": (["--guidance", "nan"], "not a finite number"),
    "guidance_inf": (["--guidance", "inf"], "not a finite number"),
    "steps_zero": (["--steps", "0"], "out of range"),
    "steps_above_the_schedule": (["--steps", "5000"], "outside the A2L model's 1..100"),
    "seed_negative": (["--seed", "-1"], "out of range"),
    "seed_beyond_64_bits": (["--seed", str(2**64)], "out of range"),
    "smooth_even": (["--smooth", "4"], "is even"),
    "batch_zero": (["--batch", "0"], "out of range"),
    "max_size_tiny": (["--max-size", "10"], "out of range"),
    "crop_filter_unknown": (["--crop-filter", "cubic"], "invalid choice"),
    "unknown_flag": (["--bogus"], "unrecognized arguments"),
    "cuda_without_gpu": (["--device", "cuda"], "no CUDA GPU"),
    "corrupt_checkpoint": (lambda f: (SPEECH, FACE, ["--l2i", f["bad_ckpt"]]), "corrupt"),
    "truncated_checkpoint": (lambda f: (SPEECH, FACE, ["--vae", f["half_ckpt"]]), "corrupt"),
    "wrong_stage_checkpoint": (["--l2i", SHIPPED["a2l"]], "is a 'a2l' checkpoint"),
    "missing_checkpoint": (lambda f: (SPEECH, FACE, ["--a2l", f["dir"] + "/none.pt"]), "not found"),
    "nan_weights": (lambda f: (SPEECH, FACE, ["--vae", f["nan_ckpt"]]), "damaged weights"),
    "bit_flipped_weights": (lambda f: (SPEECH, FACE, ["--l2i", f["flipped_ckpt"]]), "damaged weights"),
    "future_version": (lambda f: (SPEECH, FACE, ["--a2l", f["v99"]]), "checkpoint version 99"),
    "another_vae": (lambda f: (SPEECH, FACE, ["--vae", f["other_vae"]]), "latents of another VAE"),
}
if torch.cuda.is_available():
    del SAMPLE_CASES["cuda_without_gpu"]


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_refuses_bad_input_in_one_line(files, tmp_path, case):
    spec, match = SAMPLE_CASES[case]
    audio, face, extra = spec(files) if callable(spec) else (SPEECH, FACE, spec)
    out = str(tmp_path / "out.mp4")
    open(out, "wb").write(BEFORE)
    assert_one_line(run("sample.py", audio, face, "--out", out, "--steps", "2", *extra), match)
    assert_nothing_left(tmp_path, out)


@pytest.mark.parametrize("case,out,match", [("not_mp4", "out.avi", "must end in .mp4"),
                                            ("unwritable_folder", "/proc/forbidden/out.mp4", "cannot write"),
                                            ("out_is_a_folder", "folder.mp4", "is a folder")])
def test_sample_refuses_a_bad_output_path(tmp_path, case, out, match):
    if case == "out_is_a_folder":
        os.mkdir(tmp_path / out)
    out = out if out.startswith("/") else str(tmp_path / out)
    assert_one_line(run("sample.py", SPEECH, FACE, "--out", out), match)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # bytes: the temporary mp4 outgrows it


def test_a_file_size_limit_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "out.mp4")
    open(out, "wb").write(BEFORE)
    proc = run("sample.py", SPEECH, FACE, "--out", out, "--steps", "1", preexec_fn=_limit_file_size)
    assert_one_line(proc, "cannot write")
    assert "MB free" in proc.stderr
    assert_nothing_left(tmp_path, out)


def test_sigterm_while_rendering_exits_130_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "out.mp4")
    open(out, "wb").write(BEFORE)
    proc = subprocess.Popen([sys.executable, "sample.py", SPEECH, FACE, "--out", out, "--steps", "25"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not [f for f in os.listdir(tmp_path) if f.endswith(".mp4") and f != "out.mp4"]:
        time.sleep(0.2)  # wait until the temporary mp4 exists: rendering has begun
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], err[-2000:]
    assert_nothing_left(tmp_path, out)


TRAIN_CASES = {
    "no_stage": ([], "--stage is required"),
    "unknown_stage": (["--stage", "gan"], "invalid choice"),
    "unknown_preset": (["--stage", "vae", "--preset", "huge"], "unknown VAEConfig preset"),
    "empty_data_folder": (["--stage", "vae", "--data", "{dir}"], "no clips"),
    "empty_eval_folder": (["--stage", "a2l", "--eval-data", "{dir}", "--data", "{dir}"], "no clips"),
    "lr_nan": (["--stage", "vae", "--lr", "nan"], "not a finite number"),
    "steps_not_a_number": (["--stage", "vae", "--steps", "many"], "invalid int value"),
    "bool_not_a_bool": (["--stage", "vae", "--adversarial", "maybe"], "is not a boolean"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_bad_input_in_one_line(tmp_path, case):
    args, match = TRAIN_CASES[case]
    args = [a.format(dir=tmp_path) for a in args]
    assert_one_line(run("train.py", *args, "--out", str(tmp_path / "run")), match)
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


EVALUATE_CASES = {
    "unknown_part": (["gan"], "invalid choice"),
    "missing_checkpoint": (["a2l", "--ckpt", "{dir}/none.pt"], "not found"),
    "steps_zero": (["sample", "--steps", "0"], "out of range"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_refuses_bad_input_in_one_line(tmp_path, case):
    args, match = EVALUATE_CASES[case]
    assert_one_line(run("evaluate.py", *[a.format(dir=tmp_path) for a in args]), match)


# ---------------------------------------------------------------- inputs that must work


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    """The first 1.2 s of the example sentence: renders in a few seconds."""
    speech, rate = sf.read(SPEECH, dtype="int16")
    return wav(tmp_path_factory.mktemp("speech") / "speech.wav", speech[: int(1.2 * rate)], rate)


def _landmarks_of(tmp_path, audio, name):
    out, lm = str(tmp_path / f"{name}.mp4"), str(tmp_path / f"{name}.npy")
    proc = run("sample.py", audio, FACE, "--out", out, "--steps", "1", "--save-landmarks", lm)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
    return np.load(lm), len(clips.read_frames(out))


def test_m4a_and_a_videos_sound_track_render_like_the_same_sound_as_wav(tmp_path, short_speech):
    ffmpeg = clips.ffmpeg_exe()
    m4a, video = str(tmp_path / "memo.m4a"), str(tmp_path / "talk.mp4")
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", short_speech, "-c:a", "aac", "-ar", "44100", "-ac", "2",
                    m4a], check=True)
    clips.write_mp4(video, np.full((30, 64, 64, 3), 90, np.uint8), sf.read(short_speech, dtype="int16")[0], 16000)
    for name, source in (("m4a", m4a), ("video", video)):
        same = str(tmp_path / f"{name}.wav")  # the very samples ffmpeg decodes, as a float wav
        subprocess.run([ffmpeg, "-loglevel", "error", "-i", source, "-vn", "-c:a", "pcm_f32le", same], check=True)
        got, frames = _landmarks_of(tmp_path, source, name)
        want, want_frames = _landmarks_of(tmp_path, same, name + "_wav")
        assert frames == want_frames == len(got) and np.abs(got - want).max() < 1e-3


def test_audio_of_two_frames_renders_two_frames(tmp_path):
    speech, _ = sf.read(SPEECH, dtype="float32")
    short = wav(tmp_path / "short.wav", speech[:800])  # 50 ms = 1.25 video frames
    landmarks, frames = _landmarks_of(tmp_path, short, "short")
    assert frames == len(landmarks) == 2


def test_the_output_carries_the_users_own_sound(tmp_path, short_speech):
    speech, _ = sf.read(short_speech, dtype="float32")
    loud = wav(tmp_path / "loud48k.wav", np.stack([speech, -speech], 1).repeat(3, 0), rate=48000)
    out = str(tmp_path / "out.mp4")
    assert run("sample.py", loud, FACE, "--out", out, "--steps", "1").returncode == 0
    probe = subprocess.run([clips.ffmpeg_exe(), "-hide_banner", "-i", out], capture_output=True, text=True).stderr
    assert "48000 Hz, stereo" in probe, probe


def test_driving_video_frames_without_a_face_keep_their_pixels(tmp_path, short_speech):
    import cv2
    face = cv2.cvtColor(cv2.imread(FACE), cv2.COLOR_BGR2RGB)
    frames = np.repeat(face[None], 30, axis=0)
    frames[10:20] = 127  # ten frames without a face: longer than the tracker's gap filling
    video, out = str(tmp_path / "drive.mp4"), str(tmp_path / "out.mp4")
    clips.write_mp4(video, frames)
    proc = run("sample.py", short_speech, video, "--out", out, "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    source, rendered = clips.read_frames(video).astype(int), clips.read_frames(out).astype(int)
    assert len(rendered) == 30
    assert np.abs(rendered[10:20] - source[10:20]).max() <= 8  # untouched, up to re-encoding (a mouth: > 40)
    assert np.abs(rendered[:10] - source[:10]).max() > 40  # the mouth was rendered where there is a face
