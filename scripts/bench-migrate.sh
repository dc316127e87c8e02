#!/usr/bin/env bash
# Live migration between decode workers (BENCHMARKS.md, "Migration"): `tandem up --prefill 1
# --decode 2` on the default model, KV over TRANSPORT (tcp, or shm); scripts/bench_migrate.py
# drains the decode worker holding one stream per prompt length (256, 1,024, 2,048 tokens) and
# then one running the most of STREAMS (default 16) streams. The same script's kv_bandwidth run gives the KV path's
# own bandwidth to compare with.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tandem-cli
cargo build --quiet --release --locked -p tandem-kv-transfer --example kv_bandwidth
TRANSPORT=${TRANSPORT:-tcp}
OUT=${OUT:-target/bench-migrate}
mkdir -p "$OUT"
echo "== KV path alone (kv_bandwidth, tcp-d and shm rows)"
KV_BENCH_ONLY=tcp-d:256,tcp-d:1024,shm:1024 target/release/examples/kv_bandwidth | grep -E "^(kind|tcp-d|shm) "
# shellcheck source=scripts/up-background.sh
source scripts/up-background.sh
start_cluster "$OUT" --prefill 1 --decode 2 --worker-threads 1 --drain-grace 60s --transport "$TRANSPORT"
ROUTER=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['router'])" "$OUT/up.json")
echo "== migration over $TRANSPORT"
python3 scripts/bench_migrate.py "$URL" "$ROUTER" "$OUT/up.log" target/release/tandem
