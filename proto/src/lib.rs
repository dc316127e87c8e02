//! Code generated from the `tandem.v1` protobuf package (`proto/tandem/v1/*.proto`): messages,
//! gRPC clients and servers for the worker and router services, and the KV frame header.
//!
//! Callers use `tandem_proto::v1::...`; the `.proto` files are the documentation of every field.
#![forbid(unsafe_code)]

/// The `tandem.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// Magic bytes that open a KV connection (see `kv.proto`).
pub const KV_MAGIC: [u8; 4] = *b"TKV1";

/// Version of the KV wire format this crate describes (`KvHello.version`).
pub const KV_WIRE_VERSION: u32 = 1;

/// Largest encoded KV header or control message a receiver accepts (see `kv.proto`).
pub const KV_MAX_HEADER_LEN: u32 = 64 * 1024;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1;

    #[test]
    fn a_large_frame_header_round_trips_well_within_the_limit() {
        // 2,048 blocks of 16 tokens is a 32k-token prompt sent as one frame per layer.
        let header = v1::KvFrameHeader {
            request_id: "chatcmpl-0123456789abcdef".into(),
            reservation_id: u64::MAX,
            layer: 79,
            block_ids: (0..2048).map(|b| 1_000_000 + b).collect(),
            seq: 79,
            payload_len: 1 << 33,
            dtype: v1::KvDtype::Bf16.into(),
            geometry: Some(v1::BlockGeometry {
                block_tokens: 16,
                num_layers: 80,
                kv_heads: 8,
                head_dim: 128,
                dtype: v1::KvDtype::Bf16.into(),
            }),
            checksum: 0xdead_beef,
            last: true,
            attempt: 1,
        };
        let bytes = header.encode_to_vec();
        assert!(
            bytes.len() < super::KV_MAX_HEADER_LEN as usize / 4,
            "{} bytes",
            bytes.len()
        );
        assert_eq!(
            v1::KvFrameHeader::decode(bytes.as_slice()).ok(),
            Some(header)
        );
    }

    #[test]
    fn unset_enums_decode_as_unspecified() {
        let empty = v1::WorkerIdentity::default();
        assert_eq!(empty.role(), v1::WorkerRole::Unspecified);
        assert_eq!(empty.kv_transport(), v1::KvTransportKind::Unspecified);
        assert_eq!(
            v1::LoadReport::default().state(),
            v1::WorkerState::Unspecified
        );
    }
}
