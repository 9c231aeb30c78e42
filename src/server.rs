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

use crate::api::auth::{AuditRefusals, AuthLayer, Authenticator};
use crate::engine::{Engine, EngineConfig};
use crate::events::{DEFAULT_QUEUE, ObserverRegistry};
use crate::limits::LimitsConfig;
use crate::limits::OversizedRequestsLayer;
use crate::observers::audit::{AuditLog, AuditObserver};
use crate::observers::metrics::{Metrics, MetricsExporter, MetricsObserver};
use crate::observers::webhook::{WebhookConfig, WebhookObserver, WebhookSecret};
use crate::proto::deployer_server::DeployerServer;
use crate::runtime::Runtime;
use crate::runtime::docker::{DEFAULT_DOCKER_HOST, DockerRuntime};
use crate::security::{SecurityConfig, TlsListener};
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
    /// Tokens, TLS, deploy policy.
    #[command(flatten)]
    pub security: SecurityConfig,
    /// Message sizes, deployments in flight and queued, watch streams, Docker calls.
    #[command(flatten)]
    pub limits: LimitsConfig,
    /// The audit log (default: DATA_DIR/audit.log). While it cannot be written, new
    /// deployments are refused with UNAVAILABLE.
    #[arg(long, env = "STEVEDORE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Label deployment metrics with the app name (one series per app).
    #[arg(long, env = "STEVEDORE_METRICS_APP_LABEL")]
    pub metrics_app_label: bool,
    /// URL to POST deployment state changes to (repeatable; in the environment,
    /// comma-separated).
    #[arg(long = "webhook", env = "STEVEDORE_WEBHOOKS", value_delimiter = ',')]
    pub webhooks: Vec<String>,
    /// Secret of the webhook signatures (HMAC-SHA256); required with --webhook.
    #[arg(long, env = "STEVEDORE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<WebhookSecret>,
    /// Attempts per webhook event before it is given up.
    #[arg(long, env = "STEVEDORE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: u32,
    /// Wait before the first webhook retry; doubles up to --webhook-backoff-max.
    #[arg(long, env = "STEVEDORE_WEBHOOK_BACKOFF", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub webhook_backoff: Duration,
    /// Longest wait between two webhook retries.
    #[arg(long, env = "STEVEDORE_WEBHOOK_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub webhook_backoff_max: Duration,
    /// Time limit of one webhook POST.
    #[arg(long, env = "STEVEDORE_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
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

