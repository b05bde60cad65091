"""Tests of voices.py and the voices of synth_speech.speech_clip: phone mapping and output parsers on fixed strings,
the default voices bit for bit, and a real synthesis with every installed engine (skipped when one is missing)."""
import json
import os

import numpy as np
import pytest

import data
import synth_clips
import synth_speech
import voices
from cli import UsageError

SENTENCE = "The happy baby bought a purple apple."
OTHER_ENGINES = [e for e in voices.ENGINES if e != "espeak"]


@pytest.fixture
def everything_installed(monkeypatch):
    monkeypatch.setattr(voices, "available", lambda: voices.ENGINES)


def test_arpabet_phones_map_to_the_ipa_of_the_visemes():
    assert [voices.arpabet_ipa(p) for p in ("AH0", "ey1", "CH", "m", "em", "dx")] == ["ʌ", "eɪ", "tʃ", "m", "m", "ɾ"]
    assert all(voices.arpabet_ipa(p) is None for p in ("pau", "SIL", "h#", "+NSN+", "+SPN+"))
    assert [p for p, ipa in voices.ARPABET_IPA.items() if synth_speech.is_bilabial(ipa)] == ["b", "em", "m", "p"]
    for ipa in voices.ARPABET_IPA.values():  # every phone has a viseme of its own, none the fallback
        core = ipa.strip("ˈˌː")
        assert any(core.startswith(prefix) for prefix, _, _ in synth_speech._VISEME_TABLE), ipa
    with pytest.raises(ValueError, match="unknown ARPAbet phone 'xx'"):
        voices.arpabet_ipa("xx")


def test_flite_and_festival_outputs_parse_into_phones_without_pauses():
    ends = voices.parse_flite("pau:0.184 dh:0.228 ax:0.261 pau:0.400 b:0.430 pau:0.600 \n")
    assert ends == [("pau", 0.184), ("dh", 0.228), ("ax", 0.261), ("pau", 0.4), ("b", 0.43), ("pau", 0.6)]
    assert voices.phones_from_ends(ends) == [(0.184, 0.228, "ð"), (0.228, 0.261, "ə"), (0.4, 0.43, "b")]
    out = "festival: loading\nSEG pau 0.220000\nSEG hh 0.295000\nnoise 1.0\nSEG ow 0.696000\n"
    assert voices.parse_festival(out) == [("pau", 0.22), ("hh", 0.295), ("ow", 0.696)]


def test_piper_alignments_merge_stress_length_diphthongs_and_word_gaps():
    aligned = [("^", 100), ("ð", 50), ("ə", 50), (" ", 20), ("b", 40), ("ˈ", 30), ("e", 60), ("ɪ", 40), ("ː", 10),
               (",", 200), ("a", 50), (" ", 10), ("ɪ", 30), (".", 100), ("$", 10)]
    phones = voices.piper_phonemes(aligned, 1000)
    assert [ipa for _, _, ipa in phones] == ["ð", "ə", "b", "ˈeɪː", "a", "ɪ"]  # no diphthong across the word gap
    expect = [(0.1, 0.15), (0.15, 0.22), (0.22, 0.26), (0.26, 0.4), (0.6, 0.66), (0.66, 0.69)]
    assert np.allclose([(s, e) for s, e, _ in phones], expect)


def test_asterisk_transcripts_parse_normalise_and_split_by_name():
    text = ("; Core Asterisk Sounds in English\n\nagent-pass: Please enter your password, followed by 1.\n"
            "beep: [this is a simple beep tone]\nconfbridge-leave: <beep decending>\ndigits/7: Seven.\n")
    assert voices.parse_transcripts(text) == {"agent-pass": "Please enter your password, followed by 1.",
                                              "digits/7": "Seven."}
    assert voices.normalise_transcript("Please press 1, or party's \"*\" key...") == "please press one or party's key"
    names = [f"prompt-{i}" for i in range(1000)]
    held = [n for n in names if voices.prompt_split(n) == "test"]
    assert 150 < len(held) < 250 and voices.prompt_split(held[0]) == "test"


def test_default_voices_are_espeak_bit_for_bit():
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    plain = synth_speech.speech_clip(rng_a, "train")
    named = synth_speech.speech_clip(rng_b, "train", None, None, ("espeak",))
    assert np.array_equal(plain[0], named[0]) and np.array_equal(plain[1], named[1]) and plain[2:] == named[2:]
    assert rng_a.random() == rng_b.random()  # nothing extra drawn
    assert synth_speech.spoken_clip(np.random.default_rng(11))[4] == "espeak"
    assert "voice" not in synth_clips.make_clip(3, 0, "train", 64, text="Papa.")


def test_voices_flags_check_names_and_installs(monkeypatch):
    assert voices.parse_voices("espeak") == ("espeak",) and "espeak" in voices.parse_voices("all")
    with pytest.raises(ValueError, match="unknown voice source 'klatt'"):
        voices.parse_voices("espeak,klatt")
    monkeypatch.setattr(voices, "available", lambda: ("espeak",))
    with pytest.raises(UsageError, match=r"piper is not installed: run `bash install_voices.sh` \(pip install"):
        data.main(["synth", "--out", "/nonexistent/never", "--voices", "espeak,piper"])
    with pytest.raises(UsageError, match="flite is not installed"):
        synth_clips.ensure_synthetic("train", 1, voices=("flite",))


