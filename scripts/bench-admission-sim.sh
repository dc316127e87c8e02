#!/usr/bin/env bash
# Latency-budget admission at DGX scale on the sim engine (BENCHMARKS.md, "Admission"): Llama-2-70B
# on TP4 H100s, 4 prefill + 4 decode workers, MLPerf's interactive objectives (TTFT 450 ms, TPOT
# 40 ms) as every request's budgets, prompts around 1,000 tokens and answers around 200. Each load
# (LOADS, multiples of CAPACITY requests/s: the highest rate the simulator finds 99% within both
# objectives without admission; crates/sim/examples/admission_choice.rs) runs through `tandem bench`
# and then through the simulator replaying the same requests (`tandem plan --simulate --replay`),
# which runs the router's admission code: measured and predicted side by side. First, the same loads
# without budgets give the best goodput the cluster reaches without admission.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tandem-cli
T=target/release/tandem
CAPACITY=${CAPACITY:-18.75}
LOADS=${LOADS:-0.5 1 2 3}
N=${N:-400}
OUT=${OUT:-target/bench-admission-sim}
mkdir -p "$OUT"
SIM=(--engine sim --sim-model llama-2-70b --sim-gpu h100 --tp 4)
LENGTHS=(--isl normal:1000,300,100,3000 --osl normal:200,50,20,400)

# shellcheck source=scripts/up-background.sh
source scripts/up-background.sh
start_cluster "$OUT" "${SIM[@]}" --prefill 4 --decode 4
"$T" bench --url "$URL" "${LENGTHS[@]}" --requests 16 --concurrency 4 >/dev/null
RATES=$(python3 -c "import sys; print(','.join(str(float(l) * $CAPACITY) for l in sys.argv[1:]))" $LOADS)
echo "== without budgets: $RATES requests/s, $N each"
"$T" bench --url "$URL" "${LENGTHS[@]}" --sweep-rates "$RATES" --requests "$N" \
  --goodput ttft:450 tpot:40 --json "$OUT/sweep.json" >"$OUT/sweep.txt"
BEST=$(python3 -c "import json,sys; print(max(r['summary']['slo']['goodput_rps'] for r in json.load(open(sys.argv[1]))['runs']))" "$OUT/sweep.json")
grep -E "^== rate|SLO" "$OUT/sweep.txt" | sed 's/^/  /'
echo "  best goodput without budgets: $BEST requests/s"
for load in $LOADS; do
  rate=$(python3 -c "print($load * $CAPACITY)")
  echo "== ${load}x: $rate requests/s, $N requests"
  "$T" bench --url "$URL" "${LENGTHS[@]}" --rate "$rate" --requests "$N" \
    --ttft-budget 450ms --itl-budget 40ms --goodput ttft:450 tpot:40 \
    --json "$OUT/run-$load.json" >"$OUT/run-$load.txt"
  "$T" plan --simulate prefill=4,decode=4,tp=4 --model llama-2-70b --gpu h100 \
    --replay "$OUT/run-$load.json" >"$OUT/des-$load.txt" 2>&1 || true
  grep -iE "rejected|goodput|attainment|admitted|TTFT/predicted" "$OUT/run-$load.txt" | sed 's/^/  measured: /'
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['runs'][0]['summary']['slo']['goodput_rps']; print(f'  measured: goodput {s:.2f}/s = {s / $BEST:.2f}x the best without budgets')" "$OUT/run-$load.json"
  grep -iE "rejected|goodput|attainment|admitted" "$OUT/des-$load.txt" | sed 's/^/  DES:      /'
done
