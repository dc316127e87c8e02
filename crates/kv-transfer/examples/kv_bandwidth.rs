//! KV transfer bandwidth against its physical baselines, in one process (issue 5, item 2):
//! tcp (KvSender to the KV receiver) against a plain loopback socket copy of the same bytes into a
//! destination of the pool's size, and shm (write_blocks_from into a mapped pool) against a plain
//! memcpy of the same bytes. The sending end runs on the first core and the receiving end on the
//! last; each repetition runs ours and the baseline back to back, and the verdict is on the median
//! of those paired ratios (this host's loopback bandwidth drifts 2x over seconds).
//!
//! tcp rows: `tcp` (the sender sums each frame, the sink copies it into a heap pool), `tcp-p` (the
//! producer's sums, `send_layer_summed`), `tcp-d` (producer sums, frames read straight into a pool
//! in anonymous shared memory: what a decode worker does). Each prints the CPU time of each end.
//!
//! Run: `cargo run --release -p tandem-kv-transfer --example kv_bandwidth`; `KV_BENCH_ONLY=tcp-d:4096`
//! (kinds, or kind:tokens, comma-separated) runs only those rows. `KV_BENCH_DISCARD=1` makes the
//! copying sink drop the bytes, to isolate the transport's own cost from the copy into the pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use tandem_kv_pool::{KvGeometry, KvPool};
use tandem_kv_transfer::{
    FRAME_BYTES, KvError, KvSender, KvSink, ReservationInfo, ShmRegion, TransferSpec, Wire,
    block_geometry, frame_checksums, serve_with,
};
use tokio::net::TcpListener;

/// SmolLM2-135M: 30 layers, 3 KV heads of 64, f32, 16-token blocks (45 KiB per token).
fn geometry(blocks: usize) -> KvGeometry {
    KvGeometry {
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        num_blocks: blocks,
    }
}
const PROMPTS: [usize; 3] = [256, 1024, 4096];

struct BenchSink {
    pool: Mutex<KvPool>,
    reservations: Mutex<HashMap<u64, ReservationInfo>>,
    /// For the tcp-d rows: a mapping of the pool (which then lives in anonymous shared memory)
    /// that each connection remaps to read frames straight into it.
    direct: Option<ShmRegion>,
}

impl KvSink for BenchSink {
    fn reservation(&self, id: u64) -> Option<ReservationInfo> {
        self.reservations.lock().unwrap().get(&id).cloned()
    }
    fn write(&self, _: u64, layer: u32, blocks: &[u32], payload: &[u8]) -> Result<(), KvError> {
        if std::env::var_os("KV_BENCH_DISCARD").is_some() {
            return Ok(());
        }
        let mut pool = self.pool.lock().unwrap();
        pool.import_layer(layer as usize, blocks, payload)
            .map_err(|_| KvError::BadBlock)
    }
    fn complete(&self, id: u64, _: u32) -> Result<(), KvError> {
        self.reservations.lock().unwrap().remove(&id);
        Ok(())
    }
    fn direct(&self) -> Option<ShmRegion> {
        self.direct.as_ref().map(|r| r.remap().unwrap())
    }
}

/// User plus system CPU time of the threads named `name` (clock ticks).
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let g = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        total += g(11) + g(12);
    }
    total
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn reps(tokens: usize) -> usize {
    (65536 / tokens).clamp(15, 256)
}

fn main() {
    // The sending end (and the shm writer) on the first core, the receiving end on the last: two
    // processes on two cores, as prefill and decode workers are, without the scheduler moving
    // either end between runs (it otherwise flips between placements that differ by 2x).
    pin(Side::Sender);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let max_blocks = PROMPTS[2] / 16;
    let src = {
        let mut p = KvPool::new(geometry(max_blocks));
        for l in 0..30 {
            let (k, v) = p.layer_mut(l);
            k.iter_mut()
                .chain(v.iter_mut())
                .enumerate()
                .for_each(|(i, x)| *x = (i % 9973) as f32 * 0.5);
        }
        p
    };
    println!(
        "geometry: 30 layers x 3 kv heads x 64, f32, 16-token blocks ({} B per token)",
        geometry(1).bytes_per_token()
    );
    println!("GB/s; base = a plain socket copy (tcp) or memcpy (shm) of the same bytes, same run;");
    println!("ratio = ours / base of each repetition against its neighbour run: median, quartiles");
    println!(
        "{:<5} {:>6} {:>8} {:>8} {:>6} {:>6} {:>6}  goal (on the median ratio)",
        "kind", "tokens", "med base", "med ours", "ratio", "p25", "p75"
    );
    for (sums, direct) in [
        (Sums::OnThePath, false),
        (Sums::FromTheProducer, false),
        (Sums::FromTheProducer, true),
    ] {
        for tokens in PROMPTS {
            if wanted(kind(sums, direct), tokens) {
                rt.block_on(tcp_case(&src, tokens, sums, direct));
            }
        }
    }
    for tokens in PROMPTS {
        if wanted("shm", tokens) {
            shm_case(&src, tokens);
        }
    }
    crc_cost(&src);
    export_sum_cost(&src);
    import_cost(&src);
}

