"""Held-out evaluation of DreamHead's stages: `python evaluate.py a2l --ckpt runs/a2l/ckpt.pt [...]`.

The paper evaluates on HDTF/MEAD with lip-sync, stability and image-quality metrics (its tables are not
known to us, see docs/paper.md). Here each stage is measured on held-out synthetic
identities and sentences, whose ground truth is exact:

A2L ([A2L: P_0]), in canonical space (units of inter-ocular distance, IOD):
  - lip LMD: mean L2 distance of the 40 MediaPipe lip points to the truth, in % of IOD;
  - mouth-opening correlation: Pearson correlation of predicted and true inner-lip opening over time,
    per clip (mean over clips) and pooled over all frames;
  - jitter: mean |second difference over time| of all points (the paper credits diffusion with removing
    jitter), reported next to the ground truth's own jitter;
  beside two baselines: `static` (the subject's mean landmarks P̄ on every frame) and, with
  `--regressor CKPT`, the same network trained as a deterministic regressor (the diffusion-vs-regression
  ablation: `python train.py --stage a2l --objective regression --out runs/a2l_regression`); and the same
  with P̄ from one photo, as sample.py runs it (`*_photo`: the canonical mesh of the clip's first frame, whose
  mouth may be open), beside repeating that first frame (`repeat_frame0`).

VAE ([L2I: E], [L2I: D]): PSNR of reconstructions over the whole frame and inside the mouth box, and on the face
crops of real photos (`--real`, examples/real) MediaPipe's mouth opening before and after E -> D.

L2I ([L2I: eps_theta]), frames rendered from the ground-truth landmarks of held-out clips with a reference frame
tau_max frames earlier (so its mouth differs):
  - mouth-box PSNR against the truth, beside the baseline that copies the reference frame's mouth and the
    VAE's own reconstruction (the ceiling);
  - the mouth opening MediaPipe measures on the generated frames (upscaled before detection, `--upscale`)
    against the opening of the landmarks L2I was asked to render: Pearson correlation, and the detection rate.
  Several checkpoints side by side (`--ckpt name=path ...`) give the conditioning ablations.

Cascade (`sample`, [Cascade]): dreamhead.DreamHead on held-out faces and sentences, as sample.py runs it;
MediaPipe's mouth opening on the output video against the ground truth of the sentence, and seconds of compute
per second of audio.

`real`: real portraits and recorded speech (examples/real, no ground truth): MediaPipe's mouth opening on the
output against the speech envelope (best lag within 2 frames) and in pauses of 0.3 s or more against speech, the
same for A2L's landmarks, the mouth's fine detail against the face skin around it on the output and on the photo
(metrics.mouth_sharpness), and how far A2L's lip motion moves when the recording is 20 dB quieter or 10 dB louder
and clipped.

`report`: the cascade and each stage as talking-head papers report them, in one JSON and one markdown table
(docs/evaluation.md): PSNR and SSIM of face crops and mouth boxes, lip and full-face LMD after a similarity fit,
mouth-opening correlation, jitter, AV offset, silence ratio and DreamHead-FID (fid.py; not comparable with
Inception FID). `fid-net` trains the DreamHead-FID feature network (checkpoints/fid_tiny.pt).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import soundfile
import torch
from tqdm import tqdm

import clips
import fid
import landmarks
from a2l import A2LWindows, predict_clips
from cli import ArgumentParser, UsageError, float_flag, int_flag, nonnegative_float, print_rows, run_cli, \
    seed_flag
from audio import SAMPLE_RATE, Speech
from augment import loudness_copies
from common import atomic_write, save_png, to_tensor_image, to_uint8_image
from dreamhead import DETAIL, DreamHead, default_checkpoint, default_workers, load_face, load_model, share_cores
from l2i import L2IFrames, L2ILatents
from metrics import UPSCALE, av_offset, canonical_jitter, corr, corr_by_identity, detect_landmarks, finite_mean, \
    fitted_errors, fitted_lip_error, image_scores, landmark_metrics, lip_regions, measured_opening, motion_change, \
    mouth_sharpness, nan_corr, opening_per_iod, plot_opening, psnr, silence_ratio, skin_region, speech_envelope
from synth_clips import appearance_frames, clips_or_synthetic

FID_STILLS = 16  # stills per identity that train the DreamHead-FID network


def evaluate_a2l(models: dict, dataset, steps=None, seed=0, max_clips=None) -> tuple[dict, list[dict]]:
    """Metrics per method ({name: model}), plus `static` and `ground_truth` rows; also the first model's
    per-clip predictions (for plots)."""
    rows, first = {}, None
    for name, model in models.items():
        results = predict_clips(model, dataset, steps, seed, max_clips)
        first = first or results
        rows[name] = landmark_metrics([r["pred"] for r in results], [r["truth"] for r in results])
    truths = [r["truth"] for r in first]
    rows["static"] = landmark_metrics([np.broadcast_to(r["p_bar"], r["truth"].shape) for r in first], truths)
    rows["ground_truth"] = landmark_metrics(truths, truths)
    return rows, first


def format_table(rows: dict) -> str:
    gt_jitter = rows["ground_truth"]["jitter"]
    lines = [f"{'method':<18} {'lip LMD %IOD':>12} {'open corr':>10} {'pooled':>8} {'jitter':>9} {'jitter/GT':>9}"]
    for name, m in rows.items():
        lines.append(f"{name:<18} {m['lip_lmd_pct_iod']:>12.2f} {m['opening_corr']:>10.3f} "
                     f"{m['opening_corr_pooled']:>8.3f} {m['jitter']:>9.5f} {m['jitter'] / gt_jitter:>9.2f}")
    return "\n".join(lines)


def clip_identities(paths: list[str]) -> tuple[list[str], list[int]]:
    """The identity and the landmark frame count of each clip, each file read once."""
    loaded = [clips.load_clip(p) for p in paths]
    return [c["identity"] for c in loaded], [len(c["landmarks"]) for c in loaded]


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """E -> D of images (N, 3, S, S) in [-1, 1] (the posterior's mode), clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(b).mode()) for b in x.split(batch)]).clamp(-1, 1)


@torch.no_grad()
def evaluate_vae(vae, frames: np.ndarray, masks: np.ndarray, opening=None, identity=None, batch: int = 64,
                 upscale: str = "cubic") -> dict:
    """PSNR (dB) of E -> D reconstructions over the frame and inside the mouth box, (N, S, S, 3) uint8 frames;
    with the true openings (N,) also how well MediaPipe's opening on the reconstructions follows them (the
    ceiling of the L2I's opening correlation: L2I renders through this decoder), per identity (N,) if given."""
    x = to_tensor_image(np.asarray(frames))  # (N, 3, S, S)
    rec = reconstruct(vae, x, batch)
    row = psnr_row(rec, x, masks)
    if opening is not None:
        measured, opening = measured_opening(to_uint8_image(rec), upscale=upscale), np.asarray(opening)
        row["opening_corr"] = nan_corr(measured, opening)
        row.update(corr_by_identity(measured, opening, identity))
    return row


def psnr_row(rec: torch.Tensor, x: torch.Tensor, masks: np.ndarray) -> dict:
    """Frame count and PSNR of reconstructions rec against x (N, 3, S, S), whole and inside masks (N, S, S)."""
    m = torch.from_numpy(np.asarray(masks, np.float32))[:, None]  # (N, 1, S, S)
    return {"frames": len(x), "psnr": psnr(rec, x), "psnr_mouth": psnr(rec, x, mask=m)}


@torch.no_grad()
def render_l2i(model, vae, latents, every: int = 4, batch: int = 32, steps=None, seed: int = 0,
               guidance=None) -> dict:
    """Every `every`-th frame of the held-out items (an l2i.L2ILatents with train=False frames) rendered from its
    true landmarks: gen, truth, ref (the reference frame), rec (the VAE's reconstruction) as (N, 3, S, S) in
    [-1, 1], mouth (N, 1, S, S) masks, P (N, 478, 3) the true landmarks in frame px, and clip (N,) indices."""
    frames = latents.frames
    idx = list(range(0, len(latents), every))
    out = {k: [] for k in ("gen", "rec", "truth", "ref", "mouth", "P", "clip")}
    cfg = model.config
    z_T = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                      generator=torch.Generator().manual_seed(seed))
    for start in tqdm(range(0, len(idx), batch), desc="L2I", unit="batch", disable=len(idx) <= batch):
        items = [latents[i] for i in idx[start:start + batch]]
        cond = torch.utils.data.default_collate(items)
        z0 = model.sample(cond, steps=steps, guidance=guidance, z_T=z_T)  # (b, C, h, w)
        out["gen"].append(vae.decode_latents(z0).clamp(-1, 1))
        out["rec"].append(vae.decode_latents(cond["z0"]).clamp(-1, 1))
        out["mouth"].append(cond["mouth"])
        for it in items:
            clip = frames.clips[it["clip"]]
            out["truth"].append(to_tensor_image(clip["frames"][it["frame"]])[None])
            out["ref"].append(to_tensor_image(clip["frames"][it["ref_frame"]])[None])
            out["P"].append(clip["P_px"][it["frame"]][None])
            out["clip"].append(it["clip"])
    return {k: np.array(v) if k == "clip" else (np.concatenate(v) if k == "P" else torch.cat(v))
            for k, v in out.items()}


