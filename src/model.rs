//! Domain types shared by every layer: what a deployment is asked to do
//! ([`DeploySpec`]), where it is ([`Phase`], [`DeploymentState`]) and what it reports
//! ([`Update`]). Nothing here knows about protobuf, tonic or Docker: `api/` converts
//! to and from the wire, `runtime/` to and from the engine's API.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use regex::Regex;
use uuid::Uuid;

/// Label put on every container Stevedore creates: the app it belongs to.
pub(crate) const LABEL_APP: &str = "io.stevedore.app";
/// Label put on every container Stevedore creates: the deployment that created it.
pub(crate) const LABEL_DEPLOYMENT: &str = "io.stevedore.deployment";
/// Label of a container whose port is served through the proxy: the app's public
/// address (`host_ip:public_port`) the proxy binds for it.
pub const LABEL_ROUTE_LISTEN: &str = "io.stevedore.route.listen";
/// Label of a container whose port is served through the proxy: the container port
/// the public address forwards to.
pub const LABEL_ROUTE_PORT: &str = "io.stevedore.route.port";
/// How long connections open to the previous version may stay open after the proxy
/// switched the app's route, when the request sets no `drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix reserved for Stevedore's own labels.
pub(crate) const RESERVED_LABEL_PREFIX: &str = "io.stevedore.";

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct DeploymentId(pub Uuid);

impl DeploymentId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for DeploymentId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An app name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a valid app name: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
            ))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub(crate) container_port: u16,
    /// 0 = any free port.
    pub(crate) host_port: u16,
    pub(crate) protocol: Protocol,
    /// The host address to publish on; `None`: the server's `--publish-ip`.
    pub(crate) host_ip: Option<std::net::IpAddr>,
}

#[derive(Clone, Debug)]
pub enum HealthProbe {
    /// The image's HEALTHCHECK.
    Docker,
    Tcp {
        port: u16,
    },
    Http {
        port: u16,
        path: String,
        expect_status: u16,
    },
    Log {
        pattern: Regex,
    },
    None,
}

impl HealthProbe {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            HealthProbe::Docker => "docker",
            HealthProbe::Tcp { .. } => "tcp",
            HealthProbe::Http { .. } => "http",
            HealthProbe::Log { .. } => "log",
            HealthProbe::None => "none",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HealthSpec {
    /// `None`: decided once the image is known (its HEALTHCHECK, else a TCP probe of the
    /// first published port, else a settle time).
    pub probe: Option<HealthProbe>,
    pub timeout: Duration,
    pub interval: Duration,
}

/// Credentials for a private registry. Never logged, stored or echoed.
#[derive(Clone, Default)]
pub struct RegistryAuth {
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) identity_token: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryAuth(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct MilestoneSpec {
    pub(crate) pattern: Regex,
    /// Phase progress reached on a match; negative: a counter.
    pub(crate) progress: f64,
    pub(crate) description: String,
}

#[derive(Clone, Debug)]
pub struct HookSpec {
    pub(crate) name: String,
    pub(crate) command: Vec<String>,
    pub(crate) tty: bool,
    pub(crate) timeout: Duration,
}

/// A git repository to build the app's image from (`DeployRequest.source`).
///
/// `url` may carry a credential (`https://user:token@host/…`): it stays in memory for
/// the fetch only. Everything shown, stored or audited uses [`SourceSpec::display_url`];
/// `Debug` prints that too.
#[derive(Clone)]
pub struct SourceSpec {
    pub(crate) url: String,
    /// Branch, tag or commit; `None`: the remote's HEAD.
    pub(crate) reference: Option<String>,
    /// Relative to `context_dir`.
    pub(crate) dockerfile: String,
    /// Relative to the repository's root; empty: the root.
    pub(crate) context_dir: String,
    pub(crate) build_args: BTreeMap<String, String>,
}

impl SourceSpec {
    /// The URL without its credential (`scheme://***@host/…`).
    pub(crate) fn display_url(&self) -> String {
        crate::source::git::redact_url(&self.url)
    }

    /// `url` (or `url#ref`), credential removed: what the status' `image` shows until
    /// the commit is known.
    pub(crate) fn describe(&self) -> String {
        match &self.reference {
            Some(r) => format!("{}#{r}", self.display_url()),
            None => self.display_url(),
        }
    }
}

impl fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSpec")
            .field("url", &self.display_url())
            .field("reference", &self.reference)
            .field("dockerfile", &self.dockerfile)
            .field("context_dir", &self.context_dir)
            .field("build_args", &self.build_args.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A validated deploy request.
#[derive(Clone, Debug)]
pub struct DeploySpec {
    pub app: AppName,
    /// The image to run. For a deploy from source: [`SourceSpec::describe`] until the
    /// build names the image (`stevedore/<app>:<commit>`).
    pub image: String,
    /// Build the image from this repository instead of pulling `image`.
    pub source: Option<SourceSpec>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub labels: BTreeMap<String, String>,
    pub health: HealthSpec,
    /// Bounds the whole deployment, from acceptance (queue wait included) to its end.
    pub deadline: Duration,
    pub idempotency_key: Option<String>,
    pub registry_auth: Option<RegistryAuth>,
    pub milestones: Vec<MilestoneSpec>,
    pub hooks: Vec<HookSpec>,
    /// The previous version's stop grace; `None`: its StopTimeout, else 10 s.
    pub stop_timeout: Option<Duration>,
    /// With the proxy: how long connections open to the previous version may stay
    /// open after the switch before they are cut and it is stopped.
    pub drain_timeout: Duration,
    /// Who asked (token name, or peer address without auth).
    pub requested_by: String,
    /// Tasks of the app's Swarm service (`--target swarm`); the docker target runs one
    /// container and accepts only 1.
    pub replicas: u32,
    /// How the Swarm target rolls a new version out over the tasks.
    pub update: UpdatePolicy,
}

/// Where the server runs apps (`stevedore serve --target`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// One container per app on one Docker engine.
    #[default]
    Docker,
    /// One Swarm service per app, its tasks spread over the swarm's nodes.
    Swarm,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Docker => "docker",
            Target::Swarm => "swarm",
        }
    }
}

