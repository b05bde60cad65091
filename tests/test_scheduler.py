"""Tests of the hand-written DDPM/DDIM scheduler (dreamhead.NoiseScheduler).

Three independent checks: closed forms recomputed here in numpy float64 from the papers' equations,
golden values (the constants diffusers' own tests use), and, where diffusers is installed, agreement with
its DDPMScheduler / DDIMScheduler on the same random cases.
"""
import math

import numpy as np
import pytest
import torch

from diffusion import NoiseScheduler, cfg_combine

SCHEDULES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def np_alphas_cumprod(schedule, T):
    """abar_t from the schedule definitions, independently of dreamhead.make_betas."""
    b0, b1 = SCHEDULES[schedule]
    if schedule == "linear":
        betas = np.linspace(b0, b1, T)
    elif schedule == "scaled_linear":
        betas = np.linspace(np.sqrt(b0), np.sqrt(b1), T) ** 2
    else:
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
        i = np.arange(T)
        betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    return np.cumprod(1 - betas)


def np_x0_eps(pred_type, out, x, abar):
    if pred_type == "epsilon":
        return (x - np.sqrt(1 - abar) * out) / np.sqrt(abar), out
    if pred_type == "sample":
        return out, (x - np.sqrt(abar) * out) / np.sqrt(1 - abar)
    return np.sqrt(abar) * x - np.sqrt(1 - abar) * out, np.sqrt(abar) * out + np.sqrt(1 - abar) * x


def random_case(rng):
    return dict(schedule=str(rng.choice(list(SCHEDULES))), pred=str(rng.choice(PREDICTIONS)),
                T=int(rng.choice([50, 100, 1000])), spacing=str(rng.choice(["leading", "trailing"])),
                eta=float(rng.choice([0.0, 0.0, 0.3, 1.0])), sampler=str(rng.choice(["ddim", "ddpm"])))


def make(case, **kw):
    b0, b1 = SCHEDULES[case["schedule"]]
    return NoiseScheduler(case["T"], case["schedule"], b0, b1, case["pred"], timestep_spacing=case["spacing"], **kw)


def test_alphas_cumprod_matches_closed_form():
    for schedule in SCHEDULES:
        for T in (50, 1000):
            s = make(dict(schedule=schedule, pred="epsilon", T=T, spacing="leading"))
            np.testing.assert_allclose(s.alphas_cumprod.numpy(), np_alphas_cumprod(schedule, T), rtol=1e-10)


def test_add_noise_and_step_match_closed_forms_1200_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(1200):
        c = random_case(rng)
        s = make(c)
        abar = np_alphas_cumprod(c["schedule"], c["T"])
        x0 = rng.standard_normal((2, 3))
        noise = rng.standard_normal((2, 3))
        t = rng.integers(0, c["T"], size=2)
        # q(x_t | x_0), Ho et al. eq. 4
        want = np.sqrt(abar[t])[:, None] * x0 + np.sqrt(1 - abar[t])[:, None] * noise
        got = s.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)

        n = int(rng.integers(1, min(60, c["T"]) + 1))
        ts = s.set_timesteps(n).numpy()
        k = int(rng.integers(0, len(ts)))
        tk = int(ts[k])
        tp = int(ts[k + 1]) if k + 1 < len(ts) else -1
        x_t = rng.standard_normal((2, 3))
        out = rng.standard_normal((2, 3))
        z = rng.standard_normal((2, 3))
        x0p, epsp = np_x0_eps(c["pred"], out, x_t, abar[tk])
        if c["sampler"] == "ddim":  # Song et al. eq. 12 with sigma from eq. 16
            ap = abar[tp] if tp >= 0 else 1.0
            sigma = c["eta"] * np.sqrt((1 - ap) / (1 - abar[tk]) * (1 - abar[tk] / ap))
            want = np.sqrt(ap) * x0p + np.sqrt(1 - ap - sigma**2) * epsp + (sigma * z if c["eta"] > 0 else 0)
        else:  # Ho et al. eqs. 6-7, posterior of the respaced chain
            ap = abar[tp] if tp >= 0 else 1.0
            beta = 1 - abar[tk] / ap
            mean = (np.sqrt(ap) * beta / (1 - abar[tk])) * x0p + (np.sqrt(1 - beta) * (1 - ap) / (1 - abar[tk])) * x_t
            var = max((1 - ap) / (1 - abar[tk]) * beta, 1e-20)
            want = mean + (np.sqrt(var) * z if tk > 0 else 0)
        prev, x0_pred = s.step(torch.tensor(out), tk, torch.tensor(x_t), eta=c["eta"], sampler=c["sampler"],
                               noise=torch.tensor(z))
        np.testing.assert_allclose(x0_pred.numpy(), x0p, atol=1e-5, rtol=1e-5, err_msg=str(c))
        np.testing.assert_allclose(prev.numpy(), want, atol=1e-5, rtol=1e-5, err_msg=str(c))


