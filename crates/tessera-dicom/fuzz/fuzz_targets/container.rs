//! Any bytes: `Container::from_bytes` / `Identifying::from_bytes` never
//! panic, and the input read as framed parts either fails to join or joins
//! into a file of the container's length and SHA-256. See
//! `tessera_dicom_fuzz::check_container`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_dicom_fuzz::check_container(data);
});
