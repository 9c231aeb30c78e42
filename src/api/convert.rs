//! Proto ⇄ domain conversions. Requests are validated here, at the edge: a bad field
//! becomes `INVALID_ARGUMENT` naming it, before anything starts.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use regex::Regex;
use tonic::Status;

use crate::model::{
    self, AppName, DeploySpec, HealthProbe, HealthSpec, HookSpec, MilestoneSpec, PortSpec,
    Protocol, RESERVED_LABEL_PREFIX, RegistryAuth,
};
use crate::proto;

pub(crate) const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
pub(crate) const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);
pub(crate) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(500);
pub(crate) const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_ENV_BYTES: usize = 128 * 1024;

/// A Docker reference: optional registry host[:port], path components, then an
/// optional `:tag` and/or `@algo:hex` digest. As in Docker, a first component is a
/// registry host only when it has a `.` or a `:port`, or is `localhost`; otherwise it
/// is a path component and must be lowercase.
static IMAGE_REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?:(?:(?:localhost|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)+|\[[0-9a-fA-F:]+\])(?::[0-9]+)?|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?:[0-9]+)/)?",
        r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
        r"(?::[\w][\w.-]{0,127})?",
        r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
    ))
    .expect("valid regex")
});

fn invalid(field: impl std::fmt::Display, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// The longest stop grace a request may ask for.
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound of `drain_timeout`.
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

fn duration(
    field: &str,
    d: Option<&pbjson_types::Duration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, Status> {
    let Some(d) = d else {
        return Ok(default);
    };
    let d = Duration::try_from(*d).map_err(|_| invalid(field, "must not be negative"))?;
    if d.is_zero() {
        return Ok(default);
    }
    if d < min || d > max {
        return Err(invalid(
            field,
            format!(
                "{}s is out of range ({}s to {}s)",
                d.as_secs_f64(),
                min.as_secs_f64(),
                max.as_secs_f64()
            ),
        ));
    }
    Ok(d)
}

fn port(field: String, value: u32, allow_zero: bool) -> Result<u16, Status> {
    match u16::try_from(value) {
        Ok(0) if !allow_zero => Err(invalid(field, "must be between 1 and 65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(invalid(
            field,
            format!("{value} is not a port (0 to 65535)"),
        )),
    }
}

fn regex(field: String, pattern: &str) -> Result<Regex, Status> {
    if pattern.is_empty() {
        return Err(invalid(field, "empty pattern"));
    }
    Regex::new(pattern).map_err(|e| invalid(field, format!("invalid regex: {e}")))
}

/// Validates `DeployRequest.source`. Messages never echo the URL's credential.
fn source(src: &proto::GitSource) -> Result<model::SourceSpec, Status> {
    use crate::source::git;
    let url = src.url.trim();
    if url.is_empty() {
        return Err(invalid("source.url", "empty URL"));
    }
    git::validate_url(url).map_err(|e| invalid("source.url", git::redact_url(&e.to_string())))?;
    let reference = match src.r#ref.trim() {
        "" => None,
        r => {
            git::validate_reference(r).map_err(|e| invalid("source.ref", e))?;
            Some(r.to_owned())
        }
    };
    let dockerfile = match src.dockerfile.trim() {
        "" => "Dockerfile".to_owned(),
        d => relative("source.dockerfile", d)?,
    };
    let context_dir = match src.context_dir.trim().trim_end_matches('/') {
        "" | "." => String::new(),
        d => relative("source.context_dir", d)?,
    };
    for k in src.build_args.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(
                format!("source.build_args[{k:?}]"),
                "a build arg name must be non-empty, without '=' or NUL",
            ));
        }
    }
    Ok(model::SourceSpec {
        url: url.to_owned(),
        reference,
        dockerfile,
        context_dir,
        build_args: src.build_args.clone().into_iter().collect(),
    })
}

/// A path inside the repository: relative, without `..`.
fn relative(field: &str, path: &str) -> Result<String, Status> {
    let p = std::path::Path::new(path);
    let inside = p.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if !inside || path.contains('\0') {
        return Err(invalid(
            field,
            format!("{path:?} must be a relative path inside the repository"),
        ));
    }
    Ok(path.to_owned())
}

/// Validates a DeployRequest into a [`DeploySpec`]. `requested_by` names the caller.
/// The fields are checked in this order; the first bad one is the answer.
pub(crate) fn deploy_spec(
    req: proto::DeployRequest,
    requested_by: String,
) -> Result<DeploySpec, Status> {
    let app = AppName::parse(&req.app).map_err(|e| invalid("app", e))?;
    let (image, source) = image_or_source(req.image.trim(), req.source.as_ref())?;
    let ports = ports(&req.ports)?;
    check_env(&req.env)?;
    check_labels(&req.labels)?;
    let health = health(req.health_check.as_ref(), &ports)?;
    let deadline = duration(
        "deadline",
        req.deadline.as_ref(),
        DEFAULT_DEADLINE,
        Duration::from_secs(1),
        MAX_DEADLINE,
    )?;
    let milestones = milestones(&req.milestones)?;
    let hooks = hooks(&req.hooks)?;
    let stop_timeout = stop_timeout(req.stop_timeout.as_ref())?;
    let idempotency_key = idempotency_key(&req.idempotency_key)?;
    Ok(DeploySpec {
        app,
        image,
        source,
        command: req.command,
        env: req.env.into_iter().collect(),
        ports,
        labels: req.labels.into_iter().collect(),
        health,
        deadline,
        idempotency_key,
        registry_auth: req.registry_auth.map(|a| RegistryAuth {
            username: a.username,
            password: a.password,
            identity_token: a.identity_token,
        }),
        milestones,
        hooks,
        stop_timeout,
        drain_timeout: duration(
            "drain_timeout",
            req.drain_timeout.as_ref(),
            crate::model::DEFAULT_DRAIN_TIMEOUT,
            Duration::from_millis(1),
            MAX_DRAIN_TIMEOUT,
        )?,
        requested_by,
        replicas: replicas(req.replicas)?,
        update: update_policy(req.update_policy.as_ref())?,
    })
}

/// Most tasks one deployment may ask for.
pub(crate) const MAX_REPLICAS: u32 = 100;
/// Longest update monitor a request may set.
const MAX_MONITOR: Duration = Duration::from_secs(600);

fn replicas(n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(1),
        n if n > MAX_REPLICAS => Err(invalid(
            "replicas",
            format!("{n} is more than the {MAX_REPLICAS} tasks a deployment may ask for"),
        )),
        n => Ok(n),
    }
}

fn update_policy(p: Option<&proto::UpdatePolicy>) -> Result<model::UpdatePolicy, Status> {
    let Some(p) = p else {
        return Ok(model::UpdatePolicy::default());
    };
    let order = match p.order.trim() {
        "" | "stop-first" => model::UpdateOrder::StopFirst,
        "start-first" => model::UpdateOrder::StartFirst,
        other => {
            return Err(invalid(
                "update_policy.order",
                format!("{other:?}: use \"stop-first\" or \"start-first\""),
            ));
        }
    };
    let monitor = match p.monitor.as_ref() {
        None => None,
        Some(d) => Some(duration(
            "update_policy.monitor",
            Some(d),
            Duration::ZERO,
            Duration::from_millis(1),
            MAX_MONITOR,
        )?),
    };
    let ratio = p.max_failure_ratio;
    if !(0.0..=1.0).contains(&ratio) || ratio.is_nan() {
        return Err(invalid(
            "update_policy.max_failure_ratio",
            format!("{ratio} is not between 0 and 1"),
        ));
    }
    Ok(model::UpdatePolicy {
        parallelism: p.parallelism.max(1),
        order,
        monitor,
        max_failure_ratio: ratio,
    })
}

