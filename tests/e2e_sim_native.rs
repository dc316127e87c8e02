//! Issue 4 on the real engine: the discrete-event simulator, fitted to a profile of the native
//! engine taken by this test, predicts a short run of `tandem up` (one prefill and one decode
//! worker, the real SmolLM2, one compute thread each, 512 prompt tokens per step) under the `chat`
//! workload within 10%: TTFT p50, ITL p50 and request throughput, with the DES replaying the very
//! requests the run sent.
//!
//! The profile is reduced to what the run needs, so that the test stays near three minutes on two
//! cores (147 s on the EPYC host before the checks, 88 s of it the profile): prompts of 64 to 400
//! tokens (the workload's range is 50-400) alone and in pairs, decode batches of 1 to 6 (the
//! run's decode batch holds one to three sequences) at two contexts, three timed repetitions of
//! each prefill and ten of each decode shape, and `--served` with 8 prompts per case (the served
//! prefill's ratio to the engine's and the served decode steps' spread, which the DES applies). The answers are 16 tokens instead of the workload's 64, so that 24
//! requests at 0.5/s take under a minute.
//!
//! The served pair's speed is checked right before and right after the run, through the run's own
//! `tandem up` (`tandem profile --check --served-url`: 8 prompts on the idle pair time the
//! prefill, then answers decoded beside 8 more prompts time the decode steps, set against the
//! profile's served part, about 20 s each), and the DES works from the profile rescaled
//! to the mean of the two checks (`ProfileFile::rescaled`): what the test holds the simulator to is
//! the queueing, batching and step spread of the run, given the pair's speed while it ran. A shared
//! host (the Intel one of 2026-12-04) moves by tens of percent over minutes, and without checks
//! the profile taken a minute earlier was off by that much (5 failures in 7 runs, DES/measured
//! 0.74-1.41). Checks of one engine in its own process, used before, could not see the two workers
//! slowed together (a run beside a compile failed with both checks steady); checks through the
//! pair time the very processes the run uses. A run whose two checks differ by more than
//! [`STEADY`] is repeated, up to [`ATTEMPTS`] runs; if the host never holds still the test fails
//! saying so. Run it with the machine to itself all the same.
//!
//! TTFT p90 is printed, not asserted: of 24 requests it lies between the 21st and the 22nd, the
//! queueing of one or two requests, which moves by more than 10% from one run to the next of the
//! same requests on a shared machine (BENCHMARKS.md, "The simulator against the native engine",
//! has it over 40 requests).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{BIN, Up, model_path};
use tandem_sim::profile::{ProfileFile, Profiled, QUIET_SERVED_DECODE_LEVEL, SpeedRatio};

const RATE: &str = "0.5";
const REQUESTS: &str = "24";
const OSL: &str = "16";
/// A run counts when the host's speed before and after it differs by at most this much.
const STEADY: f64 = 0.10;
/// Runs tried before the test gives up on the host.
const ATTEMPTS: u32 = 4;

