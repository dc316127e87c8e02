//! The command line of `tandem bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::Serialize;

use crate::admission::{Priority, parse_budget};
use crate::dist::{Arrival, LengthDist, parse_duration};
use crate::objectives::GoodputObjective;

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
/// latency, throughput and goodput; with a server that sheds load (HTTP 429), the requests it
/// admitted and rejected, attainment among the admitted, and its TTFT predictions against the
/// measured TTFT.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the endpoint (http only). The API path is appended unless the URL has a path.
    #[arg(
        long,
        env = "TANDEM_BENCH_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,

    /// Model name sent in every request (default: the first entry of the endpoint's
    /// `GET /v1/models`, asked once before the run; the benchmark stops if that fails).
    #[arg(long, env = "TANDEM_BENCH_MODEL")]
    pub model: Option<String>,

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

    /// Objectives for goodput as vLLM's benchmark spells them, in milliseconds:
    /// `--goodput ttft:2000 tpot:100 e2el:10000` (comma-separated in the environment variable).
    /// `ttft` is `--slo-ttft` and `tpot` is `--slo-itl` under another name: an objective given both
    /// ways must agree, or the benchmark does not start. `e2el` bounds the end-to-end latency.
    #[arg(
        long,
        env = "TANDEM_BENCH_GOODPUT",
        num_args = 1..,
        value_delimiter = ',',
        value_name = "KEY:MS"
    )]
    pub goodput: Vec<GoodputObjective>,

    /// TTFT budget (e.g. 2s, 450ms) sent with every request as `x-tandem-ttft-budget-ms` (whole
    /// milliseconds, rounded up, at least 1): a server with admission control answers 429 at once
    /// when it cannot meet it. Rejections are counted apart from errors, by their error code.
    #[arg(long, env = "TANDEM_BENCH_TTFT_BUDGET", value_parser = parse_budget)]
    pub ttft_budget: Option<Duration>,

    /// Inter-token budget (e.g. 50ms) sent with every request as `x-tandem-itl-budget-ms` (whole
    /// milliseconds, rounded up, at least 1).
    #[arg(long, env = "TANDEM_BENCH_ITL_BUDGET", value_parser = parse_budget)]
    pub itl_budget: Option<Duration>,

    /// Priority sent with every request as `x-tandem-priority`: which requests a loaded server
    /// sheds first (sheddable, then standard; critical last).
    #[arg(long, env = "TANDEM_BENCH_PRIORITY", value_enum)]
    pub priority: Option<Priority>,

    /// Write the summary and every request's timings here as JSON (with, per request, whether it
    /// was rejected, its error code and `Retry-After`, and the server's predicted TTFT).
    #[arg(long, env = "TANDEM_BENCH_JSON")]
    pub json: Option<PathBuf>,

    /// Write an SVG plot here: latency CDFs, or throughput against latency for a sweep (plus, when
    /// requests were rejected or objectives given, admitted, good and rejected requests per second
    /// against the offered load).
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
    fn admission_flags() {
        let a = BenchArgs::try_parse_from([
            "bench",
            "--goodput",
            "ttft:2000",
            "tpot:100",
            "--ttft-budget",
            "1.5s",
            "--itl-budget",
            "40ms",
            "--priority",
            "sheddable",
            "--requests",
            "5",
        ])
        .expect("valid flags");
        let goodput: Vec<String> = a.goodput.iter().map(ToString::to_string).collect();
        assert_eq!(goodput, vec!["ttft:2000", "tpot:100"]);
        assert_eq!(a.requests, Some(5));
        assert_eq!(a.ttft_budget, Some(Duration::from_millis(1500)));
        assert_eq!(a.itl_budget, Some(Duration::from_millis(40)));
        assert_eq!(a.priority, Some(Priority::Sheddable));
        assert_eq!(a.model, None);
        let a = BenchArgs::try_parse_from(["bench", "--goodput", "e2el:5000,ttft:1"])
            .expect("comma-separated");
        assert_eq!(a.goodput.len(), 2);
        let a = BenchArgs::try_parse_from(["bench"]).expect("no flags");
        assert!(a.goodput.is_empty() && a.ttft_budget.is_none() && a.priority.is_none());
    }

    #[test]
    fn malformed_admission_flags_are_clap_errors() {
        for (bad, says) in [
            (
                &["bench", "--goodput", "ttft"][..],
                "expected KEY:MILLISECONDS",
            ),
            (
                &["bench", "--goodput", "ttft:2000", "itl:5"],
                "unknown objective `itl`",
            ),
            (&["bench", "--goodput", "tpot:-1"], "positive"),
            (&["bench", "--goodput"], "--goodput"),
            (
                &["bench", "--ttft-budget", "0ms"],
                "a budget must be positive",
            ),
            (&["bench", "--itl-budget", "soon"], "is not a duration"),
            (&["bench", "--priority", "urgent"], "urgent"),
        ] {
            let e = BenchArgs::try_parse_from(bad)
                .expect_err("malformed")
                .to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn help_documents_the_admission_flags() {
        use clap::CommandFactory;
        let help = Standalone::command().render_long_help().to_string();
        eprintln!("{help}");
        for needle in [
            "--goodput <KEY:MS>...",
            "--ttft-budget <TTFT_BUDGET>",
            "x-tandem-itl-budget-ms",
            "- sheddable: Shed first",
            "first entry of the endpoint's `GET /v1/models`",
            "[env: TANDEM_BENCH_MODEL=]",
        ] {
            assert!(help.contains(needle), "{needle} missing from\n{help}");
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
