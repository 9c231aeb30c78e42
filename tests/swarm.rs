//! The Swarm target (`stevedore serve --target swarm`) on the real three-node swarm of
//! `bash scripts/swarm-env.sh up` (docs/SWARM.md): replicas spread over the nodes with
//! per-task progress, a rolling update, rollback of a crashing version, of an update
//! past its deadline and of a cancelled one, and recovery after kill -9 mid-update.
//! Each test uses its own app (one service) and host port, and removes its service.
//! Without the environment these tests fail, naming the script.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::swarm::{self, ServiceGuard, SwarmEnv};
use common::{Client, Updates, deploy_stream, secs};
use stevedore::proto::{
    self, CancelRequest, DeployRequest, DeploymentState, Level, PortMapping, ProgressUpdate,
    UpdatePolicy,
};

/// How long every node may take to serve the expected body after a deployment ended.
const SERVE_LIMIT: Duration = Duration::from_secs(60);

/// An in-process server with `--target swarm` on the manager.
async fn swarm_server(env: &SwarmEnv) -> common::TestServer {
    let manager = env.manager.clone();
    common::TestServer::start_with(
        move |c| {
            c.target = stevedore::model::Target::Swarm;
            c.docker_host = Some(manager);
        },
        stevedore::events::ObserverRegistry::new(),
    )
    .await
}

/// A new app (one service, removed when the guard drops) on a host port of its own,
/// and an in-process `--target swarm` server with a client: (env, app, port, server,
/// client, guard).
async fn swarm_app(
    prefix: &str,
) -> (
    SwarmEnv,
    String,
    u16,
    common::TestServer,
    Client,
    ServiceGuard,
) {
    let env = swarm::env();
    let app = common::unique_app(prefix);
    let guard = ServiceGuard::app(&env, &app);
    let port = swarm::unused_port(&swarm::manager().await).await;
    let server = swarm_server(&env).await;
    let client = server.client().await;
    (env, app, port, server, client, guard)
}

/// A request for `image` as `app` with `replicas` tasks publishing 8080 on `port` of
/// each node.
fn request(app: &str, image: &str, replicas: u32, port: u16) -> DeployRequest {
    DeployRequest {
        app: app.into(),
        image: image.into(),
        replicas,
        ports: vec![PortMapping {
            container_port: 8080,
            host_port: u32::from(port),
            protocol: "tcp".into(),
            host_ip: String::new(),
        }],
        deadline: secs(240),
        ..Default::default()
    }
}

/// Deploys and reads the stream to its end.
async fn deploy_all(client: &mut Client, req: DeployRequest) -> Vec<ProgressUpdate> {
    deploy_stream(client, req).await.rest().await
}

fn terminal(updates: &[ProgressUpdate]) -> &ProgressUpdate {
    let last = updates.last().expect("updates");
    assert!(
        last.result.is_some(),
        "the last update is terminal: {last:#?}"
    );
    last
}

fn state(updates: &[ProgressUpdate]) -> DeploymentState {
    let last = terminal(updates);
    match last.phase() {
        proto::Phase::Complete => DeploymentState::Succeeded,
        proto::Phase::Cancelled => DeploymentState::Cancelled,
        _ => DeploymentState::Failed,
    }
}

/// Per-task updates: (slot, task_id, node, task_state).
fn task_updates(updates: &[ProgressUpdate]) -> Vec<(String, String, String, String)> {
    updates
        .iter()
        .filter(|u| u.metadata.contains_key("task_id"))
        .map(|u| {
            let m = &u.metadata;
            (
                m["slot"].clone(),
                m["task_id"].clone(),
                m["node"].clone(),
                m["task_state"].clone(),
            )
        })
        .collect()
}

/// The nodes the service's running tasks are on.
async fn running_nodes(app: &str) -> BTreeSet<String> {
    let docker = swarm::manager().await;
    swarm::service_tasks(&docker, app)
        .await
        .into_iter()
        .filter(|t| t.running() && t.desired_running())
        .map(|t| t.node_addr)
        .collect()
}

/// Deploys `image` with 3 replicas and asserts it succeeded and every node serves
/// `body`; returns the updates.
async fn deploy_base(
    client: &mut Client,
    env: &SwarmEnv,
    app: &str,
    image: &str,
    port: u16,
    body: &str,
) -> Vec<ProgressUpdate> {
    let updates = deploy_all(client, request(app, image, 3, port)).await;
    assert_eq!(
        state(&updates),
        DeploymentState::Succeeded,
        "{:#?}",
        terminal(&updates)
    );
    let want = format!("{body}\n");
    swarm::wait_all_nodes_serve(env, port, "/", SERVE_LIMIT, |b| b == want).await;
    updates
}