/// Runs `tandem <args>` to success; returns its stdout.
fn tandem(args: &[&str], paths: &[&Path]) -> Vec<u8> {
    let out = Command::new(BIN)
        .args(args)
        .args(paths)
        .output()
        .expect("running tandem");
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn number(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}

/// One run of the workload against `tandem up` (one prefill and one decode worker); its
/// requests' timings go to `bench`. Returns the served pair's speed against `profile` checked
/// right before and right after the run.
fn run(model: &Path, profile: &Path, bench: &Path) -> (SpeedRatio, SpeedRatio) {
    let up = Up::start(&[
        "--prefill",
        "1",
        "--decode",
        "1",
        "--worker-threads",
        "1",
        "--step-tokens",
        "512",
    ]);
    let before = speed(model, profile, &up.url);
    tandem(
        &[
            "bench",
            "--url",
            &up.url,
            "--model",
            &up.model,
            "--api",
            "completions",
            "--workload",
            "chat",
            "--osl",
            OSL,
            "--rate",
            RATE,
            "--arrival",
            "poisson",
            "--requests",
            REQUESTS,
            "--seed",
            "1",
            "--quiet",
            "--tokenizer",
        ],
        &[model, Path::new("--json"), bench],
    );
    let after = speed(model, profile, &up.url);
    drop(up);
    (before, after)
}

/// The profile the test simulates from, reduced to what the run needs (the module's notes).
fn take_profile(model: &Path, profile: &Path) {
    tandem(
        &[
            "profile",
            "--threads",
            "1",
            "--prompt-lens",
            "64,128,256,400",
            "--prefill-batches",
            "1,2",
            "--decode-batches",
            "1,2,3,4,5,6",
            "--contexts",
            "128,320",
            "--reps",
            "3",
            "--served",
            "--served-requests",
            "8",
            "--model",
        ],
        &[model, Path::new("--out"), profile],
    );
}

/// The served pair's speed now against `profile`'s served part: `tandem profile --check
/// --served-url` (8 prompts on the idle pair, then decode steps beside 8 more, about 20 s).
fn speed(model: &Path, profile: &Path, url: &str) -> SpeedRatio {
    let out = tandem(
        &[
            "profile",
            "--served-url",
            url,
            "--served-requests",
            "8",
            "--json",
            "--model",
        ],
        &[model, Path::new("--check"), profile],
    );
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn the_simulator_predicts_the_native_engine_within_ten_percent() {
    let model = model_path();
    let dir = std::env::temp_dir().join(format!("tandem-sim-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (profile, bench) = (dir.join("profile.json"), dir.join("bench.json"));
    let t0 = std::time::Instant::now();

    // A profile whose served part ran under a load its engine part did not (a compile beside
    // it) cannot be rescaled to the host's speed later: its served steps' ratio to the engine's
    // is the load's, not the served path's. Such a profile is taken again, once.
    let mut profiles = 0;
    loop {
        take_profile(&model, &profile);
        profiles += 1;
        let level = Profiled::from_file(&profile)
            .unwrap()
            .profiled_served_decode_level()
            .unwrap();
        if QUIET_SERVED_DECODE_LEVEL.contains(&level) {
            break;
        }
        assert!(
            profiles < 2,
            "the served decode steps took x{level:.3} the engine's in each of two profiles (a \
             quiet host gives 0.93-1.08): the machine is busy; run the test with it to itself"
        );
        eprintln!("profile {profiles}: served decode steps at x{level:.3} the engine's; again");
    }
    let profiled = t0.elapsed();

    // The host's speed, bracketing each run: a run counts when its two checks agree, and the DES
    // then works from the profile rescaled to the mean of the two.
    let mut attempt = 1;
    let ratio = loop {
        let (before, after) = run(&model, &profile, &bench);
        let moved = after.moved_from(before);
        eprintln!(
            "run {attempt}: the host took {:.3}x / {:.3}x the profile's prefill / decode time \
             before it and {:.3}x / {:.3}x after it (moved {:.1}%)",
            before.prefill,
            before.decode,
            after.prefill,
            after.decode,
            100.0 * moved
        );
        if moved <= STEADY {
            break before.mean(after);
        }
        assert!(
            attempt < ATTEMPTS,
            "the host's speed moved by more than {:.0}% across each of {ATTEMPTS} runs (last \
             {:.1}%): the test measures the simulator, not the neighbours; run it with the \
             machine to itself",
            100.0 * STEADY,
            100.0 * moved
        );
        attempt += 1;
    };
    let rescaled = dir.join("profile-now.json");
    let now = ProfileFile::read(&profile).unwrap().rescaled(ratio);
    std::fs::write(&rescaled, now.to_json()).unwrap();

    let simulated = tandem(
        &[
            "plan",
            "--model",
            "smollm2-135m",
            "--gpu",
            "h100",
            "--json",
            "--simulate",
            "prefill=1,decode=1,tp=1,step-tokens=512",
            "--profile",
        ],
        &[&rescaled, Path::new("--replay"), &bench],
    );
    let simulated: Value = serde_json::from_slice(&simulated).unwrap();
    let measured: Value = serde_json::from_slice(&std::fs::read(&bench).unwrap()).unwrap();
    let measured = &measured["runs"][0]["summary"];
    assert_eq!(measured["failed"], 0, "{measured}");

    let rows = [
        (
            "TTFT p50 ms",
            number(measured, &["ttft_ms", "p50"]),
            number(&simulated, &["ttft_ms", "p50"]),
            true,
        ),
        (
            "TTFT p90 ms",
            number(measured, &["ttft_ms", "p90"]),
            number(&simulated, &["ttft_ms", "p90"]),
            false,
        ),
        (
            "ITL p50 ms",
            number(measured, &["itl_ms", "p50"]),
            number(&simulated, &["itl_ms", "p50"]),
            true,
        ),
        (
            "requests/s",
            number(measured, &["request_throughput"]),
            number(&simulated, &["throughput_rps"]),
            true,
        ),
    ];
    eprintln!(
        "profile {:.0} s, whole test {:.0} s; the profile and the run are in {} until the test \
         passes",
        profiled.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    eprintln!("{:14}{:>10}{:>10}{:>8}", "", "measured", "DES", "ratio");
    for (name, m, s, _) in &rows {
        eprintln!("{name:14}{m:10.2}{s:10.2}{:8.3}", s / m);
    }
    for (name, m, s, checked) in rows {
        assert!(m > 0.0 && s > 0.0, "{name}: measured {m}, DES {s}");
        if checked {
            assert!(
                (s / m - 1.0).abs() <= 0.10,
                "{name}: measured {m:.2}, DES {s:.2} (ratio {:.3})",
                s / m
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
