//! Unit tests of the engine's phase and progress logic, driven through a fake
//! [`Runtime`] whose behaviour each test scripts per image: present or pulled (with
//! scripted pull events or a pull error), HEALTHCHECK verdicts, a container that exits,
//! a start that fails or waits on a gate. The fake records what was created and removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::Semaphore;

use super::{Engine, EngineConfig};
use crate::events::{ObserverRegistry, UpdateStream};
use crate::model::{
    AppName, DeploySpec, DeploymentState, EventKind, HealthSpec, LABEL_APP, LABEL_DEPLOYMENT,
    Phase, PortSpec, Protocol, RegistryAuth, Update,
};
use crate::runtime::{
    ContainerSpec, ContainerState, ContainerSummary, DockerHealth, ExecRun, ImageInfo, LayerStatus,
    PublishedPort, PullEvent, Runtime, RuntimeError,
};

// ---------------------------------------------------------------------------
// The fake runtime
// ---------------------------------------------------------------------------

/// What the image's HEALTHCHECK reports.
#[derive(Clone, Copy, Debug, Default)]
enum Health {
    /// `starting` for the first `n` inspections of a container, then `healthy`.
    HealthyAfter(u32),
    Unhealthy,
    /// `starting` forever (for cancel and deadline tests).
    #[default]
    StartingForever,
}

/// How the fake behaves for one image.
#[derive(Clone, Default)]
struct Script {
    healthcheck: bool,
    health: Health,
    /// The container exits with this code right after it starts.
    exit_code: Option<i64>,
    /// The container's output.
    logs: Vec<String>,
    fail_start: bool,
    /// `start` waits for a permit of this semaphore.
    start_gate: Option<Arc<Semaphore>>,
    /// `create` waits for a permit of this semaphore. Like a real engine, the fake
    /// finishes creating the container even when the caller stops waiting.
    create_gate: Option<Arc<Semaphore>>,
    /// `None`: the image is present locally. `Some`: absent until pulled with these events.
    pull: Option<Vec<PullEvent>>,
    pull_error: Option<String>,
}

impl Script {
    fn healthy() -> Self {
        Self {
            healthcheck: true,
            health: Health::HealthyAfter(2),
            ..Default::default()
        }
    }
}

struct FakeContainer {
    image: String,
    labels: BTreeMap<String, String>,
    ports: Vec<PortSpec>,
    started: bool,
    inspections: u32,
}

#[derive(Default)]
struct FakeState {
    scripts: HashMap<String, Script>,
    pulled: HashSet<String>,
    containers: BTreeMap<String, FakeContainer>,
    created: Vec<String>,
    removed: Vec<String>,
    next_id: u32,
}

#[derive(Default)]
struct FakeRuntime {
    state: Arc<Mutex<FakeState>>,
}

impl FakeRuntime {
    fn with(scripts: impl IntoIterator<Item = (&'static str, Script)>) -> Arc<Self> {
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

    fn removed(&self) -> Vec<String> {
        self.state.lock().unwrap().removed.clone()
    }

    fn created(&self) -> Vec<String> {
        self.state.lock().unwrap().created.clone()
    }

    /// IDs of the containers that exist now.
    fn existing(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
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
            digest: Some(format!("{image}@sha256:{}", "a".repeat(64))),
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
            ports: c
                .ports
                .iter()
                .map(|p| PublishedPort {
                    container_port: p.container_port,
                    protocol: p.protocol,
                    host_port: 40000 + p.container_port % 20000,
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
        let image = self
            .state
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|c| c.image.clone())
            .unwrap_or_default();
        futures_util::stream::iter(self.script(&image).logs.into_iter().map(Ok)).boxed()
    }

    async fn list_app_containers(&self, app: &str) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .containers
            .iter()
            .filter(|(_, c)| c.labels.get(LABEL_APP).map(String::as_str) == Some(app))
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                app: app.to_owned(),
                deployment: c.labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                running: self.is_running(&state, c),
            })
            .collect())
    }

    async fn list_managed_containers(&self) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .containers
            .iter()
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                app: c.labels.get(LABEL_APP).cloned().unwrap_or_default(),
                deployment: c.labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                running: self.is_running(&state, c),
            })
            .collect())
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
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// An engine over `fake`, with its store in a fresh temporary directory.
async fn engine(fake: &Arc<FakeRuntime>) -> Engine {
    let dir = tempfile::tempdir().unwrap().keep();
    let store = crate::store::Store::open(&dir).await.unwrap();
    Engine::new(
        fake.clone(),
        ObserverRegistry::new(),
        EngineConfig {
            ping_timeout: Duration::from_secs(5),
            settle_time: Duration::from_millis(20),
            cancel_wait: Duration::from_secs(20),
            ..EngineConfig::default()
        },
        store,
    )
}

