//! Any bytes: `split` returns a typed error or parts that `join` turns back
//! into exactly the input (also through the serialized container), and the
//! de-identified writer never panics. See `tessera_dicom_fuzz::check_split`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_dicom_fuzz::check_split(data);
});
