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

VAE (the frozen E / D of Fig. 2): PSNR of reconstructions over the whole frame and inside the mouth box.

L2I (Sec. 3.2), frames rendered from the ground-truth landmarks of held-out clips with a reference frame
tau_max frames earlier (so its mouth differs):
  - mouth-box PSNR against the truth, beside the baseline that copies the reference frame's mouth and the
    VAE's own reconstruction (the ceiling);
  - the mouth opening MediaPipe measures on the generated frames (upscaled before detection, `--upscale`)
    against the opening of the landmarks L2I was asked to render: Pearson correlation, and the detection rate.
  Several checkpoints side by side (`--ckpt name=path ...`) give the conditioning ablations.

Cascade (`sample`): sample.py on held-out faces and sentences; MediaPipe's mouth opening on the output video
against the ground truth of the sentence, and seconds of compute per second of audio.
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


UPSCALE = {"cubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4"}  # --upscale choices -> OpenCV interpolation


def measured_opening(frames: np.ndarray, detect_size: int = 256, upscale: str = "cubic") -> np.ndarray:
    """Mouth opening / inter-ocular distance that MediaPipe measures on each frame (T, H, W, 3), upscaled to
    detect_size px first with `upscale` (a key of UPSCALE; MediaPipe does not find 64 px faces); NaN where no
    face is found."""
    import cv2
    if upscale not in UPSCALE:
        raise ValueError(f"unknown upscale {upscale!r}; valid: {sorted(UPSCALE)}")
    interpolation = getattr(cv2, UPSCALE[upscale])
    out = np.full(len(frames), np.nan)
    with landmarks.FaceMeshDetector(static_image_mode=True, max_num_faces=1) as detector:
        for i, frame in enumerate(frames):
            big = cv2.resize(frame, (detect_size, detect_size), interpolation=interpolation)
            P = detector.detect(big)
            if P is not None:
                out[i] = landmarks.mouth_opening(P) / landmarks.inter_ocular(P)
    return out


def _nan_corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return _corr(a[ok], b[ok]) if ok.sum() > 2 else float("nan")


def _corr_by_identity(measured: np.ndarray, opening: np.ndarray, identity) -> dict:
    """{"opening_corr_id<k>": correlation over identity k's frames} (identity: (N,) ints, or None -> {})."""
    if identity is None:
        return {}
    identity = np.asarray(identity)
    return {f"opening_corr_id{k}": _nan_corr(measured[identity == k], opening[identity == k])
            for k in np.unique(identity)}


def clip_identities(paths: list[str]) -> tuple[list[int], list[int]]:
    """The identity number and the landmark frame count of each clip (data.py npz format), each file read once."""
    clips = [np.load(p) for p in paths]
    return [int(c["identity"]) for c in clips], [len(c["landmarks"]) for c in clips]


@torch.no_grad()
def evaluate_vae(vae, frames: np.ndarray, masks: np.ndarray, opening=None, identity=None, batch: int = 64,
                 upscale: str = "cubic") -> dict:
    """PSNR (dB) of E -> D reconstructions over the frame and inside the mouth box, (N, S, S, 3) uint8 frames;
    with the true openings (N,) also how well MediaPipe's opening on the reconstructions follows them (the
    ceiling of the L2I's opening correlation: L2I renders through this decoder), per identity (N,) if given."""
    from l2i import to_uint8_image
    from vae import FrameDataset, psnr
    x = FrameDataset.to_tensor(np.asarray(frames))  # (N, 3, S, S)
    rec = torch.cat([vae.decode(vae.encode(b).mode()) for b in x.split(batch)]).clamp(-1, 1)
    m = torch.from_numpy(np.asarray(masks, np.float32))[:, None]  # (N, 1, S, S)
    row = {"frames": len(x), "psnr": psnr(rec, x), "psnr_mouth": psnr(rec, x, mask=m)}
    if opening is not None:
        measured, opening = measured_opening(to_uint8_image(rec), upscale=upscale), np.asarray(opening)
        row["opening_corr"] = _nan_corr(measured, opening)
        row.update(_corr_by_identity(measured, opening, identity))
    return row


