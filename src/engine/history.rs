//! The ETA's inputs: the app's recent succeeded deployments read back from the store
//! (per-phase durations from the `elapsed` of their `PhaseStarted` updates, the pull's
//! bytes), the plan of the deployment being estimated, and where it is now.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::eta::{self, Eta, Model, Now, PastDeployment, Planned, PullSample};
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
    let mut out = Vec::with_capacity(list.len());
    for status in list {
        if let Ok(log) = store.log(status.id, 0).await
            && log.oldest.is_none_or(|o| o <= 1)
            && let Some(past) = past(&log.updates)
        {
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
    let mut pull = None;
    for u in updates {
        let ends = matches!(u.kind, EventKind::PhaseStarted | EventKind::Finished { .. });
        if ends && let Some((phase, started)) = current.take() {
            let d = u.elapsed.saturating_sub(started);
            phases.insert(phase, d);
            if phase == Phase::Pulling {
                pull = Some(PullSample {
                    bytes: pulled_bytes(updates),
                    duration: d,
                });
            }
        }
        if u.kind == EventKind::PhaseStarted && u.phase != Phase::Queued {
            current = Some((u.phase, u.elapsed));
        }
    }
    (!phases.is_empty()).then_some(PastDeployment {
        phases,
        pull,
        build: Vec::new(),
    })
}

fn pulled_bytes(updates: &[Update]) -> u64 {
    updates
        .iter()
        .filter(|u| u.phase == Phase::Pulling)
        .filter_map(|u| u.pull.as_ref().map(|p| p.image_current_bytes))
        .max()
        .unwrap_or(0)
}

/// The phases `spec` goes through after the queue, in order. Every phase is modelled by
/// its past durations (medians): see docs/SOURCE.md for the limits.
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
            model: Model::Median,
        })
        .collect()
}

/// A deployment's estimator: its plan and history, and when its phase began.
pub(crate) struct EtaTracker {
    plan: Vec<Planned<Phase>>,
    history: Vec<PastDeployment<Phase>>,
    phase: Phase,
    phase_started: Instant,
}

impl EtaTracker {
    pub(crate) fn new(spec: &DeploySpec, history: Vec<PastDeployment<Phase>>) -> Self {
        Self {
            plan: plan(spec),
            history,
            phase: Phase::Queued,
            phase_started: Instant::now(),
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
            pull_bytes_remaining: None,
            build: None,
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
        assert_eq!(p.pull.unwrap().duration, Duration::from_secs(1));
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
}
