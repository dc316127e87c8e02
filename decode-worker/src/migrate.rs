//! Moving a running sequence to another decode worker while it decodes (the `Migrate` RPC, and
//! drain).
//!
//! 1. Reserve on the destination room for the sequence's KV as it stands plus some slack.
//! 2. Copy the blocks that are full (they no longer change) while the batch keeps decoding it,
//!    reading them through the pool's second mapping, over the destination's own transport.
//! 3. Take the sequence out of the batch at a token boundary, copy what was written since (the
//!    last, partial block and any filled meanwhile; zeros into the slack), and commit.
//! 4. End its Decode stream with `moved`: the caller opens Decode on the destination, from the
//!    last token it was sent, and the stream goes on with no gap in its tokens.
//!
//! Until step 4 the sequence is still this worker's: any failure puts it back into the batch,
//! where it goes on from its last token, and gives the destination's reservation back.
use std::time::{Duration, Instant};

use tandem_kv_transfer::{
    KvTransferError, OutboundTransfer, ShmRegion, TransferSpec, Writer, crc32c,
};
use tandem_proto::v1;
use tandem_proto::v1::decode_service_client::DecodeServiceClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::events::Moved;
use crate::inbox::Detached;
use crate::service::DecodeGrpc;

/// Positions reserved beyond the sequence's KV when the copy begins: what it may generate before
/// the pause (the copy of full blocks takes milliseconds; a step, tens).
const SLACK_BLOCKS: usize = 4;
/// Longest the copy before the pause may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// Lease asked for on the destination: until its Decode call.
const LEASE: Duration = Duration::from_secs(30);

/// Moves sequence `req.reservation_id` to `req.destination_grpc_addr`.
pub async fn migrate(
    grpc: &DecodeGrpc,
    req: v1::MigrateRequest,
) -> Result<v1::MigrateResponse, Status> {
    let t0 = Instant::now();
    let id = req.reservation_id;
    let snap = grpc
        .inbox
        .snapshot(id)
        .await
        .ok_or_else(|| Status::not_found(format!("no running sequence {id}")))?;
    let mut dest = Destination::reserve(grpc, &req, &snap).await?;
    let moved = dest.fill(grpc, &snap, t0).await;
    if moved.is_err() {
        dest.give_back();
    }
    moved
}

/// The destination's reservation while the sequence moves there.
struct Destination {
    client: DecodeServiceClient<Channel>,
    req: v1::MigrateRequest,
    res: v1::ReserveResponse,
    /// The destination's pool file, when its transport is shm.
    region: Option<ShmRegion>,
}

impl Destination {
    async fn reserve(
        grpc: &DecodeGrpc,
        req: &v1::MigrateRequest,
        snap: &crate::inbox::Snapshot,
    ) -> Result<Self, Status> {
        let bs = grpc.shared.geometry.block_tokens as usize;
        let mut client = DecodeServiceClient::new(channel(&req.destination_grpc_addr)?);
        let itl_budget_ms = grpc
            .shared
            .book()
            .get(req.reservation_id)
            .map_or(0, |r| r.itl_budget_ms);
        let mut call = tonic::Request::new(v1::ReserveRequest {
            request_id: format!("migrate-{}", req.reservation_id),
            prompt_tokens: u32::try_from(snap.kv_tokens.div_ceil(bs) * bs + SLACK_BLOCKS * bs)
                .unwrap_or(u32::MAX),
            max_new_tokens: snap.left.max(1),
            lease_ms: LEASE.as_millis() as u32,
            itl_budget_ms,
        });
        call.set_timeout(Duration::from_secs(2));
        let res = client.reserve(call).await?.into_inner();
        let mut dest = Destination {
            client,
            req: req.clone(),
            res,
            region: None,
        };
        if dest.res.geometry != Some(grpc.shared.geometry) {
            dest.give_back();
            return Err(Status::invalid_argument(format!(
                "destination pool {:?} is not this one's {:?}",
                dest.res.geometry, grpc.shared.geometry
            )));
        }
        if dest.res.transport == v1::KvTransportKind::Shm as i32 {
            let opened = dest
                .res
                .shm_layout
                .as_ref()
                .ok_or_else(|| Status::unavailable("shm destination without a pool layout"))
                .and_then(|l| ShmRegion::open(l).map_err(kv_status));
            match opened {
                Ok(region) => dest.region = Some(region),
                Err(e) => {
                    dest.give_back();
                    return Err(e);
                }
            }
        }
        Ok(dest)
    }

