"""Tests for a2l.py: audio loading and log-mel features, the A2L denoiser, its loss, windowed sampling and the
window dataset. Small sizes only (the CI machine has 2 shared CPU cores)."""
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

import a2l
import audio as au
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = au.SAMPLE_RATE



def small_config(**overrides):
    fields = dict(width=32, pairs=1, heads=2, audio_layers=1, window=16, overlap=4, num_train_timesteps=50,
                  sample_steps=2)
    fields.update(overrides)
    return a2l.A2LConfig(**fields)


def tone_bursts(seconds, sr=SR, seed=0, amplitude=0.5):
    """Harmonic tone bursts (0.1-0.4 s on, 0.05-0.3 s off) and the per-sample on/off gate."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    gate = np.zeros(n)
    pos = int(rng.integers(0, int(0.2 * sr)))
    while pos < n:
        on = int(rng.uniform(0.1, 0.4) * sr)
        gate[pos:pos + on] = 1.0
        pos += on + int(rng.uniform(0.05, 0.3) * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(120, 250)
    tone = sum(np.sin(2 * np.pi * k * f0 * t + k) / k for k in range(1, 6))
    return (amplitude * gate * tone / 2.2).astype(np.float32), gate


def random_model(config, seed=0):
    """A2L with a non-zero output layer, so samples depend on the noise."""
    torch.manual_seed(seed)
    model = a2l.A2L(config)
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------

def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa", reason="librosa not installed: no reference filterbank")
    ours = au.mel_filterbank(16000, 512, 80, 0.0, 8000.0)
    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=0.0, fmax=8000.0, dtype=np.float64)
    assert ours.shape == (80, 257)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.max())
    ours55 = au.mel_filterbank(16000, 400, 40, 55.0, 7600.0)
    ref55 = librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmin=55.0, fmax=7600.0, dtype=np.float64)
    np.testing.assert_allclose(ours55, ref55, rtol=1e-4, atol=1e-4 * ref55.max())


def test_mel_spectrogram_matches_librosa():
    librosa = pytest.importorskip("librosa", reason="librosa not installed: no reference spectrogram")
    wave, _ = tone_bursts(0.7, seed=3)
    wave = wave.astype(np.float64) + 0.01 * np.random.default_rng(0).standard_normal(wave.size)
    ours = au.mel_spectrogram(torch.from_numpy(wave)).numpy()                      # (n_frames, 80)
    ref = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=512, hop_length=160, win_length=400,
                                         window="hann", center=True, pad_mode="constant", power=2.0,
                                         n_mels=80, fmin=0.0, fmax=8000.0).T
    assert ours.shape == ref.shape == (1 + wave.size // 160, 80)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * ref.max())
    batched = au.log_mel(torch.from_numpy(np.stack([wave, wave[::-1].copy()])))
    assert batched.shape == (2, ours.shape[0], 80)
    torch.testing.assert_close(batched[0], torch.log(torch.from_numpy(ours).clamp_min(1e-5)))


def test_frames_for_duration_is_ceil():
    for n in [1, 639, 640, 641, 1280, 16000, 16001, 180800, 12345]:
        assert au.frames_for_duration(n) == math.ceil(n / 16000 * 25), n
    assert au.frames_for_duration(int(11.3 * 16000)) == 283


def test_mel_context_windows_are_aligned():
    wave, _ = tone_bursts(1.03, seed=1)
    ctx = au.mel_context(wave, context_frames=2)
    T = au.frames_for_duration(wave.size)
    assert ctx.shape == (T, 20, 80)
    mel = au.log_mel(torch.from_numpy(wave))                                        # (n_mel_frames, 80)
    silence = math.log(au.LOG_FLOOR)
    for i in [0, 1, 10, T - 1]:
        for j in range(20):
            m = 4 * (i - 2) + j
            expected = mel[m] if 0 <= m < min(mel.shape[0], 4 * T) else torch.full((80,), silence)
            torch.testing.assert_close(ctx[i, j], expected)
    assert au.mel_context(wave, num_frames=7).shape == (7, 20, 80)
    assert au.mel_context(wave, num_frames=T + 5, context_frames=1).shape == (T + 5, 12, 80)


# ---------------------------------------------------------------------------------------------------------
# Audio loading
# ---------------------------------------------------------------------------------------------------------

def _write(path, data, sr, **kw):
    sf.write(str(path), data, sr, **kw)
    return str(path)


@pytest.mark.parametrize("name,sr,channels,subtype", [
    ("a.wav", 16000, 1, "PCM_16"), ("b.wav", 16000, 1, "FLOAT"), ("c.wav", 16000, 2, "PCM_16"),
    ("d.wav", 44100, 1, "PCM_24"), ("e.wav", 8000, 1, "PCM_16"), ("f.flac", 22050, 2, "PCM_16"),
    ("g.ogg", 48000, 1, "VORBIS")])
def test_load_audio_formats(tmp_path, name, sr, channels, subtype):
    mono, _ = tone_bursts(1.2, sr=sr, seed=2, amplitude=0.3)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    wave = au.load_audio(_write(tmp_path / name, data, sr, subtype=subtype))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.size == math.ceil(mono.size * 16000 / sr)
    reference = au.normalize_loudness(mono.astype(np.float32))   # same signal, at its own rate
    assert np.sqrt(np.mean(wave ** 2)) == pytest.approx(np.sqrt(np.mean(reference ** 2)), rel=0.05)


def test_load_audio_volume_invariant(tmp_path):
    mono, _ = tone_bursts(1.0, seed=4, amplitude=0.8)
    loud = au.load_audio(_write(tmp_path / "loud.wav", mono, 16000, subtype="FLOAT"))
    quiet = au.load_audio(_write(tmp_path / "quiet.wav", mono * 0.003, 16000, subtype="FLOAT"))
    np.testing.assert_allclose(quiet, loud, atol=1e-5)
    assert np.abs(loud).max() <= 0.99 + 1e-6 and np.sqrt(np.mean(loud ** 2)) > 0.01
    quiet16 = au.load_audio(_write(tmp_path / "quiet16.wav", mono * 0.05, 16000, subtype="PCM_16"))
    np.testing.assert_allclose(quiet16, loud, atol=2e-3)


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2), (48000, 1), (8000, 1)])
def test_streamed_audio_is_the_whole_signal_processed_at_once(tmp_path, rate, channels):
    """Speech reads a file a block at a time (65 s: past the minute blocks); its wave is scipy's resample_poly
    of the whole signal, loudness-normalised, and its log-mel rows are those of the whole wave."""
    mono, _ = tone_bursts(65.0, sr=rate, seed=3, amplitude=0.3)
    path = _write(tmp_path / "long.wav", np.stack([mono, 0.5 * mono], 1) if channels == 2 else mono, rate,
                  subtype="PCM_16")
    data = sf.read(path, dtype="float32", always_2d=True)[0]
    whole = data[:, 0] if channels == 1 else data.astype(np.float64).mean(axis=1)
    if rate != SR:
        g = math.gcd(rate, SR)
        whole = resample_poly(whole, SR // g, rate // g)
    expected = au.normalize_loudness(np.asarray(whole, np.float32))
    speech = au.Speech(path)
    assert speech.num_samples == expected.size == math.ceil(mono.size * SR / rate)
    np.testing.assert_allclose(speech.wave(), expected, rtol=0, atol=1e-6)
    rows = torch.cat(list(au.log_mel_rows(speech.blocks(), speech.num_samples)))
    keep, pad = min(1 + expected.size // au.HOP, 4 * speech.num_frames), 8
    assert rows.shape == (4 * speech.num_frames + 2 * pad, 80)
    torch.testing.assert_close(rows[pad:pad + keep], au.log_mel(torch.as_tensor(expected))[:keep], rtol=0,
                               atol=1e-3)
    assert (rows[:pad] == math.log(au.LOG_FLOOR)).all() and (rows[pad + keep:] == math.log(au.LOG_FLOOR)).all()


def test_streamed_mel_context_reads_forward_only():
    wave = au.normalize_loudness(tone_bursts(70.0, seed=7)[0])
    T, full = au.frames_for_duration(wave.size), au.mel_context(au.normalize_loudness(wave))
    ctx = au.MelContext(au.log_mel_rows([wave], wave.size), 2, T)
    assert ctx.shape == full.shape
    for s in list(range(0, T - 16, 12)) + [T - 16]:
        assert torch.equal(ctx[s:s + 16], full[s:s + 16])
        assert len(ctx.padded) <= 2 * au.CHUNK_MEL_FRAMES + 64   # the rows held: about a minute, not all
    with pytest.raises(ValueError, match="forward"):
        ctx[0:16]


def test_silent_audio_gives_zeros(tmp_path):
    wave = au.load_audio(_write(tmp_path / "silence.wav", np.zeros(8000, np.int16), 16000))
    assert wave.shape == (8000,) and not wave.any()
    wave = au.load_audio(_write(tmp_path / "silence8k.wav", np.zeros(800, np.float32), 8000, subtype="FLOAT"))
    assert wave.shape == (1600,) and not wave.any()


def test_load_audio_bad_inputs(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        au.load_audio(tmp_path / "missing.wav")
    with pytest.raises(UsageError, match="not a file"):
        au.load_audio(tmp_path)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x01garbage" + os.urandom(200))
    with pytest.raises(UsageError, match="cannot read audio"):
        au.load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="cannot read audio"):
        au.load_audio(empty)
    with pytest.raises(UsageError, match="zero length"):
        au.load_audio(_write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000))
    nan = np.zeros(1000, np.float32)
    nan[10] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        au.load_audio(_write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT"))
    for err in [UsageError]:   # one line each
        try:
            au.load_audio(corrupt)
        except err as e:
            assert "\n" not in str(e) and str(corrupt) in str(e)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

def test_presets():
    tiny, paper = a2l.A2LConfig.preset("tiny"), a2l.A2LConfig.preset("paper")
    assert (paper.width, paper.pairs, paper.heads, paper.window, paper.overlap) == (512, 8, 8, 32, 8)
    assert (paper.num_train_timesteps, paper.sample_steps, paper.beta_schedule) == (1000, 50, "cosine")
    assert tiny.width <= 128 and tiny.prediction_type == "sample" and tiny.ctx_mel_frames == 20
    sched = a2l.A2L(small_config(num_train_timesteps=100)).scheduler
    assert int(sched.set_timesteps(10)[0]) == 99      # sampling starts from pure noise (trailing spacing)
    with pytest.raises(ValueError, match="tiny, paper"):
        a2l.A2LConfig.preset("huge")
    with pytest.raises(ValueError, match="overlap"):
        a2l.A2LConfig(window=8, overlap=8)


def test_forward_shapes_and_errors():
    c = small_config(temporal_conv=True)
    model = random_model(c)
    B, L = 3, 16
    x = torch.randn(B, L, 1434)
    t = torch.randint(0, 50, (B,))
    mel = torch.randn(B, L, 20, 80)
    p_bar = torch.randn(B, 1434)
    assert model(x, t, mel, p_bar).shape == (B, L, 1434)
    assert model(x, t, mel, p_bar.reshape(B, 478, 3), torch.tensor([True, False, True])).shape == (B, L, 1434)
    assert model(x[:, :5], t, mel[:, :5], p_bar).shape == (B, 5, 1434)   # shorter windows work too
    with pytest.raises(ValueError, match="mel_ctx"):
        model(x, t, mel[:, :, :12], p_bar)
    with pytest.raises(ValueError, match="x_t"):
        model(x[..., :100], t, mel, p_bar)
    with pytest.raises(ValueError, match="p_bar"):
        model(x, t, mel, p_bar[:2])
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:1], mel, p_bar)


def test_audio_dropout_uses_null_token():
    model = random_model(small_config())
    x, t = torch.randn(2, 16, 1434), torch.tensor([10, 10])
    p_bar = torch.zeros(2, 1434)
    mel_a, mel_b = torch.randn(2, 16, 20, 80), torch.randn(2, 16, 20, 80)
    drop = torch.tensor([True, True])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, mel_a, p_bar, drop), model(x, t, mel_b, p_bar, drop))
        assert not torch.allclose(model(x, t, mel_a, p_bar), model(x, t, mel_b, p_bar))


def test_set_residual_std():
    model = a2l.A2L(small_config())
    model.set_residual_std(torch.full((478, 3), 0.5))
    assert torch.all(model.residual_std == 0.5) and "residual_std" in model.state_dict()
    with pytest.raises(ValueError):
        model.set_residual_std(torch.zeros(1434))
    with pytest.raises(ValueError):
        model.set_residual_std(torch.ones(100))


def _toy_batch(B=4, L=16, seed=0):
    """Mouth opening driven by the tone-burst gate, in canonical units."""
    rng = np.random.default_rng(seed)
    mel, P = [], []
    base = torch.from_numpy(rng.normal(0, 0.3, (478, 3)).astype(np.float32))
    for b in range(B):
        wave, gate = tone_bursts(L / 25, seed=seed * 100 + b)
        opening = torch.from_numpy(gate[: L * 640].reshape(L, 640).mean(1).astype(np.float32))   # (L,)
        frames = base.repeat(L, 1, 1)
        frames[:, [14, 17, 84, 314], 1] += 0.3 * opening[:, None]
        P.append(frames)
        mel.append(au.mel_context(au.normalize_loudness(wave), num_frames=L))
    return {"landmarks": torch.stack(P), "p_bar": base.repeat(B, 1, 1), "mel_ctx": torch.stack(mel)}


def _fixed_seed_loss(model, batch):
    with torch.random.fork_rng():
        torch.manual_seed(123)          # same t, noise for every evaluation
        return model.loss(batch)[1]["loss"]


@pytest.mark.parametrize("objective,prediction", [("regression", "sample"), ("diffusion", "sample"),
                                                  ("diffusion", "epsilon")])
def test_loss_finite_and_overfits_one_batch(objective, prediction):
    torch.manual_seed(0)
    c = small_config(objective=objective, prediction_type=prediction, audio_dropout=0.0)
    model = a2l.A2L(c)
    batch = _toy_batch()
    std = (batch["landmarks"] - batch["p_bar"][:, None]).reshape(-1, 1434).std(0)
    model.set_residual_std(std.clamp_min(0.05 * float(std.max())))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = _fixed_seed_loss(model, batch)
    for _ in range(60):
        loss, logs = model.loss(batch)
        assert torch.isfinite(loss) and set(logs) >= {"loss", "mse", "velocity", "x0_mse_lips"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _fixed_seed_loss(model, batch)
    assert np.isfinite(before) and after < 0.5 * before, (before, after)


def test_loss_rejects_bad_batch():
    model = a2l.A2L(small_config())
    batch = _toy_batch(B=2)
    with pytest.raises(ValueError, match="landmarks"):
        model.loss({**batch, "landmarks": batch["landmarks"][:, :, :100]})
    with pytest.raises(ValueError, match="p_bar"):
        model.loss({**batch, "p_bar": batch["p_bar"][:1]})


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

def test_window_starts_cover_everything():
    assert a2l.window_starts(16, 16, 4) == [0]
    assert a2l.window_starts(40, 16, 4) == [0, 12, 24]
    assert a2l.window_starts(41, 16, 4) == [0, 12, 24, 25]
    for T in [16, 17, 50, 283]:
        starts = a2l.window_starts(T, 16, 4)
        assert starts[-1] + 16 == T and all(b - a <= 12 for a, b in zip(starts, starts[1:]))


def test_generate_any_length_holds_overlap_and_is_seeded():
    model = random_model(small_config())
    wave, _ = tone_bursts(11.3, seed=5)
    mel = au.mel_context(au.normalize_loudness(wave))
    p_bar = torch.randn(478, 3)
    calls = []
    original = model.sample_window

    def recording(mel_ctx, p_bar_, *args):
        out = original(mel_ctx, p_bar_, *args)
        calls.append((args[-1], out.clone()))
        return out

    model.sample_window = recording
    out = model.generate(mel, p_bar, generator=torch.Generator().manual_seed(0))
    assert out.shape == (math.ceil(11.3 * 25), 478, 3) and torch.isfinite(out).all()
    starts = a2l.window_starts(283, 16, 4)
    assert len(calls) == len(starts)
    done = 0
    for s, (prefix, window) in zip(starts, calls):
        held = done - s
        if s == 0:
            assert prefix is None
        else:
            assert held >= 4 and torch.equal(prefix[0], out[s:done])      # held frames = previous result
            torch.testing.assert_close(window[0, :held], prefix[0], rtol=0, atol=0)
        torch.testing.assert_close(out[s:s + 16], window[0], rtol=0, atol=0)
        done = s + 16
    model.sample_window = original
    again = model.generate(mel, p_bar, generator=torch.Generator().manual_seed(0))
    other = model.generate(mel, p_bar, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.allclose(out, other)
    short = model.generate(mel[:7], p_bar, generator=torch.Generator().manual_seed(0))
    assert short.shape == (7, 478, 3)


def test_stream_reads_the_audio_as_it_goes_and_equals_generate():
    """A2L.stream over a streamed MelContext yields landmarks before most of the log-mel exists, and the whole
    stream is generate's result on the whole mel context, bit for bit."""
    model = random_model(small_config())
    wave = au.normalize_loudness(tone_bursts(70.0, seed=6)[0])
    pulled = []

    def rows():
        for r in au.log_mel_rows((wave[i:i + au.STREAM_SAMPLES] for i in range(0, wave.size, au.STREAM_SAMPLES)),
                                 wave.size):
            pulled.append(len(r))
            yield r
    T, p_bar = au.frames_for_duration(wave.size), torch.randn(478, 3)
    stream = model.stream(au.MelContext(rows(), 2, T), p_bar, generator=torch.Generator().manual_seed(0))
    first = next(stream)
    assert len(first) == 16 and sum(pulled) == 8 + au.CHUNK_MEL_FRAMES < 4 * T  # after the first minute only
    streamed = torch.cat([first, *stream])
    whole = model.generate(au.mel_context(wave), p_bar, generator=torch.Generator().manual_seed(0))
    assert streamed.shape == (T, 478, 3) and torch.equal(streamed, whole)


