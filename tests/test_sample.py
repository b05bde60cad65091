"""sample.py: audio + face (photo or video) -> an H.264/AAC talking-head mp4 through the whole cascade, and
one-line errors that leave nothing behind."""
import math
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import soundfile as sf

import clips
import landmarks
import synth_clips
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [os.path.join(ROOT, "checkpoints", f"{s}_tiny.pt") for s in ("a2l", "vae", "l2i")]


def _train(root, *flags):
    return train.train(train.parse_args([*flags, "--data", str(root / "train"), "--eval-data", str(root / "test"),
                                         "--cache", str(root / "cache"), "--eval-every", "1", "--save-every", "1"]))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three 1-step checkpoints (A2L, a 32 px VAE and L2I on it), a short wav at 44.1 kHz stereo, a face png
    and a 1 s face video."""
    root = tmp_path_factory.mktemp("sample")
    for split in ("train", "test"):
        (root / split).mkdir()
        clips.save_clip(str(root / split / "clip_0000"), synth_clips.make_clip(0, 0, split, size=128, seconds=1.3))
    a2l = _train(root, "--stage", "a2l", "--width", "32", "--pairs", "1", "--heads", "2", "--window", "8",
                 "--overlap", "2", "--batch-size", "2", "--steps", "2", "--sample-steps", "2", "--out", str(root / "a2l"))
    vae = _train(root, "--stage", "vae", "--resolution", "32", "--base-channels", "8", "--norm-groups", "4",
                 "--extra-identities", "0", "--natural-mix", "0", "--batch-size", "2", "--steps", "1",
                 "--out", str(root / "vae"))
    l2i = _train(root, "--stage", "l2i", "--vae", vae, "--image-size", "32", "--latent-size", "8",
                 "--batch-size", "2", "--sample-steps", "2", "--steps", "1", "--out", str(root / "l2i"))
    vae16 = _train(root, "--stage", "vae", "--resolution", "16", "--base-channels", "8", "--norm-groups", "4",
                   "--extra-identities", "0", "--natural-mix", "0", "--batch-size", "2", "--steps", "1",
                   "--out", str(root / "vae16"))
    clip = clips.load_clip(str(root / "test" / "clip_0000.npz"))
    audio = clip["audio"].astype(np.float32) / 32768
    from scipy.signal import resample_poly
    sf.write(root / "speech.wav", resample_poly(np.stack([audio, audio], 1), 441, 160, axis=0), 44100)
    frames = clips.read_frames(str(root / "test" / "clip_0000.mp4"))
    cv2.imwrite(str(root / "face.png"), frames[0][..., ::-1])
    clips.write_mp4(str(root / "face.mp4"), frames[:25])
    return {"root": root, "a2l": a2l, "vae": vae, "l2i": l2i, "vae16": vae16, "wav": str(root / "speech.wav"),
            "face": str(root / "face.png"), "video": str(root / "face.mp4"), "seconds": len(audio) / 16000,
            "truth": clip["landmarks"]}


def run(inputs, audio, face, out, *extra, ckpts=None):
    ckpts = {**{k: inputs[k] for k in ("a2l", "vae", "l2i")}, **(ckpts or {})}
    flags = [x for k, v in ckpts.items() for x in (f"--{k}", v)]
    return subprocess.run([sys.executable, "sample.py", audio, face, "--out", out, "--steps", "2", *flags, *extra],
                          cwd=ROOT, capture_output=True, text=True)


def probe(path):
    """(video codec, audio codec, duration s) from ffmpeg's banner."""
    text = subprocess.run([clips.ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text).groups()
    video, audio = re.search(r"Video: (\w+)", text), re.search(r"Audio: (\w+)", text)
    return video and video.group(1), audio and audio.group(1), int(h) * 3600 + int(m) * 60 + float(s)


def test_photo_gives_h264_aac_mp4_with_every_frame_and_the_same_video_for_the_same_seed(inputs, tmp_path):
    out, lm = str(tmp_path / "out.mp4"), str(tmp_path / "lm.npy")
    proc = run(inputs, inputs["wav"], inputs["face"], out, "--save-landmarks", lm)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vcodec, acodec, duration = probe(out)
    expected = math.ceil(inputs["seconds"] * 25)
    assert (vcodec, acodec) == ("h264", "aac") and abs(duration - inputs["seconds"]) <= 1 / 25 + 0.03
    frames = clips.read_frames(out)
    assert frames.shape == (expected, 128, 128, 3)
    P = np.load(lm)
    assert P.shape == (expected, 478, 3) and np.isfinite(P).all()
    # same seed, another batch size: the same landmarks and the same frames (one noise shared by all frames)
    again, lm2 = str(tmp_path / "again.mp4"), str(tmp_path / "lm2.npy")
    assert run(inputs, inputs["wav"], inputs["face"], again, "--batch", "3", "--save-landmarks", lm2).returncode == 0
    np.testing.assert_array_equal(np.load(lm2), P)
    # the same frames up to float rounding: on one thread oneDNN may pick other kernels for another batch size and
    # H.264 spreads the last bit (mean |difference| 0.07 here; another seed gives 5.4)
    assert np.abs(clips.read_frames(again).astype(int) - frames).mean() < 0.5
    # outside the feathered mouth region every pixel is the photo's (up to H.264)
    face = cv2.imread(inputs["face"])[..., ::-1].astype(int)
    assert np.abs(frames[:, :30].astype(int) - face[None, :30]).mean() < 3


@pytest.mark.parametrize("kind", ["gray_jpg", "rgba_png"])
def test_grayscale_or_rgba_photos_of_any_aspect_ratio_work(inputs, tmp_path, kind):
    face = cv2.imread(inputs["face"])
    wide = cv2.copyMakeBorder(face, 0, 1, 40, 37, cv2.BORDER_REPLICATE)  # 129 x 205: odd sizes, not square
    if kind == "gray_jpg":
        path = str(tmp_path / "face.jpg")
        cv2.imwrite(path, cv2.cvtColor(wide, cv2.COLOR_BGR2GRAY))
    else:
        path = str(tmp_path / "face.png")
        cv2.imwrite(path, cv2.cvtColor(wide, cv2.COLOR_BGR2BGRA))
    out = str(tmp_path / "out.mp4")
    proc = run(inputs, inputs["wav"], path, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert clips.read_frames(out).shape[1:] == (128, 204, 3)  # even sizes for yuv420p (rounded)


def test_driving_video_is_looped_to_the_audio_and_debug_shows_three_panels(inputs, tmp_path):
    out, strip = str(tmp_path / "dub.mp4"), str(tmp_path / "strip.png")
    proc = run(inputs, inputs["wav"], inputs["video"], out, "--debug", "--strip", strip)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cv2.imread(strip).shape == (2 * 128, 4 * 3 * 128, 3)
    frames = clips.read_frames(out)
    assert frames.shape == (math.ceil(inputs["seconds"] * 25), 128, 3 * 128, 3)  # 25 video frames, more out
    video = clips.read_frames(inputs["video"])
    # the input panel follows the video back and forth: frame 26 shows video frame 22
    assert np.abs(frames[26, :, :128].astype(int) - video[22]).mean() < 3


def test_given_landmarks_drive_l2i_and_must_cover_the_audio(inputs, tmp_path):
    lm = str(tmp_path / "truth.npy")
    np.save(lm, inputs["truth"].astype(np.float32))
    out = str(tmp_path / "gt.mp4")
    assert run(inputs, inputs["wav"], inputs["face"], out, "--landmarks", lm).returncode == 0
    assert len(clips.read_frames(out)) == math.ceil(inputs["seconds"] * 25)
    np.save(lm, inputs["truth"][:10].astype(np.float32))
    proc = run(inputs, inputs["wav"], inputs["face"], str(tmp_path / "short.mp4"), "--landmarks", lm)
    needs = math.ceil(inputs["seconds"] * 25)
    assert proc.returncode == 2 and f"have 10 frames but the audio needs {needs}" in proc.stderr
    assert not os.path.exists(tmp_path / "short.mp4")


BAD = {
    "missing_audio": "does not exist", "empty_audio": "cannot read audio", "nan_audio": "NaN or infinite",
    "corrupt_audio": "cannot read audio", "missing_image": "does not exist", "unreadable_image": "cannot read",
    "no_face": "no face found", "face_too_small": "too small", "corrupt_checkpoint": "corrupt",
    "truncated_checkpoint": "corrupt", "wrong_stage_checkpoint": "is a 'a2l' checkpoint",
    "mismatched_vae": "does not match", "unwritable_out": "cannot write", "bad_batch": "argument --batch",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(inputs, tmp_path, case):
    wav, face, out, extra, ckpts = inputs["wav"], inputs["face"], str(tmp_path / "out.mp4"), [], {}
    if case == "missing_audio":
        wav = str(tmp_path / "nope.wav")
    elif case == "empty_audio":
        wav = str(tmp_path / "empty.wav")
        open(wav, "wb").close()
    elif case == "nan_audio":
        wav = str(tmp_path / "nan.wav")
        sf.write(wav, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    elif case == "corrupt_audio":
        wav = str(tmp_path / "noise.wav")
        open(wav, "wb").write(os.urandom(3000))
    elif case == "missing_image":
        face = str(tmp_path / "nope.png")
    elif case == "unreadable_image":
        face = str(tmp_path / "broken.png")
        open(face, "wb").write(b"\x89PNG not really")
    elif case == "no_face":
        face = str(tmp_path / "blank.png")
        cv2.imwrite(face, np.full((200, 200, 3), 127, np.uint8))
    elif case == "face_too_small":  # found at full size, but ~9 px between the eyes at --max-size 100
        face = str(tmp_path / "small.png")
        canvas = np.full((600, 600, 3), 127, np.uint8)
        canvas[200:400, 200:400] = cv2.resize(cv2.imread(os.path.join(ROOT, "examples", "face.png")), (200, 200),
                                              interpolation=cv2.INTER_AREA)
        cv2.imwrite(face, canvas)
        extra = ["--max-size", "100"]
    elif case == "corrupt_checkpoint":
        ckpts["l2i"] = str(tmp_path / "bad.pt")
        open(ckpts["l2i"], "wb").write(b"not a checkpoint")
    elif case == "truncated_checkpoint":
        ckpts["vae"] = str(tmp_path / "half.pt")
        blob = open(inputs["vae"], "rb").read()
        open(ckpts["vae"], "wb").write(blob[: len(blob) // 2])
    elif case == "wrong_stage_checkpoint":
        ckpts["l2i"] = inputs["a2l"]
    elif case == "mismatched_vae":
        ckpts["vae"] = inputs["vae16"]
    elif case == "unwritable_out":
        out = "/proc/forbidden/out.mp4"
    elif case == "bad_batch":
        extra = ["--batch", "0"]
    proc = run(inputs, wav, face, out, *extra, ckpts=ckpts)
    assert proc.returncode == 2, (case, proc.stderr[-1500:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert BAD[case] in errors[0], errors[0]
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".out.mp4")]


@pytest.mark.skipif(not all(map(os.path.exists, SHIPPED)), reason="shipped checkpoints not present")
def test_adapt_fine_tunes_l2i_on_the_face_first_and_renders_only_the_mouth_region_differently(inputs, tmp_path):
    plain, tuned = str(tmp_path / "plain.mp4"), str(tmp_path / "tuned.mp4")
    assert run(inputs, inputs["wav"], inputs["face"], plain).returncode == 0
    proc = run(inputs, inputs["wav"], inputs["face"], tuned, "--adapt", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = clips.read_frames(plain).astype(int), clips.read_frames(tuned).astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.05  # another L2I rendered the mouth
    assert np.abs(a[:, :30] - b[:, :30]).mean() < 1  # above the mouth both are the photo
    bad = run(inputs, inputs["wav"], inputs["face"], str(tmp_path / "bad.mp4"), "--adapt", "-1")
    assert bad.returncode == 2 and "--adapt" in bad.stderr and not os.path.exists(tmp_path / "bad.mp4")


def test_silent_audio_is_valid_and_gives_a_closed_mouth(tmp_path):
    """With the shipped checkpoints: 1.5 s of digital silence -> a video whose predicted mouth stays shut."""
    wav, out, lm = str(tmp_path / "silence.wav"), str(tmp_path / "out.mp4"), str(tmp_path / "lm.npy")
    sf.write(wav, np.zeros(24000, np.int16), 16000)
    proc = subprocess.run([sys.executable, "sample.py", wav, os.path.join(ROOT, "examples", "face.png"), "--out",
                           out, "--save-landmarks", lm], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    P = np.load(lm)
    opening = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    assert len(clips.read_frames(out)) == 38 and opening.max() < 0.05, opening.max()


def test_sample_detail_default_is_the_cascades():
    import dreamhead
    import sample
    args = sample.parse_args([os.path.join(ROOT, "examples", "speech.wav"), os.path.join(ROOT, "examples", "face.png")])
    assert args.detail == dreamhead.DETAIL


def test_detail_transfer_brings_the_photos_detail_back_where_the_driving_landmarks_move_it():
    from dreamhead import transfer_detail
    from synth_face import identity_texture, mesh_triangles
    texture, mesh, _ = identity_texture(0, 256)                           # a face photo with its exact landmarks
    photo = np.clip(texture, 0, 255).astype(np.uint8)
    region = np.s_[120:220, 60:200]                                       # around the mouth, offset (60, 120)
    scale = 4.0                                                           # source px per generated px
    soft = cv2.GaussianBlur(photo, (0, 0), scale)[region]                 # what an upscaled 64 px render keeps
    tri = mesh_triangles(mesh)
    still = transfer_detail(soft, photo[region], (60, 120), scale, (mesh, mesh), tri, size=1.0)  # blur of 4 px
    assert np.abs(still.astype(int) - photo[region]).mean() < 0.5 * np.abs(soft.astype(int) - photo[region]).mean()
    moved = mesh.copy()
    moved[list(landmarks.LOWER_INNER) + list(landmarks.LOWER_OUTER), 1] += 12  # the lower lip drops 12 px
    out = transfer_detail(soft, photo[region], (60, 120), scale, (mesh, moved), tri, size=1.0).astype(int)
    line = np.round(moved[list(landmarks.LOWER_OUTER), :2] - [60, 120]).astype(int)  # the lip's new edge, region px

    def detail_on_line(image):  # the detail put in within 4 px of the lower lip's new edge
        change = np.abs(image.astype(int) - soft).sum(-1)  # (h, w)
        return np.mean([change[line[:, 1] + dy, line[:, 0]] for dy in range(-4, 5)])
    assert detail_on_line(out) > 1.5 * detail_on_line(still)         # the lip's edge moved there, not grain
    gap = np.round(0.5 * (moved[13, :2] + moved[14, :2]) - [60, 120]).astype(int)  # inside the opened mouth
    assert np.abs(out[gap[1], gap[0]] - [40, 12, 16]).max() < 8  # the drawn cavity lies over the render whole


def test_paste_back_teeth_taper_to_the_mouth_corners_and_the_synthetic_ones_do_not():
    from synth_face import identity_texture, mouth_layer
    _, mesh, _ = identity_texture(0, 256)
    mesh = mesh.copy()
    mesh[list(landmarks.LOWER_INNER) + list(landmarks.LOWER_OUTER), 1] += 12  # an open mouth
    iod = float(landmarks.inter_ocular(mesh))
    normal = (mesh[14, :2] - mesh[13, :2]) / np.linalg.norm(mesh[14, :2] - mesh[13, :2])
    for point, corner in ((13, False), (191, True)):  # mid upper lip; the upper lip's point next to a corner
        x, y = np.round(mesh[point, :2] + 1.5 * normal).astype(int)  # 1.5 px inside the mouth, under the upper lip
        bright = []
        for taper in (False, True):
            (x0, y0, _, _), colour, alpha = mouth_layer(mesh, iod, (256, 256), taper)
            bright.append(colour[y - y0, x - x0].mean())
        assert bright[0] > 150 and (bright[1] < 100 if corner else bright[1] > 150), (point, bright)


def test_paste_with_detail_finds_its_own_triangles_when_none_are_given():
    from dreamhead import paste
    from synth_face import identity_texture, mesh_triangles
    texture, mesh, _ = identity_texture(0, 256)
    photo = np.clip(texture, 0, 255).astype(np.uint8)
    moved = mesh.copy()
    moved[list(landmarks.LOWER_INNER) + list(landmarks.LOWER_OUTER), 1] += 8  # the lower lip drops 8 px
    generated = cv2.resize(photo[64:192, 64:192], (64, 64), interpolation=cv2.INTER_AREA)  # a 64 px "render"
    args = (photo, (64, 64, 128), generated, (16, 30, 48, 60), 0.5, (mesh, moved))
    given = paste(*args, triangles=mesh_triangles(mesh))
    assert np.array_equal(paste(*args), given) and not np.array_equal(given, photo)
