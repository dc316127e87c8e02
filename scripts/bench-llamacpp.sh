#!/usr/bin/env bash
# Single-stream decode (and prefill) of `tandem generate` against llama.cpp on the same GGUF, the
# ratio taken against llama.cpp run in the same script (issue 5 goal: decode >= 0.8x).
#
#   ./scripts/bench-llamacpp.sh [--no-install] [--rounds N] [--threads T]
#
# llama.cpp comes from the `llama-cpp-python` package built on this machine (native CPU flags) at
# the version pinned in scripts/fixtures/requirements.txt; not run in CI. The first run builds it
# (several minutes); with --no-install the script skips, successfully, when it is absent (as
# scripts/bench.sh calls it). B=path/to/tandem picks our binary; otherwise a release build.
# MODEL=path picks the GGUF (default: the fetched SmolLM2-135M-Instruct Q4_1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python3}"
install=1
args=()
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    *) args+=("$a") ;;
  esac
done

pin() { grep -E "^$1==" scripts/fixtures/requirements.txt | head -n 1; }
want="$(pin llama-cpp-python)"
have() { "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '${want#*==}')" 2>/dev/null; }

if ! have; then
  if [ "$install" = 0 ]; then
    echo "skipped: $want is not installed (./scripts/bench-llamacpp.sh installs it)"
    exit 0
  fi
  # Another pip may be building it right now (scripts/fixtures needs the same package): wait for
  # that one rather than starting a second build of llama.cpp on the same cores.
  while pgrep -f "pip install.*(llama-cpp-python|fixtures/requirements.txt)" >/dev/null; do
    echo "waiting for a pip install of llama-cpp-python already running..."
    sleep 20
  done
  if ! have; then
    echo "building $want (llama.cpp from source for this CPU; several minutes)"
    "$py" -m pip install --quiet cmake ninja scikit-build-core "$(pin numpy)"
    "$py" -m pip install --no-build-isolation "$want"
  fi
fi

./scripts/fetch-model.sh >/dev/null
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ -z "${B:-}" ]; then
  cargo build --release --workspace --locked --quiet
  B="${CARGO_TARGET_DIR:-target}/release/tandem"
fi
exec "$py" scripts/bench_llamacpp.py --bin "$B" --model "$model" ${args[@]+"${args[@]}"}
