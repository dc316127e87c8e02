#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use tandem_proto::v1::{BlockGeometry, WorkerIdentity, WorkerRole};

use super::*;
use crate::policy::LeastLoaded;
use crate::types::RequestShape;

const SEC: Duration = Duration::from_secs(1);

pub(super) fn ident(id: &str, role: WorkerRole) -> WorkerIdentity {
    WorkerIdentity {
        worker_id: id.into(),
        role: role.into(),
        grpc_addr: format!("{id}:1"),
        kv_endpoint: format!("{id}:2"),
        model: "m".into(),
        geometry: Some(BlockGeometry {
            block_tokens: 16,
            ..BlockGeometry::default()
        }),
        ..WorkerIdentity::default()
    }
}

pub(super) fn ready(queued: u64, free: u64, running: u32) -> Load {
    Load {
        state: WorkerState::Ready,
        queued_prefill_tokens: queued,
        free_kv_blocks: free,
        total_kv_blocks: free.max(1000),
        running_seqs: running,
        ..Load::default()
    }
}

fn shape(prompt: u32) -> RequestShape {
    RequestShape {
        prompt_tokens: prompt,
        max_new_tokens: 16,
        ..RequestShape::default()
    }
}

fn registry() -> Registry {
    Registry::new(RegistryConfig::default(), Box::new(LeastLoaded))
}

/// A registry with prefill workers of the given queued tokens and decode workers of the given
/// free blocks, all ready, registered at `t0`.
fn cluster(t0: Instant, prefill: &[u64], decode: &[u64]) -> Registry {
    let mut r = registry();
    for (i, &q) in prefill.iter().enumerate() {
        r.register(
            ident(&format!("p{i}"), WorkerRole::Prefill),
            ready(q, 0, 0),
            t0,
        )
        .unwrap();
    }
    for (i, &f) in decode.iter().enumerate() {
        r.register(
            ident(&format!("d{i}"), WorkerRole::Decode),
            ready(0, f, 0),
            t0,
        )
        .unwrap();
    }
    r
}

fn pair(r: &mut Registry, prompt: u32, now: Instant) -> (String, String) {
    let p = r.place(&shape(prompt), now).unwrap();
    (p.prefill.worker_id.clone(), p.decode.worker_id.clone())
}

#[test]
fn register_lists_the_worker_and_assigns_missing_ids() {
    let t0 = Instant::now();
    let mut r = registry();
    let lease = r
        .register(ident("p0", WorkerRole::Prefill), ready(0, 0, 0), t0)
        .unwrap();
    assert_eq!(&*lease.worker_id, "p0");
    assert_eq!(lease.lease, 3 * SEC);
    // An explicit id that looks like an assigned one must not be taken over.
    r.register(ident("decode-1", WorkerRole::Decode), ready(0, 5, 0), t0)
        .unwrap();
    let auto = r
        .register(ident("", WorkerRole::Decode), ready(0, 5, 0), t0)
        .unwrap();
    assert_eq!(&*auto.worker_id, "decode-2");
    let again = r.register(ident("decode-2", WorkerRole::Decode), ready(0, 5, 0), t0);
    assert_eq!(again.map(|l| l.worker_id).ok().as_deref(), Some("decode-2"));
    assert!(r.take_changed());
    assert!(!r.take_changed());
    let set = r.snapshot(t0 + SEC);
    let ids: Vec<&str> = set
        .workers
        .iter()
        .map(|w| w.identity.worker_id.as_str())
        .collect();
    assert_eq!(ids, ["decode-1", "decode-2", "p0"]);
    assert_eq!(set.workers[2].lease_left, 2 * SEC);
    assert_eq!(set.version, 4);
}

#[test]
fn bad_registrations_are_refused() {
    let t0 = Instant::now();
    let mut r = registry();
    let no_role = ident("x", WorkerRole::Unspecified);
    assert!(matches!(
        r.register(no_role, ready(0, 0, 0), t0),
        Err(RouterError::InvalidArgument(_))
    ));
    let mut no_addr = ident("x", WorkerRole::Prefill);
    no_addr.grpc_addr.clear();
    assert!(matches!(
        r.register(no_addr, ready(0, 0, 0), t0),
        Err(RouterError::InvalidArgument(_))
    ));
    let mut no_kv = ident("x", WorkerRole::Decode);
    no_kv.kv_endpoint.clear();
    assert!(matches!(
        r.register(no_kv, ready(0, 0, 0), t0),
        Err(RouterError::InvalidArgument(_))
    ));
    assert!(r.is_empty());
}

