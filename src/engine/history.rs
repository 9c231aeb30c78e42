//! The ETA's inputs: the app's recent succeeded deployments read back from the store
//! (per-phase durations from the `elapsed` of their `PhaseStarted` updates; the pull's
//! bytes and time and the build's steps from what [`Store::record_pull`] and
//! [`Store::record_build`] kept), the plan of the deployment being estimated, and where
//! it is now (the bytes its pull still has to download, its build's step N/M). Each
//! app's history is read from the store once and then kept in memory ([`Histories`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::eta::{self, BuildNow, Eta, Model, Now, PastDeployment, Planned};
use crate::model::{AppName, DeploySpec, DeploymentState, EventKind, Operation, Phase, Update};
use crate::store::{ListFilter, Store};

/// Earlier deployments an estimate learns from.
const HISTORY: usize = 10;

/// Apps whose history is kept in memory at most (beyond it, one is dropped for each
/// new one: it is read from the store again when needed).
const MAX_APPS: usize = 1024;

/// The apps' histories (their last [`HISTORY`] succeeded deployments, newest first),
/// read from the store once per app and then kept up to date in memory: a redeploy
/// does not read its app's last ten logs back from the store each time.
///
/// It stays what the store would answer: a deployment that succeeds adds itself
/// before its terminal update is published (so a client that saw the end and deploys
/// again finds it), one this process did not see from its first update (taken over
/// after a restart) drops its app's entry instead, and retention removing anything
/// empties the whole cache. A read from the store that raced with any of those is
/// not kept (`epoch`).
#[derive(Default)]
pub(crate) struct Histories {
    inner: std::sync::Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    apps: HashMap<AppName, Vec<PastDeployment<Phase>>>,
    /// Moves on every change, so a read from the store that began before one is not
    /// kept.
    epoch: u64,
}

impl Histories {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner.lock().expect("history cache lock")
    }

    /// `app`'s last [`HISTORY`] succeeded deployments, newest first. A store error
    /// gives no history (no estimate), never a failed deployment.
    pub(crate) async fn load(&self, store: &Store, app: &AppName) -> Vec<PastDeployment<Phase>> {
        let epoch = match self.held(app) {
            Ok(history) => return history,
            Err(epoch) => epoch,
        };
        let (history, complete) = read(store, app).await;
        if complete {
            self.keep(app, epoch, history.clone());
        }
        history
    }

    /// `app`'s history if held, else the epoch to [`Self::keep`] a read from the store
    /// under.
    fn held(&self, app: &AppName) -> Result<Vec<PastDeployment<Phase>>, u64> {
        let cache = self.cache();
        cache.apps.get(app).cloned().ok_or(cache.epoch)
    }

    /// Holds `history`, read from the store since [`Self::held`] answered `epoch`,
    /// unless anything changed since.
    fn keep(&self, app: &AppName, epoch: u64, history: Vec<PastDeployment<Phase>>) {
        let mut cache = self.cache();
        if cache.epoch != epoch {
            return;
        }
        if cache.apps.len() >= MAX_APPS
            && let Some(any) = cache.apps.keys().next().cloned()
        {
            cache.apps.remove(&any);
        }
        cache.apps.insert(app.clone(), history);
    }

    /// Whether `app`'s history is held in memory.
    #[cfg(test)]
    pub(crate) fn holds(&self, app: &AppName) -> bool {
        self.cache().apps.contains_key(app)
    }

    /// A deployment of `app` succeeded; `seen` is what its reporter saw of it.
    fn succeeded(&self, app: &AppName, seen: Seen) {
        let mut cache = self.cache();
        cache.epoch += 1;
        match seen {
            Seen::Whole(Some(past)) => {
                if let Some(history) = cache.apps.get_mut(app) {
                    history.insert(0, past);
                    history.truncate(HISTORY);
                }
            }
            // No phase: the store's read skips it too.
            Seen::Whole(None) => {}
            Seen::Partial => {
                cache.apps.remove(app);
            }
        }
    }

    /// The store removed history (retention): read every app's again when needed.
    pub(crate) fn clear(&self) {
        let mut cache = self.cache();
        cache.epoch += 1;
        cache.apps.clear();
    }

    /// What a deployment's reporter keeps for its app's history; `whole`: the reporter
    /// writes the deployment's log from its first update.
    pub(crate) fn recorder(self: &Arc<Self>, whole: bool) -> Recorder {
        Recorder {
            histories: self.clone(),
            whole,
            times: PhaseTimes::default(),
            pull: None,
            build: Vec::new(),
        }
    }
}

