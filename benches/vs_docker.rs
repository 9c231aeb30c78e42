//! Stevedore next to the docker CLI (run by `bash scripts/bench.sh vs_docker`; plain
//! `main`, no harness). A real `stevedore serve` (the binary cargo built for this
//! bench), one tonic client connection held for the whole run, the local Docker engine
//! and registry. Each line prints the figure, its anchor measured in the same run, the
//! ratio, the target and whether it is met; nothing is asserted about speed.
//!
//! * `deploy`: a first deploy and a redeploy of `stevedore-test/web:1` (present
//!   locally) with a TCP health check, against a bash script doing the same with the
//!   docker CLI (`docker run -d -p 127.0.0.1::8080`, `docker port`, poll the port every
//!   50 ms with bash's `/dev/tcp`; for the redeploy `docker stop -t 10` + `docker rm`
//!   of the old one, 10 s being the grace Stevedore is given). Runs alternate
//!   (Stevedore, script, Stevedore, script, floor); medians. The floor: the engine's
//!   own create + start measured with bollard, plus the app's own start (until its
//!   port accepts on the container's address); Stevedore's time outside it is printed.
//! * `pull`: a ~100 MB image (a random-data layer on web:1, pushed to the local
//!   registry, removed locally before each run) pulled by a Stevedore deploy (until
//!   the first CREATING update) against `docker pull`.
//! * `concurrent`: N deploys of distinct apps at once: all must succeed; the server's
//!   CPU time per deploy (/proc/PID/stat), next to what a bare bollard client in this
//!   process spends per deploy making the same engine requests and TCP probe, N at
//!   once (its floor; figure only); its context switches per deploy
//!   (/proc/PID/task/*/status; figure only) and the wall time against N copies of the
//!   script run in parallel.
//! * `redeploys`: N redeploys of one app that already has 10 succeeded deployments
//!   (what the ETA learns from), in a row through the held connection, alternating
//!   with first deploys of new apps: the server's CPU time per redeploy and per first
//!   deploy (/proc/PID/stat over all N). Figures only (the target is on `concurrent`).
//! * `watchers`: N tonic WatchDeployment streams of one deployment emitting a few
//!   hundred updates (a log health check that never matches, 50 ms interval, 12 s
//!   timeout): lost and duplicated updates, p50/p99 from the update's timestamp to its
//!   receipt, deliveries per second, server RSS per open stream; then the same for
//!   the bare tonic floor (`benches/floor`: the same RPC over the same proto, the same
//!   messages with the same gaps, the same watchers over the same connections) printed
//!   next to Stevedore's, and throughput against it: every watcher replays the whole
//!   finished log at once, from Stevedore and from the floor (target ≥ 0.8×).
//!
//! Restart with 10,000 finished deployments (ready time, RSS) is in `durability`.
//!
//! Arguments: `[deploy] [pull] [concurrent] [redeploys] [watchers]` (default all),
//! `--runs N` (default 7), `--concurrent N` (100), `--redeploys N` (30), `--watchers
//! N,N` (1000,10000), `--pull-mb N` (100), `--smoke` (1 run, 5 concurrent, 2
//! redeploys, 50 watchers, a 10 MB image).

#[path = "../tests/common/mod.rs"]
mod common;
mod floor;
mod rows;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use common::{BinaryServer, Client};
use futures_util::StreamExt;
use stevedore::proto::health_check::Check;
use stevedore::proto::{
    self, CancelRequest, DeployRequest, HealthCheck, LogHealthCheck, ProgressUpdate,
    TcpHealthCheck, WatchRequest,
};

/// The previous version's stop grace, the same for Stevedore and the script.
const GRACE_SECS: i64 = 10;
const WEB: &str = "stevedore-test/web:1";

