//! The `stevedore` client commands, run as the real binary against a real server
//! (`stevedore serve`, also the binary) and a real Docker engine: every exit code from
//! a real outcome, the JSON lines' stream contract, plain output without control
//! codes, the tty display in a real terminal (a pty), Ctrl-C, `--timeout`, `--detach`,
//! and a server restarted in the middle of a deployment.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const WEB1: &str = "stevedore-test/web:1";
const CRASH: &str = "stevedore-test/crash:1";
const SLOWHEALTH: &str = "stevedore-test/slowhealth:1";

/// What a finished CLI run printed, and its exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `stevedore ARGS` talking to `addr`, with a clean client environment.
fn command(addr: SocketAddr, args: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(args)
        .env("STEVEDORE_ADDR", format!("http://{addr}"))
        .env_remove("STEVEDORE_TOKEN")
        .env_remove("STEVEDORE_OUTPUT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    c
}

fn cli(addr: SocketAddr, args: &[&str]) -> Run {
    let out = command(addr, args).output().expect("stevedore runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A child `stevedore ARGS` with stdout and stderr piped.
fn spawn_cli(addr: SocketAddr, args: &[&str]) -> Child {
    command(addr, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stevedore starts")
}

/// Waits for `child` and collects what it printed (`stdout_so_far`: what was read
/// from its stdout, when it was taken).
fn finish(mut child: Child, stdout_so_far: String) -> Run {
    let mut stdout = stdout_so_far;
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout).unwrap();
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut stderr).unwrap();
    }
    let status = child.wait().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

/// A child's stdout, read as it comes.
struct Stdout {
    reader: BufReader<std::process::ChildStdout>,
    text: String,
}

fn stdout_of(child: &mut Child) -> Stdout {
    Stdout {
        reader: BufReader::new(child.stdout.take().unwrap()),
        text: String::new(),
    }
}

impl Stdout {
    /// Reads lines until `want` matches one, and returns that line.
    fn until(&mut self, want: impl Fn(&str) -> bool) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "stdout ended before the expected line; read:\n{}",
                self.text
            );
            self.text.push_str(&line);
            if want(&line) {
                return line;
            }
        }
    }

    /// Everything the child printed on stdout, once it has closed it.
    fn rest(mut self) -> String {
        self.reader.read_to_string(&mut self.text).unwrap();
        self.text
    }
}

fn kill(signal: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

/// The updates of `--output json`, each line checked to be one JSON object.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect()
}

fn seq(u: &Value) -> u64 {
    u["sequence"].as_str().unwrap().parse().unwrap()
}

/// The stream contract on the CLI's JSON lines: one deployment, sequences 1..n with no
/// gap or duplicate, `totalProgress` never decreasing, no heartbeat, exactly one
/// terminal update and it is last; each line parses as a `ProgressUpdate` in the
/// proto3 JSON mapping.
fn assert_stream_contract(updates: &[Value]) {
    assert!(!updates.is_empty());
    let id = updates[0]["deploymentId"].as_str().unwrap();
    let mut last_total = 0.0;
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(u["deploymentId"], id);
        assert_eq!(seq(u), i as u64 + 1, "gap or duplicate at line {i}: {u}");
        let total = u["totalProgress"].as_f64().unwrap_or(0.0);
        assert!(total >= last_total, "totalProgress went back at {u}");
        last_total = total;
        assert!(u.get("heartbeat").is_none(), "heartbeat printed: {u}");
        assert_eq!(u.get("result").is_some(), i == updates.len() - 1, "{u}");
        let typed: stevedore::cli::proto::ProgressUpdate =
            serde_json::from_value(u.clone()).expect("a ProgressUpdate in the JSON mapping");
        assert_eq!(typed.sequence, i as u64 + 1);
    }
}

fn deployment_id(updates: &[Value]) -> String {
    updates[0]["deploymentId"].as_str().unwrap().to_owned()
}

