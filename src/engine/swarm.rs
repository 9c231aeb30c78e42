//! The phases of a deployment on the Swarm target (`--target swarm`): one service per
//! app, driven through [`SwarmRuntime`], reported through the same [`Reporter`] (so the
//! log, store, observers and API are the docker target's).
//!
//! QUEUED → VALIDATING (the engine is a manager; ready nodes) → PULLING (the image is
//! pinned by digest; each node pulls it itself while its task is preparing, and Swarm
//! reports no bytes) → CREATING (create, or update fenced by the version index, from
//! Stevedore's own spec) → STARTING (tasks followed until every slot runs the new spec)
//! → HEALTH_CHECK (the monitor period: Swarm's update completes, or a created service's
//! tasks stay up) → SWITCHING → CLEANUP → COMPLETE.
//!
//! Swarm never times an update out and a paused update stays paused: a failure (the
//! update rolled back or paused, a created service's task failing), a cancel or the
//! deadline rolls the service back to its previous spec (`rollback=previous`), or
//! removes a service this deployment created, and the deployment ends FAILED or
//! CANCELLED with the tasks' errors, exit codes and nodes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::deployment::{Extra, Reporter};
use super::queue::Ticket;
use super::run::{Failure, Stop, deadline_of, wait_turn};
use crate::model::{
    DeploySpec, DeploymentResult, DeploymentState, FailureDiagnostics, HealthOutcome, HealthProbe,
    LABEL_APP, LABEL_DEPLOYMENT, Level, Phase, UpdateOrder,
};
use crate::runtime::RuntimeError;
use crate::runtime::swarm::{
    NodeInfo, ServiceDef, ServicePort, ServiceState, SwarmRuntime, TaskHealth, TaskInfo, TaskState,
    UpdateConfig, UpdateState, is_out_of_sequence, task_per_slot,
};

/// How often the service and its tasks are read (the docker CLI's pace).
pub(super) const POLL: Duration = Duration::from_millis(200);
/// Inspect → update attempts when the version index went stale in between.
const UPDATE_ATTEMPTS: u32 = 5;
/// How long a rollback may take before the deployment ends saying it is incomplete.
const ROLLBACK_LIMIT: Duration = Duration::from_secs(180);
/// The shortest monitor period (unit tests: short, so they run fast).
#[cfg(not(test))]
const MIN_MONITOR: Duration = Duration::from_secs(5);
#[cfg(test)]
const MIN_MONITOR: Duration = Duration::from_millis(300);
/// Diagnostic lines kept.
const DIAGNOSTIC_LINES: usize = 20;

/// The task healthcheck for the request's health check, where it can be expressed as
/// a command in the task (`None`: the image's own HEALTHCHECK), and a warning when it
/// cannot.
pub(super) fn task_health(spec: &DeploySpec) -> (Option<TaskHealth>, Option<String>) {
    let interval = spec
        .health
        .interval
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    let check = |cmd: String| TaskHealth {
        test: vec!["CMD-SHELL".into(), cmd],
        interval,
        timeout: spec
            .health
            .timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(10)),
        retries: 3,
        start_period: spec.health.timeout.min(Duration::from_secs(10)),
    };
    match &spec.health.probe {
        None | Some(HealthProbe::Docker) => (None, None),
        Some(HealthProbe::None) => (
            Some(TaskHealth {
                test: vec!["NONE".into()],
                interval: Duration::ZERO,
                timeout: Duration::ZERO,
                retries: 0,
                start_period: Duration::ZERO,
            }),
            None,
        ),
        Some(HealthProbe::Http { port, path, .. }) => (
            Some(check(format!(
                "wget -q -O /dev/null http://127.0.0.1:{port}{path} || exit 1"
            ))),
            None,
        ),
        Some(p @ (HealthProbe::Tcp { .. } | HealthProbe::Log { .. })) => (
            None,
            Some(format!(
                "the {} health check cannot run inside a Swarm task: the image's own HEALTHCHECK gates the tasks instead",
                p.name()
            )),
        ),
    }
}

/// The monitor period: the request's, but never shorter than the task healthcheck
/// needs to turn a task unhealthy (start period + interval × retries), nor 5 s.
pub(super) fn monitor_of(spec: &DeploySpec, health: Option<&TaskHealth>) -> Duration {
    let needed = health.map_or(Duration::ZERO, |h| h.start_period + h.interval * h.retries);
    spec.update
        .monitor
        .unwrap_or(Duration::ZERO)
        .max(needed)
        .max(MIN_MONITOR)
}

/// The update order used: start-first cannot work when every ready node already runs
/// a task holding the app's host-mode port (the new task would stay pending for ever:
/// moby/moby#36934), so stop-first is used then, with the reason.
pub(super) fn order_of(spec: &DeploySpec, ready_nodes: usize) -> (UpdateOrder, Option<String>) {
    let asked = spec.update.order;
    if asked == UpdateOrder::StartFirst
        && !spec.ports.is_empty()
        && spec.replicas as usize >= ready_nodes
    {
        let why = format!(
            "start-first asked, but the app's ports are published in host mode and its {} replicas fill the {ready_nodes} ready nodes: a new task could not bind the port beside the old one, so the update goes stop-first (one task at a time, the others keep serving)",
            spec.replicas
        );
        return (UpdateOrder::StopFirst, Some(why));
    }
    (asked, None)
}

/// What a poll of the tasks found, against the replicas asked for.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Tally {
    /// Slots whose task runs this deployment's spec and is running.
    pub(super) running: usize,
    /// This deployment's tasks that failed (or were rejected).
    pub(super) failed: usize,
}

