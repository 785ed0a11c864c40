//! Compiles the protobuf definitions with a vendored `protoc`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Message bodies travel from the socket to RocksDB without copies.
    config.bytes(["."]);
    // Deterministic encoding: the same record encodes to the same bytes on every replica.
    config.btree_map(["."]);

    let protos = ["protos/storage.proto", "protos/client.proto", "protos/peer.proto"];
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &protos,
        &["protos"],
    )?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
