//! Reconciliation after a restart, before serving: see [`Engine::recover`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::deployment::{Deployment, Extra, Reporter};
use super::run::short;
use super::{Engine, EngineError, Recovery};
use crate::model::{AppName, DeploymentState, DeploymentStatus};
use crate::runtime::remove_each;
use crate::store::ListFilter;

/// What happened to the containers of the interrupted deployments.
#[derive(Default)]
struct Removal {
    removed: usize,
    /// The last error, when a container could not be listed or removed.
    error: Option<String>,
    /// The running container of each app that is not an interrupted deployment's:
    /// the previous version.
    serving: HashMap<String, String>,
}

impl Engine {
    /// Reconciles after a restart, before serving: every deployment the store holds as
    /// pending or running was in flight when the previous process died. Each gets a
    /// terminal FAILED update ("interrupted by a restart"), and the containers labelled
    /// with its ID are removed. Nothing else is touched: the app's previous version
    /// (the last succeeded deployment's container) keeps running (it is started again
    /// if the interrupted deployment had stopped it to take over a fixed host port),
    /// and containers of deployments this store does not know (another server's) are
    /// left alone.
    pub async fn recover(&self) -> Result<Recovery, EngineError> {
        let store = &self.0.store;
        let unfinished = store.unfinished().await?;
        let mut recovery = Recovery::default();
        if unfinished.is_empty() {
            return Ok(recovery);
        }
        let mut removal = self.remove_interrupted(&unfinished).await;
        recovery.containers_removed = removal.removed;
        // A deployment interrupted while it held a fixed host port may have stopped the
        // app's previous version (see run.rs, hand_over_fixed_ports): start it again.
        let mut apps: Vec<AppName> = unfinished.iter().map(|s| s.app.clone()).collect();
        apps.sort();
        apps.dedup();
        for app in apps {
            if removal.serving.contains_key(app.as_str()) {
                continue;
            }
            if let Some(id) = self.restart_previous_version(&app).await {
                removal.serving.insert(app.to_string(), id);
            }
        }
        for status in unfinished {
            let id = status.id;
            self.end_interrupted(status, &removal).await?;
            recovery.interrupted.push(id);
        }
        store.flush().await;
        Ok(recovery)
    }

    /// Removes the containers labelled with an unfinished deployment's ID.
    async fn remove_interrupted(&self, unfinished: &[DeploymentStatus]) -> Removal {
        let ids: HashSet<String> = unfinished.iter().map(|s| s.id.to_string()).collect();
        let mut removal = Removal::default();
        let containers = match self.0.runtime.list_managed_containers().await {
            Ok(containers) => containers,
            Err(e) => {
                removal.error = Some(e.to_string());
                return removal;
            }
        };
        let (ours, others): (Vec<_>, Vec<_>) = containers
            .into_iter()
            .partition(|c| ids.contains(&c.deployment));
        for c in others.into_iter().filter(|c| c.running) {
            removal.serving.insert(c.app.clone(), c.id.clone());
        }
        let _ = remove_each(&*self.0.runtime, &ours, |c, r| {
            match r {
                Ok(()) => {
                    removal.removed += 1;
                    tracing::info!(container = %c.id, deployment_id = %c.deployment, "removed container of an interrupted deployment");
                }
                Err(e) => removal.error = Some(e.to_string()),
            }
            Ok::<_, ()>(())
        })
        .await;
        removal
    }

    /// Ends one deployment interrupted by a restart with a terminal FAILED update.
    async fn end_interrupted(
        &self,
        mut status: DeploymentStatus,
        removal: &Removal,
    ) -> Result<(), EngineError> {
        // The stored status and log are committed together; continue after the last
        // update that reached the disk.
        let tail = self.0.store.log(status.id, status.last_sequence).await?;
        if let Some(last) = tail.updates.last() {
            status.last_sequence = last.sequence;
            status.phase = last.phase;
        }
        let phase = status.phase;
        let mut message = format!(
            "interrupted by a restart of the server during {}: the previous server process stopped before the deployment finished",
            phase.name()
        );
        match &removal.error {
            None => message.push_str("; its containers were removed"),
            Some(e) => message.push_str(&format!("; removing its containers failed: {e}")),
        }
        match removal.serving.get(status.app.as_str()) {
            Some(c) => message.push_str(&format!(
                "; the app's previous version keeps running (container {})",
                short(c)
            )),
            None => message.push_str("; no other version of the app is running"),
        }
        tracing::warn!(deployment_id = %status.id, app = %status.app, phase = phase.as_str(), "deployment interrupted by a restart ended as failed");
        let deployment = Arc::new(Deployment::recovered(status));
        let mut reporter =
            Reporter::resume(deployment, self.0.observers.clone(), self.0.store.clone());
        let extra = Extra::meta([("interrupted", "restart".into())]);
        reporter.fail(phase, "server restart", message, extra);
        Ok(())
    }

    /// Starts the container of `app`'s last succeeded deployment if it exists but is
    /// stopped; returns its ID when it runs afterwards.
    async fn restart_previous_version(&self, app: &AppName) -> Option<String> {
        let filter = ListFilter {
            app: Some(app.clone()),
            state: Some(DeploymentState::Succeeded),
            before: None,
            limit: 1,
        };
        let last = self.0.store.list(&filter).await.ok()?.into_iter().next()?;
        let container = last.result?.container_id;
        if container.is_empty() {
            return None;
        }
        let runtime = &self.0.runtime;
        let state = runtime.inspect(&container).await.ok()?;
        if !state.running {
            match runtime.start(&container).await {
                Ok(()) => {
                    tracing::info!(%app, container = %container, "started the app's previous version again after an interrupted deployment")
                }
                Err(e) => {
                    tracing::warn!(%app, container = %container, error = %e, "could not start the app's previous version again");
                    return None;
                }
            }
        }
        Some(container)
    }
}