/// The image to run: `image` as given, or the one built from `source` (named by
/// [`model::SourceSpec::describe`]). Exactly one of them.
fn image_or_source(
    image: &str,
    source: Option<&proto::GitSource>,
) -> Result<(String, Option<model::SourceSpec>), Status> {
    match (image, source) {
        ("", None) => Err(invalid(
            "image",
            "empty reference (give an image or a source)",
        )),
        ("", Some(src)) => {
            let source = self::source(src)?;
            Ok((source.describe(), Some(source)))
        }
        (_, Some(_)) => Err(invalid(
            "source",
            "give either an image or a source, not both",
        )),
        (image, None) => {
            if !IMAGE_REFERENCE.is_match(image) || image.len() > 512 {
                return Err(invalid(
                    "image",
                    format!("{image:?} is not a valid image reference (name[:tag][@digest])"),
                ));
            }
            Ok((image.to_owned(), None))
        }
    }
}

/// The published ports: each container port (per protocol) and each host port other
/// than 0 at most once.
fn ports(mappings: &[proto::PortMapping]) -> Result<Vec<PortSpec>, Status> {
    let mut ports = Vec::with_capacity(mappings.len());
    for (i, p) in mappings.iter().enumerate() {
        let (container_port, host_port, protocol) = port_numbers(i, p)?;
        if ports
            .iter()
            .any(|q: &PortSpec| q.container_port == container_port && q.protocol == protocol)
        {
            return Err(invalid(
                format!("ports[{i}]"),
                format!(
                    "container port {container_port}/{} is listed twice",
                    protocol.as_str()
                ),
            ));
        }
        if host_port != 0
            && ports
                .iter()
                .any(|q: &PortSpec| q.host_port == host_port && q.protocol == protocol)
        {
            return Err(invalid(
                format!("ports[{i}].host_port"),
                format!("host port {host_port} is used twice"),
            ));
        }
        ports.push(PortSpec {
            container_port,
            host_port,
            protocol,
            host_ip: host_ip(i, &p.host_ip)?,
        });
    }
    Ok(ports)
}

/// `ports[i]`'s container port, host port and protocol, each on its own.
fn port_numbers(i: usize, p: &proto::PortMapping) -> Result<(u16, u16, Protocol), Status> {
    let container_port = port(
        format!("ports[{i}].container_port"),
        p.container_port,
        false,
    )?;
    let host_port = port(format!("ports[{i}].host_port"), p.host_port, true)?;
    let protocol = match p.protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return Err(invalid(
                format!("ports[{i}].protocol"),
                format!("{other:?} is not \"tcp\" or \"udp\""),
            ));
        }
    };
    Ok((container_port, host_port, protocol))
}

/// `ports[i].host_ip`: empty (the server's default) or an IP address.
fn host_ip(i: usize, ip: &str) -> Result<Option<std::net::IpAddr>, Status> {
    match ip.trim() {
        "" => Ok(None),
        ip => ip.parse().map(Some).map_err(|_| {
            invalid(
                format!("ports[{i}].host_ip"),
                format!("{ip:?} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)"),
            )
        }),
    }
}

/// Names non-empty, without `=` or NUL; values without NUL; at most
/// [`MAX_ENV_BYTES`] in all.
fn check_env(env: &HashMap<String, String>) -> Result<(), Status> {
    let mut env_bytes = 0;
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(
                format!("env[{k:?}]"),
                "a variable name must be non-empty, without '=' or NUL",
            ));
        }
        if v.contains('\0') {
            return Err(invalid(format!("env[{k:?}]"), "value contains NUL"));
        }
        env_bytes += k.len() + v.len() + 2;
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(
            "env",
            format!("{env_bytes} bytes in total; at most {MAX_ENV_BYTES} are allowed"),
        ));
    }
    Ok(())
}

/// Keys non-empty and outside [`RESERVED_LABEL_PREFIX`].
fn check_labels(labels: &HashMap<String, String>) -> Result<(), Status> {
    for k in labels.keys() {
        if k.is_empty() {
            return Err(invalid("labels", "empty label key"));
        }
        if k.starts_with(RESERVED_LABEL_PREFIX) {
            return Err(invalid(
                format!("labels[{k:?}]"),
                format!("keys under {RESERVED_LABEL_PREFIX} are reserved for Stevedore"),
            ));
        }
    }
    Ok(())
}

fn milestones(milestones: &[proto::Milestone]) -> Result<Vec<MilestoneSpec>, Status> {
    let mut specs = Vec::with_capacity(milestones.len());
    for (i, m) in milestones.iter().enumerate() {
        let pattern = regex(format!("milestones[{i}].pattern"), &m.pattern)?;
        if m.progress.is_nan() || m.progress > 1.0 {
            return Err(invalid(
                format!("milestones[{i}].progress"),
                "must be at most 1.0 (negative: count matches)",
            ));
        }
        specs.push(MilestoneSpec {
            pattern,
            progress: m.progress,
            description: if m.description.is_empty() {
                m.pattern.clone()
            } else {
                m.description.clone()
            },
        });
    }
    Ok(specs)
}

fn hooks(hooks: &[proto::Hook]) -> Result<Vec<HookSpec>, Status> {
    let mut specs = Vec::with_capacity(hooks.len());
    for (i, h) in hooks.iter().enumerate() {
        if h.command.is_empty() || h.command[0].is_empty() {
            return Err(invalid(format!("hooks[{i}].command"), "empty command"));
        }
        specs.push(HookSpec {
            name: if h.name.is_empty() {
                format!("hook-{}", i + 1)
            } else {
                h.name.clone()
            },
            command: h.command.clone(),
            tty: h.tty,
            timeout: duration(
                &format!("hooks[{i}].timeout"),
                h.timeout.as_ref(),
                DEFAULT_HOOK_TIMEOUT,
                Duration::from_millis(100),
                MAX_DEADLINE,
            )?,
        });
    }
    Ok(specs)
}

/// `None` (and 0) keep the engine's default.
fn stop_timeout(d: Option<&pbjson_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) => Ok(Some(duration(
            "stop_timeout",
            Some(d),
            Duration::ZERO,
            Duration::from_millis(1),
            MAX_STOP_TIMEOUT,
        )?)
        .filter(|d| !d.is_zero())),
    }
}

fn idempotency_key(key: &str) -> Result<Option<String>, Status> {
    match key {
        "" => Ok(None),
        k if k.len() > 256 => Err(invalid("idempotency_key", "longer than 256 bytes")),
        k => Ok(Some(k.to_owned())),
    }
}

/// A RemoveAppRequest: the app, and the stop grace (`None`: each container's own).
pub(crate) fn removal(
    req: &proto::RemoveAppRequest,
) -> Result<(AppName, Option<Duration>), Status> {
    let app = AppName::parse(&req.app).map_err(|e| invalid("app", e))?;
    let grace = req.stop_timeout.as_ref().map(|d| {
        let (zero, min) = (Duration::ZERO, Duration::from_millis(1));
        duration("stop_timeout", Some(d), zero, min, MAX_STOP_TIMEOUT)
    });
    Ok((app, grace.transpose()?.filter(|d| !d.is_zero())))
}

fn health(h: Option<&proto::HealthCheck>, ports: &[PortSpec]) -> Result<HealthSpec, Status> {
    let timeout = duration(
        "health_check.timeout",
        h.and_then(|h| h.timeout.as_ref()),
        DEFAULT_HEALTH_TIMEOUT,
        Duration::from_millis(100),
        Duration::from_secs(3600),
    )?;
    let interval = duration(
        "health_check.interval",
        h.and_then(|h| h.interval.as_ref()),
        DEFAULT_HEALTH_INTERVAL,
        Duration::from_millis(50),
        Duration::from_secs(300),
    )?;
    let published = |field: &str, p: u32| -> Result<u16, Status> {
        let p = port(field.to_owned(), p, false)?;
        if ports
            .iter()
            .any(|q| q.container_port == p && q.protocol == Protocol::Tcp)
        {
            Ok(p)
        } else {
            Err(invalid(
                field,
                format!("container port {p}/tcp must be published in ports to be probed"),
            ))
        }
    };
    use proto::health_check::Check;
    let probe = match h.and_then(|h| h.check.as_ref()) {
        None => None,
        Some(Check::Docker(_)) => Some(HealthProbe::Docker),
        Some(Check::None(_)) => Some(HealthProbe::None),
        Some(Check::Tcp(t)) => Some(HealthProbe::Tcp {
            port: published("health_check.tcp.port", t.port)?,
        }),
        Some(Check::Http(t)) => {
            let path = if t.path.is_empty() {
                "/".to_owned()
            } else if t.path.starts_with('/') {
                t.path.clone()
            } else {
                return Err(invalid("health_check.http.path", "must start with '/'"));
            };
            let expect_status = match t.expect_status {
                0 => 200,
                s @ 100..=599 => s as u16,
                s => {
                    return Err(invalid(
                        "health_check.http.expect_status",
                        format!("{s} is not an HTTP status"),
                    ));
                }
            };
            Some(HealthProbe::Http {
                port: published("health_check.http.port", t.port)?,
                path,
                expect_status,
            })
        }
        Some(Check::Log(l)) => Some(HealthProbe::Log {
            pattern: regex("health_check.log.pattern".into(), &l.pattern)?,
        }),
    };
    Ok(HealthSpec {
        probe,
        timeout,
        interval,
    })
}