/// What a deployment's reporter saw of it, at its success.
enum Seen {
    /// Every update: its phase durations (none: no phase was timed).
    Whole(Option<PastDeployment<Phase>>),
    /// Only the updates after a restart.
    Partial,
}

/// A deployment's contribution to its app's history, gathered by its reporter as the
/// updates go out (see [`Histories`]).
pub(crate) struct Recorder {
    histories: Arc<Histories>,
    whole: bool,
    times: PhaseTimes,
    pull: Option<eta::PullSample>,
    build: Vec<eta::StepSample>,
}

impl Recorder {
    // Durations to the microsecond, as the store keeps them.
    pub(crate) fn pull(&mut self, sample: eta::PullSample) {
        self.pull = Some(eta::PullSample {
            duration: micros(sample.duration),
            ..sample
        });
    }

    pub(crate) fn build(&mut self, mut steps: Vec<eta::StepSample>) {
        steps
            .iter_mut()
            .for_each(|s| s.duration = micros(s.duration));
        self.build = steps;
    }

    /// Every update of the deployment, in order; at its success (a deploy, not a
    /// removal) the app's history in memory takes it.
    pub(crate) fn observe(&mut self, update: &Update) {
        self.times.observe(update);
        if update.operation != Operation::Deploy
            || update.kind
                != (EventKind::Finished {
                    state: DeploymentState::Succeeded,
                })
        {
            return;
        }
        let seen = if self.whole {
            Seen::Whole(std::mem::take(&mut self.times).into_past().map(|mut past| {
                past.pull = self.pull;
                past.build = std::mem::take(&mut self.build);
                past
            }))
        } else {
            Seen::Partial
        };
        self.histories.succeeded(&update.app, seen);
    }
}

fn micros(d: Duration) -> Duration {
    Duration::from_micros(d.as_micros().min(u64::MAX as u128) as u64)
}

/// `app`'s last [`HISTORY`] succeeded deployments from the store, newest first, and
/// whether the store answered every read (a partial answer is not kept in memory).
pub(super) async fn read(store: &Store, app: &AppName) -> (Vec<PastDeployment<Phase>>, bool) {
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
        return (Vec::new(), false);
    };
    let ids: Vec<_> = list.iter().map(|s| s.id).collect();
    let (mut measured, mut complete) = match store.measured(&ids).await {
        Ok(m) => (m, true),
        Err(_) => (Default::default(), false),
    };
    let mut out = Vec::with_capacity(list.len());
    for status in list {
        let log = match store.log(status.id, 0).await {
            Ok(log) => log,
            Err(_) => {
                complete = false;
                continue;
            }
        };
        if log.oldest.is_none_or(|o| o <= 1)
            && let Some(mut past) = past(&log.updates)
        {
            if let Some(m) = measured.remove(&status.id) {
                past.pull = m.pull;
                past.build = m.build;
            }
            out.push(past);
        }
    }
    (out, complete)
}

/// One succeeded deployment's phase durations: each phase lasts from its
/// `PhaseStarted` to the next phase's (or the terminal update).
fn past(updates: &[Update]) -> Option<PastDeployment<Phase>> {
    let mut times = PhaseTimes::default();
    updates.iter().for_each(|u| times.observe(u));
    times.into_past()
}