@torch.no_grad()
def evaluate_l2i(model, vae, latents, every: int = 4, batch: int = 32, steps=None, seed: int = 0,
                 guidance=None, identities=None, upscale: str = "cubic") -> dict:
    """Render every `every`-th frame of the held-out items (an l2i.L2ILatents with train=False frames) from its
    true landmarks; PSNR in the mouth box beside copy-the-reference and the VAE ceiling; the MediaPipe opening
    measured on the generated, the true and the VAE-reconstructed frames (the last two bound what L2I can reach);
    with `identities` (one int per clip) the generated frames' correlation per identity too."""
    from l2i import to_tensor_image, to_uint8_image
    from vae import psnr
    frames = latents.frames
    idx = list(range(0, len(latents), every))
    gen_all, truth_all, ref_all, rec_all, mouth_all, opening, clip_of = [], [], [], [], [], [], []
    cfg = model.cfg
    z_T = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                      generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(idx), batch):
        items = [latents[i] for i in idx[start:start + batch]]
        cond = torch.utils.data.default_collate(items)
        z0 = model.sample(cond, steps=steps, guidance=guidance, z_T=z_T)  # (b, C, h, w)
        gen_all.append(vae.decode_latents(z0).clamp(-1, 1))
        rec_all.append(vae.decode_latents(cond["z0"]).clamp(-1, 1))
        for it in items:
            clip = frames.clips[it["clip"]]
            truth_all.append(clip["frames"][it["frame"]])
            ref_all.append(clip["frames"][it["ref_frame"]])
            P = clip["P_px"][it["frame"]]
            opening.append(landmarks.mouth_opening(P) / landmarks.inter_ocular(P))
            clip_of.append(it["clip"])
        mouth_all.append(cond["mouth"])
    gen, rec, mouth = torch.cat(gen_all), torch.cat(rec_all), torch.cat(mouth_all)
    truth, ref = to_tensor_image(np.stack(truth_all)), to_tensor_image(np.stack(ref_all))  # (N, 3, S, S)
    opening = np.array(opening)
    measured = measured_opening(to_uint8_image(gen), upscale=upscale)
    measured_truth = measured_opening(np.stack(truth_all), upscale=upscale)
    measured_vae = measured_opening(to_uint8_image(rec), upscale=upscale)
    return {"frames": len(idx),
            "psnr_mouth": psnr(gen, truth, mask=mouth),
            "psnr_mouth_copy_ref": psnr(ref, truth, mask=mouth),
            "psnr_mouth_vae": psnr(rec, truth, mask=mouth),
            "psnr": psnr(gen, truth),
            "opening_corr": _nan_corr(measured, opening),
            "detected": float(np.isfinite(measured).mean()),
            "opening_corr_truth_frames": _nan_corr(measured_truth, opening),
            "opening_corr_vae": _nan_corr(measured_vae, opening),
            **_corr_by_identity(measured, opening, None if identities is None else np.asarray(identities)[clip_of])}


def _named(specs: list[str]) -> dict:
    """["name=path", "path"] -> {name: path} (a bare path is named after its folder)."""
    import os
    return dict(s.split("=", 1) if "=" in s else (os.path.basename(os.path.dirname(s)) or s, s) for s in specs)


