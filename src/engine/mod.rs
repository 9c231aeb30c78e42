//! The deployment engine: accepts deployments, runs each in its own task through its
//! phases (see [`run`]), keeps one deployment per app at a time ([`queue`]), and tracks
//! live and finished deployments for status, watch, list and cancel.
//!
//! Nothing here knows about gRPC: `api/` converts requests into [`DeploySpec`]s and
//! [`EngineError`]s into status codes.

mod apps;
mod deployment;
pub(crate) mod eta;
mod health;
mod history;
mod hooks;
mod milestones;
mod pull;
mod queue;
mod reconcile;
mod recover;
mod removal;
mod route;
mod run;
mod source;
mod swarm;
mod tty_progress;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use deployment::Deployment;
use deployment::{Extra, Reporter};
use queue::AppQueues;

pub(crate) use apps::AppView;
pub use route::RoutesReconciled;

use crate::events::{DeploymentLog, LogError, ObserverRegistry, UpdateStream};
use crate::limits::{Rejection, Rejections};
use crate::model::{AppName, DeploySpec, DeploymentId, DeploymentState, DeploymentStatus, Update};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{ListFilter, Retention, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("{0}")]
    Unavailable(RuntimeError),
    #[error(
        "deployment {0} not found (it never existed, or the retention setting removed it from history)"
    )]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(LogError),
    #[error("deployment {id} already ended ({})", state.as_str())]
    AlreadyFinished {
        id: DeploymentId,
        state: DeploymentState,
    },
    #[error("invalid page_token")]
    InvalidPageToken,
    #[error(
        "deployment_id: required (the ID in the first update of Deploy, or from ListDeployments)"
    )]
    MissingDeploymentId,
    #[error("the server is shutting down and accepts no new deployments")]
    ShuttingDown,
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A limit is reached; the caller may retry later.
    #[error("{message}")]
    Exhausted { limit: Rejection, message: String },
    /// An observer that must not miss events (the audit log) cannot take them now.
    #[error("{0}")]
    Refused(crate::events::ObserverError),
    /// The target cannot take deployments as it is (`--target swarm` on an engine that
    /// is not a swarm manager).
    #[error("{0}")]
    Precondition(String),
}

/// Tunables of the engine. Defaults suit a local engine.
#[derive(Clone, Debug)]
pub(crate) struct EngineConfig {
    /// How long the engine ping before accepting a deployment may take.
    pub(crate) ping_timeout: Duration,
    /// With no health check at all, how long the container must stay up.
    pub(crate) settle_time: Duration,
    /// How long CancelDeployment waits for the deployment to wind down.
    pub(crate) cancel_wait: Duration,
    /// How much history the store keeps (applied after each finished deployment).
    pub(crate) retention: Retention,
    /// Apps deploying at the same time; more get [`EngineError::Exhausted`].
    pub(crate) max_in_flight: usize,
    /// Deployments waiting for their app's lock (all apps); more get
    /// [`EngineError::Exhausted`].
    pub(crate) max_queued: usize,
    /// The host address ports are published on when the request names none.
    pub(crate) publish_ip: std::net::IpAddr,
    /// Deploys from source: one git cache per app under this directory
    /// (`DATA_DIR/sources` in the server).
    pub sources_dir: std::path::PathBuf,
    /// Deploys from source may fetch `file://` URLs and local paths (the server's own
    /// disk); off by default (`--allow-local-git`).
    pub allow_local_git: bool,
    /// The proxy that serves fixed host ports (`--proxy-socket`); `None`: fixed host
    /// ports are published by the engine directly.
    pub proxy: Option<crate::proxy::client::ProxyClient>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            ping_timeout: Duration::from_secs(3),
            settle_time: Duration::from_secs(2),
            cancel_wait: Duration::from_secs(30),
            retention: Retention::default(),
            max_in_flight: crate::limits::DEFAULT_MAX_IN_FLIGHT,
            max_queued: crate::limits::DEFAULT_MAX_QUEUED,
            publish_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            sources_dir: std::env::temp_dir().join("stevedore-sources"),
            allow_local_git: false,
            proxy: None,
        }
    }
}

