//! The records the vault holds (serialized to JSON, then sealed): a study,
//! its share placements (and erasure-coded fragments), a DICOM instance.

use serde::{Deserialize, Serialize};

/// Lifecycle of a study record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StudyState {
    Pending,
    Committed,
    Deleting,
}

/// Where one share lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharePlacement {
    pub share: u32,
    pub node: String,
    /// The node's instance id when placed: a replaced node is detected.
    pub instance_id: String,
    pub object_id: String,
    pub size: u64,
    /// Hex SHA-256 of the share (empty while pending).
    pub sha256: String,
    /// Erasure-coded: `k` + `m` and where each fragment lives (`node` and
    /// `instance_id` above are then empty). Absent: the whole object is on
    /// `node` (one copy; records written before erasure coding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureRecord>,
}

/// The fragments of one erasure-coded object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    pub k: u32,
    pub m: u32,
    pub fragments: Vec<FragmentPlacement>,
}

/// Where fragment `index` of an object lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentPlacement {
    pub index: u32,
    pub node: String,
    pub instance_id: String,
    pub object_id: String,
    pub size: u64,
    /// Hex SHA-256 of the fragment as the node confirmed it.
    pub sha256: String,
    /// Not written (its node failed during the store): to be repaired.
    #[serde(default)]
    pub missing: bool,
}

/// Geometry of the stored pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub bits_allocated: u8,
    pub bits_stored: u8,
    pub signed: bool,
    pub channels: u8,
}

impl SpecRecord {
    pub fn from_spec(s: &tessera_image::ImageSpec) -> Self {
        Self {
            width: s.width,
            height: s.height,
            frames: s.frames,
            bits_allocated: s.format.bits_allocated,
            bits_stored: s.format.bits_stored,
            signed: s.format.signed,
            channels: s.format.channels,
        }
    }

    pub fn to_spec(self) -> tessera_image::ImageSpec {
        tessera_image::ImageSpec {
            width: self.width,
            height: self.height,
            frames: self.frames,
            format: tessera_image::PixelFormat {
                bits_allocated: self.bits_allocated,
                bits_stored: self.bits_stored,
                signed: self.signed,
                channels: self.channels,
            },
        }
    }
}

/// Everything the gateway knows about one study.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyRecord {
    pub study_id: String,
    pub state: StudyState,
    /// The data owner's identity URI.
    pub owner: String,
    /// Who stored it.
    pub stored_by: String,
    /// The patient attributes (name, value), in the order given.
    pub attributes: Vec<(String, String)>,
    /// 1 png, 2 tiff, 3 raw (the proto's ImageFormat).
    pub original_format: i32,
    pub spec: SpecRecord,
    /// The watermark header (JSON; public).
    pub header_json: String,
    pub placements: Vec<SharePlacement>,
    pub created_unix: u64,
    /// DICOM studies: the Study Instance UID (instances are
    /// [`InstanceRecord`]s; `spec`, `header_json` and `placements` are
    /// unused).
    #[serde(default)]
    pub dicom_study_uid: String,
    /// The gateway replica that last wrote this record unfinished
    /// (pending or deleting): another replica's recovery leaves it alone
    /// while that replica's lease is live. Empty in records from before
    /// replicas (one gateway).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
}

impl StudyRecord {
    /// A study of DICOM instances (StoreDicom), not one image (Store).
    pub fn is_dicom(&self) -> bool {
        self.original_format == 4
    }
}

/// One DICOM instance of a study.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub study_id: String,
    pub instance_id: String,
    pub state: StudyState,
    /// Orders the instances of a study (nanoseconds at store).
    pub seq: u128,
    pub sop_instance_uid: String,
    /// Size and hex SHA-256 of the stored file.
    pub size: u64,
    pub sha256: String,
    pub transfer_syntax: String,
    /// Native pixels as watermarked shares (`spec`, `header_json`), or the
    /// stored pixel bytes sealed.
    pub watermarked: bool,
    pub spec: SpecRecord,
    pub header_json: String,
    /// Share 0: the sealed metadata object; 1 and 2: pixel shares (or 1: the
    /// sealed pixel bytes).
    pub placements: Vec<SharePlacement>,
    pub stored_by: String,
    pub created_unix: u64,
    /// Burned In Annotation (0028,0301) was YES: the pixels may show
    /// identity, so no de-identified copy is released unless configured.
    #[serde(default)]
    pub burned_in_annotation: bool,
    /// The query index: the attributes C-FIND matches and answers
    /// (`tessera_dicom::query::INDEXED`: patient, study, series and
    /// instance attributes), sealed with the record. Empty for instances
    /// stored before the index existed (then only the study's UID, patient
    /// name and ID and the SOP Instance UID are known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexed: Vec<((u16, u16), String)>,
    /// The gateway replica that last wrote this record unfinished
    /// (pending or deleting): another replica's recovery leaves it alone
    /// while that replica's lease is live. Empty in records from before
    /// replicas (one gateway).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
}

impl InstanceRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.study_id, self.instance_id)
    }
}
