//! `stevedore proxy` as a child process, driven through its admin socket (tests/proxy.rs,
//! and the server's tests with a proxy in tests/zdt.rs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stevedore::proxy::client::ProxyClient;

/// Starts `stevedore proxy FILES… ARGS…` with `env`, its log (stderr) in a new file
/// in `dir`; the child and the log's path.
fn start(
    dir: &Path,
    files: &[&std::ffi::OsStr],
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, PathBuf) {
    let log = dir.join(format!("proxy-{}.log", uuid::Uuid::new_v4().simple()));
    let child = Command::new(super::binary())
        .arg("proxy")
        .args(files)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn stevedore proxy");
    (child, log)
}

/// A `stevedore proxy` child process; killed on drop.
pub struct ProxyProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl ProxyProcess {
    /// Starts the proxy with its files in `dir` and waits until it announces itself.
    pub fn spawn(dir: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(dir, args, &[])
    }

    // The child is waited for in `terminate` or `Drop`.
    #[allow(clippy::zombie_processes)]
    pub fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join("proxy.sock");
        let state_file = dir.join("routes.json");
        let mut files: Vec<&std::ffi::OsStr> = Vec::new();
        if env.is_empty() {
            files.extend([
                "--admin-socket".as_ref(),
                socket.as_os_str(),
                "--state-file".as_ref(),
                state_file.as_os_str(),
                "--metrics-listen".as_ref(),
                "127.0.0.1:0".as_ref(),
            ]);
        }
        let (mut child, log) = start(dir, &files, args, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("stevedore proxy listening"))
            {
                let start = line.find("metrics=").unwrap() + "metrics=".len();
                let metrics = line[start..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return Self {
                    child,
                    socket,
                    state_file,
                    metrics,
                    log,
                };
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("proxy did not start ({exited:?}); log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `stevedore proxy` with only `args` and `env` (a run expected to end, such as a
    /// refused start) until it exits; its status and log. Panics after `limit`.
    pub fn run_to_exit(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        limit: Duration,
    ) -> (std::process::ExitStatus, String) {
        let (mut child, log) = start(dir, &[], args, env);
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "proxy still running after {limit:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Starts a proxy that takes the sockets over from the one running in `dir`
    /// (`--takeover`) and waits until it announces itself.
    pub fn take_over(dir: &Path) -> Self {
        Self::spawn(dir, &["--takeover"])
    }

    /// The hand-over socket beside the admin socket.
    pub fn handover_socket(&self) -> PathBuf {
        let mut name = self.socket.as_os_str().to_owned();
        name.push(".handover");
        PathBuf::from(name)
    }

    pub fn client(&self) -> ProxyClient {
        ProxyClient::new(&self.socket).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the process to exit (after [`Self::sigterm`]); panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy still running after {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn metrics_text(&self) -> String {
        super::http_get(&format!("http://{}/metrics", self.metrics))
            .await
            .1
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("proxy log:\n{}", self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
