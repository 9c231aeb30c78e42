//! Persistence of deployments and their event logs (SQLite in `--data-dir` by default).
//!
//! [`Store`] is a cheap handle. Reads go straight to the database. Writes (a new
//! deployment, each update of its log, and its status when its state changes) are
//! queued, in order, to one writer task that commits them in batches: a deployment never waits
//! on the disk for an update. Everything queued before [`Store::flush`] returns is on
//! disk. A crash (kill -9, power loss) can lose at most the tail that was queued but
//! not yet committed — typically the updates of the last few milliseconds; on the next
//! start, recovery ends every deployment that was not finished as FAILED after the last
//! update that did reach the disk.
//!
//! What is stored of a request: never env values (only their keys) and never registry
//! credentials. Nothing here knows about gRPC or Docker.

mod sqlite;
mod writer;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::engine::eta::{PullSample, StepSample};
use crate::model::{
    AppName, DeploySpec, DeploymentId, DeploymentState, DeploymentStatus, Operation, Update,
};

use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored record of deployment {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

/// How much history is kept. `None` = no bound.
#[derive(Clone, Debug, Default)]
pub(crate) struct Retention {
    /// Keep at most this many finished deployments (the newest); older ones are
    /// deleted with their logs (then NOT_FOUND).
    pub(crate) max_deployments: Option<usize>,
    /// Delete finished deployments created longer ago than this (then NOT_FOUND).
    pub(crate) max_age: Option<Duration>,
    /// Of a finished deployment's log keep only the last this many updates (the
    /// terminal one is always kept); earlier sequences are then OUT_OF_RANGE.
    pub(crate) max_log_updates: Option<u64>,
}

/// What [`Store::apply_retention`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RetentionOutcome {
    pub(crate) deployments_removed: u64,
    pub(crate) updates_removed: u64,
}

/// Filter and keyset position of a list query, newest first.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListFilter {
    pub(crate) app: Option<AppName>,
    pub(crate) state: Option<DeploymentState>,
    /// Only deployments strictly older than this `(created_at ns, id)`.
    pub before: Option<(u128, uuid::Uuid)>,
    pub limit: usize,
    /// Only deploys, or only removals; `None`: both.
    pub operation: Option<Operation>,
}

/// A deployment's stored log: the updates after the requested sequence, and the oldest
/// sequence the store still holds (retention may have trimmed the start).
pub(crate) struct StoredLog {
    pub(crate) oldest: Option<u64>,
    pub(crate) updates: Vec<Update>,
}

/// What the ETA measured of a deployment besides its phases: its image download (if it
/// downloaded anything) and the steps of its build (if one ran).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    pub(crate) pull: Option<PullSample>,
    pub(crate) build: Vec<StepSample>,
}

pub(crate) enum WriteOp {
    Insert {
        status: Box<DeploymentStatus>,
        idempotency_key: Option<String>,
        request: String,
    },
    Append {
        update: Arc<Update>,
        status: Option<Box<DeploymentStatus>>,
    },
    Pull {
        id: DeploymentId,
        sample: PullSample,
    },
    Build {
        id: DeploymentId,
        steps: Vec<StepSample>,
    },
    Flush(oneshot::Sender<()>),
}

