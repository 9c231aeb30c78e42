//! Durability benchmarks (run by `scripts/bench.sh`; plain `main`, no harness):
//!
//! 1. fan-out: how many updates per second one deployment's log sustains to 1,000
//!    watchers, each fed through the same path as a gRPC stream (`api::forward`:
//!    its own producer task, bounded buffer, proto conversion), while every update is
//!    also queued to the SQLite store, as the deployment's Reporter does;
//! 2. a stalled watcher: the writer's time to append the log (the deployment's own
//!    pace) and the other watchers' time to receive it, with and without one watcher
//!    that reads nothing;
//! 4. the same with real deployments (`stevedore-test/web:1` on the local Docker
//!    engine, skipped without one): their durations with and without one watcher
//!    that opened a WatchDeployment stream and reads nothing;
//! 3. restart: time until a real `stevedore serve` with 10,000 finished deployments
//!    (20 updates each) in its history answers gRPC, and its resident set size, idle
//!    and after listing all of them, reading 100 statuses and replaying 100 logs
//!    (targets: ready ≤ 1 s, RSS ≤ 64 MB).
//!
//! `--smoke`: small counts (one run of each line, for scripts/test.sh).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use stevedore::api::{StreamConfig, forward};
use stevedore::events::DeploymentLog;
use stevedore::model::*;
use stevedore::server::Listening;
use stevedore::store::Store;
use tokio_util::sync::CancellationToken;

mod rows;

fn update(id: DeploymentId, app: &AppName, seq: u64, terminal: bool) -> Update {
    Update {
        operation: Default::default(),
        deployment_id: id,
        sequence: seq,
        app: app.clone(),
        kind: if terminal {
            EventKind::Finished {
                state: DeploymentState::Succeeded,
            }
        } else {
            EventKind::Progress
        },
        phase: if terminal {
            Phase::Complete
        } else {
            Phase::Pulling
        },
        phase_progress: 0.5,
        total_progress: 0.5,
        level: Level::Verbose,
        message: format!("pulling registry/app:1: {seq} MiB of 150 MiB (1/3 layers)"),
        timestamp: SystemTime::now(),
        elapsed: Duration::from_millis(seq),
        metadata: Default::default(),
        pull: Some(PullProgress {
            layer_id: "0123456789ab".into(),
            current_bytes: seq * 1024,
            total_bytes: 150 << 20,
            image_current_bytes: seq * 1024,
            image_total_bytes: 150 << 20,
            layers_total: 3,
            layers_done: 1,
        }),
        result: None,
        eta: None,
        encoded: Default::default(),
    }
}

fn status_of(
    id: DeploymentId,
    app: &AppName,
    state: DeploymentState,
    last: u64,
    now: SystemTime,
) -> DeploymentStatus {
    DeploymentStatus {
        operation: Default::default(),
        id,
        app: app.clone(),
        image: "127.0.0.1:5000/bench/app:1".into(),
        state,
        phase: Phase::Complete,
        phase_progress: 1.0,
        total_progress: 1.0,
        created_at: now,
        started_at: Some(now),
        finished_at: state.is_terminal().then_some(now),
        error: String::new(),
        result: None,
        last_sequence: last,
        requested_by: "bench".into(),
        queue_position: 0,
        superseded_by: None,
        commit: String::new(),
        eta: None,
        target: Default::default(),
        replicas: 1,
    }
}

fn spec(app: &AppName) -> DeploySpec {
    DeploySpec {
        stop_timeout: None,
        drain_timeout: stevedore::model::DEFAULT_DRAIN_TIMEOUT,
        app: app.clone(),
        image: "127.0.0.1:5000/bench/app:1".into(),
        source: None,
        command: vec![],
        env: [("SECRET".to_owned(), "never stored".to_owned())].into(),
        ports: vec![],
        labels: Default::default(),
        health: HealthSpec {
            probe: None,
            timeout: Duration::from_secs(60),
            interval: Duration::from_millis(500),
        },
        deadline: Duration::from_secs(600),
        idempotency_key: None,
        registry_auth: None,
        milestones: vec![],
        hooks: vec![],
        requested_by: "bench".into(),
        replicas: 1,
        update: Default::default(),
    }
}

struct FanOut {
    append: Duration,
    all_received: Duration,
}

