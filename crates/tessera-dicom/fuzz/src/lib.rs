//! The checks behind the cargo-fuzz targets of tessera-dicom, one function
//! per target. The stable regression test
//! (`crates/tessera-dicom/tests/fuzz_regressions.rs`) includes this file as a
//! module and replays the committed corpus and every kept crash input through
//! the same functions, so nothing here may use more than tessera-dicom's own
//! dependencies (tessera-image, sha2).
//!
//! Every check panics (that is: fails the fuzz run or the test) on a
//! contract violation and returns what it exercised, for the test's counts.

use sha2::{Digest, Sha256};
use tessera_dicom::{
    Container, Identifying, Limits, Pixels, Profile, Temporal, UidMap, join, split,
    write_deidentified,
};
use tessera_image::{Image, ImageSpec, PixelFormat};

/// Limits of every check: a fuzz input is at most a few hundred KiB, and
/// Rows x Columns beyond 2^20 samples would only make the fuzzer allocate.
pub const LIMITS: Limits = Limits {
    max_file_bytes: 1 << 20,
    max_samples: 1 << 20,
};

/// Key of the UID map of every check.
const UID_KEY: &[u8] = b"tessera-dicom fuzz uid key......";

fn profile(temporal: Temporal) -> Profile {
    Profile {
        temporal,
        uids: UidMap::new(UID_KEY),
    }
}

/// Target `split`: any bytes either get a typed error or split into parts
/// that join back into exactly the input, directly and through the
/// serialized container; the de-identified writer never panics.
/// Returns whether the input split.
pub fn check_split(data: &[u8]) -> bool {
    let Ok(parts) = split(data, &LIMITS, &profile(Temporal::Remove)) else {
        return false;
    };
    let joined = join(&parts.container, &parts.identifying, &parts.pixels)
        .expect("the parts of a split file must join");
    assert!(joined == data, "join is not byte-identical to the input");
    let container = Container::from_bytes(&parts.container.to_bytes())
        .expect("a serialized container must parse");
    assert_eq!(container, parts.container, "container serialization");
    let rejoined = join(&container, &parts.identifying, &parts.pixels)
        .expect("the parts must join through the serialized container");
    assert!(rejoined == data, "join through the serialized container");
    let _ = write_deidentified(&parts.deidentified, &parts.pixels);
    true
}

/// What [`check_container`] got to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerOutcome {
    /// The framed container part parsed.
    pub container: bool,
    /// The framed parts joined (into a file of the container's SHA-256).
    pub joined: bool,
}

/// Splits `data` into a little-endian u32 length, that many bytes, and the
/// rest.
fn frame(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// Frames the three parts the way [`check_container`] reads them:
/// `u32 len, container, u32 len, identifying, pixel bytes` (native pixels as
/// little-endian words, others as stored). Used to build seeds from real
/// files.
pub fn frame_parts(container: &[u8], identifying: &[u8], pixels: &Pixels) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [container, identifying] {
        let len = u32::try_from(part.len()).expect("a part over 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(part);
    }
    match pixels {
        Pixels::Native(image) => out.extend_from_slice(&image.to_le_bytes()),
        Pixels::Encapsulated(bytes) | Pixels::Opaque { bytes, .. } => out.extend_from_slice(bytes),
    }
    out
}

/// Target `container`: [`Container::from_bytes`] and
/// [`Identifying::from_bytes`] on the whole input never panic and what they
/// accept survives a serialization round trip; then the input read as framed
/// parts (see [`frame_parts`]) is joined: an error, or a file of exactly the
/// container's length and SHA-256. Pixels of the wrong kind never join.
pub fn check_container(data: &[u8]) -> ContainerOutcome {
    if let Ok(c) = Container::from_bytes(data) {
        assert_eq!(Container::from_bytes(&c.to_bytes()).as_ref(), Ok(&c));
    }
    if let Ok(i) = Identifying::from_bytes(data) {
        assert_eq!(Identifying::from_bytes(&i.to_bytes()).as_ref(), Ok(&i));
    }
    let mut outcome = ContainerOutcome::default();
    let Some((container_bytes, rest)) = frame(data) else {
        return outcome;
    };
    let Some((identifying, pixel_bytes)) = frame(rest) else {
        return outcome;
    };
    let _ = Identifying::from_bytes(identifying);
    let Ok(container) = Container::from_bytes(container_bytes) else {
        return outcome;
    };
    outcome.container = true;
    assert_eq!(
        Container::from_bytes(&container.to_bytes()).as_ref(),
        Ok(&container)
    );
    let one_gray8 = || {
        Image::from_le_bytes(ImageSpec::new(1, 1, PixelFormat::GRAY8), &[0])
            .expect("a 1x1 gray8 image")
    };
    let (right, wrong) = match container.native_layout() {
        Some(layout) => (
            Image::from_le_bytes(layout.spec, pixel_bytes)
                .ok()
                .map(Pixels::Native),
            Pixels::Encapsulated(pixel_bytes.to_vec()),
        ),
        None => (
            Some(
                container
                    .stored_pixels(pixel_bytes.to_vec())
                    .expect("stored pixels for a container without a native layout"),
            ),
            Pixels::Native(one_gray8()),
        ),
    };
    assert!(
        join(&container, identifying, &wrong).is_err(),
        "pixels of the wrong kind joined"
    );
    if let Some(pixels) = right
        && let Ok(file) = join(&container, identifying, &pixels)
    {
        assert_eq!(file.len() as u64, container.original_len());
        let digest: [u8; 32] = Sha256::digest(&file).into();
        assert_eq!(digest, container.original_sha256());
        outcome.joined = true;
    }
    outcome
}

/// What [`check_deidentify`] got to, over the three temporal options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeidOutcome {
    /// Options under which the input split.
    pub split: u32,
    /// ... and `write_deidentified` wrote the researcher's file.
    pub written: u32,
    /// ... and that file split again.
    pub resplit: u32,
}

/// Target `deidentify`: the input is split under each temporal option
/// (the modified-dates shift is the input's last four bytes, so the fuzzer
/// picks it, extremes included); the researcher's file from
/// `write_deidentified` splits again without panicking, and when it does,
/// its parts join back into it byte for byte.
pub fn check_deidentify(data: &[u8]) -> DeidOutcome {
    let shift_days = data.last_chunk::<4>().map_or(0, |b| i32::from_le_bytes(*b));
    let mut outcome = DeidOutcome::default();
    for temporal in [
        Temporal::Remove,
        Temporal::RetainFull,
        Temporal::RetainModified { shift_days },
    ] {
        let profile = profile(temporal);
        let Ok(parts) = split(data, &LIMITS, &profile) else {
            continue;
        };
        outcome.split += 1;
        let Ok(file) = write_deidentified(&parts.deidentified, &parts.pixels) else {
            continue;
        };
        outcome.written += 1;
        let Ok(again) = split(&file, &LIMITS, &profile) else {
            continue;
        };
        outcome.resplit += 1;
        let joined = join(&again.container, &again.identifying, &again.pixels)
            .expect("the parts of the de-identified file must join");
        assert!(joined == file, "de-identified file: join is not identical");
    }
    outcome
}
