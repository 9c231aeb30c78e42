//! The Swarm target's seam: [`SwarmRuntime`], a sibling of [`super::Runtime`] for apps
//! run as Swarm services (one service per app, its tasks spread over the nodes). The
//! shapes differ from containers (a service is created once and then updated; tasks
//! come and go), so it is a trait of its own. [`super::docker`] implements it on
//! bollard (`docker_swarm.rs`); tests use [`fake_swarm`](super::fake_swarm).
//!
//! Stevedore sends the whole spec it records ([`ServiceDef`]) on every create and
//! update, and never sends back a spec it read: bollard 0.21 drops the healthcheck when
//! it reads a service (moby/moby#53422). Inspection gives only the version index, the
//! update state and the labels.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use super::RuntimeError;
use crate::model::{Protocol, RegistryAuth, UpdateOrder};

/// Stevedore's own record of a service spec: everything it sends, nothing read back.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct ServiceDef {
    /// The service's name: the app's.
    pub(crate) name: String,
    /// `repo@sha256:…`: pinned by digest, so every node runs the same image.
    pub(crate) image: String,
    pub(crate) command: Vec<String>,
    /// Never serialized (values may be secrets): the record keeps the keys.
    #[serde(serialize_with = "keys_only")]
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) ports: Vec<ServicePort>,
    /// Labels of the service and of each task's container (Stevedore's own included).
    pub(crate) labels: BTreeMap<String, String>,
    /// `None`: the image's HEALTHCHECK.
    pub(crate) health: Option<TaskHealth>,
    pub(crate) replicas: u32,
    pub(crate) update: UpdateConfig,
    /// The task's stop grace.
    pub(crate) stop_grace: Option<Duration>,
}

fn keys_only<S: serde::Serializer>(
    env: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(env.keys())
}

/// A port published in host mode on every node that runs a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ServicePort {
    pub(crate) target: u16,
    pub(crate) published: u16,
    #[serde(serialize_with = "protocol_name")]
    pub(crate) protocol: Protocol,
}

fn protocol_name<S: serde::Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str())
}

/// The task healthcheck (Docker's HealthConfig): `test` is `["CMD-SHELL", cmd]` or
/// `["NONE"]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct TaskHealth {
    pub(crate) test: Vec<String>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) start_period: Duration,
}

/// The update config sent: failure action rollback, always; the rollback itself
/// continues past failures (a paused rollback would leave the service half-way).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub(crate) struct UpdateConfig {
    pub(crate) parallelism: u32,
    pub(crate) order: UpdateOrder,
    pub(crate) monitor: Duration,
    pub(crate) max_failure_ratio: f64,
}

/// A service's update state machine (swarmkit's `UpdateStatus.State`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

/// What an inspect of a service tells: never its spec (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ServiceState {
    pub(crate) id: String,
    /// The version index to send with the next update (a fencing token).
    pub(crate) version: u64,
    /// `None` after a create: a create has no update state machine.
    pub(crate) update: Option<UpdateState>,
    pub(crate) update_message: String,
    pub(crate) labels: BTreeMap<String, String>,
    /// The image its spec runs: as Stevedore sent it, pinned (`repo@sha256:…`).
    pub(crate) image: String,
}

/// Task states, in the order the CLI ranks them (`new` = 1 … `running` = 9; the rest
/// are terminal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TaskState {
    New,
    Allocated,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Ready,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
}

