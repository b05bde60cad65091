"""Tests of data.py: espeak-ng speech, viseme tracks, rendered clips, files, splits, MediaPipe agreement."""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


import clips
import data
import landmarks
import synth_clips
import synth_face
import synth_speech
from cli import UsageError

TEXT = "Papa, a map."
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """A ~1.5 s clip at 128 px written to disk: (clip dict, npz path, mp4 path)."""
    clip = synth_clips.make_clip(seed=3, index=0, split="train", size=128, text=TEXT)
    stem = str(tmp_path_factory.mktemp("clip") / "clip_0000")
    clips.save_clip(stem, clip)
    return clip, stem + ".npz", stem + ".mp4"


def test_speech_phoneme_events_in_order():
    wav, phonemes = synth_speech.synthesize("Mama bought a big apple.", "en-us", rate=170, pitch=50)
    duration = len(wav) / synth_speech.ESPEAK_RATE
    assert wav.dtype == np.int16 and 0.8 < duration < 4.0
    starts = np.array([s for s, _, _ in phonemes])
    ends = np.array([e for _, e, _ in phonemes])
    assert len(phonemes) >= 12
    assert np.all(np.diff(starts) > 0) and np.all(ends > starts) and ends[-1] <= duration + 1e-6
    labels = [re.sub("[ˈˌː]", "", p) for _, _, p in phonemes]
    assert labels[:2] == ["m", "ɑ"] and "b" in labels and "p" in labels


def test_every_voice_speaks_the_same_samples_twice():
    """Every voice + variant speech_clip can draw, twice, more than a second apart: espeak-ng seeds its own noise
    generator (the breath of f2, f3, f5) with time(NULL), so two calls within one second would agree anyway."""
    voices = [v + ("+" + var if var else "") for v in synth_speech.VOICES for var in synth_speech.VARIANTS]
    first = {voice: (time.monotonic(), synth_speech.synthesize(TEXT, voice, 170, 60, 60)) for voice in voices}
    broken = []
    for voice in voices:
        started, (wav, phonemes) = first[voice]
        time.sleep(max(0.0, started + 1.05 - time.monotonic()))
        again, again_phonemes = synth_speech.synthesize(TEXT, voice, 170, 60, 60)
        if not (np.array_equal(wav, again) and phonemes == again_phonemes):
            broken.append(voice)
    assert not broken


def test_speech_clip_audio_length_and_timings():
    audio, times, ipa, text = synth_speech.speech_clip(np.random.default_rng(5), "train")
    duration = len(audio) / synth_speech.SAMPLE_RATE
    assert audio.dtype == np.int16 and synth_speech.CLIP_SECONDS[0] <= duration <= synth_speech.CLIP_SECONDS[1] + 1e-6
    assert times.shape == (len(ipa), 2) and len(ipa) > 10
    assert np.all(times[:, 1] > times[:, 0]) and times[-1, 1] <= duration + 1e-6
    sentences = [s.strip() for s in re.findall(r"[^.]+\.", text)]
    assert sentences and all(s in synth_speech.sentence_pool("train") for s in sentences)


def test_articulation_follows_phonemes():
    phonemes = np.array([[0.3, 0.4], [0.4, 0.65], [0.65, 0.7], [0.7, 0.95], [0.95, 1.2]], np.float32)
    ipa = ["m", "ˈɑː", "p", "iː", "uː"]
    art = synth_speech.articulation(phonemes, ipa, 1.6)
    assert art.shape == (math.ceil(1.6 * synth_speech.FPS), 2)
    at = lambda t: art[int(t * synth_speech.FPS)]  # frame whose centre is nearest after t - 20 ms
    assert at(0.1)[0] == pytest.approx(0, abs=1e-3) and at(1.5)[0] == pytest.approx(0, abs=1e-3)  # silence
    assert at(0.35)[0] < 0.05 and at(0.65)[0] < 0.05  # m and p closures
    assert at(0.52)[0] > 0.7  # 'a' open
    assert at(0.85)[1] > 0.4 and at(1.1)[1] < -0.4  # i spread, u rounded


