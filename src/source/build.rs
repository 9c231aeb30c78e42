//! Building an image with Docker's classic builder (`POST /build?version=1`) from a packed
//! context, and reading its JSON stream as typed events.
//!
//! The stream (moby 20.10, `builder/dockerfile`): `{"stream":"Step 3/7 : RUN …\n"}` starts a
//! step; `" ---> Using cache"` marks it cached; `" ---> Running in <id>"` names the step's
//! container; other `stream` text is the step's output; `{"status","progressDetail","id"}`
//! is the pull of a `FROM` image; `{"aux":{"ID":…}}` ends each stage (the last is the
//! image); an error arrives as `errorDetail`, which bollard turns into
//! `Err(DockerStreamError)`. [`BuildParser`] is the pure reader; [`build`] runs a build.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::BuildInfo;
use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion};
use futures_util::StreamExt;
use regex::Regex;
use tokio_util::sync::CancellationToken;

use super::context::{ContextError, PackOptions, pack};
use crate::model::FailureDiagnostics;

/// Output lines kept per step for a failure's diagnostics.
pub(crate) const LOG_TAIL_LINES: usize = 20;

/// A step as the builder announced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStep {
    /// 1-based.
    pub number: u32,
    pub total: u32,
    /// The instruction as the builder printed it (`RUN make`).
    pub instruction: String,
}

/// What a build reports while it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum BuildEvent {
    /// An image for this commit exists already: no build.
    Skipped { tag: String, image_id: String },
    /// The context was packed and is being sent.
    Context {
        files: u64,
        bytes: u64,
        excluded: u64,
    },
    /// A step started.
    Step(BuildStep),
    /// The current step was taken from the build cache.
    Cached { number: u32 },
    /// The current step runs in this container.
    Running { number: u32, container: String },
    /// A line the step printed. `skipped` lines were left out just before it (throttle).
    Output {
        step: Option<u32>,
        line: String,
        skipped: u64,
    },
    /// Pulling the `FROM` image: one layer's status and bytes.
    Pull {
        layer_id: String,
        status: String,
        current: Option<u64>,
        total: Option<u64>,
    },
    /// A stage ended with this image (the last one is the result).
    Image { id: String },
}

/// A failed build, for diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildFailure {
    /// The step that failed, when one had started.
    pub step: Option<BuildStep>,
    /// The builder's message (`The command '/bin/sh -c make' returned a non-zero code: 2`).
    pub(crate) message: String,
    /// The exit code of a failing `RUN`.
    pub exit_code: Option<i64>,
    /// The step's last output lines (at most [`LOG_TAIL_LINES`]).
    pub log_tail: Vec<String>,
}

impl BuildFailure {
    /// One line naming the step: `step 3/3 (RUN make) failed: …`.
    pub(crate) fn summary(&self) -> String {
        match &self.step {
            Some(s) => format!(
                "step {}/{} ({}) failed: {}",
                s.number, s.total, s.instruction, self.message
            ),
            None => format!("build failed: {}", self.message),
        }
    }

    /// As the engine's failure diagnostics (the engine sets the phase).
    pub fn diagnostics(&self) -> FailureDiagnostics {
        FailureDiagnostics {
            failed_phase: None,
            step: match &self.step {
                Some(s) => format!("step {}/{}: {}", s.number, s.total, s.instruction),
                None => "build".into(),
            },
            exit_code: self.exit_code,
            oom_killed: false,
            log_tail: self.log_tail.clone(),
        }
    }
}

static STEP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Step (\d+)/(\d+) : (.*)$").expect("regex"));
static EXIT_CODE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"returned a non-zero code: (-?\d+)").expect("regex"));
static RUNNING_IN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^ ---> Running in ([0-9a-f]+)$").expect("regex"));
/// Colour codes: the classic builder paints a step's stderr red (`ESC[91m … ESC[0m`).
static ANSI: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").expect("regex"));
static LAYER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^ ---> [0-9a-f]{12,64}$").expect("regex"));

/// Reads the classic builder's stream into [`BuildEvent`]s. Pure: no IO, no clock.
#[derive(Debug, Default)]
pub(crate) struct BuildParser {
    step: Option<BuildStep>,
    cached: Vec<u32>,
    partial: String,
    tail: VecDeque<String>,
    image_id: Option<String>,
    failure: Option<BuildFailure>,
}

