//! FETCHING and BUILDING of a deploy from source: [`crate::source::git::fetch`] into the
//! app's cache, then [`Runtime::build_image`], their events turned into updates. The
//! URL's credential only reaches git; every line shown is passed through `redact_url`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::deployment::{Extra, Reporter};
use super::eta::StepSample;
use super::pull::PullTracker;
use super::run::Failure;
use super::run::StepOutput;
use crate::model::{Level, Phase, SourceSpec};
use crate::runtime::docker::layer_status;
use crate::runtime::{PullEvent, Runtime};
use crate::source::build::{BuildError, BuildEvent, BuildOutcome, BuildSpec, BuildStep};
use crate::source::git::{self, FetchEvent, GitProgress, GitSource, GitStage};

/// At most this many progress updates per second for git's and the base pull's
/// progress (a stage's last one always goes out).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A throttle for progress updates.
#[derive(Default)]
struct Every {
    last: Option<Instant>,
}

impl Every {
    fn due(&mut self, force: bool) -> bool {
        if !force && self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return false;
        }
        self.last = Some(Instant::now());
        true
    }
}

/// FETCHING: fetches `source` into `cache` and returns the commit and the worktree
/// (`file://` and local paths only with `allow_local`).
pub(super) async fn fetch(
    rep: &mut Reporter,
    source: &SourceSpec,
    cache: &Path,
    allow_local: bool,
) -> Result<git::Fetched, Failure> {
    rep.enter(Phase::Fetching, format!("fetching {}", source.describe()));
    let git_source = GitSource {
        url: source.url.clone(),
        reference: source.reference.clone(),
        allow_local,
    };
    // Dropping this step (cancel, deadline, shutdown) kills git's process group.
    let never = CancellationToken::new();
    let mut every = Every::default();
    let mut on_event = |event: FetchEvent| report_fetch_event(rep, &mut every, event);
    let fetched = git::fetch(cache, &git_source, &never, &mut on_event)
        .await
        .map_err(|e| {
            Failure::new(
                Phase::Fetching,
                "git fetch",
                git::redact_url(&e.to_string()),
            )
        })?;
    rep.set_commit(&fetched.commit, None);
    report_fetched(rep, &fetched);
    Ok(fetched)
}

/// One of git's events as an update (its progress throttled by `every`).
fn report_fetch_event(rep: &mut Reporter, every: &mut Every, event: FetchEvent) {
    match event {
        FetchEvent::Started { url, incremental } => rep.progress(
            0.0,
            Level::Info,
            if incremental {
                format!(
                    "fetching new objects from {} into the app's cache",
                    git::redact_url(&url)
                )
            } else {
                format!("cloning {} into the app's cache", git::redact_url(&url))
            },
            Extra::meta([("incremental", incremental.to_string())]),
        ),
        FetchEvent::Progress(p) => report_git_progress(rep, every, &p),
        FetchEvent::Output(line) => rep.output(git::redact_url(&line), Extra::default()),
        FetchEvent::Commit { reference, sha } => rep.progress(
            0.95,
            Level::Info,
            format!("{reference} is commit {sha}"),
            Extra::meta([("commit", sha)]),
        ),
    }
}

/// One of git's progress lines as an update: receiving the objects is the first 90% of
/// the step, resolving and updating the files end at 90%. A stage's last line always
/// goes out, others at most every [`PROGRESS_INTERVAL`].
fn report_git_progress(rep: &mut Reporter, every: &mut Every, p: &GitProgress) {
    if !every.due(p.done) {
        return;
    }
    let fraction = match (&p.stage, p.fraction()) {
        (GitStage::Receiving, Some(f)) => f * 0.9,
        (GitStage::Resolving | GitStage::Updating, _) => 0.9,
        _ => 0.0,
    };
    let mut extra = Extra::meta([
        ("stage", p.stage.as_str().to_owned()),
        ("objects", p.current.to_string()),
    ]);
    if let Some(t) = p.total {
        extra.metadata.insert("objects_total".into(), t.to_string());
    }
    if let Some(b) = p.bytes {
        extra.metadata.insert("bytes".into(), b.to_string());
    }
    if let Some(r) = p.bytes_per_sec {
        extra.metadata.insert("bytes_per_sec".into(), r.to_string());
    }
    let total = p.total.map(|t| format!("/{t}")).unwrap_or_default();
    rep.progress(
        fraction,
        Level::Verbose,
        format!("{}: {}{total}", p.stage.as_str(), p.current),
        extra,
    );
}

