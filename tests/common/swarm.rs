//! Helpers for tests on the three-node swarm `bash scripts/swarm-env.sh up` brings up
//! (docs/SWARM.md): where it is ([`env`]), a bollard client to a node ([`connect`]),
//! the tasks of a service with the address of their node ([`service_tasks`]), HTTP on
//! every node ([`get_on_nodes`]) and cleanup of services a test made ([`ServiceGuard`]).
//!
//! A test that needs the swarm fails, never skips, when the environment is missing.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{NodeState, Task, TaskState};
use bollard::query_parameters::{ListNodesOptions, ListServicesOptions, ListTasksOptionsBuilder};

/// Budget of one Docker API call in these helpers (each call is wrapped in it).
pub const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Budget of one HTTP GET on a node.
pub const GET_LIMIT: Duration = Duration::from_secs(5);
/// How long [`ServiceGuard`] waits for a removed service's containers to go.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(60);

/// The label [`ServiceGuard::label`] removes by, on services the test makes itself.
pub const TEST_LABEL: &str = "io.stevedore.test";
/// The label Stevedore puts on what belongs to an app (services as containers).
pub const APP_LABEL: &str = "io.stevedore.app";

/// The swarm test environment, as `scripts/swarm-env.sh env` exports it.
#[derive(Debug, Clone)]
pub struct SwarmEnv {
    /// Docker address of the manager node (`unix:///run/stv-n1.sock`).
    pub manager: String,
    /// Addresses of the nodes, reachable from this host (ports published in host mode
    /// answer there), in node order: `10.77.0.11`, `.12`, `.13`.
    pub nodes: Vec<String>,
    /// Docker address of each node, in node order.
    pub sockets: Vec<String>,
    pub images: SwarmImages,
}

/// Test images in the registry every node pulls from (`127.0.0.1:5000/...`).
#[derive(Debug, Clone)]
pub struct SwarmImages {
    /// httpd on 8080 answering `v1\n`, with a HEALTHCHECK.
    pub web_v1: String,
    /// The same answering `v2\n`.
    pub web_v2: String,
    /// Exits 1 about 0.5 s after start.
    pub crash: String,
    /// httpd on 8080 whose HEALTHCHECK always fails (unhealthy after ~2-3 s).
    pub unhealthy: String,
    /// httpd on 8080 whose health stays `starting` (1 h start period).
    pub slowhealth: String,
    /// httpd on 8080 answering `plain\n`, no HEALTHCHECK.
    pub plain: String,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: the swarm tests need the three-node swarm; run \
             `eval \"$(bash scripts/swarm-env.sh up)\"` (scripts/test.sh does) and retry"
        ),
    }
}

fn list(name: &str) -> Vec<String> {
    var(name).split(',').map(|s| s.trim().to_owned()).collect()
}

/// The environment from the `STEVEDORE_TEST_SWARM_*` variables; panics (fails the
/// test) naming `bash scripts/swarm-env.sh up` when they are missing.
pub fn env() -> SwarmEnv {
    let image = |v: &str| var(&format!("STEVEDORE_TEST_SWARM_IMAGE_{v}"));
    let env = SwarmEnv {
        manager: var("STEVEDORE_TEST_SWARM_MANAGER"),
        nodes: list("STEVEDORE_TEST_SWARM_NODES"),
        sockets: list("STEVEDORE_TEST_SWARM_SOCKETS"),
        images: SwarmImages {
            web_v1: image("WEB_V1"),
            web_v2: image("WEB_V2"),
            crash: image("CRASH"),
            unhealthy: image("UNHEALTHY"),
            slowhealth: image("SLOWHEALTH"),
            plain: image("PLAIN"),
        },
    };
    assert_eq!(
        env.nodes.len(),
        env.sockets.len(),
        "STEVEDORE_TEST_SWARM_NODES and _SOCKETS name different node counts"
    );
    env
}

/// Runs `call` under [`CALL_LIMIT`]; panics naming `what` on a timeout or an error.
pub async fn call<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(CALL_LIMIT, call).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {CALL_LIMIT:?}"),
    }
}

/// A bollard client for a node's Docker address (`unix://PATH`), with the API version
/// negotiated (bollard speaks a newer API than Debian's 20.10 engine). Panics naming
/// the env script when the node does not answer.
pub async fn connect(address: &str) -> Docker {
    let docker = Docker::connect_with_unix(address, 120, bollard::API_DEFAULT_VERSION)
        .unwrap_or_else(|e| {
            panic!("swarm node {address}: {e} (is `bash scripts/swarm-env.sh up` done?)")
        });
    call(
        &format!("swarm node {address} (is `bash scripts/swarm-env.sh up` done?)"),
        docker.negotiate_version(),
    )
    .await
}