def evaluate_l2i(model, vae, latents, every: int = 4, batch: int = 32, steps=None, seed: int = 0,
                 guidance=None, identities=None, upscale: str = "cubic") -> dict:
    """Render every `every`-th frame of the held-out items from its true landmarks (render_l2i); PSNR in the mouth
    box beside copy-the-reference and the VAE ceiling; the MediaPipe opening measured on the generated, the true
    and the VAE-reconstructed frames (the last two bound what L2I can reach); with `identities` (one int per
    clip) the generated frames' correlation per identity too."""
    r = render_l2i(model, vae, latents, every, batch, steps, seed, guidance)
    gen, truth, mouth = r["gen"], r["truth"], r["mouth"]
    opening = opening_per_iod(r["P"])
    measured = measured_opening(to_uint8_image(gen), upscale=upscale)
    measured_truth = measured_opening(to_uint8_image(truth), upscale=upscale)
    measured_vae = measured_opening(to_uint8_image(r["rec"]), upscale=upscale)
    return {"frames": len(gen),
            "psnr_mouth": psnr(gen, truth, mask=mouth),
            "psnr_mouth_copy_ref": psnr(r["ref"], truth, mask=mouth),
            "psnr_mouth_vae": psnr(r["rec"], truth, mask=mouth),
            "psnr": psnr(gen, truth),
            "opening_corr": nan_corr(measured, opening),
            "detected": float(np.isfinite(measured).mean()),
            "opening_corr_truth_frames": nan_corr(measured_truth, opening),
            "opening_corr_vae": nan_corr(measured_vae, opening),
            **corr_by_identity(measured, opening, None if identities is None else np.asarray(identities)[r["clip"]])}


