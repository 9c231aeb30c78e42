//! The real runtime: a Docker engine through bollard. Every call runs under an explicit
//! timeout (`call_timeout`), and streams under an idle timeout, so a hung engine fails
//! the step instead of hanging the deployment.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ExecConfig, Health, HealthStatusEnum, HostConfig, PortBinding, PortMap,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::TryStreamExt;
use futures_util::stream::{BoxStream, StreamExt};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use tokio_util::io::StreamReader;

use super::{
    ContainerSpec, ContainerState, ContainerSummary, DockerHealth, ExecRun, ImageInfo, LayerStatus,
    PublishedPort, PullEvent, Runtime, RuntimeError,
};
use crate::model::{LABEL_APP, LABEL_DEPLOYMENT, Protocol, RegistryAuth};
use crate::source::build::{BuildError, BuildEvent, BuildOutcome, BuildSpec};
use tokio_util::sync::CancellationToken;

/// API version spoken to the engine: 1.41 is what Debian 12's engine (20.10) serves,
/// and every newer engine still accepts it.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// `TERM` of a hook run with a TTY, and its size (columns, rows).
const EXEC_TERM: &str = "xterm";
const EXEC_TTY_SIZE: (i32, i32) = (120, 40);

/// Seconds a container gets to stop after SIGTERM before it is killed.
const STOP_GRACE_SECS: i32 = 5;

pub(crate) struct DockerRuntime {
    /// Connected on first use: see [`DockerRuntime::client`].
    docker: std::sync::OnceLock<Docker>,
    endpoint: String,
    public_host: String,
    call_timeout: Duration,
    /// Longest silence in a pull's progress stream (`--docker-timeout`, like each call).
    pull_idle_timeout: Duration,
    /// Caps the Docker API calls in progress at once; others wait their turn.
    calls: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The engine address used when neither `--docker-host` nor `DOCKER_HOST` is set.
pub(crate) const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// A bollard client for `host`. bollard refuses a unix socket path that does not exist.
fn connect(host: &str, call_timeout: Duration) -> Result<Docker, RuntimeError> {
    let secs = call_timeout.as_secs().max(1) * 4;
    if let Some(path) = host.strip_prefix("unix://") {
        if !std::path::Path::new(path).exists() {
            // bollard's own message for it.
            return Err(RuntimeError::Unavailable {
                endpoint: host.to_owned(),
                reason: bollard::errors::Error::SocketNotFoundError(path.to_owned()).to_string(),
            });
        }
        pooled_unix(path, secs)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, secs, &API_VERSION)
    } else {
        return Err(RuntimeError::Unavailable {
            endpoint: host.to_owned(),
            reason: "unsupported address: use unix://PATH, tcp://HOST:PORT or http://HOST:PORT"
                .into(),
        });
    }
    .map_err(|e| RuntimeError::Unavailable {
        endpoint: host.to_owned(),
        reason: e.to_string(),
    })
}

/// How long an idle connection to the engine's socket is kept for the next call.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// Requests to the engine's unix socket over kept-alive connections (hyper's pool).
/// bollard's own unix client opens a connection per call (its pool keeps none idle),
/// which costs a deploy a connect, an accept by the engine and a connection task for
/// each of its calls. A connection still streams (logs, a pull) or is upgraded (exec)
/// is not pooled; one the engine closed while idle is replaced, and a request that
/// could not be sent on it is retried on a new one (hyper's `retry_canceled_requests`).
fn pooled_unix(path: &str, timeout_secs: u64) -> Result<Docker, bollard::errors::Error> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let path: std::sync::Arc<str> = path.into();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        Box::pin(async move {
            tokio::net::UnixStream::connect(&*path)
                .await
                .map(TokioIo::new)
        })
    });
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_CONNECTION)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector);
    let transport = move |request: bollard::BollardRequest| {
        let client = client.clone();
        async move {
            client
                .request(request)
                .await
                .map_err(|err| bollard::errors::Error::HyperLegacyError { err })
        }
    };
    // The host is never resolved: every connection goes to `path`.
    Docker::connect_with_custom_transport(
        transport,
        Some("http://engine"),
        timeout_secs,
        &API_VERSION,
    )
}

