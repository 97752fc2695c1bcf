//! Generates the gRPC code for `proto/echo.proto` at build time.
//!
//! No system `protoc` is needed: `protox` (a protobuf compiler written in Rust)
//! parses the file into a `FileDescriptorSet`, and `tonic-prost-build` generates
//! the messages, the client and the server from it. `bytes` fields decode as
//! `bytes::Bytes`, so payloads are sliced out of tonic's receive buffer rather
//! than copied into a `Vec<u8>`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest.join("..").join("proto");
    let proto = proto_dir.join("echo.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile([&proto], [&proto_dir])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
