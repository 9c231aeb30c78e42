//! Wiring: configuration, the runtime, the engine, the gRPC server (with reflection and
//! health) and the HTTP side, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::{DeployerService, StreamConfig};

use crate::api::auth::{Authenticator, Refusals, auth_layer};
use crate::api::service::deployer_server::DeployerServer;
use crate::engine::{Engine, EngineConfig};
use crate::events::{DEFAULT_QUEUE, ObserverRegistry, Subscription};
use crate::http::MetricsExporter;
use crate::limits::{LimitsConfig, Rejections};
use crate::lock::{DATA_DIR_LOCK_FILE, HeldLock, LockError, audit_lock_path};
use crate::observers::audit::{AUDIT_LOG_FILE, AuditLog, AuditObserver};
use crate::observers::metrics::{Metrics, MetricsObserver};
use crate::observers::webhook::{WebhookConfig, WebhookObserver, WebhookSecret};
use crate::proxy::client::ProxyClient;
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
    /// Host address the apps' ports are published on when a request's
    /// `PortMapping.host_ip` is empty. The default keeps apps reachable from this host
    /// only; 0.0.0.0 (or ::) opens them to the network.
    #[arg(long, env = "STEVEDORE_PUBLISH_IP", default_value = "127.0.0.1")]
    pub publish_ip: std::net::IpAddr,
    /// Docker engine address (unix://PATH, tcp://HOST:PORT). Default: DOCKER_HOST, else
    /// the local socket.
    #[arg(long, env = "STEVEDORE_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Where apps run: `docker` (one container per app on the engine) or `swarm` (one
    /// Swarm service per app, with replicas and rolling updates; the engine must be a
    /// swarm manager, else Deploy answers FAILED_PRECONDITION). See docs/SWARM.md.
    #[arg(long, env = "STEVEDORE_TARGET", default_value = "docker", value_parser = parse_target)]
    pub target: crate::model::Target,
    /// Time limit of each Docker call (pulls: of each silence in the pull stream).
    #[arg(long, env = "STEVEDORE_DOCKER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub docker_timeout: Duration,
    /// How often the reconciler removes containers that are neither their app's
    /// current version nor part of a live deployment (while the engine answers).
    #[arg(long, env = "STEVEDORE_RECONCILE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// The admin socket of `stevedore proxy`: with it, a fixed host port is the app's
    /// stable address, served by the proxy, and a redeploy switches it without an
    /// outage (see docs/PROXY.md). Without it, the engine publishes fixed host ports
    /// itself and the previous version is stopped before the new one starts.
    #[arg(long, env = "STEVEDORE_PROXY_SOCKET")]
    pub proxy_socket: Option<PathBuf>,
    /// How long to wait on SIGTERM for running deployments to finish; those still
    /// running then are interrupted (rolled back, ended FAILED) before exiting.
    #[arg(long, env = "STEVEDORE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Threads running the server's tasks (the gRPC and HTTP services, deployments,
    /// observers). Default: half the host's cores, at least one, leaving the rest to
    /// the Docker engine beside it and to the store's and blocking threads. A
    /// deployment waits on the engine most of its time; every extra worker adds
    /// wake-ups between threads to each update (see docs/PERFORMANCE.md). Read by
    /// `stevedore serve` when it builds its runtime.
    #[arg(long, env = "STEVEDORE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
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
    #[arg(
        long = "webhook",
        env = "STEVEDORE_WEBHOOKS",
        value_delimiter = ',',
        requires = "webhook_secret"
    )]
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

fn parse_target(s: &str) -> std::result::Result<crate::model::Target, String> {
    match s {
        "docker" => Ok(crate::model::Target::Docker),
        "swarm" => Ok(crate::model::Target::Swarm),
        other => Err(format!("{other:?}: use docker or swarm")),
    }
}

