//! HEALTH_CHECK's probes, one small function each: the image's HEALTHCHECK (`docker`),
//! a TCP connection, an HTTP GET, a line of output (`log`), and a settle time when
//! nothing else applies. [`super::run`] calls [`probe_once`] once per attempt and
//! decides from its [`Verdict`] whether to stop, fail or try again; the first attempt
//! comes at once, the next ones after [`retry_delay`]. Between attempts it reads the
//! new container's [`Output`] (the log check and the milestones).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::deployment::{Extra, Reporter};
use super::milestones::MilestoneTracker;
use crate::model::{HealthProbe, Level, Protocol};
use crate::runtime::{ContainerState, DockerHealth, PublishedPort};

/// The wait after the first failed attempt; it doubles after each failed attempt up
/// to the check's interval. An app is often listening a few milliseconds after its
/// start: a full interval after the first (too early) attempt is time lost.
const FIRST_RETRY: Duration = Duration::from_millis(5);

/// How long a TCP probe waits for the container's own address (a local bridge answers
/// at once, refused or accepted; silence means it is not reachable from here).
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// How long to wait after failed attempt number `attempts` (1 for the first):
/// 5 ms, 10 ms, 20 ms … up to `interval`.
pub(super) fn retry_delay(attempts: u32, interval: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    FIRST_RETRY.saturating_mul(1 << doublings).min(interval)
}

/// The result of one attempt.
pub(super) enum Verdict {
    /// Healthy; the message says why.
    Pass(String),
    /// Not yet; the next attempt may pass.
    Retry(String),
    /// Cannot pass: fail now.
    Fail(String),
}

impl From<Result<String, String>> for Verdict {
    fn from(r: Result<String, String>) -> Self {
        match r {
            Ok(m) => Verdict::Pass(m),
            Err(m) => Verdict::Retry(m),
        }
    }
}

/// What one attempt can see of the container.
pub(super) struct Target<'a> {
    pub(super) state: ContainerState,
    /// The ports published when the container started.
    pub(super) ports: &'a [PublishedPort],
    pub(super) public_host: &'a str,
    pub(super) http: &'a reqwest::Client,
    /// Between attempts (an HTTP probe's own timeout follows it).
    pub(super) interval: Duration,
    /// A log check's line was printed.
    pub(super) log_matched: bool,
    /// When HEALTH_CHECK began (for the settle time).
    pub(super) started: Instant,
    pub(super) settle: Duration,
}

impl Target<'_> {
    /// Where `container_port` is reachable: the bound host address and port.
    fn published(&self, container_port: u16) -> Option<(String, u16)> {
        self.ports
            .iter()
            .find(|p| p.container_port == container_port && p.protocol == Protocol::Tcp)
            .map(|p| (p.reach_host(self.public_host), p.host_port))
    }
}

/// The new container's output during HEALTH_CHECK: the lines still to read, whether a
/// log check's pattern matched, and the milestones reached.
pub(super) struct Output {
    pub(super) lines: Option<mpsc::Receiver<String>>,
    pub(super) log_matched: bool,
    pub(super) milestones: MilestoneTracker,
}

impl Output {
    /// Reads the lines already waiting.
    pub(super) fn drain(&mut self, rep: &mut Reporter, probe: &HealthProbe) {
        let mut waiting = Vec::new();
        if let Some(rx) = self.lines.as_mut() {
            while let Ok(line) = rx.try_recv() {
                waiting.push(line);
            }
        }
        for line in waiting {
            self.on_line(rep, &line, probe);
        }
    }

    /// Reads output as it comes until `wake` (milestones go out live), or until a line
    /// matches a log check.
    pub(super) async fn read_until(
        &mut self,
        rep: &mut Reporter,
        probe: &HealthProbe,
        wake: Instant,
    ) {
        loop {
            let next = async {
                match self.lines.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                line = next => match line {
                    Some(line) => {
                        self.on_line(rep, &line, probe);
                        if self.log_matched {
                            break;
                        }
                    }
                    // The follower ended (the container exited): the next attempt says so.
                    None => self.lines = None,
                },
            }
        }
    }

    /// One line: the log check's pattern, then the milestones (each hit is an update:
    /// message = description, metadata `milestone` (index), `line`, and `count` for a
    /// counting milestone).
    fn on_line(&mut self, rep: &mut Reporter, line: &str, probe: &HealthProbe) {
        if let HealthProbe::Log { pattern } = probe {
            self.log_matched |= pattern.is_match(line);
        }
        for hit in self.milestones.apply(line) {
            let mut extra = Extra::meta([("milestone", hit.index.to_string()), ("line", hit.line)]);
            if let Some(count) = hit.count {
                extra.metadata.insert("count".into(), count.to_string());
            }
            rep.progress(hit.progress, Level::Info, hit.description, extra);
        }
    }
}

/// The first update of HEALTH_CHECK: what is probed.
pub(super) fn describe(probe: &HealthProbe, settle: Duration) -> String {
    match probe {
        HealthProbe::Docker => "waiting for the image's HEALTHCHECK to pass".to_owned(),
        HealthProbe::Tcp { port } => format!("probing TCP port {port}"),
        HealthProbe::Http {
            port,
            path,
            expect_status,
        } => format!("probing GET {path} on port {port} for status {expect_status}"),
        HealthProbe::Log { pattern } => format!("waiting for an output line matching /{pattern}/"),
        HealthProbe::None => format!(
            "no health check: the container must stay up for {}s",
            settle.as_secs_f64()
        ),
    }
}

