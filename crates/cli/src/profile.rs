//! `tandem profile`: measures the native engine (prefill step time against prompt length and batch;
//! decode step time against batch and context) and writes the profile file that `tandem plan
//! --profile` fits its `profiled` performance model to.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tandem_engine::{Engine, Model, StepItem};
use tandem_sim::profile::{DecodeSample, PROFILE_FORMAT, PrefillSample, ProfileFile, Profiled};
use tandem_sim::profile::{QUIET_SERVED_DECODE_LEVEL, SpeedRatio};

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Model: a GGUF file or a safetensors checkpoint directory (default: the fetched SmolLM2).
    #[arg(long, env = "TANDEM_MODEL")]
    model: Option<PathBuf>,
    /// Where to write the profile (default `profile.json`; with `--check`, the checked profile
    /// rescaled to the host's speed now, written only when asked).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Check an existing profile against the host now instead of writing a new one: time the
    /// shapes given (a few are enough, e.g. `--prompt-lens 128,256 --prefill-batches 1
    /// --decode-batches 1,2 --contexts 256`), print how much slower (above 1) or faster the host
    /// runs prefill and decode than the profile predicts, and with `--out` write the profile with
    /// its times rescaled by those ratios. A host shared with neighbours changes speed by tens of
    /// percent over minutes; this tells whether a profile still holds without taking it again.
    /// The shapes are timed in `--reps` rounds (every prefill shape once and every decode shape
    /// its share of `--decode-reps` per round), and the ratios are medians over every step.
    #[arg(long, value_name = "PROFILE")]
    check: Option<PathBuf>,
    /// With `--check`: print the ratios as JSON (`{"prefill": .., "decode": ..}`).
    #[arg(long, requires = "check")]
    json: bool,
    /// With `--check`: an earlier check's JSON output (`--json`). This check and that one bracket
    /// a span (a benchmark run between them): print how far the host's speed moved across it, and
    /// with `--out` rescale the profile to the mean of the two, the host's speed over the span.
    #[arg(long, value_name = "CHECK_JSON", requires = "check")]
    since: Option<PathBuf>,
    /// With `--check`: check a running served pair (`tandem up`, its base URL) against the
    /// profile's served part instead of timing the engine here: `--served-requests` prompts with
    /// one-token answers on the idle pair (their times to first token give the prefill's speed),
    /// then as many back to back while another client has the decode worker decode long answers
    /// (their gaps give the decode steps' speed), set against the profile's served ones (about
    /// 20 s). A check of one engine cannot see the two workers slowed together (by each
    /// other or by the neighbours); this can. The profile must have been taken with `--served`.
    #[arg(long, value_name = "URL", requires = "check")]
    served_url: Option<String>,
    /// Prompt lengths of the prefill samples.
    #[arg(long, value_delimiter = ',', default_value = "16,64,128,256,512")]
    prompt_lens: Vec<usize>,
    /// Prompts per prefill step.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    prefill_batches: Vec<usize>,
    /// Sequences per decode step. Every size from 1 to 16 by default: the engine's kernels take
    /// rows in groups, so the step time is not a line in the batch, and the fitted model is a table
    /// over the sizes measured (interpolated between them).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16"
    )]
    decode_batches: Vec<usize>,
    /// Context length of each decoding sequence.
    #[arg(long, value_delimiter = ',', default_value = "64,256,512")]
    contexts: Vec<usize>,
    /// Timed repetitions per prefill shape; the median is kept.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timed repetitions per decode shape: the median is the table's, and every repetition is
    /// kept in the file for the spread of step times the simulator draws from.
    #[arg(long, default_value_t = 10)]
    decode_reps: usize,
    /// Also time prompts and decode steps through the served path: start `tandem up` (one prefill
    /// and one decode worker, `--threads` compute threads each) and send prompts of 64-400 tokens
    /// one at a time, back to back and on a clock, first with the decode worker idle, then while it
    /// decodes long answers. The simulator slows its prefill steps by the measured ratio to the
    /// engine alone and draws its decode steps from the served ones.
    #[arg(long, conflicts_with = "check")]
    served: bool,
    /// Prompts timed per case with `--served`.
    #[arg(long, default_value_t = 12)]
    served_requests: usize,
    /// Prompt tokens per prefill step of the served prefill worker (`tandem up --step-tokens`).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// KV memory of the decode worker being profiled, in MiB (the profile's KV capacity).
    #[arg(long, default_value_t = 1024)]
    kv_memory_mb: usize,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TANDEM_THREADS")]
    threads: Option<usize>,
}

