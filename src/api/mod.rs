//! The gRPC layer: validates requests into domain types, calls the engine, converts
//! back. The only module that names tonic or generated types. No Docker here.

pub mod auth;
pub mod codec;
pub(crate) mod convert;
mod oversized;
pub(crate) mod policy;
pub mod wire;

/// The Deployer service as this server runs it: generated from the same proto, its
/// streams yielding [`wire::StreamedUpdate`] (see `build.rs`).
pub mod service {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/service/stevedore.v1.rs"));
}

pub(crate) use oversized::count_oversized_requests;

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError, ListQuery};
use crate::events::{LogError, UpdateStream};
use crate::limits::Rejection;
use crate::model::{AppName, DeploymentState, EventKind, Update};
use crate::proto;
use service::deployer_server::Deployer;
use wire::StreamedUpdate;

/// The one mapping from engine errors to gRPC status codes.
pub(crate) fn status_of(e: EngineError) -> Status {
    let message = e.to_string();
    match e {
        EngineError::Unavailable(_) | EngineError::ShuttingDown | EngineError::Refused(_) => {
            Status::unavailable(message)
        }
        EngineError::NotFound(_) => Status::not_found(message),
        EngineError::OutOfRange(ref e) => out_of_range(message, e),
        EngineError::AlreadyFinished { .. } => Status::failed_precondition(message),
        EngineError::InvalidPageToken => Status::invalid_argument(format!("page_token: {message}")),
        EngineError::MissingDeploymentId => Status::invalid_argument(message),
        EngineError::Store(_) => Status::internal(message),
        EngineError::Exhausted { .. } => Status::resource_exhausted(message),
        EngineError::Precondition(_) => Status::failed_precondition(message),
    }
}

/// Metadata key of an OUT_OF_RANGE status for a resume point removed by retention:
/// the oldest sequence still held.
pub(crate) const OLDEST_SEQUENCE: &str = "oldest-sequence";

fn out_of_range(message: String, e: &LogError) -> Status {
    let mut status = Status::out_of_range(message);
    if let LogError::OutOfRange { oldest, .. } = e
        && let Ok(v) = oldest.to_string().parse()
    {
        status.metadata_mut().insert(OLDEST_SEQUENCE, v);
    }
    status
}

pub(crate) struct DeployerService {
    engine: Engine,
    shutdown: CancellationToken,
    streams: StreamConfig,
    policy: policy::DeployPolicy,
    /// One permit per open WatchDeployment stream.
    watch_streams: Arc<Semaphore>,
    max_watch_streams: usize,
    refusals: auth::Refusals,
}

/// How update streams (Deploy and WatchDeployment) are fed to clients.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// A heartbeat is sent when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    /// Updates buffered per stream between the log and the client's connection.
    pub buffer: usize,
    /// A stream whose buffer stays full this long (the client reads nothing) is ended
    /// with RESOURCE_EXHAUSTED naming the sequence to resume from.
    pub stall_timeout: Duration,
}

impl DeployerService {
    pub(crate) fn with_streams(
        engine: Engine,
        shutdown: CancellationToken,
        streams: StreamConfig,
    ) -> Self {
        Self {
            engine,
            shutdown,
            streams,
            policy: policy::DeployPolicy::default(),
            watch_streams: Arc::new(Semaphore::new(crate::limits::DEFAULT_MAX_WATCH_STREAMS)),
            max_watch_streams: crate::limits::DEFAULT_MAX_WATCH_STREAMS,
            refusals: auth::Refusals::default(),
        }
    }

