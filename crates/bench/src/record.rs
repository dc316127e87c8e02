//! What one request did, as measured by the client, and the per-request metrics derived from it.

use serde::Serialize;

/// Why a request failed: a bounded set, fit for a table or a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The TCP connection could not be opened.
    Connect,
    /// The server answered 4xx.
    #[serde(rename = "http_4xx")]
    Http4xx,
    /// The server answered 5xx.
    #[serde(rename = "http_5xx")]
    Http5xx,
    /// No complete answer within `--timeout`.
    Timeout,
    /// The answer could not be understood: a malformed chunk or body, an error event in the stream,
    /// an unexpected status.
    Protocol,
    /// The connection closed before the answer was complete (no `[DONE]`).
    Disconnected,
}

impl ErrorClass {
    pub const ALL: [Self; 6] = [
        Self::Connect,
        Self::Http4xx,
        Self::Http5xx,
        Self::Timeout,
        Self::Protocol,
        Self::Disconnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Http4xx => "http_4xx",
            Self::Http5xx => "http_5xx",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::Disconnected => "disconnected",
        }
    }
}

/// A failed request's class and what was seen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestError {
    pub class: ErrorClass,
    pub message: String,
}

/// Token counts the server reported (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

/// Where a request's output token count came from, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The server's `usage.completion_tokens`.
    Usage,
    /// The given tokenizer applied to the whole output text.
    Tokenizer,
    /// One token per content chunk (streaming, no usage, no tokenizer).
    Chunks,
    /// Whitespace words of the output (non-streaming, no usage, no tokenizer).
    Words,
}

/// One request's timings. Times are seconds since the start of its run (phase).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Position in the run; also sent as the `x-request-id` header (`bench-<run>-<index>`).
    pub index: usize,
    /// Prompt length asked for, in the run's prompt unit.
    pub input_len: u32,
    /// `max_tokens` sent.
    pub max_tokens: u32,
    /// When the request was handed to the connection.
    pub send_s: f64,
    /// When the first chunk carrying content arrived (the whole answer, when not streaming).
    pub first_token_s: Option<f64>,
    /// When the answer ended (`[DONE]`, end of body) or failed.
    pub end_s: f64,
    /// Arrival time of every content chunk.
    pub chunk_s: Vec<f64>,
    /// Tokens attributed to each content chunk (see the crate docs on ITL).
    pub chunk_tokens: Vec<u32>,
    pub output_tokens: u32,
    pub output_tokens_source: TokenSource,
    pub usage: Option<Usage>,
    /// Why the request failed; `None` for a success and for a rejection.
    pub error: Option<RequestError>,
    /// The server turned the request away with HTTP 429 (admission control, rate limiting): not
    /// a success, not an error.
    pub rejected: bool,
    /// The rejection's `error.code` (`ttft_budget_unreachable`, `itl_budget_unreachable`,
    /// `queue_full`, `rate_limit_exceeded`, ...), when its body had one.
    pub reject_code: Option<String>,
    /// The rejection's `Retry-After`, seconds.
    pub retry_after_s: Option<f64>,
    /// The server's predicted TTFT (`x-tandem-predicted-ttft-ms`), on admitted and rejected
    /// answers alike, milliseconds.
    pub predicted_ttft_ms: Option<f64>,
}

impl RequestRecord {
    /// Admitted and answered in full.
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.rejected
    }

    /// Failed for another reason than a rejection.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Measured TTFT over the server's prediction, for a success with a positive prediction. The
    /// measured TTFT is the client's (from the send to the first content chunk; the whole answer
    /// when not streaming), so it includes the network and the HTTP stack the prediction may not.
    pub fn ttft_over_predicted(&self) -> Option<f64> {
        let predicted = self.predicted_ttft_ms.filter(|p| *p > 0.0)?;
        if !self.ok() {
            return None;
        }
        Some(self.ttft()? * 1000.0 / predicted)
    }

    /// Time to first token, seconds.
    pub fn ttft(&self) -> Option<f64> {
        Some(self.first_token_s? - self.send_s)
    }

    /// End-to-end latency, seconds.
    pub fn e2e(&self) -> f64 {
        self.end_s - self.send_s
    }

    /// Time per output token after the first, `(e2e - ttft) / (output_tokens - 1)`; `None` for fewer
    /// than two output tokens.
    pub fn tpot(&self) -> Option<f64> {
        if self.output_tokens < 2 {
            return None;
        }
        Some((self.e2e() - self.ttft()?) / f64::from(self.output_tokens - 1))
    }

    /// Token-level inter-token latencies: the gap before content chunk `i > 0`, split evenly over
    /// the `chunk_tokens[i]` tokens it carried. Their sum is the time from the first to the last
    /// content chunk.
    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.chunk_s
            .windows(2)
            .zip(self.chunk_tokens.iter().skip(1))
            .flat_map(|(w, &k)| {
                let k = k.max(1);
                std::iter::repeat_n((w[1] - w[0]) / f64::from(k), k as usize)
            })
    }
}

