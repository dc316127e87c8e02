#!/usr/bin/env bash
# Issue 4: the discrete-event simulator and the `sim` engine agree. Runs one cluster both ways:
#  1. `tandem up --engine sim` (1 prefill + 1 decode worker, Llama-2-70B on 4 H100s each, step times
#     SCALE times the model's), loaded by `tandem bench` with Poisson arrivals of chat-like prompts;
#  2. `tandem plan --simulate` for the same cluster, replaying the very requests the bench sent
#     (send times and server-counted token lengths) at the same time scale;
# and prints both TTFT and ITL medians and their ratios (goal: within 10%).
# Needs a release build (cargo build --release -p tandem-cli) and the default model's tokenizer.
# Knobs (environment): RATE (requests/s, wall clock), REQUESTS, SCALE, SEED, ISL, OSL, KEEP (a
# directory to keep the JSON files in).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/tandem}
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$M" ] || ./scripts/fetch-model.sh
RATE=${RATE:-3}
REQUESTS=${REQUESTS:-200}
SCALE=${SCALE:-8}
SEED=${SEED:-1}
ISL=${ISL:-normal:200,75,50,400}
OSL=${OSL:-64}
CLUSTER="prefill=1,decode=1,tp=4,step-tokens=512"
dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"

coproc UP { exec $B up --port 0 --json --model $M --engine sim --sim-model llama-2-70b \
  --sim-gpu h100 --tp 4 --prefill 1 --decode 1 --step-tokens 512 --sim-time-scale "$SCALE" \
  2>"$dir/up.log"; }
# Closing its stdin is enough for the workers; the gateway process is stopped by signal.
stop() {
  exec {UP[1]}>&- 2>/dev/null || true
  kill "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
}
trap stop EXIT
read -r line <&"${UP[0]}"
URL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['url'])" "$line")
MODEL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['model'])" "$line")

bench=(bench --url "$URL" --model "$MODEL" --api completions --isl "$ISL" --osl "$OSL"
  --rate "$RATE" --arrival poisson --requests "$REQUESTS" --seed "$SEED" --tokenizer "$M"
  --quiet --json "$dir/bench.json")
plan=(plan --model llama-2-70b --gpu h100 --simulate "$CLUSTER" --replay "$dir/bench.json"
  --time-scale "$SCALE" --json)
echo "sim engine: $B ${bench[*]}"
$B "${bench[@]}" >/dev/null
stop
trap - EXIT
echo "DES:        $B ${plan[*]}"
$B "${plan[@]}" >"$dir/des.json"

python3 - "$dir/bench.json" "$dir/des.json" "$SCALE" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))["runs"][0]["summary"]
d = json.load(open(sys.argv[2]))
scale = float(sys.argv[3])
print(f"time scale {scale:g}: {b['requests']} requests ({b['failed']} failed), "
      f"{b['request_throughput']:.2f} req/s measured, {d['throughput_rps']:.2f} req/s simulated")
print(f"{'':14}{'sim engine':>12}{'DES':>12}{'DES/engine':>12}")
for name, bk, dk in [("TTFT p50 ms", "ttft_ms", "ttft_ms"), ("TTFT p90 ms", "ttft_ms", "ttft_ms"),
                     ("ITL p50 ms", "itl_ms", "itl_ms"), ("TPOT p50 ms", "tpot_ms", "tpot_ms"),
                     ("E2E p50 ms", "e2e_ms", "e2e_ms")]:
    q = "p90" if "p90" in name else "p50"
    if not b.get(bk):  # no ITL or TPOT when answers are one token long
        continue
    m, s = b[bk][q], d[dk][q]
    print(f"{name:14}{m:12.1f}{s:12.1f}{s / m:12.3f}")
ok = all(abs(d[k]["p50"] / b[k]["p50"] - 1) <= 0.10 for k in ("ttft_ms", "itl_ms") if b.get(k))
print("TTFT and ITL medians within 10%:", "yes" if ok else "NO")
PY
