"""Tests for l2i.py: the landmark-to-image latent diffusion stage (paper Fig. 2)."""
import numpy as np
import pytest
import torch

import clips
import common
import l2i
import landmarks
import vae

S = 8  # latent side of the test model



def small_config(**overrides) -> l2i.L2IConfig:
    """The tiny preset shrunk further (8x8 latents, 16/32 channels) so the tests stay fast."""
    cfg = l2i.L2IConfig.preset("tiny")
    small = dict(latent_size=S, channels=(16, 32), attn_resolutions=(S // 2,), num_train_timesteps=100)
    fields = {**small, **overrides}
    return l2i.L2IConfig(**{**cfg.to_dict(), **fields})


def make_model(**overrides) -> l2i.L2I:
    """Small L2I with the zero-initialised layers randomised, so every path carries signal."""
    torch.manual_seed(0)
    cfg = small_config(**overrides)
    model = l2i.L2I(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    return model.eval()


def make_cond(batch: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, 4, S, S, generator=g) for k in l2i.COND_KEYS}


def eps_of(model, z, t, cond):
    with torch.no_grad():
        return model.unet(z, t, cond)


MODES = [(mode, ref) for mode in l2i.CONDITIONINGS for ref in (True, False)]


def test_tiny_preset_shapes_and_channel_counts():
    cfg = l2i.L2IConfig.preset("tiny")
    assert (cfg.image_size, cfg.latent_size, cfg.conditioning) == (64, 16, "joint_attn")
    model = l2i.L2I(cfg).eval()
    cond = {k: torch.randn(2, 4, 16, 16) for k in l2i.COND_KEYS}
    with torch.no_grad():
        assert model.unet(torch.randn(2, 4, 16, 16), 10, cond).shape == (2, 4, 16, 16)
    assert model.unet.conv_in.in_channels == 8
    assert l2i.L2I(l2i.L2IConfig(conditioning="channel")).unet.conv_in.in_channels == 20
    assert l2i.L2I(l2i.L2IConfig(conditioning="channel", use_reference=False)).unet.conv_in.in_channels == 12
    paper = l2i.L2IConfig.preset("paper")
    assert (paper.image_size, paper.latent_size, paper.channels) == (256, 32, (128, 256, 512, 512))


@pytest.mark.parametrize("conditioning,use_reference", MODES)
def test_unet_output_shape_all_modes(conditioning, use_reference):
    model = make_model(conditioning=conditioning, use_reference=use_reference)
    cond = make_cond(3)
    if not use_reference:
        cond = {k: v for k, v in cond.items() if k not in l2i.REFERENCE_KEYS}
    eps = eps_of(model, torch.randn(3, 4, S, S), torch.tensor([0, 500, 999]), cond)
    assert eps.shape == (3, 4, S, S)
    assert torch.isfinite(eps).all()
    expected_slots = (4 if use_reference else 2) if conditioning == "joint_attn" else 1
    assert model.unet.n_slots == expected_slots


def test_missing_condition_and_bad_shape_raise():
    model = make_model()
    cond = make_cond(2)
    del cond["ref"]
    with pytest.raises(ValueError, match="ref"):
        eps_of(model, torch.randn(2, 4, S, S), 10, cond)
    with pytest.raises(ValueError, match="z_t"):
        eps_of(model, torch.randn(2, 4, S, S + 1), 10, make_cond(2))
    with pytest.raises(ValueError, match="unknown L2IConfig preset"):
        l2i.L2IConfig.preset("huge")


@pytest.mark.parametrize("conditioning", l2i.CONDITIONINGS)
def test_landmark_input_changes_target_output(conditioning):
    model = make_model(conditioning=conditioning)
    z, cond = torch.randn(2, 4, S, S), make_cond(2)
    base = eps_of(model, z, 300, cond)
    for key in ("lmk", "ref", "ref_lmk"):
        changed = dict(cond, **{key: cond[key] + 1.0})
        assert (eps_of(model, z, 300, changed) - base).abs().max() > 1e-4, key


def test_joint_attn_slots_meet_only_in_attention(monkeypatch):
    """With attention disabled the landmark slot cannot reach slot 0: convs really act per slot."""
    model = make_model()
    monkeypatch.setattr(l2i.SlotAttention, "forward", lambda self, x, n_slots, context=None: x)
    z, cond = torch.randn(2, 4, S, S), make_cond(2)
    base = eps_of(model, z, 300, cond)
    changed = eps_of(model, z, 300, dict(cond, lmk=cond["lmk"] + 1.0))
    torch.testing.assert_close(changed, base)


def test_ref_attn_conditions_meet_the_frame_only_in_attention(monkeypatch):
    """ref_attn: with the context taken out of every attention layer, no condition but the mask reaches eps."""
    model = make_model(conditioning="ref_attn")
    z, cond = torch.randn(2, 4, S, S), make_cond(2)
    real_forward = l2i.SlotAttention.forward
    monkeypatch.setattr(l2i.SlotAttention, "forward", lambda self, x, n_slots, context=None: real_forward(self, x, 1))
    base = eps_of(model, z, 300, cond)
    for key in ("lmk", "ref", "ref_lmk"):
        torch.testing.assert_close(eps_of(model, z, 300, dict(cond, **{key: cond[key] + 1.0})), base)
    assert (eps_of(model, z, 300, dict(cond, mask=cond["mask"] + 1.0)) - base).abs().max() > 1e-4


def test_ref_attn_context_computed_once_matches_per_step():
    """Sampling encodes the conditions once for all steps; passing that context equals recomputing it, and a
    video's batch-1 reference is encoded once and broadcast (a view)."""
    model = make_model(conditioning="ref_attn")
    z, cond = torch.randn(3, 4, S, S), make_cond(3)
    cond.update(ref=cond["ref"][:1], ref_lmk=cond["ref_lmk"][:1])
    encoder, batches = model.unet.cond_encoder, []
    real_encode = encoder.encode
    encoder.encode = lambda x, k: batches.append(len(x)) or real_encode(x, k)
    with torch.no_grad():
        context = model.unet.condition_context(cond, 3)
        torch.testing.assert_close(model.unet(z, 500, cond, context), eps_of(model, z, 500, cond))
    assert batches[:3] == [1, 1, 3]  # ref, ref_lmk once per video, lmk per frame
    assert set(context) == {S, S // 2} and context[S].shape == (3, 3, 16, S, S)
    torch.testing.assert_close(context[S][:, 0], context[S][:1, 0].expand(3, 16, S, S))


def test_dropping_other_slots_after_last_attention_is_exact():
    """Slots 1..S-1 are cut after the last attention layer (a speed-up); the eps must be unchanged."""
    model = make_model(attn_resolutions=())  # attention only in the middle block: the whole up path is pruned
    z, cond = torch.randn(2, 4, S, S), make_cond(2)
    pruned = eps_of(model, z, 300, cond)
    for m in model.modules():
        if isinstance(m, l2i.SlotAttention):
            m.prune_after = False
    outputs = []
    model.unet.conv_out.register_forward_hook(lambda module, args, out: outputs.append(out))
    unpruned = eps_of(model, z, 300, cond)
    n = model.unet.n_slots
    assert outputs[0].shape == (2 * n, 4, S, S)  # really ran all slots to the end
    torch.testing.assert_close(unpruned, pruned, atol=1e-5, rtol=1e-5)


def test_samples_do_not_mix_across_batch():
    model = make_model()
    z, cond = torch.randn(3, 4, S, S), make_cond(3)
    base = eps_of(model, z, 300, cond)
    lmk = cond["lmk"].clone()
    lmk[2] += 1.0
    out = eps_of(model, z, 300, dict(cond, lmk=lmk))
    torch.testing.assert_close(out[:2], base[:2], atol=1e-5, rtol=1e-5)
    assert (out[2] - base[2]).abs().max() > 1e-4


@pytest.mark.parametrize("conditioning", l2i.CONDITIONINGS)
def test_batch1_reference_broadcast_matches_repeat(conditioning):
    model = make_model(conditioning=conditioning)
    z, cond = torch.randn(3, 4, S, S), make_cond(3)
    shared = {"ref": cond["ref"][:1], "ref_lmk": cond["ref_lmk"][:1]}
    repeated = {k: v.repeat(3, 1, 1, 1) for k, v in shared.items()}
    out_broadcast = eps_of(model, z, 700, {**cond, **shared})
    out_repeat = eps_of(model, z, 700, {**cond, **repeated})
    torch.testing.assert_close(out_broadcast, out_repeat)
    expanded = model.unet.expand_cond({**cond, **shared}, 3)
    assert expanded["ref"].data_ptr() == shared["ref"].data_ptr()  # a view, not a copy


def test_drop_landmarks_gives_null_for_dropped_samples():
    model = make_model()
    cond = make_cond(4)
    drop = torch.tensor([True, False, True, False])
    out = model.drop_landmarks(cond, drop)
    for k in l2i.LANDMARK_KEYS:
        torch.testing.assert_close(out[k][drop], model.null_lmk.expand(2, 4, S, S))
        torch.testing.assert_close(out[k][~drop], cond[k][~drop])
    for k in ("mask", "ref"):
        assert out[k] is cond[k]


def test_loss_with_full_cfg_dropout_feeds_null(monkeypatch):
    model = make_model(cfg_dropout=1.0).train()
    seen = {}
    real_forward = model.unet.forward

    def spy(z_t, t, cond):
        seen.update(cond)
        return real_forward(z_t, t, cond)

    monkeypatch.setattr(model.unet, "forward", spy)
    cond = make_cond(2)
    _, logs = model.loss(torch.randn(2, 4, S, S), cond)
    assert logs["cfg_drop_frac"] == 1.0
    for k in l2i.LANDMARK_KEYS:
        torch.testing.assert_close(seen[k], model.null_lmk.expand(2, 4, S, S))
    torch.testing.assert_close(seen["ref"], cond["ref"])


def test_mouth_weight_changes_loss_only_when_not_one():
    model = make_model(mouth_loss_weight=5.0)
    z0, cond = torch.randn(2, 4, S, S), make_cond(2)
    mouth = torch.zeros(2, 1, 32, 32)
    mouth[:, :, 20:28, 10:22] = 1.0
    torch.manual_seed(3)
    plain, _ = model.loss(z0, cond)
    torch.manual_seed(3)
    weighted, _ = model.loss(z0, dict(cond, mouth=mouth))
    assert torch.isfinite(weighted) and not torch.isclose(plain, weighted)


@pytest.mark.parametrize("conditioning", l2i.CONDITIONINGS)
def test_loss_decreases_when_overfitting(conditioning):
    """One fixed batch with fixed noise and timesteps (same seed every step): the loss must fall."""
    torch.manual_seed(0)
    model = l2i.L2I(small_config(conditioning=conditioning, num_train_timesteps=1000)).train()
    z0, cond = torch.randn(4, 4, S, S), make_cond(4)

    def seeded_loss():
        torch.manual_seed(123)
        return model.loss(z0, cond)

    with torch.no_grad():
        before = seeded_loss()[0].item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(30):
        loss, logs = seeded_loss()
        assert np.isfinite(logs["loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = seeded_loss()[0].item()
    assert after < 0.5 * before, (before, after)


def test_sample_shape_finite_and_deterministic():
    model = make_model()
    cond = make_cond(3)
    cond["ref"], cond["ref_lmk"] = cond["ref"][:1], cond["ref_lmk"][:1]  # shared reference
    a = model.sample(cond, steps=4, generator=torch.Generator().manual_seed(7))
    b = model.sample(cond, steps=4, generator=torch.Generator().manual_seed(7))
    c = model.sample(cond, steps=4, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 4, S, S) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("guidance,calls_per_step", [(1.0, 1), (2.0, 2)])
def test_guidance_one_skips_unconditional_pass(guidance, calls_per_step):
    model = make_model()
    calls = []
    model.unet.register_forward_hook(lambda module, args, out: calls.append(args[2]["lmk"]))
    out = model.sample(make_cond(2), steps=3, guidance=guidance, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert len(calls) == 3 * calls_per_step
    if guidance != 1.0:
        assert calls[1] is model.null_lmk


# ---------------------------------------------------------------------------------------------------------------
# Data and paste-back


def synthetic_clip(T=6, hw=(96, 80), seed=0):
    """The canonical template face placed in (H, W) frames and moving a little; random pixels."""
    rng = np.random.default_rng(seed)
    H, W = hw
    face = landmarks.CANONICAL_TEMPLATE * np.float32(0.3 * W) + np.array([W / 2, H / 2, 0], np.float32)
    jitter = rng.normal(0, 0.3, (T, 478, 3)).astype(np.float32)
    shift = np.array([1.0, 0.5, 0], np.float32) * np.arange(T, dtype=np.float32)[:, None, None]
    frames = rng.integers(30, 256, size=(T, H, W, 3), dtype=np.uint8)
    return {"frames": frames, "landmarks": face + shift + jitter}  # landmarks (T, 478, 3) px


def test_l2i_frames_items():
    clip = synthetic_clip()
    ds = l2i.L2IFrames([clip, synthetic_clip(seed=1)], size=32, tau_min=1, tau_max=2, train=True)
    assert len(ds) == 12
    for idx in range(len(ds)):
        item = ds[idx]
        for k in ("target", "mask", "ref", "ref_lmk", "lmk"):
            assert item[k].shape == (3, 32, 32) and item[k].dtype == torch.float32, k
            assert item[k].min() >= -1 and item[k].max() <= 1, k
        assert 1 <= abs(item["ref_frame"] - item["frame"]) <= 2
        inside = item["mouth"][0] > 0
        assert 0.02 < inside.float().mean() < 0.5  # a lower-face box, not the whole frame
        assert (item["mask"][:, inside] == -1).all()  # black box
        torch.testing.assert_close(item["mask"][:, ~inside], item["target"][:, ~inside])
        clip_data = ds.clips[item["clip"]]
        torch.testing.assert_close(item["lmk"], common.to_tensor_image(clip_data["lmk_images"][item["frame"]]))
        torch.testing.assert_close(item["ref"], common.to_tensor_image(clip_data["frames"][item["ref_frame"]]))
    P_canon, _ = landmarks.canonicalize(clip["landmarks"][3])
    torch.testing.assert_close(ds[3]["lmk"], common.to_tensor_image(l2i.landmark_image(P_canon, 32)))
    assert (ds[3]["lmk"] < 1).any()  # something was drawn on the white canvas


def test_l2i_frames_from_video_scales_landmarks(tmp_path):
    clip = synthetic_clip(T=4, hw=(64, 64))
    video = str(tmp_path / "clip.mp4")
    clips.write_mp4(video, clip["frames"])
    from_video = l2i.L2IFrames([{"video": video, "landmarks": clip["landmarks"], "frame_size": 64}], 32, 1, 1,
                               train=False)
    from_array = l2i.L2IFrames([clip], 32, 1, 1, train=False)
    assert len(from_video) == 4 and from_video[0]["target"].shape == (3, 32, 32)
    torch.testing.assert_close(from_video[1]["mouth"], from_array[1]["mouth"])
    np.testing.assert_allclose(from_video.clips[0]["P_px"], clip["landmarks"] * 0.5, rtol=1e-6)


def test_l2i_frames_eval_is_deterministic_and_checks_input():
    ds = l2i.L2IFrames([synthetic_clip()], size=32, tau_min=1, tau_max=3, train=False)
    assert [ds[i]["ref_frame"] for i in range(6)] == [3, 4, 5, 0, 1, 2]
    bad = synthetic_clip()
    bad["landmarks"] = bad["landmarks"][:-3]  # a frame or two may differ (decoders), three may not
    with pytest.raises(ValueError, match="landmarks"):
        l2i.L2IFrames([bad], size=32, tau_min=1, tau_max=2)


def test_l2i_latents_match_encoding_the_images():
    torch.manual_seed(0)
    ae = vae.AutoencoderKL(vae.VAEConfig(resolution=32, base_channels=16, norm_groups=8)).eval().requires_grad_(False)
    frames = l2i.L2IFrames([synthetic_clip(T=5)], size=32, tau_min=2, tau_max=2, train=False)
    cached = l2i.L2ILatents(frames, ae, batch_size=2)
    assert len(cached) == 5
    for idx in (0, 4):
        item, images = cached[idx], frames[idx]
        assert item["ref_frame"] == images["ref_frame"]
        with torch.no_grad():
            for key, image_key in [("z0", "target"), *((k, k) for k in l2i.COND_KEYS)]:
                expected = ae.encode_latents(images[image_key][None])[0]
                torch.testing.assert_close(item[key], expected, atol=1e-5, rtol=1e-4, msg=key)
        torch.testing.assert_close(item["mouth"], images["mouth"])
    batch = torch.utils.data.default_collate([cached[0], cached[1]])
    model = l2i.L2I(small_config())
    loss, _ = model.loss(batch["z0"], batch)
    assert torch.isfinite(loss)


def test_condition_images_match_training_items():
    """Inference conditions (shared reference, A2L-style canonical input) are built like training items."""
    clip = synthetic_clip(T=5, hw=(32, 32))
    ds = l2i.L2IFrames([clip], size=32, tau_min=3, tau_max=3, train=False)
    P_canon, _ = landmarks.canonicalize(clip["landmarks"])
    boxes = [landmarks.mouth_box(p, (32, 32), 0.15) for p in clip["landmarks"]]
    cond = {**l2i.condition_images(clip["frames"], boxes, P_canon), **l2i.reference_images(clip["frames"][0], P_canon[0])}
    assert cond["mask"].shape == (5, 3, 32, 32) and cond["ref"].shape == (1, 3, 32, 32)
    item = ds[3]  # reference = frame 0
    for k in l2i.COND_KEYS:
        torch.testing.assert_close(cond[k][0 if k.startswith("ref") else 3], item[k], msg=k)
    ae = vae.AutoencoderKL(vae.VAEConfig(resolution=32, base_channels=16, norm_groups=8)).eval().requires_grad_(False)
    latents = l2i.encode_conditions(ae, cond, batch_size=2)
    assert set(latents) == set(l2i.COND_KEYS)
    assert latents["lmk"].shape == (5, 4, 8, 8) and latents["ref"].shape == (1, 4, 8, 8)


def test_paste_back_keeps_outside_pixels():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[10:20, 8:24] = 0.5
    mask[12:18, 10:22] = 1.0
    out = l2i.paste_back(generated, source, mask)
    assert out.dtype == np.uint8 and out.shape == source.shape
    np.testing.assert_array_equal(out[:, mask == 0], source[:, mask == 0])
    np.testing.assert_array_equal(out[:, mask == 1], generated[:, mask == 1])
    half = (source[:, mask == 0.5].astype(np.float32) + generated[:, mask == 0.5]) / 2
    assert np.abs(out[:, mask == 0.5] - half).max() <= 0.5
    np.testing.assert_array_equal(l2i.paste_back(generated[0], source[0], mask), out[0])
    with pytest.raises(ValueError):
        l2i.paste_back(generated[:, :16], source, mask)


def test_image_tensor_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = common.to_tensor_image(img)
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(common.to_uint8_image(x), img)


def test_l2i_frames_face_crops_from_arrays_and_video(tmp_path):
    clip = synthetic_clip(T=4, hw=(128, 128))
    video = str(tmp_path / "clip.mp4")
    clips.write_mp4(video, clip["frames"])
    kw = dict(size=32, tau_min=1, tau_max=1, train=False, face_iod=0.4)
    from_array = l2i.L2IFrames([clip], **kw)
    from_video = l2i.L2IFrames([{"video": video, "landmarks": clip["landmarks"], "frame_size": 128}], **kw)
    for ds in (from_array, from_video):
        assert ds[0]["target"].shape == (3, 32, 32)
        np.testing.assert_allclose(landmarks.inter_ocular(ds.clips[0]["P_px"]), 0.4 * 32, rtol=0.03)  # box smoothed
    torch.testing.assert_close(from_video[1]["mouth"], from_array[1]["mouth"])
    whole = l2i.L2IFrames([clip], size=32, tau_min=1, tau_max=1, train=False)
    assert landmarks.inter_ocular(whole.clips[0]["P_px"]).mean() < 0.35 * 32  # the face fills less of the frame
