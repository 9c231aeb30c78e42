//! The task that carries one deployment through its phases.
//!
//! QUEUED → VALIDATING → PULLING → CREATING → STARTING → HEALTH_CHECK → [HOOKS] →
//! SWITCHING → CLEANUP → COMPLETE. The new container's output is followed from its
//! start; lines wait in a channel until HEALTH_CHECK reads them for the log check and
//! the milestones ([`super::milestones`]); the probes are in [`super::health`]. HOOKS
//! ([`super::hooks`]) runs only when the request has hooks. Until SWITCHING begins, a
//! failure, a cancel or the deadline rolls back: every container labelled with this
//! deployment is removed and the app's previous version keeps serving. SWITCHING is the
//! point of no return: once the old version is being taken out, the deployment runs to
//! its end. With a proxy, SWITCHING first moves the app's route to the new container
//! and waits for the previous version's connections to drain ([`super::route`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::Inner;
use super::deployment::{Extra, Reporter};
use super::health::{self, Output, Verdict};
use super::hooks;
use super::milestones::MilestoneTracker;
use super::pull::PullTracker;
use super::queue::Ticket;
use super::route::{self, RoutedPort};
use crate::model::{
    DeploymentResult, DeploymentState, FailureDiagnostics, HealthOutcome, HealthProbe, LABEL_APP,
    LABEL_DEPLOYMENT, Level, Phase, PortSpec, Protocol, PullProgress, SourceSpec,
};
use crate::runtime::{
    ContainerSpec, ContainerState, ContainerSummary, ImageInfo, PublishedPort, RuntimeError,
    remove_each,
};

/// At most this many pull updates per second (the final 100% one always goes out).
const PULL_UPDATE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a rollback waits for an interrupted create call to finish.
const CREATE_SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The previous version's stop grace when neither the request nor the container sets one.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Output lines kept for diagnostics.
const LOG_TAIL_LINES: usize = 20;

/// Why the steps stopped short of the switch.
pub(super) enum Stop {
    Failed(Failure),
    Cancelled,
    DeadlineExceeded,
    /// The server is shutting down and the grace ran out.
    Interrupted,
}

/// A failed step (of the run, or of a hook).
pub(super) struct Failure {
    pub(super) phase: Phase,
    pub(super) step: String,
    pub(super) message: String,
    /// Exit code and output of the failed step when it is not the container's own (a
    /// hook): they replace the container's in the diagnostics.
    pub(super) output: Option<StepOutput>,
}

/// What a failed step that is not the container itself printed, and how it exited.
pub(super) struct StepOutput {
    pub(super) exit_code: Option<i64>,
    pub(super) log_tail: Vec<String>,
}

impl Failure {
    pub(super) fn new(phase: Phase, step: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            phase,
            step: step.into(),
            message: message.into(),
            output: None,
        }
    }

    pub(super) fn runtime(phase: Phase, step: &'static str, e: RuntimeError) -> Self {
        Self::new(phase, step, format!("{step}: {e}"))
    }
}

/// The image's identity for `image_digest`: its repo digest, else its image ID (an
/// image built or loaded locally has no repo digest).
fn image_digest(info: &ImageInfo) -> String {
    info.digest.clone().unwrap_or_else(|| info.id.clone())
}

pub(super) struct Run {
    rep: Reporter,
    ctx: Arc<Inner>,
    /// The new container once created (for the diagnostics and the rollback; the steps
    /// take its ID as an argument).
    container: Option<String>,
    image: ImageInfo,
    ports: Vec<PublishedPort>,
    /// The state STARTING read: HEALTH_CHECK's first attempt uses it instead of asking
    /// the engine again a moment later.
    started_state: Option<ContainerState>,
    health: Vec<HealthOutcome>,
    log_lines: Option<mpsc::Receiver<String>>,
    /// A healthy container may stay quiet for ever: following stops when the run ends.
    log_follower: Option<AbortOnDropHandle<()>>,
    /// Previous-version containers stopped to free fixed host ports (see
    /// [`Run::hand_over_fixed_ports`]); a rollback starts them again.
    stopped_previous: Vec<String>,
    /// The create call while it runs (see [`Run::create`]).
    creating: Option<tokio::task::JoinHandle<Result<String, RuntimeError>>>,
    /// The engine answered the ping when the deployment was accepted; VALIDATING asks
    /// again only when the deployment waited in its app's queue.
    waited: bool,
    /// Deploys from source: the commit fetched.
    commit: String,
    /// Deploys from source: the image built (`stevedore/<app>:<commit>`).
    built: Option<String>,
    /// With a proxy: the port served at the app's stable address (see [`route`]).
    routed: Option<RoutedPort>,
}

