//! Renderers of an update stream: `plain` (lines, no control codes, on stdout), `json`
//! (one proto3-JSON object per line on stdout, nothing else there), `quiet`; `tty` is in
//! `tty.rs`. Client-side notices (reconnecting, detached, timed out) go to stderr.

use std::io::{IsTerminal, Write};

use super::Output;
use super::proto::{DeploymentResult, Level, Operation, Phase, ProgressUpdate};

/// What a command shows of a deployment's updates.
pub(crate) trait Render {
    /// An update of the log (never a heartbeat), in sequence order, the terminal one
    /// included.
    fn update(&mut self, u: &ProgressUpdate);
    /// A message of the client itself (reconnecting, detached, timed out): stderr.
    fn notice(&mut self, text: &str);
    /// Clears anything live (bars) before the process exits.
    fn close(&mut self) {}
}

/// The renderer for `output` (`auto` resolved against stderr).
pub(crate) fn renderer(output: Output) -> Box<dyn Render> {
    match resolve(output) {
        Output::Tty => Box::new(super::tty::Tty::new(colors())),
        Output::Json => Box::new(Json),
        Output::Quiet => Box::new(Quiet),
        _ => Box::new(Plain::new(std::io::stdout())),
    }
}

/// `auto` → `tty` when stderr is a terminal, else `plain`; a `tty` asked for without a
/// terminal also falls back to `plain` (bars would be hidden).
pub(crate) fn resolve(output: Output) -> Output {
    match output {
        Output::Auto | Output::Tty if std::io::stderr().is_terminal() => Output::Tty,
        Output::Auto | Output::Tty => Output::Plain,
        other => other,
    }
}

/// Colours unless `NO_COLOR` is set (to anything non-empty).
pub(crate) fn colors() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `PHASE_HEALTH_CHECK` → `health check`.
pub(crate) fn phase_name(p: Phase) -> String {
    human(p.as_str_name(), "PHASE_")
}

/// A proto enum value's name without its prefix, in lower case with spaces.
pub(crate) fn human(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix)
        .to_lowercase()
        .replace('_', " ")
}

/// What an update belongs to, as a word: `deployment`, or `removal` (RemoveApp).
pub(crate) fn noun(operation: Operation) -> &'static str {
    match operation {
        Operation::Deploy => "deployment",
        Operation::RemoveApp => "removal",
    }
}

/// Seconds since the deployment was accepted.
pub(crate) fn elapsed(u: &ProgressUpdate) -> f64 {
    u.elapsed
        .as_ref()
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
        .unwrap_or(0.0)
}

/// `0.4s`, `12.3s`, `2m05s`.
pub(crate) fn fmt_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let s = s.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

pub(crate) fn bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// The closing summary of a terminal update: outcome and duration, then endpoints and
/// health, or the failure's diagnostics.
pub(crate) fn summary(u: &ProgressUpdate) -> Vec<String> {
    let Some(r) = &u.result else {
        return Vec::new();
    };
    let took = fmt_secs(elapsed(u));
    let (id, app) = (&u.deployment_id, &u.app);
    let what = noun(u.operation());
    let mut out = vec![match (u.phase(), u.operation()) {
        (Phase::Complete, Operation::Deploy) => format!("deployed {app} in {took} ({what} {id})"),
        (Phase::Complete, Operation::RemoveApp) => {
            let n = r.containers_removed;
            let s = if n == 1 { "" } else { "s" };
            format!("removed {app} in {took}: {n} container{s} stopped and removed ({what} {id})")
        }
        (Phase::Cancelled, _) => {
            format!("cancelled {what} {id} of {app} after {took}: {}", r.message)
        }
        _ => format!("{what} {id} of {app} failed after {took}: {}", r.message),
    }];
    out.extend(result_lines(r));
    out
}

