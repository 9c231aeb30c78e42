//! Admission of new deployments: at most `max_in_flight` apps deploying at once and at
//! most `max_queued` deployments waiting for their app's lock (all apps together).
//! Decided at once when Deploy is called, so an overloaded server says
//! `RESOURCE_EXHAUSTED` instead of letting callers hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::limits::Rejection;
use crate::model::AppName;

#[derive(Default)]
struct Counts {
    /// Accepted, not yet ended deployments per app (the first runs, the others wait).
    per_app: HashMap<AppName, usize>,
    /// Sum of `per_app`.
    total: usize,
}

pub(crate) struct Admission {
    counts: Mutex<Counts>,
    max_in_flight: usize,
    max_queued: usize,
}

/// A place among the accepted deployments; dropping it (when the deployment's task
/// ends) frees it.
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    app: AppName,
}

/// Why a deployment was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub limit: Rejection,
    pub max: usize,
}

impl Admission {
    pub(crate) fn new(max_in_flight: usize, max_queued: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::default(),
            max_in_flight,
            max_queued,
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, app: &AppName) -> Result<Admitted, Refused> {
        let mut c = self.counts.lock().expect("admission lock");
        let busy = c.per_app.get(app).copied().unwrap_or(0) > 0;
        if busy {
            // It will wait for the app's lock.
            let queued = c.total - c.per_app.len();
            if queued >= self.max_queued {
                return Err(Refused {
                    limit: Rejection::Queued,
                    max: self.max_queued,
                });
            }
        } else if c.per_app.len() >= self.max_in_flight {
            return Err(Refused {
                limit: Rejection::InFlight,
                max: self.max_in_flight,
            });
        }
        *c.per_app.entry(app.clone()).or_default() += 1;
        c.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            app: app.clone(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock().expect("admission lock");
        if let Some(n) = c.per_app.get_mut(&self.app) {
            *n -= 1;
            if *n == 0 {
                c.per_app.remove(&self.app);
            }
            c.total -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(s: &str) -> AppName {
        AppName::parse(s).unwrap()
    }

    #[test]
    fn in_flight_and_queued_caps_hold_and_free_on_drop() {
        let a = Admission::new(2, 1);
        let a1 = a.admit(&app("a")).unwrap();
        let _b1 = a.admit(&app("b")).unwrap();
        let refused = a.admit(&app("c")).err().unwrap();
        assert_eq!(refused.limit, Rejection::InFlight);
        let a2 = a.admit(&app("a")).unwrap(); // queues behind a1
        assert_eq!(a.admit(&app("a")).err().unwrap().limit, Rejection::Queued);
        assert_eq!(a.admit(&app("b")).err().unwrap().limit, Rejection::Queued);
        drop(a2);
        let _b2 = a.admit(&app("b")).unwrap();
        drop(a1);
        // `a` has ended: `c` may start; then two apps deploy again.
        let _c1 = a.admit(&app("c")).unwrap();
        assert_eq!(a.admit(&app("d")).err().unwrap().limit, Rejection::InFlight);
    }
}
