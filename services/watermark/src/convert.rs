//! The edge: protos to domain types (`TryFrom`, errors name the field) and
//! domain results back to protos. The core never sees a proto.

use tessera_cryptomark::header::MAX_OBJECT_ID;
use tessera_cryptomark::{TamperedBlock, TamperedTile, VerificationReport};
use tessera_image::{ImageSpec, Rect};
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as pb;
pub use tessera_wire::convert::watermark::spec_to_proto;
use tessera_wire::convert::watermark::{rect_from_proto, rect_to_proto, required_spec};

use crate::error::WatermarkError;

/// Largest data chunk in any message, either direction.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest accepted request message: a chunk plus framing, far below the
/// platform's 4 MiB.
pub const MAX_REQUEST_MESSAGE: usize = CHUNK_BYTES + 64 * 1024;
/// Entries of each tamper list sent back; the totals are always exact.
pub const MAX_REPORT_ENTRIES: usize = 4096;
/// The keyserver's purpose label for pixel keys.
pub const PURPOSE_PIXELS: &str = "pixels";

const MAX_ATTRIBUTES: usize = 32;
const MAX_STUDY_ID: usize = 128;
const PAPER_REFUSED: &str = "paper profile is offline-only (tessera image protect --profile paper)";

fn invalid(m: impl Into<String>) -> WatermarkError {
    WatermarkError::InvalidArgument(m.into())
}

/// A study and the patient attributes presented for it. Fine-grained
/// validation (id format, attribute names) is the keyserver's; the edge only
/// bounds sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StudyRef {
    pub study_id: String,
    pub attributes: Vec<ks::Attribute>,
}

impl StudyRef {
    fn from_proto(field: &str, s: Option<pb::StudyRef>) -> Result<Self, WatermarkError> {
        let s = s.ok_or_else(|| invalid(format!("{field} is required")))?;
        if s.study_id.is_empty() || s.study_id.len() > MAX_STUDY_ID {
            return Err(invalid(format!(
                "{field}.study_id must be 1..={MAX_STUDY_ID} bytes"
            )));
        }
        if s.attributes.is_empty() || s.attributes.len() > MAX_ATTRIBUTES {
            return Err(invalid(format!(
                "{field}.attributes must hold 1..={MAX_ATTRIBUTES} attributes"
            )));
        }
        Ok(Self {
            study_id: s.study_id,
            attributes: s.attributes,
        })
    }
}

/// A validated Protect start message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectPlan {
    pub study: StudyRef,
    pub object_id: String,
    pub spec: ImageSpec,
    pub roi: Rect,
}

impl ProtectPlan {
    /// Bytes of pixels the stream must carry.
    pub fn pixel_bytes(&self) -> u64 {
        self.spec.byte_len() as u64
    }
}

impl TryFrom<pb::ProtectStart> for ProtectPlan {
    type Error = WatermarkError;

    fn try_from(s: pb::ProtectStart) -> Result<Self, Self::Error> {
        match s.profile() {
            pb::Profile::Unspecified | pb::Profile::Secure => {}
            pb::Profile::Paper => return Err(invalid(PAPER_REFUSED)),
        }
        let study = StudyRef::from_proto("start.study", s.study)?;
        if s.object_id.is_empty() || s.object_id.len() > MAX_OBJECT_ID {
            return Err(invalid(format!(
                "start.object_id must be 1..={MAX_OBJECT_ID} bytes"
            )));
        }
        let spec = required_spec("start.spec", s.spec)?;
        let roi = match s.roi {
            Some(r) => rect_from_proto("start.roi", Some(r))?,
            None => Rect::default(),
        };
        if !roi.is_empty() && !roi.fits(spec.width, spec.height) {
            return Err(invalid(format!(
                "start.roi {roi} lies outside the {}x{} image",
                spec.width, spec.height
            )));
        }
        Ok(Self {
            study,
            object_id: s.object_id,
            spec,
            roi,
        })
    }
}

/// A validated Restore/Verify start message. The header is parsed and
/// validated by the core before any buffer is sized from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenPlan {
    pub study: StudyRef,
    pub header: tessera_cryptomark::Header,
}

impl TryFrom<pb::OpenStart> for OpenPlan {
    type Error = WatermarkError;

    fn try_from(s: pb::OpenStart) -> Result<Self, Self::Error> {
        let study = StudyRef::from_proto("start.study", s.study)?;
        let header = tessera_cryptomark::Header::from_json(&s.header_json)
            .map_err(|e| invalid(format!("start.header_json: {e}")))?;
        match header.profile {
            tessera_cryptomark::Profile::Secure => {}
            tessera_cryptomark::Profile::Paper => return Err(invalid(PAPER_REFUSED)),
        }
        Ok(Self { study, header })
    }
}

