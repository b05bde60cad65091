"""train.py: flags from the config dataclass, the one-dict checkpoint, resume, pictures, and user errors."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import clips
import synth_clips
import train
from cli import UsageError
from common import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint, weights_sha1
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


def test_portraits_flag_picks_the_synthetic_training_set_and_leaves_the_held_out_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "clips_or_synthetic", lambda *a, **k: calls.append((a, k)) or [])
    args = train.parse_args(["--stage", "l2i", "--portraits", "all", "--cache", str(tmp_path)])
    train.train_clips(args), train.eval_clips(args)
    assert calls[0][1]["portraits"] == "all" and calls[0][0][1] == "train"
    assert "portraits" not in calls[1][1] and calls[1][0][1] == "test"
    assert train.parse_args(["--stage", "vae"]).portraits == "base"


def test_config_flag_help_is_the_field_sentence_and_training_settings_are_flags():
    helps = {a.dest: a.help for a in train.build_parser("l2i")._actions}
    assert helps["cfg_conditioning"].startswith("How the conditions meet z_t")
    assert helps["cfg_tau_max"].startswith("Largest reference offset") and helps["cfg_tau_max"].endswith("(default: 25)")
    assert helps["train_lr"].startswith("Peak learning rate") and helps["train_lr"].endswith("(default: 0.0005)")
    args = train.parse_args(["--stage", "a2l", "--lr", "0.02", "--betas", "0.8,0.9"])
    assert args.config.train.lr == 0.02 and args.config.train.betas == (0.8, 0.9)
    assert args.config.train.steps == train.A2LConfig.preset("tiny").train.steps


def test_several_data_folders_train_on_all_their_clips_and_evaluate_on_the_first_prepared_one(clip_dirs):
    args = train.parse_args(["--stage", "a2l", "--data", clip_dirs[0], clip_dirs[1]])
    assert train.train_clips(args) == [os.path.join(d, "clip_0000.npz") for d in clip_dirs]
    assert train.eval_clips(train.parse_args(["--stage", "a2l", "--data", clip_dirs[0], "--eval-data",
                                              clip_dirs[1]])) == [os.path.join(clip_dirs[1], "clip_0000.npz")]


def test_export_takes_the_sampling_settings_of_its_command_line(tmp_path):
    config = dict(train.L2IConfig.preset("tiny").to_dict(), sample_steps=25, guidance=1.0, channels=(8, 16))
    save_checkpoint({"stage": "l2i", "config": config, "model": {}, "ema": {}, "optimizer": {}, "step": 3},
                    str(tmp_path / "run.pt"))
    args = train.parse_args(["--stage", "l2i", "--sample-steps", "7", "--guidance", "2"])
    train.export(str(tmp_path / "run.pt"), str(tmp_path / "small.pt"), "l2i", args.config)
    small = load_checkpoint(str(tmp_path / "small.pt"), "l2i")["config"]
    assert (small["sample_steps"], small["guidance"], tuple(small["channels"])) == (7, 2.0, (8, 16))


def test_export_keeps_ema_weights_and_drops_the_optimizer(clip_dirs, tmp_path):
    path = train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1")))
    train.export(path, str(tmp_path / "small.pt"), "vae", train.VAEConfig.preset("tiny"))
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


def interrupt_on_call(monkeypatch, cls, name, call):
    """Make cls.name raise KeyboardInterrupt on its call-th call, after doing its work: a Ctrl-C while it ran."""
    original, calls = getattr(cls, name), []

    def interrupted(self, *args):
        out = original(self, *args)
        calls.append(name)
        if len(calls) == call:
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(cls, name, interrupted)


def assert_same_weights(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


EXACT = ("--steps", "4", "--device", "cpu")  # bitwise on CPU without torch.use_deterministic_algorithms


@pytest.fixture(scope="module")
def vae_4_steps(clip_dirs, tmp_path_factory):
    """The checkpoint of an uninterrupted 4-step tiny VAE run, which interrupted and resumed runs must equal."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return load_checkpoint(train.train(train.parse_args(run_args(clip_dirs, tmp, *EXACT))), "vae")


def test_resume_after_ctrl_c_mid_step_is_exactly_the_uninterrupted_run(clip_dirs, tmp_path, vae_4_steps, monkeypatch):
    args = run_args(clip_dirs, tmp_path, *EXACT)
    interrupt_on_call(monkeypatch, train.VAEStage, "loss", 3)  # in step 3, its batch read; after step 2's save
    with pytest.raises(SystemExit) as stop:
        train.train(train.parse_args(args))
    assert stop.value.code == 130 and load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 2
    monkeypatch.undo()
    resumed = load_checkpoint(train.train(train.parse_args(args + ["--resume"])), "vae")
    assert_same_weights(resumed, vae_4_steps)  # bitwise: step 3's batch and draws are step 3's on any run
    losses = lambda ckpt: [h["loss"] for h in ckpt["history"] if h["kind"] == "train"]
    assert losses(resumed) == losses(vae_4_steps)


