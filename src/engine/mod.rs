//! The deployment engine: accepts deployments, runs each in its own task through its
//! phases (see [`run`]), keeps one deployment per app at a time ([`queue`]), and tracks
//! live and finished deployments for status, watch, list and cancel.
//!
//! Nothing here knows about gRPC: `api/` converts requests into [`DeploySpec`]s and
//! [`EngineError`]s into status codes.

mod admission;
mod deployment;
pub mod eta;
mod hooks;
mod milestones;
mod pull;
mod queue;
mod run;
pub mod tty_progress;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use tracing::Instrument;

pub use deployment::Deployment;
use deployment::Reporter;
pub use queue::AppQueues;

use crate::events::{DeploymentLog, LogError, ObserverRegistry, UpdateStream};
use crate::limits::{Rejection, Rejections};
use crate::model::{
    AppName, DeploySpec, DeploymentId, DeploymentResult, DeploymentState, DeploymentStatus,
    EventKind, FailureDiagnostics, Level, Phase, Update,
};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{ListFilter, Retention, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
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
}

/// Tunables of the engine. Defaults suit a local engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long the engine ping before accepting a deployment may take.
    pub ping_timeout: Duration,
    /// With no health check at all, how long the container must stay up.
    pub settle_time: Duration,
    /// How long CancelDeployment waits for the deployment to wind down.
    pub cancel_wait: Duration,
    /// How much history the store keeps (applied after each finished deployment).
    pub retention: Retention,
    /// Apps deploying at the same time; more get [`EngineError::Exhausted`].
    pub max_in_flight: usize,
    /// Deployments waiting for their app's lock (all apps); more get
    /// [`EngineError::Exhausted`].
    pub max_queued: usize,
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
        }
    }
}

/// What a deployment task needs besides its own deployment.
pub(crate) struct EngineContext {
    runtime: Arc<dyn Runtime>,
    observers: ObserverRegistry,
    queues: AppQueues,
    config: EngineConfig,
    http: reqwest::Client,
    store: Store,
}

/// The engine. Only live deployments (queued or running) are held in memory; once a
/// deployment has ended and its log is on disk it is dropped from memory, and status,
/// watch, list and idempotency read it from the [`Store`].
#[derive(Clone)]
pub struct Engine {
    ctx: Arc<EngineContext>,
    deployments: Arc<RwLock<HashMap<DeploymentId, Arc<Deployment>>>>,
    idempotency: Arc<RwLock<HashMap<(AppName, String), DeploymentId>>>,
    tasks: tokio_util::task::TaskTracker,
    accepting: Arc<std::sync::atomic::AtomicBool>,
    admission: Arc<admission::Admission>,
    rejections: Arc<Rejections>,
}

/// Filter and page of [`Engine::list`].
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub app: Option<AppName>,
    pub state: Option<DeploymentState>,
    pub page_size: usize,
    pub page_token: Option<String>,
}

pub struct ListPage {
    pub deployments: Vec<DeploymentStatus>,
    pub next_page_token: Option<String>,
}

/// What [`Engine::recover`] found and did.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Deployments that were in flight when the previous process stopped, now FAILED.
    pub interrupted: Vec<DeploymentId>,
    /// Containers of those deployments that were removed.
    pub containers_removed: usize,
}

/// Updates of a live deployment held in memory (its most recent ones); a reader
/// further behind reads the earlier ones from the store. ~300 B each.
pub const LIVE_LOG_WINDOW: usize = 4096;

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
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

