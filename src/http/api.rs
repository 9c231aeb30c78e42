//! The HTTP JSON API: a client of the same `Deployer` service the gRPC server runs
//! (same tokens and scopes through `api::auth::authorize`, same validation messages,
//! limits and refusal accounting). Bodies are the proto3 JSON mapping of the
//! generated types (pbjson: the names grpcurl prints). Errors are
//! `{"code": "INVALID_ARGUMENT", "message": "..."}` with the HTTP status of the gRPC
//! code. `GET /v1/deployments/{id}/events` is a Server-Sent Events stream of
//! WatchDeployment that resumes after `Last-Event-ID` (or `?after=N`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use tonic::{Code, Status};

use std::net::SocketAddr;
use tonic::transport::server::TcpConnectInfo;

use super::Peer;
use crate::api::auth::{self, Authenticator, Refusals, Scope};
use crate::api::service::deployer_server::Deployer;
use crate::api::{DeployerService, OLDEST_SEQUENCE};
use crate::proto;

/// What the API routes need: the shared Deployer service and the same auth the
/// gRPC layer uses (`None`: auth off).
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) deployer: Arc<DeployerService>,
    pub(crate) auth: Option<Authenticator>,
    pub(crate) refusals: Refusals,
}

/// How long a browser's EventSource waits before reconnecting (`retry:`).
const RETRY: Duration = Duration::from_secs(2);
/// Comment lines sent on a quiet stream so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(crate) fn router<S: Clone + Send + Sync + 'static>(state: ApiState) -> Router<S> {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/apps", get(list_apps))
        .route("/v1/apps/{app}", axum::routing::delete(remove_app))
        .route("/v1/deployments", get(list_deployments).post(deploy))
        .route("/v1/deployments/{id}", get(get_status))
        .route("/v1/deployments/{id}/cancel", post(cancel))
        .route("/v1/deployments/{id}/events", get(events))
        .with_state(state)
}