fn spec(app: &str, image: &str) -> DeploySpec {
    DeploySpec {
        app: AppName::parse(app).unwrap(),
        image: image.into(),
        command: vec![],
        env: Default::default(),
        ports: vec![PortSpec {
            container_port: 8080,
            host_port: 0,
            protocol: Protocol::Tcp,
        }],
        labels: Default::default(),
        health: HealthSpec {
            probe: None,
            timeout: Duration::from_secs(60),
            interval: Duration::from_millis(5),
        },
        deadline: Duration::from_secs(120),
        idempotency_key: None,
        registry_auth: None,
        milestones: vec![],
        hooks: vec![],
        requested_by: "unit test".into(),
    }
}

/// Bounds a wait for a state the test expects (generous; no duration is asserted).
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The rest of a deployment's updates, to its end.
async fn rest(stream: UpdateStream) -> Vec<Arc<Update>> {
    bounded(
        "the deployment to end",
        stream.map(|u| u.expect("log readable")).collect(),
    )
    .await
}

/// Updates up to and including the first one matching `pred`.
async fn until(stream: &mut UpdateStream, pred: impl Fn(&Update) -> bool) -> Vec<Arc<Update>> {
    bounded("an update", async {
        let mut seen = Vec::new();
        while let Some(u) = stream.next().await {
            let u = u.expect("log readable");
            let hit = pred(&u);
            seen.push(u);
            if hit {
                return seen;
            }
        }
        panic!("stream ended before the awaited update: {seen:#?}");
    })
    .await
}

/// Deploys and follows to the end.
async fn deploy(engine: &Engine, spec: DeploySpec) -> Vec<Arc<Update>> {
    let (_, stream) = engine.deploy(spec).await.expect("accepted");
    rest(stream).await
}

/// Sequences 1..n with no gap, one deployment, total_progress never decreasing and in
/// range, phase_progress in range, exactly one terminal update and it is last.
fn assert_well_formed(updates: &[Arc<Update>]) {
    assert!(!updates.is_empty());
    let id = updates[0].deployment_id;
    assert!(matches!(updates[0].kind, EventKind::Accepted { .. }));
    let mut last_total = 0.0;
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(u.deployment_id, id);
        assert_eq!(u.sequence, i as u64 + 1, "sequence gap at {i}");
        assert!(
            u.total_progress >= last_total,
            "total_progress went back at {}: {} < {last_total}",
            u.sequence,
            u.total_progress
        );
        assert!((0.0..=1.0).contains(&u.total_progress));
        assert!((0.0..=1.0).contains(&u.phase_progress));
        last_total = u.total_progress;
    }
    let terminal: Vec<_> = updates.iter().filter(|u| u.is_terminal()).collect();
    assert_eq!(terminal.len(), 1, "exactly one terminal update");
    let last = updates.last().unwrap();
    assert!(last.is_terminal(), "the terminal update is last");
    assert!(
        last.result.is_some(),
        "the terminal update carries the result"
    );
    assert!(last.phase.is_terminal());
    assert!(
        updates[..updates.len() - 1]
            .iter()
            .all(|u| u.result.is_none())
    );
}

fn phases(updates: &[Arc<Update>]) -> Vec<Phase> {
    let mut out = Vec::new();
    for u in updates {
        if out.last() != Some(&u.phase) {
            out.push(u.phase);
        }
    }
    out
}

