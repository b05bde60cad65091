"""train.py: flags from the config dataclass, the one-dict checkpoint, resume, pictures, and user errors."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import clips
import synth_clips
import train
from common import CHECKPOINT_VERSION, UsageError, load_checkpoint, save_checkpoint, weights_sha1
from dreamhead import DreamHead, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VAE = ["--stage", "vae", "--resolution", "32", "--base-channels", "8", "--norm-groups", "4",
            "--extra-identities", "0", "--natural-mix", "0", "--batch-size", "2", "--log-every", "1",
            "--eval-every", "2", "--save-every", "2"]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """Two 1-second synthetic clips at 64 px: one training folder, one held-out folder."""
    root = tmp_path_factory.mktemp("clips")
    folders = []
    for split in ("train", "test"):
        folder = root / split
        folder.mkdir()
        clips.save_clip(str(folder / "clip_0000"), synth_clips.make_clip(0, 0, split, size=64, seconds=1.0))
        folders.append(str(folder))
    return folders


def run_args(clip_dirs, tmp_path, *extra):
    return TINY_VAE + ["--data", clip_dirs[0], "--eval-data", clip_dirs[1], "--cache", str(tmp_path / "cache"),
                       "--out", str(tmp_path / "run"), *extra]


def test_flags_default_to_the_preset_and_override_fields():
    from vae import VAEConfig
    args = train.parse_args(["--stage", "vae"])
    assert args.config == VAEConfig.preset("tiny")
    args = train.parse_args(["--stage", "vae", "--preset", "paper", "--channel-mult", "1,2", "--adversarial", "false"])
    assert args.config.channel_mult == (1, 2) and args.config.adversarial is False
    assert args.config.resolution == VAEConfig.preset("paper").resolution


def test_config_flag_help_is_the_field_sentence_and_training_settings_are_flags():
    helps = {a.dest: a.help for a in train.build_parser("l2i")._actions}
    assert helps["cfg_conditioning"].startswith("How the conditions meet z_t")
    assert helps["cfg_tau_max"].startswith("Largest reference offset") and helps["cfg_tau_max"].endswith("(default: 25)")
    assert helps["train_lr"].startswith("Peak learning rate") and helps["train_lr"].endswith("(default: 0.0005)")
    args = train.parse_args(["--stage", "a2l", "--lr", "0.02", "--betas", "0.8,0.9"])
    assert args.config.train.lr == 0.02 and args.config.train.betas == (0.8, 0.9)
    assert args.config.train.steps == train.A2LConfig.preset("tiny").train.steps


def test_export_keeps_ema_weights_and_drops_the_optimizer(clip_dirs, tmp_path):
    path = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1")))
    train.export(path, str(tmp_path / "small.pt"), "vae")
    small = load_checkpoint(str(tmp_path / "small.pt"), "vae")
    assert small["optimizer"] is None and small["step"] == 1
    assert all(torch.equal(small["model"][k], v) for k, v in load_checkpoint(path)["ema"].items())
    assert os.path.getsize(tmp_path / "small.pt") < 0.5 * os.path.getsize(path)
    with pytest.raises(UsageError, match="exported checkpoint"):
        args = train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "2", "--resume"))
        shutil.copy(tmp_path / "small.pt", path)
        train.train(args)


def test_vae_run_writes_checkpoint_pictures_and_resumes(clip_dirs, tmp_path):
    path = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "2", "--mouth-weight", "3")))
    ckpt = load_checkpoint(path, "vae")
    assert {"stage", "config", "model", "ema", "optimizer", "step", "extra", "history"} <= set(ckpt)
    assert ckpt["step"] == 2 and ckpt["config"]["resolution"] == 32 and ckpt["config"]["mouth_weight"] == 3
    assert ckpt["extra"]["scale_factor"] > 0
    evals = [h for h in ckpt["history"] if h["kind"] == "eval"]
    assert evals and np.isfinite(evals[-1]["psnr"])
    for name in ("loss.png", "samples_000002.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 0
    rebuilt = load_model(path, "vae")  # EMA weights by default; buffers set at save time are carried over
    assert float(rebuilt.scale_factor) == pytest.approx(ckpt["extra"]["scale_factor"])
    with pytest.raises(UsageError, match="'a2l' checkpoint is needed"):
        load_model(path, "a2l")
    first = {k: v.clone() for k, v in ckpt["model"].items()}
    train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "4", "--resume")))
    resumed = load_checkpoint(path, "vae")
    assert resumed["step"] == 4
    assert any(not torch.equal(first[k], resumed["model"][k]) for k in first)


def test_checkpoint_errors_are_usage_errors(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint({"stage": "vae", "config": {}, "model": {}}, path)
    assert oct(os.stat(path).st_mode)[-3:] == "644"
    with pytest.raises(UsageError, match="'a2l' checkpoint is needed"):
        load_checkpoint(path, "a2l")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UsageError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    save_checkpoint({"stage": "vae", "config": {}, "model": {}}, path)
    assert load_checkpoint(path)["version"] == CHECKPOINT_VERSION
    torch.save({"stage": "vae", "config": {}, "model": {}, "version": 99}, path)
    with pytest.raises(UsageError, match="checkpoint version 99"):
        load_checkpoint(path)
    torch.save({"stage": "l2i", "config": {"lr": 0.1, "steps": 400, "heads": 2}, "model": {}}, path)  # version 1
    upgraded = load_checkpoint(path)
    assert upgraded["config"] == {"heads": 2, "train": {"lr": 0.1, "steps": 400, "warmup": 20, "weight_decay": 0.0,
                                                        "ema_decay": 0.999, "betas": (0.9, 0.999), "grad_clip": 1.0}}


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--stage", "vae", "--data", str(tmp_path), "--steps", "1",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no clips") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_adversarial_vae_saves_and_resumes_its_discriminator(clip_dirs, tmp_path):
    adv = ["--adversarial", "true", "--disc-start", "1", "--disc-channels", "8", "--disc-layers", "1"]
    path = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "2", *adv)))
    disc = load_checkpoint(path, "vae")["extra"]["discriminator"]
    same = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "2", "--resume", *adv)))  # no steps
    kept = load_checkpoint(same, "vae")["extra"]["discriminator"]
    assert all(torch.equal(kept[k], disc[k]) for k in disc)  # restored, not a fresh discriminator
    resumed = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "4", "--resume", *adv)))
    after = load_checkpoint(resumed, "vae")["extra"]["discriminator"]
    assert any(not torch.equal(after[k], disc[k]) for k in disc)  # and trained on


def test_finetune_decoder_starts_from_init_and_keeps_the_latent_space(clip_dirs, tmp_path):
    base = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "2")))
    start = load_checkpoint(base, "vae")["ema"]
    ft = ["--finetune-decoder", "true", "--init", base, "--out", str(tmp_path / "ft"), "--lr", "0.01"]
    path = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "3", *ft)))
    ckpt = load_checkpoint(path, "vae")
    assert ckpt["step"] == 3
    model = ckpt["model"]
    frozen = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(model[k], start[k]) for k in frozen)
    assert any(not torch.equal(model[k], start[k]) for k in start if k.startswith("decoder."))
    assert ckpt["extra"]["scale_factor"] == pytest.approx(float(start["scale_factor"]))  # not re-measured
    with pytest.raises(UsageError, match="pass --init"):
        train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1", "--finetune-decoder", "true",
                                              "--out", str(tmp_path / "none"))))
    with pytest.raises(UsageError, match="another architecture"):
        train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1", "--init", base, "--base-channels",
                                              "4", "--out", str(tmp_path / "other"))))


def test_ddp_on_cpu_with_gloo_under_torchrun(clip_dirs, tmp_path):
    """Two processes, gloo backend: the same code path NCCL takes on GPUs, with the PatchGAN discriminator on
    (its gradients are averaged across ranks by hand; the autoencoder's by DDP)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
           *run_args(clip_dirs, tmp_path, "--steps", "3", "--adversarial", "true", "--disc-start", "1",
                     "--disc-channels", "8", "--disc-layers", "1")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("saved ") == 1  # rank 0 alone writes the checkpoint
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "vae")["step"] == 3


