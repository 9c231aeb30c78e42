//! The watchers' floor: a bare tonic server implementing the same `WatchDeployment`
//! RPC over the same proto, with nothing of Stevedore's between the messages and the
//! wire (no log, no store, no per-stream task or heartbeat: a `tokio::sync::broadcast`
//! for live updates, a `Vec` for a replay, tonic's own prost codec). It runs in its
//! own process (the bench binary started again with `--floor-serve FILE`), as
//! Stevedore's server does, and serves the messages written to `FILE`
//! (length-delimited `ProgressUpdate`s, as Stevedore sent them):
//!
//! - `WatchDeployment{deployment_id: "replay"}`: every message at once.
//! - `WatchDeployment{deployment_id: "live"}`: the first message, then the others as
//!   they are emitted.
//! - `CancelDeployment{deployment_id: "live"}`: starts emitting the others with the
//!   gaps between them Stevedore had, each stamped with its emit time.
//!
//! Everything else answers UNIMPLEMENTED.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{Stream, StreamExt};
use prost::Message;
use stevedore::proto::deployer_server::{Deployer, DeployerServer};
use stevedore::proto::{self, ProgressUpdate};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

type Updates = Pin<Box<dyn Stream<Item = Result<ProgressUpdate, Status>> + Send>>;

/// Writes `updates` where [`serve`] reads them.
pub fn write(path: &std::path::Path, updates: &[ProgressUpdate]) {
    let mut buf = Vec::new();
    for u in updates {
        u.encode_length_delimited(&mut buf).unwrap();
    }
    std::fs::write(path, buf).unwrap();
}

fn read(path: &str) -> Vec<ProgressUpdate> {
    let bytes = std::fs::read(path).unwrap();
    let mut buf = bytes.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(ProgressUpdate::decode_length_delimited(&mut buf).unwrap());
    }
    out
}

struct Floor {
    updates: Arc<Vec<ProgressUpdate>>,
    live: broadcast::Sender<ProgressUpdate>,
}

/// The floor server's `main`: serves the messages in `path` on an ephemeral port of
/// 127.0.0.1 and prints `floor listening on ADDR`.
pub async fn serve(path: &str) {
    let updates = Arc::new(read(path));
    let (live, _) = broadcast::channel(updates.len().max(1));
    let floor = Floor { updates, live };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("floor listening on {}", listener.local_addr().unwrap());
    tonic::transport::Server::builder()
        .add_service(DeployerServer::new(floor))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .unwrap();
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of the floor"))
}

#[tonic::async_trait]
impl Deployer for Floor {
    type DeployStream = Updates;
    type WatchDeploymentStream = Updates;

    async fn watch_deployment(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Updates>, Status> {
        let updates = self.updates.clone();
        let stream: Updates = match request.get_ref().deployment_id.as_str() {
            "replay" => Box::pin(futures_util::stream::iter(
                (0..updates.len()).map(move |i| Ok(updates[i].clone())),
            )),
            "live" => {
                let first = updates.first().cloned().map(Ok);
                // Ends after the last message, as Stevedore's stream ends after the
                // terminal update.
                let rest = BroadcastStream::new(self.live.subscribe())
                    .take(updates.len().saturating_sub(1))
                    .map(|r| r.map_err(|e| Status::data_loss(e.to_string())));
                Box::pin(futures_util::stream::iter(first).chain(rest))
            }
            other => return Err(Status::not_found(other.to_owned())),
        };
        Ok(Response::new(stream))
    }

    async fn cancel_deployment(
        &self,
        _: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::CancelResponse>, Status> {
        let (updates, live) = (self.updates.clone(), self.live.clone());
        tokio::spawn(async move {
            for pair in updates.windows(2) {
                tokio::time::sleep(gap(&pair[0], &pair[1])).await;
                let mut u = pair[1].clone();
                u.timestamp = Some(timestamp(SystemTime::now()));
                let _ = live.send(u);
            }
        });
        Ok(Response::new(proto::CancelResponse::default()))
    }

    async fn deploy(&self, _: Request<proto::DeployRequest>) -> Result<Response<Updates>, Status> {
        unimplemented()
    }

    async fn get_status(
        &self,
        _: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::DeploymentStatus>, Status> {
        unimplemented()
    }

    async fn list_deployments(
        &self,
        _: Request<proto::ListDeploymentsRequest>,
    ) -> Result<Response<proto::ListDeploymentsResponse>, Status> {
        unimplemented()
    }

    async fn list_apps(
        &self,
        _: Request<proto::ListAppsRequest>,
    ) -> Result<Response<proto::ListAppsResponse>, Status> {
        unimplemented()
    }

    async fn remove_app(
        &self,
        _: Request<proto::RemoveAppRequest>,
    ) -> Result<Response<proto::RemoveAppResponse>, Status> {
        unimplemented()
    }
}

fn gap(a: &ProgressUpdate, b: &ProgressUpdate) -> Duration {
    let at = |u: &ProgressUpdate| {
        u.timestamp
            .as_ref()
            .map(|t| Duration::new(t.seconds as u64, t.nanos as u32))
    };
    match (at(a), at(b)) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    }
}

fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