#[test]
fn heartbeat_refreshes_the_lease() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[]);
    assert_eq!(
        r.heartbeat("p0", ready(0, 0, 0), t0 + 2 * SEC).unwrap(),
        3 * SEC
    );
    assert!(
        r.expire(t0 + 4 * SEC).is_empty(),
        "renewed at 2 s, so it runs to 5 s"
    );
    let gone = r.expire(t0 + 5 * SEC);
    assert_eq!(gone.iter().map(|s| &**s).collect::<Vec<_>>(), ["p0"]);
    assert!(r.is_empty());
}

#[test]
fn a_lapsed_worker_leaves_the_set_and_must_register_again() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0, 0], &[10]);
    r.heartbeat("p1", ready(0, 0, 0), t0 + 2 * SEC).unwrap();
    r.heartbeat("d0", ready(0, 10, 0), t0 + 2 * SEC).unwrap();
    r.take_changed();
    let v = r.version();
    // p0's lease ran out at 3 s; a placement before any sweep must not pick it.
    let (p, _) = pair(&mut r, 10, t0 + 3 * SEC);
    assert_eq!(p, "p1");
    assert_eq!(r.len(), 2);
    assert!(r.take_changed());
    assert_eq!(r.version(), v + 1);
    let late = r.heartbeat("p0", ready(0, 0, 0), t0 + 3 * SEC);
    assert!(matches!(late, Err(RouterError::UnknownWorker(_))));
    assert!(matches!(
        r.heartbeat("nobody", ready(0, 0, 0), t0),
        Err(RouterError::UnknownWorker(_))
    ));
}

#[test]
fn draining_and_starting_workers_take_no_new_work() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0, 500], &[10, 5]);
    let draining = Load {
        state: WorkerState::Draining,
        ..ready(0, 0, 0)
    };
    r.heartbeat("p0", draining, t0).unwrap();
    r.heartbeat(
        "d0",
        Load {
            state: WorkerState::Draining,
            ..ready(0, 10, 0)
        },
        t0,
    )
    .unwrap();
    assert_eq!(pair(&mut r, 10, t0), ("p1".into(), "d1".into()));
    r.heartbeat("p1", draining, t0).unwrap();
    assert!(matches!(
        r.place(&shape(10), t0),
        Err(RouterError::NoWorkers(Leg::Prefill))
    ));
    let starting = Load {
        state: WorkerState::Starting,
        ..ready(0, 0, 0)
    };
    r.register(ident("p2", WorkerRole::Prefill), starting, t0)
        .unwrap();
    assert!(matches!(
        r.place(&shape(10), t0),
        Err(RouterError::NoWorkers(Leg::Prefill))
    ));
    r.heartbeat("p2", ready(0, 0, 0), t0).unwrap();
    assert_eq!(pair(&mut r, 10, t0).0, "p2");
    assert_eq!(
        r.len(),
        5,
        "draining workers stay registered until they leave"
    );
}

#[test]
fn default_policy_picks_least_queued_prefill_and_roomiest_decode() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[300, 100, 200], &[10, 50, 50]);
    r.heartbeat("d1", ready(0, 50, 3), t0).unwrap();
    assert_eq!(pair(&mut r, 16, t0), ("p1".into(), "d2".into()));
}

#[test]
fn excluded_workers_are_passed_over_for_the_next_best() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[300, 100, 200], &[10, 50, 40]);
    // A failover off d1 (the roomiest) and p1 (the least queued): the next best of each.
    let moved = RequestShape {
        exclude: vec!["d1".into(), "p1".into()],
        ..shape(16)
    };
    let p = r.place(&moved, t0).unwrap();
    assert_eq!(
        (p.prefill.worker_id.as_str(), p.decode.worker_id.as_str()),
        ("p2", "d2")
    );
    let nowhere = RequestShape {
        exclude: vec!["d0".into(), "d1".into(), "d2".into()],
        ..shape(16)
    };
    assert!(matches!(
        r.place(&nowhere, t0),
        Err(RouterError::NoWorkers(Leg::Decode))
    ));
}

#[test]
fn a_worker_reported_failed_takes_no_new_work_until_a_heartbeat_after_the_pause() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[50, 40]);
    assert_eq!(pair(&mut r, 16, t0).1, "d0");
    assert_eq!(r.report("d0", false, t0), None);
    assert_eq!(r.report("nobody", false, t0), None);
    assert_eq!(pair(&mut r, 16, t0).1, "d1");
    // Heartbeats within the 5 s pause do not list it again; one after it does.
    let beat = |r: &mut Registry, at: Instant| {
        for (id, free) in [("d0", 50), ("d1", 40), ("p0", 0)] {
            r.heartbeat(id, ready(0, free, 0), at).unwrap();
        }
    };
    let ms = Duration::from_millis;
    beat(&mut r, t0 + ms(2500));
    beat(&mut r, t0 + ms(4900));
    assert_eq!(pair(&mut r, 16, t0 + ms(4900)).1, "d1");
    beat(&mut r, t0 + ms(5000));
    assert_eq!(pair(&mut r, 16, t0 + ms(5000)).1, "d0");
}

