//! A typed client of the proxy's admin API, for the server: HTTP/JSON over the unix
//! socket (reqwest's `unix_socket`).
//!
//! ```no_run
//! # async fn f() -> Result<(), stevedore::proxy::client::ClientError> {
//! use stevedore::proxy::client::ProxyClient;
//! use stevedore::proxy::routes::{Route, SetRoute};
//! let proxy = ProxyClient::new("/run/stevedore/proxy.sock")?;
//! let status = proxy
//!     .set_route("web", &SetRoute {
//!         route: Route {
//!             listen: "0.0.0.0:8080".parse().unwrap(),
//!             backend: "127.0.0.1:49153".parse().unwrap(),
//!             deployment_id: Some("…".into()),
//!             version: Some("web:2".into()),
//!         },
//!         drain_timeout_ms: Some(30_000),
//!     })
//!     .await?;
//! // Poll until the previous backend is drained (its entry leaves `draining`).
//! while let Some(s) = proxy.get_route("web").await? {
//!     if s.draining.is_empty() { break; }
//!     tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//! }
//! # let _ = status; Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::routes::{ErrorBody, RouteStatus, SetRoute};
use crate::model::AppName;

/// Time limit of one admin call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a call that met a proxy handing over to a new one: it answers 503, or
/// closes a kept-alive connection as it stops accepting. Every call is idempotent (a
/// `PUT` of the route a proxy has already changes nothing; a `DELETE` of a removed
/// route answers 404), so sending it again is safe.
const ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("app: {0}")]
    InvalidApp(String),
    #[error("the proxy does not answer on {socket}: {source}")]
    Unreachable {
        socket: String,
        source: reqwest::Error,
    },
    /// The proxy refused the call; `message` is its explanation.
    #[error("the proxy refused: {message} ({status})")]
    Refused { status: u16, message: String },
    #[error("the proxy's answer does not parse: {0}")]
    Decode(String),
}

/// Client of one proxy's admin socket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ProxyClient {
    http: reqwest::Client,
    socket: PathBuf,
}

impl ProxyClient {
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self, ClientError> {
        let socket: PathBuf = socket.into();
        let http = reqwest::Client::builder()
            .unix_socket(socket.as_path())
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Unreachable {
                socket: socket.display().to_string(),
                source,
            })?;
        Ok(Self { http, socket })
    }

    /// The admin socket this client talks to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every route.
    pub async fn routes(&self) -> Result<Vec<RouteStatus>, ClientError> {
        self.call(Method::GET, "/routes", None).await
    }

    /// `app`'s route, with its drain state; `None` if it has none.
    pub async fn get_route(&self, app: &str) -> Result<Option<RouteStatus>, ClientError> {
        let path = route_path(app)?;
        optional(self.call(Method::GET, &path, None).await)
    }

    /// Sets or switches `app`'s route; answers once new connections go to the new backend.
    pub async fn set_route(&self, app: &str, set: &SetRoute) -> Result<RouteStatus, ClientError> {
        let path = route_path(app)?;
        let body = serde_json::to_vec(set).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::PUT, &path, Some(body)).await
    }

    /// Unbinds `app`'s public port; `None` if it had no route.
    pub async fn remove_route(&self, app: &str) -> Result<Option<RouteStatus>, ClientError> {
        let path = route_path(app)?;
        optional(self.call(Method::DELETE, &path, None).await)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut attempt = 1;
        loop {
            match self.call_once(method.clone(), path, body.clone()).await {
                Err(e) if attempt < ATTEMPTS && during_handover(&e) => {
                    tracing::debug!(path, attempt, error = %e, "proxy call sent again");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        // The host is not used for anything: the connection goes to the socket.
        let mut request = self.http.request(method, format!("http://proxy{path}"));
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// Whether `e` is what a proxy handing its sockets over answers: 503, or a connection
/// closed under a call (not a refused connect: no proxy; not a timeout).
fn during_handover(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE.as_u16(),
        ClientError::Unreachable { source, .. } => !source.is_connect() && !source.is_timeout(),
        _ => false,
    }
}

fn route_path(app: &str) -> Result<String, ClientError> {
    let app = AppName::parse(app).map_err(ClientError::InvalidApp)?;
    Ok(format!("/routes/{app}"))
}

fn optional<T>(r: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::Refused { status, .. }) if status == StatusCode::NOT_FOUND.as_u16() => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