    /// Copies the sequence's KV and hands it over; on an error the sequence runs here again.
    async fn fill(
        &mut self,
        grpc: &DecodeGrpc,
        snap: &crate::inbox::Snapshot,
        t0: Instant,
    ) -> Result<v1::MigrateResponse, Status> {
        let shared = &grpc.shared;
        let bs = shared.geometry.block_tokens as usize;
        let spec = TransferSpec {
            request_id: self.res.reservation_id.to_string(),
            reservation_id: self.res.reservation_id,
            attempt: 0,
            geometry: shared.geometry,
        };
        let dst = self.res.block_ids.clone();
        // Full blocks do not change any more: copied while the sequence decodes. Bounded as a
        // whole; what follows the pause is bounded by the transfer's own stall timeout and
        // must not be cut short (the detached sequence would be dropped, not put back).
        let full = (snap.kv_tokens / bs).min(dst.len());
        let copy = async {
            let mut t = grpc
                .kv_sender
                .open(&self.res.kv_endpoint, spec)
                .await
                .map_err(kv_status)?;
            self.send(grpc, &mut t, &snap.blocks[..full], &dst[..full])
                .await?;
            Ok::<_, Status>(t)
        };
        let t = tokio::time::timeout(DEADLINE, copy).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "copying the KV of {} took over {DEADLINE:?}",
                self.req.reservation_id
            ))
        })??;
        let copied = Instant::now();
        let id = self.req.reservation_id;
        let d = grpc
            .inbox
            .detach(id)
            .await
            .ok_or_else(|| Status::not_found(format!("sequence {id} ended while it moved")))?;
        let paused = Instant::now();
        match self.finish(grpc, t, &d, full).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(sequence = id, error = %e, "migration failed; the sequence goes on here");
                grpc.inbox.reattach(d);
                return Err(e);
            }
        }
        let (kv_tokens, generated) = (d.kv_tokens, d.generated());
        let told = d.end_stream(Moved {
            worker_id: self.req.destination_worker_id.clone(),
            grpc_addr: self.req.destination_grpc_addr.clone(),
            reservation_id: self.res.reservation_id,
            kv_tokens: kv_tokens as u32,
            generated,
        });
        // Its KV is the destination's now; here the engine lets it go.
        shared.end(id);
        if !told {
            return Err(Status::cancelled(format!(
                "the stream of sequence {id} went away while it moved"
            )));
        }
        let us = |d: Duration| d.as_micros() as u64;
        tracing::info!(
            sequence = id,
            destination = %self.req.destination_worker_id,
            kv_tokens,
            copy = ?copied - t0,
            pause = ?paused.elapsed(),
            "sequence migrated"
        );
        Ok(v1::MigrateResponse {
            reservation_id: self.res.reservation_id,
            kv_tokens: kv_tokens as u32,
            paused_tokens: kv_tokens.saturating_sub(full * bs) as u32,
            copy_us: us(copied - t0),
            pause_us: us(paused.elapsed()),
        })
    }

    /// Copies what changed since the full blocks (and zeros into the slack), then commits.
    async fn finish(
        &mut self,
        grpc: &DecodeGrpc,
        mut t: OutboundTransfer,
        d: &Detached,
        full: usize,
    ) -> Result<(), Status> {
        let bs = grpc.shared.geometry.block_tokens as usize;
        let dst = self.res.block_ids.clone();
        let used = d.kv_tokens.div_ceil(bs);
        if used > dst.len() || used > d.blocks.len() {
            return Err(Status::resource_exhausted(format!(
                "the sequence outgrew its {} reserved blocks while its KV was copied",
                dst.len()
            )));
        }
        self.send(grpc, &mut t, &d.blocks[full..used], &dst[full..used])
            .await?;
        if used < dst.len() {
            // Every reserved block must arrive; beyond the KV they hold nothing anyone reads.
            self.send_zeros(grpc, &mut t, &dst[used..]).await?;
        }
        let ack = match &self.region {
            Some(_) => t.finish_shm(0, &[], 0, 0).await,
            None => t.finish(0, &[], &[]).await,
        }
        .map_err(kv_status)?;
        if ack.error != v1::KvError::None as i32 {
            return Err(Status::unavailable(format!(
                "destination refused the KV: {}",
                ack.message
            )));
        }
        Ok(())
    }

    /// Sends `src` blocks of every layer into `dst` blocks of the destination.
    async fn send(
        &mut self,
        grpc: &DecodeGrpc,
        t: &mut OutboundTransfer,
        src: &[u32],
        dst: &[u32],
    ) -> Result<(), Status> {
        if src.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for layer in 0..grpc.shared.geometry.num_layers {
            bytes.clear();
            off_runtime(|| grpc.shared.read_kv(layer, src, &mut bytes))?;
            self.layer(t, layer, dst, &bytes).await?;
        }
        Ok(())
    }

    async fn send_zeros(
        &mut self,
        grpc: &DecodeGrpc,
        t: &mut OutboundTransfer,
        dst: &[u32],
    ) -> Result<(), Status> {
        let g = &grpc.shared.geometry;
        let block = tandem_kv_transfer::block_bytes(g).unwrap_or(0);
        let zeros = vec![0u8; 2 * block * dst.len()];
        for layer in 0..g.num_layers {
            self.layer(t, layer, dst, &zeros).await?;
        }
        Ok(())
    }

    /// One layer's bytes into the destination: a frame (tcp), or written into its pool file and
    /// noticed (shm).
    async fn layer(
        &mut self,
        t: &mut OutboundTransfer,
        layer: u32,
        dst: &[u32],
        bytes: &[u8],
    ) -> Result<(), Status> {
        let writer = Writer {
            reservation_id: self.res.reservation_id,
            attempt: 0,
        };
        match &mut self.region {
            Some(region) => {
                off_runtime(|| region.write_blocks_as(layer as usize, dst, bytes, writer))
                    .map_err(kv_status)?;
                t.notify_shm(layer, dst, bytes.len() as u64, crc32c(bytes))
                    .await
            }
            None => t.send_layer(layer, dst, bytes).await,
        }
        .map_err(kv_status)
    }

    /// Releases the destination's reservation, in the background (best effort: its lease ends
    /// it otherwise).
    fn give_back(&self) {
        let mut client = self.client.clone();
        let reservation_id = self.res.reservation_id;
        tokio::spawn(async move {
            let mut call = tonic::Request::new(v1::ReleaseRequest { reservation_id });
            call.set_timeout(Duration::from_secs(1));
            let _ = client.release(call).await;
        });
    }
}