pub(crate) fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let prost_types::Timestamp { seconds, nanos } = t.into();
    pbjson_types::Timestamp { seconds, nanos }
}

fn proto_duration(d: Duration) -> pbjson_types::Duration {
    let prost_types::Duration { seconds, nanos } = d.try_into().unwrap_or_default();
    pbjson_types::Duration { seconds, nanos }
}

pub(crate) fn phase(p: model::Phase) -> proto::Phase {
    use model::Phase as P;
    match p {
        P::Queued => proto::Phase::Queued,
        P::Validating => proto::Phase::Validating,
        P::Fetching => proto::Phase::Fetching,
        P::Building => proto::Phase::Building,
        P::Pulling => proto::Phase::Pulling,
        P::Creating => proto::Phase::Creating,
        P::Starting => proto::Phase::Starting,
        P::HealthCheck => proto::Phase::HealthCheck,
        P::Hooks => proto::Phase::Hooks,
        P::Switching => proto::Phase::Switching,
        P::Cleanup => proto::Phase::Cleanup,
        P::Complete => proto::Phase::Complete,
        P::Failed => proto::Phase::Failed,
        P::Cancelled => proto::Phase::Cancelled,
    }
}

fn level(l: model::Level) -> proto::Level {
    match l {
        model::Level::Info => proto::Level::Info,
        model::Level::Verbose => proto::Level::Verbose,
        model::Level::Warning => proto::Level::Warning,
        model::Level::Error => proto::Level::Error,
        model::Level::Success => proto::Level::Success,
    }
}

pub(crate) fn state(s: model::DeploymentState) -> proto::DeploymentState {
    use model::DeploymentState as S;
    match s {
        S::Pending => proto::DeploymentState::Pending,
        S::Running => proto::DeploymentState::Running,
        S::Succeeded => proto::DeploymentState::Succeeded,
        S::Failed => proto::DeploymentState::Failed,
        S::Cancelled => proto::DeploymentState::Cancelled,
    }
}

/// The filter value of ListDeployments (`UNSPECIFIED`: any state).
pub(crate) fn state_filter(s: i32) -> Result<Option<model::DeploymentState>, Status> {
    use model::DeploymentState as S;
    match proto::DeploymentState::try_from(s) {
        Ok(proto::DeploymentState::Unspecified) => Ok(None),
        Ok(proto::DeploymentState::Pending) => Ok(Some(S::Pending)),
        Ok(proto::DeploymentState::Running) => Ok(Some(S::Running)),
        Ok(proto::DeploymentState::Succeeded) => Ok(Some(S::Succeeded)),
        Ok(proto::DeploymentState::Failed) => Ok(Some(S::Failed)),
        Ok(proto::DeploymentState::Cancelled) => Ok(Some(S::Cancelled)),
        Err(_) => Err(invalid("state", format!("{s} is not a deployment state"))),
    }
}

fn result(r: &model::DeploymentResult) -> proto::DeploymentResult {
    proto::DeploymentResult {
        success: r.success,
        message: r.message.clone(),
        container_id: r.container_id.clone(),
        image_digest: r.image_digest.clone(),
        endpoints: r.endpoints.clone().into_iter().collect(),
        health: r
            .health
            .iter()
            .map(|h| proto::HealthResult {
                check: h.check.clone(),
                healthy: h.healthy,
                attempts: h.attempts,
                message: h.message.clone(),
            })
            .collect(),
        diagnostics: r.diagnostics.as_ref().map(|d| proto::FailureDiagnostics {
            failed_phase: d.failed_phase.map_or(0, |p| phase(p) as i32),
            step: d.step.clone(),
            exit_code: d.exit_code,
            oom_killed: d.oom_killed,
            log_tail: d.log_tail.clone(),
        }),
        commit: r.commit.clone(),
        containers_removed: r.containers_removed,
    }
}

pub(crate) fn update(u: &model::Update) -> proto::ProgressUpdate {
    proto::ProgressUpdate {
        deployment_id: u.deployment_id.to_string(),
        operation: operation(u.operation) as i32,
        sequence: u.sequence,
        app: u.app.to_string(),
        phase: phase(u.phase) as i32,
        phase_progress: u.phase_progress,
        total_progress: u.total_progress,
        level: level(u.level) as i32,
        message: u.message.clone(),
        timestamp: Some(timestamp(u.timestamp)),
        elapsed: Some(proto_duration(u.elapsed)),
        metadata: u
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pull: u.pull.as_ref().map(|p| proto::PullProgress {
            layer_id: p.layer_id.clone(),
            current_bytes: p.current_bytes,
            total_bytes: p.total_bytes,
            image_current_bytes: p.image_current_bytes,
            image_total_bytes: p.image_total_bytes,
            layers_total: p.layers_total,
            layers_done: p.layers_done,
        }),
        result: u.result.as_ref().map(result),
        heartbeat: false,
        eta: u.eta.as_ref().map(eta),
    }
}

fn eta(e: &crate::engine::eta::Eta) -> proto::Eta {
    proto::Eta {
        remaining: Some(proto_duration(e.remaining)),
        low: Some(proto_duration(e.low)),
        high: Some(proto_duration(e.high)),
        samples: e.samples,
        basis: e.basis.clone(),
        overdue: e.overdue,
    }
}

fn operation(o: model::Operation) -> proto::Operation {
    match o {
        model::Operation::Deploy => proto::Operation::Deploy,
        model::Operation::RemoveApp => proto::Operation::RemoveApp,
    }
}

pub(crate) fn status(s: &model::DeploymentStatus) -> proto::DeploymentStatus {
    proto::DeploymentStatus {
        deployment_id: s.id.to_string(),
        operation: operation(s.operation) as i32,
        app: s.app.to_string(),
        image: s.image.clone(),
        state: state(s.state) as i32,
        phase: phase(s.phase) as i32,
        phase_progress: s.phase_progress,
        total_progress: s.total_progress,
        created_at: Some(timestamp(s.created_at)),
        started_at: s.started_at.map(timestamp),
        finished_at: s.finished_at.map(timestamp),
        error: s.error.clone(),
        result: s.result.as_ref().map(result),
        last_sequence: s.last_sequence,
        requested_by: s.requested_by.clone(),
        queue_position: s.queue_position,
        superseded_by: s.superseded_by.map(|id| id.to_string()).unwrap_or_default(),
        commit: s.commit.clone(),
        eta: s.eta.as_ref().map(eta),
        target: s.target.as_str().into(),
        replicas: s.replicas,
    }
}