/// The engine's state, shared by its handles and the deployment tasks.
pub(crate) struct Inner {
    runtime: Arc<dyn Runtime>,
    /// With `--target swarm`: apps run as services through this.
    swarm: Option<Arc<dyn crate::runtime::swarm::SwarmRuntime>>,
    observers: ObserverRegistry,
    /// The per-app queues, and admission.
    queues: AppQueues,
    config: EngineConfig,
    http: reqwest::Client,
    store: Store,
    live: Mutex<Live>,
    tasks: tokio_util::task::TaskTracker,
    accepting: AtomicBool,
    rejections: Arc<Rejections>,
    /// Containers the reconciler removed.
    reconciled: std::sync::atomic::AtomicU64,
    /// The apps' recent succeeded deployments, for the ETA.
    histories: Arc<history::Histories>,
}

/// Deployments held in memory, and their idempotency keys (under one lock, so a key
/// is checked and its deployment inserted at once).
#[derive(Default)]
struct Live {
    deployments: HashMap<DeploymentId, Arc<Deployment>>,
    idempotency: HashMap<(AppName, String), DeploymentId>,
    /// The logs of the last [`RECENT_LOGS`] deployments that ended, oldest first: a
    /// crowd watching a deployment that just ended replays it from memory instead of
    /// each watcher reading it back from the store (its status still comes from the
    /// store, so a deployment removed by retention is not found). Emptied whenever
    /// retention removes anything.
    recent: std::collections::VecDeque<(DeploymentId, Arc<DeploymentLog>)>,
}

/// How many ended deployments keep their log in memory for replays.
const RECENT_LOGS: usize = 8;

/// The engine. Only live deployments (queued or running) are held in memory; once a
/// deployment has ended and its log is on disk it is dropped from memory, and status,
/// watch, list and idempotency read it from the [`Store`] (a watch of one of the last
/// few to end replays its log from memory, once the store has its status).
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Filter and page of [`Engine::list`].
#[derive(Clone, Debug, Default)]
pub(crate) struct ListQuery {
    pub(crate) app: Option<AppName>,
    pub(crate) state: Option<DeploymentState>,
    pub(crate) page_size: usize,
    pub(crate) page_token: Option<String>,
}

pub(crate) struct ListPage {
    pub(crate) deployments: Vec<DeploymentStatus>,
    pub(crate) next_page_token: Option<String>,
}

/// What [`Engine::recover`] found and did.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recovery {
    /// Deployments that were in flight when the previous process stopped, now FAILED.
    pub(crate) interrupted: Vec<DeploymentId>,
    /// Containers of those deployments that were removed.
    pub(crate) containers_removed: usize,
    /// Deployments that were past the point of no return (SWITCHING or CLEANUP) when
    /// the previous process stopped, completed by recovery: their container is kept as
    /// the app's current version, now SUCCEEDED.
    pub completed: Vec<DeploymentId>,
    /// Removals (RemoveApp) that were queued or running, finished by recovery: every
    /// container of their app removed, now SUCCEEDED (FAILED if the engine refused).
    pub removals: Vec<DeploymentId>,
    /// Deployments to a swarm that were in flight, taken over by recovery: each is
    /// live again (RUNNING, holding its app's queue place) while its service's update
    /// is followed in the background, and ends SUCCEEDED ("completed by recovery") or
    /// FAILED after a rollback.
    pub following: Vec<DeploymentId>,
}

/// Runs `each` every `interval` (the first at once) until `shutdown`.
fn spawn_every<F, Fut>(
    interval: Duration,
    shutdown: CancellationToken,
    mut each: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => each().await,
            }
        }
    })
}

/// Updates of a live deployment held in memory (its most recent ones); a reader
/// further behind reads the earlier ones from the store. ~300 B each.
pub(crate) const LIVE_LOG_WINDOW: usize = 4096;

/// Reads a live log's trimmed start back from the store.
struct StoreBackfill {
    store: Store,
    id: DeploymentId,
}