/// A client for the manager node.
pub async fn manager() -> Docker {
    connect(&env().manager).await
}

/// A node as the manager lists it.
#[derive(Debug, Clone)]
pub struct SwarmNode {
    pub id: String,
    pub hostname: String,
    /// The node's address, as reachable from this host.
    pub addr: String,
    pub ready: bool,
    pub manager: bool,
    pub leader: bool,
}

/// The nodes of the swarm, from the manager.
pub async fn nodes(docker: &Docker) -> Vec<SwarmNode> {
    let nodes = call("list nodes", docker.list_nodes(None::<ListNodesOptions>)).await;
    nodes
        .into_iter()
        .map(|n| {
            let status = n.status.unwrap_or_default();
            let manager = n.manager_status;
            SwarmNode {
                id: n.id.unwrap_or_default(),
                hostname: n.description.and_then(|d| d.hostname).unwrap_or_default(),
                addr: status.addr.unwrap_or_default(),
                ready: status.state == Some(NodeState::READY),
                manager: manager.is_some(),
                leader: manager.and_then(|m| m.leader).unwrap_or(false),
            }
        })
        .collect()
}

/// A task of a service, with where it runs.
#[derive(Debug, Clone)]
pub struct SwarmTask {
    pub id: String,
    pub slot: Option<i64>,
    pub node_id: String,
    /// Address of the task's node (empty while the task is not assigned).
    pub node_addr: String,
    /// Hostname of the task's node (`stv-n1`..; empty while not assigned).
    pub node_name: String,
    pub state: Option<TaskState>,
    pub desired_state: Option<TaskState>,
    /// The image of the task's spec (as the service names it, often pinned by digest).
    pub image: String,
    pub message: String,
    pub err: Option<String>,
    pub exit_code: Option<i64>,
    /// Host-mode ports the task publishes on its node: (container port, node port).
    /// With no published port in the spec, the node picks one per task, which lets a
    /// start-first update run a new task beside the old one on the same node.
    pub ports: Vec<(i64, i64)>,
}

impl SwarmTask {
    /// The node port publishing container port `target`, if the task has one.
    pub fn node_port(&self, target: i64) -> Option<u16> {
        let (_, published) = self.ports.iter().find(|(t, _)| *t == target)?;
        u16::try_from(*published).ok()
    }
    pub fn running(&self) -> bool {
        self.state == Some(TaskState::RUNNING)
    }
    /// Desired to run (not a task the orchestrator is shutting down or replaced).
    pub fn desired_running(&self) -> bool {
        matches!(
            self.desired_state,
            Some(TaskState::RUNNING | TaskState::READY | TaskState::ACCEPTED)
        )
    }
}

/// Every task of `service` (a name or an ID), old ones included, with the address and
/// name of its node.
pub async fn service_tasks(docker: &Docker, service: &str) -> Vec<SwarmTask> {
    let nodes: HashMap<String, SwarmNode> = nodes(docker)
        .await
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect();
    let filters = HashMap::from([("service", vec![service])]);
    let options = ListTasksOptionsBuilder::default().filters(&filters).build();
    let tasks: Vec<Task> = call(
        &format!("list tasks of {service}"),
        docker.list_tasks(Some(options)),
    )
    .await;
    tasks
        .into_iter()
        .map(|t| {
            let node_id = t.node_id.unwrap_or_default();
            let node = nodes.get(&node_id);
            let status = t.status.unwrap_or_default();
            SwarmTask {
                id: t.id.unwrap_or_default(),
                slot: t.slot,
                node_addr: node.map(|n| n.addr.clone()).unwrap_or_default(),
                node_name: node.map(|n| n.hostname.clone()).unwrap_or_default(),
                node_id,
                state: status.state,
                desired_state: t.desired_state,
                image: t
                    .spec
                    .and_then(|s| s.container_spec)
                    .and_then(|c| c.image)
                    .unwrap_or_default(),
                message: status.message.unwrap_or_default(),
                err: status.err,
                exit_code: status.container_status.and_then(|c| c.exit_code),
                ports: status
                    .port_status
                    .and_then(|p| p.ports)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| Some((p.target_port?, p.published_port?)))
                    .collect(),
            }
        })
        .collect()
}

