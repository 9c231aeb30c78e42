//! The task that carries one deployment through its phases.
//!
//! QUEUED → VALIDATING → PULLING → CREATING → STARTING → HEALTH_CHECK → [HOOKS] →
//! SWITCHING → CLEANUP → COMPLETE. The new container's output is followed from its
//! start; lines wait in a channel until HEALTH_CHECK reads them for the log check and
//! the milestones ([`super::milestones`]). HOOKS ([`super::hooks`]) runs only when the
//! request has hooks. Until SWITCHING begins, a failure, a cancel or the
//! deadline rolls back: every container labelled with this deployment is removed and the
//! app's previous version keeps serving. SWITCHING is the point of no return: once the
//! old version is being taken out, the deployment runs to its end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::EngineContext;
use super::deployment::{Extra, Reporter};
use super::hooks;
use super::milestones::MilestoneTracker;
use super::pull::PullTracker;
use crate::model::{
    DeploymentResult, DeploymentState, FailureDiagnostics, HealthOutcome, HealthProbe, LABEL_APP,
    LABEL_DEPLOYMENT, Level, Phase, Protocol,
};
use crate::runtime::{ContainerSpec, ContainerState, ImageInfo, PublishedPort, RuntimeError};

/// At most this many pull updates per second (the final 100% one always goes out).
const PULL_UPDATE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a rollback waits for an interrupted create call to finish.
const CREATE_SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Output lines kept for diagnostics.
const LOG_TAIL_LINES: usize = 20;

/// Why the steps stopped short of the switch.
enum Stop {
    Failed(Failure),
    Cancelled,
    DeadlineExceeded,
    /// The server is shutting down and the grace ran out.
    Interrupted,
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A failed step.
struct Failure {
    phase: Phase,
    step: String,
    message: String,
    /// Exit code and output of the failed step when it is not the container's own
    /// (a hook): they replace the container's in the diagnostics.
    diagnostics: Option<(Option<i64>, Vec<String>)>,
}

impl Failure {
    fn new(phase: Phase, step: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            phase,
            step: step.into(),
            message: message.into(),
            diagnostics: None,
        }
    }

    fn runtime(phase: Phase, step: &'static str, e: RuntimeError) -> Self {
        Self::new(phase, step, format!("{step}: {e}"))
    }
}

pub(super) struct Run {
    rep: Reporter,
    ctx: Arc<EngineContext>,
    container: Option<String>,
    image: ImageInfo,
    ports: Vec<PublishedPort>,
    health: Vec<HealthOutcome>,
    log_lines: Option<mpsc::Receiver<String>>,
    log_follower: Option<AbortOnDrop>,
    /// Previous-version containers stopped to free fixed host ports (see
    /// [`Run::hand_over_fixed_ports`]); a rollback starts them again.
    stopped_previous: Vec<String>,
    /// The create call while it runs (see [`Run::create`]).
    creating: Option<tokio::task::JoinHandle<Result<String, RuntimeError>>>,
}

