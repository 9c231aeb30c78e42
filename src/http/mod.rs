//! The HTTP side (axum): `/healthz` for load balancers and operators, `/metrics` for
//! Prometheus.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::observers::metrics::MetricsExporter;
use crate::runtime::Runtime;

#[derive(Clone)]
pub struct HttpState {
    pub runtime: Arc<dyn Runtime>,
    /// Renders `/metrics` (404 without it).
    pub metrics: Option<Arc<MetricsExporter>>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
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