/// Runs a copy of megabytes where it does not hold up the runtime's other tasks (the worker's
/// token streams among them): on a multi-threaded runtime, its worker thread is handed over to
/// them for the copy's length.
fn off_runtime<R>(copy: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(copy),
        _ => copy(),
    }
}

fn channel(addr: &str) -> Result<Channel, Status> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .map_err(|e| Status::invalid_argument(format!("destination {addr:?}: {e}")))
}

fn kv_status(e: KvTransferError) -> Status {
    Status::unavailable(format!("moving the KV: {e}"))
}

/// Sequences moved at once when a drain moves them all.
const AT_ONCE: usize = 4;

/// A drain's move: every running sequence to the least loaded other decode worker of the
/// router's set, a few at a time. What cannot move (no other worker, a failed migration) runs
/// on here, to finish within the drain's grace or be moved by its gateway after it.
pub async fn move_all(grpc: &DecodeGrpc, router: &str) {
    use futures::StreamExt;
    let me = grpc.identity();
    let ids = grpc.shared.book().running();
    if ids.is_empty() {
        return;
    }
    let mut targets = match destinations(router, &me).await {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => {
            tracing::info!(
                sequences = ids.len(),
                "no other decode worker to move to; the sequences finish here"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the router's workers unknown; the sequences finish here");
            return;
        }
    };
    let jobs: Vec<v1::MigrateRequest> = ids
        .into_iter()
        .filter_map(|id| {
            let t = targets.iter_mut().min_by_key(|t| t.1)?;
            t.1 += 1;
            Some(v1::MigrateRequest {
                reservation_id: id,
                destination_grpc_addr: t.0.grpc_addr.clone(),
                destination_worker_id: t.0.worker_id.clone(),
            })
        })
        .collect();
    let n = jobs.len();
    let moved = futures::stream::iter(jobs)
        .map(|job| migrate(grpc, job))
        .buffer_unordered(AT_ONCE)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    tracing::info!(moved, of = n, "draining: running sequences moved");
}

/// Other ready decode workers of this model, with the sequences each runs or has reserved.
async fn destinations(
    router: &str,
    me: &v1::WorkerIdentity,
) -> Result<Vec<(v1::WorkerIdentity, u32)>, Status> {
    use futures::StreamExt;
    let mut client = tandem_router::RouterClient::connect(router, Duration::from_secs(2))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut set = client
        .watch_workers()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let first = tokio::time::timeout(Duration::from_secs(2), set.next())
        .await
        .map_err(|_| Status::deadline_exceeded("the router sent no worker set"))?
        .ok_or_else(|| Status::unavailable("the router sent no worker set"))??;
    let decodes = [
        v1::WorkerRole::Decode as i32,
        v1::WorkerRole::Aggregated as i32,
    ];
    Ok(first
        .workers
        .into_iter()
        .filter_map(|w| {
            let id = w.identity?;
            let load = w.load.unwrap_or_default();
            let ok = decodes.contains(&id.role)
                && id.model == me.model
                && id.worker_id != me.worker_id
                && id.grpc_addr != me.grpc_addr
                && load.state == v1::WorkerState::Ready as i32;
            ok.then_some((id, load.running_seqs + load.reserved_seqs))
        })
        .collect())
}