/// One attempt of `probe` against `target`.
pub(super) async fn probe_once(probe: &HealthProbe, target: &Target<'_>) -> Verdict {
    match probe {
        HealthProbe::Docker => docker(&target.state),
        HealthProbe::Tcp { port } => match target.published(*port) {
            None => not_published(*port),
            Some((host, host_port)) => {
                let direct = (target.state.address).map(|ip| SocketAddr::new(ip, *port));
                tcp(host.trim_matches(['[', ']']), host_port, direct)
                    .await
                    .map(|()| format!("TCP port {port} accepts connections"))
                    .into()
            }
        },
        HealthProbe::Http {
            port,
            path,
            expect_status,
        } => match target.published(*port) {
            None => not_published(*port),
            Some((host, host_port)) => {
                let url = format!("http://{host}:{host_port}{path}");
                http(target.http, &url, *expect_status, target.interval)
                    .await
                    .map(|()| format!("GET {path} answered {expect_status}"))
                    .into()
            }
        },
        HealthProbe::Log { pattern } => log(target.log_matched, pattern),
        HealthProbe::None => settle(target.started, target.settle),
    }
}

fn not_published(port: u16) -> Verdict {
    Verdict::Fail(format!("container port {port}/tcp is not published"))
}

/// The image's HEALTHCHECK, as the engine reports it.
fn docker(state: &ContainerState) -> Verdict {
    match state.health {
        Some(DockerHealth::Healthy) => Verdict::Pass("image HEALTHCHECK passed".into()),
        Some(DockerHealth::Unhealthy) => Verdict::Fail(format!(
            "image HEALTHCHECK reported unhealthy{}",
            state
                .health_log
                .as_ref()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        )),
        Some(DockerHealth::Starting) => Verdict::Retry("image HEALTHCHECK still starting".into()),
        None => Verdict::Fail("the image has no HEALTHCHECK".into()),
    }
}

fn log(matched: bool, pattern: &regex::Regex) -> Verdict {
    if matched {
        Verdict::Pass(format!("output matched /{pattern}/"))
    } else {
        Verdict::Retry(format!("no output line matched /{pattern}/ yet"))
    }
}

fn settle(started: Instant, settle: Duration) -> Verdict {
    if started.elapsed() >= settle {
        Verdict::Pass(format!("container stayed up for {}s", settle.as_secs_f64()))
    } else {
        Verdict::Retry("waiting for the container to stay up".into())
    }
}

/// A TCP attempt on the published `host:port`. Docker's port proxy accepts
/// connections even when nothing listens behind it, then closes them at once. So when
/// the container's own address (`direct`) is reachable, it decides: refused there is
/// not listening yet, accepted there is listening (and the published port must then
/// accept too). Otherwise a published connection that stays open for 200 ms is the
/// sign of life.
async fn tcp(host: &str, port: u16, direct: Option<SocketAddr>) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    if let Some(addr) = direct {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(_)) => return connect_to(host, port).await.map(drop),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(format!("connecting to {addr} (in the container): {e}"));
            }
            // Not reachable from here: the published port alone decides.
            _ => {}
        }
    }
    let mut stream = connect_to(host, port).await?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
        Err(_) | Ok(Ok(1..)) => Ok(()),
        Ok(Ok(0)) => Err(format!("{host}:{port} closed the connection")),
        Ok(Err(e)) => Err(format!("{host}:{port}: {e}")),
    }
}

async fn connect_to(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Err(_) => Err(format!("connecting to {host}:{port} timed out")),
        Ok(Err(e)) => Err(format!("connecting to {host}:{port}: {e}")),
        Ok(Ok(s)) => Ok(s),
    }
}

/// A request error with its cause: reqwest's own text ("error sending request for
/// url") says nothing of why, the innermost source does (connection refused, timed
/// out, connection reset).
fn cause_of(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    expect: u16,
    interval: Duration,
) -> Result<(), String> {
    let timeout = (interval * 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    match client.get(url).timeout(timeout).send().await {
        Err(e) => Err(format!("GET {url}: {}", cause_of(&e))),
        Ok(r) if r.status().as_u16() == expect => Ok(()),
        Ok(r) => Err(format!(
            "GET {url} answered {}, expected {expect}",
            r.status()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_5_ms_to_the_interval() {
        let interval = Duration::from_millis(500);
        let delays: Vec<u64> = (1..=9)
            .map(|a| retry_delay(a, interval).as_millis() as u64)
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 500, 500]);
        assert_eq!(retry_delay(u32::MAX, interval), interval);
        assert_eq!(
            retry_delay(1, Duration::from_millis(2)),
            Duration::from_millis(2)
        );
    }

    /// A port proxy accepts and holds a connection whether or not the app listens:
    /// the container's own address decides, refused there failing the attempt.
    #[tokio::test]
    async fn a_tcp_attempt_asks_the_container_address_first() {
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = proxy.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = proxy.accept().await {
                open.push(s);
            }
        });
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nothing = closed.local_addr().unwrap();
        drop(closed);
        let err = tcp("127.0.0.1", port, Some(nothing)).await.unwrap_err();
        assert!(err.contains("in the container"), "{err}");
        assert!(err.contains("refused"), "{err}");

        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listening = app.local_addr().unwrap();
        tcp("127.0.0.1", port, Some(listening)).await.unwrap();
        // Without a reachable container address, the open published connection passes.
        tcp("127.0.0.1", port, None).await.unwrap();
        held.abort();
    }

    /// Issue 17: a failed attempt says why (here: nothing listens on the port).
    #[tokio::test]
    async fn an_http_attempt_gives_the_cause() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://127.0.0.1:{port}/");
        let err = http(
            &reqwest::Client::new(),
            &url,
            200,
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(err.contains("refused"), "{err}");
        assert!(!err.contains("error sending request"), "{err}");
    }
}