/// Which of a slot's tasks runs first during an update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// The old task stops, then the new one starts (Swarm's default).
    #[default]
    StopFirst,
    /// The new task starts beside the old one, which stops once the new one runs.
    StartFirst,
}

impl UpdateOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOrder::StopFirst => "stop-first",
            UpdateOrder::StartFirst => "start-first",
        }
    }
}

/// The request's update policy (Swarm target).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpdatePolicy {
    /// Tasks updated at once; 0 = all at once.
    pub parallelism: u32,
    pub order: UpdateOrder,
    /// How long each updated task is watched for a failure; `None`: derived from the
    /// health check (at least start period + interval × retries, and 5 s).
    pub monitor: Option<Duration>,
    /// Failed updated tasks tolerated, as a fraction of the tasks updated (0 to 1).
    pub max_failure_ratio: f64,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            parallelism: 1,
            order: UpdateOrder::StopFirst,
            monitor: None,
            max_failure_ratio: 0.0,
        }
    }
}

/// Phases in the order a deployment goes through them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Phase {
    Queued,
    Validating,
    Fetching,
    Building,
    Pulling,
    Creating,
    Starting,
    HealthCheck,
    Hooks,
    Switching,
    Cleanup,
    Complete,
    Failed,
    Cancelled,
}

impl Phase {
    /// The non-terminal phases, in order.
    pub(crate) const WORK: [Phase; 11] = [
        Phase::Queued,
        Phase::Validating,
        Phase::Fetching,
        Phase::Building,
        Phase::Pulling,
        Phase::Creating,
        Phase::Starting,
        Phase::HealthCheck,
        Phase::Hooks,
        Phase::Switching,
        Phase::Cleanup,
    ];

    /// Share of `total_progress` this phase accounts for. The weights add up to 1.0;
    /// building, pulling and health checking are where the time goes. A phase a
    /// deployment skips (FETCHING and BUILDING for an image, HOOKS without hooks) counts
    /// as done.
    pub(crate) fn weight(self) -> f64 {
        match self {
            Phase::Queued => 0.0,
            Phase::Validating => 0.02,
            Phase::Fetching => 0.08,
            Phase::Building => 0.25,
            Phase::Pulling => 0.20,
            Phase::Creating => 0.04,
            Phase::Starting => 0.06,
            Phase::HealthCheck => 0.20,
            Phase::Hooks => 0.08,
            Phase::Switching => 0.05,
            Phase::Cleanup => 0.02,
            Phase::Complete | Phase::Failed | Phase::Cancelled => 0.0,
        }
    }

