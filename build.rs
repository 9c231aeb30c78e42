//! Code generation only: compiles `proto/` with protox (pure Rust, no protoc needed),
//! writes the descriptor set for gRPC reflection and generates the tonic/prost code,
//! and the proto3 JSON mapping (serde impls, `*.serde.rs`) with pbjson-build from the
//! same descriptor set.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(["stevedore/v1/deployer.proto"], ["proto"])?;
    let descriptor_set = prost::Message::encode_to_vec(&fds);
    fs::write(out_dir.join("stevedore_descriptor.bin"), &descriptor_set)?;
    // Well-known types from pbjson-types (prost_types carry no serde impls).
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // tonic's prost codec with a small first encode buffer per stream (src/api/codec.rs).
        .codec_path("crate::api::codec::ProtoCodec")
        .compile_fds(fds.clone())?;

    // The server Stevedore runs (`crate::api::service`): the same service, whose
    // streams yield `crate::api::wire::StreamedUpdate`, a `ProgressUpdate` encoded once
    // for all its watchers. Every other type is the one generated above.
    let service_dir = out_dir.join("service");
    fs::create_dir_all(&service_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(
            ".stevedore.v1.ProgressUpdate",
            "crate::api::wire::StreamedUpdate",
        )
        .extern_path(".stevedore.v1", "crate::proto")
        .codec_path("crate::api::codec::ProtoCodec")
        .out_dir(&service_dir)
        .compile_fds(fds)?;

    // proto3 JSON mapping (the names grpcurl prints): `stevedore.v1.serde.rs`.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .build(&[".stevedore.v1"])?;
    Ok(())
}