impl ServeConfig {
    /// Every flag at its default: the one place defaults are written is the clap
    /// attributes above (and the constants they name). Environment fallbacks are not
    /// read here, so a test config does not pick up a `STEVEDORE_…` variable.
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let matches = Defaults::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .get_matches_from(["stevedore"]);
        Defaults::from_arg_matches(&matches)
            .expect("every flag has a default or is optional")
            .serve
    }

    /// The runtime's worker threads: `--worker-threads`, else half of `cores`, at
    /// least one.
    pub fn runtime_workers(&self, cores: usize) -> usize {
        self.worker_threads.map_or((cores / 2).max(1), usize::from)
    }

    /// The audit log's path: `--audit-log`, else `DATA_DIR/audit.log`.
    pub(crate) fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join(AUDIT_LOG_FILE))
    }

    /// The webhook observer's settings, when `--webhook` was given.
    fn webhook_config(&self) -> Result<Option<WebhookConfig>> {
        if self.webhooks.is_empty() {
            return Ok(None);
        }
        // clap enforces the flag for the binary (`requires`); an empty secret, or a
        // config built in code (tests, embedders), is refused here.
        let secret = self
            .webhook_secret
            .as_ref()
            .filter(|s| !s.0.is_empty())
            .context(
                "--webhook needs --webhook-secret (or STEVEDORE_WEBHOOK_SECRET) to sign with",
            )?;
        Ok(Some(WebhookConfig {
            urls: self.webhooks.clone(),
            secret: secret.0.clone(),
            max_attempts: self.webhook_max_attempts,
            backoff_initial: self.webhook_backoff,
            backoff_max: self.webhook_backoff_max,
            timeout: self.webhook_timeout,
            shutdown_grace: WEBHOOK_SHUTDOWN_GRACE.min(self.shutdown_grace),
        }))
    }

    /// The Docker address to use: the flag, else `DOCKER_HOST`, else the local socket.
    pub(crate) fn docker_endpoint(&self) -> String {
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
/// On shutdown, how long deployments interrupted after the grace may take to wind down.
const INTERRUPT_GRACE: Duration = Duration::from_secs(60);
/// On shutdown, how long open gRPC connections may take to close.
const GRPC_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How often retention runs (age-based retention needs time to pass; count-based
/// retention also runs after every finished deployment).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// A server that is up: its bound addresses, and how to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub engine: Engine,
    /// The tokens in force, when `--tokens-file` was given ([`Authenticator::reload`]
    /// re-reads the file, as SIGHUP does for the binary).
    pub(crate) authenticator: Option<Authenticator>,
    /// The audit log this server writes.
    pub audit_log: Arc<AuditLog>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// Triggers a graceful shutdown and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// A token that shuts the server down when cancelled.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped.
    pub(crate) async fn wait(self) -> Result<()> {
        self.task.await?
    }
}

/// Binds both listeners and starts serving. Returns once the server accepts calls.
pub async fn start(config: ServeConfig, observers: ObserverRegistry) -> Result<RunningServer> {
    let security = &config.security;
    security.check_listen(&[("gRPC", config.listen), ("HTTP", config.http_listen)])?;
    let authenticator = security.authenticator()?;
    if let Some(auth) = &authenticator {
        tracing::info!(tokens_file = %auth.path().display(), "token authentication on");
    }
    let tls = security.tls_config()?;
    let webhooks = config.webhook_config()?;
    let docker = docker_runtime(&config).await?;
    let runtime: Arc<dyn Runtime> = docker.clone();
    let locks = lock_data_dir(&config)?;
    let store = Store::open(&config.data_dir).await?;
    let shutdown = CancellationToken::new();

    let audit_log = AuditLog::open(config.audit_log_path());
    let subscribed = subscribe_observers(&config, webhooks, &observers, &audit_log, &shutdown);
    let swarm = swarm_runtime(&config, docker).await;
    let engine = start_engine(&config, runtime.clone(), swarm, observers.clone(), store).await?;

    let grpc = bind(config.listen, "gRPC").await?;
    let http = bind(config.http_listen, "HTTP").await?;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    // The counters of calls turned away: the engine counts its own limits (in flight,
    // queued); the gRPC layer counts and publishes its refusals to the observers
    // (the audit log records them), and /metrics exports them all.
    let rejections = engine.rejections().clone();
    let refusals = Refusals::new(rejections.clone(), observers.clone());
    let grpc = GrpcSide {
        engine: engine.clone(),
        authenticator: authenticator.clone(),
        refusals: refusals.clone(),
        rejections: rejections.clone(),
        tls: tls.clone(),
    }
    .spawn(&config, grpc, shutdown.clone())
    .await?;
    let router = http_router(HttpSide {
        runtime,
        engine: engine.clone(),
        metrics: subscribed.metrics.clone(),
        observers,
        rejections,
        audit_log: audit_log.clone(),
        deployer: grpc.deployer.clone(),
        authenticator: authenticator.clone(),
        refusals,
    });
    let http = spawn_http(http, tls, router, &shutdown)?;
    Listening {
        grpc: grpc_addr,
        http: http_addr,
    }
    .log(&config, authenticator.is_some());
    let retention = engine.spawn_retention(RETENTION_EVERY, shutdown.clone());
    // Ends with `shutdown`.
    // The container reconciler is the docker target's: on a swarm, the tasks'
    // containers are Swarm's to remove.
    if config.target == crate::model::Target::Docker {
        drop(engine.spawn_reconciler(config.reconcile_interval, shutdown.clone()));
    }
    let serving = Serving {
        engine: engine.clone(),
        grace: config.shutdown_grace,
        grpc,
        http,
        retention,
        observers: subscribed,
        locks,
    };
    let task = tokio::spawn(serving.until(shutdown.clone()));
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

/// The line a started server logs once both listeners are bound, and the one reader
/// of it (the integration tests and the benches; `scripts/lib/serve.sh` reads the same
/// two fields with sed). In text logs:
/// `… stevedore listening grpc=ADDR http=ADDR docker=… tls=… mtls=… auth=…`;
/// in JSON logs (`--log-format json`) one object with `"message":"stevedore listening"`
/// and the same fields as strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// Where the gRPC server accepts calls.
    pub grpc: SocketAddr,
    /// Where the HTTP side (page, HTTP API, `/metrics`) accepts requests.
    pub http: SocketAddr,
}

impl Listening {
    /// The line's message.
    pub const MESSAGE: &str = "stevedore listening";

    /// The addresses in `line` when it is the listening line (text or JSON), else `None`.
    pub fn parse(line: &str) -> Option<Self> {
        if !line.contains(Self::MESSAGE) {
            return None;
        }
        let json = serde_json::from_str::<serde_json::Value>(line).ok();
        let field = |name: &str| -> Option<SocketAddr> {
            match &json {
                Some(json) => json.get(name)?.as_str()?.parse().ok(),
                None => {
                    let (_, rest) = line.split_once(&format!(" {name}="))?;
                    rest.split_whitespace().next()?.parse().ok()
                }
            }
        };
        Some(Self {
            grpc: field("grpc")?,
            http: field("http")?,
        })
    }

    fn log(&self, config: &ServeConfig, auth: bool) {
        tracing::info!(
            grpc = %self.grpc,
            http = %self.http,
            docker = %config.docker_endpoint(),
            tls = config.security.tls_enabled(),
            mtls = config.security.tls_client_ca.is_some(),
            auth,
            "stevedore listening"
        );
    }
}

/// Creates the data dir and locks it and the audit log, before recovery touches
/// anything: a second server on the same data dir (or audit log) would remove the
/// first one's live containers and break its audit chain.
fn lock_data_dir(config: &ServeConfig) -> Result<Vec<HeldLock>> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow!("cannot create data dir {}: {e}", config.data_dir.display()))?;
    let mut locks = vec![HeldLock::acquire(
        &config.data_dir.join(DATA_DIR_LOCK_FILE),
        &format!("data dir {}", config.data_dir.display()),
    )?];
    match HeldLock::acquire(
        &audit_lock_path(&config.audit_log_path()),
        &format!("audit log {}", config.audit_log_path().display()),
    ) {
        Ok(lock) => locks.push(lock),
        Err(e @ LockError::Held(_)) => return Err(e.into()),
        // An audit log that cannot be written yet does not stop the start: deployments
        // are refused until it can (see AuditLog), and nobody else writes it.
        Err(e @ LockError::Io(_)) => tracing::warn!(error = %e, "audit log not locked"),
    }
    Ok(locks)
}

