//! The command line of `tandem bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::Serialize;

use crate::dist::{Arrival, LengthDist, parse_duration};

/// Which OpenAI endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ApiKind {
    /// `POST /v1/chat/completions` with one user message.
    Chat,
    /// `POST /v1/completions` with a raw prompt.
    Completions,
}

/// The named workloads of shared/WORKLOADS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Prompts around 200 tokens (normal, std 75, bounded to 50-400), 64 output tokens.
    Chat,
    /// Prompts of 1,000-1,500 tokens (uniform), 32 output tokens: prefill-heavy.
    LongPrompt,
    /// Prompts of 50 tokens, 256 output tokens: decode-heavy.
    LongAnswer,
}

impl Workload {
    /// The name as typed after `--workload`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::LongPrompt => "long-prompt",
            Self::LongAnswer => "long-answer",
        }
    }

    /// Input and output length distributions.
    pub fn lengths(self) -> (LengthDist, LengthDist) {
        match self {
            Self::Chat => (
                LengthDist::Normal {
                    mean: 200.0,
                    std: 75.0,
                    min: 50,
                    max: 400,
                },
                LengthDist::Fixed { n: 64 },
            ),
            Self::LongPrompt => (
                LengthDist::Uniform { lo: 1000, hi: 1500 },
                LengthDist::Fixed { n: 32 },
            ),
            Self::LongAnswer => (LengthDist::Fixed { n: 50 }, LengthDist::Fixed { n: 256 }),
        }
    }
}

/// `tandem bench`: load an OpenAI-compatible endpoint and report TTFT, ITL, TPOT, end-to-end
/// latency, throughput and goodput.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the endpoint (http only). The API path is appended unless the URL has a path.
    #[arg(
        long,
        env = "TANDEM_BENCH_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,

    /// Model name sent in every request.
    #[arg(long, env = "TANDEM_BENCH_MODEL", default_value = "default")]
    pub model: String,

    /// API flavour: chat (messages) or completions (raw prompt).
    #[arg(long, env = "TANDEM_BENCH_API", value_enum, default_value_t = ApiKind::Chat)]
    pub api: ApiKind,

    /// Bearer token sent as `Authorization`, if the endpoint wants one.
    #[arg(long, env = "TANDEM_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Ask for whole answers instead of a stream (TTFT is then the end-to-end latency).
    #[arg(long, env = "TANDEM_BENCH_NO_STREAM")]
    pub no_stream: bool,

    /// Named workload giving the prompt and output length distributions.
    #[arg(long, env = "TANDEM_BENCH_WORKLOAD", value_enum, default_value_t = Workload::Chat)]
    pub workload: Workload,

    /// Prompt lengths, overriding the workload's: N, uniform:A-B or normal:MEAN,STD,MIN,MAX.
    #[arg(long, env = "TANDEM_BENCH_ISL")]
    pub isl: Option<LengthDist>,

    /// Output lengths (`max_tokens`, with `ignore_eos`), overriding the workload's; same forms.
    #[arg(long, env = "TANDEM_BENCH_OSL")]
    pub osl: Option<LengthDist>,

    /// Open loop: send requests at this many per second.
    #[arg(long, env = "TANDEM_BENCH_RATE", conflicts_with = "sweep_rates")]
    pub rate: Option<f64>,

    /// Arrival process for `--rate`.
    #[arg(long, env = "TANDEM_BENCH_ARRIVAL", value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,

    /// Shape of the gamma arrival gaps (1 is Poisson; smaller is burstier).
    #[arg(long, env = "TANDEM_BENCH_BURSTINESS", default_value_t = 1.0)]
    pub burstiness: f64,

    /// Closed loop: keep this many requests in flight (with `--rate`: a cap on requests in flight).
    #[arg(
        long,
        env = "TANDEM_BENCH_CONCURRENCY",
        conflicts_with = "sweep_concurrency"
    )]
    pub concurrency: Option<usize>,

    /// Run once per rate, in order: `--sweep-rates 1,2,4`.
    #[arg(
        long,
        env = "TANDEM_BENCH_SWEEP_RATES",
        value_delimiter = ',',
        conflicts_with = "sweep_concurrency"
    )]
    pub sweep_rates: Vec<f64>,

    /// Run once per concurrency, in order: `--sweep-concurrency 1,4,16`.
    #[arg(long, env = "TANDEM_BENCH_SWEEP_CONCURRENCY", value_delimiter = ',')]
    pub sweep_concurrency: Vec<usize>,

    /// Measured requests per run (default 100 when `--duration` is not given).
    #[arg(long, env = "TANDEM_BENCH_REQUESTS", conflicts_with = "duration")]
    pub requests: Option<usize>,

    /// Send requests for this long per run (e.g. 60s), then wait for those in flight.
    #[arg(long, env = "TANDEM_BENCH_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Requests sent and discarded before the first run.
    #[arg(long, env = "TANDEM_BENCH_WARMUP", default_value_t = 0)]
    pub warmup: usize,

    /// Seed for prompts, lengths and arrivals: the same seed repeats the same run.
    #[arg(long, env = "TANDEM_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Per-request limit on the whole answer (e.g. 300s).
    #[arg(long, env = "TANDEM_BENCH_TIMEOUT", value_parser = parse_duration, default_value = "300s")]
    pub timeout: Duration,

    /// TTFT objective (e.g. 500ms) for SLO attainment and goodput.
    #[arg(long, env = "TANDEM_BENCH_SLO_TTFT", value_parser = parse_duration)]
    pub slo_ttft: Option<Duration>,

    /// Inter-token objective (e.g. 50ms), checked against each request's TPOT.
    #[arg(long, env = "TANDEM_BENCH_SLO_ITL", value_parser = parse_duration)]
    pub slo_itl: Option<Duration>,

    /// Write the summary and every request's timings here as JSON.
    #[arg(long, env = "TANDEM_BENCH_JSON")]
    pub json: Option<PathBuf>,

    /// Write an SVG plot here: latency CDFs, or throughput against latency for a sweep.
    #[arg(long, env = "TANDEM_BENCH_PLOT")]
    pub plot: Option<PathBuf>,

    /// No progress bar.
    #[arg(long, env = "TANDEM_BENCH_QUIET")]
    pub quiet: bool,
}

