"""Tests for augment.py: each augmentation does to the wave what it claims, a window's audio and landmarks stay
aligned, A2LWindows is today's with augmentation off and a function of (index, seed) with it on, and a tiny A2L
run trains with every augmentation on."""
import os

import numpy as np
import pytest
import torch

import a2l
import audio as au
import augment
import train
from common import load_checkpoint

SR = au.SAMPLE_RATE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tone(seconds, f0=200.0, amplitude=0.3):
    """A steady harmonic tone (five harmonics), float64 (S,)."""
    t = np.arange(int(seconds * SR)) / SR
    return amplitude * sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 6)) / 2.0


def band_energy(x, lo, hi):
    """Share of x's energy between lo and hi Hz."""
    power = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return float(power[(f >= lo) & (f < hi)].sum() / power.sum())


def schroeder_rt60(h, lo_db=-5.0, hi_db=-25.0):
    """RT60 from the backward-integrated energy decay of h, a line fitted between lo_db and hi_db (T20 x 3)."""
    edc = np.cumsum((h ** 2)[::-1])[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    fit = (edc_db <= lo_db) & (edc_db >= hi_db)
    slope = np.polyfit(np.flatnonzero(fit) / SR, edc_db[fit], 1)[0]          # dB per second
    return -60.0 / slope


# ---------------------------------------------------------------------------------------------------------
# The signal processing
# ---------------------------------------------------------------------------------------------------------

def test_gain_clips_loud_copies_and_quantises_quiet_ones():
    x = tone(0.5)
    loud = augment.gain_clip(x, 20.0)
    assert np.abs(loud).max() <= 1.0 and (np.abs(loud) == 1.0).mean() > 0.1       # clipped, bounded
    quiet = augment.gain_clip(x, -40.0)
    np.testing.assert_allclose(quiet * 32767, np.round(quiet * 32767), atol=1e-9)  # 16-bit samples
    assert abs(np.sqrt((quiet ** 2).mean() / (x ** 2).mean()) - 0.01) < 1e-3
    q20, l10 = augment.loudness_copies(x.astype(np.float32))
    np.testing.assert_allclose(q20, x * 0.1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l10, np.clip(x * 10 ** 0.5, -1, 1), rtol=1e-5, atol=1e-7)
    assert q20.dtype == l10.dtype == np.float32 and np.abs(l10).max() <= 1.0


@pytest.mark.parametrize("kind", augment.NOISES)
@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_noise_is_added_at_the_asked_snr(kind, snr):
    x = tone(1.0)
    rng = np.random.default_rng(1)
    y = augment.add_noise(x, augment.noise(kind, x.size, rng), snr)
    measured = 10 * np.log10((x ** 2).mean() / ((y - x) ** 2).mean())
    assert abs(measured - snr) < 1.0


def test_noise_colours():
    rng = np.random.default_rng(2)
    white, pink, babble = (augment.noise(kind, 4 * SR, rng) for kind in augment.NOISES)
    for n in (white, pink, babble):
        assert abs((n ** 2).mean() - 1.0) < 1e-6
    assert 0.8 < band_energy(white, 4000, 8000) / band_energy(white, 0, 4000) < 1.25   # flat
    assert 0.8 < band_energy(pink, 1000, 2000) / band_energy(pink, 2000, 4000) < 1.25  # equal energy per octave
    assert band_energy(babble, 0, 2000) > 0.9                                            # speech-like, low
    envelope = np.sqrt((babble.reshape(-1, 800) ** 2).mean(1))                           # 50 ms RMS
    assert envelope.std() / envelope.mean() > 0.2                                        # it comes and goes


@pytest.mark.parametrize("rt60", [0.3, 0.7])
def test_reverb_tail_decays_at_the_asked_rt60(rt60):
    rng = np.random.default_rng(3)
    h = augment.room_impulse_response(rt60, 5.0, rng)
    assert h[0] == 1.0 and abs(10 * np.log10(1.0 / (h[1:] ** 2).sum()) - 5.0) < 1e-6  # direct path, its DRR
    assert abs(schroeder_rt60(h[1:]) / rt60 - 1) < 0.15
    burst = np.zeros(2 * SR)
    burst[:160] = rng.standard_normal(160)
    wet = augment.reverb(burst, h)
    assert wet.shape == burst.shape
    np.testing.assert_allclose(wet[:10], burst[:10] + np.convolve(burst, h)[:10] - burst[:10])  # nothing delayed
    assert abs(schroeder_rt60(wet[160:]) / rt60 - 1) < 0.2


def test_telephone_has_no_energy_above_4_khz_and_keeps_the_timing():
    rng = np.random.default_rng(4)
    x = 0.05 * rng.standard_normal(SR)
    y = augment.telephone(x)
    assert y.shape == x.shape
    assert band_energy(y, 4000, 8000) < 1e-4                      # nothing above the 8 kHz line's Nyquist
    assert band_energy(y, 0, 200) < 0.01                          # nor below its band
    t = np.arange(SR) / SR
    burst = 0.3 * np.sin(2 * np.pi * 1000 * t) * (np.abs(t - 0.5) < 0.1)
    out = augment.telephone(burst)
    lag = np.argmax(np.correlate(out, burst, "full")) - (SR - 1)
    assert abs(lag) <= 1 and 0.9 < np.abs(out).max() / 0.3 < 1.1  # in band: passed, not moved


def test_codec_lowpasses_and_quantises():
    rng = np.random.default_rng(5)
    x = 0.05 * rng.standard_normal(SR)
    y = augment.codec(x, 3000.0, 4)
    assert band_energy(y, 0, 3000) > 0.9 and y.shape == x.shape
    assert np.unique(np.round(augment.mu_law(x, 4), 9)).size <= 15    # 4 bits: 15 levels
    fine = augment.mu_law(x, 8)
    assert 30 < 10 * np.log10((x ** 2).sum() / ((fine - x) ** 2).sum()) < 45   # G.711 quality


def test_pitch_shift_moves_the_pitch_and_keeps_the_timing():
    x = tone(1.0, f0=200.0)
    gate = (np.arange(x.size) >= SR // 2)
    up = augment.pitch_shift(x * gate, 2.0)
    assert up.shape == x.shape
    spectrum = np.abs(np.fft.rfft(up[SR // 2 + 2048:]))
    peak = np.fft.rfftfreq(SR // 2 - 2048, 1 / SR)[np.argmax(spectrum)]
    assert abs(peak / (200 * 2 ** (2 / 12)) - 1) < 0.03
    onset = np.flatnonzero(np.abs(up) > 0.05)[0]
    assert abs(onset - SR // 2) < augment.GRAIN // 2                 # within half a grain of where it was
    np.testing.assert_allclose(augment.pitch_shift(x, 0.0)[augment.GRAIN:-augment.GRAIN],
                               x[augment.GRAIN:-augment.GRAIN], atol=1e-9)   # no shift: the input


def test_breath_goes_in_a_long_pause_only():
    rng = np.random.default_rng(6)
    x = tone(2.0)
    x[SR // 2:SR] = 0.0
    pause = np.zeros(x.size, bool)
    pause[SR // 2:SR] = True
    y = augment.breath(x, pause, rng)
    changed = np.flatnonzero(y != x)
    assert changed.size > 0.2 * SR and changed.min() >= SR // 2 and changed.max() < SR
    level = 10 * np.log10((y[changed] ** 2).mean() / augment.active_power(x))
    assert augment.BREATH_DB[0] - 3 < level < augment.BREATH_DB[1] + 3
    short = np.zeros(x.size, bool)
    short[:augment.FRAME * (augment.BREATH_MIN_FRAMES - 1)] = True
    assert np.array_equal(augment.breath(x, short, rng), x)


# ---------------------------------------------------------------------------------------------------------
# One window: alignment of audio and landmarks
# ---------------------------------------------------------------------------------------------------------

def ramp_clip(T=60, rest_frames=range(20, 26)):
    """A clip whose landmark value is its frame index and whose audio is a tone, silent in its rest frames."""
    P = np.arange(T, dtype=np.float32).reshape(T, 1, 1)
    wave = tone(T / 25, amplitude=0.1).astype(np.float32)
    rest = np.zeros(T, bool)
    rest[list(rest_frames)] = True
    for f in rest_frames:
        wave[f * 640:(f + 1) * 640] = 0.0
    return wave, P, rest


@pytest.mark.parametrize("seed", range(4))
def test_speed_change_keeps_frames_of_640_samples_and_the_landmarks_follow(seed):
    wave, P, rest = ramp_clip()
    wave = np.zeros_like(wave)
    wave[30 * 640 + 320] = 1.0                                       # a click at the middle of frame 30
    L, k = 16, 2
    out = augment.augment_window(wave, P, rest, 22, L, k, augment.Settings(speed=1.0), np.random.default_rng(seed))
    landmarks, mel, segment = out
    assert segment.shape == ((L + 2 * k) * 640 + 2 * augment.HALF_FFT,) and mel.shape == (4 * (L + 2 * k), 80)
    steps = np.diff(landmarks[:, 0, 0])
    assert np.allclose(steps, steps[0]) and 0.89 < steps[0] < 1.11                 # frames at speed s
    click = np.argmax(np.abs(segment[augment.HALF_FFT + k * 640:]))                  # in the window's samples
    shown = np.interp(click / 640 - 0.5, np.arange(L), landmarks[:, 0, 0])           # the frame shown then
    assert abs(shown - 30) < 0.1


def test_inserted_silence_holds_a_rest_frame_over_silent_audio():
    wave, P, rest = ramp_clip()
    L, k = 16, 2
    held = 0
    for seed in range(10):
        landmarks, _, segment = augment.augment_window(wave, P, rest, 0, L, k, augment.Settings(silence=1.0),
                                                       np.random.default_rng(seed))
        frames = landmarks[:, 0, 0]
        audio = segment[augment.HALF_FFT + k * 640:][:L * 640].reshape(L, 640)       # (L, 640) the window's frames
        repeated = np.flatnonzero(np.diff(frames) == 0) + 1                          # frames holding the one before
        assert np.isin(frames[repeated], np.flatnonzero(rest)).all()                 # a rest frame is held
        assert np.abs(audio[repeated]).max() < 1e-6                                  # over silence
        assert np.all(np.diff(frames) >= 0) and np.isin(frames, np.arange(60)).all()  # nothing else changed
        held += repeated.size
    assert held > 10


def test_no_rest_frame_no_silence_and_an_unfired_window_is_none():
    wave, P, rest = ramp_clip(rest_frames=())
    landmarks, _, _ = augment.augment_window(wave, P, rest, 5, 16, 2, augment.Settings(silence=1.0),
                                             np.random.default_rng(0))
    np.testing.assert_array_equal(landmarks[:, 0, 0], np.arange(5, 21))
    assert augment.augment_window(wave, P, rest, 5, 16, 2, augment.Settings(), np.random.default_rng(0)) is None


def test_every_augmentation_is_a_function_of_the_generator():
    wave, P, rest = ramp_clip()
    everything = augment.Settings(**{name: 1.0 for name in augment.NAMES})
    a, b, c = (augment.augment_window(wave, P, rest, 10, 16, 2, everything, np.random.default_rng(s))
               for s in (7, 7, 8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
    assert np.isfinite(np.asarray(a[1])).all() and np.abs(a[2]).max() <= 1.0


# ---------------------------------------------------------------------------------------------------------
# A2LWindows
# ---------------------------------------------------------------------------------------------------------

def write_fake_clip(path, identity, seconds, seed):
    """A clip in the clip format (no video; A2L reads only landmarks and audio): template landmarks in pixels, lower
    lip and chin moved down by a tone-burst gate, int16 audio at 16 kHz (tests/test_a2l.py's, with a jitter for head
    motion)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    gate = np.zeros(n)
    pos = int(rng.integers(int(0.1 * SR), int(0.3 * SR)))
    while pos < n - int(0.2 * SR):
        on = int(rng.uniform(0.1, 0.4) * SR)
        gate[pos:pos + on] = 1.0
        pos += on + int(rng.uniform(0.1, 0.4) * SR)
    wave = 0.4 * gate * tone(seconds, rng.uniform(120, 250), 1.0) / 2.2
    template = np.load(os.path.join(ROOT, "assets", "canonical_template.npy")).astype(np.float64)
    T = au.frames_for_duration(n)
    opening = np.pad(gate, (0, T * 640 - n)).reshape(T, 640).mean(1)                      # (T,)
    P = np.repeat(template[None], T, axis=0) * (1 + 0.05 * identity)                       # (T, 478, 3)
    P[:, [14, 17, 84, 314, 152], 1] += 0.25 * opening[:, None]
    P = P * 60.0 + np.array([128.0, 120.0, 0.0]) + 1e-3 * rng.standard_normal(P.shape)  # no two frames alike
    np.savez(path, landmarks=P.astype(np.float32), fps=25, identity=identity, frame_size=(256, 256),
             audio=(wave * 32767).astype(np.int16), sample_rate=16000)
    return str(path)


@pytest.fixture(scope="module")
def clip_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug_clips")
    for split in ("train", "test"):
        (root / split).mkdir()
    return [write_fake_clip(root / "train" / f"c{i}.npz", i % 2, 2.0 + 0.3 * i, i) for i in range(3)] + \
        [write_fake_clip(root / "test" / "c0.npz", 0, 2.0, 9)]


def everything(p=1.0):
    return augment.Settings(**{name: p for name in augment.NAMES})


def assert_same_items(a, b, items):
    for item in items:
        x, y = a[item], b[item]
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_items_with_augmentation_off_are_todays(clip_paths, tmp_path):
    items = [(i, 1000 + i) for i in range(12)]
    today = a2l.A2LWindows(clip_paths[:3], 16)
    assert_same_items(a2l.A2LWindows(clip_paths[:3], 16, augmentation=augment.Settings()), today, items)
    assert_same_items(a2l.A2LWindows(clip_paths[:3], 16, augmentation=augment.Settings(), cache=str(tmp_path)),
                      today, items)
    assert_same_items(a2l.A2LWindows(clip_paths[:3], 16, augmentation=a2l.A2LConfig().augmentation()), today, items)
    evaluation = a2l.A2LWindows(clip_paths[:3], 16, train=False)
    assert_same_items(a2l.A2LWindows(clip_paths[:3], 16, train=False, augmentation=everything()), evaluation,
                      range(len(evaluation)))                            # eval items are never augmented


def test_augmented_items_are_a_function_of_index_and_seed(clip_paths, tmp_path):
    items = [(i, 77 + i) for i in range(8)]
    first = a2l.A2LWindows(clip_paths[:3], 16, augmentation=everything(0.5))
    cached = a2l.A2LWindows(clip_paths[:3], 16, augmentation=everything(0.5), cache=str(tmp_path))
    assert_same_items(first, cached, items)
    torch.manual_seed(0)
    np.random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy()
    today = a2l.A2LWindows(clip_paths[:3], 16)
    changed = 0
    for item in items:
        heard, plain = first[item], today[item]
        assert heard["mel_ctx"].shape == plain["mel_ctx"].shape and heard["landmarks"].shape == (16, 478, 3)
        torch.testing.assert_close(heard["p_bar"], plain["p_bar"])       # the item's own draws are unchanged
        changed += not torch.equal(heard["mel_ctx"], plain["mel_ctx"])
    assert changed >= 6
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])


def test_rest_frames_are_silent_with_the_mouth_closed(clip_paths):
    ds = a2l.A2LWindows(clip_paths[:3], 16, augmentation=augment.Settings(silence=1.0))
    closed = min(float((c["P"][:, 14] - c["P"][:, 13]).norm(dim=-1).min()) for c in ds.clips)  # IOD units
    for clip in ds.clips:
        opening = (clip["P"][:, 14] - clip["P"][:, 13]).norm(dim=-1).numpy()
        assert clip["rest"].sum() > 5 and (opening[clip["rest"]] < closed + 0.02).all()
        assert (augment.silent_frames(clip["wave"].numpy(), len(opening)) >= clip["rest"]).all()
    opened = 0
    for i in range(10):
        item = ds[(i % len(ds), i)]
        opening = (item["landmarks"][:, 14] - item["landmarks"][:, 13]).norm(dim=-1)   # (L,)
        opened += int((opening > closed + 0.05).sum())
        held = (item["landmarks"][1:] == item["landmarks"][:-1]).all(dim=(1, 2))      # a frame held from the last
        assert held.any() and (opening[1:][held] < closed + 0.02).all()              # with its mouth closed
    assert opened > 0


def test_on_the_fly_log_mel_of_the_clean_wave_is_the_cached_one(clip_paths, monkeypatch):
    """With the gain and the loudness step made identities, the augmented path must give the stored rows."""
    monkeypatch.setattr(augment, "gain_clip", lambda x, db: x)
    monkeypatch.setattr(augment, "normalize_loudness", lambda x: x)
    ds = a2l.A2LWindows(clip_paths[:1], 16)
    clip = ds.clips[0]
    T = len(clip["P"])
    for start in (0, 7, T - 16):
        _, mel, _ = augment.augment_window(clip["wave"].numpy(), clip["P"].numpy(), clip["rest"], start, 16, 2,
                                           augment.Settings(gain=1.0), np.random.default_rng(0))
        torch.testing.assert_close(mel, clip["mel"][4 * start:4 * (start + 20)], rtol=1e-4, atol=1e-4)


def test_a_tiny_run_trains_with_every_augmentation_and_is_reproducible(clip_paths, tmp_path):
    folder = os.path.dirname(clip_paths[0])
    tiny = ["--stage", "a2l", "--width", "32", "--pairs", "1", "--heads", "2", "--window", "8", "--overlap", "2",
            "--batch-size", "4", "--sample-steps", "2", "--steps", "3", "--device", "cpu", "--log-every", "1",
            "--eval-every", "3", "--save-every", "3", "--data", folder,
            "--eval-data", os.path.dirname(clip_paths[3]), "--cache", str(tmp_path / "cache"), "--aug-all", "0.5"]
    runs = [load_checkpoint(train.train(train.parse_args(tiny + ["--out", str(tmp_path / name)])), "a2l")
            for name in ("a", "b")]
    assert runs[0]["config"]["aug_all"] == 0.5
    for key in runs[0]["ema"]:
        assert torch.equal(runs[0]["ema"][key], runs[1]["ema"][key])
        assert torch.isfinite(runs[0]["ema"][key]).all()
    settings = a2l.A2LConfig(aug_all=0.3, aug_noise=0.5).augmentation()
    assert settings.noise == 0.5 and settings.gain == settings.breath == 0.3
    with pytest.raises(ValueError, match="aug_noise"):
        a2l.A2LConfig(aug_noise=1.5)
