//! The dashboard page: plain HTML, CSS and JavaScript modules embedded in the binary
//! (no build step, nothing fetched from elsewhere). It is a client of the JSON API
//! like any other: it reads event streams with `fetch` and an `Authorization` header,
//! and keeps the token in the tab's session storage only.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/deployments/{id}", get(index))
        .route(
            "/ui/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/ui/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX).await
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
}
