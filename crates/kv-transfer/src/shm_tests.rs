use tandem_kv_pool::{KvGeometry, KvPool};

use super::*;

fn writer(reservation_id: u64, attempt: u32) -> Writer {
    Writer {
        reservation_id,
        attempt,
    }
}

fn fenced<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(KvTransferError::Fenced(_)))
}

fn small() -> KvGeometry {
    KvGeometry {
        layers: 2,
        kv_heads: 1,
        head_dim: 4,
        block_size: 4,
        num_blocks: 6,
    }
}

#[test]
fn late_and_superseded_writers_are_fenced_out() {
    let g = small();
    let path = scratch("fence");
    let decode = ShmRegion::create(&path, &g).expect("create");
    let mut prefill = ShmRegion::open(decode.layout()).expect("open");
    let one = vec![1u8; g.layer_bytes(1)];
    let two = vec![2u8; g.layer_bytes(2)];
    let (a0, a1) = (writer(11, 0), writer(11, 1));
    // Blocks not leased to reservation 11: nothing written.
    assert!(fenced(prefill.write_blocks_as(0, &[2, 3], &two, a0)));
    let mut back = Vec::new();
    prefill.read_blocks(0, &[2, 3], &mut back).expect("read");
    assert_eq!(back, vec![0u8; two.len()]);
    decode.fences().stamp(&[2, 3], 11).expect("stamp");
    prefill
        .write_blocks_as(0, &[2, 3], &two, a0)
        .expect("attempt 0");
    // The gateway retried into the same reservation: attempt 1 takes block 2 over, and attempt 0
    // may no longer write it (block 3 it still may, until attempt 1 gets there).
    prefill
        .write_blocks_as(1, &[2], &one, a1)
        .expect("attempt 1");
    assert!(fenced(prefill.write_blocks_as(0, &[2], &one, a0)));
    prefill
        .write_blocks_as(1, &[3], &one, a0)
        .expect("not taken over yet");
    // Complete for attempt 0: refused, a newer attempt wrote. For attempt 1: sealed, and then
    // no attempt writes.
    assert!(fenced(decode.fences().seal(&[2, 3], a0)));
    decode.fences().seal(&[2, 3], a1).expect("seal");
    assert!(fenced(prefill.write_blocks_as(0, &[3], &one, a1)));
    // Another reservation ends unfilled: revoked, its writer is fenced out, and its old words
    // never let a later reservation's writer in.
    decode.fences().stamp(&[4], 12).expect("stamp");
    assert!(decode.fences().revoke(&[4], 12));
    assert!(fenced(prefill.write_blocks_as(
        0,
        &[4],
        &one,
        writer(12, 0)
    )));
    decode.fences().stamp(&[4], 13).expect("stamp");
    assert!(fenced(prefill.write_blocks_as(
        0,
        &[4],
        &one,
        writer(12, 3)
    )));
    prefill
        .write_blocks_as(0, &[4], &one, writer(13, 0))
        .expect("its owner");
}

#[test]
fn a_block_being_copied_is_neither_revoked_nor_sealed_until_the_copy_ends() {
    let g = small();
    let path = scratch("fence-copy");
    let decode = ShmRegion::create(&path, &g).expect("create");
    let prefill = ShmRegion::open(decode.layout()).expect("open");
    let w = writer(5, 0);
    decode.fences().stamp(&[1, 2], 5).expect("stamp");
    // A writer paused in the middle of its copy into block 1.
    prefill.fences().claim(1, w).expect("claim");
    assert!(
        !decode.fences().revoke(&[1, 2], 5),
        "block 1 is being written"
    );
    assert!(fenced(decode.fences().seal(&[1], w)));
    assert!(fenced(prefill.fences().claim(2, w)), "block 2 is revoked");
    prefill.fences().release(1, w);
    assert!(decode.fences().revoke(&[1, 2], 5));
    assert!(fenced(prefill.fences().claim(1, w)));
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-kv-{}-{name}", std::process::id()))
}

