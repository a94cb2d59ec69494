//! Generates the Migration ttrpc service (proto/migration.proto) with ttrpc-codegen: rust-protobuf
//! messages (what containerd's ttrpc crates speak) and async server/client stubs, parsed in
//! Rust, so building needs no protoc.

use std::path::PathBuf;

fn main() {
    let proto = "proto/migration.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("migration");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/migration");
    ttrpc_codegen::Codegen::new()
        .inputs([proto])
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generating the Migration service from proto/migration.proto");
    // `include!` cannot take the generated files' inner attributes: drop them.
    for entry in std::fs::read_dir(&out).expect("read OUT_DIR/migration") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read generated");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
                .collect();
            std::fs::write(&path, kept.join("\n")).expect("write generated");
        }
    }
}