def test_l2i_stage_trains_on_a_frozen_vae_and_checks_it_matches(clip_dirs, tmp_path):
    vae = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1")))
    common = ["--stage", "l2i", "--data", clip_dirs[0], "--eval-data", clip_dirs[1], "--cache", str(tmp_path / "cache"),
              "--vae", vae, "--image-size", "32", "--batch-size", "2", "--sample-steps", "2", "--steps", "2",
              "--eval-every", "2", "--save-every", "2", "--log-every", "1"]
    path = train.train(train.parse_args(common + ["--latent-size", "8", "--out", str(tmp_path / "l2i")]))
    ckpt = load_checkpoint(path, "l2i")
    evals = [h for h in ckpt["history"] if h["kind"] == "eval"]
    assert np.isfinite(evals[-1]["psnr_mouth"]) and np.isfinite(evals[-1]["psnr_mouth_copy_ref"])
    assert os.path.getsize(tmp_path / "l2i" / "samples_000002.png") > 0
    vae_model = load_model(vae, "vae")
    assert ckpt["vae"] == {"sha1": weights_sha1(vae_model.state_dict()), "config": vae_model.config.to_dict()}
    other = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1", "--seed", "1",
                                                  "--out", str(tmp_path / "other_vae"))))
    with pytest.raises(UsageError, match="trained on the latents of another VAE"):
        DreamHead(None, load_model(other, "vae"), load_model(path, "l2i"))
    with pytest.raises(UsageError, match="does not match the L2I model"):
        train.train(train.parse_args(common + ["--latent-size", "16", "--out", str(tmp_path / "bad")]))
    with pytest.raises(UsageError, match="pass --face-iod 0$"):
        train.train(train.parse_args(common + ["--latent-size", "8", "--face-iod", "0.4", "--out", str(tmp_path / "x")]))


def test_face_crop_framing_trains_both_stages_and_travels_in_the_checkpoints(clip_dirs, tmp_path):
    vae = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1", "--face-iod", "0.4")))
    l2i_args = ["--stage", "l2i", "--data", clip_dirs[0], "--eval-data", clip_dirs[1], "--cache", str(tmp_path / "cache"),
                "--vae", vae, "--image-size", "32", "--latent-size", "8", "--batch-size", "2", "--sample-steps", "1",
                "--steps", "1", "--eval-every", "1", "--log-every", "1", "--out", str(tmp_path / "l2i")]
    path = train.train(train.parse_args(l2i_args + ["--face-iod", "0.4"]))
    l2i_model, vae_model = load_model(path, "l2i"), load_model(vae, "vae")
    assert l2i_model.config.face_iod == vae_model.config.face_iod == 0.4
    vae_model.config.face_iod = 0.0  # an L2I model given a VAE trained on the other framing
    with pytest.raises(UsageError, match="framed with face_iod 0"):
        DreamHead(None, vae_model, l2i_model)


def test_ema_warms_up_then_tracks_slowly():
    from common import EMA
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 0: decay (1 + 0) / 10 = 0.1, so the average moves 90 % of the way at once
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    for _ in range(5000):
        ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)  # n = 5001: decay (1 + n) / (10 + n), still below 0.999
    assert ema.shadow["weight"].item() == pytest.approx(5002 / 5011, abs=1e-6)
