//! Observers against a real server and a real Docker engine: misbehaving observers,
//! `/metrics`, the audit log and `stevedore audit verify`, and webhooks delivered to a
//! receiver started here.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use stevedore::events::{Observer, ObserverError, ObserverRegistry};
use stevedore::model::Update;
use stevedore::observers::webhook::{EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature};
use stevedore::proto::{self, DeployRequest};

const WEB: &str = "stevedore-test/web:1";
const CRASH: &str = "stevedore-test/crash:1";

/// The value of `series` (metric name with its labels, as rendered) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(server: &TestServer) -> String {
    let (status, body) = http_get(&server.http_url("/metrics")).await;
    assert_eq!(status, 200, "{body}");
    body
}

// ---------------------------------------------------------------- misbehaving observers

struct Recorder(Mutex<Vec<Arc<Update>>>);
#[async_trait]
impl Observer for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
        self.0.lock().unwrap().push(u);
        Ok(())
    }
}

struct Sleeper;
#[async_trait]
impl Observer for Sleeper {
    fn name(&self) -> &str {
        "sleeper"
    }
    async fn on_update(&self, _: Arc<Update>) -> Result<(), ObserverError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

struct Failing;
#[async_trait]
impl Observer for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    async fn on_update(&self, _: Arc<Update>) -> Result<(), ObserverError> {
        Err(ObserverError("this observer always fails".into()))
    }
}

struct Panicking;
#[async_trait]
impl Observer for Panicking {
    fn name(&self) -> &str {
        "panicking"
    }
    async fn on_update(&self, _: Arc<Update>) -> Result<(), ObserverError> {
        panic!("this observer always panics");
    }
}

#[tokio::test]
async fn misbehaving_observers_do_not_affect_the_deployment_or_each_other() {
    require_docker();
    let app = unique_app("obs");
    let _guard = AppGuard(app.clone());
    let registry = ObserverRegistry::new();
    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let _subs = [
        registry.subscribe(Arc::new(Sleeper), 2),
        registry.subscribe(Arc::new(Failing), 1024),
        registry.subscribe(Arc::new(Panicking), 1024),
        registry.subscribe(recorder.clone(), 1024),
    ];
    let server = TestServer::start_with(|_| {}, registry.clone()).await;
    let mut client = server.client().await;

    let updates = deploy(&mut client, web_request(&app, WEB)).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Complete, "{end:?}");
    let n = updates.len() as u64;
    assert!(n > 4, "enough updates to overflow the sleeper's queue: {n}");

    // The healthy observer sees every update, in order.
    let id = end.deployment_id.clone();
    let seen = eventually(
        Duration::from_secs(30),
        "the recorder to see the terminal update",
        || {
            let seen: Vec<u64> = recorder
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|u| u.deployment_id.to_string() == id)
                .map(|u| u.sequence)
                .collect();
            (seen.len() as u64 == n).then_some(seen)
        },
    )
    .await;
    assert_eq!(seen, (1..=n).collect::<Vec<_>>());

    // Failures and drops are counted, per observer, and exported.
    let stats = eventually(
        Duration::from_secs(30),
        "the failing observers to get every update",
        || {
            let s = registry.stats();
            (s["failing"].failed == n && s["panicking"].failed == n).then_some(s)
        },
    )
    .await;
    // The sleeper holds one update and queues two: the rest are dropped.
    assert_eq!(stats["sleeper"].dropped, n - 3, "{stats:?}");
    assert_eq!(stats["recorder"].failed + stats["recorder"].dropped, 0);
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            r#"stevedore_observer_updates_dropped_total{observer="sleeper"}"#
        ),
        Some((n - 3) as f64)
    );
    for name in ["failing", "panicking"] {
        assert_eq!(
            sample(
                &text,
                &format!(r#"stevedore_observer_updates_failed_total{{observer="{name}"}}"#)
            ),
            Some(n as f64),
            "{name}"
        );
    }
    server.stop().await;
}