/// The shapes to measure.
#[derive(Debug, Clone)]
pub struct Shapes {
    pub prompt_lens: Vec<usize>,
    pub prefill_batches: Vec<usize>,
    pub decode_batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub reps: usize,
    pub decode_reps: usize,
}

impl Shapes {
    /// A few shapes, about ten seconds with one compute thread on SmolLM2: enough to tell the
    /// host's speed against a profile (`--check`, and around the served part of `--served`).
    fn probe(max_context: usize) -> Shapes {
        Shapes {
            prompt_lens: [64, 128, 256]
                .into_iter()
                .filter(|&n| n <= max_context / 2)
                .collect(),
            prefill_batches: vec![1],
            decode_batches: vec![1, 2],
            contexts: vec![128.min(max_context / 4)],
            reps: 3,
            decode_reps: 12,
        }
    }
}

/// One untimed prompt and a few decode steps, so that the first timed shape does not pay for
/// what the process does once: the weights' pages coming in, the compute pool's threads starting,
/// the allocator growing. Without it the first prompt timed up to 1.5x its later repetitions.
fn warm_up(model: &Arc<Model>, prompt: &[u32]) -> anyhow::Result<()> {
    let bs = tandem_engine::kv::BLOCK_SIZE;
    let steps = 8;
    let mut engine = Engine::new(model.clone(), (prompt.len() + steps).div_ceil(bs) + 1);
    engine.add_sequence(0)?;
    engine.prefill(&[(0, prompt)], 512)?;
    for t in 0..steps as u32 {
        engine.step(&[StepItem {
            seq: 0,
            tokens: &[t],
            logits: true,
        }])?;
    }
    Ok(())
}

/// Measures `model` over `shapes`. Token ids are a fixed pseudo-random sequence: step time does
/// not depend on which tokens they are.
pub fn measure(
    model: &Arc<Model>,
    shapes: &Shapes,
) -> anyhow::Result<(Vec<PrefillSample>, Vec<DecodeSample>)> {
    timed(model, shapes, true)
}

/// [`measure`], with or without its warm-up.
fn timed(
    model: &Arc<Model>,
    shapes: &Shapes,
    warm: bool,
) -> anyhow::Result<(Vec<PrefillSample>, Vec<DecodeSample>)> {
    let vocab = model.config().vocab as u32;
    let tokens = |n: usize, salt: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) as u32) % vocab)
            .collect()
    };
    let bs = tandem_engine::kv::BLOCK_SIZE;
    if warm {
        warm_up(model, &tokens(256.min(model.config().max_context / 2), 99))?;
    }
    // Every shape's repetitions are spread over the whole measurement (each round times every
    // shape once), so that a host whose speed drifts while it is profiled (a shared machine's
    // neighbours) slows every shape alike instead of bending the fitted curve, and the median of
    // each shape drops the rounds a burst hit.
    let reps = shapes.reps.max(1);
    let mut cases = Vec::new();
    for &len in &shapes.prompt_lens {
        for &batch in &shapes.prefill_batches {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|b| tokens(len, b)).collect();
            cases.push((prompts, Vec::with_capacity(reps)));
        }
    }
    // One pool, large enough for the largest step, serves every shape in turn.
    let blocks = cases
        .iter()
        .map(|(p, _)| p.iter().map(|p| p.len().div_ceil(bs)).sum::<usize>())
        .max()
        .unwrap_or(0);
    let mut engine = Engine::new(model.clone(), blocks + 1);
    for rep in 0..reps {
        for (prompts, times) in &mut cases {
            let ids: Vec<u64> = (0..prompts.len() as u64)
                .map(|b| rep as u64 * 1000 + b)
                .collect();
            for &id in &ids {
                engine.add_sequence(id)?;
            }
            let items: Vec<StepItem<'_>> = ids
                .iter()
                .zip(prompts.iter())
                .map(|(&seq, p)| StepItem {
                    seq,
                    tokens: p,
                    logits: true,
                })
                .collect();
            let t0 = Instant::now();
            engine.step(&items)?;
            times.push(t0.elapsed().as_secs_f64());
            for &id in &ids {
                engine.release(id)?;
            }
        }
    }
    let prefill = cases
        .into_iter()
        .map(|(prompts, mut times)| PrefillSample {
            prompt_lens: prompts.iter().map(|p| p.len() as u32).collect(),
            cached_lens: Vec::new(),
            seconds: median(&mut times),
        })
        .collect();
    let max_batch = shapes.decode_batches.iter().copied().max().unwrap_or(1);
    let decode_reps = shapes.decode_reps.max(1);
    let mut decode = Vec::new();
    for &ctx in &shapes.contexts {
        // Room for the context plus every timed step of every batch.
        let steps = decode_reps * shapes.decode_batches.len();
        let mut engine = Engine::new(model.clone(), max_batch * (ctx + steps).div_ceil(bs) + 1);
        let prompts: Vec<Vec<u32>> = (0..max_batch).map(|b| tokens(ctx, b + 17)).collect();
        for (id, p) in prompts.iter().enumerate() {
            engine.add_sequence(id as u64)?;
            engine.prefill(&[(id as u64, p)], 512)?;
        }
        let n = shapes.decode_batches.len();
        let mut times = vec![Vec::with_capacity(decode_reps); n];
        let mut context = vec![0u64; n];
        for rep in 0..decode_reps {
            for (i, &batch) in shapes.decode_batches.iter().enumerate() {
                let next: Vec<[u32; 1]> =
                    (0..batch).map(|b| [((rep + b) as u32) % vocab]).collect();
                let items: Vec<StepItem<'_>> = next
                    .iter()
                    .enumerate()
                    .map(|(b, t)| StepItem {
                        seq: b as u64,
                        tokens: t,
                        logits: true,
                    })
                    .collect();
                context[i] = (0..batch as u64)
                    .map(|b| engine.seq_len(b).unwrap_or(0) as u64 + 1)
                    .sum();
                let t0 = Instant::now();
                engine.step(&items)?;
                times[i].push(t0.elapsed().as_secs_f64());
            }
        }
        for ((&batch, mut times), context_tokens) in
            shapes.decode_batches.iter().zip(times).zip(context)
        {
            let all = times.clone();
            decode.push(DecodeSample {
                batch: batch as u32,
                context_tokens,
                seconds: median(&mut times),
                times: all,
            });
        }
    }
    Ok((prefill, decode))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn hardware() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} compute threads", rayon::current_num_threads())
}

