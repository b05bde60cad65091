"""Speed and memory of DreamHead's inference paths: `python bench.py a2l|plan [--seconds 6 60] [...]`.

Peer systems take minutes of GPU time per second of video, so speed and memory are measured here, not assumed.
Each measurement runs in a fresh subprocess so peak memory (max RSS) belongs to that run alone.

a2l: sampling landmarks for audio of several lengths with `A2L.generate` (overlapping windows, [A2L: Loop]):
     wall time, seconds of compute per second of audio, frames produced (must be ceil(duration x 25)),
     peak RSS of the process and its growth over the RSS just before sampling.
plan: the cascade up to rendering with the shipped checkpoints (`DreamHead.generate` on the example face with a
     silent wav file, then one pass over the streamed plan: the sound read a minute at a time, A2L, each frame's
     landmarks in the photo's pixels and its mouth box), the same columns; whether memory stays flat in the
     audio's length (`python bench.py plan --seconds 60 1800`). The whole render's memory: docs/inputs.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

from a2l import A2L, A2LConfig
from audio import mel_context
from cli import ArgumentParser, UsageError, float_flag, int_flag, run_cli
from dreamhead import ROOT, DreamHead, load_face, load_model

EXAMPLE_FACE = os.path.join(ROOT, "examples", "face.png")


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def syllables(seconds: float) -> np.ndarray:
    """A 16 kHz test signal: 180 Hz bursts three times a second over faint noise, (S,) float32."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.1 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def a2l_once(ckpt: str | None, seconds: float, steps: int | None) -> tuple:
    """(work, what it returns) for one A2L measurement: the model is loaded now, `work` samples the landmarks."""
    model = load_model(ckpt, "a2l") if ckpt else A2L(A2LConfig.preset("tiny")).eval()
    cfg, wave = model.config, syllables(seconds)

    def work():
        mel_ctx = mel_context(wave, context_frames=cfg.context_frames, n_mels=cfg.n_mels)  # (T, C, 80)
        return model.generate(mel_ctx, torch.zeros(cfg.n_points, 3), steps=steps,
                              generator=torch.Generator().manual_seed(0)).shape[0]
    return work


def plan_once(ckpt: str | None, seconds: float, steps: int | None) -> tuple:
    """The same for the cascade's plan: silent audio and the example face, with the shipped checkpoints."""
    model = DreamHead.from_checkpoints(a2l=ckpt, device="cpu")
    face = load_face(EXAMPLE_FACE)
    silence = tempfile.NamedTemporaryFile(suffix=".wav")
    sf.write(silence.name, np.zeros(int(seconds * 16000), np.int16), 16000, subtype="PCM_16")

    def work():
        with silence:
            return sum(len(P) for _, P in model.generate(silence.name, face, steps=steps).landmark_chunks())
    return work


def measure(kind: str, ckpt: str | None, seconds: float, steps: int | None, threads: int) -> dict:
    """One measurement in this process: set up, then time the work and read the peak RSS."""
    torch.set_num_threads(threads)
    work = {"a2l": a2l_once, "plan": plan_once}[kind](ckpt, seconds, steps)
    rss_before = _rss_mb()
    start = time.perf_counter()
    frames = work()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    return {"seconds": seconds, "frames": int(frames), "expected_frames": math.ceil(seconds * 25),
            "wall_s": wall, "compute_s_per_audio_s": wall / seconds, "peak_rss_mb": peak,
            "growth_mb": peak - rss_before}


def bench(args) -> list[dict]:
    rows = []
    for seconds in args.seconds:  # each in a fresh process, so its peak RSS is its own
        cmd = [sys.executable, __file__, "once", args.what, "--seconds", str(seconds), "--threads", str(args.threads)]
        cmd += (["--ckpt", args.ckpt] if args.ckpt else []) + (["--steps", str(args.steps)] if args.steps else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"the {seconds:g} s measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
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
    p = ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for kind, text in (("a2l", "A2L sampling time and memory against audio length"),
                       ("plan", "the cascade's plan (P̄, A2L, crops, mouth boxes): time and memory against audio length")):
        q = sub.add_parser(kind, help=text)
        q.add_argument("--seconds", type=float_flag, nargs="+", default=[6.0, 60.0], help="audio lengths to measure")
    once = sub.add_parser("once", help=argparse.SUPPRESS)
    once.add_argument("kind", choices=("a2l", "plan"))
    once.add_argument("--seconds", type=float_flag, required=True)
    for q in sub.choices.values():
        q.add_argument("--ckpt", default=None, help="A2L checkpoint (a2l default: an untrained tiny model; plan: the "
                       "shipped one)")
        q.add_argument("--steps", type=int_flag(1), default=None, help="DDIM steps (default: the config's)")
        q.add_argument("--threads", type=int_flag(1), default=2)
    args = p.parse_args(argv)
    if args.what == "once":
        print(json.dumps(measure(args.kind, args.ckpt, args.seconds, args.steps, args.threads)))
    else:
        bench(args)


if __name__ == "__main__":
    run_cli(main)