impl crate::events::Backfill for StoreBackfill {
    fn read(
        &self,
        after: u64,
        max: usize,
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<Arc<Update>>, LogError>> {
        let (store, id) = (self.store.clone(), self.id);
        Box::pin(async move {
            // Trimmed updates were queued to the store before they were appended to
            // memory: after a flush they are all on disk.
            store.flush().await;
            match store.log_page(id, after, max).await {
                Ok(updates) => Ok(updates.into_iter().map(Arc::new).collect()),
                Err(e) => {
                    tracing::warn!(deployment_id = %id, error = %e, "reading a log back from the store failed");
                    Ok(Vec::new())
                }
            }
        })
    }
}

/// Default and maximum page sizes of ListDeployments.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
pub(crate) const MAX_PAGE_SIZE: usize = 500;

impl Engine {
    pub(crate) fn new(
        runtime: Arc<dyn Runtime>,
        observers: ObserverRegistry,
        config: EngineConfig,
        store: Store,
    ) -> Self {
        Self(Arc::new(Inner {
            runtime,
            swarm: None,
            observers,
            queues: AppQueues::new(config.max_in_flight, config.max_queued),
            config,
            http: reqwest::Client::new(),
            store,
            live: Mutex::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            accepting: AtomicBool::new(true),
            rejections: Arc::default(),
            reconciled: Default::default(),
            histories: Arc::default(),
        }))
    }

    /// An engine for the Swarm target: deployments run as services through `swarm`
    /// (`runtime` is the same engine's container side, for what the engine shares).
    pub(crate) fn with_swarm(
        runtime: Arc<dyn Runtime>,
        swarm: Arc<dyn crate::runtime::swarm::SwarmRuntime>,
        observers: ObserverRegistry,
        config: EngineConfig,
        store: Store,
    ) -> Self {
        let mut engine = Self::new(runtime, observers, config, store);
        Arc::get_mut(&mut engine.0).expect("a new engine").swarm = Some(swarm);
        engine
    }

    /// Where apps run.
    pub(crate) fn target(&self) -> crate::model::Target {
        match self.0.swarm {
            Some(_) => crate::model::Target::Swarm,
            None => crate::model::Target::Docker,
        }
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// Calls turned away, per limit (the gRPC layer records its own here too).
    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.0.rejections
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.0.live.lock().expect("live deployments lock")
    }

    /// Accepts a deployment and starts its task. Returns the deployment's ID and a
    /// stream of its updates from the first one. With an idempotency key already seen
    /// for the app (by this process or, through the store, an earlier one), returns
    /// the existing deployment, its stream replayed from the start.
    pub(crate) async fn deploy(
        &self,
        spec: DeploySpec,
    ) -> Result<(DeploymentId, UpdateStream), EngineError> {
        self.check_accepting()?;
        if let Some(found) = self.find_idempotent(&spec).await? {
            return Ok(found);
        }
        self.ping().await?;
        let id = DeploymentId::new();
        let ticket = self.admit(&spec.app, id)?;
        let log = self.live_log(id);
        let past = self.0.histories.load(&self.0.store, &spec.app).await;
        let eta = history::EtaTracker::new(&spec, past);
        let deployment = Arc::new(Deployment::with_log(id, spec, log));
        deployment.set_target(self.target());
        if let Some(existing) = self.register(&deployment) {
            let stream = existing.log.subscribe(0).map_err(EngineError::OutOfRange)?;
            return Ok((existing.id, stream));
        }
        let mut reporter = self.reporter(&deployment).with_eta(eta);
        reporter.accepted();
        if ticket.position() > 0 {
            reporter.queued(ticket.position(), ticket.ahead());
        }
        let stream = deployment
            .log
            .subscribe(0)
            .expect("a new log holds everything");
        match self.0.swarm.clone() {
            Some(swarm) => {
                let run = swarm::SwarmRun::new(reporter, swarm).run(ticket);
                self.spawn_task(&deployment, run);
            }
            None => {
                let run = run::Run::new(reporter, self.0.clone()).run(ticket);
                self.spawn_task(&deployment, run);
            }
        }
        Ok((id, stream))
    }

    /// New work is accepted: the server is not shutting down, and an observer that
    /// cannot record (the audit log) refuses new work rather than let it run
    /// unrecorded.
    fn check_accepting(&self) -> Result<(), EngineError> {
        if !self.0.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        self.0.observers.admit().map_err(EngineError::Refused)
    }

