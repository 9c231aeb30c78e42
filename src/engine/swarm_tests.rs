//! Unit tests of the Swarm target's phases ([`super::swarm`]) through the engine, with
//! [`FakeSwarm`] over an in-memory store: per-task progress, rollback decisions,
//! deadline, cancel, and recovery after a restart.

use std::sync::Arc;
use std::time::Duration;

use super::tests::{assert_well_formed, deploy, end_state, phases, rest, spec, until};
use super::{Engine, EngineConfig, EngineError};
use crate::events::ObserverRegistry;
use crate::model::{
    DeploySpec, DeploymentState, EventKind, Level, Phase, PortSpec, Protocol, Target, Update,
};
use crate::runtime::fake::FakeRuntime;
use crate::runtime::fake_swarm::{FakeSwarm, labels_of};
use crate::runtime::swarm::UpdateState;

async fn engine(swarm: &Arc<FakeSwarm>) -> Engine {
    let store = crate::store::Store::open_temporary().await.unwrap();
    engine_on(swarm, store)
}

fn engine_on(swarm: &Arc<FakeSwarm>, store: crate::store::Store) -> Engine {
    Engine::with_swarm(
        FakeRuntime::with([]),
        swarm.clone(),
        ObserverRegistry::new(),
        EngineConfig {
            cancel_wait: Duration::from_secs(20),
            ..EngineConfig::default()
        },
        store,
    )
}

fn swarm_spec(app: &str, image: &str, replicas: u32) -> DeploySpec {
    let mut s = spec(app, image);
    s.replicas = replicas;
    s.ports = vec![PortSpec {
        host_ip: None,
        container_port: 8080,
        host_port: 18080,
        protocol: Protocol::Tcp,
    }];
    s
}

fn task_updates(updates: &[Arc<Update>]) -> Vec<&Arc<Update>> {
    updates
        .iter()
        .filter(|u| u.metadata.contains_key("task_id"))
        .collect()
}

#[tokio::test]
async fn a_create_reports_each_task_and_ends_with_an_endpoint_per_node() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    assert_eq!(engine.target(), Target::Swarm);
    let updates = deploy(&engine, swarm_spec("web", "r/web:1", 3)).await;
    assert_well_formed(&updates);
    assert_eq!(
        end_state(&updates),
        DeploymentState::Succeeded,
        "{updates:#?}"
    );
    assert_eq!(
        phases(&updates),
        [
            Phase::Queued,
            Phase::Validating,
            Phase::Pulling,
            Phase::Creating,
            Phase::Starting,
            Phase::HealthCheck,
            Phase::Switching,
            Phase::Cleanup,
            Phase::Complete
        ]
    );
    // Every task's every state, with its slot and node.
    let tasks = task_updates(&updates);
    for slot in 1..=3 {
        let states: Vec<&str> = tasks
            .iter()
            .filter(|u| u.metadata["slot"] == slot.to_string())
            .map(|u| u.metadata["task_state"].as_str())
            .collect();
        assert!(
            states.ends_with(&["preparing", "starting", "running"]),
            "slot {slot}: {states:?}"
        );
    }
    let preparing = tasks
        .iter()
        .find(|u| u.metadata["task_state"] == "preparing")
        .unwrap();
    assert!(
        preparing.message.contains("preparing on node n"),
        "{}",
        preparing.message
    );
    // Phase progress in STARTING follows the running slots.
    let running: Vec<f64> = tasks
        .iter()
        .filter(|u| u.phase == Phase::Starting && u.metadata["task_state"] == "running")
        .map(|u| u.phase_progress)
        .collect();
    assert_eq!(running.last(), Some(&1.0), "{running:?}");
    let result = updates.last().unwrap().result.clone().unwrap();
    assert_eq!(result.endpoints["8080/tcp@n1"], "http://10.0.0.1:18080");
    assert_eq!(result.endpoints["8080/tcp@n3"], "http://10.0.0.3:18080");
    assert!(result.image_digest.contains("@sha256:"));
    // The spec sent: pinned, labelled, failure action rollback's monitor.
    let sent = swarm.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].image.starts_with("r/web@sha256:"));
    assert_eq!(
        labels_of(&sent[0])["io.stevedore.deployment"],
        updates[0].deployment_id.to_string()
    );
}