impl Run {
    pub(super) fn new(rep: Reporter, ctx: Arc<Inner>) -> Self {
        Self {
            rep,
            ctx,
            container: None,
            image: ImageInfo::default(),
            ports: Vec::new(),
            started_state: None,
            health: Vec::new(),
            log_lines: None,
            log_follower: None,
            creating: None,
            stopped_previous: Vec::new(),
            waited: false,
            commit: String::new(),
            built: None,
            routed: None,
        }
    }

    pub(super) async fn run(mut self, mut ticket: Ticket) {
        let deployment = self.rep.deployment().clone();
        let deadline = deployment_deadline(&self);
        let cancel = deployment.cancel.clone();
        let interrupt = deployment.interrupt.clone();
        if let Err(stop) = self.wait_turn(&mut ticket, deadline).await {
            return self.end(stop).await;
        }
        let outcome = tokio::select! {
            r = self.until_switch() => r.map_err(Stop::Failed),
            _ = cancel.cancelled() => Err(Stop::Cancelled),
            _ = interrupt.cancelled() => Err(Stop::Interrupted),
            _ = tokio::time::sleep_until(deadline) => Err(Stop::DeadlineExceeded),
        };
        match outcome {
            Err(stop) => self.end(stop).await,
            Ok(id) => match self.switch_and_clean(&id).await {
                Ok(()) => self.succeed(id),
                Err(f) => self.end(Stop::Failed(f)).await,
            },
        }
        drop(ticket);
    }

    /// QUEUED: waits for the app's lock (see [`wait_turn`]).
    async fn wait_turn(&mut self, ticket: &mut Ticket, deadline: Instant) -> Result<(), Stop> {
        self.waited = wait_turn(&mut self.rep, ticket, Some(deadline)).await?;
        Ok(())
    }

    /// Every step up to the point of no return; returns the new container's ID.
    async fn until_switch(&mut self) -> Result<String, Failure> {
        self.validate().await?;
        let deployment = self.rep.deployment().clone();
        match &deployment.spec.source {
            Some(source) => self.fetch_and_build(source).await?,
            None => self.pull().await?,
        }
        let id = self.create().await?;
        self.start(&id).await?;
        self.health_check(&id).await?;
        if !self.rep.deployment().spec.hooks.is_empty() {
            self.run_hooks(&id).await?;
        }
        Ok(id)
    }

    async fn validate(&mut self) -> Result<(), Failure> {
        let endpoint = self.ctx.runtime.endpoint().to_owned();
        self.rep.enter(
            Phase::Validating,
            format!("checking the docker engine at {endpoint}"),
        );
        if self.waited {
            self.ctx
                .runtime
                .ping()
                .await
                .map_err(|e| Failure::runtime(Phase::Validating, "docker engine check", e))?;
        }
        self.rep.progress(
            1.0,
            Level::Info,
            "docker engine answers".into(),
            Extra::default(),
        );
        Ok(())
    }

    /// FETCHING and BUILDING (see [`super::source`]); the image is then local, so
    /// PULLING is skipped (its weight counted as done).
    async fn fetch_and_build(&mut self, source: &SourceSpec) -> Result<(), Failure> {
        let cache = self
            .ctx
            .config
            .sources_dir
            .join(self.rep.deployment().spec.app.as_str());
        let allow_local = self.ctx.config.allow_local_git;
        let fetched = super::source::fetch(&mut self.rep, source, &cache, allow_local).await?;
        self.commit = fetched.commit.clone();
        let runtime = self.ctx.runtime.clone();
        let outcome = super::source::build(&mut self.rep, &runtime, source, &fetched).await?;
        let tag = outcome.tag().to_owned();
        self.image = self.inspect_image(&tag).await?.ok_or_else(|| {
            Failure::new(
                Phase::Building,
                "image build",
                format!("image {tag} is not present after its build"),
            )
        })?;
        self.built = Some(tag);
        Ok(())
    }

    /// The image the container runs: the request's, or the one built from source.
    fn image_name(&self) -> String {
        self.built
            .clone()
            .unwrap_or_else(|| self.rep.deployment().spec.image.clone())
    }