    /// Admission of `id` into `app`'s queue (a deployment or a removal), or the limit
    /// it ran into (counted).
    fn admit(&self, app: &AppName, id: DeploymentId) -> Result<queue::Ticket, EngineError> {
        self.0.queues.admit(app, id).map_err(|refused| {
            self.0.rejections.record(refused.limit);
            let message = match refused.limit {
                Rejection::Queued => format!(
                    "{} deployments are already queued (the limit); try again later",
                    refused.max
                ),
                _ => format!(
                    "{} apps are already deploying (the limit); try again later",
                    refused.max
                ),
            };
            tracing::warn!(app = %app, limit = refused.limit.as_str(), "deployment refused: {message}");
            EngineError::Exhausted {
                limit: refused.limit,
                message,
            }
        })
    }

    /// The log of a new deployment: its recent updates in memory, the rest read back
    /// from the store.
    fn live_log(&self, id: DeploymentId) -> DeploymentLog {
        DeploymentLog::bounded(
            LIVE_LOG_WINDOW,
            Arc::new(StoreBackfill {
                store: self.0.store.clone(),
                id,
            }),
        )
    }

    /// The log of a deployment taken over after a restart: it continues after
    /// `after` (the last stored update), and a reader from an earlier sequence reads
    /// the stored updates first.
    fn resumed_log(&self, id: DeploymentId, after: u64) -> DeploymentLog {
        DeploymentLog::resumed_bounded(
            after,
            LIVE_LOG_WINDOW,
            Arc::new(StoreBackfill {
                store: self.0.store.clone(),
                id,
            }),
        )
    }

    /// Holds a deployment taken over after a restart in memory again (it is in the
    /// store already): status, watch and cancel find it live until it ends.
    fn hold_recovered(&self, deployment: &Arc<Deployment>) {
        (self.live().deployments).insert(deployment.id, deployment.clone());
    }

    /// The writer of `deployment`'s log from its first update.
    fn reporter(&self, deployment: &Arc<Deployment>) -> Reporter {
        Reporter::new(
            deployment.clone(),
            self.0.observers.clone(),
            self.0.store.clone(),
        )
        .recording(self.0.histories.recorder(true))
    }

    /// The writer of `deployment`'s log after its last stored update (a deployment
    /// taken over after a restart, or one whose task is gone).
    fn resumed_reporter(&self, deployment: Arc<Deployment>) -> Reporter {
        Reporter::resume(deployment, self.0.observers.clone(), self.0.store.clone())
            .recording(self.0.histories.recorder(false))
    }