    /// `total_progress` at the start of this phase.
    pub(crate) fn start_offset(self) -> f64 {
        Phase::WORK
            .iter()
            .take_while(|p| **p != self)
            .map(|p| p.weight())
            .sum()
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Phase::Complete | Phase::Failed | Phase::Cancelled)
    }

    /// The phase in human text (messages): the proto's enum name without `PHASE_`,
    /// e.g. `HEALTH_CHECK`, the one way messages name phases. [`Phase::as_str`] is the
    /// machine label (logs, metrics, audit records).
    pub(crate) fn name(self) -> String {
        self.as_str().to_ascii_uppercase()
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Validating => "validating",
            Phase::Fetching => "fetching",
            Phase::Building => "building",
            Phase::Pulling => "pulling",
            Phase::Creating => "creating",
            Phase::Starting => "starting",
            Phase::HealthCheck => "health_check",
            Phase::Hooks => "hooks",
            Phase::Switching => "switching",
            Phase::Cleanup => "cleanup",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// What a deployment-like operation does. A removal (RemoveApp) is an operation of
/// its own with an ID, a log, a status and a place in its app's queue, like a deploy;
/// it goes QUEUED → SWITCHING (stopping the app's containers) → CLEANUP (removing them)
/// → COMPLETE.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Operation {
    #[default]
    Deploy,
    RemoveApp,
}

impl Operation {
    pub fn is_deploy(&self) -> bool {
        *self == Operation::Deploy
    }

    /// The machine label (audit records, webhooks, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Deploy => "deploy",
            Operation::RemoveApp => "remove_app",
        }
    }

    /// `(start offset, weight)` of `phase` in this operation's `total_progress`. A
    /// removal spends its time stopping (SWITCHING) and little removing (CLEANUP).
    pub fn phase_span(self, phase: Phase) -> (f64, f64) {
        match (self, phase) {
            (Operation::Deploy, p) => (p.start_offset(), p.weight()),
            (Operation::RemoveApp, Phase::Switching) => (0.0, 0.8),
            (Operation::RemoveApp, Phase::Cleanup) => (0.8, 0.2),
            (Operation::RemoveApp, _) => (0.0, 0.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Level {
    Info,
    Verbose,
    Warning,
    Error,
    Success,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeploymentState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl DeploymentState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeploymentState::Succeeded | DeploymentState::Failed | DeploymentState::Cancelled
        )
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Pending => "pending",
            DeploymentState::Running => "running",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::Cancelled => "cancelled",
        }
    }
}

/// Byte-exact image pull progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PullProgress {
    pub layer_id: String,
    pub current_bytes: u64,
    pub total_bytes: u64,
    pub image_current_bytes: u64,
    pub image_total_bytes: u64,
    pub layers_total: u32,
    pub layers_done: u32,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct HealthOutcome {
    pub(crate) check: String,
    pub(crate) healthy: bool,
    pub(crate) attempts: u32,
    pub(crate) message: String,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FailureDiagnostics {
    pub(crate) failed_phase: Option<Phase>,
    pub step: String,
    pub(crate) exit_code: Option<i64>,
    pub(crate) oom_killed: bool,
    pub(crate) log_tail: Vec<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeploymentResult {
    pub(crate) success: bool,
    pub(crate) message: String,
    pub(crate) container_id: String,
    pub(crate) image_digest: String,
    pub(crate) endpoints: BTreeMap<String, String>,
    pub(crate) health: Vec<HealthOutcome>,
    pub(crate) diagnostics: Option<FailureDiagnostics>,
    /// Deploys from source: the commit fetched (and built).
    #[serde(default)]
    pub commit: String,
    /// A removal: the app's containers stopped and removed.
    #[serde(default)]
    pub containers_removed: u32,
}

/// What an update is about, for observers that react to some kinds only. What an
/// observer needs of an event is in its fields, typed: observers never parse
/// `Update::metadata` (that map is for clients, and stays as it was on the wire).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(remote = "Self")]
pub enum EventKind {
    /// The deployment was accepted (always sequence 1).
    Accepted {
        image: String,
        /// Who asked (token name, or peer address without auth).
        requested_by: String,
        /// The names of the env variables; never their values (they may be secrets).
        env_keys: Vec<String>,
        /// Where it runs (older records: docker).
        #[serde(default)]
        target: Target,
        /// Tasks asked for (older records: 1).
        #[serde(default = "one")]
        replicas: u32,
    },
    /// Waiting for the app's lock at `position` (1 = next).
    Queued { position: u32 },
    /// A phase began.
    PhaseStarted,
    /// Progress within the current phase (pull bytes, probe attempts, milestones …).
    Progress,
    /// A line of container or hook output.
    Output,
    /// The cancel was requested and is being carried out.
    Cancelling,
    /// The terminal update: `result` is set.
    Finished { state: DeploymentState },
}

impl serde::Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        EventKind::serialize(self, s)
    }
}