fn weight_bytes(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    crate::setup::compute_threads(args.threads)?;
    let (path, loaded) = crate::setup::load_model(args.model.as_ref())?;
    let model = Arc::new(loaded.model);
    let shapes = Shapes {
        prompt_lens: args.prompt_lens,
        prefill_batches: args.prefill_batches,
        decode_batches: args.decode_batches,
        contexts: args.contexts,
        reps: args.reps,
        decode_reps: args.decode_reps,
    };
    if let Some(old) = &args.check {
        let name = crate::roles::model_name(&path);
        let since = match &args.since {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the earlier check {}", p.display()))?;
                let earlier: SpeedRatio = serde_json::from_str(text.trim()).with_context(|| {
                    format!(
                        "{} is not a check's JSON output ({{\"prefill\": .., \"decode\": ..}})",
                        p.display()
                    )
                })?;
                Some(earlier)
            }
            None => None,
        };
        let to = CheckOutput {
            out: args.out.as_deref(),
            json: args.json,
            since,
        };
        let how = match &args.served_url {
            Some(url) => Measure::Served {
                url,
                model: &path,
                requests: args.served_requests,
            },
            None => Measure::Engine {
                model: &model,
                shapes: &shapes,
            },
        };
        return check(how, &name, old, to).map(drop);
    }
    let out = args.out.unwrap_or_else(|| "profile.json".into());
    eprintln!("profiling {} ...", path.display());
    let (prefill, decode) = measure(&model, &shapes)?;
    let geom = Engine::geometry_for(&model, 1);
    let mut profile = ProfileFile {
        format: PROFILE_FORMAT,
        model: crate::roles::model_name(&path),
        hardware: hardware(),
        engine: "native".into(),
        tensor_parallel: 1,
        kv_bytes_per_token: geom.bytes_per_token() as u64,
        kv_blocks: ((args.kv_memory_mb << 20) / (geom.layer_bytes(1) * geom.layers).max(1)) as u64,
        weight_bytes: weight_bytes(&path),
        prefill,
        decode,
        served: Vec::new(),
        served_decode: Vec::new(),
        rescaled: Vec::new(),
        served_host: None,
    };
    if args.served {
        let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
        // The served part comes minutes after the engine part; the host's speed just before and
        // just after it, against the engine part's, takes a change of the host's speed out of
        // the served path's measured ratios to the engine.
        let engine = Profiled::from_profile(profile.clone())?;
        let probe = Shapes::probe(model.config().max_context);
        let speed = || -> anyhow::Result<SpeedRatio> {
            let (p, d) = measure_in_rounds(&model, &probe)?;
            Ok(engine.speed_ratio(&p, &d)?)
        };
        let before = speed()?;
        eprintln!("timing prompts through a served pair ({threads} compute threads each) ...");
        let (mut served, mut served_decode) =
            crate::profile_served::measure(&path, threads, args.step_tokens, args.served_requests)?;
        let after = speed()?;
        let host = before.mean(after);
        eprintln!(
            "the host's speed around the served part, against the engine part's: prefill {:.3}x \
             before, {:.3}x after; decode {:.3}x, {:.3}x (the served times are divided by the \
             means)",
            before.prefill, after.prefill, before.decode, after.decode
        );
        for s in &mut served {
            s.seconds /= host.prefill;
        }
        for a in &mut served_decode {
            for g in &mut a.gaps {
                *g /= host.decode;
            }
        }
        profile.served = served;
        profile.served_decode = served_decode;
        profile.served_host = Some(host);
    }
    let fitted = Profiled::from_profile(profile.clone())?;
    std::fs::write(&out, profile.to_json())
        .with_context(|| format!("writing {}", out.display()))?;
    let (p, line, t) = (fitted.prefill_fit, fitted.decode_fit, &fitted.decode_table);
    println!(
        "wrote {} ({} prefill, {} decode samples)\nprefill fit: mean error {:.1}%, max {:.1}%\n\
         decode fit (table over {} batch sizes): mean error {:.1}%, max {:.1}%; \
         a line in the batch would err {:.1}%, max {:.1}%",
        out.display(),
        p.samples,
        t.samples,
        100.0 * p.mean_rel_err,
        100.0 * p.max_rel_err,
        t.points.len(),
        100.0 * t.mean_rel_err,
        100.0 * t.max_rel_err,
        100.0 * line.mean_rel_err,
        100.0 * line.max_rel_err
    );
    let s = &fitted.decode_spread;
    if !s.is_empty() {
        println!(
            "decode step factors ({}): {} steps, p10 {:.3}, median {:.3}, p90 {:.3}",
            s.source(),
            s.factors(),
            s.pooled_quantile(0.1),
            s.pooled_quantile(0.5),
            s.pooled_quantile(0.9)
        );
    }
    let sp = &fitted.served_prefill;
    if sp.samples() > 0 {
        println!("served prefill against the engine alone: {}", sp.describe());
    }
    if let Ok(level) = fitted.profiled_served_decode_level() {
        println!("served decode steps against the engine alone: x{level:.3} (median)");
        if !QUIET_SERVED_DECODE_LEVEL.contains(&level) {
            eprintln!(
                "warning: a quiet host gives x0.93-1.08 here; the served part ran under a load \
                 the engine part did not (or the other way round): take the profile again with \
                 the machine to itself"
            );
        }
    }
    Ok(())
}

