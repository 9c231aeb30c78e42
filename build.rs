//! Code generation only: compiles `proto/` with protox (pure Rust, no protoc needed),
//! writes the descriptor set for gRPC reflection and generates the tonic/prost code.
//!
//! A second copy of the same messages, with a client only, goes to `OUT_DIR/cli/` for
//! the command-line client (`src/cli/proto.rs`): its well-known types are
//! `pbjson_types`, and pbjson-build generates serde impls in the proto3 JSON mapping
//! (the field names grpcurl prints) for `--output json` and `deploy -f FILE`.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(["stevedore/v1/deployer.proto"], ["proto"])?;
    let descriptor = prost::Message::encode_to_vec(&fds);
    fs::write(out_dir.join("stevedore_descriptor.bin"), &descriptor)?;
    tonic_prost_build::configure().compile_fds(fds.clone())?;

    let cli_dir = out_dir.join("cli");
    fs::create_dir_all(&cli_dir)?;
    tonic_prost_build::configure()
        .out_dir(&cli_dir)
        .build_server(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .out_dir(&cli_dir)
        .register_descriptors(&descriptor)?
        .build(&[".stevedore"])?;
    Ok(())
}
