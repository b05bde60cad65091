"""Training on a folder made by prepare.py from ordinary videos: every stage, the held-out split, and a run
killed with SIGKILL and resumed ending with the weights of an uninterrupted one.

The videos are synthetic talking heads written as plain mp4 files (their npz ground truth is not given to
prepare.py), so this is the path a user's own footage takes.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import clips
import synth_clips
import train
from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 64  # the prepared crops; the tiny test models train at 32 px from them


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three 2-second videos of three identities, prepared with clip_0002 held out."""
    root = tmp_path_factory.mktemp("prepared")
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        clip = synth_clips.make_clip(0, i, "train", size=128, seconds=2.0)
        clips.write_mp4(str(videos / f"clip_{i:04d}.mp4"), clip["frames"], clip["audio"], clip["sample_rate"])
    out = root / "out"
    proc = subprocess.run([sys.executable, "prepare.py", str(videos), str(out), "--size", str(CROP),
                           "--min-seconds", "1", "--test-regex", "clip_0002", "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out)


def common_args(prepared, tmp_path, stage, *extra):
    return ["--stage", stage, "--data", prepared, "--cache", str(tmp_path / "cache"), "--log-every", "1",
            "--eval-every", "2", "--save-every", "2", "--batch-size", "2", "--device", "cpu", *extra]


VAE = ("--resolution", "32", "--base-channels", "8", "--norm-groups", "4", "--extra-identities", "0",
       "--natural-mix", "0", "--face-iod", "0.4")
A2L = ("--width", "32", "--pairs", "1", "--heads", "2", "--window", "8", "--overlap", "2", "--sample-steps", "2")


def test_the_split_is_read_from_the_manifest(prepared):
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    train_paths, test_paths = (clips.clip_paths(prepared, split) for split in ("train", "test"))
    assert len(train_paths) == 2 and len(test_paths) == 1 and "clip_0002" in test_paths[0]
    assert len(clips.clip_paths(prepared)) == len(manifest["clips"]) == 3
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
    for path, stage, metric in ((vae, "vae", "psnr_mouth"), (a2l, "a2l", "lip_lmd_pct_iod"), (l2i, "l2i", "psnr_mouth")):
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
