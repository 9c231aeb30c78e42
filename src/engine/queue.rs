//! One deployment per app at a time: a FIFO queue per app, and the admission of new
//! deployments: at most `max_in_flight` apps deploying at once and at most `max_queued`
//! deployments waiting for their app's lock (all apps together). Admission is decided
//! at once when Deploy is called, so an overloaded server says `RESOURCE_EXHAUSTED`
//! instead of letting callers hang.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::limits::Rejection;
use crate::model::{AppName, DeploymentId};

#[derive(Default)]
struct Slot {
    running: Option<DeploymentId>,
    waiting: VecDeque<(DeploymentId, watch::Sender<u32>)>,
}

/// The per-app locks and their queues.
#[derive(Clone)]
pub(crate) struct AppQueues {
    inner: Arc<Mutex<HashMap<AppName, Slot>>>,
    max_in_flight: usize,
    max_queued: usize,
}

/// A place in an app's queue. `position()` is 0 once it is this deployment's turn
/// (it then holds the app's lock), else its 1-based place in the line. Dropping the
/// ticket (when the deployment's task ends) releases the lock or leaves the line,
/// moves the queue on, and frees the admission place.
pub(crate) struct Ticket {
    queues: AppQueues,
    app: AppName,
    id: DeploymentId,
    position: watch::Receiver<u32>,
}

/// Why a deployment was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) limit: Rejection,
    pub(crate) max: usize,
}

impl AppQueues {
    pub(crate) fn new(max_in_flight: usize, max_queued: usize) -> Self {
        Self {
            inner: Arc::default(),
            max_in_flight,
            max_queued,
        }
    }

    /// Admits deployment `id` of `app` into its app's queue, or refuses it when a
    /// limit is reached.
    pub(crate) fn admit(&self, app: &AppName, id: DeploymentId) -> Result<Ticket, Refused> {
        let mut inner = self.inner.lock().expect("queue lock");
        if inner.contains_key(app) {
            // It will wait for the app's lock.
            let queued: usize = inner.values().map(|s| s.waiting.len()).sum();
            if queued >= self.max_queued {
                return Err(Refused {
                    limit: Rejection::Queued,
                    max: self.max_queued,
                });
            }
        } else if inner.len() >= self.max_in_flight {
            return Err(Refused {
                limit: Rejection::InFlight,
                max: self.max_in_flight,
            });
        }
        Ok(self.join(&mut inner, app, id))
    }

    /// Puts deployment `id` of `app` in its app's queue whatever the limits: a
    /// deployment recovery takes over after a restart was admitted by the previous
    /// process already.
    pub(crate) fn admit_recovered(&self, app: &AppName, id: DeploymentId) -> Ticket {
        self.join(&mut self.inner.lock().expect("queue lock"), app, id)
    }

    /// The lock of `app` for `id`, or a place at the end of its line.
    fn join(&self, inner: &mut HashMap<AppName, Slot>, app: &AppName, id: DeploymentId) -> Ticket {
        let slot = inner.entry(app.clone()).or_default();
        let position = if slot.running.is_none() {
            slot.running = Some(id);
            watch::channel(0).1
        } else {
            let (tx, rx) = watch::channel(slot.waiting.len() as u32 + 1);
            slot.waiting.push_back((id, tx));
            rx
        };
        Ticket {
            queues: self.clone(),
            app: app.clone(),
            id,
            position,
        }
    }

    /// The deployment right ahead of `id` in its app's line: the running one for the
    /// first in line, else the one waiting before it.
    fn ahead_of(&self, app: &AppName, id: DeploymentId) -> Option<DeploymentId> {
        let inner = self.inner.lock().expect("queue lock");
        let slot = inner.get(app)?;
        let place = slot.waiting.iter().position(|(w, _)| *w == id)?;
        match place {
            0 => slot.running,
            n => Some(slot.waiting[n - 1].0),
        }
    }

    fn leave(&self, app: &AppName, id: DeploymentId) {
        let mut inner = self.inner.lock().expect("queue lock");
        let Some(slot) = inner.get_mut(app) else {
            return;
        };
        if slot.running == Some(id) {
            slot.running = None;
            if let Some((next, tx)) = slot.waiting.pop_front() {
                slot.running = Some(next);
                let _ = tx.send(0);
            }
        } else {
            slot.waiting.retain(|(w, _)| *w != id);
        }
        for (i, (_, tx)) in slot.waiting.iter().enumerate() {
            tx.send_if_modified(|p| {
                let new = i as u32 + 1;
                let changed = *p != new;
                *p = new;
                changed
            });
        }
        if slot.running.is_none() && slot.waiting.is_empty() {
            inner.remove(app);
        }
    }
}

impl Ticket {
    pub(crate) fn position(&self) -> u32 {
        *self.position.borrow()
    }

    /// The deployment this one waits behind (none once it holds the lock).
    pub(crate) fn ahead(&self) -> Option<DeploymentId> {
        self.queues.ahead_of(&self.app, self.id)
    }

    /// Waits until the position changes; returns the new one.
    pub(crate) async fn changed(&mut self) -> u32 {
        if self.position.changed().await.is_err() {
            // The sender is gone only once we were granted or removed; read the last value.
            std::future::pending::<()>().await;
        }
        *self.position.borrow_and_update()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queues.leave(&self.app, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(s: &str) -> AppName {
        AppName::parse(s).unwrap()
    }

    /// The ticket's next position; fails instead of hanging when the queue never
    /// moves it (a leave that does not move the line on).
    async fn next_position(ticket: &mut Ticket) -> u32 {
        tokio::time::timeout(std::time::Duration::from_secs(10), ticket.changed())
            .await
            .expect("the position did not change within 10 s")
    }

    #[tokio::test]
    async fn fifo_with_positions_and_leaving() {
        let q = AppQueues::new(usize::MAX, usize::MAX);
        let app = app("a");
        let (a, b, c) = (
            DeploymentId::new(),
            DeploymentId::new(),
            DeploymentId::new(),
        );
        let ta = q.admit(&app, a).unwrap();
        let mut tb = q.admit(&app, b).unwrap();
        let mut tc = q.admit(&app, c).unwrap();
        assert_eq!((ta.position(), tb.position(), tc.position()), (0, 1, 2));
        drop(tb); // b leaves the line: c moves up
        assert_eq!(next_position(&mut tc).await, 1);
        drop(ta); // a finishes: c runs
        assert_eq!(next_position(&mut tc).await, 0);
        tb = q.admit(&app, b).unwrap();
        assert_eq!(tb.position(), 1);
        drop(tc);
        assert_eq!(next_position(&mut tb).await, 0);
        drop(tb);
        assert!(q.inner.lock().unwrap().is_empty());
    }

    #[test]
    fn in_flight_and_queued_caps_hold_and_free_on_drop() {
        let q = AppQueues::new(2, 1);
        let admit = |name: &str| q.admit(&app(name), DeploymentId::new());
        let a1 = admit("a").unwrap();
        let _b1 = admit("b").unwrap();
        let refused = admit("c").err().unwrap();
        assert_eq!(refused.limit, Rejection::InFlight);
        let a2 = admit("a").unwrap(); // queues behind a1
        assert_eq!(admit("a").err().unwrap().limit, Rejection::Queued);
        assert_eq!(admit("b").err().unwrap().limit, Rejection::Queued);
        drop(a2);
        let _b2 = admit("b").unwrap();
        drop(a1);
        // `a` has ended: `c` may start; then two apps deploy again.
        let _c1 = admit("c").unwrap();
        assert_eq!(admit("d").err().unwrap().limit, Rejection::InFlight);
    }
}