/// What the prefill worker pays on its compute thread for the tcp-p rows: export a layer of a
/// 4,096-token prompt from the pool, then sum its frames while they are in cache, against the
/// export alone.
fn export_sum_cost(src: &KvPool) {
    let blocks = PROMPTS[2] / 16;
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let g = block_geometry(&geometry(blocks));
    let mut out = Vec::new();
    let (mut export, mut both) = (Duration::ZERO, Duration::ZERO);
    for l in 0..30 {
        out.clear();
        let t0 = Instant::now();
        src.export_layer(l, &ids, &mut out).unwrap();
        export += t0.elapsed();
        out.clear();
        let t0 = Instant::now();
        src.export_layer(l, &ids, &mut out).unwrap();
        std::hint::black_box(frame_checksums(&g, ids.len(), &out).unwrap());
        both += t0.elapsed();
    }
    let bytes = 30 * out.len();
    println!(
        "producer: export_layer {:.2} GB/s, export then frame_checksums {:.2} GB/s",
        gbps(bytes, export),
        gbps(bytes, both)
    );
}

/// What the bench sink pays per byte on top of the socket: KvPool::import_layer.
fn import_cost(src: &KvPool) {
    let blocks = PROMPTS[2] / 16;
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let mut payload = Vec::new();
    src.export_layer(0, &ids, &mut payload).unwrap();
    let mut pool = KvPool::new(geometry(blocks));
    pool.import_layer(0, &ids, &payload).unwrap();
    let t0 = Instant::now();
    for _ in 0..20 {
        pool.import_layer(0, &ids, &payload).unwrap();
    }
    println!(
        "sink KvPool::import_layer: {:.2} GB/s",
        gbps(20 * payload.len(), t0.elapsed())
    );
}

/// Where the sender's frame checksums are computed.
#[derive(Clone, Copy, PartialEq)]
enum Sums {
    /// By `send_layer`, on the transfer's path (row "tcp").
    OnThePath,
    /// By the producer right after its export, as the prefill worker does (`frame_checksums`,
    /// then `send_layer_summed`; row "tcp-p"). Its cost is printed apart (`export_sum_cost`).
    FromTheProducer,
}

fn kind(sums: Sums, direct: bool) -> &'static str {
    match (sums, direct) {
        (Sums::OnThePath, _) => "tcp",
        (Sums::FromTheProducer, false) => "tcp-p",
        (Sums::FromTheProducer, true) => "tcp-d",
    }
}

/// `KV_BENCH_ONLY=tcp-d:4096` (kind, or kind:tokens, comma-separated) runs only those rows: for
/// a profile of one case.
fn wanted(kind: &str, tokens: usize) -> bool {
    let Ok(only) = std::env::var("KV_BENCH_ONLY") else {
        return true;
    };
    only.split(',').any(|w| match w.split_once(':') {
        Some((k, t)) => k == kind && t.parse() == Ok(tokens),
        None => w == kind,
    })
}