def print_rows(rows: dict) -> None:
    keys = list(next(iter(rows.values())))
    widths = [max(len(k), 8) + 2 for k in keys]
    print(f"{'':<16}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    for name, r in rows.items():
        print(f"{name:<16}" + "".join(f"{r[k]:>{w}.3f}" if isinstance(r[k], float) else f"{r[k]:>{w}}"
                                      for k, w in zip(keys, widths)))


def main_vae(args) -> dict:
    from train import clip_paths, load_frames
    vae = load_model(args.ckpt, "vae")
    size = vae.cfg.resolution
    paths = clip_paths(args.data, "test", args.clips)
    frames, P = load_frames(paths, size, "cache", vae.cfg.face_iod)
    masks = np.stack([landmarks.mouth_mask(p, (size, size)) for p in P])
    opening = np.array([landmarks.mouth_opening(p) / landmarks.inter_ocular(p) for p in P])
    identity = np.repeat(*clip_identities(paths))
    identity = identity if len(identity) == len(P) else None  # a video shorter than its landmarks: no split
    return {"vae": evaluate_vae(vae, frames, masks, opening, identity, upscale=args.upscale)}


def main_l2i(args) -> dict:
    from l2i import L2IFrames, L2ILatents
    from train import clip_paths
    vae = load_model(args.vae, "vae")
    rows, paths = {}, clip_paths(args.data, "test", args.clips)
    datasets, identities = {}, clip_identities(paths)[0]
    for name, path in _named(args.ckpt).items():
        model = load_model(path, "l2i")
        c = model.cfg
        key = (c.image_size, c.tau_max, c.mask_expand, c.face_iod)
        if key not in datasets:
            frames = L2IFrames(paths, c.image_size, c.tau_min, c.tau_max, train=False, mask_expand=c.mask_expand,
                               face_iod=c.face_iod)
            datasets[key] = L2ILatents(frames, vae)
        rows[name] = evaluate_l2i(model, vae, datasets[key], args.every, steps=args.steps, seed=args.seed,
                                  guidance=args.guidance, identities=identities, upscale=args.upscale)
        print(name, rows[name], flush=True)
    return rows


def main_sample(args) -> dict:
    """sample.py on held-out test clips: face = the clip's first frame, audio = its sentence."""
    import os
    import tempfile
    import time

    import cv2
    import soundfile

    import data
    import sample
    from train import clip_paths
    rows = {}
    paths = clip_paths(args.data, "test", args.clips)[: args.videos]
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            clip = data.load_clip(path)
            face, wav, out = (os.path.join(tmp, n) for n in ("face.png", "speech.wav", "out.mp4"))
            frame = data.read_frames(path[:-4] + ".mp4")[0]
            cv2.imwrite(face, frame[..., ::-1])
            soundfile.write(wav, clip["audio"], clip["sample_rate"])
            start = time.process_time()
            sample.main([wav, face, "--out", out] + args.sample_args)
            cpu = time.process_time() - start
            video = data.read_frames(out)
            truth = clip["landmarks"]
            opening = landmarks.mouth_opening(truth) / landmarks.inter_ocular(truth)
            measured = measured_opening(video, detect_size=max(256, video.shape[1]), upscale=args.upscale)
            seconds = len(clip["audio"]) / clip["sample_rate"]
            rows[os.path.basename(path)] = {"frames": len(video), "opening_corr": _nan_corr(measured, opening),
                                            "detected": float(np.isfinite(measured).mean()),
                                            "cpu_s_per_audio_s": cpu / seconds}
            print(os.path.basename(path), rows[os.path.basename(path)], flush=True)
    rows["mean"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    v = sub.add_parser("vae", help="reconstruction PSNR (frame, mouth box) on held-out clips")
    v.add_argument("--ckpt", default="runs/vae/ckpt.pt")
    i = sub.add_parser("l2i", help="mouth PSNR vs copy-the-reference and MediaPipe opening on held-out clips")
    i.add_argument("--ckpt", nargs="+", default=["runs/l2i/ckpt.pt"], help="name=path or path, one or more")
    i.add_argument("--vae", default="runs/vae/ckpt.pt")
    i.add_argument("--every", type=int, default=4, help="evaluate every n-th frame")
    s = sub.add_parser("sample", help="the whole cascade on held-out faces and sentences")
    s.add_argument("--videos", type=int, default=4, help="held-out clips to dub")
    s.add_argument("sample_args", nargs=argparse.REMAINDER, help="passed on to sample.py (after --)")
    for q in (v, i, s):
        q.add_argument("--data", default=None, help="held-out clips folder (default: synthetic test split)")
        q.add_argument("--clips", type=int, default=20, help="synthetic held-out clips")
        q.add_argument("--json", default=None, help="write the metrics here")
        q.add_argument("--upscale", choices=sorted(UPSCALE), default="cubic", help="interpolation that upscales "
                       "frames before MediaPipe detection; on soft 64 px frames the opening correlation moves by "
                       "a few hundredths between them, either way (README 'VAE and L2I')")
    for q in (i,):
        q.add_argument("--guidance", type=float, default=None, help="classifier-free guidance on the landmarks "
                       "(default: the config's)")
        q.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's)")
        q.add_argument("--seed", type=int, default=0)
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
    if args.stage != "a2l":
        if getattr(args, "sample_args", None) and args.sample_args[0] == "--":
            args.sample_args = args.sample_args[1:]
        rows = {"vae": main_vae, "l2i": main_l2i, "sample": main_sample}[args.stage](args)
        print_rows(rows)
        if args.json:
            atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=2)))
        return

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
