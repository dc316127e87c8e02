#!/usr/bin/env bash
# Control-plane overhead of two builds, alternated in one script (this host is noisy): runs
# scripts/bench-overhead.sh with binary A, then B, ROUNDS times, and prints each one's streamed
# tokens/s at 64 streams and the ratio B/A of their medians, and the same for the CPU the gateway
# and router process spends per streamed token (less noisy than a rate on a shared machine). A is
# the baseline, e.g. main built in a worktree:
#   git worktree add /tmp/base main && (cd /tmp/base && cargo build --release -p tandem-cli)
# (a separate CARGO_TARGET_DIR, or both builds' workspace crates collide).
# Usage: A=/tmp/base/target/release/tandem B=target/release/tandem scripts/bench-overhead-ab.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${A:?the baseline binary}" "${B:=target/release/tandem}"
ROUNDS=${ROUNDS:-3}
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=${!side}
    B="$bin" ./scripts/bench-overhead.sh | tee "$out/$side-$r.txt" | sed "s/^/$side round $r: /"
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def values(side, pattern, number):
    """Each round's figure of the 64-stream run that `pattern` captures."""
    v = []
    for r in range(1, rounds + 1):
        for line in open(f"{out}/{side}-{r}.txt"):
            m = re.match(pattern, line)
            if m:
                v.append(number(m.group(1)))
    return v
def rates(side):
    return values(side, r"concurrency 64: .* (\d+) output tokens/s", int)
def cpu(side):
    return values(side, r"concurrency 64: gateway and router CPU ([0-9.]+) us per output token", float)
a, b = rates("A"), rates("B")
print(f"64 streams, output tokens/s: A {a} (median {statistics.median(a):.0f}), B {b} (median {statistics.median(b):.0f})")
print(f"B/A = {statistics.median(b) / statistics.median(a):.3f}")
ca, cb = cpu("A"), cpu("B")
if ca and cb:
    print(f"64 streams, gateway and router CPU us per output token: A {ca} (median {statistics.median(ca):.2f}), B {cb} (median {statistics.median(cb):.2f})")
    print(f"CPU B/A = {statistics.median(cb) / statistics.median(ca):.3f}")
PY