/// Reads what this version writes, and updates stored by versions whose `Accepted`
/// had no fields (`"Accepted"`): those come back with empty fields.
impl<'de> serde::Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Current(#[serde(with = "EventKind")] EventKind),
            Legacy(Legacy),
        }
        #[derive(serde::Deserialize)]
        enum Legacy {
            Accepted,
        }
        Ok(match Stored::deserialize(d)? {
            Stored::Current(kind) => kind,
            Stored::Legacy(Legacy::Accepted) => EventKind::Accepted {
                image: String::new(),
                requested_by: String::new(),
                env_keys: Vec::new(),
                target: Target::Docker,
                replicas: 1,
            },
        })
    }
}

/// A state change, as observers (audit log, webhooks) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateChange {
    Accepted,
    PhaseStarted,
    Cancelling,
    Finished(DeploymentState),
}

impl EventKind {
    /// The state change this event is, if it is one (queue positions, progress and
    /// output are not).
    pub(crate) fn state_change(&self) -> Option<StateChange> {
        match self {
            EventKind::Accepted { .. } => Some(StateChange::Accepted),
            EventKind::PhaseStarted => Some(StateChange::PhaseStarted),
            EventKind::Cancelling => Some(StateChange::Cancelling),
            EventKind::Finished { state } => Some(StateChange::Finished(*state)),
            EventKind::Queued { .. } | EventKind::Progress | EventKind::Output => None,
        }
    }
}

/// A call turned away at the edge (no or an unknown token, a missing scope, the
/// deploy policy): an event for observers, like an update but of no deployment. The
/// audit log records it; nothing here names a secret (only the token's name).
#[derive(Clone, Debug)]
pub struct Refusal {
    pub(crate) time: SystemTime,
    /// The gRPC method (`Deploy`, `GetStatus` …).
    pub(crate) method: String,
    /// The token's name when the token was known.
    pub(crate) caller: Option<String>,
    pub(crate) peer: Option<std::net::SocketAddr>,
    /// The name of the status code answered (`Unauthenticated`, `PermissionDenied` …).
    pub(crate) code: String,
    pub(crate) reason: String,
}

/// One event of a deployment: the domain form of `ProgressUpdate`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Update {
    pub deployment_id: DeploymentId,
    /// A deploy, or a removal (RemoveApp). Stored only when not a deploy.
    #[serde(default, skip_serializing_if = "Operation::is_deploy")]
    pub operation: Operation,
    pub sequence: u64,
    pub app: AppName,
    pub kind: EventKind,
    pub phase: Phase,
    pub phase_progress: f64,
    pub total_progress: f64,
    pub level: Level,
    pub message: String,
    pub timestamp: SystemTime,
    pub elapsed: Duration,
    pub metadata: BTreeMap<String, String>,
    pub pull: Option<PullProgress>,
    pub result: Option<DeploymentResult>,
    /// The time left, once the app has earlier succeeded deployments.
    #[serde(default)]
    pub eta: Option<crate::engine::eta::Eta>,
    /// The update as `ProgressUpdate` bytes, encoded once by the gRPC layer for every
    /// stream that sends it (`api::wire`). Not stored.
    #[serde(skip)]
    pub encoded: EncodedOnce,
}

/// A value computed once from the update it belongs to: a clone starts empty, so an
/// update copied and then changed never carries the bytes of the original.
#[derive(Debug, Default)]
pub struct EncodedOnce(std::sync::OnceLock<Box<[u8]>>);

impl EncodedOnce {
    #[cfg(test)]
    pub(crate) fn get(&self) -> Option<&[u8]> {
        self.0.get().map(|b| &b[..])
    }

