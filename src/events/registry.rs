//! The observer registry: fans every update out to in-process observers (metrics,
//! audit, webhooks …), each through its own queue and task.
//!
//! Two kinds of subscription:
//! - [`ObserverRegistry::subscribe`]: a bounded queue; when it is full the update is
//!   dropped for that observer only, and the drop is counted. For observers that can
//!   afford to miss an event (metrics, webhooks).
//! - [`ObserverRegistry::subscribe_lossless`]: an unbounded queue; never drops, never
//!   waits. For observers that must see everything (the audit log). Such an observer
//!   should also implement [`Observer::admit`], so that while it cannot keep up (its
//!   file cannot be written) new deployments are refused instead of piling up.
//!
//! Publishing never waits in either case: the deployment's task only pushes an `Arc`.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::model::{Refusal, Update};

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

    /// Handles a call refused at the edge ([`ObserverRegistry::publish_refusal`]),
    /// on the same queue and task as the updates. The default ignores it.
    async fn on_refusal(&self, refusal: Arc<Refusal>) -> Result<(), ObserverError> {
        let _ = refusal;
        Ok(())
    }

    /// Called on the observer's task when its queue is empty after one or more events,
    /// before it waits for the next: where work deferred by `on_update` is finished,
    /// once for a burst (the audit log writes and syncs the records of a burst with
    /// one `fdatasync`). An error is counted like a failed update. The default does
    /// nothing.
    async fn on_idle(&self) -> Result<(), ObserverError> {
        Ok(())
    }

    /// How long, once its queue runs empty after events, the observer's task waits for
    /// more before `on_idle` (once per burst): events that follow within it join the
    /// burst, so one `on_idle` finishes them all (the audit log: one `fdatasync` for
    /// a deployment's updates that come a few milliseconds apart). The default is
    /// zero: `on_idle` runs as soon as the queue is empty.
    fn gather(&self) -> Duration {
        Duration::ZERO
    }

    /// Asked before a new deployment is accepted: an error refuses it (the engine
    /// answers `UNAVAILABLE` with this message). Must be cheap and must not block.
    /// The default admits everything.
    fn admit(&self) -> Result<(), ObserverError> {
        Ok(())
    }

    /// Called once on the observer's task after its last update, when the
    /// subscription is drained ([`Subscription::drain`]): flush, finish deliveries.
    async fn on_close(&self) {}
}

/// Counters of one observer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserverStats {
    pub(crate) delivered: u64,
    pub dropped: u64,
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// What goes through an observer's queue: deployment updates and refusals.
#[derive(Clone)]
enum Event {
    Update(Arc<Update>),
    Refusal(Arc<Refusal>),
}

enum Queue {
    Bounded(mpsc::Sender<Event>),
    Lossless(mpsc::UnboundedSender<Event>),
}

impl Queue {
    /// Queues without waiting; false when the event could not be queued.
    fn offer(&self, event: &Event) -> bool {
        match self {
            Queue::Bounded(tx) => tx.try_send(event.clone()).is_ok(),
            Queue::Lossless(tx) => tx.send(event.clone()).is_ok(),
        }
    }
}

