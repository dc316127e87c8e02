//! Drives the load: warmup, then one run per rate or concurrency, each open or closed loop.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::args::BenchArgs;
use crate::client::{Client, Planned};
use crate::dist::{Arrival, LengthDist};
use crate::error::BenchError;
use crate::prompt::PromptSource;
use crate::record::RequestRecord;
use crate::rng::Rng;

/// Purposes of the seeded random streams, so each is independent of how much the others draw.
const PROMPTS: u64 = 1;
const ARRIVALS: u64 = 2;
const WARMUP: u64 = 3;
/// Prompts built ahead of their send.
const PLANNED_AHEAD: usize = 64;
/// Most prompts of a counted run built before its clock starts; the rest are built ahead of their
/// send like those of a timed run.
const BUILT_BEFORE: usize = 100_000;

/// One point of the benchmark: open loop at a rate (optionally capped), or closed loop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Phase {
    pub label: String,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
}

/// When a run stops sending.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    Count(usize),
    Until(Duration),
}

fn bad(msg: impl Into<String>) -> BenchError {
    BenchError::InvalidArgs(msg.into())
}

fn check_rate(r: f64) -> Result<f64, BenchError> {
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        Err(bad(format!("a rate must be a positive number, not {r}")))
    }
}

fn check_concurrency(c: usize) -> Result<usize, BenchError> {
    if c == 0 {
        return Err(bad("a concurrency must be at least 1"));
    }
    Ok(c)
}

fn label(rate: Option<f64>, concurrency: Option<usize>, arrival: Arrival) -> String {
    let arrival = format!("{arrival:?}").to_lowercase();
    match (rate, concurrency) {
        (Some(r), Some(c)) => format!("rate {r}/s ({arrival}), at most {c} in flight"),
        (Some(r), None) => format!("rate {r}/s ({arrival})"),
        (None, Some(c)) => format!("concurrency {c}"),
        (None, None) => "concurrency 1".into(),
    }
}

/// The runs the flags ask for, in order.
pub(crate) fn phases(args: &BenchArgs) -> Result<Vec<Phase>, BenchError> {
    if !(args.burstiness.is_finite() && args.burstiness > 0.0) {
        return Err(bad("--burstiness must be a positive number"));
    }
    let cap = args.concurrency.map(check_concurrency).transpose()?;
    let rate = args.rate.map(check_rate).transpose()?;
    let mut out = Vec::new();
    let mut push = |rate: Option<f64>, concurrency: Option<usize>| {
        let concurrency = if rate.is_none() {
            concurrency.or(Some(1))
        } else {
            concurrency
        };
        out.push(Phase {
            label: label(rate, concurrency, args.arrival),
            rate,
            concurrency,
        });
    };
    if !args.sweep_rates.is_empty() {
        for r in &args.sweep_rates {
            push(Some(check_rate(*r)?), cap);
        }
    } else if !args.sweep_concurrency.is_empty() {
        for c in &args.sweep_concurrency {
            push(rate, Some(check_concurrency(*c)?));
        }
    } else {
        push(rate, cap);
    }
    Ok(out)
}

pub(crate) fn stop(args: &BenchArgs) -> Result<Stop, BenchError> {
    match (args.requests, args.duration) {
        (Some(0), _) => Err(bad("--requests must be at least 1")),
        (Some(n), _) => Ok(Stop::Count(n)),
        (None, Some(d)) if d.is_zero() => Err(bad("--duration must be positive")),
        (None, Some(d)) => Ok(Stop::Until(d)),
        (None, None) => Ok(Stop::Count(100)),
    }
}

/// Builds prompts on a blocking thread (tokenizing is CPU work) into a bounded queue, so that
/// building never delays a send that is due. The same seed gives the same sequence.
pub(crate) struct Planner {
    pub source: Arc<PromptSource>,
    pub isl: LengthDist,
    pub osl: LengthDist,
    pub seed: u64,
    pub inexact: Arc<AtomicUsize>,
}

