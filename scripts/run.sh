#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model if absent, build, and run it.
# Until the serving path (gateway, router, workers, `tandem up`) lands, this runs the single-process
# engine on a chat prompt; extra arguments go to `tandem generate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
cargo build --release --locked -p tandem-cli
if [ "$#" -eq 0 ]; then
  set -- --chat --prompt "Explain in two sentences why the sky is blue." --max-tokens 96
fi
exec ./target/release/tandem generate "$@"
