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
//! - [`handover`]: a restart without closing a socket (`--takeover`);
//! - [`metrics`]: the proxy's Prometheus registry;
//! - [`client`]: the typed admin client the server uses.
//!
//! Nothing here knows the engine, the store or Docker.

pub(crate) mod admin;
pub mod client;
pub(crate) mod forward;
pub(crate) mod handover;
pub(crate) mod metrics;
pub mod routes;
pub(crate) mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use forward::{Proxy, ProxySettings};
use handover::{Offered, OwnSockets, Role};

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
    /// Take the listening sockets and routes over from the proxy running on the same
    /// admin socket (through `<admin socket>.handover`), so a restart refuses no
    /// connection; that proxy then finishes its open connections and exits. With no
    /// proxy running, starts as usual.
    #[arg(long, env = "STEVEDORE_PROXY_TAKEOVER")]
    pub(crate) takeover: bool,
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

/// The listeners a proxy serves on, bound here or handed over.
struct Listeners {
    admin: UnixListener,
    handover: UnixListener,
    metrics: TcpListener,
}

/// Starts the proxy: takes the sockets over from a running proxy with `--takeover`
/// (when one answers), else restores the routes and binds everything itself.
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
    let handover_socket = handover::socket_path(&config.admin_socket);
    let offered = if config.takeover {
        tracing::info!(socket = %handover_socket.display(), "taking over from the running proxy");
        let offered = handover::request(&handover_socket).await.map_err(|e| {
            format!(
                "take-over through {} failed: {e}; the running proxy keeps serving",
                handover_socket.display()
            )
        })?;
        if offered.is_none() {
            tracing::info!(socket = %handover_socket.display(), "no proxy answers on the hand-over socket: starting without a hand-over");
        }
        offered
    } else {
        None
    };
    let (proxy, listeners, old_pid) = match offered {
        Some(offered) => {
            let old_pid = offered.old_pid;
            let (proxy, listeners) = adopt(&config, settings, metrics, offered).await?;
            (proxy, listeners, Some(old_pid))
        }
        None => {
            let admin = bind_admin_socket(&config.admin_socket)?;
            let handover = bind_handover_socket(&handover_socket)?;
            let proxy = Proxy::restore(settings, metrics).await?;
            let metrics = TcpListener::bind(config.metrics_listen)
                .await
                .map_err(|e| {
                    format!("cannot listen on {} (metrics): {e}", config.metrics_listen)
                })?;
            let listeners = Listeners {
                admin,
                handover,
                metrics,
            };
            (proxy, listeners, None)
        }
    };
    serve(config, proxy, listeners, old_pid).await
}

/// The new proxy's side of a hand-over: checks and persists what was offered, prepares
/// the listeners, confirms, and once the old proxy stopped accepting starts accepting.
/// Any failure before the confirmation is told to the old proxy, which keeps serving.
async fn adopt(
    config: &ProxyConfig,
    settings: ProxySettings,
    metrics: Arc<metrics::ProxyMetrics>,
    mut offered: Offered,
) -> Result<(Proxy, Listeners), Error> {
    let old_pid = offered.old_pid;
    tracing::info!(
        old_pid,
        sockets = offered.sockets.len(),
        routes = offered.routes.routes.len(),
        "received the running proxy's listening sockets and routes"
    );
    let sockets = std::mem::take(&mut offered.sockets);
    let table = offered.routes.clone();
    let prepared = prepare(config, &settings, &table, sockets).await;
    let (apps, listeners) = match prepared {
        Ok(p) => p,
        Err(e) => {
            offered.abort(&e);
            return Err(format!(
                "take-over from the proxy (pid {old_pid}) refused: {e}; the running proxy keeps serving"
            )
            .into());
        }
    };
    let (proxy, pending) = Proxy::with_routes(settings, metrics, table, apps).await;
    tracing::info!(
        old_pid,
        "ready: waiting for the running proxy to stop accepting"
    );
    offered
        .ready()
        .await
        .map_err(|e| format!("take-over: {e}"))?;
    proxy.start_listeners(pending);
    tracing::info!(old_pid, "took over: accepting on every handed-over socket");
    Ok((proxy, listeners))
}

