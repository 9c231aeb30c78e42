//! One deployment: its spec, its event log, its live status, and the [`Reporter`]
//! through which its task emits every update.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::events::{DeploymentLog, ObserverRegistry};
use crate::model::{
    AppName, DeploySpec, DeploymentId, DeploymentResult, DeploymentState, DeploymentStatus,
    EventKind, FailureDiagnostics, HealthSpec, Level, Operation, Phase, PullProgress, Update,
};
use crate::store::Store;

/// A deployment the server knows about, running or finished.
pub(crate) struct Deployment {
    pub(crate) id: DeploymentId,
    /// A deploy, or a removal (whose spec holds only the app, the caller and the stop
    /// grace).
    pub(crate) operation: Operation,
    pub(crate) spec: DeploySpec,
    pub(crate) log: Arc<DeploymentLog>,
    pub(crate) cancel: CancellationToken,
    /// Cancelled when the server shuts down and the deployment did not finish within
    /// the grace: it then rolls back and ends FAILED ("interrupted by server shutdown").
    pub(crate) interrupt: CancellationToken,
    /// When the deployment was accepted (`elapsed` and the deadline count from here).
    pub(crate) accepted: Instant,
    status: Mutex<DeploymentStatus>,
}

impl Deployment {
    /// A deployment whose log is `log` (e.g. a bounded one backed by the store).
    pub(crate) fn with_log(id: DeploymentId, spec: DeploySpec, log: DeploymentLog) -> Self {
        let status = DeploymentStatus {
            id,
            operation: Operation::Deploy,
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
            superseded_by: None,
            commit: String::new(),
            eta: None,
            target: crate::model::Target::Docker,
            replicas: spec.replicas,
        };
        Self {
            id,
            operation: Operation::Deploy,
            spec,
            log: Arc::new(log),
            cancel: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            accepted: Instant::now(),
            status: Mutex::new(status),
        }
    }

    /// A removal of `app` (RemoveApp): stops its containers (each with `stop_timeout`,
    /// else its own StopTimeout, else 10 s) and removes them.
    pub(crate) fn removal(
        id: DeploymentId,
        app: AppName,
        requested_by: String,
        stop_timeout: Option<Duration>,
        log: DeploymentLog,
    ) -> Self {
        let spec = DeploySpec {
            stop_timeout,
            ..bare_spec(app, String::new(), requested_by)
        };
        let mut removal = Self::with_log(id, spec, log);
        removal.operation = Operation::RemoveApp;
        removal.status.get_mut().expect("status lock").operation = Operation::RemoveApp;
        removal
    }

    /// A deployment known only from the store (after a restart), its log continuing
    /// after `status.last_sequence`: enough for a [`Reporter`] to end it.
    pub(super) fn recovered(status: DeploymentStatus) -> Self {
        let log = DeploymentLog::resumed(status.last_sequence);
        Self::recovered_with(status, log)
    }

    /// Like [`Deployment::recovered`], its log `log` (one that continues after
    /// `status.last_sequence`, e.g. backed by the store for a deployment that goes on).
    pub(super) fn recovered_with(status: DeploymentStatus, log: DeploymentLog) -> Self {
        let spec = bare_spec(
            status.app.clone(),
            status.image.clone(),
            status.requested_by.clone(),
        );
        let age = SystemTime::now()
            .duration_since(status.created_at)
            .unwrap_or_default();
        Self {
            id: status.id,
            operation: status.operation,
            spec,
            log: Arc::new(log),
            cancel: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            accepted: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            status: Mutex::new(status),
        }
    }

    /// Records where the deployment runs (before it is registered).
    pub(crate) fn set_target(&self, target: crate::model::Target) {
        self.status.lock().expect("status lock").target = target;
    }

    pub(crate) fn status(&self) -> DeploymentStatus {
        self.status.lock().expect("status lock").clone()
    }
}

/// A spec with nothing to run: what a removal, or a deployment known only from the
/// store, needs (the app, the image shown, the caller).
fn bare_spec(app: AppName, image: String, requested_by: String) -> DeploySpec {
    DeploySpec {
        stop_timeout: None,
        drain_timeout: crate::model::DEFAULT_DRAIN_TIMEOUT,
        app,
        image,
        source: None,
        command: Vec::new(),
        env: BTreeMap::new(),
        ports: Vec::new(),
        labels: BTreeMap::new(),
        health: HealthSpec {
            probe: None,
            timeout: Duration::ZERO,
            interval: Duration::ZERO,
        },
        deadline: Duration::ZERO,
        idempotency_key: None,
        registry_auth: None,
        milestones: Vec::new(),
        hooks: Vec::new(),
        requested_by,
        replicas: 1,
        update: Default::default(),
    }
}

/// Progress is reported to 4 decimals (rounding is monotonic, so nothing goes back).
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Optional parts of an update.
#[derive(Default)]
pub(crate) struct Extra {
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) pull: Option<PullProgress>,
}

