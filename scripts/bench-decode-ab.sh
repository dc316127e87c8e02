#!/usr/bin/env bash
# The decode side's figures of two trees, alternated in one script (this host is noisy), each as
# B/A of medians: the decode step of 16 sequences (the engine's batch_decode example), KV
# bandwidth as a decode worker takes it (kv_bandwidth's tcp-d and shm rows at 1,024 tokens, each
# already a ratio to a plain copy in the same run), and streamed tokens/s at 64 streams through
# `tandem up` on the null engine (scripts/bench-overhead.sh). A is the baseline tree, e.g. main:
#   git worktree add /tmp/base main && ln -s "$PWD/models" /tmp/base/models
# Each tree is built in its own target folder (shared, the workspace crates collide).
# Usage: A=/tmp/base [B=.] [ROUNDS=3] scripts/bench-decode-ab.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${A:?the baseline tree}"
B=${B:-$PWD}
ROUNDS=${ROUNDS:-3}
./scripts/fetch-model.sh >/dev/null
for tree in "$A" "$B"; do
  (cd "$tree" && cargo build --quiet --release --locked -p tandem-cli &&
    cargo build --quiet --release --locked -p tandem-engine --example batch_decode &&
    cargo build --quiet --release --locked -p tandem-kv-transfer --example kv_bandwidth)
done
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    tree=${!side}
    echo "round $r, $side ($tree)"
    (cd "$tree" && B=16 STEPS=64 ROUNDS=3 target/release/examples/batch_decode) >"$out/$side-$r-step.txt"
    (cd "$tree" && KV_BENCH_ONLY=tcp-d:1024,shm:1024 target/release/examples/kv_bandwidth) >"$out/$side-$r-kv.txt"
    B="$tree/target/release/tandem" ./scripts/bench-overhead.sh >"$out/$side-$r-null.txt"
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def values(side, what, pick):
    v = []
    for r in range(1, rounds + 1):
        for line in open(f"{out}/{side}-{r}-{what}.txt"):
            x = pick(line)
            if x is not None:
                v.append(x)
    return v
def match(pattern):
    def pick(line):
        m = re.match(pattern, line)
        return float(m.group(1)) if m else None
    return pick
def kv(kind):
    def pick(line):
        f = line.split()
        return float(f[4]) if len(f) > 4 and f[0] == kind and f[1] == "1024" else None
    return pick
rows = [
    ("decode step of 16 sequences, ms (lower is better)", "step", match(r"batch 16: step ([0-9.]+) ms")),
    ("tcp-d 1,024 tokens, ratio to a socket copy", "kv", kv("tcp-d")),
    ("shm 1,024 tokens, ratio to a memcpy", "kv", kv("shm")),
    ("null engine, 64 streams, output tokens/s", "null", match(r"concurrency 64: .* (\d+) output tokens/s")),
]
for name, what, pick in rows:
    a, b = values("A", what, pick), values("B", what, pick)
    if not a or not b:
        print(f"{name}: no figures (A {a}, B {b})")
        continue
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name}: A {a} median {ma:g}; B {b} median {mb:g}; B/A {mb / ma:.3f}")
PY
