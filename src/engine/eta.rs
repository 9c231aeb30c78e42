//! The time a deployment still needs, learned from the app's recent succeeded
//! deployments. Pure: the caller brings the history (from the store), the plan of phases
//! this deployment goes through, and where it is now; no clock, no IO.
//!
//! Rules (docs/SOURCE.md "ETA"):
//! - no history, or a planned phase no earlier deployment went through: no estimate
//!   (`None`), never a made-up number;
//! - a phase in general: the median of its past durations, `low`/`high` from the fastest
//!   and slowest; the current phase counts its time so far (and its progress, which may
//!   only shorten what is left);
//! - the pull: bytes still to download ÷ the throughput measured on past pulls that
//!   downloaded something (`low` at the best, `high` at the worst throughput);
//! - the build: per step, keyed by the instruction text, a cached step costing its cached
//!   time; a future step is predicted cached when it was last time and no step of this
//!   build missed the cache yet (after a miss the builder rebuilds everything after it);
//! - `overdue` when the current phase ran longer than the slowest history allows, or the
//!   deployment longer than any earlier one took.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::Phase;

/// A phase as the estimator sees it: ordered (a map key) and named (for `basis`).
pub(crate) trait PhaseKey: Ord + Copy {
    fn name(self) -> &'static str;
}

impl PhaseKey for Phase {
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// How a phase's time is predicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Model {
    /// The median of past durations.
    Median,
    /// Bytes ÷ measured throughput. `expected_bytes`: what the pull will download when it
    /// has not started yet (`Some(0)`: the image is there), if known.
    Pull { expected_bytes: Option<u64> },
    /// Per-step history of builds.
    Build,
}

/// One phase of this deployment's plan, in order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planned<P> {
    pub(crate) phase: P,
    pub(crate) model: Model,
}

/// A pull of an earlier deployment: bytes downloaded and the time the pull phase took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PullSample {
    pub(crate) bytes: u64,
    pub(crate) duration: Duration,
}

/// One build step of an earlier deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StepSample {
    pub(crate) instruction: String,
    pub(crate) cached: bool,
    pub(crate) duration: Duration,
}

/// An earlier succeeded deployment of the app.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PastDeployment<P> {
    pub(crate) phases: BTreeMap<P, Duration>,
    pub(crate) pull: Option<PullSample>,
    /// The build's steps in order (empty: no build, or it was skipped).
    pub(crate) build: Vec<StepSample>,
}

/// Where a running build is.
#[derive(Clone, Debug, Default)]
pub(crate) struct BuildNow {
    /// The step running (1-based); 0 before the first.
    pub step: u32,
    pub total: u32,
    /// The running step's instruction (empty: not known).
    pub instruction: String,
    pub step_elapsed: Duration,
    /// Whether the current step came from the cache; `None` until the builder says
    /// (then predicted from history like a future step).
    pub step_cached: Option<bool>,
    /// A step of this build already missed the cache (see [`breaks_chain`]).
    pub missed: bool,
}

/// Whether a step that came (`cached`) or did not come from the cache means every later
/// step of the stage will be rebuilt: any step built anew, except `FROM`, which the
/// builder never reports as cached (the steps after it still hit the cache).
pub(crate) fn breaks_chain(instruction: &str, cached: bool) -> bool {
    !cached && !is_from(instruction)
}

fn is_from(instruction: &str) -> bool {
    instruction
        .split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
}

/// Where the deployment is now.
#[derive(Clone, Debug)]
pub(crate) struct Now<P> {
    pub phase: P,
    pub phase_elapsed: Duration,
    /// 0.0–1.0, when the phase measures its progress.
    pub(crate) phase_progress: Option<f64>,
    /// Since the deployment was accepted.
    pub(crate) elapsed: Duration,
    /// While pulling: bytes still to download.
    pub(crate) pull_bytes_remaining: Option<u64>,
    pub(crate) build: Option<BuildNow>,
}

/// An estimate of the time left.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Eta {
    pub(crate) remaining: Duration,
    pub(crate) low: Duration,
    pub(crate) high: Duration,
    /// Earlier deployments it rests on.
    pub(crate) samples: u32,
    /// In words, what it rests on.
    pub(crate) basis: String,
    /// Longer already than the history allows.
    pub(crate) overdue: bool,
}

/// low ≤ mid ≤ high, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Range {
    low: f64,
    mid: f64,
    high: f64,
}