impl TaskState {
    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "new" => Self::New,
            "allocated" => Self::Allocated,
            "pending" => Self::Pending,
            "assigned" => Self::Assigned,
            "accepted" => Self::Accepted,
            "preparing" => Self::Preparing,
            "ready" => Self::Ready,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "complete" => Self::Complete,
            "shutdown" => Self::Shutdown,
            "failed" => Self::Failed,
            "rejected" => Self::Rejected,
            "remove" => Self::Remove,
            _ => Self::Orphaned,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Allocated => "allocated",
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::Accepted => "accepted",
            Self::Preparing => "preparing",
            Self::Ready => "ready",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Shutdown => "shutdown",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Remove => "remove",
            Self::Orphaned => "orphaned",
        }
    }

    /// Past running: the task will not run (again).
    pub(crate) fn is_terminal(self) -> bool {
        self > Self::Running
    }

    /// Ended by a failure (not by a shutdown Swarm asked for).
    pub(crate) fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::Rejected)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TaskInfo {
    pub(crate) id: String,
    pub(crate) slot: u64,
    /// Empty until the scheduler assigned a node.
    pub(crate) node_id: String,
    pub(crate) state: TaskState,
    pub(crate) desired: TaskState,
    pub(crate) message: String,
    pub(crate) err: String,
    pub(crate) exit_code: Option<i64>,
    /// The `io.stevedore.deployment` label of the task's container: which deployment's
    /// spec the task runs.
    pub(crate) deployment: String,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NodeInfo {
    pub(crate) id: String,
    pub(crate) hostname: String,
    /// The address the node is reached at (published ports answer there).
    pub(crate) addr: String,
    pub(crate) ready: bool,
}

/// Why the engine cannot run services.
pub(crate) const NOT_A_MANAGER: &str = "is not a swarm manager";

#[async_trait]
pub(crate) trait SwarmRuntime: Send + Sync + 'static {
    /// The manager's address, for messages.
    fn endpoint(&self) -> &str;
    /// `Ok` when the engine is a swarm manager; [`RuntimeError::Call`] whose reason
    /// contains [`NOT_A_MANAGER`] when it answers but is not one.
    async fn check_manager(&self) -> Result<(), RuntimeError>;
    /// `repo@sha256:…` of `image` as the registry serves it now.
    async fn resolve_digest(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError>;
    /// `Ok(None)` when there is no such service.
    async fn inspect_service(&self, name: &str) -> Result<Option<ServiceState>, RuntimeError>;
    /// Creates the service; returns its ID.
    async fn create_service(
        &self,
        def: &ServiceDef,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError>;
    /// Replaces the service's whole spec with `def`, fenced by `version`.
    async fn update_service(
        &self,
        id: &str,
        version: u64,
        def: &ServiceDef,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError>;
    /// Rolls the service back to its previous spec (Swarm keeps one). The engine still
    /// converts a body before it swaps the previous spec in, so `body` must be a valid
    /// spec of the service (it is not applied).
    async fn rollback_service(
        &self,
        id: &str,
        version: u64,
        body: &ServiceDef,
    ) -> Result<(), RuntimeError>;
    /// Removes the service (absent is fine).
    async fn remove_service(&self, name: &str) -> Result<(), RuntimeError>;
    /// The service's tasks, old and new.
    async fn tasks(&self, service_id: &str) -> Result<Vec<TaskInfo>, RuntimeError>;
    async fn nodes(&self) -> Result<Vec<NodeInfo>, RuntimeError>;
}

/// A stale version index: "update out of sequence" (HTTP 500, told apart only by its
/// text; moby/moby#30794). The inspect → update loop is retried a bounded number of
/// times.
pub(crate) fn is_out_of_sequence(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Call { reason, .. } if reason.contains("out of sequence"))
}

/// `UpdateServiceOptions::version` is an `i32`, the index a `u64`: refuse loudly
/// rather than wrap.
pub(crate) fn version_param(version: u64) -> Result<i32, RuntimeError> {
    i32::try_from(version).map_err(|_| RuntimeError::Call {
        op: "update service",
        reason: format!("version index {version} does not fit the API's 32-bit version"),
    })
}

/// The task that stands for each slot, as the docker CLI picks it: among the tasks of
/// a slot, the one with the lowest desired state, then the lowest observed state (in
/// start-first, the new task beside the old one). Tasks on nodes that are down are
/// left out. Sorted by slot.
pub(crate) fn task_per_slot(
    tasks: &[TaskInfo],
    node_down: impl Fn(&str) -> bool,
) -> Vec<&TaskInfo> {
    let mut best: BTreeMap<u64, &TaskInfo> = BTreeMap::new();
    for t in tasks {
        if !t.node_id.is_empty() && node_down(&t.node_id) {
            continue;
        }
        let e = best.entry(t.slot).or_insert(t);
        if (t.desired, t.state) < (e.desired, e.state) {
            *e = t;
        }
    }
    best.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn task(id: &str, slot: u64, desired: TaskState, state: TaskState) -> TaskInfo {
        TaskInfo {
            id: id.into(),
            slot,
            node_id: format!("node-{slot}"),
            state,
            desired,
            message: String::new(),
            err: String::new(),
            exit_code: None,
            deployment: String::new(),
        }
    }

    #[test]
    fn a_slot_is_shown_by_its_task_with_the_lowest_desired_then_observed_state() {
        use TaskState::*;
        let tasks = vec![
            // Slot 1, start-first: the old task still runs (desired running), the new
            // one starts (desired running too, observed lower): the new one stands.
            task("old1", 1, Running, Running),
            task("new1", 1, Running, Starting),
            // Slot 2: the old one is being shut down; the new one is preparing.
            task("old2", 2, Shutdown, Running),
            task("new2", 2, Running, Preparing),
            // Slot 3: a failed attempt and its replacement.
            task("dead3", 3, Shutdown, Failed),
            task("live3", 3, Running, Running),
        ];
        let picked: Vec<&str> = task_per_slot(&tasks, |_| false)
            .iter()
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(picked, ["new1", "new2", "live3"]);
    }

    #[test]
    fn tasks_on_down_nodes_are_left_out() {
        use TaskState::*;
        let tasks = vec![
            task("a", 1, Running, Running),
            task("b", 2, Running, Running),
        ];
        let picked = task_per_slot(&tasks, |n| n == "node-2");
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].id, "a");
    }

    #[test]
    fn task_states_rank_like_the_cli_and_terminal_ones_are_told_apart() {
        assert!(TaskState::Preparing < TaskState::Running);
        assert!(!TaskState::Running.is_terminal());
        assert!(TaskState::Shutdown.is_terminal());
        assert!(TaskState::Rejected.is_failure() && !TaskState::Shutdown.is_failure());
        for s in [
            "new",
            "preparing",
            "running",
            "failed",
            "rejected",
            "shutdown",
        ] {
            assert_eq!(TaskState::parse(s).as_str(), s);
        }
    }

    #[test]
    fn out_of_sequence_is_recognised_and_versions_must_fit_32_bits() {
        let e = RuntimeError::Call {
            op: "update service",
            reason: "rpc error: code = Unknown desc = update out of sequence".into(),
        };
        assert!(is_out_of_sequence(&e));
        assert_eq!(version_param(42).unwrap(), 42);
        assert!(version_param(u64::from(u32::MAX)).is_err());
    }

    #[test]
    fn the_recorded_spec_keeps_env_keys_only() {
        let def = ServiceDef {
            name: "web".into(),
            image: "r/web@sha256:00".into(),
            command: vec![],
            env: [("TOKEN".to_string(), "s3cret".to_string())].into(),
            ports: vec![],
            labels: BTreeMap::new(),
            health: None,
            replicas: 3,
            update: UpdateConfig {
                parallelism: 1,
                order: UpdateOrder::StopFirst,
                monitor: Duration::from_secs(5),
                max_failure_ratio: 0.0,
            },
            stop_grace: None,
        };
        let json = serde_json::to_string(&def).unwrap();
        assert!(json.contains("TOKEN") && !json.contains("s3cret"), "{json}");
    }
}
