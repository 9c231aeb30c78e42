//! The deployment engine: accepts deployments, runs each in its own task through its
//! phases (see [`run`]), keeps one deployment per app at a time ([`queue`]), and tracks
//! live and finished deployments for status, watch, list and cancel.
//!
//! Nothing here knows about gRPC: `api/` converts requests into [`DeploySpec`]s and
//! [`EngineError`]s into status codes.

mod admission;
mod deployment;
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

use crate::events::{LogError, ObserverRegistry, UpdateStream};
use crate::limits::{Rejection, Rejections};
use crate::model::{AppName, DeploySpec, DeploymentId, DeploymentState, DeploymentStatus};
use crate::runtime::{Runtime, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Unavailable(RuntimeError),
    #[error("deployment {0} not found")]
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
}

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

/// Default and maximum page sizes of ListDeployments.
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 500;

impl Engine {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        observers: ObserverRegistry,
        config: EngineConfig,
    ) -> Self {
        let admission = admission::Admission::new(config.max_in_flight, config.max_queued);
        Self {
            ctx: Arc::new(EngineContext {
                runtime,
                observers,
                queues: AppQueues::default(),
                config,
                http: reqwest::Client::new(),
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

    /// Calls turned away, per limit (the gRPC layer records its own here too).
    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.rejections
    }

    /// Accepts a deployment and starts its task. Returns the deployment and a stream of
    /// its updates from the first one. With an idempotency key already seen for the
    /// app, returns the existing deployment (its stream replayed from the start).
    pub async fn deploy(
        &self,
        spec: DeploySpec,
    ) -> Result<(Arc<Deployment>, UpdateStream), EngineError> {
        if !self.accepting.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(existing) = self.find_idempotent(&spec) {
            let stream = existing.log.subscribe(0).map_err(EngineError::OutOfRange)?;
            return Ok((existing, stream));
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
        let deployment = Arc::new(Deployment::new(id, spec));
        {
            // Check and insert under one lock so two retries cannot both start.
            let mut keys = self.idempotency.write().expect("idempotency lock");
            if let Some(key) = &deployment.spec.idempotency_key {
                let k = (deployment.spec.app.clone(), key.clone());
                if let Some(existing) = keys.get(&k).and_then(|id| self.get(*id)) {
                    let stream = existing.log.subscribe(0).map_err(EngineError::OutOfRange)?;
                    return Ok((existing, stream));
                }
                keys.insert(k, id);
            }
            self.deployments
                .write()
                .expect("deployments lock")
                .insert(id, deployment.clone());
        }
        let mut reporter = Reporter::new(deployment.clone(), self.ctx.observers.clone());
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
        let run = run::Run::new(reporter, self.ctx.clone()).run();
        self.tasks.spawn(
            async move {
                run.await;
                // The admission place is held until the deployment has ended.
                drop(admitted);
            }
            .instrument(span),
        );
        Ok((deployment, stream))
    }

    fn find_idempotent(&self, spec: &DeploySpec) -> Option<Arc<Deployment>> {
        let key = spec.idempotency_key.as_ref()?;
        let id = *self
            .idempotency
            .read()
            .expect("idempotency lock")
            .get(&(spec.app.clone(), key.clone()))?;
        self.get(id)
    }

    fn get(&self, id: DeploymentId) -> Option<Arc<Deployment>> {
        self.deployments
            .read()
            .expect("deployments lock")
            .get(&id)
            .cloned()
    }

    fn lookup(&self, id: &str) -> Result<Arc<Deployment>, EngineError> {
        uuid::Uuid::parse_str(id)
            .ok()
            .and_then(|u| self.get(DeploymentId(u)))
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    pub fn status(&self, id: &str) -> Result<DeploymentStatus, EngineError> {
        let deployment = self.lookup(id)?;
        let mut status = deployment.status();
        if status.state == DeploymentState::Pending {
            let waiting = self.ctx.queues.waiting(&deployment.spec.app);
            if let Some(i) = waiting.iter().position(|w| *w == deployment.id) {
                status.queue_position = i as u32 + 1;
            }
        }
        Ok(status)
    }

    /// Replays updates after `after_sequence`, then follows live until the terminal one.
    pub fn watch(&self, id: &str, after_sequence: u64) -> Result<UpdateStream, EngineError> {
        self.lookup(id)?
            .log
            .subscribe(after_sequence)
            .map_err(EngineError::OutOfRange)
    }

    /// Deployments, newest first. The page token is opaque to clients.
    pub fn list(&self, query: &ListQuery) -> Result<ListPage, EngineError> {
        let after = match &query.page_token {
            None => None,
            Some(t) => Some(decode_token(t).ok_or(EngineError::InvalidPageToken)?),
        };
        let size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut all: Vec<DeploymentStatus> = self
            .deployments
            .read()
            .expect("deployments lock")
            .values()
            .filter(|d| query.app.as_ref().is_none_or(|a| *a == d.spec.app))
            .map(|d| d.status())
            .filter(|s| query.state.is_none_or(|st| st == s.state))
            .collect();
        all.sort_by_key(|s| std::cmp::Reverse(sort_key(s)));
        let start = match after {
            None => 0,
            Some(key) => all.partition_point(|s| sort_key(s) >= key),
        };
        let page: Vec<_> = all.into_iter().skip(start).take(size + 1).collect();
        let more = page.len() > size;
        let deployments: Vec<_> = page.into_iter().take(size).collect();
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
        let deployment = self.lookup(id)?;
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

    /// Waits until every deployment task has ended.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
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
