//! The latency objectives that SLO attainment and goodput are measured against, from
//! `--slo-ttft`/`--slo-itl` and vLLM's spelling `--goodput ttft:MS tpot:MS e2el:MS`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::BenchError;
use crate::summary::Slo;

/// Which latency a `--goodput` objective bounds (vLLM's keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoodputKey {
    /// Time to first token.
    Ttft,
    /// Time per output token after the first: what `--slo-itl` bounds.
    Tpot,
    /// End-to-end latency.
    E2el,
}

impl GoodputKey {
    fn name(self) -> &'static str {
        match self {
            Self::Ttft => "ttft",
            Self::Tpot => "tpot",
            Self::E2el => "e2el",
        }
    }
}

/// One `KEY:MILLISECONDS` of `--goodput`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoodputObjective {
    pub key: GoodputKey,
    pub ms: f64,
}

impl fmt::Display for GoodputObjective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key.name(), self.ms)
    }
}

impl FromStr for GoodputObjective {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected KEY:MILLISECONDS, e.g. ttft:2000"))?;
        let key = match key.trim() {
            "ttft" => GoodputKey::Ttft,
            "tpot" => GoodputKey::Tpot,
            "e2el" => GoodputKey::E2el,
            other => {
                return Err(format!(
                    "`{s}`: unknown objective `{other}` (the keys are ttft, tpot and e2el)"
                ));
            }
        };
        let ms: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: `{value}` is not a number of milliseconds"))?;
        if !(ms.is_finite() && ms > 0.0) {
            return Err(format!(
                "`{s}`: an objective must be a positive number of milliseconds"
            ));
        }
        Ok(Self { key, ms })
    }
}

/// Puts one objective into `slot`, which may hold one already: the same bound given twice is
/// fine, two different bounds are an error.
fn merge(slot: &mut Option<(f64, String)>, s: f64, from: String) -> Result<(), BenchError> {
    match slot {
        // The flags' own precision: `2s` and `2000` are equal, `2s` and `2000.5` are not.
        Some((old, old_from)) if (*old - s).abs() > 1e-9 => Err(BenchError::InvalidArgs(format!(
            "{from} disagrees with {old_from}: give each objective once"
        ))),
        Some(_) => Ok(()),
        None => {
            *slot = Some((s, from));
            Ok(())
        }
    }
}

/// The objectives from `--slo-ttft`, `--slo-itl` and `--goodput` together. They are the same
/// objectives under two spellings (`tpot` is what `--slo-itl` bounds): each may be given by
/// either or by both when they agree.
pub fn objectives(
    slo_ttft: Option<Duration>,
    slo_itl: Option<Duration>,
    goodput: &[GoodputObjective],
) -> Result<Slo, BenchError> {
    let (mut ttft, mut tpot, mut e2e) = (None, None, None);
    if let Some(d) = slo_ttft {
        merge(&mut ttft, d.as_secs_f64(), format!("--slo-ttft {d:?}"))?;
    }
    if let Some(d) = slo_itl {
        merge(&mut tpot, d.as_secs_f64(), format!("--slo-itl {d:?}"))?;
    }
    for g in goodput {
        let slot = match g.key {
            GoodputKey::Ttft => &mut ttft,
            GoodputKey::Tpot => &mut tpot,
            GoodputKey::E2el => &mut e2e,
        };
        merge(slot, g.ms / 1000.0, format!("--goodput {g}"))?;
    }
    Ok(Slo {
        ttft_s: ttft.map(|t| t.0),
        itl_s: tpot.map(|t| t.0),
        e2e_s: e2e.map(|t| t.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> GoodputObjective {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_vllm_objectives() {
        assert_eq!(
            g("ttft:2000"),
            GoodputObjective {
                key: GoodputKey::Ttft,
                ms: 2000.0
            }
        );
        assert_eq!(g("tpot:100").key, GoodputKey::Tpot);
        assert_eq!(g("e2el:1.5e3").ms, 1500.0);
        assert_eq!(g("tpot:0.5").ms, 0.5);
        assert_eq!(g("tpot:0.5").to_string(), "tpot:0.5");
    }

    #[test]
    fn refuses_malformed_objectives() {
        for (bad, says) in [
            ("ttft", "expected KEY:MILLISECONDS"),
            ("ttft:", "is not a number"),
            ("ttft:2s", "is not a number"),
            ("itl:50", "unknown objective `itl`"),
            ("TTFT:50", "unknown objective"),
            ("ttft:0", "positive"),
            ("ttft:-10", "positive"),
            ("e2el:inf", "positive"),
            ("tpot:NaN", "positive"),
        ] {
            let e = bad.parse::<GoodputObjective>().expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn flags_and_goodput_merge() {
        let ms = Duration::from_millis;
        let s = objectives(None, None, &[g("ttft:2000"), g("tpot:100"), g("e2el:9000")])
            .expect("consistent");
        assert_eq!(
            s,
            Slo {
                ttft_s: Some(2.0),
                itl_s: Some(0.1),
                e2e_s: Some(9.0)
            }
        );
        let s = objectives(Some(ms(500)), Some(ms(50)), &[]).expect("consistent");
        assert_eq!(
            s,
            Slo {
                ttft_s: Some(0.5),
                itl_s: Some(0.05),
                e2e_s: None
            }
        );
        // The same bound under both spellings, or twice, is one objective.
        let s = objectives(
            Some(ms(2000)),
            None,
            &[g("ttft:2000"), g("tpot:40"), g("tpot:40")],
        )
        .expect("consistent");
        assert_eq!((s.ttft_s, s.itl_s), (Some(2.0), Some(0.04)));
        assert_eq!(objectives(None, None, &[]).expect("ok"), Slo::default());
    }

    #[test]
    fn disagreeing_objectives_are_an_error() {
        let e = objectives(Some(Duration::from_millis(500)), None, &[g("ttft:2000")])
            .expect_err("disagree")
            .to_string();
        assert_eq!(
            e,
            "invalid arguments: --goodput ttft:2000 disagrees with --slo-ttft 500ms: give each objective once"
        );
        let e = objectives(None, Some(Duration::from_millis(50)), &[g("tpot:60")])
            .expect_err("disagree")
            .to_string();
        assert!(
            e.contains("--goodput tpot:60 disagrees with --slo-itl 50ms"),
            "{e}"
        );
        let e = objectives(None, None, &[g("e2el:1"), g("e2el:2")])
            .expect_err("disagree")
            .to_string();
        assert!(
            e.contains("--goodput e2el:2 disagrees with --goodput e2el:1"),
            "{e}"
        );
    }
}