/// Endpoints, health, image and container of a result; diagnostics when it failed.
pub(crate) fn result_lines(r: &DeploymentResult) -> Vec<String> {
    let mut out = Vec::new();
    let mut endpoints: Vec<_> = r.endpoints.iter().collect();
    endpoints.sort();
    for (port, url) in endpoints {
        out.push(format!("  endpoint  {port} → {url}"));
    }
    for h in &r.health {
        out.push(format!(
            "  health    {}: {} after {} attempt{} ({})",
            h.check,
            if h.healthy { "healthy" } else { "not healthy" },
            h.attempts,
            if h.attempts == 1 { "" } else { "s" },
            h.message
        ));
    }
    if !r.image_digest.is_empty() {
        out.push(format!("  image     {}", r.image_digest));
    }
    if !r.container_id.is_empty() && r.success {
        out.push(format!(
            "  container {}",
            &r.container_id[..r.container_id.len().min(12)]
        ));
    }
    if let Some(d) = &r.diagnostics {
        let mut line = format!("  failed in {}", phase_name(d.failed_phase()));
        if !d.step.is_empty() {
            line.push_str(&format!(", step: {}", d.step));
        }
        if let Some(code) = d.exit_code {
            line.push_str(&format!(", exit code {code}"));
        }
        if d.oom_killed {
            line.push_str(", OOM-killed");
        }
        out.push(line);
        if !d.log_tail.is_empty() {
            out.push("  last output:".into());
            for l in &d.log_tail {
                out.push(format!("    | {l}"));
            }
        }
    }
    out
}

/// Updates worth a line of their own whatever the throttle says.
pub(crate) fn important(u: &ProgressUpdate) -> bool {
    matches!(u.level(), Level::Warning | Level::Error | Level::Success)
        || u.result.is_some()
        || u.metadata.contains_key("milestone")
        || (u.metadata.contains_key("hook") && u.metadata.contains_key("exit_code"))
}

/// A line describing pull progress: `12.00 MiB of 40.00 MiB (30%), 2/3 layers`.
pub(crate) fn pull_line(u: &ProgressUpdate) -> Option<String> {
    let p = u.pull.as_ref()?;
    if p.image_total_bytes == 0 {
        return None;
    }
    Some(format!(
        "{} of {} ({:.0}%), {}/{} layers",
        bytes(p.image_current_bytes),
        bytes(p.image_total_bytes),
        100.0 * p.image_current_bytes as f64 / p.image_total_bytes as f64,
        p.layers_done,
        p.layers_total
    ))
}

/// Lines without control codes on stdout: one per phase change and per important
/// event; other updates (pull progress, health attempts, hook output) at most one
/// every few seconds of the deployment's time.
pub(crate) struct Plain<W: Write> {
    out: W,
    phase: Option<Phase>,
    phase_started: f64,
    last_line: f64,
}

/// Seconds between two throttled lines.
const PLAIN_EVERY: f64 = 3.0;

impl<W: Write> Plain<W> {
    pub(crate) fn new(out: W) -> Self {
        Plain {
            out,
            phase: None,
            phase_started: 0.0,
            last_line: f64::NEG_INFINITY,
        }
    }

    fn line(&mut self, t: f64, phase: Phase, text: &str) {
        let _ = writeln!(
            self.out,
            "[{:>7}] {:<12} {}",
            fmt_secs(t),
            phase_name(phase),
            text
        );
        let _ = self.out.flush();
        self.last_line = t;
    }
}

impl<W: Write> Render for Plain<W> {
    fn update(&mut self, u: &ProgressUpdate) {
        let t = elapsed(u);
        let phase = u.phase();
        let message = u.message.replace('\n', " / ");
        if self.phase.is_none() {
            let what = noun(u.operation());
            let _ = writeln!(self.out, "{what} {} (app {})", u.deployment_id, u.app);
        }
        if self.phase != Some(phase) {
            let took = match self.phase {
                Some(prev) => format!(
                    "  ({} took {})",
                    phase_name(prev),
                    fmt_secs(t - self.phase_started)
                ),
                None => String::new(),
            };
            self.phase = Some(phase);
            self.phase_started = t;
            self.line(t, phase, &format!("{message}{took}"));
        } else if important(u) {
            self.line(t, phase, &message);
        } else if t - self.last_line >= PLAIN_EVERY {
            let text = pull_line(u).unwrap_or(message);
            self.line(t, phase, &text);
        }
        if u.result.is_some() {
            for l in summary(u) {
                let _ = writeln!(self.out, "{l}");
            }
            let _ = self.out.flush();
        }
    }

    fn notice(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// One proto3-JSON object per update on stdout (heartbeats are never passed here).
pub(crate) struct Json;

impl Render for Json {
    fn update(&mut self, u: &ProgressUpdate) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(u).expect("generated serde never fails")
        );
        let _ = out.flush();
    }

