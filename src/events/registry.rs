//! The observer registry: fans every update out to in-process observers (metrics,
//! audit, webhooks …), each through its own bounded queue and task.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::model::Update;

/// Why an observer could not handle an event. Counted and logged, never propagated.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ObserverError(pub String);

/// Something that wants to see every deployment update. Implement this and subscribe
/// it with [`ObserverRegistry::subscribe`]; that is all the wiring there is.
#[async_trait]
pub trait Observer: Send + Sync + 'static {
    /// Short, stable name: used as the `observer` label of the drop/failure metrics.
    fn name(&self) -> &str;

    /// Handles one update. Runs on the observer's own task: taking long only fills
    /// its own queue, an error or a panic is counted and the next event still comes.
    async fn on_update(&self, update: Arc<Update>) -> Result<(), ObserverError>;
}

/// Counters of one observer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserverStats {
    pub delivered: u64,
    pub dropped: u64,
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

struct Entry {
    name: String,
    tx: mpsc::Sender<Arc<Update>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    /// Counters outlive their subscription so the exported totals never go back.
    totals: BTreeMap<String, Arc<Counters>>,
}

/// Fans updates out to observers. Cheap to clone.
#[derive(Clone, Default)]
pub struct ObserverRegistry {
    inner: Arc<Mutex<Inner>>,
}

/// Keeps an observer subscribed; dropping it unsubscribes (the observer's task ends
/// after the events already queued).
#[must_use = "dropping the subscription unsubscribes the observer"]
pub struct Subscription {
    registry: Weak<Mutex<Inner>>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.registry.upgrade() {
            inner
                .lock()
                .expect("registry lock")
                .entries
                .remove(&self.id);
        }
    }
}

/// Default queue length per observer.
#[allow(dead_code)]
pub const DEFAULT_QUEUE: usize = 1024;

impl ObserverRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes `observer` with a queue of `queue` events. Must be called inside a
    /// tokio runtime: the observer gets its own task.
    pub fn subscribe(&self, observer: Arc<dyn Observer>, queue: usize) -> Subscription {
        let (tx, mut rx) = mpsc::channel::<Arc<Update>>(queue.max(1));
        let name = observer.name().to_owned();
        let mut inner = self.inner.lock().expect("registry lock");
        let counters = inner.totals.entry(name.clone()).or_default().clone();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.insert(
            id,
            Entry {
                name: name.clone(),
                tx,
                counters: counters.clone(),
            },
        );
        drop(inner);

        tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                let outcome = AssertUnwindSafe(observer.on_update(update))
                    .catch_unwind()
                    .await;
                match outcome {
                    Ok(Ok(())) => {
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(observer = %name, error = %e, "observer failed to handle an update");
                    }
                    Err(_) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(observer = %name, "observer panicked while handling an update");
                    }
                }
            }
        });
        Subscription {
            registry: Arc::downgrade(&self.inner),
            id,
        }
    }

    /// Hands `update` to every observer without waiting: an observer whose queue is
    /// full loses this update, and the loss is counted.
    pub fn publish(&self, update: &Arc<Update>) {
        let inner = self.inner.lock().expect("registry lock");
        for entry in inner.entries.values() {
            if entry.tx.try_send(update.clone()).is_err() {
                let dropped = entry.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(observer = %entry.name, dropped, "observer queue full; update dropped");
                }
            }
        }
    }

    /// Counters per observer name (including observers no longer subscribed).
    pub fn stats(&self) -> BTreeMap<String, ObserverStats> {
        let inner = self.inner.lock().expect("registry lock");
        inner
            .totals
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    ObserverStats {
                        delivered: c.delivered.load(Ordering::Relaxed),
                        dropped: c.dropped.load(Ordering::Relaxed),
                        failed: c.failed.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use std::time::{Duration, SystemTime};

    fn update(seq: u64) -> Arc<Update> {
        Arc::new(Update {
            deployment_id: DeploymentId::new(),
            sequence: seq,
            app: AppName::parse("app").unwrap(),
            kind: EventKind::Progress,
            phase: Phase::Pulling,
            phase_progress: 0.0,
            total_progress: 0.0,
            level: Level::Info,
            message: String::new(),
            timestamp: SystemTime::now(),
            elapsed: Duration::ZERO,
            metadata: Default::default(),
            pull: None,
            result: None,
        })
    }

    struct Recorder(Mutex<Vec<u64>>);
    #[async_trait]
    impl Observer for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
            self.0.lock().unwrap().push(u.sequence);
            Ok(())
        }
    }

    struct Panicker;
    #[async_trait]
    impl Observer for Panicker {
        fn name(&self) -> &str {
            "panicker"
        }
        async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
            if u.sequence.is_multiple_of(2) {
                panic!("observer bug");
            }
            Err(ObserverError("nope".into()))
        }
    }

    struct Sleeper;
    #[async_trait]
    impl Observer for Sleeper {
        fn name(&self) -> &str {
            "sleeper"
        }
        async fn on_update(&self, _: Arc<Update>) -> Result<(), ObserverError> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn bad_observers_do_not_affect_good_ones() {
        let registry = ObserverRegistry::new();
        let recorder = Arc::new(Recorder(Mutex::new(vec![])));
        let _a = registry.subscribe(recorder.clone(), 1000);
        let _b = registry.subscribe(Arc::new(Panicker), 1000);
        let _c = registry.subscribe(Arc::new(Sleeper), 4);
        for s in 1..=100 {
            registry.publish(&update(s));
        }
        for _ in 0..200 {
            if recorder.0.lock().unwrap().len() == 100 && registry.stats()["panicker"].failed == 100
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*recorder.0.lock().unwrap(), (1..=100).collect::<Vec<_>>());
        let stats = registry.stats();
        assert_eq!(stats["panicker"].failed, 100);
        // The sleeper queues four events (and holds one more if its task took the first
        // before the rest were published); the rest are dropped.
        assert!(
            (95..=96).contains(&stats["sleeper"].dropped),
            "{:?}",
            stats["sleeper"]
        );
    }

    #[tokio::test]
    async fn dropping_the_subscription_unsubscribes() {
        let registry = ObserverRegistry::new();
        let recorder = Arc::new(Recorder(Mutex::new(vec![])));
        let sub = registry.subscribe(recorder.clone(), 10);
        registry.publish(&update(1));
        drop(sub);
        registry.publish(&update(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*recorder.0.lock().unwrap(), vec![1]);
    }
}