#[tokio::test]
async fn an_update_that_crashes_is_rolled_back_by_swarm_and_fails_with_the_tasks_errors() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    let first = deploy(&engine, swarm_spec("web", "r/web:1", 2)).await;
    assert_eq!(end_state(&first), DeploymentState::Succeeded);
    let v1 = swarm.service_image("web").unwrap();
    let updates = deploy(&engine, swarm_spec("web", "r/crash:1", 2)).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let result = updates.last().unwrap().result.clone().unwrap();
    assert!(result.message.contains("rolled back"), "{}", result.message);
    let d = result.diagnostics.unwrap();
    assert_eq!(d.exit_code, Some(1));
    assert!(
        d.log_tail
            .iter()
            .any(|l| l.contains("non-zero exit") && l.contains("on n")),
        "{:?}",
        d.log_tail
    );
    // Swarm rolled back itself (the failure action): Stevedore waited, did not ask again.
    assert_eq!(*swarm.rollbacks.lock().unwrap(), 0);
    assert_eq!(swarm.service_image("web").unwrap(), v1);
    assert_eq!(
        swarm.update_state("web"),
        Some(UpdateState::RollbackCompleted)
    );
}

#[tokio::test]
async fn a_failing_create_removes_the_service_it_created() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    let updates = deploy(&engine, swarm_spec("web", "r/crash:1", 1)).await;
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    assert_eq!(*swarm.removed.lock().unwrap(), ["web"]);
    let result = updates.last().unwrap().result.clone().unwrap();
    assert!(result.message.contains("was removed"), "{}", result.message);
}

#[tokio::test]
async fn the_deadline_rolls_a_stalled_update_back_to_the_previous_spec() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    deploy(&engine, swarm_spec("web", "r/web:1", 2)).await;
    let v1 = swarm.service_image("web").unwrap();
    let mut s = swarm_spec("web", "r/stall:1", 2);
    s.deadline = Duration::from_secs(2);
    let updates = deploy(&engine, s).await;
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let result = updates.last().unwrap().result.clone().unwrap();
    assert!(result.message.contains("deadline"), "{}", result.message);
    assert_eq!(result.diagnostics.unwrap().step, "deadline");
    assert_eq!(
        *swarm.rollbacks.lock().unwrap(),
        1,
        "rollback=previous asked"
    );
    assert_eq!(swarm.service_image("web").unwrap(), v1);
}

#[tokio::test]
async fn cancel_mid_update_rolls_back_and_ends_cancelled() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    deploy(&engine, swarm_spec("web", "r/web:1", 2)).await;
    let v1 = swarm.service_image("web").unwrap();
    let (id, mut stream) = engine
        .deploy(swarm_spec("web", "r/stall:1", 2))
        .await
        .unwrap();
    until(&mut stream, |u| {
        u.metadata
            .get("task_state")
            .is_some_and(|s| s == "preparing")
    })
    .await;
    engine.cancel(&id.to_string()).await.unwrap();
    let updates = rest(stream).await;
    let last = updates.last().unwrap();
    assert_eq!(end_state(&updates), DeploymentState::Cancelled);
    assert!(
        updates
            .iter()
            .any(|u| u.level == Level::Warning && u.message.contains("rolling service web back"))
    );
    assert!(
        last.result
            .as_ref()
            .unwrap()
            .message
            .contains("rolled back")
    );
    assert_eq!(swarm.service_image("web").unwrap(), v1);
}