/// Appends `n` updates to one log (and the store) with `watchers` reading it through
/// `forward`, plus `stalled` watchers that read nothing.
async fn fan_out(store: &Store, n: u64, watchers: usize, stalled: usize) -> FanOut {
    let app = AppName::parse("bench").unwrap();
    let id = DeploymentId::new();
    let created = SystemTime::now();
    store.insert(
        &status_of(id, &app, DeploymentState::Running, 0, created),
        &spec(&app),
    );
    let log = Arc::new(DeploymentLog::new());
    let config = StreamConfig {
        heartbeat_interval: Duration::from_secs(15),
        buffer: 64,
        stall_timeout: Duration::from_secs(600),
    };
    let mut readers = Vec::new();
    for _ in 0..watchers {
        let mut s = forward(
            id.to_string(),
            log.subscribe(0).unwrap(),
            CancellationToken::new(),
            config,
            None,
            None,
        );
        readers.push(tokio::spawn(async move {
            let mut count = 0u64;
            while let Some(u) = s.next().await {
                u.unwrap();
                count += 1;
            }
            count
        }));
    }
    let stalled_streams: Vec<_> = (0..stalled)
        .map(|_| {
            forward(
                id.to_string(),
                log.subscribe(0).unwrap(),
                CancellationToken::new(),
                config,
                None,
                None,
            )
        })
        .collect();
    tokio::task::yield_now().await;

    let start = Instant::now();
    for seq in 1..=n {
        let u = Arc::new(update(id, &app, seq, seq == n));
        // The status as the engine writes it: when its state changes.
        let state = if seq == n {
            DeploymentState::Succeeded
        } else {
            DeploymentState::Running
        };
        store.append(
            u.clone(),
            (seq == 1 || seq == n).then(|| status_of(id, &app, state, seq, created)),
        );
        log.append_shared(u);
        if seq % 64 == 0 {
            // A deployment yields between updates (it awaits the engine between steps).
            tokio::task::yield_now().await;
        }
    }
    let append = start.elapsed();
    for r in readers {
        assert_eq!(r.await.unwrap(), n, "every watcher got every update");
    }
    let all_received = start.elapsed();
    drop(stalled_streams);
    store.flush().await;
    FanOut {
        append,
        all_received,
    }
}

struct Server {
    child: std::process::Child,
    grpc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data_dir: &std::path::Path) -> Server {
    serve_on(data_dir, "127.0.0.1:0")
}

