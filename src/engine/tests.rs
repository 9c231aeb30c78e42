//! Unit tests of the engine's phase and progress logic, driven through the scripted
//! [`FakeRuntime`] (see [`crate::runtime::fake`]), over an in-memory store.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::{Engine, EngineConfig};
use crate::events::{ObserverRegistry, UpdateStream};
use crate::model::{
    AppName, DeploySpec, DeploymentState, EventKind, HealthSpec, LABEL_APP, Operation, Phase,
    PortSpec, Protocol, Update,
};
use crate::runtime::fake::{FakeRuntime, Health, Script};
use crate::runtime::{LayerStatus, PullEvent};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// An engine over `fake`, with a temporary store.
async fn engine(fake: &Arc<FakeRuntime>) -> Engine {
    engine_with(fake, EngineConfig::default()).await
}

/// [`engine`] with the limits and retention of `config` (its timings are the tests').
async fn engine_with(fake: &Arc<FakeRuntime>, config: EngineConfig) -> Engine {
    let store = crate::store::Store::open_temporary().await.unwrap();
    Engine::new(
        fake.clone(),
        ObserverRegistry::new(),
        EngineConfig {
            ping_timeout: Duration::from_secs(5),
            settle_time: Duration::from_millis(20),
            cancel_wait: Duration::from_secs(20),
            ..config
        },
        store,
    )
}