impl Planner {
    fn start(&self, warmup: bool, limit: Option<usize>) -> mpsc::Receiver<Planned> {
        let (tx, rx) = mpsc::channel(PLANNED_AHEAD);
        let (source, isl, osl) = (self.source.clone(), self.isl, self.osl);
        let inexact = self.inexact.clone();
        let mut rng = Rng::stream(self.seed, if warmup { WARMUP } else { PROMPTS });
        tokio::task::spawn_blocking(move || {
            for index in 0..limit.unwrap_or(usize::MAX) {
                let asked = isl.sample(&mut rng);
                let max_tokens = osl.sample(&mut rng);
                let prompt = source.build(asked, &mut rng);
                if prompt.len != asked && !warmup {
                    inexact.fetch_add(1, Ordering::Relaxed);
                }
                let planned = Planned {
                    index,
                    prompt: prompt.text,
                    input_len: prompt.len,
                    max_tokens,
                };
                if tx.blocking_send(planned).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

fn progress_bar(quiet: bool, label: &str, stop: Stop) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let (pb, template) = match stop {
        Stop::Count(n) => (
            ProgressBar::new(n as u64),
            "{prefix} [{bar:30}] {pos}/{len} done, {msg} [{elapsed_precise}, eta {eta}]",
        ),
        Stop::Until(_) => (
            ProgressBar::new_spinner(),
            "{prefix} {spinner} {pos} done, {msg} [{elapsed_precise}]",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(label.to_string());
    pb.set_message("0 failed, 0 rejected");
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Everything one run needs.
pub(crate) struct RunCtx<'a> {
    pub client: &'a Arc<Client>,
    pub planner: &'a Planner,
    pub arrival: Arrival,
    pub burstiness: f64,
    pub quiet: bool,
}

/// Sends one run's requests and returns their records (by index) and the run's time origin.
pub(crate) async fn run_phase(
    ctx: &RunCtx<'_>,
    phase: &Phase,
    stop: Stop,
    run: usize,
    warmup: bool,
) -> Result<(Vec<RequestRecord>, Instant), BenchError> {
    let limit = match stop {
        Stop::Count(n) => Some(n),
        Stop::Until(_) => None,
    };
    let mut planned = ctx.planner.start(warmup, limit);
    // A run of a known number of requests builds their prompts before its clock starts, so that
    // tokenizing them does not take the CPU of a server on the same machine while it is measured.
    let mut built = VecDeque::new();
    if let Some(n) = limit {
        while built.len() < n.min(BUILT_BEFORE) {
            match planned.recv().await {
                Some(p) => built.push_back(p),
                None => break,
            }
        }
    }
    let pb = progress_bar(ctx.quiet, &phase.label, stop);
    // Failed and rejected so far, for the progress bar.
    let tally = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let sem = phase.concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let mut arrivals = Rng::stream(ctx.planner.seed, ARRIVALS);
    let epoch = Instant::now();
    let deadline = match stop {
        Stop::Until(d) => Some(epoch + d),
        Stop::Count(_) => None,
    };
    let mut next = epoch;
    let mut tasks = JoinSet::new();
    for sent in 0..limit.unwrap_or(usize::MAX) {
        if let Some(rate) = phase.rate {
            if sent > 0 {
                let gap = ctx.arrival.gap(rate, ctx.burstiness, &mut arrivals);
                next += Duration::try_from_secs_f64(gap).unwrap_or(Duration::ZERO);
            }
            if deadline.is_some_and(|d| next >= d) {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
        }
        let permit = match &sem {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| BenchError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        // Open loop: the schedule alone decides what is inside the duration. Closed loop: a permit
        // that frees up after the end starts nothing.
        if phase.rate.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let next_planned = match built.pop_front() {
            Some(p) => Some(p),
            None => planned.recv().await,
        };
        let Some(p) = next_planned else {
            break;
        };
        let (client, pb, tally) = (ctx.client.clone(), pb.clone(), tally.clone());
        tasks.spawn(async move {
            let sent = client.send(&p, run, epoch).await;
            drop(permit);
            let which = if sent.0.failed() {
                Some(0)
            } else {
                sent.0.rejected.then_some(1)
            };
            if let Some(i) = which {
                tally[i].fetch_add(1, Ordering::Relaxed);
                let [f, r] = [0, 1].map(|i| tally[i].load(Ordering::Relaxed));
                pb.set_message(format!("{f} failed, {r} rejected"));
            }
            pb.inc(1);
            sent
        });
    }
    drop(planned);
    let mut sent = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        sent.push(done.map_err(|e| BenchError::Internal(e.to_string()))?);
    }
    pb.finish();
    // The run is over: what was left to count is counted now.
    let client = ctx.client.clone();
    let mut records = tokio::task::spawn_blocking(move || {
        sent.into_iter()
            .map(|(mut record, pieces)| {
                if let Some(pieces) = pieces {
                    client.settle(&mut record, pieces);
                }
                record
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| BenchError::Internal(e.to_string()))?;
    records.sort_by_key(|r| r.index);
    Ok((records, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> BenchArgs {
        let mut all = vec!["bench"];
        all.extend_from_slice(flags);
        BenchArgs::try_parse_from(all).expect("valid flags")
    }

    #[test]
    fn phases_for_each_mode() {
        let p = phases(&args(&[])).expect("ok");
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].rate, p[0].concurrency), (None, Some(1)));
        let p = phases(&args(&["--rate", "3"])).expect("ok");
        assert_eq!((p[0].rate, p[0].concurrency), (Some(3.0), None));
        let p = phases(&args(&["--sweep-rates", "1,2,4", "--concurrency", "8"])).expect("ok");
        let got: Vec<_> = p.iter().map(|p| (p.rate, p.concurrency)).collect();
        assert_eq!(
            got,
            vec![
                (Some(1.0), Some(8)),
                (Some(2.0), Some(8)),
                (Some(4.0), Some(8))
            ]
        );
        let p = phases(&args(&["--sweep-concurrency", "1,4"])).expect("ok");
        assert_eq!(p[1].label, "concurrency 4");
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "NaN"],
            &["--concurrency", "0"],
            &["--sweep-rates", "1,-2"],
            &["--burstiness", "0"],
        ] {
            assert!(phases(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stop_conditions() {
        assert!(matches!(stop(&args(&[])), Ok(Stop::Count(100))));
        assert!(matches!(
            stop(&args(&["--requests", "7"])),
            Ok(Stop::Count(7))
        ));
        assert!(
            matches!(stop(&args(&["--duration", "2s"])), Ok(Stop::Until(d)) if d == Duration::from_secs(2))
        );
        assert!(stop(&args(&["--requests", "0"])).is_err());
        assert!(stop(&args(&["--duration", "0s"])).is_err());
    }
}
