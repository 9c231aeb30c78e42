//! Follows one deployment's (or removal's) updates to its end and turns that end into
//! the exit code.
//!
//! - Each update is shown once, in order: duplicates (`sequence` ≤ the last one shown)
//!   are skipped, heartbeats are not shown, and a gap makes the follower resume.
//! - A broken stream (server restart, dropped connection) is resumed with
//!   `WatchDeployment(after_sequence = last shown)`, with backoff, for up to
//!   `--reconnect-timeout`; then exit 4 with the command to resume by hand.
//! - `--timeout` leaves with 124, Ctrl-C detaches with 130 (or cancels with
//!   `--cancel-on-interrupt`; a second Ctrl-C leaves at once). Both print how to follow
//!   or stop the deployment, which keeps running.
//! - The exit code comes from the terminal update only.

use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use super::connect::{Client, ConnectArgs, Failure};
use super::proto::{
    CancelRequest, CancelResponse, DeploymentState, GetStatusRequest, Phase, ProgressUpdate,
    WatchRequest,
};
use super::render::{Render, noun};
use super::{Exit, FollowArgs};

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where following starts.
pub(crate) enum Start {
    /// The stream of a `Deploy` call (the ID comes with its first update).
    Deploy(Streaming<ProgressUpdate>),
    /// `WatchDeployment(id, after)`.
    Watch { id: String, after: u64 },
}

pub(crate) struct Follower<'a> {
    pub(crate) client: Client,
    pub(crate) connect: &'a ConnectArgs,
    pub(crate) opts: &'a FollowArgs,
    pub(crate) render: Box<dyn Render>,
    pub(crate) interrupts: Signal,
    /// When `--timeout` runs out (counted from the command's start).
    pub(crate) deadline: Option<Instant>,
    /// What is followed, in the client's own notices: `deployment` or `removal` (set
    /// from the updates' `operation` once they come).
    pub(crate) noun: &'static str,
}

/// Where following stands.
struct FollowState {
    client: Client,
    /// `None` while resuming.
    stream: Option<Streaming<ProgressUpdate>>,
    /// The deployment (known once the server accepted it).
    id: Option<String>,
    /// Sequence of the last update shown.
    last: u64,
    /// Since when the stream is broken, and why.
    broken: Option<(Instant, String)>,
    /// The wait before the next WatchDeployment.
    backoff: Duration,
    /// A CancelDeployment in flight.
    cancel: Option<JoinHandle<Result<CancelResponse, Status>>>,
    /// Ctrl-C asked for a cancel already.
    cancelling: bool,
}

enum Event {
    Message(Result<Option<ProgressUpdate>, Status>),
    Watched(Result<Streaming<ProgressUpdate>, Status>),
    CancelAnswered(Result<CancelResponse, Status>),
    Interrupt,
    Timeout,
}

/// The exit code a terminal update stands for.
pub(crate) fn exit_of(u: &ProgressUpdate) -> Exit {
    match u.phase() {
        Phase::Complete => Exit::Success,
        Phase::Cancelled => Exit::Cancelled,
        Phase::Failed => Exit::Failed,
        _ if u.result.as_ref().is_some_and(|r| r.success) => Exit::Success,
        _ => Exit::Failed,
    }
}

/// Codes after which resuming can work (the server went away, or ended a stalled
/// stream naming the sequence to resume from).
fn resumable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
    )
}

