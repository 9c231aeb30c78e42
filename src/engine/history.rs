//! The ETA's inputs: the app's recent succeeded deployments read back from the store
//! (per-phase durations from the `elapsed` of their `PhaseStarted` updates; the pull's
//! bytes and time and the build's steps from what [`Store::record_pull`] and
//! [`Store::record_build`] kept), the plan of the deployment being estimated, and where
//! it is now (the bytes its pull still has to download, its build's step N/M).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::eta::{self, BuildNow, Eta, Model, Now, PastDeployment, Planned};
use crate::model::{AppName, DeploySpec, DeploymentState, EventKind, Operation, Phase, Update};
use crate::store::{ListFilter, Store};

/// Earlier deployments an estimate learns from.
const HISTORY: usize = 10;

/// The app's last [`HISTORY`] succeeded deployments, newest first. A store error gives
/// no history (no estimate), never a failed deployment.
pub(super) async fn load(store: &Store, app: &AppName) -> Vec<PastDeployment<Phase>> {
    // The app's previous deployment may have ended a moment ago: its last updates may
    // still be queued to the store's writer.
    store.flush().await;
    let filter = ListFilter {
        app: Some(app.clone()),
        state: Some(DeploymentState::Succeeded),
        before: None,
        limit: HISTORY,
        operation: Some(Operation::Deploy),
    };
    let Ok(list) = store.list(&filter).await else {
        return Vec::new();
    };
    let ids: Vec<_> = list.iter().map(|s| s.id).collect();
    let mut measured = store.measured(&ids).await.unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    for status in list {
        if let Ok(log) = store.log(status.id, 0).await
            && log.oldest.is_none_or(|o| o <= 1)
            && let Some(mut past) = past(&log.updates)
        {
            if let Some(m) = measured.remove(&status.id) {
                past.pull = m.pull;
                past.build = m.build;
            }
            out.push(past);
        }
    }
    out
}

/// One succeeded deployment's phase durations: each phase lasts from its
/// `PhaseStarted` to the next phase's (or the terminal update).
fn past(updates: &[Update]) -> Option<PastDeployment<Phase>> {
    let mut phases = BTreeMap::new();
    let mut current: Option<(Phase, Duration)> = None;
    for u in updates {
        let ends = matches!(u.kind, EventKind::PhaseStarted | EventKind::Finished { .. });
        if ends && let Some((phase, started)) = current.take() {
            phases.insert(phase, u.elapsed.saturating_sub(started));
        }
        if u.kind == EventKind::PhaseStarted && u.phase != Phase::Queued {
            current = Some((u.phase, u.elapsed));
        }
    }
    (!phases.is_empty()).then_some(PastDeployment {
        phases,
        pull: None,
        build: Vec::new(),
    })
}

/// The phases `spec` goes through after the queue, in order: the pull modelled by bytes
/// and throughput, the build per step, every other phase by its past durations
/// (medians); see docs/SOURCE.md for the limits.
fn plan(spec: &DeploySpec) -> Vec<Planned<Phase>> {
    let mut phases = vec![Phase::Validating];
    if spec.source.is_some() {
        phases.extend([Phase::Fetching, Phase::Building]);
    } else {
        phases.push(Phase::Pulling);
    }
    phases.extend([Phase::Creating, Phase::Starting, Phase::HealthCheck]);
    if !spec.hooks.is_empty() {
        phases.push(Phase::Hooks);
    }
    phases.extend([Phase::Switching, Phase::Cleanup]);
    phases
        .into_iter()
        .map(|phase| Planned {
            phase,
            model: match phase {
                // Not known before the pull looks: the phase's durations until then.
                Phase::Pulling => Model::Pull {
                    expected_bytes: None,
                },
                Phase::Building => Model::Build,
                _ => Model::Median,
            },
        })
        .collect()
}

/// A deployment's estimator: its plan and history, when its phase began, and what its
/// pull or build reported so far.
pub(crate) struct EtaTracker {
    plan: Vec<Planned<Phase>>,
    history: Vec<PastDeployment<Phase>>,
    phase: Phase,
    phase_started: Instant,
    /// While pulling: the bytes still to download, once some layer's size is known.
    pull_remaining: Option<u64>,
    /// While building: the step running, and when it began.
    build: Option<(BuildNow, Instant)>,
}

impl EtaTracker {
    pub(crate) fn new(spec: &DeploySpec, history: Vec<PastDeployment<Phase>>) -> Self {
        Self {
            plan: plan(spec),
            history,
            phase: Phase::Queued,
            phase_started: Instant::now(),
            pull_remaining: None,
            build: None,
        }
    }

    /// The pull's bytes still to download (`None`: no layer size known yet).
    pub(crate) fn pull_remaining(&mut self, bytes: Option<u64>) {
        self.pull_remaining = bytes;
    }

    /// The build began step `number` of `total`.
    pub(crate) fn build_step(&mut self, number: u32, total: u32, instruction: &str) {
        let missed = self.build.as_ref().is_some_and(|(b, _)| {
            b.missed
                || (b.step > 0 && eta::breaks_chain(&b.instruction, b.step_cached == Some(true)))
        });
        self.build = Some((
            BuildNow {
                step: number,
                total,
                instruction: instruction.to_owned(),
                step_elapsed: Duration::ZERO,
                step_cached: None,
                missed,
            },
            Instant::now(),
        ));
    }

    /// The builder said whether the current step came from the cache.
    pub(crate) fn build_cached(&mut self, cached: bool) {
        if let Some((b, _)) = &mut self.build {
            b.step_cached = Some(cached);
        }
    }

