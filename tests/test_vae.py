"""Tests for vae.py: the KL autoencoder (frozen E / D of the L2I stage), its loss, data wrapper and PSNR."""
import json
import math

import cv2
import numpy as np
import pytest
import torch


import synth_clips
from common import to_tensor_image, to_uint8_image
from metrics import psnr
from common import SampleRandom
from vae import (AutoencoderKL, DiagonalGaussian, FrameDataset, PatchDiscriminator, VAEConfig,
                 discriminator_loss, mouth_weight_map, sobel_edges, vae_loss, weighted_mean)


def small_cfg(**kw):
    """A very small f = 4 config for fast CPU tests."""
    base = dict(resolution=32, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                disc_channels=8, disc_layers=2)
    base.update(kw)
    return VAEConfig(**base)


def smooth_images(n, size, seed=0):
    """Structured images in [-1, 1]: colour gradients plus a disc, (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        a = torch.rand(3, 3, generator=g) * 2 - 1
        c = torch.rand(2, generator=g) - 0.5
        disc = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.15).float()
        img = a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + a[:, 2, None, None] * disc
        imgs.append(img.clamp(-1, 1))
    return torch.stack(imgs)


# ---- config ---------------------------------------------------------------------------------------------

def test_presets_and_unknown_preset():
    tiny, paper = VAEConfig.preset("tiny"), VAEConfig.preset("paper")
    assert (tiny.resolution, tiny.downsampling_factor, tiny.latent_shape) == (64, 4, (4, 16, 16))
    assert (paper.resolution, paper.downsampling_factor, paper.latent_shape) == (256, 8, (4, 32, 32))
    with pytest.raises(ValueError, match="tiny"):
        VAEConfig.preset("huge")


def test_config_roundtrip_through_json():
    cfg = VAEConfig.preset("tiny")
    back = VAEConfig(**json.loads(json.dumps(cfg.to_dict())))  # tuples come back as lists
    assert back == cfg


def test_config_rejects_bad_groups():
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(base_channels=20, norm_groups=8)


# ---- shapes ---------------------------------------------------------------------------------------------

def test_tiny_preset_shapes():
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig.preset("tiny"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 16, 16)
    x_rec, post2 = model(x)
    assert x_rec.shape == x.shape and isinstance(post2, DiagonalGaussian)
    assert model.decode(posterior.sample()).shape == (2, 3, 64, 64)


def test_factor8_paper_like_shapes():
    torch.manual_seed(0)
    cfg = VAEConfig(resolution=64, base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    norm_groups=8)
    model = AutoencoderKL(cfg)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = model.encode_latents(x)
    assert z.shape == (1, 4, 8, 8)
    assert model.decode_latents(z).shape == (1, 3, 64, 64)


def test_paper_preset_size_matches_sd_vae():
    """Same layout as SD's AutoencoderKL (83.65 M parameters); constructed, not run."""
    model = AutoencoderKL(VAEConfig.preset("paper"))
    n = sum(p.numel() for p in model.parameters())
    assert 83.0e6 < n < 84.5e6, n


# ---- posterior ------------------------------------------------------------------------------------------

def test_kl_zero_for_standard_normal_and_nonnegative():
    assert torch.allclose(DiagonalGaussian(torch.zeros(3, 8, 4, 4)).kl(), torch.zeros(3))
    params = torch.randn(3, 8, 4, 4) * 2
    post = DiagonalGaussian(params)
    kl = post.kl()
    assert kl.shape == (3,) and (kl > 0).all()
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-5)


def test_logvar_is_clamped():
    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(params)
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(-params).logvar.min().item() == -30.0


def test_sample_and_mode_statistics():
    mean = torch.full((4, 4, 32, 32), 1.5)
    logvar = torch.full_like(mean, math.log(0.25))
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mode(), mean)
    s = post.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 1.5) < 0.02 and abs(s.std().item() - 0.5) < 0.02
    s2 = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


# ---- scale factor and latent interface ------------------------------------------------------------------

def test_measure_scale_factor_gives_unit_std():
    torch.manual_seed(0)
    model = AutoencoderKL(small_cfg()).eval()
    x = smooth_images(6, 32)
    assert model.scale_factor.item() == 1.0
    scale = model.measure_scale_factor([x[:3], x[3:]])
    with torch.no_grad():
        z = model.encode_latents(x)
    assert abs(z.std().item() - 1.0) < 1e-3
    assert scale == pytest.approx(model.scale_factor.item())
    # already-encoded latents are accepted as they are
    assert model.measure_scale_factor(torch.randn(8, 4, 8, 8) * 3.0) == pytest.approx(1 / 3.0, rel=0.05)
    # the measured value travels with the weights
    fresh = AutoencoderKL(small_cfg())
    fresh.load_state_dict(model.state_dict())
    assert fresh.scale_factor.item() == pytest.approx(model.scale_factor.item())


