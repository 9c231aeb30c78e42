//! `stevedore proxy` as a process: the real binary, driven through its admin socket with
//! the typed client, forwarding to plain tokio backends (and, in one test, to real
//! containers). No server and no engine are involved.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proxy::ProxyProcess;
use stevedore::proxy::client::{ClientError, ProxyClient};
use stevedore::proxy::routes::{Route, RouteStatus, SetRoute};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A TCP backend that answers each line with `"{tag} {line}"`.
struct Backend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(tag: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{tag} {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Backend { addr, task }
}

fn route(listen: SocketAddr, backend: SocketAddr, version: &str) -> SetRoute {
    SetRoute {
        route: Route {
            listen,
            backend,
            deployment_id: Some(format!("deployment-{version}")),
            version: Some(version.to_owned()),
        },
        drain_timeout_ms: None,
    }
}

fn ephemeral() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A proxy with `web` routed to `v1`, listening on `public`.
struct Fixture {
    _dir: tempfile::TempDir,
    proxy: ProxyProcess,
    client: ProxyClient,
    v1: Backend,
    v2: Backend,
    public: SocketAddr,
}

impl Fixture {
    async fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proxy = ProxyProcess::spawn(dir.path(), args);
        let client = proxy.client();
        let (v1, v2) = (backend("v1").await, backend("v2").await);
        let status = client
            .set_route("web", &route(ephemeral(), v1.addr, "v1"))
            .await
            .unwrap();
        assert!(status.listening, "{status:?}");
        Self {
            _dir: dir,
            proxy,
            client,
            v1,
            v2,
            public: status.route.listen,
        }
    }
}

/// A long-lived client connection that sends lines and reads the answers.
struct Conn {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        Self {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends `line`; the answer, or `None` if the connection was closed.
    async fn ask(&mut self, line: &str) -> Option<String> {
        if self
            .write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .is_err()
        {
            return None;
        }
        tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
            .await
            .expect("an answer within 5s")
            .ok()
            .flatten()
    }
}

/// A fresh connection to `addr` that has sent `bytes`.
async fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    Ok(stream)
}

