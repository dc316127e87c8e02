#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model if absent, build, and start a local
# cluster (`tandem up`: gateway and router, one prefill and one decode worker) serving it on
# http://127.0.0.1:8000/v1. Extra arguments go to `tandem up` (for example --prefill 2 --decode 2
# --transport shm, or --port 9000). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
cargo build --release --locked -p tandem-cli
exec ./target/release/tandem up "$@"