    async fn pull(&mut self) -> Result<(), Failure> {
        let image = self.rep.deployment().spec.image.clone();
        self.rep
            .enter(Phase::Pulling, format!("looking for image {image}"));
        if let Some(info) = self.inspect_image(&image).await? {
            let digest = image_digest(&info);
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
            Extra::default(),
        );
        let started = Instant::now();
        let progress = self.download(&image).await?;
        if progress.image_current_bytes > 0 {
            self.rep.record_pull(super::eta::PullSample {
                bytes: progress.image_current_bytes,
                duration: started.elapsed(),
            });
        }
        let info = self.inspect_image(&image).await?.ok_or_else(|| {
            Failure::new(
                Phase::Pulling,
                "image pull",
                format!("image {image} is not present after its pull"),
            )
        })?;
        let digest = image_digest(&info);
        let what = if progress.image_total_bytes == 0 {
            // Every layer was already local (the tag was new, its layers were not).
            "every layer was present locally".to_string()
        } else {
            format!(
                "{} in {} layers",
                bytes(progress.image_total_bytes),
                progress.layers_total
            )
        };
        let message = format!("pulled {image}: {what} ({digest})");
        self.image = info;
        self.rep.progress(
            1.0,
            Level::Info,
            message,
            Extra {
                pull: Some(progress),
                ..Extra::meta([("pulled", "true".into()), ("image_digest", digest)])
            },
        );
        Ok(())
    }

    async fn inspect_image(&self, image: &str) -> Result<Option<ImageInfo>, Failure> {
        self.ctx
            .runtime
            .inspect_image(image)
            .await
            .map_err(|e| Failure::runtime(Phase::Pulling, "image inspection", e))
    }

