//! Writes one `container` seed per DICOM file: its split parts framed as
//! `tessera_dicom_fuzz::check_container` reads them, so the fuzzer starts
//! from parts that really join.
//!
//! `cargo run --example container_seeds -- OUT_DIR FILE.dcm...`

use std::path::{Path, PathBuf};

use tessera_dicom::{Profile, Temporal, UidMap, split};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let out = PathBuf::from(args.next().expect("usage: container_seeds OUT_DIR FILE..."));
    std::fs::create_dir_all(&out).expect("create the output directory");
    let profile = Profile {
        temporal: Temporal::Remove,
        uids: UidMap::new(b"seed"),
    };
    for file in args.map(PathBuf::from) {
        let bytes = std::fs::read(&file).expect("read the input file");
        let parts = split(&bytes, &tessera_dicom_fuzz::LIMITS, &profile)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let framed = tessera_dicom_fuzz::frame_parts(
            &parts.container.to_bytes(),
            &parts.identifying,
            &parts.pixels,
        );
        let name = Path::new(file.file_name().expect("a file name")).with_extension("parts");
        let path = out.join(format!("seed-{}", name.display()));
        std::fs::write(&path, framed).expect("write the seed");
        println!("{}", path.display());
    }
}
