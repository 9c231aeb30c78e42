//! One deployment per app at a time: a FIFO queue per app.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::model::{AppName, DeploymentId};

#[derive(Default)]
struct Slot {
    running: Option<DeploymentId>,
    waiting: VecDeque<(DeploymentId, watch::Sender<u32>)>,
}

/// The per-app locks and their queues.
#[derive(Clone, Default)]
pub struct AppQueues {
    inner: Arc<Mutex<HashMap<AppName, Slot>>>,
}

/// A place in an app's queue. `position()` is 0 once it is this deployment's turn
/// (it then holds the app's lock), else its 1-based place in the line. Dropping the
/// ticket releases the lock or leaves the line, and moves the queue on.
pub struct Ticket {
    queues: AppQueues,
    app: AppName,
    id: DeploymentId,
    position: watch::Receiver<u32>,
}

impl AppQueues {
    pub fn join(&self, app: &AppName, id: DeploymentId) -> Ticket {
        let mut inner = self.inner.lock().expect("queue lock");
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

    /// Deployments waiting for `app`'s lock, in order.
    pub fn waiting(&self, app: &AppName) -> Vec<DeploymentId> {
        let inner = self.inner.lock().expect("queue lock");
        inner
            .get(app)
            .map(|s| s.waiting.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default()
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
    pub fn position(&self) -> u32 {
        *self.position.borrow()
    }

    /// Waits until the position changes; returns the new one.
    pub async fn changed(&mut self) -> u32 {
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

    #[tokio::test]
    async fn fifo_with_positions_and_leaving() {
        let q = AppQueues::default();
        let app = AppName::parse("a").unwrap();
        let (a, b, c) = (
            DeploymentId::new(),
            DeploymentId::new(),
            DeploymentId::new(),
        );
        let ta = q.join(&app, a);
        let mut tb = q.join(&app, b);
        let mut tc = q.join(&app, c);
        assert_eq!((ta.position(), tb.position(), tc.position()), (0, 1, 2));
        drop(tb); // b leaves the line: c moves up
        assert_eq!(tc.changed().await, 1);
        drop(ta); // a finishes: c runs
        assert_eq!(tc.changed().await, 0);
        tb = q.join(&app, b);
        assert_eq!(tb.position(), 1);
        drop(tc);
        assert_eq!(tb.changed().await, 0);
        drop(tb);
        assert!(q.inner.lock().unwrap().is_empty());
    }
}