    /// Pulls `image`, reporting its progress (throttled); returns the final progress.
    async fn download(&mut self, image: &str) -> Result<PullProgress, Failure> {
        let auth = self.rep.deployment().spec.registry_auth.clone();
        let mut tracker = PullTracker::default();
        let mut stream = self.ctx.runtime.pull(image, auth.as_ref());
        let mut last_sent: Option<Instant> = None;
        while let Some(event) = stream.next().await {
            let event = event.map_err(|e| Failure::runtime(Phase::Pulling, "image pull", e))?;
            let Some(progress) = tracker.apply(&event) else {
                continue;
            };
            if let Some(eta) = self.rep.eta_live() {
                eta.pull_remaining(tracker.bytes_remaining());
            }
            if last_sent.is_some_and(|t| t.elapsed() < PULL_UPDATE_INTERVAL) {
                continue;
            }
            last_sent = Some(Instant::now());
            let message = format!(
                "pulling {image}: {} of {} ({}/{} layers)",
                bytes(progress.image_current_bytes),
                bytes(progress.image_total_bytes),
                progress.layers_done,
                progress.layers_total,
            );
            let fraction = tracker.fraction();
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
        if let Some(eta) = self.rep.eta_live() {
            eta.pull_remaining(Some(0));
        }
        Ok(tracker.finish())
    }

    /// CREATING; returns the new container's ID.
    async fn create(&mut self) -> Result<String, Failure> {
        let deployment = self.rep.deployment().clone();
        let spec = &deployment.spec;
        let id = deployment.id.to_string();
        let name = format!("{}-{}", spec.app, &id[..8]);
        self.rep
            .enter(Phase::Creating, format!("creating container {name}"));
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_APP.into(), spec.app.to_string());
        labels.insert(LABEL_DEPLOYMENT.into(), id.clone());
        let publish_ip = self.ctx.config.publish_ip;
        // With a proxy, the fixed host port is the proxy's: the container is published
        // on a loopback port beside the previous version (see route.rs).
        self.routed =
            (self.ctx.config.proxy.as_ref()).and_then(|_| RoutedPort::of_spec(spec, publish_ip));
        labels.extend(self.routed.iter().flat_map(|r| r.labels()));
        let routed = self.routed;
        let container = ContainerSpec {
            name: name.clone(),
            image: self.image_name(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| match routed.filter(|r| r.is(p)) {
                    Some(r) => r.backend_port(p),
                    None => PortSpec {
                        host_ip: p.host_ip.or(Some(publish_ip)),
                        ..*p
                    },
                })
                .collect(),
            labels,
        };
        self.rep.on_disk().await;
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
            Extra::meta([("container_id", container_id.clone())]),
        );
        Ok(container_id)
    }

    async fn start(&mut self, id: &str) -> Result<(), Failure> {
        self.rep
            .enter(Phase::Starting, format!("starting container {}", short(id)));
        self.hand_over_fixed_ports(id).await?;
        self.ctx
            .runtime
            .start(id)
            .await
            .map_err(|e| Failure::runtime(Phase::Starting, "container start", e))?;
        let state = self.inspect(id, Phase::Starting).await?;
        self.ports = state.ports.clone();
        self.started_state = Some(state);
        // Follow the output from the start (the engine sends it from the first line,
        // so attaching after the inspection misses none): log health checks and
        // milestones read it.
        let (tx, rx) = mpsc::channel(1024);
        let mut lines = self.ctx.runtime.follow_logs(id);
        let follower = tokio::spawn(async move {
            while let Some(Ok(line)) = lines.next().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        self.log_follower = Some(AbortOnDropHandle::new(follower));
        self.log_lines = Some(rx);
        let mut extra = Extra::default();
        for (name, url) in self.endpoints() {
            extra.metadata.insert(format!("endpoint.{name}"), url);
        }
        self.rep.progress(
            1.0,
            Level::Info,
            format!("container {} is running", short(id)),
            extra,
        );
        Ok(())
    }

    /// The app's containers that `select` picks.
    async fn app_containers(
        &self,
        select: impl Fn(&ContainerSummary) -> bool,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let app = self.rep.deployment().spec.app.as_str();
        let all = self.ctx.runtime.list_app_containers(app).await?;
        Ok(all.into_iter().filter(|c| select(c)).collect())
    }

    /// A fixed host port can be bound by one container only, so the new version cannot
    /// start while the previous one holds it. Then, and only then, the previous
    /// container is stopped (not removed) right before the start: the app is briefly
    /// down, and if this deployment does not complete the rollback starts the previous
    /// container again. With host port 0 (any free port) nothing changes: the previous
    /// version serves until the switch. With a proxy the routed port is the proxy's,
    /// not the container's: the previous version holds it only if it was deployed
    /// without the proxy (then it is stopped here, once, so the proxy can bind it).
    async fn hand_over_fixed_ports(&mut self, ours: &str) -> Result<(), Failure> {
        let fixed: Vec<u16> = (self.rep.deployment().spec.ports.iter())
            .filter(|p| p.host_port != 0)
            .map(|p| p.host_port)
            .collect();
        if fixed.is_empty() {
            return Ok(());
        }
        let runtime = self.ctx.runtime.clone();
        let step = "handing the fixed host ports over";
        let running = self
            .app_containers(|c| c.id != ours && c.running)
            .await
            .map_err(|e| Failure::runtime(Phase::Starting, step, e))?;
        for old in running {
            let state = runtime
                .inspect(&old.id)
                .await
                .map_err(|e| Failure::runtime(Phase::Starting, step, e))?;
            let held: Vec<String> = (state.ports.iter())
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

    async fn inspect(&self, id: &str, phase: Phase) -> Result<ContainerState, Failure> {
        let state = self
            .ctx
            .runtime
            .inspect(id)
            .await
            .map_err(|e| Failure::runtime(phase, "container inspection", e))?;
        if state.running {
            return Ok(state);
        }
        let step = if phase == Phase::Starting {
            "container start"
        } else {
            "health check"
        };
        let code = (state.exit_code)
            .map(|c| format!(" with code {c}"))
            .unwrap_or_default();
        let oom = if state.oom_killed {
            " (killed: out of memory)"
        } else {
            ""
        };
        Err(Failure::new(
            phase,
            step,
            format!("container exited{code}{oom}"),
        ))
    }

    fn endpoints(&self) -> BTreeMap<String, String> {
        endpoints(self.ctx.runtime.public_host(), &self.ports)
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

    /// HEALTH_CHECK: probes (see [`health`]) until one passes, one cannot pass, or the
    /// timeout; output read in between moves the milestones.
    async fn health_check(&mut self, id: &str) -> Result<(), Failure> {
        let probe = self.probe();
        let spec = self.rep.deployment().spec.health.clone();
        let settle = self.ctx.config.settle_time;
        self.rep
            .enter(Phase::HealthCheck, health::describe(&probe, settle));
        let started = Instant::now();
        let timeout = if matches!(probe, HealthProbe::None) {
            spec.timeout.max(settle * 2)
        } else {
            spec.timeout
        };
        // Output lines printed during STARTING wait in the channel and are read here:
        // milestones move HEALTH_CHECK's progress, whenever their line was printed.
        let mut output = Output {
            lines: self.log_lines.take(),
            log_matched: false,
            milestones: MilestoneTracker::new(self.rep.deployment().spec.milestones.clone()),
        };
        let mut attempts = 0u32;
        let result = loop {
            attempts += 1;
            output.drain(&mut self.rep, &probe);
            let state = match self.started_state.take() {
                Some(state) => state,
                None => self.inspect(id, Phase::HealthCheck).await?,
            };
            let target = health::Target {
                state,
                ports: &self.ports,
                public_host: self.ctx.runtime.public_host(),
                http: &self.ctx.http,
                interval: spec.interval,
                log_matched: output.log_matched,
                started,
                settle,
            };
            let why = match health::probe_once(&probe, &target).await {
                Verdict::Pass(message) => break Ok(message),
                Verdict::Fail(message) => break Err(message),
                Verdict::Retry(why) => why,
            };
            let elapsed = started.elapsed();
            // Milestones that set progress replace the clock.
            let fraction = if output.milestones.drives_progress() {
                output.milestones.reached()
            } else {
                (elapsed.as_secs_f64() / timeout.as_secs_f64()).min(1.0) * 0.95
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
            // Every attempt is reported, the last one too: the count in the final
            // message is the number of attempts the client saw.
            if elapsed >= timeout {
                break Err(format!(
                    "not healthy after {:.1}s ({attempts} attempts): {why}",
                    elapsed.as_secs_f64()
                ));
            }
            let wake = Instant::now() + health::retry_delay(attempts, spec.interval);
            output.read_until(&mut self.rep, &probe, wake).await;
        };
        output.drain(&mut self.rep, &probe);
        self.log_lines = output.lines;
        self.health_verdict(&probe, attempts, result)
    }

    /// Records HEALTH_CHECK's outcome and reports it.
    fn health_verdict(
        &mut self,
        probe: &HealthProbe,
        attempts: u32,
        result: Result<String, String>,
    ) -> Result<(), Failure> {
        let (Ok(message) | Err(message)) = &result;
        self.health.push(HealthOutcome {
            check: probe.name().into(),
            healthy: result.is_ok(),
            attempts,
            message: message.clone(),
        });
        let message = result.map_err(|m| Failure::new(Phase::HealthCheck, "health check", m))?;
        self.rep.progress(
            1.0,
            Level::Info,
            format!("healthy: {message}"),
            Extra::meta([("attempt", attempts.to_string())]),
        );
        Ok(())
    }

    /// PHASE_HOOKS: each hook in turn inside the new container (see [`hooks`]).
    async fn run_hooks(&mut self, container: &str) -> Result<(), Failure> {
        let deployment = self.rep.deployment().clone();
        let hooks = &deployment.spec.hooks;
        let runtime = self.ctx.runtime.clone();
        let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
        self.rep.enter(
            Phase::Hooks,
            format!("running {} hook(s): {}", hooks.len(), names.join(", ")),
        );
        for (i, hook) in hooks.iter().enumerate() {
            hooks::run_hook(&mut self.rep, &runtime, container, hook, i, hooks.len()).await?;
        }
        Ok(())
    }

    /// SWITCHING and CLEANUP: the new container is healthy; take the old ones out.
    async fn switch_and_clean(&mut self, ours: &str) -> Result<(), Failure> {
        self.rep
            .enter(Phase::Switching, "taking the previous version out");
        // The point of no return is on disk before the previous version is touched: a
        // recovery after a crash from here on keeps this version (see recover.rs).
        self.ctx.store.flush().await;
        let (base, span) = self.switch_route().await?;
        // One list for both phases: no other deployment of this app can start before
        // this one ends (the app's queue), so what CLEANUP removes is still what this
        // list found. The previous version: running, or stopped for our fixed ports.
        let stopped = &self.stopped_previous;
        let (previous, leftovers): (Vec<_>, Vec<_>) = self
            .app_containers(|c| c.id != ours)
            .await
            .map_err(|e| Failure::runtime(Phase::Switching, "listing the app's containers", e))?
            .into_iter()
            .partition(|c| c.running || stopped.contains(&c.id));
        let total = previous.len().max(1) as f64;
        for (i, old) in previous.iter().enumerate() {
            let at = base + span * i as f64 / total;
            self.stop_previous(old, at, span / total).await;
            self.ctx.runtime.remove(&old.id).await.map_err(|e| {
                Failure::runtime(Phase::Switching, "removing the previous container", e)
            })?;
            self.rep.progress(
                base + span * (i + 1) as f64 / total,
                Level::Info,
                format!(
                    "removed previous container {} (deployment {})",
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
        self.clean_up(ours, leftovers).await
    }

    /// With a proxy: points the app's route at the new container, then waits for the
    /// connections open to the previous version to drain (see [`route`]). Returns the
    /// part of the phase left for stopping the previous version.
    async fn switch_route(&mut self) -> Result<(f64, f64), Failure> {
        let (Some(routed), Some(proxy)) = (self.routed, self.ctx.config.proxy.clone()) else {
            return Ok((0.0, 1.0));
        };
        let backend = routed.backend(&self.ports).ok_or_else(|| {
            let port = routed.container_port;
            let message = format!("port {port}/tcp of the new container is not published");
            Failure::new(Phase::Switching, "switching the route", message)
        })?;
        let version = self.image_name();
        if let Some(old) = route::switch(&mut self.rep, &proxy, routed, backend, &version).await? {
            route::drain(&mut self.rep, &proxy, old, (0.1, 0.4)).await;
        }
        Ok((0.5, 0.5))
    }

    /// Stops a previous version under the stop policy (see [`stop_gracefully`]).
    async fn stop_previous(&mut self, old: &ContainerSummary, base: f64, span: f64) {
        let runtime = self.ctx.runtime.clone();
        let grace = self.rep.deployment().spec.stop_timeout;
        let what = "previous container";
        stop_gracefully(&mut self.rep, &*runtime, grace, old, what, (base, span)).await;
    }

    /// CLEANUP: `leftovers`, the stopped containers of earlier deployments that
    /// SWITCHING listed, go.
    async fn clean_up(
        &mut self,
        ours: &str,
        leftovers: Vec<ContainerSummary>,
    ) -> Result<(), Failure> {
        self.rep
            .enter(Phase::Cleanup, "removing leftovers of earlier deployments");
        remove_each(&*self.ctx.runtime, &leftovers, |old, r| {
            if let Err(e) = r {
                tracing::warn!(container = %old.id, error = %e, "could not remove leftover container");
            }
            Ok::<_, Failure>(())
        })
        .await?;
        self.inspect(ours, Phase::Cleanup).await?;
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

    fn succeed(mut self, container_id: String) {
        // With a proxy, the routed port's endpoint is the app's stable address.
        let endpoints = match self.routed {
            Some(r) => endpoints(self.ctx.runtime.public_host(), &r.public_ports(&self.ports)),
            None => self.endpoints(),
        };
        let spec = &self.rep.deployment().spec;
        let mut message = format!(
            "deployed {} as app {} in container {}",
            self.image_name(),
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
            image_digest: image_digest(&self.image),
            endpoints,
            health: std::mem::take(&mut self.health),
            diagnostics: None,
            commit: self.commit.clone(),
            containers_removed: 0,
        };
        self.rep.finish(DeploymentState::Succeeded, result);
    }

    /// Rolls back what this deployment created and sends the terminal update.
    async fn end(mut self, stop: Stop) {
        let (state, mut message, mut diagnostics) = self.outcome(stop).await;
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
            // Only an app that had a running version keeps one (not on its first deployment).
            let previous = self.app_containers(|c| c.running).await;
            if previous.is_ok_and(|p| !p.is_empty()) {
                message.push_str(
                    "; the new container was removed and the previous version keeps running",
                );
            } else {
                message.push_str("; the new container was removed");
            }
        }
        let result = DeploymentResult {
            success: false,
            message,
            container_id: String::new(),
            image_digest: image_digest(&self.image),
            endpoints: BTreeMap::new(),
            health: std::mem::take(&mut self.health),
            diagnostics,
            commit: self.commit.clone(),
            containers_removed: 0,
        };
        self.rep.finish(state, result);
    }

    /// The end state, message and diagnostics of a run stopped by `stop` (before the
    /// rollback).
    async fn outcome(
        &mut self,
        stop: Stop,
    ) -> (DeploymentState, String, Option<FailureDiagnostics>) {
        let phase = self.rep.phase();
        let mut diagnostics = FailureDiagnostics {
            failed_phase: Some(phase),
            ..Default::default()
        };
        match stop {
            Stop::Failed(f) => {
                diagnostics.failed_phase = Some(f.phase);
                diagnostics.step = f.step;
                match f.output {
                    Some(out) => {
                        diagnostics.exit_code = out.exit_code;
                        diagnostics.log_tail = out.log_tail;
                    }
                    None => self.collect_diagnostics(&mut diagnostics).await,
                }
                (DeploymentState::Failed, f.message, Some(diagnostics))
            }
            Stop::Cancelled => {
                self.rep.cancelling(format!(
                    "cancel requested during {}: removing what this deployment created",
                    phase.name()
                ));
                let message = format!("cancelled during {}", phase.name());
                (DeploymentState::Cancelled, message, None)
            }
            Stop::Interrupted => {
                diagnostics.step = "server shutdown".into();
                let message = format!(
                    "interrupted by server shutdown during {}: the server stopped before the deployment could finish",
                    phase.name()
                );
                (DeploymentState::Failed, message, Some(diagnostics))
            }
            Stop::DeadlineExceeded => {
                diagnostics.step = "deadline".into();
                self.collect_diagnostics(&mut diagnostics).await;
                let message = format!(
                    "deadline of {}s exceeded during {}",
                    self.rep.deployment().spec.deadline.as_secs_f64(),
                    phase.name()
                );
                (DeploymentState::Failed, message, Some(diagnostics))
            }
        }
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
    /// create call was interrupted (awaited here), and any carrying its label; then
    /// starts the previous version again if it was stopped for the fixed host ports.
    async fn roll_back(&mut self) -> Result<(), RuntimeError> {
        let mut ids: Vec<String> = self.container.iter().cloned().collect();
        ids.extend(self.settle_create().await);
        let id = self.rep.deployment().id.to_string();
        match self.app_containers(|c| c.deployment == id).await {
            Ok(list) => ids.extend(list.into_iter().map(|c| c.id)),
            Err(e) if ids.is_empty() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "could not list containers for rollback"),
        }
        ids.sort();
        ids.dedup();
        remove_each(&*self.ctx.runtime, &ids, |cid, r| {
            r?;
            tracing::info!(container = %cid, "rolled back container");
            Ok(())
        })
        .await?;
        self.give_ports_back().await
    }

    /// The container of a create call interrupted mid-way, once the call has ended.
    async fn settle_create(&mut self) -> Option<String> {
        let creating = self.creating.take()?;
        match tokio::time::timeout(CREATE_SETTLE_TIMEOUT, creating).await {
            Ok(Ok(Ok(id))) => return Some(id),
            Ok(Ok(Err(_))) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "interrupted create call failed"),
            Err(_) => tracing::warn!("interrupted create call still running; relying on labels"),
        }
        None
    }

    /// Gives the fixed host ports back to the previous version.
    async fn give_ports_back(&self) -> Result<(), RuntimeError> {
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

/// Stops a container under the stop policy: its stop signal, then up to the grace
/// (`grace`: the request's `stop_timeout`, else the container's StopTimeout, else
/// [`DEFAULT_STOP_TIMEOUT`]), reported about each second over `[base, base + span]` of
/// the phase, then killed. `what` names it in messages ("previous container"). How it
/// exits does not fail the deployment or the removal.
pub(super) async fn stop_gracefully(
    rep: &mut Reporter,
    runtime: &dyn crate::runtime::Runtime,
    grace: Option<Duration>,
    old: &ContainerSummary,
    what: &str,
    (base, span): (f64, f64),
) {
    let Ok(state) = runtime.inspect(&old.id).await else {
        return; // Gone already, or the removal reports the engine's trouble.
    };
    if !state.running {
        return;
    }
    let grace = grace.or(state.stop_timeout).unwrap_or(DEFAULT_STOP_TIMEOUT);
    let signal = state
        .stop_signal
        .clone()
        .unwrap_or_else(|| "SIGTERM".into());
    let name = short(&old.id).to_owned();
    let secs = grace.as_secs_f64();
    rep.progress(
        base,
        Level::Info,
        format!("sent {signal} to {what} {name}; waiting up to {secs}s for it to stop"),
        Extra::meta([
            ("stop_signal", signal.clone()),
            ("stop_timeout_ms", grace.as_millis().to_string()),
            ("stopping_container_id", old.id.clone()),
        ]),
    );
    let started = Instant::now();
    let stop = runtime.stop_with(&old.id, Some(&signal), grace);
    tokio::pin!(stop);
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            r = &mut stop => break r,
            _ = tick.tick() => {
                let waited = started.elapsed().as_secs_f64();
                rep.progress(
                    base + span * 0.9 * (waited / secs.max(0.001)).min(1.0),
                    Level::Info,
                    format!("waiting for {what} {name} to stop: {:.0}s of its {secs}s grace", waited.floor()),
                    Extra::meta([("waited_seconds", format!("{:.0}", waited.floor()))]),
                );
            }
        }
    };
    let waited = started.elapsed();
    let exit = runtime
        .inspect(&old.id)
        .await
        .ok()
        .and_then(|s| s.exit_code);
    let (level, message, outcome) = stop_outcome(result, exit, &signal, waited, grace, what, &name);
    rep.progress(
        base + span * 0.9,
        level,
        message,
        Extra::meta([("stop_outcome", outcome.into())]),
    );
}

/// How a container's stop ended (`what`: "previous container", "container"): the update's level and message, and the
/// `stop_outcome` (`killed` when the grace ran out and the engine sent SIGKILL).
fn stop_outcome(
    result: Result<(), impl std::fmt::Display>,
    exit: Option<i64>,
    signal: &str,
    waited: Duration,
    grace: Duration,
    what: &str,
    name: &str,
) -> (Level, String, &'static str) {
    let secs = grace.as_secs_f64();
    let code = exit
        .map(|c| format!(" (exit code {c})"))
        .unwrap_or_default();
    let killed = exit == Some(137)
        && signal != "SIGKILL"
        && signal != "KILL"
        && waited >= grace.mul_f64(0.9);
    let (level, message) = match result {
        Err(e) => (
            Level::Warning,
            format!("stopping {what} {name} failed: {e}; removing it by force"),
        ),
        Ok(()) if killed => (
            Level::Warning,
            format!("{what} {name} did not stop within its {secs}s grace: killed (SIGKILL){code}"),
        ),
        Ok(()) => (
            Level::Info,
            format!(
                "{what} {name} stopped after {:.1}s{code}",
                waited.as_secs_f64()
            ),
        ),
    };
    (level, message, if killed { "killed" } else { "stopped" })
}

/// The deadline counts from acceptance, queue wait included.
fn deployment_deadline(run: &Run) -> Instant {
    deadline_of(run.rep.deployment())
}

/// When `deployment`'s deadline passes (from acceptance, queue wait included).
pub(super) fn deadline_of(deployment: &super::deployment::Deployment) -> Instant {
    Instant::from_std(deployment.accepted) + deployment.spec.deadline
}

/// Sleeps until `deadline`; with none, for ever.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// QUEUED: waits for the app's lock, until `deadline` if there is one. (The first
/// position went out when the deployment was accepted; each change goes out here.)
/// Returns whether it waited.
pub(super) async fn wait_turn(
    rep: &mut Reporter,
    ticket: &mut Ticket,
    deadline: Option<Instant>,
) -> Result<bool, Stop> {
    let deployment = rep.deployment().clone();
    let mut position = ticket.position();
    let waited = position > 0;
    while position > 0 {
        tokio::select! {
            p = ticket.changed() => {
                position = p;
                if p > 0 {
                    rep.queued(p, ticket.ahead());
                }
            }
            _ = deployment.cancel.cancelled() => return Err(Stop::Cancelled),
            _ = deployment.interrupt.cancelled() => return Err(Stop::Interrupted),
            _ = until(deadline) => return Err(Stop::DeadlineExceeded),
        }
    }
    Ok(waited)
}

/// The result's endpoints: `"8080/tcp"` → `http://host:port`.
pub(super) fn endpoints(host: &str, ports: &[PublishedPort]) -> BTreeMap<String, String> {
    ports
        .iter()
        .map(|p| {
            let scheme = match p.protocol {
                Protocol::Tcp => "http",
                Protocol::Udp => "udp",
            };
            (
                format!("{}/{}", p.container_port, p.protocol.as_str()),
                format!("{scheme}://{}:{}", p.reach_host(host), p.host_port),
            )
        })
        .collect()
}

/// A container ID as Docker shows it (12 characters).
pub(super) fn short(id: &str) -> &str {
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
