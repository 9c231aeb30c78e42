//! One deployment: its spec, its event log, its live status, and the [`Reporter`]
//! through which its task emits every update.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::events::{DeploymentLog, ObserverRegistry};
use crate::model::{
    DeploySpec, DeploymentId, DeploymentResult, DeploymentState, DeploymentStatus, EventKind,
    Level, Phase, PullProgress, Update,
};
use crate::store::Store;

/// A deployment the server knows about, running or finished.
pub struct Deployment {
    pub id: DeploymentId,
    pub spec: DeploySpec,
    pub log: Arc<DeploymentLog>,
    pub cancel: CancellationToken,
    /// Cancelled when the server shuts down and the deployment did not finish within
    /// the grace: it then rolls back and ends FAILED ("interrupted by server shutdown").
    pub interrupt: CancellationToken,
    /// When the deployment was accepted (`elapsed` and the deadline count from here).
    pub accepted: Instant,
    status: Mutex<DeploymentStatus>,
}

impl Deployment {
    pub fn new(id: DeploymentId, spec: DeploySpec) -> Self {
        Self::with_log(id, spec, DeploymentLog::new())
    }

    /// A deployment whose log is `log` (e.g. a bounded one backed by the store).
    pub fn with_log(id: DeploymentId, spec: DeploySpec, log: DeploymentLog) -> Self {
        let status = DeploymentStatus {
            id,
            app: spec.app.clone(),
            image: spec.image.clone(),
            state: DeploymentState::Pending,
            phase: Phase::Queued,
            phase_progress: 0.0,
            total_progress: 0.0,
            created_at: SystemTime::now(),
            started_at: None,
            finished_at: None,
            error: String::new(),
            result: None,
            last_sequence: 0,
            requested_by: spec.requested_by.clone(),
            queue_position: 0,
        };
        Self {
            id,
            spec,
            log: Arc::new(log),
            cancel: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            accepted: Instant::now(),
            status: Mutex::new(status),
        }
    }

    pub fn status(&self) -> DeploymentStatus {
        self.status.lock().expect("status lock").clone()
    }

    pub fn is_finished(&self) -> bool {
        self.status().state.is_terminal()
    }
}

/// Progress is reported to 4 decimals (rounding is monotonic, so nothing goes back).
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Optional parts of an update.
#[derive(Default)]
pub struct Extra {
    pub metadata: BTreeMap<String, String>,
    pub pull: Option<PullProgress>,
}

impl Extra {
    pub fn meta<const N: usize>(pairs: [(&str, String); N]) -> Self {
        Self {
            metadata: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            pull: None,
        }
    }
}

/// The single writer of a deployment's log: assigns sequence numbers, keeps
/// `total_progress` monotonic, updates the status, and publishes to observers.
pub struct Reporter {
    deployment: Arc<Deployment>,
    observers: ObserverRegistry,
    store: Store,
    sequence: u64,
    phase: Phase,
    phase_progress: f64,
    total_progress: f64,
    finished: bool,
}

impl Reporter {
    pub fn new(deployment: Arc<Deployment>, observers: ObserverRegistry, store: Store) -> Self {
        Self {
            deployment,
            observers,
            store,
            sequence: 0,
            phase: Phase::Queued,
            phase_progress: 0.0,
            total_progress: 0.0,
            finished: false,
        }
    }

    pub fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    fn emit(
        &mut self,
        kind: EventKind,
        level: Level,
        message: String,
        extra: Extra,
        result: Option<DeploymentResult>,
    ) -> Arc<Update> {
        assert!(!self.finished, "update after the terminal update");
        self.sequence += 1;
        let now = SystemTime::now();
        let update = Update {
            deployment_id: self.deployment.id,
            sequence: self.sequence,
            app: self.deployment.spec.app.clone(),
            kind: kind.clone(),
            phase: self.phase,
            phase_progress: self.phase_progress,
            total_progress: self.total_progress,
            level,
            message,
            timestamp: now,
            elapsed: self.deployment.accepted.elapsed(),
            metadata: extra.metadata,
            pull: extra.pull,
            result: result.clone(),
        };
        let status = {
            let mut status = self.deployment.status.lock().expect("status lock");
            status.phase = self.phase;
            status.phase_progress = self.phase_progress;
            status.total_progress = self.total_progress;
            status.last_sequence = self.sequence;
            match &kind {
                EventKind::Queued { position } => status.queue_position = *position,
                EventKind::PhaseStarted if status.state == DeploymentState::Pending => {
                    status.state = DeploymentState::Running;
                    status.queue_position = 0;
                    status.started_at = Some(now);
                }
                EventKind::Finished { state } => {
                    self.finished = true;
                    status.state = *state;
                    status.queue_position = 0;
                    status.finished_at = Some(now);
                    if *state != DeploymentState::Succeeded {
                        status.error = update.message.clone();
                    }
                    status.result = result;
                }
                _ => {}
            }
            status.clone()
        };
        // The store's writer gets the update first (queued, in order; the deployment
        // does not wait for the disk), then readers and observers see it.
        let update = Arc::new(update);
        self.store.append(update.clone(), status);
        self.deployment.log.append_shared(update.clone());
        self.observers.publish(&update);
        update
    }