impl DockerRuntime {
    /// Prepares a client for `host` (`unix://…`, `tcp://…` or `http://…`). Does not
    /// connect: an engine that is down is reported by the calls that need it.
    pub(crate) fn new(host: &str, call_timeout: Duration) -> Result<Self, RuntimeError> {
        let docker = std::sync::OnceLock::new();
        match connect(host, call_timeout) {
            Ok(client) => {
                let _ = docker.set(client);
            }
            // A socket that does not exist (yet) is not an error: the server starts, and
            // every call reports the engine unavailable until the socket appears.
            Err(_) if host.starts_with("unix://") => {}
            Err(e) => return Err(e),
        }
        let public_host = public_host_of(host);
        Ok(Self {
            docker,
            endpoint: host.to_owned(),
            public_host,
            call_timeout,
            pull_idle_timeout: call_timeout,
            calls: std::sync::Arc::new(tokio::sync::Semaphore::new(
                crate::limits::DEFAULT_MAX_DOCKER_CALLS,
            )),
        })
    }

    /// Caps the Docker API calls in progress at once at `max` (at least 1).
    pub(crate) fn with_max_concurrent_calls(mut self, max: usize) -> Self {
        self.calls = std::sync::Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self
    }

    /// Docker API calls that may start now without waiting.
    #[cfg(test)]
    pub(crate) fn available_call_permits(&self) -> usize {
        self.calls.available_permits()
    }

