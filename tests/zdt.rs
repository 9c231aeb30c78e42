//! Zero downtime across crashes: kill -9 of the server at every phase a redeploy goes
//! through (QUEUED … HOOKS, SWITCHING, CLEANUP), five times each, with and without
//! `stevedore proxy`, and a restart on the same data dir leave every app with exactly one
//! running version, which serves, through the app's stable address when proxied
//! (issue 11).

mod common;

use std::net::SocketAddr;

use common::proxy::ProxyProcess;
use common::*;
use stevedore::proto::{self, ProgressUpdate};

const WEB1: &str = "stevedore-test/web:1";
const WEB2: &str = "stevedore-test/web:2";

/// Kills per phase.
const ROUNDS: usize = 5;

/// A request for a web test image whose PID 1 is busybox httpd itself, which ignores
/// SIGTERM (the images' own entrypoint traps it): taking it out waits for the stop
/// grace, so SWITCHING lasts a while.
fn sigterm_ignoring(app: &str, image: &str) -> proto::DeployRequest {
    let mut req = web_request(app, image);
    req.command = ["httpd", "-f", "-p", "8080", "-h", "/var/www"]
        .map(String::from)
        .to_vec();
    req
}

/// Running containers labelled with `app`.
fn running_containers(app: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=io.stevedore.app={app}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The host address container port 8080 of container `id` is published on.
fn published(id: &str) -> SocketAddr {
    let out = docker(&["port", id, "8080/tcp"]);
    let line = out.lines().next().expect("port 8080 published");
    line.trim().parse().expect("an address")
}

/// The version a web test image answers with (`v1`, `v2`).
fn body_of(image: &str) -> &'static str {
    if image == WEB1 { "v1" } else { "v2" }
}

/// Asserts the invariant: exactly one running container of `app`, and it serves.
/// Returns its ID and what it answers.
async fn assert_one_serving(app: &str) -> (String, String) {
    let running = eventually(STATE_LIMIT, "exactly one running container", || {
        let r = running_containers(app);
        (r.len() == 1).then_some(r)
    })
    .await;
    let id = running[0].clone();
    let url = format!("http://{}/", published(&id));
    let (code, body) = http_get_eventually(&url).await;
    assert_eq!(code, 200, "the running container serves");
    // A create the engine was still carrying out when the server was killed can finish
    // after recovery listed the app's containers; its deployment is ended by then, so
    // the reconciler removes it (`--reconcile-interval`, 10 s). A container left for
    // good (one of a deployment the store never knew) fails here.
    eventually(STATE_LIMIT, "no other container of the app is left", || {
        (app_containers(app) == running).then_some(())
    })
    .await;
    (id, body.trim().to_owned())
}

/// One app redeployed over and over on one data dir, its server killed (-9) mid-way each
/// time and restarted; with a proxy, the app has a fixed public port served through it.
struct Crashes {
    // Dropped in this order: the processes first, the directory last.
    server: BinaryServer,
    client: Client,
    proxy: Option<(ProxyProcess, SocketAddr)>,
    app: String,
    serving: &'static str,
    _guard: AppGuard,
    data: tempfile::TempDir,
}

impl Crashes {
    async fn start(prefix: &str, proxied: bool) -> Self {
        require_docker();
        let data = tempfile::tempdir().unwrap();
        let app = unique_app(prefix);
        let proxy = proxied.then(|| {
            let dir = data.path().join("proxy");
            std::fs::create_dir_all(&dir).unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            (
                ProxyProcess::spawn(&dir, &[]),
                SocketAddr::from(([127, 0, 0, 1], port)),
            )
        });
        let server = Self::spawn_server(data.path(), proxy.as_ref());
        let mut crashes = Self {
            client: connect(server.grpc_addr).await,
            server,
            proxy,
            _guard: AppGuard(app.clone()),
            app,
            serving: WEB1,
            data,
        };
        let req = crashes.request(WEB1, proto::Phase::Unspecified);
        let first = deploy(&mut crashes.client, req).await;
        assert_eq!(terminal(&first).phase(), proto::Phase::Complete);
        crashes
    }