impl Extra {
    pub(crate) fn meta<const N: usize>(pairs: [(&str, String); N]) -> Self {
        Self {
            metadata: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            pull: None,
        }
    }
}

/// The single writer of a deployment's log: assigns sequence numbers, keeps
/// `total_progress` monotonic, updates the status, and publishes to observers.
pub(crate) struct Reporter {
    deployment: Arc<Deployment>,
    observers: ObserverRegistry,
    store: Store,
    sequence: u64,
    phase: Phase,
    phase_progress: f64,
    total_progress: f64,
    finished: bool,
    /// The ETA of every update, when the app has history.
    eta: Option<super::history::EtaTracker>,
    /// Keeps the app's history in memory up to date (see [`super::history::Histories`]).
    history: Option<super::history::Recorder>,
    /// The status changed in a way its log does not tell (the commit and image of a
    /// deploy from source): the next update writes it to the store.
    status_changed: bool,
}

impl Reporter {
    pub(crate) fn new(
        deployment: Arc<Deployment>,
        observers: ObserverRegistry,
        store: Store,
    ) -> Self {
        Self {
            deployment,
            observers,
            store,
            sequence: 0,
            phase: Phase::Queued,
            phase_progress: 0.0,
            total_progress: 0.0,
            finished: false,
            eta: None,
            history: None,
            status_changed: false,
        }
    }

    /// Tells the app's history in memory when this deployment succeeds.
    pub(crate) fn recording(mut self, history: super::history::Recorder) -> Self {
        self.history = Some(history);
        self
    }

    /// Estimates the time left on every update from here on.
    pub(crate) fn with_eta(mut self, eta: super::history::EtaTracker) -> Self {
        self.eta = Some(eta);
        self
    }

    /// A Reporter that continues `deployment`'s log after its last update, from the
    /// phase and progress of its status (to end a deployment whose task is gone).
    pub(super) fn resume(
        deployment: Arc<Deployment>,
        observers: ObserverRegistry,
        store: Store,
    ) -> Self {
        let status = deployment.status();
        Self {
            sequence: deployment.log.last_sequence(),
            phase: status.phase,
            phase_progress: status.phase_progress,
            total_progress: status.total_progress,
            ..Self::new(deployment, observers, store)
        }
    }

    /// The estimator, to feed it what the pull or build reports (`None` without one).
    pub(crate) fn eta_live(&mut self) -> Option<&mut super::history::EtaTracker> {
        self.eta.as_mut()
    }

    /// Keeps this deployment's image download for the estimates of later ones.
    pub(crate) fn record_pull(&mut self, sample: super::eta::PullSample) {
        if let Some(h) = &mut self.history {
            h.pull(sample);
        }
        self.store.record_pull(self.deployment.id, sample);
    }

    /// Keeps this deployment's build steps for the estimates of later ones.
    pub(crate) fn record_build(&mut self, steps: Vec<super::eta::StepSample>) {
        if let Some(h) = &mut self.history {
            h.build(steps.clone());
        }
        self.store.record_build(self.deployment.id, steps);
    }

