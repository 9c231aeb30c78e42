//! A scripted [`Runtime`] for tests (unit tests of the engine, and with the
//! `test-util` feature integration tests and benches): each image's behaviour is
//! scripted — present or pulled (with scripted pull events or a pull error),
//! HEALTHCHECK verdicts, a container that exits, a start that fails, panics or waits
//! on a gate, a create or a remove that waits on a gate. The fake records what was
//! created and removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::Semaphore;

use super::{
    ContainerSpec, ContainerState, ContainerSummary, DockerHealth, ExecRun, ImageInfo,
    PublishedPort, PullEvent, Runtime, RuntimeError,
};
use tokio_util::sync::CancellationToken;

use crate::model::{LABEL_APP, LABEL_DEPLOYMENT, PortSpec, RegistryAuth};
use crate::source::build::{BuildError, BuildEvent, BuildOutcome, BuildSpec, BuildStep};

/// What the image's HEALTHCHECK reports.
#[derive(Clone, Copy, Debug, Default)]
pub enum Health {
    /// `starting` for the first `n` inspections of a container, then `healthy`.
    HealthyAfter(u32),
    Unhealthy,
    /// `starting` forever (for cancel and deadline tests).
    #[default]
    StartingForever,
}

/// How the fake behaves for one image.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub healthcheck: bool,
    pub health: Health,
    /// The container exits with this code right after it starts.
    pub exit_code: Option<i64>,
    /// The container's output.
    pub logs: Vec<String>,
    pub fail_start: bool,
    /// `start` panics (a bug in a step).
    pub start_panics: bool,
    /// `remove` of a container of this image waits for a permit of this semaphore.
    pub remove_gate: Option<Arc<Semaphore>>,
    /// `start` waits for a permit of this semaphore.
    pub start_gate: Option<Arc<Semaphore>>,
    /// `create` waits for a permit of this semaphore. Like a real engine, the fake
    /// finishes creating the container even when the caller stops waiting.
    pub create_gate: Option<Arc<Semaphore>>,
    /// `None`: the image is present locally. `Some`: absent until pulled with these events.
    pub pull: Option<Vec<PullEvent>>,
    pub pull_error: Option<String>,
    /// The image has no repo digest (built or loaded locally).
    pub no_repo_digest: bool,
}

impl Script {
    pub fn healthy() -> Self {
        Self {
            healthcheck: true,
            health: Health::HealthyAfter(2),
            ..Default::default()
        }
    }
}

#[derive(Debug)]
pub struct FakeContainer {
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub started: bool,
    pub inspections: u32,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub scripts: HashMap<String, Script>,
    pub pulled: HashSet<String>,
    pub containers: BTreeMap<String, FakeContainer>,
    pub created: Vec<String>,
    pub removed: Vec<String>,
    pub next_id: u32,
    /// Calls of `list_app_containers`.
    pub app_lists: u32,
}

#[derive(Debug, Default)]
pub struct FakeRuntime {
    pub state: Arc<Mutex<FakeState>>,
    /// Wakes its waiters as each `create` is called, before its gate (`notify_waiters`:
    /// a waiter enables its `Notified` before what leads to the call).
    pub create_called: Arc<tokio::sync::Notify>,
}

