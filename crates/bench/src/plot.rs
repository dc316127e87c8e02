//! A hand-written SVG of the report: latency CDFs for one run, throughput against latency for a
//! sweep.

use std::fmt::Write;

use crate::report::BenchReport;
use crate::stats::Distribution;
use crate::summary::RunSummary;

const W: f64 = 380.0;
const H: f64 = 280.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 46.0;
/// Points kept per CDF: enough to look smooth, few enough to keep the file small.
const MAX_POINTS: usize = 1000;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    markers: bool,
}

struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Round tick positions (1, 2 or 5 times a power of ten) covering `lo..=hi`.
fn ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let end = ((if hi > lo { hi } else { lo + span }) / step).ceil() * step;
    let n = ((end - start) / step).round() as usize;
    (
        start,
        end,
        (0..=n).map(|i| start + step * i as f64).collect(),
    )
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

fn draw(out: &mut String, p: &Panel, ox: f64) {
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    let (xa, xb, xt) = ticks(x0.min(0.0), x1);
    let (ya, yb, yt) = ticks(y0, y1);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| ox + LEFT + (x - xa) / (xb - xa) * pw;
    let sy = |y: f64| TOP + ph - (y - ya) / (yb - ya) * ph;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="18" text-anchor="middle" font-weight="bold">{}</text>"#,
        ox + LEFT + pw / 2.0,
        esc(&p.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##,
        ox + LEFT
    );
    for x in &xt {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
            sx(*x),
            TOP + ph,
            TOP + ph + 14.0,
            fmt_tick(*x)
        );
    }
    for y in &yt {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            ox + LEFT,
            sy(*y),
            ox + LEFT + pw,
            ox + LEFT - 4.0,
            sy(*y) + 4.0,
            fmt_tick(*y)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        ox + LEFT + pw / 2.0,
        H - 12.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        ox + 14.0,
        TOP + ph / 2.0,
        esc(&p.y_label)
    );
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        if s.markers {
            for &(x, y) in &s.points {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
        let ly = TOP + 14.0 + 14.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{ly:.1}" fill="{color}">{}</text>"#,
            ox + LEFT + 6.0,
            esc(&s.name)
        );
    }
}

fn cdf(mut v: Vec<f64>) -> Vec<(f64, f64)> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let stride = n.div_ceil(MAX_POINTS).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(stride)
        .map(|i| (v[i] * 1000.0, (i + 1) as f64 / n as f64))
        .collect();
    if let Some(last) = v.last() {
        pts.push((last * 1000.0, 1.0));
    }
    pts
}

fn panels(report: &BenchReport) -> Vec<Panel> {
    if let [run] = &report.runs[..] {
        let ok = || run.records.iter().filter(|r| r.ok());
        let one = |title: &str, samples: Vec<f64>| Panel {
            title: format!("{title} CDF ({})", run.summary.label),
            x_label: format!("{title} (ms)"),
            y_label: "share of samples".into(),
            series: vec![Series {
                name: format!("n = {}", samples.len()),
                points: cdf(samples),
                markers: false,
            }],
        };
        return vec![
            one("TTFT", ok().filter_map(|r| r.ttft()).collect()),
            one("ITL", ok().flat_map(|r| r.itls()).collect()),
            one("E2E", ok().map(|r| r.e2e()).collect()),
        ];
    }
    let metric = |title: &str, get: fn(&RunSummary) -> Option<&Distribution>| {
        let series = |name: &str, p99: bool| Series {
            name: name.into(),
            points: report
                .runs
                .iter()
                .filter_map(|r| {
                    let d = get(&r.summary)?;
                    Some((
                        r.summary.output_token_throughput,
                        if p99 { d.p99 } else { d.p50 },
                    ))
                })
                .collect(),
            markers: true,
        };
        Panel {
            title: format!("{title} against throughput"),
            x_label: "output tokens/s".into(),
            y_label: format!("{title} (ms)"),
            series: vec![series("p50", false), series("p99", true)],
        }
    };
    let mut out = vec![
        metric("TTFT", |s| s.ttft_ms.as_ref()),
        metric("ITL", |s| s.itl_ms.as_ref()),
        metric("E2E", |s| s.e2e_ms.as_ref()),
    ];
    out.extend(admission_panel(report));
    out
}

/// For a sweep against a server that sheds load or with objectives: admitted, good and rejected
/// requests per second against the load offered (the rate asked for, else requests sent per
/// second).
fn admission_panel(report: &BenchReport) -> Option<Panel> {
    let runs = || report.runs.iter().map(|r| &r.summary);
    let rejections = runs().any(|s| s.admission.rejected > 0);
    let goodput = runs().any(|s| s.slo.is_some());
    if !rejections && !goodput {
        return None;
    }
    let offered = |s: &RunSummary| {
        s.rate.unwrap_or(if s.duration_s > 0.0 {
            s.requests as f64 / s.duration_s
        } else {
            0.0
        })
    };
    let series = |name: &str, get: &dyn Fn(&RunSummary) -> Option<f64>| Series {
        name: name.into(),
        points: runs().filter_map(|s| Some((offered(s), get(s)?))).collect(),
        markers: true,
    };
    let per_s = |n: usize, s: &RunSummary| (s.duration_s > 0.0).then(|| n as f64 / s.duration_s);
    let mut series_list = vec![series("admitted", &|s| Some(s.request_throughput))];
    if goodput {
        series_list.push(series("goodput", &|s| {
            s.slo.as_ref().map(|g| g.goodput_rps)
        }));
    }
    if rejections {
        series_list.push(series("rejected", &|s| per_s(s.admission.rejected, s)));
    }
    Some(Panel {
        title: "Requests against offered load".into(),
        x_label: "offered requests/s".into(),
        y_label: "requests/s".into(),
        series: series_list,
    })
}

/// The SVG document for `report`.
pub fn render(report: &BenchReport) -> String {
    let panels = panels(report);
    let width = W * panels.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H}" viewBox="0 0 {width} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        draw(&mut out, p, W * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover() {
        let (a, b, t) = ticks(0.0, 97.0);
        assert_eq!((a, b), (0.0, 100.0));
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let (a, b, _) = ticks(3.2, 3.2);
        assert!(a <= 3.2 && b > 3.2);
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(2.0), "2");
    }

    #[test]
    fn cdf_ends_at_one_and_is_thinned() {
        let pts = cdf((0..5000).map(|i| f64::from(i) / 1000.0).collect());
        assert!(pts.len() <= MAX_POINTS + 1);
        assert_eq!(pts.last(), Some(&(4999.0, 1.0)));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!(cdf(vec![]).is_empty());
        assert_eq!(esc("a<b&c"), "a&lt;b&amp;c");
    }
}
