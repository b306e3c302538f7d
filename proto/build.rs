//! Compiles every `.proto` under `tessera/` with protox (pure Rust: no system
//! protoc), generates the tonic client and server code, and writes the
//! encoded descriptor set that servers register for reflection.

use std::path::{Path, PathBuf};

use prost::Message;

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let tree = root.join("tessera");
    let mut protos = Vec::new();
    collect_protos(&tree, &mut protos)?;
    // Sorted, so the generated code and descriptor set do not depend on
    // directory iteration order.
    protos.sort();
    println!("cargo:rerun-if-changed={}", tree.display());
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let fds = protox::compile(&protos, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tessera_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
