//! PHASE_HOOKS: the request's hook commands, run one after another with `docker exec`
//! inside the new container once it is healthy, before the switch.
//!
//! Hook `i` of `n` covers `[i/n, (i+1)/n]` of the phase. Its output is parsed by
//! [`tty_progress`](super::tty_progress) (with or without a TTY: the bytes are read the
//! same way): each new percentage moves `phase_progress` within the hook's share, and
//! committed output lines go out as VERBOSE updates, batched to at most
//! [`OUTPUT_INTERVAL`]⁻¹ updates per second. A hook that exits non-zero or overruns its
//! timeout fails the deployment with its exit code and last output lines; the exec of a
//! timed-out hook ends when the rollback removes the container.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::time::Instant;

use super::deployment::{Extra, Reporter};
use super::run::{Failure, StepOutput};
use super::tty_progress::{TtyEvent, TtyParser};
use crate::model::{HookSpec, Level, Phase};
use crate::runtime::{Runtime, RuntimeError};

/// At most one output update per this interval (lines in between are batched).
pub(crate) const OUTPUT_INTERVAL: Duration = Duration::from_millis(100);
/// A percentage that does not reach a new whole number waits this long.
const PERCENT_INTERVAL: Duration = Duration::from_millis(100);
/// Lines in one batched output update; older ones are dropped (and counted).
const MAX_BATCH_LINES: usize = 100;
/// Output lines kept for the diagnostics of a failed hook.
const TAIL_LINES: usize = 20;
/// How long to wait for the engine to report the exit code after the output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// Runs hook `index` of `count` in `container`.
pub(super) async fn run_hook(
    rep: &mut Reporter,
    runtime: &Arc<dyn Runtime>,
    container: &str,
    hook: &HookSpec,
    index: usize,
    count: usize,
) -> Result<(), Failure> {
    let started = Instant::now();
    let deadline = started + hook.timeout;
    let mut run = HookRun::new(rep, hook, index, count);
    let exec =
        match tokio::time::timeout_at(deadline, runtime.exec(container, &hook.command, hook.tty))
            .await
        {
            Err(_) => return Err(run.timed_out()),
            Ok(Err(e)) => return Err(run.runtime_failure("could not start", e)),
            Ok(Ok(exec)) => exec,
        };
    run.rep.progress(
        run.base,
        Level::Info,
        format!(
            "running hook {} ({}/{count}): {}",
            hook.name,
            index + 1,
            hook.command.join(" ")
        ),
        run.meta([
            ("exec_id", exec.exec_id.clone()),
            ("tty", hook.tty.to_string()),
        ]),
    );
    let mut output = exec.output;
    match tokio::time::timeout_at(deadline, run.pump(&mut output)).await {
        Err(_) => return Err(run.timed_out()),
        Ok(Err(e)) => return Err(run.runtime_failure("output could not be read", e)),
        Ok(Ok(())) => {}
    }
    drop(output);
    let events = run.parser.finish();
    run.handle(events);
    run.flush();
    match tokio::time::timeout_at(deadline, exit_code(runtime, &exec.exec_id)).await {
        Err(_) => Err(run.timed_out()),
        Ok(Err(e)) => Err(run.runtime_failure("exit code could not be read", e)),
        Ok(Ok(code)) => run.exited(code, started.elapsed()),
    }
}