def test_prefix_steers_the_free_frames():
    """With a prefix the held frames are replaced during denoising (not only copied at the end), so they
    influence the other frames through temporal attention."""
    model = random_model(small_config(sample_steps=4))
    mel = torch.randn(1, 16, 20, 80)
    p_bar = torch.zeros(1, 478, 3)
    prefixes = [torch.full((1, 4, 478, 3), v) for v in (-1.0, 1.0)]
    outs = [model.sample_window(mel, p_bar, generator=torch.Generator().manual_seed(0), prefix=p) for p in prefixes]
    for p, o in zip(prefixes, outs):
        assert torch.equal(o[:, :4], p)
    assert (outs[0][:, 4:] - outs[1][:, 4:]).abs().mean() > 1e-4


def test_guidance_and_regression_sampling():
    model = random_model(small_config())
    mel = torch.randn(30, 20, 80)
    p_bar = torch.zeros(478, 3)
    plain = model.generate(mel, p_bar, guidance=1.0, generator=torch.Generator().manual_seed(0))
    guided = model.generate(mel, p_bar, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    reg = random_model(small_config(objective="regression"))
    a, b = reg.generate(mel, p_bar), reg.generate(mel, p_bar)
    assert a.shape == (30, 478, 3) and torch.equal(a, b)
    with pytest.raises(ValueError, match="mel_ctx_full"):
        model.generate(mel[:, :12], p_bar)


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------

def write_fake_clip(path, identity, seconds, seed, rotate=True):
    """A clip in the clip format (no video; A2L reads only landmarks and audio): template landmarks in pixels (small head motion), lower lip and chin moved down by
    the tone-burst gate; int16 audio at 16 kHz."""
    template = np.load(os.path.join(ROOT, "assets", "canonical_template.npy")).astype(np.float64)
    wave, gate = tone_bursts(seconds, seed=seed, amplitude=0.4)
    T = au.frames_for_duration(wave.size)
    opening = np.pad(gate, (0, T * 640 - gate.size)).reshape(T, 640).mean(1)          # (T,)
    P = np.repeat(template[None], T, axis=0) * (1 + 0.05 * identity)                   # (T, 478, 3)
    P[:, [14, 17, 84, 314, 152], 1] += 0.25 * opening[:, None]
    angle = 0.05 * np.sin(np.arange(T) / 10.0) if rotate else np.zeros(T)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = P[..., 0].copy(), P[..., 1].copy()
    P[..., 0], P[..., 1] = cos * x - sin * y, sin * x + cos * y
    P = P * 60.0 + np.array([128.0, 120.0, 0.0])
    np.savez(path, landmarks=P.astype(np.float32), fps=25, identity=identity, frame_size=(256, 256),
             audio=(wave * 32767).astype(np.int16), sample_rate=16000)
    return str(path)


def test_dataset_windows_and_residual_std(tmp_path):
    pytest.importorskip("landmarks")
    paths = [write_fake_clip(tmp_path / "c0.npz", 0, 2.0, 0), write_fake_clip(tmp_path / "c1.npz", 0, 1.3, 1),
             write_fake_clip(tmp_path / "c2.npz", 1, 1.5, 2), write_fake_clip(tmp_path / "short.npz", 1, 0.3, 3)]
    with pytest.warns(UserWarning, match="skipped"):
        train = a2l.A2LWindows(paths, window=16, train=True)
    assert len(train.clips) == 3 and len(train) == math.ceil(50 / 16) + math.ceil(33 / 16) + math.ceil(38 / 16)
    item = train[(0, 5)]
    assert item["landmarks"].shape == (16, 478, 3) and item["p_bar"].shape == (478, 3)
    assert item["mel_ctx"].shape == (16, 20, 80)
    # P̄ is the identity's mean over all its clips
    both = torch.cat([train.clips[0]["P"], train.clips[1]["P"]])
    torch.testing.assert_close(train.clips[1]["p_bar"], both.mean(0), rtol=1e-5, atol=1e-5)
    # canonical units: inter-ocular distance about 1, the head motion removed
    iod = (train.clips[0]["P"][:, 263] - train.clips[0]["P"][:, 33]).norm(dim=-1)
    assert torch.allclose(iod, torch.ones_like(iod), atol=0.1)
    evaluation = a2l.A2LWindows(paths[:3], window=16, train=False)
    assert [s for k, s in evaluation.items if k == 0] == [0, 16, 32, 34]
    last = evaluation[3]
    torch.testing.assert_close(last["landmarks"], evaluation.clips[0]["P"][34:50])
    with np.load(paths[0]) as z:
        wave = au.prepare_wave(z["audio"], 16000)
    full = au.mel_context(wave, num_frames=50)
    torch.testing.assert_close(last["mel_ctx"], full[34:50])
    torch.testing.assert_close(evaluation[0]["mel_ctx"], full[0:16])
    std = a2l.compute_residual_std(train)
    assert std.shape == (1434,) and (std > 0).all()
    residuals = torch.cat([(c["P"] - c["p_bar"]).reshape(len(c["P"]), -1) for c in train.clips])  # from the sums
    torch.testing.assert_close(std, residuals.std(0).clamp_min(float(residuals.std(0).max()) * 0.05), rtol=1e-4,
                               atol=1e-6)
    cached = a2l.A2LWindows(paths[:3], window=16, train=True, cache=str(tmp_path / "cache"))  # memory-mapped
    again = a2l.A2LWindows(paths[:3], window=16, train=True, cache=str(tmp_path / "cache"))  # read back
    for ds in (cached, again):
        for key, value in train[(4, 77)].items():
            torch.testing.assert_close(ds[(4, 77)][key], value)  # an item is a function of (index, seed)
        torch.testing.assert_close(a2l.compute_residual_std(ds), std)
    std = std.reshape(478, 3)
    assert std[14, 1] > 5 * std[33, 1]          # the moving lip varies more than a rigid eye corner
    model = a2l.A2L(small_config())
    model.set_residual_std(a2l.compute_residual_std(train))
    batch = torch.utils.data.default_collate([train[(i, 10 + i)] for i in range(4)])
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)


