//! Wiring: configuration, the runtime, the engine, the gRPC server (with reflection and
//! health) and the HTTP side, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::{DeployerService, StreamConfig};
use crate::engine::{Engine, EngineConfig};
use crate::events::ObserverRegistry;
use crate::proto::deployer_server::DeployerServer;
use crate::runtime::Runtime;
use crate::runtime::docker::{DEFAULT_DOCKER_HOST, DockerRuntime};
use crate::store::{Retention, Store};

/// `stevedore serve` flags; each has a `STEVEDORE_…` environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeConfig {
    /// gRPC listen address.
    #[arg(long, env = "STEVEDORE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// HTTP listen address (/healthz).
    #[arg(long, env = "STEVEDORE_HTTP_LISTEN", default_value = "127.0.0.1:50052")]
    pub http_listen: SocketAddr,
    /// Directory for Stevedore's state.
    #[arg(long, env = "STEVEDORE_DATA_DIR", default_value = "./stevedore-data")]
    pub data_dir: PathBuf,
    /// Docker engine address (unix://PATH, tcp://HOST:PORT). Default: DOCKER_HOST, else
    /// the local socket.
    #[arg(long, env = "STEVEDORE_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Time limit of each Docker call (pulls: of each silence in the pull stream).
    #[arg(long, env = "STEVEDORE_DOCKER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub docker_timeout: Duration,
    /// How long to wait on SIGTERM for running deployments to finish; those still
    /// running then are interrupted (rolled back, ended FAILED) before exiting.
    #[arg(long, env = "STEVEDORE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Update streams send a heartbeat when nothing else was sent for this long.
    #[arg(long, env = "STEVEDORE_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Updates buffered per update stream (Deploy, WatchDeployment).
    #[arg(long, env = "STEVEDORE_WATCH_BUFFER", default_value_t = 64)]
    pub watch_buffer: usize,
    /// An update stream whose client reads nothing this long with its buffer full is
    /// ended with RESOURCE_EXHAUSTED naming the sequence to resume from.
    #[arg(long, env = "STEVEDORE_WATCH_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub watch_stall_timeout: Duration,
    /// Keep at most this many finished deployments in history (newest first); older
    /// ones are removed (then NOT_FOUND).
    #[arg(long, env = "STEVEDORE_RETENTION_MAX_DEPLOYMENTS")]
    pub retention_max_deployments: Option<usize>,
    /// Remove finished deployments created longer ago than this (then NOT_FOUND).
    #[arg(long, env = "STEVEDORE_RETENTION_MAX_AGE", value_parser = humantime::parse_duration)]
    pub retention_max_age: Option<Duration>,
    /// Keep only the last this many updates of each finished deployment's log (the
    /// terminal one always); earlier sequences are then OUT_OF_RANGE.
    #[arg(long, env = "STEVEDORE_RETENTION_MAX_LOG_UPDATES")]
    pub retention_max_log_updates: Option<u64>,
}

impl ServeConfig {
    /// The Docker address to use: the flag, else `DOCKER_HOST`, else the local socket.
    pub fn docker_endpoint(&self) -> String {
        self.docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned())
    }
}

/// A server that is up: its bound addresses, and how to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub engine: Engine,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow_like::Result<()>>,
}

mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

pub use anyhow_like::Result;

impl RunningServer {
    /// Triggers a graceful shutdown and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// A token that shuts the server down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<()> {
        self.task.await?
    }
}

/// Binds both listeners and starts serving. Returns once the server accepts calls.
pub async fn start(config: ServeConfig, observers: ObserverRegistry) -> Result<RunningServer> {
    let endpoint = config.docker_endpoint();
    let runtime: Arc<dyn Runtime> = Arc::new(DockerRuntime::new(&endpoint, config.docker_timeout)?);
    match runtime.ping().await {
        Ok(()) => tracing::info!(docker = %endpoint, "docker engine answers"),
        Err(e) => {
            tracing::warn!(docker = %endpoint, error = %e, "docker engine does not answer; deployments will be refused until it does")
        }
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir).await?;

    let engine_config = EngineConfig {
        retention: Retention {
            max_deployments: config.retention_max_deployments,
            max_age: config.retention_max_age,
            max_log_updates: config.retention_max_log_updates,
        },
        ..EngineConfig::default()
    };
    let engine = Engine::new(runtime.clone(), observers, engine_config, store.clone());
    // Reconcile what a previous process left before serving anything.
    let recovery = engine.recover().await?;
    if !recovery.interrupted.is_empty() {
        tracing::warn!(
            deployments = recovery.interrupted.len(),
            containers_removed = recovery.containers_removed,
            "ended deployments interrupted by a restart"
        );
    }
    engine.apply_retention().await;
    let shutdown = CancellationToken::new();

    let grpc = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (gRPC): {e}", config.listen))?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (HTTP): {e}", config.http_listen))?;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DeployerServer<DeployerService>>()
        .await;

    let streams = StreamConfig {
        heartbeat_interval: config.heartbeat_interval,
        buffer: config.watch_buffer,
        stall_timeout: config.watch_stall_timeout,
    };
    let service = DeployerServer::new(DeployerService::with_streams(
        engine.clone(),
        shutdown.clone(),
        streams,
    ));
    let grpc_shutdown = shutdown.clone();
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(grpc),
            grpc_shutdown.cancelled_owned(),
        );

    let http_router = crate::http::router(crate::http::HttpState {
        runtime: runtime.clone(),
    });
    let http_shutdown = shutdown.clone();
    let http_server =
        axum::serve(http, http_router).with_graceful_shutdown(http_shutdown.cancelled_owned());

    tracing::info!(grpc = %grpc_addr, http = %http_addr, docker = %endpoint, "stevedore listening");

    let task_engine = engine.clone();
    let grace = config.shutdown_grace;
    let task_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        let grpc = tokio::spawn(grpc_server);
        let http = tokio::spawn(async move { http_server.await });
        let retention_engine = task_engine.clone();
        let retention = tokio::spawn(async move {
            // Age-based retention also needs time to pass; count-based runs after
            // every finished deployment too.
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                retention_engine.apply_retention().await;
            }
        });
        task_shutdown.cancelled().await;
        retention.abort();
        // Update streams end now (UNAVAILABLE + the sequence to resume from, see
        // api::forward); deployments get the grace to finish, then are interrupted.
        tracing::info!("shutting down: no new deployments; waiting for running ones");
        task_engine.stop_accepting();
        health_reporter
            .set_not_serving::<DeployerServer<DeployerService>>()
            .await;
        if tokio::time::timeout(grace, task_engine.drain())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "running deployments did not finish within the shutdown grace; interrupting them");
            task_engine.interrupt_all();
            if tokio::time::timeout(Duration::from_secs(60), task_engine.drain())
                .await
                .is_err()
            {
                tracing::error!(
                    "interrupted deployments did not wind down; the next start reconciles them"
                );
            }
        }
        task_engine.store().flush().await;
        match tokio::time::timeout(Duration::from_secs(10), grpc).await {
            Ok(r) => r??,
            Err(_) => tracing::warn!("gRPC connections did not close within 10s"),
        }
        http.await??;
        tracing::info!("stopped");
        Ok(())
    });
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        engine,
        shutdown,
        task,
    })
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: ServeConfig) -> Result<()> {
    let server = start(config, ObserverRegistry::new()).await?;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    server.wait().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
