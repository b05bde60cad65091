"""neutral.NeutralFace: the neutral face of one frame, from a linear identity + articulation face model."""
import numpy as np
import torch

import landmarks
from neutral import NeutralFace


def _faces(rng, identities, frames, basis, base, shapes, size=0.05, jitter=0.002):
    """Clips of a linear face model: identity offsets about `base` along the rows of `shapes` (plus a little
    isotropic `jitter`, what no training identity spans) + articulation along the rows of `basis` (size)."""
    D = basis.shape[1]
    out = []
    for k in range(identities):
        face = base + rng.normal(size=len(shapes)) @ shapes + jitter * rng.normal(size=D)
        c = size * rng.normal(size=(frames, len(basis)))
        out.append(((face + c @ basis).reshape(frames, D // 3, 3), f"id{k}", face))
    return out


def test_recovers_held_out_identities_neutral_face():
    rng = np.random.default_rng(0)
    D = 60
    basis = np.linalg.qr(rng.normal(size=(D, 3)))[0].T                      # 3 orthonormal articulation modes
    base, shapes = rng.normal(size=D), 0.1 * rng.normal(size=(5, D))   # identities vary in 5 directions
    train = _faces(rng, 12, 50, basis, base, shapes)
    model = NeutralFace(D, modes=3, noise=1e-4)
    model.fit((P, identity) for P, identity, _ in train)
    assert bool(model.fitted)
    span = model.modes.numpy().astype(np.float64) @ basis.T                 # the fitted modes span the true ones
    assert np.allclose(np.linalg.svd(span)[1], 1.0, atol=1e-3)
    raw, neutral = [], []
    for P, _, face in _faces(rng, 5, 20, basis, base, shapes):                             # held-out identities
        n = model(torch.from_numpy(P.astype(np.float32))).numpy().reshape(len(P), D)
        raw.append(np.abs(P.reshape(len(P), D) - face).mean())
        neutral.append(np.abs(n - face).mean())
    assert np.mean(neutral) < 0.2 * np.mean(raw), (np.mean(neutral), np.mean(raw))


def test_unfitted_or_modeless_model_returns_its_input():
    P = torch.randn(4, 20, 3)
    assert torch.equal(NeutralFace(60, modes=3, noise=1e-4)(P), P)
    model = NeutralFace(60, modes=0, noise=1e-4)
    model.fit([(P.numpy(), "a"), (P.numpy() + 1, "b")])
    assert torch.equal(model(P), P)


def test_state_dict_round_trip_keeps_the_fit():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(30, 2)))[0].T
    model = NeutralFace(30, modes=2, noise=1e-4)
    model.fit((P, identity) for P, identity, _ in _faces(rng, 6, 20, basis, rng.normal(size=30), rng.normal(size=(2, 30))))
    copy = NeutralFace(30, modes=2, noise=1e-4)
    copy.load_state_dict(model.state_dict())
    P = torch.randn(3, 10, 3)
    assert torch.equal(copy(P), model(P)) and not torch.equal(model(P), P)


def test_a2l_samples_from_the_neutral_face_of_its_p_bar_and_old_checkpoints_have_none():
    import a2l
    torch.manual_seed(0)
    model = a2l.A2L(a2l.A2LConfig(width=32, pairs=1, heads=2, window=16, overlap=4, num_train_timesteps=50,
                                  sample_steps=2, neutral_modes=3)).eval()
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(1434, 3)))[0].T
    template = np.asarray(landmarks.CANONICAL_TEMPLATE, np.float64).reshape(-1)
    model.neutral.fit((P, identity) for P, identity, _ in
                      _faces(rng, 6, 30, basis, template, 0.01 * rng.normal(size=(3, 1434))))
    mel = torch.randn(1, 16, model.config.ctx_mel_frames, model.config.n_mels)
    p_bar = torch.from_numpy((template.reshape(1, 478, 3) + 0.05 * rng.normal(size=(1, 478, 3))).astype(np.float32))
    out = model.sample_window(mel, p_bar, generator=torch.Generator().manual_seed(1))
    neutral = model.neutral(p_bar)
    assert not torch.allclose(neutral, p_bar)
    model.neutral = torch.nn.Identity()
    again = model.sample_window(mel, neutral, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)



def test_a2l_checkpoints_from_before_the_neutral_face_keep_p_bar_as_given(tmp_path):
    from dreamhead import default_checkpoint, load_model
    ckpt = torch.load(default_checkpoint("a2l"), weights_only=False)
    config = {k: v for k, v in ckpt["config"].items() if not k.startswith("neutral_")}
    old = {**ckpt, "config": config, "ema": {k: v for k, v in ckpt["ema"].items() if not k.startswith("neutral.")}}
    torch.save(old, tmp_path / "old.pt")
    model = load_model(str(tmp_path / "old.pt"), "a2l")
    assert model.config.neutral_modes == 0 and isinstance(model.neutral, torch.nn.Identity)