fn end_state(updates: &[Arc<Update>]) -> DeploymentState {
    match updates.last().unwrap().kind {
        EventKind::Finished { state } => state,
        ref k => panic!("not terminal: {k:?}"),
    }
}

fn queue_positions(updates: &[Arc<Update>]) -> Vec<u32> {
    updates
        .iter()
        .filter_map(|u| match u.kind {
            EventKind::Queued { position } => Some(position),
            _ => None,
        })
        .collect()
}

fn layer(id: &str, status: LayerStatus, current: Option<u64>, total: Option<u64>) -> PullEvent {
    PullEvent::Layer {
        id: id.into(),
        status,
        current,
        total,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_deployment_goes_through_every_phase_in_order() {
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("web", "web:1")).await;

    assert_well_formed(&updates);
    use Phase::*;
    assert_eq!(
        phases(&updates),
        vec![
            Queued,
            Validating,
            Pulling,
            Creating,
            Starting,
            HealthCheck,
            Switching,
            Cleanup,
            Complete
        ]
    );
    // Each phase is entered once, by a PhaseStarted update, and ends at 100%.
    for phase in [
        Validating,
        Pulling,
        Creating,
        Starting,
        HealthCheck,
        Switching,
        Cleanup,
    ] {
        let of_phase: Vec<_> = updates.iter().filter(|u| u.phase == phase).collect();
        assert_eq!(of_phase[0].kind, EventKind::PhaseStarted, "{phase:?}");
        assert_eq!(of_phase[0].phase_progress, 0.0, "{phase:?}");
        assert!(
            (of_phase[0].total_progress - phase.start_offset()).abs() < 1e-3,
            "{phase:?} starts at its offset"
        );
        assert_eq!(
            of_phase
                .iter()
                .filter(|u| u.kind == EventKind::PhaseStarted)
                .count(),
            1
        );
        assert_eq!(of_phase.last().unwrap().phase_progress, 1.0, "{phase:?}");
    }
    let end = updates.last().unwrap();
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    assert_eq!(end.total_progress, 1.0);
    let result = end.result.as_ref().unwrap();
    assert!(result.success);
    assert_eq!(fake.created(), vec![result.container_id.clone()]);
    assert_eq!(result.endpoints["8080/tcp"], "http://127.0.0.1:48080");
    assert_eq!(result.health.len(), 1);
    assert_eq!(result.health[0].check, "docker");
    assert!(result.health[0].healthy);
    assert!(fake.removed().is_empty());

    let status = engine.status(&end.deployment_id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Succeeded);
    assert_eq!(status.last_sequence, end.sequence);
    assert_eq!(status.total_progress, 1.0);
}

#[tokio::test]
async fn a_redeploy_switches_out_the_previous_container() {
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("web:2", Script::healthy())]);
    let engine = engine(&fake).await;
    let first = deploy(&engine, spec("web", "web:1")).await;
    let old = first.last().unwrap().result.clone().unwrap().container_id;
    let second = deploy(&engine, spec("web", "web:2")).await;
    assert_well_formed(&second);
    assert_eq!(end_state(&second), DeploymentState::Succeeded);
    let new = second.last().unwrap().result.clone().unwrap().container_id;
    assert_ne!(old, new);
    assert_eq!(fake.removed(), vec![old.clone()]);
    assert_eq!(fake.existing(), vec![new]);
    // The old one was removed during SWITCHING, after the health check passed.
    let removal = second
        .iter()
        .find(|u| u.metadata.get("removed_container_id") == Some(&old))
        .expect("the removal is reported");
    assert_eq!(removal.phase, Phase::Switching);
}

