//! Prometheus metrics: the [`MetricsObserver`] turns deployment updates into counters
//! and histograms, [`MetricsExporter`] samples gauges and observer counters at scrape
//! time and renders the text exposition served at `GET /metrics`.
//!
//! Each server owns its own recorder (no global one), so several servers in one
//! process (the integration tests) keep separate numbers.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `stevedore_deployments_started_total` | counter | (`app`) |
//! | `stevedore_deployments_by_target_total` | counter | `target` = docker, swarm |
//! | `stevedore_replicas_requested_total` | counter (replicas asked, summed) | `target` |
//! | `stevedore_deployments_finished_total` | counter | `outcome` = succeeded, failed, cancelled (`app`) |
//! | `stevedore_deployments_running` / `_queued` | gauge | |
//! | `stevedore_deployment_duration_seconds` | histogram | `outcome` (`app`) |
//! | `stevedore_phase_duration_seconds` | histogram | `phase`, `outcome` = completed, failed, cancelled |
//! | `stevedore_app_removals_total` | counter | `outcome` = succeeded, failed, cancelled (`app`) |
//! | `stevedore_pull_bytes_total` | counter | |
//! | `stevedore_health_check_attempts_total` | counter | `check` |
//! | `stevedore_health_checks_total` | counter | `check`, `result` = healthy, unhealthy |
//! | `stevedore_observer_updates_{delivered,dropped,failed}_total` | counter | `observer` |
//! | `stevedore_webhook_deliveries_total` | counter | `outcome` = delivered, abandoned |
//! | `stevedore_webhook_attempt_failures_total` | counter | |
//! | `stevedore_audit_log_writable` | gauge | |
//!
//! `app` is there only with `--metrics-app-label`: app names are unbounded. No label
//! ever carries a deployment ID. Removals (RemoveApp) count only in
//! `stevedore_app_removals_total`, never as deployments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::events::{Observer, ObserverError};
use crate::model::{DeploymentId, DeploymentState, EventKind, Phase, Update};

/// Histogram buckets (seconds): from a fast local step to a slow pull.
const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (
        "stevedore_deployments_started_total",
        Kind::Counter,
        "Deployments accepted.",
    ),
    (
        "stevedore_deployments_by_target_total",
        Kind::Counter,
        "Deployments accepted, by target (docker or swarm).",
    ),
    (
        "stevedore_replicas_requested_total",
        Kind::Counter,
        "Replicas asked for by accepted deployments, summed, by target.",
    ),
    (
        "stevedore_deployments_finished_total",
        Kind::Counter,
        "Deployments that ended, by outcome.",
    ),
    (
        "stevedore_deployments_running",
        Kind::Gauge,
        "Deployments past the queue and not yet ended.",
    ),
    (
        "stevedore_deployments_queued",
        Kind::Gauge,
        "Deployments waiting for their app's current deployment to end.",
    ),
    (
        "stevedore_app_removals_total",
        Kind::Counter,
        "App removals (RemoveApp) that ended, by outcome.",
    ),
    (
        "stevedore_deployment_duration_seconds",
        Kind::Histogram,
        "Time from acceptance to the end of a deployment, by outcome.",
    ),
    (
        "stevedore_phase_duration_seconds",
        Kind::Histogram,
        "Time spent in each phase, by phase and how the phase ended.",
    ),
    (
        "stevedore_pull_bytes_total",
        Kind::Counter,
        "Image bytes downloaded by pulls.",
    ),
    (
        "stevedore_health_check_attempts_total",
        Kind::Counter,
        "Health probe attempts, by check kind.",
    ),
    (
        "stevedore_health_checks_total",
        Kind::Counter,
        "Health checks that ended, by check kind and result.",
    ),
    (
        "stevedore_observer_updates_delivered_total",
        Kind::Counter,
        "Updates an observer handled.",
    ),
    (
        "stevedore_observer_updates_dropped_total",
        Kind::Counter,
        "Updates dropped because an observer's queue was full.",
    ),
    (
        "stevedore_observer_updates_failed_total",
        Kind::Counter,
        "Updates an observer failed on (error or panic).",
    ),
    (
        "stevedore_webhook_deliveries_total",
        Kind::Counter,
        "Webhook events delivered, or abandoned after the last retry.",
    ),
    (
        "stevedore_webhook_attempt_failures_total",
        Kind::Counter,
        "Webhook POST attempts that failed (connection error, timeout or non-2xx).",
    ),
    (
        "stevedore_audit_log_writable",
        Kind::Gauge,
        "1 when the audit log can be written; 0 while new deployments are refused.",
    ),
    (
        "stevedore_reconciler_removed_total",
        Kind::Counter,
        "Containers the reconciler removed: neither their app's current version nor part of a live deployment.",
    ),
    (
        "stevedore_rejections_total",
        Kind::Counter,
        "Calls turned away, by limit or rule (unauthenticated, permission_denied, policy, deployments_in_flight, deployments_queued, watch_streams, message_size).",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// This server's metric registry. Cheap to share (`Arc`).
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    app_label: bool,
}