/// The step's last update: the commit fetched, and whether the cache already held
/// most of it.
fn report_fetched(rep: &mut Reporter, fetched: &git::Fetched) {
    rep.progress(
        1.0,
        Level::Info,
        format!(
            "fetched commit {}{}",
            fetched.commit,
            if fetched.incremental {
                " (incremental)"
            } else {
                ""
            }
        ),
        Extra::meta([
            ("commit", fetched.commit.clone()),
            ("incremental", fetched.incremental.to_string()),
        ]),
    );
}

/// BUILDING: builds (or finds) `stevedore/<app>:<commit>`; returns the outcome.
pub(super) async fn build(
    rep: &mut Reporter,
    runtime: &Arc<dyn Runtime>,
    source: &SourceSpec,
    fetched: &git::Fetched,
) -> Result<BuildOutcome, Failure> {
    let app = rep.deployment().spec.app.to_string();
    let spec = build_spec(&app, source, fetched);
    let tag = spec.tag();
    rep.enter(Phase::Building, format!("building {tag}"));
    let never = CancellationToken::new();
    let mut progress = BuildProgress::default();
    let mut on_event = |event: BuildEvent| progress.report(rep, event);
    let outcome = runtime
        .build_image(&spec, &never, &mut on_event)
        .await
        .map_err(build_failure)?;
    record_built(rep, &outcome);
    rep.set_commit(&fetched.commit, Some(outcome.tag()));
    Ok(outcome)
}

/// What to build: the fetched commit's worktree (or its `context_dir`), with the
/// source's Dockerfile and build arguments.
fn build_spec(app: &str, source: &SourceSpec, fetched: &git::Fetched) -> BuildSpec {
    let context = if source.context_dir.is_empty() {
        fetched.worktree.clone()
    } else {
        fetched.worktree.join(&source.context_dir)
    };
    BuildSpec {
        dockerfile: source.dockerfile.clone(),
        build_args: source.build_args.clone().into_iter().collect(),
        ..BuildSpec::new(app, &fetched.commit, context)
    }
}

/// What a build's updates carry from one event to the next.
#[derive(Default)]
struct BuildProgress {
    /// Steps taken from the cache so far.
    cached: u32,
    /// The step running and the number of steps.
    current: Option<(u32, u32)>,
    /// The base image's pull, when the build pulls it.
    pull: PullTracker,
    every: Every,
}

impl BuildProgress {
    /// One of the build's events as an update (or none), and as a sample for the ETA.
    fn report(&mut self, rep: &mut Reporter, event: BuildEvent) {
        match event {
            BuildEvent::Skipped { tag, image_id } => rep.progress(
                1.0,
                Level::Info,
                format!("commit already built as {tag}: build skipped"),
                Extra::meta([
                    ("build_skipped", "true".into()),
                    ("image", tag),
                    ("image_id", image_id),
                ]),
            ),
            BuildEvent::Context {
                files,
                bytes,
                excluded,
            } => rep.progress(
                0.0,
                Level::Info,
                format!(
                    "sending the build context: {files} files, {bytes} bytes \
                     ({excluded} excluded by .dockerignore)"
                ),
                Extra::meta([
                    ("context_files", files.to_string()),
                    ("context_bytes", bytes.to_string()),
                ]),
            ),
            BuildEvent::Step(s) => self.step(rep, &s),
            BuildEvent::Cached { number } => self.cache_hit(rep, number),
            BuildEvent::Running { .. } => {
                if let Some(eta) = rep.eta_live() {
                    eta.build_cached(false);
                }
            }
            BuildEvent::Image { .. } => {}
            BuildEvent::Output {
                line,
                skipped,
                step,
            } => report_build_output(rep, line, skipped, step),
            BuildEvent::Pull {
                layer_id,
                status,
                current,
                total,
            } => self.base_pull(
                rep,
                &PullEvent::Layer {
                    id: layer_id,
                    status: layer_status(&status),
                    current,
                    total,
                },
            ),
        }
    }