impl BuildParser {
    /// Folds one message in and returns what it meant.
    pub(crate) fn push(&mut self, info: &BuildInfo) -> Vec<BuildEvent> {
        let mut events = Vec::new();
        if let Some(text) = &info.stream {
            self.partial.push_str(text);
            while let Some(pos) = self.partial.find('\n') {
                let line: String = self.partial.drain(..=pos).collect();
                self.line(line.trim_end_matches(['\n', '\r']), &mut events);
            }
        }
        if let Some(status) = &info.status {
            let detail = info.progress_detail.as_ref();
            let positive = |v: Option<i64>| v.filter(|v| *v >= 0).map(|v| v as u64);
            events.push(BuildEvent::Pull {
                layer_id: info.id.clone().unwrap_or_default(),
                status: status.clone(),
                current: positive(detail.and_then(|d| d.current)),
                total: positive(detail.and_then(|d| d.total)),
            });
        }
        if let Some(id) = info.aux.as_ref().and_then(|a| a.id.clone()) {
            self.image_id = Some(id.clone());
            events.push(BuildEvent::Image { id });
        }
        if let Some(detail) = &info.error_detail {
            let message = detail
                .message
                .clone()
                .or_else(|| info.stream.clone())
                .unwrap_or_else(|| "unknown build error".into());
            events.extend(self.finish());
            self.fail(&message);
        }
        events
    }

    fn line(&mut self, raw: &str, events: &mut Vec<BuildEvent>) {
        // A progress bar rewritten with \r: its last state is the line.
        let raw = raw.rsplit('\r').next().unwrap_or(raw);
        let plain = ANSI.replace_all(raw, "");
        let line = plain.as_ref();
        if let Some(c) = STEP.captures(line) {
            let step = BuildStep {
                number: c[1].parse().unwrap_or(0),
                total: c[2].parse().unwrap_or(0),
                instruction: c[3].trim().to_owned(),
            };
            self.tail.clear();
            self.step = Some(step.clone());
            events.push(BuildEvent::Step(step));
            return;
        }
        let number = self.step.as_ref().map(|s| s.number);
        if line == " ---> Using cache" {
            if let Some(n) = number {
                if !self.cached.contains(&n) {
                    self.cached.push(n);
                }
                events.push(BuildEvent::Cached { number: n });
            }
            return;
        }
        if let Some(c) = RUNNING_IN.captures(line) {
            if let Some(n) = number {
                events.push(BuildEvent::Running {
                    number: n,
                    container: c[1].to_owned(),
                });
            }
            return;
        }
        if LAYER.is_match(line)
            || line.starts_with("Removing intermediate container ")
            || line.starts_with("Successfully tagged ")
            || line.trim().is_empty()
        {
            return;
        }
        if let Some(id) = line.strip_prefix("Successfully built ") {
            if self.image_id.is_none() {
                self.image_id = Some(id.trim().to_owned());
            }
            return;
        }
        if self.tail.len() == LOG_TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
        events.push(BuildEvent::Output {
            step: number,
            line: line.to_owned(),
            skipped: 0,
        });
    }

    /// The stream ended: flushes an unfinished output line.
    pub(crate) fn finish(&mut self) -> Vec<BuildEvent> {
        let mut events = Vec::new();
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(rest.trim_end_matches(['\n', '\r']), &mut events);
        }
        events
    }

    /// Records the build's error (from `errorDetail`) and returns the failure it makes.
    pub(crate) fn fail(&mut self, message: &str) -> BuildFailure {
        let message = message.trim().to_owned();
        let failure = BuildFailure {
            step: self.step.clone(),
            exit_code: EXIT_CODE.captures(&message).and_then(|c| c[1].parse().ok()),
            message,
            log_tail: self.tail.iter().cloned().collect(),
        };
        self.failure = Some(failure.clone());
        failure
    }

    pub(crate) fn failure(&self) -> Option<&BuildFailure> {
        self.failure.as_ref()
    }

    /// The step running now (or last).
    pub(crate) fn step(&self) -> Option<&BuildStep> {
        self.step.as_ref()
    }

    /// Whether step `number` came from the cache.
    pub(crate) fn is_cached(&self, number: u32) -> bool {
        self.cached.contains(&number)
    }

    pub(crate) fn cached_steps(&self) -> u32 {
        self.cached.len() as u32
    }

    /// The image of the last stage that ended.
    #[cfg(test)]
    pub(crate) fn image_id(&self) -> Option<&str> {
        self.image_id.as_deref()
    }
}