struct Entry {
    name: String,
    observer: Arc<dyn Observer>,
    queue: Queue,
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
/// after the events already queued). [`Subscription::drain`] unsubscribes and waits
/// for that.
#[must_use = "dropping the subscription unsubscribes the observer"]
pub struct Subscription {
    registry: Weak<Mutex<Inner>>,
    id: u64,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ObserverRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverRegistry").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Unsubscribes, then waits until the observer has handled every update already
    /// queued and its [`Observer::on_close`] has returned.
    pub(crate) async fn drain(mut self) {
        self.unsubscribe();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn unsubscribe(&self) {
        if let Some(inner) = self.registry.upgrade() {
            let entry = inner
                .lock()
                .expect("registry lock")
                .entries
                .remove(&self.id);
            // Dropped outside the lock: this closes the observer's queue.
            drop(entry);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unsubscribe();
    }
}

/// Default queue length per observer.
pub(crate) const DEFAULT_QUEUE: usize = 1024;

enum Receiver {
    Bounded(mpsc::Receiver<Event>),
    Lossless(mpsc::UnboundedReceiver<Event>),
}

impl Receiver {
    async fn recv(&mut self) -> Option<Event> {
        match self {
            Receiver::Bounded(rx) => rx.recv().await,
            Receiver::Lossless(rx) => rx.recv().await,
        }
    }

    /// The next event if one is queued already.
    fn try_recv(&mut self) -> Option<Event> {
        match self {
            Receiver::Bounded(rx) => rx.try_recv().ok(),
            Receiver::Lossless(rx) => rx.try_recv().ok(),
        }
    }
}

/// Counts and logs a failed (`Ok(Some(error))`) or panicked (`Err`) call.
fn count_failure(
    name: &str,
    counters: &Counters,
    outcome: Result<Option<ObserverError>, Box<dyn std::any::Any + Send>>,
) {
    match outcome {
        Ok(None) => {}
        Ok(Some(e)) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(observer = %name, error = %e, "observer failed to handle an update");
        }
        Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(observer = %name, "observer panicked while handling an update");
        }
    }
}

impl ObserverRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes `observer` with a queue of `queue` events ([`DEFAULT_QUEUE`] is a
    /// good start): when the queue is full, updates are dropped for this observer and
    /// counted. Must be called inside a tokio runtime: the observer gets its own task.
    pub fn subscribe(&self, observer: Arc<dyn Observer>, queue: usize) -> Subscription {
        let (tx, rx) = mpsc::channel::<Event>(queue.max(1));
        self.add(observer, Queue::Bounded(tx), Receiver::Bounded(rx))
    }

    /// Subscribes `observer` with an unbounded queue: it sees every update, however
    /// slow it is, and publishing still never waits. Memory is the price of a stuck
    /// observer, so a lossless observer should refuse new deployments through
    /// [`Observer::admit`] while it cannot make progress.
    pub(crate) fn subscribe_lossless(&self, observer: Arc<dyn Observer>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel::<Event>();
        self.add(observer, Queue::Lossless(tx), Receiver::Lossless(rx))
    }

    fn add(&self, observer: Arc<dyn Observer>, queue: Queue, mut rx: Receiver) -> Subscription {
        let name = observer.name().to_owned();
        let mut inner = self.inner.lock().expect("registry lock");
        let counters = inner.totals.entry(name.clone()).or_default().clone();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.insert(
            id,
            Entry {
                name: name.clone(),
                observer: observer.clone(),
                queue,
                counters: counters.clone(),
            },
        );
        drop(inner);

        let task = tokio::spawn(async move {
            // Whether events were handled since the last `on_idle`, and whether this
            // burst has waited its `gather` for more.
            let (mut busy, mut gathered) = (false, false);
            let gather = observer.gather();
            loop {
                let event = match rx.try_recv() {
                    Some(event) => event,
                    None => {
                        if busy && !gathered && !gather.is_zero() {
                            gathered = true;
                            tokio::time::sleep(gather).await;
                            continue;
                        }
                        gathered = false;
                        if std::mem::take(&mut busy) {
                            let idle = AssertUnwindSafe(observer.on_idle()).catch_unwind();
                            count_failure(&name, &counters, idle.await.map(|r| r.err()));
                        }
                        match rx.recv().await {
                            Some(event) => event,
                            None => break,
                        }
                    }
                };
                busy = true;
                let handled = match event {
                    Event::Update(update) => observer.on_update(update),
                    Event::Refusal(refusal) => observer.on_refusal(refusal),
                };
                let outcome = AssertUnwindSafe(handled).catch_unwind().await;
                if let Ok(Ok(())) = outcome {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                count_failure(&name, &counters, outcome.map(|r| r.err()));
            }
            if AssertUnwindSafe(observer.on_close())
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(observer = %name, "observer panicked while closing");
            }
        });
        Subscription {
            registry: Arc::downgrade(&self.inner),
            id,
            task: Some(task),
        }
    }

    /// Hands `update` to every observer without waiting: an observer whose bounded
    /// queue is full loses this update, and the loss is counted.
    pub(crate) fn publish(&self, update: &Arc<Update>) {
        self.offer(&Event::Update(update.clone()));
    }

    /// Hands a refused call to every observer, like [`ObserverRegistry::publish`]
    /// (same queues, same counters).
    pub(crate) fn publish_refusal(&self, refusal: Refusal) {
        self.offer(&Event::Refusal(Arc::new(refusal)));
    }

    fn offer(&self, event: &Event) {
        let inner = self.inner.lock().expect("registry lock");
        for entry in inner.entries.values() {
            if !entry.queue.offer(event) {
                let dropped = entry.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(observer = %entry.name, dropped, "observer queue full; update dropped");
                }
            }
        }
    }