#[tokio::test]
async fn a_stale_version_is_read_again_and_the_update_retried() {
    let swarm = Arc::new(FakeSwarm::default());
    let engine = engine(&swarm).await;
    deploy(&engine, swarm_spec("web", "r/web:1", 1)).await;
    *swarm.stale_updates.lock().unwrap() = 2;
    let updates = deploy(&engine, swarm_spec("web", "r/web:2", 1)).await;
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    assert_eq!(
        updates
            .iter()
            .filter(|u| u.message.contains("reading it again"))
            .count(),
        2
    );
    assert_eq!(swarm.sent.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_engine_that_is_not_a_manager_refuses_with_a_precondition() {
    let swarm = Arc::new(FakeSwarm {
        not_manager: true,
        ..Default::default()
    });
    let engine = engine(&swarm).await;
    match engine.deploy(swarm_spec("web", "r/web:1", 1)).await {
        Err(EngineError::Precondition(m)) => assert!(m.contains("not a swarm manager"), "{m}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

/// Deploys `image` over a running v1 of `web` on an engine whose process then "dies"
/// once the update reached Swarm: its task runs on a runtime of its own, shut down
/// mid-update (no terminal update is written). Returns the store and the deployment.
async fn die_mid_update(
    swarm: &Arc<FakeSwarm>,
    dir: &std::path::Path,
    image: &'static str,
) -> (crate::store::Store, crate::model::DeploymentId) {
    // On disk: the "dead" process's connections go with it, an in-memory database too.
    let store = crate::store::Store::open(dir).await.unwrap();
    let first = engine_on(swarm, store.clone());
    deploy(&first, swarm_spec("web", "r/web:1", 2)).await;
    let process = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let id = process
        .spawn(async move {
            let (id, mut stream) = first.deploy(swarm_spec("web", image, 2)).await.unwrap();
            until(&mut stream, |u| u.metadata.contains_key("service_id")).await;
            id
        })
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || process.shutdown_background())
        .await
        .unwrap();
    store.flush().await;
    assert_eq!(swarm.update_state("web"), Some(UpdateState::Updating));
    (store, id)
}

#[tokio::test]
async fn recovery_returns_at_once_and_follows_an_interrupted_update_in_the_background() {
    let swarm = Arc::new(FakeSwarm::default());
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = die_mid_update(&swarm, dir.path(), "r/web:2").await;
    let restarted = engine_on(&swarm, store.clone());
    let recovery = restarted.recover().await.unwrap();
    assert_eq!(recovery.following, [id]);
    assert!(recovery.completed.is_empty() && recovery.interrupted.is_empty());
    // recover() returned while the update is still followed: the deployment is live.
    let status = restarted.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Running, "{status:#?}");
    assert_eq!(
        restarted.state_counts().get(&DeploymentState::Running),
        Some(&1)
    );
    // A watcher from the start reads the stored updates, then the live ones, to the end.
    let updates = rest(restarted.watch(&id.to_string(), 0).await.unwrap()).await;
    assert_well_formed(&updates);
    let recovered_at = updates
        .iter()
        .position(|u| u.metadata.contains_key("recovered"))
        .expect("the recovery's update");
    assert!(
        updates[..recovered_at]
            .iter()
            .any(|u| u.metadata.contains_key("service_id")),
        "the stored updates come first: {updates:#?}"
    );
    assert_eq!(end_state(&updates), DeploymentState::Succeeded);
    let result = updates.last().unwrap().result.clone().unwrap();
    assert!(
        result.message.contains("completed by recovery"),
        "{}",
        result.message
    );
    // The result is a normal one's: the pinned digest and an endpoint per node.
    assert_eq!(result.image_digest, swarm.service_image("web").unwrap());
    assert!(result.image_digest.starts_with("r/web@sha256:"));
    assert_eq!(result.endpoints["8080/tcp@n1"], "http://10.0.0.1:18080");
    assert_eq!(result.endpoints["8080/tcp@n2"], "http://10.0.0.2:18080");
    assert_eq!(result.container_id, swarm_service_id(&swarm));
    assert_eq!(swarm.update_state("web"), Some(UpdateState::Completed));
    let status = restarted.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Succeeded);
}

fn swarm_service_id(swarm: &FakeSwarm) -> String {
    (swarm.services.lock().unwrap())["web"].id.clone()
}

#[tokio::test]
async fn a_deploy_of_the_app_queues_behind_a_recovered_deployment() {
    let swarm = Arc::new(FakeSwarm::default());
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = die_mid_update(&swarm, dir.path(), "r/web:2").await;
    let restarted = engine_on(&swarm, store.clone());
    assert_eq!(restarted.recover().await.unwrap().following, [id]);
    let (next_id, stream) = restarted
        .deploy(swarm_spec("web", "r/web:3", 2))
        .await
        .unwrap();
    let next = rest(stream).await;
    assert_well_formed(&next);
    assert_eq!(end_state(&next), DeploymentState::Succeeded, "{next:#?}");
    let queued = next
        .iter()
        .find(|u| matches!(u.kind, EventKind::Queued { .. }))
        .expect("queued behind the recovered deployment");
    assert_eq!(queued.metadata["queued_behind"], id.to_string());
    // The recovered deployment ended (converged) before the new one began.
    let recovered = restarted.status(&id.to_string()).await.unwrap();
    assert_eq!(
        recovered.state,
        DeploymentState::Succeeded,
        "{recovered:#?}"
    );
    let began = next.iter().find(|u| u.phase == Phase::Validating).unwrap();
    assert!(recovered.finished_at.unwrap() <= began.timestamp);
    let sent = swarm.sent.lock().unwrap().clone();
    assert_eq!(
        labels_of(sent.last().unwrap())["io.stevedore.deployment"],
        next_id.to_string()
    );
}

#[tokio::test]
async fn shutdown_interrupts_a_recovered_deployment_and_rolls_it_back() {
    let swarm = Arc::new(FakeSwarm::default());
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = die_mid_update(&swarm, dir.path(), "r/stall:2").await;
    let v1 = swarm.sent.lock().unwrap()[0].image.clone();
    let restarted = engine_on(&swarm, store.clone());
    assert_eq!(restarted.recover().await.unwrap().following, [id]);
    restarted.stop_accepting();
    restarted.interrupt_all();
    tokio::time::timeout(Duration::from_secs(30), restarted.drain())
        .await
        .expect("shutdown waits for the recovered deployment, then ends");
    let status = restarted.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Failed, "{status:#?}");
    let message = status.result.unwrap().message;
    assert!(message.contains("server shutdown"), "{message}");
    assert!(message.contains("rolled back"), "{message}");
    assert_eq!(swarm.service_image("web").unwrap(), v1);
}

#[tokio::test]
async fn recovery_rolls_back_a_paused_update_and_never_leaves_it_paused() {
    let swarm = Arc::new(FakeSwarm::default());
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = die_mid_update(&swarm, dir.path(), "r/stall:2").await;
    let v1 = swarm.sent.lock().unwrap()[0].image.clone();
    swarm.pause("web");
    let restarted = engine_on(&swarm, store.clone());
    let recovery = restarted.recover().await.unwrap();
    assert_eq!(recovery.following, [id]);
    let updates = rest(restarted.watch(&id.to_string(), 0).await.unwrap()).await;
    assert_well_formed(&updates);
    assert_eq!(end_state(&updates), DeploymentState::Failed);
    let status = restarted.status(&id.to_string()).await.unwrap();
    assert_eq!(status.state, DeploymentState::Failed, "{status:#?}");
    let result = status.result.unwrap();
    assert!(result.message.contains("paused"), "{}", result.message);
    assert!(result.message.contains("rolled back"), "{}", result.message);
    assert!(result.image_digest.starts_with("r/stall@sha256:"));
    assert_eq!(*swarm.rollbacks.lock().unwrap(), 1);
    assert_eq!(swarm.service_image("web").unwrap(), v1);
    assert_eq!(
        swarm.update_state("web"),
        Some(UpdateState::RollbackCompleted)
    );
}
