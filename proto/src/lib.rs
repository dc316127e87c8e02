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