fn state_of(addr: SocketAddr, id: &str) -> String {
    let r = cli(addr, &["status", id, "-o", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    v["state"].as_str().unwrap().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `stevedore serve` child on ephemeral ports with its own data dir.
struct Server {
    server: BinaryServer,
    _data: tempfile::TempDir,
}

impl std::ops::Deref for Server {
    type Target = BinaryServer;
    fn deref(&self) -> &BinaryServer {
        &self.server
    }
}

fn server_with(args: &[&str]) -> Server {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    Server {
        server: BinaryServer::spawn(data.path(), args),
        _data: data,
    }
}

fn server() -> Server {
    server_with(&[])
}

#[test]
fn a_deploy_that_succeeds_exits_0_and_its_json_lines_keep_the_contract() {
    let s = server();
    let app = unique_app("cli-ok");
    let _guard = AppGuard(app.clone());
    let r = cli(
        s.grpc_addr,
        &["deploy", &app, WEB1, "-p", "8080", "-o", "json"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let updates = json_lines(&r.stdout);
    assert_stream_contract(&updates);
    let end = updates.last().unwrap();
    assert_eq!(end["phase"], "PHASE_COMPLETE");
    assert_eq!(end["result"]["success"], true);
    assert!(end["result"]["endpoints"]["8080/tcp"].is_string(), "{end}");
    assert!(r.stderr.is_empty(), "json mode prints nothing else: {r:?}");

    // `watch` of the finished deployment replays the same log, and `status`/`list`
    // answer in JSON too.
    let id = deployment_id(&updates);
    let w = cli(s.grpc_addr, &["watch", &id, "-o", "json"]);
    assert_eq!(w.code, 0, "{w:?}");
    assert_eq!(json_lines(&w.stdout), updates);
    let w = cli(s.grpc_addr, &["watch", &id, "--after", "3", "-o", "json"]);
    assert_eq!(json_lines(&w.stdout), updates[3..]);
    assert_eq!(state_of(s.grpc_addr, &id), "DEPLOYMENT_STATE_SUCCEEDED");
    let l = cli(s.grpc_addr, &["list", "--app", &app, "-o", "json"]);
    assert_eq!(l.code, 0, "{l:?}");
    assert_eq!(json_lines(&l.stdout).len(), 1);
    let l = cli(s.grpc_addr, &["list", "--app", &app, "-o", "plain"]);
    assert!(
        l.stdout.contains(&id) && l.stdout.contains("succeeded"),
        "{l:?}"
    );

    // `apps` (ListApps) names what runs now: this deployment, its image and endpoint.
    let a = cli(s.grpc_addr, &["apps", "-o", "json"]);
    assert_eq!(a.code, 0, "{a:?}");
    let ours: Vec<_> = json_lines(&a.stdout)
        .into_iter()
        .filter(|x| x["app"] == app.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{a:?}");
    assert_eq!(
        ours[0]["current"]["deploymentId"],
        id.as_str(),
        "{}",
        ours[0]
    );
    assert_eq!(ours[0]["current"]["image"], WEB1);
    assert_eq!(
        ours[0]["current"]["endpoints"]["8080/tcp"],
        end["result"]["endpoints"]["8080/tcp"]
    );
    let a = cli(s.grpc_addr, &["apps", "-o", "plain"]);
    let line = a.stdout.lines().find(|l| l.starts_with(app.as_str()));
    assert!(
        line.is_some_and(|l| l.contains(WEB1) && l.contains("succeeded")),
        "{a:?}"
    );
}

#[test]
fn remove_stops_and_removes_the_app_and_follows_the_removal_to_its_end() {
    let s = server();
    let app = unique_app("cli-rm");
    let _guard = AppGuard(app.clone());
    let d = cli(
        s.grpc_addr,
        &["deploy", &app, WEB1, "-p", "8080", "-o", "plain"],
    );
    assert_eq!(d.code, 0, "{d:?}");
    assert_eq!(app_containers(&app).len(), 1, "{d:?}");

    let r = cli(
        s.grpc_addr,
        &["remove", &app, "--stop-timeout", "2s", "-o", "plain"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let id = lines[0]
        .strip_prefix("removal ")
        .and_then(|l| l.strip_suffix(&format!(" (app {app})")))
        .unwrap_or_else(|| panic!("first line names the removal: {r:?}"));
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{r:?}");
    for want in [
        "switching",
        &format!("stopping the containers of app {app}"),
        "cleanup",
        &format!("removed {app} in "),
        &format!("1 container stopped and removed (removal {id})"),
    ] {
        assert!(r.stdout.contains(want), "missing {want:?}: {r:?}");
    }
    assert!(!r.stdout.contains("deployed"), "{r:?}");
    assert!(app_containers(&app).is_empty(), "{r:?}");

    // The removal is an operation of its own: `watch` replays it in JSON, `status`
    // names it, and `apps` no longer lists the app.
    let w = cli(s.grpc_addr, &["watch", id, "-o", "json"]);
    assert_eq!(w.code, 0, "{w:?}");
    let updates = json_lines(&w.stdout);
    assert_stream_contract(&updates);
    let end = updates.last().unwrap();
    assert_eq!(end["operation"], "OPERATION_REMOVE_APP", "{end}");
    assert_eq!(end["result"]["containersRemoved"], 1, "{end}");
    let st = cli(s.grpc_addr, &["status", id, "-o", "plain"]);
    assert!(
        st.stdout.starts_with("removal ")
            && st.stdout.contains(id)
            && st.stdout.contains("removed       1 container(s)"),
        "{st:?}"
    );
    let a = cli(s.grpc_addr, &["apps", "-o", "plain"]);
    assert_eq!(a.code, 0, "{a:?}");
    assert!(!a.stdout.contains(app.as_str()), "{a:?}");
    let a = cli(s.grpc_addr, &["apps", "-o", "json"]);
    assert_eq!(a.code, 0, "{a:?}");
    assert!(
        json_lines(&a.stdout)
            .iter()
            .all(|x| x["app"] != app.as_str()),
        "{a:?}"
    );

    // `--detach` prints the ID only, and the removal (nothing left to remove) ends
    // SUCCEEDED with 0 containers.
    let r = cli(s.grpc_addr, &["remove", &app, "--detach"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{r:?}");
    assert!(
        r.stderr.contains(&format!("removal {id} accepted")),
        "{r:?}"
    );
    let w = cli(s.grpc_addr, &["watch", &id, "-o", "plain"]);
    assert_eq!(w.code, 0, "{w:?}");
    assert!(
        w.stdout.contains("0 containers stopped and removed"),
        "{w:?}"
    );
}

/// `--drain-timeout` reaches the server (request field 22): with a proxy, a connection
/// held open to the previous version is drained for at most that long, as the stream's
/// drain reports say (never more seconds left than the flag gave; the default is 30).
#[test]
fn drain_timeout_bounds_the_drain_of_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = common::proxy::ProxyProcess::spawn(dir.path(), &[]);
    let socket = proxy.socket.display().to_string();
    let s = server_with(&["--proxy-socket", &socket]);
    let app = unique_app("cli-drain");
    let _guard = AppGuard(app.clone());
    let public = free_port();
    let port = format!("{public}:8080");
    let first = cli(
        s.grpc_addr,
        &["deploy", &app, WEB1, "-p", &port, "-o", "json"],
    );
    assert_eq!(first.code, 0, "{first:?}");

    let mut held = std::net::TcpStream::connect(("127.0.0.1", public)).unwrap();
    let run = cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            "stevedore-test/web:2",
            "-p",
            &port,
            "--drain-timeout",
            "1s",
            "-o",
            "json",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let updates = json_lines(&run.stdout);
    assert_stream_contract(&updates);
    let drains: Vec<&Value> = (updates.iter())
        .filter(|u| u["metadata"].get("drain_seconds_left").is_some())
        .collect();
    assert!(
        drains
            .iter()
            .any(|u| u["metadata"]["draining_connections"] == "1"),
        "the held connection is reported: {run:?}"
    );
    for u in &drains {
        let left: u64 = u["metadata"]["drain_seconds_left"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(left <= 1, "more than --drain-timeout left: {u}");
    }
    // The proxy closed the held connection when the drain timeout ended.
    held.set_read_timeout(Some(STATE_LIMIT)).unwrap();
    let mut buf = [0u8; 16];
    let cut = std::io::Read::read(&mut held, &mut buf);
    assert!(matches!(cut, Ok(0) | Err(_)), "not closed: {cut:?}");
    assert!(
        !matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "not closed within {STATE_LIMIT:?}"
    );
}

#[test]
fn a_failing_image_exits_1_with_plain_output_free_of_control_codes() {
    let s = server();
    let app = unique_app("cli-crash");
    let _guard = AppGuard(app.clone());
    let r = cli(s.grpc_addr, &["deploy", &app, CRASH, "-o", "plain"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        !r.stdout.contains('\x1b') && !r.stderr.contains('\x1b'),
        "{r:?}"
    );
    assert!(!r.stdout.contains('\r'), "{r:?}");
    // The container exits while it starts or is health-checked, depending on timing.
    for want in [
        "failed in ",
        "failed after",
        "exit code 1",
        "| fatal: config missing",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?}: {r:?}");
    }
    // `--output auto` without a terminal is plain too.
    let auto = cli(s.grpc_addr, &["deploy", &app, CRASH]);
    assert_eq!(auto.code, 1, "{auto:?}");
    assert!(!auto.stdout.contains('\x1b') && !auto.stderr.contains('\x1b'));
    assert!(auto.stdout.contains("exit code 1"), "{auto:?}");
}

#[test]
fn usage_errors_exit_2() {
    let s = server();
    for args in [
        vec!["deploy"],
        vec!["deploy", "web", WEB1, "--port", "http"],
        vec!["deploy", "web", WEB1, "--health", "grpc:80"],
        vec!["deploy", "-f", "/nonexistent/request.toml"],
        vec!["watch"],
        vec!["list", "--state", "sleepy"],
    ] {
        let r = cli(s.grpc_addr, &args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stdout.is_empty(), "{args:?}: {r:?}");
    }
    // The server refuses the request (INVALID_ARGUMENT, naming the field).
    let r = cli(s.grpc_addr, &["deploy", "Not_An_App", WEB1]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("app"), "{r:?}");
}

#[test]
fn a_deploy_from_a_toml_file_with_flags_over_it() {
    let s = server();
    let app = unique_app("cli-file");
    let _guard = AppGuard(app.clone());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deploy.toml");
    std::fs::write(
        &file,
        format!(
            "app = \"{app}\"\nimage = \"{CRASH}\"\n[[ports]]\ncontainer_port = 8080\n\
             [health_check]\ntimeout = \"30s\"\n[health_check.http]\nport = 8080\npath = \"/\"\n"
        ),
    )
    .unwrap();
    // The file's image crashes; the flag's image serves.
    let r = cli(s.grpc_addr, &["deploy", "-f", file.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    let r = cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            WEB1,
            "-f",
            file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let end = json_lines(&r.stdout).pop().unwrap();
    assert_eq!(end["result"]["health"][0]["check"], "http", "{end}");
}

#[test]
fn a_cancelled_deployment_exits_3() {
    let s = server();
    let app = unique_app("cli-cancel");
    let _guard = AppGuard(app.clone());
    let mut child = spawn_cli(
        s.grpc_addr,
        &["deploy", &app, SLOWHEALTH, "-p", "8080", "-o", "json"],
    );
    let mut out = stdout_of(&mut child);
    let line = out.until(|l| l.contains("PHASE_HEALTH_CHECK"));
    let id = deployment_id(&json_lines(&line));
    let c = cli(s.grpc_addr, &["cancel", &id]);
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("cancelled"), "{c:?}");
    let r = finish(child, out.rest());
    assert_eq!(r.code, 3, "{r:?}");
    let updates = json_lines(&r.stdout);
    assert_stream_contract(&updates);
    assert_eq!(updates.last().unwrap()["phase"], "PHASE_CANCELLED");
    // Watching it again ends the same way, and cancelling it again is an error.
    assert_eq!(cli(s.grpc_addr, &["watch", &id, "-o", "quiet"]).code, 3);
    let again = cli(s.grpc_addr, &["cancel", &id]);
    assert_eq!(again.code, 4, "{again:?}");
}

#[test]
fn cancel_on_interrupt_cancels_and_waits_for_the_end() {
    let s = server();
    let app = unique_app("cli-coi");
    let _guard = AppGuard(app.clone());
    let mut child = spawn_cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            SLOWHEALTH,
            "-p",
            "8080",
            "-o",
            "json",
            "--cancel-on-interrupt",
        ],
    );
    let mut out = stdout_of(&mut child);
    out.until(|l| l.contains("PHASE_HEALTH_CHECK"));
    kill("-INT", child.id());
    let r = finish(child, out.rest());
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("cancelling deployment"), "{r:?}");
    let updates = json_lines(&r.stdout);
    assert_stream_contract(&updates);
    assert_eq!(updates.last().unwrap()["phase"], "PHASE_CANCELLED");
}

#[test]
fn an_unreachable_server_exits_4_with_one_line_naming_the_address() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for args in [
        vec!["deploy", "web", WEB1],
        vec!["status", "6f0e0000-0000-4000-8000-000000000000"],
        vec!["list"],
    ] {
        let r = cli(addr, &args);
        assert_eq!(r.code, 4, "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
        assert!(r.stderr.contains(&addr.to_string()), "{r:?}");
        assert!(r.stdout.is_empty(), "{r:?}");
    }
}

#[test]
fn an_unknown_deployment_exits_5() {
    let s = server();
    let id = uuid::Uuid::new_v4().to_string();
    for cmd in ["status", "watch", "cancel"] {
        let r = cli(s.grpc_addr, &[cmd, &id]);
        assert_eq!(r.code, 5, "{cmd}: {r:?}");
        assert!(r.stderr.contains(&id), "{cmd}: {r:?}");
    }
}

#[test]
fn timeout_exits_124_and_the_deployment_keeps_running() {
    let s = server();
    let app = unique_app("cli-timeout");
    let _guard = AppGuard(app.clone());
    let r = cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            SLOWHEALTH,
            "-p",
            "8080",
            "-o",
            "json",
            "--timeout",
            "3s",
        ],
    );
    assert_eq!(r.code, 124, "{r:?}");
    let updates = json_lines(&r.stdout);
    let id = deployment_id(&updates);
    assert!(updates.iter().all(|u| u.get("result").is_none()));
    let last = seq(updates.last().unwrap());
    assert!(
        r.stderr
            .contains(&format!("stevedore watch {id} --after {last}")),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!("stevedore cancel {id}")),
        "{r:?}"
    );
    assert_eq!(state_of(s.grpc_addr, &id), "DEPLOYMENT_STATE_RUNNING");
    assert_eq!(
        cli(s.grpc_addr, &["cancel", &id, "--wait", "-o", "quiet"]).code,
        3
    );
}

#[test]
fn detach_prints_the_id_and_exits_0_at_once() {
    let s = server();
    let app = unique_app("cli-detach");
    let _guard = AppGuard(app.clone());
    let r = cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            WEB1,
            "-p",
            "8080",
            "--hook",
            "wait=sleep 2",
            "--detach",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{r:?}");
    assert!(r.stderr.contains(&format!("stevedore watch {id}")), "{r:?}");
    let state = state_of(s.grpc_addr, &id);
    assert!(
        state == "DEPLOYMENT_STATE_RUNNING" || state == "DEPLOYMENT_STATE_PENDING",
        "{state}"
    );
    let w = cli(s.grpc_addr, &["watch", &id, "-o", "json"]);
    assert_eq!(w.code, 0, "{w:?}");
    assert_stream_contract(&json_lines(&w.stdout));
}

#[test]
fn ctrl_c_detaches_and_the_deployment_still_succeeds() {
    let s = server();
    let app = unique_app("cli-sigint");
    let _guard = AppGuard(app.clone());
    let mut child = spawn_cli(
        s.grpc_addr,
        &[
            "deploy",
            &app,
            WEB1,
            "-p",
            "8080",
            "--hook",
            "wait=sleep 3",
            "-o",
            "plain",
        ],
    );
    let mut out = stdout_of(&mut child);
    let line = out.until(|l| l.starts_with("deployment "));
    let id = line.split_whitespace().nth(1).unwrap().to_owned();
    kill("-INT", child.id());
    let r = finish(child, out.rest());
    assert_eq!(r.code, 130, "{r:?}");
    assert!(r.stderr.contains(&format!("stevedore watch {id}")), "{r:?}");
    assert!(
        r.stderr.contains(&format!("stevedore cancel {id}")),
        "{r:?}"
    );
    let w = cli(s.grpc_addr, &["watch", &id, "-o", "json"]);
    assert_eq!(w.code, 0, "the deployment went on and succeeded: {w:?}");
    let updates = json_lines(&w.stdout);
    assert_stream_contract(&updates);
    assert_eq!(updates.last().unwrap()["phase"], "PHASE_COMPLETE");
}

/// A server child process; killed (if still running) and waited for on drop.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stevedore serve` on a fixed gRPC port (so it can be restarted on the same one).
fn spawn_server_on(port: u16, data: &Path, log: &Path) -> ServerProcess {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = ServerProcess(
        Command::new(binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let starts = |text: &str| text.matches("stevedore listening").count();
    let before = starts(&std::fs::read_to_string(log).unwrap_or_default());
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if starts(&text) > before || (before == 0 && starts(&text) == 1) {
            return child;
        }
        assert!(Instant::now() < deadline, "server did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server binary on a fixed free port (so a restart keeps the address) and
/// `stevedore deploy` of web:1 with a hook `HOOK` (plus `extra` flags) against it.
struct DeployBehindServer {
    _guard: AppGuard,
    data: tempfile::TempDir,
    log: std::path::PathBuf,
    port: u16,
    server: ServerProcess,
    child: Child,
}

impl DeployBehindServer {
    fn start(prefix: &str, hook: &str, extra: &[&str]) -> Self {
        require_docker();
        let app = unique_app(prefix);
        let _guard = AppGuard(app.clone());
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("server.log");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let server = spawn_server_on(port, data.path(), &log);
        let mut args = vec![
            "deploy", &app, WEB1, "-p", "8080", "--hook", hook, "-o", "json",
        ];
        args.extend_from_slice(extra);
        let child = spawn_cli(addr, &args);
        Self {
            _guard,
            data,
            log,
            port,
            server,
            child,
        }
    }
}

#[test]
fn a_server_restarted_mid_deploy_and_the_cli_ends_with_the_terminal_result() {
    let d = DeployBehindServer::start("cli-restart", "wait=sleep 4", &[]);
    let (mut first, mut child, port, log) = (d.server, d.child, d.port, d.log);
    let data = d.data;
    let mut out = stdout_of(&mut child);
    out.until(|l| l.contains("PHASE_HOOKS"));
    // SIGTERM: the server ends open streams with UNAVAILABLE, lets the deployment
    // finish within its shutdown grace, and exits; the CLI keeps trying meanwhile.
    kill("-TERM", first.0.id());
    assert!(first.0.wait().unwrap().success());
    std::thread::sleep(Duration::from_secs(1));
    let second = spawn_server_on(port, data.path(), &log);
    let r = finish(child, out.rest());
    drop(second);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("resuming after update"), "{r:?}");
    let updates = json_lines(&r.stdout);
    assert_stream_contract(&updates);
    assert_eq!(updates.last().unwrap()["phase"], "PHASE_COMPLETE");
}

#[test]
fn a_stream_that_cannot_resume_exits_4_with_the_command_to_resume() {
    let d = DeployBehindServer::start(
        "cli-giveup",
        "wait=sleep 30",
        &["--reconnect-timeout", "2s"],
    );
    let (mut server, mut child) = (d.server, d.child);
    let mut out = stdout_of(&mut child);
    let line = out.until(|l| l.contains("PHASE_HOOKS"));
    let id = deployment_id(&json_lines(&line));
    kill("-KILL", server.0.id());
    let _ = server.0.wait();
    let r = finish(child, out.rest());
    assert_eq!(r.code, 4, "{r:?}");
    let last = seq(json_lines(&r.stdout).last().unwrap());
    assert!(
        r.stderr
            .contains(&format!("stevedore watch {id} --after {last}")),
        "{r:?}"
    );
}

#[test]
fn out_of_range_is_reported_as_such() {
    let s = server_with(&["--retention-max-log-updates", "3"]);
    let app = unique_app("cli-oor");
    let _guard = AppGuard(app.clone());
    let r = cli(s.grpc_addr, &["deploy", &app, CRASH, "-o", "json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&json_lines(&r.stdout));
    // Retention trims the finished log; give it a moment to be applied.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = cli(s.grpc_addr, &["watch", &id, "--after", "1"]);
        if w.code == 4 {
            assert!(w.stderr.contains("OUT_OF_RANGE"), "{w:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never OUT_OF_RANGE: {w:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `stevedore ARGS` in a pseudo-terminal (120x40) and returns everything it
/// drew, and its exit code. With `interrupt_after`, types Ctrl-C once the drawn text
/// (escape sequences removed) contains it.
fn run_in_pty(addr: SocketAddr, args: &[&str], interrupt_after: Option<&str>) -> (String, u32) {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};
    use std::sync::{Arc, Mutex};
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: 40,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(binary());
    cmd.args(args);
    cmd.env("STEVEDORE_ADDR", format!("http://{addr}"));
    cmd.env("TERM", "xterm-256color");
    cmd.env_remove("NO_COLOR");
    cmd.env_remove("STEVEDORE_OUTPUT");
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader().unwrap();
    let drawn = Arc::new(Mutex::new(Vec::new()));
    let sink = drawn.clone();
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child has exited.
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    if let Some(text) = interrupt_after {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let so_far = strip_ansi(&String::from_utf8_lossy(&drawn.lock().unwrap()));
            if so_far.contains(text) {
                break;
            }
            assert!(Instant::now() < deadline, "{text:?} never drawn:\n{so_far}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut keys = pair.master.take_writer().unwrap();
        std::io::Write::write_all(&mut keys, b"\x03").unwrap();
    }
    let status = child.wait().unwrap();
    drop(pair.master);
    reading.join().unwrap();
    let out = drawn.lock().unwrap().clone();
    (
        String::from_utf8_lossy(&out).into_owned(),
        status.exit_code(),
    )
}

/// Terminal output without escape sequences, `\r` as line breaks.
fn strip_ansi(s: &str) -> String {
    let re = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").unwrap();
    re.replace_all(s, "").replace('\r', "\n")
}

#[test]
fn in_a_terminal_phase_lines_and_a_pull_bar_with_bytes_appear() {
    let s = server();
    let app = unique_app("cli-tty");
    let guard = AppGuard(app.clone());
    let (image, _) = push_random_image(24);
    let (drawn, code) = run_in_pty(s.grpc_addr, &["deploy", &app, &image, "-p", "8080"], None);
    assert_eq!(code, 0, "{drawn}");
    let text = strip_ansi(&drawn);
    for phase in ["queued", "pulling", "creating", "starting", "health check"] {
        let line = regex::Regex::new(&format!(r"✔ {phase} +\d+\.\ds")).unwrap();
        assert!(line.is_match(&text), "no phase line for {phase}:\n{text}");
    }
    let pull_bar = regex::Regex::new(r"image +\[[=> ]+\] [\d.]+ [KMG]?i?B/[\d.]+ MiB").unwrap();
    assert!(pull_bar.is_match(&text), "no pull bar with bytes:\n{text}");
    assert!(text.contains(&format!("deployed {app} in")), "{text}");
    assert!(text.contains("endpoint  8080/tcp"), "{text}");
    assert!(drawn.contains('\x1b'), "a terminal gets a live display");
    // The pulled image goes too, once its container is gone.
    drop(guard);
    let _ = Command::new("docker").args(["rmi", &image]).output();
}

/// Makes, with openssl (as docs/SECURITY.md does): a CA, a server certificate for
/// 127.0.0.1, a client key with a v3 and a v1 certificate (`x509 -req` without
/// extensions), and a second CA.
fn make_certs(dir: &Path) {
    let script = r#"
set -e
ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "$@" 2>/dev/null; }
ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$1.key" -out "$1.pem" -subj "/CN=$1" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null; }
sign() { openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out "$2" "${@:3}" 2>/dev/null; }
ca ca
ca other-ca
ec -keyout server.key -out server.csr -subj /CN=127.0.0.1
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
sign server server.pem -extfile server.ext
ec -keyout client.key -out client.csr -subj /CN=client
printf 'extendedKeyUsage=clientAuth\n' >client.ext
sign client client-v3.pem -extfile client.ext
sign client client-v1.pem
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("bash and openssl run");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_refused_tls_handshake_names_its_likely_cause() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let s = server_with(&[
        "--tls-cert",
        &file("server.pem"),
        "--tls-key",
        &file("server.key"),
        "--tls-client-ca",
        &file("ca.pem"),
    ]);
    let https = format!("https://{}", s.grpc_addr);
    let cases: [(Vec<String>, i32, &str); 5] = [
        (
            vec!["--ca".into(), file("ca.pem")],
            4,
            "requires a client certificate",
        ),
        (
            vec![
                "--ca".into(),
                file("ca.pem"),
                "--cert".into(),
                file("client-v1.pem"),
                "--key".into(),
                file("client.key"),
            ],
            2,
            "is X.509 v1",
        ),
        (
            vec![
                "--ca".into(),
                file("other-ca.pem"),
                "--cert".into(),
                file("client-v3.pem"),
                "--key".into(),
                file("client.key"),
            ],
            4,
            "unknown CA",
        ),
        (
            vec![
                "--ca".into(),
                file("ca.pem"),
                "--cert".into(),
                file("client-v3.pem"),
                "--key".into(),
                file("client.key"),
            ],
            0,
            "",
        ),
        (vec![], 4, "does it serve TLS?"),
    ];
    for (flags, code, cause) in cases {
        let server = if flags.is_empty() {
            format!("http://{}", s.grpc_addr)
        } else {
            https.clone()
        };
        let mut args = vec!["list", "--server", &server];
        args.extend(flags.iter().map(String::as_str));
        let r = cli(s.grpc_addr, &args);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        if code != 0 {
            assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
            assert!(r.stderr.contains(cause), "{args:?}: {r:?}");
            assert!(
                r.stderr.contains(&s.grpc_addr.to_string()) || r.stderr.contains("client-v1.pem"),
                "{r:?}"
            );
        }
    }
}

#[test]
fn a_missing_or_refused_token_exits_4_naming_the_address() {
    let out = Command::new(binary())
        .args(["token", "new", "cli", "--scope", "read"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let secret = text.lines().nth(1).unwrap().to_owned();
    let entry = text.split_once("[[token]]").unwrap().1;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, format!("[[token]]{entry}")).unwrap();
    let s = server_with(&["--tokens-file", tokens.to_str().unwrap()]);
    let addr = s.grpc_addr.to_string();

    let r = cli(s.grpc_addr, &["list"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("requires a token") && r.stderr.contains(&addr),
        "{r:?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");

    let r = cli(s.grpc_addr, &["list", "--token", "stv_wrong"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("refused the token") && r.stderr.contains(&addr),
        "{r:?}"
    );

    let r = command(s.grpc_addr, &["list", "-o", "json"])
        .env("STEVEDORE_TOKEN", &secret)
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");

    // A read-only token may not remove an app.
    let r = cli(
        s.grpc_addr,
        &["remove", &unique_app("cli-rm-ro"), "--token", &secret],
    );
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("refused permission") && r.stderr.contains(&addr),
        "{r:?}"
    );
}

#[test]
fn ctrl_c_in_a_terminal_detaches_with_the_commands_to_follow_or_stop() {
    let s = server();
    let app = unique_app("cli-tty-int");
    let _guard = AppGuard(app.clone());
    let (drawn, code) = run_in_pty(
        s.grpc_addr,
        &["deploy", &app, WEB1, "-p", "8080", "--hook", "wait=sleep 3"],
        Some("✔ health check"),
    );
    assert_eq!(code, 130, "{drawn}");
    let text = strip_ansi(&drawn);
    let id = regex::Regex::new(r"deployment ([0-9a-f-]{36}) of")
        .unwrap()
        .captures(&text)
        .unwrap_or_else(|| panic!("no deployment ID drawn:\n{text}"))[1]
        .to_owned();
    assert!(text.contains("detached"), "{text}");
    assert!(
        text.contains(&format!("stevedore watch {id} --after ")),
        "{text}"
    );
    assert!(text.contains(&format!("stevedore cancel {id}")), "{text}");
    let w = cli(s.grpc_addr, &["watch", &id, "-o", "json"]);
    assert_eq!(w.code, 0, "the deployment went on and succeeded: {w:?}");
}