def test_dataset_bad_inputs(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(UsageError, match="cannot read clip"):
        a2l.A2LWindows([str(bad)], window=16)
    short = write_fake_clip(tmp_path / "short.npz", 0, 0.2, 0)
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="no clip"):
        a2l.A2LWindows([short], window=16)


def test_p_bar_from_one_frame_for_the_photo_setting(tmp_path):
    """p_bar="first_frame" is what sample.py has (one photo); random_frame_p draws a frame of the clip as P̄ in
    training (A2LConfig.pbar_frame_prob)."""
    paths = [write_fake_clip(tmp_path / "c0.npz", 0, 2.0, 0), write_fake_clip(tmp_path / "c1.npz", 0, 1.3, 1)]
    photo = a2l.A2LWindows(paths, window=16, train=False, p_bar="first_frame")
    assert all(torch.equal(clip["p_bar"], clip["P"][0]) for clip in photo.clips)
    mean = a2l.A2LWindows(paths, window=16, train=True)
    drawn = a2l.A2LWindows(paths, window=16, train=True, random_frame_p=1.0)
    for i in range(len(drawn)):
        p_bar = drawn[(i, i)]["p_bar"]
        assert any((clip["P"] == p_bar).all(dim=(1, 2)).any() for clip in drawn.clips)  # one of the clip's frames
        assert not torch.equal(p_bar, mean.clips[0]["p_bar"])
    with pytest.raises(ValueError, match="p_bar"):
        a2l.A2LWindows(paths, window=16, p_bar="median")