    pub(crate) fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }

    /// Waits until this deployment and every update reported so far are on disk. A
    /// deployment calls it before the engine holds anything of it (a container, a
    /// service): after a kill -9, recovery then knows what to remove, while a container
    /// of a deployment the store does not know is never touched (another server's).
    pub(crate) async fn on_disk(&self) {
        self.store.flush().await;
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Deploys from source: the commit fetched and, once built, the image that runs
    /// (the status shows them from the next update on).
    pub(crate) fn set_commit(&mut self, commit: &str, image: Option<&str>) {
        let mut status = self.deployment.status.lock().expect("status lock");
        status.commit = commit.to_owned();
        if let Some(image) = image {
            status.image = image.to_owned();
        }
        self.status_changed = true;
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
        let elapsed = self.deployment.accepted.elapsed();
        let eta = match &kind {
            EventKind::Finished { .. } => None,
            _ => self
                .eta
                .as_mut()
                .and_then(|t| t.estimate(self.phase, self.phase_progress, elapsed)),
        };
        let update = Update {
            deployment_id: self.deployment.id,
            operation: self.deployment.operation,
            sequence: self.sequence,
            app: self.deployment.spec.app.clone(),
            kind: kind.clone(),
            phase: self.phase,
            phase_progress: self.phase_progress,
            total_progress: self.total_progress,
            level,
            message,
            timestamp: now,
            elapsed,
            metadata: extra.metadata,
            pull: extra.pull,
            result: result.clone(),
            eta: eta.clone(),
            encoded: Default::default(),
        };
        let status = {
            let mut status = self.deployment.status.lock().expect("status lock");
            let state = status.state;
            status.phase = self.phase;
            status.phase_progress = self.phase_progress;
            status.total_progress = self.total_progress;
            status.last_sequence = self.sequence;
            status.eta = eta;
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
            // The stored status is rewritten when its state changes (or what the log
            // does not say, see `set_commit`); its phase, progress and last sequence
            // are the log's last update's (recovery settles them from the log), and
            // while the deployment is live it is read from memory.
            let write = status.state != state || std::mem::take(&mut self.status_changed);
            write.then(|| status.clone())
        };
        // The store's writer gets the update first (queued, in order; the deployment
        // does not wait for the disk), then readers and observers see it.
        let update = Arc::new(update);
        self.store.append(update.clone(), status);
        // After the store has it queued (a read of the history from the store flushes
        // first), before anyone sees it.
        if let Some(h) = &mut self.history {
            h.observe(&update);
        }
        self.deployment.log.append_shared(update.clone());
        self.observers.publish(&update);
        update
    }

    fn set_progress(&mut self, phase_progress: f64) {
        let p = round(phase_progress.clamp(0.0, 1.0)).max(self.phase_progress);
        self.phase_progress = p;
        let (offset, weight) = self.deployment.operation.phase_span(self.phase);
        let total = round(offset + weight * p);
        self.total_progress = self.total_progress.max(total.min(1.0));
    }

    /// The first update (sequence 1): the deployment exists.
    pub(crate) fn accepted(&mut self) {
        let spec = &self.deployment.spec;
        let message = match self.deployment.operation {
            Operation::Deploy => {
                format!("deployment of {} as app {} accepted", spec.image, spec.app)
            }
            Operation::RemoveApp => format!("removal of app {} accepted", spec.app),
        };
        let kind = EventKind::Accepted {
            image: spec.image.clone(),
            requested_by: spec.requested_by.clone(),
            env_keys: spec.env.keys().cloned().collect(),
            target: self.deployment.status().target,
            replicas: spec.replicas,
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
                ("target", self.deployment.status().target.as_str().into()),
                ("replicas", spec.replicas.to_string()),
            ]),
            None,
        );
    }

    pub(crate) fn queued(&mut self, position: u32, behind: Option<DeploymentId>) {
        let mut meta = vec![("queue_position", position.to_string())];
        let message = match behind {
            Some(ahead) => {
                meta.push(("queued_behind", ahead.to_string()));
                format!(
                    "waiting behind deployment {ahead} of this app (position {position} in queue)"
                )
            }
            None => format!(
                "waiting for the app's current deployment to end (position {position} in queue)"
            ),
        };
        self.emit(
            EventKind::Queued { position },
            Level::Info,
            message,
            Extra {
                metadata: meta.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                pull: None,
            },
            None,
        );
    }

    /// Enters `phase` (progress 0 within it).
    pub(crate) fn enter(&mut self, phase: Phase, message: impl Into<String>) {
        debug_assert!(!phase.is_terminal());
        self.phase = phase;
        self.phase_progress = 0.0;
        self.set_progress(0.0);
        tracing::debug!(phase = phase.as_str(), "phase started");
        self.emit(
            EventKind::PhaseStarted,
            Level::Info,
            message.into(),
            Extra::default(),
            None,
        );
    }

    /// Progress within the current phase (never goes back).
    pub(crate) fn progress(
        &mut self,
        phase_progress: f64,
        level: Level,
        message: String,
        extra: Extra,
    ) {
        self.set_progress(phase_progress);
        self.emit(EventKind::Progress, level, message, extra, None);
    }

    /// A line of output (container or hook), at the current progress.
    pub(crate) fn output(&mut self, message: String, extra: Extra) {
        self.emit(EventKind::Output, Level::Verbose, message, extra, None);
    }

    pub(crate) fn cancelling(&mut self, message: String) {
        self.emit(
            EventKind::Cancelling,
            Level::Warning,
            message,
            Extra::default(),
            None,
        );
    }

    /// Ends the deployment FAILED in `phase` at `step` with `message`, outside of its
    /// steps (after a restart, or when its task failed); `extra` goes with the update.
    pub(super) fn fail(&mut self, phase: Phase, step: &str, message: String, extra: Extra) {
        let result = DeploymentResult {
            success: false,
            message,
            diagnostics: Some(FailureDiagnostics {
                failed_phase: Some(phase),
                step: step.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.finish_with(DeploymentState::Failed, result, extra);
    }

    /// The terminal update. Success brings `total_progress` to 1.0.
    pub(crate) fn finish(&mut self, state: DeploymentState, result: DeploymentResult) {
        self.finish_with(state, result, Extra::default());
    }

    fn finish_with(&mut self, state: DeploymentState, result: DeploymentResult, mut extra: Extra) {
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
        let operation = self.deployment.operation.as_str();
        match state {
            DeploymentState::Succeeded => {
                tracing::info!(operation, %message, "deployment succeeded")
            }
            _ => tracing::warn!(operation, state = state.as_str(), %message, "deployment ended"),
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
