//! `FakeSwarm`: a scripted [`SwarmRuntime`] for unit tests. Three ready nodes; each
//! `tasks` call moves every task one state on (new → … → running), so progress is seen
//! state by state. What an image does comes from its name: `crash` tasks fail at
//! starting (exit code 1), and an update to one makes "Swarm" roll back (its failure
//! action); `stall` tasks stay preparing for ever. Every spec sent is recorded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use super::RuntimeError;
use super::swarm::{
    NOT_A_MANAGER, NodeInfo, ServiceDef, ServiceState, SwarmRuntime, TaskInfo, TaskState,
    UpdateState,
};
use crate::model::{LABEL_DEPLOYMENT, RegistryAuth};

#[derive(Default)]
pub(crate) struct Service {
    pub(crate) id: String,
    version: u64,
    update: Option<UpdateState>,
    def: Option<ServiceDef>,
    previous: Option<ServiceDef>,
    tasks: Vec<TaskInfo>,
}

#[derive(Default)]
pub(crate) struct FakeSwarm {
    pub(crate) not_manager: bool,
    pub(crate) services: Mutex<HashMap<String, Service>>,
    /// Every spec sent (create or update), in order.
    pub(crate) sent: Mutex<Vec<ServiceDef>>,
    /// `rollback=previous` calls.
    pub(crate) rollbacks: Mutex<u32>,
    /// Services removed.
    pub(crate) removed: Mutex<Vec<String>>,
    /// Update calls to answer "update out of sequence" first.
    pub(crate) stale_updates: Mutex<u32>,
    pub(crate) next: Mutex<u64>,
}

fn label(def: &ServiceDef) -> String {
    def.labels
        .get(LABEL_DEPLOYMENT)
        .cloned()
        .unwrap_or_default()
}

impl FakeSwarm {
    fn id(&self, prefix: &str) -> String {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        format!("{prefix}{n:012}")
    }

    /// Starts a new task for every slot of `def` (old ones are shut down).
    fn roll(&self, s: &mut Service, def: &ServiceDef) {
        for t in &mut s.tasks {
            if !t.desired.is_terminal() {
                t.desired = TaskState::Shutdown;
                if !t.state.is_terminal() {
                    t.state = TaskState::Shutdown;
                }
            }
        }
        for slot in 1..=u64::from(def.replicas) {
            s.tasks.push(TaskInfo {
                id: self.id("task"),
                slot,
                node_id: format!("node{}", (slot - 1) % 3 + 1),
                state: TaskState::New,
                desired: TaskState::Running,
                message: String::new(),
                err: String::new(),
                exit_code: None,
                deployment: label(def),
            });
        }
    }

    /// One step of the simulation; returns whether an updated task failed (then the
    /// failure action rolls the service back).
    fn step(s: &mut Service) -> bool {
        let image = s.def.as_ref().map(|d| d.image.clone()).unwrap_or_default();
        let mut failed = false;
        for t in s.tasks.iter_mut().filter(|t| !t.desired.is_terminal()) {
            t.state = match t.state {
                TaskState::New => TaskState::Pending,
                TaskState::Pending => TaskState::Assigned,
                TaskState::Assigned => TaskState::Preparing,
                TaskState::Preparing if image.contains("stall") => TaskState::Preparing,
                TaskState::Preparing => TaskState::Starting,
                TaskState::Starting if image.contains("crash") => {
                    t.err = "task: non-zero exit (1)".into();
                    t.exit_code = Some(1);
                    failed = true;
                    TaskState::Failed
                }
                TaskState::Starting => TaskState::Running,
                other => other,
            };
        }
        let all_running = s
            .tasks
            .iter()
            .filter(|t| !t.desired.is_terminal())
            .all(|t| t.state == TaskState::Running);
        if failed && s.update == Some(UpdateState::Updating) {
            return true;
        }
        s.update = match s.update {
            Some(UpdateState::Updating) if all_running => Some(UpdateState::Completed),
            Some(UpdateState::RollbackStarted) if all_running => {
                Some(UpdateState::RollbackCompleted)
            }
            other => other,
        };
        false
    }

    /// Rolls `s` back to its previous spec.
    fn swap_back(&self, s: &mut Service) {
        let Some(prev) = s.previous.take() else {
            return;
        };
        s.previous = s.def.replace(prev.clone());
        s.version += 1;
        s.update = Some(UpdateState::RollbackStarted);
        self.roll(s, &prev);
    }