#[tokio::test]
async fn three_replicas_land_on_every_node_and_v2_rolls_to_every_node() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-roll").await;

    // v1: three tasks, one per node, each task's progress in the stream.
    let updates = deploy_base(&mut client, &env, &app, &env.images.web_v1, port, "v1").await;
    eprintln!("create, 3 replicas: {:?}", terminal(&updates).elapsed);
    let tasks = task_updates(&updates);
    let slots: BTreeSet<&str> = tasks.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(slots, BTreeSet::from(["1", "2", "3"]), "{tasks:#?}");
    for slot in ["1", "2", "3"] {
        let states: Vec<&str> = (tasks.iter())
            .filter(|t| t.0 == slot)
            .map(|t| t.3.as_str())
            .collect();
        assert_eq!(states.last(), Some(&"running"), "slot {slot}: {states:?}");
    }
    // Swarm reports no pull bytes: the stream says on which node each task prepares
    // and runs (a state shorter than a poll may be passed over).
    for u in updates
        .iter()
        .filter(|u| u.metadata.contains_key("task_id"))
    {
        let state = u.metadata["task_state"].as_str();
        if ["preparing", "starting", "running"].contains(&state) {
            let node = &u.metadata["node"];
            assert!(node.starts_with("stv-n"), "{u:#?}");
            assert!(
                u.message.contains(&format!("on node {node}")),
                "{}",
                u.message
            );
        }
        if state == "preparing" {
            assert!(u.message.contains("preparing on node"), "{}", u.message);
        }
    }
    let expected: BTreeSet<String> = env.nodes.iter().cloned().collect();
    assert_eq!(running_nodes(&app).await, expected, "a task on every node");
    let result = terminal(&updates).result.clone().unwrap();
    for addr in &env.nodes {
        let url = format!("http://{addr}:{port}");
        assert!(
            result.endpoints.values().any(|u| *u == url),
            "endpoint {url} in {:?}",
            result.endpoints
        );
    }
    assert!(result.image_digest.contains("@sha256:"), "pinned by digest");
    let status = common::get_status(&mut client, &updates[0].deployment_id).await;
    assert_eq!((status.target.as_str(), status.replicas), ("swarm", 3));

    // v2, start-first asked: with host-mode ports on every node the server goes
    // stop-first, says so, and rolls the tasks one by one.
    let mut v2 = request(&app, &env.images.web_v2, 3, port);
    v2.update_policy = Some(UpdatePolicy {
        order: "start-first".into(),
        ..Default::default()
    });
    let updates = deploy_all(&mut client, v2).await;
    assert_eq!(
        state(&updates),
        DeploymentState::Succeeded,
        "{:#?}",
        terminal(&updates)
    );
    eprintln!("rolling update to v2: {:?}", terminal(&updates).elapsed);
    let warning = updates
        .iter()
        .find(|u| u.metadata.get("update_order").map(String::as_str) == Some("stop-first"))
        .expect("the order fallback is reported");
    assert_eq!(warning.level(), Level::Warning);
    let rolled: BTreeSet<String> = task_updates(&updates)
        .into_iter()
        .filter(|t| t.3 == "running")
        .map(|t| t.2)
        .collect();
    assert_eq!(rolled.len(), 3, "a new task ran on each node: {rolled:?}");
    swarm::wait_all_nodes_serve(&env, port, "/", SERVE_LIMIT, |b| b == "v2\n").await;
    assert_eq!(running_nodes(&app).await, expected);

    // ListApps, metrics and audit carry the target and the replicas.
    let apps = client
        .list_apps(proto::ListAppsRequest {})
        .await
        .unwrap()
        .into_inner()
        .apps;
    let current = (apps.iter().find(|a| a.app == app))
        .and_then(|a| a.current.clone())
        .expect("the app is listed with its current version");
    assert_eq!((current.target.as_str(), current.replicas), ("swarm", 3));

    let metrics = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stevedore_deployments_by_target_total{target=\"swarm\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stevedore_replicas_requested_total{target=\"swarm\"} 6"),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(server.data_dir.path().join("audit.log")).unwrap();
    let accepted = audit
        .lines()
        .find(|l| l.contains("\"event\":\"accepted\""))
        .expect("an accepted record");
    assert!(
        accepted.contains("\"target\":\"swarm\"") && accepted.contains("\"replicas\":3"),
        "{accepted}"
    );
    server.stop().await;
}