def test_dataloader_workers_read_the_same_batches_as_the_main_process(clip_dirs, tmp_path, vae_4_steps):
    """Two worker processes collate the items (each a function of its index and seed) in their own processes."""
    args = run_args(clip_dirs, tmp_path, *EXACT, "--loader-workers", "2")
    ckpt = load_checkpoint(train.train(train.parse_args(args)), "vae")
    assert_same_weights(ckpt, vae_4_steps)


def test_ctrl_c_during_evaluation_saves_the_trained_weights_not_the_ema(clip_dirs, tmp_path, vae_4_steps,
                                                                        monkeypatch):
    args = run_args(clip_dirs, tmp_path, *EXACT)
    interrupt_on_call(monkeypatch, train.VAEStage, "evaluate", 1)  # step 2's evaluation, on the EMA weights
    with pytest.raises(SystemExit) as stop:
        train.train(train.parse_args(args))
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "vae")
    assert stop.value.code == 130 and ckpt["step"] == 2
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    monkeypatch.undo()
    assert_same_weights(load_checkpoint(train.train(train.parse_args(args + ["--resume"])), "vae"), vae_4_steps)


def test_a2l_resume_is_exactly_the_uninterrupted_run(clip_dirs, tmp_path, monkeypatch):
    """A2L's window starts, diffusion noise, timesteps and audio dropout all come from the samples' seeds."""
    tiny = ["--stage", "a2l", "--width", "32", "--pairs", "1", "--heads", "2", "--window", "8", "--overlap", "2",
            "--batch-size", "2", "--sample-steps", "2", *EXACT, "--log-every", "1", "--eval-every", "2",
            "--save-every", "2", "--data", clip_dirs[0], "--eval-data", clip_dirs[1],
            "--cache", str(tmp_path / "cache")]
    whole = load_checkpoint(train.train(train.parse_args(tiny + ["--out", str(tmp_path / "whole")])), "a2l")
    parts = tiny + ["--out", str(tmp_path / "parts")]
    interrupt_on_call(monkeypatch, train.A2LStage, "loss", 3)  # in step 3, after its noise was drawn
    with pytest.raises(SystemExit):
        train.train(train.parse_args(parts))
    monkeypatch.undo()
    assert_same_weights(load_checkpoint(train.train(train.parse_args(parts + ["--resume"])), "a2l"), whole)


