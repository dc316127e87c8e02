use tandem_proto::v1;

/// Everything that can go wrong in a KV transfer, on either side.
#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    /// The socket or the shared-memory file failed.
    #[error("kv transfer i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the wire format (bad magic, version, oversized or undecodable message).
    #[error("kv protocol: {0}")]
    Protocol(String),
    /// The decode worker refused the transfer with a [`v1::KvAck`] carrying an error.
    #[error("kv refused ({error:?}) after {frames_received} frames: {message}")]
    Refused {
        /// Why.
        error: v1::KvError,
        /// The receiver's detail.
        message: String,
        /// Frames the receiver had accepted for this attempt.
        frames_received: u64,
    },
    /// The connection closed before the final acknowledgement arrived.
    #[error("kv connection to {0} lost")]
    ConnectionLost(String),
    /// No acknowledgement arrived in time.
    #[error("kv acknowledgement timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A call that does not fit the geometry or the layout (wrong sizes, ids out of range).
    #[error("kv invalid: {0}")]
    Invalid(String),
    /// An shm writer may no longer write a block ([`crate::fence`]).
    #[error("kv write fenced: {0}")]
    Fenced(String),
}

/// This crate's result type.
pub type Result<T, E = KvTransferError> = std::result::Result<T, E>;