/// `direct`: the receiving pool lives in anonymous shared memory and the connection reads each
/// frame straight into its blocks, as a decode worker's does (row "tcp-d"); otherwise the sink
/// copies each frame's bytes into a heap pool.
async fn tcp_case(src: &KvPool, tokens: usize, sums: Sums, direct: bool) {
    let blocks = tokens / 16;
    let g = geometry(blocks);
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let payloads: Vec<Vec<u8>> = (0..30)
        .map(|l| {
            let mut out = Vec::new();
            src.export_layer(l, &ids, &mut out).unwrap();
            out
        })
        .collect();
    let total: usize = payloads.iter().map(Vec::len).sum();
    let checksums: Vec<Vec<u32>> = payloads
        .iter()
        .map(|p| frame_checksums(&block_geometry(&g), ids.len(), p).unwrap())
        .collect();

    let (pool, template) = if direct {
        let (pool, view) = ShmRegion::anonymous_pool(&g).unwrap();
        (pool, Some(view))
    } else {
        (KvPool::new(g), None)
    };
    let sink = Arc::new(BenchSink {
        pool: Mutex::new(pool),
        reservations: Mutex::default(),
        direct: template,
    });
    // The receiver has its own thread and runtime on the other core, as a decode worker's would.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = {
        let sink = sink.clone();
        let receiver = std::thread::Builder::new().name("ours-recv".into());
        receiver
            .spawn(move || {
                pin(Side::Receiver);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addr_tx
                        .send(listener.local_addr().unwrap().to_string())
                        .unwrap();
                    let stopped = async move {
                        let _ = stopped.await;
                    };
                    serve_with(listener, stopped, sink, Wire::Tcp)
                        .await
                        .unwrap();
                });
            })
            .unwrap()
    };
    let addr = addr_rx.recv().unwrap();
    let sender = KvSender::new("bench");
    let (mut base_tx, reader) = plain_pair(total);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    // CPU time of each end (sending thread, receiving thread), in clock ticks: a busy machine
    // disturbs it far less than the wall-clock bandwidth, and it says which end limits.
    let (mut cpu_base, mut cpu_ours) = ((0u64, 0u64), (0u64, 0u64));
    for rep in 0..=reps(tokens) {
        // Every other repetition runs ours first, so that a drift in the machine's speed
        // (loopback bandwidth changes 2x over seconds here) falls on both sides alike.
        let mut pair = [(Duration::ZERO, 0u64, 0u64); 2];
        for side in [rep % 2, 1 - rep % 2] {
            let receiver = ["plain-recv", "ours-recv"][side];
            let (s0, r0) = (thread_ticks("kv_bandwidth"), thread_ticks(receiver));
            let t0 = Instant::now();
            if side == 0 {
                base_tx.write_all(&(total as u64).to_le_bytes()).unwrap();
                for piece in payloads.iter().flat_map(|p| p.chunks(FRAME_BYTES)) {
                    base_tx.write_all(piece).unwrap();
                }
                let mut ack = [0u8; 1];
                base_tx.read_exact(&mut ack).unwrap();
                assert_eq!(ack[0], 1);
            } else {
                let id = rep as u64 + 1;
                let info = ReservationInfo {
                    block_ids: Arc::from(ids.clone()),
                    geometry: block_geometry(&g),
                    attempt: 0,
                    expires: Instant::now() + Duration::from_secs(600),
                };
                sink.reservations.lock().unwrap().insert(id, info);
                let spec = TransferSpec {
                    request_id: format!("bench-{id}"),
                    reservation_id: id,
                    attempt: 0,
                    geometry: block_geometry(&g),
                };
                let mut t = sender.open(&addr, spec).await.unwrap();
                for (l, p) in payloads[..29].iter().enumerate() {
                    match sums {
                        Sums::OnThePath => t.send_layer(l as u32, &ids, p).await,
                        Sums::FromTheProducer => {
                            t.send_layer_summed(l as u32, &ids, p, &checksums[l]).await
                        }
                    }
                    .unwrap();
                }
                match sums {
                    Sums::OnThePath => t.finish(29, &ids, &payloads[29]).await,
                    Sums::FromTheProducer => {
                        t.finish_summed(29, &ids, &payloads[29], &checksums[29])
                            .await
                    }
                }
                .unwrap();
            }
            pair[side] = (
                t0.elapsed(),
                thread_ticks("kv_bandwidth") - s0,
                thread_ticks(receiver) - r0,
            );
        }
        if rep > 0 {
            base.push(gbps(total, pair[0].0));
            ours.push(gbps(total, pair[1].0));
            for (cpu, p) in [(&mut cpu_base, pair[0]), (&mut cpu_ours, pair[1])] {
                cpu.0 += p.1;
                cpu.1 += p.2;
            }
        }
    }
    report(kind(sums, direct), tokens, &base, &ours, 0.9);
    let s = |t: u64| t as f64 / 100.0;
    println!(
        "      cpu s, sender / receiver: base {:.2} / {:.2}, ours {:.2} / {:.2}",
        s(cpu_base.0),
        s(cpu_base.1),
        s(cpu_ours.0),
        s(cpu_ours.1)
    );
    drop(base_tx);
    let _ = reader.join();
    let _ = stop.send(());
    let _ = server.join();
}

#[derive(Clone, Copy)]
enum Side {
    Sender,
    Receiver,
}

/// Pins the calling thread to the first (sender) or last (receiver) CPU it may run on; does
/// nothing on a single CPU.
fn pin(side: Side) {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let Ok(allowed) = sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if cpus.len() < 2 {
        return;
    }
    let cpu = match side {
        Side::Sender => cpus[0],
        Side::Receiver => cpus[cpus.len() - 1],
    };
    let mut one = CpuSet::new();
    one.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
}