#[tokio::test]
async fn a_container_that_exits_fails_is_removed_and_the_previous_one_stays() {
    let crash = Script {
        exit_code: Some(1),
        logs: vec![
            "starting crash image".into(),
            "fatal: config missing".into(),
        ],
        ..Default::default()
    };
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("crash:1", crash)]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;

    let updates = deploy(&engine, spec("app", "crash:1")).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert_eq!(end.phase, Phase::Failed);
    assert!(
        end.message.contains("exited with code 1"),
        "{}",
        end.message
    );
    let result = end.result.as_ref().unwrap();
    assert!(!result.success);
    let d = result.diagnostics.as_ref().expect("diagnostics");
    assert_eq!(d.failed_phase, Some(Phase::Starting));
    assert_eq!(d.exit_code, Some(1));
    assert_eq!(
        d.log_tail,
        vec!["starting crash image", "fatal: config missing"]
    );
    assert_eq!(end.metadata.get("exit_code").map(String::as_str), Some("1"));

    let created = fake.created();
    let crashed = created.last().unwrap();
    assert_ne!(crashed, &previous);
    assert_eq!(
        fake.removed(),
        vec![crashed.clone()],
        "only ours is removed"
    );
    assert_eq!(fake.existing(), vec![previous]);
    let status = engine.status(&end.deployment_id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Failed);
    assert_eq!(status.error, end.message);
}

#[tokio::test]
async fn a_failing_step_after_create_rolls_back() {
    let broken = Script {
        fail_start: true,
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("broken:1", broken)]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;

    let updates = deploy(&engine, spec("app", "broken:1")).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert!(
        end.message.contains("fake start failure"),
        "{}",
        end.message
    );
    let d = end.result.as_ref().unwrap().diagnostics.as_ref().unwrap();
    assert_eq!(d.failed_phase, Some(Phase::Starting));
    assert_eq!(d.step, "container start");
    let ours = fake.created().last().unwrap().clone();
    assert_eq!(fake.removed(), vec![ours]);
    assert_eq!(fake.existing(), vec![previous]);
}

#[tokio::test]
async fn unhealthy_fails_in_health_check_and_rolls_back() {
    let sick = Script {
        healthcheck: true,
        health: Health::Unhealthy,
        ..Default::default()
    };
    let fake = FakeRuntime::with([("sick:1", sick)]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("app", "sick:1")).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert!(end.message.contains("unhealthy"), "{}", end.message);
    let result = end.result.as_ref().unwrap();
    assert_eq!(
        result.diagnostics.as_ref().unwrap().failed_phase,
        Some(Phase::HealthCheck)
    );
    assert!(!result.health[0].healthy);
    assert_eq!(fake.removed(), fake.created());
    assert!(fake.existing().is_empty());
}

#[tokio::test]
async fn a_failed_pull_fails_in_pulling_and_creates_nothing() {
    let missing = Script {
        pull: Some(vec![]),
        pull_error: Some("manifest unknown".into()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("missing:1", missing)]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("app", "missing:1")).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert!(
        end.message.contains("missing:1") && end.message.contains("manifest unknown"),
        "{}",
        end.message
    );
    let d = end.result.as_ref().unwrap().diagnostics.as_ref().unwrap();
    assert_eq!(d.failed_phase, Some(Phase::Pulling));
    assert!(fake.created().is_empty());
    assert!(fake.removed().is_empty());
}