/// The report as a proto, each list cut at [`MAX_REPORT_ENTRIES`] so the
/// message stays small whatever the damage.
pub fn report_to_proto(r: &VerificationReport) -> pb::VerificationReport {
    let block = |b: &TamperedBlock| pb::TamperedBlock {
        index: b.index,
        frame: b.frame,
        rect: Some(rect_to_proto(&b.rect)),
    };
    let tile = |t: &TamperedTile| pb::TamperedTile {
        index: t.index,
        frame: t.frame,
        rect: Some(rect_to_proto(&t.rect)),
        shares: t.shares.iter().map(|&s| u32::from(s)).collect(),
    };
    pb::VerificationReport {
        intact: r.is_intact(),
        roi_blocks: r.roi_blocks,
        tiles: r.tiles,
        tampered_block_count: r.tampered_blocks.len() as u64,
        tampered_tile_count: r.tampered_tiles.len() as u64,
        tampered_blocks: r
            .tampered_blocks
            .iter()
            .take(MAX_REPORT_ENTRIES)
            .map(block)
            .collect(),
        tampered_tiles: r
            .tampered_tiles
            .iter()
            .take(MAX_REPORT_ENTRIES)
            .map(tile)
            .collect(),
        truncated: r.tampered_blocks.len() > MAX_REPORT_ENTRIES
            || r.tampered_tiles.len() > MAX_REPORT_ENTRIES,
    }
}

/// Splits owned bytes into chunks of at most [`CHUNK_BYTES`].
pub fn chunks(data: Vec<u8>) -> impl Iterator<Item = Vec<u8>> + Send {
    (0..data.len())
        .step_by(CHUNK_BYTES)
        .map(move |i| data[i..data.len().min(i + CHUNK_BYTES)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> pb::ProtectStart {
        pb::ProtectStart {
            study: Some(pb::StudyRef {
                study_id: "st-1".into(),
                attributes: vec![ks::Attribute {
                    name: "patient_id".into(),
                    value: "P".into(),
                }],
            }),
            object_id: "obj".into(),
            spec: Some(pb::ImageSpec {
                width: 64,
                height: 32,
                frames: 0,
                bits_allocated: 16,
                bits_stored: 12,
                signed: false,
                channels: 1,
            }),
            roi: Some(pb::Rect {
                x: 8,
                y: 8,
                width: 16,
                height: 16,
            }),
            profile: pb::Profile::Unspecified.into(),
        }
    }

    fn err_of(s: pb::ProtectStart) -> String {
        match ProtectPlan::try_from(s) {
            Err(WatermarkError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn valid_start_converts() {
        let p = ProtectPlan::try_from(start()).unwrap();
        assert_eq!(p.spec.frames, 1);
        assert_eq!(p.pixel_bytes(), 64 * 32 * 2);
        assert_eq!(p.roi, Rect::new(8, 8, 16, 16));
        assert_eq!(spec_to_proto(&p.spec).bits_stored, 12);
    }

    #[test]
    fn invalid_starts_name_the_field() {
        let mut s = start();
        s.profile = pb::Profile::Paper.into();
        assert!(err_of(s).contains("offline-only"));
        let mut s = start();
        s.study = None;
        assert!(err_of(s).contains("start.study"));
        let mut s = start();
        s.object_id = "x".repeat(257);
        assert!(err_of(s).contains("start.object_id"));
        let mut s = start();
        s.spec.as_mut().unwrap().bits_allocated = 300;
        assert!(err_of(s).contains("start.spec.bits_allocated"));
        let mut s = start();
        s.spec.as_mut().unwrap().width = 0;
        assert!(err_of(s).contains("start.spec"));
        let mut s = start();
        s.roi.as_mut().unwrap().x = 60;
        assert!(err_of(s).contains("start.roi"));
        let mut s = start();
        s.study.as_mut().unwrap().attributes.clear();
        assert!(err_of(s).contains("start.study.attributes"));
    }

    #[test]
    fn chunks_cover_the_data_in_order() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 5)).map(|i| i as u8).collect();
        let parts: Vec<Vec<u8>> = chunks(data.clone()).collect();
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![CHUNK_BYTES, CHUNK_BYTES, 5]
        );
        assert_eq!(parts.concat(), data);
    }

    #[test]
    fn report_lists_are_capped_but_counts_exact() {
        let b = TamperedBlock {
            index: 0,
            frame: 0,
            rect: Rect::new(0, 0, 16, 16),
        };
        let r = VerificationReport {
            roi_blocks: 10_000,
            tiles: 10_000,
            tampered_blocks: vec![b; MAX_REPORT_ENTRIES + 1],
            tampered_tiles: vec![],
        };
        let p = report_to_proto(&r);
        assert!(!p.intact && p.truncated);
        assert_eq!(p.tampered_block_count, MAX_REPORT_ENTRIES as u64 + 1);
        assert_eq!(p.tampered_blocks.len(), MAX_REPORT_ENTRIES);
    }
}