    /// Where refusals (policy, watch-stream limit) are counted and published.
    pub(crate) fn with_refusals(mut self, refusals: auth::Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// Applies `policy` to every Deploy.
    pub(crate) fn with_policy(mut self, policy: policy::DeployPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Caps the open WatchDeployment streams at `max`.
    pub(crate) fn with_max_watch_streams(mut self, max: usize) -> Self {
        self.watch_streams = Arc::new(Semaphore::new(max));
        self.max_watch_streams = max;
        self
    }

    fn forward(
        &self,
        id: String,
        updates: UpdateStream,
        caller: Option<auth::Caller>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> UpdateResponseStream {
        forward(
            id,
            updates,
            self.shutdown.clone(),
            self.streams,
            caller,
            permit,
        )
    }
}

/// Turns a subscriber's view of a log into a gRPC stream.
///
/// A producer task reads the log at the subscriber's own cursor and feeds a bounded
/// channel of `config.buffer` updates; the client drains it at its pace. A slow
/// client slows nobody: the deployment appends to the log regardless, and when the
/// client catches up the producer reads on from the log (nothing skipped). Heartbeats
/// fill silences. The stream ends after the terminal update, or with a status naming
/// the sequence to resume from (`after_sequence` = the last update the client got):
/// `UNAVAILABLE` on server shutdown, `RESOURCE_EXHAUSTED` when the client read nothing
/// for `config.stall_timeout` with its buffer full, `OUT_OF_RANGE` if the log no longer
/// holds what it needs.
///
/// Memory per stream: the producer task with one timer (the heartbeat's, moved on
/// only when it fires), the channel (≤ `buffer` shared pointers into the log: an
/// update is converted to its message as the connection takes it), one batch of
/// shared pointers, and tonic's encode buffer ([`codec::ENCODE_BUFFER`] to start).
///
/// `caller` is the authenticated caller: the stream ends with `UNAUTHENTICATED` when
/// its token is removed from the tokens file. `permit` (a watch-stream slot) is held
/// until the stream ends.
pub fn forward(
    id: String,
    updates: UpdateStream,
    shutdown: CancellationToken,
    config: StreamConfig,
    caller: Option<auth::Caller>,
    permit: Option<OwnedSemaphorePermit>,
) -> UpdateResponseStream {
    let (tx, rx) = mpsc::channel(config.buffer.max(1));
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let producer = Producer {
        sent: updates.cursor(),
        sent_at: Instant::now(),
        last: None,
        id,
        updates,
        config,
        caller,
        tx,
    };
    tokio::spawn(async move {
        let _permit = permit;
        // `run` drops the channel's sender before the closing status follows it.
        if let Some(status) = producer.run(shutdown).await {
            let _ = end_tx.send(status);
        }
    });
    let end = futures_util::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
    Box::pin(ReceiverStream::new(rx).map(Ok).chain(end))
}

/// The task behind one [`forward`]ed stream. `Break(None)`: the stream ends without a
/// status (after the terminal update, or the client left); `Break(Some(status))`: it
/// ends with that status.
struct Producer {
    id: String,
    updates: UpdateStream,
    config: StreamConfig,
    caller: Option<auth::Caller>,
    tx: mpsc::Sender<StreamedUpdate>,
    /// Sequence of the last update placed in the channel: where to resume from.
    sent: u64,
    /// When something was last placed in the channel (a heartbeat is due
    /// `heartbeat_interval` later).
    sent_at: Instant,
    /// What a heartbeat repeats: the last update's app, phase and progress, so a
    /// client that draws every message does not see its bar go back to zero.
    last: Option<Arc<Update>>,
}

/// The futures a producer waits on for its whole life, registered once (not once per
/// update): server shutdown and the heartbeat's timer.
struct Waits {
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    heartbeat: Pin<Box<tokio::time::Sleep>>,
}

impl Producer {
    async fn run(mut self, shutdown: CancellationToken) -> Option<Status> {
        let mut waits = Waits {
            shutdown: Box::pin(shutdown.cancelled_owned()),
            heartbeat: Box::pin(tokio::time::sleep(self.config.heartbeat_interval)),
        };
        loop {
            let next = match self.next(&mut waits).await {
                ControlFlow::Continue(next) => next,
                ControlFlow::Break(end) => return end,
            };
            let message = match next {
                Some(u) => {
                    self.last = Some(u.clone());
                    StreamedUpdate::Logged(u)
                }
                None => StreamedUpdate::Heartbeat(Box::new(heartbeat(
                    &self.id,
                    self.sent,
                    self.last.as_deref(),
                ))),
            };
            let update = match &message {
                StreamedUpdate::Logged(u) => Some((u.sequence, u.is_terminal())),
                StreamedUpdate::Heartbeat(_) => None,
            };
            if let ControlFlow::Break(end) = self.send(&mut waits, message, update).await {
                return end;
            }
        }
    }

    /// The next update, or `None` when a heartbeat is due.
    async fn next(
        &mut self,
        waits: &mut Waits,
    ) -> ControlFlow<Option<Status>, Option<Arc<Update>>> {
        let caller = &mut self.caller;
        let revoked = async {
            match caller.as_mut() {
                Some(c) => c.revoked().await,
                None => std::future::pending().await,
            }
        };
        let sent = self.sent;
        let due = self.sent_at + self.config.heartbeat_interval;
        let heartbeat = async {
            // The timer is moved only when it fires before the heartbeat is due
            // (something was sent since it was set): a busy stream does not touch the
            // timer wheel once per update.
            loop {
                waits.heartbeat.as_mut().await;
                if waits.heartbeat.deadline() >= due {
                    break;
                }
                waits.heartbeat.as_mut().reset(due);
            }
        };
        tokio::select! {
            biased;
            _ = &mut waits.shutdown => ControlFlow::Break(Some(shutting_down(&self.id, sent))),
            _ = revoked => {
                let name = self.caller.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                tracing::info!(caller = %name, "token revoked: closing its stream");
                ControlFlow::Break(Some(Status::unauthenticated(format!("token {name:?} was revoked"))))
            }
            next = self.updates.next() => match next {
                None => ControlFlow::Break(None),
                Some(Ok(u)) => ControlFlow::Continue(Some(u)),
                Some(Err(e @ LogError::OutOfRange { .. })) => ControlFlow::Break(Some(out_of_range(
                    format!("{e}; updates after sequence {sent} are no longer held"), &e
                ))),
                Some(Err(e @ LogError::Beyond { .. })) => ControlFlow::Break(Some(Status::out_of_range(e.to_string()))),
            },
            _ = heartbeat => ControlFlow::Continue(None),
            // The client left: stop forwarding (the deployment goes on).
            _ = self.tx.closed() => ControlFlow::Break(None),
        }
    }

    /// Places `message` in the channel, waiting at most the stall timeout for room.
    /// `update` is the sequence of the update it carries and whether it is terminal.
    async fn send(
        &mut self,
        waits: &mut Waits,
        message: StreamedUpdate,
        update: Option<(u64, bool)>,
    ) -> ControlFlow<Option<Status>> {
        let sent = self.sent;
        tokio::select! {
            biased;
            _ = &mut waits.shutdown => ControlFlow::Break(Some(shutting_down(&self.id, sent))),
            r = self.tx.send_timeout(message, self.config.stall_timeout) => match r {
                Ok(()) => {
                    self.sent_at = Instant::now();
                    match update {
                        Some((sequence, terminal)) => {
                            self.sent = sequence;
                            if terminal {
                                ControlFlow::Break(None)
                            } else {
                                ControlFlow::Continue(())
                            }
                        }
                        None => ControlFlow::Continue(()),
                    }
                }
                Err(SendTimeoutError::Timeout(_)) => {
                    tracing::info!(deployment_id = %self.id, after_sequence = sent, "ending a stalled update stream");
                    ControlFlow::Break(Some(Status::resource_exhausted(format!(
                        "this stream read nothing for {}s and fell behind; resume with WatchDeployment after_sequence={sent}",
                        self.config.stall_timeout.as_secs_f64()
                    ))))
                }
                // The client left: stop forwarding (the deployment goes on).
                Err(SendTimeoutError::Closed(_)) => ControlFlow::Break(None),
            },
        }
    }
}

/// The status a stream ends with when the server shuts down.
fn shutting_down(id: &str, sent: u64) -> Status {
    Status::unavailable(format!(
        "server shutting down; resume with WatchDeployment deployment_id={id} after_sequence={sent}"
    ))
}

/// A heartbeat: not part of the log; repeats the last delivered sequence, and the
/// last delivered update's app, phase and progress.
fn heartbeat(id: &str, sequence: u64, last: Option<&Update>) -> proto::ProgressUpdate {
    let mut m = proto::ProgressUpdate {
        deployment_id: id.to_owned(),
        sequence,
        level: proto::Level::Verbose as i32,
        message: "heartbeat".into(),
        timestamp: Some(convert::timestamp(std::time::SystemTime::now())),
        heartbeat: true,
        ..Default::default()
    };
    if let Some(u) = last {
        m.app = u.app.to_string();
        m.phase = convert::phase(u.phase) as i32;
        m.phase_progress = u.phase_progress;
        m.total_progress = u.total_progress;
    }
    m
}

pub(crate) type UpdateResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamedUpdate, Status>> + Send>>;

/// Who is calling: the token's name when auth is on, else the peer address.
fn caller<T>(req: &Request<T>) -> String {
    if let Some(c) = req.extensions().get::<auth::Caller>() {
        return c.name.clone();
    }
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn authenticated<T>(req: &Request<T>) -> Option<auth::Caller> {
    req.extensions().get::<auth::Caller>().cloned()
}

#[tonic::async_trait]
impl Deployer for DeployerService {
    type DeployStream = UpdateResponseStream;
    type WatchDeploymentStream = UpdateResponseStream;

    async fn deploy(
        &self,
        request: Request<proto::DeployRequest>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        let who = caller(&request);
        let authed = authenticated(&request);
        let peer = request.remote_addr();
        let spec = convert::deploy_spec(request.into_inner(), who)?;
        if spec.replicas > 1 && self.engine.target() == crate::model::Target::Docker {
            return Err(Status::invalid_argument(format!(
                "replicas: {} asked, but this server runs apps as single containers (--target docker); deploy more than 1 replica with --target swarm",
                spec.replicas
            )));
        }
        if self.engine.target() == crate::model::Target::Swarm
            && let Some(i) = spec.ports.iter().position(|p| p.host_port == 0)
        {
            return Err(Status::invalid_argument(format!(
                "ports[{i}].host_port: the swarm target publishes each port in host mode on every node that runs a task; give a fixed host port"
            )));
        }
        if let Err(refused) = self.policy.check(&spec) {
            let caller = authed.as_ref().map(|c| c.name.clone());
            let event = auth::refusal("Deploy", caller, peer, refused.code(), refused.message());
            self.refusals.refuse(Rejection::Policy, event);
            return Err(refused);
        }
        let (id, updates) = self.engine.deploy(spec).await.map_err(status_of)?;
        Ok(Response::new(self.forward(
            id.to_string(),
            updates,
            authed,
            None,
        )))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::DeploymentStatus>, Status> {
        let id = &request.get_ref().deployment_id;
        let status = self.engine.status(id).await.map_err(status_of)?;
        Ok(Response::new(convert::status(&status)))
    }

    async fn watch_deployment(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        let permit = self
            .watch_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.refusals.count(Rejection::WatchStreams);
                tracing::warn!(
                    max = self.max_watch_streams,
                    "watch stream refused: limit reached"
                );
                Status::resource_exhausted(format!(
                    "{} watch streams are open (the limit); try again later",
                    self.max_watch_streams
                ))
            })?;
        let r = request.get_ref();
        let updates = self
            .engine
            .watch(&r.deployment_id, r.after_sequence)
            .await
            .map_err(status_of)?;
        Ok(Response::new(self.forward(
            r.deployment_id.clone(),
            updates,
            authenticated(&request),
            Some(permit),
        )))
    }

    async fn list_deployments(
        &self,
        request: Request<proto::ListDeploymentsRequest>,
    ) -> Result<Response<proto::ListDeploymentsResponse>, Status> {
        let r = request.into_inner();
        let app = match r.app.as_str() {
            "" => None,
            a => {
                Some(AppName::parse(a).map_err(|e| Status::invalid_argument(format!("app: {e}")))?)
            }
        };
        let query = ListQuery {
            app,
            state: convert::state_filter(r.state)?,
            page_size: r.page_size as usize,
            page_token: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let page = self.engine.list(&query).await.map_err(status_of)?;
        Ok(Response::new(proto::ListDeploymentsResponse {
            deployments: page.deployments.iter().map(convert::status).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn list_apps(
        &self,
        _request: Request<proto::ListAppsRequest>,
    ) -> Result<Response<proto::ListAppsResponse>, Status> {
        let apps = self.engine.apps().await.map_err(status_of)?;
        Ok(Response::new(proto::ListAppsResponse {
            apps: apps.iter().map(convert::app).collect(),
        }))
    }

    async fn remove_app(
        &self,
        request: Request<proto::RemoveAppRequest>,
    ) -> Result<Response<proto::RemoveAppResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let (app, grace) = convert::removal(&r)?;
        let (id, mut updates) =
            (self.engine.remove_app(app.clone(), who, grace).await).map_err(status_of)?;
        let mut response = proto::RemoveAppResponse {
            app: app.to_string(),
            deployment_id: id.to_string(),
            ..Default::default()
        };
        if r.detach {
            return Ok(Response::new(response));
        }
        // Waits for the end (the removal goes on if the caller leaves).
        let end = loop {
            match updates.next().await {
                Some(Ok(u)) if u.is_terminal() => break u,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(status_of(EngineError::OutOfRange(e))),
                None => return Err(Status::internal("the removal ended without its result")),
            }
        };
        let result = end.result.clone().unwrap_or_default();
        match end.kind {
            EventKind::Finished {
                state: DeploymentState::Succeeded,
            } => {
                response.containers_removed = result.containers_removed;
                response.removed_at = Some(convert::timestamp(end.timestamp));
                Ok(Response::new(response))
            }
            EventKind::Finished {
                state: DeploymentState::Cancelled,
            } => Err(Status::aborted(format!("removal {id}: {}", result.message))),
            _ => Err(Status::unavailable(format!(
                "removal {id} failed: {}",
                result.message
            ))),
        }
    }

    async fn cancel_deployment(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::CancelResponse>, Status> {
        let status = self
            .engine
            .cancel(&request.get_ref().deployment_id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::CancelResponse {
            status: Some(convert::status(&status)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::DeploymentLog;
    use crate::model::*;
    use std::sync::Arc;

    fn update(seq: u64, terminal: bool) -> Update {
        Update::for_test(seq, terminal)
    }

    fn config(buffer: usize, stall_ms: u64, heartbeat_ms: u64) -> StreamConfig {
        StreamConfig {
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            buffer,
            stall_timeout: Duration::from_millis(stall_ms),
        }
    }

    /// The stream's messages as the client decodes them.
    fn messages(
        stream: UpdateResponseStream,
    ) -> impl Stream<Item = Result<proto::ProgressUpdate, Status>> + Unpin {
        stream.map(|r| {
            r.map(|m| {
                let bytes = prost::Message::encode_to_vec(&m);
                <proto::ProgressUpdate as prost::Message>::decode(bytes.as_slice()).unwrap()
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn silence_brings_heartbeats_with_the_last_sequence() {
        let log = Arc::new(DeploymentLog::new());
        log.append(update(1, false));
        let mut second = update(2, false);
        (second.phase, second.phase_progress, second.total_progress) =
            (crate::model::Phase::Pulling, 0.5, 0.3);
        log.append(second);
        let mut stream = messages(forward(
            "id".into(),
            log.subscribe(0).unwrap(),
            CancellationToken::new(),
            config(8, 60_000, 1_000),
            None,
            None,
        ));
        for seq in 1..=2 {
            let u = stream.next().await.unwrap().unwrap();
            assert_eq!((u.sequence, u.heartbeat), (seq, false));
        }
        let hb = stream.next().await.unwrap().unwrap();
        assert!(hb.heartbeat);
        assert_eq!((hb.sequence, hb.app.as_str()), (2, "app"));
        // It carries the last progress and phase, not 0 (issue 17).
        assert_eq!(
            (hb.total_progress, hb.phase_progress, hb.phase()),
            (0.3, 0.5, proto::Phase::Pulling)
        );
        log.append(update(3, true));
        // Heartbeats are not part of the log: the next real update follows on.
        let mut next = stream.next().await.unwrap().unwrap();
        while next.heartbeat {
            next = stream.next().await.unwrap().unwrap();
        }
        assert_eq!(next.sequence, 3);
        assert!(
            stream.next().await.is_none(),
            "ends after the terminal update"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_naming_where_to_resume() {
        let log = Arc::new(DeploymentLog::new());
        for s in 1..=10 {
            log.append(update(s, false));
        }
        let mut stream = messages(forward(
            "id".into(),
            log.subscribe(0).unwrap(),
            CancellationToken::new(),
            config(2, 500, 60_000),
            None,
            None,
        ));
        // The client reads nothing for longer than the stall timeout; the writer goes
        // on meanwhile.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for s in 11..=20 {
            log.append(update(s, s == 20));
        }
        let mut got = Vec::new();
        let status = loop {
            match stream.next().await.expect("ends with a status") {
                Ok(u) => got.push(u.sequence),
                Err(status) => break status,
            }
        };
        assert_eq!(got, vec![1, 2], "what was buffered is delivered first");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("after_sequence=2"),
            "{}",
            status.message()
        );
        assert!(stream.next().await.is_none());
        // Resuming from there gives the rest, gap-free.
        let rest: Vec<u64> = messages(forward(
            "id".into(),
            log.subscribe(2).unwrap(),
            CancellationToken::new(),
            config(2, 500, 60_000),
            None,
            None,
        ))
        .map(|u| u.unwrap().sequence)
        .collect()
        .await;
        assert_eq!(rest, (3..=20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn shutdown_ends_streams_with_unavailable_and_the_resume_sequence() {
        let log = Arc::new(DeploymentLog::new());
        log.append(update(1, false));
        log.append(update(2, false));
        let shutdown = CancellationToken::new();
        let mut stream = messages(forward(
            "id".into(),
            log.subscribe(0).unwrap(),
            shutdown.clone(),
            config(8, 60_000, 60_000),
            None,
            None,
        ));
        assert_eq!(stream.next().await.unwrap().unwrap().sequence, 1);
        assert_eq!(stream.next().await.unwrap().unwrap().sequence, 2);
        shutdown.cancel();
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        // It names the deployment and the sequence (issue 17).
        assert!(
            status
                .message()
                .contains("deployment_id=id after_sequence=2"),
            "{}",
            status.message()
        );
        assert!(stream.next().await.is_none());
    }
}
