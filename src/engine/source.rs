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
use crate::source::build::{BuildError, BuildEvent, BuildOutcome, BuildSpec};
use crate::source::git::{self, FetchEvent, GitSource, GitStage};

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
    let mut on_event = |event: FetchEvent| match event {
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
        FetchEvent::Progress(p) => {
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
        FetchEvent::Output(line) => rep.output(git::redact_url(&line), Extra::default()),
        FetchEvent::Commit { reference, sha } => rep.progress(
            0.95,
            Level::Info,
            format!("{reference} is commit {sha}"),
            Extra::meta([("commit", sha)]),
        ),
    };
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
    Ok(fetched)
}

/// BUILDING: builds (or finds) `stevedore/<app>:<commit>`; returns the outcome.
pub(super) async fn build(
    rep: &mut Reporter,
    runtime: &Arc<dyn Runtime>,
    source: &SourceSpec,
    fetched: &git::Fetched,
) -> Result<BuildOutcome, Failure> {
    let app = rep.deployment().spec.app.to_string();
    let context = if source.context_dir.is_empty() {
        fetched.worktree.clone()
    } else {
        fetched.worktree.join(&source.context_dir)
    };
    let spec = BuildSpec {
        dockerfile: source.dockerfile.clone(),
        build_args: source.build_args.clone().into_iter().collect(),
        ..BuildSpec::new(&app, &fetched.commit, context)
    };
    let tag = spec.tag();
    rep.enter(Phase::Building, format!("building {tag}"));
    let never = CancellationToken::new();
    let mut cached = 0u32;
    let mut current: Option<(u32, u32)> = None;
    let mut pull = PullTracker::default();
    let mut every = Every::default();
    let mut on_event = |event: BuildEvent| {
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
            format!("sending the build context: {files} files, {bytes} bytes ({excluded} excluded by .dockerignore)"),
            Extra::meta([
                ("context_files", files.to_string()),
                ("context_bytes", bytes.to_string()),
            ]),
        ),
        BuildEvent::Step(s) => {
            current = Some((s.number, s.total));
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
                    ("cached_steps", cached.to_string()),
                ]),
            );
        }
        BuildEvent::Cached { number } => {
            cached += 1;
            if let Some(eta) = rep.eta_live() {
                eta.build_cached(true);
            }
            let (_, total) = current.unwrap_or((number, number));
            rep.progress(
                0.0,
                Level::Verbose,
                format!("step {number}/{total}: using cache"),
                Extra::meta([
                    ("step", number.to_string()),
                    ("cached", "true".into()),
                    ("cached_steps", cached.to_string()),
                ]),
            );
        }
        BuildEvent::Running { .. } => {
            if let Some(eta) = rep.eta_live() {
                eta.build_cached(false);
            }
        }
        BuildEvent::Image { .. } => {}
        BuildEvent::Output { line, skipped, step } => {
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
        BuildEvent::Pull {
            layer_id,
            status,
            current,
            total,
        } => {
            let event = PullEvent::Layer {
                id: layer_id,
                status: layer_status(&status),
                current,
                total,
            };
            let Some(progress) = pull.apply(&event) else {
                return;
            };
            if every.due(false) {
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
    };
    let outcome = runtime
        .build_image(&spec, &never, &mut on_event)
        .await
        .map_err(|e| match e {
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
        })?;
    if let BuildOutcome::Built {
        tag,
        total_steps,
        cached_steps,
        steps,
        ..
    } = &outcome
    {
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
    rep.set_commit(&fetched.commit, Some(outcome.tag()));
    Ok(outcome)
}