impl Range {
    fn add(self, o: Range) -> Range {
        Range {
            low: self.low + o.low,
            mid: self.mid + o.mid,
            high: self.high + o.high,
        }
    }

    /// What is left after `spent` seconds, never below zero.
    fn minus(self, spent: f64) -> Range {
        Range {
            low: (self.low - spent).max(0.0),
            mid: (self.mid - spent).max(0.0),
            high: (self.high - spent).max(0.0),
        }
    }

    fn scale(self, f: f64) -> Range {
        Range {
            low: self.low * f,
            mid: self.mid * f,
            high: self.high * f,
        }
    }

    fn min(self, o: Range) -> Range {
        Range {
            low: self.low.min(o.low),
            mid: self.mid.min(o.mid),
            high: self.high.min(o.high),
        }
    }
}

/// Median, min and max of `values` (seconds); `None` when empty.
fn spread(mut values: Vec<f64>) -> Option<Range> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let mid = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some(Range {
        low: values[0],
        mid,
        high: values[n - 1],
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn human(s: f64) -> String {
    if s >= 90.0 {
        format!("{:.1}min", s / 60.0)
    } else {
        format!("{s:.1}s")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

struct Estimator<'a, P> {
    history: &'a [PastDeployment<P>],
    basis: Vec<String>,
    overdue: bool,
}

impl<P: PhaseKey> Estimator<'_, P> {
    fn durations(&self, phase: P) -> Option<Range> {
        spread(
            self.history
                .iter()
                .filter_map(|d| d.phases.get(&phase).copied().map(secs))
                .collect(),
        )
    }

    /// Bytes per second of past pulls that downloaded something.
    fn throughput(&self) -> Option<(Range, usize)> {
        let rates: Vec<f64> = self
            .history
            .iter()
            .filter_map(|d| d.pull)
            .filter(|p| p.bytes > 0 && !p.duration.is_zero())
            .map(|p| p.bytes as f64 / secs(p.duration))
            .collect();
        let n = rates.len();
        spread(rates).map(|r| (r, n))
    }

    /// Seconds to download `bytes`: (best, median, worst throughput).
    fn pull_time(&mut self, bytes: u64) -> Option<Range> {
        let (rate, n) = self.throughput()?;
        let b = bytes as f64;
        self.basis.push(format!(
            "pull: {} left at {}/s measured over {n} pull{}",
            mib(b),
            mib(rate.mid),
            if n == 1 { "" } else { "s" }
        ));
        Some(Range {
            low: b / rate.high,
            mid: b / rate.mid,
            high: b / rate.low,
        })
    }

    /// The cost of one step: the samples of the same instruction with the same cache
    /// outcome; for an instruction never seen that way, the median step of that outcome
    /// (or of any, when there is none).
    fn step_cost(&self, instruction: Option<&str>, cached: bool) -> Option<Range> {
        let all = || self.history.iter().flat_map(|d| d.build.iter());
        if let Some(i) = instruction
            && let Some(r) = spread(
                all()
                    .filter(|s| s.instruction == i && s.cached == cached)
                    .map(|s| secs(s.duration))
                    .collect(),
            )
        {
            return Some(r);
        }
        spread(
            all()
                .filter(|s| s.cached == cached)
                .map(|s| secs(s.duration))
                .collect(),
        )
        .or_else(|| spread(all().map(|s| secs(s.duration)).collect()))
    }

    /// Whether `instruction` was cached the last time it was built.
    fn was_cached(&self, instruction: &str) -> bool {
        self.history
            .iter()
            .flat_map(|d| d.build.iter())
            .find(|s| s.instruction == instruction)
            .is_some_and(|s| s.cached)
    }

    /// The remaining build: steps after `from` (1-based, exclusive) up to `total`.
    fn build_rest(
        &self,
        from: u32,
        total: Option<u32>,
        mut missed: bool,
    ) -> Option<(Range, u32, u32)> {
        let last = self.history.iter().find(|d| !d.build.is_empty())?;
        let total = total.unwrap_or(last.build.len() as u32);
        let mut range = Range::default();
        let (mut steps, mut cached_steps) = (0, 0);
        for n in from + 1..=total {
            // The same Dockerfile shape: the instruction at that position last time.
            let instruction = (last.build.len() as u32 == total)
                .then(|| last.build[(n - 1) as usize].instruction.as_str());
            let cached = !missed && instruction.is_some_and(|i| self.was_cached(i));
            missed |= breaks_chain(instruction.unwrap_or_default(), cached);
            range = range.add(self.step_cost(instruction, cached)?);
            steps += 1;
            cached_steps += u32::from(cached);
        }
        Some((range, steps, cached_steps))
    }

    /// The whole of a phase not started yet.
    fn future(&mut self, planned: Planned<P>) -> Option<Range> {
        match planned.model {
            Model::Median => self.durations(planned.phase),
            Model::Pull {
                expected_bytes: Some(0),
            } => {
                // The image is there: as fast as the fastest pull before.
                self.durations(planned.phase).map(|r| Range {
                    low: r.low,
                    mid: r.low,
                    high: r.low,
                })
            }
            Model::Pull {
                expected_bytes: Some(b),
            } => self.pull_time(b).or_else(|| self.durations(planned.phase)),
            Model::Pull {
                expected_bytes: None,
            } => self.durations(planned.phase),
            Model::Build => match self.build_rest(0, None, false) {
                Some((r, steps, cached)) => {
                    self.basis.push(format!(
                        "build: {steps} steps from history, {cached} expected cached"
                    ));
                    Some(r)
                }
                None => self.durations(planned.phase),
            },
        }
    }

    /// What is left of the phase running now.
    fn current(&mut self, planned: Planned<P>, now: &Now<P>) -> Option<Range> {
        let spent = secs(now.phase_elapsed);
        let by_time = |this: &mut Self| -> Option<Range> {
            let whole = this.durations(planned.phase)?;
            if spent > whole.high {
                this.overdue = true;
                this.basis.push(format!(
                    "{} has run {} (longest before: {})",
                    planned.phase.name(),
                    human(spent),
                    human(whole.high)
                ));
            }
            let mut left = whole.minus(spent);
            if let Some(p) = now.phase_progress.filter(|p| (0.0..=1.0).contains(p)) {
                left = left.min(whole.scale(1.0 - p));
            }
            Some(left)
        };
        match planned.model {
            Model::Median => by_time(self),
            Model::Pull { .. } => match now.pull_bytes_remaining {
                Some(b) => self.pull_time(b).or_else(|| by_time(self)),
                None => by_time(self),
            },
            Model::Build => {
                let Some(b) = now.build.as_ref().filter(|b| b.total > 0) else {
                    // Done without steps: the commit was built before.
                    if now.phase_progress.is_some_and(|p| p >= 1.0) {
                        return Some(Range::default());
                    }
                    return self.future(planned).map(|r| r.minus(spent));
                };
                let mut left = Range::default();
                let mut missed = b.missed;
                if b.step > 0 {
                    // The live instruction, else the one at that position last time.
                    let last = self.history.iter().find(|d| !d.build.is_empty());
                    let instruction = Some(b.instruction.as_str())
                        .filter(|i| !i.is_empty())
                        .or_else(|| {
                            last.filter(|l| l.build.len() as u32 == b.total)
                                .map(|l| l.build[(b.step - 1) as usize].instruction.as_str())
                        });
                    let cached = b.step_cached.unwrap_or_else(|| {
                        !missed && instruction.is_some_and(|i| self.was_cached(i))
                    });
                    missed |= breaks_chain(instruction.unwrap_or_default(), cached);
                    if let Some(cost) = self.step_cost(instruction, cached) {
                        let spent_step = secs(b.step_elapsed);
                        if spent_step > cost.high {
                            self.overdue = true;
                        }
                        left = cost.minus(spent_step);
                    } else {
                        return by_time(self);
                    }
                }
                match self.build_rest(b.step, Some(b.total), missed) {
                    Some((rest, steps, cached)) => {
                        self.basis.push(format!(
                            "build: step {}/{}, {steps} left, {cached} expected cached",
                            b.step, b.total
                        ));
                        Some(left.add(rest))
                    }
                    None => by_time(self),
                }
            }
        }
    }
}

/// The estimate for a deployment at `now`, following `plan` (the phases this deployment
/// goes through, in order, including the current one), learned from `history` (the
/// app's recent succeeded deployments, newest first). `None` when there is nothing to
/// learn from.
pub(crate) fn estimate<P: PhaseKey>(
    plan: &[Planned<P>],
    history: &[PastDeployment<P>],
    now: &Now<P>,
) -> Option<Eta> {
    if history.is_empty() {
        return None;
    }
    let position = plan.iter().position(|p| p.phase == now.phase)?;
    let mut est = Estimator {
        history,
        basis: Vec::new(),
        overdue: false,
    };
    let mut total = est.current(plan[position], now)?;
    let mut later = Vec::new();
    for planned in &plan[position + 1..] {
        let r = est.future(*planned)?;
        later.push(format!("{} {}", planned.phase.name(), human(r.mid)));
        total = total.add(r);
    }
    let longest = history
        .iter()
        .map(|d| d.phases.values().map(|d| secs(*d)).sum::<f64>())
        .fold(0.0, f64::max);
    if secs(now.elapsed) > longest {
        est.overdue = true;
        est.basis.push(format!(
            "running {} (longest earlier deployment: {})",
            human(secs(now.elapsed)),
            human(longest)
        ));
    }
    let n = history.len();
    let mut basis = format!(
        "median of {n} earlier deployment{}",
        if n == 1 { "" } else { "s" }
    );
    if !later.is_empty() {
        basis.push_str(&format!(" (then {})", later.join(", ")));
    }
    for b in est.basis {
        basis.push_str("; ");
        basis.push_str(&b);
    }
    let d = |s: f64| Duration::from_secs_f64(s.max(0.0));
    Some(Eta {
        remaining: d(total.mid),
        low: d(total.low),
        high: d(total.high),
        samples: n as u32,
        basis,
        overdue: est.overdue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum T {
        Fetching,
        Building,
        Pulling,
        Starting,
        Health,
    }

    impl PhaseKey for T {
        fn name(self) -> &'static str {
            match self {
                T::Fetching => "fetching",
                T::Building => "building",
                T::Pulling => "pulling",
                T::Starting => "starting",
                T::Health => "health_check",
            }
        }
    }

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn past(phases: &[(T, f64)]) -> PastDeployment<T> {
        PastDeployment {
            phases: phases.iter().map(|(p, d)| (*p, s(*d))).collect(),
            pull: None,
            build: Vec::new(),
        }
    }

    fn plan(phases: &[(T, Model)]) -> Vec<Planned<T>> {
        phases
            .iter()
            .map(|(phase, model)| Planned {
                phase: *phase,
                model: *model,
            })
            .collect()
    }

    fn at(phase: T, phase_elapsed: f64, elapsed: f64) -> Now<T> {
        Now {
            phase,
            phase_elapsed: s(phase_elapsed),
            phase_progress: None,
            elapsed: s(elapsed),
            pull_bytes_remaining: None,
            build: None,
        }
    }

    fn close(a: Duration, b: f64) {
        assert!((a.as_secs_f64() - b).abs() < 1e-6, "{a:?} != {b}");
    }

    fn image_plan() -> Vec<Planned<T>> {
        plan(&[(T::Starting, Model::Median), (T::Health, Model::Median)])
    }

    #[test]
    fn no_history_no_estimate() {
        assert_eq!(
            estimate(&image_plan(), &[], &at(T::Starting, 0.0, 0.0)),
            None
        );
    }

    #[test]
    fn a_planned_phase_never_seen_gives_no_estimate() {
        let history = [past(&[(T::Starting, 1.0)])];
        assert_eq!(
            estimate(&image_plan(), &history, &at(T::Starting, 0.0, 0.0)),
            None,
            "health_check has no history"
        );
    }

    #[test]
    fn median_per_phase_with_min_max_spread() {
        let history = [
            past(&[(T::Starting, 1.0), (T::Health, 3.0)]),
            past(&[(T::Starting, 2.0), (T::Health, 4.0)]),
            past(&[(T::Starting, 1.5), (T::Health, 9.0)]),
        ];
        let eta = estimate(&image_plan(), &history, &at(T::Starting, 0.0, 0.0)).unwrap();
        close(eta.remaining, 1.5 + 4.0);
        close(eta.low, 1.0 + 3.0);
        close(eta.high, 2.0 + 9.0);
        assert_eq!(eta.samples, 3);
        assert!(!eta.overdue);
        assert!(eta.low <= eta.remaining && eta.remaining <= eta.high);
        assert!(
            eta.basis.starts_with("median of 3 earlier deployments"),
            "{}",
            eta.basis
        );
        assert!(eta.basis.contains("health_check 4.0s"), "{}", eta.basis);
    }

    #[test]
    fn an_even_count_takes_the_middle_two() {
        let history = [
            past(&[(T::Starting, 1.0), (T::Health, 2.0)]),
            past(&[(T::Starting, 3.0), (T::Health, 4.0)]),
        ];
        let eta = estimate(&image_plan(), &history, &at(T::Health, 0.0, 3.0)).unwrap();
        close(eta.remaining, 3.0);
    }

    #[test]
    fn time_spent_in_the_current_phase_is_subtracted() {
        let history = [past(&[(T::Starting, 1.0), (T::Health, 3.0)])];
        let eta = estimate(&image_plan(), &history, &at(T::Health, 1.0, 2.0)).unwrap();
        close(eta.remaining, 2.0);
        close(eta.low, 2.0);
        close(eta.high, 2.0);
    }

    #[test]
    fn phase_progress_only_shortens() {
        let history = [past(&[(T::Starting, 10.0), (T::Health, 1.0)])];
        let mut now = at(T::Starting, 1.0, 1.0);
        now.phase_progress = Some(0.9);
        let eta = estimate(&image_plan(), &history, &now).unwrap();
        close(eta.remaining, 1.0 + 1.0); // 10 × (1 − 0.9), not 10 − 1
        now.phase_progress = Some(0.0);
        let eta = estimate(&image_plan(), &history, &now).unwrap();
        close(eta.remaining, 9.0 + 1.0);
    }

    #[test]
    fn overdue_when_the_phase_runs_past_its_slowest() {
        let history = [
            past(&[(T::Starting, 1.0), (T::Health, 3.0)]),
            past(&[(T::Starting, 1.0), (T::Health, 4.0)]),
        ];
        let eta = estimate(&image_plan(), &history, &at(T::Health, 5.0, 6.0)).unwrap();
        assert!(eta.overdue);
        close(eta.remaining, 0.0);
        assert!(
            eta.basis
                .contains("health_check has run 5.0s (longest before: 4.0s)"),
            "{}",
            eta.basis
        );
        let eta = estimate(&image_plan(), &history, &at(T::Health, 3.9, 4.9)).unwrap();
        assert!(!eta.overdue);
    }

    #[test]
    fn overdue_when_the_deployment_runs_past_the_longest_before() {
        let history = [past(&[(T::Starting, 1.0), (T::Health, 3.0)])];
        // Each phase within its own history, the whole longer (time spent elsewhere).
        let eta = estimate(&image_plan(), &history, &at(T::Health, 1.0, 30.0)).unwrap();
        assert!(eta.overdue);
        assert!(
            eta.basis.contains("longest earlier deployment: 4.0s"),
            "{}",
            eta.basis
        );
    }

    fn pull_past(bytes: u64, secs: f64) -> PastDeployment<T> {
        let mut d = past(&[(T::Pulling, secs), (T::Starting, 1.0)]);
        d.pull = Some(PullSample {
            bytes,
            duration: s(secs),
        });
        d
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_pull_is_bytes_left_over_measured_throughput() {
        let history = [
            pull_past(10 * MIB, 1.0), // 10 MiB/s
            pull_past(20 * MIB, 4.0), // 5 MiB/s
            pull_past(40 * MIB, 2.0), // 20 MiB/s
            pull_past(0, 0.1),        // cached: no throughput to learn
        ];
        let p = plan(&[
            (
                T::Pulling,
                Model::Pull {
                    expected_bytes: None,
                },
            ),
            (T::Starting, Model::Median),
        ]);
        let mut now = at(T::Pulling, 0.5, 0.5);
        now.pull_bytes_remaining = Some(30 * MIB);
        let eta = estimate(&p, &history, &now).unwrap();
        close(eta.remaining, 3.0 + 1.0);
        close(eta.low, 1.5 + 1.0);
        close(eta.high, 6.0 + 1.0);
        assert!(
            eta.basis
                .contains("pull: 30.0 MiB left at 10.0 MiB/s measured over 3 pulls"),
            "{}",
            eta.basis
        );
    }

    #[test]
    fn a_pull_not_started_uses_expected_bytes_or_the_phase_median() {
        let history = [
            pull_past(10 * MIB, 1.0),
            pull_past(0, 0.2),
            pull_past(10 * MIB, 1.0),
        ];
        let now = at(T::Fetching, 0.0, 0.0);
        let mut history_f = history.clone();
        for d in &mut history_f {
            d.phases.insert(T::Fetching, s(1.0));
        }
        let with = |expected| {
            plan(&[
                (T::Fetching, Model::Median),
                (
                    T::Pulling,
                    Model::Pull {
                        expected_bytes: expected,
                    },
                ),
            ])
        };
        close(
            estimate(&with(Some(20 * MIB)), &history_f, &now)
                .unwrap()
                .remaining,
            1.0 + 2.0,
        );
        close(
            estimate(&with(Some(0)), &history_f, &now)
                .unwrap()
                .remaining,
            1.0 + 0.2,
        );
        close(
            estimate(&with(None), &history_f, &now).unwrap().remaining,
            1.0 + 1.0,
        );
    }

    #[test]
    fn a_pull_with_no_measured_throughput_falls_back_to_durations() {
        let history = [pull_past(0, 2.0)];
        let p = plan(&[(
            T::Pulling,
            Model::Pull {
                expected_bytes: None,
            },
        )]);
        let mut now = at(T::Pulling, 0.5, 0.5);
        now.pull_bytes_remaining = Some(MIB);
        close(estimate(&p, &history, &now).unwrap().remaining, 1.5);
    }

    fn step(i: &str, cached: bool, secs: f64) -> StepSample {
        StepSample {
            instruction: i.into(),
            cached,
            duration: s(secs),
        }
    }

    fn build_past(steps: Vec<StepSample>) -> PastDeployment<T> {
        let total: f64 = steps.iter().map(|s| s.duration.as_secs_f64()).sum();
        let mut d = past(&[(T::Building, total), (T::Starting, 1.0)]);
        d.build = steps;
        d
    }

    fn build_history() -> Vec<PastDeployment<T>> {
        vec![
            // newest first: a new commit, the apk step cached, COPY and make rebuilt
            build_past(vec![
                step("FROM base", true, 0.1),
                step("RUN apk add gcc", true, 0.2),
                step("COPY . /src", false, 1.0),
                step("RUN make", false, 10.0),
            ]),
            // the first, cold build
            build_past(vec![
                step("FROM base", false, 5.0),
                step("RUN apk add gcc", false, 30.0),
                step("COPY . /src", false, 1.0),
                step("RUN make", false, 14.0),
            ]),
        ]
    }

    fn build_plan() -> Vec<Planned<T>> {
        plan(&[(T::Building, Model::Build), (T::Starting, Model::Median)])
    }

    #[test]
    fn a_build_not_started_predicts_cache_hits_from_the_last_build() {
        let eta = estimate(&build_plan(), &build_history(), &at(T::Building, 0.0, 0.0)).unwrap();
        // FROM cached 0.1, apk cached 0.2, COPY uncached median(1,1)=1, make median(10,14)=12
        close(eta.remaining, 0.1 + 0.2 + 1.0 + 12.0 + 1.0);
        close(eta.high, 0.1 + 0.2 + 1.0 + 14.0 + 1.0);
        close(eta.low, 0.1 + 0.2 + 1.0 + 10.0 + 1.0);
        assert!(
            eta.basis
                .contains("4 steps from history, 2 expected cached"),
            "{}",
            eta.basis
        );
    }

    #[test]
    fn a_running_build_counts_the_current_step_and_the_cache_chain() {
        let mut now = at(T::Building, 2.0, 2.0);
        now.build = Some(BuildNow {
            step: 2,
            total: 4,
            step_elapsed: s(1.0),
            step_cached: Some(false),
            missed: true,
            ..Default::default()
        });
        let eta = estimate(&build_plan(), &build_history(), &now).unwrap();
        // step 2 missed: its uncached cost 30 − 1 spent; then COPY 1 + make 12 (uncached,
        // the chain is broken), then starting 1.
        close(eta.remaining, 29.0 + 1.0 + 12.0 + 1.0);
        assert!(
            eta.basis
                .contains("build: step 2/4, 2 left, 0 expected cached"),
            "{}",
            eta.basis
        );
        assert!(!eta.overdue);
    }

    #[test]
    fn a_cached_step_costs_its_cached_time() {
        let mut now = at(T::Building, 0.1, 0.1);
        now.build = Some(BuildNow {
            step: 2,
            total: 4,
            step_elapsed: s(0.0),
            step_cached: Some(true),
            missed: false,
            ..Default::default()
        });
        let eta = estimate(&build_plan(), &build_history(), &now).unwrap();
        close(eta.remaining, 0.2 + 1.0 + 12.0 + 1.0);
    }

    #[test]
    fn an_unknown_dockerfile_weighs_steps_as_the_median_step() {
        let mut now = at(T::Building, 0.0, 0.0);
        now.build = Some(BuildNow {
            step: 1,
            total: 2,
            step_elapsed: s(0.0),
            step_cached: Some(false),
            missed: true,
            ..Default::default()
        });
        let eta = estimate(&build_plan(), &build_history(), &now).unwrap();
        // uncached steps: 1, 10, 5, 30, 1, 14 → median 7.5, min 1, max 30
        close(eta.remaining, 7.5 + 7.5 + 1.0);
        close(eta.low, 1.0 + 1.0 + 1.0);
        close(eta.high, 30.0 + 30.0 + 1.0);
    }

    #[test]
    fn a_step_past_its_slowest_is_overdue() {
        let mut now = at(T::Building, 40.0, 40.0);
        now.build = Some(BuildNow {
            step: 4,
            total: 4,
            step_elapsed: s(20.0),
            step_cached: Some(false),
            missed: true,
            ..Default::default()
        });
        let eta = estimate(&build_plan(), &build_history(), &now).unwrap();
        assert!(eta.overdue);
        close(eta.remaining, 1.0);
    }

    /// The classic builder never reports FROM as cached: it must not break the chain.
    #[test]
    fn from_does_not_break_the_cache_chain_and_an_unsaid_step_is_predicted() {
        let history = vec![build_past(vec![
            step("FROM base", false, 0.5),
            step("RUN apk add gcc", true, 0.2),
            step("COPY . /src", false, 1.0),
            step("RUN make", false, 10.0),
        ])];
        let eta = estimate(&build_plan(), &history, &at(T::Building, 0.0, 0.0)).unwrap();
        close(eta.remaining, 0.5 + 0.2 + 1.0 + 10.0 + 1.0);
        assert!(
            eta.basis
                .contains("4 steps from history, 1 expected cached"),
            "{}",
            eta.basis
        );
        // Step 2 running, the builder has not said yet whether it is cached: predicted
        // cached (FROM before it did not break the chain).
        let mut now = at(T::Building, 0.6, 0.6);
        now.build = Some(BuildNow {
            step: 2,
            total: 4,
            instruction: "RUN apk add gcc".into(),
            step_elapsed: s(0.0),
            step_cached: None,
            missed: false,
        });
        let eta = estimate(&build_plan(), &history, &now).unwrap();
        close(eta.remaining, 0.2 + 1.0 + 10.0 + 1.0);
        assert!(breaks_chain("RUN make", false));
        assert!(!breaks_chain("from base AS b", false));
        assert!(!breaks_chain("RUN make", true));
    }

    #[test]
    fn a_skipped_build_costs_nothing_more() {
        let mut now = at(T::Building, 0.1, 0.1);
        now.phase_progress = Some(1.0);
        let eta = estimate(&build_plan(), &build_history(), &now).unwrap();
        close(eta.remaining, 1.0);
    }

    #[test]
    fn a_build_without_step_history_uses_the_phase_median() {
        let history = [past(&[(T::Building, 20.0), (T::Starting, 1.0)])];
        let eta = estimate(&build_plan(), &history, &at(T::Building, 5.0, 5.0)).unwrap();
        close(eta.remaining, 15.0 + 1.0);
    }

    #[test]
    fn a_phase_outside_the_plan_gives_no_estimate() {
        let history = [past(&[(T::Starting, 1.0), (T::Health, 3.0)])];
        assert_eq!(
            estimate(&image_plan(), &history, &at(T::Fetching, 0.0, 0.0)),
            None
        );
    }

    #[test]
    fn the_real_phase_enum_is_a_key() {
        let history = [PastDeployment {
            phases: [(Phase::HealthCheck, s(3.0))].into_iter().collect(),
            pull: None,
            build: Vec::new(),
        }];
        let p = [Planned {
            phase: Phase::HealthCheck,
            model: Model::Median,
        }];
        let now = Now {
            phase: Phase::HealthCheck,
            phase_elapsed: s(1.0),
            phase_progress: None,
            elapsed: s(1.0),
            pull_bytes_remaining: None,
            build: None,
        };
        close(estimate(&p, &history, &now).unwrap().remaining, 2.0);
    }
}