/// Counts the slots that run `deployment`'s spec, as the CLI does (the task that stands
/// for each slot), and the failures among this deployment's tasks.
pub(super) fn tally(tasks: &[TaskInfo], deployment: &str, down: impl Fn(&str) -> bool) -> Tally {
    let running = task_per_slot(tasks, &down)
        .into_iter()
        .filter(|t| t.deployment == deployment && t.state == TaskState::Running)
        .filter(|t| !t.desired.is_terminal())
        .count();
    let failed = tasks
        .iter()
        .filter(|t| t.deployment == deployment && ended_early(t))
        .count();
    Tally { running, failed }
}

/// What to do about the service when the deployment stops short.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Undo {
    /// Nothing was sent: the service is as it was.
    Nothing,
    /// This deployment created the service: remove it.
    Remove,
    /// Swarm is rolling back already (the failure action): wait for it.
    AwaitRollback,
    /// Ask Swarm for `rollback=previous`, then wait for it.
    Rollback,
}

/// The rollback decision, from what the deployment sent and the update state now.
pub(super) fn undo(sent: bool, created: bool, state: Option<UpdateState>) -> Undo {
    match (sent, created, state) {
        (false, _, _) => Undo::Nothing,
        (true, true, _) => Undo::Remove,
        (true, false, Some(UpdateState::RollbackStarted | UpdateState::RollbackCompleted)) => {
            Undo::AwaitRollback
        }
        (true, false, _) => Undo::Rollback,
    }
}

/// The update state as a failure of the update, if it is one.
fn failed_update(state: Option<UpdateState>, message: &str) -> Option<String> {
    let what = match state? {
        UpdateState::Paused => "the update paused",
        UpdateState::RollbackStarted => "Swarm started rolling the update back",
        UpdateState::RollbackPaused => "Swarm's rollback paused",
        UpdateState::RollbackCompleted => "Swarm rolled the update back",
        UpdateState::Updating | UpdateState::Completed => return None,
    };
    Some(if message.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {message}")
    })
}

pub(super) struct SwarmRun {
    rep: Reporter,
    swarm: Arc<dyn SwarmRuntime>,
    /// The deployment's ID, as the label of the tasks it starts.
    label: String,
    service_id: String,
    /// A spec was sent (create or update).
    sent: bool,
    /// This deployment created the service (there was no previous version).
    created: bool,
    image: String,
    nodes: HashMap<String, NodeInfo>,
    /// Last state reported per task.
    seen: HashMap<String, TaskState>,
    monitor: Duration,
    health: Vec<HealthOutcome>,
    /// Finished by recovery after a restart (the message says so).
    recovered: bool,
    /// The spec sent (a rollback call carries it as its body; see
    /// [`SwarmRuntime::rollback_service`]).
    def: Option<ServiceDef>,
}

impl SwarmRun {
    pub(super) fn new(rep: Reporter, swarm: Arc<dyn SwarmRuntime>) -> Self {
        let label = rep.deployment().id.to_string();
        Self {
            rep,
            swarm,
            label,
            service_id: String::new(),
            sent: false,
            created: false,
            image: String::new(),
            nodes: HashMap::new(),
            seen: HashMap::new(),
            monitor: MIN_MONITOR,
            health: Vec::new(),
            recovered: false,
            def: None,
        }
    }

    pub(super) async fn run(mut self, mut ticket: Ticket) {
        let deployment = self.rep.deployment().clone();
        let deadline = deadline_of(&deployment);
        if let Err(stop) = wait_turn(&mut self.rep, &mut ticket, Some(deadline)).await {
            return self.end(stop).await;
        }
        let outcome = tokio::select! {
            r = self.steps() => r.map_err(Stop::Failed),
            _ = deployment.cancel.cancelled() => Err(Stop::Cancelled),
            _ = deployment.interrupt.cancelled() => Err(Stop::Interrupted),
            _ = tokio::time::sleep_until(deadline) => Err(Stop::DeadlineExceeded),
        };
        match outcome {
            Ok(()) => self.succeed().await,
            Err(stop) => self.end(stop).await,
        }
        drop(ticket);
    }

    async fn steps(&mut self) -> Result<(), Failure> {
        let order = self.validate().await?;
        self.pin_image().await?;
        self.send(order).await?;
        self.follow_tasks().await?;
        self.watch_monitor().await?;
        self.rep.enter(
            Phase::Switching,
            "Swarm replaced the tasks slot by slot; nothing left to switch",
        );
        self.rep.progress(
            1.0,
            Level::Info,
            "every slot runs the new version".into(),
            Extra::default(),
        );
        self.rep
            .enter(Phase::Cleanup, "Swarm shuts the previous tasks down itself");
        self.rep.progress(
            1.0,
            Level::Info,
            "nothing to clean up".into(),
            Extra::default(),
        );
        Ok(())
    }

    /// VALIDATING: the engine is a manager, and the nodes that can take tasks.
    async fn validate(&mut self) -> Result<UpdateOrder, Failure> {
        let endpoint = self.swarm.endpoint().to_owned();
        self.rep.enter(
            Phase::Validating,
            format!("checking the swarm manager at {endpoint}"),
        );
        let step = "swarm manager check";
        (self.swarm.check_manager().await)
            .map_err(|e| Failure::runtime(Phase::Validating, step, e))?;
        let nodes = (self.swarm.nodes().await)
            .map_err(|e| Failure::runtime(Phase::Validating, "node list", e))?;
        let ready = nodes.iter().filter(|n| n.ready).count();
        self.nodes = nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
        let spec = self.rep.deployment().spec.clone();
        self.rep.progress(
            0.5,
            Level::Info,
            format!(
                "swarm manager answers; {ready} of {} nodes ready for {} replicas",
                self.nodes.len(),
                spec.replicas
            ),
            Extra::meta([
                ("nodes_ready", ready.to_string()),
                ("replicas", spec.replicas.to_string()),
            ]),
        );
        let (order, why) = order_of(&spec, ready);
        if let Some(why) = why {
            self.rep.progress(
                1.0,
                Level::Warning,
                why,
                Extra::meta([("update_order", order.as_str().into())]),
            );
        }
        Ok(order)
    }