impl Metrics {
    /// `app_label`: label deployment counters and durations with the app name.
    pub(crate) fn new(app_label: bool) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, kind, help) in DESCRIPTIONS {
            let key = (*name).into();
            let help = SharedString::const_str(help);
            match kind {
                Kind::Counter => recorder.describe_counter(key, None, help),
                Kind::Gauge => recorder.describe_gauge(key, None, help),
                Kind::Histogram => recorder.describe_histogram(key, None, help),
            }
        }
        let metrics = Self {
            recorder,
            handle,
            app_label,
        };
        // Counters that exist from the start, so a scrape before the first deployment
        // already shows them at 0.
        if !app_label {
            metrics
                .counter("stevedore_deployments_started_total", &[])
                .absolute(0);
            for outcome in ["succeeded", "failed", "cancelled"] {
                for name in [
                    "stevedore_deployments_finished_total",
                    "stevedore_app_removals_total",
                ] {
                    metrics
                        .counter(name, &[("outcome", outcome.into())])
                        .absolute(0);
                }
            }
        }
        metrics
            .counter("stevedore_pull_bytes_total", &[])
            .absolute(0);
        metrics
    }

    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        Key::from_parts(name, labels)
    }

    pub(crate) fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub(crate) fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub(crate) fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, String)],
    ) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// The text exposition of everything recorded so far.
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; call periodically.
    pub(crate) fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Calls [`Self::run_upkeep`] every `every` until `stop` is cancelled.
    pub(crate) fn spawn_upkeep(
        self: &Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.run_upkeep(),
                    _ = stop.cancelled() => break,
                }
            }
        })
    }

    fn app_labels(
        &self,
        app: &str,
        mut labels: Vec<(&'static str, String)>,
    ) -> Vec<(&'static str, String)> {
        if self.app_label {
            labels.push(("app", app.to_owned()));
        }
        labels
    }
}

/// Where one deployment is, as far as the metrics are concerned.
struct Track {
    phase: Phase,
    phase_started: Duration,
    pulled_bytes: u64,
}

/// Turns updates into counters and histograms.
pub(crate) struct MetricsObserver {
    metrics: Arc<Metrics>,
    live: Mutex<HashMap<DeploymentId, Track>>,
}

impl MetricsObserver {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn record(&self, u: &Update) {
        let m = &self.metrics;
        if !u.operation.is_deploy() {
            if let EventKind::Finished { state } = &u.kind {
                let labels = m.app_labels(u.app.as_str(), vec![("outcome", state.as_str().into())]);
                m.counter("stevedore_app_removals_total", &labels)
                    .increment(1);
            }
            return;
        }
        let mut live = self.live.lock().expect("metrics lock");
        match &u.kind {
            EventKind::Accepted {
                target, replicas, ..
            } => {
                m.counter(
                    "stevedore_deployments_started_total",
                    &m.app_labels(u.app.as_str(), vec![]),
                )
                .increment(1);
                let target = vec![("target", target.as_str().to_owned())];
                m.counter("stevedore_deployments_by_target_total", &target)
                    .increment(1);
                m.counter("stevedore_replicas_requested_total", &target)
                    .increment(u64::from(*replicas));
                live.insert(
                    u.deployment_id,
                    Track {
                        phase: Phase::Queued,
                        phase_started: u.elapsed,
                        pulled_bytes: 0,
                    },
                );
            }
            EventKind::PhaseStarted => {
                if let Some(t) = live.get_mut(&u.deployment_id) {
                    observe_phase(m, t, u.elapsed, "completed");
                    t.phase = u.phase;
                    t.phase_started = u.elapsed;
                }
            }
            EventKind::Finished { state } => {
                let outcome = state.as_str();
                if let Some(mut t) = live.remove(&u.deployment_id) {
                    let phase_outcome = match state {
                        DeploymentState::Succeeded => "completed",
                        _ => outcome,
                    };
                    observe_phase(m, &mut t, u.elapsed, phase_outcome);
                }
                m.counter(
                    "stevedore_deployments_finished_total",
                    &m.app_labels(u.app.as_str(), vec![("outcome", outcome.into())]),
                )
                .increment(1);
                m.histogram(
                    "stevedore_deployment_duration_seconds",
                    &m.app_labels(u.app.as_str(), vec![("outcome", outcome.into())]),
                )
                .record(u.elapsed.as_secs_f64());
                for h in u.result.iter().flat_map(|r| &r.health) {
                    let check = h.check.clone();
                    m.counter(
                        "stevedore_health_check_attempts_total",
                        &[("check", check.clone())],
                    )
                    .increment(u64::from(h.attempts));
                    let result = if h.healthy { "healthy" } else { "unhealthy" };
                    m.counter(
                        "stevedore_health_checks_total",
                        &[("check", check), ("result", result.into())],
                    )
                    .increment(1);
                }
            }
            _ => {}
        }
        if let (Some(pull), Some(t)) = (&u.pull, live.get_mut(&u.deployment_id))
            && pull.image_current_bytes > t.pulled_bytes
        {
            m.counter("stevedore_pull_bytes_total", &[])
                .increment(pull.image_current_bytes - t.pulled_bytes);
            t.pulled_bytes = pull.image_current_bytes;
        }
    }
}