def test_encode_decode_latents_consistent_with_scale_factor():
    torch.manual_seed(0)
    model = AutoencoderKL(small_cfg()).eval()
    x = smooth_images(2, 32)
    with torch.no_grad():
        ref = model.decode(model.encode(x).mode())
        model.scale_factor.fill_(0.25)
        z = model.encode_latents(x)
        assert torch.allclose(z, model.encode(x).mode() * 0.25)
        assert torch.allclose(model.decode_latents(z), ref, atol=1e-5)


def test_freeze_stops_gradients():
    model = AutoencoderKL(small_cfg()).eval().requires_grad_(False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---- losses ---------------------------------------------------------------------------------------------

def test_vae_loss_composition():
    torch.manual_seed(0)
    cfg = small_cfg(kl_weight=1e-2)
    model = AutoencoderKL(cfg)
    x = smooth_images(2, 32)
    loss, logs = vae_loss(model, x)
    assert set(logs) >= {"loss", "rec", "kl", "edge"}
    expected = logs["rec"] + cfg.kl_weight * logs["kl"] / (3 * 32 * 32)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None


def test_pixel_weight_is_a_weighted_mean_of_the_l1_error():
    model = AutoencoderKL(small_cfg(kl_weight=0.0))
    x = smooth_images(2, 32)

    def rec_loss(weight):  # the same posterior sample each time: the samples' seeds fix it
        return vae_loss(model, x, pixel_weight=weight, rng=SampleRandom([3, 4]))[1]["rec"]

    with torch.no_grad():
        noise = SampleRandom([3, 4]).randn(*model.config.latent_shape[:1], 8, 8)  # (2, C, 8, 8)
        err = (x - model(x, sample_posterior=True, noise=noise)[0]).abs().mean((0, 1))  # (32, 32)
    w = torch.ones(1, 1, 32, 32)
    w[..., :8, :] = 5.0  # the top rows count five times
    assert rec_loss(None) == pytest.approx(float(err.mean()), rel=1e-4)
    assert rec_loss(torch.full((1, 1, 32, 32), 3.0)) == pytest.approx(rec_loss(None), rel=1e-4)
    assert rec_loss(w) == pytest.approx(float((err * w[0, 0]).sum() / w.sum()), rel=1e-4)


def test_mouth_weight_map_marks_where_the_mouth_boxes_lie():
    P = synth_clips.make_clip(0, 0, "train", size=64, seconds=1.0)["landmarks"]  # (T, 478, 3) in 64 px
    w = mouth_weight_map(P, 64, 4.0)[0, 0]  # (64, 64)
    mouth = P[:, 13, :2].mean(0).round().astype(int)  # upper inner lip
    assert w.shape == (64, 64) and float(w.min()) == 1.0 and float(w.max()) <= 4.0
    assert float(w[mouth[1], mouth[0]]) == pytest.approx(4.0) and float(w[5, 5]) == 1.0
    assert torch.equal(mouth_weight_map(P, 64, 1.0), torch.ones(1, 1, 64, 64))


def test_sobel_edges():
    assert sobel_edges(torch.ones(1, 3, 8, 8)).abs().max().item() == 0.0
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]                  # (1, 1, 8, 8), +1 per column
    edges = sobel_edges(ramp)
    assert edges.shape == (1, 2, 8, 8)
    assert torch.allclose(edges[0, 0, :, 1:-1], torch.full((8, 6), -1.0))   # d/dx, interior
    assert torch.allclose(edges[0, 1], torch.zeros(8, 8))                     # d/dy


def test_discriminator_path_runs():
    torch.manual_seed(0)
    cfg = small_cfg(adversarial=True, disc_start=5, edge_weight=0.1)
    model, disc = AutoencoderKL(cfg), PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
    x = smooth_images(4, 32)
    assert disc(x).shape[:2] == (4, 1)
    # before disc_start: no adversarial term, discriminator step is a no-op
    loss, logs = vae_loss(model, x, disc=disc, step=0)
    assert "g_loss" not in logs
    d_loss, _ = discriminator_loss(model, disc, x, step=0)
    assert d_loss.item() == 0.0
    # after disc_start
    loss, logs, x_rec = vae_loss(model, x, disc=disc, step=5, return_rec=True)
    assert math.isfinite(logs["g_loss"]) and math.isfinite(logs["d_weight"]) and logs["d_weight"] >= 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    disc.zero_grad()
    d_loss, d_logs = discriminator_loss(model, disc, x, x_rec, step=5)
    assert math.isfinite(d_loss.item()) and d_loss.item() > 0
    d_loss.backward()
    assert disc.net[0].weight.grad.abs().sum() > 0


