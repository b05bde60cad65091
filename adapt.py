"""Per-photo adaptation: the L2I fine-tuned on the user's own face before it renders it (`sample.py --adapt`).

Not in the paper. DreamHead trains its L2I once, on HDTF and MEAD (hundreds of people), and renders any face with
it. Our tiny L2I has seen 16 synthetic faces, and on a real photo it paints the lower face as a soft blob that
follows the landmarks little and does not close in pauses (docs/experiments.md). Fine-tuning a diffusion model on
one subject is DreamBooth's recipe (Ruiz et al., CVPR 2023); per-person training is also how NeRF talking heads
work (AD-NeRF, Guo et al., ICCV 2021). The training pairs come from our synthetic renderer (`synth_face`)
applied to the photo itself: its face crop, warped onto the landmarks A2L makes from this photo's P̄ for
synthetic speech, with the mouth drawn inside the inner lips, gives frames of this face with exact landmarks for
the mouth shapes A2L will ask for. Each pair is made as sampling makes it: the photo and its canonical
landmarks are the reference pair [L2I: I_ref, I^P_ref], a warped frame is the target, and its mouth box joined
with the photo's is blacked out [L2I: I_mask]. The VAE is not touched; L2I's loss, classifier-free dropout
included, is the training one. The landmarks are made by the caller (`DreamHead.adapted`), which holds A2L.
"""
import copy

import cv2
import numpy as np
import torch
from tqdm import tqdm

import landmarks
from cli import UsageError
from common import lr_at, to_tensor_image
from l2i import _box_mask, condition_images, encode_conditions, reference_images
from synth_face import close_mouth, triangulate, warp_meshes
from synth_speech import SAMPLE_RATE, spoken_clip

RENDER_SIZE = 256  # the side the renderer warps the face crop at (as the synthetic clips'), then shrunk
FRAMES = 256  # adaptation frames: about 10 s of A2L's motion
SAMPLES_PER_FRAME = SAMPLE_RATE // 25


def synthetic_speech(frames: int, seed: int = 0) -> np.ndarray:
    """Utterances of synthetic speech (espeak-ng, the training voices) back to back, pauses included, cut to
    `frames` video frames: a float32 wave (frames x 640,) at 16 kHz, for A2L to drive the adaptation frames."""
    rng, parts, have = np.random.default_rng([seed, 16]), [], 0
    while have < frames * SAMPLES_PER_FRAME:
        parts.append(spoken_clip(rng, "train")[0])
        have += len(parts[-1])
    return np.concatenate(parts)[:frames * SAMPLES_PER_FRAME].astype(np.float32) / 32768


def photo_frames(crop: np.ndarray, mesh: np.ndarray, meshes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A face crop uint8 (R, R, 3) with its landmarks mesh (478, 3), warped onto each of meshes (N, 478, 3) (all in
    crop px) by the synthetic renderer, the mouth drawn inside the inner lips, and shrunk to `size`: uint8 (N,
    size, size, 3) and the meshes float32 (N, 478, 3) in size px."""
    R = crop.shape[0]
    if crop.shape != (R, R, 3) or np.shape(mesh) != (478, 3) or np.shape(meshes)[1:] != (478, 3):
        raise ValueError(f"need a square crop (R, R, 3), its mesh (478, 3) and meshes (N, 478, 3), got {crop.shape}, "
                         f"{np.shape(mesh)}, {np.shape(meshes)}")
    tex_mesh = np.asarray(mesh, np.float64)
    rendered = warp_meshes(crop.astype(np.float32), tex_mesh, close_mouth(tex_mesh), triangulate(tex_mesh, R),
                           np.asarray(meshes, np.float64), np.zeros((len(meshes), 5)), R)
    small = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in rendered])
    return small, (np.asarray(meshes) * (size / R)).astype(np.float32)


def training_pairs(vae, crop: np.ndarray, mesh: np.ndarray, hi_crop: np.ndarray, hi_mesh: np.ndarray,
                   hi_meshes: np.ndarray, expand: float) -> dict:
    """The latents of every adaptation pair: z0, mask, lmk (N, C, h, w), ref, ref_lmk (1, C, h, w) and the
    loss's mouth boxes (N, 1, S, S). crop uint8 (S, S, 3) / mesh (478, 3): the reference as sampling cuts it;
    hi_crop / hi_mesh: the same box at a higher resolution, which the renderer warps onto hi_meshes (N, 478, 3)."""
    size = crop.shape[0]
    talk, P = photo_frames(hi_crop, hi_mesh, hi_meshes, size)  # (N, S, S, 3), (N, 478, 3) model px
    boxes = landmarks.union_boxes(landmarks.mouth_boxes(mesh[None], size, expand),
                                  landmarks.mouth_boxes(P, size, expand))  # (N, 4), as Plan.chunks joins them
    images = condition_images(talk, boxes, landmarks.canonicalize(P)[0])
    cond = encode_conditions(vae, {**images, **reference_images(crop, landmarks.canonicalize(mesh)[0])})
    with torch.no_grad():
        cond["z0"] = torch.cat([vae.encode_latents(x) for x in to_tensor_image(talk).split(64)])
    cond["mouth"] = torch.from_numpy(np.stack([_box_mask(b, size) for b in boxes]))
    return cond


def adapt_l2i(l2i, vae, crop: np.ndarray, mesh: np.ndarray, hi_crop: np.ndarray, hi_mesh: np.ndarray,
              hi_meshes: np.ndarray, steps: int, lr: float = 1e-4, batch: int = 8, seed: int = 0,
              progress: bool = True):
    """A copy of `l2i` fine-tuned for `steps` AdamW steps (training's schedule, `common.lr_at`: linear warm-up over
    a tenth, cosine decay to a tenth) on the face warped onto hi_meshes (training_pairs), in eval mode; `l2i`
    itself is left as it was."""
    if steps < 1:
        raise UsageError(f"--adapt needs at least one step, got {steps}")
    device = next(l2i.parameters()).device
    pairs = {k: v.to(device) for k, v in training_pairs(vae, crop, mesh, hi_crop, hi_mesh, hi_meshes,
                                                         l2i.config.mask_expand).items()}
    model = copy.deepcopy(l2i).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup, gen = max(1, steps // 10), torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="adapt L2I to the face", unit="step", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        idx = torch.randint(len(pairs["z0"]), (batch,), generator=gen).to(device)
        cond = {k: v[idx] if len(v) > 1 else v.expand(batch, *v.shape[1:]) for k, v in pairs.items()}
        cond["seed"] = torch.randint(2**62, (batch,), generator=gen)
        loss, _ = model.loss(cond.pop("z0"), cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()