/// Times `shapes` for a check of the host's speed: `shapes.reps` rounds, each timing every prefill
/// shape once and every decode shape its share of `decode_reps`, so that a burst from a
/// neighbour lasting a few seconds lands in one round of prefill or decode, not in all of one of
/// them, and the pooled median of [`Profiled::speed_ratio`] passes it by.
fn measure_in_rounds(
    model: &Arc<Model>,
    shapes: &Shapes,
) -> anyhow::Result<(Vec<PrefillSample>, Vec<DecodeSample>)> {
    let rounds = shapes.reps.max(1);
    let round = Shapes {
        reps: 1,
        decode_reps: shapes.decode_reps.div_ceil(rounds).max(1),
        ..shapes.clone()
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (p, d) = timed(model, &round, r == 0)?;
        prefill.extend(p);
        decode.extend(d);
    }
    Ok((prefill, decode))
}

/// What `tandem profile --check` does with its ratios.
struct CheckOutput<'a> {
    /// Where to write the rescaled profile.
    out: Option<&'a Path>,
    /// Print the ratios as JSON.
    json: bool,
    /// An earlier check: rescale to the mean of it and this one.
    since: Option<SpeedRatio>,
}

/// What a check times.
enum Measure<'a> {
    /// The engine here, on `shapes`.
    Engine {
        model: &'a Arc<Model>,
        shapes: &'a Shapes,
    },
    /// A running served pair at `url` serving `model` (whose tokenizer sizes the prompts).
    Served {
        url: &'a str,
        model: &'a Path,
        requests: usize,
    },
}