def test_training_targets():
    rng = np.random.default_rng(1)
    x0, noise = torch.tensor(rng.standard_normal((4, 5))), torch.tensor(rng.standard_normal((4, 5)))
    t = torch.tensor([0, 10, 500, 999])
    for pred in PREDICTIONS:
        s = NoiseScheduler(1000, "cosine", prediction_type=pred)
        target = s.training_target(x0, noise, t)
        x_t = s.add_noise(x0, noise, t)
        # a perfect prediction of the target recovers x0 exactly
        np.testing.assert_allclose(s.predict_x0(target, t, x_t).numpy(), x0.numpy(), atol=1e-6)


def test_golden_values():
    s = NoiseScheduler(1000, "linear", 1e-4, 0.02)
    s.set_timesteps(1000)
    assert s.ddpm_variance(0, -1) == pytest.approx(1e-20)
    assert s.ddpm_variance(487, 486) == pytest.approx(0.00979, abs=1e-5)
    assert s.ddpm_variance(999, 998) == pytest.approx(0.02, abs=1e-5)
    assert s.ddim_variance(420, 400) == pytest.approx(0.14771, abs=1e-5)
    assert s.ddim_variance(980, 960) == pytest.approx(0.32460, abs=1e-5)


def test_timestep_spacing():
    s = NoiseScheduler(1000)
    assert s.set_timesteps(10).tolist() == list(range(900, -1, -100))
    s = NoiseScheduler(1000, timestep_spacing="trailing")
    assert s.set_timesteps(10).tolist() == list(range(999, 0, -100))
    assert s.previous_timestep(99) == -1 and s.previous_timestep(999) == 899
    with pytest.raises(ValueError):
        s.set_timesteps(0)
    with pytest.raises(ValueError):
        NoiseScheduler(prediction_type="x0")


def test_ddim_eta0_is_deterministic_and_final_alpha_option():
    x = torch.randn(3, 4)
    out = torch.randn(3, 4)
    s = NoiseScheduler(100, "cosine", prediction_type="sample")
    s.set_timesteps(10)
    a = s.step(out, 0, x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(out, 0, x, eta=0.0, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)
    torch.testing.assert_close(a, out)  # abar_prev = 1 at the end: the last step returns x0_pred
    s2 = NoiseScheduler(100, "cosine", prediction_type="sample", set_alpha_to_one=False)
    s2.set_timesteps(10)
    assert not torch.allclose(s2.step(out, 0, x).prev_sample, out)


def test_cfg_helpers():
    cond, uncond = torch.full((2,), 3.0), torch.full((2,), 1.0)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 2.0), torch.full((2,), 5.0))


def test_guidance_rescale_gives_each_sample_the_conditional_spread_and_mixes_by_phi():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    guided = cfg_combine(cond, uncond, 2.0)
    assert torch.equal(cfg_combine(cond, uncond, 2.0, 0.0), guided)
    assert not torch.allclose(guided.std(dim=(1, 2)), cond.std(dim=(1, 2)), rtol=0.05)  # guidance inflates it
    full = cfg_combine(cond, uncond, 2.0, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2)), cond.std(dim=(1, 2)))  # per sample, not over the batch
    unit = [x / x.std(dim=(1, 2), keepdim=True) for x in (full, guided)]
    torch.testing.assert_close(*unit)  # the guided direction, only rescaled
    torch.testing.assert_close(cfg_combine(cond, uncond, 2.0, 0.7), 0.7 * full + 0.3 * guided)