/// Handle to the store: reads, queued ordered writes, flush.
#[derive(Clone)]
pub struct Store {
    db: SqliteStore,
    writer: mpsc::UnboundedSender<WriteOp>,
    /// Cuts the writer's wait for more of a batch short (a flush is waiting).
    urgent: Arc<Notify>,
    /// The directory of a temporary store (tests), removed with the last handle.
    #[cfg(test)]
    _temporary: Option<Arc<tempfile::TempDir>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) `DIR/stevedore.db`, runs the migrations and starts
    /// the writer task on a connection of its own.
    pub async fn open(data_dir: &std::path::Path) -> Result<Self, StoreError> {
        let db = SqliteStore::open(&data_dir.join("stevedore.db")).await?;
        let (writer, rx) = mpsc::unbounded_channel();
        let urgent = Arc::new(Notify::new());
        tokio::spawn(writer::run(db.own_connection().await?, rx, urgent.clone()));
        Ok(Self {
            db,
            writer,
            urgent,
            #[cfg(test)]
            _temporary: None,
        })
    }

    /// A store in a directory of its own that is removed with the last handle (for
    /// tests): the same database, writer and reads as [`Store::open`].
    #[cfg(test)]
    pub async fn open_temporary() -> Result<Self, StoreError> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Self::open(dir.path()).await?;
        Ok(Self {
            _temporary: Some(Arc::new(dir)),
            ..store
        })
    }

    /// Queues a new deployment (before its first update, so order holds).
    pub fn insert(&self, status: &DeploymentStatus, spec: &DeploySpec) {
        self.send(WriteOp::Insert {
            status: Box::new(status.clone()),
            idempotency_key: spec.idempotency_key.clone(),
            request: redacted_request(spec).to_string(),
        });
    }

    /// Queues an update of a deployment's log and, when it changed what the log does
    /// not tell (its state, above all), the status it leads to. A stored status may
    /// lag its log in phase, progress and last sequence: recovery takes those from
    /// the log's last update (`engine::recover`).
    pub fn append(&self, update: Arc<Update>, status: Option<DeploymentStatus>) {
        self.send(WriteOp::Append {
            update,
            status: status.map(Box::new),
        });
    }

    /// Queues the measure of `id`'s image download (for the ETA).
    pub(crate) fn record_pull(&self, id: DeploymentId, sample: PullSample) {
        self.send(WriteOp::Pull { id, sample });
    }

    /// Queues the steps of `id`'s build, in order (for the ETA).
    pub(crate) fn record_build(&self, id: DeploymentId, steps: Vec<StepSample>) {
        self.send(WriteOp::Build { id, steps });
    }

    /// What was measured of each of `ids` (those with nothing measured are left out).
    pub async fn measured(
        &self,
        ids: &[DeploymentId],
    ) -> Result<std::collections::HashMap<DeploymentId, Measured>, StoreError> {
        self.db.measured(ids).await
    }

    fn send(&self, op: WriteOp) {
        if self.writer.send(op).is_err() {
            tracing::error!("store writer is gone; an update was not persisted");
        }
    }

    /// Waits until everything queued so far is committed (or failed and was logged).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Flush(tx));
        self.urgent.notify_one();
        let _ = rx.await;
    }

    pub(crate) async fn status(
        &self,
        id: DeploymentId,
    ) -> Result<Option<DeploymentStatus>, StoreError> {
        self.db.status(id).await
    }

    /// The request of `id` as stored (secrets removed: see [`redacted_request`]).
    pub(crate) async fn request(
        &self,
        id: DeploymentId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        self.db.request(id).await
    }

    /// Updates of `id` with a sequence above `after`.
    pub(crate) async fn log(&self, id: DeploymentId, after: u64) -> Result<StoredLog, StoreError> {
        self.db.log(id, after, None).await
    }

    /// Up to `max` updates of `id` with a sequence above `after`.
    pub(crate) async fn log_page(
        &self,
        id: DeploymentId,
        after: u64,
        max: usize,
    ) -> Result<Vec<Update>, StoreError> {
        Ok(self.db.log(id, after, Some(max)).await?.updates)
    }

    pub(crate) async fn find_idempotent(
        &self,
        app: &AppName,
        key: &str,
    ) -> Result<Option<DeploymentId>, StoreError> {
        self.db.find_idempotent(app, key).await
    }

    pub(crate) async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        self.db.list(filter).await
    }

    /// Of `ids`, those the store holds as ended (one read for all).
    pub(crate) async fn ended(
        &self,
        ids: &[DeploymentId],
    ) -> Result<std::collections::HashSet<DeploymentId>, StoreError> {
        self.db.ended(ids).await
    }

    /// Per app of `apps`, its newest SUCCEEDED deployment or removal, in one read
    /// (apps with none are left out).
    pub(crate) async fn newest_succeeded(
        &self,
        apps: &[AppName],
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        self.db.newest_succeeded(apps).await
    }

    /// Per app (sorted by name), its newest deployment or removal, or with
    /// `succeeded_only` its newest SUCCEEDED deployment (removals left out).
    pub async fn newest_per_app(
        &self,
        succeeded_only: bool,
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        self.db.newest_per_app(succeeded_only).await
    }

    /// The SUCCEEDED deployment of `status.app` that directly followed `status`.
    pub(crate) async fn next_succeeded(
        &self,
        status: &DeploymentStatus,
    ) -> Result<Option<DeploymentId>, StoreError> {
        self.db
            .next_succeeded(&status.app, status.created_at, status.id)
            .await
    }

    /// Records that `app` was removed by a removal accepted at `at` (RemoveApp): what
    /// was accepted for the app before `at` ran before the removal (the app's queue is
    /// FIFO), so it is gone; what came after runs after it.
    pub async fn record_removal(&self, app: &AppName, at: SystemTime) -> Result<(), StoreError> {
        self.flush().await;
        self.db.record_removal(app, at).await
    }

    /// Per removed app, when its last successful removal was accepted (Unix ns).
    pub async fn removals(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        self.db.removals().await
    }

    /// Deployments that were neither finished nor cancelled when the last process
    /// stopped writing.
    pub(crate) async fn unfinished(&self) -> Result<Vec<DeploymentStatus>, StoreError> {
        self.db.unfinished().await
    }

    pub(crate) async fn apply_retention(
        &self,
        retention: &Retention,
    ) -> Result<RetentionOutcome, StoreError> {
        self.flush().await;
        self.db.apply_retention(retention, SystemTime::now()).await
    }

    /// Number of deployments stored (any state).
    pub async fn count(&self) -> Result<u64, StoreError> {
        self.db.count().await
    }
}

/// The request as stored: everything needed to understand it later, no secrets.
pub(crate) fn redacted_request(spec: &DeploySpec) -> serde_json::Value {
    serde_json::json!({
        "app": spec.app.as_str(),
        "image": spec.image,
        // The URL without its credential; build args by name only.
        "source": spec.source.as_ref().map(|s| serde_json::json!({
            "url": s.display_url(),
            "ref": s.reference,
            "dockerfile": s.dockerfile,
            "context_dir": s.context_dir,
            "build_arg_keys": s.build_args.keys().collect::<Vec<_>>(),
        })),
        "command": spec.command,
        "env_keys": spec.env.keys().collect::<Vec<_>>(),
        "ports": spec.ports.iter().map(|p| serde_json::json!({
            "container_port": p.container_port,
            "host_port": p.host_port,
            "protocol": p.protocol.as_str(),
        })).collect::<Vec<_>>(),
        "labels": spec.labels,
        "health_check": spec.health.probe.as_ref().map(|p| p.name()),
        "health_timeout_ms": spec.health.timeout.as_millis() as u64,
        "deadline_ms": spec.deadline.as_millis() as u64,
        "idempotency_key": spec.idempotency_key,
        "registry_auth": spec.registry_auth.is_some(),
        "milestones": spec.milestones.iter().map(|m| m.description.clone()).collect::<Vec<_>>(),
        "hooks": spec.hooks.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
        "requested_by": spec.requested_by,
        "replicas": spec.replicas,
    })
}

pub(crate) fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(i64::MAX as u128) as i64
}
