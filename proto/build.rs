//! Compiles `proto/im/v1/im.proto` (the client protocol) and
//! `proto/im/cluster/v1/cluster.proto` (between server nodes) with protox
//! (a pure-Rust protobuf compiler), so building needs no `protoc` on the
//! machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/im/v1/im.proto", "proto/im/cluster/v1/cluster.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // A pushed frame is handed to connections as it arrived, without a copy.
    config.bytes([".im.cluster.v1.Push.frame"]);
    config.compile_fds(descriptors)?;
    Ok(())
}