/// What the HTTP side serves: the page, `/metrics` and the HTTP API.
struct HttpSide {
    runtime: Arc<dyn Runtime>,
    engine: Engine,
    metrics: Arc<Metrics>,
    observers: ObserverRegistry,
    rejections: Arc<Rejections>,
    audit_log: Arc<AuditLog>,
    deployer: Arc<DeployerService>,
    authenticator: Option<Authenticator>,
    refusals: Refusals,
}

fn http_router(side: HttpSide) -> axum::Router {
    let audit_log = side.audit_log;
    let exporter = MetricsExporter {
        metrics: side.metrics,
        engine: side.engine,
        observers: side.observers,
        rejections: side.rejections,
        audit_writable: Some(Arc::new(move || audit_log.is_writable())),
    };
    crate::http::router(crate::http::HttpState {
        runtime: side.runtime,
        metrics: Some(Arc::new(exporter)),
        // The HTTP API calls the same Deployer service (same auth, limits, refusals).
        api: Some(crate::http::api::ApiState {
            deployer: side.deployer,
            auth: side.authenticator,
            refusals: side.refusals,
        }),
    })
}

/// The Docker runtime, pinged once to log whether the engine answers (a server whose
/// engine is down still starts: deployments are refused until it answers).
async fn docker_runtime(config: &ServeConfig) -> Result<Arc<DockerRuntime>> {
    let endpoint = config.docker_endpoint();
    let runtime = Arc::new(
        DockerRuntime::new(&endpoint, config.docker_timeout)?
            .with_max_concurrent_calls(config.limits.max_docker_calls),
    );
    match runtime.ping().await {
        Ok(()) => tracing::info!(docker = %endpoint, "docker engine answers"),
        Err(e) => {
            tracing::warn!(docker = %endpoint, error = %e, "docker engine does not answer; deployments will be refused until it does")
        }
    }
    Ok(runtime)
}