/// The docker-CLI anchor: `anchor.sh LABEL [OLD]` runs web:1 on a free port, waits
/// until the port accepts, then stops and removes OLD; prints the new container's ID.
const SCRIPT: &str = r#"#!/usr/bin/env bash
set -euo pipefail
cid=$(docker run -d --label "$1" -p 127.0.0.1::8080 stevedore-test/web:1)
port=$(docker port "$cid" 8080/tcp | head -n 1)
port=${port##*:}
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
if [[ -n ${2:-} ]]; then
  docker stop -t GRACE "$2" >/dev/null
  docker rm "$2" >/dev/null
fi
echo "$cid"
"#;

struct Args {
    only: Vec<String>,
    runs: usize,
    concurrent: usize,
    redeploys: usize,
    watchers: Vec<usize>,
    pull_mb: usize,
    /// The watched deployment's health timeout (its attempts are the updates).
    watch_secs: i64,
}

fn args() -> Args {
    let mut a = Args {
        only: Vec::new(),
        runs: 7,
        concurrent: 100,
        redeploys: 30,
        watchers: vec![1_000, 10_000],
        pull_mb: 100,
        watch_secs: 12,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the flag");
        match arg.as_str() {
            "--bench" => {}
            "--runs" => a.runs = value().parse().unwrap(),
            "--concurrent" => a.concurrent = value().parse().unwrap(),
            "--redeploys" => a.redeploys = value().parse().unwrap(),
            "--pull-mb" => a.pull_mb = value().parse().unwrap(),
            "--watchers" => {
                a.watchers = value().split(',').map(|n| n.parse().unwrap()).collect();
            }
            "--smoke" => {
                (a.runs, a.concurrent, a.pull_mb, a.watch_secs) = (1, 5, 10, 2);
                a.redeploys = 2;
                a.watchers = vec![50];
            }
            "deploy" | "pull" | "concurrent" | "redeploys" | "watchers" => a.only.push(arg),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Bench {
    server: BinaryServer,
    client: Client,
    docker: Docker,
    script: tempfile::TempPath,
    /// Labels the script's containers (removed at the end).
    label: String,
    _data: tempfile::TempDir,
}

#[tokio::main]
async fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--floor-serve") {
        return floor::serve(&argv.next().expect("the messages' file")).await;
    }
    let args = args();
    common::require_docker();
    common::docker(&["image", "inspect", "-f", "{{.Id}}", WEB]);
    let data = tempfile::tempdir().unwrap();
    let server = BinaryServer::spawn(
        data.path(),
        &[
            "--max-in-flight",
            "1000",
            "--max-queued",
            "1000",
            "--max-watch-streams",
            "20000",
        ],
    );
    let client = common::connect(server.grpc_addr).await;
    let script = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&script, SCRIPT.replace("GRACE", &GRACE_SECS.to_string())).unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let bench = Bench {
        server,
        client,
        docker: Docker::connect_with_local_defaults().unwrap(),
        script,
        label: format!("bench.vsdocker={}", &run[..10]),
        _data: data,
    };
    let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    println!(
        "vs_docker: stevedore serve pid {} ({} build), {} alternating runs, medians",
        bench.server.child.id(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        args.runs
    );
    if wants("deploy") {
        bench.deploys(args.runs).await;
    }
    if wants("pull") {
        bench.pulls(args.runs, args.pull_mb).await;
    }
    if wants("concurrent") {
        bench.concurrent(args.concurrent).await;
    }
    if wants("redeploys") {
        bench.redeploys(args.redeploys).await;
    }
    if wants("watchers") {
        for &n in &args.watchers {
            bench.watchers(n, args.watch_secs).await;
        }
    }
    remove_labelled(&bench.label);
}

/// A deploy of web:1 on a free host port with a TCP check of 8080.
fn web_tcp(app: &str) -> DeployRequest {
    let mut req = common::web_request(app, WEB);
    req.health_check = Some(HealthCheck {
        check: Some(Check::Tcp(TcpHealthCheck { port: 8080 })),
        ..Default::default()
    });
    req.stop_timeout = common::secs(GRACE_SECS);
    req
}

fn ms(d: f64) -> String {
    format!("{:.0} ms", d * 1000.0)
}

fn unique(prefix: &str) -> String {
    format!(
        "bench-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Removes every container labelled `label` (`key=value`).
fn remove_labelled(label: &str) {
    let ids = common::docker(&["ps", "-aq", "--filter", &format!("label={label}")]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        let _ = Command::new("docker").args(&args).output();
    }
}

/// The label naming a bare deploy's app (`Bench::bare_deploy`), to list its containers.
const APP_LABEL: &str = "stevedore.bench.app";

/// A started container's address on its network and the host port 8080 is published on.
fn address_and_port(info: ContainerInspectResponse) -> (String, u16) {
    let settings = info.network_settings.expect("network settings");
    let ip = (settings.networks.clone())
        .and_then(|m| m.into_values().find_map(|e| e.ip_address))
        .filter(|ip| !ip.is_empty())
        .expect("the container has an address");
    let port = (settings.ports)
        .and_then(|mut p| p.remove("8080/tcp").flatten())
        .and_then(|b| b.into_iter().find_map(|b| b.host_port?.parse().ok()))
        .expect("8080 is published");
    (ip, port)
}

fn to_system(ts: &pbjson_types::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32)
}

/// A Deploy call read to its end: the time from the call to the terminal update, and
/// the updates.
struct Deployed {
    took: Duration,
    updates: Vec<ProgressUpdate>,
}

impl Deployed {
    fn terminal(&self) -> &ProgressUpdate {
        self.updates.last().expect("a terminal update")
    }

    fn succeeded(&self) -> bool {
        self.terminal().result.as_ref().is_some_and(|r| r.success)
    }

    /// Time from the call to each phase's first update, then between phases' first
    /// updates: `[("accept", s), ("VALIDATING", s), …]`.
    fn phases(&self, sent: SystemTime) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let mut last: Option<(String, SystemTime)> = None;
        for u in &self.updates {
            let name = u
                .phase()
                .as_str_name()
                .trim_start_matches("PHASE_")
                .to_owned();
            let at = u.timestamp.as_ref().map(to_system).unwrap_or(sent);
            match &last {
                None => {
                    out.push(("accept".into(), secs_between(sent, at)));
                    last = Some((name, at));
                }
                Some((prev, since)) if *prev != name => {
                    out.push((prev.clone(), secs_between(*since, at)));
                    last = Some((name, at));
                }
                _ => {}
            }
        }
        if let (Some((prev, since)), Some(end)) = (&last, self.updates.last()) {
            let at = end.timestamp.as_ref().map(to_system).unwrap_or(*since);
            out.push((prev.clone(), secs_between(*since, at)));
        }
        out
    }
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

async fn deploy(client: &mut Client, req: DeployRequest) -> (Deployed, SystemTime) {
    let sent = SystemTime::now();
    let t = Instant::now();
    let mut stream = client.deploy(req).await.expect("deploy").into_inner();
    let mut updates = Vec::new();
    while let Some(u) = stream.message().await.expect("deploy stream") {
        if u.heartbeat {
            continue;
        }
        let done = u.result.is_some();
        updates.push(u);
        if done {
            break;
        }
    }
    let took = t.elapsed();
    (Deployed { took, updates }, sent)
}

/// Median time per phase over several deploys.
fn phase_medians(runs: &[Vec<(String, f64)>]) -> String {
    let mut by: Vec<(String, Vec<f64>)> = Vec::new();
    for run in runs {
        for (name, s) in run {
            match by.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(*s),
                None => by.push((name.clone(), vec![*s])),
            }
        }
    }
    by.iter()
        .map(|(n, v)| format!("{n} {}", ms(rows::median(v))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The engine alone: create + start, and the app's own start until its port accepts
/// on the container's address (1 ms polls).
struct Floor {
    create_start: f64,
    app_start: f64,
    id: String,
}

impl Bench {
    fn script(&self, old: Option<&str>) -> (f64, String) {
        let t = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script).arg(&self.label);
        if let Some(old) = old {
            cmd.arg(old);
        }
        let out = cmd.output().expect("bash runs");
        assert!(
            out.status.success(),
            "anchor script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    /// Creates (not starts) a container of [`WEB`] named `name`, 8080 published on a
    /// free port of 127.0.0.1, labelled with the bench's label and `app`'s.
    async fn create_web(&self, name: &str, app: Option<&str>) -> String {
        let mut bindings = HashMap::new();
        bindings.insert(
            "8080/tcp".to_owned(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(String::new()),
            }]),
        );
        let (key, value) = self.label.split_once('=').unwrap();
        let mut labels = HashMap::from([(key.to_owned(), value.to_owned())]);
        if let Some(app) = app {
            labels.insert(APP_LABEL.to_owned(), app.to_owned());
        }
        let body = ContainerCreateBody {
            image: Some(WEB.into()),
            labels: Some(labels),
            exposed_ports: Some(vec!["8080/tcp".into()]),
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .unwrap()
            .id
    }

    async fn floor(&self) -> Floor {
        let t = Instant::now();
        let id = self.create_web(&unique("floor"), None).await;
        self.docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .unwrap();
        let create_start = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let info = self
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .unwrap();
        let inspect = t.elapsed();
        let (ip, _) = address_and_port(info);
        while tokio::net::TcpStream::connect((ip.as_str(), 8080))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let app_start = (t.elapsed() - inspect).as_secs_f64();
        Floor {
            create_start,
            app_start,
            id,
        }
    }

    /// One deploy as any client of the engine makes it, with nothing of Stevedore's
    /// around it (no store, no audit, no gRPC): the requests Stevedore sends the
    /// engine for a first deploy (ping, image inspect, create, start, inspect, a log
    /// follow, the app's containers listed, a last inspect) and its TCP probe (the
    /// container's own address, again after 5 ms and doubling, then the published
    /// port). Its container carries the bench's label.
    async fn bare_deploy(&self) {
        let docker = &self.docker;
        docker.ping().await.unwrap();
        docker.inspect_image(WEB).await.unwrap();
        let app = unique("bare");
        let id = self.create_web(&app, Some(&app)).await;
        docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .unwrap();
        let info = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .unwrap();
        let (ip, port) = address_and_port(info);
        let follow = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(true)
            .build();
        let mut lines = docker.logs(&id, Some(follow));
        let follow = tokio::spawn(async move { while lines.next().await.is_some() {} });
        let mut delay = Duration::from_millis(5);
        while tokio::net::TcpStream::connect((ip.as_str(), 8080))
            .await
            .is_err()
        {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let filters = HashMap::from([("label".to_owned(), vec![format!("{APP_LABEL}={app}")])]);
        let list = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        docker.list_containers(Some(list)).await.unwrap();
        docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .unwrap();
        follow.abort();
    }

    /// Stop (grace 10 s) and remove, as the redeploy does with the old version.
    async fn stop_remove(&self, id: &str) -> f64 {
        let t = Instant::now();
        let stop = StopContainerOptionsBuilder::default()
            .t(GRACE_SECS as i32)
            .build();
        self.docker.stop_container(id, Some(stop)).await.unwrap();
        let remove = RemoveContainerOptionsBuilder::default().force(true).build();
        self.docker
            .remove_container(id, Some(remove))
            .await
            .unwrap();
        t.elapsed().as_secs_f64()
    }

    async fn deploys(&self, runs: usize) {
        let mut client = self.client.clone();
        let (mut s_first, mut s_re, mut a_first, mut a_re) = (vec![], vec![], vec![], vec![]);
        let (mut f_first, mut f_re, mut f_engine) = (vec![], vec![], vec![]);
        let (mut p_first, mut p_re) = (vec![], vec![]);
        // Warm-up, not counted: the first calls of a fresh server and CLI.
        {
            let app = unique("warm");
            let _guard = common::AppGuard(app.clone());
            deploy(&mut client, web_tcp(&app)).await;
            self.script(None);
            let f = self.floor().await;
            self.stop_remove(&f.id).await;
            remove_labelled(&self.label);
        }
        for _ in 0..runs {
            let app = unique("deploy");
            let _guard = common::AppGuard(app.clone());
            let (first, sent) = deploy(&mut client, web_tcp(&app)).await;
            assert!(first.succeeded(), "{}", first.terminal().message);
            s_first.push(first.took.as_secs_f64());
            p_first.push(first.phases(sent));

            let (t, old) = self.script(None);
            a_first.push(t);

            let (again, sent) = deploy(&mut client, web_tcp(&app)).await;
            assert!(again.succeeded(), "{}", again.terminal().message);
            s_re.push(again.took.as_secs_f64());
            p_re.push(again.phases(sent));

            let (t, _) = self.script(Some(&old));
            a_re.push(t);

            let a = self.floor().await;
            let b = self.floor().await;
            let swap = self.stop_remove(&a.id).await;
            f_engine.push(a.create_start);
            f_first.push(a.create_start + a.app_start);
            f_re.push(b.create_start + b.app_start + swap);
            remove_labelled(&self.label);
        }
        let med = rows::median;
        rows::ratio(
            "deploy first (present image, TCP check)",
            med(&s_first),
            "docker-CLI script",
            med(&a_first),
            Some(0.95),
        );
        rows::info(
            "deploy first: Stevedore phases (median)",
            &phase_medians(&p_first),
        );
        rows::ratio(
            "deploy redeploy (old one stopped, grace 10s)",
            med(&s_re),
            "docker-CLI script",
            med(&a_re),
            Some(0.95),
        );
        rows::info(
            "deploy redeploy: Stevedore phases (median)",
            &phase_medians(&p_re),
        );
        for (what, ours, floor) in [("first", &s_first, &f_first), ("redeploy", &s_re, &f_re)] {
            let outside = med(ours) - med(floor);
            rows::limit(
                &format!(
                    "deploy {what}: Stevedore outside the engine's create+start and the app's start"
                ),
                &format!(
                    "{} (Stevedore {} - floor {}; engine create+start alone {})",
                    ms(outside),
                    ms(med(ours)),
                    ms(med(floor)),
                    ms(med(&f_engine)),
                ),
                outside * 1000.0,
                20.0,
                " ms",
            );
        }
    }

    async fn pulls(&self, runs: usize, mb: usize) {
        let (image, sizes) = common::push_random_image(mb);
        let total: u64 = sizes.iter().sum();
        let mut client = self.client.clone();
        let (mut ours, mut anchor) = (vec![], vec![]);
        for _ in 0..runs {
            let app = unique("pull");
            let guard = common::AppGuard(app.clone());
            let _ = Command::new("docker").args(["rmi", &image]).output();
            let mut req = common::web_request(&app, &image);
            req.health_check = Some(HealthCheck {
                check: Some(Check::Tcp(TcpHealthCheck { port: 8080 })),
                ..Default::default()
            });
            let t = Instant::now();
            let mut stream = client.deploy(req).await.expect("deploy").into_inner();
            let mut pulled = None;
            let mut last = None;
            while let Some(u) = stream.message().await.expect("deploy stream") {
                if pulled.is_none() && u.phase() == proto::Phase::Creating {
                    pulled = Some(t.elapsed().as_secs_f64());
                }
                if u.result.is_some() {
                    last = Some(u);
                    break;
                }
            }
            let last = last.expect("a terminal update");
            assert!(last.result.unwrap().success, "{}", last.message);
            ours.push(pulled.expect("a CREATING update"));
            drop(guard);
            let _ = Command::new("docker").args(["rmi", &image]).output();
            let t = Instant::now();
            common::docker(&["pull", "-q", &image]);
            anchor.push(t.elapsed().as_secs_f64());
        }
        let _ = Command::new("docker").args(["rmi", &image]).output();
        rows::ratio(
            &format!(
                "pull of a {} MB image from the local registry (deploy until CREATING)",
                total >> 20
            ),
            rows::median(&ours),
            "docker pull",
            rows::median(&anchor),
            Some(1.05),
        );
    }

    async fn concurrent(&self, n: usize) {
        let clk_tck = clock_ticks_per_sec();
        let pid = self.server.child.id();
        let apps: Vec<String> = (0..n).map(|_| unique("many")).collect();
        let guards: Vec<_> = apps.iter().map(|a| common::AppGuard(a.clone())).collect();
        let cpu0 = cpu_ticks(pid);
        let switches0 = context_switches(pid);
        let t = Instant::now();
        let deploys = apps.iter().map(|app| {
            let mut client = self.client.clone();
            let req = web_tcp(app);
            async move { deploy(&mut client, req).await.0 }
        });
        let done = futures_util::future::join_all(deploys).await;
        let wall = t.elapsed().as_secs_f64();
        let cpu_ms = (cpu_ticks(pid) - cpu0) as f64 * 1000.0 / clk_tck / n as f64;
        let switches = context_switches(pid).saturating_sub(switches0) as f64 / n as f64;
        let ok = done.iter().filter(|d| d.succeeded()).count();
        let ids: Vec<String> = done
            .iter()
            .filter_map(|d| d.terminal().result.as_ref())
            .map(|r| r.container_id.clone())
            .filter(|id| !id.is_empty())
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm".to_owned(), "-f".to_owned()];
            args.extend(ids);
            let _ = Command::new("docker").args(&args).output();
        }
        drop(guards);

        // The floor of the CPU figure: the same engine requests and probe from a bare
        // client (this process, nothing else running in it meanwhile), n at once.
        let me = std::process::id();
        let cpu0 = cpu_ticks(me);
        let bare = (0..n).map(|_| self.bare_deploy());
        futures_util::future::join_all(bare).await;
        let bare_ms = (cpu_ticks(me) - cpu0) as f64 * 1000.0 / clk_tck / n as f64;
        remove_labelled(&self.label);

        let t = Instant::now();
        let scripts: Vec<_> = (0..n)
            .map(|_| {
                Command::new("bash")
                    .arg(&self.script)
                    .arg(&self.label)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let script_ok = scripts
            .into_iter()
            .filter_map(|mut c| c.wait().ok())
            .filter(|s| s.success())
            .count();
        let script_wall = t.elapsed().as_secs_f64();
        remove_labelled(&self.label);

        rows::limit(
            &format!("concurrent: {n} deploys of distinct apps, all succeed"),
            &format!("{ok} of {n} succeeded"),
            (n - ok) as f64,
            0.0,
            " failed",
        );
        rows::ratio(
            &format!("concurrent: {n} deploys, wall time"),
            wall,
            &format!("{n} docker-CLI scripts in parallel ({script_ok} ok)"),
            script_wall,
            None,
        );
        rows::limit(
            &format!("concurrent: server CPU per deploy ({n} deploys)"),
            &format!("{cpu_ms:.1} ms"),
            cpu_ms,
            5.0,
            " ms",
        );
        rows::info(
            &format!(
                "concurrent: CPU per deploy of a bare client making the same engine requests and probe ({n} at once)"
            ),
            &format!(
                "{bare_ms:.1} ms (Stevedore's server {cpu_ms:.1} ms: {:.1} ms more)",
                cpu_ms - bare_ms
            ),
        );
        rows::info(
            &format!("concurrent: server context switches per deploy ({n} deploys)"),
            &format!(
                "{switches:.0} (threads alive at the end; {} worker thread(s))",
                worker_threads()
            ),
        );
    }

    /// `n` redeploys of an app with [`PAST`] succeeded deployments, alternating with
    /// first deploys of new apps; the server's CPU time per deploy of each kind.
    async fn redeploys(&self, n: usize) {
        /// The history an estimate learns from (`engine::history`).
        const PAST: usize = 10;
        let clk_tck = clock_ticks_per_sec();
        let pid = self.server.child.id();
        let mut client = self.client.clone();
        let app = unique("redeploy");
        let mut guards = vec![common::AppGuard(app.clone())];
        for _ in 0..PAST {
            let (d, _) = deploy(&mut client, web_tcp(&app)).await;
            assert!(d.succeeded(), "{}", d.terminal().message);
        }
        let (mut redeploys, mut firsts) = (0, 0);
        for _ in 0..n {
            let t0 = cpu_ticks(pid);
            let (d, _) = deploy(&mut client, web_tcp(&app)).await;
            assert!(d.succeeded(), "{}", d.terminal().message);
            let t1 = cpu_ticks(pid);
            let new = unique("first");
            guards.push(common::AppGuard(new.clone()));
            let (d, _) = deploy(&mut client, web_tcp(&new)).await;
            assert!(d.succeeded(), "{}", d.terminal().message);
            redeploys += t1 - t0;
            firsts += cpu_ticks(pid) - t1;
        }
        let per = |ticks: u64| ticks as f64 * 1000.0 / clk_tck / n as f64;
        rows::info(
            &format!(
                "redeploys: server CPU per redeploy of an app with {PAST} past deployments ({n} in a row)"
            ),
            &format!(
                "{:.1} ms (first deploys of new apps, alternating: {:.1} ms)",
                per(redeploys),
                per(firsts)
            ),
        );
    }

    async fn watchers(&self, n: usize, watch_secs: i64) {
        let mut client = self.client.clone();
        let app = unique("watch");
        let _guard = common::AppGuard(app.clone());
        let never = |timeout: i64, interval_ms: i32| HealthCheck {
            check: Some(Check::Log(LogHealthCheck {
                pattern: "^never printed$".into(),
            })),
            timeout: common::secs(timeout),
            interval: Some(pbjson_types::Duration {
                seconds: 0,
                nanos: interval_ms * 1_000_000,
            }),
        };
        // A deployment that holds the app's lock until cancelled, so the watched one waits
        // in the queue while the watchers connect.
        let mut blocker = common::web_request(&app, "stevedore-test/plain:1");
        blocker.ports.clear();
        blocker.health_check = Some(never(600, 500));
        let mut blocking = client.deploy(blocker).await.unwrap().into_inner();
        let blocker_id = blocking.message().await.unwrap().unwrap().deployment_id;
        let drain_blocker =
            tokio::spawn(async move { while let Ok(Some(_)) = blocking.message().await {} });

        let mut watched = common::web_request(&app, "stevedore-test/plain:1");
        watched.ports.clear();
        watched.health_check = Some(never(watch_secs, 50));
        let mut deploying = client.deploy(watched).await.unwrap().into_inner();
        let id = deploying.message().await.unwrap().unwrap().deployment_id;
        let drain_watched =
            tokio::spawn(async move { while let Ok(Some(_)) = deploying.message().await {} });

        let pid = self.server.child.id();
        let go = client.clone();
        let ours = crowd(self.server.grpc_addr, pid, &id, n, async move {
            go.clone()
                .cancel_deployment(CancelRequest {
                    deployment_id: blocker_id,
                })
                .await
                .unwrap();
        })
        .await;
        drain_blocker.await.unwrap();
        drain_watched.await.unwrap();
        let expected = common::get_status(&mut client, &id).await.last_sequence;
        // The messages Stevedore sent, for the floor to send the same.
        let sent = replayed(&mut client, &id).await;
        assert_eq!(sent.len() as u64, expected, "a replay of the whole log");

        // The floor, in its own process: the same messages, live with the same gaps,
        // to the same number of watchers over the same number of connections.
        let floor = FloorServer::spawn(&sent);
        let mut go = common::connect(floor.addr).await;
        let bare = crowd(floor.addr, floor.child.id(), "live", n, async move {
            go.cancel_deployment(CancelRequest {
                deployment_id: "live".into(),
            })
            .await
            .unwrap();
        })
        .await;

        ours.print(&format!("watchers: {n} streams"), expected, Some(&bare));
        bare.print(
            &format!("watchers: {n} streams, bare tonic floor"),
            expected,
            None,
        );

        // Throughput, unpaced: every watcher replays the whole finished log at once.
        let (s_thr, f_thr) = (
            replay_throughput(self.server.grpc_addr, &id, n, expected).await,
            replay_throughput(floor.addr, "replay", n, expected).await,
        );
        let ratio = s_thr.rate / f_thr.rate;
        println!(
            "watchers: {n} streams, throughput (each replays all {expected} updates at once): \
             {:.0}/s ({}) | bare tonic floor {:.0}/s ({}) | ratio {ratio:.2} of the floor | \
             target ≥ 0.80× | {}",
            s_thr.rate,
            s_thr.detail,
            f_thr.rate,
            f_thr.detail,
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
    }
}

/// The bare tonic server of `benches/floor`, started as a child process (this bench
/// binary with `--floor-serve FILE`); killed on drop.
struct FloorServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _messages: tempfile::TempPath,
}

impl FloorServer {
    fn spawn(messages: &[ProgressUpdate]) -> Self {
        use std::io::BufRead;
        let file = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        floor::write(&file, messages);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--floor-serve")
            .arg(&*file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the floor server starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("floor listening on ")
            .unwrap_or_else(|| panic!("floor server said {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            _messages: file,
        }
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every non-heartbeat update of deployment `id`, replayed from its start.
async fn replayed(client: &mut Client, id: &str) -> Vec<ProgressUpdate> {
    let mut stream = client
        .watch_deployment(WatchRequest {
            deployment_id: id.to_owned(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(u) = stream.message().await.expect("watch stream") {
        if !u.heartbeat {
            out.push(u);
        }
    }
    out
}

/// N watchers of one stream, live: connected first (100 streams a connection), then
/// `go` starts the updates.
struct Crowd {
    results: Vec<Watched>,
    connect_s: f64,
    /// Server RSS (KiB) before the watchers connected and with them open, idle.
    rss: (u64, u64),
    start: SystemTime,
}

async fn crowd(
    addr: std::net::SocketAddr,
    pid: u32,
    id: &str,
    n: usize,
    go: impl std::future::Future<Output = ()>,
) -> Crowd {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rows::rss_kib(pid);
    let connected = Arc::new(AtomicUsize::new(0));
    let live_from: Arc<OnceLock<SystemTime>> = Arc::new(OnceLock::new());
    let mut channels = Vec::new();
    let mut tasks = Vec::with_capacity(n);
    let t_connect = Instant::now();
    for i in 0..n {
        if i % 100 == 0 {
            channels.push(common::connect(addr).await);
        }
        let client = channels.last().unwrap().clone();
        tasks.push(tokio::spawn(watch(
            client,
            id.to_owned(),
            connected.clone(),
            live_from.clone(),
        )));
    }
    while connected.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = rows::rss_kib(pid);
    let start = SystemTime::now();
    let _ = live_from.set(start);
    go.await;
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await.unwrap());
    }
    Crowd {
        results,
        connect_s,
        rss: (rss0, rss1),
        start,
    }
}

impl Crowd {
    fn latencies(&self) -> (f64, f64) {
        let lat: Vec<f64> = self
            .results
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        (rows::percentile(&lat, 0.5), rows::percentile(&lat, 0.99))
    }

    /// The lines of one crowd; `floor` (Stevedore's lines only) is printed next to
    /// the latency and memory figures.
    fn print(&self, name: &str, expected: u64, floor: Option<&Crowd>) {
        let n = self.results.len();
        let lost: u64 = self
            .results
            .iter()
            .map(|r| expected.saturating_sub(r.unique))
            .sum();
        let dups: u64 = self.results.iter().map(|r| r.dups).sum();
        let deliveries: usize = self.results.iter().map(|r| r.latencies.len()).sum();
        let end = self
            .results
            .iter()
            .filter_map(|r| r.last_at)
            .max()
            .unwrap_or(self.start);
        let live_s = secs_between(self.start, end).max(1e-6);
        let (p50, p99) = self.latencies();
        let (rss0, rss1) = self.rss;
        let per_stream = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / n as f64;
        let next_to = |what: String| match floor {
            Some(_) => format!(" (bare tonic floor: {what})"),
            None => String::new(),
        };
        let floor_lat = floor.map(|f| f.latencies()).unwrap_or_default();
        let floor_rss = floor
            .map(|f| f.rss.1.saturating_sub(f.rss.0) as f64 * 1024.0 / n as f64)
            .unwrap_or_default();
        rows::limit(
            &format!("{name} of one deployment ({expected} updates), lost or duplicated"),
            &format!(
                "{lost} lost, {dups} duplicated (all connected in {:.1}s)",
                self.connect_s
            ),
            (lost + dups) as f64,
            0.0,
            "",
        );
        rows::limit(
            &format!("{name}, emit→receive p99"),
            &format!(
                "p50 {}, p99 {}{}",
                ms(p50),
                ms(p99),
                next_to(format!("p50 {}, p99 {}", ms(floor_lat.0), ms(floor_lat.1)))
            ),
            p99 * 1000.0,
            50.0,
            " ms",
        );
        rows::info(
            &format!("{name}, live deliveries (paced by the deployment)"),
            &format!(
                "{deliveries} in {live_s:.2}s = {:.0}/s",
                deliveries as f64 / live_s
            ),
        );
        rows::limit(
            &format!("{name}, server RSS per open stream"),
            &format!(
                "{:.1} KB ({} MiB before, {} MiB with the streams open){}",
                per_stream / 1000.0,
                rss0 / 1024,
                rss1 / 1024,
                next_to(format!("{:.1} KB", floor_rss / 1000.0))
            ),
            per_stream / 1000.0,
            10.0,
            " KB",
        );
    }
}

struct Throughput {
    rate: f64,
    detail: String,
}

/// N watchers (100 streams a connection) each replaying all `expected` updates of
/// `id` at once: deliveries per second from the first call to the last receipt.
async fn replay_throughput(
    addr: std::net::SocketAddr,
    id: &str,
    n: usize,
    expected: u64,
) -> Throughput {
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(100) {
        channels.push(common::connect(addr).await);
    }
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = channels[i / 100].clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                let mut stream = client
                    .watch_deployment(WatchRequest {
                        deployment_id: id,
                        after_sequence: 0,
                    })
                    .await
                    .expect("watch")
                    .into_inner();
                let mut got = 0u64;
                while let Some(u) = stream.message().await.expect("watch stream") {
                    if !u.heartbeat {
                        got += 1;
                    }
                }
                got
            })
        })
        .collect();
    let mut got = 0;
    for task in tasks {
        got += task.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let want = expected * n as u64;
    Throughput {
        rate: got as f64 / secs,
        detail: format!(
            "{got} of {want} in {secs:.2}s{}",
            if got == want { "" } else { ", SHORT" }
        ),
    }
}

#[derive(Default)]
struct Watched {
    unique: u64,
    dups: u64,
    latencies: Vec<f64>,
    last_at: Option<SystemTime>,
}

/// One watcher: counts each sequence once, duplicates apart, and the latency of the
/// updates emitted after `live_from` was set.
async fn watch(
    mut client: Client,
    id: String,
    connected: Arc<AtomicUsize>,
    live_from: Arc<OnceLock<SystemTime>>,
) -> Watched {
    let mut stream = client
        .watch_deployment(WatchRequest {
            deployment_id: id,
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = BTreeSet::new();
    let mut w = Watched::default();
    while let Some(u) = stream.message().await.expect("watch stream") {
        if u.heartbeat {
            continue;
        }
        let now = SystemTime::now();
        if seen.is_empty() {
            connected.fetch_add(1, Ordering::Relaxed);
        }
        if !seen.insert(u.sequence) {
            w.dups += 1;
        }
        if let (Some(from), Some(ts)) = (live_from.get(), u.timestamp.as_ref()) {
            let at = to_system(ts);
            if at >= *from {
                w.latencies.push(secs_between(at, now));
            }
        }
        w.last_at = Some(now);
    }
    w.unique = seen.len() as u64;
    w
}

/// The unit of [`cpu_ticks`].
fn clock_ticks_per_sec() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Voluntary and involuntary context switches of `pid`'s threads alive now (a thread
/// that has ended takes its count with it).
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The server's worker threads: `STEVEDORE_WORKER_THREADS` as the spawned server
/// inherits it, else the server's own default for this host.
fn worker_threads() -> usize {
    let config = stevedore::server::ServeConfig {
        worker_threads: std::env::var("STEVEDORE_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..stevedore::server::ServeConfig::defaults()
    };
    config.runtime_workers(std::thread::available_parallelism().map_or(1, usize::from))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