/// The exit code of an exec whose output ended: the process has ended, though the
/// engine may take a moment to say so.
async fn exit_code(runtime: &Arc<dyn Runtime>, exec_id: &str) -> Result<i64, RuntimeError> {
    let until = Instant::now() + EXIT_CODE_WAIT;
    loop {
        match runtime.exec_exit_code(exec_id).await {
            Ok(Some(code)) => return Ok(code),
            Ok(None) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(None) => {
                return Err(RuntimeError::Call {
                    op: "inspect exec",
                    reason: "still running after its output ended".into(),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

struct HookRun<'a> {
    rep: &'a mut Reporter,
    hook: &'a HookSpec,
    index: usize,
    base: f64,
    share: f64,
    parser: TtyParser,
    tail: VecDeque<String>,
    /// Lines not sent yet (waiting for the output interval).
    pending: Vec<String>,
    /// Lines dropped from the pending batch since the last output update.
    dropped: usize,
    last_output: Option<Instant>,
    /// Last percentage sent, and when.
    last_percent: Option<(f64, Instant)>,
}

impl<'a> HookRun<'a> {
    fn new(rep: &'a mut Reporter, hook: &'a HookSpec, index: usize, count: usize) -> Self {
        Self {
            rep,
            hook,
            index,
            base: index as f64 / count as f64,
            share: 1.0 / count as f64,
            parser: TtyParser::new(),
            tail: VecDeque::new(),
            pending: Vec::new(),
            dropped: 0,
            last_output: None,
            last_percent: None,
        }
    }

    /// The hook failed: its message, exit code and last output lines.
    fn failure(&self, message: String, exit_code: Option<i64>, log_tail: Vec<String>) -> Failure {
        Failure {
            output: Some(StepOutput {
                exit_code,
                log_tail,
            }),
            ..Failure::new(Phase::Hooks, format!("hook {}", self.hook.name), message)
        }
    }

    /// The hook overran its timeout: what it drew last counts as output too.
    fn timed_out(&mut self) -> Failure {
        let mut log_tail = self.tail.iter().cloned().collect::<Vec<_>>();
        let drawn = self.parser.current().trim();
        if !drawn.is_empty() && log_tail.last().map(String::as_str) != Some(drawn) {
            log_tail.push(drawn.to_owned());
        }
        self.flush();
        let message = format!(
            "hook {} did not finish within {}s",
            self.hook.name,
            self.hook.timeout.as_secs_f64()
        );
        self.failure(message, None, log_tail)
    }

    /// The hook exited with `code` after `took`.
    fn exited(&mut self, code: i64, took: Duration) -> Result<(), Failure> {
        let took = took.as_secs_f64();
        if code != 0 {
            let log_tail: Vec<String> = self.tail.iter().cloned().collect();
            let last = log_tail
                .last()
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            let message = format!(
                "hook {} exited with code {code} after {took:.1}s{last}",
                self.hook.name
            );
            return Err(self.failure(message, Some(code), log_tail));
        }
        let meta = self.meta([("exit_code", "0".into())]);
        self.rep.progress(
            self.base + self.share,
            Level::Info,
            format!("hook {} finished in {took:.1}s", self.hook.name),
            meta,
        );
        Ok(())
    }

    /// Metadata every hook update carries, plus `extra`.
    fn meta<const N: usize>(&self, extra: [(&str, String); N]) -> Extra {
        let mut e = Extra::meta(extra);
        e.metadata.insert("hook".into(), self.hook.name.clone());
        e.metadata
            .insert("hook_index".into(), self.index.to_string());
        e
    }

    fn runtime_failure(&mut self, what: &str, e: RuntimeError) -> Failure {
        self.flush();
        let message = format!("hook {}: {what}: {e}", self.hook.name);
        self.failure(message, None, self.tail.iter().cloned().collect())
    }

    /// Reads the output until it ends, sending updates as it goes.
    async fn pump(
        &mut self,
        output: &mut BoxStream<'static, Result<Vec<u8>, RuntimeError>>,
    ) -> Result<(), RuntimeError> {
        loop {
            let flush_at = self
                .last_output
                .map_or_else(Instant::now, |t| t + OUTPUT_INTERVAL);
            tokio::select! {
                chunk = output.next() => match chunk {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(bytes)) => {
                        let events = self.parser.feed(&bytes);
                        self.handle(events);
                    }
                },
                _ = tokio::time::sleep_until(flush_at), if !self.pending.is_empty() => {
                    self.flush();
                }
            }
        }
    }

    fn handle(&mut self, events: Vec<TtyEvent>) {
        for event in events {
            match event {
                TtyEvent::Line(line) => {
                    if self.tail.len() == TAIL_LINES {
                        self.tail.pop_front();
                    }
                    self.tail.push_back(line.clone());
                    if self.pending.len() == MAX_BATCH_LINES {
                        self.pending.remove(0);
                        self.dropped += 1;
                    }
                    self.pending.push(line);
                    if self
                        .last_output
                        .is_none_or(|t| t.elapsed() >= OUTPUT_INTERVAL)
                    {
                        self.flush();
                    }
                }
                TtyEvent::Percent(p) => self.percent(p),
            }
        }
    }

    /// A new whole percent always goes out (at most 101 per bar); finer or backward
    /// changes at most every [`PERCENT_INTERVAL`].
    fn percent(&mut self, p: f64) {
        let due = match self.last_percent {
            None => true,
            Some((last, at)) => p.floor() > last.floor() || at.elapsed() >= PERCENT_INTERVAL,
        };
        if !due {
            return;
        }
        self.last_percent = Some((p, Instant::now()));
        let meta = self.meta([("percent", format!("{p}"))]);
        self.rep.progress(
            self.base + self.share * p / 100.0,
            Level::Verbose,
            format!("hook {}: {p}%", self.hook.name),
            meta,
        );
    }

    /// Sends the pending lines as one VERBOSE update.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.pending);
        let mut meta = self.meta([("lines", lines.len().to_string())]);
        if self.dropped > 0 {
            meta.metadata
                .insert("dropped_lines".into(), self.dropped.to_string());
            self.dropped = 0;
        }
        self.last_output = Some(Instant::now());
        self.rep.output(lines.join("\n"), meta);
    }
}