/// With `--target swarm`: the same engine, driven as a swarm manager (checked once to
/// log whether it is one; a server on an engine that is not one still starts, and
/// Deploy answers FAILED_PRECONDITION until it is).
async fn swarm_runtime(
    config: &ServeConfig,
    docker: Arc<DockerRuntime>,
) -> Option<Arc<dyn crate::runtime::swarm::SwarmRuntime>> {
    use crate::runtime::swarm::SwarmRuntime;
    if config.target != crate::model::Target::Swarm {
        return None;
    }
    match docker.check_manager().await {
        Ok(()) => {
            tracing::info!(docker = %config.docker_endpoint(), "target swarm: the engine is a swarm manager")
        }
        Err(e) => {
            tracing::warn!(error = %e, "target swarm: deployments will be refused until the engine is a swarm manager")
        }
    }
    Some(docker)
}

/// The built-in observers, subscribed, and what shutdown needs of them.
struct SubscribedObservers {
    metrics: Arc<Metrics>,
    subscriptions: Vec<Subscription>,
    upkeep: JoinHandle<()>,
}

/// Subscribes the built-in observers. Adding one: a type implementing `Observer`, one
/// line here.
fn subscribe_observers(
    config: &ServeConfig,
    webhooks: Option<WebhookConfig>,
    observers: &ObserverRegistry,
    audit_log: &Arc<AuditLog>,
    shutdown: &CancellationToken,
) -> SubscribedObservers {
    let metrics = Arc::new(Metrics::new(config.metrics_app_label));
    let mut subscriptions = vec![
        observers.subscribe(
            Arc::new(MetricsObserver::new(metrics.clone())),
            METRICS_QUEUE,
        ),
        observers.subscribe_lossless(Arc::new(AuditObserver::new(audit_log.clone()))),
    ];
    if let Some(webhooks) = webhooks {
        let observer = WebhookObserver::new(webhooks, Some(metrics.clone()));
        subscriptions.push(observers.subscribe(Arc::new(observer), DEFAULT_QUEUE));
    }
    let upkeep = metrics.spawn_upkeep(METRICS_UPKEEP, shutdown.clone());
    SubscribedObservers {
        metrics,
        subscriptions,
        upkeep,
    }
}