    fn spawn_server(
        data: &std::path::Path,
        proxy: Option<&(ProxyProcess, SocketAddr)>,
    ) -> BinaryServer {
        match proxy {
            None => BinaryServer::spawn(data, &[]),
            Some((proxy, _)) => {
                let socket = proxy.socket.display().to_string();
                BinaryServer::spawn(data, &["--proxy-socket", &socket])
            }
        }
    }

    /// A redeploy to `image`, made to linger in `phase` where that is cheap: a hook (so
    /// HOOKS is passed), and for SWITCHING an old version whose PID 1 ignores SIGTERM
    /// with a 3 s grace (so the kill lands while it is being stopped).
    fn request(&self, image: &str, phase: proto::Phase) -> proto::DeployRequest {
        let mut req = if matches!(phase, proto::Phase::Switching | proto::Phase::Cleanup) {
            sigterm_ignoring(&self.app, image)
        } else {
            web_request(&self.app, image)
        };
        req.stop_timeout = secs(3);
        req.hooks = vec![proto::Hook {
            name: "ready".into(),
            command: vec!["true".into()],
            ..Default::default()
        }];
        if let Some((_, public)) = &self.proxy {
            req.ports[0].host_port = public.port().into();
        }
        req
    }

    /// One round: a redeploy, kill -9 once the stream shows `phase`, a restart on the
    /// same data dir, then the invariant.
    async fn kill_at(&mut self, phase: proto::Phase, round: usize) -> Outcome {
        let next = if self.serving == WEB1 { WEB2 } else { WEB1 };
        let req = self.request(next, phase);
        let mut stream = deploy_stream(&mut self.client, req).await;
        let seen: Vec<ProgressUpdate> = stream
            .until(|u| u.phase() == phase || u.result.is_some())
            .await;
        let id = seen[0].deployment_id.clone();
        let reached = seen.last().unwrap().phase();
        if reached == proto::Phase::Switching {
            // Well into the switch: the old version is being stopped (its PID 1 ignores
            // SIGTERM, so that takes the stop grace).
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        self.server.child.kill().unwrap(); // SIGKILL
        self.server.child.wait().unwrap();
        drop(stream);

        self.server = Self::spawn_server(self.data.path(), self.proxy.as_ref());
        self.client = connect(self.server.grpc_addr).await;
        let (container, body) = assert_one_serving(&self.app).await;
        let status = match status(&mut self.client, &id).await {
            Ok(s) => s,
            // Killed before its first updates were committed (the store commits in
            // batches; a kill -9 loses the uncommitted tail, docs/DURABILITY.md):
            // nothing of it ran, the previous version serves.
            Err(e) if e.code() == tonic::Code::NotFound => {
                assert_eq!(
                    body,
                    body_of(self.serving),
                    "{phase:?} round {round}: the previous version serves"
                );
                return Outcome::NotRecorded;
            }
            Err(e) => panic!("GetStatus: {e}"),
        };
        let result = status.result.clone().unwrap_or_default();
        let mut completed = false;
        match status.state() {
            // Past the point of no return the new version is the app's version.
            proto::DeploymentState::Succeeded => {
                assert_eq!(
                    result.container_id, container,
                    "recorded as the app's current version"
                );
                assert_eq!(
                    body,
                    body_of(next),
                    "{phase:?} round {round}: the new version serves"
                );
                if reached == phase && result.message.contains("completed by recovery") {
                    completed = true;
                }
                self.serving = next;
            }
            // Killed before SWITCHING reached the disk: the previous version was untouched.
            state => {
                assert_eq!(state, proto::DeploymentState::Failed, "{}", status.error);
                assert!(
                    status.error.contains("previous version keeps running"),
                    "{phase:?} round {round}: {}",
                    status.error
                );
                assert_eq!(
                    body,
                    body_of(self.serving),
                    "{phase:?} round {round}: the previous version serves"
                );
            }
        }
        if let Some((proxy, public)) = &self.proxy {
            // The route follows the version kept (the server reconciles routes at start),
            // and the stable address serves it.
            let backend = published(&container);
            let client = proxy.client();
            eventually_async(
                STATE_LIMIT,
                "the route points at the running version",
                || async {
                    let route = client.get_route(&self.app).await.unwrap()?;
                    (route.route.backend == backend).then_some(())
                },
            )
            .await;
            let (code, through) = http_get_eventually(&format!("http://{public}/")).await;
            assert_eq!(code, 200);
            assert_eq!(
                through.trim(),
                body_of(self.serving),
                "{phase:?} round {round}: the stable address serves the kept version"
            );
        }
        if completed {
            Outcome::CompletedByRecovery
        } else {
            Outcome::Other
        }
    }

    /// The recorded version is the one the next deployment replaces.
    async fn finish(mut self) {
        let next = if self.serving == WEB1 { WEB2 } else { WEB1 };
        let req = self.request(next, proto::Phase::Unspecified);
        let end = deploy(&mut self.client, req).await;
        assert_eq!(terminal(&end).phase(), proto::Phase::Complete);
        let (_, body) = assert_one_serving(&self.app).await;
        assert_eq!(body, body_of(next));
        if let Some((_, public)) = &self.proxy {
            let (_, through) = http_get_eventually(&format!("http://{public}/")).await;
            assert_eq!(through.trim(), body_of(next));
        }
    }
}

/// How a killed deployment ended after the restart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Rolled forward: "completed by recovery".
    CompletedByRecovery,
    /// Not on disk at the kill: GetStatus does not know it.
    NotRecorded,
    /// Failed (rolled back), or succeeded before the kill landed.
    Other,
}