    /// PULLING: pins the image by digest (the nodes pull it while preparing).
    async fn pin_image(&mut self) -> Result<(), Failure> {
        let spec = self.rep.deployment().spec.clone();
        self.rep.enter(
            Phase::Pulling,
            format!("resolving {} to its digest at the registry", spec.image),
        );
        let pinned = (self
            .swarm
            .resolve_digest(&spec.image, spec.registry_auth.as_ref())
            .await)
            .map_err(|e| Failure::runtime(Phase::Pulling, "image digest lookup", e))?;
        self.image = pinned.clone();
        self.rep.progress(
            1.0,
            Level::Info,
            format!(
                "pinned {} to {pinned}; each node pulls it while its task is preparing (Swarm reports no pull bytes)",
                spec.image
            ),
            Extra::meta([("image_digest", pinned)]),
        );
        Ok(())
    }

    /// The whole spec this deployment sends.
    fn service_def(&mut self, order: UpdateOrder) -> (ServiceDef, Option<String>) {
        let spec = &self.rep.deployment().spec;
        let (health, warning) = task_health(spec);
        self.monitor = monitor_of(spec, health.as_ref());
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_APP.into(), spec.app.to_string());
        labels.insert(LABEL_DEPLOYMENT.into(), self.label.clone());
        let def = ServiceDef {
            name: spec.app.to_string(),
            image: self.image.clone(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    target: p.container_port,
                    published: p.host_port,
                    protocol: p.protocol,
                })
                .collect(),
            labels,
            health,
            replicas: spec.replicas,
            update: UpdateConfig {
                parallelism: spec.update.parallelism.max(1),
                order,
                monitor: self.monitor,
                max_failure_ratio: spec.update.max_failure_ratio,
            },
            stop_grace: spec.stop_timeout,
        };
        (def, warning)
    }

    /// CREATING: creates the service, or updates it fenced by the version index of the
    /// inspect just read (retried when it went stale in between).
    async fn send(&mut self, order: UpdateOrder) -> Result<(), Failure> {
        let app = self.rep.deployment().spec.app.to_string();
        let auth = self.rep.deployment().spec.registry_auth.clone();
        let (def, warning) = self.service_def(order);
        self.def = Some(def.clone());
        if let Some(w) = warning {
            self.rep.progress(0.0, Level::Warning, w, Extra::default());
        }
        self.rep.on_disk().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = (self.swarm.inspect_service(&app).await)
                .map_err(|e| Failure::runtime(Phase::Creating, "service inspection", e))?;
            let (verb, sent) = match &current {
                None => {
                    self.rep
                        .enter(Phase::Creating, format!("creating service {app}"));
                    // Recorded before the call: a create interrupted mid-call is removed.
                    (self.sent, self.created) = (true, true);
                    (
                        "created",
                        self.swarm
                            .create_service(&def, auth.as_ref())
                            .await
                            .map(Some),
                    )
                }
                Some(s) => {
                    if attempt == 1 {
                        self.rep.enter(
                            Phase::Creating,
                            format!("updating service {app} (version {})", s.version),
                        );
                    }
                    self.service_id = s.id.clone();
                    self.sent = true;
                    let r = self
                        .swarm
                        .update_service(&s.id, s.version, &def, auth.as_ref())
                        .await;
                    ("updated", r.map(|()| None))
                }
            };
            match sent {
                Ok(id) => {
                    if let Some(id) = id {
                        self.service_id = id;
                    }
                    let record = serde_json::to_string(&def).unwrap_or_default();
                    tracing::info!(service = %app, "service spec sent");
                    let version = current
                        .as_ref()
                        .map(|s| s.version.to_string())
                        .unwrap_or_default();
                    self.rep.progress(
                        1.0,
                        Level::Info,
                        format!(
                            "{verb} service {app} ({} replicas, {}, monitor {}s)",
                            def.replicas,
                            def.update.order.as_str(),
                            def.update.monitor.as_secs_f64()
                        ),
                        Extra::meta([
                            ("service_id", self.service_id.clone()),
                            ("service_version", version),
                            ("update_order", def.update.order.as_str().into()),
                            ("monitor_ms", def.update.monitor.as_millis().to_string()),
                            // Stevedore's record of what it sent (env keys only), kept
                            // with the deployment's log in the store.
                            ("service_spec", record),
                        ]),
                    );
                    return Ok(());
                }
                Err(e) if is_out_of_sequence(&e) && attempt < UPDATE_ATTEMPTS => {
                    self.rep.progress(
                        0.0,
                        Level::Verbose,
                        format!("the service changed since it was read ({e}); reading it again"),
                        Extra::meta([("attempt", attempt.to_string())]),
                    );
                }
                Err(e) => {
                    return Err(Failure::runtime(
                        Phase::Creating,
                        "service create or update",
                        e,
                    ));
                }
            }
        }
    }

    /// Reads the service and its tasks; reports each task whose state changed.
    async fn poll(
        &mut self,
        phase: Phase,
    ) -> Result<(Option<ServiceState>, Vec<TaskInfo>), Failure> {
        let app = self.rep.deployment().spec.app.to_string();
        let service = (self.swarm.inspect_service(&app).await)
            .map_err(|e| Failure::runtime(phase, "service inspection", e))?;
        let tasks = (self.swarm.tasks(&self.service_id).await)
            .map_err(|e| Failure::runtime(phase, "task list", e))?;
        if tasks
            .iter()
            .any(|t| !t.node_id.is_empty() && !self.nodes.contains_key(&t.node_id))
            && let Ok(nodes) = self.swarm.nodes().await
        {
            self.nodes = nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
        }
        let replicas = self.rep.deployment().spec.replicas as usize;
        let count = self.tally(&tasks);
        let mut changed: Vec<&TaskInfo> = tasks
            .iter()
            .filter(|t| t.deployment == self.label)
            .filter(|t| self.seen.get(&t.id) != Some(&t.state))
            .collect();
        changed.sort_by_key(|t| (t.slot, t.state));
        let changed: Vec<TaskInfo> = changed.into_iter().cloned().collect();
        for t in changed {
            self.seen.insert(t.id.clone(), t.state);
            let node = self.node_name(&t.node_id);
            let (level, message) = task_message(&t, &node);
            let fraction = if phase == Phase::Starting {
                count.running as f64 / replicas.max(1) as f64
            } else {
                0.0
            };
            let mut extra = Extra::meta([
                ("task_id", t.id.clone()),
                ("node", node),
                ("slot", t.slot.to_string()),
                ("task_state", t.state.as_str().into()),
                ("tasks_running", count.running.to_string()),
                ("replicas", replicas.to_string()),
            ]);
            if let Some(code) = t.exit_code.filter(|_| t.state.is_terminal()) {
                extra.metadata.insert("exit_code".into(), code.to_string());
            }
            self.rep.progress(fraction, level, message, extra);
        }
        Ok((service, tasks))
    }

    fn node_name(&self, id: &str) -> String {
        match self.nodes.get(id) {
            Some(n) if !n.hostname.is_empty() => n.hostname.clone(),
            _ if id.is_empty() => "(unassigned)".into(),
            _ => id.chars().take(12).collect(),
        }
    }

    fn tally(&self, tasks: &[TaskInfo]) -> Tally {
        tally(tasks, &self.label, |n| {
            self.nodes.get(n).is_some_and(|n| !n.ready)
        })
    }

    /// STARTING: until every slot runs this deployment's spec.
    async fn follow_tasks(&mut self) -> Result<(), Failure> {
        let replicas = self.rep.deployment().spec.replicas as usize;
        self.rep.enter(
            Phase::Starting,
            format!("waiting for {replicas} tasks to run the new version"),
        );
        loop {
            let (service, tasks) = self.poll(Phase::Starting).await?;
            self.check(Phase::Starting, service.as_ref(), &tasks)?;
            if self.tally(&tasks).running >= replicas {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// HEALTH_CHECK: the monitor period. An update ends when Swarm completes it (one
    /// monitor period after the last task); a created service has no update state, so
    /// its tasks must stay up for the monitor period (a regression restarts the wait,
    /// as the CLI does).
    async fn watch_monitor(&mut self) -> Result<(), Failure> {
        let replicas = self.rep.deployment().spec.replicas as usize;
        let secs = self.monitor.as_secs_f64();
        self.rep.enter(
            Phase::HealthCheck,
            format!("watching the {replicas} tasks for {secs}s (the update's monitor period)"),
        );
        let mut stable_since = Instant::now();
        loop {
            let (service, tasks) = self.poll(Phase::HealthCheck).await?;
            self.check(Phase::HealthCheck, service.as_ref(), &tasks)?;
            let running = self.tally(&tasks).running;
            if running < replicas {
                stable_since = Instant::now();
            }
            let waited = stable_since.elapsed();
            let update = service.as_ref().and_then(|s| s.update);
            let done = match update {
                Some(UpdateState::Completed) => running >= replicas,
                None => waited >= self.monitor,
                _ => false,
            };
            if done {
                self.health.push(HealthOutcome {
                    check: "swarm".into(),
                    healthy: true,
                    attempts: replicas as u32,
                    message: format!(
                        "{running}/{replicas} tasks running the new version, stable through the {secs}s monitor period"
                    ),
                });
                self.rep.progress(
                    1.0,
                    Level::Info,
                    format!("{running}/{replicas} tasks stayed up through the monitor period"),
                    Extra::meta([("tasks_running", running.to_string())]),
                );
                return Ok(());
            }
            let fraction = (waited.as_secs_f64() / secs.max(0.001)).min(0.99);
            if fraction > self.rep_phase_progress() + 0.05 {
                self.rep.progress(
                    fraction,
                    Level::Verbose,
                    format!("monitoring: {:.0}s of {secs}s", waited.as_secs_f64()),
                    Extra::meta([("tasks_running", running.to_string())]),
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn rep_phase_progress(&self) -> f64 {
        self.rep.deployment().status().phase_progress
    }

    /// A failed update (Swarm paused or rolled it back), or a created service whose
    /// task failed, fails the deployment.
    fn check(
        &self,
        phase: Phase,
        service: Option<&ServiceState>,
        tasks: &[TaskInfo],
    ) -> Result<(), Failure> {
        let Some(service) = service else {
            return Err(Failure::new(
                phase,
                "service inspection",
                format!("service {} disappeared", self.rep.deployment().spec.app),
            ));
        };
        if !self.created
            && let Some(why) = failed_update(service.update, &service.update_message)
        {
            return Err(Failure::new(phase, "service update", why));
        }
        if self.created
            && let Some(t) = tasks
                .iter()
                .find(|t| t.deployment == self.label && ended_early(t))
        {
            let node = self.node_name(&t.node_id);
            return Err(Failure::new(
                phase,
                "task start",
                format!(
                    "task {} (slot {}) on {node} {}",
                    short(&t.id),
                    t.slot,
                    task_error(t)
                ),
            ));
        }
        Ok(())
    }

    async fn succeed(mut self) {
        let spec = self.rep.deployment().spec.clone();
        let tasks = self.swarm.tasks(&self.service_id).await.unwrap_or_default();
        let endpoints = self.endpoints(&tasks);
        let mut message = if self.recovered {
            format!(
                "completed by recovery: service {} converged on this deployment's spec ({}, {} replicas) after the server restarted",
                spec.app, self.image, spec.replicas
            )
        } else {
            format!(
                "deployed {} as service {} with {} replicas",
                self.image, spec.app, spec.replicas
            )
        };
        if let Some(url) = endpoints.values().next() {
            message.push_str(&format!(", serving at {url}"));
        }
        let result = DeploymentResult {
            success: true,
            message,
            container_id: self.service_id.clone(),
            image_digest: self.image.clone(),
            endpoints,
            health: std::mem::take(&mut self.health),
            diagnostics: None,
            commit: String::new(),
            containers_removed: 0,
        };
        self.rep.finish(DeploymentState::Succeeded, result);
    }

    /// `"8080/tcp"` → the first node's URL, and `"8080/tcp@<node>"` → each node that
    /// runs a task of this deployment (host-mode ports answer on those nodes only).
    fn endpoints(&self, tasks: &[TaskInfo]) -> BTreeMap<String, String> {
        let mut nodes: Vec<&NodeInfo> = tasks
            .iter()
            .filter(|t| t.deployment == self.label && t.state == TaskState::Running)
            .filter_map(|t| self.nodes.get(&t.node_id))
            .collect();
        nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        nodes.dedup_by(|a, b| a.id == b.id);
        let mut out = BTreeMap::new();
        for p in &self.rep.deployment().spec.ports {
            let name = format!("{}/{}", p.container_port, p.protocol.as_str());
            let scheme = match p.protocol {
                crate::model::Protocol::Tcp => "http",
                crate::model::Protocol::Udp => "udp",
            };
            for n in &nodes {
                let url = format!("{scheme}://{}:{}", n.addr, p.host_port);
                out.entry(name.clone()).or_insert_with(|| url.clone());
                out.insert(format!("{name}@{}", n.hostname), url);
            }
        }
        out
    }

    /// Rolls the service back (or removes the one it created) and sends the terminal
    /// update.
    async fn end(mut self, stop: Stop) {
        let phase = self.rep.phase();
        let mut diagnostics = FailureDiagnostics {
            failed_phase: Some(phase),
            ..Default::default()
        };
        let (state, mut message) = match stop {
            Stop::Failed(f) => {
                diagnostics.failed_phase = Some(f.phase);
                diagnostics.step = f.step;
                (DeploymentState::Failed, f.message)
            }
            Stop::Cancelled => {
                self.rep.cancelling(format!(
                    "cancel requested during {}: rolling the service back",
                    phase.name()
                ));
                diagnostics.step = "cancel".into();
                (
                    DeploymentState::Cancelled,
                    format!("cancelled during {}", phase.name()),
                )
            }
            Stop::DeadlineExceeded => {
                diagnostics.step = "deadline".into();
                let secs = self.rep.deployment().spec.deadline.as_secs_f64();
                (
                    DeploymentState::Failed,
                    format!(
                        "deadline of {secs}s exceeded during {} (Swarm never times an update out)",
                        phase.name()
                    ),
                )
            }
            Stop::Interrupted => {
                diagnostics.step = "server shutdown".into();
                (
                    DeploymentState::Failed,
                    format!("interrupted by server shutdown during {}", phase.name()),
                )
            }
        };
        self.diagnose(&mut diagnostics).await;
        match self.undo().await {
            Ok(Some(done)) => message.push_str(&format!("; {done}")),
            Ok(None) => {}
            Err(e) => {
                message.push_str(&format!("; rollback incomplete: {e}"));
                diagnostics.step.push_str(" (rollback incomplete)");
            }
        }
        let result = DeploymentResult {
            success: false,
            message,
            container_id: self.service_id.clone(),
            image_digest: self.image.clone(),
            endpoints: BTreeMap::new(),
            health: std::mem::take(&mut self.health),
            diagnostics: (state == DeploymentState::Failed).then_some(diagnostics),
            commit: String::new(),
            containers_removed: 0,
        };
        self.rep.finish(state, result);
    }

    /// The failed tasks of this deployment: error, exit code, node.
    async fn diagnose(&mut self, d: &mut FailureDiagnostics) {
        if self.service_id.is_empty() {
            return;
        }
        let Ok(tasks) = self.swarm.tasks(&self.service_id).await else {
            return;
        };
        let mut ours: Vec<&TaskInfo> = tasks
            .iter()
            .filter(|t| t.deployment == self.label && ended_early(t))
            .collect();
        ours.sort_by_key(|t| t.slot);
        d.exit_code = ours.iter().find_map(|t| t.exit_code.filter(|c| *c != 0));
        d.log_tail = ours
            .iter()
            .take(DIAGNOSTIC_LINES)
            .map(|t| {
                let node = self.node_name(&t.node_id);
                format!(
                    "task {} slot {} on {node}: {}",
                    short(&t.id),
                    t.slot,
                    task_error(t)
                )
            })
            .collect();
    }

    /// Undoes what this deployment sent; says what it did.
    async fn undo(&mut self) -> Result<Option<String>, RuntimeError> {
        let app = self.rep.deployment().spec.app.to_string();
        let current = if self.sent {
            self.swarm.inspect_service(&app).await?
        } else {
            None
        };
        // A service this deployment did not label (the create or update never landed)
        // is the previous version, untouched.
        let ours = current
            .as_ref()
            .is_some_and(|s| s.labels.get(LABEL_DEPLOYMENT) == Some(&self.label));
        let state = current.as_ref().and_then(|s| s.update);
        let rolling_back = matches!(
            state,
            Some(UpdateState::RollbackStarted | UpdateState::RollbackCompleted)
        );
        let action = if self.sent && !self.created && !ours && !rolling_back {
            Undo::Nothing
        } else {
            undo(self.sent, self.created, state)
        };
        match action {
            Undo::Nothing => Ok(None),
            Undo::Remove => {
                self.swarm.remove_service(&app).await?;
                Ok(Some(format!(
                    "service {app} (created by this deployment) was removed"
                )))
            }
            Undo::Rollback | Undo::AwaitRollback => {
                if action == Undo::Rollback {
                    let s = current.expect("an update to roll back");
                    self.rollback(&s).await?;
                }
                self.await_rollback(&app).await?;
                Ok(Some(
                    "the service was rolled back to its previous spec, which keeps serving".into(),
                ))
            }
        }
    }

    /// `rollback=previous`, fenced by the version index (retried when stale).
    async fn rollback(&mut self, service: &ServiceState) -> Result<(), RuntimeError> {
        let app = self.rep.deployment().spec.app.to_string();
        let mut version = service.version;
        for attempt in 1..=UPDATE_ATTEMPTS {
            let body = self.rollback_body();
            match self
                .swarm
                .rollback_service(&service.id, version, &body)
                .await
            {
                Ok(()) => break,
                Err(e) if is_out_of_sequence(&e) && attempt < UPDATE_ATTEMPTS => {
                    if let Some(s) = self.swarm.inspect_service(&app).await? {
                        version = s.version;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.rep.progress(
            0.0,
            Level::Warning,
            format!("rolling service {app} back to its previous spec"),
            Extra::meta([("service_id", service.id.clone())]),
        );
        Ok(())
    }

    /// The body of a rollback call: the spec sent, or (after a restart, when it is not
    /// known) a minimal valid one; the engine does not apply it.
    fn rollback_body(&mut self) -> ServiceDef {
        if self.def.is_none() {
            let spec = self.rep.deployment().spec.clone();
            let image = if self.image.is_empty() {
                spec.image.clone()
            } else {
                self.image.clone()
            };
            self.image = image;
            self.def = Some(self.service_def(UpdateOrder::StopFirst).0);
        }
        self.def.clone().expect("set above")
    }

    /// Follows the rollback until Swarm completes it (bounded).
    async fn await_rollback(&mut self, app: &str) -> Result<(), RuntimeError> {
        let limit = Instant::now() + ROLLBACK_LIMIT;
        loop {
            let s = self.swarm.inspect_service(app).await?;
            match s.as_ref().and_then(|s| s.update) {
                Some(UpdateState::RollbackCompleted) => return Ok(()),
                Some(UpdateState::RollbackPaused) => {
                    return Err(RuntimeError::Call {
                        op: "roll back service",
                        reason: "Swarm paused the rollback".into(),
                    });
                }
                _ => {}
            }
            if Instant::now() > limit {
                return Err(RuntimeError::Call {
                    op: "roll back service",
                    reason: format!("not complete after {}s", ROLLBACK_LIMIT.as_secs()),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// How long recovery follows an interrupted update at most before it rolls it back
/// (less when the deployment's own deadline ends sooner).
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// How long recovery follows an update at least (a deadline already past included).
const RECOVERY_MIN: Duration = Duration::from_secs(5);

/// The time recovery follows an update: what is left of the deployment's own
/// `deadline` since it was accepted (`created_at`), within [RECOVERY_MIN,
/// RECOVERY_LIMIT].
fn recovery_limit(deadline: Option<Duration>, created_at: std::time::SystemTime) -> Duration {
    let age = std::time::SystemTime::now()
        .duration_since(created_at)
        .unwrap_or_default();
    deadline
        .map_or(RECOVERY_LIMIT, |d| d.saturating_sub(age))
        .clamp(RECOVERY_MIN, RECOVERY_LIMIT)
}

/// The ports of a stored request (see [`crate::store::redacted_request`]).
fn stored_ports(request: &serde_json::Value) -> Vec<crate::model::PortSpec> {
    let ports = request["ports"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    ports
        .iter()
        .filter_map(|p| {
            Some(crate::model::PortSpec {
                container_port: u16::try_from(p["container_port"].as_u64()?).ok()?,
                host_port: u16::try_from(p["host_port"].as_u64()?).ok()?,
                protocol: match p["protocol"].as_str()? {
                    "udp" => crate::model::Protocol::Udp,
                    _ => crate::model::Protocol::Tcp,
                },
                host_ip: None,
            })
        })
        .collect()
}

impl super::Engine {
    /// Takes over a deployment to a swarm that a dead process left in flight, without
    /// waiting for it: the deployment is live again (RUNNING, in its app's queue, its
    /// log continuing the stored one) and its task, in the engine's task set, follows
    /// the service's update (see [`SwarmRun::follow_recovered`]). Returns whether it is
    /// followed; `false` when the server now runs `--target docker`: it then ends
    /// FAILED at once, the service left as it is.
    pub(super) async fn recover_on_swarm(&self, status: crate::model::DeploymentStatus) -> bool {
        let (id, app, phase) = (status.id, status.app.clone(), status.phase);
        let Some(swarm) = self.0.swarm.clone() else {
            let message = format!(
                "interrupted by a restart of the server during {}; the server now runs --target docker, so service {app} was left as it is",
                phase.name()
            );
            let deployment = Arc::new(super::deployment::Deployment::recovered(status));
            let mut rep = self.resumed_reporter(deployment);
            rep.fail(
                phase,
                "server restart",
                message,
                Extra::meta([("interrupted", "restart".into())]),
            );
            return false;
        };
        // What the deployment asked for that the follow needs: its deadline, its
        // ports (for the endpoints), from the stored request.
        let request = (self.0.store.request(id).await.ok().flatten()).unwrap_or_default();
        let deadline = request["deadline_ms"].as_u64().map(Duration::from_millis);
        let replicas = status.replicas.max(1);
        let log = self.resumed_log(id, status.last_sequence);
        let mut deployment = super::deployment::Deployment::recovered_with(status, log);
        deployment.spec.replicas = replicas;
        deployment.spec.ports = stored_ports(&request);
        let deployment = Arc::new(deployment);
        self.hold_recovered(&deployment);
        // The app's queue place: a new deployment of the app waits behind this one.
        let ticket = self.0.queues.admit_recovered(&app, id);
        let rep = self.resumed_reporter(deployment.clone());
        let follow = SwarmRun::new(rep, swarm).follow_recovered(ticket, deadline);
        self.spawn_recovered(&deployment, follow);
        true
    }
}

impl SwarmRun {
    /// Recovery's follow of a deployment a dead process left in flight (its turn in
    /// the app's queue first): a service whose spec is this deployment's is followed
    /// to the end of its update (SUCCEEDED, "completed by recovery"), or rolled back
    /// when it cannot converge within the rest of the deployment's deadline (at most
    /// [`RECOVERY_LIMIT`]), paused, or rolled back by Swarm (FAILED); a paused update
    /// is never left paused. A deployment whose spec never reached Swarm ends FAILED
    /// with the service untouched. A cancel or the server's shutdown rolls it back as
    /// they do any deployment.
    pub(super) async fn follow_recovered(mut self, mut ticket: Ticket, deadline: Option<Duration>) {
        let deployment = self.rep.deployment().clone();
        let phase = self.rep.phase();
        let outcome = tokio::select! {
            r = async {
                while ticket.position() > 0 {
                    ticket.changed().await;
                }
                self.take_over(phase, deadline).await
            } => r,
            _ = deployment.cancel.cancelled() => Err(Stop::Cancelled),
            _ = deployment.interrupt.cancelled() => Err(Stop::Interrupted),
        };
        match outcome {
            Ok(true) => {
                self.recovered = true;
                self.succeed().await;
            }
            Ok(false) => {}
            Err(stop) => self.end(stop).await,
        }
        drop(ticket);
    }

    /// Reads the service and follows its update; `Ok(false)` when the deployment
    /// ended already (its spec is not the service's).
    async fn take_over(&mut self, phase: Phase, deadline: Option<Duration>) -> Result<bool, Stop> {
        let status = self.rep.deployment().status();
        let limit = recovery_limit(deadline, status.created_at);
        let app = status.app.to_string();
        let service = match self.swarm.inspect_service(&app).await {
            Ok(Some(s)) if s.labels.get(LABEL_DEPLOYMENT) == Some(&self.label) => s,
            other => {
                let why = match other {
                    Err(e) => format!("the service could not be read ({e}), so it was left as it is"),
                    _ => "its spec never reached Swarm (or Swarm already rolled it back): the previous version keeps serving".into(),
                };
                let message = format!(
                    "interrupted by a restart of the server during {}; {why}",
                    phase.name()
                );
                self.rep.fail(
                    phase,
                    "server restart",
                    message,
                    Extra::meta([("interrupted", "restart".into())]),
                );
                return Ok(false);
            }
        };
        tracing::warn!(update = ?service.update, "following a swarm deployment interrupted by a restart");
        self.service_id = service.id.clone();
        self.sent = true;
        self.created = service.update.is_none();
        // The pinned reference the deployment sent (the result's digest).
        self.image = service.image.clone();
        self.nodes = (self.swarm.nodes().await)
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        self.rep.progress(
            0.0,
            Level::Warning,
            format!(
                "the server restarted during {}: following the service's update to its end",
                phase.name()
            ),
            Extra::meta([("recovered", "true".into())]),
        );
        let follow = async {
            self.follow_tasks().await?;
            self.watch_monitor().await
        };
        match tokio::time::timeout(limit, follow).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(f)) => Err(Stop::Failed(f)),
            Err(_) => Err(Stop::Failed(Failure::new(
                self.rep.phase(),
                "recovery",
                format!(
                    "the update did not converge within {}s of the restart (the rest of the deployment's deadline)",
                    limit.as_secs()
                ),
            ))),
        }
    }
}

/// A task's state change in words ("preparing on node X": Swarm reports no pull
/// bytes, so that is all there is to say while the node pulls).
fn task_message(t: &TaskInfo, node: &str) -> (Level, String) {
    let id = short(&t.id);
    let slot = t.slot;
    match t.state {
        TaskState::Preparing => (
            Level::Info,
            format!(
                "task {id} (slot {slot}) preparing on node {node}: pulling the image there if needed"
            ),
        ),
        TaskState::Running => (
            Level::Info,
            format!("task {id} (slot {slot}) running on node {node}"),
        ),
        s if s.is_failure() || s == TaskState::Complete => (
            Level::Warning,
            format!("task {id} (slot {slot}) on node {node} {}", task_error(t)),
        ),
        s => (
            Level::Verbose,
            format!("task {id} (slot {slot}) {} on node {node}", s.as_str()),
        ),
    }
}

/// A task that ended on its own (failed, rejected, or exited: an unhealthy task is
/// stopped and may exit 0), not one Swarm shut down; or one with an error.
fn ended_early(t: &TaskInfo) -> bool {
    t.state.is_failure() || t.state == TaskState::Complete || !t.err.is_empty()
}

/// "failed: <err> (exit code N)".
fn task_error(t: &TaskInfo) -> String {
    let mut s = t.state.as_str().to_owned();
    let why = if t.err.is_empty() { &t.message } else { &t.err };
    if !why.is_empty() {
        s.push_str(&format!(": {why}"));
    }
    if let Some(code) = t.exit_code.filter(|c| *c != 0) {
        s.push_str(&format!(" (exit code {code})"));
    }
    s
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HealthSpec, UpdatePolicy};

    fn spec(replicas: u32) -> DeploySpec {
        let mut s = crate::engine::tests::spec("web", "r/web:1");
        s.replicas = replicas;
        s
    }

    #[test]
    fn the_rollback_decision_follows_what_was_sent_and_the_update_state() {
        assert_eq!(undo(false, false, None), Undo::Nothing);
        assert_eq!(undo(true, true, None), Undo::Remove);
        assert_eq!(
            undo(true, false, Some(UpdateState::Updating)),
            Undo::Rollback
        );
        assert_eq!(undo(true, false, Some(UpdateState::Paused)), Undo::Rollback);
        assert_eq!(
            undo(true, false, Some(UpdateState::Completed)),
            Undo::Rollback
        );
        assert_eq!(
            undo(true, false, Some(UpdateState::RollbackStarted)),
            Undo::AwaitRollback
        );
        assert_eq!(
            undo(true, false, Some(UpdateState::RollbackCompleted)),
            Undo::AwaitRollback
        );
    }

    #[test]
    fn a_paused_or_rolled_back_update_is_a_failure_and_a_running_one_is_not() {
        assert!(failed_update(Some(UpdateState::Updating), "").is_none());
        assert!(failed_update(Some(UpdateState::Completed), "").is_none());
        assert!(failed_update(None, "").is_none());
        let why = failed_update(Some(UpdateState::Paused), "update paused due to failure").unwrap();
        assert!(
            why.contains("paused") && why.contains("due to failure"),
            "{why}"
        );
        assert!(failed_update(Some(UpdateState::RollbackStarted), "").is_some());
    }

    #[test]
    fn running_counts_the_slots_on_the_new_spec_and_failures_count_ours() {
        use TaskState::*;
        let t = |id: &str, slot, desired, state, dep: &str| TaskInfo {
            id: id.into(),
            slot,
            node_id: format!("n{slot}"),
            state,
            desired,
            message: String::new(),
            err: String::new(),
            exit_code: None,
            deployment: dep.into(),
        };
        let tasks = vec![
            t("a", 1, Running, Running, "new"),
            t("b", 2, Shutdown, Running, "old"),
            t("c", 2, Running, Starting, "new"),
            t("d", 3, Running, Running, "old"),
            t("e", 3, Shutdown, Failed, "new"),
        ];
        assert_eq!(
            tally(&tasks, "new", |_| false),
            Tally {
                running: 1,
                failed: 1
            }
        );
        // Node n1 down: its task is not counted.
        assert_eq!(
            tally(&tasks, "new", |n| n == "n1"),
            Tally {
                running: 0,
                failed: 1
            }
        );
    }

    #[test]
    fn start_first_falls_back_to_stop_first_when_host_ports_fill_every_node() {
        let mut s = spec(3);
        s.update = UpdatePolicy {
            order: UpdateOrder::StartFirst,
            ..Default::default()
        };
        let (order, why) = order_of(&s, 3);
        assert_eq!(order, UpdateOrder::StopFirst);
        assert!(why.unwrap().contains("host mode"));
        // A spare node: start-first works.
        assert_eq!(order_of(&s, 4), (UpdateOrder::StartFirst, None));
        // No ports: nothing to collide on.
        s.ports.clear();
        assert_eq!(order_of(&s, 3).0, UpdateOrder::StartFirst);
    }

    #[test]
    fn the_monitor_covers_the_healthcheck_and_http_checks_become_task_healthchecks() {
        let mut s = spec(2);
        s.health = HealthSpec {
            probe: Some(HealthProbe::Http {
                port: 8080,
                path: "/".into(),
                expect_status: 200,
            }),
            timeout: Duration::from_secs(8),
            interval: Duration::from_secs(2),
        };
        let (health, warning) = task_health(&s);
        let health = health.unwrap();
        assert!(warning.is_none());
        assert_eq!(health.test[0], "CMD-SHELL");
        assert!(health.test[1].contains("http://127.0.0.1:8080/"));
        // 8 s start period + 2 s × 3 retries.
        assert_eq!(monitor_of(&s, Some(&health)), Duration::from_secs(14));
        s.update.monitor = Some(Duration::from_secs(30));
        assert_eq!(monitor_of(&s, Some(&health)), Duration::from_secs(30));
        // The image's own check: at least 5 s.
        s.update.monitor = None;
        assert_eq!(monitor_of(&s, None), MIN_MONITOR);
        // A log check cannot run in a task: the image's check, with a warning.
        s.health.probe = Some(HealthProbe::Log {
            pattern: regex::Regex::new("ready").unwrap(),
        });
        let (health, warning) = task_health(&s);
        assert!(health.is_none() && warning.unwrap().contains("log"));
    }

    #[test]
    fn task_messages_say_where_a_task_prepares_and_why_it_failed() {
        let mut t = TaskInfo {
            id: "abcdefghijklmnop".into(),
            slot: 2,
            node_id: "n2".into(),
            state: TaskState::Preparing,
            desired: TaskState::Running,
            message: "preparing".into(),
            err: String::new(),
            exit_code: None,
            deployment: "d".into(),
        };
        let (_, m) = task_message(&t, "node-2");
        assert_eq!(
            m,
            "task abcdefghijkl (slot 2) preparing on node node-2: pulling the image there if needed"
        );
        t.state = TaskState::Failed;
        t.err = "task: non-zero exit (1)".into();
        t.exit_code = Some(1);
        let (level, m) = task_message(&t, "node-2");
        assert_eq!(level, Level::Warning);
        assert!(
            m.ends_with("failed: task: non-zero exit (1) (exit code 1)"),
            "{m}"
        );
    }
}