/// The engine, after reconciling what a previous process left and applying retention
/// (before serving anything; the observers are subscribed, so the interrupted
/// deployments' ends are audited too).
async fn start_engine(
    config: &ServeConfig,
    runtime: Arc<dyn Runtime>,
    swarm: Option<Arc<dyn crate::runtime::swarm::SwarmRuntime>>,
    observers: ObserverRegistry,
    store: Store,
) -> Result<Engine> {
    let engine_config = EngineConfig {
        max_in_flight: config.limits.max_in_flight,
        max_queued: config.limits.max_queued,
        publish_ip: config.publish_ip,
        sources_dir: config.data_dir.join("sources"),
        allow_local_git: config.security.allow_local_git,
        proxy: (config.proxy_socket.as_ref())
            .map(ProxyClient::new)
            .transpose()
            .context("--proxy-socket")?,
        retention: Retention {
            max_deployments: config.retention_max_deployments,
            max_age: config.retention_max_age,
            max_log_updates: config.retention_max_log_updates,
        },
        ..EngineConfig::default()
    };
    let engine = match swarm {
        Some(swarm) => Engine::with_swarm(runtime, swarm, observers, engine_config, store),
        None => Engine::new(runtime, observers, engine_config, store),
    };
    let recovery = engine.recover().await?;
    if !recovery.interrupted.is_empty() {
        tracing::warn!(
            deployments = recovery.interrupted.len(),
            containers_removed = recovery.containers_removed,
            "ended deployments interrupted by a restart"
        );
    }
    if !recovery.completed.is_empty() {
        tracing::warn!(
            deployments = recovery.completed.len(),
            "completed deployments interrupted past the point of no return"
        );
    }
    if !recovery.following.is_empty() {
        tracing::warn!(
            deployments = recovery.following.len(),
            "following swarm deployments interrupted by a restart in the background: each ends once its service's update does"
        );
    }
    // After recovery decided which version each app keeps: the routes follow.
    if let Some(proxy) = engine.proxy() {
        match engine.reconcile_routes().await {
            Ok(done) => tracing::info!(
                proxy = %proxy.socket().display(),
                set = done.set,
                removed = done.removed,
                "routes reconciled with the proxy"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "routes not reconciled: the proxy does not answer (the reconciler retries every --reconcile-interval)"
            ),
        }
    }
    engine.apply_retention().await;
    Ok(engine)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow!("cannot listen on {addr} ({what}): {e}"))
}