    /// The estimate at an update in `phase` (QUEUED counts as the first planned phase
    /// not yet begun: the wait for the lock is not predictable).
    pub(crate) fn estimate(
        &mut self,
        phase: Phase,
        phase_progress: f64,
        elapsed: Duration,
    ) -> Option<Eta> {
        if phase.is_terminal() || self.history.is_empty() {
            return None;
        }
        if phase != self.phase {
            self.phase = phase;
            self.phase_started = Instant::now();
            self.pull_remaining = None;
            self.build = None;
        }
        let (phase, phase_elapsed, progress) = if phase == Phase::Queued {
            (self.plan.first()?.phase, Duration::ZERO, None)
        } else {
            (phase, self.phase_started.elapsed(), Some(phase_progress))
        };
        let now = Now {
            phase,
            phase_elapsed,
            phase_progress: progress,
            elapsed,
            pull_bytes_remaining: self.pull_remaining,
            build: self.build.as_ref().map(|(b, started)| BuildNow {
                step_elapsed: started.elapsed(),
                ..b.clone()
            }),
        };
        eta::estimate(&self.plan, &self.history, &now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, kind: EventKind, phase: Phase, ms: u64) -> Update {
        Update {
            kind,
            phase,
            elapsed: Duration::from_millis(ms),
            ..Update::for_test(seq, false)
        }
    }

    #[test]
    fn phase_durations_run_from_one_phase_start_to_the_next() {
        let finished = EventKind::Finished {
            state: DeploymentState::Succeeded,
        };
        let log = [
            at(1, EventKind::accepted_for_test(), Phase::Queued, 0),
            at(2, EventKind::PhaseStarted, Phase::Validating, 100),
            at(3, EventKind::Progress, Phase::Validating, 150),
            at(4, EventKind::PhaseStarted, Phase::Pulling, 300),
            at(5, EventKind::PhaseStarted, Phase::HealthCheck, 1_300),
            at(6, finished, Phase::Complete, 4_300),
        ];
        let p = past(&log).unwrap();
        assert_eq!(p.phases[&Phase::Validating], Duration::from_millis(200));
        assert_eq!(p.phases[&Phase::Pulling], Duration::from_secs(1));
        assert_eq!(p.phases[&Phase::HealthCheck], Duration::from_secs(3));
        assert!(!p.phases.contains_key(&Phase::Queued));
    }

    #[test]
    fn no_history_no_estimate_and_queued_counts_as_before_the_first_phase() {
        let mut spec = crate::engine::tests::spec("app", "img:1");
        spec.hooks.clear();
        let mut none = EtaTracker::new(&spec, Vec::new());
        assert!(none.estimate(Phase::Queued, 0.0, Duration::ZERO).is_none());
        let phases: BTreeMap<Phase, Duration> = plan(&spec)
            .iter()
            .map(|p| (p.phase, Duration::from_secs(1)))
            .collect();
        let history = vec![PastDeployment {
            phases,
            pull: None,
            build: Vec::new(),
        }];
        let mut t = EtaTracker::new(&spec, history);
        let eta = t.estimate(Phase::Queued, 0.0, Duration::ZERO).unwrap();
        assert_eq!(eta.remaining, Duration::from_secs(plan(&spec).len() as u64));
        assert!(t.estimate(Phase::Complete, 1.0, Duration::ZERO).is_none());
    }

    /// The live build feeds the per-step model: a step the builder did not report as
    /// cached breaks the chain (FROM excepted), so later steps are predicted rebuilt.
    #[test]
    fn the_live_build_counts_steps_and_the_cache_chain() {
        let mut spec = crate::engine::tests::spec("app", "");
        spec.source = Some(crate::model::SourceSpec {
            url: "https://example.invalid/repo.git".into(),
            reference: None,
            dockerfile: "Dockerfile".into(),
            context_dir: String::new(),
            build_args: BTreeMap::new(),
        });
        let phases: BTreeMap<Phase, Duration> = plan(&spec)
            .iter()
            .map(|p| (p.phase, Duration::from_secs(1)))
            .collect();
        let step = |i: &str, cached, secs: f64| eta::StepSample {
            instruction: i.into(),
            cached,
            duration: Duration::from_secs_f64(secs),
        };
        let history = vec![
            PastDeployment {
                phases: phases.clone(),
                pull: None,
                build: vec![
                    step("FROM base", false, 0.5),
                    step("COPY a /a", true, 0.1),
                    step("RUN make", true, 0.2),
                ],
            },
            PastDeployment {
                phases,
                pull: None,
                build: vec![
                    step("FROM base", false, 0.5),
                    step("COPY a /a", false, 0.3),
                    step("RUN make", false, 20.0),
                ],
            },
        ];
        let run = |cached_copy: bool| {
            let mut t = EtaTracker::new(&spec, history.clone());
            t.estimate(Phase::Building, 0.0, Duration::ZERO).unwrap();
            t.build_step(1, 3, "FROM base");
            let first = t.estimate(Phase::Building, 0.0, Duration::ZERO).unwrap();
            assert!(
                first
                    .basis
                    .contains("build: step 1/3, 2 left, 2 expected cached"),
                "{}",
                first.basis
            );
            t.build_step(2, 3, "COPY a /a");
            if cached_copy {
                t.build_cached(true);
            }
            t.build_step(3, 3, "RUN make");
            t.estimate(Phase::Building, 0.7, Duration::ZERO).unwrap()
        };
        let cached = run(true).remaining.as_secs_f64();
        let rebuilt = run(false).remaining.as_secs_f64();
        // The rest after the build: creating … cleanup, 1 s each.
        assert!((cached - (0.2 + 5.0)).abs() < 0.05, "{cached}");
        assert!((rebuilt - (20.0 + 5.0)).abs() < 0.05, "{rebuilt}");
    }
}