/// A line that the throttle lets through, with how many were left out just before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Throttled {
    pub(crate) line: String,
    pub(crate) skipped: u64,
}

/// At most `max` lines per `window`; lines over the budget are dropped except the latest,
/// which is held and let through when the next window starts or at [`LineThrottle::flush`]
/// — so the last line of a burst is never lost, and the count of dropped lines is told.
#[derive(Debug)]
pub(crate) struct LineThrottle {
    max: u32,
    window: Duration,
    window_start: Option<Instant>,
    sent: u32,
    held: Option<String>,
    skipped: u64,
}

impl LineThrottle {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        Self {
            max: max.max(1),
            window,
            window_start: None,
            sent: 0,
            held: None,
            skipped: 0,
        }
    }

    fn roll(&mut self, now: Instant, out: &mut Vec<Throttled>) {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.sent = 0;
            if let Some(line) = self.held.take() {
                self.sent = 1;
                out.push(Throttled {
                    line,
                    skipped: std::mem::take(&mut self.skipped),
                });
            }
        }
    }

    /// Offers a line at `now`; returns the lines to emit now (none, it, or a held one
    /// first).
    pub(crate) fn offer(&mut self, now: Instant, line: String) -> Vec<Throttled> {
        let mut out = Vec::new();
        self.roll(now, &mut out);
        if self.sent < self.max {
            self.sent += 1;
            out.push(Throttled {
                line,
                skipped: std::mem::take(&mut self.skipped),
            });
        } else if self.held.replace(line).is_some() {
            self.skipped += 1;
        }
        out
    }

    /// Lets a held line through once its window is over (call it on a timer or on any
    /// other event).
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Throttled> {
        let mut out = Vec::new();
        if self.held.is_some() {
            self.roll(now, &mut out);
        }
        out
    }

    /// Lets the held line through now (a step ended, or the build did).
    pub(crate) fn flush(&mut self) -> Option<Throttled> {
        self.held.take().map(|line| Throttled {
            line,
            skipped: std::mem::take(&mut self.skipped),
        })
    }
}

/// Build events on their way out: output lines through a [`LineThrottle`], every other
/// event after the output held back before it.
struct OutputGate {
    throttle: LineThrottle,
    /// The step of the latest line offered (the one held, if any).
    step: Option<u32>,
}

impl OutputGate {
    fn new(lines_per_sec: u32) -> Self {
        Self {
            throttle: LineThrottle::new(lines_per_sec, Duration::from_secs(1)),
            step: None,
        }
    }

    fn send(&self, t: Throttled, on_event: &mut (dyn FnMut(BuildEvent) + Send)) {
        on_event(BuildEvent::Output {
            step: self.step,
            line: t.line,
            skipped: t.skipped,
        });
    }

    fn emit(&mut self, event: BuildEvent, on_event: &mut (dyn FnMut(BuildEvent) + Send)) {
        match event {
            BuildEvent::Output { step, line, .. } => {
                // A held line has the same step: a new step flushes it first.
                self.step = step;
                for t in self.throttle.offer(Instant::now(), line) {
                    self.send(t, on_event);
                }
            }
            other => {
                self.flush(on_event);
                on_event(other);
            }
        }
    }

    /// Lets a held line out once its window is over.
    fn tick(&mut self, on_event: &mut (dyn FnMut(BuildEvent) + Send)) {
        for t in self.throttle.tick(Instant::now()) {
            self.send(t, on_event);
        }
    }

    fn flush(&mut self, on_event: &mut (dyn FnMut(BuildEvent) + Send)) {
        if let Some(t) = self.throttle.flush() {
            self.send(t, on_event);
        }
    }
}

/// The tag of an app's image built from `commit`.
pub(crate) fn image_tag(app: &str, commit: &str) -> String {
    format!("stevedore/{app}:{commit}")
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    pub(crate) app: String,
    /// The full commit SHA the context was checked out at (the image's tag).
    pub(crate) commit: String,
    /// The context directory (the checkout, or a directory inside it).
    pub(crate) context_dir: PathBuf,
    /// Relative to `context_dir`.
    pub(crate) dockerfile: String,
    pub(crate) build_args: HashMap<String, String>,
    /// VERBOSE output budget: at most this many lines per second (the last always comes).
    pub(crate) output_lines_per_sec: u32,
    /// Give up when the builder says nothing for this long.
    pub(crate) idle_timeout: Duration,
    /// Timeout of each single Docker call (inspect).
    pub(crate) call_timeout: Duration,
    /// Refuse a larger context.
    pub(crate) max_context_bytes: u64,
}

