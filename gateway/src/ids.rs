//! Request ids and random seeds. Neither needs cryptographic randomness: ids must be unique and
//! seeds different between requests, so the standard library's randomly keyed hasher is enough.
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A random 64-bit number: a process-random key (RandomState) hashing a counter, so two calls
/// never return the same value by construction of the input.
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// An OpenAI-style id: `chatcmpl-` or `cmpl-` then 32 hex digits.
pub(crate) fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_well_formed() {
        let a = request_id("chatcmpl");
        let b = request_id("chatcmpl");
        assert_ne!(a, b);
        assert_eq!(a.len(), "chatcmpl-".len() + 32);
        assert!(
            a["chatcmpl-".len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
    }
}
