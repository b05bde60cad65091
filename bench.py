"""Speed and memory of DreamHead, measured rather than assumed: `python bench.py` prints one table per section and
writes them all as JSON (`--json`, default runs/bench.json).

Sections (`--only` picks some):
  sampling   each inference stage alone on the example (A2L, condition encoding, the L2I denoiser at several DDIM
             step counts, the VAE decode, face detection, paste-back, mp4 writing): video frames per second of
             wall time and milliseconds per frame;
  cascade    the whole cascade (`DreamHead.generate` + `write_video`, what sample.py runs) on the example at the
             shipped settings and at fewer DDIM steps: wall and CPU frames per second, CPU seconds per second of
             audio, and the time to the first frame written (frames stream out as they are made);
  scaling    the whole cascade on 6, 30 and 120 s of speech (the example's, repeated), each in a fresh process:
             wall time, CPU per second of audio and peak memory (max RSS);
  denoiser   our L2I UNet against diffusers' UNet2DModel configured alike (parameter counts printed), forward and
             training step at the tiny and paper widths, interleaved; our DDIM step against diffusers'
             DDIMScheduler.step (skipped with the reason when diffusers is not installed);
  training   samples per second of one training step of each stage at its tiny preset (random inputs of the
             training shapes; data loading not counted), and the utilisation of an L2I step: FLOP/s counted with
             torch.utils.flop_counter over the machine's dense matmul FLOP/s measured in the same run;
  projection FLOPs per frame of the paper preset and the frames per second they would give on one A100 / H100
             at a stated utilisation of its dense bf16 peak, and the FLOPs of each stage's paper-preset training
             step with the hours its steps take on 1 and 8 such GPUs: projections, not measurements.
Times are wall-clock medians over repetitions (CPU time would count the spinning of idle OpenMP threads). On a
shared machine they vary with the load; ratios measured in one process are the numbers to compare.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from cli import ArgumentParser, UsageError, int_flag, run_cli

SECTIONS = ("sampling", "cascade", "scaling", "denoiser", "training", "projection")
A100_BF16, H100_BF16 = 312e12, 989e12  # dense bf16 peak FLOP/s (vendor data sheets, SXM parts)


def median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over reps calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def example_paths() -> tuple[str, str]:
    from dreamhead import ROOT
    return os.path.join(ROOT, "examples", "speech.wav"), os.path.join(ROOT, "examples", "face.png")


# ----------------------------------------------------------------------------------------------------------
# Sampling: each stage alone
# ----------------------------------------------------------------------------------------------------------

def sampling(model, steps_list, batch: int = 16) -> list[dict]:
    """Frames per second of wall time of each inference stage on the example, one batch of `batch` frames."""
    import numpy as np
    import torch

    import clips
    import landmarks
    from dreamhead import DETAIL, load_face, paste
    from l2i import condition_images, encode_conditions, reference_images
    from synth_face import mesh_triangles
    speech_path, face_path = example_paths()
    face = load_face(face_path)
    talk = model.generate(speech_path, face)
    start, P_canon, mouth = next(b for b in talk.plan.batches(batch) if len(b[1]) == batch)  # a full batch
    crops = landmarks.crop_faces(face.frames, talk.plan.boxes, model.size)
    images = condition_images(crops[np.zeros(batch, int)], mouth, P_canon)
    ref = reference_images(crops[0], P_canon[0])
    cond = {**encode_conditions(model.vae, ref), **encode_conditions(model.vae, images)}
    z0 = model.l2i.sample(cond, steps=1)
    generated = np.zeros((batch, model.size, model.size, 3), np.uint8)
    frames = np.repeat(face.frames, 120, axis=0)
    rows = []

    def row(stage, seconds, frames_done, settings=""):
        rows.append({"stage": stage, "settings": settings, "ms_per_frame": 1000 * seconds / frames_done,
                     "frames_per_s": frames_done / seconds})
    row("face detection (one image)", median_time(lambda: load_face(face_path), reps=3), 1)
    a2l_steps = model.a2l.config.sample_steps
    row("A2L", median_time(lambda: sum(len(P) for P in model.landmark_stream(talk.speech, P_canon[0])), reps=3),
        talk.num_frames, f"{a2l_steps} steps")
    row("condition images (drawing)", median_time(lambda: condition_images(crops[np.zeros(batch, int)], mouth,
                                                                           P_canon)), batch)
    row("condition encoding (landmark image)", median_time(lambda: encode_conditions(model.vae, {"lmk": images["lmk"]})),
        batch)
    for steps in steps_list:
        with torch.no_grad():
            row("L2I denoiser", median_time(lambda: model.l2i.sample(cond, steps=steps), reps=3), batch,
                f"{steps} DDIM steps")
    with torch.no_grad():
        row("VAE decode", median_time(lambda: model.vae.decode_latents(z0)), batch)
    box = talk.plan.boxes[0]
    row("paste-back", median_time(lambda: [paste(face.frames[0], box, g, m) for g, m in zip(generated, mouth)]),
        batch)
    driving, tri = talk.plan.image_landmarks(start, P_canon), mesh_triangles(face.P[0])  # (b, 478, 3) frame px
    row("paste-back with detail transfer", median_time(lambda: [
        paste(face.frames[0], box, g, m, DETAIL, (face.P[0], d), tri) for g, m, d in zip(generated, mouth, driving)]),
        batch, f"--detail {DETAIL:g}")

    def write():
        with tempfile.TemporaryDirectory() as tmp:
            with clips.Mp4Writer(os.path.join(tmp, "out.mp4"), frames.shape[1:3], audio_file=speech_path) as video:
                video.write(frames)
    row("mp4 writing (ffmpeg, its own process)", median_time(write, reps=3), len(frames))
    return rows


def cascade(model, steps_list, threads: int) -> list[dict]:
    """The whole cascade on the example, as sample.py runs it, at each DDIM step count, with one render worker on
    `threads` torch threads and with `threads` workers on one thread each (sample.py's default on CPU); and at the
    first step count with `threads` workers and the paste-back's detail transfer off (`--detail 0`)."""
    import torch
    from dreamhead import DETAIL
    speech_path, face_path = example_paths()
    runs = [(steps, workers, DETAIL) for steps in steps_list for workers in dict.fromkeys((1, threads))]
    rows = []
    for steps, workers, detail in runs + [(steps_list[0], threads, 0.0)]:
        torch.set_num_threads(threads // workers)
        with tempfile.TemporaryDirectory() as tmp:
            first = []
            wall0, cpu0 = time.perf_counter(), time.process_time()
            talk = model.generate(speech_path, face_path, steps=steps, workers=workers, detail=detail)
            model.write_video(os.path.join(tmp, "out.mp4"), talk,
                              on_frames=lambda start, f: first.append(time.perf_counter()) if not first else None)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        rows.append({"steps": steps or model.l2i.config.sample_steps, "workers": workers,
                     "torch_threads": threads // workers, "detail": detail, "frames": talk.num_frames,
                     "wall_fps": talk.num_frames / wall, "cpu_fps": talk.num_frames / cpu,
                     "cpu_s_per_audio_s": cpu / talk.seconds, "first_frame_wall_s": first[0] - wall0})
    torch.set_num_threads(threads)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Scaling: audio length against time and memory, a fresh process each
# ----------------------------------------------------------------------------------------------------------

def scaling(seconds_list, threads: int) -> list[dict]:
    rows = []
    for seconds in seconds_list:
        cmd = [sys.executable, __file__, "--once", str(seconds), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"the {seconds:g} s measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["peak_rss_vs_first"] = r["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        r["wall_per_audio_s_vs_first"] = r["wall_s_per_audio_s"] / rows[0]["wall_s_per_audio_s"]
        r["cpu_per_audio_s_vs_first"] = r["cpu_s_per_audio_s"] / rows[0]["cpu_s_per_audio_s"]
    return rows


def once(seconds: float) -> dict:
    """The whole cascade on `seconds` of the example's speech, repeated, in this process: time and peak RSS."""
    import numpy as np
    import soundfile as sf

    from dreamhead import DreamHead, default_workers, load_face, share_cores
    speech_path, face_path = example_paths()
    wave, rate = sf.read(speech_path, dtype="int16")
    model = DreamHead.from_checkpoints(device="cpu")
    share_cores(default_workers("cpu"))  # as sample.py
    with tempfile.TemporaryDirectory() as tmp:
        audio = os.path.join(tmp, "speech.wav")
        sf.write(audio, np.resize(wave, int(seconds * rate)), rate, subtype="PCM_16")
        start = time.perf_counter()
        face = load_face(face_path)  # once per face, whatever the audio's length: timed apart
        face_s = time.perf_counter() - start
        wall0, cpu0 = time.perf_counter(), time.process_time()
        talk = model.generate(audio, face)
        model.write_video(os.path.join(tmp, "out.mp4"), talk)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"audio_s": seconds, "frames": talk.num_frames, "face_s": face_s, "wall_s": wall,
            "wall_s_per_audio_s": wall / seconds, "cpu_s_per_audio_s": cpu / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------------------------------------
# Training throughput and utilisation
# ----------------------------------------------------------------------------------------------------------

def training() -> list[dict]:
    """Samples per second of one optimizer step of each stage at its tiny preset, on random training-shaped
    inputs (data loading is not counted)."""
    import torch

    from a2l import A2L, A2LConfig
    from l2i import L2I, L2IConfig
    from vae import AutoencoderKL, VAEConfig, vae_loss
    rows = []
    vae_cfg = VAEConfig.preset("tiny")
    vae = AutoencoderKL(vae_cfg)
    x = torch.rand(vae_cfg.train.batch_size, 3, vae_cfg.resolution, vae_cfg.resolution) * 2 - 1
    rows.append(_step_row("VAE", vae, lambda: vae_loss(vae, x)[0], len(x)))
    a2l_cfg = A2LConfig.preset("tiny")
    a2l = A2L(a2l_cfg)
    a2l.set_residual_std(torch.ones(a2l_cfg.n_coords))
    B, L = a2l_cfg.train.batch_size, a2l_cfg.window
    batch = {"landmarks": torch.randn(B, L, a2l_cfg.n_points, 3), "p_bar": torch.randn(B, a2l_cfg.n_points, 3),
             "mel_ctx": torch.randn(B, L, a2l_cfg.ctx_mel_frames, a2l_cfg.n_mels)}
    rows.append(_step_row("A2L (windows)", a2l, lambda: a2l.loss(batch)[0], B))
    l2i_cfg = L2IConfig.preset("tiny")
    l2i, (z0, cond) = L2I(l2i_cfg), l2i_inputs(l2i_cfg, l2i_cfg.train.batch_size)
    rows.append(_step_row("L2I (frames)", l2i, lambda: l2i.loss(z0, cond)[0], len(z0)))
    rows[-1].update(utilisation(l2i, z0, cond, rows[-1]["s_per_step"]))
    return rows


def l2i_inputs(cfg, batch: int, device="cpu") -> tuple:
    """Random z0 (B, C, h, w) and a condition dict of L2I's training shapes (latents and the mouth mask)."""
    import torch

    from l2i import COND_KEYS
    shape = (batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    cond = {k: torch.randn(shape, device=device) for k in COND_KEYS}
    cond["mouth"] = torch.zeros(batch, 1, cfg.image_size, cfg.image_size, device=device)
    return torch.randn(shape, device=device), cond


def _step_row(stage, model, loss_fn, batch: int) -> dict:
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    seconds = median_time(step, reps=5, warmup=2)
    return {"stage": stage, "batch": batch, "s_per_step": seconds, "samples_per_s": batch / seconds}


def matmul_flops() -> float:
    """Dense float32 matmul FLOP/s of this machine on this process's threads (1024^3, median)."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / median_time(lambda: a @ b, reps=9, warmup=2)


def utilisation(model, z0, cond, seconds: float) -> dict:
    """FLOPs of one L2I training step (forward + backward, counted), its FLOP/s and their share of matmul FLOP/s."""
    flops, peak = count_flops(lambda: model.loss(z0, cond)[0].backward()), matmul_flops()
    return {"step_flops": flops, "achieved_flops_per_s": flops / seconds, "matmul_flops_per_s": peak,
            "utilisation": flops / seconds / peak}


# ----------------------------------------------------------------------------------------------------------
# Projection for the paper preset on a GPU
# ----------------------------------------------------------------------------------------------------------

def projection(utilisation_share: float = 0.4) -> list[dict]:
    """FLOPs per video frame of the paper preset (counted on meta tensors: nothing is computed) and the frames per
    second they allow at `utilisation_share` of an A100's / H100's dense bf16 peak. A projection."""
    import torch

    from l2i import L2I, L2IConfig
    from vae import AutoencoderKL, VAEConfig
    cfg, vae_cfg = L2IConfig.preset("paper"), VAEConfig.preset("paper")
    with torch.device("meta"):
        l2i, vae = L2I(cfg), AutoencoderKL(vae_cfg)
        z0, cond = l2i_inputs(cfg, 1, "meta")
        image = torch.zeros(1, 3, vae_cfg.resolution, vae_cfg.resolution)
        t = torch.zeros(1, dtype=torch.long)
        unet = count_flops(lambda: l2i.unet(z0, t, cond))
        coding = count_flops(lambda: vae.decode(z0)) + count_flops(lambda: vae.encode(image))  # decode, lmk encode
    per_frame = cfg.sample_steps * unet + coding
    return [{"gpu": name, "l2i_steps": cfg.sample_steps, "gflops_per_frame": per_frame / 1e9,
             "utilisation": utilisation_share, "projected_fps": utilisation_share * peak / per_frame}
            for name, peak in (("A100 bf16", A100_BF16), ("H100 bf16", H100_BF16))]


def training_projection(utilisation_share: float = 0.4) -> list[dict]:
    """FLOPs of one optimizer step of each stage at the paper preset (the network's forward and backward on its
    global batch, counted on meta tensors; the VAE's discriminator and the data loading not counted) and the hours
    its preset's steps take on 1 and 8 A100s / H100s at `utilisation_share` of the dense bf16 peak, scaling
    linearly over GPUs. A projection, not a measurement."""
    import torch

    from a2l import A2L, A2LConfig
    from l2i import L2I, L2IConfig
    from vae import AutoencoderKL, VAEConfig
    rows = []
    with torch.device("meta"):
        v_cfg, a_cfg, l_cfg = (c.preset("paper") for c in (VAEConfig, A2LConfig, L2IConfig))
        vae, a2l, l2i = AutoencoderKL(v_cfg), A2L(a_cfg), L2I(l_cfg)
        x = torch.zeros(v_cfg.train.batch_size, 3, v_cfg.resolution, v_cfg.resolution)
        B, L = a_cfg.train.batch_size, a_cfg.window
        x_t = torch.zeros(B, L, a_cfg.n_coords)
        mel, p_bar = torch.zeros(B, L, a_cfg.ctx_mel_frames, a_cfg.n_mels), torch.zeros(B, a_cfg.n_points, 3)
        z0, cond = l2i_inputs(l_cfg, l_cfg.train.batch_size, "meta")
        steps = {
            "VAE": (v_cfg, lambda: vae(x, sample_posterior=False)[0].sum().backward()),
            "A2L": (a_cfg, lambda: a2l(x_t, torch.zeros(B, dtype=torch.long), mel, p_bar).sum().backward()),
            "L2I": (l_cfg, lambda: l2i.unet(z0, torch.zeros(len(z0), dtype=torch.long), cond).sum().backward())}
        for stage, (cfg, step) in steps.items():
            flops = count_flops(step)
            row = {"stage": stage, "global_batch": cfg.train.batch_size, "steps": cfg.train.steps,
                   "tflop_per_step": flops / 1e12, "utilisation": utilisation_share}
            for name, peak in (("A100", A100_BF16), ("H100", H100_BF16)):
                hours = cfg.train.steps * flops / (utilisation_share * peak) / 3600
                row.update({f"hours_1x{name}": hours, f"hours_8x{name}": hours / 8})
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The denoiser against diffusers'
# ----------------------------------------------------------------------------------------------------------

def diffusers_twin(cfg):
    """diffusers' UNet2DModel configured like our LatentUNet(cfg) with conditioning="channel": the same input
    channels (z_t and the four condition latents), widths, ResBlocks per level, norm groups, scale-shift time
    modulation, self-attention at the same resolutions and in the middle with cfg.heads heads, conv down / up
    sampling and a time embedding of the same size. What no UNet2DModel setting can match: its decoder has one
    ResBlock more per level, each taking a skip (ours takes one skip per level), with attention after each at
    attended levels (+25 % parameters at tiny, +30 % at paper widths, about 30 % more FLOPs), and it has no
    learned position embedding before attention. So time per FLOP is reported beside the time."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    import diffusion
    levels = [cfg.latent_size // 2 ** i for i in range(len(cfg.channels))]
    attended = [res in cfg.attn_resolutions for res in levels]
    emb_dim = 4 * cfg.channels[0]
    twin = UNet2DModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels * (1 + len(cfg.cond_keys)),
        out_channels=cfg.latent_channels, time_embedding_dim=emb_dim, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attended),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)),
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.num_res_blocks, downsample_type="conv",
        upsample_type="conv", dropout=cfg.dropout, attention_head_dim=cfg.channels[-1] // cfg.heads,
        norm_num_groups=cfg.norm_groups, attn_norm_num_groups=cfg.norm_groups, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift")
    freq_dim = diffusion.TimestepEmbedder(emb_dim).freq_dim  # our sinusoid width, then Linear-SiLU-Linear
    twin.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    twin.time_embedding = TimestepEmbedding(freq_dim, emb_dim)
    for m in twin.modules():  # UNet2DModel takes one head size for all levels; ours has cfg.heads everywhere
        if isinstance(m, Attention):
            m.heads = m.sliceable_head_dim = cfg.heads
            m.scale = (m.inner_dim // cfg.heads) ** -0.5
    return twin


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernel SDPA runs here (torch counts it as 0),
    with torch's own SDPA formulas."""
    import torch
    from torch.utils import flop_counter as fc
    aten, mapping = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict:
    """{name: median wall seconds}: every fn warmed up, then called in turn (a, b, a, b, ...) reps times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def unet_side_by_side(name: str, cfg, batch: int, reps: int) -> list[dict]:
    """Forward (no grad) and training step (forward, MSE backward, AdamW) of LatentUNet(cfg) and its diffusers
    twin on the same inputs, interleaved: median ms, ratio ours / theirs, and the ratio of time per FLOP."""
    import torch
    import torch.nn.functional as F

    from l2i import LatentUNet
    torch.manual_seed(0)
    ours, theirs = LatentUNet(cfg), diffusers_twin(cfg)
    z, target = torch.randn(2, batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,))
    cond = {k: torch.randn_like(z) for k in cfg.cond_keys}
    forward = {"ours": lambda: ours(z, t, cond),
               "theirs": lambda: theirs(torch.cat([z, *(cond[k] for k in cfg.cond_keys)], 1), t,
                                        return_dict=False)[0]}

    def train_step(model, fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.mse_loss(fn(), target).backward()
            opt.step()
        return step
    rows = []
    for kind, fns in (("forward", forward), ("training step", {k: train_step(m, forward[k]) for k, m in
                                                               (("ours", ours), ("theirs", theirs))})):
        with torch.set_grad_enabled(kind != "forward"):
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            ms = {k: 1000 * v for k, v in interleaved(fns, reps).items()}
        rows.append({"unet": name, "batch": batch, "pass": kind,
                     "params_ours": sum(p.numel() for p in ours.parameters()),
                     "params_theirs": sum(p.numel() for p in theirs.parameters()),
                     "ms_ours": ms["ours"], "ms_theirs": ms["theirs"], "ratio": ms["ours"] / ms["theirs"],
                     "time_per_flop_ratio": (ms["ours"] / flops["ours"]) / (ms["theirs"] / flops["theirs"])})
    return rows


def ddim_side_by_side(cfg, batch: int = 16, reps: int = 100) -> dict:
    """Our DDIM step (as L2I.sample calls it) against diffusers' DDIMScheduler.step on the same schedule: median
    microseconds per step over sweeps of the sampling grid, and the largest difference of their x_prev."""
    import torch
    from diffusers import DDIMScheduler

    from l2i import L2I
    ours = L2I(cfg).scheduler
    theirs = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                           beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False,
                           set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    ours.set_timesteps(cfg.sample_steps)
    theirs.set_timesteps(cfg.sample_steps)
    ts = ours.timesteps.tolist()
    x, eps = torch.randn(2, batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    diff = max(float((ours.step(eps, t, x).prev_sample - theirs.step(eps, t, x).prev_sample).abs().max())
               for t in ts)
    us = {k: 1e6 * v / len(ts) for k, v in interleaved(
        {"ours": lambda: [ours.step(eps, t, x) for t in ts],
         "theirs": lambda: [theirs.step(eps, t, x) for t in ts]}, reps, warmup=5).items()}
    return {"unet": "DDIM step", "batch": batch, "pass": f"{len(ts)} steps", "us_ours": us["ours"],
            "us_theirs": us["theirs"], "ratio": us["ours"] / us["theirs"], "max_abs_diff": diff}


def denoiser() -> list[dict]:
    """The shipped tiny L2I config at batch 16 and the paper preset's widths (channel conditioning, the mode the
    twin mirrors) at batch 2, then the DDIM step."""
    if importlib.util.find_spec("diffusers") is None:
        return [{"skipped": "diffusers is not installed (pip install -r requirements-dev.txt)"}]
    from common import load_checkpoint
    from dreamhead import default_checkpoint
    from l2i import L2IConfig
    tiny = L2IConfig.from_checkpoint(load_checkpoint(default_checkpoint("l2i"), "l2i")["config"])
    paper = dataclasses.replace(L2IConfig.preset("paper"), conditioning="channel")
    return unet_side_by_side("tiny (shipped)", tiny, 16, 15) + unet_side_by_side("paper widths", paper, 2, 5) + \
        [ddim_side_by_side(tiny)]


# ----------------------------------------------------------------------------------------------------------

def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(cell(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--threads", type=int_flag(1), default=2, help="torch threads (the CI machine has 2 cores)")
    p.add_argument("--steps", type=int_flag(1), nargs="+", default=[10, 25, 5], help="DDIM step counts measured "
                   "in sampling and cascade (10: the shipped L2I's; 25: what it shipped with before)")
    p.add_argument("--seconds", type=float, nargs="+", default=[6.0, 30.0, 120.0], help="audio lengths of scaling")
    p.add_argument("--json", default=os.path.join("runs", "bench.json"), help="where the tables are written")
    p.add_argument("--once", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.once is not None:
        print(json.dumps(once(args.once)))
        return
    from common import atomic_write
    from dreamhead import DreamHead
    model = DreamHead.from_checkpoints(device="cpu")
    results = {"threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__}
    run = {"sampling": lambda: sampling(model, args.steps), "cascade": lambda: cascade(model, args.steps, args.threads),
           "scaling": lambda: scaling(args.seconds, args.threads), "denoiser": denoiser, "training": training,
           "projection": projection, "projection_training": training_projection}
    with_training = {"projection": ["projection", "projection_training"]}  # the projection section has two tables
    for name in [table for section in args.only for table in with_training.get(section, [section])]:
        results[name] = run[name]()
        print_table(name, results[name])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