/// A gRPC status as an HTTP answer.
pub(crate) struct ApiError(pub Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP status of a gRPC code. FAILED_PRECONDITION (e.g. cancelling a finished
/// deployment) is a conflict with the resource's state: 409.
pub(crate) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_body(status: &Status) -> serde_json::Value {
    serde_json::json!({ "code": code_name(status.code()), "message": status.message() })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (http_status(self.0.code()), Json(error_body(&self.0))).into_response();
        if self.0.code() == Code::Unauthenticated {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// What a route knows of its caller: the request's headers (the bearer token,
/// `Last-Event-ID`) and the client's address.
pub(crate) struct Call {
    headers: HeaderMap,
    peer: Option<SocketAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let peer = (parts.extensions.get::<ConnectInfo<Peer>>()).map(|c| c.0.0);
        Ok(Self {
            headers: parts.headers.clone(),
            peer,
        })
    }
}

impl ApiState {
    /// A request to the Deployer `method` with the caller's credentials checked as
    /// the gRPC layer checks them, and the client's address where tonic puts a peer's
    /// (so `requested_by` without auth is that address, as over gRPC).
    fn request<T>(
        &self,
        method: &str,
        call: &Call,
        message: T,
    ) -> Result<tonic::Request<T>, ApiError> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: call.peer,
        });
        if let Some(auth) = &self.auth {
            let caller = auth::authorize(auth, &self.refusals, method, &call.headers, call.peer)?;
            request.extensions_mut().insert(caller);
        }
        Ok(request)
    }

    /// GetStatus of `id` for this caller.
    async fn status(&self, call: &Call, id: String) -> Result<proto::DeploymentStatus, ApiError> {
        let message = proto::GetStatusRequest { deployment_id: id };
        let request = self.request("GetStatus", call, message)?;
        Ok(self.deployer.get_status(request).await?.into_inner())
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    Json(value).into_response()
}

/// `GET /v1/whoami`: the caller's token name and the scopes it grants (the implied
/// ones included), so a page shows only what the caller may do. With auth off:
/// `auth: false`, every scope, and the client's address as the name (what
/// `requested_by` records).
async fn whoami(State(s): State<ApiState>, call: Call) -> ApiResult {
    let peer = call.peer.map(|p| p.to_string()).unwrap_or_default();
    let (name, scopes, auth) = match &s.auth {
        None => (peer, Scope::ALL.to_vec(), false),
        Some(auth) => {
            let caller = auth::authorize(auth, &s.refusals, "WhoAmI", &call.headers, call.peer)?;
            (caller.name, caller.scopes, true)
        }
    };
    let scopes: Vec<&str> = scopes.into_iter().map(Scope::as_str).collect();
    Ok(json(
        &serde_json::json!({ "name": name, "scopes": scopes, "auth": auth }),
    ))
}

async fn list_apps(State(s): State<ApiState>, call: Call) -> ApiResult {
    let request = s.request("ListApps", &call, proto::ListAppsRequest {})?;
    Ok(json(s.deployer.list_apps(request).await?.get_ref()))
}

#[derive(serde::Deserialize)]
struct RemoveParams {
    #[serde(default)]
    wait: Option<String>,
}

/// `DELETE /v1/apps/{app}`: RemoveApp. By default `202` with the removal's status (an
/// operation like a deployment) and its `Location`, to follow like a deployment (its
/// events, its status); with `?wait=true`, `200` with the RemoveAppResponse once it
/// has ended.
async fn remove_app(
    State(s): State<ApiState>,
    call: Call,
    Path(app): Path<String>,
    Query(p): Query<RemoveParams>,
) -> ApiResult {
    let wait = match p.wait.as_deref() {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(w) => {
            let message = format!("wait: not a boolean: {w:?}");
            return Err(Status::invalid_argument(message).into());
        }
    };
    let message = proto::RemoveAppRequest {
        app,
        detach: !wait,
        ..Default::default()
    };
    let request = s.request("RemoveApp", &call, message)?;
    let removal = s.deployer.remove_app(request).await?.into_inner();
    if wait {
        return Ok(json(&removal));
    }
    accepted(&s, &call, removal.deployment_id).await
}

/// `202` with the status of the operation `id` just accepted and its `Location`.
async fn accepted(s: &ApiState, call: &Call, id: String) -> ApiResult {
    let status = s.status(call, id.clone()).await?;
    let mut response = (StatusCode::ACCEPTED, Json(status)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/deployments/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(serde::Deserialize)]
struct ListParams {
    #[serde(default)]
    app: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    page_size: Option<String>,
    #[serde(default)]
    page_token: String,
}

/// A state filter by name (`FAILED` or `DEPLOYMENT_STATE_FAILED`) or number.
fn parse_state(s: &str) -> Result<i32, Status> {
    if s.is_empty() {
        return Ok(0);
    }
    let upper = s.to_ascii_uppercase();
    let named = proto::DeploymentState::from_str_name(&upper)
        .or_else(|| proto::DeploymentState::from_str_name(&format!("DEPLOYMENT_STATE_{upper}")));
    match (named, s.parse::<i32>()) {
        (Some(state), _) => Ok(state as i32),
        (None, Ok(n)) => Ok(n),
        _ => Err(Status::invalid_argument(format!(
            "state: unknown state {s:?}"
        ))),
    }
}

async fn list_deployments(
    State(s): State<ApiState>,
    call: Call,
    Query(p): Query<ListParams>,
) -> ApiResult {
    let page_size = match p.page_size.as_deref() {
        None | Some("") => 0,
        Some(n) => n
            .parse()
            .map_err(|_| Status::invalid_argument(format!("page_size: not a number: {n:?}")))?,
    };
    let message = proto::ListDeploymentsRequest {
        app: p.app,
        state: parse_state(&p.state)?,
        page_size,
        page_token: p.page_token,
    };
    let request = s.request("ListDeployments", &call, message)?;
    Ok(json(s.deployer.list_deployments(request).await?.get_ref()))
}

async fn get_status(State(s): State<ApiState>, call: Call, Path(id): Path<String>) -> ApiResult {
    Ok(json(&s.status(&call, id).await?))
}

/// `POST /v1/deployments`: starts a deployment; 202 with its status and a Location.
async fn deploy(State(s): State<ApiState>, call: Call, body: Bytes) -> ApiResult {
    // Credentials first: an anonymous caller learns nothing about the body's shape.
    let request = s.request("Deploy", &call, ())?;
    let message: proto::DeployRequest = serde_json::from_slice(&body)
        .map_err(|e| Status::invalid_argument(format!("request body: {e}")))?;
    let (metadata, extensions, ()) = request.into_parts();
    let request = tonic::Request::from_parts(metadata, extensions, message);
    let mut updates = s.deployer.deploy(request).await?.into_inner();
    // The first update names the deployment; dropping the stream leaves it running.
    let first = match updates.next().await {
        Some(Ok(u)) => u.into_message(),
        Some(Err(status)) => return Err(status.into()),
        None => return Err(Status::internal("the deployment sent no update").into()),
    };
    drop(updates);
    accepted(&s, &call, first.deployment_id).await
}

async fn cancel(State(s): State<ApiState>, call: Call, Path(id): Path<String>) -> ApiResult {
    let message = proto::CancelRequest { deployment_id: id };
    let request = s.request("CancelDeployment", &call, message)?;
    Ok(json(s.deployer.cancel_deployment(request).await?.get_ref()))
}

#[derive(serde::Deserialize)]
struct EventsParams {
    after: Option<String>,
}

/// Where to resume: `Last-Event-ID` (what a browser sends on reconnect) wins over
/// `?after=N`; neither means from the start.
fn resume_point(headers: &HeaderMap, after: Option<&str>) -> Result<u64, Status> {
    if let Some(v) = headers.get("last-event-id") {
        let v = v.to_str().unwrap_or_default().trim();
        return v.parse().map_err(|_| {
            Status::invalid_argument(format!("Last-Event-ID: not a sequence: {v:?}"))
        });
    }
    match after {
        None | Some("") => Ok(0),
        Some(a) => a
            .parse()
            .map_err(|_| Status::invalid_argument(format!("after: not a sequence: {a:?}"))),
    }
}

/// `GET /v1/deployments/{id}/events`: WatchDeployment as Server-Sent Events.
async fn events(
    State(s): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
    Query(p): Query<EventsParams>,
) -> ApiResult {
    let after = resume_point(&call.headers, p.after.as_deref())?;
    // A deployment that ended and was read to its end: 204, so an EventSource stops.
    let status = s.status(&call, id.clone()).await?;
    if status.result.is_some() && after >= status.last_sequence {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let watch = s.request(
        "WatchDeployment",
        &call,
        proto::WatchRequest {
            deployment_id: id,
            after_sequence: after,
        },
    )?;
    let stream = match s.deployer.watch_deployment(watch).await {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == Code::OutOfRange => {
            let events = futures_util::stream::iter([Ok(end_event(&status))]);
            return Ok(sse(events));
        }
        Err(status) => return Err(status.into()),
    };
    Ok(sse(stream.map(|item| {
        Ok(match item {
            Ok(u) => match u.into_message() {
                u if u.heartbeat => Event::default().comment("heartbeat"),
                u => update_event(&u),
            },
            Err(status) => end_event(&status),
        })
    })))
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let hint = futures_util::stream::once(async { Ok(Event::default().retry(RETRY)) });
    let mut response = Sse::new(hint.chain(events))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response();
    // Proxies that buffer (nginx) pass the stream through at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One update: `id: <sequence>`, `event: update` (`result` for the terminal one),
/// `data:` its JSON on one line.
pub(crate) fn update_event(u: &proto::ProgressUpdate) -> Event {
    let kind = if u.result.is_some() {
        "result"
    } else {
        "update"
    };
    let data = serde_json::to_string(u).unwrap_or_default();
    Event::default()
        .id(u.sequence.to_string())
        .event(kind)
        .data(data)
}

/// The end of a stream that did not reach the terminal update: `event: out_of_range`
/// (with `oldest_sequence`, the oldest still held) when the resume point was removed
/// by retention, else `event: error` (e.g. UNAVAILABLE on shutdown, RESOURCE_EXHAUSTED
/// for a stalled reader); the client reconnects with its `Last-Event-ID`.
fn end_event(status: &Status) -> Event {
    let mut body = error_body(status);
    let kind = if status.code() == Code::OutOfRange {
        let oldest = status
            .metadata()
            .get(OLDEST_SEQUENCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        body["oldest_sequence"] = oldest.into();
        "out_of_range"
    } else {
        "error"
    };
    Event::default().event(kind).data(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_updates_print_the_names_grpcurl_prints() {
        let u = proto::ProgressUpdate {
            deployment_id: "d".into(),
            sequence: 7,
            phase: proto::Phase::Pulling as i32,
            total_progress: 0.5,
            ..Default::default()
        };
        let json = serde_json::to_string(&u).unwrap();
        assert!(json.contains(r#""deploymentId":"d""#), "{json}");
        assert!(json.contains(r#""sequence":"7""#), "{json}");
        assert!(json.contains(r#""phase":"PHASE_PULLING""#), "{json}");
        assert!(!json.contains('\n'));
    }

    #[test]
    fn resume_point_prefers_last_event_id() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, Some("4")).unwrap(), 4);
        h.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(resume_point(&h, Some("4")).unwrap(), 9);
        h.insert("last-event-id", HeaderValue::from_static("x"));
        assert_eq!(
            resume_point(&h, None).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn states_parse_by_short_or_full_name() {
        assert_eq!(
            parse_state("failed").unwrap(),
            proto::DeploymentState::Failed as i32
        );
        assert_eq!(
            parse_state("DEPLOYMENT_STATE_FAILED").unwrap(),
            proto::DeploymentState::Failed as i32
        );
        assert!(
            parse_state("nope")
                .unwrap_err()
                .message()
                .starts_with("state:")
        );
    }
}