#[test]
fn bytes_written_through_one_mapping_are_read_through_another() {
    let g = KvGeometry {
        layers: 3,
        kv_heads: 2,
        head_dim: 4,
        block_size: 16,
        num_blocks: 6,
    };
    let path = scratch("two-maps");
    let decode = ShmRegion::create(&path, &g).expect("create");
    let mut prefill = ShmRegion::open(decode.layout()).expect("open");
    decode.fences().stamp(&[3], 7).expect("stamp");

    let mut src = KvPool::new(g);
    for l in 0..3 {
        let (k, v) = src.layer_mut(l);
        k.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (l * 1000 + i) as f32);
        v.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = -((l * 1000 + i) as f32));
    }
    let mut payload = Vec::new();
    src.export_layer(1, &[0, 2], &mut payload).expect("export");
    assert_eq!(
        prefill.write_blocks(1, &[4, 1], &payload).expect("write"),
        payload.len()
    );
    assert_eq!(
        prefill
            .write_blocks_from(2, &[3], src.layer(2), &[5], writer(7, 0))
            .expect("copy"),
        g.layer_bytes(1)
    );

    // The decode worker's pool, built on its own mapping, sees both writes.
    let pool = KvPool::with_memory(g, Box::new(decode)).expect("pool");
    let mut back = Vec::new();
    pool.export_layer(1, &[4, 1], &mut back)
        .expect("export back");
    assert_eq!(back, payload);
    let bf = g.block_floats();
    assert_eq!(
        &pool.layer(2).0[3 * bf..4 * bf],
        &src.layer(2).0[5 * bf..6 * bf]
    );
    assert_eq!(
        &pool.layer(2).1[3 * bf..4 * bf],
        &src.layer(2).1[5 * bf..6 * bf]
    );
    assert!(
        pool.layer(0).0.iter().all(|x| *x == 0.0),
        "untouched layer stays zero"
    );
    assert_eq!(
        prefill.checksum(1, &[4, 1]).expect("crc"),
        crc32c::crc32c(&payload)
    );
    // Read back through a mapping, laid out as the pool exports it.
    let mut read = Vec::new();
    prefill.read_blocks(1, &[4, 1], &mut read).expect("read");
    assert_eq!(read, payload);
    assert!(
        prefill.read_blocks(1, &[6], &mut read).is_err(),
        "outside the pool"
    );
    drop(pool);
    assert!(!path.exists(), "the creator removes the file");
}

#[test]
fn open_refuses_a_layout_that_does_not_match_its_file() {
    let g = KvGeometry {
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        block_size: 16,
        num_blocks: 2,
    };
    let path = scratch("bad-layout");
    let region = ShmRegion::create(&path, &g).expect("create");
    let mut stretched = region.layout().clone();
    stretched.block_stride *= 2;
    assert!(matches!(
        ShmRegion::open(&stretched),
        Err(KvTransferError::Invalid(_))
    ));
    let mut longer = region.layout().clone();
    longer.num_blocks = 3;
    longer.file_len = shm_layout(&path, &KvGeometry { num_blocks: 3, ..g }).file_len;
    longer.kv_stride = shm_layout(&path, &KvGeometry { num_blocks: 3, ..g }).kv_stride;
    longer.layer_stride = shm_layout(&path, &KvGeometry { num_blocks: 3, ..g }).layer_stride;
    assert!(matches!(
        ShmRegion::open(&longer),
        Err(KvTransferError::Invalid(_))
    ));
    let mut prefill = ShmRegion::open(region.layout()).expect("open");
    assert!(
        prefill
            .write_blocks(0, &[2], &vec![0u8; g.layer_bytes(1)])
            .is_err()
    );
    assert!(prefill.write_blocks(0, &[1], &[0u8; 3]).is_err());
}

#[test]
fn an_anonymous_pool_takes_a_payload_through_its_block_slices_in_another_mapping() {
    let g = KvGeometry {
        layers: 2,
        kv_heads: 1,
        head_dim: 2,
        block_size: 2,
        num_blocks: 5,
    };
    let engine_side = ShmRegion::anonymous(&g).expect("memfd pool");
    let mut conn = engine_side.remap().expect("second mapping");
    let pool = KvPool::with_memory(g, Box::new(engine_side)).expect("pool on it");
    // K of blocks 3 then 0, then V of blocks 3 then 0: four slices of 16 bytes, in that order,
    // whatever their order in memory.
    let blocks = [3, 0];
    let payload: Vec<u8> = (0..64).collect();
    {
        let mut slices = conn.block_slices_mut(1, &blocks).expect("slices");
        assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>(), [16; 4]);
        for (s, chunk) in slices.iter_mut().zip(payload.chunks(16)) {
            s.copy_from_slice(chunk);
        }
    }
    let mut got = Vec::new();
    pool.export_layer(1, &blocks, &mut got).expect("export");
    assert_eq!(got, payload, "the engine's mapping sees the bytes in place");
    let mut other = Vec::new();
    pool.export_layer(0, &blocks, &mut other).expect("export");
    assert!(other.iter().all(|b| *b == 0), "layer 0 untouched");

    assert!(
        conn.block_slices_mut(1, &[2, 4, 2]).is_err(),
        "a repeated block"
    );
    assert!(
        conn.block_slices_mut(1, &[5]).is_err(),
        "a block past the pool"
    );
    assert!(
        conn.block_slices_mut(2, &[0]).is_err(),
        "a layer past the pool"
    );
}