def test_other_voices_have_folders_and_settings_of_their_own(tmp_path, everything_installed):
    root = str(tmp_path)
    assert voices.parse_voices("piper,espeak") == ("espeak", "piper")  # one order: one folder
    assert synth_clips.synthetic_folder("train", 8, 0, root) == os.path.join(root, "train_8_0")
    assert synth_clips.synthetic_folder("train", 8, 0, root, 64, "wide", ("espeak", "piper")) == os.path.join(
        root, "train_wide_espeak+piper_8_0_64px")
    folder = str(tmp_path / "v")
    os.makedirs(folder)
    synth_clips.check_settings(folder, 0, "train", 64, voices=("espeak", "flite"))
    assert json.load(open(os.path.join(folder, synth_clips.SETTINGS_FILE)))["voices"] == ["espeak", "flite"]
    with pytest.raises(UsageError, match=r"voices \['espeak', 'flite'\] \(not \['espeak'\]\)"):
        synth_clips.check_settings(folder, 0, "train", 64)
    plain = str(tmp_path / "plain")
    os.makedirs(plain)
    synth_clips.check_settings(plain, 0, "train", 64)  # the default is not written: as before voices existed
    assert "voices" not in json.load(open(os.path.join(plain, synth_clips.SETTINGS_FILE)))
    with pytest.raises(UsageError, match=r"voices \['espeak'\] \(not \['piper'\]\)"):
        synth_clips.check_settings(plain, 0, "train", 64, voices=("piper",))


def test_recorded_speech_cannot_say_a_given_text():
    rng = np.random.default_rng(0)
    assert synth_speech.pick_engine(rng, ("recorded", "flite"), text="Hello.") == "flite"
    with pytest.raises(ValueError, match="recorded speech cannot say a given text"):
        synth_speech.pick_engine(rng, ("recorded",), text="Hello.")


def _check_speech(wav, rate, phonemes):
    """Phones in order inside the audio, and the audio loud during phones and quiet in the gaps between them."""
    duration = len(wav) / rate
    times = np.array([(s, e) for s, e, _ in phonemes])
    assert len(phonemes) >= 10 and np.all(times[:, 1] > times[:, 0]) and np.all(np.diff(times[:, 0]) > 0)
    assert times.min() >= 0 and times.max() <= duration + 1e-6
    x = wav.astype(np.float64)
    inside = np.zeros(len(x), bool)
    for s, e in times:
        inside[int(s * rate):int(e * rate)] = True
    loud = [np.sqrt(np.mean(x[int(s * rate):int(e * rate)] ** 2)) for s, e in times]
    assert np.mean(np.array(loud) > 0.05 * np.sqrt(np.mean(x[inside] ** 2))) > 0.9
    if (~inside).sum() > rate * 0.1:
        assert np.sqrt(np.mean(x[~inside] ** 2)) < 0.3 * np.sqrt(np.mean(x[inside] ** 2))
    for _, _, ipa in phonemes:
        assert synth_speech.viseme_target(ipa) != (0.35, 0.0), ipa  # a phone the visemes know


def _speak(engine):
    if engine == "recorded":
        _, path, text = max(voices.recorded_prompts("train"), key=lambda prompt: len(prompt[2]))  # the wordiest
        return voices.recorded(path, text)
    return voices.speaker(engine, np.random.default_rng(4))(SENTENCE)


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_every_installed_engine_speaks_with_timings_deterministically(engine):
    if engine not in voices.available():
        pytest.skip(f"{engine} is not installed ({voices.INSTALL[engine]}; bash install_voices.sh)")
    wav, rate, phonemes = _speak(engine)
    _check_speech(wav, rate, phonemes)
    again = _speak(engine)
    assert np.array_equal(wav, again[0]) and again[2] == phonemes


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_speech_clip_with_an_engine(engine):
    if engine not in voices.available():
        pytest.skip(f"{engine} is not installed ({voices.INSTALL[engine]}; bash install_voices.sh)")
    audio, times, ipa, text, used = synth_speech.spoken_clip(np.random.default_rng(2), "train", 3.0, None, (engine,))
    assert used == engine and audio.dtype == np.int16 and len(times) == len(ipa) > 10 and text
    assert len(audio) / synth_speech.SAMPLE_RATE >= 3.0 and times.max() <= len(audio) / synth_speech.SAMPLE_RATE
    _check_speech(audio, synth_speech.SAMPLE_RATE, [(s, e, p) for (s, e), p in zip(times, ipa)])


def test_recorded_prompts_hold_out_a_fifth_for_evaluation():
    if "recorded" not in voices.available():
        pytest.skip(f"recorded speech is not installed ({voices.INSTALL['recorded']})")
    train, held = voices.recorded_prompts("train"), voices.heldout_prompts()
    assert len(train) > 300 and 0.15 < len(held) / (len(held) + len(train)) < 0.25
    assert not {p for _, p, _ in train} & {p for p, _ in held} and all(os.path.exists(p) for p, _ in held)