/// Makes per-chunk token estimates add up to the `total` the server counted, keeping each chunk's
/// share proportional to its estimate (largest remainder) and at least one token. Tokens the client
/// never saw as text (a special token, text the server held back) are thereby charged to the chunks
/// around them, so the ITL samples of a response stay one per generated token. With fewer tokens than
/// chunks (a token's text split over chunks) every chunk keeps one token: the count cannot be made
/// exact without chunks of zero tokens.
pub fn apportion(estimates: &mut [u32], total: u32) {
    let n = estimates.len() as u64;
    let total = u64::from(total);
    if n == 0 || total < n {
        estimates.iter_mut().for_each(|k| *k = 1);
        return;
    }
    let weights: Vec<u64> = estimates.iter().map(|&k| u64::from(k.max(1))).collect();
    let sum: u64 = weights.iter().sum();
    // Every chunk gets one token first; the rest go by weight.
    let spare = total - n;
    let mut rest = spare;
    let mut remainders = Vec::with_capacity(estimates.len());
    for (i, (k, &w)) in estimates.iter_mut().zip(&weights).enumerate() {
        let exact = u128::from(spare) * u128::from(w);
        let share = (exact / u128::from(sum)) as u64;
        remainders.push((exact % u128::from(sum), i));
        rest -= share;
        *k = (1 + share) as u32;
    }
    // Ties go to the later chunk: the first chunk's tokens give no ITL sample, and a token the client
    // never saw most often came after the first visible one.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    for &(_, i) in remainders.iter().take(rest as usize) {
        estimates[i] += 1;
    }
}