impl Run {
    pub(super) fn new(rep: Reporter, ctx: Arc<EngineContext>) -> Self {
        Self {
            rep,
            ctx,
            container: None,
            image: ImageInfo::default(),
            ports: Vec::new(),
            health: Vec::new(),
            log_lines: None,
            log_follower: None,
            creating: None,
            stopped_previous: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let deployment = self.rep.deployment().clone();
        let deadline = deployment_deadline(&self);
        let cancel = deployment.cancel.clone();
        let interrupt = deployment.interrupt.clone();

        // QUEUED: wait for the app's lock.
        let mut ticket = self.ctx.queues.join(&deployment.spec.app, deployment.id);
        let mut position = ticket.position();
        while position > 0 {
            self.rep.queued(position);
            tokio::select! {
                p = ticket.changed() => position = p,
                _ = cancel.cancelled() => {
                    return self.end(Stop::Cancelled).await;
                }
                _ = interrupt.cancelled() => {
                    return self.end(Stop::Interrupted).await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return self.end(Stop::DeadlineExceeded).await;
                }
            }
        }

        let outcome = tokio::select! {
            r = self.until_switch() => r.map_err(Stop::Failed),
            _ = cancel.cancelled() => Err(Stop::Cancelled),
            _ = interrupt.cancelled() => Err(Stop::Interrupted),
            _ = tokio::time::sleep_until(deadline) => Err(Stop::DeadlineExceeded),
        };
        match outcome {
            Err(stop) => self.end(stop).await,
            Ok(()) => match self.switch_and_clean().await {
                Ok(()) => self.succeed(),
                Err(f) => self.end(Stop::Failed(f)).await,
            },
        }
        drop(ticket);
    }

    /// Every step up to the point of no return.
    async fn until_switch(&mut self) -> Result<(), Failure> {
        self.validate().await?;
        self.pull().await?;
        self.create().await?;
        self.start().await?;
        self.health_check().await?;
        if !self.rep.deployment().spec.hooks.is_empty() {
            self.run_hooks().await?;
        }
        Ok(())
    }

    async fn validate(&mut self) -> Result<(), Failure> {
        let endpoint = self.ctx.runtime.endpoint().to_owned();
        self.rep.enter(
            Phase::Validating,
            format!("checking the docker engine at {endpoint}"),
        );
        self.ctx
            .runtime
            .ping()
            .await
            .map_err(|e| Failure::runtime(Phase::Validating, "docker engine check", e))?;
        self.rep.progress(
            1.0,
            Level::Info,
            "docker engine answers".into(),
            Extra::default(),
        );
        Ok(())
    }

    async fn pull(&mut self) -> Result<(), Failure> {
        let spec = &self.rep.deployment().spec;
        let image = spec.image.clone();
        let auth = spec.registry_auth.clone();
        let runtime = self.ctx.runtime.clone();
        self.rep
            .enter(Phase::Pulling, format!("looking for image {image}"));
        if let Some(info) = runtime
            .inspect_image(&image)
            .await
            .map_err(|e| Failure::runtime(Phase::Pulling, "image inspection", e))?
        {
            let digest = info.digest.clone().unwrap_or_default();
            self.image = info;
            self.rep.progress(
                1.0,
                Level::Info,
                format!("image {image} is present locally; no pull needed"),
                Extra::meta([("pulled", "false".into()), ("image_digest", digest)]),
            );
            return Ok(());
        }
        self.rep.progress(
            0.0,
            Level::Info,
            format!("pulling image {image}"),
            Extra::meta([("pulled", "true".into())]),
        );
        let mut tracker = PullTracker::default();
        let mut stream = runtime.pull(&image, auth.as_ref());
        let mut last_sent: Option<Instant> = None;
        while let Some(event) = stream.next().await {
            let event = event.map_err(|e| Failure::runtime(Phase::Pulling, "image pull", e))?;
            let Some(progress) = tracker.apply(&event) else {
                continue;
            };
            let due = last_sent.is_none_or(|t| t.elapsed() >= PULL_UPDATE_INTERVAL);
            if due {
                last_sent = Some(Instant::now());
                let message = format!(
                    "pulling {image}: {} of {} ({}/{} layers)",
                    bytes(progress.image_current_bytes),
                    bytes(progress.image_total_bytes),
                    progress.layers_done,
                    progress.layers_total,
                );
                let fraction = PullTracker::fraction(&progress);
                self.rep.progress(
                    fraction * 0.99,
                    Level::Verbose,
                    message,
                    Extra {
                        pull: Some(progress),
                        ..Default::default()
                    },
                );
            }
        }
        let info = runtime
            .inspect_image(&image)
            .await
            .map_err(|e| Failure::runtime(Phase::Pulling, "image inspection", e))?
            .ok_or_else(|| {
                Failure::new(
                    Phase::Pulling,
                    "image pull",
                    format!("image {image} is not present after its pull"),
                )
            })?;
        let progress = tracker.finish();
        let message = format!(
            "pulled {image}: {} in {} layers{}",
            bytes(progress.image_total_bytes),
            progress.layers_total,
            info.digest
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        );
        let digest = info.digest.clone().unwrap_or_default();
        self.image = info;
        self.rep.progress(
            1.0,
            Level::Info,
            message,
            Extra {
                pull: Some(progress),
                ..Extra::meta([("image_digest", digest)])
            },
        );
        Ok(())
    }

    async fn create(&mut self) -> Result<(), Failure> {
        let deployment = self.rep.deployment().clone();
        let spec = &deployment.spec;
        let id = deployment.id.to_string();
        let name = format!("{}-{}", spec.app, &id[..8]);
        self.rep
            .enter(Phase::Creating, format!("creating container {name}"));
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_APP.into(), spec.app.to_string());
        labels.insert(LABEL_DEPLOYMENT.into(), id.clone());
        let container = ContainerSpec {
            name: name.clone(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            ports: spec.ports.clone(),
            labels,
        };
        // The call runs in its own task: if a cancel, the deadline or a shutdown drops
        // this step mid-call, the engine still finishes creating the container, and the
        // rollback collects it from `creating` instead of missing it.
        let runtime = self.ctx.runtime.clone();
        let creating =
            self.creating.insert(tokio::spawn(
                async move { runtime.create(&container).await },
            ));
        let created = creating.await;
        self.creating = None;
        let container_id = created
            .map_err(|e| RuntimeError::Call {
                op: "create container",
                reason: e.to_string(),
            })
            .and_then(|r| r)
            .map_err(|e| Failure::runtime(Phase::Creating, "container creation", e))?;
        self.container = Some(container_id.clone());
        self.rep.progress(
            1.0,
            Level::Info,
            format!("created container {name} ({})", short(&container_id)),
            Extra::meta([("container_id", container_id)]),
        );
        Ok(())
    }

    async fn start(&mut self) -> Result<(), Failure> {
        let id = self.container.clone().expect("created");
        self.rep.enter(
            Phase::Starting,
            format!("starting container {}", short(&id)),
        );
        self.hand_over_fixed_ports(&id).await?;
        self.ctx
            .runtime
            .start(&id)
            .await
            .map_err(|e| Failure::runtime(Phase::Starting, "container start", e))?;
        // Follow the output from the start: log health checks and milestones read it.
        let (tx, rx) = mpsc::channel(1024);
        let mut lines = self.ctx.runtime.follow_logs(&id);
        let follower = tokio::spawn(async move {
            while let Some(Ok(line)) = lines.next().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        // A healthy container may stay quiet for ever: stop following when the run ends.
        self.log_follower = Some(AbortOnDrop(follower.abort_handle()));
        self.log_lines = Some(rx);
        let state = self.inspect(Phase::Starting).await?;
        self.ports = state.ports.clone();
        let mut extra = Extra::default();
        for (name, url) in self.endpoints() {
            extra.metadata.insert(format!("endpoint.{name}"), url);
        }
        self.rep.progress(
            1.0,
            Level::Info,
            format!("container {} is running", short(&id)),
            extra,
        );
        Ok(())
    }

    /// A fixed host port can be bound by one container only, so the new version cannot
    /// start while the previous one holds it. Then, and only then, the previous
    /// container is stopped (not removed) right before the start: the app is briefly
    /// down, and if this deployment does not complete the rollback starts the previous
    /// container again. With host port 0 (any free port) nothing changes: the previous
    /// version serves until the switch.
    async fn hand_over_fixed_ports(&mut self, ours: &str) -> Result<(), Failure> {
        let deployment = self.rep.deployment().clone();
        let fixed: Vec<u16> = deployment
            .spec
            .ports
            .iter()
            .filter(|p| p.host_port != 0)
            .map(|p| p.host_port)
            .collect();
        if fixed.is_empty() {
            return Ok(());
        }
        let runtime = self.ctx.runtime.clone();
        let step = "handing the fixed host ports over";
        let running: Vec<_> = runtime
            .list_app_containers(deployment.spec.app.as_str())
            .await
            .map_err(|e| Failure::runtime(Phase::Starting, step, e))?
            .into_iter()
            .filter(|c| c.id != ours && c.running)
            .collect();
        for old in running {
            let state = runtime
                .inspect(&old.id)
                .await
                .map_err(|e| Failure::runtime(Phase::Starting, step, e))?;
            let held: Vec<String> = state
                .ports
                .iter()
                .filter(|p| fixed.contains(&p.host_port))
                .map(|p| p.host_port.to_string())
                .collect();
            if held.is_empty() {
                continue;
            }
            self.rep.progress(
                0.0,
                Level::Warning,
                format!(
                    "host port {} is held by the previous version ({}): stopping it before \
                     the new container starts (it is started again if this deployment does \
                     not complete)",
                    held.join(", "),
                    short(&old.id)
                ),
                Extra::meta([("stopped_container_id", old.id.clone())]),
            );
            // Recorded before the call: if the call is interrupted, the rollback still
            // starts the container again.
            self.stopped_previous.push(old.id.clone());
            runtime
                .stop(&old.id)
                .await
                .map_err(|e| Failure::runtime(Phase::Starting, step, e))?;
        }
        Ok(())
    }

    async fn inspect(&self, phase: Phase) -> Result<ContainerState, Failure> {
        let id = self.container.as_deref().expect("created");
        let state = self
            .ctx
            .runtime
            .inspect(id)
            .await
            .map_err(|e| Failure::runtime(phase, "container inspection", e))?;
        if !state.running {
            return Err(Failure::new(
                phase,
                if phase == Phase::Starting {
                    "container start"
                } else {
                    "health check"
                },
                format!(
                    "container exited{}{}",
                    state
                        .exit_code
                        .map(|c| format!(" with code {c}"))
                        .unwrap_or_default(),
                    if state.oom_killed {
                        " (killed: out of memory)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(state)
    }

    fn published(&self, container_port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.container_port == container_port && p.protocol == Protocol::Tcp)
            .map(|p| p.host_port)
    }

    fn endpoints(&self) -> BTreeMap<String, String> {
        let host = self.ctx.runtime.public_host();
        self.ports
            .iter()
            .map(|p| {
                let scheme = match p.protocol {
                    Protocol::Tcp => "http",
                    Protocol::Udp => "udp",
                };
                (
                    format!("{}/{}", p.container_port, p.protocol.as_str()),
                    format!("{scheme}://{host}:{}", p.host_port),
                )
            })
            .collect()
    }

    /// The probe for this deployment: the requested one, else the image's HEALTHCHECK,
    /// else a TCP probe of the first published TCP port, else a settle time.
    fn probe(&self) -> HealthProbe {
        let spec = &self.rep.deployment().spec;
        if let Some(p) = &spec.health.probe {
            return p.clone();
        }
        if self.image.has_healthcheck {
            return HealthProbe::Docker;
        }
        match spec.ports.iter().find(|p| p.protocol == Protocol::Tcp) {
            Some(p) => HealthProbe::Tcp {
                port: p.container_port,
            },
            None => HealthProbe::None,
        }
    }

    async fn health_check(&mut self) -> Result<(), Failure> {
        let probe = self.probe();
        let spec = self.rep.deployment().spec.health.clone();
        let settle = self.ctx.config.settle_time;
        let description = match &probe {
            HealthProbe::Docker => "waiting for the image's HEALTHCHECK to pass".to_owned(),
            HealthProbe::Tcp { port } => format!("probing TCP port {port}"),
            HealthProbe::Http {
                port,
                path,
                expect_status,
            } => format!("probing GET {path} on port {port} for status {expect_status}"),
            HealthProbe::Log { pattern } => {
                format!("waiting for an output line matching /{pattern}/")
            }
            HealthProbe::None => format!(
                "no health check: the container must stay up for {}s",
                settle.as_secs_f64()
            ),
        };
        self.rep.enter(Phase::HealthCheck, description);
        let started = Instant::now();
        let timeout = if matches!(probe, HealthProbe::None) {
            spec.timeout.max(settle * 2)
        } else {
            spec.timeout
        };
        let mut attempts = 0u32;
        let mut log_matched = false;
        // Output lines printed during STARTING wait in the channel and are read here:
        // milestones move HEALTH_CHECK's progress, whenever their line was printed.
        let mut lines = self.log_lines.take();
        let mut milestones = MilestoneTracker::new(self.rep.deployment().spec.milestones.clone());
        let result = loop {
            attempts += 1;
            if let Some(rx) = lines.as_mut() {
                while let Ok(line) = rx.try_recv() {
                    self.on_output_line(&line, &probe, &mut log_matched, &mut milestones);
                }
            }
            let state = self.inspect(Phase::HealthCheck).await?;
            let verdict: Result<String, String> = match &probe {
                HealthProbe::Docker => match state.health {
                    Some(crate::runtime::DockerHealth::Healthy) => {
                        Ok("image HEALTHCHECK passed".into())
                    }
                    Some(crate::runtime::DockerHealth::Unhealthy) => {
                        break Err(format!(
                            "image HEALTHCHECK reported unhealthy{}",
                            state
                                .health_log
                                .map(|l| format!(": {l}"))
                                .unwrap_or_default()
                        ));
                    }
                    Some(crate::runtime::DockerHealth::Starting) => {
                        Err("image HEALTHCHECK still starting".into())
                    }
                    None => break Err("the image has no HEALTHCHECK".into()),
                },
                HealthProbe::Tcp { port } => match self.published(*port) {
                    None => break Err(format!("container port {port}/tcp is not published")),
                    Some(host_port) => tcp_probe(self.ctx.runtime.public_host(), host_port)
                        .await
                        .map(|()| format!("TCP port {port} accepts connections")),
                },
                HealthProbe::Http {
                    port,
                    path,
                    expect_status,
                } => match self.published(*port) {
                    None => break Err(format!("container port {port}/tcp is not published")),
                    Some(host_port) => {
                        let url = format!(
                            "http://{}:{host_port}{path}",
                            self.ctx.runtime.public_host()
                        );
                        http_probe(&self.ctx.http, &url, *expect_status, spec.interval)
                            .await
                            .map(|()| format!("GET {path} answered {expect_status}"))
                    }
                },
                HealthProbe::Log { pattern } => {
                    if log_matched {
                        Ok(format!("output matched /{pattern}/"))
                    } else {
                        Err(format!("no output line matched /{pattern}/ yet"))
                    }
                }
                HealthProbe::None => {
                    if started.elapsed() >= settle {
                        Ok(format!("container stayed up for {}s", settle.as_secs_f64()))
                    } else {
                        Err("waiting for the container to stay up".into())
                    }
                }
            };
            match verdict {
                Ok(message) => break Ok(message),
                Err(why) => {
                    let elapsed = started.elapsed();
                    if elapsed >= timeout {
                        break Err(format!(
                            "not healthy after {:.1}s ({attempts} attempts): {why}",
                            elapsed.as_secs_f64()
                        ));
                    }
                    // Milestones that set progress replace the clock.
                    let fraction = if milestones.drives_progress() {
                        milestones.reached()
                    } else {
                        elapsed.as_secs_f64() / timeout.as_secs_f64() * 0.95
                    };
                    self.rep.progress(
                        fraction,
                        Level::Verbose,
                        format!("health check attempt {attempts}: {why}"),
                        Extra::meta([
                            ("attempt", attempts.to_string()),
                            ("check", probe.name().into()),
                        ]),
                    );
                }
            }
            // Until the next attempt, read output as it comes (milestones go out live; a
            // matching line for a log check ends the wait).
            let wake = Instant::now() + spec.interval;
            loop {
                let next = async {
                    match lines.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    line = next => match line {
                        Some(line) => {
                            self.on_output_line(&line, &probe, &mut log_matched, &mut milestones);
                            if log_matched {
                                break;
                            }
                        }
                        // The follower ended (the container exited): the next attempt says so.
                        None => lines = None,
                    },
                }
            }
        };
        if let Some(rx) = lines.as_mut() {
            while let Ok(line) = rx.try_recv() {
                self.on_output_line(&line, &probe, &mut log_matched, &mut milestones);
            }
        }
        self.log_lines = lines;
        let healthy = result.is_ok();
        let message = match &result {
            Ok(m) | Err(m) => m.clone(),
        };
        self.health.push(HealthOutcome {
            check: probe.name().into(),
            healthy,
            attempts,
            message: message.clone(),
        });
        match result {
            Ok(m) => {
                self.rep.progress(
                    1.0,
                    Level::Info,
                    format!("healthy: {m}"),
                    Extra::meta([("attempt", attempts.to_string())]),
                );
                Ok(())
            }
            Err(m) => Err(Failure::new(Phase::HealthCheck, "health check", m)),
        }
    }

    /// One line of the new container's output during HEALTH_CHECK: the log check's
    /// pattern, then the milestones (each hit is an update: message = description,
    /// metadata `milestone` (index), `line`, and `count` for a counting milestone).
    fn on_output_line(
        &mut self,
        line: &str,
        probe: &HealthProbe,
        log_matched: &mut bool,
        milestones: &mut MilestoneTracker,
    ) {
        if let HealthProbe::Log { pattern } = probe {
            *log_matched |= pattern.is_match(line);
        }
        for hit in milestones.apply(line) {
            let mut extra = Extra::meta([("milestone", hit.index.to_string()), ("line", hit.line)]);
            if let Some(count) = hit.count {
                extra.metadata.insert("count".into(), count.to_string());
            }
            self.rep
                .progress(hit.progress, Level::Info, hit.description, extra);
        }
    }

    /// PHASE_HOOKS: each hook in turn inside the new container (see [`hooks`]).
    async fn run_hooks(&mut self) -> Result<(), Failure> {
        let deployment = self.rep.deployment().clone();
        let hooks = &deployment.spec.hooks;
        let container = self.container.clone().expect("created");
        let runtime = self.ctx.runtime.clone();
        let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
        self.rep.enter(
            Phase::Hooks,
            format!("running {} hook(s): {}", hooks.len(), names.join(", ")),
        );
        for (i, hook) in hooks.iter().enumerate() {
            hooks::run_hook(&mut self.rep, &runtime, &container, hook, i, hooks.len())
                .await
                .map_err(|f| Failure {
                    phase: Phase::Hooks,
                    step: format!("hook {}", hook.name),
                    message: f.message,
                    diagnostics: Some((f.exit_code, f.log_tail)),
                })?;
        }
        Ok(())
    }

    /// SWITCHING and CLEANUP: the new container is healthy; take the old ones out.
    async fn switch_and_clean(&mut self) -> Result<(), Failure> {
        let ours = self.container.clone().expect("created");
        let app = self.rep.deployment().spec.app.to_string();
        self.rep
            .enter(Phase::Switching, "taking the previous version out");
        let previous: Vec<_> = self
            .ctx
            .runtime
            .list_app_containers(&app)
            .await
            .map_err(|e| Failure::runtime(Phase::Switching, "listing the app's containers", e))?
            .into_iter()
            .filter(|c| c.id != ours && (c.running || self.stopped_previous.contains(&c.id)))
            .collect();
        let total = previous.len().max(1) as f64;
        for (i, old) in previous.iter().enumerate() {
            self.ctx.runtime.remove(&old.id).await.map_err(|e| {
                Failure::runtime(Phase::Switching, "removing the previous container", e)
            })?;
            self.rep.progress(
                (i + 1) as f64 / total,
                Level::Info,
                format!(
                    "stopped and removed previous container {} (deployment {})",
                    short(&old.id),
                    old.deployment
                ),
                Extra::meta([("removed_container_id", old.id.clone())]),
            );
        }
        if previous.is_empty() {
            self.rep.progress(
                1.0,
                Level::Info,
                "no previous version was running".into(),
                Extra::default(),
            );
        }

        self.rep
            .enter(Phase::Cleanup, "removing leftovers of earlier deployments");
        let leftovers: Vec<_> = self
            .ctx
            .runtime
            .list_app_containers(&app)
            .await
            .map_err(|e| Failure::runtime(Phase::Cleanup, "listing the app's containers", e))?
            .into_iter()
            .filter(|c| c.id != ours)
            .collect();
        for old in &leftovers {
            if let Err(e) = self.ctx.runtime.remove(&old.id).await {
                tracing::warn!(container = %old.id, error = %e, "could not remove leftover container");
            }
        }
        self.inspect(Phase::Cleanup).await?;
        self.rep.progress(
            1.0,
            Level::Info,
            format!(
                "cleanup done ({} stopped containers removed)",
                leftovers.len()
            ),
            Extra::default(),
        );
        Ok(())
    }

    fn succeed(mut self) {
        let container_id = self.container.clone().unwrap_or_default();
        let endpoints = self.endpoints();
        let spec = &self.rep.deployment().spec;
        let mut message = format!(
            "deployed {} as app {} in container {}",
            spec.image,
            spec.app,
            short(&container_id)
        );
        if let Some(url) = endpoints.values().next() {
            message.push_str(&format!(", serving at {url}"));
        }
        let result = DeploymentResult {
            success: true,
            message,
            container_id,
            image_digest: self.image.digest.clone().unwrap_or_default(),
            endpoints,
            health: std::mem::take(&mut self.health),
            diagnostics: None,
        };
        self.rep.finish(DeploymentState::Succeeded, result);
    }

    /// Rolls back what this deployment created and sends the terminal update.
    async fn end(mut self, stop: Stop) {
        let phase = self.rep.phase();
        let (state, mut message, mut diagnostics) = match stop {
            Stop::Failed(f) => {
                let mut d = FailureDiagnostics {
                    failed_phase: Some(f.phase),
                    step: f.step,
                    ..Default::default()
                };
                match f.diagnostics {
                    Some((exit_code, log_tail)) => {
                        d.exit_code = exit_code;
                        d.log_tail = log_tail;
                    }
                    None => self.collect_diagnostics(&mut d).await,
                }
                (DeploymentState::Failed, f.message, Some(d))
            }
            Stop::Cancelled => {
                self.rep.cancelling(format!(
                    "cancel requested during {}: removing what this deployment created",
                    phase.as_str()
                ));
                (
                    DeploymentState::Cancelled,
                    format!("cancelled during {}", phase.as_str()),
                    None,
                )
            }
            Stop::Interrupted => (
                DeploymentState::Failed,
                format!(
                    "interrupted by server shutdown during {}: the server stopped before the deployment could finish",
                    phase.as_str()
                ),
                Some(FailureDiagnostics {
                    failed_phase: Some(phase),
                    step: "server shutdown".into(),
                    ..Default::default()
                }),
            ),
            Stop::DeadlineExceeded => {
                let deadline = self.rep.deployment().spec.deadline;
                let mut d = FailureDiagnostics {
                    failed_phase: Some(phase),
                    step: "deadline".into(),
                    ..Default::default()
                };
                self.collect_diagnostics(&mut d).await;
                (
                    DeploymentState::Failed,
                    format!(
                        "deadline of {}s exceeded during {}",
                        deadline.as_secs_f64(),
                        phase.as_str()
                    ),
                    Some(d),
                )
            }
        };
        if let Err(e) = self.roll_back().await {
            message.push_str(&format!("; rollback incomplete: {e}"));
            if let Some(d) = diagnostics.as_mut() {
                d.step.push_str(" (rollback incomplete)");
            }
        } else if !self.stopped_previous.is_empty() {
            message.push_str(
                "; the new container was removed and the previous version was started again",
            );
        } else if self.container.is_some() {
            message
                .push_str("; the new container was removed and the previous version keeps running");
        }
        let result = DeploymentResult {
            success: false,
            message,
            container_id: String::new(),
            image_digest: self.image.digest.clone().unwrap_or_default(),
            endpoints: BTreeMap::new(),
            health: std::mem::take(&mut self.health),
            diagnostics,
        };
        self.rep.finish(state, result);
    }

    async fn collect_diagnostics(&self, d: &mut FailureDiagnostics) {
        let Some(id) = self.container.as_deref() else {
            return;
        };
        if let Ok(state) = self.ctx.runtime.inspect(id).await {
            d.exit_code = state.exit_code;
            d.oom_killed = state.oom_killed;
        }
        if let Ok(lines) = self.ctx.runtime.logs_tail(id, LOG_TAIL_LINES).await {
            d.log_tail = lines;
        }
    }

    /// Removes every container this deployment created: the one it knows, one whose
    /// create call was interrupted (awaited here), and any carrying its label.
    async fn roll_back(&mut self) -> Result<(), RuntimeError> {
        let mut ids: Vec<String> = self.container.iter().cloned().collect();
        if let Some(creating) = self.creating.take() {
            let budget = CREATE_SETTLE_TIMEOUT;
            match tokio::time::timeout(budget, creating).await {
                Ok(Ok(Ok(id))) => ids.push(id),
                Ok(Ok(Err(_))) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "interrupted create call failed"),
                Err(_) => {
                    tracing::warn!("interrupted create call still running; relying on labels")
                }
            }
        }
        let deployment = self.rep.deployment();
        let id = deployment.id.to_string();
        match self
            .ctx
            .runtime
            .list_app_containers(deployment.spec.app.as_str())
            .await
        {
            Ok(list) => ids.extend(
                list.into_iter()
                    .filter(|c| c.deployment == id)
                    .map(|c| c.id),
            ),
            Err(e) if ids.is_empty() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "could not list containers for rollback"),
        }
        ids.sort();
        ids.dedup();
        for cid in ids {
            self.ctx.runtime.remove(&cid).await?;
            tracing::info!(container = %cid, "rolled back container");
        }
        // Give the fixed host ports back to the previous version.
        for old in &self.stopped_previous {
            if let Err(e) = self.ctx.runtime.start(old).await {
                // Running again anyway (a restart policy, or a start that raced) is fine.
                let running = self.ctx.runtime.inspect(old).await.is_ok_and(|s| s.running);
                if !running {
                    return Err(e);
                }
            }
            tracing::info!(container = %old, "started the previous version again");
        }
        Ok(())
    }
}

/// The deadline counts from acceptance, queue wait included.
fn deployment_deadline(run: &Run) -> Instant {
    let deployment = run.rep.deployment();
    Instant::from_std(deployment.accepted) + deployment.spec.deadline
}

async fn tcp_probe(host: &str, port: u16) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let connect = tokio::net::TcpStream::connect((host, port));
    let mut stream = match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Err(_) => return Err(format!("connecting to {host}:{port} timed out")),
        Ok(Err(e)) => return Err(format!("connecting to {host}:{port}: {e}")),
        Ok(Ok(s)) => s,
    };
    // Docker's port proxy accepts connections even when nothing listens behind it, then
    // closes them at once: a connection that stays open is the real sign of life.
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
        Err(_) | Ok(Ok(1..)) => Ok(()),
        Ok(Ok(0)) => Err(format!("{host}:{port} closed the connection")),
        Ok(Err(e)) => Err(format!("{host}:{port}: {e}")),
    }
}

async fn http_probe(
    client: &reqwest::Client,
    url: &str,
    expect: u16,
    interval: Duration,
) -> Result<(), String> {
    let timeout = (interval * 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    match client.get(url).timeout(timeout).send().await {
        Err(e) => Err(format!("GET {url}: {e}")),
        Ok(r) if r.status().as_u16() == expect => Ok(()),
        Ok(r) => Err(format!(
            "GET {url} answered {}, expected {expect}",
            r.status()
        )),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
