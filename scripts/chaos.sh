#!/usr/bin/env bash
# The chaos suite at length (issue 18; BENCHMARKS.md, "Failover"), CHAOS_ROUNDS rounds (default 5)
# of each fault under load:
# - tests/e2e_chaos.rs on `tandem up --prefill 2 --decode 2`: kill -9 and kill -STOP/-CONT of a
#   decode and of a prefill worker, and a slow decode worker (stopped 150 ms of every 250 ms);
# - tests/e2e_hosts.rs, each worker in its own network namespace (needs root): KV frames corrupted
#   on their way to a decode worker, the prefill-decode link cut, a decode worker's host cut off;
# - tests/e2e_routers.rs: a gateway placing through a standalone router that is killed for 5 s.
# Prints per fault and round the requests run, those failed or different from their undisturbed
# run (goal 0), those that ran across the fault and the longest gap between two events they saw
# (p50, p99). CI runs one round of each.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
for t in e2e_chaos e2e_hosts e2e_routers; do
  CHAOS_ROUNDS=${CHAOS_ROUNDS:-5} cargo test --release --locked -p tandem-cli --test "$t" \
    -- --nocapture 2>&1 | grep -E "^round |test result|panicked|FAILED"
done