#[cfg(test)]
impl RequestRecord {
    /// For tests: a streamed success sent at `send_s`, its chunks arriving at `chunk_s` with
    /// `chunk_tokens` tokens each, ended with the last chunk; 10 prompt units, usage-counted.
    pub(crate) fn streamed(send_s: f64, chunk_s: Vec<f64>, chunk_tokens: Vec<u32>) -> Self {
        let out: u32 = chunk_tokens.iter().sum();
        RequestRecord {
            index: 0,
            input_len: 10,
            max_tokens: out,
            send_s,
            first_token_s: chunk_s.first().copied(),
            end_s: chunk_s.last().copied().unwrap_or(send_s),
            chunk_s,
            chunk_tokens,
            output_tokens: out,
            output_tokens_source: TokenSource::Usage,
            usage: None,
            error: None,
            rejected: false,
            reject_code: None,
            retry_after_s: None,
            predicted_ttft_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chunks: Vec<f64>, tokens: Vec<u32>, out: u32, end: f64) -> RequestRecord {
        RequestRecord {
            max_tokens: out,
            end_s: end,
            output_tokens: out,
            ..RequestRecord::streamed(1.0, chunks, tokens)
        }
    }

    #[test]
    fn measured_over_predicted_ttft() {
        // TTFT 0.5 s against a prediction of 250 ms.
        let mut r = record(vec![1.5, 1.6], vec![1, 1], 2, 1.6);
        assert_eq!(r.ttft_over_predicted(), None);
        r.predicted_ttft_ms = Some(250.0);
        assert_eq!(r.ttft_over_predicted(), Some(2.0));
        r.predicted_ttft_ms = Some(0.0);
        assert_eq!(r.ttft_over_predicted(), None);
        r.predicted_ttft_ms = Some(1000.0);
        assert_eq!(r.ttft_over_predicted(), Some(0.5));
        r.rejected = true;
        assert!(!r.ok() && !r.failed());
        assert_eq!(r.ttft_over_predicted(), None);
        r.rejected = false;
        r.error = Some(RequestError {
            class: ErrorClass::Timeout,
            message: "late".into(),
        });
        assert!(!r.ok() && r.failed());
        assert_eq!(r.ttft_over_predicted(), None);
    }

    #[test]
    fn rejection_fields_serialise_as_null_when_absent() {
        let v = serde_json::to_value(record(vec![1.5], vec![1], 1, 1.5)).expect("serialises");
        assert_eq!(v["rejected"], serde_json::Value::Bool(false));
        for key in ["reject_code", "retry_after_s", "predicted_ttft_ms", "error"] {
            assert_eq!(v.get(key), Some(&serde_json::Value::Null), "{key}: {v}");
        }
    }

    #[test]
    fn per_request_metrics() {
        let r = record(vec![1.5, 1.6, 1.8, 2.1], vec![1, 1, 1, 1], 4, 2.1);
        assert!((r.ttft().unwrap_or(f64::NAN) - 0.5).abs() < 1e-12);
        assert!((r.e2e() - 1.1).abs() < 1e-12);
        // (1.1 - 0.5) / 3
        assert!((r.tpot().unwrap_or(f64::NAN) - 0.2).abs() < 1e-12);
        let itl: Vec<f64> = r.itls().collect();
        let want = [0.1, 0.2, 0.3];
        assert_eq!(itl.len(), 3);
        for (a, b) in itl.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{itl:?}");
        }
    }

    #[test]
    fn multi_token_chunks_split_their_gap() {
        // Chunk 1 carries 3 tokens 0.3 s after chunk 0: three samples of 0.1 s. The first chunk's
        // second token arrived with the first token and yields no sample.
        let r = record(vec![2.0, 2.3, 2.5], vec![2, 3, 1], 6, 2.5);
        let itl: Vec<f64> = r.itls().collect();
        assert_eq!(itl.len(), 4);
        for (a, b) in itl.iter().zip([0.1, 0.1, 0.1, 0.2]) {
            assert!((a - b).abs() < 1e-12, "{itl:?}");
        }
        assert!((itl.iter().sum::<f64>() - 0.5).abs() < 1e-12);
        // TPOT = (1.5 - 1.0) / 5
        assert!((r.tpot().unwrap_or(f64::NAN) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn error_classes_serialise_as_their_names() {
        for class in ErrorClass::ALL {
            let v = serde_json::to_value(class).expect("serialises");
            assert_eq!(v.as_str(), Some(class.as_str()));
        }
    }

    #[test]
    fn one_token_has_no_tpot() {
        let r = record(vec![1.2], vec![1], 1, 1.2);
        assert_eq!(r.tpot(), None);
        assert_eq!(r.itls().count(), 0);
    }

    #[test]
    fn apportion_makes_the_counts_add_up() {
        let mut k = vec![1, 1, 1, 1];
        apportion(&mut k, 6);
        assert_eq!(k, vec![1, 1, 2, 2]);
        let mut k = vec![3, 1];
        apportion(&mut k, 8);
        // one each, then 6 spare by weight 3:1 -> 4.5 and 1.5; the tied remainder goes to the later.
        assert_eq!(k, vec![5, 3]);
        let mut k = vec![2, 2, 2];
        apportion(&mut k, 3);
        assert_eq!(k, vec![1, 1, 1]);
        let mut k = vec![5, 1];
        apportion(&mut k, 1);
        assert_eq!(k, vec![1, 1]);
        let mut k: Vec<u32> = vec![];
        apportion(&mut k, 4);
        assert!(k.is_empty());
        let mut k = vec![0, 4];
        apportion(&mut k, 10);
        assert_eq!(k.iter().sum::<u32>(), 10);
        // 8 spare by weight 1:4 -> 1.6 and 6.4; the larger remainder is the first's.
        assert_eq!(k, vec![3, 7]);
    }
}
