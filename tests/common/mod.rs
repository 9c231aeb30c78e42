//! Helpers for integration tests: a real server (in-process or the binary), a real
//! Docker engine, test images, and cleanup of what a test started.
//!
//! Tests that need Docker call [`require_docker`] first: under `scripts/test.sh` a
//! missing engine is a failure, never a skip.
#![allow(dead_code)]

pub mod git;
pub mod proxy;
pub mod swarm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use stevedore::events::ObserverRegistry;
use stevedore::proto::deployer_client::DeployerClient;
use stevedore::proto::{
    self, DeployRequest, DeploymentStatus, GetStatusRequest, PortMapping, ProgressUpdate,
    WatchRequest,
};
use stevedore::server::{Listening, RunningServer, ServeConfig};
use tonic::Streaming;
use tonic::transport::Channel;

pub type Client = DeployerClient<Channel>;

/// Panics (fails the test) when no Docker engine answers.
pub fn require_docker() {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "no Docker engine answers: run the tests with `bash scripts/test.sh`, which starts one"
    );
}

/// The local registry test images are pushed to.
pub fn registry() -> String {
    std::env::var("STEVEDORE_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

/// The local registry with htpasswd auth (scripts/test-env.sh starts it).
pub fn auth_registry() -> String {
    std::env::var("STEVEDORE_TEST_AUTH_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5001".into())
}

/// The test-only credentials of [`auth_registry`] (the same as in scripts/test-env.sh).
pub const AUTH_USER: &str = "sdtest-user-7f3a9c";
pub const AUTH_PASSWORD: &str = "sdtest-pass-2b8e41d9";

/// An image only [`auth_registry`] holds; removed locally so a deploy of it must pull.
pub fn private_image() -> String {
    let image = format!("{}/stevedore-test/private:1", auth_registry());
    let _ = Command::new("docker").args(["rmi", &image]).output();
    image
}

/// A unique app name with a readable prefix.
pub fn unique_app(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t-{prefix}-{}", &id[..10])
}

/// Runs `docker ARGS` and returns stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// IDs of all containers (running or not) labelled with `app`.
pub fn app_containers(app: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=io.stevedore.app={app}"),
    ]);
    out.lines().map(str::to_owned).collect()
}

/// Removes an app's containers when dropped (tests clean up what they start).
pub struct AppGuard(pub String);

impl Drop for AppGuard {
    fn drop(&mut self) {
        let ids = app_containers(&self.0);
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = Command::new("docker").args(&args).output();
        }
    }
}

/// Builds an image FROM `stevedore-test/web:1` with a layer of `size_mb` random bytes,
/// pushes it to the local registry under a unique name and removes it locally, so a
/// deploy of it must pull. Returns the reference and the registry's layer sizes.
pub fn push_random_image(size_mb: usize) -> (String, Vec<u64>) {
    let name = format!(
        "{}/stevedore-test/pull-{}:1",
        registry(),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; size_mb * 1024 * 1024];
    // Random bytes do not compress: the layer's size is what a pull downloads.
    let mut x: u64 = rand_seed();
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(dir.path().join("blob"), &data).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM stevedore-test/web:1\nCOPY blob /blob\n",
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &name, dir.path().to_str().unwrap()])
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["push", "-q", &name]);
    docker(&["rmi", &name]);
    let sizes = manifest_layer_sizes(&name);
    (name, sizes)
}

/// A TCP proxy in front of the local registry that forwards its answers at about
/// `bytes_per_sec`, so a pull of a few MB takes seconds. Docker treats any
/// 127.0.0.0/8 registry as insecure (plain HTTP), so `127.0.0.1:PORT/...` pulls work.
pub async fn throttled_registry(bytes_per_sec: usize) -> std::net::SocketAddr {
    registry_relay(bytes_per_sec, usize::MAX).await
}

/// A proxy in front of the local registry that passes on the first `budget` bytes
/// towards the client (over all connections, at 4 MiB/s), then stops forwarding while
/// keeping every connection open: a registry that stalls in the middle of a blob.
pub async fn stalling_registry(budget: usize) -> std::net::SocketAddr {
    registry_relay(4 * 1024 * 1024, budget).await
}

/// Forwards to the local registry, answers paced at about `bytes_per_sec`, and holds
/// every connection silent once `budget` bytes (over all connections) went out.
async fn registry_relay(bytes_per_sec: usize, budget: usize) -> std::net::SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = registry();
    let left = Arc::new(AtomicUsize::new(budget));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let left = left.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream.as_str()).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let chunk = bytes_per_sec / 20;
                let mut buf = vec![0u8; chunk];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let take = left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                            Some(l.saturating_sub(n))
                        })
                        .unwrap()
                        .min(n);
                    if cw.write_all(&buf[..take]).await.is_err() {
                        break;
                    }
                    if take < n {
                        // Stalled: hold the connection open, send nothing more.
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let _ = cw.shutdown().await;
            });
        }
    });
    addr
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4().as_u128();
    (u as u64) | 1
}