#[tokio::test]
async fn pull_progress_is_aggregated_throttled_and_ends_at_100_percent() {
    // Two layers downloaded in many small steps, interleaved, then extracted; plus a
    // layer that already exists. Many more events than the throttle lets through.
    const STEPS: u64 = 500;
    let (a_total, b_total) = (1_000_000u64, 3_000_000u64);
    let mut events = vec![
        layer("base", LayerStatus::AlreadyExists, None, None),
        layer("a", LayerStatus::Pending, None, None),
        layer("b", LayerStatus::Pending, None, None),
    ];
    for i in 1..=STEPS {
        events.push(layer(
            "a",
            LayerStatus::Downloading,
            Some(a_total * i / STEPS),
            Some(a_total),
        ));
        events.push(layer(
            "b",
            LayerStatus::Downloading,
            Some(b_total * i / STEPS),
            Some(b_total),
        ));
    }
    for id in ["a", "b"] {
        events.push(layer(id, LayerStatus::Downloaded, None, None));
        events.push(layer(id, LayerStatus::Extracting, Some(10), Some(99)));
        events.push(layer(id, LayerStatus::Done, None, None));
    }
    events.push(PullEvent::Image {
        status: "Status: Downloaded newer image".into(),
    });
    let event_count = events.len();
    let remote = Script {
        pull: Some(events),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("remote:1", remote)]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("app", "remote:1")).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);

    let pulling: Vec<_> = updates
        .iter()
        .filter(|u| u.phase == Phase::Pulling)
        .collect();
    assert!(
        pulling
            .iter()
            .any(|u| u.metadata.get("pulled").map(String::as_str) == Some("true"))
    );
    let with_bytes: Vec<_> = pulling.iter().filter_map(|u| u.pull.clone()).collect();
    // Throttled: far fewer updates than engine messages (the events arrive all at once).
    assert!(
        with_bytes.len() < event_count / 10,
        "{} pull updates for {event_count} events",
        with_bytes.len()
    );
    // Byte counts only grow, and the last update is the exact 100% one.
    let mut seen = 0;
    for p in &with_bytes {
        assert!(p.image_current_bytes >= seen, "pull bytes went back");
        assert!(p.image_current_bytes <= p.image_total_bytes);
        seen = p.image_current_bytes;
    }
    let last = with_bytes.last().unwrap();
    assert_eq!(last.image_total_bytes, a_total + b_total);
    assert_eq!(last.image_current_bytes, a_total + b_total);
    assert_eq!((last.layers_done, last.layers_total), (3, 3));
    let final_pull = pulling.last().unwrap();
    assert!(final_pull.pull.is_some(), "the final pull update has bytes");
    assert_eq!(final_pull.phase_progress, 1.0);
    // Before it, progress within PULLING came from bytes and stayed below 100%.
    assert!(
        pulling[..pulling.len() - 1]
            .iter()
            .all(|u| u.phase_progress < 1.0)
    );
    let digest = &updates
        .last()
        .unwrap()
        .result
        .as_ref()
        .unwrap()
        .image_digest;
    assert!(digest.starts_with("remote:1@sha256:"), "{digest}");
}

#[tokio::test]
async fn deployments_of_one_app_queue_and_positions_move_up() {
    let gate = Arc::new(Semaphore::new(0));
    let gated = Script {
        start_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("gated:1", gated), ("web:1", Script::healthy())]);
    let engine = engine(&fake).await;

    // A holds the app's lock (waiting in its start).
    let (_, mut a) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    let mut a_updates = until(&mut a, |u| u.phase == Phase::Starting).await;
    // B and C wait behind it, at positions 1 and 2.
    let (b_dep, mut b) = engine.deploy(spec("app", "web:1")).await.unwrap();
    let b_seen = until(&mut b, |u| matches!(u.kind, EventKind::Queued { .. })).await;
    assert_eq!(queue_positions(&b_seen), vec![1]);
    assert_eq!(
        b_seen.last().unwrap().metadata["queue_position"],
        "1",
        "the position is in the metadata"
    );
    let (c_dep, mut c) = engine.deploy(spec("app", "web:1")).await.unwrap();
    let mut c_updates = until(&mut c, |u| matches!(u.kind, EventKind::Queued { .. })).await;
    assert_eq!(queue_positions(&c_updates), vec![2]);
    assert_eq!(
        engine
            .status(&c_dep.to_string())
            .await
            .unwrap()
            .queue_position,
        2
    );
    // Another app is not held up by this one.
    let other = deploy(&engine, spec("other", "web:1")).await;
    assert_eq!(end_state(&other), DeploymentState::Succeeded);

    // B is cancelled while queued: it ends CANCELLED and C moves up to 1.
    let b_status = bounded("cancel", engine.cancel(&b_dep.to_string()))
        .await
        .unwrap();
    assert_eq!(b_status.state, DeploymentState::Cancelled);
    let b_rest = rest(b).await;
    let b_all: Vec<_> = b_seen.into_iter().chain(b_rest).collect();
    assert_well_formed(&b_all);
    assert_eq!(end_state(&b_all), DeploymentState::Cancelled);
    assert_eq!(b_all.last().unwrap().phase, Phase::Cancelled);
    assert!(
        !b_all.iter().any(|u| u.phase == Phase::Validating),
        "B never ran"
    );
    c_updates.extend(
        until(&mut c, |u| {
            matches!(u.kind, EventKind::Queued { position: 1 })
        })
        .await,
    );
    assert_eq!(queue_positions(&c_updates), vec![2, 1]);
    assert_eq!(
        engine
            .status(&c_dep.to_string())
            .await
            .unwrap()
            .queue_position,
        1
    );

    // A goes on; C runs only after A's terminal update.
    gate.add_permits(1);
    a_updates.extend(rest(a).await);
    assert_well_formed(&a_updates);
    assert_eq!(end_state(&a_updates), DeploymentState::Succeeded);
    c_updates.extend(rest(c).await);
    assert_well_formed(&c_updates);
    assert_eq!(end_state(&c_updates), DeploymentState::Succeeded);
    let a_end = a_updates.last().unwrap().timestamp;
    let c_validating = c_updates
        .iter()
        .find(|u| u.phase == Phase::Validating)
        .unwrap();
    assert!(c_validating.timestamp >= a_end);
    assert!(
        c_updates
            .iter()
            .all(|u| u.phase != Phase::Validating || u.timestamp >= a_end)
    );
    // C replaced A: one container of the app is left, C's.
    let c_container = c_updates
        .last()
        .unwrap()
        .result
        .clone()
        .unwrap()
        .container_id;
    let app_left: Vec<_> = fake
        .existing()
        .into_iter()
        .filter(|id| fake.state.lock().unwrap().containers[id].labels[LABEL_APP] == "app")
        .collect();
    assert_eq!(app_left, vec![c_container]);
}