/// `tandem profile --check`: times the engine's `shapes` (or a served pair) now and compares them
/// with the profile at `old`.
/// Returns the host's speed now against the profile (what `--json` prints).
fn check(
    how: Measure<'_>,
    name: &str,
    old: &Path,
    to: CheckOutput<'_>,
) -> anyhow::Result<SpeedRatio> {
    let CheckOutput { out, json, since } = to;
    let profile = ProfileFile::read(old)?;
    anyhow::ensure!(
        profile.model == name,
        "{} is a profile of {}, not of {name}",
        old.display(),
        profile.model
    );
    let fitted = Profiled::from_profile(profile.clone())?;
    eprintln!("checking {} against the host now ...", old.display());
    let (ratio, prefills, steps) = match how {
        Measure::Engine { model, shapes } => {
            let (prefill, decode) = measure_in_rounds(model, shapes)?;
            let steps = decode.iter().map(|d| d.times.len()).sum::<usize>();
            (fitted.speed_ratio(&prefill, &decode)?, prefill.len(), steps)
        }
        Measure::Served {
            url,
            model,
            requests,
        } => {
            let (prompts, answers) = crate::profile_served::check(url, name, model, requests)?;
            let steps = answers.iter().map(|a| a.gaps.len()).sum::<usize>();
            let ratio = fitted.served_speed_ratio(&prompts, &answers)?;
            (ratio, prompts.len(), steps)
        }
    };
    if json {
        println!("{}", serde_json::to_string(&ratio)?);
    } else {
        println!(
            "the host now takes {:.3}x the profile's time for prefill ({prefills} prompts or \
             steps), {:.3}x for decode ({steps} steps)",
            ratio.prefill, ratio.decode,
        );
    }
    let by = match since {
        Some(earlier) => {
            eprintln!(
                "since the earlier check ({:.3}x prefill, {:.3}x decode) the host's speed moved \
                 {:.1}%",
                earlier.prefill,
                earlier.decode,
                100.0 * ratio.moved_from(earlier)
            );
            earlier.mean(ratio)
        }
        None => ratio,
    };
    if let Some(out) = out {
        std::fs::write(out, profile.rescaled(by).to_json())
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "wrote {}, rescaled by {:.3}x prefill, {:.3}x decode ({})",
            out.display(),
            by.prefill,
            by.decode,
            if since.is_some() {
                "the mean of the two checks"
            } else {
                "the host's speed now"
            }
        );
    }
    Ok(ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_of_the_tiny_model_has_every_shape_and_fits() {
        let model = Arc::new(tandem_engine::tiny::tiny_model(3, true).unwrap().0);
        let shapes = Shapes {
            prompt_lens: vec![8, 32, 64],
            prefill_batches: vec![1, 3],
            decode_batches: vec![1, 2, 5],
            contexts: vec![16, 40],
            reps: 2,
            decode_reps: 3,
        };
        let (prefill, decode) = measure(&model, &shapes).unwrap();
        let lens: Vec<Vec<u32>> = prefill.iter().map(|s| s.prompt_lens.clone()).collect();
        assert_eq!(
            lens,
            vec![
                vec![8],
                vec![8; 3],
                vec![32],
                vec![32; 3],
                vec![64],
                vec![64; 3]
            ]
        );
        // Each decode sample attends to its batch's contexts (plus the step's own token), as of its
        // last of three repetitions; each round steps batches of 1, 2 and 5 in turn, so sequence 0
        // grows by three tokens a round, sequence 1 by two and the others by one.
        let shape: Vec<(u32, u64)> = decode.iter().map(|s| (s.batch, s.context_tokens)).collect();
        assert_eq!(shape.len(), 6);
        assert_eq!(shape[0], (1, 16 + 2 * 3 + 1));
        assert_eq!(
            shape[2],
            (5, (16 + 8 + 1) + (16 + 5 + 1) + 3 * (16 + 2 + 1))
        );
        assert_eq!(shape[3], (1, 40 + 2 * 3 + 1));
        assert!(prefill.iter().all(|s| s.seconds > 0.0));
        assert!(decode.iter().all(|s| s.seconds > 0.0 && s.times.len() == 3));
        let profile = ProfileFile {
            format: PROFILE_FORMAT,
            model: "tiny".into(),
            hardware: hardware(),
            engine: "native".into(),
            tensor_parallel: 1,
            kv_bytes_per_token: 1024,
            kv_blocks: 64,
            weight_bytes: 1,
            prefill,
            decode,
            served: Vec::new(),
            served_decode: Vec::new(),
            rescaled: Vec::new(),
            served_host: None,
        };
        let dir = std::env::temp_dir().join(format!("tandem-profile-{}.json", std::process::id()));
        std::fs::write(&dir, profile.to_json()).unwrap();
        let back = ProfileFile::read(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(back, profile);
        assert!(Profiled::from_profile(back).is_ok());
    }

    #[test]
    fn a_check_times_its_rounds_rescales_the_profile_and_refuses_another_models() {
        let model = Arc::new(tandem_engine::tiny::tiny_model(3, true).unwrap().0);
        let shapes = Shapes {
            prompt_lens: vec![8, 32, 64],
            prefill_batches: vec![1],
            decode_batches: vec![1, 2, 3],
            contexts: vec![16],
            reps: 2,
            decode_reps: 4,
        };
        let (prefill, decode) = measure(&model, &shapes).unwrap();
        let profile = ProfileFile {
            format: PROFILE_FORMAT,
            model: "tiny".into(),
            hardware: hardware(),
            engine: "native".into(),
            tensor_parallel: 1,
            kv_bytes_per_token: 1024,
            kv_blocks: 64,
            weight_bytes: 1,
            prefill,
            decode,
            served: Vec::new(),
            served_decode: Vec::new(),
            rescaled: Vec::new(),
            served_host: None,
        };
        let dir = std::env::temp_dir().join(format!("tandem-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (old, new) = (dir.join("old.json"), dir.join("new.json"));
        std::fs::write(&old, profile.to_json()).unwrap();

        // Three rounds: every prefill shape once a round, every decode shape two of its four
        // steps a round (rounded up), each round from fresh sequences.
        let probe = Shapes {
            decode_batches: vec![1, 3],
            reps: 3,
            ..shapes.clone()
        };
        let (p, d) = measure_in_rounds(&model, &probe).unwrap();
        assert_eq!(p.len(), 9);
        let runs: Vec<(u32, usize)> = d.iter().map(|s| (s.batch, s.times.len())).collect();
        assert_eq!(runs, [(1, 2), (3, 2)].repeat(3));
        let contexts: Vec<u64> = d.iter().map(|s| s.context_tokens).collect();
        assert_eq!(
            contexts,
            [16 + 2 + 1, (16 + 3 + 1) + 2 * (16 + 1 + 1)].repeat(3)
        );

        let to = |since| CheckOutput {
            out: Some(&new),
            json: true,
            since,
        };
        let here = || Measure::Engine {
            model: &model,
            shapes: &probe,
        };
        let e = check(here(), "other", &old, to(None)).unwrap_err();
        assert!(
            e.to_string().contains("is a profile of tiny, not of other"),
            "{e}"
        );
        assert!(!new.exists());
        // With an earlier check, the profile is rescaled to the mean of the two.
        let earlier = SpeedRatio {
            prefill: 3.0,
            decode: 0.5,
        };
        // The host's speed varies (CI shares its cores), so the test checks the relation, not
        // the speed: the profile is rescaled by the mean of the earlier ratios and this check's.
        let now = check(here(), "tiny", &old, to(Some(earlier))).unwrap();
        assert!(now.prefill > 0.0 && now.decode > 0.0, "{now:?}");
        let [m] = ProfileFile::read(&new).unwrap().rescaled[..] else {
            panic!("one rescaling")
        };
        assert!(
            (m.prefill - (3.0 + now.prefill) / 2.0).abs() < 1e-9,
            "{m:?} {now:?}"
        );
        assert!(
            (m.decode - (0.5 + now.decode) / 2.0).abs() < 1e-9,
            "{m:?} {now:?}"
        );

        let now = check(here(), "tiny", &old, to(None)).unwrap();
        let back = ProfileFile::read(&new).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let [r] = back.rescaled[..] else {
            panic!("{:?}", back.rescaled)
        };
        // (Through JSON: equal to the last bit or so.)
        let same = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-12;
        assert!(
            same(r.prefill, now.prefill) && same(r.decode, now.decode),
            "{r:?} {now:?}"
        );
        for (x, y) in back.prefill.iter().zip(&profile.prefill) {
            assert!((x.seconds / (y.seconds * r.prefill) - 1.0).abs() < 1e-9);
        }
        for (x, y) in back.decode.iter().zip(&profile.decode) {
            assert!((x.times[3] / (y.times[3] * r.decode) - 1.0).abs() < 1e-9);
        }
    }
}