impl BuildSpec {
    pub fn new(app: &str, commit: &str, context_dir: PathBuf) -> Self {
        Self {
            app: app.to_owned(),
            commit: commit.to_owned(),
            context_dir,
            dockerfile: "Dockerfile".into(),
            build_args: HashMap::new(),
            output_lines_per_sec: 20,
            idle_timeout: Duration::from_secs(30 * 60),
            call_timeout: Duration::from_secs(30),
            max_context_bytes: PackOptions::default().max_bytes,
        }
    }

    pub(crate) fn tag(&self) -> String {
        image_tag(&self.app, &self.commit)
    }
}

/// How long one step took, for the ETA's per-step history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepTiming {
    pub(crate) number: u32,
    pub(crate) instruction: String,
    pub cached: bool,
    pub(crate) duration: Duration,
}

/// The result of [`build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    Built {
        tag: String,
        image_id: String,
        total_steps: u32,
        cached_steps: u32,
        steps: Vec<StepTiming>,
    },
    /// The tag existed: nothing was built.
    Skipped { tag: String, image_id: String },
}

impl BuildOutcome {
    pub(crate) fn tag(&self) -> &str {
        match self {
            Self::Built { tag, .. } | Self::Skipped { tag, .. } => tag,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Context(#[from] ContextError),
    #[error("{}", .0.summary())]
    Failed(BuildFailure),
    #[error("docker engine: {0}")]
    Docker(bollard::errors::Error),
    #[error("the builder said nothing for {0:?}")]
    Idle(Duration),
    #[error("docker call timed out after {0:?}")]
    Timeout(Duration),
    #[error("the build finished but image {0} is not there")]
    NoImage(String),
    #[error("the build was cancelled")]
    Cancelled,
}

/// The image ID of `tag`, or `None` when there is no such image.
pub(crate) async fn existing_image(
    docker: &Docker,
    tag: &str,
    timeout: Duration,
) -> Result<Option<String>, BuildError> {
    match tokio::time::timeout(timeout, docker.inspect_image(tag)).await {
        Err(_) => Err(BuildError::Timeout(timeout)),
        Ok(Ok(image)) => Ok(Some(image.id.unwrap_or_default())),
        Ok(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        })) => Ok(None),
        Ok(Err(e)) => Err(BuildError::Docker(e)),
    }
}

/// Builds `spec` and tags it `stevedore/<app>:<commit>`, or skips the build when that tag
/// exists. Events go to `on_event` as they happen (output throttled). Cancelling drops
/// the build's stream, which makes the engine stop the build and remove its container.
pub async fn build(
    docker: &Docker,
    spec: &BuildSpec,
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(BuildEvent) + Send),
) -> Result<BuildOutcome, BuildError> {
    let tag = spec.tag();
    if let Some(image_id) = existing_image(docker, &tag, spec.call_timeout).await? {
        on_event(BuildEvent::Skipped {
            tag: tag.clone(),
            image_id: image_id.clone(),
        });
        return Ok(BuildOutcome::Skipped { tag, image_id });
    }
    let packed = pack_context(spec, cancel).await?;
    on_event(BuildEvent::Context {
        files: packed.files,
        bytes: packed.bytes,
        excluded: packed.excluded,
    });
    let dockerfile = super::context::relative_path("dockerfile", &spec.dockerfile)?;
    let options = BuildImageOptionsBuilder::default()
        .dockerfile(&dockerfile)
        .t(&tag)
        .rm(true)
        .forcerm(true)
        .buildargs(&spec.build_args)
        .version(BuilderVersion::BuilderV1)
        .build();
    let stream = docker.build_image(options, None, Some(bollard::body_full(packed.tar.into())));
    let (parser, mut clock) = follow_build(stream, spec, cancel, on_event).await?;
    if let Some(failure) = parser.failure() {
        return Err(BuildError::Failed(failure.clone()));
    }
    clock.close(&parser);
    let image_id = existing_image(docker, &tag, spec.call_timeout)
        .await?
        .ok_or_else(|| BuildError::NoImage(tag.clone()))?;
    Ok(BuildOutcome::Built {
        tag,
        image_id,
        total_steps: parser.step().map_or(0, |s| s.total),
        cached_steps: parser.cached_steps(),
        steps: clock.steps,
    })
}

