//! RemoveApp as an operation of its own: it has an ID, a log, a status and a place in
//! its app's queue like a deploy, so GetStatus, WatchDeployment, the observers (audit
//! log, metrics, webhooks) and recovery see it through the same paths.
//!
//! QUEUED (behind the app's running and queued deployments) → SWITCHING (each running
//! container of the app stopped under the stop policy, as a switch stops the previous
//! version) → CLEANUP (every container of the app removed; the removal recorded, so
//! the app leaves [`Engine::apps`]) → COMPLETE, with the count in
//! `result.containers_removed`. A cancel or a shutdown is honoured while it is queued
//! (nothing was touched); once stopping has begun it runs to its end, and a crash
//! from there is finished by recovery (see `recover.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::deployment::{Deployment, Extra, Reporter};
use super::queue::Ticket;
use super::run::{Failure, Stop, short, stop_gracefully, wait_turn};
use super::{Engine, EngineError, Inner};
use crate::events::UpdateStream;
use crate::model::{AppName, DeploymentId, DeploymentResult, DeploymentState, Level, Phase};
use crate::runtime::remove_each;

impl Engine {
    /// Accepts the removal of every container of `app` and starts its task; returns
    /// its ID and a stream of its updates from the first one. It waits for the app's
    /// running and queued deployments (it takes the app's lock like one). The history
    /// stays; once it succeeded the app leaves [`Engine::apps`] until it is deployed
    /// again. `stop_timeout` is each container's stop grace (else its StopTimeout,
    /// else 10 s).
    pub(crate) async fn remove_app(
        &self,
        app: AppName,
        requested_by: String,
        stop_timeout: Option<Duration>,
    ) -> Result<(DeploymentId, UpdateStream), EngineError> {
        self.check_accepting()?;
        self.ping().await?;
        let id = DeploymentId::new();
        let ticket = self.admit(&app, id)?;
        let log = self.live_log(id);
        let removal = Arc::new(Deployment::removal(
            id,
            app,
            requested_by,
            stop_timeout,
            log,
        ));
        let mut reporter = self.reporter(&removal);
        let _no_idempotency_key = self.register(&removal);
        reporter.accepted();
        if ticket.position() > 0 {
            reporter.queued(ticket.position(), ticket.ahead());
        }
        let stream = removal
            .log
            .subscribe(0)
            .expect("a new log holds everything");
        self.spawn_task(&removal, run(reporter, self.0.clone(), ticket));
        Ok((id, stream))
    }
}

/// The removal's task: waits its turn, then stops and removes.
async fn run(mut rep: Reporter, ctx: Arc<Inner>, mut ticket: Ticket) {
    let removal = rep.deployment().clone();
    // A removal has no deadline: it waits for the deployments ahead of it.
    match wait_turn(&mut rep, &mut ticket, None).await {
        Ok(_) => {}
        Err(Stop::Cancelled) => {
            rep.cancelling("cancel requested while queued: nothing was removed".into());
            let result = DeploymentResult {
                message: "cancelled while queued; nothing was removed".into(),
                ..Default::default()
            };
            return rep.finish(DeploymentState::Cancelled, result);
        }
        Err(Stop::Interrupted) => {
            let message = "interrupted by server shutdown while queued; nothing was removed";
            return rep.fail(
                Phase::Queued,
                "server shutdown",
                message.into(),
                Extra::default(),
            );
        }
        Err(Stop::DeadlineExceeded | Stop::Failed(_)) => {
            unreachable!("waiting without a deadline ends only by cancel or shutdown")
        }
    }
    match stop_and_remove(&mut rep, &ctx).await {
        Ok(removed) => {
            let app = &removal.spec.app;
            let result = DeploymentResult {
                success: true,
                message: format!(
                    "removed app {app}: {removed} container(s) stopped and removed; its history stays"
                ),
                containers_removed: removed,
                ..Default::default()
            };
            rep.finish(DeploymentState::Succeeded, result);
        }
        Err(f) => rep.fail(f.phase, &f.step, f.message, Extra::default()),
    }
    drop(ticket);
}

/// With a proxy: the app's public port is unbound first (connections open to it drain
/// under the proxy's `--drain-timeout`, or end when the containers stop). A proxy that
/// does not answer does not stop the removal: the reconciler removes the route once
/// it answers.
async fn remove_route(
    rep: &mut Reporter,
    proxy: &crate::proxy::client::ProxyClient,
    app: &AppName,
) {
    match proxy.remove_route(app.as_str()).await {
        Ok(Some(route)) => {
            let listen = route.route.listen.to_string();
            let message =
                format!("removed the route of app {app}: {listen} no longer accepts connections");
            rep.progress(
                0.0,
                Level::Info,
                message,
                Extra::meta([("route_listen", listen)]),
            );
        }
        Ok(None) => {}
        Err(e) => {
            let message = format!(
                "could not remove the route of app {app}: {e}; it is removed once the proxy answers"
            );
            rep.progress(0.0, Level::Warning, message, Extra::default());
        }
    }
}

/// SWITCHING: stops each running container of the app under the stop policy;
/// CLEANUP: removes every container of the app and records the removal. Returns how
/// many containers were removed.
async fn stop_and_remove(rep: &mut Reporter, ctx: &Inner) -> Result<u32, Failure> {
    let removal = rep.deployment().clone();
    let app = &removal.spec.app;
    let runtime = &*ctx.runtime;
    rep.enter(
        Phase::Switching,
        format!("stopping the containers of app {app}"),
    );
    // Past here the removal is finished by recovery after a crash: on disk first.
    ctx.store.flush().await;
    if let Some(proxy) = &ctx.config.proxy {
        remove_route(rep, proxy, app).await;
    }
    let list = |phase| async move {
        (runtime.list_app_containers(app.as_str()).await)
            .map_err(|e| Failure::runtime(phase, "listing the app's containers", e))
    };
    let running: Vec<_> = (list(Phase::Switching).await?)
        .into_iter()
        .filter(|c| c.running)
        .collect();
    let total = running.len().max(1) as f64;
    for (i, c) in running.iter().enumerate() {
        let span = (i as f64 / total, 1.0 / total);
        let grace = removal.spec.stop_timeout;
        stop_gracefully(rep, runtime, grace, c, "container", span).await;
    }
    if running.is_empty() {
        let message = format!("no container of app {app} was running");
        rep.progress(1.0, Level::Info, message, Extra::default());
    }
    // Listed again: a container stopped meanwhile (or left stopped) goes too.
    let containers = list(Phase::Cleanup).await?;
    rep.enter(
        Phase::Cleanup,
        format!(
            "removing the {} container(s) of app {app}",
            containers.len()
        ),
    );
    let total = containers.len().max(1) as f64;
    let mut removed = 0;
    remove_each(runtime, &containers, |c, r| {
        r.map_err(|e| Failure::runtime(Phase::Cleanup, "removing a container", e))?;
        removed += 1;
        rep.progress(
            removed as f64 / total,
            Level::Info,
            format!(
                "removed container {} (deployment {})",
                short(&c.id),
                c.deployment
            ),
            Extra::meta([("removed_container_id", c.id.clone())]),
        );
        Ok(())
    })
    .await?;
    let accepted_at = removal.status().created_at;
    (ctx.store.record_removal(app, accepted_at).await)
        .map_err(|e| Failure::new(Phase::Cleanup, "recording the removal", e.to_string()))?;
    Ok(removed)
}