/// Layer sizes of `reference` as the local registry's manifest lists them.
pub fn manifest_layer_sizes(reference: &str) -> Vec<u64> {
    let rest = reference.split_once('/').unwrap().1;
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    let out = Command::new("curl")
        .args([
            "-sf",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            &format!("http://{}/v2/{repo}/manifests/{tag}", registry()),
        ])
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "manifest of {reference} not found");
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect()
}

/// An in-process server on ephemeral ports with its own data dir.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
}

pub fn serve_config(data_dir: &std::path::Path) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        // Generous: other test runs share the engine and its two cores; no test measures
        // the Docker call bound with this setting.
        docker_timeout: Duration::from_secs(120),
        ..ServeConfig::defaults()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}, ObserverRegistry::new()).await
    }

    /// Starts with a config adjusted by `tweak` and the given observers.
    pub async fn start_with(
        tweak: impl FnOnce(&mut ServeConfig),
        observers: ObserverRegistry,
    ) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = serve_config(data_dir.path());
        tweak(&mut config);
        let server = stevedore::server::start(config, observers)
            .await
            .expect("server starts");
        Self {
            grpc_addr: server.grpc_addr,
            http_addr: server.http_addr,
            server: Some(server),
            data_dir,
        }
    }

    pub async fn client(&self) -> Client {
        connect(self.grpc_addr).await
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.expect("clean shutdown");
        }
    }
}

/// What most Docker tests start with: an engine that answers, a unique app name whose
/// containers are removed on drop, an in-process server and a client of it.
/// `t.stop().await` asserts a clean shutdown; dropping without it still cleans up.
pub struct Fixture {
    pub app: String,
    pub client: Client,
    pub server: TestServer,
    _guard: AppGuard,
}

impl Fixture {
    /// Starts with the default config; `prefix` starts the app's name.
    pub async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, |_| {}, ObserverRegistry::new()).await
    }

    /// Starts with a config adjusted by `tweak` and the given observers.
    pub async fn start_with(
        prefix: &str,
        tweak: impl FnOnce(&mut ServeConfig),
        observers: ObserverRegistry,
    ) -> Self {
        require_docker();
        let app = unique_app(prefix);
        let guard = AppGuard(app.clone());
        let server = TestServer::start_with(tweak, observers).await;
        let client = server.client().await;
        Self {
            app,
            client,
            server,
            _guard: guard,
        }
    }

    /// Stops the server, asserting a clean shutdown; the app's containers go on drop.
    pub async fn stop(self) {
        let Self { server, _guard, .. } = self;
        server.stop().await;
    }
}

pub async fn connect(addr: SocketAddr) -> Client {
    DeployerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to server")
}