/// The build context, packed on a blocking thread (unless cancelled first).
async fn pack_context(
    spec: &BuildSpec,
    cancel: &CancellationToken,
) -> Result<super::context::PackedContext, BuildError> {
    let options = PackOptions {
        dockerfile: spec.dockerfile.clone(),
        max_bytes: spec.max_context_bytes,
        ..PackOptions::default()
    };
    let dir = spec.context_dir.clone();
    let packing = tokio::task::spawn_blocking(move || pack(&dir, &options));
    let packed = tokio::select! {
        _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        packed = packing => packed.map_err(|e| ContextError::Io(std::io::Error::other(e)))??,
    };
    Ok(packed)
}

/// Each step's duration, from its announcement to the next one's (or the build's end).
#[derive(Default)]
struct StepClock {
    steps: Vec<StepTiming>,
    started: Option<(BuildStep, Instant)>,
}

impl StepClock {
    fn start(&mut self, parser: &BuildParser, step: &BuildStep) {
        self.close(parser);
        self.started = Some((step.clone(), Instant::now()));
    }

    fn close(&mut self, parser: &BuildParser) {
        if let Some((step, at)) = self.started.take() {
            self.steps.push(StepTiming {
                number: step.number,
                cached: parser.is_cached(step.number),
                instruction: step.instruction,
                duration: at.elapsed(),
            });
        }
    }
}

/// Reads the build's stream until it ends or the build fails (events to `on_event`,
/// output throttled); `Err` when it is cancelled, goes idle or the engine fails.
async fn follow_build(
    stream: impl futures_util::Stream<Item = Result<BuildInfo, bollard::errors::Error>>,
    spec: &BuildSpec,
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(BuildEvent) + Send),
) -> Result<(BuildParser, StepClock), BuildError> {
    let mut stream = std::pin::pin!(stream);
    let mut parser = BuildParser::default();
    let mut gate = OutputGate::new(spec.output_lines_per_sec);
    let mut clock = StepClock::default();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
            next = tokio::time::timeout(spec.idle_timeout, stream.next()) => next,
        };
        let item = match next {
            Err(_) => return Err(BuildError::Idle(spec.idle_timeout)),
            Ok(None) => break,
            Ok(Some(item)) => item,
        };
        match item {
            Ok(info) => {
                for event in parser.push(&info) {
                    if let BuildEvent::Step(step) = &event {
                        clock.start(&parser, step);
                    }
                    gate.emit(event, on_event);
                }
                gate.tick(on_event);
                if parser.failure().is_some() {
                    break;
                }
            }
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                for event in parser.finish() {
                    gate.emit(event, on_event);
                }
                parser.fail(&error);
                break;
            }
            Err(e) => return Err(BuildError::Docker(e)),
        }
    }
    for event in parser.finish() {
        gate.emit(event, on_event);
    }
    gate.flush(on_event);
    Ok((parser, clock))
}

#[cfg(test)]
mod tests {
    use bollard::models::{ErrorDetail, ImageId, ProgressDetail};

    use super::*;

    fn stream(text: &str) -> BuildInfo {
        BuildInfo {
            stream: Some(text.into()),
            ..Default::default()
        }
    }

    fn run(parser: &mut BuildParser, messages: &[BuildInfo]) -> Vec<BuildEvent> {
        let mut out = Vec::new();
        for m in messages {
            out.extend(parser.push(m));
        }
        out.extend(parser.finish());
        out
    }

    fn step(n: u32, m: u32, i: &str) -> BuildEvent {
        BuildEvent::Step(BuildStep {
            number: n,
            total: m,
            instruction: i.into(),
        })
    }

    fn output(step: u32, line: &str) -> BuildEvent {
        BuildEvent::Output {
            step: Some(step),
            line: line.into(),
            skipped: 0,
        }
    }