def test_clip_files_keys_shapes_and_codecs(short_clip):
    clip, npz, mp4 = short_clip
    loaded = clips.load_clip(npz)
    duration = len(loaded["audio"]) / loaded["sample_rate"]
    T = math.ceil(duration * 25)
    assert 0.8 < duration < 2.5
    assert set(loaded) == {"landmarks", "fps", "identity", "audio", "sample_rate", "text", "phonemes",
                           "phoneme_ipa", "frame_size", "video", "has_audio"}
    assert loaded["video"] == mp4
    assert loaded["landmarks"].shape == (T, 478, 3) and loaded["landmarks"].dtype == np.float32
    assert loaded["fps"] == 25 and loaded["sample_rate"] == 16000 and loaded["frame_size"] == (128, 128)
    assert loaded["audio"].dtype == np.int16 and loaded["text"] == TEXT
    assert loaded["phonemes"].shape == (len(loaded["phoneme_ipa"]), 2)
    assert int(loaded["identity"]) in synth_face.TRAIN_IDENTITIES
    probe = subprocess.run([clips.ffmpeg_exe(), "-hide_banner", "-i", mp4], capture_output=True, text=True).stderr
    assert re.search(r"Video: h264", probe) and re.search(r"Audio: aac", probe) and "25 fps" in probe
    frames = clips.read_frames(mp4)
    assert frames.shape == (T, 128, 128, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clip["frames"].astype(int)).mean() < 6  # H.264 is lossy but close
    assert clips.read_frames(mp4, size=64).shape == (T, 64, 64, 3)


def test_clip_is_deterministic_by_seed(short_clip):
    clip = short_clip[0]
    again = synth_clips.make_clip(seed=3, index=0, split="train", size=128, text=TEXT)
    other = synth_clips.make_clip(seed=4, index=0, split="train", size=128, text=TEXT)
    assert np.array_equal(clip["frames"], again["frames"])
    assert np.array_equal(clip["landmarks"], again["landmarks"]) and np.array_equal(clip["audio"], again["audio"])
    assert not np.array_equal(clip["landmarks"], other["landmarks"])


def test_mouth_closed_at_bilabials_and_silence_open_on_a(short_clip):
    clip = short_clip[0]
    checks = data.ground_truth_checks(clip)
    assert checks["silences"] >= 1 and checks["bilabials"] >= 3
    assert checks["silence_max"] < 0.1 and checks["bilabial_max"] < 0.1
    opening = landmarks.mouth_opening(clip["landmarks"]) / landmarks.inter_ocular(clip["landmarks"])
    open_vowels = ("ɑ", "a", "æ")
    vowels = [(s, e) for (s, e), p in zip(clip["phonemes"], clip["phoneme_ipa"]) if p.strip("ˈˌː") in open_vowels]
    assert vowels
    frame = int((vowels[0][0] + vowels[0][1]) / 2 * 25)
    assert opening[frame] > 0.12 and opening[frame] > 0.5 * opening.max()


def test_identity_splits_are_disjoint():
    assert not set(synth_face.TRAIN_IDENTITIES) & set(synth_face.TEST_IDENTITIES)
    assert len(synth_face.TRAIN_IDENTITIES) + len(synth_face.TEST_IDENTITIES) >= 16 + 4
    rng = np.random.default_rng(0)
    assert {synth_clips.pick_identity(rng, "test") for _ in range(200)} == set(synth_face.TEST_IDENTITIES)
    assert {synth_clips.pick_identity(rng, "train") for _ in range(400)} == set(synth_face.TRAIN_IDENTITIES)
    assert not set(synth_speech.sentence_pool("train")) & set(synth_speech.sentence_pool("test"))
    with pytest.raises(UsageError):
        synth_clips.pick_identity(rng, "val")


def test_mediapipe_finds_rendered_face_and_lips():
    art = np.array([[0.0, 0.0], [0.9, 0.1]], np.float32)
    frames, meshes = synth_face.render_clip(17, art, np.zeros(2, np.float32), np.zeros((2, 5), np.float32), 256)
    for frame, gt in zip(frames, meshes):
        found = landmarks.detect_image(frame)
        err = landmarks.lip_lmd(found, gt) / landmarks.inter_ocular(gt)
        assert err < 0.05
    opening = landmarks.mouth_opening(meshes) / landmarks.inter_ocular(meshes)
    assert opening[0] < 0.01 and opening[1] > 0.2


def test_ensure_synthetic_generates_once(tmp_path):
    paths = synth_clips.ensure_synthetic("test", count=1, seed=1, root=str(tmp_path), size=64, workers=1)
    assert len(paths) == 1 and os.path.exists(paths[0]) and os.path.exists(paths[0][:-4] + ".mp4")
    assert int(clips.load_clip(paths[0])["identity"]) in synth_face.TEST_IDENTITIES
    stamp = os.path.getmtime(paths[0])
    assert synth_clips.ensure_synthetic("test", count=1, seed=1, root=str(tmp_path), size=64, workers=1) == paths
    assert os.path.getmtime(paths[0]) == stamp


