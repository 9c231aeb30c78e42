//! The public API's messages and client, generated a second time for the CLI (see
//! `build.rs`): the same proto, with `pbjson_types` for the well-known types and serde
//! impls from pbjson-build, so `--output json` and `deploy -f FILE` use the proto3 JSON
//! mapping (the field names grpcurl prints) without a hand-written field.
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/cli/stevedore.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/cli/stevedore.v1.serde.rs"));