def _named(specs: list[str]) -> dict:
    """["name=path", "path"] -> {name: path} (a bare path is named after its folder)."""
    return dict(s.split("=", 1) if "=" in s else (os.path.basename(os.path.dirname(s)) or s, s) for s in specs)


def main_vae(args) -> dict:
    vae = load_model(args.ckpt, "vae")
    size = vae.config.resolution
    paths = clips_or_synthetic(args.data, "test", args.clips, poses=args.poses)
    frames, P = clips.clip_frames(paths, size, "cache", vae.config.face_iod)
    masks = np.stack([landmarks.mouth_mask(p, (size, size)) for p in P])
    opening = np.array([landmarks.mouth_opening(p) / landmarks.inter_ocular(p) for p in P])
    identity = np.repeat(*clip_identities(paths))
    identity = identity if len(identity) == len(P) else None  # a video shorter than its landmarks: no split
    rows = {"vae": evaluate_vae(vae, frames, masks, opening, identity, upscale=args.upscale)}
    return {**rows, **real_round_trips(vae, real_inputs(args.real)[0], args.upscale)} if args.real else rows


def real_round_trips(vae, photos: list[str], upscale: str = "cubic") -> dict:
    """The VAE's ceiling on real faces, a row per photo: its face crop (the VAE's framing) through E and D alone,
    PSNR and MediaPipe's mouth opening (/ IOD) before and after. No L2I on this VAE shows a mouth that D loses."""
    size, rows = vae.config.resolution, {}
    for path in photos:
        face = load_face(path)
        box = landmarks.face_crop_box(face.P[0], vae.config.face_iod or landmarks.FACE_IOD_FRACTION)  # (3,)
        crop = landmarks.crop_faces(face.frames[:1], box[None], size)  # (1, S, S, 3)
        mask = landmarks.mouth_mask(landmarks.to_crop(face.P[0], box, size), (size, size))[None]  # (1, S, S)
        x = to_tensor_image(crop)
        rec = reconstruct(vae, x)  # (1, 3, S, S)
        before, after = measured_opening(np.concatenate([crop, to_uint8_image(rec)]), upscale=upscale)
        rows[os.path.basename(path)] = {**psnr_row(rec, x, mask), "opening_crop": float(before),
                                        "opening_rec": float(after)}
    return rows


def main_l2i(args) -> dict:
    vae = load_model(args.vae, "vae")
    rows, paths = {}, clips_or_synthetic(args.data, "test", args.clips, poses=args.poses)
    datasets, identities = {}, clip_identities(paths)[0]
    for name, path in _named(args.ckpt).items():
        model = load_model(path, "l2i")
        c = model.config
        key = (c.image_size, c.tau_max, c.mask_expand, c.face_iod)
        if key not in datasets:
            frames = L2IFrames(paths, c.image_size, c.tau_min, c.tau_max, train=False, mask_expand=c.mask_expand,
                               face_iod=c.face_iod)
            datasets[key] = L2ILatents(frames, vae)
        rows[name] = evaluate_l2i(model, vae, datasets[key], args.every, steps=args.steps, seed=args.seed,
                                  guidance=args.guidance, identities=identities, upscale=args.upscale)
        print(name, rows[name], flush=True)
    return rows


def user_inputs(clip: dict, folder: str) -> tuple[str, str]:
    """What a user would give for a held-out clip: its first frame as a PNG and its sound as a wav (paths)."""
    face, wav = os.path.join(folder, "face.png"), os.path.join(folder, "speech.wav")
    save_png(face, clips.read_frames(clip["video"])[0])
    soundfile.write(wav, clip["audio"], clip["sample_rate"])
    return face, wav


def main_photo(args) -> dict:
    """A2L through the user path: each held-out clip's first frame as the photo and its sound, as sample.py gets
    them; the landmarks the cascade drives L2I with (sample.py --save-landmarks) against the clip's true ones,
    beside repeating the first frame and beside the truth's own motion on the mesh MediaPipe reads on the photo
    (`oracle_on_photo`: the floor the photo's detection sets). No frame is rendered."""
    model = DreamHead.from_checkpoints(args.a2l, args.vae, args.l2i, device="cpu")
    errors, repeat_errors, corrs, floors = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path in clips_or_synthetic(args.data, "test", args.clips, poses=args.poses):
            clip = clips.load_clip(path)
            face, wav = user_inputs(clip, tmp)
            pred = model.generate(wav, face, steps=args.steps, seed=args.seed).landmarks  # (T, 478, 3) photo px
            truth = clip["landmarks"][:len(pred)]
            error, opening = fitted_lip_error(pred, truth)
            repeat_error, _ = fitted_lip_error(np.broadcast_to(truth[:1], truth.shape), truth)
            floor_error, _ = fitted_lip_error(oracle_on_photo(face, truth), truth)
            errors.append(error.mean())
            repeat_errors.append(repeat_error.mean())
            floors.append(floor_error.mean())
            corrs.append(corr(opening, landmarks.mouth_opening(truth) / landmarks.inter_ocular(truth)))
    row = {"clips": len(errors), "lip_error_pct_iod": 100 * float(np.mean(errors)),
           "repeat_frame0_pct_iod": 100 * float(np.mean(repeat_errors)),
           "ratio_to_repeat": float(np.mean(errors) / np.mean(repeat_errors)),
           "opening_corr": float(np.nanmean(corrs)), "true_motion_on_photo_pct_iod": 100 * float(np.mean(floors)),
           "true_motion_ratio_to_repeat": float(np.mean(floors) / np.mean(repeat_errors))}
    return {"user_path": row}