def test_synth_records_its_settings_and_refuses_a_folder_made_with_others(tmp_path):
    folder = str(tmp_path / "test_1_1_64px")
    data.main(["synth", "--out", folder, "--clips", "1", "--seed", "1", "--split", "test", "--size", "64",
               "--workers", "1"])
    settings = os.path.join(folder, synth_clips.SETTINGS_FILE)
    recorded = {"generator": synth_clips.GENERATOR_VERSION, "seed": 1, "split": "test", "size": 64}
    assert json.load(open(settings)) == recorded
    with pytest.raises(UsageError, match=r"seed 1 \(not 2\), size 64 \(not 128\).*another one"):
        data.main(["synth", "--out", folder, "--clips", "1", "--seed", "2", "--split", "test", "--size", "128"])
    with pytest.raises(UsageError, match=r"split test \(not train\)"):
        synth_clips.synth(folder, 2, seed=1, split="train", size=64, workers=1, progress=False)
    assert sorted(os.listdir(folder)) == ["clip_0000.mp4", "clip_0000.npz", synth_clips.SETTINGS_FILE]
    json.dump({**recorded, "generator": 1}, open(settings, "w"))  # made by an older generator
    with pytest.raises(UsageError, match=r"generator 1 \(not \d+\)"):
        synth_clips.ensure_synthetic("test", count=1, seed=1, root=str(tmp_path), size=64, workers=1)
    os.remove(settings)  # a cache from before synth.json: accepted as it is
    paths = synth_clips.ensure_synthetic("test", count=1, seed=1, root=str(tmp_path), size=64, workers=1)
    assert paths == [os.path.join(folder, "clip_0000.npz")] and not os.path.exists(settings)


def _proc_stat(pid):
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid):
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its exit status waits to be read


def _live_children(pid):
    pids = [int(path.split("/")[2]) for path in glob.glob("/proc/[0-9]*/stat")]
    return [child for child in pids if _alive(child) and (_proc_stat(child) or ("", 0))[1] == pid]


def _ready_workers(pid):
    """The pool workers of `pid` that have run their initializer (it makes them ignore SIGINT): a worker that is
    still importing cannot be stopped by anything but its own check of the parent once the import is done."""
    ready = []
    for child in _live_children(pid):
        try:
            cmdline = open(f"/proc/{child}/cmdline").read()
            ignored = int(re.search(r"SigIgn:\s*([0-9a-f]+)", open(f"/proc/{child}/status").read())[1], 16)
        except (OSError, TypeError):
            continue
        if "spawn_main" in cmdline and ignored >> (signal.SIGINT - 1) & 1:
            ready.append(child)
    return ready


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the workers use Linux prctl")
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_synth_workers_end_with_their_parent(tmp_path, kill):
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: the workers share the parent's stderr
    proc = subprocess.Popen([sys.executable, "data.py", "synth", "--out", str(tmp_path / "clips"), "--clips", "4",
                             "--workers", "2", "--size", "64"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(_ready_workers(proc.pid)) < 2:
            time.sleep(0.05)
        family = _live_children(proc.pid)  # the two workers and multiprocessing's resource tracker
        family += [grandchild for child in family for grandchild in _live_children(child)]
        assert len(_ready_workers(proc.pid)) == 2 and proc.poll() is None, "the workers did not start"
        proc.send_signal(kill)
        proc.wait(timeout=30)
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in family):
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)], "processes of the pool outlived their parent"
        if kill == signal.SIGTERM:  # run_cli turns SIGTERM into KeyboardInterrupt: the pool is terminated
            log.seek(0)
            assert proc.returncode == 130 and log.read().strip().endswith("interrupted")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_appearance_frames_are_new_identities_for_the_vae():
    frames = synth_clips.appearance_frames(2, 3, 32, seed=0, progress=False)
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, synth_clips.appearance_frames(2, 3, 32, seed=0, progress=False))
    assert np.abs(frames[0].astype(int) - frames[3]).mean() > 10  # two identities, two looks
    with pytest.raises(ValueError):
        synth_face.identity_params(synth_face.NUM_IDENTITIES)  # clips use 0-19 only; extras start at EXTRA_IDENTITIES_START
    assert synth_face.identity_params(synth_face.EXTRA_IDENTITIES_START)["photo"] in ("astronaut", "grace")


def test_template_regenerates_from_the_sample_photos():
    assert np.abs(data.make_canonical_template() - landmarks.CANONICAL_TEMPLATE).max() < 1e-3


def test_detect_command_prints_a_summary_and_refuses_a_face_less_photo(tmp_path, capsys):
    import cv2
    import skimage.data

    photo, out = tmp_path / "face.png", tmp_path / "panel.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    data.main(["detect", str(photo), "--out", str(out), "--size", "128"])
    assert cv2.imread(str(out)).shape == (512, 3 * 512, 3)
    assert "inter-ocular" in capsys.readouterr().out
    cv2.imwrite(str(photo), np.full((64, 64, 3), 90, np.uint8))
    with pytest.raises(UsageError, match="no face found"):
        data.main(["detect", str(photo)])
    with pytest.raises(UsageError, match="does not exist"):
        data.main(["detect", str(tmp_path / "missing.png")])
