//! The observer that turns deployment state changes into audit records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::AuditLog;
use crate::events::{Observer, ObserverError};
use crate::model::{DeploymentId, EventKind, Refusal, StateChange, Update};

/// What the log knows of a deployment beyond the update at hand.
#[derive(Default)]
struct DeploymentFacts {
    image: String,
    image_digest: String,
    container_id: String,
    requested_by: String,
    env_keys: Vec<String>,
    target: &'static str,
    replicas: u32,
    started: bool,
}

impl DeploymentFacts {
    /// Takes in what `u` tells: the accepted request, then the digest and container
    /// as they become known (`image_digest` / `container_id` of progress updates, and
    /// the result).
    fn learn(&mut self, u: &Update) {
        if let EventKind::Accepted {
            image,
            requested_by,
            env_keys,
            target,
            replicas,
        } = &u.kind
        {
            self.target = target.as_str();
            self.replicas = *replicas;
            self.image.clone_from(image);
            self.requested_by.clone_from(requested_by);
            self.env_keys.clone_from(env_keys);
        }
        let meta = |k: &str| u.metadata.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(d) = meta("image_digest") {
            self.image_digest = d;
        }
        if let Some(c) = meta("container_id") {
            self.container_id = c;
        }
        if let Some(r) = &u.result {
            if !r.image_digest.is_empty() {
                self.image_digest.clone_from(&r.image_digest);
            }
            if !r.container_id.is_empty() {
                self.container_id.clone_from(&r.container_id);
            }
        }
    }
}

/// The observer that writes the audit log. Subscribe it with
/// `ObserverRegistry::subscribe_lossless`.
pub(crate) struct AuditObserver {
    log: Arc<AuditLog>,
    live: Mutex<HashMap<DeploymentId, DeploymentFacts>>,
}

impl AuditObserver {
    pub(crate) fn new(log: Arc<AuditLog>) -> Self {
        Self {
            log,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The record for `u`, if it is a state change.
    fn record(&self, u: &Update) -> Option<Map<String, Value>> {
        let mut live = self.live.lock().expect("audit lock");
        let facts = live.entry(u.deployment_id).or_default();
        facts.learn(u);
        let (event, outcome, error) = match u.kind.state_change()? {
            StateChange::Accepted => ("accepted", None, None),
            StateChange::PhaseStarted if !facts.started => {
                facts.started = true;
                ("started", None, None)
            }
            StateChange::PhaseStarted => ("phase_started", None, None),
            StateChange::Cancelling => ("cancelling", None, None),
            StateChange::Finished(state) => {
                let error =
                    (state != crate::model::DeploymentState::Succeeded).then(|| u.message.clone());
                (state.as_str(), Some(state.as_str()), error)
            }
        };
        let record = json!({
            "time": humantime::format_rfc3339_millis(u.timestamp).to_string(),
            "event": event,
            "operation": u.operation.as_str(),
            "deployment_id": u.deployment_id.to_string(),
            "sequence": u.sequence,
            "app": u.app.as_str(),
            "image": facts.image,
            "image_digest": facts.image_digest,
            "container_id": facts.container_id,
            "phase": u.phase.as_str(),
            "outcome": outcome,
            "error": error,
            "requested_by": facts.requested_by,
            "env_keys": facts.env_keys,
            "target": facts.target,
            "replicas": facts.replicas,
            "message": u.message,
        });
        if u.is_terminal() {
            live.remove(&u.deployment_id);
        }
        match record {
            Value::Object(map) => Some(map),
            _ => unreachable!("json! of an object"),
        }
    }
}

#[async_trait]
impl Observer for AuditObserver {
    fn name(&self) -> &str {
        "audit"
    }

    async fn on_update(&self, update: Arc<Update>) -> Result<(), ObserverError> {
        // Queued only: `on_idle` writes the records of a burst with one fdatasync.
        if let Some(record) = self.record(&update) {
            self.log.queue(record);
        }
        Ok(())
    }

    fn gather(&self) -> std::time::Duration {
        super::GATHER
    }

    async fn on_idle(&self) -> Result<(), ObserverError> {
        // On failure the records stay queued in the log (written by a later append or
        // the retry task), so nothing is lost; the failure is counted.
        self.log.append(None).await.map_err(ObserverError)
    }

    async fn on_refusal(&self, refusal: Arc<Refusal>) -> Result<(), ObserverError> {
        let record = json!({
            "time": humantime::format_rfc3339_millis(refusal.time).to_string(),
            "event": "refused",
            "method": refusal.method,
            "requested_by": refusal.caller.as_deref().unwrap_or("anonymous"),
            "peer": refusal.peer.map(|p| p.to_string()).unwrap_or_default(),
            "code": refusal.code,
            "message": refusal.reason,
        });
        let Value::Object(record) = record else {
            unreachable!("json! of an object")
        };
        self.log.queue(record);
        Ok(())
    }

    fn admit(&self) -> Result<(), ObserverError> {
        self.log.check().map_err(ObserverError)
    }
}