/// A request for `image` as `app`, publishing container port 8080 on any host port.
pub fn web_request(app: &str, image: &str) -> DeployRequest {
    DeployRequest {
        app: app.into(),
        image: image.into(),
        ports: vec![PortMapping {
            container_port: 8080,
            host_port: 0,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }],
        deadline: Some(pbjson_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// How long a test waits for a stream to end. Test requests carry a 120 s deadline;
/// the rest is room for rollback on a loaded two-core machine.
pub const STREAM_LIMIT: Duration = Duration::from_secs(300);

/// How long a test waits for a state to be reached (a status, an answer, a file).
pub const STATE_LIMIT: Duration = Duration::from_secs(60);

/// A stream of updates read under a time limit, checking as each update arrives that it
/// belongs to the same deployment and follows the previous one without a gap, so a broken
/// invariant fails at once with a message naming it, and a stream that never ends fails
/// after [`STREAM_LIMIT`] instead of hanging the suite. Heartbeats are skipped.
pub struct Updates {
    stream: Streaming<ProgressUpdate>,
    deployment_id: Option<String>,
    last_sequence: u64,
    last_phase: proto::Phase,
    deadline: tokio::time::Instant,
}

impl Updates {
    /// A stream whose first update must have sequence `after + 1` (0 for Deploy).
    pub fn new(stream: Streaming<ProgressUpdate>, after: u64) -> Self {
        Self::with_limit(stream, after, STREAM_LIMIT)
    }

    pub fn with_limit(stream: Streaming<ProgressUpdate>, after: u64, limit: Duration) -> Self {
        Self {
            stream,
            deployment_id: None,
            last_sequence: after,
            last_phase: proto::Phase::Unspecified,
            deadline: tokio::time::Instant::now() + limit,
        }
    }

    fn describe(&self) -> String {
        format!(
            "deployment {} (last seq {}, phase {:?})",
            self.deployment_id.as_deref().unwrap_or("?"),
            self.last_sequence,
            self.last_phase
        )
    }

    /// The next update (heartbeats skipped), `None` at the end, or the closing status.
    pub async fn next(&mut self) -> Result<Option<ProgressUpdate>, tonic::Status> {
        loop {
            let started = tokio::time::Instant::now();
            let next = tokio::time::timeout_at(self.deadline, self.stream.message()).await;
            let Ok(next) = next else {
                panic!(
                    "timed out after {:?} waiting for the next update of {}",
                    started.elapsed(),
                    self.describe()
                );
            };
            let Some(u) = next? else { return Ok(None) };
            if u.heartbeat {
                continue;
            }
            let id = self
                .deployment_id
                .get_or_insert_with(|| u.deployment_id.clone());
            assert_eq!(&u.deployment_id, id, "an update of another deployment");
            assert_eq!(
                u.sequence,
                self.last_sequence + 1,
                "sequence gap: expected {}, got {} in {}",
                self.last_sequence + 1,
                u.sequence,
                self.describe()
            );
            self.last_sequence = u.sequence;
            self.last_phase = u.phase();
            return Ok(Some(u));
        }
    }

    /// The next update; panics if the stream ends or fails first.
    pub async fn next_update(&mut self) -> ProgressUpdate {
        let what = self.describe();
        self.next()
            .await
            .unwrap_or_else(|s| panic!("stream of {what} failed: {s:?}"))
            .unwrap_or_else(|| panic!("stream of {what} ended before the awaited update"))
    }

    /// Reads until `until` holds for an update; returns the updates read.
    pub async fn until(&mut self, until: impl Fn(&ProgressUpdate) -> bool) -> Vec<ProgressUpdate> {
        let mut seen = Vec::new();
        loop {
            let u = self.next_update().await;
            let done = until(&u);
            seen.push(u);
            if done {
                return seen;
            }
        }
    }

    /// Reads to the end: the updates and the closing status when it ended with an error.
    pub async fn drain(&mut self) -> (Vec<ProgressUpdate>, Option<tonic::Status>) {
        let mut updates = Vec::new();
        loop {
            match self.next().await {
                Ok(Some(u)) => updates.push(u),
                Ok(None) => return (updates, None),
                Err(s) => return (updates, Some(s)),
            }
        }
    }

    /// Reads to the end; panics if the stream ends with an error.
    pub async fn rest(&mut self) -> Vec<ProgressUpdate> {
        let (updates, end) = self.drain().await;
        if let Some(s) = end {
            panic!("stream of {} ended with {s:?}", self.describe());
        }
        updates
    }
}

/// Starts a deploy and returns its update stream.
pub async fn deploy_stream(client: &mut Client, req: DeployRequest) -> Updates {
    let stream = client
        .deploy(req)
        .await
        .expect("deploy accepted")
        .into_inner();
    Updates::new(stream, 0)
}

/// Deploys and collects every update until the stream ends (heartbeats skipped).
pub async fn deploy(client: &mut Client, req: DeployRequest) -> Vec<ProgressUpdate> {
    deploy_stream(client, req).await.rest().await
}

/// Opens a watch of deployment `id` after `after`.
pub async fn watch_stream(
    client: &mut Client,
    id: &str,
    after: u64,
) -> Result<Updates, tonic::Status> {
    let stream = client
        .watch_deployment(WatchRequest {
            deployment_id: id.into(),
            after_sequence: after,
        })
        .await?
        .into_inner();
    Ok(Updates::new(stream, after))
}

/// Watches deployment `id` after `after` to the end of its log.
pub async fn watch(
    client: &mut Client,
    id: &str,
    after: u64,
) -> Result<Vec<ProgressUpdate>, tonic::Status> {
    match watch_stream(client, id, after).await?.drain().await {
        (updates, None) => Ok(updates),
        (_, Some(status)) => Err(status),
    }
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    eventually_async(limit, what, || std::future::ready(f())).await
}

/// Polls the future `f` makes every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GetStatus of deployment `id`.
pub async fn status(client: &mut Client, id: &str) -> Result<DeploymentStatus, tonic::Status> {
    client
        .get_status(GetStatusRequest {
            deployment_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// GetStatus of deployment `id`, which must answer.
pub async fn get_status(client: &mut Client, id: &str) -> DeploymentStatus {
    status(client, id).await.expect("GetStatus answers")
}

/// Polls GetStatus until deployment `id` has ended.
pub async fn wait_finished(client: &mut Client, id: &str) -> DeploymentStatus {
    eventually_async(STREAM_LIMIT, &format!("deployment {id} to end"), || {
        let mut client = client.clone();
        async move {
            let s = get_status(&mut client, id).await;
            use proto::DeploymentState::*;
            matches!(s.state(), Succeeded | Failed | Cancelled).then_some(s)
        }
    })
    .await
}

/// A protobuf duration of `s` seconds.
pub fn secs(s: i64) -> Option<pbjson_types::Duration> {
    Some(pbjson_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// The endpoint of container port 8080 in a terminal update.
pub fn endpoint(end: &ProgressUpdate) -> String {
    end.result.as_ref().unwrap().endpoints["8080/tcp"].clone()
}

/// The endpoint of a deployment that must have succeeded.
pub fn succeeded_url(updates: &[ProgressUpdate]) -> String {
    let end = terminal(updates);
    assert_eq!(
        end.phase(),
        proto::Phase::Complete,
        "deployment failed: {}",
        end.message
    );
    endpoint(end)
}

/// Containers (any state) labelled with deployment `id`.
pub fn deployment_containers(id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=io.stevedore.deployment={id}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The terminal update (asserting there is exactly one, and it is last).
pub fn terminal(updates: &[ProgressUpdate]) -> &ProgressUpdate {
    let with_result: Vec<_> = updates.iter().filter(|u| u.result.is_some()).collect();
    assert_eq!(with_result.len(), 1, "exactly one terminal update");
    let last = updates.last().unwrap();
    assert!(last.result.is_some(), "the terminal update is last");
    last
}

/// Asserts the stream invariants: one deployment, sequences 1..n with no gap,
/// total_progress never decreasing, exactly one terminal update.
pub fn assert_well_formed(updates: &[ProgressUpdate]) {
    assert!(!updates.is_empty());
    let id = &updates[0].deployment_id;
    let mut last_total = 0.0;
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(&u.deployment_id, id);
        assert_eq!(u.sequence, i as u64 + 1, "sequence gap at {i}: {u:?}");
        assert!(
            u.total_progress >= last_total,
            "total_progress went back at {}: {} < {last_total}",
            u.sequence,
            u.total_progress
        );
        assert!((0.0..=1.0).contains(&u.phase_progress));
        last_total = u.total_progress;
    }
    terminal(updates);
}

/// Phases in the order the stream entered them (consecutive duplicates removed).
pub fn phases(updates: &[ProgressUpdate]) -> Vec<proto::Phase> {
    let mut out: Vec<proto::Phase> = Vec::new();
    for u in updates {
        let p = u.phase();
        if out.last() != Some(&p) {
            out.push(p);
        }
    }
    out
}

/// GET `url` and return (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// GET `url` until something answers (a container just started may not listen yet),
/// for up to [`STATE_LIMIT`]; return (status, body).
pub async fn http_get_eventually(url: &str) -> (u16, String) {
    eventually_async(STATE_LIMIT, &format!("an answer at {url}"), || async {
        let r = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
    })
    .await
}

pub fn metadata(u: &ProgressUpdate) -> BTreeMap<String, String> {
    u.metadata.clone().into_iter().collect()
}

/// The stevedore binary, as cargo built it for the tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_stevedore")
}

/// A `stevedore serve` child process on ephemeral ports; killed on drop.
pub struct BinaryServer {
    pub child: std::process::Child,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub log: std::path::PathBuf,
}

impl BinaryServer {
    /// Starts `stevedore serve` with `args` (plus ephemeral listen addresses) and waits
    /// until it logs its addresses.
    // The child is waited for in `Drop`.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn_with_env(data_dir, args, &[])
    }

    /// Like [`BinaryServer::spawn`], with extra environment variables (e.g.
    /// `RUST_LOG=debug`).
    pub fn spawn_with_env(data_dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = data_dir.join(format!("server-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(binary())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--docker-timeout", "120s"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn stevedore");
        let deadline = std::time::Instant::now() + STATE_LIMIT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(listening) = text.lines().find_map(Listening::parse) {
                return Self {
                    grpc_addr: listening.grpc,
                    http_addr: listening.http,
                    child,
                    log,
                };
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start ({exited:?}); log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGHUP to the server (it re-reads its tokens file).
    pub fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -HUP {}", self.child.id());
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