/// Starts a server listening on `grpc` (an address, port 0 for any) and waits for its
/// "stevedore listening" line.
fn serve_on(data_dir: &std::path::Path, grpc: &str) -> Server {
    let log = data_dir.join("server.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .args(["serve", "--listen", grpc, "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        grpc: String::new(),
    };
    for _ in 0..4000 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(listening) = text.lines().find_map(Listening::parse) {
            server.grpc = listening.grpc.to_string();
            return server;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("server did not start");
}

/// Starts a server on `data_dir` and measures the time from its spawn until it
/// answers a ListDeployments call (polled every 5 ms).
async fn serve_timed(data_dir: &std::path::Path) -> (Server, Duration) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let answered = tokio::spawn({
        let url = format!("http://{addr}");
        async move {
            loop {
                if let Ok(mut c) =
                    stevedore::proto::deployer_client::DeployerClient::connect(url.clone()).await
                {
                    let page = stevedore::proto::ListDeploymentsRequest {
                        page_size: 1,
                        ..Default::default()
                    };
                    if c.list_deployments(page).await.is_ok() {
                        return start.elapsed();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let server = tokio::task::spawn_blocking({
        let dir = data_dir.to_owned();
        move || serve_on(&dir, &addr)
    })
    .await
    .unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(60), answered)
        .await
        .expect("the server answers")
        .unwrap();
    (server, ready)
}

#[tokio::main]
async fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (n, watchers, history_size) = if smoke {
        (2_000, 100, 500)
    } else {
        (20_000, 1_000, 10_000)
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();

    // 1. Fan-out to 1,000 watchers.
    let r = fan_out(&store, n, watchers, 0).await;
    println!(
        "fan-out: {n} updates to {watchers} watchers: appended in {:.2}s, all watchers done in {:.2}s => {:.0} updates/s sustained ({:.0} deliveries/s)",
        r.append.as_secs_f64(),
        r.all_received.as_secs_f64(),
        n as f64 / r.all_received.as_secs_f64(),
        (n * watchers as u64) as f64 / r.all_received.as_secs_f64(),
    );

    // 2. A stalled watcher.
    for (label, stalled) in [("no stalled watcher", 0), ("one stalled watcher", 1)] {
        let r = fan_out(&store, n, 100, stalled).await;
        println!(
            "stalled: {label:<20} deployment appended {n} updates in {:.3}s; 100 other watchers done in {:.3}s",
            r.append.as_secs_f64(),
            r.all_received.as_secs_f64(),
        );
    }
    drop(store);

    // 4. Real deployments, with and without a stalled watcher.
    real_deployments_with_a_stalled_watcher().await;

    // 3. Restart with 10,000 finished deployments in history: ready time and RSS.
    let empty = tempfile::tempdir().unwrap();
    let baseline = {
        let s = serve(empty.path());
        tokio::time::sleep(Duration::from_millis(500)).await;
        rows::rss_kib(s.child.id())
    };
    let history = tempfile::tempdir().unwrap();
    let ids = {
        let store = Store::open(history.path()).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..history_size {
            let app = AppName::parse(&format!("app-{}", i % 50)).unwrap();
            let id = DeploymentId::new();
            let created = SystemTime::now();
            store.insert(
                &status_of(id, &app, DeploymentState::Running, 0, created),
                &spec(&app),
            );
            for seq in 1..=20 {
                store.append(
                    Arc::new(update(id, &app, seq, seq == 20)),
                    (seq == 20)
                        .then(|| status_of(id, &app, DeploymentState::Succeeded, seq, created)),
                );
            }
            ids.push(id);
            if i % 500 == 0 {
                store.flush().await;
            }
        }
        store.flush().await;
        assert_eq!(store.count().await.unwrap(), history_size);
        ids
    };
    let (s, ready) = serve_timed(history.path()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rows::rss_kib(s.child.id());
    let mut client =
        stevedore::proto::deployer_client::DeployerClient::connect(format!("http://{}", s.grpc))
            .await
            .unwrap();
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let page = client
            .list_deployments(stevedore::proto::ListDeploymentsRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed += page.deployments.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed as u64, history_size);
    for id in ids.iter().step_by(100) {
        client
            .get_status(stevedore::proto::GetStatusRequest {
                deployment_id: id.to_string(),
            })
            .await
            .unwrap();
        let mut w = client
            .watch_deployment(stevedore::proto::WatchRequest {
                deployment_id: id.to_string(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = 0;
        while w.message().await.unwrap().is_some() {
            got += 1;
        }
        assert_eq!(got, 20);
    }
    let after = rows::rss_kib(s.child.id());
    let db: u64 = ["stevedore.db", "stevedore.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(history.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let updates = history_size * 20;
    rows::limit(
        &format!("restart with {history_size} finished deployments: time to ready"),
        &format!(
            "{:.0} ms from spawn to the first answered ListDeployments",
            ready.as_secs_f64() * 1000.0
        ),
        ready.as_secs_f64(),
        1.0,
        " s",
    );
    rows::limit(
        &format!("restart with {history_size} finished deployments: server RSS"),
        &format!(
            "{} MiB idle, {} MiB after listing all + 100 status + 100 replays (db {} MiB, {updates} updates; empty history {} MiB)",
            idle / 1024,
            after / 1024,
            db >> 20,
            baseline / 1024,
        ),
        (after.max(idle) * 1024) as f64 / 1e6,
        64.0,
        " MB",
    );
}

/// Durations of real deployments (accepted → terminal, from GetStatus) with and
/// without a watcher that reads nothing.
async fn real_deployments_with_a_stalled_watcher() {
    let docker = std::process::Command::new("docker")
        .args(["image", "inspect", "stevedore-test/web:1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker {
        println!("stalled (real deployments): skipped, no Docker engine with stevedore-test/web:1");
        return;
    }
    use stevedore::proto::{DeployRequest, GetStatusRequest, PortMapping, WatchRequest};
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path());
    let mut client =
        stevedore::proto::deployer_client::DeployerClient::connect(format!("http://{}", s.grpc))
            .await
            .unwrap();
    let app = format!(
        "bench-stall-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut results = Vec::new();
    for (label, stalled) in [("no stalled watcher", false), ("one stalled watcher", true)] {
        let mut durations = Vec::new();
        for _ in 0..3 {
            let mut stream = client
                .deploy(DeployRequest {
                    app: app.clone(),
                    image: "stevedore-test/web:1".into(),
                    ports: vec![PortMapping {
                        container_port: 8080,
                        host_port: 0,
                        protocol: "tcp".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            let _stalled = if stalled {
                Some(
                    client
                        .watch_deployment(WatchRequest {
                            deployment_id: first.deployment_id.clone(),
                            after_sequence: 0,
                        })
                        .await
                        .unwrap()
                        .into_inner(),
                )
            } else {
                None
            };
            while let Some(u) = stream.message().await.unwrap() {
                if let Some(r) = &u.result {
                    assert!(r.success, "{}", u.message);
                }
            }
            let st = client
                .get_status(GetStatusRequest {
                    deployment_id: first.deployment_id,
                })
                .await
                .unwrap()
                .into_inner();
            let (c, f) = (st.created_at.unwrap(), st.finished_at.unwrap());
            durations.push((f.seconds - c.seconds) as f64 + (f.nanos - c.nanos) as f64 / 1e9);
        }
        results.push((label, durations));
    }
    for (label, d) in results {
        println!(
            "stalled (real deployments): {label:<20} durations {}",
            d.iter()
                .map(|x| format!("{x:.2}s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let ids = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.stevedore.app={app}"),
        ])
        .output()
        .unwrap();
    for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", id])
            .output();
    }
}
