//! Stevedore: a deployment control plane. Deploys container images as apps on a Docker
//! engine and streams structured progress over gRPC. See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod engine;
pub mod events;
pub mod limits;
pub mod lock;
pub mod model;
pub mod observers;
pub mod runtime;
pub mod source;
pub mod store;

/// Code generated from `proto/stevedore/v1/deployer.proto`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("stevedore.v1");
    // The proto3 JSON mapping of the types above (pbjson).
    include!(concat!(env!("OUT_DIR"), "/stevedore.v1.serde.rs"));

    /// Encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("stevedore_descriptor");
}

pub mod api;
pub mod cli;
pub mod http;
pub mod logging;
pub mod proxy;
pub mod security;
pub mod server;
