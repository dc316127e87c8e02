#!/usr/bin/env bash
# A rolling restart under load (BENCHMARKS.md, "Drain"): `tandem up --prefill 2 --decode 2`,
# `tandem bench` (chat workload) at RATE requests/s while each worker in turn is drained with
# `tandem drain`; `tandem up` starts it again, and once four workers are ready the next one goes.
# Prints how long each drain took (until the worker left the router's set) and how long until the
# cluster was whole again, then the bench's requests, failures and errors (goal: none lost).
# Environment: RATE (0.3), N (requests, 40), GRACE (drain grace, 10s), OUT (folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tandem-cli
T=target/release/tandem
RATE=${RATE:-0.3}
N=${N:-40}
GRACE=${GRACE:-10s}
OUT=${OUT:-target/bench-rolling}
mkdir -p "$OUT"
# shellcheck source=scripts/up-background.sh
source scripts/up-background.sh
start_cluster "$OUT" --prefill 2 --decode 2 --worker-threads 1 --drain-grace "$GRACE"
ROUTER=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['router'])" "$OUT/up.json")
workers() { "$T" workers --router "$ROUTER" --json; }
"$T" bench --url "$URL" --workload chat --rate "$RATE" --requests "$N" --json "$OUT/bench.json" \
  >"$OUT/bench.txt" &
BENCH=$!
sleep 10
ids=$(workers | python3 -c "import json,sys; print(' '.join(json.loads(l)['id'] for l in sys.stdin))")
for id in $ids; do
  t0=$(date +%s.%N)
  held=$("$T" drain "$id" --router "$ROUTER" | grep -o 'with [0-9]* in flight')
  # (the list is read whole first: `grep -q` under pipefail would end the loop at once)
  while [[ "$(workers)" == *"\"id\":\"$id\""* ]]; do sleep 0.1; done
  t1=$(date +%s.%N)
  until [ "$(workers | grep -c '"state":"ready"' || true)" = 4 ]; do sleep 0.1; done
  t2=$(date +%s.%N)
  python3 -c "import sys; a,b,c=map(float,sys.argv[3:]); print(f'{sys.argv[1]} ({sys.argv[2]}): drained and gone in {b-a:.1f} s, cluster whole again {c-b:.1f} s later')" \
    "$id" "$held" "$t0" "$t1" "$t2"
done
wait "$BENCH"
python3 - "$OUT/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]["summary"]
print(f"bench: {r['requests']} requests, {r['succeeded']} succeeded, {r['failed']} failed, errors {r['errors']}")
PY