impl FakeRuntime {
    pub fn with(scripts: impl IntoIterator<Item = (&'static str, Script)>) -> Arc<Self> {
        let fake = Self::default();
        fake.state.lock().unwrap().scripts = scripts
            .into_iter()
            .map(|(image, s)| (image.to_owned(), s))
            .collect();
        Arc::new(fake)
    }

    fn script(&self, image: &str) -> Script {
        self.state
            .lock()
            .unwrap()
            .scripts
            .get(image)
            .cloned()
            .unwrap_or_default()
    }

    pub fn removed(&self) -> Vec<String> {
        self.state.lock().unwrap().removed.clone()
    }

    pub fn created(&self) -> Vec<String> {
        self.state.lock().unwrap().created.clone()
    }

    /// IDs of the containers that exist now.
    pub fn existing(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
            .collect()
    }

    /// Puts a `web:1` container `id` with the app and deployment labels of one made by
    /// a deployment, as if left by an earlier one; `started` says whether it runs.
    pub fn insert_labelled(&self, id: &str, app: &str, deployment: String, started: bool) {
        let container = FakeContainer {
            image: "web:1".into(),
            labels: [
                (crate::model::LABEL_APP.to_owned(), app.to_owned()),
                (crate::model::LABEL_DEPLOYMENT.to_owned(), deployment),
            ]
            .into(),
            ports: Vec::new(),
            started,
            inspections: 0,
        };
        (self.state.lock().unwrap().containers).insert(id.to_owned(), container);
    }

    fn image_of(&self, id: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state.containers.get(id).map(|c| c.image.clone())
    }

    /// The containers of `app` (all of them with `None`).
    fn summaries(&self, app: Option<&str>) -> Vec<ContainerSummary> {
        let state = self.state.lock().unwrap();
        let label = |c: &FakeContainer, key: &str| c.labels.get(key).cloned().unwrap_or_default();
        (state.containers.iter())
            .filter(|(_, c)| {
                app.is_none_or(|a| c.labels.get(LABEL_APP).map(String::as_str) == Some(a))
            })
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                app: label(c, LABEL_APP),
                deployment: label(c, LABEL_DEPLOYMENT),
                running: self.is_running(&state, c),
            })
            .collect()
    }

    fn is_running(&self, state: &FakeState, c: &FakeContainer) -> bool {
        c.started
            && state
                .scripts
                .get(&c.image)
                .is_none_or(|s| s.exit_code.is_none())
    }
}

