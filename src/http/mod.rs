//! The HTTP side (axum): `/healthz` for load balancers and operators, `/metrics` for
//! Prometheus, the JSON API with its event streams (`api.rs`) and the dashboard page
//! (`page.rs`).

pub(crate) mod api;
pub(crate) mod page;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::engine::Engine;
use crate::events::ObserverRegistry;
use crate::limits::Rejections;
use crate::model::DeploymentState;
use crate::observers::metrics::Metrics;
use crate::runtime::Runtime;

/// The address of an HTTP client, as the listener (plain or TLS) accepted it: the
/// connect info of the router (`into_make_service_with_connect_info::<Peer>`), which the
/// API hands to the Deployer service as the gRPC server would (`requested_by` without
/// auth, the peer of a refusal).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::security::TlsListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::security::TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) runtime: Arc<dyn Runtime>,
    /// Renders `/metrics` (404 without it).
    pub(crate) metrics: Option<Arc<MetricsExporter>>,
    /// The JSON API and the page (absent: not served).
    pub(crate) api: Option<api::ApiState>,
}

pub(crate) fn router(state: HttpState) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    if let Some(api) = state.api.clone() {
        router = router.merge(api::router(api)).merge(page::router());
    }
    router.with_state(state)
}

/// 200 when the server runs; the body says whether the Docker engine answers (an engine
/// that is down does not make the server unhealthy: status and history still answer).
async fn healthz(State(state): State<HttpState>) -> (StatusCode, String) {
    let engine = match state.runtime.ping().await {
        Ok(()) => "docker: ok".to_owned(),
        Err(e) => format!("docker: {e}"),
    };
    (StatusCode::OK, format!("ok\n{engine}\n"))
}

/// Prometheus text exposition (format 0.0.4).
async fn metrics(State(state): State<HttpState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match &state.metrics {
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
        Some(exporter) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            exporter.render(),
        )
            .into_response(),
    }
}

/// Renders `/metrics`: samples what is better read than counted (gauges from the
/// engine, observer counters from the registry), then the exposition.
pub(crate) struct MetricsExporter {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) engine: Engine,
    pub(crate) observers: ObserverRegistry,
    /// Calls turned away, per limit (`stevedore_rejections_total`).
    pub(crate) rejections: Arc<Rejections>,
    /// Whether the audit log can be written now, when there is one.
    pub(crate) audit_writable: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl MetricsExporter {
    pub(crate) fn render(&self) -> String {
        let m = &self.metrics;
        let counts = self.engine.state_counts();
        let count = |s| counts.get(&s).copied().unwrap_or(0) as f64;
        m.gauge("stevedore_deployments_running", &[])
            .set(count(DeploymentState::Running));
        m.gauge("stevedore_deployments_queued", &[])
            .set(count(DeploymentState::Pending));
        for (name, stats) in self.observers.stats() {
            let labels = [("observer", name)];
            m.counter("stevedore_observer_updates_delivered_total", &labels)
                .absolute(stats.delivered);
            m.counter("stevedore_observer_updates_dropped_total", &labels)
                .absolute(stats.dropped);
            m.counter("stevedore_observer_updates_failed_total", &labels)
                .absolute(stats.failed);
        }
        for (limit, n) in self.rejections.snapshot() {
            m.counter("stevedore_rejections_total", &[("limit", limit.to_owned())])
                .absolute(n);
        }
        m.counter("stevedore_reconciler_removed_total", &[])
            .absolute(self.engine.reconciler_removed());
        if let Some(writable) = &self.audit_writable {
            m.gauge("stevedore_audit_log_writable", &[])
                .set(if writable() { 1.0 } else { 0.0 });
        }
        m.render()
    }
}