    fn set_progress(&mut self, phase_progress: f64) {
        let p = round(phase_progress.clamp(0.0, 1.0)).max(self.phase_progress);
        self.phase_progress = p;
        let total = round(self.phase.start_offset() + self.phase.weight() * p);
        self.total_progress = self.total_progress.max(total.min(1.0));
    }

    /// The first update (sequence 1): the deployment exists.
    pub fn accepted(&mut self) {
        let spec = &self.deployment.spec;
        let message = format!("deployment of {} as app {} accepted", spec.image, spec.app);
        let kind = EventKind::Accepted {
            image: spec.image.clone(),
            requested_by: spec.requested_by.clone(),
            env_keys: spec.env.keys().cloned().collect(),
        };
        self.emit(
            kind,
            Level::Info,
            message,
            Extra::meta([
                ("image", spec.image.clone()),
                ("requested_by", spec.requested_by.clone()),
                // Keys only: env values may be secrets and never leave the spec.
                (
                    "env_keys",
                    spec.env.keys().cloned().collect::<Vec<_>>().join(","),
                ),
            ]),
            None,
        );
    }

    pub fn queued(&mut self, position: u32) {
        let message = format!(
            "waiting for the app's current deployment to end (position {position} in queue)"
        );
        self.emit(
            EventKind::Queued { position },
            Level::Info,
            message,
            Extra::meta([("queue_position", position.to_string())]),
            None,
        );
    }

    /// Enters `phase` (progress 0 within it).
    pub fn enter(&mut self, phase: Phase, message: impl Into<String>) {
        debug_assert!(!phase.is_terminal());
        self.phase = phase;
        self.phase_progress = 0.0;
        self.set_progress(0.0);
        tracing::info!(phase = phase.as_str(), "phase started");
        self.emit(
            EventKind::PhaseStarted,
            Level::Info,
            message.into(),
            Extra::default(),
            None,
        );
    }

    /// Progress within the current phase (never goes back).
    pub fn progress(&mut self, phase_progress: f64, level: Level, message: String, extra: Extra) {
        self.set_progress(phase_progress);
        self.emit(EventKind::Progress, level, message, extra, None);
    }

    /// A line of output (container or hook), at the current progress.
    pub fn output(&mut self, message: String, extra: Extra) {
        self.emit(EventKind::Output, Level::Verbose, message, extra, None);
    }

    pub fn cancelling(&mut self, message: String) {
        self.emit(
            EventKind::Cancelling,
            Level::Warning,
            message,
            Extra::default(),
            None,
        );
    }

    /// The terminal update. Success brings `total_progress` to 1.0.
    pub fn finish(&mut self, state: DeploymentState, result: DeploymentResult) {
        let (phase, level) = match state {
            DeploymentState::Succeeded => (Phase::Complete, Level::Success),
            DeploymentState::Cancelled => (Phase::Cancelled, Level::Warning),
            _ => (Phase::Failed, Level::Error),
        };
        if state == DeploymentState::Succeeded {
            self.phase_progress = 1.0;
            self.total_progress = 1.0;
        }
        self.phase = phase;
        let mut extra = Extra::default();
        if let Some(d) = &result.diagnostics {
            if let Some(p) = d.failed_phase {
                extra
                    .metadata
                    .insert("failed_phase".into(), p.as_str().into());
            }
            if let Some(code) = d.exit_code {
                extra.metadata.insert("exit_code".into(), code.to_string());
            }
        }
        if !result.container_id.is_empty() {
            extra
                .metadata
                .insert("container_id".into(), result.container_id.clone());
        }
        let message = result.message.clone();
        match state {
            DeploymentState::Succeeded => tracing::info!(%message, "deployment succeeded"),
            _ => tracing::warn!(state = state.as_str(), %message, "deployment ended"),
        }
        self.emit(
            EventKind::Finished { state },
            level,
            message,
            extra,
            Some(result),
        );
    }
}
