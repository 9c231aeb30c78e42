//! Zero downtime across crashes: kill -9 of the server past the point of no return
//! (SWITCHING, CLEANUP) and a restart on the same data dir leave every app with exactly
//! one running version, which serves (issue 11).

mod common;

use common::*;
use stevedore::proto::{self, ProgressUpdate};

const WEB1: &str = "stevedore-test/web:1";
const WEB2: &str = "stevedore-test/web:2";

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

/// The host address of container port 8080 of container `id`.
fn url_of(id: &str) -> String {
    let out = docker(&["port", id, "8080/tcp"]);
    let line = out.lines().next().expect("port 8080 published");
    let port = line.rsplit(':').next().unwrap();
    format!("http://127.0.0.1:{port}/")
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
    let (code, body) = http_get_eventually(&url_of(&id)).await;
    assert_eq!(code, 200, "the running container serves");
    assert_eq!(
        app_containers(app),
        running,
        "no other container of the app is left"
    );
    (id, body.trim().to_owned())
}

/// kill -9 of the server once the stream shows `phase`, `rounds` times, each followed
/// by a restart on the same data dir.
async fn kill_at_phase(phase: proto::Phase, rounds: usize) {
    require_docker();
    let name = phase
        .as_str_name()
        .trim_start_matches("PHASE_")
        .to_lowercase();
    let app = unique_app(&format!("zdt-{name}"));
    let _guard = AppGuard(app.clone());
    let data = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(server.grpc_addr).await;
    let first = deploy(&mut client, sigterm_ignoring(&app, WEB1)).await;
    assert_eq!(terminal(&first).phase(), proto::Phase::Complete);
    let mut serving = WEB1;
    let mut completed = 0;
    for round in 0..rounds {
        let next = if serving == WEB1 { WEB2 } else { WEB1 };
        let mut stream = deploy_stream(&mut client, sigterm_ignoring(&app, next)).await;
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
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        drop(stream);

        server = BinaryServer::spawn(data.path(), &[]);
        client = connect(server.grpc_addr).await;
        let (container, body) = assert_one_serving(&app).await;
        let status = get_status(&mut client, &id).await;
        let result = status.result.clone().unwrap_or_default();
        match status.state() {
            // Past the point of no return the new version is the app's version.
            proto::DeploymentState::Succeeded => {
                assert_eq!(
                    result.container_id, container,
                    "recorded as the app's current version"
                );
                assert_eq!(body, body_of(next), "round {round}: the new version serves");
                if reached == phase {
                    assert!(
                        result.message.contains("completed by recovery"),
                        "round {round}: {}",
                        result.message
                    );
                    completed += 1;
                }
                serving = next;
            }
            // Killed before SWITCHING reached the disk: the previous version was untouched.
            state => {
                assert_eq!(state, proto::DeploymentState::Failed, "{}", status.error);
                assert!(
                    status.error.contains("previous version keeps running"),
                    "{}",
                    status.error
                );
                assert_eq!(
                    body,
                    body_of(serving),
                    "round {round}: the previous version serves"
                );
            }
        }
    }
    eprintln!("{phase:?}: {completed} of {rounds} rounds completed by recovery");
    if phase == proto::Phase::Switching {
        assert!(completed > 0, "no round was completed by recovery");
    }
    // The recorded version is the one the next deployment replaces.
    let next = if serving == WEB1 { WEB2 } else { WEB1 };
    let end = deploy(&mut client, sigterm_ignoring(&app, next)).await;
    assert_eq!(terminal(&end).phase(), proto::Phase::Complete);
    let (_, body) = assert_one_serving(&app).await;
    assert_eq!(body, body_of(next));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_during_switching_rolls_forward() {
    kill_at_phase(proto::Phase::Switching, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_during_cleanup_rolls_forward() {
    kill_at_phase(proto::Phase::Cleanup, 5).await;
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