def oracle_on_photo(face: str, truth: np.ndarray) -> np.ndarray:
    """A perfect A2L on the user path: the truth's canonical motion (T, 478, 3) added to the mesh MediaPipe reads
    on the photo, in the photo's pose; its error is what the photo's detection alone costs."""
    detected, pose = landmarks.canonicalize(landmarks.detect_image(landmarks.load_image_rgb(face))[None])
    canon, _ = landmarks.canonicalize(truth)
    return landmarks.uncanonicalize(detected + canon - canon[:1], pose)


def main_sample(args) -> dict:
    """The cascade on held-out test clips as sample.py runs it: face = the clip's first frame (as a PNG), audio =
    its sentence (as a wav); MediaPipe's opening on the written mp4 against the clip's true landmarks. CPU time
    per second of audio counts generation and writing, not loading the models (done once)."""
    model = DreamHead.from_checkpoints(args.a2l, args.vae, args.l2i)  # CUDA when present, as sample.py
    share_cores(default_workers(model.device))  # and its render workers, as sample.py
    rows = {}
    paths = clips_or_synthetic(args.data, "test", args.clips, poses=args.poses)[: args.videos]
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            clip = clips.load_clip(path)
            face, wav = user_inputs(clip, tmp)
            out = os.path.join(tmp, "out.mp4")
            start = time.process_time()
            talk = model.generate(wav, face, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                  crop_filter=args.crop_filter, detail=args.detail, adapt=args.adapt)
            model.write_video(out, talk)
            cpu = time.process_time() - start
            video = clips.read_frames(out)
            truth = clip["landmarks"]
            opening = landmarks.mouth_opening(truth) / landmarks.inter_ocular(truth)
            measured = measured_opening(video, detect_size=max(256, video.shape[1]), upscale=args.upscale)
            seconds = len(clip["audio"]) / clip["sample_rate"]
            rows[os.path.basename(path)] = {"frames": len(video), "opening_corr": nan_corr(measured, opening),
                                            "detected": float(np.isfinite(measured).mean()),
                                            "cpu_s_per_audio_s": cpu / seconds}
            print(os.path.basename(path), rows[os.path.basename(path)], flush=True)
    rows["mean"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    return rows


def main_a2l(args) -> dict:
    models = {"a2l": load_model(args.ckpt, "a2l")}
    if args.regressor:
        models["regressor"] = load_model(args.regressor, "a2l")
    cfg = models["a2l"].config
    paths = clips_or_synthetic(args.data, "test", args.clips, poses=args.poses)
    kw = dict(train=False, context_frames=cfg.context_frames, n_mels=cfg.n_mels)
    dataset = A2LWindows(paths, cfg.window, **kw)
    rows, results = evaluate_a2l(models, dataset, args.steps, args.seed)
    # what sample.py has: one photo, so P̄ is the canonical mesh of the clip's first frame
    photo_rows, _ = evaluate_a2l(models, A2LWindows(paths, cfg.window, p_bar="first_frame", **kw), args.steps,
                                 args.seed)
    rows.update({f"{name}_photo": photo_rows[name] for name in models})
    rows["repeat_frame0"] = photo_rows["static"]
    print(f"held-out clips: {len(dataset.clips)}, frames: {sum(len(c['P']) for c in dataset.clips)}")
    print(format_table(rows))
    if args.plot:
        plot_opening(results[0], args.plot, "held-out identity and sentence: mouth opening over time")
    return rows


# ------------------------------------------------------------------------------------------------------------
# real: real photos and recorded speech, no ground truth
# ------------------------------------------------------------------------------------------------------------

def real_inputs(folder: str) -> tuple[list[str], list[str]]:
    """The portraits (png, jpg) and recordings (wav, flac) of a folder of real inputs, sorted."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    photos = [os.path.join(folder, n) for n in names if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    voices = [os.path.join(folder, n) for n in names if n.lower().endswith((".wav", ".flac"))]
    if not photos or not voices:
        raise UsageError(f"{folder} needs at least one photo (png/jpg) and one recording (wav/flac); the shipped "
                         "set is examples/real")
    return photos, voices


def real_row(model, face, speech: Speech, photo: np.ndarray, args) -> tuple[dict, np.ndarray, np.ndarray]:
    """Measures of one photo and recording: MediaPipe's opening on the output against the speech envelope (best lag
    within 2 frames), pauses against speech, the same for A2L's landmarks, the mouth's sharpness against the face
    skin on the output and on the photo; also the frames and the pasted region."""
    talk = model.generate(speech, face, steps=args.steps, seed=args.seed, detail=args.detail)
    frames = np.concatenate(list(talk))                                   # (T, H, W, 3) at the photo's size
    envelope = speech_envelope(speech.wave(), SAMPLE_RATE, len(frames))
    measured = measured_opening(frames, detect_size=max(256, *frames.shape[1:3]))
    driving = opening_per_iod(talk.landmarks)                             # (T,) A2L's, before rendering
    pasted = (frames != photo).any(axis=(0, -1))                          # (H, W): where the mouth was pasted
    skin = skin_region(pasted, face.P[0])
    lips = lip_regions(np.concatenate([face.P[:1], talk.landmarks]), photo.shape[:2])  # (1 + T, H, W): photo, frames
    row = {"frames": len(frames), "envelope_corr": av_offset(measured, envelope, max_lag=2)[1],
           "pause_ratio": silence_ratio(measured, envelope),
           "landmarks_envelope_corr": av_offset(driving, envelope, max_lag=2)[1],
           "landmarks_pause_ratio": silence_ratio(driving, envelope),
           "sharpness": float(mouth_sharpness(frames, lips[1:], skin).mean()),
           "photo_sharpness": float(mouth_sharpness(photo[None], lips[0], skin)[0]),
           "detected": float(np.isfinite(measured).mean())}
    samples, rate = soundfile.read(speech.path, dtype="float32", always_2d=True)  # (S, channels)
    for name, wave in zip(("quiet", "loud_clipped"), loudness_copies(samples)):  # -20 dB; +10 dB clipped
        variant = Speech(wave, rate, name=speech.path)
        row[f"{name}_change"] = motion_change(opening_per_iod(model.generate(variant, face, steps=args.steps,
                                                                             seed=args.seed).landmarks), driving)
    return row, frames, pasted


def mouth_strip(photo: np.ndarray, frames: np.ndarray, region: np.ndarray, count: int = 6) -> np.ndarray:
    """The photo and `count` frames spread over the clip, cut to the square around `region`: (s, (count + 1) s, 3)."""
    spans = [np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))]  # its rows, its columns
    side = min(max(a[-1] - a[0] + 1 for a in spans), *region.shape)
    y0, x0 = (int(np.clip((a[0] + a[-1] + 1 - side) // 2, 0, n - side)) for a, n in zip(spans, region.shape))
    crop = np.s_[y0:y0 + side, x0:x0 + side]
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.concatenate([photo[crop]] + [frames[i][crop] for i in picks], axis=1)


def main_real(args) -> dict:
    """The cascade on real portraits and recorded speech (`--inputs`, every photo with every recording)."""
    photos, voices = real_inputs(args.inputs)
    model = DreamHead.from_checkpoints(args.a2l, args.vae, args.l2i, device="cpu")
    rows, strip = {}, None
    for photo_path in photos:
        face = load_face(photo_path)
        # the VAE's ceiling: MediaPipe's mouth opening on the photo and on its round trip through E and D alone
        photo_opening, round_trip_opening = measured_opening(np.stack([face.frames[0], model.round_trip(face)]),
                                                             detect_size=max(256, *face.frames.shape[1:3]))
        adapted = model.adapted(face, args.adapt, seed=args.seed) if args.adapt else model  # once per photo
        for voice in voices:
            name = f"{os.path.basename(photo_path)} + {os.path.basename(voice)}"
            rows[name], frames, region = real_row(adapted, face, Speech(voice), face.frames[0], args)
            rows[name].update(photo_opening=float(photo_opening), round_trip_opening=float(round_trip_opening))
            strip = mouth_strip(face.frames[0], frames, region) if strip is None else strip
            print(name, rows[name], flush=True)
    rows["mean"] = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    if args.strip:
        save_png(args.strip, strip)
    return rows


# ------------------------------------------------------------------------------------------------------------
# report: the cascade and each stage measured as talking-head papers report them
# ------------------------------------------------------------------------------------------------------------

REPORT_COLUMNS = {"cascade": "cascade (photo + audio)", "a2l": "A2L", "vae": "VAE", "l2i": "L2I (true landmarks)",
                  "real_frames": "real frames (MediaPipe)", "ground_truth": "ground truth"}
REPORT_METRICS = {  # key: (label, decimals)
    "psnr_face": ("PSNR face crop (dB)", 2), "ssim_face": ("SSIM face crop", 3),
    "psnr_mouth": ("PSNR mouth box (dB)", 2), "ssim_mouth": ("SSIM mouth box", 3),
    "fid": ("DreamHead-FID (not comparable with Inception FID)", 2),
    "lip_lmd_pct_iod": ("lip LMD (% IOD, similarity-fitted)", 2),
    "face_lmd_pct_iod": ("full-face LMD (% IOD, similarity-fitted)", 2),
    "opening_corr": ("mouth-opening correlation", 3), "jitter": ("jitter (canonical, IOD / frame^2)", 4),
    "av_offset_frames": ("AV offset (frames, + = mouth late)", 2), "av_offset_abs_frames": ("abs AV offset (frames)", 2),
    "av_corr": ("AV correlation at the offset", 3), "silence_ratio": ("silence ratio (pause / speech opening)", 3),
    "detected": ("MediaPipe detection rate", 3)}


def report_paths(args) -> list[str]:
    """The held-out clips: --data's (a prepared folder's test split), else the synthetic test split; at most
    --clips."""
    return clips_or_synthetic(args.data, "test", args.clips, poses=args.poses)[:args.clips]


def image_row(gen: np.ndarray, truth: np.ndarray, P: np.ndarray) -> dict:
    """PSNR and SSIM of generated against true face crops uint8 (N, S, S, 3), whole and inside the mouth box of
    the true landmarks P (N, 478, 3) in crop px."""
    boxes = [landmarks.mouth_box(p, gen.shape[1:3]) for p in P]
    face, mouth = image_scores(gen, truth), image_scores(gen, truth, boxes)
    return {"psnr_face": face["psnr"], "ssim_face": face["ssim"], "psnr_mouth": mouth["psnr"],
            "ssim_mouth": mouth["ssim"]}


def sequence_row(pred: np.ndarray, truth: np.ndarray, envelope: np.ndarray | None, fps: float = 25.0) -> dict:
    """The landmark measures of one clip: pred (T, 478, 3) (NaN rows: no face found) against truth (T, 478, 3),
    both in one space; with the speech envelope (T,) also the AV offset and the silence ratio."""
    lip, face, _ = fitted_errors(pred, truth)
    measured = opening_per_iod(pred)
    row = {"lip_lmd_pct_iod": 100 * finite_mean(lip), "face_lmd_pct_iod": 100 * finite_mean(face),
           "opening_corr": nan_corr(measured, opening_per_iod(truth)), "jitter": canonical_jitter(pred),
           "detected": float(np.isfinite(pred).all(axis=(1, 2)).mean())}
    if envelope is not None:
        lag, r = av_offset(measured, envelope)
        row.update(av_offset_frames=lag, av_offset_abs_frames=abs(lag), av_corr=r,
                   silence_ratio=silence_ratio(measured, envelope, fps))
    return row


def without_detection(row: dict) -> dict:
    """A sequence_row of landmarks that were given, not detected: no detection rate to report."""
    return {k: v for k, v in row.items() if k != "detected"}


def mean_rows(rows: list[dict]) -> dict:
    """The mean of each measure over clips, leaving NaN out (NaN when every clip has NaN)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: finite_mean([r.get(k, np.nan) for r in rows]) for k in keys}