/// The gRPC side: the Deployer service behind auth and the size counter, with health
/// and reflection (v1 and v1alpha).
struct GrpcSide {
    engine: Engine,
    authenticator: Option<Authenticator>,
    rejections: Arc<Rejections>,
    refusals: Refusals,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The gRPC server's task and the health reporter that shutdown marks not serving.
struct GrpcServer {
    /// The Deployer service, shared with the HTTP API.
    deployer: Arc<DeployerService>,
    task: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    health: tonic_health::server::HealthReporter,
}

impl GrpcSide {
    async fn spawn(
        self,
        config: &ServeConfig,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<GrpcServer> {
        let limits = &config.limits;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<DeployerServer<DeployerService>>()
            .await;
        let streams = StreamConfig {
            heartbeat_interval: config.heartbeat_interval,
            buffer: config.watch_buffer,
            stall_timeout: config.watch_stall_timeout,
        };
        let deployer = Arc::new(
            DeployerService::with_streams(self.engine, shutdown.clone(), streams)
                .with_refusals(self.refusals.clone())
                .with_policy(config.security.policy())
                .with_max_watch_streams(limits.max_watch_streams),
        );
        let service = DeployerServer::from_arc(deployer.clone())
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes);
        let auth = auth_layer(self.authenticator, self.refusals);
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .max_concurrent_streams(limits.max_concurrent_streams)
            .layer(auth)
            .layer(crate::api::count_oversized_requests(self.rejections))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(service);
        // TLS is terminated in our own listener (as on the HTTP side), so that every
        // refused handshake is logged with its peer and reason.
        let task = match self.tls {
            None => tokio::spawn(router.serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )),
            Some(tls) => {
                let incoming = TlsListener::new(listener, tls, shutdown.clone())?.into_incoming();
                tokio::spawn(
                    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()),
                )
            }
        };
        Ok(GrpcServer {
            deployer,
            task,
            health,
        })
    }
}

/// Server reflection of the Deployer and health services.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Serves `router` on `listener`, behind TLS when `tls` is given.
fn spawn_http(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: &CancellationToken,
) -> Result<JoinHandle<std::io::Result<()>>> {
    Ok(match tls {
        None => tokio::spawn(serve_http(listener, router, shutdown.clone())),
        Some(tls) => {
            let listener = TlsListener::new(listener, tls, shutdown.clone())?;
            tokio::spawn(serve_http(listener, router, shutdown.clone()))
        }
    })
}