#[test]
fn a_burst_spreads_before_any_heartbeat() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0, 0, 0, 0], &[100, 100]);
    let mut per_prefill = [0; 4];
    let mut per_decode = [0; 2];
    for _ in 0..8 {
        let (p, d) = pair(&mut r, 100, t0);
        per_prefill[p[1..].parse::<usize>().unwrap()] += 1;
        per_decode[d[1..].parse::<usize>().unwrap()] += 1;
    }
    assert_eq!(per_prefill, [2, 2, 2, 2]);
    assert_eq!(per_decode, [4, 4]);
}

#[test]
fn heartbeats_take_over_from_optimistic_counts_after_the_report_lag() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0, 50], &[100]);
    assert_eq!(pair(&mut r, 100, t0).0, "p0");
    // p0 reports before the placement can show: the 100 tokens stay counted on top of it.
    r.heartbeat("p0", ready(0, 0, 0), t0 + Duration::from_millis(100))
        .unwrap();
    assert_eq!(pair(&mut r, 10, t0 + Duration::from_millis(100)).0, "p1");
    // Later reports replace both placements: p0 says it is idle, p1 still has 60 queued.
    r.heartbeat("p0", ready(0, 0, 0), t0 + SEC).unwrap();
    r.heartbeat("p1", ready(60, 0, 0), t0 + SEC).unwrap();
    assert_eq!(pair(&mut r, 10, t0 + SEC).0, "p0");
}

#[test]
fn overload_is_refused_and_charges_nothing() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[1 << 20], &[4]);
    let full = Load {
        prefill_tokens_per_s: 1024.0,
        ..ready(1 << 20, 0, 0)
    };
    r.heartbeat("p0", full, t0).unwrap();
    match r.place(&shape(10), t0) {
        Err(RouterError::Overloaded {
            leg: Leg::Prefill,
            retry_after,
            ..
        }) => {
            assert_eq!(retry_after, 1024 * SEC);
        }
        other => panic!("expected prefill overload, got {other:?}"),
    }
    r.heartbeat("p0", ready(0, 0, 0), t0).unwrap();
    // 65 tokens need 5 blocks of 16; d0 has 4.
    assert!(matches!(
        r.place(&shape(65), t0),
        Err(RouterError::Overloaded {
            leg: Leg::Decode,
            ..
        })
    ));
    assert!(
        r.place(&shape(64), t0).is_ok(),
        "nothing was charged by the refusals"
    );
    assert!(
        matches!(
            r.place(&shape(1), t0),
            Err(RouterError::Overloaded {
                leg: Leg::Decode,
                ..
            })
        ),
        "the 4 blocks are now counted as reserved"
    );
}

#[test]
fn bad_shapes_and_models() {
    let t0 = Instant::now();
    let mut r = registry();
    assert!(matches!(
        r.place(&shape(10), t0),
        Err(RouterError::NoWorkers(Leg::Prefill))
    ));
    r = cluster(t0, &[0], &[10]);
    assert!(matches!(
        r.place(&shape(0), t0),
        Err(RouterError::InvalidArgument(_))
    ));
    let named = RequestShape {
        model: "m".into(),
        ..shape(5)
    };
    assert!(r.place(&named, t0).is_ok());
    let other = RequestShape {
        model: "other".into(),
        ..shape(5)
    };
    assert!(matches!(
        r.place(&other, t0),
        Err(RouterError::UnknownModel(_))
    ));
    let mut second = ident("q0", WorkerRole::Prefill);
    second.model = "other".into();
    r.register(second, ready(0, 0, 0), t0).unwrap();
    assert!(matches!(
        r.place(&shape(5), t0),
        Err(RouterError::InvalidArgument(_))
    ));
    assert!(matches!(
        r.place(&other, t0),
        Err(RouterError::NoWorkers(Leg::Decode))
    ));
}

#[test]
fn aggregated_workers_serve_both_legs_and_carry_both_charges() {
    let t0 = Instant::now();
    let mut r = registry();
    r.register(ident("a0", WorkerRole::Aggregated), ready(0, 10, 0), t0)
        .unwrap();
    r.register(ident("a1", WorkerRole::Aggregated), ready(0, 10, 0), t0)
        .unwrap();
    assert_eq!(pair(&mut r, 32, t0), ("a0".into(), "a0".into()));
    // a0 now has 32 queued tokens and 8 free blocks, in both tables.
    assert_eq!(pair(&mut r, 32, t0), ("a1".into(), "a1".into()));
    assert_eq!(pair(&mut r, 16, t0), ("a0".into(), "a0".into()));
}