/// With a spare node (2 replicas on 3 nodes) start-first is sent as asked, with no
/// fallback: Swarm runs each new task before it stops the old one, the update ends
/// with two v2 tasks running, and the nodes that run them serve v2.
#[tokio::test]
async fn start_first_with_a_spare_node_is_sent_as_asked_and_rolls_to_v2() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-start-first").await;
    let start_first = || {
        Some(UpdatePolicy {
            order: "start-first".into(),
            ..Default::default()
        })
    };

    let mut v1 = request(&app, &env.images.web_v1, 2, port);
    v1.update_policy = start_first();
    let updates = deploy_all(&mut client, v1).await;
    assert_eq!(
        state(&updates),
        DeploymentState::Succeeded,
        "{:#?}",
        terminal(&updates)
    );
    assert_eq!(running_nodes(&app).await.len(), 2, "two tasks, two nodes");

    let mut v2 = request(&app, &env.images.web_v2, 2, port);
    v2.update_policy = start_first();
    let updates = deploy_all(&mut client, v2).await;
    assert_eq!(
        state(&updates),
        DeploymentState::Succeeded,
        "{:#?}",
        terminal(&updates)
    );
    let orders: Vec<(Level, &str)> = (updates.iter())
        .filter_map(|u| Some((u.level(), u.metadata.get("update_order")?.as_str())))
        .collect();
    assert_eq!(
        orders,
        [(Level::Info, "start-first")],
        "the update is sent start-first, with no fallback warning"
    );
    let docker = swarm::manager().await;
    let service = swarm::call(
        "inspect the service",
        docker.inspect_service(
            &app,
            None::<bollard::query_parameters::InspectServiceOptions>,
        ),
    )
    .await;
    let order = service
        .spec
        .and_then(|s| s.update_config)
        .and_then(|u| u.order);
    assert_eq!(
        order,
        Some(bollard::models::ServiceSpecUpdateConfigOrderEnum::START_FIRST),
        "the spec Swarm holds is start-first"
    );
    let nodes = running_nodes(&app).await;
    assert_eq!(nodes.len(), 2, "two v2 tasks running: {nodes:?}");
    for addr in &nodes {
        let deadline = tokio::time::Instant::now() + SERVE_LIMIT;
        loop {
            match swarm::get_on_node(addr, port, "/").await {
                Ok((200, body)) if body == "v2\n" => break,
                other if tokio::time::Instant::now() >= deadline => {
                    panic!("node {addr} does not serve v2: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_targets_refuse_what_they_cannot_run() {
    let env = swarm::env();
    // The docker target runs one container per app.
    common::require_docker();
    let docker = common::TestServer::start().await;
    let mut client = docker.client().await;
    let app = common::unique_app("swarm-refused");
    let err = client
        .deploy(request(&app, &env.images.web_v1, 3, 18080))
        .await
        .expect_err("replicas 3 on the docker target");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("replicas:"), "{}", err.message());
    docker.stop().await;

    // The swarm target on a worker (not a manager): the server runs, Deploy says why.
    let worker = env.sockets[1].clone();
    let server = common::TestServer::start_with(
        move |c| {
            c.target = stevedore::model::Target::Swarm;
            c.docker_host = Some(worker);
        },
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let mut client = server.client().await;
    let err = client
        .deploy(request(&app, &env.images.web_v1, 1, 18080))
        .await
        .expect_err("a worker is not a manager");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("not a swarm manager"),
        "{}",
        err.message()
    );
    // A host port is required: host-mode ports are published on each node.
    let err = client
        .deploy(request(&app, &env.images.web_v1, 1, 0))
        .await
        .expect_err("no host port");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("ports[0].host_port"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_crashing_v3_rolls_back_with_diagnostics_and_v2_keeps_serving() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-crash").await;
    deploy_base(&mut client, &env, &app, &env.images.web_v2, port, "v2").await;

    let updates = deploy_all(&mut client, request(&app, &env.images.crash, 3, port)).await;
    assert_eq!(state(&updates), DeploymentState::Failed);
    let result = terminal(&updates).result.clone().unwrap();
    assert!(
        result.message.contains("rolled back"),
        "the message says the service was rolled back: {}",
        result.message
    );
    let d = result.diagnostics.expect("diagnostics");
    assert_eq!(d.exit_code, Some(1), "{d:#?}");
    assert!(
        d.log_tail
            .iter()
            .any(|l| l.contains("exit code 1") && l.contains(" on stv-")),
        "task errors with their nodes: {:?}",
        d.log_tail
    );
    swarm::wait_all_nodes_serve(&env, port, "/", SERVE_LIMIT, |b| b == "v2\n").await;
    server.stop().await;
}

#[tokio::test]
async fn an_unhealthy_v3_rolls_back_and_v2_keeps_serving() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-sick").await;
    deploy_base(&mut client, &env, &app, &env.images.web_v2, port, "v2").await;

    let updates = deploy_all(&mut client, request(&app, &env.images.unhealthy, 3, port)).await;
    assert_eq!(state(&updates), DeploymentState::Failed);
    let result = terminal(&updates).result.clone().unwrap();
    assert!(result.message.contains("rolled back"), "{}", result.message);
    assert!(
        !result
            .diagnostics
            .clone()
            .expect("diagnostics")
            .log_tail
            .is_empty(),
        "the failed tasks are named: {result:#?} {:#?}",
        updates.iter().map(|u| &u.message).collect::<Vec<_>>()
    );
    swarm::wait_all_nodes_serve(&env, port, "/", SERVE_LIMIT, |b| b == "v2\n").await;
    server.stop().await;
}

#[tokio::test]
async fn a_deadline_shorter_than_the_update_rolls_back() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-late").await;
    deploy_base(&mut client, &env, &app, &env.images.web_v1, port, "v1").await;

    // slowhealth never turns healthy: its task never runs, and Swarm waits for ever.
    let mut req = request(&app, &env.images.slowhealth, 3, port);
    req.deadline = secs(20);
    let updates = deploy_all(&mut client, req).await;
    assert_eq!(state(&updates), DeploymentState::Failed);
    let result = terminal(&updates).result.clone().unwrap();
    assert!(result.message.contains("deadline"), "{}", result.message);
    assert!(result.message.contains("rolled back"), "{}", result.message);
    assert_eq!(result.diagnostics.unwrap().step, "deadline");
    swarm::wait_all_nodes_serve(&env, port, "/", SERVE_LIMIT, |b| b == "v1\n").await;
    server.stop().await;
}

#[tokio::test]
async fn cancel_mid_update_rolls_back() {
    let (env, app, port, server, mut client, _guard) = swarm_app("swarm-cancel").await;
    deploy_base(&mut client, &env, &app, &env.images.web_v1, port, "v1").await;

    let mut stream =
        deploy_stream(&mut client, request(&app, &env.images.slowhealth, 3, port)).await;
    let seen = stream
        .until(|u| {
            u.metadata
                .get("task_state")
                .is_some_and(|s| s == "starting")
        })
        .await;
    let id = seen[0].deployment_id.clone();
    client
        .cancel_deployment(CancelRequest {
            deployment_id: id.clone(),
        })
        .await
        .expect("cancel");
    let rest = stream.rest().await;
    assert_eq!(state(&rest), DeploymentState::Cancelled);
    assert!(
        rest.iter()
            .any(|u| u.message.contains("back to its previous spec")),
        "the rollback is reported"
    );
    swarm::wait_all_nodes_serve(&env, port, "/", SERVE_LIMIT, |b| b == "v1\n").await;
    server.stop().await;
}

/// The digest the deployment pinned its image to (its PULLING update).
fn pinned_digest(updates: &[ProgressUpdate]) -> String {
    let pinned = updates.iter().find_map(|u| u.metadata.get("image_digest"));
    pinned.expect("the pinned digest").clone()
}

/// A server restarted after kill -9 answers at once, while its recovery still follows
/// deployment `id` in the background: GetStatus shows it RUNNING, and a watch from the
/// start reads the stored updates, then the live ones (the recovery's), to the end.
async fn assert_followed_in_the_background(client: &mut Client, id: &str) {
    let status = common::get_status(client, id).await;
    assert_eq!(
        status.state(),
        DeploymentState::Running,
        "the restarted server answers while recovery follows: {status:#?}"
    );
    let updates = common::watch(client, id, 0).await.expect("WatchDeployment");
    let recovered = updates
        .iter()
        .position(|u| u.metadata.contains_key("recovered"))
        .expect("recovery's update");
    assert!(
        updates[..recovered]
            .iter()
            .any(|u| u.metadata.contains_key("service_id")),
        "the stored updates come first"
    );
    terminal(&updates);
}

/// A server killed (-9) in the middle of a swarm update, and its successor.
struct KilledMidUpdate {
    env: SwarmEnv,
    app: String,
    port: u16,
    /// The interrupted deployment and the digest it pinned its image to.
    id: String,
    pinned: String,
    /// The server restarted on the same data, and a client of it.
    server: common::BinaryServer,
    client: Client,
    _data: tempfile::TempDir,
    _guard: ServiceGuard,
}

/// Deploys v1 of a new app (`prefix`) with 3 replicas through a `--target swarm`
/// server, starts the update `next(env, app, port)` asks for, kills the server at the
/// first update `at` accepts, and restarts it on the same data.
async fn kill_9_mid_update(
    prefix: &str,
    next: impl FnOnce(&SwarmEnv, &str, u16) -> DeployRequest,
    at: impl Fn(&ProgressUpdate) -> bool,
) -> KilledMidUpdate {
    let env = swarm::env();
    let app = common::unique_app(prefix);
    let guard = ServiceGuard::app(&env, &app);
    let port = swarm::unused_port(&swarm::manager().await).await;
    let data = tempfile::tempdir().unwrap();
    let args = ["--target", "swarm", "--docker-host", &env.manager];
    let server = common::BinaryServer::spawn(data.path(), &args);
    let mut client = common::connect(server.grpc_addr).await;
    deploy_base(&mut client, &env, &app, &env.images.web_v1, port, "v1").await;

    let mut stream: Updates = deploy_stream(&mut client, next(&env, &app, port)).await;
    let seen = stream.until(at).await;
    let id = seen[0].deployment_id.clone();
    let pinned = pinned_digest(&seen);
    drop(stream);
    drop(server); // SIGKILL, then reaped.

    let server = common::BinaryServer::spawn(data.path(), &args);
    let client = common::connect(server.grpc_addr).await;
    KilledMidUpdate {
        env,
        app,
        port,
        id,
        pinned,
        server,
        client,
        _data: data,
        _guard: guard,
    }
}

#[tokio::test]
async fn kill_9_mid_update_then_restart_ends_truthfully_and_the_service_converges() {
    // v2 with a long monitor: the update is in flight for a while after the spec
    // reached Swarm, and the server dies then.
    let next = |env: &SwarmEnv, app: &str, port| {
        let mut v2 = request(app, &env.images.web_v2, 3, port);
        v2.update_policy = Some(UpdatePolicy {
            monitor: secs(10),
            ..Default::default()
        });
        v2
    };
    let running = |u: &ProgressUpdate| u.metadata.get("task_state").is_some_and(|s| s == "running");
    let mut k = kill_9_mid_update("swarm-crashsrv", next, running).await;

    assert_followed_in_the_background(&mut k.client, &k.id).await;
    let status = common::wait_finished(&mut k.client, &k.id).await;
    assert_eq!(
        status.state(),
        DeploymentState::Succeeded,
        "the converging update was followed to its end: {status:#?}"
    );
    let result = status.result.unwrap();
    assert!(
        result.message.contains("completed by recovery"),
        "{}",
        result.message
    );
    // The result is a normal one's: the pinned digest, an endpoint on every node.
    assert_eq!(result.image_digest, k.pinned);
    for addr in &k.env.nodes {
        let url = format!("http://{addr}:{}", k.port);
        assert!(
            result.endpoints.values().any(|u| *u == url),
            "endpoint {url} in {:?}",
            result.endpoints
        );
    }
    assert!(result.endpoints.contains_key("8080/tcp"), "{result:#?}");
    swarm::wait_all_nodes_serve(&k.env, k.port, "/", SERVE_LIMIT, |b| b == "v2\n").await;
    let log = k.server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn kill_9_mid_an_update_that_cannot_converge_then_restart_rolls_it_back() {
    // slowhealth never turns healthy: the update can only hang. The server dies in it.
    let next = |env: &SwarmEnv, app: &str, port| {
        let mut req = request(app, &env.images.slowhealth, 3, port);
        req.deadline = secs(30);
        req
    };
    let starting = |u: &ProgressUpdate| {
        u.metadata
            .get("task_state")
            .is_some_and(|s| s == "starting")
    };
    let mut k = kill_9_mid_update("swarm-stuck", next, starting).await;

    // Recovery follows it for the rest of its deadline, then rolls it back.
    assert_followed_in_the_background(&mut k.client, &k.id).await;
    let status = common::wait_finished(&mut k.client, &k.id).await;
    assert_eq!(status.state(), DeploymentState::Failed, "{status:#?}");
    let result = status.result.unwrap();
    assert_eq!(
        result.image_digest, k.pinned,
        "the digest that was rolled back"
    );
    assert!(
        result.message.contains("did not converge"),
        "{}",
        result.message
    );
    assert!(result.message.contains("rolled back"), "{}", result.message);
    swarm::wait_all_nodes_serve(&k.env, k.port, "/", SERVE_LIMIT, |b| b == "v1\n").await;
    let docker = swarm::manager().await;
    let tasks = swarm::service_tasks(&docker, &k.app).await;
    assert!(
        tasks
            .iter()
            .filter(|t| t.desired_running())
            .all(|t| t.image.contains("stevedore-test/web@")),
        "only v1 tasks are meant to run: {tasks:#?}"
    );
}
