//! The admin API (HTTP/JSON on the unix socket) and the metrics endpoint (HTTP on
//! `--metrics-listen`). Thin: parse, call [`Proxy`], map [`RouteError`] to a status.
//!
//! | call | answer |
//! |---|---|
//! | `GET /routes` | `[RouteStatus]` |
//! | `GET /routes/{app}` | `RouteStatus` (404 if none) |
//! | `PUT /routes/{app}` with `SetRoute` | `RouteStatus` after the change |
//! | `DELETE /routes/{app}` | the last `RouteStatus` (404 if none) |
//! | `GET /healthz` | `ok` |
//!
//! Errors are `{"error": "..."}`: 400 bad input, 403 privileged port, 404 no such route,
//! 409 port taken (by another app, or by another process), 500 state file not written,
//! 503 this proxy handed over to a new one (send the call again).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::forward::Proxy;
use super::routes::{ErrorBody, RouteError, SetRoute};

pub(crate) fn admin_router(proxy: Proxy) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/routes", get(list))
        .route(
            "/routes/{app}",
            get(get_route).put(put_route).delete(delete_route),
        )
        .with_state(proxy)
}

pub(crate) fn metrics_router(proxy: Proxy) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(proxy)
}

impl RouteError {
    fn status_code(&self) -> StatusCode {
        match self {
            RouteError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            RouteError::PrivilegedPort { .. } => StatusCode::FORBIDDEN,
            RouteError::NotFound(_) => StatusCode::NOT_FOUND,
            RouteError::PortTaken { .. } | RouteError::Bind { .. } => StatusCode::CONFLICT,
            RouteError::State { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            RouteError::HandedOver => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
        };
        (self.status_code(), axum::Json(body)).into_response()
    }
}

async fn list(State(proxy): State<Proxy>) -> Response {
    match proxy.routes().await {
        Ok(routes) => axum::Json(routes).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_route(State(proxy): State<Proxy>, Path(app): Path<String>) -> Response {
    match proxy.route(&app).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn put_route(State(proxy): State<Proxy>, Path(app): Path<String>, body: Bytes) -> Response {
    let set: SetRoute = match serde_json::from_slice(&body) {
        Ok(set) => set,
        Err(e) => return RouteError::InvalidArgument(format!("body: {e}")).into_response(),
    };
    match proxy.set_route(&app, set).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => {
            tracing::warn!(app, error = %e, "route refused");
            e.into_response()
        }
    }
}

async fn delete_route(State(proxy): State<Proxy>, Path(app): Path<String>) -> Response {
    match proxy.remove_route(&app).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(proxy): State<Proxy>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        proxy.metrics().render(),
    )
        .into_response()
}