fn observe_phase(m: &Metrics, t: &mut Track, now: Duration, outcome: &str) {
    let spent = now.saturating_sub(t.phase_started);
    m.histogram(
        "stevedore_phase_duration_seconds",
        &[
            ("phase", t.phase.as_str().into()),
            ("outcome", outcome.into()),
        ],
    )
    .record(spent.as_secs_f64());
}

#[async_trait]
impl Observer for MetricsObserver {
    fn name(&self) -> &str {
        "metrics"
    }

    async fn on_update(&self, update: Arc<Update>) -> Result<(), ObserverError> {
        self.record(&update);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HELP text of stevedore_rejections_total names every label value.
    #[test]
    fn the_rejections_help_names_every_limit() {
        let help = DESCRIPTIONS
            .iter()
            .find(|(name, ..)| *name == "stevedore_rejections_total")
            .unwrap()
            .2;
        for r in crate::limits::Rejection::ALL {
            assert!(
                help.contains(r.as_str()),
                "{} missing from {help}",
                r.as_str()
            );
        }
    }
    use crate::model::*;

    fn update(id: DeploymentId, seq: u64, kind: EventKind, phase: Phase, at: u64) -> Update {
        Update {
            deployment_id: id,
            app: AppName::parse("web").unwrap(),
            kind,
            phase,
            elapsed: Duration::from_millis(at),
            ..Update::for_test(seq, false)
        }
    }

    /// The value of the sample `name{labels}` (exact text before the value).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_and_times_a_deployment() {
        let metrics = Arc::new(Metrics::new(false));
        let obs = MetricsObserver::new(metrics.clone());
        let id = DeploymentId::new();
        obs.record(&update(
            id,
            1,
            EventKind::accepted_for_test(),
            Phase::Queued,
            0,
        ));
        obs.record(&update(id, 2, EventKind::PhaseStarted, Phase::Pulling, 100));
        let mut pull = update(id, 3, EventKind::Progress, Phase::Pulling, 200);
        pull.pull = Some(PullProgress {
            image_current_bytes: 1000,
            ..Default::default()
        });
        obs.record(&pull);
        pull.sequence = 4;
        pull.pull.as_mut().unwrap().image_current_bytes = 2500;
        obs.record(&pull);
        let mut end = update(
            id,
            5,
            EventKind::Finished {
                state: DeploymentState::Failed,
            },
            Phase::Failed,
            3000,
        );
        end.result = Some(DeploymentResult {
            health: vec![HealthOutcome {
                check: "tcp".into(),
                healthy: false,
                attempts: 7,
                message: String::new(),
            }],
            ..Default::default()
        });
        obs.record(&end);
        metrics.run_upkeep();
        let text = metrics.render();
        assert_eq!(
            sample(&text, "stevedore_deployments_started_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"stevedore_deployments_finished_total{outcome="failed"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"stevedore_deployments_finished_total{outcome="succeeded"}"#
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, "stevedore_pull_bytes_total"), Some(2500.0));
        assert_eq!(
            sample(
                &text,
                r#"stevedore_health_check_attempts_total{check="tcp"}"#
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"stevedore_phase_duration_seconds_count{phase="pulling",outcome="failed"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"stevedore_phase_duration_seconds_sum{phase="queued",outcome="completed"}"#
            ),
            Some(0.1)
        );
        assert_eq!(
            sample(
                &text,
                r#"stevedore_deployment_duration_seconds_bucket{outcome="failed",le="5"}"#
            ),
            Some(1.0)
        );
        assert!(text.contains("# TYPE stevedore_deployment_duration_seconds histogram"));
        assert!(
            !text.contains(&id.to_string()),
            "no deployment ID as a label"
        );
        assert!(!text.contains("app=\""), "no app label without the flag");
    }

    #[test]
    fn app_label_only_when_asked() {
        let metrics = Arc::new(Metrics::new(true));
        let obs = MetricsObserver::new(metrics.clone());
        obs.record(&update(
            DeploymentId::new(),
            1,
            EventKind::accepted_for_test(),
            Phase::Queued,
            0,
        ));
        assert_eq!(
            sample(
                &metrics.render(),
                r#"stevedore_deployments_started_total{app="web"}"#
            ),
            Some(1.0)
        );
    }
}
