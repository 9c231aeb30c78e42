//! Follows one deployment's updates to its end and turns that end into the exit code.
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
use super::render::Render;
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
        let (mut stream, mut id, mut last) = match start {
            Start::Deploy(s) => (Some(s), None, 0),
            Start::Watch { id, after } => (None, Some(id), after),
        };
        let mut client = self.client.clone();
        // Since when the stream is broken, and why.
        let mut broken: Option<(Instant, String)> = None;
        let mut backoff = Duration::ZERO;
        let mut cancel: Option<JoinHandle<Result<CancelResponse, Status>>> = None;
        let mut cancelling = false;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.interrupts.recv() => Event::Interrupt,
                _ = sleep_until(self.deadline) => Event::Timeout,
                r = async { cancel.as_mut().unwrap().await }, if cancel.is_some() => {
                    cancel = None;
                    Event::CancelAnswered(r.unwrap_or_else(|e| Err(Status::unknown(e.to_string()))))
                }
                e = async {
                    match stream.as_mut() {
                        Some(s) => Event::Message(s.message().await),
                        None => {
                            tokio::time::sleep(backoff).await;
                            let req = WatchRequest {
                                deployment_id: id.clone().unwrap_or_default(),
                                after_sequence: last,
                            };
                            Event::Watched(client.watch_deployment(req).await.map(|r| r.into_inner()))
                        }
                    }
                } => e,
            };
            match event {
                Event::Message(Ok(Some(u))) => {
                    if id.is_none() {
                        id = Some(u.deployment_id.clone());
                    }
                    // The stream answers: any break is over.
                    if broken.take().is_some() {
                        backoff = Duration::ZERO;
                    }
                    if u.heartbeat || u.sequence <= last {
                        continue;
                    }
                    if u.sequence != last + 1 {
                        self.render.notice(&format!(
                            "stevedore: expected update {} but got {}; resuming after {last}",
                            last + 1,
                            u.sequence
                        ));
                        stream = None;
                        continue;
                    }
                    last = u.sequence;
                    self.render.update(&u);
                    if u.result.is_some() {
                        self.render.close();
                        return exit_of(&u);
                    }
                }
                Event::Message(Ok(None)) => {
                    if id.is_none() {
                        return self.fail(Failure {
                            exit: Exit::Rpc,
                            message: format!(
                                "the server at {} ended the stream before accepting the deployment",
                                self.connect.url()
                            ),
                        });
                    }
                    stream = None;
                    // `watch --after N` of a deployment that ended at or before N
                    // ends at once: the end is then the status's.
                    if let Some(exit) = self.ended_before(id.as_deref(), last).await {
                        return exit;
                    }
                    let why = || "the stream ended before the deployment did".to_owned();
                    if let Some(exit) = self.still_broken(&mut broken, &mut backoff, why, &id, last)
                    {
                        return exit;
                    }
                }
                Event::Message(Err(status)) => {
                    if id.is_none() || !resumable(&status) {
                        return self.fail(self.connect.failure(&status));
                    }
                    stream = None;
                    if broken.is_none() {
                        let why = self.connect.failure(&status).message;
                        self.render.notice(&format!(
                            "stevedore: lost the stream ({why}); resuming after update {last}"
                        ));
                    }
                    let why = || self.connect.failure(&status).message;
                    if let Some(exit) = self.still_broken(&mut broken, &mut backoff, why, &id, last)
                    {
                        return exit;
                    }
                }
                Event::Watched(Ok(s)) => stream = Some(s),
                Event::Watched(Err(status)) => {
                    if !resumable(&status) {
                        let mut f = self.connect.failure(&status);
                        if status.code() == Code::OutOfRange {
                            f.message = format!(
                                "cannot resume after update {last}: the server no longer holds \
                                 the updates after it (OUT_OF_RANGE: {})",
                                status.message()
                            );
                        }
                        return self.fail(f);
                    }
                    let why = || self.connect.failure(&status).message;
                    if let Some(exit) = self.still_broken(&mut broken, &mut backoff, why, &id, last)
                    {
                        return exit;
                    }
                }
                Event::CancelAnswered(Ok(_)) => {}
                Event::CancelAnswered(Err(status)) => {
                    let f = self.connect.failure(&status);
                    self.render
                        .notice(&format!("stevedore: cancel failed: {}", f.message));
                }
                Event::Interrupt => {
                    let Some(id) = id.clone() else {
                        return self.leave(
                            Exit::Interrupted,
                            "stevedore: interrupted before the server accepted the deployment \
                             (see `stevedore list`)"
                                .into(),
                        );
                    };
                    if self.opts.cancel_on_interrupt && !cancelling {
                        cancelling = true;
                        self.render.notice(&format!(
                            "stevedore: cancelling deployment {id} (Ctrl-C again to leave at once)"
                        ));
                        let mut c = self.client.clone();
                        let req = CancelRequest {
                            deployment_id: id.clone(),
                        };
                        cancel = Some(tokio::spawn(async move {
                            c.cancel_deployment(req).await.map(|r| r.into_inner())
                        }));
                        continue;
                    }
                    let hints = self.hints(&id, last);
                    return self.leave(
                        Exit::Interrupted,
                        format!("stevedore: detached; deployment {id} keeps running\n{hints}"),
                    );
                }
                Event::Timeout => {
                    let Some(id) = id.clone() else {
                        return self.leave(
                            Exit::Timeout,
                            "stevedore: --timeout ran out before the server accepted the deployment"
                                .into(),
                        );
                    };
                    let hints = self.hints(&id, last);
                    return self.leave(
                        Exit::Timeout,
                        format!(
                            "stevedore: --timeout ran out; deployment {id} keeps running\n{hints}"
                        ),
                    );
                }
            }
        }
    }
}

impl Follower<'_> {
    /// Notes one more failed attempt on a broken stream: the next wait (doubling from
    /// [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`]), or, once `--reconnect-timeout` has
    /// passed since the break, the exit with the command to resume by hand.
    fn still_broken(
        &mut self,
        broken: &mut Option<(Instant, String)>,
        backoff: &mut Duration,
        why: impl FnOnce() -> String,
        id: &Option<String>,
        last: u64,
    ) -> Option<Exit> {
        let (since, why) = broken.get_or_insert_with(|| (Instant::now(), why()));
        if since.elapsed() < self.opts.reconnect_timeout {
            *backoff = (*backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
            return None;
        }
        let id = id.as_deref().unwrap_or_default();
        let flags = self.connect.flags_for_hint();
        self.render.close();
        eprintln!(
            "stevedore: could not resume within {} ({why}); the deployment may still be \
             running. Resume with: stevedore watch {id} --after {last}{flags}",
            humantime::format_duration(self.opts.reconnect_timeout)
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
            "deployment {id} has ended ({}) with update {}: nothing after update {last}",
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
