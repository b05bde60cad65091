"""Speed and memory of DreamHead's inference paths: `python bench.py a2l [--ckpt ...] [--seconds 6 60]`.

Peer systems take minutes of GPU time per second of video, so speed and memory are measured here, not assumed.
Each measurement runs in a fresh subprocess so peak memory (max RSS) belongs to that run alone.

a2l: sampling landmarks for audio of several lengths with `A2L.generate` (overlapping windows, [A2L: Loop]):
     wall time, seconds of compute per second of audio, frames produced (must be ceil(duration x 25)),
     peak RSS of the process and its growth over the RSS just before sampling.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from a2l import A2L, A2LConfig
from audio import mel_context
from common import run_cli
from dreamhead import load_model


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def a2l_once(ckpt: str | None, seconds: float, steps: int | None, threads: int) -> dict:
    """One measurement in this process: load (or build) the model, then generate for `seconds` of audio."""
    torch.set_num_threads(threads)
    model = load_model(ckpt, "a2l") if ckpt else A2L(A2LConfig.preset("tiny")).eval()
    cfg = model.config
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.1 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)  # syllable-like bursts
    p_bar = torch.zeros(cfg.n_points, 3)
    rss_before = _rss_mb()
    start = time.perf_counter()
    mel_ctx = mel_context(wave, context_frames=cfg.context_frames, n_mels=cfg.n_mels)  # (T, C, 80)
    out = model.generate(mel_ctx, p_bar, steps=steps, generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    return {"seconds": seconds, "frames": int(out.shape[0]), "expected_frames": math.ceil(seconds * 25),
            "wall_s": wall, "compute_s_per_audio_s": wall / seconds, "peak_rss_mb": peak,
            "growth_mb": peak - rss_before}


def bench_a2l(args) -> list[dict]:
    rows = []
    for seconds in args.seconds:
        cmd = [sys.executable, __file__, "a2l-once", "--seconds", str(seconds), "--threads", str(args.threads)]
        cmd += (["--ckpt", args.ckpt] if args.ckpt else []) + (["--steps", str(args.steps)] if args.steps else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'audio s':>8} {'frames':>7} {'expected':>8} {'wall s':>8} {'s / audio s':>11} {'peak RSS MB':>11} "
          f"{'growth MB':>9}")
    for r in rows:
        print(f"{r['seconds']:>8.1f} {r['frames']:>7d} {r['expected_frames']:>8d} {r['wall_s']:>8.2f} "
              f"{r['compute_s_per_audio_s']:>11.3f} {r['peak_rss_mb']:>11.1f} {r['growth_mb']:>9.1f}")
    if len(rows) > 1:
        print(f"peak RSS ratio {rows[-1]['seconds']:g} s / {rows[0]['seconds']:g} s: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("a2l", help="A2L sampling time and memory against audio length")
    a.add_argument("--ckpt", default=None, help="A2L checkpoint (default: an untrained tiny model)")
    a.add_argument("--seconds", type=float, nargs="+", default=[6.0, 60.0])
    a.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's)")
    a.add_argument("--threads", type=int, default=2)
    once = sub.add_parser("a2l-once", help=argparse.SUPPRESS)
    once.add_argument("--ckpt", default=None)
    once.add_argument("--seconds", type=float, required=True)
    once.add_argument("--steps", type=int, default=None)
    once.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.what == "a2l":
        bench_a2l(args)
    else:
        print(json.dumps(a2l_once(args.ckpt, args.seconds, args.steps, args.threads)))


if __name__ == "__main__":
    run_cli(main)