#[tokio::test]
async fn cancel_while_running_rolls_back_and_releases_the_app() {
    let hang = Script {
        healthcheck: true,
        health: Health::StartingForever,
        ..Default::default()
    };
    let gate = Arc::new(Semaphore::new(0));
    let gated = Script {
        start_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([
        ("web:1", Script::healthy()),
        ("hang:1", hang),
        ("gated:1", gated),
    ]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;

    let (a_dep, mut a) = engine.deploy(spec("app", "hang:1")).await.unwrap();
    let mut a_updates = until(&mut a, |u| {
        u.phase == Phase::HealthCheck && u.kind == EventKind::Progress
    })
    .await;
    let (_, mut next) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    let mut next_updates = until(&mut next, |u| matches!(u.kind, EventKind::Queued { .. })).await;

    let status = bounded("cancel", engine.cancel(&a_dep.to_string()))
        .await
        .unwrap();
    assert_eq!(status.state, DeploymentState::Cancelled);
    a_updates.extend(rest(a).await);
    assert_well_formed(&a_updates);
    assert_eq!(end_state(&a_updates), DeploymentState::Cancelled);
    let end = a_updates.last().unwrap();
    assert_eq!(end.phase, Phase::Cancelled);
    assert!(end.message.contains("health_check"), "{}", end.message);
    assert!(
        a_updates.iter().any(|u| u.kind == EventKind::Cancelling),
        "the cancel is announced before the end"
    );
    let hung = fake.created()[1].clone();
    assert_eq!(
        fake.removed(),
        vec![hung.clone()],
        "only A's container removed"
    );
    assert!(
        fake.existing().contains(&previous),
        "the previous version stays"
    );

    // The queue moved on: the next deployment runs (it waits in its start until the
    // gate opens, so the checks above saw the state right after the cancel) and
    // replaces the previous version.
    next_updates.extend(until(&mut next, |u| u.phase == Phase::Starting).await);
    gate.add_permits(1);
    next_updates.extend(rest(next).await);
    assert_well_formed(&next_updates);
    assert_eq!(end_state(&next_updates), DeploymentState::Succeeded);
    let next_container = next_updates
        .last()
        .unwrap()
        .result
        .clone()
        .unwrap()
        .container_id;
    assert_eq!(fake.existing(), vec![next_container]);
    // Cancelling a finished deployment is refused.
    assert!(matches!(
        engine.cancel(&a_dep.to_string()).await,
        Err(super::EngineError::AlreadyFinished { .. })
    ));
}

#[tokio::test]
async fn a_cancel_during_create_removes_the_container_the_engine_still_creates() {
    let gate = Arc::new(Semaphore::new(0));
    let slow_create = Script {
        create_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("slow:1", slow_create)]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;

    let (id, mut updates) = engine.deploy(spec("app", "slow:1")).await.unwrap();
    let mut seen = until(&mut updates, |u| u.phase == Phase::Creating).await;
    let cancel = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.cancel(&id.to_string()).await })
    };
    // The cancel has dropped the create step; the engine now finishes the create.
    seen.extend(until(&mut updates, |u| u.kind == EventKind::Cancelling).await);
    gate.add_permits(1);
    seen.extend(rest(updates).await);
    let status = bounded("cancel", cancel).await.unwrap().unwrap();
    assert_eq!(status.state, DeploymentState::Cancelled);
    assert_well_formed(&seen);

    let late = fake.created().last().unwrap().clone();
    assert_ne!(late, previous);
    assert!(
        fake.removed().contains(&late),
        "the late container is removed"
    );
    assert_eq!(
        fake.existing(),
        vec![previous],
        "only the previous version is left"
    );
}