#[derive(Parser)]
struct Standalone {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    /// Parses flags as `tandem bench` would (the first item is the program name), for tests and
    /// examples that have no `tandem` binary around them.
    pub fn try_parse_from<I, T>(iter: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Standalone::try_parse_from(iter).map(|s| s.args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_command_line() {
        let a = BenchArgs::try_parse_from([
            "bench",
            "--url",
            "http://h:1",
            "--rate",
            "2.5",
            "--arrival",
            "gamma",
            "--burstiness",
            "0.5",
            "--isl",
            "uniform:10-20",
            "--osl",
            "8",
            "--duration",
            "30s",
            "--slo-ttft",
            "500ms",
            "--sweep-concurrency",
            "1,4,16",
            "--api",
            "completions",
        ])
        .expect("valid flags");
        assert_eq!(a.url, "http://h:1");
        assert_eq!(a.rate, Some(2.5));
        assert_eq!(a.arrival, Arrival::Gamma);
        assert_eq!(a.isl, Some(LengthDist::Uniform { lo: 10, hi: 20 }));
        assert_eq!(a.osl, Some(LengthDist::Fixed { n: 8 }));
        assert_eq!(a.duration, Some(Duration::from_secs(30)));
        assert_eq!(a.slo_ttft, Some(Duration::from_millis(500)));
        assert_eq!(a.sweep_concurrency, vec![1, 4, 16]);
        assert_eq!(a.api, ApiKind::Completions);
        assert_eq!(a.workload, Workload::Chat);
    }

    #[test]
    fn rejects_conflicting_modes() {
        for bad in [
            &["bench", "--requests", "5", "--duration", "1s"][..],
            &["bench", "--rate", "1", "--sweep-rates", "1,2"],
            &["bench", "--sweep-rates", "1", "--sweep-concurrency", "2"],
            &["bench", "--isl", "uniform:9-1"],
        ] {
            assert!(BenchArgs::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn named_workloads_follow_the_reference() {
        let (isl, osl) = Workload::LongPrompt.lengths();
        assert_eq!(isl, LengthDist::Uniform { lo: 1000, hi: 1500 });
        assert_eq!(osl, LengthDist::Fixed { n: 32 });
        assert_eq!(
            Workload::LongAnswer.lengths().1,
            LengthDist::Fixed { n: 256 }
        );
        assert_eq!(Workload::Chat.lengths().1, LengthDist::Fixed { n: 64 });
        assert_eq!(Workload::LongPrompt.name(), "long-prompt");
    }
}
