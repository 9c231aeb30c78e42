//! The HTTP side (axum): `/healthz` for load balancers and operators.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::runtime::Runtime;

#[derive(Clone)]
pub struct HttpState {
    pub runtime: Arc<dyn Runtime>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
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
