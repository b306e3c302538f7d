//! Any bytes: `split` returns a typed error or parts that `join` turns back
//! into exactly the input, and the de-identified writer never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_dicom::{Limits, Profile, Temporal, UidMap, join, split, write_deidentified};

fuzz_target!(|data: &[u8]| {
    let profile = Profile {
        temporal: Temporal::Remove,
        uids: UidMap::new(b"fuzz"),
    };
    let limits = Limits {
        max_file_bytes: 1 << 20,
        max_samples: 1 << 20,
    };
    if let Ok(parts) = split(data, &limits, &profile) {
        let joined = join(&parts.container, &parts.identifying, &parts.pixels)
            .expect("split parts must join");
        assert_eq!(joined, data);
        let _ = write_deidentified(&parts.deidentified, &parts.pixels);
    }
});
