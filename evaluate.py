"""Held-out evaluation of DreamHead's stages: `python evaluate.py a2l --ckpt runs/a2l/ckpt.pt [...]`.

The paper evaluates on HDTF/MEAD with lip-sync, stability and image-quality metrics (its tables are not
known to us, see ../shared/paper-notes.md section 4). Here each stage is measured on held-out synthetic
identities and sentences, whose ground truth is exact:

A2L (Sec. 3.1), in canonical space (units of inter-ocular distance, IOD):
  - lip LMD: mean L2 distance of the 40 MediaPipe lip points to the truth, in % of IOD;
  - mouth-opening correlation: Pearson correlation of predicted and true inner-lip opening over time,
    per clip (mean over clips) and pooled over all frames;
  - jitter: mean |second difference over time| of all points (the paper credits diffusion with removing
    jitter), reported next to the ground truth's own jitter;
  beside two baselines: `static` (the subject's mean landmarks P̄ on every frame) and, with
  `--regressor CKPT`, the same network trained as a deterministic regressor (the diffusion-vs-regression
  ablation: `python train.py --stage a2l --objective regression --out runs/a2l_regression`).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import landmarks
from dreamhead import atomic_write, load_model, run_cli


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def a2l_predictions(model, dataset, steps=None, seed=0, max_clips=None) -> list[dict]:
    """Generate every held-out clip of an `a2l.A2LWindows` dataset: [{truth, pred, p_bar}] canonical (T, 478, 3)."""
    from a2l import unfold_context
    gen = torch.Generator().manual_seed(seed)
    out = []
    for clip in dataset.clips[:max_clips]:
        mel_ctx = unfold_context(clip["mel"], dataset.context_frames)  # (T, C, 80)
        pred = model.generate(mel_ctx, clip["p_bar"], steps=steps, generator=gen)  # (T, 478, 3)
        out.append({"truth": clip["P"].numpy(), "pred": pred.numpy(), "p_bar": clip["p_bar"].numpy()})
    return out


def landmark_metrics(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Lip LMD (% IOD), mouth-opening correlation (per clip mean, pooled) and jitter of (T, 478, 3) sequences."""
    lmd = np.mean([landmarks.lip_lmd(p, t).mean() for p, t in zip(preds, truths)]) * 100
    open_p = [landmarks.mouth_opening(p) for p in preds]
    open_t = [landmarks.mouth_opening(t) for t in truths]
    per_clip = [_corr(p, t) for p, t in zip(open_p, open_t)]
    return {"lip_lmd_pct_iod": float(lmd),
            "opening_corr": float(np.nanmean(per_clip)) if not np.all(np.isnan(per_clip)) else float("nan"),
            "opening_corr_pooled": _corr(np.concatenate(open_p), np.concatenate(open_t)),
            "jitter": float(np.mean([landmarks.jitter(p) for p in preds]))}


def evaluate_a2l(models: dict, dataset, steps=None, seed=0, max_clips=None) -> tuple[dict, list[dict]]:
    """Metrics per method ({name: model}), plus `static` and `ground_truth` rows; also the first model's
    per-clip predictions (for plots)."""
    rows, first = {}, None
    for name, model in models.items():
        results = a2l_predictions(model, dataset, steps, seed, max_clips)
        first = first or results
        rows[name] = landmark_metrics([r["pred"] for r in results], [r["truth"] for r in results])
    truths = [r["truth"] for r in first]
    rows["static"] = landmark_metrics([np.broadcast_to(r["p_bar"], r["truth"].shape) for r in first], truths)
    rows["ground_truth"] = landmark_metrics(truths, truths)
    return rows, first


def plot_opening(result: dict, path: str, title: str) -> None:
    """Predicted against true mouth opening over time (one clip) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = np.arange(len(result["truth"])) / 25
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.plot(t, landmarks.mouth_opening(result["truth"]), label="ground truth", color="black")
    ax.plot(t, landmarks.mouth_opening(result["pred"]), label="A2L prediction", color="tab:red")
    ax.plot(t, np.full_like(t, landmarks.mouth_opening(result["p_bar"])), label="static P̄", color="tab:gray",
            linestyle="--")
    ax.set(xlabel="time (s)", ylabel="mouth opening (IOD)", title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def format_table(rows: dict) -> str:
    gt_jitter = rows["ground_truth"]["jitter"]
    lines = [f"{'method':<14} {'lip LMD %IOD':>12} {'open corr':>10} {'pooled':>8} {'jitter':>9} {'jitter/GT':>9}"]
    for name, m in rows.items():
        lines.append(f"{name:<14} {m['lip_lmd_pct_iod']:>12.2f} {m['opening_corr']:>10.3f} "
                     f"{m['opening_corr_pooled']:>8.3f} {m['jitter']:>9.5f} {m['jitter'] / gt_jitter:>9.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    a = sub.add_parser("a2l", help="lip LMD, mouth-opening correlation and jitter on held-out clips")
    a.add_argument("--ckpt", default="runs/a2l/ckpt.pt")
    a.add_argument("--regressor", default=None, help="checkpoint of the same network trained with "
                   "--objective regression (the ablation)")
    a.add_argument("--data", default=None, help="held-out clips folder (default: synthetic test split)")
    a.add_argument("--clips", type=int, default=20, help="synthetic held-out clips")
    a.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--plot", default=None, help="PNG of predicted vs true mouth opening of the first clip")
    a.add_argument("--json", default=None, help="write the metrics here")
    args = p.parse_args(argv)

    from a2l import A2LWindows
    from train import clip_paths
    models = {"a2l": load_model(args.ckpt, "a2l")}
    if args.regressor:
        models["regressor"] = load_model(args.regressor, "a2l")
    cfg = models["a2l"].config
    paths = clip_paths(args.data, "test", args.clips)
    dataset = A2LWindows(paths, cfg.window, train=False, context_frames=cfg.context_frames, n_mels=cfg.n_mels)
    rows, results = evaluate_a2l(models, dataset, args.steps, args.seed)
    print(f"held-out clips: {len(dataset.clips)}, frames: {sum(len(c['P']) for c in dataset.clips)}")
    print(format_table(rows))
    if args.json:
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=2)))
    if args.plot:
        plot_opening(results[0], args.plot, "held-out identity and sentence: mouth opening over time")


if __name__ == "__main__":
    run_cli(main)
