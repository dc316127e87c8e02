//! The gateway's Prometheus metrics and their text exposition. Hand-written: three histograms,
//! a few counters and a gauge do not justify a metrics framework.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds (seconds) for time to first token and end-to-end latency.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds (seconds) for inter-token latency: decode steps are milliseconds to a second.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

/// A cumulative histogram with fixed bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the +Inf bucket; not cumulative (summed when rendered).
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds, so it can be an atomic integer.
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    /// Arrival to first generated token.
    pub ttft: Histogram,
    /// Between successive token chunks of one generation.
    pub itl: Histogram,
    /// Arrival to the last token.
    pub e2e: Histogram,
    /// Requests by (endpoint, status class): the endpoint is a route pattern, so bounded.
    requests: Mutex<BTreeMap<(String, &'static str), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    in_flight: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
        }
    }
}

/// `2xx`, `4xx`, `5xx`... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint.to_owned(), status_class(status)))
            .or_insert(0) += 1;
    }

    /// A generation starts: counted in flight until [`Metrics::leave`].
    pub fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A generation ended (or its client left).
    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts the prompt of a request the backend accepted.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts tokens received from the backend.
    pub fn add_completion_tokens(&self, n: usize) {
        self.completion_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Generations under way now.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.ttft.render(
            &mut out,
            "tandem_gateway_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
        );
        self.itl.render(
            &mut out,
            "tandem_gateway_inter_token_latency_seconds",
            "Time between successive token chunks of a generation.",
        );
        self.e2e.render(
            &mut out,
            "tandem_gateway_e2e_latency_seconds",
            "Time from a request's arrival to its last token.",
        );
        let name = "tandem_gateway_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP requests answered, by endpoint and status class."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((endpoint, class), n) in map.iter() {
            let _ = writeln!(
                out,
                "{name}{{endpoint=\"{endpoint}\",status=\"{class}\"}} {n}"
            );
        }
        drop(map);
        for (name, help, v) in [
            (
                "tandem_gateway_prompt_tokens_total",
                "Prompt tokens of requests sent to the backend.",
                &self.prompt_tokens,
            ),
            (
                "tandem_gateway_completion_tokens_total",
                "Generated tokens received from the backend.",
                &self.completion_tokens,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let name = "tandem_gateway_requests_in_flight";
        let _ = writeln!(out, "# HELP {name} Generations under way.");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {}", self.in_flight_now());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(70));
        m.ttft.observe(Duration::from_secs(100));
        let text = m.render();
        for line in [
            "tandem_gateway_time_to_first_token_seconds_bucket{le=\"0.005\"} 1",
            "tandem_gateway_time_to_first_token_seconds_bucket{le=\"0.05\"} 1",
            "tandem_gateway_time_to_first_token_seconds_bucket{le=\"0.1\"} 2",
            "tandem_gateway_time_to_first_token_seconds_bucket{le=\"60\"} 2",
            "tandem_gateway_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3",
            "tandem_gateway_time_to_first_token_seconds_sum 100.073",
            "tandem_gateway_time_to_first_token_seconds_count 3",
            "# TYPE tandem_gateway_time_to_first_token_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn requests_by_endpoint_and_class_and_in_flight_gauge() {
        let m = Metrics::default();
        m.count_request("/v1/completions", 200);
        m.count_request("/v1/completions", 201);
        m.count_request("/v1/completions", 429);
        m.enter();
        let text = m.render();
        assert!(text.contains(
            "tandem_gateway_requests_total{endpoint=\"/v1/completions\",status=\"2xx\"} 2\n"
        ));
        assert!(text.contains(
            "tandem_gateway_requests_total{endpoint=\"/v1/completions\",status=\"4xx\"} 1\n"
        ));
        assert!(text.contains("tandem_gateway_requests_in_flight 1\n"));
        m.leave();
        assert!(m.render().contains("tandem_gateway_requests_in_flight 0\n"));
    }
}
