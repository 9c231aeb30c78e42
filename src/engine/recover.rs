//! Reconciliation after a restart, before serving: see [`Engine::recover`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::deployment::{Deployment, Extra};
use super::route::RoutedPort;
use super::run::{endpoints, short};
use super::{Engine, EngineError, Recovery};
use crate::model::{AppName, DeploymentResult, DeploymentState, DeploymentStatus, Phase};
use crate::runtime::{RuntimeError, remove_each};

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
    /// pending or running was in flight when the previous process died. A deployment
    /// to a swarm is taken over and followed in the background (it stays RUNNING until
    /// its service's update ends; see `recover_on_swarm`). Each other one gets a
    /// terminal FAILED update ("interrupted by a restart"), and the containers labelled
    /// with its ID are removed. Nothing else is touched: the app's previous version
    /// (the last succeeded deployment's container) keeps running (it is started again
    /// if the interrupted deployment had stopped it to take over a fixed host port),
    /// and containers of deployments this store does not know (another server's) are
    /// left alone.
    pub(crate) async fn recover(&self) -> Result<Recovery, EngineError> {
        let store = &self.0.store;
        let mut unfinished = store.unfinished().await?;
        let mut recovery = Recovery::default();
        if unfinished.is_empty() {
            return Ok(recovery);
        }
        for status in &mut unfinished {
            self.settle_tail(status).await?;
        }
        // Deployments to a swarm are taken over instead: their service's update is
        // followed in the background (see `swarm.rs`), so recovery does not wait for
        // it; their tasks' containers are Swarm's, never removed here.
        let (on_swarm, mut unfinished): (Vec<_>, Vec<_>) = unfinished
            .into_iter()
            .partition(|s| s.operation.is_deploy() && s.target == crate::model::Target::Swarm);
        for status in on_swarm {
            let id = status.id;
            if self.recover_on_swarm(status).await {
                recovery.following.push(id);
            } else {
                recovery.interrupted.push(id);
            }
        }
        if unfinished.is_empty() {
            store.flush().await;
            return Ok(recovery);
        }
        let unfinished = std::mem::take(&mut unfinished);
        // Removals are finished last, after what was ahead of them in their app's queue.
        let (removals, unfinished): (Vec<_>, Vec<_>) = unfinished
            .into_iter()
            .partition(|s| !s.operation.is_deploy());
        // Past the point of no return, the new version is kept (rolled forward).
        let mut back = Vec::new();
        for status in unfinished {
            match self.roll_forward_target(&status).await {
                Some(ours) => {
                    let id = status.id;
                    self.complete_interrupted(status, ours).await;
                    recovery.completed.push(id);
                }
                None => back.push(status),
            }
        }
        let unfinished = back;
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
        for status in removals {
            recovery.removals.push(status.id);
            self.complete_removal(status).await?;
        }
        store.flush().await;
        Ok(recovery)
    }

    /// A stored status is rewritten only when its state changes, so its phase,
    /// progress and last sequence can lag its log: take them from the last update
    /// that reached the disk, and continue after it.
    async fn settle_tail(&self, status: &mut DeploymentStatus) -> Result<(), EngineError> {
        let tail = self.0.store.log(status.id, status.last_sequence).await?;
        if let Some(last) = tail.updates.last() {
            status.last_sequence = last.sequence;
            status.phase = last.phase;
            status.phase_progress = last.phase_progress;
            status.total_progress = last.total_progress;
        }
        Ok(())
    }

    /// The container to keep when an interrupted deployment is rolled forward, running
    /// afterwards; `None` to roll it back. It rolls forward when it had reached
    /// SWITCHING (the engine commits that phase before it touches the previous version),
    /// or when its container runs and the app's previous version is gone (removed by a
    /// switch whose SWITCHING update was lost), provided its container can run.
    async fn roll_forward_target(&self, status: &DeploymentStatus) -> Option<String> {
        let runtime = &self.0.runtime;
        let id = status.id.to_string();
        let containers = runtime
            .list_app_containers(status.app.as_str())
            .await
            .ok()?;
        let ours: Vec<_> = containers.iter().filter(|c| c.deployment == id).collect();
        let pick = ours.iter().find(|c| c.running).or(ours.first())?;
        let past_switch = matches!(
            status.phase,
            Phase::Switching | Phase::Cleanup | Phase::Complete
        );
        if !past_switch {
            let others_running = containers.iter().any(|c| c.deployment != id && c.running);
            if !pick.running || others_running || !self.previous_version_gone(&status.app).await {
                return None;
            }
        }
        if !pick.running
            && let Err(e) = runtime.start(&pick.id).await
        {
            tracing::warn!(deployment_id = %status.id, container = %pick.id, error = %e, "could not start the interrupted deployment's container: rolling back");
            return None;
        }
        Some(pick.id.clone())
    }

    /// Whether the container of `app`'s last succeeded deployment no longer exists.
    async fn previous_version_gone(&self, app: &AppName) -> bool {
        let Some(container) = self.previous_container(app).await else {
            return false;
        };
        matches!(
            self.0.runtime.inspect(&container).await,
            Err(RuntimeError::NotFound { .. })
        )
    }

    /// The container of `app`'s last succeeded deployment, from the store.
    async fn previous_container(&self, app: &AppName) -> Option<String> {
        let current = self.current_containers(std::slice::from_ref(app)).await;
        current.ok()?.remove(app)
    }

    /// Per app of `apps`, the container of its last succeeded deployment (its current
    /// version), from the store in one read; apps with none are left out.
    pub(super) async fn current_containers(
        &self,
        apps: &[AppName],
    ) -> Result<HashMap<AppName, String>, crate::store::StoreError> {
        let newest = self.0.store.newest_succeeded(apps).await?;
        Ok(newest
            .into_iter()
            .filter_map(|s| Some((s.app, s.result?.container_id)))
            .filter(|(_, container)| !container.is_empty())
            .collect())
    }

    /// Rolls an interrupted deployment forward: its container `ours` (running) becomes
    /// the app's current version, every other container of the app goes, and it ends
    /// SUCCEEDED, "completed by recovery".
    async fn complete_interrupted(&self, status: DeploymentStatus, ours: String) {
        let runtime = &self.0.runtime;
        let phase = status.phase;
        let others = match runtime.list_app_containers(status.app.as_str()).await {
            Ok(list) => list.into_iter().filter(|c| c.id != ours).collect(),
            Err(e) => {
                tracing::warn!(app = %status.app, error = %e, "could not list the app's containers");
                Vec::new()
            }
        };
        let mut removed = 0;
        let _ = remove_each(&**runtime, &others, |c, r| {
            match r {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(container = %c.id, deployment_id = %c.deployment, "removed a previous version after completing an interrupted deployment");
                }
                Err(e) => tracing::warn!(container = %c.id, error = %e, "could not remove a previous version"),
            }
            Ok::<_, ()>(())
        })
        .await;
        let state = runtime.inspect(&ours).await.unwrap_or_default();
        // With a proxy, the routed port's endpoint is the app's stable address (the
        // route itself is set by reconcile_routes, after recovery).
        let ports = match RoutedPort::from_labels(&state.labels).filter(|_| self.proxy().is_some())
        {
            Some(r) => r.public_ports(&state.ports),
            None => state.ports,
        };
        let endpoints = endpoints(runtime.public_host(), &ports);
        let mut message = format!(
            "completed by recovery: the server restarted during {} after the new version had \
             begun taking over; its container {} is kept as the app's current version",
            phase.as_str(),
            short(&ours)
        );
        if removed > 0 {
            message.push_str(&format!(
                " and {removed} container(s) of earlier versions were removed"
            ));
        }
        if let Some(url) = endpoints.values().next() {
            message.push_str(&format!(", serving at {url}"));
        }
        tracing::warn!(deployment_id = %status.id, app = %status.app, phase = phase.as_str(), "deployment interrupted by a restart completed by recovery");
        let result = DeploymentResult {
            success: true,
            message,
            container_id: ours,
            image_digest: String::new(),
            endpoints,
            health: Vec::new(),
            diagnostics: None,
            commit: status.commit.clone(),
            containers_removed: 0,
        };
        let deployment = Arc::new(Deployment::recovered(status));
        let mut reporter = self.resumed_reporter(deployment);
        reporter.finish(DeploymentState::Succeeded, result);
    }

    /// Rolls an interrupted removal forward (the caller asked for the app to go, and
    /// it may have begun stopping): every container of the app is removed, the removal
    /// is recorded, and it ends SUCCEEDED, "completed by recovery"; FAILED if the engine
    /// refuses.
    async fn complete_removal(&self, status: DeploymentStatus) -> Result<(), EngineError> {
        let runtime = &*self.0.runtime;
        let (app, accepted_at, phase) = (status.app.clone(), status.created_at, status.phase);
        let removed = async {
            let containers = runtime.list_app_containers(app.as_str()).await?;
            remove_each(runtime, &containers, |_, r| r).await?;
            Ok::<_, RuntimeError>(containers.len() as u32)
        }
        .await;
        if removed.is_ok() {
            self.0.store.record_removal(&app, accepted_at).await?;
        }
        tracing::warn!(deployment_id = %status.id, %app, phase = phase.as_str(), ok = removed.is_ok(), "removal interrupted by a restart finished by recovery");
        let removal = Arc::new(Deployment::recovered(status));
        let mut reporter = self.resumed_reporter(removal);
        match removed {
            Ok(n) => reporter.finish(
                DeploymentState::Succeeded,
                DeploymentResult {
                    success: true,
                    message: format!(
                        "completed by recovery: the server restarted during {}; {n} container(s) of app {app} removed; its history stays",
                        phase.name()
                    ),
                    containers_removed: n,
                    ..Default::default()
                },
            ),
            Err(e) => reporter.fail(
                phase,
                "server restart",
                format!(
                    "interrupted by a restart of the server during {}, and finishing the removal failed: {e}",
                    phase.name()
                ),
                Extra::meta([("interrupted", "restart".into())]),
            ),
        }
        Ok(())
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
        status: DeploymentStatus,
        removal: &Removal,
    ) -> Result<(), EngineError> {
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
        let mut reporter = self.resumed_reporter(deployment);
        let extra = Extra::meta([("interrupted", "restart".into())]);
        reporter.fail(phase, "server restart", message, extra);
        Ok(())
    }

    /// Starts the container of `app`'s last succeeded deployment if it exists but is
    /// stopped; returns its ID when it runs afterwards.
    async fn restart_previous_version(&self, app: &AppName) -> Option<String> {
        let container = self.previous_container(app).await?;
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