    /// Asks every subscribed observer whether a new deployment may start; the first
    /// refusal wins. Never waits.
    pub(crate) fn admit(&self) -> Result<(), ObserverError> {
        let observers: Vec<Arc<dyn Observer>> = {
            let inner = self.inner.lock().expect("registry lock");
            inner.entries.values().map(|e| e.observer.clone()).collect()
        };
        observers.iter().try_for_each(|o| o.admit())
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
    use std::time::Duration;

    fn update(seq: u64) -> Arc<Update> {
        Arc::new(Update::for_test(seq, false))
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
        registry.publish(&update(1));
        // Let the sleeper take the first update off its queue (publishing never
        // yields, so on this single-threaded runtime it would not run otherwise).
        tokio::time::sleep(Duration::from_millis(20)).await;
        for s in 2..=100 {
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

    /// Records what the registry calls, in order.
    struct Idler(Mutex<Vec<String>>);
    #[async_trait]
    impl Observer for Idler {
        fn name(&self) -> &str {
            "idler"
        }
        async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
            self.0.lock().unwrap().push(u.sequence.to_string());
            Ok(())
        }
        async fn on_idle(&self) -> Result<(), ObserverError> {
            self.0.lock().unwrap().push("idle".into());
            Ok(())
        }
    }

    /// `on_idle` runs once after a burst (events queued before the observer's task
    /// ran), and again after each later event that finds the queue empty.
    #[tokio::test]
    async fn on_idle_runs_once_the_queue_is_empty() {
        let registry = ObserverRegistry::new();
        let idler = Arc::new(Idler(Mutex::new(vec![])));
        let _sub = registry.subscribe(idler.clone(), 100);
        let calls = |n: usize| {
            let idler = idler.clone();
            async move {
                for _ in 0..500 {
                    if idler.0.lock().unwrap().len() >= n {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                idler.0.lock().unwrap().clone()
            }
        };
        // Publishing never yields: on this single-threaded runtime the three are
        // queued before the observer's task runs.
        for s in 1..=3 {
            registry.publish(&update(s));
        }
        assert_eq!(calls(4).await, ["1", "2", "3", "idle"]);
        registry.publish(&update(4));
        assert_eq!(calls(6).await, ["1", "2", "3", "idle", "4", "idle"]);
    }

    /// An observer with a `gather` time: events published within it after the queue
    /// ran empty join the burst, so one `on_idle` follows them all; one published
    /// after it starts a burst of its own.
    #[tokio::test(start_paused = true)]
    async fn a_burst_gathers_the_events_that_follow_within_its_gather_time() {
        struct Gatherer(Idler);
        #[async_trait]
        impl Observer for Gatherer {
            fn name(&self) -> &str {
                "gatherer"
            }
            async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
                self.0.on_update(u).await
            }
            async fn on_idle(&self) -> Result<(), ObserverError> {
                self.0.on_idle().await
            }
            fn gather(&self) -> Duration {
                Duration::from_millis(5)
            }
        }
        let registry = ObserverRegistry::new();
        let gatherer = Arc::new(Gatherer(Idler(Mutex::new(vec![]))));
        let _sub = registry.subscribe(gatherer.clone(), 100);
        let calls = || gatherer.0.0.lock().unwrap().clone();
        registry.publish(&update(1));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(calls(), ["1"], "no on_idle while gathering");
        registry.publish(&update(2));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(
            calls(),
            ["1"],
            "2 waits in the queue until the gather time ends"
        );
        // The gather time (5 ms from when the queue ran empty) ends: 2, then one
        // on_idle for both.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls(), ["1", "2", "idle"]);
        registry.publish(&update(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls(), ["1", "2", "idle", "3", "idle"]);
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

    struct Gate(std::sync::atomic::AtomicBool);
    #[async_trait]
    impl Observer for Gate {
        fn name(&self) -> &str {
            "gate"
        }
        async fn on_update(&self, _: Arc<Update>) -> Result<(), ObserverError> {
            Ok(())
        }
        fn admit(&self) -> Result<(), ObserverError> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(ObserverError("gate closed".into()))
            }
        }
    }

    #[tokio::test]
    async fn admission_asks_every_subscribed_observer() {
        let registry = ObserverRegistry::new();
        assert!(registry.admit().is_ok());
        let gate = Arc::new(Gate(false.into()));
        let sub = registry.subscribe(gate.clone(), 1);
        assert_eq!(registry.admit().unwrap_err().to_string(), "gate closed");
        gate.0.store(true, Ordering::SeqCst);
        assert!(registry.admit().is_ok());
        gate.0.store(false, Ordering::SeqCst);
        drop(sub);
        assert!(
            registry.admit().is_ok(),
            "an unsubscribed observer has no say"
        );
    }

    /// Records the refusals it is handed, next to the updates.
    struct Refusals(Mutex<Vec<String>>);
    #[async_trait]
    impl Observer for Refusals {
        fn name(&self) -> &str {
            "refusals"
        }
        async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("update {}", u.sequence));
            Ok(())
        }
        async fn on_refusal(&self, r: Arc<Refusal>) -> Result<(), ObserverError> {
            self.0.lock().unwrap().push(format!("refusal {}", r.method));
            Ok(())
        }
    }

    #[tokio::test]
    async fn refusals_reach_observers_in_order_with_the_updates() {
        let registry = ObserverRegistry::new();
        let seen = Arc::new(Refusals(Mutex::new(vec![])));
        let sub = registry.subscribe(seen.clone(), 10);
        registry.publish(&update(1));
        registry.publish_refusal(Refusal {
            time: std::time::SystemTime::now(),
            method: "Deploy".into(),
            caller: None,
            peer: None,
            code: "PermissionDenied".into(),
            reason: "no".into(),
        });
        registry.publish(&update(2));
        tokio::time::timeout(Duration::from_secs(10), sub.drain())
            .await
            .expect("drain ends once the queued events are handled");
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec!["update 1", "refusal Deploy", "update 2"]
        );
        assert_eq!(registry.stats()["refusals"].delivered, 3);
    }