    #[test]
    fn steps_cache_hits_output_and_the_final_image() {
        let mut p = BuildParser::default();
        let events = run(
            &mut p,
            &[
                stream("Step 1/3 : FROM stevedore-test/base:1"),
                stream("\n"),
                stream(" ---> eeccf6ab5391\n"),
                stream("Step 2/3 : COPY . /app\n"),
                stream(" ---> Using cache\n"),
                stream(" ---> 0123456789ab\n"),
                stream("Step 3/3 : RUN echo hello && echo world\n"),
                stream(" ---> Running in 5f1d2c3b4a69\n"),
                stream("hel"),
                stream("lo\nworld\n"),
                stream("Removing intermediate container 5f1d2c3b4a69\n"),
                stream(" ---> 89abcdef0123\n"),
                BuildInfo {
                    aux: Some(ImageId {
                        id: Some("sha256:89abcdef".into()),
                    }),
                    ..Default::default()
                },
                stream("Successfully built 89abcdef0123\n"),
                stream("Successfully tagged stevedore/app:abc\n"),
            ],
        );
        assert_eq!(
            events,
            vec![
                step(1, 3, "FROM stevedore-test/base:1"),
                step(2, 3, "COPY . /app"),
                BuildEvent::Cached { number: 2 },
                step(3, 3, "RUN echo hello && echo world"),
                BuildEvent::Running {
                    number: 3,
                    container: "5f1d2c3b4a69".into()
                },
                output(3, "hello"),
                output(3, "world"),
                BuildEvent::Image {
                    id: "sha256:89abcdef".into()
                },
            ]
        );
        assert_eq!(p.image_id(), Some("sha256:89abcdef"));
        assert_eq!(p.cached_steps(), 1);
        assert!(p.is_cached(2) && !p.is_cached(3));
        assert!(p.failure().is_none());
    }

    #[test]
    fn the_last_stage_image_is_the_result() {
        let mut p = BuildParser::default();
        let aux = |id: &str| BuildInfo {
            aux: Some(ImageId {
                id: Some(id.into()),
            }),
            ..Default::default()
        };
        run(&mut p, &[aux("sha256:builder"), aux("sha256:final")]);
        assert_eq!(p.image_id(), Some("sha256:final"));
        let mut p = BuildParser::default();
        run(&mut p, &[stream("Successfully built 0123456789ab\n")]);
        assert_eq!(p.image_id(), Some("0123456789ab"), "fallback without aux");
    }

    #[test]
    fn base_image_pull_progress() {
        let mut p = BuildParser::default();
        let events = p.push(&BuildInfo {
            status: Some("Downloading".into()),
            id: Some("a1b2c3".into()),
            progress_detail: Some(ProgressDetail {
                current: Some(512),
                total: Some(2048),
            }),
            ..Default::default()
        });
        assert_eq!(
            events,
            vec![BuildEvent::Pull {
                layer_id: "a1b2c3".into(),
                status: "Downloading".into(),
                current: Some(512),
                total: Some(2048)
            }]
        );
        let events = p.push(&BuildInfo {
            status: Some("Pulling from stevedore-test/base".into()),
            ..Default::default()
        });
        assert!(matches!(
            &events[0],
            BuildEvent::Pull {
                current: None,
                total: None,
                ..
            }
        ));
    }

    #[test]
    fn a_failing_run_names_the_step_its_output_and_exit_code() {
        let mut p = BuildParser::default();
        run(
            &mut p,
            &[
                stream("Step 1/2 : FROM base\n"),
                stream("Step 2/2 : RUN echo compiling && exit 3\n"),
                stream(" ---> Running in 0123456789ab\n"),
                stream("compiling\n"),
                stream("error: missing semicolon"),
            ],
        );
        let f =
            p.fail("The command '/bin/sh -c echo compiling && exit 3' returned a non-zero code: 3");
        assert_eq!(f.exit_code, Some(3));
        assert_eq!(f.step.as_ref().unwrap().number, 2);
        assert_eq!(
            f.log_tail,
            vec![
                "compiling".to_owned(),
                "error: missing semicolon".to_owned()
            ]
        );
        assert_eq!(
            f.summary(),
            "step 2/2 (RUN echo compiling && exit 3) failed: The command '/bin/sh -c echo compiling && exit 3' returned a non-zero code: 3"
        );
        let d = f.diagnostics();
        assert_eq!(d.step, "step 2/2: RUN echo compiling && exit 3");
        assert_eq!(d.exit_code, Some(3));
    }

