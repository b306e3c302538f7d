//! Any bytes: split under each temporal option, write the researcher's file,
//! and split that again, never panicking. See
//! `tessera_dicom_fuzz::check_deidentify`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_dicom_fuzz::check_deidentify(data);
});