#[tokio::test]
async fn the_deadline_fails_the_deployment_and_rolls_back() {
    let hang = Script {
        healthcheck: true,
        health: Health::StartingForever,
        logs: vec!["still starting".into()],
        ..Default::default()
    };
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("hang:1", hang)]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;

    let mut s = spec("app", "hang:1");
    s.deadline = Duration::from_millis(300);
    let updates = deploy(&engine, s).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert!(
        end.message
            .contains("deadline of 0.3s exceeded during health_check"),
        "{}",
        end.message
    );
    let d = end.result.as_ref().unwrap().diagnostics.as_ref().unwrap();
    assert_eq!(d.step, "deadline");
    assert_eq!(d.failed_phase, Some(Phase::HealthCheck));
    assert_eq!(d.log_tail, vec!["still starting"]);
    let hung = fake.created()[1].clone();
    assert_eq!(fake.removed(), vec![hung]);
    assert_eq!(fake.existing(), vec![previous]);
}

#[tokio::test]
async fn the_deadline_counts_the_queue_wait() {
    let gate = Arc::new(Semaphore::new(0));
    let gated = Script {
        start_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("gated:1", gated), ("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let (_, mut a) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    let mut a_updates = until(&mut a, |u| u.phase == Phase::Starting).await;

    let mut s = spec("app", "web:1");
    s.deadline = Duration::from_millis(200);
    let queued = deploy(&engine, s).await;
    assert_well_formed(&queued);
    assert_eq!(end_state(&queued), DeploymentState::Failed);
    let end = queued.last().unwrap();
    assert!(
        end.message.contains("exceeded during queued"),
        "{}",
        end.message
    );

    // The expired deployment left the queue: the next one runs once A is done.
    let (_, next) = engine.deploy(spec("app", "web:1")).await.unwrap();
    gate.add_permits(1);
    a_updates.extend(rest(a).await);
    assert_eq!(end_state(&a_updates), DeploymentState::Succeeded);
    let next_updates = rest(next).await;
    assert_eq!(end_state(&next_updates), DeploymentState::Succeeded);
}

#[tokio::test]
async fn the_log_replays_the_same_updates_to_a_late_subscriber() {
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let (deployment, stream) = engine.deploy(spec("app", "web:1")).await.unwrap();
    let live = rest(stream).await;
    let replay = rest(engine.watch(&deployment.to_string(), 0).await.unwrap()).await;
    let seqs = |u: &[Arc<Update>]| u.iter().map(|u| u.sequence).collect::<Vec<_>>();
    assert_eq!(seqs(&live), seqs(&replay));
    let tail = rest(engine.watch(&deployment.to_string(), 3).await.unwrap()).await;
    assert_eq!(seqs(&tail), seqs(&live)[3..].to_vec());
}
