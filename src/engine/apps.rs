//! Apps as a view of their own: what runs now per app (its newest SUCCEEDED
//! deployment) and its newest deployment, and which deployment replaced which
//! (`superseded_by`). Answered from the store (after a restart too), with the live
//! status of deployments still in memory.

use super::{Engine, EngineError};
use crate::model::{AppName, DeploymentId, DeploymentState, DeploymentStatus};

/// One app in [`Engine::apps`].
#[derive(Clone, Debug)]
pub(crate) struct AppView {
    pub(crate) app: AppName,
    /// The newest SUCCEEDED deployment: what runs now. `None` when none succeeded.
    pub(crate) current: Option<DeploymentStatus>,
    /// The newest deployment in any state.
    pub(crate) latest: DeploymentStatus,
}

impl Engine {
    /// Every app known to the store, sorted by name.
    pub(crate) async fn apps(&self) -> Result<Vec<AppView>, EngineError> {
        self.0.store.flush().await;
        let latest = self.0.store.newest_per_app(false).await?;
        let mut current = self
            .0
            .store
            .newest_per_app(true)
            .await?
            .into_iter()
            .peekable();
        let removals = self.0.store.removals().await?;
        let mut apps = Vec::with_capacity(latest.len());
        for mut l in latest {
            if let Some(d) = self.get(l.id) {
                l = d.status();
            }
            // Both lists are sorted by app; every app with a success has a latest.
            let cur = match current.peek() {
                Some(c) if c.app == l.app => current.next(),
                _ => None,
            };
            let cur = match cur {
                Some(c) if c.id == l.id => Some(l.clone()),
                c => c,
            };
            // Removed, and not deployed since.
            let removed = removals
                .get(l.app.as_str())
                .is_some_and(|&at| crate::store::nanos(l.created_at) <= at);
            if removed {
                continue;
            }
            apps.push(AppView {
                app: l.app.clone(),
                current: cur,
                latest: l,
            });
        }
        Ok(apps)
    }

    /// Fills in `superseded_by` (and clears the endpoints that are no longer live) of
    /// a SUCCEEDED deployment that a later successful one replaced.
    pub(crate) async fn mark_superseded(
        &self,
        status: &mut DeploymentStatus,
    ) -> Result<(), EngineError> {
        if status.state != DeploymentState::Succeeded {
            return Ok(());
        }
        status.superseded_by = self.0.store.next_succeeded(status).await?;
        if status.superseded_by.is_some()
            && let Some(result) = status.result.as_mut()
        {
            result.endpoints.clear();
        }
        Ok(())
    }
}

/// What [`Engine::remove_app`] did.
#[derive(Clone, Debug)]
pub(crate) struct Removal {
    pub(crate) containers_removed: u32,
    pub(crate) removed_at: std::time::SystemTime,
}

impl Engine {
    /// Stops and removes every container of `app`, once the app's running and queued
    /// deployments are through (it takes the app's lock like a deployment). The history
    /// stays; the app leaves [`Engine::apps`] until it is deployed again.
    pub(crate) async fn remove_app(&self, app: &AppName) -> Result<Removal, EngineError> {
        let mut ticket = self
            .0
            .queues
            .admit(app, DeploymentId(uuid::Uuid::new_v4()))
            .map_err(|r| EngineError::Exhausted {
                limit: r.limit,
                message: format!(
                    "RemoveApp refused: {} limit ({}) reached",
                    r.limit.as_str(),
                    r.max
                ),
            })?;
        while ticket.position() != 0 {
            ticket.changed().await;
        }
        let containers = self
            .0
            .runtime
            .list_app_containers(app.as_str())
            .await
            .map_err(EngineError::Unavailable)?;
        crate::runtime::remove_each(&*self.0.runtime, &containers, |_, r| r)
            .await
            .map_err(EngineError::Unavailable)?;
        let removed_at = std::time::SystemTime::now();
        self.0.store.record_removal(app, removed_at).await?;
        tracing::info!(app = %app, containers = containers.len(), "app removed");
        drop(ticket);
        Ok(Removal {
            containers_removed: containers.len() as u32,
            removed_at,
        })
    }
}
