//! Events: the per-deployment [`DeploymentLog`] (sequence numbers, replay + follow) and
//! the [`ObserverRegistry`] that fans every update out to in-process observers.
//!
//! Publishing never waits on a reader: the log is shared memory that each subscriber
//! reads at its own pace with its own cursor, and each observer has its own bounded
//! queue that drops (and counts) what it cannot hold.

mod log;
mod registry;

pub(crate) use log::Backfill;
pub use log::{DeploymentLog, LogError, UpdateStream};
pub(crate) use registry::DEFAULT_QUEUE;
pub use registry::{Observer, ObserverError, ObserverRegistry, ObserverStats, Subscription};