pub(super) fn spec(app: &str, image: &str) -> DeploySpec {
    DeploySpec {
        stop_timeout: None,
        drain_timeout: crate::model::DEFAULT_DRAIN_TIMEOUT,
        app: AppName::parse(app).unwrap(),
        image: image.into(),
        source: None,
        command: vec![],
        env: Default::default(),
        ports: vec![PortSpec {
            host_ip: None,
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
        replicas: 1,
        update: Default::default(),
    }
}

/// Bounds a wait for a state the test expects (generous; no duration is asserted).
pub(super) async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The rest of a deployment's updates, to its end.
pub(super) async fn rest(stream: UpdateStream) -> Vec<Arc<Update>> {
    bounded(
        "the deployment to end",
        stream.map(|u| u.expect("log readable")).collect(),
    )
    .await
}

/// Updates up to and including the first one matching `pred`.
pub(super) async fn until(
    stream: &mut UpdateStream,
    pred: impl Fn(&Update) -> bool,
) -> Vec<Arc<Update>> {
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
pub(super) async fn deploy(engine: &Engine, spec: DeploySpec) -> Vec<Arc<Update>> {
    let (_, stream) = engine.deploy(spec).await.expect("accepted");
    rest(stream).await
}

/// Sequences 1..n with no gap, one deployment, total_progress never decreasing and in
/// range, phase_progress in range, exactly one terminal update and it is last.
pub(super) fn assert_well_formed(updates: &[Arc<Update>]) {
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

pub(super) fn phases(updates: &[Arc<Update>]) -> Vec<Phase> {
    let mut out = Vec::new();
    for u in updates {
        if out.last() != Some(&u.phase) {
            out.push(u.phase);
        }
    }
    out
}

pub(super) fn end_state(updates: &[Arc<Update>]) -> DeploymentState {
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

/// SWITCHING and CLEANUP share one list of the app's containers: the running
/// previous version goes in SWITCHING, a stopped leftover of an earlier deployment in
/// CLEANUP, and the engine is asked once.
#[tokio::test]
async fn a_redeploy_lists_the_apps_containers_once_for_switching_and_cleanup() {
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("web:2", Script::healthy())]);
    let engine = engine(&fake).await;
    let first = deploy(&engine, spec("web", "web:1")).await;
    let old = first.last().unwrap().result.clone().unwrap().container_id;
    let earlier = first[0].deployment_id.to_string();
    fake.insert_labelled("stopped-old", "web", earlier, false);
    fake.state.lock().unwrap().app_lists = 0;

    let second = deploy(&engine, spec("web", "web:2")).await;
    assert_eq!(end_state(&second), DeploymentState::Succeeded);
    let new = second.last().unwrap().result.clone().unwrap().container_id;
    assert_eq!(fake.existing(), vec![new]);
    let removed_in = |id: &str| {
        second
            .iter()
            .find(|u| u.metadata.get("removed_container_id").map(String::as_str) == Some(id))
            .map(|u| u.phase)
    };
    assert_eq!(removed_in(&old), Some(Phase::Switching));
    assert_eq!(removed_in("stopped-old"), None, "not the previous version");
    assert!(fake.removed().contains(&"stopped-old".to_owned()));
    let cleanup = second.iter().rfind(|u| u.phase == Phase::Cleanup).unwrap();
    assert_eq!(
        cleanup.message,
        "cleanup done (1 stopped containers removed)"
    );
    assert_eq!(
        fake.state.lock().unwrap().app_lists,
        1,
        "one list for both phases"
    );
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
    // The app's first deployment: no previous version keeps running (issue 17).
    assert!(!end.message.contains("previous version"), "{}", end.message);
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
    // `pulled: "true"` says a pull succeeded: never on a pull that failed.
    assert!(
        updates.iter().all(|u| !u.metadata.contains_key("pulled")),
        "{updates:?}"
    );
}

/// Issue 17: an image with no repo digest (built or loaded locally) is named by its
/// image ID in `image_digest`, never by an empty string.
#[tokio::test]
async fn a_local_image_without_a_repo_digest_is_named_by_its_id() {
    let local = Script {
        no_repo_digest: true,
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("local:1", local)]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("app", "local:1")).await;
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    let present = updates
        .iter()
        .find(|u| u.metadata.get("pulled").map(String::as_str) == Some("false"))
        .expect("the image was present");
    assert_eq!(present.metadata["image_digest"], "sha256:local:1");
    let result = updates.last().unwrap().result.as_ref().unwrap();
    assert_eq!(result.image_digest, "sha256:local:1");
}

/// A pull's bytes and time are kept in the store; the next deployment of the app that
/// pulls is estimated by the bytes it still has to download.
#[tokio::test]
async fn the_next_pull_is_estimated_by_its_bytes_from_the_last_one() {
    const MIB: u64 = 1 << 20;
    let pulling = |total: u64| Script {
        pull: Some(vec![
            layer("base", LayerStatus::AlreadyExists, None, None),
            layer("a", LayerStatus::Pending, None, None),
            layer("a", LayerStatus::Downloading, Some(MIB), Some(total)),
            layer("a", LayerStatus::Downloaded, None, None),
            layer("a", LayerStatus::Done, None, None),
        ]),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([
        ("remote:1", pulling(4 * MIB)),
        ("remote:2", pulling(8 * MIB)),
    ]);
    let engine = engine(&fake).await;
    let first = deploy(&engine, spec("app", "remote:1")).await;
    assert_eq!(first.last().unwrap().phase, Phase::Complete);
    assert!(
        first.iter().all(|u| u.eta.is_none()),
        "no history, no estimate"
    );
    let id = first[0].deployment_id;
    engine.0.store.flush().await;
    let measured = engine.0.store.measured(&[id]).await.unwrap();
    assert_eq!(measured[&id].pull.unwrap().bytes, 4 * MIB, "{measured:?}");
    assert!(measured[&id].build.is_empty());

    let second = deploy(&engine, spec("app", "remote:2")).await;
    assert_eq!(second.last().unwrap().phase, Phase::Complete);
    let by_bytes: Vec<&str> = second
        .iter()
        .filter(|u| u.phase == Phase::Pulling && u.pull.is_some())
        .filter_map(|u| u.eta.as_ref())
        .map(|e| e.basis.as_str())
        .collect();
    // (The fake pulls at once: the throttle lets through the first layer's update,
    // no size known yet, and the last one.)
    assert!(
        by_bytes
            .iter()
            .any(|b| b.contains("pull: 0.0 MiB left at") && b.contains("measured over 1 pull")),
        "{by_bytes:#?}"
    );
    let before = second
        .iter()
        .find(|u| u.phase == Phase::Validating)
        .and_then(|u| u.eta.clone())
        .expect("an estimate before the pull");
    assert_eq!(before.samples, 1);
    assert!(before.low <= before.remaining && before.remaining <= before.high);
    // Retention removes the samples with the deployment.
    let retention = crate::store::Retention {
        max_deployments: Some(1),
        ..Default::default()
    };
    engine.0.store.apply_retention(&retention).await.unwrap();
    assert!(engine.0.store.measured(&[id]).await.unwrap().is_empty());
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

/// `gated:1` waits in its start for a permit of the gate; `web:1` is healthy.
fn gated_and_web() -> (Arc<Semaphore>, Arc<FakeRuntime>) {
    let gate = Arc::new(Semaphore::new(0));
    let gated = Script {
        start_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("gated:1", gated), ("web:1", Script::healthy())]);
    (gate, fake)
}

#[tokio::test]
async fn deployments_of_one_app_queue_and_positions_move_up() {
    let (gate, fake) = gated_and_web();
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
    // Each names the deployment it waits behind (issue 17).
    let a_id = a_updates[0].deployment_id.to_string();
    let b_queued = b_seen.last().unwrap();
    assert_eq!(b_queued.metadata["queued_behind"], a_id);
    assert!(b_queued.message.contains(&a_id), "{}", b_queued.message);
    let c_queued = c_updates.last().unwrap();
    assert_eq!(c_queued.metadata["queued_behind"], b_dep.to_string());
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
    assert!(end.message.contains("HEALTH_CHECK"), "{}", end.message);
    assert!(
        end.message.contains("previous version keeps running"),
        "{}",
        end.message
    );
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
    let (fake, engine, previous, gate) = after_a_good_version_with_a_slow_create().await;

    let (id, mut updates, mut seen) =
        deploy_into_a_gated_create(&fake, &engine, spec("app", "slow:1")).await;
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

    assert_late_container_collected(&fake, previous);
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
            .contains("deadline of 0.3s exceeded during HEALTH_CHECK"),
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
    let (gate, fake) = gated_and_web();
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
        end.message.contains("exceeded during QUEUED"),
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

#[tokio::test]
async fn a_panicking_step_ends_the_deployment_failed_and_closes_its_stream() {
    let panics = Script {
        start_panics: true,
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("panics:1", panics), ("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let (id, stream) = engine.deploy(spec("app", "panics:1")).await.unwrap();
    let updates = tokio::time::timeout(
        Duration::from_secs(5),
        stream.map(|u| u.expect("log readable")).collect::<Vec<_>>(),
    )
    .await
    .expect("the stream of a deployment whose task panicked ends within seconds");
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let end = updates.last().unwrap();
    assert!(
        end.message.starts_with("internal error during STARTING: "),
        "{}",
        end.message
    );
    let d = end.result.as_ref().unwrap().diagnostics.as_ref().unwrap();
    assert_eq!(
        (d.step.as_str(), d.failed_phase),
        ("internal error", Some(Phase::Starting))
    );
    assert!(fake.existing().is_empty(), "its container is removed");
    engine.store().flush().await;
    let status = engine.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Failed);
    // The app's lock and admission place are free again.
    let next = deploy(&engine, spec("app", "web:1")).await;
    assert_eq!(end_state(&next), DeploymentState::Succeeded);
}

/// A Reporter of a new deployment of `spec` (no observers, an in-memory store), the
/// deployment it reports on and its store.
async fn reporter_for(
    spec: crate::model::DeploySpec,
) -> (
    Arc<super::deployment::Deployment>,
    super::deployment::Reporter,
    crate::store::Store,
) {
    let store = crate::store::Store::open_temporary().await.unwrap();
    let deployment = Arc::new(super::deployment::Deployment::with_log(
        crate::model::DeploymentId::new(),
        spec,
        crate::events::DeploymentLog::new(),
    ));
    let rep = super::deployment::Reporter::new(
        deployment.clone(),
        ObserverRegistry::new(),
        store.clone(),
    );
    (deployment, rep, store)
}

#[tokio::test]
async fn phase_progress_never_goes_back_within_a_phase() {
    use super::deployment::Extra;
    use crate::model::Level;
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.enter(Phase::Pulling, "pulling");
    let mut seen = Vec::new();
    for p in [0.5, 0.3, 0.7, 0.0, 0.69] {
        rep.progress(p, Level::Info, format!("{p}"), Extra::default());
        let u = deployment.status();
        seen.push((u.phase_progress, u.total_progress));
    }
    let phase: Vec<f64> = seen.iter().map(|s| s.0).collect();
    assert_eq!(phase, vec![0.5, 0.5, 0.7, 0.7, 0.7]);
    assert!(seen.windows(2).all(|w| w[1].1 >= w[0].1), "{seen:?}");
    // A new phase starts at 0 again; the total does not go back.
    let before = deployment.status().total_progress;
    rep.enter(Phase::Creating, "creating");
    assert_eq!(deployment.status().phase_progress, 0.0);
    assert!(deployment.status().total_progress >= before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_update_is_in_the_store_before_a_subscriber_sees_it() {
    let pulled = Script {
        pull: Some(
            (0..40)
                .map(|i| layer("l1", LayerStatus::Downloading, Some(i * 100), Some(4000)))
                .collect(),
        ),
        logs: (0..50).map(|i| format!("line {i}")).collect(),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("web:1", pulled)]);
    let engine = engine(&fake).await;
    let mut s = spec("app", "web:1");
    s.milestones = vec![crate::model::MilestoneSpec {
        pattern: regex::Regex::new("line").unwrap(),
        progress: -1.0,
        description: "a line".into(),
    }];
    let (id, mut stream) = engine.deploy(s).await.unwrap();
    let mut seen = 0;
    while let Some(u) = bounded("an update", stream.next()).await {
        let u = u.unwrap();
        // Whatever was queued to the store before this moment is on disk after a
        // flush: the update must be among it.
        engine.store().flush().await;
        let stored = engine.store().log(id, u.sequence - 1).await.unwrap();
        assert_eq!(
            stored.updates.first().map(|s| s.sequence),
            Some(u.sequence),
            "update {} was seen before the store had it",
            u.sequence
        );
        assert_eq!(stored.updates[0].message, u.message);
        seen += 1;
    }
    assert!(seen > 20, "{seen} updates");
}

#[tokio::test]
async fn a_cancel_during_switching_does_not_roll_back() {
    let gate = Arc::new(Semaphore::new(0));
    let old = Script {
        remove_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("old:1", old), ("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let v1 = deploy(&engine, spec("app", "old:1")).await;
    let previous = v1.last().unwrap().result.clone().unwrap().container_id;

    let (id, mut updates) = engine.deploy(spec("app", "web:1")).await.unwrap();
    // Taking v1 out waits on the gate: the deployment is in SWITCHING.
    let mut seen = until(&mut updates, |u| u.phase == Phase::Switching).await;
    let cancel = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.cancel(&id.to_string()).await })
    };
    // Let the cancel land before the switch goes on.
    while !engine.get(id).unwrap().cancel.is_cancelled() {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    seen.extend(rest(updates).await);
    assert_well_formed(&seen);
    assert_eq!(end_state(&seen), DeploymentState::Succeeded);
    assert!(!seen.iter().any(|u| u.kind == EventKind::Cancelling));
    let status = bounded("cancel", cancel).await.unwrap().unwrap();
    assert_eq!(status.state, DeploymentState::Succeeded);
    let current = seen.last().unwrap().result.clone().unwrap().container_id;
    assert_eq!(fake.existing(), vec![current.clone()]);
    assert_eq!(fake.removed(), vec![previous], "only v1 is removed");
}

/// An engine whose app `app` runs `web:1` (returned: its container), and whose image
/// `slow:1` is created only once the returned gate opens.
async fn after_a_good_version_with_a_slow_create()
-> (Arc<FakeRuntime>, Engine, String, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let slow_create = Script {
        create_gate: Some(gate.clone()),
        ..Script::healthy()
    };
    let fake = FakeRuntime::with([("web:1", Script::healthy()), ("slow:1", slow_create)]);
    let engine = engine(&fake).await;
    let good = deploy(&engine, spec("app", "web:1")).await;
    let previous = good.last().unwrap().result.clone().unwrap().container_id;
    (fake, engine, previous, gate)
}

/// Deploys `spec` and returns once the engine's create call runs (held by its gate):
/// the deployment's ID, its stream, and its updates up to CREATING.
async fn deploy_into_a_gated_create(
    fake: &FakeRuntime,
    engine: &Engine,
    spec: DeploySpec,
) -> (crate::model::DeploymentId, UpdateStream, Vec<Arc<Update>>) {
    let called = fake.create_called.notified();
    tokio::pin!(called);
    called.as_mut().enable();
    let (id, mut updates) = engine.deploy(spec).await.expect("accepted");
    bounded("the create call", called).await;
    let seen = until(&mut updates, |u| u.phase == Phase::Creating).await;
    (id, updates, seen)
}

/// The engine creates a container only once the deployment is on disk, with every
/// update up to CREATING: after a kill -9 from the create on, recovery knows the
/// deployment and removes its container (one of an unknown deployment would be left).
#[tokio::test]
async fn the_deployment_is_on_disk_before_its_container_is_created() {
    let (fake, engine, _, gate) = after_a_good_version_with_a_slow_create().await;
    let (id, stream, _) = deploy_into_a_gated_create(&fake, &engine, spec("app", "slow:1")).await;
    // Read through the store's pool: it sees committed rows only.
    let status = engine.store().status(id).await.unwrap();
    status.expect("the deployment is on disk when its create is called");
    // Its log up to CREATING (recovery takes the phase from the log).
    let log = engine.store().log(id, 0).await.unwrap().updates;
    assert_eq!(
        log.last().unwrap().phase,
        Phase::Creating,
        "its CREATING update too"
    );
    gate.add_permits(1);
    assert_eq!(end_state(&rest(stream).await), DeploymentState::Succeeded);
}

/// The last container created (after `previous`) is removed again; `previous` is left.
fn assert_late_container_collected(fake: &FakeRuntime, previous: String) {
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

/// Deploys `slow:1` (its create waits on a gate) after a good version, stops it with
/// `stop` while the create runs, then lets the engine finish the create: the late
/// container must be removed and the previous version stay. Returns the updates.
async fn a_late_create_is_collected(
    s: impl FnOnce(DeploySpec) -> DeploySpec,
    stop: impl FnOnce(&Engine),
) -> Vec<Arc<Update>> {
    let (fake, engine, previous, gate) = after_a_good_version_with_a_slow_create().await;

    let (_, updates, mut seen) =
        deploy_into_a_gated_create(&fake, &engine, s(spec("app", "slow:1"))).await;
    stop(&engine);
    // The create call is still running when the step is dropped; the engine then
    // finishes it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(fake.created().len() == 1, "the create is still gated");
    gate.add_permits(1);
    seen.extend(rest(updates).await);
    assert_well_formed(&seen);
    assert_eq!(end_state(&seen), DeploymentState::Failed);
    assert_late_container_collected(&fake, previous);
    seen
}

#[tokio::test]
async fn a_late_create_is_collected_after_the_deadline() {
    let seen = a_late_create_is_collected(
        |mut s| {
            s.deadline = Duration::from_millis(200);
            s
        },
        |_| {},
    )
    .await;
    let end = seen.last().unwrap();
    assert!(end.message.contains("deadline"), "{}", end.message);
}

#[tokio::test]
async fn a_late_create_is_collected_after_interrupt_all() {
    let seen = a_late_create_is_collected(|s| s, Engine::interrupt_all).await;
    let end = seen.last().unwrap();
    assert!(
        end.message.contains("interrupted by server shutdown"),
        "{}",
        end.message
    );
}

#[tokio::test]
async fn a_slow_reader_of_a_log_past_the_live_window_gets_every_update_once() {
    const LINES: usize = super::LIVE_LOG_WINDOW + 1000;
    let mut logs: Vec<String> = (0..LINES).map(|i| format!("tick {i}")).collect();
    logs.push("ready".into());
    let chatty = Script {
        logs,
        ..Default::default()
    };
    let fake = FakeRuntime::with([("chatty:1", chatty)]);
    let engine = engine(&fake).await;
    let mut s = spec("app", "chatty:1");
    s.health.probe = Some(crate::model::HealthProbe::Log {
        pattern: regex::Regex::new("^ready$").unwrap(),
    });
    s.milestones = vec![crate::model::MilestoneSpec {
        pattern: regex::Regex::new("^tick").unwrap(),
        progress: -1.0,
        description: "tick".into(),
    }];
    let (id, slow) = engine.deploy(s).await.unwrap();
    // The slow reader has read nothing yet when the deployment ends.
    let ended = rest(engine.watch(&id.to_string(), 0).await.unwrap()).await;
    assert_eq!(end_state(&ended), DeploymentState::Succeeded);
    assert!(
        ended.len() > LINES,
        "{} updates: {:?}",
        ended.len(),
        ended
            .iter()
            .rev()
            .take(3)
            .map(|u| &u.message)
            .collect::<Vec<_>>()
    );
    let updates = rest(slow).await;
    assert_well_formed(&updates);
    assert_eq!(updates.len(), ended.len(), "every update, each once");
    let ticks = updates
        .iter()
        .filter(|u| u.metadata.contains_key("milestone"))
        .count();
    assert_eq!(ticks, LINES);
}

/// Issue 17: a watch from beyond the last update of an ended deployment is
/// OUT_OF_RANGE naming the last sequence (not an empty stream and OK); an empty
/// deployment_id is an invalid argument naming the field, for every call taking one.
#[tokio::test]
async fn edge_answers_name_the_last_sequence_and_the_missing_field() {
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let engine = engine(&fake).await;
    let updates = deploy(&engine, spec("app", "web:1")).await;
    let last = updates.last().unwrap().sequence;
    let id = updates[0].deployment_id.to_string();
    // In memory (the log closed) or retired to the store: the same answer.
    for _ in 0..2 {
        match engine.watch(&id, last + 5).await {
            Err(super::EngineError::OutOfRange(e)) => {
                let text = e.to_string();
                assert!(text.contains(&format!("last sequence is {last}")), "{text}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a watch beyond the end answered OK"),
        }
        bounded("retired", async {
            while engine.get(updates[0].deployment_id).is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    // From the last sequence itself: an empty stream that ends (nothing is missing).
    assert!(
        rest(engine.watch(&id, last).await.unwrap())
            .await
            .is_empty()
    );

    assert!(matches!(
        engine.status("").await,
        Err(super::EngineError::MissingDeploymentId)
    ));
    assert!(matches!(
        engine.watch("", 0).await,
        Err(super::EngineError::MissingDeploymentId)
    ));
    assert!(matches!(
        engine.cancel("").await,
        Err(super::EngineError::MissingDeploymentId)
    ));
    assert!(
        super::EngineError::MissingDeploymentId
            .to_string()
            .starts_with("deployment_id: required")
    );
}

/// Every metadata key the engine sends is in the proto's list of stable keys
/// (issue 17: `env_keys` and `requested_by` on sequence 1 were not).
#[tokio::test]
async fn every_metadata_key_sent_is_listed_in_the_proto() {
    let proto = include_str!("../../proto/stevedore/v1/deployer.proto");
    let (gate, fake) = gated_and_web();
    let engine = engine(&fake).await;
    let (_, mut a) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    let mut updates = until(&mut a, |u| u.phase == Phase::Starting).await;
    let (_, b) = engine.deploy(spec("app", "web:1")).await.unwrap();
    gate.add_permits(1);
    updates.extend(rest(a).await);
    updates.extend(rest(b).await);
    let mut keys: Vec<String> = updates
        .iter()
        .flat_map(|u| u.metadata.keys().cloned())
        .map(|k| {
            if k.starts_with("endpoint.") {
                "endpoint.<port>/<protocol>".into()
            } else {
                k
            }
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert!(keys.contains(&"queued_behind".to_string()), "{keys:?}");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !proto.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "not in the proto's list: {missing:?}");
}

/// Issue 17: the count in "not healthy after …s (N attempts)" is the number of
/// attempts reported, the last one included.
#[tokio::test]
async fn the_attempts_in_the_final_message_are_the_attempts_reported() {
    let hang = Script {
        healthcheck: true,
        health: Health::StartingForever,
        ..Default::default()
    };
    let fake = FakeRuntime::with([("hang:1", hang)]);
    let engine = engine(&fake).await;
    let mut s = spec("app", "hang:1");
    s.health.timeout = Duration::from_millis(100);
    s.health.interval = Duration::from_millis(20);
    let updates = deploy(&engine, s).await;
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let reported = updates
        .iter()
        .filter(|u| u.metadata.contains_key("attempt"))
        .count();
    let end = updates.last().unwrap();
    assert!(
        end.message.contains(&format!("({reported} attempts)")),
        "{reported} reported: {}",
        end.message
    );
}

// ---------------------------------------------------------------------------
// RemoveApp
// ---------------------------------------------------------------------------

fn app_name(app: &str) -> AppName {
    AppName::parse(app).unwrap()
}

#[tokio::test]
async fn a_removal_queues_behind_a_deployment_stops_removes_and_the_app_leaves_the_list() {
    let (gate, fake) = gated_and_web();
    let engine = engine(&fake).await;
    deploy(&engine, spec("app", "web:1")).await;
    // A deployment holds the app's lock; the removal waits behind it.
    let (deploying, mut a) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    until(&mut a, |u| u.phase == Phase::Starting).await;
    let (rid, mut r) = (engine.remove_app(app_name("app"), "unit test".into(), None))
        .await
        .unwrap();
    let mut updates = until(&mut r, |u| matches!(u.kind, EventKind::Queued { .. })).await;
    let queued = updates.last().unwrap().clone();
    assert_eq!(queued.metadata["queued_behind"], deploying.to_string());
    let status = engine.status(&rid.to_string()).await.unwrap();
    assert_eq!(
        (status.operation, status.state),
        (Operation::RemoveApp, DeploymentState::Pending)
    );
    assert_eq!(
        engine.state_counts().values().sum::<usize>(),
        1,
        "a removal is not counted as a deployment"
    );
    gate.add_permits(1);
    let a_end = rest(a).await;
    assert!(a_end.last().unwrap().result.as_ref().unwrap().success);
    updates.extend(rest(r).await);
    assert_well_formed(&updates);
    assert!(updates.iter().all(|u| u.operation == Operation::RemoveApp));
    let entered: Vec<Phase> = (updates.iter())
        .filter(|u| u.kind == EventKind::PhaseStarted)
        .map(|u| u.phase)
        .collect();
    assert_eq!(entered, vec![Phase::Switching, Phase::Cleanup]);
    assert!(
        updates
            .iter()
            .any(|u| u.metadata.contains_key("stop_outcome")),
        "the stop is reported under the stop policy"
    );
    let end = updates.last().unwrap();
    let result = end.result.as_ref().unwrap();
    assert_eq!(
        end.kind,
        EventKind::Finished {
            state: DeploymentState::Succeeded
        }
    );
    assert_eq!(result.containers_removed, 1, "{}", result.message);
    assert!(fake.existing().is_empty());
    assert!(engine.apps().await.unwrap().is_empty(), "the app is gone");
    // The replaced deployment is no longer presented as live.
    let replaced = engine.status(&deploying.to_string()).await.unwrap();
    assert_eq!(replaced.superseded_by, Some(rid));
    assert!(replaced.result.unwrap().endpoints.is_empty());
    // A later deploy brings the app back, with only that one running.
    deploy(&engine, spec("app", "web:1")).await;
    let apps = engine.apps().await.unwrap();
    assert_eq!(apps.len(), 1);
    assert!(apps[0].current.is_some());
}

/// A removal cancelled while it waits behind a deployment ends CANCELLED and removes
/// nothing: the deployment ahead of it finishes and its container stays.
#[tokio::test]
async fn a_removal_cancelled_while_queued_removes_nothing() {
    let (gate, fake) = gated_and_web();
    let engine = engine(&fake).await;
    let (deploying, mut a) = engine.deploy(spec("app", "gated:1")).await.unwrap();
    until(&mut a, |u| u.phase == Phase::Starting).await;
    let (rid, mut r) = (engine.remove_app(app_name("app"), "unit test".into(), None))
        .await
        .unwrap();
    until(&mut r, |u| matches!(u.kind, EventKind::Queued { .. })).await;
    bounded("cancel", engine.cancel(&rid.to_string()))
        .await
        .unwrap();
    let end = rest(r).await;
    let last = end.last().unwrap();
    assert_eq!(
        last.kind,
        EventKind::Finished {
            state: DeploymentState::Cancelled
        }
    );
    let result = last.result.as_ref().unwrap();
    assert_eq!(
        result.message,
        "cancelled while queued; nothing was removed"
    );
    assert_eq!(result.containers_removed, 0);
    gate.add_permits(1);
    assert!(
        rest(a)
            .await
            .last()
            .unwrap()
            .result
            .as_ref()
            .unwrap()
            .success
    );
    assert_eq!(fake.existing().len(), 1, "the deployed container stays");
    let apps = engine.apps().await.unwrap();
    assert_eq!(apps[0].current.as_ref().unwrap().id, deploying);
}

#[tokio::test]
async fn a_removal_interrupted_by_a_restart_is_finished_by_recovery() {
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let first = engine(&fake).await;
    deploy(&first, spec("app", "web:1")).await;
    assert_eq!(fake.existing().len(), 1);
    // A removal that had begun stopping when the process died: on disk in SWITCHING.
    let store = first.store().clone();
    let id = crate::model::DeploymentId::new();
    let log = crate::events::DeploymentLog::new();
    let removal = Arc::new(super::Deployment::removal(
        id,
        app_name("app"),
        "unit test".into(),
        None,
        log,
    ));
    store.insert(&removal.status(), &removal.spec);
    let mut reporter = super::Reporter::new(removal, ObserverRegistry::new(), store.clone());
    reporter.accepted();
    reporter.enter(Phase::Switching, "stopping");
    store.flush().await;

    let second = Engine::new(
        fake.clone(),
        ObserverRegistry::new(),
        EngineConfig::default(),
        store,
    );
    let recovery = second.recover().await.unwrap();
    assert_eq!(recovery.removals, vec![id]);
    assert!(recovery.interrupted.is_empty());
    let status = second.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Succeeded);
    assert_eq!(status.result.unwrap().containers_removed, 1);
    assert!(fake.existing().is_empty());
    assert!(second.apps().await.unwrap().is_empty());
}

/// A running deployment's stored status is its last state change's: its phase,
/// progress and last sequence lag its log. Recovery takes them from the log: the
/// deployment ends FAILED in the phase its log last reached, at its last progress,
/// right after its last update.
#[tokio::test]
async fn recovery_ends_a_deployment_where_its_log_ended_not_where_its_status_was_written() {
    use super::deployment::Extra;
    use crate::model::Level;
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let (deployment, mut rep, store) = reporter_for(spec("app", "web:1")).await;
    let id = deployment.id;
    store.insert(&deployment.status(), &deployment.spec);
    rep.accepted();
    rep.enter(Phase::Validating, "validating");
    rep.enter(Phase::Pulling, "pulling");
    rep.progress(0.5, Level::Info, "half way".into(), Extra::default());
    let last = deployment.status();
    store.flush().await;
    let stored = store.status(id).await.unwrap().unwrap();
    assert_eq!(
        (stored.phase, stored.last_sequence),
        (Phase::Validating, 2),
        "written when it began to run, not since"
    );

    let second = Engine::new(
        fake.clone(),
        ObserverRegistry::new(),
        EngineConfig::default(),
        store.clone(),
    );
    let recovery = second.recover().await.unwrap();
    assert_eq!(recovery.interrupted, vec![id]);
    let log = store.log(id, 0).await.unwrap().updates;
    let sequences: Vec<u64> = log.iter().map(|u| u.sequence).collect();
    assert_eq!(
        sequences,
        vec![1, 2, 3, 4, 5],
        "continued after the last update"
    );
    let end = log.last().unwrap();
    assert!(end.message.contains("during PULLING"), "{}", end.message);
    assert_eq!(end.total_progress, last.total_progress);
    let status = second.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Failed);
    assert_eq!(status.last_sequence, 5);
    assert_eq!(status.total_progress, last.total_progress);
    assert_eq!(
        status.result.unwrap().diagnostics.unwrap().failed_phase,
        Some(Phase::Pulling)
    );
}

// ---------------------------------------------------------------------------
// Routes: reconcile_routes against a real proxy run in this process
// ---------------------------------------------------------------------------

/// A port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_routes_corrects_a_stale_port_deletes_gone_apps_and_adds_a_missing_route() {
    use super::route::RoutesReconciled;
    use crate::proxy::client::ProxyClient;
    use crate::proxy::routes::{Route, SetRoute};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let running = crate::proxy::start(crate::proxy::ProxyConfig {
        admin_socket: socket.clone(),
        state_file: dir.path().join("routes.json"),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        allow_privileged_ports: false,
        drain_timeout: Duration::from_secs(1),
        takeover: false,
    })
    .await
    .unwrap();
    let proxy = ProxyClient::new(&socket).unwrap();
    let fake = FakeRuntime::with([("web:1", Script::healthy())]);
    let config = EngineConfig {
        proxy: Some(proxy.clone()),
        ..Default::default()
    };
    let engine = engine_with(&fake, config).await;
    let set = |route: Route| SetRoute {
        route,
        drain_timeout_ms: None,
    };

    // Two apps with a fixed public port: their routes point at their containers.
    let mut web = spec("web", "web:1");
    web.ports[0].host_port = free_port();
    let updates = deploy(&engine, web).await;
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    let web_id = updates[0].deployment_id.to_string();
    let current = proxy.get_route("web").await.unwrap().expect("routed");
    assert_eq!(
        current.route.deployment_id.as_deref(),
        Some(web_id.as_str())
    );
    let mut api = spec("api", "web:1");
    api.ports[0].host_port = free_port();
    assert_eq!(
        end_state(&deploy(&engine, api).await),
        DeploymentState::Succeeded
    );
    let api_route = proxy.get_route("api").await.unwrap().expect("routed");
    assert_eq!(
        engine.reconcile_routes().await.unwrap(),
        RoutesReconciled::default(),
        "the routes agree with the store"
    );

    // `api` is removed (its route with it), then its route comes back, as if the proxy
    // had missed the removal; `ghost` was never deployed; `web`'s route points at a
    // stale port.
    let (_, removal) = engine
        .remove_app(app_name("api"), "unit test".into(), None)
        .await
        .unwrap();
    assert_eq!(end_state(&rest(removal).await), DeploymentState::Succeeded);
    assert_eq!(proxy.get_route("api").await.unwrap(), None);
    proxy.set_route("api", &set(api_route.route)).await.unwrap();
    let ghost = Route {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: "127.0.0.1:2".parse().unwrap(),
        deployment_id: None,
        version: None,
    };
    proxy.set_route("ghost", &set(ghost)).await.unwrap();
    let stale = Route {
        backend: "127.0.0.1:1".parse().unwrap(),
        ..current.route.clone()
    };
    proxy.set_route("web", &set(stale)).await.unwrap();

    let done = engine.reconcile_routes().await.unwrap();
    assert_eq!(done, RoutesReconciled { set: 1, removed: 2 });
    let routes = proxy.routes().await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].app, "web");
    assert_eq!(
        routes[0].route, current.route,
        "back on the current container"
    );

    // A missing route is added, with the current version's labels.
    proxy.remove_route("web").await.unwrap();
    let done = engine.reconcile_routes().await.unwrap();
    assert_eq!(done, RoutesReconciled { set: 1, removed: 0 });
    let added = proxy.get_route("web").await.unwrap().expect("added");
    assert_eq!(added.route, current.route);
    assert_eq!(added.route.version.as_deref(), Some("web:1"));
    assert_eq!(
        engine.reconcile_routes().await.unwrap(),
        RoutesReconciled::default()
    );

    running.shutdown_token().cancel();
    bounded("the proxy to stop", running.wait()).await.unwrap();
}

/// The updates of a deployment's log so far and the rest until it closes.
async fn log_updates(deployment: &super::deployment::Deployment) -> Vec<Arc<Update>> {
    let stream = deployment.log.subscribe(0).unwrap();
    bounded(
        "the log to close",
        stream.map(|u| u.unwrap()).collect::<Vec<_>>(),
    )
    .await
}

#[tokio::test]
async fn the_reporter_keeps_the_status_in_step_with_its_updates() {
    use super::deployment::Extra;
    use crate::model::{DeploymentResult, FailureDiagnostics, Level};
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.queued(2, None);
    let s = deployment.status();
    assert_eq!(
        (s.state, s.queue_position, s.last_sequence),
        (DeploymentState::Pending, 2, 2)
    );
    assert!(s.started_at.is_none(), "not started while queued");

    rep.enter(Phase::Pulling, "pulling");
    let s = deployment.status();
    assert_eq!((s.state, s.queue_position), (DeploymentState::Running, 0));
    let started = s.started_at.expect("the first phase starts the deployment");
    rep.progress(0.5, Level::Info, "half".into(), Extra::default());
    let (offset, weight) = Operation::Deploy.phase_span(Phase::Pulling);
    assert!(offset > 0.0 && weight > 0.0);
    let s = deployment.status();
    assert_eq!(s.phase_progress, 0.5);
    assert_eq!(
        s.total_progress,
        ((offset + weight * 0.5) * 10_000.0).round() / 10_000.0,
        "total = the phase's offset + its weight × the phase progress"
    );
    // Rounded to 4 decimals.
    rep.progress(0.612_345_6, Level::Info, "more".into(), Extra::default());
    assert_eq!(deployment.status().phase_progress, 0.6123);

    tokio::time::sleep(Duration::from_millis(5)).await;
    rep.enter(Phase::Creating, "creating");
    assert_eq!(
        deployment.status().started_at,
        Some(started),
        "started_at is the first phase's, not the latest"
    );
    rep.output("a line".into(), Extra::default());

    rep.finish(
        DeploymentState::Failed,
        DeploymentResult {
            success: false,
            message: "boom".into(),
            container_id: "c0ffee".into(),
            diagnostics: Some(FailureDiagnostics {
                failed_phase: Some(Phase::Creating),
                exit_code: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let s = deployment.status();
    assert_eq!((s.state, s.phase), (DeploymentState::Failed, Phase::Failed));
    assert_eq!(s.error, "boom", "a failure's message is the status's error");
    assert!(s.finished_at.is_some());
    assert_eq!(s.last_sequence, 8);
    assert!(
        s.total_progress < 1.0,
        "a failure does not complete the bar"
    );

    let updates = log_updates(&deployment).await;
    let sequences: Vec<u64> = updates.iter().map(|u| u.sequence).collect();
    assert_eq!(sequences, (1..=8).collect::<Vec<_>>());
    let end = updates.last().unwrap();
    assert_eq!(end.level, Level::Error);
    assert_eq!(end.message, "boom");
    assert_eq!(end.metadata["failed_phase"], "creating");
    assert_eq!(end.metadata["exit_code"], "3");
    assert_eq!(end.metadata["container_id"], "c0ffee");
    assert!(end.eta.is_none());
}

#[tokio::test]
async fn a_success_completes_the_bar_and_leaves_no_error() {
    use crate::model::{DeploymentResult, Level};
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.enter(Phase::Switching, "switching");
    rep.finish(
        DeploymentState::Succeeded,
        DeploymentResult {
            success: true,
            message: "done".into(),
            ..Default::default()
        },
    );
    let s = deployment.status();
    assert_eq!(
        (s.state, s.phase),
        (DeploymentState::Succeeded, Phase::Complete)
    );
    assert_eq!((s.phase_progress, s.total_progress), (1.0, 1.0));
    assert_eq!(s.error, "", "a success has no error");
    let end = log_updates(&deployment).await.pop().unwrap();
    assert_eq!((end.level, end.phase), (Level::Success, Phase::Complete));
    assert!(
        !end.metadata.contains_key("container_id"),
        "no container, no key"
    );

    // A cancellation ends CANCELLED at a warning.
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.cancelling("stop".into());
    rep.finish(DeploymentState::Cancelled, DeploymentResult::default());
    let updates = log_updates(&deployment).await;
    assert_eq!(updates[1].level, Level::Warning);
    let end = updates.last().unwrap();
    assert_eq!((end.level, end.phase), (Level::Warning, Phase::Cancelled));
}

#[tokio::test]
async fn a_resumed_reporter_continues_the_log_from_the_status() {
    use super::deployment::{Extra, Reporter};
    use crate::model::Level;
    let (deployment, mut rep, store) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.enter(Phase::Pulling, "pulling");
    rep.progress(0.5, Level::Info, "half".into(), Extra::default());
    let before = deployment.status();
    drop(rep);

    let mut resumed = Reporter::resume(deployment.clone(), ObserverRegistry::new(), store);
    assert_eq!(resumed.phase(), Phase::Pulling);
    resumed.fail(
        Phase::Pulling,
        "server restart",
        "interrupted".into(),
        Extra::default(),
    );
    let updates = log_updates(&deployment).await;
    let end = updates.last().unwrap();
    assert_eq!(end.sequence, before.last_sequence + 1);
    assert_eq!(
        (end.phase_progress, end.total_progress),
        (before.phase_progress, before.total_progress),
        "the end keeps the progress reached"
    );
    let result = end.result.as_ref().unwrap();
    assert!(!result.success);
    assert_eq!(result.message, "interrupted");
    let d = result.diagnostics.as_ref().unwrap();
    assert_eq!(
        (d.failed_phase, d.step.as_str()),
        (Some(Phase::Pulling), "server restart")
    );
}

/// The grace a removal stops each container with is the one it was asked for.
#[test]
fn a_removal_keeps_the_stop_timeout_it_was_asked_for() {
    use super::deployment::Deployment;
    let removal = Deployment::removal(
        crate::model::DeploymentId::new(),
        app_name("app"),
        "unit test".into(),
        Some(Duration::from_secs(3)),
        crate::events::DeploymentLog::new(),
    );
    assert_eq!(removal.spec.stop_timeout, Some(Duration::from_secs(3)));
    assert_eq!(
        (removal.operation, removal.status().operation),
        (Operation::RemoveApp, Operation::RemoveApp)
    );
}

/// A deploy from source shows the commit fetched, and then the image built, in its
/// status.
#[tokio::test]
async fn set_commit_shows_the_commit_and_the_built_image_in_the_status() {
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.set_commit("0123abc", None);
    let s = deployment.status();
    assert_eq!((s.commit.as_str(), s.image.as_str()), ("0123abc", "web:1"));
    rep.set_commit("0123abc", Some("built:7"));
    assert_eq!(deployment.status().image, "built:7");
}

/// The build's steps a deployment reports are kept in the store for the estimates of
/// the app's later deployments, in order, under this deployment's ID.
#[tokio::test]
async fn the_reporter_keeps_the_build_steps_for_later_estimates() {
    use super::eta::StepSample;
    let (deployment, mut rep, store) = reporter_for(spec("app", "web:1")).await;
    store.insert(&deployment.status(), &deployment.spec);
    let steps = vec![
        StepSample {
            instruction: "FROM base".into(),
            cached: false,
            duration: Duration::from_millis(500),
        },
        StepSample {
            instruction: "RUN make".into(),
            cached: true,
            duration: Duration::from_millis(20),
        },
    ];
    rep.record_build(steps.clone());
    store.flush().await;
    let mut measured = store.measured(&[deployment.id]).await.unwrap();
    let kept = measured
        .remove(&deployment.id)
        .expect("the build's steps are kept under the deployment's ID");
    assert_eq!(kept.build, steps);
    assert_eq!(kept.pull, None, "a build is not a pull");
}

/// With history, every update carries an estimate of the time left, except the
/// terminal one: nothing is left.
#[tokio::test]
async fn with_history_every_update_has_an_eta_but_the_last() {
    use super::deployment::Extra;
    use super::eta::PastDeployment;
    use super::history::EtaTracker;
    use crate::model::{DeploymentResult, Level};
    let spec = spec("app", "web:1");
    let phases = [
        Phase::Validating,
        Phase::Pulling,
        Phase::Creating,
        Phase::Starting,
        Phase::HealthCheck,
        Phase::Hooks,
        Phase::Switching,
        Phase::Cleanup,
    ]
    .into_iter()
    .map(|p| (p, Duration::from_secs(1)))
    .collect();
    let history = vec![PastDeployment {
        phases,
        pull: None,
        build: Vec::new(),
    }];
    let (deployment, rep, _) = reporter_for(spec.clone()).await;
    let mut rep = rep.with_eta(EtaTracker::new(&spec, history));
    rep.accepted();
    rep.enter(Phase::Validating, "validating");
    rep.progress(0.5, Level::Info, "half".into(), Extra::default());
    assert!(
        deployment.status().eta.is_some(),
        "the status shows the latest estimate"
    );
    rep.finish(
        DeploymentState::Succeeded,
        DeploymentResult {
            success: true,
            message: "done".into(),
            ..Default::default()
        },
    );
    assert!(deployment.status().eta.is_none(), "nothing is left");
    let updates = log_updates(&deployment).await;
    let (end, before) = updates.split_last().unwrap();
    assert_eq!(before.len(), 3);
    for u in before {
        assert!(u.eta.is_some(), "update {} has no ETA", u.sequence);
    }
    assert!(end.eta.is_none(), "the terminal update has no ETA");
}

/// A cancel in progress is an update of its own (a warning, its message kept, the
/// deployment still running), and a failure outside of the steps (here: recovery after
/// a restart) ends the deployment at once: the status is FAILED with the failure's
/// message as its error before anyone reads the log.
#[tokio::test]
async fn cancelling_and_failing_are_updates_of_their_own() {
    use super::deployment::Extra;
    use crate::model::Level;
    let (deployment, mut rep, _) = reporter_for(spec("app", "web:1")).await;
    rep.accepted();
    rep.enter(Phase::Pulling, "pulling");
    rep.cancelling("cancel requested".into());
    let s = deployment.status();
    assert_eq!(
        (s.state, s.last_sequence),
        (DeploymentState::Running, 3),
        "the cancel is the third update and does not end the deployment"
    );

    rep.fail(
        Phase::Pulling,
        "server restart",
        "interrupted by a server restart".into(),
        Extra::default(),
    );
    let s = deployment.status();
    assert_eq!(
        (s.state, s.phase, s.last_sequence),
        (DeploymentState::Failed, Phase::Failed, 4)
    );
    assert_eq!(s.error, "interrupted by a server restart");
    assert!(s.finished_at.is_some());

    let updates = log_updates(&deployment).await;
    assert_eq!(updates.len(), 4);
    let ends: Vec<_> = updates[2..]
        .iter()
        .map(|u| (u.kind.clone(), u.level, u.phase))
        .collect();
    assert_eq!(
        ends,
        [
            (EventKind::Cancelling, Level::Warning, Phase::Pulling),
            (
                EventKind::Finished {
                    state: DeploymentState::Failed
                },
                Level::Error,
                Phase::Failed
            ),
        ]
    );
    assert_eq!(updates[2].message, "cancel requested");
}

/// The store's writer commits what is queued in batches: three deployments' 1,200
/// updates queued before one flush are stored whole, every sequence once. A status is
/// written when its state changes: the finished deployment's is its latest, the
/// running ones' is the one of their last state change (their log goes further).
#[tokio::test]
async fn a_large_batch_is_stored_whole() {
    use super::deployment::{Deployment, Extra, Reporter};
    use crate::model::{DeploymentResult, Level};
    let store = crate::store::Store::open_temporary().await.unwrap();
    let mut reps = Vec::new();
    for i in 0..3 {
        let deployment = Arc::new(Deployment::with_log(
            crate::model::DeploymentId::new(),
            spec(&format!("app{i}"), "web:1"),
            crate::events::DeploymentLog::new(),
        ));
        store.insert(&deployment.status(), &deployment.spec);
        let mut rep = Reporter::new(deployment.clone(), ObserverRegistry::new(), store.clone());
        rep.accepted();
        rep.enter(Phase::Pulling, "pulling");
        reps.push((deployment, rep));
    }
    for n in 0..400 {
        for (_, rep) in &mut reps {
            let p = f64::from(n) / 400.0;
            rep.progress(p, Level::Info, format!("step {n}"), Extra::default());
        }
    }
    reps[0]
        .1
        .finish(DeploymentState::Succeeded, DeploymentResult::default());
    store.flush().await;
    for (deployment, _) in &reps {
        let expected = deployment.status();
        let log = store.log(deployment.id, 0).await.unwrap();
        let sequences: Vec<u64> = log.updates.iter().map(|u| u.sequence).collect();
        assert_eq!(
            sequences,
            (1..=expected.last_sequence).collect::<Vec<_>>(),
            "every update once, in order"
        );
        assert!(
            log.updates.iter().any(|u| u.message == "step 399"),
            "the last progress update is there"
        );
        let stored = store.status(deployment.id).await.unwrap().unwrap();
        if expected.state == DeploymentState::Running {
            // Accepted (1), then PULLING (2) made it RUNNING; the progress after it
            // is in the log only.
            assert_eq!(
                (stored.state, stored.phase, stored.last_sequence),
                (DeploymentState::Running, Phase::Pulling, 2),
                "the status of the last state change"
            );
        } else {
            assert_eq!(
                (stored.state, stored.last_sequence, stored.total_progress),
                (
                    expected.state,
                    expected.last_sequence,
                    expected.total_progress
                ),
                "the latest status"
            );
        }
    }
    let first = store.status(reps[0].0.id).await.unwrap().unwrap();
    assert_eq!(first.state, DeploymentState::Succeeded);
    assert!(first.finished_at.is_some());
}

/// Each app's history is read from the store once, then kept in memory: after every
/// deployment (pulled, present, failed), what memory holds is what the store answers,
/// pull samples included; and retention removing history empties it.
#[tokio::test]
async fn the_history_kept_in_memory_is_what_the_store_holds() {
    let pulling = |bytes: u64| Script {
        pull: Some(vec![
            layer("a", LayerStatus::Downloading, Some(bytes / 2), Some(bytes)),
            layer("a", LayerStatus::Done, None, None),
        ]),
        ..Script::healthy()
    };
    let crash = Script {
        exit_code: Some(1),
        ..Default::default()
    };
    let fake = FakeRuntime::with([
        ("remote:1", pulling(1 << 20)),
        ("remote:2", pulling(3 << 20)),
        ("crash:1", crash),
    ]);
    let config = EngineConfig {
        retention: crate::store::Retention {
            max_deployments: Some(4),
            ..Default::default()
        },
        ..Default::default()
    };
    let engine = engine_with(&fake, config).await;
    let app = app_name("app");
    let histories = &engine.0.histories;
    let steps = [
        ("remote:1", DeploymentState::Succeeded, 1),
        ("crash:1", DeploymentState::Failed, 1),
        ("remote:2", DeploymentState::Succeeded, 2),
        // Present by now: no pull sample.
        ("remote:1", DeploymentState::Succeeded, 3),
    ];
    for (image, state, past) in steps {
        let updates = deploy(&engine, spec("app", image)).await;
        assert_eq!(end_state(&updates), state, "{image}");
        assert!(histories.holds(&app), "read once, then kept ({image})");
        let kept = histories.load(&engine.0.store, &app).await;
        let (stored, complete) = super::history::read(&engine.0.store, &app).await;
        assert!(complete);
        assert_eq!(kept, stored, "after {image}");
        assert_eq!(kept.len(), past, "after {image}");
    }
    let kept = histories.load(&engine.0.store, &app).await;
    let pulls: Vec<_> = kept.iter().map(|p| p.pull.map(|s| s.bytes)).collect();
    assert_eq!(pulls, [None, Some(3 << 20), Some(1 << 20)], "newest first");

    // The fifth deployment is one too many: retention removes the oldest, and the
    // history in memory goes with it.
    let updates = deploy(&engine, spec("app", "remote:2")).await;
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    // (Retention runs once the deployment's stream has ended.)
    bounded("retention to empty the history in memory", async {
        while histories.holds(&app) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let kept = histories.load(&engine.0.store, &app).await;
    let (stored, _) = super::history::read(&engine.0.store, &app).await;
    assert_eq!(kept, stored);
    assert_eq!(kept.len(), 3, "the first deployment is gone");
}

/// The reconciler removes a container of an ended deployment unless it is its app's
/// current version, and leaves alone those of live deployments, of deployments the
/// store does not know and without a deployment ID; with two reads of the store for
/// all of them.
#[tokio::test]
async fn the_reconciler_removes_only_ended_deployments_leftovers() {
    let hang = Script {
        healthcheck: true,
        health: Health::StartingForever,
        ..Default::default()
    };
    let crash = Script {
        exit_code: Some(1),
        ..Default::default()
    };
    let fake = FakeRuntime::with([
        ("web:1", Script::healthy()),
        ("crash:1", crash),
        ("hang:1", hang),
    ]);
    let engine = engine(&fake).await;
    let first = deploy(&engine, spec("a", "web:1")).await;
    let second = deploy(&engine, spec("a", "web:1")).await;
    let current = second.last().unwrap().result.clone().unwrap().container_id;
    let failed = deploy(&engine, spec("b", "crash:1")).await;
    assert_eq!(end_state(&failed), DeploymentState::Failed);
    let (live_id, mut live) = engine.deploy(spec("h", "hang:1")).await.unwrap();
    until(&mut live, |u| u.phase == Phase::HealthCheck).await;

    let leftover = |id: &str, app: &str, deployment: String| {
        fake.insert_labelled(id, app, deployment, true);
    };
    leftover("old-a", "a", first[0].deployment_id.to_string());
    leftover("failed-b", "b", failed[0].deployment_id.to_string());
    leftover("unknown-c", "c", uuid::Uuid::new_v4().to_string());
    leftover("no-id-a", "a", "not-a-uuid".into());
    leftover("live-h", "h", live_id.to_string());

    let removed = bounded("reconcile", engine.reconcile()).await.unwrap();
    let mut existing = fake.existing();
    existing.sort();
    let live_container = fake
        .created()
        .into_iter()
        .find(|c| existing.contains(c) && *c != current)
        .expect("the live deployment's container");
    let mut kept = vec![
        current,
        live_container,
        "live-h".to_owned(),
        "no-id-a".to_owned(),
        "unknown-c".to_owned(),
    ];
    kept.sort();
    assert_eq!(existing, kept);
    assert_eq!(removed, 2, "old-a and failed-b");
    assert_eq!(engine.reconciler_removed(), 2);
    engine.cancel(&live_id.to_string()).await.unwrap();
    rest(live).await;
}
