//! Request checking: the start messages to checked plans (`TryFrom`,
//! errors name the field). The core never sees a proto. Specs, rectangles,
//! reports and chunking are `tessera-wire`'s, shared with the gateway and
//! the CLI.

use tessera_cryptomark::header::MAX_OBJECT_ID;
use tessera_image::{ImageSpec, Rect};
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as pb;
pub use tessera_wire::convert::watermark::spec_to_proto;
use tessera_wire::convert::watermark::{rect_from_proto, required_spec};

use crate::error::WatermarkError;

/// Largest data chunk in any message, either direction.
pub use tessera_wire::CHUNK_BYTES;
/// Largest accepted request message: a chunk plus framing, far below the
/// platform's 4 MiB.
pub const MAX_REQUEST_MESSAGE: usize = CHUNK_BYTES + 64 * 1024;
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
}