// ---------------------------------------------------------------- metrics

fn crash_request(app: &str) -> DeployRequest {
    DeployRequest {
        app: app.into(),
        image: CRASH.into(),
        deadline: Some(pbjson_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_successful_and_failed_deployments() {
    require_docker();
    let ok_app = unique_app("mok");
    let bad_app = unique_app("mbad");
    let _guards = (AppGuard(ok_app.clone()), AppGuard(bad_app.clone()));
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let before = scrape(&server).await;
    assert_eq!(
        sample(&before, "stevedore_deployments_started_total"),
        Some(0.0)
    );

    // An image only the registry has: the pull downloads exactly its random layer.
    let (image, layers) = push_random_image(1);
    let random_layer = *layers.last().unwrap();
    let ok = deploy(&mut client, web_request(&ok_app, &image)).await;
    assert_eq!(terminal(&ok).phase(), proto::Phase::Complete);
    let bad = deploy(&mut client, crash_request(&bad_app)).await;
    assert_eq!(terminal(&bad).phase(), proto::Phase::Failed);

    let text = eventually(
        Duration::from_secs(30),
        "both deployments in the metrics",
        || {
            let text = futures_block(scrape(&server));
            (sample(
                &text,
                r#"stevedore_deployments_finished_total{outcome="failed"}"#,
            ) == Some(1.0))
            .then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(&text, "stevedore_deployments_started_total"),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"stevedore_deployments_finished_total{outcome="succeeded"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"stevedore_deployments_finished_total{outcome="cancelled"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "stevedore_pull_bytes_total"),
        Some(random_layer as f64),
        "layers: {layers:?}"
    );
    assert_eq!(sample(&text, "stevedore_deployments_running"), Some(0.0));
    assert_eq!(sample(&text, "stevedore_deployments_queued"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            r#"stevedore_deployment_duration_seconds_count{outcome="succeeded"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"stevedore_deployment_duration_seconds_count{outcome="failed"}"#
        ),
        Some(1.0)
    );
    // The crash image exits after 0.5 s: it fails in its health check, or in STARTING
    // when starting and inspecting it took longer than that on a loaded machine.
    let failed_in = |phase: &str| {
        sample(
            &text,
            &format!(
                r#"stevedore_phase_duration_seconds_count{{phase="{phase}",outcome="failed"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    let failed_phase = terminal(&bad)
        .result
        .as_ref()
        .and_then(|r| r.diagnostics.as_ref())
        .expect("the failure carries diagnostics")
        .failed_phase();
    assert!(
        matches!(
            failed_phase,
            proto::Phase::Starting | proto::Phase::HealthCheck
        ),
        "{failed_phase:?}"
    );
    let counted = if failed_phase == proto::Phase::Starting {
        "starting"
    } else {
        "health_check"
    };
    assert_eq!(failed_in(counted), 1.0, "{text}");
    assert_eq!(failed_in("starting") + failed_in("health_check"), 1.0);
    assert_eq!(
        sample(
            &text,
            r#"stevedore_phase_duration_seconds_count{phase="cleanup",outcome="completed"}"#
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            r#"stevedore_health_check_attempts_total{check="docker"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE stevedore_phase_duration_seconds histogram"));
    assert!(text.contains("# HELP stevedore_deployments_started_total"));
    assert_eq!(sample(&text, "stevedore_audit_log_writable"), Some(1.0));
    for id in [&terminal(&ok).deployment_id, &terminal(&bad).deployment_id] {
        assert!(!text.contains(id.as_str()), "no deployment ID in metrics");
    }
    assert!(!text.contains(&ok_app), "no app label without the flag");
    server.stop().await;
}

/// Runs a future to completion from synchronous code inside a multi-thread runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

// ---------------------------------------------------------------- audit

fn verify(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .expect("stevedore runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_chains_verifies_and_shows_tampering() {
    let mut t = Fixture::start("audit").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let secret = format!("hunter2-{}", uuid::Uuid::new_v4().simple());
    // Pulled from the registry, so the digest is resolved.
    let (image, _) = push_random_image(1);
    let mut req = web_request(&app, &image);
    req.env.insert("DATABASE_PASSWORD".into(), secret.clone());
    req.env
        .insert("MODE".into(), "audit-test-mode-value".into());
    let updates = deploy(&mut client, req).await;
    let end = terminal(&updates).clone();
    assert_eq!(end.phase(), proto::Phase::Complete);
    let path = t.server.data_dir.path().join("audit.log");
    let data_dir = t.server.data_dir.path().to_owned();
    // Stopping drains the observers: every record is on disk. (The data dir lives on
    // with `t`.)
    t.server.server.take().unwrap().stop().await.unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&secret), "an env value was written");
    assert!(
        !text.contains("audit-test-mode-value"),
        "an env value was written"
    );
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"accepted"));
    assert_eq!(events.get(1), Some(&"started"));
    assert_eq!(events.last(), Some(&"succeeded"));
    let phases: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "phase_started")
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "pulling",
            "creating",
            "starting",
            "health_check",
            "switching",
            "cleanup"
        ]
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["deployment_id"], end.deployment_id.as_str());
        assert_eq!(r["app"], app.as_str());
        assert_eq!(r["image"], image.as_str());
        assert_eq!(
            r["env_keys"],
            serde_json::json!(["DATABASE_PASSWORD", "MODE"])
        );
        assert!(
            r["requested_by"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
    }
    let last = records.last().unwrap();
    let container = end.result.as_ref().unwrap().container_id.clone();
    assert_eq!(last["container_id"], container.as_str());
    let digest = end.result.as_ref().unwrap().image_digest.clone();
    assert!(digest.contains("sha256:"), "{digest}");
    assert_eq!(last["image_digest"], digest.as_str());
    // Known from the end of the pull on: the records of the later phases carry it.
    let creating = records.iter().find(|r| r["phase"] == "creating").unwrap();
    assert_eq!(creating["image_digest"], digest.as_str());
    assert_eq!(last["outcome"], "succeeded");

    // Intact: verifies, and prints the head hash.
    let (ok, stdout, stderr) = verify(&path);
    assert!(ok, "{stdout}{stderr}");
    let head = last["hash"].as_str().unwrap();
    assert!(stdout.contains(&format!("head: {head}")), "{stdout}");
    assert!(
        stdout.contains(&format!("{} records", records.len())),
        "{stdout}"
    );
    // The default path is DATA_DIR/audit.log.
    let out = Command::new(binary())
        .args(["audit", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(head));

    let good = std::fs::read(&path).unwrap();
    let lines: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
    assert!(lines.len() >= 6);
    let tampered = tempfile::tempdir().unwrap();
    let case = |name: &str, bytes: Vec<u8>, line: usize| {
        let p = tampered.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let (ok, stdout, stderr) = verify(&p);
        assert!(!ok, "{name}: verify passed: {stdout}");
        assert!(
            stderr.contains(&format!("line {line}:")),
            "{name}: expected line {line}: {stderr}"
        );
    };
    // One byte of line 3 changed (inside the app name).
    let mut flipped = good.clone();
    let start3: usize = lines[..2].iter().map(|l| l.len()).sum();
    let at = start3 + find(lines[2], app.as_bytes()) + 3;
    flipped[at] ^= 0x01;
    case("flipped", flipped, 3);
    // Line 2 deleted.
    let mut deleted = lines.clone();
    deleted.remove(1);
    case("deleted", deleted.concat(), 2);
    // Lines 4 and 5 swapped.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    case("swapped", swapped.concat(), 4);
    // A line inserted (line 3 repeated).
    let mut inserted = lines.clone();
    inserted.insert(3, lines[2]);
    case("inserted", inserted.concat(), 4);
    // Truncated in the middle of the last line.
    case("truncated", good[..good.len() - 20].to_vec(), lines.len());
    // Cut at a line boundary: the chain holds, the exported head does not.
    let cut: Vec<u8> = lines[..lines.len() - 1].concat();
    let p = tampered.path().join("cut");
    std::fs::write(&p, cut).unwrap();
    let out = Command::new(binary())
        .args(["audit", "verify", "--expect-head", head])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a cut-off end is caught by --expect-head"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in line")
}

#[tokio::test]
async fn deployments_are_refused_while_the_audit_log_cannot_be_written() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"a file where a directory should be").unwrap();
    let audit = blocker.join("audit.log");
    let server = TestServer::start_with(
        |c| c.audit_log = Some(audit.clone()),
        ObserverRegistry::new(),
    )
    .await;
    let mut client = server.client().await;
    let app = unique_app("noaudit");
    let _guard = AppGuard(app.clone());
    let err = client
        .deploy(web_request(&app, WEB))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit log"), "{}", err.message());
    assert!(app_containers(&app).is_empty(), "nothing was started");
    assert_eq!(
        sample(&scrape(&server).await, "stevedore_audit_log_writable"),
        Some(0.0)
    );

    // Once the log can be written, deployments are accepted again.
    std::fs::remove_file(&blocker).unwrap();
    eventually(
        Duration::from_secs(30),
        "the audit log to be writable",
        || {
            server
                .server
                .as_ref()
                .unwrap()
                .audit_log
                .is_writable()
                .then_some(())
        },
    )
    .await;
    let updates = deploy(&mut client, web_request(&app, WEB)).await;
    assert_eq!(terminal(&updates).phase(), proto::Phase::Complete);
    server.stop().await;
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.lines().count() >= 3);
}

// ---------------------------------------------------------------- webhooks

const SECRET: &str = "webhook-test-secret";

/// Headers (lowercase names) and body of one POST.
type Received = (HashMap<String, String>, Vec<u8>);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let got = self.got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let got = got.clone();
                    async move {
                        let headers = headers
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                            .collect();
                        got.lock().unwrap().push((headers, body.to_vec()));
                        "ok"
                    }
                },
            ),
        );
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        })
    }

    /// Bodies received for `deployment_id`, as JSON.
    fn bodies(&self, deployment_id: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap())
            .filter(|b| b["deployment_id"] == deployment_id)
            .collect()
    }

    async fn wait_for_finished(&self, deployment_id: &str) -> Vec<serde_json::Value> {
        eventually(Duration::from_secs(60), "the finished webhook", || {
            let bodies = self.bodies(deployment_id);
            bodies
                .iter()
                .any(|b| b["event"] == "finished")
                .then_some(bodies)
        })
        .await
    }
}

