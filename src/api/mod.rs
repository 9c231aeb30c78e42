//! The gRPC layer: validates requests into domain types, calls the engine, converts
//! back. The only module that names tonic or generated types. No Docker here.

pub mod convert;

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError, ListQuery};
use crate::events::{LogError, UpdateStream};
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
    }
}

pub struct DeployerService {
    engine: Engine,
    shutdown: CancellationToken,
}

impl DeployerService {
    pub fn new(engine: Engine, shutdown: CancellationToken) -> Self {
        Self { engine, shutdown }
    }

    /// Turns a subscriber's view of a log into a gRPC stream. On server shutdown the
    /// stream ends with `UNAVAILABLE` naming the sequence to resume from.
    fn forward(&self, updates: UpdateStream) -> UpdateResponseStream {
        let shutdown = self.shutdown.clone();
        let stream = futures_util::stream::unfold(
            (updates, shutdown, false),
            |(mut updates, shutdown, done)| async move {
                if done {
                    return None;
                }
                tokio::select! {
                    biased;
                    next = updates.next() => match next? {
                        Ok(u) => Some((Ok(convert::update(&u)), (updates, shutdown, false))),
                        Err(LogError::OutOfRange { .. }) => {
                            let resume = updates.cursor();
                            Some((Err(Status::out_of_range(format!(
                                "updates after sequence {resume} are no longer held"
                            ))), (updates, shutdown, true)))
                        }
                    },
                    _ = shutdown.cancelled() => {
                        let resume = updates.cursor();
                        Some((Err(Status::unavailable(format!(
                            "server shutting down; resume with WatchDeployment after_sequence={resume}"
                        ))), (updates, shutdown, true)))
                    }
                }
            },
        );
        Box::pin(stream)
    }
}

type UpdateResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::ProgressUpdate, Status>> + Send>>;

fn caller<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
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
        let spec = convert::deploy_spec(request.into_inner(), who)?;
        let (_, updates) = self.engine.deploy(spec).await.map_err(status_of)?;
        Ok(Response::new(self.forward(updates)))
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
        let r = request.get_ref();
        let updates = self
            .engine
            .watch(&r.deployment_id, r.after_sequence)
            .map_err(status_of)?;
        Ok(Response::new(self.forward(updates)))
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