    /// The engine answers within the ping timeout (on the Swarm target: and is a
    /// swarm manager).
    async fn ping(&self) -> Result<(), EngineError> {
        let runtime = &self.0.runtime;
        let timeout = self.0.config.ping_timeout;
        if let Some(swarm) = &self.0.swarm {
            return match tokio::time::timeout(timeout, swarm.check_manager()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(RuntimeError::Call { reason, .. }))
                    if reason.contains(crate::runtime::swarm::NOT_A_MANAGER) =>
                {
                    Err(EngineError::Precondition(format!(
                        "--target swarm: {reason}"
                    )))
                }
                Ok(Err(e)) => Err(EngineError::Unavailable(e)),
                Err(_) => Err(EngineError::Unavailable(RuntimeError::Timeout {
                    op: "swarm check",
                    after: timeout,
                    endpoint: swarm.endpoint().to_owned(),
                })),
            };
        }
        match tokio::time::timeout(timeout, runtime.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EngineError::Unavailable(e)),
            Err(_) => Err(EngineError::Unavailable(RuntimeError::Timeout {
                op: "ping",
                after: timeout,
                endpoint: runtime.endpoint().to_owned(),
            })),
        }
    }

    /// Holds `deployment` in memory and queues it for the store, unless its
    /// idempotency key names a live deployment already: that one is returned. Checked
    /// and inserted under one lock, so two retries cannot both start.
    fn register(&self, deployment: &Arc<Deployment>) -> Option<Arc<Deployment>> {
        let mut live = self.live();
        if let Some(key) = &deployment.spec.idempotency_key {
            let k = (deployment.spec.app.clone(), key.clone());
            if let Some(existing) = live
                .idempotency
                .get(&k)
                .and_then(|id| live.deployments.get(id))
            {
                return Some(existing.clone());
            }
            live.idempotency.insert(k, deployment.id);
        }
        live.deployments.insert(deployment.id, deployment.clone());
        // Queued before its first update, so the store sees them in order.
        self.0.store.insert(&deployment.status(), &deployment.spec);
        None
    }

    /// Runs `task`, the task of `deployment` (a deploy's [`run::Run`], or a removal).
    /// A panic in it is caught: the deployment ends FAILED ("internal error"), so its
    /// log closes and its streams end.
    fn spawn_task(
        &self,
        deployment: &Arc<Deployment>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let span = span_of(deployment);
        tracing::info!(parent: &span, requested_by = %deployment.spec.requested_by, "deployment accepted");
        self.track(deployment.clone(), task, span);
    }

    /// Runs `task`, recovery's follow of `deployment` (taken over after a restart),
    /// as [`Engine::spawn_task`] runs a new deployment's.
    fn spawn_recovered(
        &self,
        deployment: &Arc<Deployment>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let span = span_of(deployment);
        tracing::warn!(parent: &span, "following a deployment interrupted by a restart");
        self.track(deployment.clone(), task, span);
    }

    /// Runs `task` in the engine's task set, within `span`: a panic ends `deployment`
    /// FAILED, shutdown waits for it, and it leaves memory once it ended.
    fn track(
        &self,
        deployment: Arc<Deployment>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
        span: tracing::Span,
    ) {
        let engine = self.clone();
        self.0.tasks.spawn(
            async move {
                // The queue and admission place (the ticket) is held until the
                // deployment has ended.
                if let Err(e) = tokio::spawn(task.in_current_span()).await {
                    engine.end_after_panic(&deployment, e).await;
                }
                engine.retire(&deployment).await;
            }
            .instrument(span),
        );
    }

    /// The deployment's task ended without its terminal update (it panicked): its
    /// containers are removed and it ends FAILED ("internal error").
    async fn end_after_panic(&self, deployment: &Arc<Deployment>, e: tokio::task::JoinError) {
        let reason = match e.try_into_panic() {
            Ok(panic) => (panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into()),
            Err(e) => e.to_string(),
        };
        tracing::error!(%reason, "the deployment task failed");
        if deployment.status().state.is_terminal() {
            return;
        }
        let mut reporter = self.resumed_reporter(deployment.clone());
        let phase = reporter.phase();
        let mut message = format!("internal error during {}: {reason}", phase.name());
        if self.0.swarm.is_some() {
            // The tasks' containers are Swarm's: never removed behind its back.
            message.push_str("; its service was left as it is");
        } else {
            match self.remove_containers_of(deployment).await {
                Ok(()) => message.push_str("; the containers of this deployment were removed"),
                Err(e) => message.push_str(&format!("; removing its containers failed: {e}")),
            }
        }
        reporter.fail(phase, "internal error", message, Extra::default());
    }

    /// Removes the containers labelled with `deployment`'s ID.
    async fn remove_containers_of(&self, deployment: &Deployment) -> Result<(), RuntimeError> {
        let runtime = &*self.0.runtime;
        let id = deployment.id.to_string();
        let all = runtime
            .list_app_containers(deployment.spec.app.as_str())
            .await?;
        let ours: Vec<_> = all.into_iter().filter(|c| c.deployment == id).collect();
        crate::runtime::remove_each(runtime, &ours, |_, r| r).await
    }

    /// After a deployment ended: once its log is on disk, drop it from memory (readers
    /// that hold its log keep reading it) and apply retention.
    async fn retire(&self, deployment: &Deployment) {
        self.0.store.flush().await;
        {
            let mut live = self.live();
            live.deployments.remove(&deployment.id);
            if live.recent.len() == RECENT_LOGS {
                live.recent.pop_front();
            }
            live.recent
                .push_back((deployment.id, deployment.log.clone()));
            if let Some(key) = &deployment.spec.idempotency_key {
                live.idempotency
                    .remove(&(deployment.spec.app.clone(), key.clone()));
            }
        }
        self.apply_retention().await;
    }

    /// Applies the retention setting to the store; logs what it removed.
    pub(crate) async fn apply_retention(&self) {
        let retention = &self.0.config.retention;
        if retention.max_deployments.is_none()
            && retention.max_age.is_none()
            && retention.max_log_updates.is_none()
        {
            return;
        }
        match self.0.store.apply_retention(retention).await {
            Ok(out) if out.deployments_removed > 0 || out.updates_removed > 0 => {
                // What the store no longer holds must not be replayed from memory.
                self.live().recent.clear();
                self.0.histories.clear();
                tracing::info!(
                    deployments = out.deployments_removed,
                    updates = out.updates_removed,
                    "retention removed history"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
    }

    /// Applies retention every `interval` (age-based retention needs time to pass;
    /// count-based runs after every finished deployment too) until `shutdown`.
    pub(crate) fn spawn_retention(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        spawn_every(interval, shutdown, move || {
            let engine = engine.clone();
            async move { engine.apply_retention().await }
        })
    }

    async fn find_idempotent(
        &self,
        spec: &DeploySpec,
    ) -> Result<Option<(DeploymentId, UpdateStream)>, EngineError> {
        let Some(key) = spec.idempotency_key.as_ref() else {
            return Ok(None);
        };
        let live = {
            let live = self.live();
            (live.idempotency.get(&(spec.app.clone(), key.clone())))
                .and_then(|id| live.deployments.get(id).cloned())
        };
        if let Some(d) = live {
            let stream = d.log.subscribe(0).map_err(EngineError::OutOfRange)?;
            return Ok(Some((d.id, stream)));
        }
        match self.0.store.find_idempotent(&spec.app, key).await? {
            Some(id) => Ok(Some((id, self.watch_id(id, 0).await?))),
            None => Ok(None),
        }
    }

    fn get(&self, id: DeploymentId) -> Option<Arc<Deployment>> {
        self.live().deployments.get(&id).cloned()
    }

    fn parse_id(id: &str) -> Result<DeploymentId, EngineError> {
        if id.trim().is_empty() {
            return Err(EngineError::MissingDeploymentId);
        }
        uuid::Uuid::parse_str(id)
            .map(DeploymentId)
            .map_err(|_| EngineError::NotFound(id.to_owned()))
    }

    pub(crate) async fn status(&self, id: &str) -> Result<DeploymentStatus, EngineError> {
        let id = Self::parse_id(id)?;
        if let Some(deployment) = self.get(id) {
            return Ok(deployment.status());
        }
        let mut status = self
            .0
            .store
            .status(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        self.mark_superseded(&mut status).await?;
        Ok(status)
    }

    /// Replays updates after `after_sequence`, then follows live until the terminal one.
    pub(crate) async fn watch(
        &self,
        id: &str,
        after_sequence: u64,
    ) -> Result<UpdateStream, EngineError> {
        self.watch_id(Self::parse_id(id)?, after_sequence).await
    }

    async fn watch_id(&self, id: DeploymentId, after: u64) -> Result<UpdateStream, EngineError> {
        if let Some(d) = self.get(id) {
            return d.log.subscribe(after).map_err(EngineError::OutOfRange);
        }
        let recent = self
            .live()
            .recent
            .iter()
            .find(|(ended, _)| *ended == id)
            .map(|(_, log)| log.clone());
        // Ended: replay from the store. Only the part after `after` is loaded.
        let status = self
            .0
            .store
            .status(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        if after > status.last_sequence && status.state.is_terminal() {
            return Err(EngineError::OutOfRange(LogError::Beyond {
                after,
                last: status.last_sequence,
            }));
        }
        if let Some(log) = recent {
            return log.subscribe(after).map_err(EngineError::OutOfRange);
        }
        let stored = self.0.store.log(id, after).await?;
        let oldest = stored.oldest.unwrap_or(status.last_sequence + 1);
        if after < status.last_sequence && after + 1 < oldest {
            return Err(EngineError::OutOfRange(LogError::OutOfRange {
                requested: after + 1,
                oldest,
            }));
        }
        let log = Arc::new(DeploymentLog::from_updates(stored.updates, true));
        log.subscribe(after)
            .or_else(|_| Arc::new(DeploymentLog::from_updates(Vec::new(), true)).subscribe(0))
            .map_err(EngineError::OutOfRange)
    }

    /// Deployments, newest first, from the store (with the live status of those still
    /// running). The page token is opaque to clients.
    pub(crate) async fn list(&self, query: &ListQuery) -> Result<ListPage, EngineError> {
        let before = match &query.page_token {
            None => None,
            Some(t) => Some(decode_token(t).ok_or(EngineError::InvalidPageToken)?),
        };
        let size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // Everything accepted so far is in the store once the writer caught up.
        self.0.store.flush().await;
        let rows = self
            .0
            .store
            .list(&ListFilter {
                app: query.app.clone(),
                state: query.state,
                before,
                limit: size + 1,
                operation: None,
            })
            .await?;
        let more = rows.len() > size;
        let mut deployments: Vec<DeploymentStatus> = rows.into_iter().take(size).collect();
        for s in deployments.iter_mut() {
            if let Some(d) = self.get(s.id) {
                let live = d.status();
                if query.state.is_none_or(|st| st == live.state) {
                    *s = live;
                }
            }
            self.mark_superseded(s).await?;
        }
        let next_page_token = if more {
            deployments.last().map(|s| encode_token(sort_key(s)))
        } else {
            None
        };
        Ok(ListPage {
            deployments,
            next_page_token,
        })
    }

    /// Cancels a queued or running deployment and waits (a bounded time) for it to
    /// wind down; returns its status.
    pub(crate) async fn cancel(&self, id: &str) -> Result<DeploymentStatus, EngineError> {
        let did = Self::parse_id(id)?;
        let Some(deployment) = self.get(did) else {
            let status = self.status(id).await?;
            return Err(EngineError::AlreadyFinished {
                id: did,
                state: status.state,
            });
        };
        let status = deployment.status();
        if status.state.is_terminal() {
            return Err(EngineError::AlreadyFinished {
                id: deployment.id,
                state: status.state,
            });
        }
        tracing::info!(deployment_id = %deployment.id, "cancel requested");
        deployment.cancel.cancel();
        let mut updates = deployment
            .log
            .subscribe(deployment.log.last_sequence())
            .map_err(EngineError::OutOfRange)?;
        let wait = async {
            use futures_util::StreamExt;
            while updates.next().await.is_some() {}
        };
        let _ = tokio::time::timeout(self.0.config.cancel_wait, wait).await;
        Ok(deployment.status())
    }

    /// How many known deployments are in each state (for gauges); removals are not
    /// counted.
    pub fn state_counts(&self) -> HashMap<DeploymentState, usize> {
        let mut counts = HashMap::new();
        for d in (self.live().deployments.values()).filter(|d| d.operation.is_deploy()) {
            *counts.entry(d.status().state).or_default() += 1;
        }
        counts
    }

    /// Stops accepting deployments; running ones continue.
    pub(crate) fn stop_accepting(&self) {
        self.0.accepting.store(false, Ordering::SeqCst);
    }

    /// Waits until every deployment task has ended (and its log is on disk).
    pub(crate) async fn drain(&self) {
        self.0.tasks.close();
        self.0.tasks.wait().await;
    }

    /// Interrupts every deployment still queued or running: each rolls back what it
    /// created and ends FAILED ("interrupted by server shutdown").
    pub(crate) fn interrupt_all(&self) {
        for d in self.live().deployments.values() {
            d.interrupt.cancel();
        }
    }
}

/// The span of a deployment's task.
fn span_of(deployment: &Deployment) -> tracing::Span {
    tracing::info_span!(
        "deployment",
        deployment_id = %deployment.id,
        operation = deployment.operation.as_str(),
        app = %deployment.spec.app,
        image = %deployment.spec.image,
    )
}

type SortKey = (u128, uuid::Uuid);

fn sort_key(s: &DeploymentStatus) -> SortKey {
    let nanos = s
        .created_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    (nanos, s.id.0)
}

fn encode_token((nanos, id): SortKey) -> String {
    format!("{nanos}.{}", id.simple())
}

fn decode_token(token: &str) -> Option<SortKey> {
    let (nanos, id) = token.split_once('.')?;
    Some((nanos.parse().ok()?, uuid::Uuid::parse_str(id).ok()?))
}

#[cfg(test)]
mod swarm_tests;
#[cfg(test)]
mod tests;
