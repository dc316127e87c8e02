#!/usr/bin/env bash
# Issue 4: the simulator against reality. Profiles the native engine (one compute thread; with
# `--served`, also prompts and decode steps through a served pair, which the simulator's prefill
# factor and decode step spread come from), then runs
# `tandem up` (1 prefill + 1 decode worker, the default SmolLM2, one compute thread each) under the
# `chat` workload at each rate in RATES, and sets the measured TTFT p50/p90, ITL p50 and mean, and
# throughput beside `tandem plan --simulate --profile` replaying the same requests. The machine's
# load average (1-minute) before and after each rate's run is printed with its figures: the runs
# share 2 cores with whatever else is running, so a load above about 2 spoils them. The host's
# speed against the profile is checked right before and right after each run (`tandem profile
# --check`, about ten seconds each), and the DES replays the run with the profile rescaled to the
# mean of the two checks: a shared host changes speed by tens of percent over minutes, and what
# this compares is the simulator, given the engine's speed while the run lasted. CHECK=served (the
# default) times prompts and answers through the run's own served pair against the profile's
# served part; CHECK=engine times the engine alone in its own process (which cannot see the two
# workers slowed together); CHECK=0 skips the checks. A run whose checks moved more than 10% is
# flagged.
# Needs a release build (cargo build --release -p tandem-cli). Knobs (environment): RATES
# (requests/s, comma-separated), REQUESTS (per rate), SEED, OSL (answer length instead of the
# workload's 64; 1 isolates the prefill path), PROFILE (reuse a profile file), KEEP.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/tandem}
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$M" ] || ./scripts/fetch-model.sh
RATES=${RATES:-0.5,0.8}
REQUESTS=${REQUESTS:-40}
SEED=${SEED:-1}
dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"
PROFILE=${PROFILE:-$dir/profile.json}
if [ ! -s "$PROFILE" ]; then
  echo "profiling: $B profile --threads 1 --served --out $PROFILE"
  $B profile --model "$M" --threads 1 --served --out "$PROFILE" | tail -4
fi
CHECK=${CHECK:-served}
# The host's speed against the profile: `served` times prompts and answers through the run's own
# served pair (about 10 s), `engine` the engine alone in this process (the shapes the test uses).
check() {
  if [ "$CHECK" = served ]; then
    $B profile --model "$M" --json --check "$PROFILE" --served-url "$URL" "$@"
  else
    $B profile --model "$M" --threads 1 --prompt-lens 64,128,256 --prefill-batches 1 \
      --decode-batches 1,2 --contexts 128 --reps 4 --decode-reps 20 --json --check "$PROFILE" "$@"
  fi
}
# The check after a rate's run, which rescales the profile the DES replays that run with.
after() {
  sim_profile=$dir/profile-$rate.json
  check --since "$dir/check-before-$rate.json" --out "$sim_profile" \
    >"$dir/check-after-$rate.json" 2>"$dir/check-after-$rate.log"
}
for rate in ${RATES//,/ }; do
  sim_profile=$PROFILE
  if [ "$CHECK" = engine ]; then
    check >"$dir/check-before-$rate.json" 2>/dev/null
  fi
  coproc UP { exec $B up --port 0 --json --model $M --prefill 1 --decode 1 --worker-threads 1 \
    --step-tokens 512 2>"$dir/up-$rate.log"; }
  read -r line <&"${UP[0]}"
  URL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['url'])" "$line")
  MODEL=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['model'])" "$line")
  if [ "$CHECK" = served ]; then
    check >"$dir/check-before-$rate.json" 2>"$dir/check-before-$rate.log"
  fi
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  out="$dir/bench-$rate.json"
  $B bench --url "$URL" --model "$MODEL" --api completions --workload chat ${OSL:+--osl "$OSL"} --rate "$rate" \
    --arrival poisson --requests "$REQUESTS" --seed "$SEED" --tokenizer "$M" --quiet --json "$out" \
    >/dev/null
  load_after=$(cut -d' ' -f1 /proc/loadavg)
  if [ "$CHECK" = served ]; then
    after
  fi
  exec {UP[1]}>&- 2>/dev/null || true
  kill "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
  if [ "$CHECK" = engine ]; then
    after
  fi
  if [ "$CHECK" != 0 ]; then
    echo "  $CHECK checks: $(cat "$dir/check-before-$rate.json") before, $(cat "$dir/check-after-$rate.json") after"
    grep -E "moved|rescaled" "$dir/check-after-$rate.log" | sed 's/^/  /'
    python3 - "$dir/check-before-$rate.json" "$dir/check-after-$rate.json" <<'PY'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
moved = max(abs(b[k] / a[k] - 1) for k in ("prefill", "decode"))
if moved > 0.10:
    print(f"  WARNING: the host's speed moved {100 * moved:.0f}% across this run; run it again")
PY
  fi
  $B plan --model smollm2-135m --gpu h100 --profile "$sim_profile" --json \
    --simulate prefill=1,decode=1,tp=1,step-tokens=512 --replay "$out" >"$dir/des-$rate.json"
  python3 - "$out" "$dir/des-$rate.json" "$rate" "$load_before" "$load_after" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))["runs"][0]["summary"]
d = json.load(open(sys.argv[2]))
print(f"rate {sys.argv[3]}/s: {b['requests']} requests ({b['failed']} failed), "
      f"load average {sys.argv[4]} before, {sys.argv[5]} after")
print(f"{'':18}{'measured':>12}{'DES':>12}{'DES/measured':>14}")
rows = [("TTFT p50 ms", b["ttft_ms"]["p50"], d["ttft_ms"]["p50"]),
        ("TTFT p90 ms", b["ttft_ms"]["p90"], d["ttft_ms"]["p90"]),
        ("ITL p50 ms", (b["itl_ms"] or {}).get("p50", 0), d["itl_ms"]["p50"]),
        ("ITL mean ms", (b["itl_ms"] or {}).get("mean", 0), d["itl_ms"]["mean"]),
        ("requests/s", b["request_throughput"], d["throughput_rps"]),
        ("output tokens/s", b["output_token_throughput"], d["output_tokens_per_s"])]
for name, m, s in rows:
    if m:
        print(f"{name:18}{m:12.2f}{s:12.2f}{s / m:14.3f}")
PY
done