/// kill -9 of the server once the stream shows each of `phases`, [`ROUNDS`] times each,
/// each followed by a restart on the same data dir.
async fn kill_at_phases(phases: &[proto::Phase], proxied: bool) {
    let started = std::time::Instant::now();
    let prefix = if proxied { "zdt-proxied" } else { "zdt" };
    let mut crashes = Crashes::start(prefix, proxied).await;
    for &phase in phases {
        let outcomes = {
            let mut v = Vec::new();
            for round in 0..ROUNDS {
                v.push(crashes.kill_at(phase, round).await);
            }
            v
        };
        let count = |o| outcomes.iter().filter(|x| **x == o).count();
        let completed = count(Outcome::CompletedByRecovery);
        eprintln!(
            "{phase:?} (proxy: {proxied}): of {ROUNDS} rounds {completed} completed by recovery, {} not recorded before the kill",
            count(Outcome::NotRecorded)
        );
        if phase == proto::Phase::Switching {
            assert!(completed > 0, "no round was completed by recovery");
        }
    }
    crashes.finish().await;
    eprintln!(
        "{} kills at {phases:?} (proxy: {proxied}) in {:.0?}",
        phases.len() * ROUNDS,
        started.elapsed()
    );
}

/// The phases before the point of no return.
const BEFORE_THE_SWITCH: [proto::Phase; 7] = [
    proto::Phase::Queued,
    proto::Phase::Validating,
    proto::Phase::Pulling,
    proto::Phase::Creating,
    proto::Phase::Starting,
    proto::Phase::HealthCheck,
    proto::Phase::Hooks,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_before_the_switch_keeps_the_previous_version() {
    kill_at_phases(&BEFORE_THE_SWITCH, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_during_switching_or_cleanup_rolls_forward() {
    kill_at_phases(&[proto::Phase::Switching, proto::Phase::Cleanup], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_before_the_switch_keeps_the_previous_version_and_its_route() {
    kill_at_phases(&BEFORE_THE_SWITCH, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_during_switching_or_cleanup_rolls_forward_and_moves_the_route() {
    kill_at_phases(&[proto::Phase::Switching, proto::Phase::Cleanup], true).await;
}

/// The previous version's PID 1 ignores SIGTERM and the request gives it 1 s: the
/// stream says the signal was sent, waits, and that it was killed after its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_says_the_previous_version_was_killed_after_its_grace() {
    require_docker();
    let fixture = Fixture::start("zdt-grace").await;
    let app = fixture.app.clone();
    let mut client = fixture.client.clone();
    let first = deploy(&mut client, sigterm_ignoring(&app, WEB1)).await;
    assert_eq!(terminal(&first).phase(), proto::Phase::Complete);
    let old = terminal(&first).result.clone().unwrap().container_id;

    let mut req = sigterm_ignoring(&app, WEB2);
    req.stop_timeout = Some(pbjson_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let updates = deploy(&mut client, req).await;
    let url = succeeded_url(&updates);
    let switching: Vec<_> = updates
        .iter()
        .filter(|u| u.phase() == proto::Phase::Switching)
        .collect();
    let sent = switching
        .iter()
        .find(|u| metadata(u).get("stopping_container_id") == Some(&old))
        .expect("the stream says the stop signal was sent");
    assert!(sent.message.contains("sent SIGTERM"), "{}", sent.message);
    assert_eq!(metadata(sent)["stop_timeout_ms"], "1000");
    let killed = switching
        .iter()
        .find(|u| metadata(u).contains_key("stop_outcome"))
        .expect("the stream says how the previous version ended");
    assert_eq!(
        metadata(killed)["stop_outcome"],
        "killed",
        "{}",
        killed.message
    );
    assert!(
        killed
            .message
            .contains("did not stop within its 1s grace: killed"),
        "{}",
        killed.message
    );
    assert!(
        switching
            .iter()
            .any(|u| metadata(u).get("removed_container_id") == Some(&old)),
        "the previous version was removed"
    );
    assert_eq!(http_get(&url).await, (200, "v2\n".into()));
    fixture.stop().await;
}

/// A relay on a unix socket in front of the Docker socket that can stop forwarding
/// (an engine that hangs) and resume.
struct Relay {
    path: std::path::PathBuf,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(dir: &std::path::Path) -> Self {
        let path = dir.join("relay.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = paused.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (er, ew) = engine.into_split();
                    tokio::join!(pump(cr, ew, flag.clone()), pump(er, cw, flag));
                });
            }
        });
        Self {
            path,
            paused,
            _task: task,
        }
    }

    fn pause(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, holding the bytes while the relay is paused.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let held = || paused.load(std::sync::atomic::Ordering::SeqCst);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while held() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while held() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The engine freezes during HEALTH_CHECK: the deployment ends FAILED with its rollback
/// incomplete; once the engine answers again, the reconciler removes its container and
/// the app's current version keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_removes_what_a_frozen_engine_left_behind() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let app = unique_app("zdt-reconcile");
    let _guard = AppGuard(app.clone());
    let socket = format!("unix://{}", relay.path.display());
    let server = TestServer::start_with(
        |c| {
            c.docker_host = Some(socket);
            c.docker_timeout = std::time::Duration::from_secs(3);
            c.reconcile_interval = std::time::Duration::from_secs(2);
        },
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let mut client = server.client().await;
    // Setup: the current version. A Docker call can take longer than 3 s on a loaded
    // two-core machine, so the setup deploy gets three tries.
    let mut current = String::new();
    for _ in 0..3 {
        let first = deploy(&mut client, web_request(&app, WEB1)).await;
        current = terminal(&first).result.clone().unwrap().container_id;
        if !current.is_empty() {
            break;
        }
        eprintln!("setup deploy failed: {}", terminal(&first).message);
    }
    assert!(!current.is_empty(), "the setup deploy succeeded");

    let mut stream = deploy_stream(
        &mut client,
        web_request(&app, "stevedore-test/slowhealth:1"),
    )
    .await;
    let seen = stream
        .until(|u| u.phase() == proto::Phase::HealthCheck)
        .await;
    let id = seen[0].deployment_id.clone();
    relay.pause(true);
    let rest = stream.rest().await;
    let end = rest.last().expect("a terminal update");
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert!(
        end.message.contains("rollback incomplete"),
        "the engine did not answer the rollback: {}",
        end.message
    );
    assert!(!deployment_containers(&id).is_empty(), "left behind");

    relay.pause(false);
    eventually(
        std::time::Duration::from_secs(30),
        "the reconciler to remove it",
        || deployment_containers(&id).is_empty().then_some(()),
    )
    .await;
    assert_eq!(
        running_containers(&app),
        vec![current.clone()],
        "the current version keeps running; log of the new one's removal: {}",
        docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=io.stevedore.app={app}")
        ])
    );
    let metrics = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stevedore_reconciler_removed_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    server.stop().await;
}