impl Engine {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        observers: ObserverRegistry,
        config: EngineConfig,
        store: Store,
    ) -> Self {
        let admission = admission::Admission::new(config.max_in_flight, config.max_queued);
        Self {
            ctx: Arc::new(EngineContext {
                runtime,
                observers,
                queues: AppQueues::default(),
                config,
                http: reqwest::Client::new(),
                store,
            }),
            deployments: Default::default(),
            idempotency: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            accepting: Arc::new(true.into()),
            admission,
            rejections: Arc::default(),
        }
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.ctx.runtime
    }

    pub fn observers(&self) -> &ObserverRegistry {
        &self.ctx.observers
    }

    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    /// Number of deployments held in memory (queued or running, or just ended).
    pub fn live_count(&self) -> usize {
        self.deployments.read().expect("deployments lock").len()
    }

    /// Calls turned away, per limit (the gRPC layer records its own here too).
    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.rejections
    }

    /// Accepts a deployment and starts its task. Returns the deployment's ID and a
    /// stream of its updates from the first one. With an idempotency key already seen
    /// for the app (by this process or, through the store, an earlier one), returns
    /// the existing deployment, its stream replayed from the start.
    pub async fn deploy(
        &self,
        spec: DeploySpec,
    ) -> Result<(DeploymentId, UpdateStream), EngineError> {
        if !self.accepting.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(found) = self.find_idempotent(&spec).await? {
            return Ok(found);
        }
        // An observer that cannot record (the audit log) refuses new deployments
        // rather than let them run unrecorded.
        self.ctx.observers.admit().map_err(EngineError::Refused)?;
        let runtime = &self.ctx.runtime;
        match tokio::time::timeout(self.ctx.config.ping_timeout, runtime.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EngineError::Unavailable(e)),
            Err(_) => {
                return Err(EngineError::Unavailable(RuntimeError::Timeout {
                    op: "ping",
                    after: self.ctx.config.ping_timeout,
                    endpoint: runtime.endpoint().to_owned(),
                }));
            }
        }

        let admitted = self.admission.admit(&spec.app).map_err(|refused| {
            self.rejections.record(refused.limit);
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
            tracing::warn!(app = %spec.app, limit = refused.limit.as_str(), "deployment refused: {message}");
            EngineError::Exhausted {
                limit: refused.limit,
                message,
            }
        })?;
        let id = DeploymentId::new();
        let log = DeploymentLog::bounded(
            LIVE_LOG_WINDOW,
            Arc::new(StoreBackfill {
                store: self.ctx.store.clone(),
                id,
            }),
        );
        let deployment = Arc::new(Deployment::with_log(id, spec, log));
        {
            // Check and insert under one lock so two retries cannot both start.
            let mut keys = self.idempotency.write().expect("idempotency lock");
            if let Some(key) = &deployment.spec.idempotency_key {
                let k = (deployment.spec.app.clone(), key.clone());
                if let Some(existing) = keys.get(&k).and_then(|id| self.get(*id)) {
                    let stream = existing.log.subscribe(0).map_err(EngineError::OutOfRange)?;
                    return Ok((existing.id, stream));
                }
                keys.insert(k, id);
            }
            self.deployments
                .write()
                .expect("deployments lock")
                .insert(id, deployment.clone());
            // Queued before its first update, so the store sees them in order.
            self.ctx
                .store
                .insert(&deployment.status(), &deployment.spec);
        }
        let mut reporter = Reporter::new(
            deployment.clone(),
            self.ctx.observers.clone(),
            self.ctx.store.clone(),
        );
        reporter.accepted();
        let stream = deployment
            .log
            .subscribe(0)
            .expect("a new log holds everything");
        let span = tracing::info_span!(
            "deployment",
            deployment_id = %id,
            app = %deployment.spec.app,
            image = %deployment.spec.image,
        );
        tracing::info!(parent: &span, requested_by = %deployment.spec.requested_by, "deployment accepted");
        let engine = self.clone();
        self.tasks.spawn(
            async move {
                run::Run::new(reporter, engine.ctx.clone()).run().await;
                // The admission place is held until the deployment has ended.
                drop(admitted);
                engine.retire(&deployment).await;
            }
            .instrument(span),
        );
        Ok((id, stream))
    }

    /// After a deployment ended: once its log is on disk, drop it from memory (readers
    /// that hold its log keep reading it) and apply retention.
    async fn retire(&self, deployment: &Deployment) {
        self.ctx.store.flush().await;
        self.deployments
            .write()
            .expect("deployments lock")
            .remove(&deployment.id);
        if let Some(key) = &deployment.spec.idempotency_key {
            self.idempotency
                .write()
                .expect("idempotency lock")
                .remove(&(deployment.spec.app.clone(), key.clone()));
        }
        self.apply_retention().await;
    }

    /// Applies the retention setting to the store; logs what it removed.
    pub async fn apply_retention(&self) {
        let retention = &self.ctx.config.retention;
        if retention.max_deployments.is_none()
            && retention.max_age.is_none()
            && retention.max_log_updates.is_none()
        {
            return;
        }
        match self.ctx.store.apply_retention(retention).await {
            Ok(out) if out.deployments_removed > 0 || out.updates_removed > 0 => tracing::info!(
                deployments = out.deployments_removed,
                updates = out.updates_removed,
                "retention removed history"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
    }

    async fn find_idempotent(
        &self,
        spec: &DeploySpec,
    ) -> Result<Option<(DeploymentId, UpdateStream)>, EngineError> {
        let Some(key) = spec.idempotency_key.as_ref() else {
            return Ok(None);
        };
        let live = self
            .idempotency
            .read()
            .expect("idempotency lock")
            .get(&(spec.app.clone(), key.clone()))
            .and_then(|id| self.get(*id));
        if let Some(d) = live {
            let stream = d.log.subscribe(0).map_err(EngineError::OutOfRange)?;
            return Ok(Some((d.id, stream)));
        }
        match self.ctx.store.find_idempotent(&spec.app, key).await? {
            Some(id) => Ok(Some((id, self.watch_id(id, 0).await?))),
            None => Ok(None),
        }
    }

    fn get(&self, id: DeploymentId) -> Option<Arc<Deployment>> {
        self.deployments
            .read()
            .expect("deployments lock")
            .get(&id)
            .cloned()
    }

    fn parse_id(id: &str) -> Result<DeploymentId, EngineError> {
        uuid::Uuid::parse_str(id)
            .map(DeploymentId)
            .map_err(|_| EngineError::NotFound(id.to_owned()))
    }

    pub async fn status(&self, id: &str) -> Result<DeploymentStatus, EngineError> {
        let id = Self::parse_id(id)?;
        if let Some(deployment) = self.get(id) {
            let mut status = deployment.status();
            if status.state == DeploymentState::Pending {
                let waiting = self.ctx.queues.waiting(&deployment.spec.app);
                if let Some(i) = waiting.iter().position(|w| *w == deployment.id) {
                    status.queue_position = i as u32 + 1;
                }
            }
            return Ok(status);
        }
        self.ctx
            .store
            .status(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    /// Replays updates after `after_sequence`, then follows live until the terminal one.
    pub async fn watch(&self, id: &str, after_sequence: u64) -> Result<UpdateStream, EngineError> {
        self.watch_id(Self::parse_id(id)?, after_sequence).await
    }

    async fn watch_id(&self, id: DeploymentId, after: u64) -> Result<UpdateStream, EngineError> {
        if let Some(d) = self.get(id) {
            return d.log.subscribe(after).map_err(EngineError::OutOfRange);
        }
        // Ended: replay from the store. Only the part after `after` is loaded.
        let status = self
            .ctx
            .store
            .status(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        let stored = self.ctx.store.log(id, after).await?;
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
    pub async fn list(&self, query: &ListQuery) -> Result<ListPage, EngineError> {
        let before = match &query.page_token {
            None => None,
            Some(t) => Some(decode_token(t).ok_or(EngineError::InvalidPageToken)?),
        };
        let size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // Everything accepted so far is in the store once the writer caught up.
        self.ctx.store.flush().await;
        let rows = self
            .ctx
            .store
            .list(&ListFilter {
                app: query.app.clone(),
                state: query.state,
                before,
                limit: size + 1,
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
    pub async fn cancel(&self, id: &str) -> Result<DeploymentStatus, EngineError> {
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
        let _ = tokio::time::timeout(self.ctx.config.cancel_wait, wait).await;
        Ok(deployment.status())
    }

    /// How many known deployments are in each state (for gauges).
    pub fn state_counts(&self) -> HashMap<DeploymentState, usize> {
        let mut counts = HashMap::new();
        for d in self.deployments.read().expect("deployments lock").values() {
            *counts.entry(d.status().state).or_default() += 1;
        }
        counts
    }

    /// Stops accepting deployments; running ones continue.
    pub fn stop_accepting(&self) {
        self.accepting
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until every deployment task has ended (and its log is on disk).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Interrupts every deployment still queued or running: each rolls back what it
    /// created and ends FAILED ("interrupted by server shutdown").
    pub fn interrupt_all(&self) {
        for d in self.deployments.read().expect("deployments lock").values() {
            d.interrupt.cancel();
        }
    }

    /// Starts the container of `app`'s last succeeded deployment if it exists but is
    /// stopped; returns its ID when it runs afterwards.
    async fn restart_previous_version(&self, app: &AppName) -> Option<String> {
        let filter = crate::store::ListFilter {
            app: Some(app.clone()),
            state: Some(DeploymentState::Succeeded),
            before: None,
            limit: 1,
        };
        let last = self
            .ctx
            .store
            .list(&filter)
            .await
            .ok()?
            .into_iter()
            .next()?;
        let container = last.result?.container_id;
        if container.is_empty() {
            return None;
        }
        let runtime = &self.ctx.runtime;
        let state = runtime.inspect(&container).await.ok()?;
        if !state.running {
            match runtime.start(&container).await {
                Ok(()) => {
                    tracing::info!(%app, container = %container, "started the app's previous version again after an interrupted deployment")
                }
                Err(e) => {
                    tracing::warn!(%app, container = %container, error = %e, "could not start the app's previous version again");
                    return None;
                }
            }
        }
        Some(container)
    }

    /// Reconciles after a restart, before serving: every deployment the store holds as
    /// pending or running was in flight when the previous process died. Each gets a
    /// terminal FAILED update ("interrupted by a restart"), and the containers labelled
    /// with its ID are removed. Nothing else is touched: the app's previous version
    /// (the last succeeded deployment's container) keeps running (it is started again
    /// if the interrupted deployment had stopped it to take over a fixed host port),
    /// and containers of deployments this store does not know (another server's) are
    /// left alone.
    pub async fn recover(&self) -> Result<Recovery, EngineError> {
        let store = &self.ctx.store;
        let unfinished = store.unfinished().await?;
        let mut recovery = Recovery::default();
        if unfinished.is_empty() {
            return Ok(recovery);
        }
        let ids: std::collections::HashSet<String> =
            unfinished.iter().map(|s| s.id.to_string()).collect();
        let mut removal_error = None;
        // Running containers of other deployments, by app: the previous versions.
        let mut serving: HashMap<String, String> = HashMap::new();
        match self.ctx.runtime.list_managed_containers().await {
            Ok(containers) => {
                for c in &containers {
                    if !ids.contains(&c.deployment) {
                        if c.running {
                            serving.insert(c.app.clone(), c.id.clone());
                        }
                        continue;
                    }
                    match self.ctx.runtime.remove(&c.id).await {
                        Ok(()) => {
                            recovery.containers_removed += 1;
                            tracing::info!(container = %c.id, deployment_id = %c.deployment, "removed container of an interrupted deployment");
                        }
                        Err(e) => removal_error = Some(e.to_string()),
                    }
                }
            }
            Err(e) => removal_error = Some(e.to_string()),
        }
        // A deployment interrupted while it held a fixed host port may have stopped the
        // app's previous version (see run.rs, hand_over_fixed_ports): start it again.
        let mut apps: Vec<AppName> = unfinished.iter().map(|s| s.app.clone()).collect();
        apps.sort();
        apps.dedup();
        for app in apps {
            if serving.contains_key(app.as_str()) {
                continue;
            }
            if let Some(id) = self.restart_previous_version(&app).await {
                serving.insert(app.to_string(), id);
            }
        }
        for status in unfinished {
            // The stored status and log are committed together; continue after the
            // last update that reached the disk.
            let tail = store.log(status.id, status.last_sequence).await?;
            let last = tail
                .updates
                .last()
                .map_or(status.last_sequence, |u| u.sequence);
            let phase = tail.updates.last().map_or(status.phase, |u| u.phase);
            let mut message = format!(
                "interrupted by a restart of the server during {}: the previous server process stopped before the deployment finished",
                phase.as_str()
            );
            match &removal_error {
                None => message.push_str("; its containers were removed"),
                Some(e) => message.push_str(&format!("; removing its containers failed: {e}")),
            }
            match serving.get(status.app.as_str()) {
                Some(c) => message.push_str(&format!(
                    "; the app's previous version keeps running (container {})",
                    &c[..c.len().min(12)]
                )),
                None => message.push_str("; no other version of the app is running"),
            }
            let now = std::time::SystemTime::now();
            let result = DeploymentResult {
                success: false,
                message: message.clone(),
                diagnostics: Some(FailureDiagnostics {
                    failed_phase: Some(phase),
                    step: "server restart".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let update = Update {
                deployment_id: status.id,
                sequence: last + 1,
                app: status.app.clone(),
                kind: EventKind::Finished {
                    state: DeploymentState::Failed,
                },
                phase: Phase::Failed,
                phase_progress: status.phase_progress,
                total_progress: status.total_progress,
                level: Level::Error,
                message: message.clone(),
                timestamp: now,
                elapsed: now.duration_since(status.created_at).unwrap_or_default(),
                metadata: [
                    ("failed_phase".to_owned(), phase.as_str().to_owned()),
                    ("interrupted".to_owned(), "restart".to_owned()),
                ]
                .into_iter()
                .collect(),
                pull: None,
                result: Some(result.clone()),
            };
            let mut ended = status.clone();
            ended.state = DeploymentState::Failed;
            ended.phase = Phase::Failed;
            ended.finished_at = Some(now);
            ended.error = message;
            ended.result = Some(result);
            ended.last_sequence = last + 1;
            ended.queue_position = 0;
            tracing::warn!(deployment_id = %status.id, app = %status.app, phase = phase.as_str(), "deployment interrupted by a restart ended as failed");
            let update = Arc::new(update);
            store.append(update.clone(), ended);
            self.ctx.observers.publish(&update);
            recovery.interrupted.push(status.id);
        }
        store.flush().await;
        Ok(recovery)
    }
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
mod tests;