def envelope_of(clip: dict, frames: int) -> np.ndarray:
    return speech_envelope(clip["audio"], clip["sample_rate"], frames, clip["fps"])


def cascade_clip(model, clip: dict, folder: str, args) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """One held-out clip through the cascade as sample.py runs it (its first frame as the photo, its sound):
    (measures, the same landmark measures of MediaPipe on the real frames, output face crops, true face crops),
    the crops uint8 (T, S, S, 3) framed like L2I's. The truth is the clip's landmarks."""
    start = time.time()
    face, wav = user_inputs(clip, folder)
    talk = model.generate(wav, face, steps=args.steps, guidance=args.guidance, seed=args.seed)
    video = np.concatenate(list(talk))  # (T, H, W, 3)
    seconds = time.time() - start
    true_crops, P_crop = clips.decoded_clip(clip, model.size, model.face_iod)  # (T', S, S, 3), crop px
    T = min(len(video), len(true_crops))
    out_crops = landmarks.crop_faces(video[:T], talk.plan.boxes[talk.plan.source[:T]], model.size)
    H, W = clip["frame_size"]
    truth = clip["landmarks"][:T] * np.array([video.shape[2] / W, video.shape[1] / H, video.shape[2] / W])
    detect_size, envelope = max(256, video.shape[2]), envelope_of(clip, T)
    detected = detect_landmarks(video[:T], detect_size, args.upscale)
    row = {**image_row(out_crops, true_crops[:T], P_crop[:T]), **sequence_row(detected, truth, envelope, clip["fps"]),
           "frames": T, "seconds_generate": seconds, "seconds_per_audio_second": seconds / talk.seconds}
    real_video = clips.read_frames(clip["video"], (video.shape[2], video.shape[1]))[:T]  # at the output's size
    real = detect_landmarks(real_video, detect_size, args.upscale)
    return row, sequence_row(real, truth, envelope, clip["fps"]), out_crops, true_crops[:T]


