//! An app's stable address through `stevedore proxy` (issue 11): the real server binary
//! with `--proxy-socket`, the real proxy binary, a real engine. A load client sends
//! requests in a loop to the app's public port through redeploys and restarts of the
//! server and of the proxy; a connection held open to the previous version drains
//! through a switch; a kill -9 at SWITCHING leaves one version with the route on it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::proxy::ProxyProcess;
use common::*;
use stevedore::proto::{self, ProgressUpdate};
use stevedore::proxy::routes::{Route, SetRoute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB1: &str = "stevedore-test/web:1";
const WEB2: &str = "stevedore-test/web:2";

/// Proxy restarts (hand-overs) in a row under load.
const PROXY_RESTARTS: usize = 3;

/// The version a web test image answers with.
fn body_of(image: &str) -> &'static str {
    if image == WEB1 { "v1" } else { "v2" }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A proxy, a server talking to it, and one app with a fixed public port.
struct Stack {
    // Dropped in this order: the processes first, the directory last.
    server: BinaryServer,
    proxy: ProxyProcess,
    client: Client,
    app: String,
    public: SocketAddr,
    _guard: AppGuard,
    dir: tempfile::TempDir,
}

impl Stack {
    async fn start(prefix: &str) -> Self {
        require_docker();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proxy")).unwrap();
        std::fs::create_dir_all(dir.path().join("server")).unwrap();
        let proxy = ProxyProcess::spawn(&dir.path().join("proxy"), &[]);
        let app = unique_app(prefix);
        let server = spawn_server(dir.path(), &proxy);
        let client = connect(server.grpc_addr).await;
        Self {
            public: SocketAddr::from(([127, 0, 0, 1], free_port())),
            _guard: AppGuard(app.clone()),
            dir,
            proxy,
            server,
            client,
            app,
        }
    }

    /// A request for `image` whose container port 8080 is the app's public port.
    fn request(&self, image: &str, drain_timeout_secs: Option<i64>) -> proto::DeployRequest {
        let mut req = web_request(&self.app, image);
        req.ports[0].host_port = self.public.port().into();
        req.drain_timeout = drain_timeout_secs.and_then(secs);
        req
    }

    async fn deploy(&mut self, image: &str) -> Vec<ProgressUpdate> {
        let req = self.request(image, None);
        let updates = deploy(&mut self.client, req).await;
        let url = succeeded_url(&updates);
        assert_eq!(url, format!("http://{}", self.public), "the stable address");
        updates
    }

    /// Stops the server (SIGTERM, or kill -9) and starts it again on the same data dir.
    async fn restart_server(&mut self, kill: bool) {
        let pid = self.server.child.id().to_string();
        if kill {
            self.server.child.kill().unwrap();
        } else {
            let ok = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        self.server.child.wait().unwrap();
        self.server = spawn_server(self.dir.path(), &self.proxy);
        self.client = connect(self.server.grpc_addr).await;
    }

    /// Restarts the proxy with a hand-over: a new proxy takes the listening sockets and
    /// the routes over (`--takeover`), then the old one finishes its open connections
    /// and exits (waited for here).
    fn restart_proxy(&mut self) {
        let new = ProxyProcess::take_over(&self.dir.path().join("proxy"));
        let mut old = std::mem::replace(&mut self.proxy, new);
        let exit = old.wait_exit(STATE_LIMIT);
        assert!(exit.success(), "{exit:?}");
        assert!(old.log_text().contains("handed over"), "{}", old.log_text());
    }

    /// The app's route: its backend, once the proxy has one.
    async fn backend(&self) -> Option<SocketAddr> {
        let route = self.proxy.client().get_route(&self.app).await.unwrap();
        route.map(|r| r.route.backend)
    }
}

fn spawn_server(dir: &std::path::Path, proxy: &ProxyProcess) -> BinaryServer {
    let socket = proxy.socket.display().to_string();
    let args = ["--proxy-socket", &socket, "--reconcile-interval", "1s"];
    BinaryServer::spawn(&dir.join("server"), &args)
}

/// One HTTP/1.0 GET on a new connection to `addr`; the body's first line.
async fn get_once(addr: SocketAddr) -> Result<String, String> {
    let mut conn = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    request_on(&mut conn).await
}

/// Sends a GET on `conn` and reads the answer to its end; the body's first line.
async fn request_on(conn: &mut TcpStream) -> Result<String, String> {
    let exchange = async {
        conn.write_all(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or(format!("answer: {text:?}"))?;
        if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
            return Err(format!("answer: {head:?}"));
        }
        Ok(body.trim().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10s".to_string())?
}

/// What the load client saw.
#[derive(Debug, Default)]
struct LoadReport {
    sent: usize,
    /// Every failed request (a refused connection included), whatever was happening.
    failed: Vec<String>,
    /// Requests sent while the proxy was being restarted, and how many of them failed.
    during_proxy_restart: (usize, usize),
    /// The bodies in order, runs collapsed: `["v1", "v2", "v1"]`.
    runs: Vec<String>,
}

/// Sends requests in a loop (each on a new connection, so each is routed anew) until
/// stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// Set while the proxy restarts, to count the requests sent meanwhile.
    proxy_restarting: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl Load {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let proxy_restarting = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), proxy_restarting.clone());
        let task = tokio::spawn(async move {
            let mut report = LoadReport::default();
            while !s.load(Ordering::SeqCst) {
                let restarting = r.load(Ordering::SeqCst);
                let answer = get_once(addr).await;
                report.sent += 1;
                if restarting {
                    report.during_proxy_restart.0 += 1;
                    report.during_proxy_restart.1 += usize::from(answer.is_err());
                }
                match answer {
                    Ok(body) => {
                        if report.runs.last() != Some(&body) {
                            report.runs.push(body);
                        }
                    }
                    Err(e) => report.failed.push(e),
                }
            }
            report
        });
        Self {
            stop,
            proxy_restarting,
            task,
        }
    }

    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// The host address container port 8080 of `container` is published on.
fn published(container: &str) -> SocketAddr {
    let out = docker(&["port", container, "8080/tcp"]);
    let line = out.lines().next().expect("port 8080 published");
    line.trim().parse().expect("an address")
}

/// Running containers of `app`.
fn running(app: &str) -> Vec<String> {
    let filter = format!("label=io.stevedore.app={app}");
    let out = docker(&["ps", "-q", "--no-trunc", "--filter", &filter]);
    out.lines().map(str::to_owned).collect()
}

/// Sleeps while the load runs.
async fn under_load(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_served_through_redeploys_and_restarts() {
    let mut stack = Stack::start("stable-load").await;
    let first = stack.deploy(WEB1).await;
    let container = terminal(&first).result.clone().unwrap().container_id;
    assert_eq!(stack.backend().await, Some(published(&container)));
    assert_ne!(
        published(&container),
        stack.public,
        "the container is behind the proxy"
    );

    let load = Load::start(stack.public);
    under_load(500).await;
    let v2 = stack.deploy(WEB2).await;
    let switched = (v2.iter())
        .find(|u| metadata(u).contains_key("route_backend"))
        .expect("the stream says the route moved");
    assert_eq!(switched.phase(), proto::Phase::Switching);
    assert!(
        switched.message.contains("new connections go to it"),
        "{}",
        switched.message
    );
    under_load(500).await;
    stack.deploy(WEB1).await;
    under_load(500).await;
    stack.restart_server(false).await;
    under_load(500).await;
    stack.restart_server(true).await;
    under_load(500).await;
    // The proxy restarts with a hand-over (the listening sockets pass to the new
    // process, never closed): no request fails during it either.
    load.proxy_restarting.store(true, Ordering::SeqCst);
    for _ in 0..PROXY_RESTARTS {
        under_load(200).await;
        stack.restart_proxy();
    }
    under_load(200).await;
    load.proxy_restarting.store(false, Ordering::SeqCst);
    assert_eq!(get_once(stack.public).await.unwrap(), "v1");
    under_load(300).await;
    // The server drives the new proxy (its client's connections to the old one closed).
    stack.deploy(WEB2).await;
    under_load(300).await;
    let report = load.finish().await;
    eprintln!(
        "load: {} requests sent, {} failed; during {PROXY_RESTARTS} proxy restarts {} sent, {} failed; responses {:?}",
        report.sent,
        report.failed.len(),
        report.during_proxy_restart.0,
        report.during_proxy_restart.1,
        report.runs
    );
    assert!(
        report.failed.is_empty(),
        "failed requests: {:?}",
        report.failed
    );
    assert!(report.sent > 20, "{report:?}");
    assert!(report.during_proxy_restart.0 > 0, "{report:?}");
    assert_eq!(
        report.runs,
        ["v1", "v2", "v1", "v2"],
        "responses move at each switch"
    );

    // One version runs, and the route points at it.
    let now = running(&stack.app);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(stack.backend().await, Some(published(&now[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_connection_drains_before_the_previous_version_stops() {
    let mut stack = Stack::start("stable-drain").await;
    stack.deploy(WEB1).await;

    // A connection to v1, open through the switch (its request is sent later).
    let mut held = TcpStream::connect(stack.public).await.unwrap();
    under_load(200).await;
    let req = stack.request(WEB2, Some(120));
    let mut stream = deploy_stream(&mut stack.client, req).await;
    let seen = stream
        .until(|u| metadata(u).contains_key("drain_seconds_left") || u.result.is_some())
        .await;
    let draining = seen.last().unwrap();
    assert_eq!(
        draining.phase(),
        proto::Phase::Switching,
        "{}",
        draining.message
    );
    assert_eq!(
        metadata(draining)["draining_connections"],
        "1",
        "{}",
        draining.message
    );
    assert!(
        draining.message.contains("1 connection(s) still open"),
        "{}",
        draining.message
    );
    // New connections go to v2 at once; the open one is still served by v1.
    assert_eq!(get_once(stack.public).await.unwrap(), "v2");
    assert_eq!(running(&stack.app).len(), 2, "v1 runs until its drain ends");
    assert_eq!(request_on(&mut held).await.unwrap(), "v1");
    drop(held);
    let rest = stream.rest().await;
    let drained = (rest.iter())
        .position(|u| u.message.contains("drained"))
        .expect("the stream says the drain ended");
    let stopping = (rest.iter())
        .position(|u| metadata(u).contains_key("stopping_container_id"))
        .expect("then v1 is stopped");
    assert!(drained < stopping);
    assert_eq!(succeeded_url(&rest), format!("http://{}", stack.public));

    // A connection that stays open is cut when the drain timeout ends.
    let mut idle = TcpStream::connect(stack.public).await.unwrap();
    under_load(200).await;
    let req = stack.request(WEB1, Some(2));
    let updates = deploy(&mut stack.client, req).await;
    succeeded_url(&updates);
    let left: Vec<String> = (updates.iter())
        .filter_map(|u| metadata(u).get("drain_seconds_left").cloned())
        .collect();
    assert!(left.first().is_some_and(|s| s != "0"), "{left:?}");
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(STATE_LIMIT, idle.read(&mut buf)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was closed: {cut:?}"
    );
    assert_eq!(get_once(stack.public).await.unwrap(), "v1");

    // RemoveApp removes the route: the public port closes.
    let removal = proto::RemoveAppRequest {
        app: stack.app.clone(),
        ..Default::default()
    };
    stack.client.remove_app(removal).await.unwrap();
    assert_eq!(stack.backend().await, None);
    assert!(TcpStream::connect(stack.public).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_at_switching_leaves_one_version_with_the_route_on_it() {
    let mut stack = Stack::start("stable-kill").await;
    stack.deploy(WEB1).await;
    let mut serving = WEB1;
    let mut rolled_forward = 0;
    for round in 0..3 {
        let next = if serving == WEB1 { WEB2 } else { WEB1 };
        // An open connection keeps SWITCHING in its drain.
        let held = TcpStream::connect(stack.public).await.unwrap();
        under_load(100).await;
        let req = stack.request(next, Some(120));
        let mut stream = deploy_stream(&mut stack.client, req).await;
        // Round 0: as SWITCHING begins (the route may not have moved yet); then while
        // the previous version drains.
        let seen = stream
            .until(|u| {
                u.result.is_some()
                    || (u.phase() == proto::Phase::Switching
                        && (round == 0 || metadata(u).contains_key("drain_seconds_left")))
            })
            .await;
        let id = seen[0].deployment_id.clone();
        assert!(
            seen.last().unwrap().result.is_none(),
            "ended before the kill"
        );
        stack.restart_server(true).await;
        drop((stream, held));

        let one = eventually(STATE_LIMIT, "exactly one running version", || {
            let r = running(&stack.app);
            (r.len() == 1).then_some(r)
        })
        .await;
        assert_eq!(
            stack.backend().await,
            Some(published(&one[0])),
            "round {round}: the route points at the running version"
        );
        let status = get_status(&mut stack.client, &id).await;
        if status.state() == proto::DeploymentState::Succeeded {
            let result = status.result.unwrap();
            assert_eq!(result.container_id, one[0]);
            assert!(
                result.message.contains("completed by recovery"),
                "{}",
                result.message
            );
            assert_eq!(
                result.endpoints["8080/tcp"],
                format!("http://{}", stack.public)
            );
            serving = next;
            rolled_forward += 1;
        } else {
            // Killed before SWITCHING reached the disk (round 0 only): rolled back.
            assert_eq!(round, 0, "{}", status.error);
            assert!(
                status.error.contains("previous version keeps running"),
                "{}",
                status.error
            );
        }
        assert_eq!(get_once(stack.public).await.unwrap(), body_of(serving));
    }
    eprintln!("{rolled_forward} of 3 kills at SWITCHING rolled forward");
    assert!(rolled_forward >= 2, "kills while draining roll forward");

    // At start the routes follow the store: a route moved behind the server's back is
    // pointed at the current version again, and a route of an unknown app is removed.
    let proxy = stack.proxy.client();
    let current = stack.backend().await.unwrap();
    let stray = |listen: SocketAddr| SetRoute {
        route: Route {
            listen,
            backend: "127.0.0.1:1".parse().unwrap(),
            deployment_id: None,
            version: None,
        },
        drain_timeout_ms: None,
    };
    let ghost = unique_app("stable-ghost");
    let ghost_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    proxy.set_route(&ghost, &stray(ghost_listen)).await.unwrap();
    proxy
        .set_route(&stack.app, &stray(stack.public))
        .await
        .unwrap();
    stack.restart_server(false).await;
    assert_eq!(stack.backend().await, Some(current));
    assert_eq!(proxy.get_route(&ghost).await.unwrap(), None);
    assert_eq!(get_once(stack.public).await.unwrap(), body_of(serving));
}