def test_disc_weight_map_restricts_both_players_to_the_weighted_patches():
    torch.manual_seed(0)
    cfg = small_cfg(adversarial=True, disc_start=0, disc_layers=1)
    model, disc = AutoencoderKL(cfg), PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
    x = smooth_images(2, 32)
    top = torch.zeros(1, 1, 32, 32)
    top[..., :16, :] = 1.0  # only the top half counts
    with torch.no_grad():
        x_rec = model(x, sample_posterior=False)[0]
        real, fake = disc(x), disc(x_rec)  # (2, 1, h, w), h even
    h = real.shape[-2] // 2
    d_loss, _ = discriminator_loss(model, disc, x, x_rec, weight_map=top)
    expected = 0.5 * ((1 - real[..., :h, :]).clamp(min=0).mean() + (1 + fake[..., :h, :]).clamp(min=0).mean())
    assert d_loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert discriminator_loss(model, disc, x, x_rec, weight_map=torch.full((1, 1, 32, 32), 2.0))[0].item() == \
        pytest.approx(discriminator_loss(model, disc, x, x_rec)[0].item(), rel=1e-5)
    assert weighted_mean(fake, top).item() == pytest.approx(float(fake[..., :h, :].mean()), rel=1e-5)


def test_short_overfit_raises_psnr():
    """150 Adam steps on 4 small images: PSNR must rise by more than 10 dB (about +20 dB measured)."""
    torch.manual_seed(0)
    cfg = small_cfg(resolution=16, attention=False)
    model = AutoencoderKL(cfg)
    x = smooth_images(4, 16, seed=1)
    with torch.no_grad():
        start = psnr(model(x, sample_posterior=False)[0], x)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for _ in range(150):
        loss, _ = vae_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = psnr(model(x, sample_posterior=False)[0], x)
    assert end > start + 10.0, (start, end)


# ---- data and metric ------------------------------------------------------------------------------------

def test_frame_dataset_range_and_flip():
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    frames[:, :, 0] = 255                                              # left column white
    ds = FrameDataset(frames, hflip=False)
    x = ds[(0, 0)]["x"]
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert x[:, :, 0].eq(1.0).all() and x[:, :, 1:].eq(-1.0).all()
    flipped = FrameDataset(frames, hflip=True).random_batch(64, torch.Generator().manual_seed(0))
    assert flipped.shape == (64, 3, 4, 6)
    left_white = flipped[:, 0, 0, 0] == 1.0
    right_white = flipped[:, 0, 0, -1] == 1.0
    assert left_white.any() and right_white.any() and (left_white ^ right_white).all()
    assert np.array_equal(to_uint8_image(to_tensor_image(frames)), frames)


def test_frame_dataset_items_are_functions_of_index_and_seed_across_several_arrays():
    a, b = (np.full((n, 8, 8, 3), v, np.uint8) for n, v in ((3, 10), (2, 200)))
    ds = FrameDataset([a, b], hflip=True, colour_jitter=0.5, crop_scale=0.5, size=4)
    assert len(ds) == 5 and ds.frame(2)[0, 0, 0] == 10 and ds.frame(3)[0, 0, 0] == 200
    assert torch.equal(ds[(4, 123)]["x"], ds[(4, 123)]["x"])  # what a DataLoader worker or a resumed run draws
    items = [ds[(1, s)]["x"] for s in range(20)]
    assert any(not torch.equal(items[0], x) for x in items[1:])  # the seed drives the augmentation


def test_frame_dataset_rejects_bad_frames():
    with pytest.raises(ValueError):
        FrameDataset(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        FrameDataset(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        FrameDataset(np.zeros((0, 4, 4, 3), np.uint8))


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x, x) == math.inf
    y = x + 0.1                                                        # MSE 0.01 -> 10 log10(4 / 0.01)
    assert psnr(x, y) == pytest.approx(10 * math.log10(400.0), abs=1e-6)
    assert psnr(x[0], y[0]) == pytest.approx(26.0206, abs=1e-4)
    per_image = psnr(x, torch.stack([x[0] + 0.1, x[1] + 0.2]), reduction="none")
    assert per_image.shape == (2,) and per_image[0] > per_image[1]
    # mask: error only outside the masked region -> perfect inside
    z = x.clone()
    z[:, :, :4] = 0.5
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1
    assert psnr(x, z, mask=mask) == math.inf
    assert psnr(x, z) == pytest.approx(10 * math.log10(4 / (0.25 / 2)), abs=1e-6)


def test_psnr_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(3, 16, 16, generator=g)).clamp(-1, 1)
    ref = metrics.peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=2.0)
    assert psnr(x, y) == pytest.approx(ref, abs=1e-4)