/// An app of ListApps: what runs now (from its newest successful deployment) and its
/// newest deployment.
pub(crate) fn app(a: &crate::engine::AppView) -> proto::App {
    proto::App {
        app: a.app.to_string(),
        current: a.current.as_ref().map(|c| {
            let r = c.result.as_ref().map(result).unwrap_or_default();
            proto::RunningVersion {
                deployment_id: c.id.to_string(),
                image: c.image.clone(),
                image_digest: r.image_digest,
                container_id: r.container_id,
                endpoints: r.endpoints,
                since: c.finished_at.map(timestamp),
                health: r.health,
                target: c.target.as_str().into(),
                replicas: c.replicas,
            }
        }),
        latest: Some(status(&a.latest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> proto::DeployRequest {
        proto::DeployRequest {
            app: "web".into(),
            image: "127.0.0.1:5000/stevedore-test/web:1".into(),
            ports: vec![proto::PortMapping {
                host_ip: String::new(),
                container_port: 8080,
                host_port: 0,
                protocol: String::new(),
            }],
            ..Default::default()
        }
    }

    fn error_of(req: proto::DeployRequest) -> String {
        let e = deploy_spec(req, "test".into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        e.message().to_owned()
    }

    fn git(url: &str) -> proto::GitSource {
        proto::GitSource {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn exactly_one_of_image_and_source() {
        let both = proto::DeployRequest {
            source: Some(git("https://example.invalid/r.git")),
            ..request()
        };
        assert!(error_of(both).starts_with("source:"));
        let neither = proto::DeployRequest {
            image: String::new(),
            ..request()
        };
        assert!(error_of(neither).starts_with("image:"));
    }

    #[test]
    fn a_source_is_validated_and_its_credential_never_echoed() {
        let from_source = |src: proto::GitSource| proto::DeployRequest {
            image: String::new(),
            source: Some(src),
            ..request()
        };
        let spec = deploy_spec(
            from_source(proto::GitSource {
                r#ref: "main".into(),
                ..git("https://bob:s3cret@git.example.invalid/r.git")
            }),
            "test".into(),
        )
        .unwrap();
        let source = spec.source.as_ref().unwrap();
        assert_eq!(source.dockerfile, "Dockerfile");
        assert_eq!(source.context_dir, "");
        assert_eq!(spec.image, "https://***@git.example.invalid/r.git#main");
        assert!(!format!("{spec:?}").contains("s3cret"));
        // Kept in memory for the fetch.
        assert!(source.url.contains("s3cret"));

        let bad_url = error_of(from_source(git("-uhttps://bob:s3cret@x/r")));
        assert!(bad_url.starts_with("source.url:"), "{bad_url}");
        assert!(!bad_url.contains("s3cret"), "{bad_url}");
        for url in ["ext::sh", "ftp://h/r.git", "ssh://-oProxyCommand=x/r"] {
            let e = error_of(from_source(git(url)));
            assert!(e.starts_with("source.url:"), "{url}: {e}");
        }
        let bad_ref = error_of(from_source(proto::GitSource {
            r#ref: "a..b".into(),
            ..git("file:///srv/r.git")
        }));
        assert!(bad_ref.starts_with("source.ref:"), "{bad_ref}");
        let escape = error_of(from_source(proto::GitSource {
            context_dir: "../etc".into(),
            ..git("file:///srv/r.git")
        }));
        assert!(escape.starts_with("source.context_dir:"), "{escape}");
        let df = error_of(from_source(proto::GitSource {
            dockerfile: "/etc/passwd".into(),
            ..git("file:///srv/r.git")
        }));
        assert!(df.starts_with("source.dockerfile:"), "{df}");
    }

    #[test]
    fn drain_timeout_defaults_to_30s_and_is_bounded() {
        let with = |seconds| proto::DeployRequest {
            drain_timeout: Some(pbjson_types::Duration { seconds, nanos: 0 }),
            ..request()
        };
        let default = crate::model::DEFAULT_DRAIN_TIMEOUT;
        assert_eq!(
            deploy_spec(request(), "t".into()).unwrap().drain_timeout,
            default
        );
        assert_eq!(
            deploy_spec(with(0), "t".into()).unwrap().drain_timeout,
            default
        );
        let spec = deploy_spec(with(2), "t".into()).unwrap();
        assert_eq!(spec.drain_timeout, Duration::from_secs(2));
        assert!(error_of(with(3601)).starts_with("drain_timeout: "));
        assert!(error_of(with(-1)).starts_with("drain_timeout: "));
    }

    #[test]
    fn stop_timeout_defaults_to_the_container_and_is_bounded() {
        assert_eq!(
            deploy_spec(request(), "t".into()).unwrap().stop_timeout,
            None
        );
        let with = |seconds| proto::DeployRequest {
            stop_timeout: Some(pbjson_types::Duration { seconds, nanos: 0 }),
            ..request()
        };
        let spec = deploy_spec(with(1), "t".into()).unwrap();
        assert_eq!(spec.stop_timeout, Some(Duration::from_secs(1)));
        assert_eq!(deploy_spec(with(0), "t".into()).unwrap().stop_timeout, None);
        assert!(error_of(with(601)).starts_with("stop_timeout: "));
        assert!(error_of(with(-1)).starts_with("stop_timeout: "));
    }

    #[test]
    fn a_good_request_converts_with_defaults() {
        let spec = deploy_spec(request(), "test".into()).unwrap();
        assert_eq!(spec.app.as_str(), "web");
        assert_eq!(spec.deadline, DEFAULT_DEADLINE);
        assert_eq!(spec.health.timeout, DEFAULT_HEALTH_TIMEOUT);
        assert!(spec.health.probe.is_none());
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "library/busybox:1.36",
            "127.0.0.1:5000/a/b:tag",
            "registry.example:443/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a-b_c.d/e__f:v1.2-rc",
            "localhost/app",
            "Registry.Example/app",
            "myhost:5000/app",
        ] {
            assert!(IMAGE_REFERENCE.is_match(ok), "{ok}");
        }
        for bad in [
            "",
            "UPPER/case",
            "Upper",
            "a b",
            "a:",
            ":tag",
            "a//b",
            "a@sha256:zz",
            "-a",
        ] {
            assert!(!IMAGE_REFERENCE.is_match(bad), "{bad}");
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn every_bad_field_is_named() {
        type Case = (Box<dyn Fn(&mut proto::DeployRequest)>, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|r| r.app = "Bad_Name".into()), "app: "),
            (Box::new(|r| r.app.clear()), "app: "),
            (
                Box::new(|r| r.image = "  ".into()),
                "image: empty reference",
            ),
            (Box::new(|r| r.image = "a b".into()), "image: "),
            (
                Box::new(|r| r.ports[0].container_port = 0),
                "ports[0].container_port: ",
            ),
            (
                Box::new(|r| r.ports[0].container_port = 70000),
                "ports[0].container_port: ",
            ),
            (
                Box::new(|r| r.ports[0].host_port = 70000),
                "ports[0].host_port: ",
            ),
            (
                Box::new(|r| r.ports[0].protocol = "sctp".into()),
                "ports[0].protocol: ",
            ),
            (
                Box::new(|r| {
                    r.labels
                        .insert("io.stevedore.app".into(), "x".into())
                        .map(drop)
                        .unwrap_or(())
                }),
                "labels[\"io.stevedore.app\"]: ",
            ),
            (
                Box::new(|r| {
                    r.env
                        .insert("A=B".into(), "x".into())
                        .map(drop)
                        .unwrap_or(())
                }),
                "env[\"A=B\"]: ",
            ),
            (
                Box::new(|r| {
                    r.health_check = Some(proto::HealthCheck {
                        check: Some(proto::health_check::Check::Tcp(proto::TcpHealthCheck {
                            port: 9999,
                        })),
                        ..Default::default()
                    })
                }),
                "health_check.tcp.port: ",
            ),
            (
                Box::new(|r| {
                    r.health_check = Some(proto::HealthCheck {
                        check: Some(proto::health_check::Check::Log(proto::LogHealthCheck {
                            pattern: "(".into(),
                        })),
                        ..Default::default()
                    })
                }),
                "health_check.log.pattern: invalid regex",
            ),
            (
                Box::new(|r| {
                    r.milestones.push(proto::Milestone {
                        pattern: "[".into(),
                        progress: 0.5,
                        description: "x".into(),
                    })
                }),
                "milestones[0].pattern: invalid regex",
            ),
            (
                Box::new(|r| r.hooks.push(proto::Hook::default())),
                "hooks[0].command: ",
            ),
            (
                Box::new(|r| {
                    r.deadline = Some(pbjson_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    })
                }),
                "deadline: ",
            ),
            (
                Box::new(|r| r.ports.push(r.ports[0].clone())),
                "ports[1]: container port 8080/tcp is listed twice",
            ),
            (
                Box::new(|r| {
                    r.ports[0].host_port = 18080;
                    r.ports.push(proto::PortMapping {
                        container_port: 9090,
                        ..r.ports[0].clone()
                    });
                }),
                "ports[1].host_port: host port 18080 is used twice",
            ),
            (
                Box::new(|r| {
                    // 128 KiB of value plus the key and its separators: over the bound.
                    r.env.insert("BIG".into(), "x".repeat(MAX_ENV_BYTES));
                }),
                "env: ",
            ),
        ];
        for (mutate, expected) in cases {
            let mut r = request();
            mutate(&mut r);
            let message = error_of(r);
            assert!(
                message.starts_with(expected),
                "{message:?} should start with {expected:?}"
            );
        }
    }

    fn accepted(req: proto::DeployRequest) -> DeploySpec {
        deploy_spec(req, "test".into()).unwrap()
    }

    /// The env may take 128 KiB in all (name, value, `=` and NUL of each), not a byte
    /// more.
    #[test]
    fn the_env_may_take_128_kib_and_no_more() {
        let with = |value_len| proto::DeployRequest {
            env: [("BIG".to_owned(), "x".repeat(value_len))].into(),
            ..request()
        };
        let at_bound = 128 * 1024 - "BIG".len() - 2;
        assert_eq!(accepted(with(at_bound)).env["BIG"].len(), at_bound);
        assert_eq!(
            error_of(with(at_bound + 1)),
            "env: 131073 bytes in total; at most 131072 are allowed"
        );
    }

    /// A duration's bounds are inclusive: the deadline may be 1 s or 24 h, no less and
    /// no more.
    #[test]
    fn a_duration_may_be_its_bounds_and_nothing_outside() {
        let with = |seconds, nanos| proto::DeployRequest {
            deadline: Some(pbjson_types::Duration { seconds, nanos }),
            ..request()
        };
        assert_eq!(accepted(with(1, 0)).deadline, Duration::from_secs(1));
        assert_eq!(
            accepted(with(24 * 3600, 0)).deadline,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            error_of(with(0, 999_000_000)),
            "deadline: 0.999s is out of range (1s to 86400s)"
        );
        assert!(error_of(with(24 * 3600, 1)).starts_with("deadline: 86400.000000001s"));
    }

    /// A build arg's name is refused when empty, with `=` or with NUL (each on its own).
    #[test]
    fn a_bad_build_arg_name_is_refused() {
        let with = |name: &str| proto::DeployRequest {
            image: String::new(),
            source: Some(proto::GitSource {
                build_args: [(name.to_owned(), "v".to_owned())].into(),
                ..git("https://git.example.invalid/r.git")
            }),
            ..request()
        };
        for name in ["", "A=B", "A\0"] {
            let e = error_of(with(name));
            assert!(e.starts_with("source.build_args["), "{name:?}: {e}");
        }
        let spec = accepted(with("VERSION"));
        assert_eq!(spec.source.unwrap().build_args["VERSION"], "v");
    }

    /// Replicas: 0 means 1; up to 100 as asked; more is refused.
    #[test]
    fn replicas_default_to_one_and_are_bounded() {
        let with = |replicas| proto::DeployRequest {
            replicas,
            ..request()
        };
        assert_eq!(accepted(with(0)).replicas, 1);
        assert_eq!(accepted(with(3)).replicas, 3);
        assert_eq!(accepted(with(MAX_REPLICAS)).replicas, 100);
        assert_eq!(
            error_of(with(101)),
            "replicas: 101 is more than the 100 tasks a deployment may ask for"
        );
    }

    /// The update policy as asked; refused with an order other than stop-first or
    /// start-first, a ratio outside 0..=1 (or NaN), or a monitor over 10 minutes.
    #[test]
    fn the_update_policy_is_kept_and_checked() {
        let with = |p: proto::UpdatePolicy| proto::DeployRequest {
            update_policy: Some(p),
            ..request()
        };
        let policy = accepted(with(proto::UpdatePolicy {
            parallelism: 2,
            order: "start-first".into(),
            monitor: Some(pbjson_types::Duration {
                seconds: 7,
                nanos: 0,
            }),
            max_failure_ratio: 0.25,
        }))
        .update;
        assert_eq!(policy.parallelism, 2);
        assert_eq!(policy.order, model::UpdateOrder::StartFirst);
        assert_eq!(policy.monitor, Some(Duration::from_secs(7)));
        assert_eq!(policy.max_failure_ratio, 0.25);

        let defaults = accepted(with(proto::UpdatePolicy::default())).update;
        assert_eq!(defaults.parallelism, 1, "0 means one task at a time");
        assert_eq!(defaults.order, model::UpdateOrder::StopFirst);
        assert_eq!(defaults.monitor, None);
        assert_eq!(defaults.max_failure_ratio, 0.0);
        for ratio in [1.0, 0.0] {
            let p = proto::UpdatePolicy {
                max_failure_ratio: ratio,
                ..Default::default()
            };
            assert_eq!(accepted(with(p)).update.max_failure_ratio, ratio);
        }

        for ratio in [1.5, -0.1, f64::NAN] {
            let e = error_of(with(proto::UpdatePolicy {
                max_failure_ratio: ratio,
                ..Default::default()
            }));
            assert!(
                e.starts_with("update_policy.max_failure_ratio: "),
                "{ratio}: {e}"
            );
        }
        let e = error_of(with(proto::UpdatePolicy {
            order: "random".into(),
            ..Default::default()
        }));
        assert!(e.starts_with("update_policy.order: "), "{e}");
        let e = error_of(with(proto::UpdatePolicy {
            monitor: Some(pbjson_types::Duration {
                seconds: 601,
                nanos: 0,
            }),
            ..Default::default()
        }));
        assert!(e.starts_with("update_policy.monitor: "), "{e}");
    }

    /// An image reference may be 512 bytes long, not more.
    #[test]
    fn an_image_reference_may_be_512_bytes() {
        let with = |len: usize| proto::DeployRequest {
            image: format!("a/{}", "b".repeat(len - 2)),
            ..request()
        };
        assert_eq!(accepted(with(512)).image.len(), 512);
        assert!(error_of(with(513)).starts_with("image: "));
    }

    /// A host port may be published once per protocol: TCP and UDP may share one, as
    /// they may share a container port.
    #[test]
    fn tcp_and_udp_may_share_a_port() {
        let mapping = |container_port, protocol: &str| proto::PortMapping {
            host_ip: String::new(),
            container_port,
            host_port: 5353,
            protocol: protocol.into(),
        };
        let spec = accepted(proto::DeployRequest {
            ports: vec![mapping(53, "tcp"), mapping(53, "UDP")],
            ..request()
        });
        let ports: Vec<_> = spec
            .ports
            .iter()
            .map(|p| (p.container_port, p.host_port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [(53, 5353, Protocol::Tcp), (53, 5353, Protocol::Udp)]
        );
        let e = error_of(proto::DeployRequest {
            ports: vec![mapping(53, "tcp"), mapping(53, "udp"), mapping(54, "udp")],
            ..request()
        });
        assert_eq!(e, "ports[2].host_port: host port 5353 is used twice");
    }

    /// A host IP is optional and, when given, an IP address.
    #[test]
    fn a_host_ip_is_an_ip_address_or_nothing() {
        let with = |ip: &str| proto::DeployRequest {
            ports: vec![proto::PortMapping {
                host_ip: ip.into(),
                ..request().ports[0].clone()
            }],
            ..request()
        };
        let ip = |spec: DeploySpec| spec.ports[0].host_ip;
        assert_eq!(ip(accepted(with(" "))), None);
        assert_eq!(ip(accepted(with("127.0.0.1"))), Some([127, 0, 0, 1].into()));
        assert_eq!(
            ip(accepted(with(" ::1 "))),
            Some(std::net::Ipv6Addr::LOCALHOST.into())
        );
        assert!(error_of(with("localhost")).starts_with("ports[0].host_ip: "));
    }

    /// An idempotency key is optional and at most 256 bytes.
    #[test]
    fn an_idempotency_key_is_at_most_256_bytes() {
        let with = |key: String| proto::DeployRequest {
            idempotency_key: key,
            ..request()
        };
        assert_eq!(accepted(with(String::new())).idempotency_key, None);
        let key = "k".repeat(256);
        assert_eq!(accepted(with(key.clone())).idempotency_key, Some(key));
        assert_eq!(
            error_of(with("k".repeat(257))),
            "idempotency_key: longer than 256 bytes"
        );
    }

    /// A removal names a valid app; its stop grace is optional (0 too) and at most
    /// 10 minutes.
    #[test]
    fn a_removal_request_is_checked() {
        let with = |app: &str, seconds: Option<i64>| proto::RemoveAppRequest {
            app: app.into(),
            stop_timeout: seconds.map(|seconds| pbjson_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        };
        let (app, grace) = removal(&with("web", None)).unwrap();
        assert_eq!((app.as_str(), grace), ("web", None));
        assert_eq!(removal(&with("web", Some(0))).unwrap().1, None);
        assert_eq!(
            removal(&with("web", Some(600))).unwrap().1,
            Some(Duration::from_secs(600))
        );
        for bad in [with("web", Some(601)), with("web", Some(-1))] {
            let e = removal(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("stop_timeout: "), "{}", e.message());
        }
        let e = removal(&with("Bad_Name", None)).unwrap_err();
        assert!(e.message().starts_with("app: "), "{}", e.message());
    }

    /// A milestone's progress is at most 1.0 (negative: a counter; NaN refused); its
    /// description defaults to its pattern.
    #[test]
    fn milestones_keep_their_progress_and_describe_themselves() {
        let with = |progress: f64, description: &str| proto::DeployRequest {
            milestones: vec![proto::Milestone {
                pattern: "ready".into(),
                progress,
                description: description.into(),
            }],
            ..request()
        };
        let m = &accepted(with(1.0, "")).milestones[0];
        assert_eq!((m.progress, m.description.as_str()), (1.0, "ready"));
        assert_eq!(m.pattern.as_str(), "ready");
        let m = &accepted(with(-1.0, "warm")).milestones[0];
        assert_eq!((m.progress, m.description.as_str()), (-1.0, "warm"));
        for bad in [1.01, f64::NAN] {
            let e = error_of(with(bad, ""));
            assert!(e.starts_with("milestones[0].progress: "), "{bad}: {e}");
        }
        let mut empty = with(0.5, "");
        empty.milestones[0].pattern.clear();
        assert_eq!(error_of(empty), "milestones[0].pattern: empty pattern");
    }

    /// Hooks are named `hook-N` unless named; a hook needs a command whose program is
    /// not empty; its timeout defaults to 5 minutes and is at least 100 ms.
    #[test]
    fn hooks_are_named_and_checked() {
        let hook = |name: &str, command: &[&str], timeout_ms: Option<i32>| proto::Hook {
            name: name.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            tty: true,
            timeout: timeout_ms.map(|ms| pbjson_types::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            }),
        };
        let spec = accepted(proto::DeployRequest {
            hooks: vec![
                hook("migrate", &["db", "up"], None),
                hook("", &["true"], Some(100)),
            ],
            ..request()
        });
        let named: Vec<_> = spec
            .hooks
            .iter()
            .map(|h| (h.name.as_str(), h.command.len(), h.tty, h.timeout))
            .collect();
        assert_eq!(
            named,
            [
                ("migrate", 2, true, DEFAULT_HOOK_TIMEOUT),
                ("hook-2", 1, true, Duration::from_millis(100)),
            ]
        );
        for (bad, field) in [
            (hook("x", &[""], None), "hooks[0].command: "),
            (hook("x", &[], None), "hooks[0].command: "),
            (hook("x", &["true"], Some(99)), "hooks[0].timeout: "),
        ] {
            let e = error_of(proto::DeployRequest {
                hooks: vec![bad],
                ..request()
            });
            assert!(e.starts_with(field), "{e}");
        }
    }

    /// An HTTP probe: path `/` by default and absolute, status 200 by default and an
    /// HTTP status, port published over TCP.
    #[test]
    fn an_http_probe_is_checked() {
        let with = |port: u32, path: &str, expect_status: u32| proto::DeployRequest {
            health_check: Some(proto::HealthCheck {
                check: Some(proto::health_check::Check::Http(proto::HttpHealthCheck {
                    port,
                    path: path.into(),
                    expect_status,
                })),
                ..Default::default()
            }),
            ..request()
        };
        let probe = |req| accepted(req).health.probe;
        assert!(matches!(
            probe(with(8080, "", 0)),
            Some(HealthProbe::Http { port: 8080, ref path, expect_status: 200 }) if path == "/"
        ));
        assert!(matches!(
            probe(with(8080, "/up", 599)),
            Some(HealthProbe::Http { ref path, expect_status: 599, .. }) if path == "/up"
        ));
        assert!(matches!(
            probe(with(8080, "/", 100)),
            Some(HealthProbe::Http {
                expect_status: 100,
                ..
            })
        ));
        for (req, field) in [
            (with(8080, "up", 0), "health_check.http.path: "),
            (with(8080, "/", 99), "health_check.http.expect_status: "),
            (with(8080, "/", 600), "health_check.http.expect_status: "),
            (with(9090, "/", 0), "health_check.http.port: "),
        ] {
            let e = error_of(req);
            assert!(e.starts_with(field), "{e}");
        }
        let mut udp = with(8080, "/", 0);
        udp.ports[0].protocol = "udp".into();
        assert!(error_of(udp).starts_with("health_check.http.port: "));
    }

    /// What the engine reports reaches the wire field by field: an update (with its
    /// pull, result and ETA), a status, an app.
    #[test]
    fn the_engine_s_values_convert_field_by_field() {
        use std::time::UNIX_EPOCH;
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let eta = crate::engine::eta::Eta {
            remaining: Duration::from_millis(1500),
            low: Duration::from_secs(1),
            high: Duration::from_secs(2),
            samples: 3,
            basis: "median of 3".into(),
            overdue: true,
        };
        let result = model::DeploymentResult {
            success: false,
            message: "boom".into(),
            container_id: "c0ffee".into(),
            image_digest: "sha256:ab".into(),
            endpoints: [("8080/tcp".into(), "127.0.0.1:18080".into())].into(),
            health: vec![model::HealthOutcome {
                check: "http".into(),
                healthy: false,
                attempts: 4,
                message: "503".into(),
            }],
            diagnostics: Some(model::FailureDiagnostics {
                failed_phase: Some(model::Phase::HealthCheck),
                step: "probe".into(),
                exit_code: Some(3),
                oom_killed: true,
                log_tail: vec!["last line".into()],
            }),
            commit: "0123abc".into(),
            containers_removed: 2,
        };
        let u = model::Update {
            operation: model::Operation::RemoveApp,
            phase: model::Phase::HealthCheck,
            phase_progress: 0.5,
            total_progress: 0.25,
            level: model::Level::Warning,
            timestamp: at,
            elapsed: Duration::from_millis(2500),
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            pull: Some(model::PullProgress {
                layer_id: "l1".into(),
                current_bytes: 1,
                total_bytes: 2,
                image_current_bytes: 3,
                image_total_bytes: 4,
                layers_total: 5,
                layers_done: 6,
            }),
            result: Some(result.clone()),
            eta: Some(eta.clone()),
            ..model::Update::for_test(7, false)
        };
        let p = update(&u);
        assert_eq!(p.deployment_id, u.deployment_id.to_string());
        assert_eq!((p.sequence, p.app.as_str()), (7, "app"));
        assert_eq!(p.operation(), proto::Operation::RemoveApp);
        assert_eq!(p.phase(), proto::Phase::HealthCheck);
        assert_eq!(p.level(), proto::Level::Warning);
        assert_eq!((p.phase_progress, p.total_progress), (0.5, 0.25));
        assert_eq!(p.message, "update 7");
        let ts = p.timestamp.unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 5));
        let el = p.elapsed.unwrap();
        assert_eq!((el.seconds, el.nanos), (2, 500_000_000));
        assert_eq!(p.metadata["k"], "v");
        let pull = p.pull.unwrap();
        assert_eq!(
            (
                pull.layer_id.as_str(),
                pull.current_bytes,
                pull.total_bytes,
                pull.image_current_bytes,
                pull.image_total_bytes,
                pull.layers_total,
                pull.layers_done
            ),
            ("l1", 1, 2, 3, 4, 5, 6)
        );
        assert!(!p.heartbeat);
        let r = p.result.unwrap();
        assert_eq!(
            (
                r.success,
                r.message.as_str(),
                r.container_id.as_str(),
                r.image_digest.as_str(),
                r.commit.as_str(),
                r.containers_removed
            ),
            (false, "boom", "c0ffee", "sha256:ab", "0123abc", 2)
        );
        assert_eq!(r.endpoints["8080/tcp"], "127.0.0.1:18080");
        let h = &r.health[0];
        assert_eq!(
            (h.check.as_str(), h.healthy, h.attempts, h.message.as_str()),
            ("http", false, 4, "503")
        );
        let d = r.diagnostics.unwrap();
        assert_eq!(d.failed_phase(), proto::Phase::HealthCheck);
        assert_eq!(
            (d.step.as_str(), d.exit_code, d.oom_killed, d.log_tail),
            ("probe", Some(3), true, vec!["last line".to_owned()])
        );
        let e = p.eta.unwrap();
        assert_eq!(
            (
                e.remaining.unwrap().nanos,
                e.low.unwrap().seconds,
                e.high.unwrap().seconds
            ),
            (500_000_000, 1, 2)
        );
        assert_eq!(
            (e.samples, e.basis.as_str(), e.overdue),
            (3, "median of 3", true)
        );

        let status = model::DeploymentStatus {
            id: u.deployment_id,
            operation: model::Operation::Deploy,
            app: u.app.clone(),
            image: "web:2".into(),
            state: model::DeploymentState::Succeeded,
            phase: model::Phase::Complete,
            phase_progress: 1.0,
            total_progress: 1.0,
            created_at: at,
            started_at: Some(at + Duration::from_secs(1)),
            finished_at: Some(at + Duration::from_secs(2)),
            error: String::new(),
            result: Some(model::DeploymentResult {
                success: true,
                ..result
            }),
            last_sequence: 9,
            requested_by: "ci".into(),
            queue_position: 0,
            superseded_by: Some(model::DeploymentId::new()),
            commit: "0123abc".into(),
            eta: None,
            target: model::Target::Swarm,
            replicas: 3,
        };
        let s = super::status(&status);
        assert_eq!(s.deployment_id, status.id.to_string());
        assert_eq!(s.operation(), proto::Operation::Deploy);
        assert_eq!((s.app.as_str(), s.image.as_str()), ("app", "web:2"));
        assert_eq!(s.state(), proto::DeploymentState::Succeeded);
        assert_eq!(s.phase(), proto::Phase::Complete);
        assert_eq!(s.created_at.unwrap().seconds, 1_700_000_000);
        assert_eq!(s.started_at.unwrap().seconds, 1_700_000_001);
        assert_eq!(s.finished_at.unwrap().seconds, 1_700_000_002);
        assert!(s.result.as_ref().unwrap().success);
        assert_eq!(
            (s.last_sequence, s.requested_by.as_str(), s.commit.as_str()),
            (9, "ci", "0123abc")
        );
        assert_eq!(s.superseded_by, status.superseded_by.unwrap().to_string());
        assert_eq!((s.target.as_str(), s.replicas), ("swarm", 3));
        assert!(s.eta.is_none());

        let view = crate::engine::AppView {
            app: status.app.clone(),
            current: Some(status.clone()),
            latest: model::DeploymentStatus {
                id: model::DeploymentId::new(),
                ..status.clone()
            },
        };
        let a = app(&view);
        assert_eq!(a.app, "app");
        let current = a.current.unwrap();
        assert_eq!(current.deployment_id, status.id.to_string());
        assert_eq!(
            (
                current.image.as_str(),
                current.image_digest.as_str(),
                current.container_id.as_str()
            ),
            ("web:2", "sha256:ab", "c0ffee")
        );
        assert_eq!(current.since.unwrap().seconds, 1_700_000_002);
        assert_eq!(current.endpoints["8080/tcp"], "127.0.0.1:18080");
        assert_eq!(current.health[0].attempts, 4);
        assert_eq!((current.target.as_str(), current.replicas), ("swarm", 3));
        assert_eq!(a.latest.unwrap().deployment_id, view.latest.id.to_string());
    }

    /// Each state, phase and level has its own wire value, and the ListDeployments
    /// filter reads each state back (UNSPECIFIED: any; an unknown number is refused).
    #[test]
    fn enums_map_one_to_one_and_the_state_filter_reads_them_back() {
        use model::DeploymentState as S;
        for s in [
            S::Pending,
            S::Running,
            S::Succeeded,
            S::Failed,
            S::Cancelled,
        ] {
            let wire = state(s);
            assert_eq!(
                wire.as_str_name(),
                format!("DEPLOYMENT_STATE_{}", s.as_str().to_ascii_uppercase())
            );
            assert_eq!(state_filter(wire as i32).unwrap(), Some(s));
        }
        assert_eq!(state_filter(0).unwrap(), None);
        let e = state_filter(99).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::InvalidArgument,
                "state: 99 is not a deployment state"
            )
        );
        for p in [
            model::Phase::Pulling,
            model::Phase::HealthCheck,
            model::Phase::Failed,
        ] {
            assert_eq!(phase(p).as_str_name(), format!("PHASE_{}", p.name()));
        }
        use model::Level as L;
        for (l, name) in [
            (L::Info, "LEVEL_INFO"),
            (L::Warning, "LEVEL_WARNING"),
            (L::Error, "LEVEL_ERROR"),
            (L::Success, "LEVEL_SUCCESS"),
        ] {
            assert_eq!(level(l).as_str_name(), name);
        }
    }

    /// Fuzzing of request validation: arbitrary requests (any strings, any numbers,
    /// any health check, durations and patterns) never panic; every refusal is
    /// INVALID_ARGUMENT naming a field, and every accepted spec satisfies the limits.
    /// `PROPTEST_CASES` raises the number of cases (scripts/test.sh does).
    mod fuzz {
        use super::*;
        use proptest::collection::{btree_map, vec};
        use proptest::option;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[a-z0-9-]{0,70}",
                "([a-z0-9.:-]{1,12}/){0,3}[a-z0-9._-]{1,20}(:[a-zA-Z0-9._-]{0,10})?(@sha256:[0-9a-f]{0,70})?",
                "[\\[\\](){}*+?.^$|a-z0-9]{0,20}",
                Just(String::new()),
                Just("io.stevedore.app".to_owned()),
            ]
        }

        fn duration() -> impl Strategy<Value = pbjson_types::Duration> {
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| pbjson_types::Duration { seconds, nanos })
        }

        fn port() -> impl Strategy<Value = u32> {
            prop_oneof![any::<u32>(), 0u32..70000, Just(8080u32)]
        }

        fn health() -> impl Strategy<Value = proto::HealthCheck> {
            use proto::health_check::Check;
            let check = prop_oneof![
                Just(None),
                Just(Some(Check::Docker(proto::DockerHealthCheck {}))),
                Just(Some(Check::None(proto::NoHealthCheck {}))),
                port().prop_map(|port| Some(Check::Tcp(proto::TcpHealthCheck { port }))),
                (port(), text(), any::<u32>()).prop_map(|(port, path, expect_status)| Some(
                    Check::Http(proto::HttpHealthCheck {
                        port,
                        path,
                        expect_status
                    })
                )),
                text().prop_map(|pattern| Some(Check::Log(proto::LogHealthCheck { pattern }))),
            ];
            (check, option::of(duration()), option::of(duration())).prop_map(
                |(check, timeout, interval)| proto::HealthCheck {
                    check,
                    timeout,
                    interval,
                },
            )
        }

        type Milestones = Vec<(String, f64, String)>;
        type Hooks = Vec<(String, Vec<String>, bool, Option<pbjson_types::Duration>)>;

        fn milestones_of(m: Milestones) -> Vec<proto::Milestone> {
            m.into_iter()
                .map(|(pattern, progress, description)| proto::Milestone {
                    pattern,
                    progress,
                    description,
                })
                .collect()
        }

        fn hooks_of(h: Hooks) -> Vec<proto::Hook> {
            h.into_iter()
                .map(|(name, command, tty, timeout)| proto::Hook {
                    name,
                    command,
                    tty,
                    timeout,
                })
                .collect()
        }

        prop_compose! {
            fn request()(
                app in text(),
                image in text(),
                command in vec(text(), 0..3),
                env in btree_map(text(), text(), 0..4),
                ports in vec((port(), port(), prop_oneof![Just(String::new()), Just("udp".to_owned()), text()]), 0..4),
                labels in btree_map(text(), text(), 0..4),
                health_check in option::of(health()),
                deadline in option::of(duration()),
                idempotency_key in text(),
                auth in option::of((text(), text(), text())),
                milestones in vec((text(), any::<f64>(), text()), 0..3),
                hooks in vec((text(), vec(text(), 0..3), any::<bool>(), option::of(duration())), 0..3),
                source in option::of((text(), text(), text(), text())),
            ) -> proto::DeployRequest {
                proto::DeployRequest {
                    replicas: 0,
                    update_policy: None,
                    app,
                    image,
                    command,
                    env: env.into_iter().collect(),
                    ports: ports
                        .into_iter()
                        .map(|(container_port, host_port, protocol)| proto::PortMapping {
                            host_ip: String::new(),
                            container_port,
                            host_port,
                            protocol,
                        })
                        .collect(),
                    labels: labels.into_iter().collect(),
                    health_check,
                    deadline,
                    idempotency_key,
                    registry_auth: auth.map(|(username, password, identity_token)| {
                        proto::RegistryAuth {
                            username,
                            password,
                            identity_token,
                        }
                    }),
                    milestones: milestones_of(milestones),
                    hooks: hooks_of(hooks),
                    stop_timeout: None,
                    drain_timeout: None,
                    source: source.map(|(url, r#ref, dockerfile, context_dir)| proto::GitSource {
                        url,
                        r#ref,
                        dockerfile,
                        context_dir,
                        build_args: Default::default(),
                    }),
                }
            }
        }

        fn short_duration(
            min_ms: u64,
            max_ms: u64,
        ) -> impl Strategy<Value = pbjson_types::Duration> {
            (min_ms..=max_ms).prop_map(|ms| pbjson_types::Duration {
                seconds: (ms / 1000) as i64,
                nanos: (ms % 1000) as i32 * 1_000_000,
            })
        }

        prop_compose! {
            /// Requests every field of which is valid on its own, so that most are
            /// accepted and the accepted branch runs; the env sometimes nears or passes
            /// the 128 KiB bound, and ports may repeat.
            fn valid_request()(
                app in "[a-z][a-z0-9-]{0,40}[a-z0-9]",
                image in "(127\\.0\\.0\\.1:5000/)?[a-z0-9]{1,10}(/[a-z0-9]{1,10})?(:[a-z0-9.]{1,8})?",
                command in vec("[ -~]{1,20}", 0..3),
                env in btree_map("[A-Z_][A-Z0-9_]{0,15}", "[ -~]{0,40}", 0..4),
                big_env in prop_oneof![4 => Just(0usize), 1 => 100_000usize..140_000],
                container_ports in proptest::collection::btree_set(1u32..65536, 0..4),
                host_port in prop_oneof![Just(0u32), 1u32..65536],
                udp in any::<bool>(),
                labels in btree_map("[a-z][a-z0-9.]{0,15}", "[ -~]{0,20}", 0..4),
                health_timeout in option::of(short_duration(100, 3_600_000)),
                health_interval in option::of(short_duration(50, 300_000)),
                deadline in option::of(short_duration(1000, 86_400_000)),
                idempotency_key in "[a-z0-9-]{0,40}",
                milestones in vec(("[a-z ]{1,10}", -1.0f64..=1.0, "[a-z ]{0,10}"), 0..3),
                hooks in vec(("[a-z]{0,8}", vec("[a-z]{1,8}", 1..3), any::<bool>(), option::of(short_duration(100, 600_000))), 0..3),
            ) -> proto::DeployRequest {
                let mut env: std::collections::HashMap<String, String> = env.into_iter().collect();
                if big_env > 0 {
                    env.insert("BIG".into(), "x".repeat(big_env));
                }
                let ports = container_ports
                    .into_iter()
                    .enumerate()
                    .map(|(i, container_port)| proto::PortMapping {
                        host_ip: String::new(),
                        container_port,
                        host_port: if i == 0 { host_port } else { 0 },
                        protocol: if udp { "udp".into() } else { "tcp".into() },
                    })
                    .collect();
                proto::DeployRequest {
                    replicas: 0,
                    update_policy: None,
                    app,
                    image,
                    command,
                    env,
                    ports,
                    labels: labels.into_iter().collect(),
                    health_check: Some(proto::HealthCheck {
                        check: None,
                        timeout: health_timeout,
                        interval: health_interval,
                    }),
                    deadline,
                    idempotency_key,
                    registry_auth: None,
                    milestones: milestones_of(milestones),
                    hooks: hooks_of(hooks),
                    stop_timeout: None,
                    drain_timeout: None,
                    source: None,
                }
            }
        }

        /// The request fields an error message may start with.
        const FIELDS: &[&str] = &[
            "app",
            "image",
            "source",
            "command",
            "env",
            "ports",
            "labels",
            "health_check",
            "deadline",
            "idempotency_key",
            "registry_auth",
            "milestones",
            "hooks",
        ];

        /// Checks one request; returns whether it was accepted.
        fn check(req: proto::DeployRequest) -> Result<bool, TestCaseError> {
            match deploy_spec(req, "fuzz".into()) {
                Ok(spec) => {
                    prop_assert!(!spec.image.is_empty());
                    prop_assert!(
                        spec.labels
                            .keys()
                            .all(|k| !k.starts_with(RESERVED_LABEL_PREFIX))
                    );
                    let env: usize = spec.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
                    prop_assert!(env <= MAX_ENV_BYTES);
                    prop_assert!(
                        spec.deadline >= Duration::from_secs(1) && spec.deadline <= MAX_DEADLINE
                    );
                    // The deploy policy must not panic on anything validation accepts.
                    let policy =
                        crate::api::policy::DeployPolicy::new(&["127.0.0.1:5000".into()], false);
                    let _ = policy.check(&spec);
                    Ok(true)
                }
                Err(e) => {
                    prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                    let message = e.message();
                    let field = message.split([':', '[', '.']).next().unwrap_or_default();
                    prop_assert!(
                        FIELDS.contains(&field) && message.contains(": "),
                        "the message names a request field first: {}",
                        message
                    );
                    Ok(false)
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn no_request_panics_validation(req in request()) {
                check(req)?;
            }
        }

        /// Mostly valid requests: the accepted branch runs for most of them (counted),
        /// and the ones refused (env over the bound, a repeated host port…) name a field.
        #[test]
        fn valid_requests_are_accepted_and_keep_the_limits() {
            use std::sync::atomic::{AtomicUsize, Ordering};
            let accepted = AtomicUsize::new(0);
            let refused = AtomicUsize::new(0);
            let config = ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            };
            let cases = config.cases as usize;
            let mut runner = proptest::test_runner::TestRunner::new(config);
            runner
                .run(&valid_request(), |req| {
                    let counter = if check(req)? { &accepted } else { &refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
                .unwrap();
            let (accepted, refused) = (accepted.into_inner(), refused.into_inner());
            assert!(
                accepted >= cases / 2,
                "only {accepted} of {cases} valid requests were accepted ({refused} refused)"
            );
            assert!(
                refused >= 1,
                "no request over the env bound was refused in {cases}"
            );
        }
    }
}
