//! `stevedore proxy`: the apps' front door. A separate long-running process that owns
//! the apps' public ports and forwards TCP (L4, any protocol) from each to the backend
//! of the app's current version. The server moves a route with the admin API (HTTP/JSON
//! on a unix socket, [`client::ProxyClient`]); the proxy persists its routes and never
//! needs the server to keep forwarding. See `docs/PROXY.md`.
//!
//! - [`routes`]: the API's types and the checks of a route;
//! - [`forward`]: listeners, connections, switches and drains;
//! - [`state`]: the state file;
//! - [`admin`]: the admin and metrics HTTP routers;
//! - [`metrics`]: the proxy's Prometheus registry;
//! - [`client`]: the typed admin client the server uses.
//!
//! Nothing here knows the engine, the store or Docker.

pub(crate) mod admin;
pub mod client;
pub(crate) mod forward;
pub(crate) mod metrics;
pub mod routes;
pub(crate) mod state;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use forward::{Proxy, ProxySettings};

pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// `stevedore proxy` flags; each has a `STEVEDORE_PROXY_…` environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct ProxyConfig {
    /// Unix socket of the admin API (created with mode 0600).
    #[arg(
        long,
        env = "STEVEDORE_PROXY_ADMIN_SOCKET",
        default_value = "./stevedore-data/proxy.sock"
    )]
    pub(crate) admin_socket: PathBuf,
    /// Where the routes are kept, so a restart restores them.
    #[arg(
        long,
        env = "STEVEDORE_PROXY_STATE_FILE",
        default_value = "./stevedore-data/proxy-routes.json"
    )]
    pub(crate) state_file: PathBuf,
    /// HTTP listen address of `/metrics` (Prometheus) and `/healthz`.
    #[arg(
        long,
        env = "STEVEDORE_PROXY_METRICS_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    pub(crate) metrics_listen: SocketAddr,
    /// Allow routes whose public port is below 1024.
    #[arg(long, env = "STEVEDORE_PROXY_ALLOW_PRIVILEGED_PORTS")]
    pub(crate) allow_privileged_ports: bool,
    /// How long connections open to a previous backend may stay open after a switch
    /// (a route change may give its own); also how long a stopping proxy waits for
    /// open connections.
    #[arg(long, env = "STEVEDORE_PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) drain_timeout: Duration,
}

/// A proxy that is up.
pub(crate) struct RunningProxy {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl RunningProxy {
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(crate) async fn wait(self) -> Result<(), Error> {
        self.task.await?
    }
}

/// Restores the routes, binds the admin socket and the metrics listener.
pub(crate) async fn start(config: ProxyConfig) -> Result<RunningProxy, Error> {
    let metrics = Arc::new(metrics::ProxyMetrics::new());
    let settings = ProxySettings {
        state_file: config.state_file.clone(),
        drain_timeout: config.drain_timeout,
        allow_privileged_ports: config.allow_privileged_ports,
    };
    if let Some(dir) = config
        .state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let admin = bind_admin_socket(&config.admin_socket)?;
    let proxy = Proxy::restore(settings, metrics).await?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (metrics): {e}", config.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;

    let shutdown = CancellationToken::new();
    let admin_server = axum::serve(admin, admin::admin_router(proxy.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let metrics_server = axum::serve(metrics_listener, admin::metrics_router(proxy.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tracing::info!(
        admin = %config.admin_socket.display(),
        metrics = %metrics_addr,
        state_file = %config.state_file.display(),
        routes = proxy.routes().await.len(),
        "stevedore proxy listening"
    );
    let task_proxy = proxy.clone();
    let task_shutdown = shutdown.clone();
    let socket = config.admin_socket.clone();
    let grace = config.drain_timeout;
    let task = tokio::spawn(async move {
        let admin = tokio::spawn(admin_server.into_future());
        let metrics = tokio::spawn(metrics_server.into_future());
        task_shutdown.cancelled().await;
        // Free the socket path and the public ports first, so a new proxy can start
        // while this one lets its connections finish.
        let _ = std::fs::remove_file(&socket);
        task_proxy.shutdown(grace).await;
        admin.abort();
        metrics.abort();
        tracing::info!("proxy stopped");
        Ok(())
    });
    Ok(RunningProxy { shutdown, task })
}

/// Binds the admin socket with mode 0600. A socket file nobody answers on is left over
/// from a proxy that died: it is replaced. One that answers is another proxy: refused.
fn bind_admin_socket(path: &std::path::Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another proxy answers on {}: stop it first, or give another --admin-socket",
                path.display()
            )
            .into());
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind the admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {} to mode 0600: {e}", path.display()))?;
    Ok(listener)
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(config: ProxyConfig) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let running = start(config).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
    running.wait().await
}