/// Polls [`service_tasks`] every 200 ms until `done` accepts them, for at most `limit`;
/// panics with the last task list on a timeout.
pub async fn wait_tasks(
    docker: &Docker,
    service: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&[SwarmTask]) -> bool,
) -> Vec<SwarmTask> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tasks = service_tasks(docker, service).await;
        if done(&tasks) {
            return tasks;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}; tasks of {service}: {tasks:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET `http://ADDR:PORT/PATH` within [`GET_LIMIT`]: (status, body) or the error.
pub async fn get_on_node(addr: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let url = format!("http://{addr}:{port}/{}", path.trim_start_matches('/'));
    let r = reqwest::Client::new()
        .get(&url)
        .timeout(GET_LIMIT)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status().as_u16();
    let body = r
        .text()
        .await
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

/// GET `PATH` on `PORT` of every node, in node order: (node address, result).
pub async fn get_on_nodes(
    env: &SwarmEnv,
    port: u16,
    path: &str,
) -> Vec<(String, Result<(u16, String), String>)> {
    let mut out = Vec::new();
    for addr in &env.nodes {
        out.push((addr.clone(), get_on_node(addr, port, path).await));
    }
    out
}

/// Polls every node until each answers `PORT/PATH` with 200 and a body `body_ok`
/// accepts, for at most `limit`; returns the bodies in node order.
pub async fn wait_all_nodes_serve(
    env: &SwarmEnv,
    port: u16,
    path: &str,
    limit: Duration,
    body_ok: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let answers = get_on_nodes(env, port, path).await;
        let ok = answers
            .iter()
            .all(|(_, r)| matches!(r, Ok((200, body)) if body_ok(body)));
        if ok {
            return answers.into_iter().map(|(_, r)| r.unwrap().1).collect();
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for every node to serve :{port}/{path}: {answers:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A port no service of the swarm publishes yet (20000-29999), for a test's host-mode
/// published port. Random, so parallel tests rarely pick the same one.
pub async fn unused_port(docker: &Docker) -> u16 {
    let services = call(
        "list services",
        docker.list_services(None::<ListServicesOptions>),
    )
    .await;
    let used: Vec<i64> = services
        .iter()
        .filter_map(|s| s.endpoint.as_ref()?.ports.as_ref())
        .flatten()
        .filter_map(|p| p.published_port)
        .collect();
    loop {
        let port = 20000 + (uuid::Uuid::new_v4().as_u128() % 10000) as u16;
        if !used.contains(&i64::from(port)) {
            return port;
        }
    }
}

/// Removes, when dropped, the services carrying a label (`key=value`), then waits (up
/// to [`CLEANUP_LIMIT`]) until no node keeps a container of theirs. Uses the docker CLI,
/// so it works in `Drop` (also after a panic).
pub struct ServiceGuard {
    manager: String,
    sockets: Vec<String>,
    label: String,
}

impl ServiceGuard {
    /// Services of Stevedore's app `app` (label `io.stevedore.app=APP`).
    pub fn app(env: &SwarmEnv, app: &str) -> Self {
        Self::label(env, APP_LABEL, app)
    }

    /// Services labelled `key=value`.
    pub fn label(env: &SwarmEnv, key: &str, value: &str) -> Self {
        ServiceGuard {
            manager: env.manager.clone(),
            sockets: env.sockets.clone(),
            label: format!("{key}={value}"),
        }
    }

    /// Removes the services now (also done on drop).
    pub fn cleanup(&self) {
        let filter = format!("label={}", self.label);
        let names = cli(
            &self.manager,
            &[
                "service",
                "ls",
                "--format",
                "{{.Name}}",
                "--filter",
                &filter,
            ],
        );
        let names: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
        if names.is_empty() {
            return;
        }
        let mut rm = vec!["service", "rm"];
        rm.extend(&names);
        cli(&self.manager, &rm);
        // The nodes stop and remove the tasks' containers on their own; wait for that,
        // so no test leaves a container (or a host-mode port) behind.
        let deadline = std::time::Instant::now() + CLEANUP_LIMIT;
        for socket in &self.sockets {
            loop {
                let left: Vec<String> = names
                    .iter()
                    .flat_map(|name| {
                        let f = format!("label=com.docker.swarm.service.name={name}");
                        cli(socket, &["ps", "-aq", "--filter", &f])
                            .lines()
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                if left.is_empty() {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    eprintln!(
                        "ServiceGuard: containers {left:?} of services {names:?} still on {socket}"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// `docker -H HOST ARGS..` (bounded by `timeout`): stdout, empty on failure.
fn cli(host: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg(CALL_LIMIT.as_secs().to_string())
        .args(["docker", "-H", host])
        .args(args)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => String::new(),
    }
}
