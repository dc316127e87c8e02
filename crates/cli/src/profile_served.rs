//! `tandem profile --served`: prompts timed through the served path, against which the simulator
//! sets the engine-alone prefill (`tandem_sim::profile::serving`).
//!
//! Starts `tandem up` (one prefill and one decode worker, as `scripts/validate-native.sh` runs it)
//! and, with `tandem bench`, sends prompts of 64-400 tokens one at a time with one-token answers
//! (the prefill worker still pushes the prompt's KV to the decode worker and waits for the
//! transfer before it answers), each set once back to back and once on a clock (the prefill worker
//! idle between prompts): first with nothing else running, then while a second client has the
//! decode worker decode 256-token answers, one after the other. Each prompt's time to first token
//! is kept, with the prompt length the server counted and its case, and so is every gap between
//! the second client's tokens: the served decode step at batch 1, beside a prefill worker that
//! computes half of the time or more.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tandem_sim::profile::{ServedAnswer, ServedSample};

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Times `requests` prompts with the decode worker idle and as many beside a decoding one; returns
/// them and the decoding client's inter-token gaps, per answer.
pub fn measure(
    model: &Path,
    threads: usize,
    step_tokens: usize,
    requests: usize,
) -> anyhow::Result<(Vec<ServedSample>, Vec<ServedAnswer>)> {
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let dir = std::env::temp_dir().join(format!("tandem-profile-served-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut up = Command::new(&exe)
        .args([
            "up",
            "--port",
            "0",
            "--json",
            "--prefill",
            "1",
            "--decode",
            "1",
        ])
        .arg("--model")
        .arg(model)
        .args(["--worker-threads", &threads.to_string()])
        .args(["--step-tokens", &step_tokens.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tandem up")?;
    let stdout = up.stdout.take();
    let up = Stop(up);
    let mut line = String::new();
    if let Some(out) = stdout {
        BufReader::new(out)
            .read_line(&mut line)
            .context("reading tandem up's address")?;
    }
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("tandem up did not start (it printed {line:?})"))?;
    let (Some(url), Some(name)) = (v["url"].as_str(), v["model"].as_str()) else {
        bail!("tandem up printed no url and model: {line:?}");
    };
    let server = Server {
        exe: &exe,
        url,
        name,
        model,
    };
    let bench = |isl: &str, osl: &str, n: usize, seed: &str, load: &[&str], json: &Path| {
        server.bench(isl, osl, n, seed, load, json)
    };
    let prompts = PROMPTS;
    let back_to_back: &[&str] = &["--concurrency", "1"];
    let (idle_b2b, idle_clock) = (dir.join("idle-b2b.json"), dir.join("idle-clock.json"));
    run(
        "decode worker idle",
        &mut bench(prompts, "1", requests, "11", back_to_back, &idle_b2b),
    )?;
    run(
        "decode worker idle, on a clock",
        &mut bench(prompts, "1", requests, "12", ON_A_CLOCK, &idle_clock),
    )?;
    // A second client keeps the decode worker decoding 256-token answers (about 4.3 s each, 256
    // steps) while both sets of prompts go through (about 9 s back to back, 19 s on the clock, for
    // 12); its own 16-token prompts take the prefill worker for a few tens of milliseconds between
    // answers. It sends enough answers to outlast the prompts, and its steps are kept too.
    let decoding = dir.join("decoding.json");
    let answers = (requests * 3).div_ceil(4).max(2) + 1;
    let mut background = bench("16", "256", answers, "13", back_to_back, &decoding)
        .spawn()
        .context("starting the decoding client")?;
    std::thread::sleep(Duration::from_millis(1000));
    let (dec_b2b, dec_clock) = (dir.join("dec-b2b.json"), dir.join("dec-clock.json"));
    let fg = run(
        "beside a decoding answer",
        &mut bench(prompts, "1", requests, "14", back_to_back, &dec_b2b),
    )
    .and_then(|()| {
        run(
            "beside a decoding answer, on a clock",
            &mut bench(prompts, "1", requests, "15", ON_A_CLOCK, &dec_clock),
        )
    });
    let bg = background
        .wait()
        .context("waiting for the decoding client")?;
    drop(up);
    fg?;
    if !bg.success() {
        bail!("the decoding client failed: {bg}");
    }
    let mut out = samples(&idle_b2b, false, false)?;
    out.extend(samples(&idle_clock, false, true)?);
    out.extend(samples(&dec_b2b, true, false)?);
    out.extend(samples(&dec_clock, true, true)?);
    let gaps = gaps(&decoding)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((out, gaps))
}

/// The prompt lengths the served part times.
const PROMPTS: &str = "uniform:64-400";

/// Runs one `tandem bench` (`what` it times) to success.
fn run(what: &str, c: &mut Command) -> anyhow::Result<()> {
    let status = c.status().context("running tandem bench")?;
    if !status.success() {
        bail!("tandem bench ({what}) failed: {status}");
    }
    Ok(())
}

/// One prompt every 1.6 s, the prefill worker idle between them: a 400-token prompt takes about
/// 1.2 s, the mean one 0.7 s.
const ON_A_CLOCK: &[&str] = &["--rate", "0.625", "--arrival", "constant"];

/// A running server that `tandem bench` (this binary) sends requests to.
struct Server<'a> {
    exe: &'a Path,
    url: &'a str,
    name: &'a str,
    /// The model file, whose tokenizer sizes the prompts.
    model: &'a Path,
}

impl Server<'_> {
    /// `tandem bench` for `n` requests of `isl` prompt and `osl` answer tokens; `load` is
    /// concurrency 1 (each request sent as the previous ends) or a clock rate.
    fn bench(
        &self,
        isl: &str,
        osl: &str,
        n: usize,
        seed: &str,
        load: &[&str],
        json: &Path,
    ) -> Command {
        let mut c = Command::new(self.exe);
        c.args([
            "bench",
            "--url",
            self.url,
            "--model",
            self.name,
            "--api",
            "completions",
        ])
        .args(["--isl", isl, "--osl", osl])
        .args(load)
        .args(["--requests", &n.to_string(), "--seed", seed, "--quiet"])
        .arg("--tokenizer")
        .arg(self.model)
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    }
}

/// A check of a running served pair against a profile's served part (`tandem profile --check
/// --served-url`), measured the way the profile's part was. First `requests` prompts of the served
/// part's lengths go through on the profile's clock with one-token answers and nothing else
/// running (the case "idle pair, prefill worker idle before the prompt"): these time the prefill,
/// as most of a light run's prompts meet an idle pair. Prompts beside a decoding worker are not
/// used for it: how much the decode worker slows the prefill moves from one minute to the next
/// (10% and more), and a check on them rescaled every prompt by that. Then a client keeps the
/// decode worker decoding 256-token answers one after the other while as many prompts go through
/// back to back; the answers' gaps are decode steps beside a working prefill worker, as the
/// profile's are (a quiet pair decodes about a tenth faster, so answers alone would read a faster
/// host). The same requests every time (fixed seeds), so that two checks around a run compare
/// like with like. About 20 s on SmolLM2.
pub fn check(
    url: &str,
    name: &str,
    model: &Path,
    requests: usize,
) -> anyhow::Result<(Vec<ServedSample>, Vec<ServedAnswer>)> {
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let dir = std::env::temp_dir().join(format!(
        "tandem-served-check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let server = Server {
        exe: &exe,
        url,
        name,
        model,
    };
    let b2b: &[&str] = &["--concurrency", "1"];
    let (idle, prompts, answers) = (
        dir.join("idle.json"),
        dir.join("prompts.json"),
        dir.join("answers.json"),
    );
    let n = requests.max(1);
    run(
        "prompts on an idle pair",
        &mut server.bench(PROMPTS, "1", n, "20", ON_A_CLOCK, &idle),
    )?;
    // Enough answers to outlast the prompts (a prompt takes about half a second, an answer about
    // two and a half).
    let mut background = server
        .bench("16", "256", n.div_ceil(4) + 1, "22", b2b, &answers)
        .spawn()
        .context("starting the decoding client")?;
    std::thread::sleep(Duration::from_millis(1000));
    let fg = server
        .bench(PROMPTS, "1", n, "21", b2b, &prompts)
        .status()
        .context("running tandem bench");
    let bg = background
        .wait()
        .context("waiting for the decoding client")?;
    let fg = fg?;
    if !fg.success() || !bg.success() {
        bail!("tandem bench against {url} failed: prompts {fg}, answers {bg}");
    }
    let out = (samples(&idle, false, true)?, gaps(&answers)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    match v["runs"][0]["records"].take() {
        Value::Array(a) => Ok(a),
        _ => bail!("{} has no records", path.display()),
    }
}

/// Each succeeded answer's prompt tokens and gaps between its tokens after the second (the first
/// gap, which includes the KV's import, left out).
fn gaps(path: &Path) -> anyhow::Result<Vec<ServedAnswer>> {
    Ok(records(path)?
        .iter()
        .filter(|r| r["error"].is_null())
        .filter_map(|r| {
            let t: Vec<f64> = r["chunk_s"]
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            let prompt_tokens = r["usage"]["prompt_tokens"]
                .as_u64()
                .or_else(|| r["input_len"].as_u64())?;
            Some(ServedAnswer {
                prompt_tokens: u32::try_from(prompt_tokens).ok()?,
                gaps: t.windows(2).skip(1).map(|w| w[1] - w[0]).collect(),
            })
        })
        .filter(|a| !a.gaps.is_empty())
        .collect())
}

/// Each succeeded request's prompt tokens and time to first token, from a bench report.
fn samples(
    path: &Path,
    beside_decode: bool,
    after_idle: bool,
) -> anyhow::Result<Vec<ServedSample>> {
    Ok(records(path)?
        .iter()
        .filter(|r| r["error"].is_null())
        .filter_map(|r| {
            let send = r["send_s"].as_f64()?;
            let first = r["first_token_s"].as_f64()?;
            let tokens = r["usage"]["prompt_tokens"]
                .as_u64()
                .or_else(|| r["input_len"].as_u64())?;
            Some(ServedSample {
                prompt_tokens: u32::try_from(tokens).ok()?,
                seconds: first - send,
                beside_decode,
                after_idle,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_come_from_succeeded_records() {
        let dir = std::env::temp_dir().join(format!("tandem-served-{}.json", std::process::id()));
        std::fs::write(
            &dir,
            r#"{"runs":[{"summary":{},"records":[
                {"send_s":1.0,"first_token_s":1.5,"input_len":90,"usage":{"prompt_tokens":100},"error":null},
                {"send_s":2.0,"first_token_s":null,"input_len":90,"usage":null,"error":{"class":"timeout"}},
                {"send_s":3.0,"first_token_s":3.25,"input_len":64,"usage":null,"error":null}
            ]}]}"#,
        )
        .unwrap();
        let s = samples(&dir, true, false).unwrap();
        let g = gaps(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(g.is_empty(), "{g:?}");
        let got: Vec<(u32, f64, bool)> = s
            .iter()
            .map(|x| (x.prompt_tokens, x.seconds, x.beside_decode))
            .collect();
        assert_eq!(got, vec![(100, 0.5, true), (64, 0.25, true)]);
        assert!(s.iter().all(|x| !x.after_idle));
        assert!(samples(Path::new("/nonexistent/x.json"), false, true).is_err());
    }

    #[test]
    fn gaps_skip_the_first_one() {
        let dir = std::env::temp_dir().join(format!("tandem-gaps-{}.json", std::process::id()));
        std::fs::write(
            &dir,
            r#"{"runs":[{"records":[
                {"chunk_s":[1.0,1.5,1.75,2.0],"input_len":16,"usage":{"prompt_tokens":17},"error":null},
                {"chunk_s":[1.0,1.5],"input_len":16,"error":null},
                {"chunk_s":[1.0,1.5,1.6],"input_len":16,"error":{"class":"timeout"}}
            ]}]}"#,
        )
        .unwrap();
        let g = gaps(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(
            g,
            vec![ServedAnswer {
                prompt_tokens: 17,
                gaps: vec![0.25, 0.25]
            }]
        );
    }
}