/// One request on a fresh connection: the backend's tag.
async fn request(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let stream = connect_and_send(addr, b"ping\n").await?;
        let mut answer = String::new();
        let mut reader = BufReader::new(stream);
        reader
            .read_line(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        match answer.strip_suffix(" ping\n") {
            Some(tag) => Ok(tag.to_owned()),
            None => Err(format!("unexpected answer {answer:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// Polls `app`'s route until `done` holds (up to `limit`).
async fn route_until(
    client: &ProxyClient,
    app: &str,
    limit: Duration,
    done: impl Fn(&RouteStatus) -> bool,
) -> RouteStatus {
    let deadline = Instant::now() + limit;
    loop {
        let status = client.get_route(app).await.unwrap().expect("route exists");
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "route never reached the expected state: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collapses runs: ["v1","v1","v2","v1"] → ["v1","v2","v1"].
fn runs(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        if out.last() != Some(t) {
            out.push(t.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switches_under_load_fail_no_request_and_move_responses() {
    let f = Fixture::start(&["--drain-timeout", "5s"]).await;
    let public = f.public;
    assert_ne!(public.port(), 0, "the route records the port it got");

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        loaders.push(tokio::spawn(async move {
            let (mut tags, mut failures) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match request(public).await {
                    Ok(tag) => tags.push(tag),
                    Err(e) => failures.push(e),
                }
            }
            (tags, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (to, tag) in [(&f.v2, "v2"), (&f.v1, "v1")] {
        let started = Instant::now();
        let status = f
            .client
            .set_route("web", &route(f.public, to.addr, tag))
            .await
            .unwrap();
        eprintln!("switch to {tag} answered in {:?}", started.elapsed());
        assert_eq!(status.route.backend, to.addr);
        assert_eq!(status.route.listen, f.public, "the public address stays");
        // The call returned: every new connection goes to the new backend.
        assert_eq!(request(f.public).await.unwrap(), tag);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failed) = (0, Vec::new());
    for loader in loaders {
        let (tags, failures) = loader.await.unwrap();
        sent += tags.len() + failures.len();
        failed.extend(failures);
        // Each f.client saw f.v1, then f.v2, then f.v1 again: never an older backend after a
        // newer one.
        assert_eq!(runs(&tags), ["v1", "v2", "v1"], "responses of one client");
    }
    eprintln!(
        "switch under load: {sent} requests, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(sent > 100, "only {sent} requests were sent");
    let log = f.proxy.log_text();
    assert_eq!(log.matches("route switched").count(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_drains_until_the_drain_timeout_then_is_cut() {
    let f = Fixture::start(&[]).await;
    let mut long = Conn::open(f.public).await;
    assert_eq!(long.ask("a").await.as_deref(), Some("v1 a"));
    let mut short = Conn::open(f.public).await;
    assert_eq!(short.ask("b").await.as_deref(), Some("v1 b"));

    let mut switch = route(f.public, f.v2.addr, "v2");
    switch.drain_timeout_ms = Some(3000);
    let status = f.client.set_route("web", &switch).await.unwrap();
    assert_eq!(status.open_connections, 0);
    assert_eq!(status.draining.len(), 1, "{status:?}");
    let drain = status.drain_of(f.v1.addr).expect("v1 drains");
    assert_eq!(drain.version.as_deref(), Some("v1"));
    assert_eq!(drain.open_connections, 2);
    assert!(
        drain.seconds_left > 2.0 && drain.seconds_left <= 3.0,
        "{drain:?}"
    );

    // New connections go to f.v2; the open ones are still served by f.v1.
    assert_eq!(request(f.public).await.unwrap(), "v2");
    assert_eq!(long.ask("c").await.as_deref(), Some("v1 c"));
    drop(short);
    let status = route_until(&f.client, "web", Duration::from_secs(2), |s| {
        s.draining.first().is_some_and(|d| d.open_connections == 1)
    })
    .await;
    eprintln!("during the drain: {:?}", status.draining);

    // The drain timeout ends: the last connection to f.v1 is cut, the drain is over.
    let cut = tokio::time::timeout(Duration::from_secs(6), long.lines.next_line())
        .await
        .expect("the connection is closed by the drain timeout");
    assert!(matches!(cut, Ok(None) | Err(_)), "{cut:?}");
    let status = route_until(&f.client, "web", Duration::from_secs(2), |s| {
        s.drain_of(f.v1.addr).is_none()
    })
    .await;
    assert_eq!(status.route.backend, f.v2.addr);
    let metrics = f.proxy.metrics_text().await;
    assert!(
        metrics.contains(r#"stevedore_proxy_connections_cut_total{app="web"} 1"#),
        "{metrics}"
    );
    assert!(f.proxy.log_text().contains("drain timeout ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_when_the_last_connection_closes() {
    let f = Fixture::start(&["--drain-timeout", "60s"]).await;
    let mut open = Conn::open(f.public).await;
    assert_eq!(open.ask("a").await.as_deref(), Some("v1 a"));
    let status = f
        .client
        .set_route("web", &route(f.public, f.v2.addr, "v2"))
        .await
        .unwrap();
    assert!(status.draining[0].seconds_left > 59.0, "{status:?}");
    let started = Instant::now();
    drop(open);
    route_until(&f.client, "web", Duration::from_secs(5), |s| {
        s.draining.is_empty()
    })
    .await;
    eprintln!("drain over {:?} after the last close", started.elapsed());
    assert!(f.proxy.log_text().contains("drained"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_back_to_a_draining_backend_keeps_its_connections() {
    let f = Fixture::start(&[]).await;
    let mut open = Conn::open(f.public).await;
    assert_eq!(open.ask("a").await.as_deref(), Some("v1 a"));
    let mut to_v2 = route(f.public, f.v2.addr, "v2");
    to_v2.drain_timeout_ms = Some(500);
    f.client.set_route("web", &to_v2).await.unwrap();
    let status = f
        .client
        .set_route("web", &route(f.public, f.v1.addr, "v1"))
        .await
        .unwrap();
    // f.v1 is current again, with its connection; f.v2 (nothing open) drains.
    assert_eq!(status.open_connections, 1, "{status:?}");
    assert!(status.draining.iter().all(|d| d.backend == f.v2.addr));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(open.ask("b").await.as_deref(), Some("v1 b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_restores_its_routes_while_the_old_one_drains() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = ProxyProcess::spawn(dir.path(), &["--drain-timeout", "10s"]);
    let v1 = backend("v1").await;
    let public = first
        .client()
        .set_route("web", &route(ephemeral(), v1.addr, "v1"))
        .await
        .unwrap()
        .route
        .listen;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&first.state_file).unwrap()).unwrap();
    assert_eq!(
        state["routes"]["web"]["listen"].as_str(),
        Some(public.to_string().as_str()),
        "{state}"
    );
    let mut open = Conn::open(public).await;
    assert_eq!(open.ask("a").await.as_deref(), Some("v1 a"));

    // SIGTERM: the old proxy frees its socket and public ports at once and keeps the
    // open connection served while a new proxy (configured by environment) takes over.
    first.sigterm();
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.socket.exists() {
        assert!(Instant::now() < deadline, "admin socket not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let socket = first.socket.display().to_string();
    let state_file = first.state_file.display().to_string();
    let second = ProxyProcess::spawn_with_env(
        dir.path(),
        &[],
        &[
            ("STEVEDORE_PROXY_ADMIN_SOCKET", &socket),
            ("STEVEDORE_PROXY_STATE_FILE", &state_file),
            ("STEVEDORE_PROXY_METRICS_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(request(public).await.unwrap(), "v1");
    let routes = second.client().routes().await.unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].app, "web");
    assert_eq!(routes[0].route.listen, public);
    assert_eq!(routes[0].route.version.as_deref(), Some("v1"));
    assert!(second.log_text().contains("route restored"));

    assert_eq!(open.ask("b").await.as_deref(), Some("v1 b"));
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "old proxy drains"
    );
    drop(open);
    let exit = first.wait_exit(Duration::from_secs(5));
    assert!(exit.success(), "{exit:?}");
}

/// Clients sending one request per new connection, in a loop, to each of `addrs` in
/// turn, until [`Loaders::finish`].
struct Loaders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl Loaders {
    fn start(clients: usize, addrs: &[SocketAddr]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, addrs) = (stop.clone(), addrs.to_vec());
                tokio::spawn(async move {
                    let (mut sent, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        for addr in &addrs {
                            sent += 1;
                            if let Err(e) = request(*addr).await {
                                failures.push(format!("{addr}: {e}"));
                            }
                        }
                    }
                    (sent, failures)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Requests sent, and the failures.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut sent, mut failed) = (0, Vec::new());
        for task in self.tasks {
            let (n, failures) = task.await.unwrap();
            sent += n;
            failed.extend(failures);
        }
        (sent, failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_restart_fails_no_request_and_the_old_proxy_finishes_its_connections() {
    let Fixture {
        _dir: dir,
        proxy: mut first,
        client,
        v1,
        v2,
        public,
    } = Fixture::start(&["--drain-timeout", "30s"]).await;
    // A second app, so more than one public listener is handed over.
    let api = client
        .set_route("api", &route(ephemeral(), v2.addr, "v2"))
        .await
        .unwrap()
        .route
        .listen;
    let mut open = Conn::open(public).await;
    assert_eq!(open.ask("a").await.as_deref(), Some("v1 a"));

    let load = Loaders::start(4, &[public, api]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = ProxyProcess::take_over(dir.path());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed) = load.finish().await;
    eprintln!(
        "takeover restart under load: {sent} requests, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(sent > 100, "only {sent} requests were sent");

    let old_log = first.log_text();
    assert!(old_log.contains("hand-over requested"), "{old_log}");
    assert!(old_log.contains("handed over"), "{old_log}");
    let new_log = second.log_text();
    assert!(new_log.contains("took over"), "{new_log}");
    let routes = second.client().routes().await.unwrap();
    let listens: Vec<_> = routes
        .iter()
        .map(|r| (r.app.as_str(), r.route.listen))
        .collect();
    assert_eq!(listens, [("api", api), ("web", public)]);
    assert!(routes.iter().all(|r| r.listening), "{routes:?}");
    assert_eq!(
        second.metrics, first.metrics,
        "the metrics listener was handed over"
    );
    assert!(second.socket.exists() && second.handover_socket().exists());

    // The connection opened before the hand-over stays with the old process, which
    // waits for it.
    assert_eq!(open.ask("b").await.as_deref(), Some("v1 b"));
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "old proxy drains"
    );

    // The admin socket is the new proxy's: a call from a client that talked to the
    // old one (its kept-alive connection closed, or a 503) reaches the new one.
    client
        .set_route("web", &route(public, v2.addr, "v2"))
        .await
        .unwrap();
    assert_eq!(request(public).await.unwrap(), "v2");
    let state = std::fs::read_to_string(&second.state_file).unwrap();
    assert!(state.contains(&v2.addr.to_string()), "{state}");
    assert!(
        second
            .metrics_text()
            .await
            .contains(r#"stevedore_proxy_switches_total{app="web"} 1"#)
    );
    assert_eq!(open.ask("c").await.as_deref(), Some("v1 c"));
    drop(open);
    let exit = first.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "{exit:?}");
    assert!(first.log_text().contains("proxy stopped"));
    // Exiting, the old proxy left the socket files to the new one.
    assert!(second.socket.exists() && second.handover_socket().exists());
    assert_eq!(request(public).await.unwrap(), "v2");

    // The new proxy can be taken over in turn.
    let third = ProxyProcess::take_over(dir.path());
    assert_eq!(request(api).await.unwrap(), "v2");
    assert_eq!(third.client().routes().await.unwrap().len(), 2);
    drop(v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_no_proxy_running_starts_as_usual() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::take_over(dir.path());
    let log = proxy.log_text();
    assert!(
        log.contains("no proxy answers on the hand-over socket: starting without a hand-over"),
        "{log}"
    );
    let v1 = backend("v1").await;
    let status = proxy
        .client()
        .set_route("web", &route(ephemeral(), v1.addr, "v1"))
        .await
        .unwrap();
    assert_eq!(request(status.route.listen).await.unwrap(), "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_takeover_leaves_the_running_proxy_serving() {
    let f = Fixture::start(&[]).await;
    let dir = f._dir.path();
    let socket = f.proxy.socket.display().to_string();

    // Without --takeover, a second proxy on the same socket is refused and says how.
    let (status, log) = ProxyProcess::run_to_exit(
        dir,
        &["--admin-socket", &socket, "--metrics-listen", "127.0.0.1:0"],
        &[],
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(log.contains("another proxy answers on"), "{log}");
    assert!(log.contains("--takeover"), "{log}");

    // A take-over that cannot write its state file (a directory there) gives up
    // before the old proxy stops accepting.
    let not_a_file = dir.join("not-a-file");
    std::fs::create_dir(&not_a_file).unwrap();
    let state = not_a_file.display().to_string();
    let (status, log) = ProxyProcess::run_to_exit(
        dir,
        &[
            "--takeover",
            "--admin-socket",
            &socket,
            "--state-file",
            &state,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(log.contains("cannot write the state file"), "{log}");
    assert!(log.contains("the running proxy keeps serving"), "{log}");
    let old_log = f.proxy.log_text();
    assert!(old_log.contains("hand-over failed"), "{old_log}");
    assert!(old_log.contains("gave up"), "{old_log}");

    // The old proxy serves, and its routes can change (it is not held still).
    assert_eq!(request(f.public).await.unwrap(), "v1");
    f.client
        .set_route("web", &route(f.public, f.v2.addr, "v2"))
        .await
        .unwrap();
    assert_eq!(request(f.public).await.unwrap(), "v2");
    assert!(f.proxy.socket.exists());

    // A later take-over succeeds, with the routes as they are now.
    let second = ProxyProcess::take_over(dir);
    let route = second.client().get_route("web").await.unwrap().unwrap();
    assert_eq!(route.route.backend, f.v2.addr);
    assert_eq!(request(f.public).await.unwrap(), "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_routes_say_why_and_change_nothing() {
    let Fixture {
        _dir,
        proxy,
        client,
        v1,
        public,
        ..
    } = Fixture::start(&[]).await;

    let refused = |r: Result<RouteStatus, ClientError>| match r {
        Err(ClientError::Refused { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (status, message) = refused(
        client
            .set_route(
                "api",
                &route("127.0.0.1:80".parse().unwrap(), v1.addr, "v1"),
            )
            .await,
    );
    assert_eq!(status, 403);
    assert!(message.contains("port 80"), "{message}");
    assert!(message.contains("--allow-privileged-ports"), "{message}");

    let (status, message) = refused(client.set_route("api", &route(public, v1.addr, "v1")).await);
    assert_eq!(status, 409);
    assert!(message.contains("app \"web\""), "{message}");

    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (status, message) = refused(
        client
            .set_route("api", &route(taken.local_addr().unwrap(), v1.addr, "v1"))
            .await,
    );
    assert_eq!(status, 409);
    assert!(message.contains("cannot bind"), "{message}");

    // The client checks the app name before calling; the proxy checks it too, and the
    // body, answering 400 with a JSON error.
    let bad = client
        .set_route("Bad_Name", &route(ephemeral(), v1.addr, "v1"))
        .await;
    assert!(matches!(bad, Err(ClientError::InvalidApp(_))), "{bad:?}");
    let answer = raw_admin_call(
        &proxy.socket,
        "PUT",
        "/routes/Bad_Name",
        r#"{"listen":"127.0.0.1:0","backend":"127.0.0.1:1"}"#,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#"{"error":"app: "#), "{answer}");
    let answer = raw_admin_call(&proxy.socket, "PUT", "/routes/api", "{not json").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#"{"error":"body: "#), "{answer}");

    // Nothing changed: one route, still served; the state file says the same.
    let routes = client.routes().await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(request(public).await.unwrap(), "v1");
    assert!(client.get_route("api").await.unwrap().is_none());
    assert!(client.remove_route("api").await.unwrap().is_none());

    // Removing the route unbinds the public port.
    let removed = client.remove_route("web").await.unwrap().unwrap();
    assert_eq!(removed.route.listen, public);
    assert!(TcpStream::connect(public).await.is_err());
    assert!(client.routes().await.unwrap().is_empty());
    let state = std::fs::read_to_string(&proxy.state_file).unwrap();
    assert!(!state.contains("web"), "{state}");

    // The admin socket is for its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&proxy.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// One HTTP/1.1 call on the admin socket, without the client: the raw answer.
async fn raw_admin_call(socket: &Path, method: &str, path: &str, body: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_bytes_and_switches() {
    let f = Fixture::start(&[]).await;
    for _ in 0..3 {
        request(f.public).await.unwrap();
    }
    let mut open = Conn::open(f.public).await;
    open.ask("x").await.unwrap();
    f.client
        .set_route("web", &route(f.public, f.v2.addr, "v2"))
        .await
        .unwrap();
    let text = f.proxy.metrics_text().await;
    for line in [
        r#"stevedore_proxy_connections_total{app="web"} 4"#,
        r#"stevedore_proxy_connections_open{app="web"} 1"#,
        // 3 × "ping\n" + "x\n"; 3 × "v1 ping\n" + "v1 x\n".
        r#"stevedore_proxy_bytes_total{app="web",direction="in"} 17"#,
        r#"stevedore_proxy_bytes_total{app="web",direction="out"} 29"#,
        r#"stevedore_proxy_switches_total{app="web"} 1"#,
        "stevedore_proxy_routes 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(f.proxy.log_text().contains("route switched"));
}

/// Removes the test's containers when dropped.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(self.0.iter().map(String::as_str));
            let _ = std::process::Command::new("docker").args(&args).output();
        }
    }
}

/// HTTP GET on a fresh connection (no pooling: a pooled connection would stay on its
/// backend after a switch).
async fn http_get_once(addr: SocketAddr) -> Result<String, String> {
    let mut stream = connect_and_send(addr, b"GET / HTTP/1.0\r\nHost: app\r\n\r\n").await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response {response:?}"));
    }
    Ok(response.rsplit("\r\n\r\n").next().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_http_to_real_containers_through_a_switch() {
    common::require_docker();
    let app = common::unique_app("proxy");
    let mut containers = Containers(Vec::new());
    let mut backends = Vec::new();
    for image in ["stevedore-test/web:1", "stevedore-test/web:2"] {
        let id = common::docker(&[
            "run",
            "-d",
            "--label",
            &format!("io.stevedore.app={app}"),
            "-p",
            "127.0.0.1::8080",
            image,
        ]);
        containers.0.push(id.clone());
        let port = common::docker(&["port", &id, "8080/tcp"]);
        let addr: SocketAddr = port.lines().next().unwrap().parse().unwrap();
        backends.push(addr);
    }
    for addr in &backends {
        common::http_get_eventually(&format!("http://{addr}/")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::spawn(dir.path(), &[]);
    let client = proxy.client();
    let public = client
        .set_route(&app, &route(ephemeral(), backends[0], "web:1"))
        .await
        .unwrap()
        .route
        .listen;
    assert_eq!(http_get_once(public).await.unwrap(), "v1\n");

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut bodies, mut failures) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match http_get_once(public).await {
                    Ok(body) => bodies.push(body.trim().to_owned()),
                    Err(e) => failures.push(e),
                }
            }
            (bodies, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .set_route(&app, &route(public, backends[1], "web:2"))
        .await
        .unwrap();
    assert_eq!(http_get_once(public).await.unwrap(), "v2\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (bodies, failures) = load.await.unwrap();
    eprintln!(
        "containers: {} requests, {} failed",
        bodies.len() + failures.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(runs(&bodies), ["v1", "v2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_routes_that_cannot_be_served_say_why_and_can_be_set_again() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = backend("v1").await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_addr = taken.local_addr().unwrap();
    std::fs::write(
        dir.path().join("routes.json"),
        serde_json::json!({"routes": {
            "low": {"listen": "127.0.0.1:81", "backend": v1.addr},
            "busy": {"listen": taken_addr, "backend": v1.addr},
        }})
        .to_string(),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(dir.path(), &[]);
    let client = proxy.client();
    let low = client.get_route("low").await.unwrap().unwrap();
    assert!(!low.listening);
    assert!(
        low.listen_error.as_deref().unwrap().contains("port 81"),
        "{low:?}"
    );
    let busy = client.get_route("busy").await.unwrap().unwrap();
    assert!(!busy.listening);
    assert!(
        busy.listen_error
            .as_deref()
            .unwrap()
            .contains("cannot bind"),
        "{busy:?}"
    );

    // The port frees up: the proxy binds it within about a second.
    drop(taken);
    route_until(&client, "busy", Duration::from_secs(5), |s| s.listening).await;
    assert_eq!(request(taken_addr).await.unwrap(), "v1");

    // A refused route set again on an allowed port is served.
    let status = client
        .set_route("low", &route(ephemeral(), v1.addr, "v1"))
        .await
        .unwrap();
    assert!(status.listening, "{status:?}");
    assert_ne!(status.route.listen.port(), 81, "{status:?}");
    assert_eq!(request(status.route.listen).await.unwrap(), "v1");
}