/// Phase durations, from a deployment's updates in order.
#[derive(Default)]
struct PhaseTimes {
    phases: BTreeMap<Phase, Duration>,
    current: Option<(Phase, Duration)>,
}

impl PhaseTimes {
    fn observe(&mut self, u: &Update) {
        let ends = matches!(u.kind, EventKind::PhaseStarted | EventKind::Finished { .. });
        if ends && let Some((phase, started)) = self.current.take() {
            self.phases.insert(phase, u.elapsed.saturating_sub(started));
        }
        if u.kind == EventKind::PhaseStarted && u.phase != Phase::Queued {
            self.current = Some((u.phase, u.elapsed));
        }
    }

    fn into_past(self) -> Option<PastDeployment<Phase>> {
        (!self.phases.is_empty()).then_some(PastDeployment {
            phases: self.phases,
            pull: None,
            build: Vec::new(),
        })
    }
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

    fn succeeded(app: &str, elapsed_ms: u64) -> Update {
        Update {
            app: AppName::parse(app).unwrap(),
            ..at(
                9,
                EventKind::Finished {
                    state: DeploymentState::Succeeded,
                },
                Phase::Complete,
                elapsed_ms,
            )
        }
    }

    fn one_phase(ms: u64) -> PastDeployment<Phase> {
        PastDeployment {
            phases: [(Phase::Validating, Duration::from_millis(ms))].into(),
            pull: None,
            build: Vec::new(),
        }
    }

    /// A reporter that wrote the whole log adds its deployment at the front, the
    /// oldest going past [`HISTORY`]; one that took over after a restart (it saw only
    /// the end) drops the app's history, to be read from the store again.
    #[test]
    fn a_success_joins_the_history_and_a_partial_one_drops_it() {
        let histories = Arc::new(Histories::default());
        let app = AppName::parse("app").unwrap();
        let epoch = histories.held(&app).unwrap_err();
        histories.keep(&app, epoch, (0..HISTORY as u64).map(one_phase).collect());

        let mut whole = histories.recorder(true);
        whole.pull(eta::PullSample {
            bytes: 7,
            duration: Duration::from_secs(1),
        });
        let mut validating = at(2, EventKind::PhaseStarted, Phase::Validating, 100);
        validating.app = app.clone();
        whole.observe(&validating);
        whole.observe(&succeeded("app", 350));
        let history = histories.held(&app).unwrap();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(
            history[0].phases[&Phase::Validating],
            Duration::from_millis(250)
        );
        assert_eq!(history[0].pull.map(|p| p.bytes), Some(7));
        assert_eq!(history[1], one_phase(0), "the older ones follow");

        histories.recorder(true).observe(&succeeded("other", 1));
        assert!(
            histories.held(&AppName::parse("other").unwrap()).is_err(),
            "not read yet: nothing to add to"
        );

        histories.recorder(false).observe(&succeeded("app", 350));
        assert!(!histories.holds(&app));
    }

    /// A read from the store that began before a deployment succeeded (or retention
    /// removed history) may miss it: it is not kept.
    #[test]
    fn a_read_that_raced_with_a_change_is_not_kept() {
        let histories = Arc::new(Histories::default());
        let app = AppName::parse("app").unwrap();
        let epoch = histories.held(&app).unwrap_err();
        histories.recorder(true).observe(&succeeded("app", 10));
        histories.keep(&app, epoch, Vec::new());
        assert!(!histories.holds(&app), "kept a read older than a success");

        let epoch = histories.held(&app).unwrap_err();
        histories.clear();
        histories.keep(&app, epoch, Vec::new());
        assert!(
            !histories.holds(&app),
            "kept a read older than a retention run"
        );

        let epoch = histories.held(&app).unwrap_err();
        histories.keep(&app, epoch, vec![one_phase(1)]);
        assert_eq!(histories.held(&app).unwrap(), [one_phase(1)]);
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
