#!/usr/bin/env bash
# The benchmark suite behind BENCHMARKS.md: each benchmark prints its figures beside a baseline run in
# the same process, with the goal. Run it on an otherwise idle machine; it takes several minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
run() {
  echo
  echo "== $*"
  cargo run --quiet --release --locked "$@"
}
run -p tandem-engine --features candle-baseline --example vs_candle
run -p tandem-kv-transfer --example kv_bandwidth
run -p tandem-router --example place_bench
run -p tandem-sim --example des_speed
run -p tandem-bench --example client_throughput
echo
echo "== scripts/bench-llamacpp.sh --no-install"
./scripts/bench-llamacpp.sh --no-install