    #[test]
    fn an_error_detail_in_the_message_is_a_failure_too() {
        let mut p = BuildParser::default();
        p.push(&stream("Step 2/3 : COPY missing /x\n"));
        p.push(&BuildInfo {
            error_detail: Some(ErrorDetail {
                code: None,
                message: Some("COPY failed: file not found in build context".into()),
            }),
            ..Default::default()
        });
        let f = p.failure().unwrap();
        assert_eq!(f.exit_code, None);
        assert_eq!(f.step.as_ref().unwrap().instruction, "COPY missing /x");
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines_of_the_failing_step_only() {
        let mut p = BuildParser::default();
        p.push(&stream("Step 1/2 : RUN echo first\nfirst\n"));
        p.push(&stream("Step 2/2 : RUN seq 100\n"));
        for i in 1..=100 {
            p.push(&stream(&format!("{i}\n")));
        }
        let f = p.fail("returned a non-zero code: 1");
        assert_eq!(f.log_tail.len(), LOG_TAIL_LINES);
        assert_eq!(f.log_tail.first().unwrap(), "81");
        assert_eq!(f.log_tail.last().unwrap(), "100");
    }

    #[test]
    fn colour_codes_are_removed() {
        let mut p = BuildParser::default();
        let events = run(
            &mut p,
            &[
                stream("Step 1/1 : RUN x\n"),
                stream("\u{1b}[91mmain.c:3: error\n"),
                stream("\u{1b}[0mRemoving intermediate container 0123456789ab\n"),
            ],
        );
        assert_eq!(events[1..], [output(1, "main.c:3: error")]);
    }

    #[test]
    fn carriage_return_progress_keeps_its_last_state() {
        let mut p = BuildParser::default();
        let events = run(&mut p, &[stream("Step 1/1 : RUN x\n10%\r50%\r100%\n")]);
        assert_eq!(events[1], output(1, "100%"));
    }

    #[test]
    fn throttle_caps_lines_and_never_loses_the_last() {
        let t0 = Instant::now();
        let mut t = LineThrottle::new(2, Duration::from_secs(1));
        let mut got = Vec::new();
        for i in 0..10 {
            got.extend(t.offer(t0 + Duration::from_millis(i * 10), format!("l{i}")));
        }
        assert_eq!(
            got,
            vec![
                Throttled {
                    line: "l0".into(),
                    skipped: 0
                },
                Throttled {
                    line: "l1".into(),
                    skipped: 0
                },
            ]
        );
        // Nothing before the window ends; then the held (latest) line.
        assert!(t.tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(
            t.tick(t0 + Duration::from_millis(1000)),
            vec![Throttled {
                line: "l9".into(),
                skipped: 7
            }]
        );
        // One slot of the new window is used by the held line.
        let got = t.offer(t0 + Duration::from_millis(1100), "m0".into());
        assert_eq!(
            got,
            vec![Throttled {
                line: "m0".into(),
                skipped: 0
            }]
        );
        let got = t.offer(t0 + Duration::from_millis(1200), "m1".into());
        assert!(got.is_empty());
        assert_eq!(
            t.flush(),
            Some(Throttled {
                line: "m1".into(),
                skipped: 0
            })
        );
        assert_eq!(t.flush(), None);
    }

    #[test]
    fn throttle_lets_a_held_line_out_first_in_the_next_window() {
        let t0 = Instant::now();
        let mut t = LineThrottle::new(1, Duration::from_secs(1));
        t.offer(t0, "a".into());
        t.offer(t0, "b".into());
        t.offer(t0, "c".into());
        let got = t.offer(t0 + Duration::from_secs(2), "d".into());
        assert_eq!(
            got,
            vec![Throttled {
                line: "c".into(),
                skipped: 1
            }],
            "the held line takes the new window's only slot; d is held"
        );
        assert_eq!(
            t.flush(),
            Some(Throttled {
                line: "d".into(),
                skipped: 0
            })
        );
    }

    #[test]
    fn held_output_keeps_its_step_and_comes_before_the_next_step() {
        let mut gate = OutputGate::new(1);
        let mut out = Vec::new();
        let mut sink = |e: BuildEvent| out.push(e);
        gate.emit(output(1, "a"), &mut sink);
        gate.emit(output(1, "b"), &mut sink);
        gate.emit(output(1, "c"), &mut sink);
        gate.emit(step(2, 2, "RUN x"), &mut sink);
        assert_eq!(
            out,
            vec![
                output(1, "a"),
                BuildEvent::Output {
                    step: Some(1),
                    line: "c".into(),
                    skipped: 1
                },
                step(2, 2, "RUN x"),
            ]
        );
    }

    #[test]
    fn tags_name_the_app_and_commit() {
        assert_eq!(image_tag("web", "0123abc"), "stevedore/web:0123abc");
    }
}
