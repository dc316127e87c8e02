//! A hand-written SVG of throughput per GPU against TTFT, as a sizing calculator draws it: one
//! curve per reported configuration over a sweep of request rates, the chosen point marked.

use std::fmt::Write;

use crate::error::SimError;
use crate::planner::{Plan, simulate_candidate};
use crate::report::Context;

const W: f64 = 720.0;
const H: f64 = 480.0;
const PAD: f64 = 60.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

pub fn plot(ctx: &Context<'_>, p: &Plan) -> Result<String, SimError> {
    let mut curves = Vec::new();
    for c in std::iter::once(&p.recommended).chain(&p.runner_ups) {
        let top = c.goodput_rps.unwrap_or(ctx.input.rate).max(ctx.input.rate) * 1.25;
        let mut pts = Vec::new();
        for k in 1..=10 {
            let rate = top * f64::from(k) / 10.0;
            if let Some(r) = simulate_candidate(ctx.input, c, rate)? {
                pts.push((r.ttft.p90 * 1e3, r.throughput_rps / f64::from(c.gpus)));
            }
        }
        curves.push((c, pts));
    }
    let chosen = p.recommended.at_rate.as_ref().map(|r| {
        (
            r.ttft.p90 * 1e3,
            r.throughput_rps / f64::from(p.recommended.gpus),
        )
    });
    let all = curves
        .iter()
        .flat_map(|(_, v)| v.iter())
        .chain(chosen.iter());
    let (xmax, ymax) = all.fold((ctx.input.slo.ttft_s * 1e3, 0.0f64), |(x, y), p| {
        (x.max(p.0), y.max(p.1))
    });
    let sx = |x: f64| PAD + (x / (xmax * 1.05)) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y / (ymax * 1.1).max(1e-9)) * (H - 2.0 * PAD);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        H - PAD,
        W - PAD,
        H - PAD
    );
    let _ = writeln!(
        s,
        r#"<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{}" stroke="black"/>"#,
        H - PAD
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">TTFT p90 (ms)</text>"#,
        W / 2.0,
        H - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">requests/s per GPU</text>"#,
        H / 2.0,
        H / 2.0
    );
    for k in 0..=4 {
        let xv = xmax * 1.05 * f64::from(k) / 4.0;
        let yv = ymax * 1.1 * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{xv:.0}</text>"#,
            sx(xv),
            H - PAD + 16.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{yv:.3}</text>"#,
            PAD - 6.0,
            sy(yv) + 4.0
        );
    }
    let slo_x = sx(ctx.input.slo.ttft_s * 1e3);
    let _ = writeln!(
        s,
        r#"<line x1="{slo_x:.1}" y1="{PAD}" x2="{slo_x:.1}" y2="{}" stroke="grey" stroke-dasharray="4 4"/>"#,
        H - PAD
    );
    for (k, (c, pts)) in curves.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let label = format!(
            "{:?} TP{}/{} {} GPUs",
            c.mode, c.tp_prefill, c.tp_decode, c.gpus
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" fill="{colour}">{label}</text>"#,
            W - PAD - 220.0,
            PAD + 16.0 * k as f64
        );
    }
    if let Some((x, y)) = chosen {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="6" fill="none" stroke="black" stroke-width="2"/>"#,
            sx(x),
            sy(y)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">chosen</text>"#,
            sx(x) + 8.0,
            sy(y) - 8.0
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}
