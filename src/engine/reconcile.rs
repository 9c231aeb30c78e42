//! The reconciler: see [`Engine::reconcile`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Engine, spawn_every};
use crate::model::{AppName, DeploymentId};
use crate::runtime::{RuntimeError, remove_each};

impl Engine {
    /// Finishes what ended deployments could not (a rollback the engine did not answer,
    /// a crash): every container labelled by Stevedore with a deployment this store
    /// holds as ended is removed unless it is its app's current version (the last
    /// succeeded deployment's container). Containers of live deployments, of deployments
    /// not yet ended in the store and of deployments this store does not know (another
    /// server's) are left alone. Returns how many were removed.
    pub(crate) async fn reconcile(&self) -> Result<usize, RuntimeError> {
        let containers = self.0.runtime.list_managed_containers().await?;
        // Snapshot after the listing: a container listed is either of a deployment live
        // now, or of one that ended (and is in the store) before.
        let live: HashSet<String> = (self.live().deployments.keys())
            .map(|id| id.to_string())
            .collect();
        let candidates: Vec<_> = containers
            .into_iter()
            .filter(|c| !live.contains(&c.deployment))
            .filter_map(|c| {
                let id = uuid::Uuid::parse_str(&c.deployment).ok()?;
                let app = AppName::parse(&c.app).ok()?;
                Some((c, DeploymentId(id), app))
            })
            .collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        // Two reads of the store for all of them, however many containers run. A store
        // that does not answer: leave everything alone this time.
        let ids: Vec<_> = candidates.iter().map(|(_, id, _)| *id).collect();
        let Ok(ended) = self.0.store.ended(&ids).await else {
            return Ok(0);
        };
        let mut apps: Vec<AppName> = (candidates.iter())
            .filter(|(_, id, _)| ended.contains(id))
            .map(|(_, _, app)| app.clone())
            .collect();
        apps.sort();
        apps.dedup();
        if apps.is_empty() {
            return Ok(0);
        }
        let Ok(current) = self.current_containers(&apps).await else {
            return Ok(0);
        };
        let doomed: Vec<_> = candidates
            .into_iter()
            .filter(|(c, id, app)| ended.contains(id) && current.get(app) != Some(&c.id))
            .map(|(c, _, _)| c)
            .collect();
        let mut removed = 0;
        remove_each(&*self.0.runtime, &doomed, |c, r| {
            r?;
            removed += 1;
            self.0.reconciled.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(container = %c.id, app = %c.app, deployment_id = %c.deployment, "reconciler removed a container that is neither its app's current version nor part of a live deployment");
            Ok(())
        })
        .await?;
        Ok(removed)
    }

    /// Containers the reconciler removed since start (`stevedore_reconciler_removed_total`).
    pub(crate) fn reconciler_removed(&self) -> u64 {
        self.0.reconciled.load(Ordering::Relaxed)
    }

    /// Reconciles every `interval` while the engine answers, so also within one
    /// interval of it answering again after an outage, until `shutdown`; with a proxy,
    /// its routes too (see [`Engine::reconcile_routes`]).
    pub(crate) fn spawn_reconciler(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        let answering = Arc::new(AtomicBool::new(true));
        let proxy_answering = Arc::new(AtomicBool::new(true));
        spawn_every(interval, shutdown, move || {
            let (engine, answering) = (engine.clone(), answering.clone());
            let proxy_answering = proxy_answering.clone();
            async move {
                if let Err(e) = engine.0.runtime.ping().await {
                    if answering.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "reconciler: the docker engine does not answer");
                    }
                    return;
                }
                if !answering.swap(true, Ordering::Relaxed) {
                    tracing::info!("reconciler: the docker engine answers again");
                }
                if let Err(e) = engine.reconcile().await {
                    tracing::warn!(error = %e, "reconciler: incomplete");
                }
                match engine.reconcile_routes().await {
                    Ok(_) => proxy_answering.store(true, Ordering::Relaxed),
                    Err(e) if proxy_answering.swap(false, Ordering::Relaxed) => {
                        tracing::warn!(error = %e, "reconciler: routes not reconciled")
                    }
                    Err(_) => {}
                }
            }
        })
    }
}