fn with_webhook(url: String) -> impl FnOnce(&mut stevedore::server::ServeConfig) {
    move |c| {
        c.webhooks = vec![url];
        c.webhook_secret = Some(SECRET.into());
        c.webhook_max_attempts = 1000;
        c.webhook_backoff = Duration::from_millis(50);
        c.webhook_backoff_max = Duration::from_millis(500);
        c.webhook_timeout = Duration::from_secs(5);
    }
}

/// Checks what a receiver got for one deployment: signed, in order, each once.
fn assert_delivered_in_order(receiver: &Receiver, bodies: &[serde_json::Value], terminal_seq: u64) {
    let seqs: Vec<u64> = bodies
        .iter()
        .map(|b| b["sequence"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {seqs:?}"
    );
    assert_eq!(seqs.first(), Some(&1));
    assert_eq!(seqs.last(), Some(&terminal_seq));
    assert_eq!(bodies.first().unwrap()["event"], "accepted");
    let last = bodies.last().unwrap();
    assert_eq!(last["event"], "finished");
    assert_eq!(last["state"], "succeeded");
    assert_eq!(last["result"]["success"], true);
    let phases: Vec<&str> = bodies
        .iter()
        .filter(|b| b["event"] == "phase_started")
        .map(|b| b["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "validating",
            "pulling",
            "creating",
            "starting",
            "health_check",
            "switching",
            "cleanup"
        ]
    );
    for (headers, body) in receiver.got.lock().unwrap().iter() {
        let sig = &headers[&SIGNATURE_HEADER.to_ascii_lowercase()];
        assert!(
            verify_signature(SECRET.as_bytes(), body, sig),
            "bad signature {sig}"
        );
        assert!(!verify_signature(b"another secret", body, sig));
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            headers[&EVENT_ID_HEADER.to_ascii_lowercase()],
            json["event_id"].as_str().unwrap()
        );
    }
}

