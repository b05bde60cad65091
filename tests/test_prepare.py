"""prepare.py on a folder of ordinary videos made from the synthetic talking heads (ground truth known).

The synthetic clips (25 fps, 128 px, 16 kHz mono) are re-encoded the way real videos come: 30 fps, 48 kHz stereo
AAC, 176 x 128 with black bars, in mp4 / mov / mkv; one video cuts from one identity to another, one has no sound
track, one is random bytes and one has no face. prepare.py must resample them back to the generator's 25 fps
frames one for one and find the generator's landmarks in its face crops. Then every stage trains on the prepared
folder, and a run on it killed with SIGKILL at a random step and resumed ends with the uninterrupted run's weights.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

import a2l
import clips
import landmarks
import prepare
import train
from common import load_checkpoint
from synth_clips import make_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 24  # black bars left and right: 128 x 128 -> 176 x 128
FRAMES = 100  # 4 s a video
CUT = 60  # frames of each identity in the cut video
NPZ_KEYS = {"landmarks", "fps", "audio_path", "sample_rate", "frame_size", "identity", "video", "has_audio",
            "canonical", "transform_R", "transform_s", "transform_t", "found", "source", "start_frame", "crops",
            "crop_boxes", "crop_landmarks", "crop_size", "crop_face_iod"}


def encode(path, frames, audio=None):
    """25 fps RGB frames (T, 128, 128, 3) (+ 16 kHz mono int16 sound) -> a 30 fps, 48 kHz stereo video with bars."""
    cmd = [clips.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "128x128",
           "-r", "25", "-i", "-"]
    if audio is not None:
        wav = str(path) + ".wav"
        soundfile.write(wav, audio, 16000, "PCM_16")
        cmd += ["-i", wav, "-c:a", "aac", "-ar", "48000", "-ac", "2"]
    cmd += ["-vf", f"fps=30,pad={128 + 2 * PAD}:128:{PAD}:0:black", "-r", "30", "-c:v", "libx264", "-crf", "18",
            "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True)
    if audio is not None:
        os.remove(wav)


def prepare_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def truth_of(clip, a, b):
    """Frames, landmarks (in the padded video's pixels) and int16 sound of frames a..b of a synthetic clip."""
    P = clip["landmarks"][a:b] + np.array([PAD, 0, 0], np.float32)
    return clip["frames"][a:b], P, clip["audio"][a * 640:b * 640]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A mixed folder, prepared once (2 workers) and then again (nothing to do)."""
    root = tmp_path_factory.mktemp("prepare")
    videos, out = root / "videos", root / "out"
    (videos / "sub").mkdir(parents=True)
    synth = [make_clip(0, i, "train", 128) for i in range(3)]  # identities 13, 8, 15 (two base photos)
    truth = {"a.mp4": truth_of(synth[0], 0, FRAMES), "sub/b.mov": truth_of(synth[1], 0, FRAMES),
             "silent.mkv": truth_of(synth[2], 0, FRAMES)}
    first, second = truth_of(synth[2], 0, CUT), truth_of(synth[1], 0, CUT)
    truth["cut.mp4"] = tuple(np.concatenate([x, y]) for x, y in zip(first, second))
    for name, (frames, _, audio) in truth.items():
        encode(videos / name, frames, None if name == "silent.mkv" else audio)
    (videos / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    subprocess.run([clips.ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "color=c=gray:s=176x128:r=30:d=3",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", str(videos / "noface.mp4")], check=True)
    (root / "test.txt").write_text("sub/b.mov\n")
    flags = ["--test-list", root / "test.txt"]
    run1 = prepare_cli(videos, out, "--workers", "2", *flags)
    times = {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.name != "manifest.json"}
    run2 = prepare_cli(videos, out, "--workers", "1", *flags)
    return {"out": out, "videos": videos, "truth": truth, "flags": flags, "runs": (run1, run2), "times": times,
            "manifest": json.loads((out / "manifest.json").read_text())}


def clips_of(manifest, source):
    return [c for c in manifest["clips"] if c["source"] == source]


def test_every_good_video_is_prepared_and_the_bad_ones_are_skipped(prepared):
    run1 = prepared["runs"][0]
    assert run1.returncode == 0, run1.stderr
    manifest = prepared["manifest"]
    assert sorted({c["source"] for c in manifest["clips"]}) == sorted(prepared["truth"])
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["broken.mp4", "noface.mp4"] and all(skipped.values())
    assert "no face" in skipped["noface.mp4"]
    assert "skipped broken.mp4" in run1.stdout and "skipped noface.mp4" in run1.stdout
    summary = manifest["summary"]
    assert summary["videos"] == 6 and summary["clips"] == 5 and summary["skipped"] == 2
    assert summary["frames"] == sum(c["frames"] for c in manifest["clips"]) == 3 * FRAMES + 2 * CUT


def test_the_cut_splits_the_video_into_two_people(prepared):
    cut = clips_of(prepared["manifest"], "cut.mp4")
    assert [c["identity"] for c in cut] == ["cut", "cut~p2"]
    assert [c["name"] for c in cut] == ["cut_000", "cut~p2_000"]
    assert cut[0]["start_frame"] == 0 and abs(cut[1]["start_frame"] - CUT) <= 1
    assert cut[0]["frames"] + cut[1]["frames"] == 2 * CUT


def test_frames_line_up_and_landmarks_match_the_truth_in_the_crops(prepared):
    out = prepared["out"]
    for entry in prepared["manifest"]["clips"]:
        frames, P_true, _ = prepared["truth"][entry["source"]]
        a, T = entry["start_frame"], entry["frames"]
        z = np.load(out / entry["npz"])
        # the 30 fps video resampled to 25 fps gives back the generator's frames one for one: compared in the lower
        # face (where they move; the two lossy encodings leave ~5 grey levels of error there), the truth's frame
        # t matches the clip's frame t clearly better than its neighbours do
        x0, y0, x1, y1 = landmarks.mouth_box(P_true[a:a + T].mean(axis=0), (128, 128 + 2 * PAD), expand=0.5)
        video = clips.read_frames(str(out / "clips" / str(z["video"])))[:, y0:y1, x0:x1].astype(float)
        assert len(video) == T
        true = frames[:, y0:y1, x0 - PAD:x1 - PAD]
        error = {k: np.abs(video[2:-2] - true[a + 2 + k:a + T - 2 + k]).mean() for k in (-2, -1, 0, 1, 2)}
        assert error[0] < 0.9 * min(error[k] for k in (-2, -1, 1, 2)), (entry["name"], error)
        # landmarks through the same padding and crop transform, within 5 % of the inter-ocular distance (x, y)
        true_crop = landmarks.to_crop(P_true[a:a + T], z["crop_boxes"], int(z["crop_size"]))
        miss = np.linalg.norm(z["crop_landmarks"][..., :2] - true_crop[..., :2], axis=-1).mean(axis=-1)
        assert (miss / landmarks.inter_ocular(true_crop)).mean() < 0.05, entry["name"]


def test_the_clip_files_follow_the_clip_format(prepared):
    out, manifest = prepared["out"], prepared["manifest"]
    entry = clips_of(manifest, "a.mp4")[0]
    z = np.load(out / entry["npz"])
    assert set(z.files) == NPZ_KEYS
    T = entry["frames"]
    assert z["landmarks"].shape == z["canonical"].shape == z["crop_landmarks"].shape == (T, 478, 3)
    assert z["landmarks"].dtype == z["canonical"].dtype == z["crop_landmarks"].dtype == np.float32
    assert z["transform_R"].shape == (T, 3, 3) and z["transform_s"].shape == (T,) and z["transform_t"].shape == (T, 3)
    assert z["found"].shape == (T,) and z["found"].dtype == bool and z["crop_boxes"].shape == (T, 3)
    assert tuple(z["frame_size"]) == (128, 128 + 2 * PAD) and int(z["fps"]) == 25 and int(z["crop_size"]) == 128
    assert str(z["source"]) == "a.mp4" and int(z["start_frame"]) == 0 and bool(z["has_audio"])
    crops = np.load(out / "clips" / str(z["crops"]))
    assert crops.shape == (T, 128, 128, 3) and crops.dtype == np.uint8
    info = soundfile.info(str(out / "clips" / str(z["audio_path"])))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", T * 640)
    clip = clips.load_clip(str(out / entry["npz"]))
    assert clip["sample_rate"] == 16000 and clip["identity"] == "a" and clip["audio"].ndim == 1
    assert clips_of(manifest, "sub/b.mov")[0]["identity"] == "sub_b"


def test_a_video_without_sound_is_kept_without_audio(prepared):
    entry = clips_of(prepared["manifest"], "silent.mkv")[0]
    z = np.load(prepared["out"] / entry["npz"])
    assert not entry["has_audio"] and not bool(z["has_audio"])
    assert "audio_path" not in z.files and "audio" not in z.files
    assert not (prepared["out"] / "clips" / (entry["name"] + ".wav")).exists()


def test_the_split_is_identity_disjoint(prepared):
    manifest = prepared["manifest"]
    split = {c["identity"]: c["split"] for c in manifest["clips"]}
    assert all(split[c["identity"]] == c["split"] for c in manifest["clips"])
    assert [k for k, v in split.items() if v == "test"] == ["sub_b"]
    by_hash = [{"identity": f"id{k}", "source": f"id{k}.mp4"} for k in range(200)]
    test = prepare.test_identities(by_hash, {"test_fraction": 0.1})
    assert 5 <= len(test) <= 40 and test == prepare.test_identities(by_hash, {"test_fraction": 0.1})


def test_a_second_run_does_nothing_and_a_lost_marker_redoes_its_video(prepared):
    out, run2 = prepared["out"], prepared["runs"][1]
    assert run2.returncode == 0, run2.stderr
    assert "0 to prepare, 6 done" in run2.stdout
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.name != "manifest.json"} == prepared["times"]
    marker = prepare.marker_path(str(out), "a.mp4")
    os.remove(marker)
    stale = out / "clips" / ".a_000.npz.leftover.tmp"
    stale.write_bytes(b"half")
    run3 = prepare_cli(prepared["videos"], out, "--workers", "1", *prepared["flags"])
    assert run3.returncode == 0 and "1 to prepare, 5 done" in run3.stdout, run3.stdout + run3.stderr
    assert os.path.exists(marker) and not stale.exists()
    assert json.loads((out / "manifest.json").read_text())["clips"] == prepared["manifest"]["clips"]


def test_bad_input_is_one_line_and_exit_code_2(prepared, tmp_path):
    missing = prepare_cli(tmp_path / "nowhere", tmp_path / "out")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nowhere" in missing.stderr
    other = prepare_cli(prepared["videos"], prepared["out"], "--size", "64", *prepared["flags"])
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "other settings" in other.stderr
    bad = prepare_cli(prepared["videos"], tmp_path / "out", "--shard", "3/2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_a_camera_cut_keeps_the_person_and_a_long_loss_of_the_face_splits(prepared):
    _, P, _ = prepared["truth"]["a.mp4"]  # (100, 478, 3), a face ~34 px between the eyes
    P = P.copy()
    P[50:, :, 0] += 60  # the camera cuts to the same person elsewhere in the frame
    detected = np.ones(len(P), bool)
    detected[75:82] = False  # 7 frames without the face: more than --max-gap 5
    colour = np.full((len(P), 3), 0.5)
    track = {"points": P, "detected": detected, "hist": np.zeros((len(P), 48)), "colour": colour}
    filled, colour, pieces = prepare.segments(track, max_gap=5)
    assert pieces == [(0, 50), (50, 75), (82, 100)]
    assert prepare.persons(filled, colour, pieces) == [1, 1, 1]
    colour[82:] += 0.3  # another face colour: another person
    assert prepare.persons(filled, colour, pieces) == [1, 1, 2]


# ---- training on the prepared folder --------------------------------------------------------------------

def common_args(prepared, tmp_path, stage, *extra):
    return ["--stage", stage, "--data", str(prepared["out"]), "--cache", str(tmp_path / "cache"), "--log-every", "1",
            "--eval-every", "2", "--save-every", "2", "--batch-size", "2", "--device", "cpu", *extra]


VAE = ("--resolution", "32", "--base-channels", "8", "--norm-groups", "4", "--extra-identities", "0",
       "--natural-mix", "0", "--face-iod", "0.4")
A2L = ("--width", "32", "--pairs", "1", "--heads", "2", "--window", "8", "--overlap", "2", "--sample-steps", "2")


def test_the_stages_read_the_manifest_split_and_the_stored_crops(prepared):
    train_paths, test_paths = (clips.clip_paths(str(prepared["out"]), split) for split in ("train", "test"))
    assert len(train_paths) == 4 and len(test_paths) == 1 and test_paths[0].endswith("sub_b_000.npz")
    assert len(clips.clip_paths(str(prepared["out"]))) == len(prepared["manifest"]["clips"]) == 5
    silent = [p for p in train_paths if clips.load_clip(p)["has_audio"] is False]
    assert len(silent) == 1 and a2l.A2LWindows(train_paths, 8).clips.__len__() == 3  # A2L skips the silent clip
    clip = clips.load_clip(train_paths[0])
    crops, P = clips.decoded_clip(clip, 32, 0.4)  # the stored crops, resized: no video decoded
    assert crops.shape == (len(clip["landmarks"]), 32, 32, 3) and P.shape == (len(crops), 478, 3)


def test_every_stage_trains_on_a_prepared_folder(prepared, tmp_path):
    vae = train.train(train.parse_args(common_args(prepared, tmp_path, "vae", *VAE, "--steps", "2",
                                                   "--out", str(tmp_path / "vae"))))
    a2l = train.train(train.parse_args(common_args(prepared, tmp_path, "a2l", *A2L, "--steps", "2",
                                                   "--out", str(tmp_path / "a2l"))))
    l2i = train.train(train.parse_args(common_args(prepared, tmp_path, "l2i", "--vae", vae, "--image-size", "32",
                                                   "--latent-size", "8", "--face-iod", "0.4", "--sample-steps", "1",
                                                   "--steps", "2", "--out", str(tmp_path / "l2i"))))
    runs = ((vae, "vae", "psnr_mouth"), (a2l, "a2l", "lip_lmd_pct_iod"), (l2i, "l2i", "psnr_mouth"))
    for path, stage, metric in runs:
        ckpt = load_checkpoint(path, stage)
        evals = [h for h in ckpt["history"] if h["kind"] == "eval"]
        assert ckpt["step"] == 2 and evals and metric in evals[-1], stage


def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_uninterrupted_weights(prepared, tmp_path):
    """The kill lands at a random step (possibly inside a checkpoint's write); the resumed run starts from the
    last complete checkpoint and must end bit for bit where the uninterrupted run ends."""
    args = common_args(prepared, tmp_path, "a2l", *A2L, "--steps", "12", "--save-every", "1", "--eval-every", "100")
    whole = load_checkpoint(train.train(train.parse_args(args + ["--out", str(tmp_path / "whole")])), "a2l")
    run = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_after = random.Random().randint(1, 10)  # a checkpoint per step: kill once this many were saved
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if (run / "ckpt.pt").exists() and load_checkpoint(str(run / "ckpt.pt"), "a2l")["step"] >= kill_after:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.communicate()[1][-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    stopped = load_checkpoint(str(run / "ckpt.pt"), "a2l")["step"]
    assert stopped < 12, "the kill came after the end"
    resumed = load_checkpoint(train.train(train.parse_args(args + ["--out", str(run), "--resume"])), "a2l")
    assert resumed["step"] == 12
    for key in ("model", "ema"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    a, b = whole["optimizer"]["state"], resumed["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p])
    losses = lambda ckpt: [h["loss"] for h in ckpt["history"] if h["kind"] == "train"]
    assert losses(resumed) == losses(whole)
