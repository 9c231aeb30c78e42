//! Deploys from source: fetch a git repository into a per-app cache ([`git`]), pack the
//! build context honouring `.dockerignore` ([`context`], matcher in [`dockerignore`]), and
//! build it with Docker's classic builder, reporting typed step events ([`build`]).
//!
//! These are building blocks with no knowledge of deployments, phases or the proto: the
//! engine drives them and turns their events into updates. See `docs/SOURCE.md`.
//!
//! What must not be here: secrets in anything that is stored, logged or returned. A URL's
//! credentials only travel to git through its environment (see [`git::redact_url`]).

pub mod build;
pub(crate) mod context;
pub(crate) mod dockerignore;
pub mod git;