    /// Holds every update until released, then records it.
    struct Held {
        release: tokio::sync::Semaphore,
        seen: Mutex<Vec<u64>>,
    }
    #[async_trait]
    impl Observer for Held {
        fn name(&self) -> &str {
            "held"
        }
        async fn on_update(&self, u: Arc<Update>) -> Result<(), ObserverError> {
            self.release.acquire().await.unwrap().forget();
            self.seen.lock().unwrap().push(u.sequence);
            Ok(())
        }
    }

    #[tokio::test]
    async fn lossless_subscription_never_drops_and_drain_waits() {
        let registry = ObserverRegistry::new();
        let held = Arc::new(Held {
            release: tokio::sync::Semaphore::new(0),
            seen: Mutex::new(vec![]),
        });
        let sub = registry.subscribe_lossless(held.clone());
        for s in 1..=5000 {
            registry.publish(&update(s));
        }
        assert_eq!(registry.stats()["held"].dropped, 0);
        held.release.add_permits(5000);
        tokio::time::timeout(Duration::from_secs(10), sub.drain())
            .await
            .expect(
                "drain ends once the queued updates are handled (unsubscribing closes the queue)",
            );
        assert_eq!(*held.seen.lock().unwrap(), (1..=5000).collect::<Vec<_>>());
        assert_eq!(registry.stats()["held"].delivered, 5000);
    }
}
