//! Resource limits: how much a server accepts at once, and how many calls each limit
//! has turned away. The counters are plain atomics so any observer (the metrics
//! exporter) can read them with [`Rejections::snapshot`] without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Default cap on requests and responses of the gRPC service (bytes).
pub(crate) const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Default cap on apps deploying at the same time.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Default cap on deployments waiting for their app's lock, over all apps.
pub(crate) const DEFAULT_MAX_QUEUED: usize = 64;
/// Default cap on open WatchDeployment streams.
pub(crate) const DEFAULT_MAX_WATCH_STREAMS: usize = 256;
/// Default cap on Docker API calls in progress at once.
pub(crate) const DEFAULT_MAX_DOCKER_CALLS: usize = 32;
/// Default cap on concurrent HTTP/2 streams per gRPC connection.
pub(crate) const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;

/// `stevedore serve` limit flags; each has a `STEVEDORE_…` environment fallback.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitsConfig {
    /// Largest gRPC request accepted (bytes); larger ones get OUT_OF_RANGE.
    #[arg(long, env = "STEVEDORE_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Largest gRPC response sent (bytes).
    #[arg(long, env = "STEVEDORE_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES)]
    pub max_response_bytes: usize,
    /// Apps deploying at the same time; beyond it Deploy gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "STEVEDORE_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Deployments waiting for their app's lock (all apps together); beyond it Deploy
    /// gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "STEVEDORE_MAX_QUEUED", default_value_t = DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,
    /// Open WatchDeployment streams; beyond it WatchDeployment gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "STEVEDORE_MAX_WATCH_STREAMS", default_value_t = DEFAULT_MAX_WATCH_STREAMS)]
    pub max_watch_streams: usize,
    /// Docker API calls in progress at once (others wait their turn).
    #[arg(long, env = "STEVEDORE_MAX_DOCKER_CALLS", default_value_t = DEFAULT_MAX_DOCKER_CALLS)]
    pub(crate) max_docker_calls: usize,
    /// Concurrent HTTP/2 streams per gRPC connection.
    #[arg(long, env = "STEVEDORE_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval: a client that does not answer within the
    /// timeout is disconnected, so half-open connections are reclaimed.
    #[arg(long, env = "STEVEDORE_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    #[arg(long, env = "STEVEDORE_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
}

/// Which limit or rule turned a call away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No or an unknown bearer token.
    Unauthenticated,
    /// A known token without the scope the call needs.
    PermissionDenied,
    /// The deploy policy refused the request (registry, privileged port).
    Policy,
    /// Too many apps deploying at once.
    InFlight,
    /// Too many deployments waiting for their app's lock.
    Queued,
    /// Too many open watch streams.
    WatchStreams,
    /// A request larger than `--max-request-bytes`.
    MessageSize,
}

impl Rejection {
    pub(crate) const ALL: [Rejection; 7] = [
        Rejection::Unauthenticated,
        Rejection::PermissionDenied,
        Rejection::Policy,
        Rejection::InFlight,
        Rejection::Queued,
        Rejection::WatchStreams,
        Rejection::MessageSize,
    ];

    /// A stable, low-cardinality name (a metric label value).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::PermissionDenied => "permission_denied",
            Rejection::Policy => "policy",
            Rejection::InFlight => "deployments_in_flight",
            Rejection::Queued => "deployments_queued",
            Rejection::WatchStreams => "watch_streams",
            Rejection::MessageSize => "message_size",
        }
    }
}

/// Calls turned away, per [`Rejection`]. Shared by the engine and the gRPC layer.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: [AtomicU64; Rejection::ALL.len()],
}

impl Rejections {
    pub(crate) fn record(&self, r: Rejection) {
        self.counts[Self::index(r)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: Rejection) -> u64 {
        self.counts[Self::index(r)].load(Ordering::Relaxed)
    }

    /// Every counter with its name, e.g. for `stevedore_rejections_total{limit=…}`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Rejection::ALL
            .iter()
            .map(|r| (r.as_str(), self.get(*r)))
            .collect()
    }

    fn index(r: Rejection) -> usize {
        Rejection::ALL
            .iter()
            .position(|x| *x == r)
            .expect("every rejection is listed")
    }
}
