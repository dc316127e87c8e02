#!/usr/bin/env bash
# The chaos suite at length (issue 18; BENCHMARKS.md, "Failover"): `tests/e2e_chaos.rs` with
# CHAOS_ROUNDS rounds (default 5) of each fault under load on `tandem up --prefill 2 --decode 2`:
# kill -9 and kill -STOP/-CONT of a decode and of a prefill worker. Prints per fault and round the
# requests run, those failed or different from their undisturbed run (goal 0), those that ran
# across the fault and the longest gap between two events they saw (p50, p99). CI runs one round.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
CHAOS_ROUNDS=${CHAOS_ROUNDS:-5} cargo test --release --locked -p tandem-cli --test e2e_chaos \
  -- --nocapture 2>&1 | grep -E "^round |test result|panicked|FAILED"