fn no_such_container(op: &'static str, id: &str) -> RuntimeError {
    RuntimeError::Call {
        op,
        reason: format!("no such container: {id}"),
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn endpoint(&self) -> &str {
        "fake://engine"
    }

    fn public_host(&self) -> &str {
        "127.0.0.1"
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn inspect_image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        let state = self.state.lock().unwrap();
        let Some(script) = state.scripts.get(image) else {
            return Ok(None);
        };
        if script.pull.is_some() && !state.pulled.contains(image) {
            return Ok(None);
        }
        Ok(Some(ImageInfo {
            id: format!("sha256:{image}"),
            digest: (!script.no_repo_digest).then(|| format!("{image}@sha256:{}", "a".repeat(64))),
            has_healthcheck: script.healthcheck,
        }))
    }

    fn pull(
        &self,
        image: &str,
        _auth: Option<&RegistryAuth>,
    ) -> BoxStream<'static, Result<PullEvent, RuntimeError>> {
        let script = self.script(image);
        if let Some(reason) = script.pull_error {
            let e = RuntimeError::Pull {
                image: image.to_owned(),
                reason,
            };
            return futures_util::stream::once(async move { Err(e) }).boxed();
        }
        self.state.lock().unwrap().pulled.insert(image.to_owned());
        futures_util::stream::iter(script.pull.unwrap_or_default().into_iter().map(Ok)).boxed()
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.create_called.notify_waiters();
        let gate = self.script(&spec.image).create_gate;
        let state = self.state.clone();
        let spec = spec.clone();
        // The engine side of the call: it goes on if the caller drops the future.
        let engine_side = tokio::spawn(async move {
            if let Some(gate) = gate {
                let _permit = gate.acquire().await.expect("gate open");
            }
            let mut state = state.lock().unwrap();
            state.next_id += 1;
            let id = format!("container-{:04}", state.next_id);
            state.containers.insert(
                id.clone(),
                FakeContainer {
                    image: spec.image.clone(),
                    labels: spec.labels.clone(),
                    ports: spec.ports.clone(),
                    started: false,
                    inspections: 0,
                },
            );
            state.created.push(id.clone());
            id
        });
        Ok(engine_side.await.expect("fake create"))
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let image = match self.state.lock().unwrap().containers.get(id) {
            Some(c) => c.image.clone(),
            None => return Err(no_such_container("start container", id)),
        };
        let script = self.script(&image);
        if let Some(gate) = &script.start_gate {
            let _permit = gate.acquire().await.expect("gate open");
        }
        assert!(!script.start_panics, "the fake's scripted panic in start");
        if script.fail_start {
            return Err(RuntimeError::Call {
                op: "start container",
                reason: "fake start failure".into(),
            });
        }
        if let Some(c) = self.state.lock().unwrap().containers.get_mut(id) {
            c.started = true;
        }
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let mut state = self.state.lock().unwrap();
        let script = {
            let c = state
                .containers
                .get_mut(id)
                .ok_or_else(|| no_such_container("inspect container", id))?;
            c.inspections += 1;
            state.scripts.get(&state.containers[id].image).cloned()
        }
        .unwrap_or_default();
        let c = &state.containers[id];
        let running = self.is_running(&state, c);
        let health = script.healthcheck.then_some(match script.health {
            Health::HealthyAfter(n) if c.inspections > n => DockerHealth::Healthy,
            Health::HealthyAfter(_) | Health::StartingForever => DockerHealth::Starting,
            Health::Unhealthy => DockerHealth::Unhealthy,
        });
        Ok(ContainerState {
            running,
            exit_code: if running { None } else { script.exit_code },
            oom_killed: false,
            health,
            health_log: None,
            stop_signal: None,
            stop_timeout: None,
            address: None,
            labels: c.labels.clone(),
            ports: c
                .ports
                .iter()
                .map(|p| PublishedPort {
                    container_port: p.container_port,
                    protocol: p.protocol,
                    host_port: 40000 + p.container_port % 20000,
                    host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                })
                .collect(),
            status: if running { "running" } else { "exited" }.into(),
        })
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let image = match self.state.lock().unwrap().containers.get(id) {
            Some(c) => c.image.clone(),
            None => return Err(no_such_container("read container logs", id)),
        };
        let logs = self.script(&image).logs;
        let skip = logs.len().saturating_sub(lines);
        Ok(logs.into_iter().skip(skip).collect())
    }

    fn follow_logs(&self, id: &str) -> BoxStream<'static, Result<String, RuntimeError>> {
        let image = self.image_of(id).unwrap_or_default();
        futures_util::stream::iter(self.script(&image).logs.into_iter().map(Ok)).boxed()
    }

    async fn list_app_containers(&self, app: &str) -> Result<Vec<ContainerSummary>, RuntimeError> {
        self.state.lock().unwrap().app_lists += 1;
        Ok(self.summaries(Some(app)))
    }

    async fn list_managed_containers(&self) -> Result<Vec<ContainerSummary>, RuntimeError> {
        Ok(self.summaries(None))
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        match self.state.lock().unwrap().containers.get_mut(id) {
            Some(c) => {
                c.started = false;
                Ok(())
            }
            None => Err(no_such_container("stop container", id)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(gate) = self
            .image_of(id)
            .and_then(|image| self.script(&image).remove_gate)
        {
            let _permit = gate.acquire().await.expect("gate open");
        }
        let mut state = self.state.lock().unwrap();
        state.containers.remove(id);
        state.removed.push(id.to_owned());
        Ok(())
    }

    async fn exec(&self, _: &str, _: &[String], _: bool) -> Result<ExecRun, RuntimeError> {
        Err(RuntimeError::Call {
            op: "create exec",
            reason: "not supported by the fake".into(),
        })
    }

    async fn exec_exit_code(&self, _: &str) -> Result<Option<i64>, RuntimeError> {
        Err(RuntimeError::Call {
            op: "inspect exec",
            reason: "not supported by the fake".into(),
        })
    }

    /// One step, then the tag is an image present locally with a HEALTHCHECK that
    /// passes; a tag built before is skipped.
    async fn build_image(
        &self,
        spec: &BuildSpec,
        _cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<BuildOutcome, BuildError> {
        let tag = spec.tag();
        let image_id = format!("sha256:{tag}");
        let built = {
            let mut state = self.state.lock().unwrap();
            state
                .scripts
                .insert(tag.clone(), Script::healthy())
                .is_some()
        };
        if built {
            on_event(BuildEvent::Skipped {
                tag: tag.clone(),
                image_id: image_id.clone(),
            });
            return Ok(BuildOutcome::Skipped { tag, image_id });
        }
        on_event(BuildEvent::Step(BuildStep {
            number: 1,
            total: 1,
            instruction: "FROM scratch".into(),
        }));
        Ok(BuildOutcome::Built {
            tag,
            image_id,
            total_steps: 1,
            cached_steps: 0,
            steps: Vec::new(),
        })
    }
}