def test_bad_shapes_raise_value_error():
    model = AutoencoderKL(small_cfg())
    for bad in (torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 30, 30),
                torch.zeros(1, 3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            model.encode(bad)
    for bad in (torch.zeros(1, 3, 8, 8), torch.zeros(4, 8, 8)):
        with pytest.raises(ValueError):
            model.decode(bad)
        with pytest.raises(ValueError):
            model.decode_latents(bad)
    with pytest.raises(ValueError):
        DiagonalGaussian(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_colour_jitter_permutes_and_scales_channels_only_when_picked():
    from vae import jitter_colours
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=gen) * 2 - 1
    assert torch.equal(jitter_colours(x, 0.0, gen), x)
    y = jitter_colours(x, 1.0, gen)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean() > 0.9
    # every output channel is a scaled copy of one input channel: intensities (in [0, 1]) differ by a gain only
    for b in range(4):
        out = (y[b] + 1).flatten(1)  # (3, 16)
        src = (x[b] + 1).flatten(1)
        for c in range(3):
            free = out[c] < 2 - 1e-6  # pixels not clipped at white
            ratios = out[c, free][None] / src[:, free].clamp_min(1e-6)  # (3 in, F)
            assert (ratios.std(-1) < 1e-3).any() and free.sum() > 3


def test_natural_crops_are_deterministic_coloured_and_mixed_into_batches():
    from vae import natural_crops
    a, b = natural_crops(16, 64, seed=3), natural_crops(16, 64, seed=3)
    assert a.shape == (64, 16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, natural_crops(16, 64, seed=4))
    tinted = [c for c in a if not (np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 1], c[..., 2]))]
    assert len(tinted) == len(a)  # grayscale photos get a random tint: no crop stays gray
    frames = np.zeros((4, 16, 16, 3), np.uint8)  # all-black frames: any non-black pixel came from a photo
    all_photos = FrameDataset(frames, natural_mix=1.0).random_batch(8, torch.Generator().manual_seed(0))
    no_photos = FrameDataset(frames, natural_mix=0.0).random_batch(8, torch.Generator().manual_seed(0))
    assert (all_photos > -1).flatten(1).any(1).all() and (no_photos == -1).all()


def test_random_crops_cut_squares_of_the_stored_frame_and_resize_them():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[:, :, 16:] = 255  # left half black, right half white
    full = FrameDataset(frames, size=16).random_batch(4, torch.Generator().manual_seed(0))
    assert full.shape == (4, 3, 16, 16) and full[:, :, :, :7].max() == -1 and full[:, :, :, 9:].min() == 1
    crops = FrameDataset(frames, crop_scale=0.25, size=16).random_batch(64, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 16, 16)
    fraction_white = (crops > 0).float().mean((1, 2, 3))
    assert (fraction_white == 0).any() and (fraction_white == 1).any()  # small crops inside one half


def test_natural_crops_also_come_from_a_folder_of_photos(tmp_path):
    from cli import UsageError
    from vae import natural_crops
    (tmp_path / "sub").mkdir()
    red = np.zeros((80, 120, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk: pure red
    cv2.imwrite(str(tmp_path / "sub" / "red.png"), red)
    cv2.imwrite(str(tmp_path / "tiny.jpg"), red[:32, :32])  # under 64 px: left out
    (tmp_path / "notes.txt").write_text("not a photo")

    def pure_red(crops):
        return ((crops[..., 0] == 255).all(axis=(1, 2)) & (crops[..., 1:] == 0).all(axis=(1, 2, 3))).sum()
    assert 0 < pure_red(natural_crops(16, 400, seed=0, folder=str(tmp_path))) < 400  # beside scikit-image's, RGB
    assert pure_red(natural_crops(16, 400, seed=0)) == 0
    (tmp_path / "sub" / "red.png").unlink()
    with pytest.raises(UsageError, match="no readable photo"):
        natural_crops(16, 4, folder=str(tmp_path))