/// The baseline's two ends: blocking sockets on their own threads (the writer is the caller's),
/// the plainest way to move bytes over loopback. The reader takes each message's length, reads
/// that many bytes straight into a destination the size of the receiving pool, in order, and
/// answers with one byte: bytes moved from the sender's memory into the receiver's, as a
/// transfer moves them (a reader that dropped them into one small buffer would keep them in cache
/// and skip the stores to memory that any receiver pays).
fn plain_pair(pool_bytes: usize) -> (std::net::TcpStream, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    tx.set_nodelay(true).unwrap();
    rx.set_nodelay(true).unwrap();
    let reader = std::thread::Builder::new().name("plain-recv".into());
    let reader = reader.spawn(move || {
        pin(Side::Receiver);
        let mut dst = vec![0u8; pool_bytes];
        let mut len = [0u8; 8];
        while rx.read_exact(&mut len).is_ok() {
            let want = u64::from_le_bytes(len) as usize;
            let mut at = 0;
            while at < want {
                let end = want.min(at + FRAME_BYTES);
                let n = rx.read(&mut dst[at..end]).unwrap();
                assert!(n > 0, "baseline stream ended early");
                at += n;
            }
            rx.write_all(&[1]).unwrap();
        }
    });
    (tx, reader.unwrap())
}

fn shm_case(src: &KvPool, tokens: usize) {
    let blocks = tokens / 16;
    // The decode pool is larger than the prompt, as a real one is; the prompt lands mid-pool.
    let g = geometry(2 * blocks);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("tandem-kv-bench-{}", std::process::id()));
    let decode = ShmRegion::create(&path, &g).unwrap();
    let mut prefill = ShmRegion::open(decode.layout()).unwrap();
    let src_ids: Vec<u32> = (0..blocks as u32).collect();
    let dst_ids: Vec<u32> = (0..blocks as u32)
        .map(|b| blocks as u32 - 1 - b + blocks as u32 / 2)
        .collect();
    // Leased to one reservation, whose writer claims each block for each copy as a prefill
    // worker does.
    decode.fences().stamp(&dst_ids, 1).unwrap();
    let writer = tandem_kv_transfer::Writer {
        reservation_id: 1,
        attempt: 0,
    };
    let total = 30 * g.layer_bytes(blocks);
    // The memcpy's destination has the pool's footprint too, so both write the same cache lines' worth.
    let mut plain = vec![0f32; g.total_floats()];
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for rep in 0..=reps(tokens) {
        let t0 = Instant::now();
        let half = blocks * g.block_floats();
        for l in 0..30 {
            let (k, v) = src.layer(l);
            let at = l * 4 * half;
            plain[at..at + half].copy_from_slice(&k[..half]);
            plain[at + 2 * half..at + 3 * half].copy_from_slice(&v[..half]);
        }
        let b = t0.elapsed();
        std::hint::black_box(&plain);
        let t0 = Instant::now();
        let mut written = 0;
        for l in 0..30 {
            written += prefill
                .write_blocks_from(l, &dst_ids, src.layer(l), &src_ids, writer)
                .unwrap();
        }
        let o = t0.elapsed();
        assert_eq!(written, total);
        if rep > 0 {
            base.push(gbps(total, b));
            ours.push(gbps(total, o));
        }
    }
    report("shm", tokens, &base, &ours, 0.8);
    drop(prefill);
    drop(decode);
}

fn crc_cost(src: &KvPool) {
    let (k, _) = src.layer(0);
    let mut bytes = Vec::with_capacity(k.len() * 4);
    k.iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    let time = |f: &dyn Fn(&[u8]) -> u32| {
        let t0 = Instant::now();
        let mut crc = 0;
        for _ in 0..20 {
            crc ^= f(&bytes);
        }
        (gbps(20 * bytes.len(), t0.elapsed()), crc)
    };
    let (ours, a) = time(&tandem_kv_transfer::crc32c);
    let (insn, b) = time(&crc32c::crc32c);
    assert_eq!(a, b);
    println!(
        "crc32c on one core (paid once by each side of a tcp frame): ours {ours:.2} GB/s, \
         the crc32 instruction (crc32c crate) {insn:.2} GB/s"
    );
}

/// Medians of each side, and the quartiles of the paired ratio (each repetition's ours over the
/// base run beside it): the machine's speed drifts by 2x over seconds, which moves both runs of a
/// pair together, so the paired ratio is steady where a ratio of two separate medians or of two
/// best runs is not. The verdict is on the paired median.
fn report(kind: &str, tokens: usize, base: &[f64], ours: &[f64], goal: f64) {
    let ratios: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    let q = |p: f64| {
        let mut r = ratios.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        r[((r.len() - 1) as f64 * p).round() as usize]
    };
    let (bm, om) = (median(base.to_vec()), median(ours.to_vec()));
    let verdict = if q(0.5) >= goal { "met" } else { "MISSED" };
    println!(
        "{kind:<5} {tokens:>6} {bm:>8.2} {om:>8.2} {:>6.2} {:>6.2} {:>6.2}  >= {goal:.2} {verdict}",
        q(0.5),
        q(0.25),
        q(0.75)
    );
}
