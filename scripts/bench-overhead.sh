#!/usr/bin/env bash
# Control-plane overhead: gateway, router, prefill and decode workers and the KV transfer with the
# compute removed (`--engine sim --sim-time-scale 0`), driven by `tandem bench` at 1 and 64 streams.
# With no compute, TTFT is what the path itself adds and the token rate is what the path sustains.
# Needs a release build: cargo build --release -p tandem-cli
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${B:-./target/release/tandem}
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
coproc UP { exec $B up --port 0 --json --model $M --engine sim --sim-model llama-2-70b --sim-gpu h100 --tp 4 --sim-time-scale 0 2>/dev/null; }
read -r line <&"${UP[0]}"
URL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['url'])" "$line")
MODEL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['model'])" "$line")
# PER: measured requests per stream of the closed-loop runs; RATE: requests/s of the open-loop run.
PER=${PER:-4}
RATE=${RATE:-50}
report() {
  python3 - "$1" "$2" <<'PY'
import json,sys
name,f=sys.argv[1],sys.argv[2]; r=json.load(open(f))["runs"][0]["summary"]
print(f"{name}: TTFT p50 {r['ttft_ms']['p50']:.3f} ms p90 {r['ttft_ms']['p90']:.3f} ms, ITL p50 {r['itl_ms']['p50']:.3f} ms, {r['output_token_throughput']:.0f} output tokens/s, ok {r['succeeded']}/{r['requests']}")
PY
}
# Closed loop: 1 stream (added latency on an idle path) and 64 (what the path sustains; with zero
# compute the machine is saturated by construction, so TTFT there is mostly queueing).
# CPU seconds the `tandem up` process (gateway and router; the workers are other processes) has
# used so far: what the path's own bookkeeping costs shows here, with less noise than a rate.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$UP_PID/stat"; }
for c in 1 64; do
  before=$(cpu)
  $B bench --url $URL --model $MODEL --api completions --isl 128 --osl 256 --concurrency $c --requests $((c*PER)) --warmup 4 --tokenizer $M --quiet --json /tmp/ovh-$c.json >/dev/null
  after=$(cpu)
  report "concurrency $c" /tmp/ovh-$c.json
  python3 - "$c" "$before" "$after" /tmp/ovh-$c.json <<'PY'
import json, sys
c, before, after, f = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
r = json.load(open(f))["runs"][0]["summary"]
tokens = r["total_output_tokens"] + 4 * 256  # the warm-up requests' tokens too
print(f"concurrency {c}: gateway and router CPU {(after - before) * 1e6 / tokens:.2f} us per output token")
PY
done
# Open loop below saturation: Poisson arrivals at RATE requests/s (RATE*256 tokens/s), so that
# TTFT is what the path adds to a request that does not queue behind a saturated CPU.
$B bench --url $URL --model $MODEL --api completions --isl 128 --osl 256 --rate $RATE --arrival poisson --seed 1 --requests $((RATE*4)) --warmup 4 --tokenizer $M --quiet --json /tmp/ovh-rate.json >/dev/null
report "open loop $RATE req/s" /tmp/ovh-rate.json
kill $UP_PID; wait $UP_PID 2>/dev/null || true