#[test]
fn worker_limit_and_deregister() {
    let t0 = Instant::now();
    let config = RegistryConfig {
        max_workers: 1,
        ..RegistryConfig::default()
    };
    let mut r = Registry::new(config, Box::new(LeastLoaded));
    r.register(ident("p0", WorkerRole::Prefill), ready(0, 0, 0), t0)
        .unwrap();
    let again = r.register(ident("p0", WorkerRole::Prefill), ready(5, 0, 0), t0);
    assert!(
        again.is_ok(),
        "re-registering the same id is not a new worker"
    );
    let more = r.register(ident("p1", WorkerRole::Prefill), ready(0, 0, 0), t0);
    assert!(matches!(more, Err(RouterError::TooManyWorkers(1))));
    assert!(r.deregister("p0"));
    assert!(!r.deregister("p0"));
    assert!(
        r.register(ident("p1", WorkerRole::Prefill), ready(0, 0, 0), t0)
            .is_ok()
    );
    assert_eq!(r.len(), 1);
}

#[test]
fn five_failures_open_a_worker_s_breaker_and_after_the_pause_one_probe_goes_there() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[50, 40]);
    // Heartbeats from every worker each second up to `secs`, as their leases want.
    let mut clock = 0;
    let mut at = |r: &mut Registry, secs: u64| {
        for t in clock + 1..=secs {
            for (id, free) in [("d0", 50), ("d1", 40), ("p0", 0)] {
                let now = t0 + Duration::from_secs(t);
                r.heartbeat(id, ready(0, free, 0), now).unwrap();
            }
        }
        clock = clock.max(secs);
        t0 + Duration::from_secs(secs)
    };
    // Failures with a success between them (and pauses for the suspicion to lapse) do not open.
    for i in 0..4 {
        let now = at(&mut r, 6 * i);
        r.report("d0", false, now);
    }
    let now = at(&mut r, 24);
    r.report("d0", true, now);
    for i in 0..4 {
        let now = at(&mut r, 25 + 6 * i);
        assert_eq!(r.report("d0", false, now), None);
    }
    let now = at(&mut r, 49);
    assert_eq!(pair(&mut r, 16, now).1, "d0");
    // The fifth in a row opens it: 30 s without new work, heartbeats or not.
    let now = at(&mut r, 50);
    assert_eq!(r.report("d0", false, now), Some(BreakerState::Open));
    for secs in [56, 62, 68, 74, 79] {
        let now = at(&mut r, secs);
        assert_eq!(pair(&mut r, 16, now).1, "d1", "{secs}");
    }
    // Half-open after the pause: one request probes it, the next goes elsewhere.
    let now = at(&mut r, 80);
    assert_eq!(pair(&mut r, 16, now).1, "d0");
    assert_eq!(pair(&mut r, 16, now).1, "d1");
    let breaker = |r: &Registry| {
        r.breakers()
            .into_iter()
            .find(|(id, _)| &**id == "d0")
            .map(|(_, b)| b)
    };
    assert_eq!(breaker(&r), Some(BreakerState::HalfOpen));
    // Two good probes close it.
    let now = at(&mut r, 81);
    assert_eq!(r.report("d0", true, now), None);
    assert_eq!(pair(&mut r, 16, now).1, "d0");
    assert_eq!(r.report("d0", true, now), Some(BreakerState::Closed));
    assert_eq!(pair(&mut r, 16, now).1, "d0");
    assert_eq!(pair(&mut r, 16, now).1, "d0");
    assert_eq!(breaker(&r), Some(BreakerState::Closed));
}

#[test]
fn a_failed_prefill_moves_to_the_best_other_prefill_worker() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[300, 100, 200], &[10]);
    let retry = |tried: &[&str]| RequestShape {
        exclude: tried.iter().map(|s| s.to_string()).collect(),
        ..shape(16)
    };
    let w = r.place_prefill(&retry(&["p1"]), t0).unwrap();
    assert_eq!(w.worker_id, "p2");
    // Charged: p2 now has 216 tokens queued, p0 300; past both, none is left.
    let w = r.place_prefill(&retry(&["p1"]), t0).unwrap();
    assert_eq!(w.worker_id, "p2");
    assert!(matches!(
        r.place_prefill(&retry(&["p0", "p1", "p2"]), t0),
        Err(RouterError::NoWorkers(Leg::Prefill))
    ));
}