# ---- cross-check against diffusers (optional dependency, reference only) ----------------------------------

def test_agrees_with_diffusers_schedulers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed: cross-check skipped")
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    rng = np.random.default_rng(2)
    for _ in range(1000):
        c = random_case(rng)
        b0, b1 = SCHEDULES[c["schedule"]]
        n = int(rng.integers(1, min(60, c["T"]) + 1))
        if c["sampler"] == "ddim" and c["spacing"] == "trailing":
            n = int(rng.choice([d for d in range(1, min(60, c["T"]) + 1) if c["T"] % d == 0]))  # see previous_timestep()
        kw = dict(num_train_timesteps=c["T"], beta_schedule=names[c["schedule"]], beta_start=b0, beta_end=b1,
                  prediction_type=c["pred"], timestep_spacing=c["spacing"], clip_sample=False)
        ref = (diffusers.DDIMScheduler(**kw) if c["sampler"] == "ddim"
               else diffusers.DDPMScheduler(variance_type="fixed_small", **kw))
        ours = make(c)
        ref.set_timesteps(n)
        assert ours.set_timesteps(n).tolist() == ref.timesteps.tolist(), c
        # diffusers keeps its buffers in float32; compare them at float32 precision, then give it our float64
        # buffers so that the step maths is compared without float32 round-off amplified near t = 0.
        torch.testing.assert_close(ref.alphas_cumprod.double(), ours.alphas_cumprod, atol=1e-6, rtol=1e-5)
        ref.alphas_cumprod = ours.alphas_cumprod.clone()
        x0, noise = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
        t = torch.tensor(rng.integers(0, c["T"], size=2))
        torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
        tk = int(ours.timesteps[int(rng.integers(0, n))])
        x_t, out = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
        if c["sampler"] == "ddim":
            z = torch.randn(2, 3, dtype=torch.float64)
            want = ref.step(out, tk, x_t, eta=c["eta"], variance_noise=z)
            got = ours.step(out, tk, x_t, eta=c["eta"], noise=z)
        else:
            want = ref.step(out, tk, x_t, generator=torch.Generator().manual_seed(7))
            got = ours.step(out, tk, x_t, sampler="ddpm", generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, atol=1e-5, rtol=1e-5)


# ---- learning test: scheduler + training target + sampler work together -----------------------------------

MODES = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])


class TinyDenoiser(torch.nn.Module):
    def __init__(self, T, width=128):
        super().__init__()
        self.T = T
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 32, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, 2))

    def forward(self, x, t):
        from diffusion import timestep_embedding
        return self.net(torch.cat([x, timestep_embedding(t * (1000 / self.T), 32)], dim=-1))


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_mlp_learns_gaussian_mixture(pred):
    torch.manual_seed(0)
    T = 100
    s = NoiseScheduler(T, "cosine", prediction_type=pred)
    model = TinyDenoiser(T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(2000):
        x0 = MODES[torch.randint(0, 4, (256,))] + 0.2 * torch.randn(256, 2)
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (256,))
        loss = torch.nn.functional.mse_loss(model(s.add_noise(x0, noise, t), t), s.training_target(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / 2000))
    gen = torch.Generator().manual_seed(0)
    for sampler, steps, eta in (("ddim", 25, 0.0), ("ddpm", T, 1.0)):
        s.set_timesteps(steps)
        x = torch.randn(2000, 2, generator=gen)
        with torch.no_grad():
            for t in s.timesteps:
                x = s.step(model(x, t.repeat(len(x))), int(t), x, eta=eta, sampler=sampler, generator=gen).prev_sample
        nearest = torch.cdist(x, MODES).argmin(dim=1)
        for k in range(4):
            members = x[nearest == k]
            assert len(members) > 300, (pred, sampler, k, len(members))
            err = (members.mean(0) - MODES[k]).abs().max().item()
            assert err < 0.1, (pred, sampler, k, err)
