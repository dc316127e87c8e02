//! Chaos under load (issue 18): clients keep greedy streams running against `tandem up --prefill
//! 2 --decode 2` while faults hit each worker role in turn: `kill -9` (the worker is restarted),
//! `kill -STOP` then `kill -CONT`, and a slow decode worker (stopped for most of each quarter
//! second). Every request must end cleanly (none lost, none hung, none failed: a healthy
//! replacement always exists) with the tokens of its undisturbed run. What each fault cost is
//! printed: the longest gap a client saw between two events of a stream, p50 and p99 over the
//! streams that ran across the fault. Faults of the network (a cut link, a host cut off,
//! corrupted KV frames) are in `e2e_hosts`. This is the short version CI runs;
//! `scripts/chaos.sh` runs both with more rounds (`CHAOS_ROUNDS`) and keeps the printout.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::chaos::{Running, account, undisturbed};
use support::{Up, info};
use tandem_proto::v1;

fn kill(signal: &str, pid: u32) {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
}

/// The pid of a ready worker of `role`: the decode worker running the most sequences, or the
/// prefill worker with the most requests.
async fn victim(up: &Up, role: v1::WorkerRole) -> u32 {
    let mut best = (0, 0);
    for (addr, pid) in up.addrs(role).await {
        let i = info(&addr).await;
        let busy = match role {
            v1::WorkerRole::Prefill => u64::from(i.prefill_requests),
            _ => u64::from(i.load.map_or(0, |l| l.running_seqs)),
        };
        if busy >= best.0 {
            best = (busy, pid);
        }
    }
    best.1
}

/// Waits until two prefill and two decode workers are registered again.
async fn whole(up: &Up) {
    for _ in 0..600 {
        let p = up.addrs(v1::WorkerRole::Prefill).await.len();
        let d = up.addrs(v1::WorkerRole::Decode).await.len();
        if (p, d) == (2, 2) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cluster did not regain its four workers");
}

#[derive(Clone, Copy)]
enum Fault {
    Kill,
    /// Stopped for 5 s.
    Stop,
    /// Stopped for 150 ms of every 250 ms, for 5 s: a worker that runs at 40% of its speed (a
    /// throttled or shared host) and never stops long enough to look dead.
    Slow,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_no_request_is_lost_hung_or_failed_when_workers_die_stop_or_slow() {
    let rounds = support::chaos::rounds();
    let up = Up::start(&["--prefill", "2", "--decode", "2", "--worker-threads", "1"]);
    let want = undisturbed(&up.url, &up.model).await;
    let faults = [
        ("kill -9 decode", v1::WorkerRole::Decode, Fault::Kill),
        ("kill -9 prefill", v1::WorkerRole::Prefill, Fault::Kill),
        ("stop decode 5 s", v1::WorkerRole::Decode, Fault::Stop),
        ("stop prefill 5 s", v1::WorkerRole::Prefill, Fault::Stop),
        ("slow decode 5 s", v1::WorkerRole::Decode, Fault::Slow),
    ];
    let mut failures = Vec::new();
    for round in 0..rounds {
        for (name, role, fault) in faults {
            let running = Running::start(&up.url, &up.model);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let pid = victim(&up, role).await;
            let at = Instant::now();
            match fault {
                Fault::Kill => kill("-KILL", pid),
                Fault::Stop => {
                    kill("-STOP", pid);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    kill("-CONT", pid);
                }
                Fault::Slow => {
                    while at.elapsed() < Duration::from_secs(5) {
                        kill("-STOP", pid);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        kill("-CONT", pid);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let over = Instant::now();
            tokio::time::sleep(Duration::from_secs(4)).await;
            let done = running.finish(name).await;
            failures.extend(account(round, name, &done, &want, at, over));
            whole(&up).await;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
