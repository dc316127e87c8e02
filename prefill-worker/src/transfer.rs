//! One request's KV transfer, on the async side: takes the layers the batcher hands over and puts
//! them on the wire (tcp frames or shm notices), then waits for the decode worker's verdict.
use std::time::Instant;

use tandem_kv_transfer::{KvSender, KvTransferError, OutboundTransfer, TransferSpec};
use tandem_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use crate::queue::LayerMsg;

/// What a finished transfer reports.
#[derive(Debug, Clone, Copy)]
pub struct Transferred {
    pub first_byte: Instant,
    pub acked: Instant,
    pub frames: u64,
    pub bytes: u64,
}

/// Opens the transfer to the destination's KV endpoint (a pooled connection).
pub async fn open(
    sender: &KvSender,
    request_id: &str,
    dest: &v1::KvDestination,
) -> Result<OutboundTransfer, Status> {
    let geometry = dest
        .geometry
        .ok_or_else(|| Status::invalid_argument("destination has no geometry"))?;
    let spec = TransferSpec {
        request_id: request_id.to_owned(),
        reservation_id: dest.reservation_id,
        attempt: dest.attempt,
        geometry,
    };
    sender.open(&dest.kv_endpoint, spec).await.map_err(|e| {
        let s = Status::unavailable(format!("KV endpoint {}: {e}", dest.kv_endpoint));
        tandem_wire::mark_kv_fault(s)
    })
}

/// Sends every layer message until the last, then waits for the acknowledgement.
pub async fn run(
    mut t: OutboundTransfer,
    mut layers: mpsc::UnboundedReceiver<LayerMsg>,
) -> Result<Transferred, Status> {
    let mut first_byte = None;
    let mut bytes_sent = 0u64;
    while let Some(msg) = layers.recv().await {
        let first = *first_byte.get_or_insert_with(Instant::now);
        match msg {
            LayerMsg::Bytes {
                layer,
                dst,
                bytes,
                checksums,
                last,
            } => {
                bytes_sent += bytes.len() as u64;
                let summed = !checksums.is_empty();
                if last {
                    let ack = if summed {
                        t.finish_summed(layer, &dst, &bytes, &checksums).await
                    } else {
                        t.finish(layer, &dst, &bytes).await
                    };
                    return verdict(ack, first, bytes_sent);
                }
                let sent = if summed {
                    t.send_layer_summed(layer, &dst, &bytes, &checksums).await
                } else {
                    t.send_layer(layer, &dst, &bytes).await
                };
                sent.map_err(refused)?;
            }
            LayerMsg::Written {
                layer,
                dst,
                bytes,
                checksum,
                last,
            } => {
                bytes_sent += bytes;
                if last {
                    let ack = t.finish_shm(layer, &dst, bytes, checksum).await;
                    return verdict(ack, first, bytes_sent);
                }
                t.notify_shm(layer, &dst, bytes, checksum)
                    .await
                    .map_err(refused)?;
            }
        }
    }
    Err(Status::aborted(
        "the prefill stopped before its KV was complete",
    ))
}

fn verdict(
    ack: Result<v1::KvAck, KvTransferError>,
    first_byte: Instant,
    bytes: u64,
) -> Result<Transferred, Status> {
    let ack = ack.map_err(refused)?;
    if ack.error != v1::KvError::None as i32 {
        return Err(tandem_wire::mark_kv_fault(Status::data_loss(format!(
            "decode worker refused the KV: {} ({})",
            ack.message,
            v1::KvError::try_from(ack.error).map_or("unknown", |e| e.as_str_name())
        ))));
    }
    Ok(Transferred {
        first_byte,
        acked: Instant::now(),
        frames: ack.frames_received,
        bytes,
    })
}

fn refused(e: KvTransferError) -> Status {
    tandem_wire::mark_kv_fault(match e {
        KvTransferError::Refused { .. } => {
            Status::data_loss(format!("decode worker refused the KV: {e}"))
        }
        other => Status::unavailable(format!("KV transfer failed: {other}")),
    })
}
