"""adapt.py: the L2I fine-tuned on one photo, on frames the synthetic renderer warps from it (sample.py --adapt)."""
import cv2
import numpy as np
import pytest
import torch

import adapt
import landmarks
import l2i
import vae
from cli import UsageError
from dreamhead import load_face

S = 32  # the test models' image side


@pytest.fixture(scope="module")
def photo():
    """The example face cut as the shipped L2I cuts it, at 128 px (the renderer's side) and at S px, with its
    true landmarks in both (examples/truth.npz, frame 0), and three driving meshes: closed, half and wide open."""
    face = load_face("examples/face.png")
    truth = np.load("examples/truth.npz")["landmarks"]
    box = landmarks.clip_face_boxes(face.P, landmarks.FACE_IOD_FRACTION)[:1]
    opening = landmarks.mouth_opening(truth) / landmarks.inter_ocular(truth)
    picks = [int(np.argmin(opening)), int(np.argsort(opening)[len(opening) // 2]), int(np.argmax(opening))]
    return {"hi": landmarks.crop_faces(face.frames[:1], box, 128)[0],
            "hi_mesh": landmarks.to_crop(truth[:1], box, 128)[0],
            "crop": landmarks.crop_faces(face.frames[:1], box, S)[0],
            "mesh": landmarks.to_crop(truth[:1], box, S)[0],
            "hi_meshes": landmarks.to_crop(truth[picks], np.repeat(box, 3, 0), 128), "opening": opening[picks]}


def tiny_models():
    torch.manual_seed(0)
    ae = vae.AutoencoderKL(vae.VAEConfig(resolution=S, base_channels=16, norm_groups=8)).eval().requires_grad_(False)
    cfg = l2i.L2IConfig.preset("tiny")
    cfg = l2i.L2IConfig(**{**cfg.to_dict(), "conditioning": "channel", "image_size": S, "latent_size": S // 4,
                           "channels": (16, 32), "attn_resolutions": (S // 8,), "num_train_timesteps": 100})
    return l2i.L2I(cfg).eval(), ae


def test_photo_frames_warp_the_face_onto_each_mesh_and_draw_the_open_mouth(photo):
    frames, P = adapt.photo_frames(photo["hi"], photo["hi_mesh"], photo["hi_meshes"], S)
    assert frames.shape == (3, S, S, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(P, photo["hi_meshes"] * (S / 128), rtol=1e-5)
    hi, _ = adapt.photo_frames(photo["hi"], photo["hi_mesh"], photo["hi_meshes"], 128)
    # away from the mouth the photo stays where it was; inside the widest inner lips the drawn cavity is dark
    x0, y0, x1, y1 = landmarks.mouth_box(photo["hi_mesh"], (128, 128), 0.3)
    still = np.ones((128, 128), bool)
    still[y0:y1, x0:x1] = False
    assert np.abs(hi[0].astype(int) - photo["hi"].astype(int))[still].mean() < 6
    inner = np.zeros((128, 128), np.uint8)
    ring = photo["hi_meshes"][2][list(landmarks.INNER_LIP_RING), :2]
    cv2.fillPoly(inner, [np.round(ring).astype(np.int32)], 1)
    assert photo["opening"][2] > 0.15 and inner.sum() > 20
    assert hi[2][inner > 0].mean() < hi[0][inner > 0].mean() - 40
    with pytest.raises(ValueError, match="square crop"):
        adapt.photo_frames(photo["hi"][:, :100], photo["hi_mesh"], photo["hi_meshes"], S)


def test_adapt_l2i_fine_tunes_a_copy_towards_the_face_and_is_deterministic(photo):
    model, ae = tiny_models()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = (model, ae, photo["crop"], photo["mesh"], photo["hi"], photo["hi_mesh"], photo["hi_meshes"])
    pairs = adapt.training_pairs(ae, *args[2:], model.config.mask_expand)
    assert pairs["z0"].shape == (3, 4, S // 4, S // 4) and pairs["ref"].shape == (1, 4, S // 4, S // 4)
    assert pairs["mouth"].shape == (3, 1, S, S) and (pairs["mouth"].sum((1, 2, 3)) > 0).all()

    def loss(m):  # the training loss on fixed noise, timesteps and no condition dropout
        torch.manual_seed(1)
        cond = {k: v.expand(6, *v.shape[1:]) if len(v) == 1 else v.repeat(2, 1, 1, 1) for k, v in pairs.items()}
        with torch.no_grad():
            return m.loss(cond.pop("z0"), {**cond, "seed": torch.arange(6)})[0].item()
    tuned = adapt.adapt_l2i(*args, steps=40, lr=1e-3, batch=4, seed=3, progress=False)
    assert not tuned.training and tuned is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the given model is untouched
    assert loss(tuned) < 0.9 * loss(model)  # 40 steps on three frames: 0.98 -> 0.82 here
    again = adapt.adapt_l2i(*args, steps=40, lr=1e-3, batch=4, seed=3, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    with pytest.raises(UsageError, match="at least one step"):
        adapt.adapt_l2i(*args, steps=0)


def test_synthetic_speech_fills_the_frames_with_speech_and_pauses():
    wave = adapt.synthetic_speech(100, seed=2)
    assert wave.shape == (100 * 640,) and wave.dtype == np.float32 and np.abs(wave).max() <= 1
    rms = np.sqrt((wave.reshape(100, 640) ** 2).mean(1))
    assert (rms > 0.01).mean() > 0.3 and (rms < 1e-4).any()
    np.testing.assert_array_equal(wave, adapt.synthetic_speech(100, seed=2))
