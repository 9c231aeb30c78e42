//! One printed line per figure, shared by the bench targets: the figure, its anchor
//! measured in the same run, the ratio, the target and whether it is met. Targets are
//! printed, never asserted: figures depend on the machine and its load.

#![allow(dead_code)]

use std::time::Duration;

/// The median of `xs` (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 0.5)
}

/// The `p` quantile (0..=1) of `xs`, nearest rank (0 when empty).
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// `name: <ours> | <anchor label> <anchor> | ratio r | target ≤ t× | met`, times in
/// seconds. A target of `None` prints the ratio without one.
pub fn ratio(name: &str, ours: f64, anchor_label: &str, anchor: f64, target: Option<f64>) {
    let r = if anchor > 0.0 {
        ours / anchor
    } else {
        f64::NAN
    };
    let target = match target {
        Some(t) => format!("target ≤ {t:.2}× | {}", verdict(r <= t)),
        None => "target — (figure only)".into(),
    };
    println!("{name}: {ours:.3}s | {anchor_label} {anchor:.3}s | ratio {r:.2} | {target}");
}

/// `name: <figure> | anchor — | target ≤ <limit> | met`: a figure against an absolute
/// limit (`value` and `limit` in the same unit).
pub fn limit(name: &str, figure: &str, value: f64, limit: f64, unit: &str) {
    println!(
        "{name}: {figure} | anchor — | ratio — | target ≤ {limit}{unit} | {}",
        verdict(value <= limit)
    );
}

/// A figure with no target (context for the lines around it).
pub fn info(name: &str, figure: &str) {
    println!("{name}: {figure} | target — (figure only)");
}

/// Resident set size of process `pid`, in KiB (0 when unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
