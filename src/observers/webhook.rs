//! Webhooks: one signed JSON POST per deployment state change to each configured URL.
//!
//! Events: `accepted`, `phase_started` (each phase), `cancelling` and the terminal
//! `finished` (body `state` = succeeded, failed, cancelled, with the `result`).
//! Headers: `X-Stevedore-Signature: sha256=<hex HMAC-SHA256 of the body with the
//! secret>`, `X-Stevedore-Event-Id` (`<deployment_id>-<sequence>`, the same on every
//! retry: receivers deduplicate on it) and `X-Stevedore-Event`.
//!
//! Delivery: the observer only queues; each (URL, deployment) pair has its own worker
//! that delivers that deployment's events one after the other, so order per
//! deployment is kept while deployments (and URLs) do not wait on each other. A
//! failed attempt (connection error, timeout, 5xx, 408, 429) is retried with
//! exponential backoff (doubling from `backoff_initial`, capped at `backoff_max`,
//! with jitter) up to `max_attempts`; other 4xx answers are not retried. An event
//! given up on is counted and logged, and the next one of the deployment follows.
//! Nothing here runs on a deployment's task: an unreachable endpoint never slows one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::Metrics;
use crate::events::{Observer, ObserverError};
use crate::model::{DeploymentId, StateChange, Update};

pub const SIGNATURE_HEADER: &str = "X-Stevedore-Signature";
pub const EVENT_ID_HEADER: &str = "X-Stevedore-Event-Id";
pub(crate) const EVENT_HEADER: &str = "X-Stevedore-Event";

/// Webhook settings.
#[derive(Clone)]
pub(crate) struct WebhookConfig {
    pub(crate) urls: Vec<String>,
    pub(crate) secret: String,
    pub(crate) max_attempts: u32,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// Time limit of one POST.
    pub(crate) timeout: Duration,
    /// On shutdown, how long queued deliveries may still take.
    pub(crate) shutdown_grace: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("urls", &self.urls.len())
            .field("secret", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// The webhook signing secret: never shown by `Debug` (so a logged config keeps it).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl std::str::FromStr for WebhookSecret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl From<&str> for WebhookSecret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`: the value of [`SIGNATURE_HEADER`].
pub(crate) fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a [`SIGNATURE_HEADER`] value in constant time (for receivers and tests).
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// One event, ready to send.
struct Delivery {
    event_id: String,
    event: &'static str,
    body: Vec<u8>,
    signature: String,
    terminal: bool,
}

struct Shared {
    config: WebhookConfig,
    client: reqwest::Client,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
}

/// (index of the URL, deployment): one worker, one ordered queue.
type WorkerKey = (usize, DeploymentId);

/// Posts deployment state changes to the configured URLs.
pub(crate) struct WebhookObserver {
    shared: Arc<Shared>,
    /// Queue of each (URL index, deployment) worker.
    workers: Mutex<HashMap<WorkerKey, mpsc::UnboundedSender<Arc<Delivery>>>>,
    tasks: TaskTracker,
}

impl WebhookObserver {
    pub(crate) fn new(config: WebhookConfig, metrics: Option<Arc<Metrics>>) -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("stevedore/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        Self {
            shared: Arc::new(Shared {
                config,
                client,
                metrics,
                stop: CancellationToken::new(),
            }),
            workers: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        }
    }

    fn delivery(&self, u: &Update) -> Option<Delivery> {
        let (event, state) = match u.kind.state_change()? {
            StateChange::Accepted => ("accepted", None),
            StateChange::PhaseStarted => ("phase_started", None),
            StateChange::Cancelling => ("cancelling", None),
            StateChange::Finished(state) => ("finished", Some(state.as_str())),
        };
        let event_id = format!("{}-{}", u.deployment_id, u.sequence);
        let result = u.result.as_ref().map(|r| {
            json!({
                "success": r.success,
                "message": r.message,
                "container_id": r.container_id,
                "image_digest": r.image_digest,
                "endpoints": r.endpoints,
            })
        });
        let body = json!({
            "event_id": event_id,
            "event": event,
            "operation": u.operation.as_str(),
            "deployment_id": u.deployment_id.to_string(),
            "sequence": u.sequence,
            "app": u.app.as_str(),
            "phase": u.phase.as_str(),
            "state": state,
            "message": u.message,
            "timestamp": humantime::format_rfc3339_millis(u.timestamp).to_string(),
            "elapsed_seconds": u.elapsed.as_secs_f64(),
            "metadata": u.metadata,
            "result": result.unwrap_or(Value::Null),
        });
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let signature = sign(self.shared.config.secret.as_bytes(), &body);
        Some(Delivery {
            event_id,
            event,
            body,
            signature,
            terminal: u.is_terminal(),
        })
    }

    fn dispatch(&self, deployment: DeploymentId, delivery: Arc<Delivery>) {
        let mut workers = self.workers.lock().expect("webhook lock");
        for (index, url) in self.shared.config.urls.iter().enumerate() {
            let key = (index, deployment);
            let tx = workers.entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                self.tasks
                    .spawn(worker(self.shared.clone(), url.clone(), rx));
                tx
            });
            let _ = tx.send(delivery.clone());
            if delivery.terminal {
                // The worker ends once it has delivered what is queued.
                workers.remove(&key);
            }
        }
    }
}

