//! Generates the tandem.v1 messages and services. protox parses the .proto files in pure Rust, so
//! no system protoc is needed to build.

use std::error::Error;

const FILES: [&str; 4] = [
    "tandem/v1/common.proto",
    "tandem/v1/kv.proto",
    "tandem/v1/worker.proto",
    "tandem/v1/router.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(FILES, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
