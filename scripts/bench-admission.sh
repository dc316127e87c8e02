#!/usr/bin/env bash
# Latency-budget admission on the real model (BENCHMARKS.md, "Admission"). One `tandem up --prefill 2
# --decode 2` cluster; the same `tandem bench` chat workload:
#   1. a rate sweep with no budget (admission off in effect: the unbudgeted horizon is 10 minutes),
#      which gives the best goodput the cluster reaches at any rate (TTFT 2 s, TPOT 100 ms);
#   2. OVER requests/s (default 4, about 3x capacity) with the 2 s / 100 ms budgets sent as headers;
#   3. half the capacity the sweep found, with the same budgets: nothing should be refused.
# Prints attainment among the admitted, goodput against the sweep's best, the share rejected and the
# measured/predicted TTFT. Environment: RATES (sweep), OVER, N (requests per run), OUT (folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tandem-cli
T=target/release/tandem
RATES=${RATES:-0.5,1,1.5,2,3}
OVER=${OVER:-4}
N=${N:-60}
OUT=${OUT:-target/bench-admission}
mkdir -p "$OUT"
SLO=(--goodput ttft:2000 tpot:100)

# shellcheck source=scripts/up-background.sh
source scripts/up-background.sh
start_cluster "$OUT" --prefill 2 --decode 2 --unbudgeted-horizon 600s

bench() { "$T" bench --url "$URL" --workload chat "${SLO[@]}" "$@"; }
bench --requests 8 --concurrency 1 >/dev/null
echo "== sweep without budgets: $RATES requests/s, $N each"
bench --sweep-rates "$RATES" --requests "$N" --json "$OUT/sweep.json" >"$OUT/sweep.txt"
echo "== $OVER requests/s with TTFT 2 s and ITL 100 ms budgets"
bench --rate "$OVER" --requests "$N" --ttft-budget 2s --itl-budget 100ms --json "$OUT/over.json" >"$OUT/over.txt"
HALF=$(python3 - "$OUT/sweep.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
ok = [r["summary"]["rate"] for r in runs if r["summary"]["slo"]["attainment"] >= 0.9]
print(max(ok) / 2 if ok else min(r["summary"]["rate"] for r in runs) / 2)
PY
)
echo "== $HALF requests/s (half the capacity the sweep found) with the same budgets"
bench --rate "$HALF" --requests "$N" --ttft-budget 2s --itl-budget 100ms --json "$OUT/half.json" >"$OUT/half.txt"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
sweep = [r["summary"] for r in json.load(open(f"{out}/sweep.json"))["runs"]]
print("\nrate/s  goodput/s  attainment  TTFT p50 ms  TTFT p99 ms   (no budgets)")
for s in sweep:
    t = s["ttft_ms"] or {}
    print(f"{s['rate']:6.2f}  {s['slo']['goodput_rps']:9.3f}  {s['slo']['attainment']:10.1%}  "
          f"{t.get('p50', float('nan')):11.0f}  {t.get('p99', float('nan')):11.0f}")
best = max(s["slo"]["goodput_rps"] for s in sweep)
print(f"best goodput without budgets: {best:.3f} requests/s")
for name in ("over", "half"):
    s = json.load(open(f"{out}/{name}.json"))["runs"][0]["summary"]
    a, slo, t = s, s["slo"], s["ttft_ms"] or {}
    ratio = s.get("ttft_over_predicted") or {}
    print(f"\n{name}: {s['rate']:.2f} requests/s, {s['requests']} requests")
    print(f"  admitted {a['admitted']}, rejected {a['rejected']} ({a['rejected_share']:.1%}) {a['rejections']}, failed {s['failed']}")
    adm = slo["admitted_attainment"]
    print(f"  within both budgets among the admitted: {adm:.1%}" if adm is not None else "  nothing admitted")
    print(f"  TTFT p50 {t.get('p50', float('nan')):.0f} ms, p99 {t.get('p99', float('nan')):.0f} ms")
    print(f"  goodput {slo['goodput_rps']:.3f} requests/s = {slo['goodput_rps'] / best:.2f}x the best without budgets")
    if ratio:
        print(f"  measured/predicted TTFT: p50 {ratio['p50']:.2f}, p90 {ratio['p90']:.2f} ({ratio['count']} requests)")
PY