async fn worker(shared: Arc<Shared>, url: String, mut rx: mpsc::UnboundedReceiver<Arc<Delivery>>) {
    while let Some(delivery) = rx.recv().await {
        tokio::select! {
            _ = deliver(&shared, &url, &delivery) => {}
            _ = shared.stop.cancelled() => {
                tracing::warn!(url = %url, event_id = %delivery.event_id, "shutting down: webhook delivery abandoned");
                count(&shared, "stevedore_webhook_deliveries_total", "abandoned");
                break;
            }
        }
    }
}

fn count(shared: &Shared, name: &'static str, outcome: &str) {
    if let Some(m) = &shared.metrics {
        m.counter(name, &[("outcome", outcome.into())]).increment(1);
    }
}

fn count_failed_attempt(shared: &Shared) {
    if let Some(m) = &shared.metrics {
        m.counter("stevedore_webhook_attempt_failures_total", &[])
            .increment(1);
    }
}

/// POSTs one event, retrying as documented above.
async fn deliver(shared: &Shared, url: &str, d: &Delivery) {
    let cfg = &shared.config;
    let mut delay = cfg.backoff_initial;
    let attempts = cfg.max_attempts.max(1);
    for attempt in 1..=attempts {
        let sent = shared
            .client
            .post(url)
            .timeout(cfg.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, &d.signature)
            .header(EVENT_ID_HEADER, &d.event_id)
            .header(EVENT_HEADER, d.event)
            .body(d.body.clone())
            .send()
            .await;
        let (why, retry) = match sent {
            Ok(r) if r.status().is_success() => {
                count(shared, "stevedore_webhook_deliveries_total", "delivered");
                return;
            }
            Ok(r) => {
                let s = r.status();
                let retry = s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429;
                (format!("answered {s}"), retry)
            }
            Err(e) => (format!("{e}"), true),
        };
        count_failed_attempt(shared);
        if !retry || attempt == attempts {
            tracing::warn!(url = %url, event_id = %d.event_id, attempt, error = %why, "webhook delivery given up");
            count(shared, "stevedore_webhook_deliveries_total", "abandoned");
            return;
        }
        tracing::debug!(url = %url, event_id = %d.event_id, attempt, error = %why, "webhook attempt failed; retrying");
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(cfg.backoff_max);
    }
}

/// Between half and all of `d`, so many senders do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let r = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + r / 2.0)
}

#[async_trait]
impl Observer for WebhookObserver {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn on_update(&self, update: Arc<Update>) -> Result<(), ObserverError> {
        if let Some(d) = self.delivery(&update) {
            self.dispatch(update.deployment_id, Arc::new(d));
        }
        Ok(())
    }

    /// Lets queued deliveries finish for up to `shutdown_grace`, then abandons them.
    async fn on_close(&self) {
        self.workers.lock().expect("webhook lock").clear();
        self.tasks.close();
        if tokio::time::timeout(self.shared.config.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            self.shared.stop.cancel();
            self.tasks.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let sig = sign(b"key", b"The quick brown fox jumps over the lazy dog");
        // RFC 4231-style known answer (HMAC-SHA256, key "key").
        assert_eq!(
            sig,
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(verify_signature(
            b"key",
            b"The quick brown fox jumps over the lazy dog",
            &sig
        ));
        assert!(!verify_signature(b"key", b"the quick", &sig));
        assert!(!verify_signature(
            b"other",
            b"The quick brown fox jumps over the lazy dog",
            &sig
        ));
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