#[tokio::test]
async fn webhooks_arrive_signed_and_in_order() {
    require_docker();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let _serving = receiver.serve(listener).await;
    let app = unique_app("hook");
    let _guard = AppGuard(app.clone());
    let server = TestServer::start_with(with_webhook(url), ObserverRegistry::new()).await;
    let mut client = server.client().await;
    let updates = deploy(&mut client, web_request(&app, WEB)).await;
    let end = terminal(&updates);
    let bodies = receiver.wait_for_finished(&end.deployment_id).await;
    assert_delivered_in_order(&receiver, &bodies, end.sequence);
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            r#"stevedore_webhook_deliveries_total{outcome="delivered"}"#
        ),
        Some(bodies.len() as f64)
    );
    server.stop().await;
}

/// A local port that is bound but not listening: connections to it are refused
/// until the socket listens, and no other test can take it meanwhile.
fn reserved_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

fn failed_attempts(text: &str) -> f64 {
    sample(text, "stevedore_webhook_attempt_failures_total").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_until_the_receiver_is_up() {
    require_docker();
    let (socket, port) = reserved_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let t = Fixture::start_with("hookretry", with_webhook(url), ObserverRegistry::new()).await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let updates = deploy(&mut client, web_request(&app, WEB)).await;
    let end = terminal(&updates).clone();
    assert_eq!(end.phase(), proto::Phase::Complete);
    // The receiver is down: attempts fail and are counted.
    eventually(Duration::from_secs(30), "failed webhook attempts", || {
        (failed_attempts(&futures_block(scrape(&t.server))) >= 2.0).then_some(())
    })
    .await;
    // Up: everything arrives, in order, after retries.
    let listener = socket.listen(64).unwrap();
    let receiver = Receiver::default();
    let _serving = receiver.serve(listener).await;
    let bodies = receiver.wait_for_finished(&end.deployment_id).await;
    assert_delivered_in_order(&receiver, &bodies, end.sequence);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_webhook_does_not_hold_up_deployments() {
    require_docker();
    // One receiver refuses connections; the other accepts them and never answers.
    let (_socket, port) = reserved_port();
    let refusing = format!("http://127.0.0.1:{port}/hook");
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    for url in [refusing, silent_url] {
        let t = Fixture::start_with(
            "hookdown",
            with_webhook(url.clone()),
            ObserverRegistry::new(),
        )
        .await;
        let (app, mut client) = (t.app.clone(), t.client.clone());
        for _ in 0..2 {
            let updates = tokio::time::timeout(
                Duration::from_secs(120),
                deploy(&mut client, web_request(&app, WEB)),
            )
            .await
            .unwrap_or_else(|_| panic!("a deployment waited for the webhook at {url}"));
            assert_well_formed(&updates);
            assert_eq!(terminal(&updates).phase(), proto::Phase::Complete);
        }
        eventually(Duration::from_secs(60), "failed webhook attempts", || {
            (failed_attempts(&futures_block(scrape(&t.server))) >= 2.0).then_some(())
        })
        .await;
        t.stop().await;
    }
}