    fn notice(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// Nothing: the exit code tells (errors are still printed by the command).
pub(crate) struct Quiet;

impl Render for Quiet {
    fn update(&mut self, _: &ProgressUpdate) {}
    fn notice(&mut self, _: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::proto::{FailureDiagnostics, PullProgress};

    fn update(seq: u64, phase: Phase, secs: i64, message: &str) -> ProgressUpdate {
        ProgressUpdate {
            deployment_id: "d1".into(),
            sequence: seq,
            app: "web".into(),
            phase: phase as i32,
            level: Level::Info as i32,
            message: message.into(),
            elapsed: Some(pbjson_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn plain_prints_phase_changes_and_throttles_the_rest() {
        let mut buf = Vec::new();
        {
            let mut p = Plain::new(&mut buf);
            p.update(&update(1, Phase::Queued, 0, "accepted"));
            p.update(&update(2, Phase::Pulling, 1, "pulling"));
            for s in 0..10 {
                let mut u = update(3 + s, Phase::Pulling, 1, "bytes");
                u.elapsed.as_mut().unwrap().nanos = (s as i32) * 100_000_000;
                u.pull = Some(PullProgress {
                    image_current_bytes: s * 1024 * 1024,
                    image_total_bytes: 10 * 1024 * 1024,
                    ..Default::default()
                });
                p.update(&u);
            }
            let mut late = update(13, Phase::Pulling, 5, "bytes");
            late.pull = Some(PullProgress {
                image_current_bytes: 5 * 1024 * 1024,
                image_total_bytes: 10 * 1024 * 1024,
                layers_done: 1,
                layers_total: 2,
                ..Default::default()
            });
            p.update(&late);
            let mut end = update(14, Phase::Failed, 6, "failed");
            end.result = Some(DeploymentResult {
                message: "container exited".into(),
                diagnostics: Some(FailureDiagnostics {
                    failed_phase: Phase::HealthCheck as i32,
                    step: "health check".into(),
                    exit_code: Some(1),
                    log_tail: vec!["fatal: config missing".into()],
                    ..Default::default()
                }),
                ..Default::default()
            });
            p.update(&end);
        }
        let text = String::from_utf8(buf).unwrap();
        assert!(!text.contains('\x1b'));
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "deployment d1 (app web)");
        assert!(lines[1].contains("queued") && lines[1].contains("accepted"));
        assert!(lines[2].contains("pulling") && lines[2].contains("(queued took 1.0s)"));
        assert!(
            lines[3].contains("5.00 MiB of 10.00 MiB (50%), 1/2 layers"),
            "{text}"
        );
        assert!(lines[4].contains("failed") && lines[4].contains("(pulling took 5.0s)"));
        assert!(text.contains("failed in health check, step: health check, exit code 1"));
        assert!(text.contains("| fatal: config missing"));
        assert_eq!(lines.len(), 9, "{text}");
    }

    #[test]
    fn a_removal_is_named_as_such_with_its_count() {
        let mut buf = Vec::new();
        let mut end = update(4, Phase::Complete, 1, "removed");
        end.operation = Operation::RemoveApp as i32;
        end.result = Some(DeploymentResult {
            success: true,
            containers_removed: 2,
            ..Default::default()
        });
        Plain::new(&mut buf).update(&end);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("removal d1 (app web)\n"), "{text}");
        assert!(
            text.contains("removed web in 1.0s: 2 containers stopped and removed (removal d1)"),
            "{text}"
        );
        assert!(!text.contains("deploy"), "{text}");
    }

    #[test]
    fn json_uses_the_proto3_mapping() {
        let mut u = update(7, Phase::Pulling, 2, "x");
        u.pull = Some(PullProgress {
            image_current_bytes: 5,
            ..Default::default()
        });
        let v: serde_json::Value = serde_json::to_value(&u).unwrap();
        assert_eq!(v["deploymentId"], "d1");
        assert_eq!(v["sequence"], "7");
        assert_eq!(v["phase"], "PHASE_PULLING");
        assert_eq!(v["level"], "LEVEL_INFO");
        assert_eq!(v["elapsed"], "2s");
        assert_eq!(v["pull"]["imageCurrentBytes"], "5");
    }
}