def stage_a2l(path, loaded: list[dict], paths: list[str], args) -> dict:
    """A2L alone (P̄: the identity's mean mesh, as in training): canonical landmarks against the truth."""
    model = load_model(path, "a2l")
    cfg = model.config
    dataset = A2LWindows(paths, cfg.window, train=False, context_frames=cfg.context_frames, n_mels=cfg.n_mels)
    results = predict_clips(model, dataset, args.steps, args.seed)
    rows = [without_detection(sequence_row(r["pred"], r["truth"], envelope_of(c, len(r["truth"])), c["fps"]))
            for r, c in zip(results, loaded)]
    truths = [r["truth"] for r in results]
    pooled = landmark_metrics([r["pred"] for r in results], truths)["opening_corr_pooled"]
    gt = [without_detection(sequence_row(t, t, envelope_of(c, len(t)), c["fps"])) for t, c in zip(truths, loaded)]
    return {"a2l": {**mean_rows(rows), "opening_corr_pooled": pooled}, "ground_truth_canonical": mean_rows(gt)}


def stage_vae(vae, loaded: list[dict], net) -> dict:
    """E -> D reconstructions of every frame, in the VAE's framing, against the frames."""
    pairs = [clips.decoded_clip(c, vae.config.resolution, vae.config.face_iod) for c in loaded]
    truth, P = np.concatenate([f for f, _ in pairs]), np.concatenate([p for _, p in pairs])
    rec = to_uint8_image(reconstruct(vae, to_tensor_image(truth)))
    return {**image_row(rec, truth, P), "fid": fid.fid(rec, truth, net), "frames": len(truth)}