    pub(crate) fn get_or_init(&self, encode: impl FnOnce() -> Vec<u8>) -> &[u8] {
        self.0.get_or_init(|| encode().into_boxed_slice())
    }
}

impl Clone for EncodedOnce {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Update {
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self.kind, EventKind::Finished { .. })
    }
}

#[cfg(test)]
impl EventKind {
    /// `Accepted` of image `img:1` by `127.0.0.1:9` with env keys `A` and `B`.
    pub(crate) fn accepted_for_test() -> Self {
        EventKind::Accepted {
            image: "img:1".into(),
            requested_by: "127.0.0.1:9".into(),
            env_keys: vec!["A".into(), "B".into()],
            target: Target::Docker,
            replicas: 1,
        }
    }
}

#[cfg(test)]
impl Update {
    /// A plain update for unit tests: app `app`, phase PULLING, kind `Progress`, or the
    /// terminal `Finished { Succeeded }` when `terminal`. Override fields as needed.
    pub(crate) fn for_test(sequence: u64, terminal: bool) -> Self {
        Self {
            deployment_id: DeploymentId::new(),
            operation: Operation::Deploy,
            sequence,
            app: AppName::parse("app").expect("valid app name"),
            kind: if terminal {
                EventKind::Finished {
                    state: DeploymentState::Succeeded,
                }
            } else {
                EventKind::Progress
            },
            phase: Phase::Pulling,
            phase_progress: 0.0,
            total_progress: 0.0,
            level: Level::Info,
            message: format!("update {sequence}"),
            timestamp: SystemTime::now(),
            elapsed: Duration::ZERO,
            metadata: BTreeMap::new(),
            pull: None,
            result: None,
            eta: None,
            encoded: Default::default(),
        }
    }
}

/// A point-in-time view of a deployment, for GetStatus and ListDeployments.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DeploymentStatus {
    pub id: DeploymentId,
    /// A deploy, or a removal (RemoveApp).
    #[serde(default)]
    pub operation: Operation,
    pub app: AppName,
    pub image: String,
    pub state: DeploymentState,
    pub phase: Phase,
    pub phase_progress: f64,
    pub total_progress: f64,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub error: String,
    pub result: Option<DeploymentResult>,
    pub last_sequence: u64,
    pub requested_by: String,
    pub queue_position: u32,
    /// The later successful deployment of the app that replaced this one (filled in
    /// when read, never stored).
    #[serde(default, skip_serializing)]
    pub superseded_by: Option<DeploymentId>,
    /// Deploys from source: the commit, once fetched.
    #[serde(default)]
    pub commit: String,
    /// As of the last update; `None` once ended.
    #[serde(default)]
    pub eta: Option<crate::engine::eta::Eta>,
    /// Where the deployment runs (older records: docker).
    #[serde(default)]
    pub target: Target,
    /// Tasks asked for (Swarm target); 1 on the docker target.
    #[serde(default = "one")]
    pub replicas: u32,
}

fn one() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_reads_back_and_old_records_still_read() {
        let kind = EventKind::Accepted {
            image: "img:1".into(),
            requested_by: "ci".into(),
            env_keys: vec!["A,B".into(), "C".into()],
            target: Target::Swarm,
            replicas: 3,
        };
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        let old: EventKind = serde_json::from_str("\"Accepted\"").unwrap();
        assert!(matches!(old, EventKind::Accepted { env_keys, .. } if env_keys.is_empty()));
        for kind in [EventKind::Progress, EventKind::Queued { position: 2 }] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
    }

    #[test]
    fn app_names() {
        for ok in ["a", "web", "my-app-2", "0x", &"a".repeat(63)] {
            assert!(AppName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Web", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(AppName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weights_add_up_and_offsets_increase() {
        let sum: f64 = Phase::WORK.iter().map(|p| p.weight()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "weights sum to {sum}");
        // Each phase starts where the previous one ends.
        let mut end_of_previous = 0.0;
        for p in Phase::WORK {
            assert!((p.start_offset() - end_of_previous).abs() < 1e-9, "{p:?}");
            end_of_previous = p.start_offset() + p.weight();
        }
        assert!((Phase::Cleanup.start_offset() + Phase::Cleanup.weight() - 1.0).abs() < 1e-9);
    }
}
