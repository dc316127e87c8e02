//! Load for the chaos tests: clients that keep greedy streams running while a fault hits the
//! cluster, and the account of one fault (requests lost, failed or different from their
//! undisturbed run, and what the streams that ran across it waited).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::stream;

/// Tokens per stream; prompts differ so that each stream's text is its own.
pub const TOKENS: u32 = 40;
pub const PROMPTS: usize = 6;
/// Clients streaming at once (about what two cores serve without a queue building).
pub const CLIENTS: usize = 3;

/// Rounds of each fault: `CHAOS_ROUNDS` (`scripts/chaos.sh`), or the one CI runs.
pub fn rounds() -> usize {
    std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
}

fn body(model: &str, i: usize) -> Value {
    json!({"model": model, "prompt": format!("Chapter {i}. The old lighthouse keeper"),
           "max_tokens": TOKENS, "ignore_eos": true, "temperature": 0, "stream": true,
           "stream_options": {"include_usage": true}})
}

/// One finished request: which prompt, its text, whether it ended cleanly with every token, the
/// longest gap between its events, and when it ran.
pub struct Done {
    pub prompt: usize,
    /// A response came (its gateway was there).
    pub answered: bool,
    pub text: String,
    pub clean: bool,
    pub longest_gap: Duration,
    pub ttft: Duration,
    pub span: (Instant, Instant),
}

/// Streams prompt `prompt` to its end.
pub async fn one(url: &str, model: &str, prompt: usize) -> Done {
    let start = Instant::now();
    let s = stream(url, "/v1/completions", &body(model, prompt), None).await;
    let errors = s.events.iter().any(|e| e.get("error").is_some());
    let used = s
        .events
        .iter()
        .rev()
        .find_map(|e| e["usage"]["completion_tokens"].as_u64());
    Done {
        prompt,
        answered: s.status != 0,
        text: s.text(),
        clean: s.status == 200 && s.done && !errors && used == Some(u64::from(TOKENS)),
        longest_gap: s.longest_gap,
        ttft: s.first_event.unwrap_or(Duration::MAX),
        span: (start, Instant::now()),
    }
}

/// Each prompt's undisturbed text.
pub async fn undisturbed(url: &str, model: &str) -> HashMap<usize, String> {
    let mut want = HashMap::new();
    for p in 0..PROMPTS {
        let d = one(url, model, p).await;
        assert!(d.clean, "undisturbed prompt {p}: {:?}", d.text);
        want.insert(p, d.text);
    }
    want
}

/// Clients that each send one request after another until told to stop, or until their gateway
/// does not answer.
pub async fn load(url: String, model: String, stop: watch::Receiver<bool>) -> Vec<Done> {
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, model, stop) = (url.clone(), model.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut next = c;
                while !*stop.borrow() {
                    let d = one(&url, &model, next % PROMPTS).await;
                    // A client whose gateway is gone stops (it would go elsewhere).
                    let gone = !d.answered;
                    done.push(d);
                    if gone {
                        break;
                    }
                    next += CLIENTS;
                }
                done
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    all
}

/// Load running while a fault lasts; [`Running::finish`] stops it and collects its requests.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Done>>,
}

impl Running {
    pub fn start(url: &str, model: &str) -> Running {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(load(url.to_owned(), model.to_owned(), rx));
        Running { stop, task }
    }

    /// Stops the clients and waits for their requests, each of which must end well before any
    /// deadline: a hung one fails the test here.
    pub async fn finish(self, name: &str) -> Vec<Done> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .unwrap_or_else(|_| panic!("{name}: requests hung"))
            .unwrap()
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Prints what a fault that began at `at` and lasted until `over` cost, and returns a line for
/// each request that failed or whose text differs from its undisturbed run.
pub fn account(
    round: usize,
    name: &str,
    done: &[Done],
    want: &HashMap<usize, String>,
    at: Instant,
    over: Instant,
) -> Vec<String> {
    let bad: Vec<&Done> = done
        .iter()
        .filter(|d| !d.clean || d.text != want[&d.prompt])
        .collect();
    let mut gaps: Vec<Duration> = done
        .iter()
        .filter(|d| d.span.0 <= at && d.span.1 >= at)
        .map(|d| d.longest_gap)
        .collect();
    let (p50, p99) = if gaps.is_empty() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (percentile(&mut gaps, 0.5), percentile(&mut gaps, 0.99))
    };
    // Requests begun while the fault lasted (or in the second after an instant one): their time
    // to first token includes finding a worker that answers.
    let begun = |d: &&Done| d.span.0 >= at && d.span.0 <= over.max(at + Duration::from_secs(1));
    let ttft = done.iter().filter(begun).map(|d| d.ttft).max();
    println!(
        "round {round} {name}: {} requests, {} failed or different; {} across the fault, longest gap p50 {p50:.2?} p99 {p99:.2?}; {} begun during it, longest TTFT {:.2?}",
        done.len(),
        bad.len(),
        gaps.len(),
        done.iter().filter(begun).count(),
        ttft.unwrap_or_default()
    );
    bad.into_iter()
        .map(|d| {
            format!(
                "{name}: prompt {} clean {} text {:?}",
                d.prompt, d.clean, d.text
            )
        })
        .collect()
}
