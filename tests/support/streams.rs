//! Streams that must survive what happens to their decode worker: four of 200 tokens (greedy and
//! seeded), run undisturbed, then again while a signal hits the worker running the most of them.
#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use serde_json::{Value, json};

use super::{info, stream};

/// Four streams of 200 tokens that ignore EOS: two greedy, two sampled at temperature 0.8 with
/// a seed.
pub fn four_streams(model: &str) -> Vec<Value> {
    (0..4)
        .map(|i| {
            let mut b = json!({"model": model, "max_tokens": 200, "ignore_eos": true,
                "prompt": format!("Story {i}: once upon a time"), "stream": true,
                "stream_options": {"include_usage": true}, "temperature": 0});
            if i >= 2 {
                b["temperature"] = json!(0.8);
                b["seed"] = json!(1000 + i);
            }
            b
        })
        .collect()
}

/// Runs the bodies as concurrent streams; each one's text, tokens counted, and whether it ended
/// cleanly (status 200, `[DONE]`, no error event).
pub async fn run_streams(url: &str, bodies: &[Value]) -> Vec<(String, u64, bool)> {
    let tasks: Vec<_> = bodies
        .iter()
        .map(|b| {
            let (url, b) = (url.to_owned(), b.clone());
            tokio::spawn(async move { stream(&url, "/v1/completions", &b, None).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let s = t.await.unwrap();
        let errors = s.events.iter().any(|e| e.get("error").is_some());
        let used = s
            .events
            .iter()
            .rev()
            .find_map(|e| e["usage"]["completion_tokens"].as_u64())
            .unwrap_or(0);
        out.push((s.text(), used, s.status == 200 && s.done && !errors));
    }
    out
}

/// Whether process `pid` is gone (or a zombie its parent has yet to reap).
pub fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// The decode worker a signal hit.
pub struct Victim {
    pub pid: u32,
    /// Ends with the time from the signal to the process's exit.
    pub exit: tokio::task::JoinHandle<Duration>,
}

impl Victim {
    /// The time from the signal to the worker's exit, which must come within a minute.
    pub async fn exited(self) -> Duration {
        tokio::time::timeout(Duration::from_secs(60), self.exit)
            .await
            .expect("the drained worker never exited")
            .unwrap()
    }
}

/// Runs four streams undisturbed, then again while `signal` hits the one of `decodes` (gRPC
/// address, pid) running the most of them: every stream must end cleanly with its 200 tokens and
/// the undisturbed text.
pub async fn streams_survive(url: &str, decodes: &[(String, u32)], signal: &str) -> Victim {
    streams_survive_with(url, decodes, signal, |_| {}).await
}

/// As [`streams_survive`], calling `before(victim's address)` just before the signal.
pub async fn streams_survive_with(
    url: &str,
    decodes: &[(String, u32)],
    signal: &str,
    before: impl FnOnce(&str),
) -> Victim {
    let model = super::model_name(url).await;
    let bodies = four_streams(&model);
    let undisturbed = run_streams(url, &bodies).await;
    for (text, used, clean) in &undisturbed {
        assert!(*clean && *used == 200, "{used} {text:?}");
    }
    let url = url.to_owned();
    let disturbed = tokio::spawn({
        let bodies = bodies.clone();
        async move { run_streams(&url, &bodies).await }
    });
    // Once they have produced some tokens.
    let mut victim = None;
    for _ in 0..400 {
        let mut best = (0, 0, "");
        for (addr, pid) in decodes {
            let running = info(addr).await.load.unwrap().running_seqs;
            if running > best.0 {
                best = (running, *pid, addr.as_str());
            }
        }
        if best.0 > 0 {
            victim = Some((best.1, best.2));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (pid, addr) = victim.expect("no decode worker ever ran a stream");
    tokio::time::sleep(Duration::from_millis(300)).await;
    before(addr);
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    let signalled = std::time::Instant::now();
    let exit = tokio::spawn(async move {
        while !exited(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signalled.elapsed()
    });
    // Well before the 600 s decode deadline: a stopped worker is failed by the watchdog's gap.
    let disturbed = tokio::time::timeout(Duration::from_secs(120), disturbed)
        .await
        .expect("the streams hung")
        .unwrap();
    for (i, ((text, used, clean), (want, _, _))) in disturbed.iter().zip(&undisturbed).enumerate() {
        assert!(*clean, "stream {i} did not end cleanly: {text:?}");
        assert_eq!(*used, 200, "stream {i}");
        assert_eq!(text, want, "stream {i}");
    }
    Victim { pid, exit }
}
