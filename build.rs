//! Code generation only: compiles `proto/` with protox (pure Rust, no protoc needed),
//! writes the descriptor set for gRPC reflection and generates the tonic/prost code.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(["stevedore/v1/deployer.proto"], ["proto"])?;
    fs::write(
        out_dir.join("stevedore_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
