#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the default model (tests that need it fail without it),
# install the official `openai` Python client (the end-to-end client test drives the gateway with
# it), then every crate's unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
if ! python3 -c "import openai" >/dev/null 2>&1; then
  python3 -m pip install --quiet openai 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages openai
fi
cargo test --workspace --locked "$@"
