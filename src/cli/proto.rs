//! The public API's messages and client as the CLI uses them: the crate's one
//! generated module (`crate::proto`), whose serde impls come from pbjson-build, so
//! `--output json` and `deploy -f FILE` use the proto3 JSON mapping (the field names
//! grpcurl prints) without a hand-written field.

pub use crate::proto::*;
