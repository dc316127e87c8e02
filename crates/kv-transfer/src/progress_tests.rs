use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::{self, KvError};

use super::*;
use crate::ReservationInfo;

fn geom() -> v1::BlockGeometry {
    v1::BlockGeometry {
        block_tokens: 2,
        num_layers: 2,
        kv_heads: 1,
        head_dim: 2,
        dtype: v1::KvDtype::F32.into(),
    }
}

/// Two reserved blocks, 16 bytes each per K or V.
fn info(now: Instant) -> ReservationInfo {
    ReservationInfo {
        block_ids: Arc::from(vec![7u32, 9]),
        geometry: geom(),
        attempt: 0,
        expires: now + Duration::from_secs(5),
    }
}

fn facts<'a>(
    g: &'a v1::BlockGeometry,
    layer: u32,
    blocks: &'a [u32],
    seq: u64,
    attempt: u32,
) -> FrameFacts<'a> {
    FrameFacts {
        reservation_id: 1,
        attempt,
        layer,
        block_ids: blocks,
        seq,
        bytes: 32 * blocks.len() as u64,
        dtype: g.dtype,
        geometry: Some(g),
    }
}

#[test]
fn a_complete_transfer_finishes_and_is_forgotten() {
    let now = Instant::now();
    let (g, i) = (geom(), info(now));
    let mut t = Transfers::default();
    assert_eq!(
        t.admit(&facts(&g, 0, &[7, 9], 0, 0), Some(&i), now),
        Ok(Verdict::Accept)
    );
    assert_eq!(
        t.admit(&facts(&g, 1, &[9], 1, 0), Some(&i), now),
        Ok(Verdict::Accept)
    );
    assert_eq!(t.finish(1, 0).map_err(|e| e.0), Err(KvError::Incomplete));
    let mut t = Transfers::default();
    for (seq, layer) in [(0, 0), (1, 1)] {
        assert_eq!(
            t.admit(&facts(&g, layer, &[9, 7], seq, 0), Some(&i), now),
            Ok(Verdict::Accept)
        );
    }
    assert_eq!(t.frames(1, 0), 2);
    assert_eq!(t.finish(1, 0), Ok(()));
    assert_eq!(t.frames(1, 0), 0);
}

#[test]
fn each_bad_header_gets_its_error_and_fails_the_transfer() {
    let now = Instant::now();
    let (g, i) = (geom(), info(now));
    let code = |f: FrameFacts<'_>, info: Option<&ReservationInfo>| {
        let mut t = Transfers::default();
        t.admit(&f, info, now).map_err(|e| e.0)
    };
    assert_eq!(
        code(facts(&g, 0, &[7], 0, 0), None),
        Err(KvError::UnknownReservation)
    );
    let mut old = info(now);
    old.expires = now;
    assert_eq!(
        code(facts(&g, 0, &[7], 0, 0), Some(&old)),
        Err(KvError::UnknownReservation)
    );
    assert_eq!(
        code(facts(&g, 0, &[7], 1, 0), Some(&i)),
        Err(KvError::OutOfOrder)
    );
    assert_eq!(
        code(facts(&g, 0, &[8], 0, 0), Some(&i)),
        Err(KvError::BadBlock)
    );
    assert_eq!(
        code(facts(&g, 0, &[7, 7], 0, 0), Some(&i)),
        Err(KvError::BadBlock)
    );
    assert_eq!(
        code(facts(&g, 2, &[7], 0, 0), Some(&i)),
        Err(KvError::BadBlock)
    );
    let mut other = geom();
    other.head_dim = 4;
    assert_eq!(
        code(facts(&other, 0, &[7], 0, 0), Some(&i)),
        Err(KvError::GeometryMismatch)
    );
    let mut short = facts(&g, 0, &[7], 0, 0);
    short.bytes -= 1;
    assert_eq!(code(short, Some(&i)), Err(KvError::Corrupt));

    let mut t = Transfers::default();
    assert_eq!(
        t.admit(&facts(&g, 0, &[7], 0, 0), Some(&i), now),
        Ok(Verdict::Accept)
    );
    assert_eq!(
        t.admit(&facts(&g, 0, &[7], 1, 0), Some(&i), now)
            .map_err(|e| e.0),
        Err(KvError::BadBlock)
    );
    assert_eq!(
        t.admit(&facts(&g, 1, &[7], 2, 0), Some(&i), now),
        Ok(Verdict::Discard)
    );
}

#[test]
fn a_newer_attempt_restarts_and_an_older_one_is_refused() {
    let now = Instant::now();
    let (g, i) = (geom(), info(now));
    let mut t = Transfers::default();
    assert_eq!(
        t.admit(&facts(&g, 0, &[7, 9], 0, 0), Some(&i), now),
        Ok(Verdict::Accept)
    );
    t.fail(1, 0);
    assert_eq!(
        t.admit(&facts(&g, 0, &[7, 9], 0, 1), Some(&i), now),
        Ok(Verdict::Accept)
    );
    let stale = t.admit(&facts(&g, 1, &[7, 9], 1, 0), Some(&i), now);
    assert_eq!(stale.map_err(|e| e.0), Err(KvError::OutOfOrder));
    assert_eq!(
        t.admit(&facts(&g, 1, &[7, 9], 1, 1), Some(&i), now),
        Ok(Verdict::Accept)
    );
    assert_eq!(t.finish(1, 1), Ok(()));

    let mut floor = info(now);
    floor.attempt = 3;
    let refused = Transfers::default().admit(&facts(&g, 0, &[7], 0, 2), Some(&floor), now);
    assert_eq!(refused.map_err(|e| e.0), Err(KvError::OutOfOrder));
}
