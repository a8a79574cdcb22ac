//! Compiles the Modal proto subset with protox (pure Rust, no `protoc`
//! binary) and generates the clients and/or servers the features ask for.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/modal_proto/api.proto",
        "proto/modal_proto/task_command_router.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