    pub(crate) fn service_image(&self, name: &str) -> Option<String> {
        let services = self.services.lock().unwrap();
        services.get(name)?.def.as_ref().map(|d| d.image.clone())
    }

    /// Pauses the service's update (as a failure action `pause` would).
    pub(crate) fn pause(&self, name: &str) {
        if let Some(s) = self.services.lock().unwrap().get_mut(name) {
            s.update = Some(UpdateState::Paused);
        }
    }

    pub(crate) fn update_state(&self, name: &str) -> Option<UpdateState> {
        self.services.lock().unwrap().get(name)?.update
    }
}

#[async_trait]
impl SwarmRuntime for FakeSwarm {
    fn endpoint(&self) -> &str {
        "fake://swarm"
    }

    async fn check_manager(&self) -> Result<(), RuntimeError> {
        if self.not_manager {
            return Err(RuntimeError::Call {
                op: "swarm check",
                reason: format!("the docker engine at fake://swarm {NOT_A_MANAGER}"),
            });
        }
        Ok(())
    }

    async fn resolve_digest(
        &self,
        image: &str,
        _auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError> {
        let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
        Ok(format!("{repo}@sha256:{:064x}", image.len()))
    }

    async fn inspect_service(&self, name: &str) -> Result<Option<ServiceState>, RuntimeError> {
        let mut services = self.services.lock().unwrap();
        // Swarm rolls back by itself, read or not: so does the fake, on every read.
        if let Some(s) = services.get_mut(name)
            && s.update == Some(UpdateState::RollbackStarted)
        {
            Self::step(s);
        }
        Ok(services.get(name).map(|s| ServiceState {
            id: s.id.clone(),
            version: s.version,
            update: s.update,
            update_message: String::new(),
            labels: s.def.as_ref().map(|d| d.labels.clone()).unwrap_or_default(),
            image: s.def.as_ref().map(|d| d.image.clone()).unwrap_or_default(),
        }))
    }

    async fn create_service(
        &self,
        def: &ServiceDef,
        _auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError> {
        self.sent.lock().unwrap().push(def.clone());
        let mut s = Service {
            id: self.id("svc"),
            version: 1,
            ..Default::default()
        };
        s.def = Some(def.clone());
        self.roll(&mut s, def);
        let id = s.id.clone();
        self.services.lock().unwrap().insert(def.name.clone(), s);
        Ok(id)
    }

    async fn update_service(
        &self,
        _id: &str,
        version: u64,
        def: &ServiceDef,
        _auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        {
            let mut stale = self.stale_updates.lock().unwrap();
            if *stale > 0 {
                *stale -= 1;
                return Err(RuntimeError::Call {
                    op: "update service",
                    reason: "rpc error: code = Unknown desc = update out of sequence".into(),
                });
            }
        }
        self.sent.lock().unwrap().push(def.clone());
        let mut services = self.services.lock().unwrap();
        let s = services.get_mut(&def.name).expect("updated service exists");
        assert_eq!(version, s.version, "update sent with a stale version");
        s.previous = s.def.replace(def.clone());
        s.version += 1;
        s.update = Some(UpdateState::Updating);
        self.roll(s, def);
        Ok(())
    }

    async fn rollback_service(
        &self,
        id: &str,
        _version: u64,
        _body: &ServiceDef,
    ) -> Result<(), RuntimeError> {
        *self.rollbacks.lock().unwrap() += 1;
        let mut services = self.services.lock().unwrap();
        let s = (services.values_mut())
            .find(|s| s.id == id)
            .expect("rolled back service exists");
        self.swap_back(s);
        Ok(())
    }

    async fn remove_service(&self, name: &str) -> Result<(), RuntimeError> {
        self.removed.lock().unwrap().push(name.to_owned());
        self.services.lock().unwrap().remove(name);
        Ok(())
    }

    async fn tasks(&self, service_id: &str) -> Result<Vec<TaskInfo>, RuntimeError> {
        let mut services = self.services.lock().unwrap();
        let Some(s) = services.values_mut().find(|s| s.id == service_id) else {
            return Ok(Vec::new());
        };
        if Self::step(s) {
            self.swap_back(s);
        }
        Ok(s.tasks.clone())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, RuntimeError> {
        Ok((1..=3)
            .map(|i| NodeInfo {
                id: format!("node{i}"),
                hostname: format!("n{i}"),
                addr: format!("10.0.0.{i}"),
                ready: true,
            })
            .collect())
    }
}

/// Labels as a map, for assertions.
pub(crate) fn labels_of(def: &ServiceDef) -> &BTreeMap<String, String> {
    &def.labels
}