def test_sigterm_saves_a_checkpoint_and_exits_130_leaving_no_temporaries(clip_dirs, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", *run_args(clip_dirs, tmp_path, "--steps", "100000", "--save-every", "1",
                                                 "--eval-every", "100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a few more steps, so the signal may land inside a save
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out and "Traceback" not in err
    assert load_checkpoint(str(run / "ckpt.pt"), "vae")["step"] >= 1
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_train_itself_turns_sigterm_into_ctrl_c_and_later_signals_cannot_cut_the_save_short(clip_dirs, tmp_path,
                                                                                           monkeypatch):
    """train() called from Python (no run_cli around it) handles SIGTERM too; torchrun forwards the signal it got
    to workers that got it already, so the save ignores further ones."""
    def caller_handler(signum, frame):
        raise AssertionError("train() left SIGTERM to its caller")
    previous = signal.signal(signal.SIGTERM, caller_handler)
    sigint = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    try:
        monkeypatch.setattr(train.VAEStage, "loss", lambda self, *a: os.kill(os.getpid(), signal.SIGTERM))
        save = train.save_checkpoint

        def save_amid_signals(ckpt, path):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            save(ckpt, path)
        monkeypatch.setattr(train, "save_checkpoint", save_amid_signals)
        with pytest.raises(SystemExit) as stop:
            try:
                train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "4")))
            except KeyboardInterrupt:  # not to pytest, which would end the whole session
                pytest.fail("a later signal cut the save short")
        assert stop.value.code == 130 and load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 0
        assert signal.getsignal(signal.SIGTERM) is caller_handler  # restored on the way out
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_temporaries_of_killed_saves_are_removed_at_the_start(clip_dirs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [".ckpt.pt.k3j_x9.tmp", ".loss.png.a1b2c3.tmp", ".samples_000500.png.zz9.tmp"]
    kept = ["notes.tmp", ".ckpt.pt.bak", ".other.pt.k3j_x9.tmp"]  # not temporaries of this run's saves
    for name in stale + kept:
        (run / name).write_bytes(b"partial")
    train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--steps", "1")))
    assert not [f for f in stale if os.path.exists(run / f)]
    assert all(os.path.exists(run / f) for f in kept)


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


def train_losses(ckpt) -> list[float]:
    return [h["loss"] for h in ckpt["history"] if h["kind"] == "train"]


def test_ddp_under_torchrun_gives_the_losses_of_one_process_with_the_same_global_batch(clip_dirs, tmp_path):
    """Two gloo processes (the code path NCCL takes on GPUs) of batch 2 for 20 steps, with the VAE's
    augmentations and the PatchGAN discriminator's step running (its gradients averaged across ranks by hand, the
    autoencoder's by DDP): the same losses, step by step, as one process of batch 4, and as one process that
    accumulates two micro-batches of 2. The discriminator's term itself stays off (disc_start past the run): LDM's
    adaptive weight is a ratio of gradient norms of each process's own batch, as in LDM, so it is not additive
    over processes or micro-batches."""
    common = ["--steps", "20", "--log-every", "1", "--eval-every", "20", "--save-every", "20", "--adversarial",
              "true", "--disc-start", "100", "--disc-channels", "8", "--disc-layers", "1", "--hflip", "true"]
    ddp = run_args(clip_dirs, tmp_path, *common, "--batch-size", "2", "--out", str(tmp_path / "ddp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *ddp]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # the ranks' own errors come first, torchrun's summary of them last
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    assert proc.stdout.count("saved ") == 1  # rank 0 alone writes the checkpoint
    two = load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"), "vae")
    one = load_checkpoint(train.train(train.parse_args(run_args(clip_dirs, tmp_path, *common, "--batch-size", "4",
                                                                "--out", str(tmp_path / "one")))), "vae")
    accumulated = load_checkpoint(train.train(train.parse_args(run_args(
        clip_dirs, tmp_path, *common, "--batch-size", "4", "--accum", "2", "--out", str(tmp_path / "accum")))), "vae")
    assert two["step"] == one["step"] == 20 and len(train_losses(one)) == 20
    np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train_losses(accumulated), train_losses(one), rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="not divisible by --accum 3"):
        train.train(train.parse_args(run_args(clip_dirs, tmp_path, "--batch-size", "4", "--accum", "3",
                                              "--out", str(tmp_path / "bad"))))


LOSS_RECORDER = """
import os
import train
loss = train.VAEStage.loss


def recorded(self, model, x, step):  # each rank's own loss, which the logged one must be the mean of
    out = loss(self, model, x, step)
    with open(os.environ["LOSSES"], "a") as f:
        f.write(f"{step} {out[1]['loss']!r}\\n")
    return out


train.VAEStage.loss = recorded
train.run_cli(train.main)
"""


def test_ddp_logs_the_mean_loss_of_all_ranks_and_sigterm_ends_every_rank_quietly(clip_dirs, tmp_path):
    """Two gloo ranks started by hand with the environment torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR,
    ...), so that each rank's exit code and output can be checked (torchrun reports neither after a signal);
    each rank records its own loss, and the history must hold their mean."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", LOSS_RECORDER, *run_args(clip_dirs, tmp_path, "--steps", "100000", "--save-every",
                                                          "1", "--eval-every", "100000")]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "LOSSES": str(tmp_path / f"loss{r}")})
             for r in range(2)]
    try:
        deadline = time.time() + 180
        while not (tmp_path / "run" / "ckpt.pt").exists() and time.time() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
            time.sleep(0.1)
        time.sleep(1.0)
        for _ in range(2):  # the signal every process gets, then the copy torchrun forwards to its workers
            for p in procs:
                p.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], err0[-2000:] + err1[-2000:]
    assert out0.count("checkpoint saved") == 1 and out1 == ""
    assert "Traceback" not in err0 + err1
    history = [h for h in load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "vae")["history"] if h["kind"] == "train"]
    local = [{int(i): float(v) for i, v in map(str.split, open(tmp_path / f"loss{r}"))} for r in range(2)]
    assert history
    for h in history:  # --log-every 1: each entry logs one loss of each rank, of step index h["step"] - 1
        a, b = local[0][h["step"] - 1], local[1][h["step"] - 1]
        assert a != b and h["loss"] == pytest.approx((a + b) / 2, rel=1e-12)


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
