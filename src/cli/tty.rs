//! The `tty` renderer (stderr is a terminal): a line per phase with its duration as it
//! ends; live bars for the current phase and the whole deployment; while pulling, an
//! aggregate bar with bytes, rate and ETA plus at most [`MAX_LAYER_BARS`] per-layer
//! bars; warnings, errors and milestones printed above the bars; a closing summary.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::proto::{Level, Phase, ProgressUpdate};
use super::render::{Render, elapsed, fmt_secs, noun, phase_name, summary};

/// More layer bars flicker and crowd the screen; the rest count in the aggregate.
pub(crate) const MAX_LAYER_BARS: usize = 6;

/// Bars hold 0–1 progress values in thousandths.
const SCALE: f64 = 1000.0;

pub(crate) struct Tty {
    colors: bool,
    multi: MultiProgress,
    phase_bar: ProgressBar,
    total_bar: ProgressBar,
    image_bar: Option<ProgressBar>,
    layers: HashMap<String, ProgressBar>,
    layers_done: HashSet<String>,
    phase: Option<Phase>,
    phase_started: f64,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

impl Tty {
    pub(crate) fn new(colors: bool) -> Self {
        Self::with_target(colors, ProgressDrawTarget::stderr())
    }

    fn with_target(colors: bool, target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let phase_bar = multi.add(ProgressBar::new(SCALE as u64));
        phase_bar.set_style(style(
            "{spinner} {prefix:<12} [{bar:24}] {percent:>3}%  {wide_msg}",
        ));
        phase_bar.set_prefix("connecting");
        phase_bar.enable_steady_tick(Duration::from_millis(100));
        let total_bar = multi.add(ProgressBar::new(SCALE as u64));
        total_bar.set_style(style("  {prefix:<12} [{bar:24}] {percent:>3}%  {msg}"));
        total_bar.set_prefix("total");
        Tty {
            colors,
            multi,
            phase_bar,
            total_bar,
            image_bar: None,
            layers: HashMap::new(),
            layers_done: HashSet::new(),
            phase: None,
            phase_started: 0.0,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colors {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn println(&self, line: &str) {
        // Above the bars; `println` of a hidden MultiProgress would drop the line.
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    /// The line of a phase that has ended: mark, name, duration.
    fn phase_done(&self, phase: Phase, ok: bool, until: f64) {
        let mark = if ok {
            self.paint("32", "✔")
        } else {
            self.paint("31", "✘")
        };
        self.println(&format!(
            "{mark} {:<12} {}",
            phase_name(phase),
            fmt_secs(until - self.phase_started)
        ));
    }

    fn clear_pull_bars(&mut self) {
        for (_, bar) in self.layers.drain() {
            bar.finish_and_clear();
        }
        if let Some(bar) = self.image_bar.take() {
            bar.finish_and_clear();
        }
    }

    fn pull(&mut self, u: &ProgressUpdate) {
        let Some(p) = &u.pull else {
            return;
        };
        if p.image_total_bytes > 0 {
            let bar = self.image_bar.get_or_insert_with(|| {
                let bar = self
                    .multi
                    .insert_before(&self.total_bar, ProgressBar::new(p.image_total_bytes));
                bar.set_style(style(
                    "  {prefix:<12} [{bar:24}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec} ETA {eta}  {msg}",
                ));
                bar.set_prefix("image");
                bar
            });
            bar.set_length(p.image_total_bytes);
            bar.set_position(p.image_current_bytes);
            bar.set_message(format!("{}/{} layers", p.layers_done, p.layers_total));
        }
        let id = &p.layer_id;
        if id.is_empty() || p.total_bytes == 0 || self.layers_done.contains(id) {
            return;
        }
        if p.current_bytes >= p.total_bytes {
            self.layers_done.insert(id.clone());
            if let Some(bar) = self.layers.remove(id) {
                bar.finish_and_clear();
            }
            return;
        }
        if !self.layers.contains_key(id) && self.layers.len() >= MAX_LAYER_BARS {
            return;
        }
        let bar = self.layers.entry(id.clone()).or_insert_with(|| {
            let bar = self
                .multi
                .insert_before(&self.total_bar, ProgressBar::new(p.total_bytes));
            bar.set_style(style(
                "    {prefix:<10} [{bar:22}] {binary_bytes}/{binary_total_bytes}",
            ));
            bar.set_prefix(id[..id.len().min(10)].to_owned());
            bar
        });
        bar.set_length(p.total_bytes);
        bar.set_position(p.current_bytes);
    }
}

impl Render for Tty {
    fn update(&mut self, u: &ProgressUpdate) {
        let t = elapsed(u);
        let phase = u.phase();
        if self.phase.is_none() {
            self.println(&format!(
                "{} {} of {}",
                noun(u.operation()),
                self.paint("1", &u.deployment_id),
                u.app
            ));
        }
        let terminal = u.result.is_some();
        if self.phase != Some(phase) && !terminal {
            if let Some(prev) = self.phase {
                self.phase_done(prev, true, t);
                if prev == Phase::Pulling {
                    self.clear_pull_bars();
                }
            }
            self.phase = Some(phase);
            self.phase_started = t;
            self.phase_bar.set_prefix(phase_name(phase));
        }
        match u.level() {
            Level::Warning => self.println(&format!("{} {}", self.paint("33", "!"), u.message)),
            Level::Error if !terminal => {
                self.println(&format!("{} {}", self.paint("31", "✘"), u.message))
            }
            _ if u.metadata.contains_key("milestone") => {
                self.println(&format!("  · {}", u.message))
            }
            _ => {}
        }
        if phase == Phase::Pulling {
            self.pull(u);
        }
        let message = u.message.lines().last().unwrap_or_default().to_owned();
        self.phase_bar.set_message(message);
        self.phase_bar
            .set_position((u.phase_progress * SCALE).round() as u64);
        self.total_bar
            .set_position((u.total_progress * SCALE).round() as u64);
        self.total_bar.set_message(fmt_secs(t));
        if terminal {
            if let Some(prev) = self.phase {
                self.phase_done(prev, phase == Phase::Complete, t);
            }
            self.close();
            let lines = summary(u);
            for (i, l) in lines.iter().enumerate() {
                if i == 0 {
                    let code = match phase {
                        Phase::Complete => "32",
                        Phase::Cancelled => "33",
                        _ => "31",
                    };
                    eprintln!("{}", self.paint(code, l));
                } else {
                    eprintln!("{l}");
                }
            }
        }
    }

    fn notice(&mut self, text: &str) {
        self.multi.suspend(|| eprintln!("{text}"));
    }

    fn close(&mut self) {
        self.clear_pull_bars();
        self.phase_bar.finish_and_clear();
        self.total_bar.finish_and_clear();
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::proto::PullProgress;

    fn pulling(seq: u64, layer: &str, current: u64, total: u64) -> ProgressUpdate {
        ProgressUpdate {
            deployment_id: "d1".into(),
            sequence: seq,
            app: "web".into(),
            phase: Phase::Pulling as i32,
            pull: Some(PullProgress {
                layer_id: layer.into(),
                current_bytes: current,
                total_bytes: total,
                image_current_bytes: current,
                image_total_bytes: 100 * total,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn at_most_six_layer_bars_and_finished_layers_leave() {
        let mut tty = Tty::with_target(false, ProgressDrawTarget::hidden());
        for i in 0..10 {
            tty.update(&pulling(i + 1, &format!("layer{i}"), 1, 10));
        }
        assert_eq!(tty.layers.len(), MAX_LAYER_BARS);
        assert!(tty.image_bar.is_some());
        tty.update(&pulling(11, "layer0", 10, 10));
        assert_eq!(tty.layers.len(), MAX_LAYER_BARS - 1);
        // A finished layer never comes back; a waiting one takes the free place.
        tty.update(&pulling(12, "layer0", 10, 10));
        tty.update(&pulling(13, "layer7", 5, 10));
        assert_eq!(tty.layers.len(), MAX_LAYER_BARS);
        assert!(!tty.layers.contains_key("layer0"));
        let mut next = pulling(14, "", 0, 0);
        next.phase = Phase::Creating as i32;
        next.pull = None;
        tty.update(&next);
        assert!(tty.layers.is_empty() && tty.image_bar.is_none());
    }
}
