//! Compiles the protobuf definitions with a vendored `protoc`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Message bodies travel from the socket to RocksDB without copies.
    config.bytes(["."]);
    // Deterministic encoding: the same record encodes to the same bytes on every replica.
    config.btree_map(["."]);

    // The descriptors, for the client protocol's JSON mapping below.
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    config.file_descriptor_set_path(&descriptors);

    let protos = ["protos/storage.proto", "protos/client.proto", "protos/peer.proto"];
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &protos,
        &["protos"],
    )?;

    // proto3's canonical JSON mapping of the client protocol (serde impls by pbjson), which the
    // WebSocket gateway speaks (docs/PROTOCOL.md, "WebSocket").
    let descriptors = std::fs::read(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .btree_map(["."])
        // As in the binary encoding: a field a newer client adds is skipped, not refused.
        .ignore_unknown_fields()
        .build(&[".chorus.client.v1"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