/// Turns the offered sockets into listeners and writes the routes to this proxy's
/// state file. `Err` says why the hand-over cannot go on.
async fn prepare(
    config: &ProxyConfig,
    settings: &ProxySettings,
    table: &routes::RouteTable,
    sockets: Vec<(Role, OwnedFd)>,
) -> Result<(BTreeMap<String, TcpListener>, Listeners), String> {
    let (mut admin, mut handover, mut metrics) = (None, None, None);
    let mut apps = BTreeMap::new();
    for (role, fd) in sockets {
        match role {
            Role::Admin => {
                admin = Some(unix_listener(fd).map_err(|e| format!("admin socket: {e}"))?)
            }
            Role::Handover => {
                handover = Some(unix_listener(fd).map_err(|e| format!("hand-over socket: {e}"))?)
            }
            Role::Metrics => {
                metrics = Some(tcp_listener(fd).map_err(|e| format!("metrics listener: {e}"))?)
            }
            Role::App(app) => {
                let route = table
                    .routes
                    .get(&app)
                    .ok_or_else(|| format!("a listener for {app:?}, which has no route"))?;
                routes::validate(&app, route, settings.allow_privileged_ports)
                    .map_err(|e| format!("route {app:?}: {e}"))?;
                let listener = tcp_listener(fd).map_err(|e| format!("listener of {app:?}: {e}"))?;
                apps.insert(app, listener);
            }
        }
    }
    let (Some(admin), Some(handover), Some(old_metrics)) = (admin, handover, metrics) else {
        return Err(
            "the running proxy did not send its admin, hand-over and metrics sockets".into(),
        );
    };
    let metrics = match old_metrics.local_addr() {
        Ok(addr) if same_listen(config.metrics_listen, addr) => old_metrics,
        _ => TcpListener::bind(config.metrics_listen)
            .await
            .map_err(|e| format!("cannot listen on {} (metrics): {e}", config.metrics_listen))?,
    };
    let path = settings.state_file.clone();
    let saved = {
        let table = table.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &table))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    saved.map_err(|e| format!("cannot write the state file {}: {e}", path.display()))?;
    tracing::info!(state_file = %path.display(), "routes written to the state file");
    Ok((
        apps,
        Listeners {
            admin,
            handover,
            metrics,
        },
    ))
}

/// Whether a listener on `bound` serves `configured` (port 0: any port of that IP).
fn same_listen(configured: SocketAddr, bound: SocketAddr) -> bool {
    configured.ip() == bound.ip() && (configured.port() == 0 || configured.port() == bound.port())
}

fn tcp_listener(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    listener.local_addr()?;
    TcpListener::from_std(listener)
}

fn unix_listener(fd: OwnedFd) -> std::io::Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    listener.local_addr()?;
    UnixListener::from_std(listener)
}

/// Serves the admin API, the metrics and the hand-over socket until a shutdown (the
/// socket files are removed, the listeners closed, open connections drain) or a
/// hand-over (the sockets stay open for the new proxy; open connections drain).
async fn serve(
    config: ProxyConfig,
    proxy: Proxy,
    listeners: Listeners,
    took_over_from: Option<u32>,
) -> Result<RunningProxy, Error> {
    let Listeners {
        admin,
        handover,
        metrics: metrics_listener,
    } = listeners;
    let metrics_addr = metrics_listener.local_addr()?;
    let own = OwnSockets {
        handover: handover.as_fd().try_clone_to_owned()?,
        admin: admin.as_fd().try_clone_to_owned()?,
        metrics: metrics_listener.as_fd().try_clone_to_owned()?,
    };
    let shutdown = CancellationToken::new();
    let stop_serving = CancellationToken::new();
    let handed_over = CancellationToken::new();
    let admin_server = axum::serve(admin, admin::admin_router(proxy.clone()))
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let metrics_server = axum::serve(metrics_listener, admin::metrics_router(proxy.clone()))
        .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
    let handover_server = handover::serve(
        handover,
        proxy.clone(),
        own,
        stop_serving.clone(),
        handed_over.clone(),
    );
    let routes = proxy.routes().await.map(|r| r.len()).unwrap_or_default();
    tracing::info!(
        admin = %config.admin_socket.display(),
        metrics = %metrics_addr,
        state_file = %config.state_file.display(),
        routes,
        took_over_from,
        "stevedore proxy listening"
    );
    let task_proxy = proxy.clone();
    let task_shutdown = shutdown.clone();
    let socket = config.admin_socket.clone();
    let grace = config.drain_timeout;
    let task = tokio::spawn(async move {
        let admin = tokio::spawn(admin_server.into_future());
        let metrics = tokio::spawn(metrics_server.into_future());
        let handover = tokio::spawn(handover_server);
        let was_handed_over = tokio::select! {
            _ = task_shutdown.cancelled() => false,
            _ = handed_over.cancelled() => true,
        };
        stop_serving.cancel();
        if was_handed_over {
            // The sockets and their files are the new proxy's now.
            tracing::info!(
                connections = task_proxy.open_connections(),
                "handed over: forwarding the open connections until they close or the drain timeout ends"
            );
        } else {
            // Free the socket paths and the public ports first, so a new proxy can
            // start while this one lets its connections finish.
            let _ = std::fs::remove_file(&socket);
            let _ = std::fs::remove_file(handover::socket_path(&socket));
        }
        task_proxy.shutdown(grace).await;
        admin.abort();
        metrics.abort();
        handover.abort();
        tracing::info!("proxy stopped");
        Ok(())
    });
    Ok(RunningProxy { shutdown, task })
}

/// Binds the admin socket with mode 0600. A socket file nobody answers on is left over
/// from a proxy that died: it is replaced. One that answers is another proxy: refused.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, Error> {
    bind_private_socket(path, "the admin socket", || {
        format!(
            "another proxy answers on {}: stop it first, start this one with --takeover to take its sockets over, or give another --admin-socket",
            path.display()
        )
    })
}

/// Binds the hand-over socket beside the admin socket, as [`bind_admin_socket`].
fn bind_handover_socket(path: &Path) -> Result<UnixListener, Error> {
    bind_private_socket(path, "the hand-over socket", || {
        format!("another proxy answers on {}", path.display())
    })
}

fn bind_private_socket(
    path: &Path,
    what: &str,
    taken: impl FnOnce() -> String,
) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(taken().into());
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind {what} {}: {e}", path.display()))?;
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
