//! The observers that ship with Stevedore, each subscribed to the
//! [`ObserverRegistry`](crate::events::ObserverRegistry) by `server::start`:
//!
//! - [`metrics`]: Prometheus counters, gauges and histograms, served at `GET /metrics`;
//! - [`audit`]: the append-only, hash-chained audit log (`stevedore audit verify`);
//!   subscribed losslessly, and refuses new deployments while it cannot write;
//! - [`webhook`]: signed JSON POSTs per state change, retried with backoff.
//!
//! Each one is a type implementing [`Observer`](crate::events::Observer); none runs on
//! a deployment's task, so none can slow one down. What must not be here: anything a
//! deployment waits on.

pub mod audit;
pub(crate) mod metrics;
pub mod webhook;
