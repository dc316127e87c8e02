#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the default model (tests that need it fail without it),
# then every crate's unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
cargo test --workspace --locked "$@"