    pub(super) async fn call<T, F>(&self, op: &'static str, fut: F) -> Result<T, RuntimeError>
    where
        F: Future<Output = Result<T, BollardError>>,
    {
        self.call_within(op, self.call_timeout, fut).await
    }

    /// [`DockerRuntime::call`] with a time limit of its own.
    async fn call_within<T, F>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: F,
    ) -> Result<T, RuntimeError>
    where
        F: Future<Output = Result<T, BollardError>>,
    {
        // Waiting for a turn is not the engine's slowness: the timeout starts after it.
        let _permit = self
            .calls
            .acquire()
            .await
            .expect("the docker call semaphore is never closed");
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(RuntimeError::Timeout {
                op,
                after: timeout,
                endpoint: self.endpoint.clone(),
            }),
            Ok(Err(e)) => Err(self.map_err(op, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn map_err(&self, op: &'static str, e: BollardError) -> RuntimeError {
        map_error(&self.endpoint, op, e)
    }

    /// The client, connecting on first use (retried on every call until it works).
    pub(super) fn client(&self) -> Result<&Docker, RuntimeError> {
        if let Some(docker) = self.docker.get() {
            return Ok(docker);
        }
        let docker = connect(&self.endpoint, self.call_timeout)?;
        Ok(self.docker.get_or_init(|| docker))
    }
}

fn map_error(endpoint: &str, op: &'static str, e: BollardError) -> RuntimeError {
    let unavailable = |reason: String| RuntimeError::Unavailable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } => RuntimeError::NotFound {
            op,
            reason: without_repeats(&message),
        },
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::Call {
            op,
            reason: without_repeats(&message),
        },
        BollardError::DockerStreamError { error } => RuntimeError::Call {
            op,
            reason: without_repeats(&error),
        },
        BollardError::RequestTimeoutError => RuntimeError::Timeout {
            op,
            after: Duration::ZERO,
            endpoint: endpoint.to_owned(),
        },
        // The engine could not be reached or did not answer.
        BollardError::IOError { err } => unavailable(err.to_string()),
        BollardError::HyperResponseError { err } => unavailable(err.to_string()),
        e @ (BollardError::HyperLegacyError { .. } | BollardError::SocketNotFoundError(_)) => {
            unavailable(e.to_string())
        }
        other => RuntimeError::Call {
            op,
            reason: other.to_string(),
        },
    }
}

/// The engine's text without a part repeated right after itself: dockerd wraps the
/// registry's error in its own words, which are often the same
/// (`manifest unknown: manifest unknown`).
fn without_repeats(message: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for part in message.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

fn is_not_found(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::NotFound { .. })
}

/// Where published ports are reachable: loopback for a local engine, else its host.
fn public_host_of(endpoint: &str) -> String {
    for scheme in ["tcp://", "http://"] {
        if let Some(rest) = endpoint.strip_prefix(scheme) {
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = match authority.rsplit_once(':') {
                Some((h, _)) => h,
                None => authority,
            };
            if !host.is_empty() {
                return host.trim_matches(['[', ']']).to_owned();
            }
        }
    }
    "127.0.0.1".to_owned()
}

/// Splits `image` into (name, tag-or-digest) for the pull API.
fn split_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// A pull message's status word as a [`LayerStatus`] (also for a build's base-image pull).
pub(crate) fn layer_status(status: &str) -> LayerStatus {
    match status {
        "Downloading" => LayerStatus::Downloading,
        "Verifying Checksum" | "Download complete" => LayerStatus::Downloaded,
        "Extracting" => LayerStatus::Extracting,
        "Pull complete" => LayerStatus::Done,
        "Already exists" => LayerStatus::AlreadyExists,
        _ => LayerStatus::Pending,
    }
}

fn health_of(status: Option<HealthStatusEnum>) -> Option<DockerHealth> {
    match status? {
        HealthStatusEnum::STARTING => Some(DockerHealth::Starting),
        HealthStatusEnum::HEALTHY => Some(DockerHealth::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(DockerHealth::Unhealthy),
        _ => None,
    }
}

/// The output of a container's last health check, trimmed.
fn last_health_output(health: Option<&Health>) -> Option<String> {
    health
        .and_then(|h| h.log.as_ref())
        .and_then(|l| l.last())
        .and_then(|r| r.output.clone())
        .map(|o| o.trim().to_owned())
}

/// The container ports published on the host, one per container port, in port order.
fn published_ports(map: PortMap) -> Vec<PublishedPort> {
    let mut ports = Vec::new();
    for (key, bindings) in map {
        let (port, proto) = key.split_once('/').unwrap_or((&key, "tcp"));
        let Ok(container_port) = port.parse::<u16>() else {
            continue;
        };
        let protocol = if proto == "udp" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        if let Some((host_port, host_ip)) = preferred_binding(bindings.unwrap_or_default()) {
            ports.push(PublishedPort {
                container_port,
                protocol,
                host_port,
                host_ip,
            });
        }
    }
    ports.sort_by_key(|p| (p.container_port, p.protocol.as_str()));
    ports
}

/// The host port and address of one container port's bindings: one URL per container
/// port, so the IPv4 binding is preferred.
fn preferred_binding(bindings: Vec<PortBinding>) -> Option<(u16, String)> {
    let mut best: Option<(bool, u16, String)> = None;
    for b in bindings {
        let Some(host_port) = b.host_port.and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        let host_ip = b.host_ip.unwrap_or_default();
        let v4 = !host_ip.contains(':');
        if best.as_ref().is_none_or(|(was_v4, ..)| v4 && !was_v4) {
            best = Some((v4, host_port, host_ip));
        }
    }
    best.map(|(_, host_port, host_ip)| (host_port, host_ip))
}

/// The lines of timestamped log frames in the order they were written. The engine
/// copies a container's stdout and stderr in two streams, so its log can hold a
/// stderr line before a stdout line printed earlier; each line's timestamp (asked for
/// with `timestamps`) gives the real order. A stable sort keeps lines with the same
/// time (or none) in the order received.
fn in_time_order(frames: &[Vec<u8>]) -> Vec<String> {
    let mut lines: Vec<(Option<std::time::SystemTime>, String)> = frames
        .iter()
        .flat_map(|f| {
            String::from_utf8_lossy(f)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|line| match line.split_once(' ') {
            Some((ts, rest)) => match humantime::parse_rfc3339(ts) {
                Ok(t) => (Some(t), rest.to_owned()),
                Err(_) => (None, line),
            },
            None => match humantime::parse_rfc3339(&line) {
                Ok(t) => (Some(t), String::new()),
                Err(_) => (None, line),
            },
        })
        .collect();
    // A line without a time sorts with the one before it.
    let mut last = None;
    for (t, _) in &mut lines {
        match t {
            Some(_) => last = *t,
            None => *t = last,
        }
    }
    lines.sort_by_key(|(t, _)| *t);
    lines.into_iter().map(|(_, l)| l).collect()
}

fn log_bytes(out: LogOutput) -> Vec<u8> {
    out.as_ref().to_vec()
}

/// Splits a stream of output chunks into lines (without their line ending; bytes
/// that are not UTF-8 are replaced).
fn lines_of(
    chunks: BoxStream<'static, Result<Vec<u8>, RuntimeError>>,
) -> BoxStream<'static, Result<String, RuntimeError>> {
    let bytes = chunks.map(|c| c.map(VecDeque::from).map_err(std::io::Error::other));
    let codec = AnyDelimiterCodec::new(b"\n".to_vec(), Vec::new());
    FramedRead::new(StreamReader::new(bytes), codec)
        .map(|line| match line {
            Ok(line) => {
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                Ok(String::from_utf8_lossy(line).into_owned())
            }
            Err(AnyDelimiterCodecError::Io(e)) => Err(match e.downcast::<RuntimeError>() {
                Ok(e) => e,
                Err(e) => RuntimeError::Call {
                    op: "read output",
                    reason: e.to_string(),
                },
            }),
            Err(e) => Err(RuntimeError::Call {
                op: "read output",
                reason: e.to_string(),
            }),
        })
        .boxed()
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn public_host(&self) -> &str {
        &self.public_host
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        self.call("ping", self.client()?.ping()).await.map(|_| ())
    }

    async fn inspect_image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        match self
            .call("inspect image", self.client()?.inspect_image(image))
            .await
        {
            Ok(info) => {
                let has_healthcheck = info
                    .config
                    .as_ref()
                    .and_then(|c| c.healthcheck.as_ref())
                    .and_then(|h| h.test.as_ref())
                    .is_some_and(|t| !t.is_empty() && t[0] != "NONE");
                let (name, _) = split_reference(image);
                let digest = info.repo_digests.as_ref().and_then(|ds| {
                    ds.iter()
                        .find(|d| d.split('@').next() == Some(name))
                        .or_else(|| ds.first())
                        .cloned()
                });
                Ok(Some(ImageInfo {
                    id: info.id.unwrap_or_default(),
                    digest,
                    has_healthcheck,
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> BoxStream<'static, Result<PullEvent, RuntimeError>> {
        let (name, tag) = split_reference(image);
        let options = CreateImageOptionsBuilder::default()
            .from_image(name)
            .tag(tag)
            .build();
        let credentials = auth.map(|a| DockerCredentials {
            username: (!a.username.is_empty()).then(|| a.username.clone()),
            password: (!a.password.is_empty()).then(|| a.password.clone()),
            identitytoken: (!a.identity_token.is_empty()).then(|| a.identity_token.clone()),
            ..Default::default()
        });
        let docker = match self.client() {
            Ok(d) => d,
            Err(e) => return futures_util::stream::once(async move { Err(e) }).boxed(),
        };
        let stream = docker.create_image(Some(options), None, credentials);
        let endpoint = self.endpoint.clone();
        let image = image.to_owned();
        let idle = self.pull_idle_timeout;
        let stream = tokio_stream::StreamExt::timeout(stream, idle);
        futures_util::stream::unfold((Box::pin(stream), false), move |(mut stream, done)| {
            let endpoint = endpoint.clone();
            let image = image.clone();
            async move {
                if done {
                    return None;
                }
                let item = match stream.next().await? {
                    Err(_) => Err(RuntimeError::Timeout {
                        op: "image pull (no progress)",
                        after: idle,
                        endpoint,
                    }),
                    Ok(Err(e)) => Err(match map_error(&endpoint, "image pull", e) {
                        RuntimeError::Call { reason, .. } => RuntimeError::Pull {
                            image: image.clone(),
                            reason,
                        },
                        other => other,
                    }),
                    Ok(Ok(info)) => {
                        let status = info.status.unwrap_or_default();
                        Ok(match info.id {
                            Some(id) if !id.is_empty() && !status.starts_with("Pulling from") => {
                                let detail = info.progress_detail.unwrap_or_default();
                                PullEvent::Layer {
                                    id,
                                    status: layer_status(&status),
                                    current: detail.current.map(|c| c.max(0) as u64),
                                    total: detail.total.filter(|t| *t > 0).map(|t| t as u64),
                                }
                            }
                            _ => PullEvent::Image { status },
                        })
                    }
                };
                let done = item.is_err();
                Some((item, (stream, done)))
            }
        })
        .boxed()
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut exposed = Vec::new();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.container_port, p.protocol.as_str());
            exposed.push(key.clone());
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: p.host_ip.map(|ip| ip.to_string()),
                    host_port: Some(if p.host_port == 0 {
                        String::new()
                    } else {
                        p.host_port.to_string()
                    }),
                });
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: Some(exposed),
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .call(
                "create container",
                self.client()?.create_container(Some(options), body),
            )
            .await?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.call(
            "start container",
            self.client()?
                .start_container(id, None::<bollard::query_parameters::StartContainerOptions>),
        )
        .await
    }

    async fn inspect(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let info = self
            .call(
                "inspect container",
                self.client()?.inspect_container(
                    id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                ),
            )
            .await?;
        let state = info.state.unwrap_or_default();
        let config = info.config;
        let running = state.running.unwrap_or(false);
        let health = state.health.as_ref();
        let health_log = last_health_output(health);
        let network = info.network_settings;
        // Container addresses are reachable from the engine's own host only.
        let address = (network.as_ref())
            .filter(|_| self.endpoint.starts_with("unix://"))
            .and_then(|n| n.networks.as_ref())
            .and_then(|m| {
                m.values()
                    .find_map(|e| e.ip_address.as_deref()?.parse().ok())
            });
        let ports = published_ports(network.and_then(|n| n.ports).unwrap_or_default());
        Ok(ContainerState {
            running,
            exit_code: if running { None } else { state.exit_code },
            oom_killed: state.oom_killed.unwrap_or(false),
            health: health_of(health.and_then(|h| h.status)),
            health_log,
            ports,
            status: state.status.map(|s| s.to_string()).unwrap_or_default(),
            stop_signal: config.as_ref().and_then(|c| c.stop_signal.clone()),
            stop_timeout: config
                .as_ref()
                .and_then(|c| c.stop_timeout)
                .and_then(|t| u64::try_from(t).ok())
                .map(Duration::from_secs),
            address,
            labels: (config.as_ref().and_then(|c| c.labels.clone()))
                .map(|l| l.into_iter().collect())
                .unwrap_or_default(),
        })
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(&lines.to_string())
            .build();
        let chunks = self
            .call(
                "read container logs",
                self.client()?
                    .logs(id, Some(options))
                    .map_ok(log_bytes)
                    .try_collect::<Vec<_>>(),
            )
            .await?;
        let all = in_time_order(&chunks);
        let skip = all.len().saturating_sub(lines);
        Ok(all.into_iter().skip(skip).collect())
    }

    fn follow_logs(&self, id: &str) -> BoxStream<'static, Result<String, RuntimeError>> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(true)
            .build();
        let endpoint = self.endpoint.clone();
        let docker = match self.client() {
            Ok(d) => d,
            Err(e) => return futures_util::stream::once(async move { Err(e) }).boxed(),
        };
        let chunks = docker
            .logs(id, Some(options))
            .map(move |r| {
                r.map(log_bytes)
                    .map_err(|e| map_error(&endpoint, "follow container logs", e))
            })
            .boxed();
        lines_of(chunks)
    }

    async fn list_app_containers(&self, app: &str) -> Result<Vec<ContainerSummary>, RuntimeError> {
        self.list_labelled(format!("{LABEL_APP}={app}")).await
    }

    async fn list_managed_containers(&self) -> Result<Vec<ContainerSummary>, RuntimeError> {
        self.list_labelled(LABEL_DEPLOYMENT.to_owned()).await
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let grace = Duration::from_secs(STOP_GRACE_SECS as u64);
        self.stop_with(id, None, grace).await
    }

    async fn stop_with(
        &self,
        id: &str,
        signal: Option<&str>,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let secs = i32::try_from(grace.as_secs_f64().ceil() as i64).unwrap_or(i32::MAX);
        let mut options = StopContainerOptionsBuilder::default().t(secs);
        if let Some(signal) = signal {
            options = options.signal(signal);
        }
        // A stop can legitimately take the grace period; give it that on top.
        let budget = self.call_timeout + grace;
        let stop = self.client()?.stop_container(id, Some(options.build()));
        let stop = async {
            match stop.await {
                // 304: already stopped.
                Err(BollardError::DockerResponseServerError {
                    status_code: 304, ..
                }) => Ok(()),
                other => other,
            }
        };
        self.call_within("stop container", budget, stop).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        // An engine that does not answer fails the removal; anything else (absent,
        // already stopped) is for the removal to decide.
        if let Err(e @ (RuntimeError::Unavailable { .. } | RuntimeError::Timeout { .. })) =
            self.stop(id).await
        {
            return Err(e);
        }
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self
            .call(
                "remove container",
                self.client()?.remove_container(id, Some(options)),
            )
            .await
        {
            Err(e) if is_not_found(&e) => Ok(()),
            other => other,
        }
    }

    async fn exec(&self, id: &str, command: &[String], tty: bool) -> Result<ExecRun, RuntimeError> {
        let created = self
            .call(
                "create exec",
                self.client()?.create_exec(
                    id,
                    ExecConfig {
                        cmd: Some(command.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        tty: Some(tty),
                        // Progress-bar libraries draw only for a terminal they know.
                        env: tty.then(|| vec![format!("TERM={EXEC_TERM}")]),
                        ..Default::default()
                    },
                ),
            )
            .await?;
        let started = self
            .call(
                "start exec",
                self.client()?.start_exec(
                    &created.id,
                    Some(StartExecOptions {
                        detach: false,
                        tty,
                        output_capacity: None,
                    }),
                ),
            )
            .await?;
        if tty {
            // API 1.41 has no initial console size: an unsized TTY is 0x0, which some
            // progress bars take as "no room to draw". Best effort.
            let size = bollard::query_parameters::ResizeExecOptionsBuilder::default()
                .w(EXEC_TTY_SIZE.0)
                .h(EXEC_TTY_SIZE.1)
                .build();
            if let Err(e) = self
                .call("resize exec", self.client()?.resize_exec(&created.id, size))
                .await
            {
                tracing::debug!(error = %e, "could not size the exec's TTY");
            }
        }
        let endpoint = self.endpoint.clone();
        let output = match started {
            StartExecResults::Attached { output, .. } => output
                .map(move |r| {
                    r.map(log_bytes)
                        .map_err(|e| map_error(&endpoint, "exec output", e))
                })
                .boxed(),
            StartExecResults::Detached => futures_util::stream::empty().boxed(),
        };
        Ok(ExecRun {
            exec_id: created.id,
            output,
        })
    }

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
        let info = self
            .call("inspect exec", self.client()?.inspect_exec(exec_id))
            .await?;
        if info.running.unwrap_or(false) {
            Ok(None)
        } else {
            Ok(Some(info.exit_code.unwrap_or(-1)))
        }
    }

    /// Not under the call cap: a build streams for as long as it runs, and
    /// `source::build` bounds it by its idle timeout and each inspect by `call_timeout`.
    async fn build_image(
        &self,
        spec: &BuildSpec,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<BuildOutcome, BuildError> {
        let docker = self.client().map_err(|e| {
            BuildError::Docker(BollardError::IOError {
                err: std::io::Error::other(e.to_string()),
            })
        })?;
        crate::source::build::build(docker, spec, cancel, on_event).await
    }
}

impl DockerRuntime {
    async fn list_labelled(&self, label: String) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![label]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .call(
                "list containers",
                self.client()?.list_containers(Some(options)),
            )
            .await?;
        Ok(list
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                ContainerSummary {
                    id: c.id.unwrap_or_default(),
                    app: labels.get(LABEL_APP).cloned().unwrap_or_default(),
                    deployment: labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                    running: c.state.map(|s| s.to_string()) == Some("running".into()),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: log_tail came out of order when the engine recorded a stderr line
    /// before a stdout line printed earlier; the timestamps put them back in order.
    #[test]
    fn log_lines_come_in_time_order() {
        let frames: Vec<Vec<u8>> = [
            "2026-12-02T07:00:00.2Z second (stderr)\n",
            "2026-12-02T07:00:00.123456789Z first (stdout)\n",
            "2026-12-02T07:00:01Z third\n2026-12-02T07:00:01Z fourth, same time\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        assert_eq!(
            in_time_order(&frames),
            vec![
                "first (stdout)",
                "second (stderr)",
                "third",
                "fourth, same time"
            ]
        );
    }

    #[test]
    fn the_engine_text_is_not_repeated() {
        let e = map_error(
            "unix:///x",
            "image pull",
            BollardError::DockerStreamError {
                error: "manifest for r/x:9 not found: manifest unknown: manifest unknown".into(),
            },
        );
        assert_eq!(
            e.to_string(),
            "image pull failed: manifest for r/x:9 not found: manifest unknown"
        );
    }

    #[tokio::test]
    async fn concurrent_calls_are_capped() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let rt = Arc::new(
            DockerRuntime::new("unix:///nonexistent/docker.sock", Duration::from_secs(30))
                .unwrap()
                .with_max_concurrent_calls(2),
        );
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut calls = Vec::new();
        for _ in 0..5 {
            let (rt, running, peak) = (rt.clone(), running.clone(), peak.clone());
            let mut go = release.subscribe();
            calls.push(tokio::spawn(async move {
                rt.call("test", async {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = go.recv().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, BollardError>(())
                })
                .await
            }));
        }
        // Let every task run as far as it can: two hold a permit, three wait.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(running.load(Ordering::SeqCst), 2);
        assert_eq!(rt.available_call_permits(), 0);
        // Release them one wave at a time until all five have run.
        while !calls.iter().all(|c| c.is_finished()) {
            let _ = release.send(());
            tokio::task::yield_now().await;
        }
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "never more than the cap at once"
        );
        assert_eq!(rt.available_call_permits(), 2);
    }

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_reference("a/b:1"), ("a/b", "1"));
        assert_eq!(
            split_reference("127.0.0.1:5000/x/y:2"),
            ("127.0.0.1:5000/x/y", "2")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/x/y"),
            ("127.0.0.1:5000/x/y", "latest")
        );
        assert_eq!(split_reference("r/x@sha256:abcd"), ("r/x", "sha256:abcd"));
    }

    #[test]
    fn public_host_follows_the_endpoint() {
        assert_eq!(public_host_of("unix:///var/run/docker.sock"), "127.0.0.1");
        assert_eq!(public_host_of("tcp://10.0.0.5:2375"), "10.0.0.5");
        assert_eq!(
            public_host_of("http://docker.internal:2375/"),
            "docker.internal"
        );
    }

    #[tokio::test]
    async fn lines_are_split_across_chunks() {
        let chunks: Vec<Result<Vec<u8>, RuntimeError>> =
            vec![Ok(b"one\ntw".to_vec()), Ok(b"o\r\nthree".to_vec())];
        let lines: Vec<String> = lines_of(futures_util::stream::iter(chunks).boxed())
            .map(|l| l.unwrap())
            .collect()
            .await;
        assert_eq!(lines, vec!["one", "two", "three"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_is_cut_at_the_timeout() {
        let timeout = Duration::from_secs(30);
        let rt = DockerRuntime::new("unix:///nonexistent/docker.sock", timeout)
            .unwrap()
            .with_max_concurrent_calls(1);
        let never = std::future::pending::<Result<(), BollardError>>();
        let started = tokio::time::Instant::now();
        let r = rt.call("test", never).await;
        assert!(
            matches!(r, Err(RuntimeError::Timeout { op: "test", after, .. }) if after == timeout),
            "{r:?}"
        );
        assert_eq!(
            started.elapsed(),
            timeout,
            "cut at the timeout (paused clock)"
        );
        assert_eq!(rt.available_call_permits(), 1, "the permit is given back");
    }

    #[test]
    fn errors_are_classified_by_status_code() {
        let answer = |status_code: u16| BollardError::DockerResponseServerError {
            status_code,
            message: "No such container: x".into(),
        };
        let e = map_error("e", "inspect", answer(404));
        assert!(is_not_found(&e), "{e:?}");
        assert_eq!(e.to_string(), "inspect failed: No such container: x");
        // The same words with another status are not "absent".
        let e = map_error("e", "inspect", answer(500));
        assert!(matches!(e, RuntimeError::Call { .. }), "{e:?}");
        let e = map_error("e", "ping", BollardError::SocketNotFoundError("/x".into()));
        assert!(matches!(e, RuntimeError::Unavailable { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn lines_keep_undecodable_bytes_and_end_at_an_error() {
        let failed = RuntimeError::Call {
            op: "follow",
            reason: "gone".into(),
        };
        let chunks: Vec<Result<Vec<u8>, RuntimeError>> = vec![
            Ok(b"a\xffb\nrest".to_vec()),
            Err(failed.clone()),
            Ok(b"never\n".to_vec()),
        ];
        let lines: Vec<_> = lines_of(futures_util::stream::iter(chunks).boxed())
            .collect()
            .await;
        assert_eq!(lines[0], Ok("a\u{fffd}b".to_owned()));
        assert_eq!(lines[1], Err(failed));
        assert_eq!(lines.len(), 2, "{lines:?}");
    }
}
