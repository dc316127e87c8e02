//! Length distributions, arrival processes and duration strings, as typed on the command line.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::rng::Rng;

/// A distribution of token counts: `N`, `uniform:A-B` or `normal:MEAN,STD,MIN,MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LengthDist {
    /// Always `N`.
    Fixed { n: u32 },
    /// Uniform over the integers `lo..=hi`.
    Uniform { lo: u32, hi: u32 },
    /// Normal, rounded to the nearest integer and clamped into `min..=max`.
    Normal {
        mean: f64,
        std: f64,
        min: u32,
        max: u32,
    },
}

impl LengthDist {
    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        match *self {
            Self::Fixed { n } => n,
            Self::Uniform { lo, hi } => rng.range_u32(lo, hi),
            Self::Normal {
                mean,
                std,
                min,
                max,
            } => {
                let x = (mean + std * rng.standard_normal()).round();
                x.clamp(f64::from(min), f64::from(max)) as u32
            }
        }
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed { n } => write!(f, "{n}"),
            Self::Uniform { lo, hi } => write!(f, "uniform:{lo}-{hi}"),
            Self::Normal {
                mean,
                std,
                min,
                max,
            } => write!(f, "normal:{mean},{std},{min},{max}"),
        }
    }
}

fn positive_u32(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("a length must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

impl FromStr for LengthDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest
                .split_once('-')
                .ok_or_else(|| format!("`{s}`: expected uniform:A-B"))?;
            let (lo, hi) = (positive_u32(a)?, positive_u32(b)?);
            if lo > hi {
                return Err(format!("`{s}`: A must not exceed B"));
            }
            return Ok(Self::Uniform { lo, hi });
        }
        if let Some(rest) = s.strip_prefix("normal:") {
            let parts: Vec<&str> = rest.split(',').collect();
            let [mean, std, min, max] = parts[..] else {
                return Err(format!("`{s}`: expected normal:MEAN,STD,MIN,MAX"));
            };
            let num = |x: &str| {
                x.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("`{x}` is not a non-negative number"))
            };
            let (mean, std, min, max) = (
                num(mean)?,
                num(std)?,
                positive_u32(min)?,
                positive_u32(max)?,
            );
            if min > max {
                return Err(format!("`{s}`: MIN must not exceed MAX"));
            }
            return Ok(Self::Normal {
                mean,
                std,
                min,
                max,
            });
        }
        Ok(Self::Fixed {
            n: positive_u32(s)?,
        })
    }
}

/// How request send times are spaced in rate mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exponential gaps: the arrivals of many independent users.
    Poisson,
    /// Gamma gaps with shape `--burstiness` (1 is Poisson; under 1 is burstier, over 1 smoother).
    Gamma,
    /// Exactly `1 / rate` apart.
    Constant,
}

impl Arrival {
    /// The gap before the next request at `rate` requests per second.
    pub fn gap(self, rate: f64, burstiness: f64, rng: &mut Rng) -> f64 {
        match self {
            Self::Poisson => rng.exponential(rate),
            // Shape k and scale 1/(rate k) keep the mean gap at 1/rate whatever the burstiness.
            Self::Gamma => rng.gamma(burstiness, 1.0 / (rate * burstiness)),
            Self::Constant => 1.0 / rate,
        }
    }
}

/// Parses `250ms`, `2s`, `1.5m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 1.5m)"))?;
    Duration::try_from_secs_f64(v * unit).map_err(|_| format!("`{s}` is not a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        assert_eq!("64".parse(), Ok(LengthDist::Fixed { n: 64 }));
        assert_eq!(
            "uniform:1000-1500".parse(),
            Ok(LengthDist::Uniform { lo: 1000, hi: 1500 })
        );
        assert_eq!(
            "normal:200,75,50,400".parse(),
            Ok(LengthDist::Normal {
                mean: 200.0,
                std: 75.0,
                min: 50,
                max: 400
            })
        );
        for bad in [
            "0",
            "-3",
            "x",
            "uniform:5-2",
            "uniform:5",
            "normal:1,2,3",
            "normal:1,2,9,3",
        ] {
            assert!(bad.parse::<LengthDist>().is_err(), "{bad}");
        }
        for s in ["64", "uniform:1000-1500", "normal:200,75,50,400"] {
            assert_eq!(
                s.parse::<LengthDist>().map(|d| d.to_string()),
                Ok(s.to_string())
            );
        }
    }

    #[test]
    fn samples_respect_bounds() {
        let mut r = Rng::new(1);
        let n = LengthDist::Normal {
            mean: 10.0,
            std: 100.0,
            min: 5,
            max: 20,
        };
        let u = LengthDist::Uniform { lo: 3, hi: 4 };
        let mut hit_min = false;
        for _ in 0..1000 {
            let x = n.sample(&mut r);
            assert!((5..=20).contains(&x));
            hit_min |= x == 5;
            assert!((3..=4).contains(&u.sample(&mut r)));
        }
        assert!(hit_min, "a wide normal must be clamped at its minimum");
    }

    #[test]
    fn arrival_gaps_keep_the_mean() {
        assert_eq!(Arrival::Constant.gap(4.0, 1.0, &mut Rng::new(0)), 0.25);
        for (arrival, burst) in [
            (Arrival::Poisson, 1.0),
            (Arrival::Gamma, 0.5),
            (Arrival::Gamma, 3.0),
        ] {
            let mut r = Rng::new(9);
            let n = 100_000;
            let mean = (0..n).map(|_| arrival.gap(8.0, burst, &mut r)).sum::<f64>() / n as f64;
            assert!((mean - 0.125).abs() < 0.003, "{arrival:?} {burst}: {mean}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
