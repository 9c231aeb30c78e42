//! Apps as a view of their own: what runs now per app (its newest SUCCEEDED
//! deployment) and its newest deployment or removal, and which deployment replaced
//! which (`superseded_by`). Answered from the store (after a restart too), with the
//! live status of deployments still in memory. An app removed (see `removal.rs`) and
//! not deployed since is left out.

use super::{Engine, EngineError};
use crate::model::{AppName, DeploymentState, DeploymentStatus};

/// One app in [`Engine::apps`].
#[derive(Clone, Debug)]
pub(crate) struct AppView {
    pub(crate) app: AppName,
    /// The newest SUCCEEDED deployment: what runs now. `None` when none succeeded.
    pub current: Option<DeploymentStatus>,
    /// The newest deployment or removal, in any state.
    pub latest: DeploymentStatus,
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
            // Accepted before the app's last removal: ran before it, so removed.
            let removed_at = removals.get(l.app.as_str());
            let removed = |s: &DeploymentStatus| {
                removed_at.is_some_and(|&at| crate::store::nanos(s.created_at) <= at)
            };
            if removed(&l) {
                continue; // Removed, and not deployed since.
            }
            apps.push(AppView {
                app: l.app.clone(),
                current: cur.filter(|c| !removed(c)),
                latest: l,
            });
        }
        Ok(apps)
    }

    /// Fills in `superseded_by` (and clears the endpoints that are no longer live) of
    /// a SUCCEEDED deployment that a later successful one, or a removal of the app,
    /// replaced.
    pub(crate) async fn mark_superseded(
        &self,
        status: &mut DeploymentStatus,
    ) -> Result<(), EngineError> {
        if status.state != DeploymentState::Succeeded || !status.operation.is_deploy() {
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