    /// A step starts: "step N/M: INSTRUCTION".
    fn step(&mut self, rep: &mut Reporter, s: &BuildStep) {
        self.current = Some((s.number, s.total));
        if let Some(eta) = rep.eta_live() {
            eta.build_step(s.number, s.total, &s.instruction);
        }
        rep.progress(
            f64::from(s.number - 1) / f64::from(s.total.max(1)),
            Level::Info,
            format!("step {}/{}: {}", s.number, s.total, s.instruction),
            Extra::meta([
                ("step", s.number.to_string()),
                ("steps", s.total.to_string()),
                ("cached_steps", self.cached.to_string()),
            ]),
        );
    }

    /// Step `number` was taken from the cache.
    fn cache_hit(&mut self, rep: &mut Reporter, number: u32) {
        self.cached += 1;
        if let Some(eta) = rep.eta_live() {
            eta.build_cached(true);
        }
        let (_, total) = self.current.unwrap_or((number, number));
        rep.progress(
            0.0,
            Level::Verbose,
            format!("step {number}/{total}: using cache"),
            Extra::meta([
                ("step", number.to_string()),
                ("cached", "true".into()),
                ("cached_steps", self.cached.to_string()),
            ]),
        );
    }

    /// A layer of the base image moved: the whole pull's bytes, at most every
    /// [`PROGRESS_INTERVAL`].
    fn base_pull(&mut self, rep: &mut Reporter, event: &PullEvent) {
        let Some(progress) = self.pull.apply(event) else {
            return;
        };
        if self.every.due(false) {
            rep.progress(
                0.0,
                Level::Verbose,
                format!(
                    "pulling the base image: {} of {} bytes",
                    progress.image_current_bytes, progress.image_total_bytes
                ),
                Extra {
                    pull: Some(progress),
                    ..Default::default()
                },
            );
        }
    }
}

/// A line the build printed, with its step and the lines the throttle dropped before it.
fn report_build_output(rep: &mut Reporter, line: String, skipped: u64, step: Option<u32>) {
    let mut extra = Extra::default();
    if skipped > 0 {
        extra
            .metadata
            .insert("dropped_lines".into(), skipped.to_string());
    }
    if let Some(n) = step {
        extra.metadata.insert("step".into(), n.to_string());
    }
    rep.output(line, extra);
}

/// A failed build as the step's failure: a failing instruction names its step, exit
/// code and log tail.
fn build_failure(e: BuildError) -> Failure {
    match e {
        BuildError::Failed(f) => {
            let d = f.diagnostics();
            Failure {
                phase: Phase::Building,
                step: d.step,
                message: f.summary(),
                output: Some(StepOutput {
                    exit_code: d.exit_code,
                    log_tail: d.log_tail,
                }),
            }
        }
        other => Failure::new(Phase::Building, "image build", other.to_string()),
    }
}

/// A new image: its steps kept for the next build's estimate, and "built TAG: N steps,
/// M from cache". Nothing for a skipped build.
fn record_built(rep: &mut Reporter, outcome: &BuildOutcome) {
    let BuildOutcome::Built {
        tag,
        total_steps,
        cached_steps,
        steps,
        ..
    } = outcome
    else {
        return;
    };
    rep.record_build(
        steps
            .iter()
            .map(|s| StepSample {
                instruction: s.instruction.clone(),
                cached: s.cached,
                duration: s.duration,
            })
            .collect(),
    );
    rep.progress(
        1.0,
        Level::Info,
        format!("built {tag}: {total_steps} steps, {cached_steps} from cache"),
        Extra::meta([
            ("image", tag.clone()),
            ("steps", total_steps.to_string()),
            ("cached_steps", cached_steps.to_string()),
        ]),
    );
}