/// Serves the HTTP side on `listener` (plain or TLS) until `shutdown`.
async fn serve_http<L>(
    listener: L,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    for<'a> crate::http::Peer:
        axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let service = router.into_make_service_with_connect_info::<crate::http::Peer>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// What runs while the server serves, and is wound down on shutdown.
struct Serving {
    engine: Engine,
    grace: Duration,
    grpc: GrpcServer,
    http: JoinHandle<std::io::Result<()>>,
    retention: JoinHandle<()>,
    observers: SubscribedObservers,
    /// The data dir's and the audit log's locks, released once the server has stopped.
    #[allow(dead_code)]
    locks: Vec<HeldLock>,
}

impl Serving {
    /// Waits for `shutdown`, then shuts down: no new deployments; update streams end
    /// now (UNAVAILABLE + the sequence to resume from, see api::forward); running
    /// deployments get the grace to finish, then are interrupted; then the listeners
    /// close and the observers write what the last deployments reported.
    async fn until(self, shutdown: CancellationToken) -> Result<()> {
        shutdown.cancelled().await;
        self.retention.abort();
        tracing::info!("shutting down: no new deployments; waiting for running ones");
        self.engine.stop_accepting();
        self.grpc
            .health
            .set_not_serving::<DeployerServer<DeployerService>>()
            .await;
        wind_down_deployments(&self.engine, self.grace).await;
        self.engine.store().flush().await;
        match tokio::time::timeout(GRPC_CLOSE_GRACE, self.grpc.task).await {
            Ok(r) => r??,
            Err(_) => tracing::warn!("gRPC connections did not close within {GRPC_CLOSE_GRACE:?}"),
        }
        self.http.await??;
        // The audit log syncs every record; webhooks get a short grace.
        for subscription in self.observers.subscriptions {
            subscription.drain().await;
        }
        let _ = self.observers.upkeep.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Lets running deployments finish within `grace`, then interrupts those left.
async fn wind_down_deployments(engine: &Engine, grace: Duration) {
    if tokio::time::timeout(grace, engine.drain()).await.is_ok() {
        return;
    }
    tracing::warn!(grace = ?grace, "running deployments did not finish within the shutdown grace; interrupting them");
    engine.interrupt_all();
    if tokio::time::timeout(INTERRUPT_GRACE, engine.drain())
        .await
        .is_err()
    {
        tracing::error!(
            "interrupted deployments did not wind down; the next start reconciles them"
        );
    }
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: ServeConfig) -> Result<()> {
    // Installed before the server announces itself, so an early SIGHUP reloads
    // instead of killing the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let server = start(config, ObserverRegistry::new()).await?;
    match server.authenticator.clone() {
        Some(auth) => reload_tokens_on_sighup(auth, hangup),
        None => say_nothing_to_reload_on_sighup(hangup),
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

/// Without a tokens file SIGHUP has nothing to reload: say so instead of ignoring it.
fn say_nothing_to_reload_on_sighup(mut hangup: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP: nothing reloaded; token authentication is off (the server was started without --tokens-file)"
            );
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_flags() {
        let d = ServeConfig::defaults();
        assert_eq!(d.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(d.watch_buffer, 64);
        assert_eq!(d.webhook_backoff, Duration::from_millis(500));
        assert_eq!(d.limits.max_in_flight, crate::limits::DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(d.limits.keepalive_timeout, Duration::from_secs(10));
        assert!(d.webhooks.is_empty() && d.security.tokens_file.is_none());
    }

    /// Half the cores by default, at least one; the flag wins; 0 is refused.
    #[test]
    fn worker_threads_default_to_half_the_cores() {
        let d = ServeConfig::defaults();
        assert_eq!(d.worker_threads, None);
        assert_eq!(d.runtime_workers(1), 1);
        assert_eq!(d.runtime_workers(2), 1);
        assert_eq!(d.runtime_workers(3), 1);
        assert_eq!(d.runtime_workers(16), 8);
        let set = ServeConfig {
            worker_threads: Some(3),
            ..ServeConfig::defaults()
        };
        assert_eq!(set.runtime_workers(2), 3);
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            serve: ServeConfig,
        }
        use clap::Parser;
        assert!(Args::try_parse_from(["s", "--worker-threads", "0"]).is_err());
        let parsed = Args::try_parse_from(["s", "--worker-threads", "4"]).unwrap();
        assert_eq!(parsed.serve.worker_threads, Some(4));
    }

    /// What `Listening::log` prints, in the given format, read back by `Listening::parse`.
    fn logged(json: bool) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        let listening = Listening {
            grpc: "127.0.0.1:50051".parse().unwrap(),
            http: "[::1]:8080".parse().unwrap(),
        };
        let config = ServeConfig::defaults();
        if json {
            let subscriber = builder.json().flatten_event(true).finish();
            tracing::subscriber::with_default(subscriber, || listening.log(&config, true));
        } else {
            let subscriber = builder.finish();
            tracing::subscriber::with_default(subscriber, || listening.log(&config, true));
        }
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_listening_line_reads_back_in_text_and_json() {
        let expected = Listening {
            grpc: "127.0.0.1:50051".parse().unwrap(),
            http: "[::1]:8080".parse().unwrap(),
        };
        for json in [false, true] {
            let text = logged(json);
            let line = text.lines().find(|l| l.contains(Listening::MESSAGE));
            let line = line.unwrap_or_else(|| panic!("no listening line in {text:?}"));
            assert_eq!(Listening::parse(line), Some(expected), "{line}");
        }
        assert_eq!(Listening::parse("stevedore listening grpc=nonsense"), None);
        assert_eq!(Listening::parse("something else grpc=127.0.0.1:1"), None);
    }
}
