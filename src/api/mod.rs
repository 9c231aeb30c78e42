//! The gRPC layer: validates requests into domain types, calls the engine, converts
//! back. The only module that names tonic or generated types. No Docker here.

pub mod auth;
pub mod convert;
pub mod policy;

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError, ListQuery};
use crate::events::{LogError, UpdateStream};
use crate::limits::Rejection;
use crate::model::AppName;
use crate::proto;
use crate::proto::deployer_server::Deployer;

/// The one mapping from engine errors to gRPC status codes.
pub fn status_of(e: EngineError) -> Status {
    let message = e.to_string();
    match e {
        EngineError::Unavailable(_) | EngineError::ShuttingDown | EngineError::Refused(_) => {
            Status::unavailable(message)
        }
        EngineError::NotFound(_) => Status::not_found(message),
        EngineError::OutOfRange(_) => Status::out_of_range(message),
        EngineError::AlreadyFinished { .. } => Status::failed_precondition(message),
        EngineError::InvalidPageToken => Status::invalid_argument(format!("page_token: {message}")),
        EngineError::Exhausted { .. } => Status::resource_exhausted(message),
    }
}

pub struct DeployerService {
    engine: Engine,
    shutdown: CancellationToken,
    policy: policy::DeployPolicy,
    /// One permit per open WatchDeployment stream.
    watch_streams: Arc<Semaphore>,
    max_watch_streams: usize,
    audit: auth::AuditRefusals,
}

/// What a forwarded stream holds besides the updates.
struct StreamState {
    updates: UpdateStream,
    shutdown: CancellationToken,
    /// The authenticated caller: the stream ends when its token is revoked.
    caller: Option<auth::Caller>,
    /// Released when the stream is dropped.
    _permit: Option<OwnedSemaphorePermit>,
    done: bool,
}

impl DeployerService {
    pub fn new(engine: Engine, shutdown: CancellationToken) -> Self {
        Self {
            engine,
            shutdown,
            policy: policy::DeployPolicy::default(),
            watch_streams: Arc::new(Semaphore::new(crate::limits::DEFAULT_MAX_WATCH_STREAMS)),
            max_watch_streams: crate::limits::DEFAULT_MAX_WATCH_STREAMS,
            audit: auth::AuditRefusals::default(),
        }
    }

    /// Policy refusals also go to `audit` (the audit log).
    pub fn with_audit(mut self, audit: auth::AuditRefusals) -> Self {
        self.audit = audit;
        self
    }

    /// Applies `policy` to every Deploy.
    pub fn with_policy(mut self, policy: policy::DeployPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Caps the open WatchDeployment streams at `max`.
    pub fn with_max_watch_streams(mut self, max: usize) -> Self {
        self.watch_streams = Arc::new(Semaphore::new(max));
        self.max_watch_streams = max;
        self
    }

    /// Turns a subscriber's view of a log into a gRPC stream. On server shutdown the
    /// stream ends with `UNAVAILABLE` naming the sequence to resume from; when the
    /// caller's token is removed from the tokens file, with `UNAUTHENTICATED`.
    fn forward(
        &self,
        updates: UpdateStream,
        caller: Option<auth::Caller>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> UpdateResponseStream {
        let state = StreamState {
            updates,
            shutdown: self.shutdown.clone(),
            caller,
            _permit: permit,
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let StreamState {
                updates,
                shutdown,
                caller,
                ..
            } = &mut st;
            let revoked = async {
                match caller.as_mut() {
                    Some(c) => c.revoked().await,
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                biased;
                next = updates.next() => match next? {
                    Ok(u) => Ok(convert::update(&u)),
                    Err(LogError::OutOfRange { .. }) => {
                        let resume = updates.cursor();
                        Err(Status::out_of_range(format!(
                            "updates after sequence {resume} are no longer held"
                        )))
                    }
                },
                _ = shutdown.cancelled() => {
                    let resume = updates.cursor();
                    Err(Status::unavailable(format!(
                        "server shutting down; resume with WatchDeployment after_sequence={resume}"
                    )))
                }
                _ = revoked => {
                    let name = st.caller.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                    tracing::info!(caller = %name, "token revoked: closing its stream");
                    Err(Status::unauthenticated(format!("token {name:?} was revoked")))
                }
            };
            st.done = item.is_err();
            Some((item, st))
        });
        Box::pin(stream)
    }
}

type UpdateResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::ProgressUpdate, Status>> + Send>>;

/// Who is calling: the token's name when auth is on, else the peer address.
fn caller<T>(req: &Request<T>) -> String {
    if let Some(c) = req.extensions().get::<auth::Caller>() {
        return c.name.clone();
    }
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn authenticated<T>(req: &Request<T>) -> Option<auth::Caller> {
    req.extensions().get::<auth::Caller>().cloned()
}

#[tonic::async_trait]
impl Deployer for DeployerService {
    type DeployStream = UpdateResponseStream;
    type WatchDeploymentStream = UpdateResponseStream;

    async fn deploy(
        &self,
        request: Request<proto::DeployRequest>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        let who = caller(&request);
        let authed = authenticated(&request);
        let peer = request.remote_addr();
        let spec = convert::deploy_spec(request.into_inner(), who)?;
        if let Err(refused) = self.policy.check(&spec) {
            self.engine.rejections().record(Rejection::Policy);
            self.audit.emit(auth::RefusalEvent {
                method: "Deploy",
                caller: authed.as_ref().map(|c| c.name.as_str()),
                peer,
                code: refused.code(),
                reason: refused.message(),
            });
            return Err(refused);
        }
        let (_, updates) = self.engine.deploy(spec).await.map_err(status_of)?;
        Ok(Response::new(self.forward(updates, authed, None)))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::DeploymentStatus>, Status> {
        let id = &request.get_ref().deployment_id;
        let status = self.engine.status(id).map_err(status_of)?;
        Ok(Response::new(convert::status(&status)))
    }

    async fn watch_deployment(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        let permit = self
            .watch_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.engine.rejections().record(Rejection::WatchStreams);
                tracing::warn!(
                    max = self.max_watch_streams,
                    "watch stream refused: limit reached"
                );
                Status::resource_exhausted(format!(
                    "{} watch streams are open (the limit); try again later",
                    self.max_watch_streams
                ))
            })?;
        let r = request.get_ref();
        let updates = self
            .engine
            .watch(&r.deployment_id, r.after_sequence)
            .map_err(status_of)?;
        Ok(Response::new(self.forward(
            updates,
            authenticated(&request),
            Some(permit),
        )))
    }

    async fn list_deployments(
        &self,
        request: Request<proto::ListDeploymentsRequest>,
    ) -> Result<Response<proto::ListDeploymentsResponse>, Status> {
        let r = request.into_inner();
        let app = match r.app.as_str() {
            "" => None,
            a => {
                Some(AppName::parse(a).map_err(|e| Status::invalid_argument(format!("app: {e}")))?)
            }
        };
        let query = ListQuery {
            app,
            state: convert::state_filter(r.state)?,
            page_size: r.page_size as usize,
            page_token: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let page = self.engine.list(&query).map_err(status_of)?;
        Ok(Response::new(proto::ListDeploymentsResponse {
            deployments: page.deployments.iter().map(convert::status).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn cancel_deployment(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::CancelResponse>, Status> {
        let status = self
            .engine
            .cancel(&request.get_ref().deployment_id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::CancelResponse {
            status: Some(convert::status(&status)),
        }))
    }
}