def stage_l2i(l2i, vae, paths: list[str], net, args) -> dict:
    """L2I alone: every --every-th frame rendered from its true landmarks (render_l2i), MediaPipe on the result
    against the landmarks it was asked to render."""
    c = l2i.config
    frames = L2IFrames(paths, c.image_size, c.tau_min, c.tau_max, train=False, mask_expand=c.mask_expand,
                       face_iod=c.face_iod)
    r = render_l2i(l2i, vae, L2ILatents(frames, vae), args.every, steps=args.steps, seed=args.seed,
                   guidance=args.guidance)
    gen, truth = to_uint8_image(r["gen"]), to_uint8_image(r["truth"])
    detected = detect_landmarks(gen, upscale=args.upscale)
    row = sequence_row(detected, r["P"].astype(np.float64), None)
    row.pop("jitter")  # every --every-th frame: no motion to measure
    return {**image_row(gen, truth, r["P"]), **row, "fid": fid.fid(gen, truth, net), "frames": len(gen)}


def halves_fid(crops: np.ndarray, net, seed: int = 0) -> float:
    """DreamHead-FID of the true face crops (N, S, S, 3) split at random into two halves: the floor that two sets
    of real frames with the same identities reach (clips split by clip would compare other identity mixes)."""
    order = np.random.default_rng(seed).permutation(len(crops))
    return fid.fid(crops[order[: len(crops) // 2]], crops[order[len(crops) // 2:]], net)


def markdown_table(report: dict) -> str:
    """The report as a markdown table: a row per measure, a column per evaluated part ("-" where it does not
    apply)."""
    cols = [k for k in REPORT_COLUMNS if k in report]
    lines = ["| measure | " + " | ".join(REPORT_COLUMNS[k] for k in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, (label, decimals) in REPORT_METRICS.items():
        cells = [report[k].get(key) for k in cols]
        if all(v is None for v in cells):
            continue
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.{decimals}f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def json_safe(value):
    """NaN and infinity -> None (null), so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def main_report(args) -> dict:
    """The cascade on each held-out clip with sound, then A2L, the VAE and L2I alone; writes --json and --table."""
    started = time.time()
    net = fid.load_feature_net(args.fid_net)
    model = DreamHead.from_checkpoints(args.a2l, args.vae, args.l2i)  # CUDA when present, as sample.py
    share_cores(default_workers(model.device))
    paths = report_paths(args)
    loaded = [clips.load_clip(p) for p in paths]
    voiced = [i for i, c in enumerate(loaded) if bool(c.get("has_audio", True))]
    if not voiced:
        raise UsageError(f"none of the {len(paths)} clips has sound; the report needs clips with audio")
    rows, real_rows, out_crops, true_crops = {}, [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(voiced, desc="cascade", unit="clip"):
            row, real, out, truth = cascade_clip(model, loaded[i], tmp, args)
            rows[os.path.basename(paths[i])] = row
            real_rows.append(real)
            out_crops.append(out)
            true_crops.append(truth)
    cascade_seconds = time.time() - started
    report = {"cascade": {**mean_rows(list(rows.values())),
                          "fid": fid.fid(np.concatenate(out_crops), np.concatenate(true_crops), net)}}
    cpu = {k: load_model(getattr(args, k) or default_checkpoint(k), k) for k in ("vae", "l2i")}  # the stages on CPU
    stage_a2l_rows = stage_a2l(args.a2l or default_checkpoint("a2l"), [loaded[i] for i in voiced],
                               [paths[i] for i in voiced], args)
    report["a2l"] = stage_a2l_rows["a2l"]
    report["vae"] = stage_vae(cpu["vae"], loaded, net)
    report["l2i"] = stage_l2i(cpu["l2i"], cpu["vae"], paths, net, args)
    truth_rows = [without_detection(sequence_row(c["landmarks"], c["landmarks"], envelope_of(c, len(c["landmarks"])),
                                                 c["fps"])) for c in (loaded[i] for i in voiced)]
    report["ground_truth"] = {**mean_rows(truth_rows), "fid": halves_fid(np.concatenate(true_crops), net)}
    report["real_frames"] = mean_rows(real_rows)
    report["ground_truth_canonical"] = stage_a2l_rows["ground_truth_canonical"]
    report["per_clip"] = rows
    report["settings"] = {"clips": len(paths), "clips_with_sound": len(voiced), "data": args.data or "synthetic test",
                          "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "every": args.every,
                          "fid_net": args.fid_net, "seconds_cascade": cascade_seconds,
                          "seconds_per_clip_cascade": cascade_seconds / len(voiced),
                          "seconds_total": time.time() - started}
    table = markdown_table(report)
    print(table)
    if args.table:
        atomic_write(args.table, lambda tmp: open(tmp, "w").write(table))
    return json_safe(report)


def main_fid_net(args) -> dict:
    """Train the DreamHead-FID feature network (fid.py) on stills of `--identities` synthetic identities (none of
    the 20 clip identities), 16 face crops each, framed like the L2I's crops (landmarks.FACE_IOD_FRACTION)."""
    start = time.time()
    frames = appearance_frames(args.identities, FID_STILLS, fid.SIZE, seed=args.seed,
                               face_iod=landmarks.FACE_IOD_FRACTION)
    labels = np.repeat(np.arange(args.identities), FID_STILLS)
    net, record = fid.train_feature_net(frames, labels, args.steps, args.batch, seed=args.seed)
    record.update(identities=args.identities, stills=FID_STILLS, seed=args.seed, seconds=round(time.time() - start))
    fid.save_feature_net(net, args.out, record)
    print(f"wrote {args.out}: {record}")
    return {"fid_net": record}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    a = sub.add_parser("a2l", help="lip LMD, mouth-opening correlation and jitter on held-out clips")
    a.add_argument("--ckpt", default="runs/a2l/ckpt.pt", help="The A2L checkpoint.")
    a.add_argument("--regressor", default=None, help="Checkpoint of the same network trained with --objective "
                   "regression (the ablation).")
    a.add_argument("--plot", default=None, help="PNG of predicted against true mouth opening of the first clip.")
    v = sub.add_parser("vae", help="reconstruction PSNR (frame, mouth box) on held-out clips")
    v.add_argument("--ckpt", default="runs/vae/ckpt.pt", help="The VAE checkpoint.")
    v.add_argument("--real", default="examples/real", help="Folder of real photos whose face crops also go through "
                   "the VAE (PSNR, MediaPipe's mouth opening on crop and reconstruction); '' skips them.")
    i = sub.add_parser("l2i", help="mouth PSNR vs copy-the-reference and MediaPipe opening on held-out clips")
    i.add_argument("--ckpt", nargs="+", default=["runs/l2i/ckpt.pt"], help="L2I checkpoints, name=path or path.")
    i.add_argument("--vae", default="runs/vae/ckpt.pt", help="The VAE the L2I checkpoints were trained on.")
    i.add_argument("--every", type=int_flag(1), default=4, help="Evaluate every n-th frame.")
    o = sub.add_parser("photo", help="A2L through the user path: one photo, as sample.py --save-landmarks")
    s = sub.add_parser("sample", help="the whole cascade on held-out faces and sentences")
    s.add_argument("--videos", type=int_flag(1), default=4, help="Held-out clips to dub.")
    e = sub.add_parser("real", help="real portraits and recorded speech: opening against the speech envelope, "
                       "pauses, mouth sharpness, loudness robustness")
    e.add_argument("--inputs", default="examples/real", help="Folder of real photos (png, jpg) and recordings (wav, "
                   "flac); every photo is dubbed with every recording.")
    e.add_argument("--strip", default=None, help="PNG: the first photo beside six output frames, around the mouth.")
    for q in (s, e):
        q.add_argument("--detail", type=nonnegative_float, default=DETAIL, help="Size in generated px below which "
                       "the photo's own detail, warped onto the driving landmarks, goes into the pasted mouth, as "
                       "sample.py --detail (0: off).")
        q.add_argument("--adapt", type=int_flag(0), default=0, help="Steps of fine-tuning L2I on each photo first, "
                       "as sample.py --adapt (0: off).")
    s.add_argument("--crop-filter", choices=("bilinear", "area"), default="bilinear", help="How the face crop is "
                   "shrunk to the model's size, as sample.py --crop-filter.")
    f = sub.add_parser("fid-net", help="train the DreamHead-FID feature network (not comparable with Inception FID)")
    f.add_argument("--out", default="checkpoints/fid_tiny.pt", help="Where the network's checkpoint goes.")
    f.add_argument("--identities", type=int_flag(2), default=256, help="Synthetic identities to tell apart.")
    f.add_argument("--steps", type=int_flag(1), default=800, help="Optimizer steps.")
    f.add_argument("--batch", type=int_flag(2), default=64, help="Face crops per step.")
    f.add_argument("--seed", type=seed_flag, default=1, help="Seed of the identities and of the training.")
    r = sub.add_parser("report", help="the cascade and each stage on held-out clips: PSNR, SSIM, LMD, sync, "
                       "jitter, silence, DreamHead-FID; JSON and a markdown table")
    r.add_argument("--every", type=int_flag(1), default=2, help="L2I alone renders every n-th frame.")
    r.add_argument("--fid-net", default="checkpoints/fid_tiny.pt", help="The DreamHead-FID feature network.")
    r.add_argument("--table", default=None, help="Write the markdown table to this file.")
    for q, stage in ((q, stage) for q in (o, s, e, r) for stage in ("a2l", "vae", "l2i")):
        q.add_argument(f"--{stage}", default=None, help=f"The {stage.upper()} checkpoint; by default the shipped one.")
    for q in (a, v, i, s, o, r):
        q.add_argument("--data", default=None, help="Folder of held-out clips (of a prepared folder, its test split); "
                       "by default the synthetic test split.")
        q.add_argument("--poses", default="small", choices=("small", "wide"), help="Head motion of the synthetic "
                       "held-out clips: small (as the shipped models saw) or wide (the posed split).")
        q.add_argument("--clips", type=int_flag(1), default=20, help="Synthetic held-out clips.")
    for q in (a, v, i, s, o, r, e, f):
        q.add_argument("--json", default=None, help="Write the results to this JSON file.")
    for q in (v, i, s, r):
        q.add_argument("--upscale", choices=sorted(UPSCALE), default="cubic", help="Interpolation that upscales "
                       "frames before MediaPipe detection; on soft 64 px frames the opening correlation moves by a "
                       "few hundredths between them, either way (docs/experiments.md).")
    for q in (a, i, s, o, r, e):
        q.add_argument("--steps", type=int_flag(1), default=None, help="DDIM steps; by default the config's.")
        q.add_argument("--seed", type=seed_flag, default=0, help="Seed of the sampling noise.")
    for q in (i, s, r):
        q.add_argument("--guidance", type=float_flag, default=None, help="Classifier-free guidance scale; by default "
                       "the config's.")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = {"a2l": main_a2l, "vae": main_vae, "l2i": main_l2i, "sample": main_sample, "photo": main_photo,
           "real": main_real, "fid-net": main_fid_net, "report": main_report}
    rows = run[args.stage](args)
    if args.stage not in ("a2l", "fid-net", "report"):
        print_rows(rows)
    if args.json:
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=2)))


if __name__ == "__main__":
    run_cli(main)