impl Follower<'_> {
    fn hints(&self, id: &str, last: u64) -> String {
        let flags = self.connect.flags_for_hint();
        format!(
            "  follow it: stevedore watch {id} --after {last}{flags}\n  stop it:   stevedore cancel {id}{flags}"
        )
    }

    fn leave(&mut self, exit: Exit, message: String) -> Exit {
        self.render.close();
        self.render.notice(&message);
        exit
    }

    fn fail(&mut self, failure: Failure) -> Exit {
        self.render.close();
        failure.report()
    }

    pub(crate) async fn run(mut self, start: Start) -> Exit {
        let (stream, id, last) = match start {
            Start::Deploy(s) => (Some(s), None, 0),
            Start::Watch { id, after } => (None, Some(id), after),
        };
        let mut state = FollowState {
            client: self.client.clone(),
            stream,
            id,
            last,
            broken: None,
            backoff: Duration::ZERO,
            cancel: None,
            cancelling: false,
        };
        loop {
            let event = self.next_event(&mut state).await;
            if let Some(exit) = self.handle(&mut state, event).await {
                return exit;
            }
        }
    }

    /// Waits for what happens next: Ctrl-C, `--timeout`, the cancel's answer, or the
    /// stream's next message (or, with no stream, a new WatchDeployment after the backoff).
    async fn next_event(&mut self, state: &mut FollowState) -> Event {
        let FollowState {
            client,
            stream,
            id,
            last,
            backoff,
            cancel,
            ..
        } = state;
        tokio::select! {
            biased;
            _ = self.interrupts.recv() => Event::Interrupt,
            _ = sleep_until(self.deadline) => Event::Timeout,
            r = async { cancel.as_mut().unwrap().await }, if cancel.is_some() => {
                *cancel = None;
                Event::CancelAnswered(r.unwrap_or_else(|e| Err(Status::unknown(e.to_string()))))
            }
            e = async {
                match stream.as_mut() {
                    Some(s) => Event::Message(s.message().await),
                    None => {
                        tokio::time::sleep(*backoff).await;
                        let req = WatchRequest {
                            deployment_id: id.clone().unwrap_or_default(),
                            after_sequence: *last,
                        };
                        Event::Watched(client.watch_deployment(req).await.map(|r| r.into_inner()))
                    }
                }
            } => e,
        }
    }

    /// Acts on one event; `Some` ends the command with that exit code.
    async fn handle(&mut self, state: &mut FollowState, event: Event) -> Option<Exit> {
        match event {
            Event::Message(Ok(Some(u))) => self.on_update(state, u),
            Event::Message(Ok(None)) => self.on_stream_end(state).await,
            Event::Message(Err(status)) => self.on_stream_error(state, status),
            Event::Watched(Ok(s)) => {
                state.stream = Some(s);
                None
            }
            Event::Watched(Err(status)) => self.on_watch_error(state, status),
            Event::CancelAnswered(Ok(_)) => None,
            Event::CancelAnswered(Err(status)) => {
                let f = self.connect.failure(&status);
                self.render
                    .notice(&format!("stevedore: cancel failed: {}", f.message));
                None
            }
            Event::Interrupt => self.on_interrupt(state),
            Event::Timeout => Some(self.on_timeout(state)),
        }
    }

    /// An update: shown when it is the next one; a gap resumes after the last shown.
    fn on_update(&mut self, state: &mut FollowState, u: ProgressUpdate) -> Option<Exit> {
        if state.id.is_none() {
            state.id = Some(u.deployment_id.clone());
        }
        self.noun = noun(u.operation());
        // The stream answers: any break is over.
        if state.broken.take().is_some() {
            state.backoff = Duration::ZERO;
        }
        let last = state.last;
        if u.heartbeat || u.sequence <= last {
            return None;
        }
        if u.sequence != last + 1 {
            self.render.notice(&format!(
                "stevedore: expected update {} but got {}; resuming after {last}",
                last + 1,
                u.sequence
            ));
            state.stream = None;
            return None;
        }
        state.last = u.sequence;
        self.render.update(&u);
        if u.result.is_some() {
            self.render.close();
            return Some(exit_of(&u));
        }
        None
    }

    /// The stream ended with no status before the deployment's last update.
    async fn on_stream_end(&mut self, state: &mut FollowState) -> Option<Exit> {
        if state.id.is_none() {
            return Some(self.fail(Failure {
                exit: Exit::Rpc,
                message: format!(
                    "the server at {} ended the stream before accepting the deployment",
                    self.connect.url()
                ),
            }));
        }
        state.stream = None;
        // `watch --after N` of a deployment that ended at or before N
        // ends at once: the end is then the status's.
        if let Some(exit) = self.ended_before(state.id.as_deref(), state.last).await {
            return Some(exit);
        }
        let what = self.noun;
        let why = || format!("the stream ended before the {what} did");
        self.still_broken(state, why)
    }

    /// The stream ended with a status: resumed when the status allows it.
    fn on_stream_error(&mut self, state: &mut FollowState, status: Status) -> Option<Exit> {
        if state.id.is_none() || !resumable(&status) {
            return Some(self.fail(self.connect.failure(&status)));
        }
        state.stream = None;
        if state.broken.is_none() {
            let why = self.connect.failure(&status).message;
            self.render.notice(&format!(
                "stevedore: lost the stream ({why}); resuming after update {}",
                state.last
            ));
        }
        let connect = self.connect;
        let why = || connect.failure(&status).message;
        self.still_broken(state, why)
    }

    /// WatchDeployment (to resume) failed.
    fn on_watch_error(&mut self, state: &mut FollowState, status: Status) -> Option<Exit> {
        if !resumable(&status) {
            let mut f = self.connect.failure(&status);
            if status.code() == Code::OutOfRange {
                f.message = format!(
                    "cannot resume after update {}: the server no longer holds \
                     the updates after it (OUT_OF_RANGE: {})",
                    state.last,
                    status.message()
                );
            }
            return Some(self.fail(f));
        }
        let connect = self.connect;
        let why = || connect.failure(&status).message;
        self.still_broken(state, why)
    }

    /// Ctrl-C: cancel the deployment (with `--cancel-on-interrupt`, the first time), or leave it running.
    fn on_interrupt(&mut self, state: &mut FollowState) -> Option<Exit> {
        let what = self.noun;
        let Some(id) = state.id.clone() else {
            return Some(self.leave(
                Exit::Interrupted,
                format!(
                    "stevedore: interrupted before the server accepted the {what} \
                     (see `stevedore list`)"
                ),
            ));
        };
        if self.opts.cancel_on_interrupt && !state.cancelling {
            state.cancelling = true;
            self.render.notice(&format!(
                "stevedore: cancelling {what} {id} (Ctrl-C again to leave at once)"
            ));
            let mut c = self.client.clone();
            let req = CancelRequest {
                deployment_id: id.clone(),
            };
            state.cancel = Some(tokio::spawn(async move {
                c.cancel_deployment(req).await.map(|r| r.into_inner())
            }));
            return None;
        }
        let hints = self.hints(&id, state.last);
        Some(self.leave(
            Exit::Interrupted,
            format!("stevedore: detached; {what} {id} keeps running\n{hints}"),
        ))
    }

    /// `--timeout` ran out: leave the deployment running.
    fn on_timeout(&mut self, state: &FollowState) -> Exit {
        let what = self.noun;
        let Some(id) = state.id.clone() else {
            return self.leave(
                Exit::Timeout,
                format!("stevedore: --timeout ran out before the server accepted the {what}"),
            );
        };
        let hints = self.hints(&id, state.last);
        self.leave(
            Exit::Timeout,
            format!("stevedore: --timeout ran out; {what} {id} keeps running\n{hints}"),
        )
    }

    /// Notes one more failed attempt on a broken stream: the next wait (doubling from
    /// [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`]), or, once `--reconnect-timeout` has
    /// passed since the break, the exit with the command to resume by hand.
    fn still_broken(
        &mut self,
        state: &mut FollowState,
        why: impl FnOnce() -> String,
    ) -> Option<Exit> {
        let (since, why) = state.broken.get_or_insert_with(|| (Instant::now(), why()));
        if since.elapsed() < self.opts.reconnect_timeout {
            state.backoff = (state.backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
            return None;
        }
        let id = state.id.as_deref().unwrap_or_default();
        let last = state.last;
        let flags = self.connect.flags_for_hint();
        self.render.close();
        eprintln!(
            "stevedore: could not resume within {} ({why}); the {} may still be \
             running. Resume with: stevedore watch {id} --after {last}{flags}",
            humantime::format_duration(self.opts.reconnect_timeout),
            self.noun
        );
        Some(Exit::Rpc)
    }

    /// When the deployment has ended with no update after `last`: its exit code (and
    /// a notice saying so).
    async fn ended_before(&mut self, id: Option<&str>, last: u64) -> Option<Exit> {
        let id = id?;
        let req = GetStatusRequest {
            deployment_id: id.to_owned(),
        };
        let status = self.client.get_status(req).await.ok()?.into_inner();
        let exit = match status.state() {
            DeploymentState::Succeeded => Exit::Success,
            DeploymentState::Failed => Exit::Failed,
            DeploymentState::Cancelled => Exit::Cancelled,
            _ => return None,
        };
        if status.last_sequence > last {
            return None;
        }
        self.render.close();
        self.render.notice(&format!(
            "{} {id} has ended ({}) with update {}: nothing after update {last}",
            noun(status.operation()),
            state_name(status.state()),
            status.last_sequence
        ));
        Some(exit)
    }
}

/// `DEPLOYMENT_STATE_SUCCEEDED` → `succeeded`.
pub(crate) fn state_name(s: DeploymentState) -> String {
    super::render::human(s.as_str_name(), "DEPLOYMENT_STATE_")
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
