//! Generates the agent's gRPC API from proto/ when the `grpc` feature is on.
//!
//! protoc comes from the `protoc-bin-vendored` crate (a prebuilt binary shipped inside a
//! crates.io package), so building needs no system protoc and no network beyond the registry.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "grpc")]
    compile()?;
    Ok(())
}

/// Its build dependencies exist only with the feature, so the code does too.
#[cfg(feature = "grpc")]
fn compile() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&["proto/janus/agent/v1/agent.proto"], &["proto"])?;
    Ok(())
}