/// Queue of the metrics observer (it is fast: a full queue means a stuck server).
const METRICS_QUEUE: usize = 8192;
/// How often histogram samples are folded into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// On shutdown, how long queued webhook deliveries may still take (at most the
/// shutdown grace).
const WEBHOOK_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A server that is up: its bound addresses, and how to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub engine: Engine,
    /// The tokens in force, when `--tokens-file` was given ([`Authenticator::reload`]
    /// re-reads the file, as SIGHUP does for the binary).
    pub authenticator: Option<Authenticator>,
    /// The audit log this server writes.
    pub audit_log: Arc<AuditLog>,
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
    let security = &config.security;
    let limits = &config.limits;
    security.check_listen(&[("gRPC", config.listen), ("HTTP", config.http_listen)])?;
    let authenticator = security.authenticator()?;
    if let Some(auth) = &authenticator {
        tracing::info!(tokens_file = %auth.path().display(), "token authentication on");
    }
    let grpc_tls = security.grpc_tls()?;
    let http_tls = security.http_tls()?;

    let endpoint = config.docker_endpoint();
    let runtime: Arc<dyn Runtime> = Arc::new(
        DockerRuntime::new(&endpoint, config.docker_timeout)?
            .with_max_concurrent_calls(limits.max_docker_calls),
    );
    match runtime.ping().await {
        Ok(()) => tracing::info!(docker = %endpoint, "docker engine answers"),
        Err(e) => {
            tracing::warn!(docker = %endpoint, error = %e, "docker engine does not answer; deployments will be refused until it does")
        }
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir).await?;

    if !config.webhooks.is_empty()
        && config
            .webhook_secret
            .as_ref()
            .is_none_or(|s| s.0.is_empty())
    {
        return Err(
            "--webhook needs --webhook-secret (or STEVEDORE_WEBHOOK_SECRET) to sign with".into(),
        );
    }
    let shutdown = CancellationToken::new();

    // The built-in observers. Adding one: a type implementing `Observer`, one line here.
    let metrics = Arc::new(Metrics::new(config.metrics_app_label));
    let audit_path = config
        .audit_log
        .clone()
        .unwrap_or_else(|| config.data_dir.join("audit.log"));
    let audit_log = AuditLog::open(&audit_path);
    let mut subscriptions = vec![
        observers.subscribe(
            Arc::new(MetricsObserver::new(metrics.clone())),
            METRICS_QUEUE,
        ),
        observers.subscribe_lossless(Arc::new(AuditObserver::new(audit_log.clone()))),
    ];
    if !config.webhooks.is_empty() {
        let webhooks = WebhookConfig {
            urls: config.webhooks.clone(),
            secret: config
                .webhook_secret
                .as_ref()
                .map(|s| s.0.clone())
                .unwrap_or_default(),
            max_attempts: config.webhook_max_attempts,
            backoff_initial: config.webhook_backoff,
            backoff_max: config.webhook_backoff_max,
            timeout: config.webhook_timeout,
            shutdown_grace: WEBHOOK_SHUTDOWN_GRACE.min(config.shutdown_grace),
        };
        let observer = WebhookObserver::new(webhooks, Some(metrics.clone()));
        subscriptions.push(observers.subscribe(Arc::new(observer), DEFAULT_QUEUE));
    }
    let upkeep = metrics.spawn_upkeep(METRICS_UPKEEP, shutdown.clone());

    let engine_config = EngineConfig {
        max_in_flight: limits.max_in_flight,
        max_queued: limits.max_queued,
        retention: Retention {
            max_deployments: config.retention_max_deployments,
            max_age: config.retention_max_age,
            max_log_updates: config.retention_max_log_updates,
        },
        ..EngineConfig::default()
    };
    let engine = Engine::new(
        runtime.clone(),
        observers.clone(),
        engine_config,
        store.clone(),
    );
    // Reconcile what a previous process left before serving anything (the observers
    // are subscribed, so the interrupted deployments' ends are audited too).
    let recovery = engine.recover().await?;
    if !recovery.interrupted.is_empty() {
        tracing::warn!(
            deployments = recovery.interrupted.len(),
            containers_removed = recovery.containers_removed,
            "ended deployments interrupted by a restart"
        );
    }
    engine.apply_retention().await;

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
    // Refused calls (auth, deploy policy) are written to the audit log too.
    let refusals = {
        let log = audit_log.clone();
        AuditRefusals::new(move |refusal| log.record_refusal(refusal))
    };
    let service = DeployerServer::new(
        DeployerService::with_streams(engine.clone(), shutdown.clone(), streams)
            .with_audit(refusals.clone())
            .with_policy(security.policy())
            .with_max_watch_streams(limits.max_watch_streams),
    )
    .max_decoding_message_size(limits.max_request_bytes)
    .max_encoding_message_size(limits.max_response_bytes);
    let grpc_shutdown = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = grpc_tls {
        builder = builder.tls_config(tls)?;
    }
    let grpc_server = builder
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .layer(
            AuthLayer::new(authenticator.clone(), engine.rejections().clone()).with_audit(refusals),
        )
        .layer(OversizedRequestsLayer::new(engine.rejections().clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(grpc),
            grpc_shutdown.cancelled_owned(),
        );

    let writable_log = audit_log.clone();
    let exporter = MetricsExporter {
        metrics,
        engine: engine.clone(),
        observers,
        audit_writable: Some(Arc::new(move || writable_log.is_writable())),
    };
    let http_router = crate::http::router(crate::http::HttpState {
        runtime: runtime.clone(),
        metrics: Some(Arc::new(exporter)),
    });
    let http_shutdown = shutdown.clone();
    type HttpServer = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;
    let http_server: HttpServer = match http_tls {
        None => Box::pin(
            axum::serve(http, http_router)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .into_future(),
        ),
        Some(tls) => Box::pin(
            axum::serve(TlsListener::new(http, tls, shutdown.clone())?, http_router)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .into_future(),
        ),
    };

    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        docker = %endpoint,
        tls = security.tls_enabled(),
        mtls = security.tls_client_ca.is_some(),
        auth = authenticator.is_some(),
        "stevedore listening"
    );

    let task_engine = engine.clone();
    let grace = config.shutdown_grace;
    let task_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        let grpc = tokio::spawn(grpc_server);
        let http = tokio::spawn(http_server);
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
        // Let the observers write what the last deployments reported (the audit log
        // syncs every record; webhooks get a short grace).
        for subscription in subscriptions {
            subscription.drain().await;
        }
        let _ = upkeep.await;
        tracing::info!("stopped");
        Ok(())
    });
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        engine,
        authenticator,
        audit_log,
        shutdown,
        task,
    })
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: ServeConfig) -> Result<()> {
    // Installed before the server announces itself, so an early SIGHUP reloads
    // instead of killing the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let server = start(config, ObserverRegistry::new()).await?;
    if let Some(auth) = server.authenticator.clone() {
        reload_tokens_on_sighup(auth, hangup);
    }
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

/// Re-reads the tokens file on each SIGHUP; a file that does not parse leaves the
/// tokens in force unchanged.
fn reload_tokens_on_sighup(auth: Authenticator, mut hangup: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match auth.reload() {
                Ok(n) => {
                    tracing::info!(tokens = n, file = %auth.path().display(), "SIGHUP: tokens file reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: tokens file not reloaded; the previous tokens stay in force")
                }
            }
        }
    });
}
