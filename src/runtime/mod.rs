//! The container runtime the engine drives. [`Runtime`] is the seam: [`docker`] is the
//! real one (bollard), and tests use [`fake`] (with the `test-util` feature). Nothing above this
//! module names bollard or Docker's API types.

pub(crate) mod docker;
mod docker_swarm;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
#[cfg(test)]
pub(crate) mod fake_swarm;
pub(crate) mod swarm;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use tokio_util::sync::CancellationToken;

use crate::model::{PortSpec, Protocol, RegistryAuth};
use crate::source::build::{BuildError, BuildEvent, BuildOutcome, BuildSpec};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RuntimeError {
    #[error("docker engine at {endpoint} is unavailable: {reason}")]
    Unavailable { endpoint: String, reason: String },
    #[error("{op} timed out after {}s (docker engine at {endpoint})", after.as_secs_f64())]
    Timeout {
        op: &'static str,
        after: Duration,
        endpoint: String,
    },
    #[error("image {image} could not be pulled: {reason}")]
    Pull { image: String, reason: String },
    #[error("{op} failed: {reason}")]
    Call { op: &'static str, reason: String },
    /// The engine answered 404: no such container, image or exec.
    #[error("{op} failed: {reason}")]
    NotFound { op: &'static str, reason: String },
}

/// What the engine needs to know about a local image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    pub(crate) id: String,
    /// `repo@sha256:…` when the image came from a registry.
    pub(crate) digest: Option<String>,
    pub(crate) has_healthcheck: bool,
}

/// One message of an image pull, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// Progress of one layer. `current`/`total` are set while downloading.
    Layer {
        id: String,
        status: LayerStatus,
        current: Option<u64>,
        total: Option<u64>,
    },
    /// A message about the whole image ("Digest: sha256:…", "Status: Downloaded …").
    Image { status: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    /// Announced, waiting or being prepared.
    Pending,
    Downloading,
    /// Downloaded (checksum verified); extraction may follow.
    Downloaded,
    Extracting,
    /// Extracted, or already present locally.
    Done,
    AlreadyExists,
}

/// A container to create.
#[derive(Debug, Clone)]
pub(crate) struct ContainerSpec {
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) command: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) ports: Vec<PortSpec>,
    /// All labels, Stevedore's own included.
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DockerHealth {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishedPort {
    pub(crate) container_port: u16,
    pub(crate) protocol: Protocol,
    pub(crate) host_port: u16,
    /// The host address bound, as the engine reports it ("0.0.0.0" or "::" for every
    /// interface; empty if the engine did not say).
    pub(crate) host_ip: String,
}

impl PublishedPort {
    /// The host to reach the port at: the bound address, or `public_host` when the
    /// port is bound on every interface (IPv6 in brackets, for URLs).
    pub(crate) fn reach_host(&self, public_host: &str) -> String {
        match self.host_ip.parse::<std::net::IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => match ip {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            },
            _ => public_host.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContainerState {
    pub(crate) running: bool,
    /// Set once the container has exited.
    pub(crate) exit_code: Option<i64>,
    pub(crate) oom_killed: bool,
    /// The image HEALTHCHECK's verdict, when it has one.
    pub(crate) health: Option<DockerHealth>,
    /// Last output of the HEALTHCHECK command.
    pub(crate) health_log: Option<String>,
    pub(crate) ports: Vec<PublishedPort>,
    pub(crate) status: String,
    /// The container's stop signal (the image's STOPSIGNAL), when set.
    pub(crate) stop_signal: Option<String>,
    /// The container's StopTimeout, when set.
    pub stop_timeout: Option<Duration>,
    /// The container's own address, when this host reaches it directly (a local
    /// engine): a TCP health probe connects there first, see `engine::health`.
    pub address: Option<std::net::IpAddr>,
    /// The container's labels (Stevedore's own included).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerSummary {
    pub(crate) id: String,
    pub(crate) app: String,
    pub(crate) deployment: String,
    pub(crate) running: bool,
}

/// Output of a command run inside a container.
pub(crate) struct ExecRun {
    pub(crate) exec_id: String,
    /// Raw output chunks (stdout and stderr merged; with a TTY, exactly as drawn).
    pub(crate) output: BoxStream<'static, Result<Vec<u8>, RuntimeError>>,
}

#[async_trait]
pub(crate) trait Runtime: Send + Sync + 'static {
    /// The engine address, for error messages.
    fn endpoint(&self) -> &str;
    /// Host name or IP where published ports can be reached.
    fn public_host(&self) -> &str;

    async fn ping(&self) -> Result<(), RuntimeError>;
    /// `Ok(None)` when the image is not present locally.
    async fn inspect_image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError>;
    /// Pulls `image`. The stream ends when the pull is done; an error ends it.
    fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> BoxStream<'static, Result<PullEvent, RuntimeError>>;
    /// Creates a container and returns its ID.
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    async fn inspect(&self, id: &str) -> Result<ContainerState, RuntimeError>;
    /// The last `lines` lines of the container's output.
    async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError>;
    /// The container's output from its start, line by line, following until it exits.
    fn follow_logs(&self, id: &str) -> BoxStream<'static, Result<String, RuntimeError>>;
    /// Containers carrying the app label (running or not).
    async fn list_app_containers(&self, app: &str) -> Result<Vec<ContainerSummary>, RuntimeError>;
    /// Containers carrying any Stevedore label (for reconciliation after a restart).
    async fn list_managed_containers(&self) -> Result<Vec<ContainerSummary>, RuntimeError>;
    /// Stops a container (gracefully, then forcibly) and keeps it; already stopped is
    /// fine.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError>;
    /// Sends `signal` (the container's own stop signal when `None`), waits up to
    /// `grace`, then kills; already stopped is fine.
    async fn stop_with(
        &self,
        id: &str,
        _signal: Option<&str>,
        _grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.stop(id).await
    }
    /// Stops (gracefully, then forcibly) and removes a container; absent is fine.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Starts `command` inside a running container.
    async fn exec(&self, id: &str, command: &[String], tty: bool) -> Result<ExecRun, RuntimeError>;
    /// Exit code of a finished exec; `None` while it still runs. (An exec that overruns
    /// its time ends with its container, which the engine removes on failure.)
    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError>;
    /// Builds `spec` with the classic builder and tags it `stevedore/<app>:<commit>`, or
    /// skips the build when that tag exists (see [`crate::source::build::build`]).
    /// Dropping the future (or `cancel`) stops the build.
    async fn build_image(
        &self,
        spec: &BuildSpec,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<BuildOutcome, BuildError>;
}

impl AsRef<str> for ContainerSummary {
    /// The container's ID.
    fn as_ref(&self) -> &str {
        &self.id
    }
}

/// Removes each of `containers` (IDs, or summaries) in turn, handing each result to
/// `each`; stops at the first error `each` returns.
pub(crate) async fn remove_each<'a, C: AsRef<str> + 'a, E>(
    runtime: &dyn Runtime,
    containers: impl IntoIterator<Item = &'a C>,
    mut each: impl FnMut(&'a C, Result<(), RuntimeError>) -> Result<(), E>,
) -> Result<(), E> {
    for c in containers {
        each(c, runtime.remove(c.as_ref()).await)?;
    }
    Ok(())
}
