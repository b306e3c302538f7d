//! The edge between the protos and `tessera-segment`, shared by every party
//! of region-wise processing (paper 000):
//!
//! * the segmentation service encodes its `Segment` response with
//!   [`fragment`] and [`segment`];
//! * the gateway decodes that response into a [`tessera_segment::RegionMap`]
//!   and [`tessera_segment::Fragment`]s with [`segment::SegmentDecoder`] /
//!   [`segment::decode_segment`], sends each fragment to a storage node with
//!   [`process::process_requests`] (wrapped by
//!   `tessera_storage_client::process_fragment`) and decodes the node's answer
//!   with [`process::OutputDecoder`];
//! * a storage node decodes a `Process` request with
//!   [`process::ProcessDecoder`], runs the [`process::ProcessJob`] and encodes
//!   the output with [`process::output_messages`].
//!
//! It also holds what every service sends the same way: [`stream`] chunking
//! of payloads and the watermark [`report`] as a proto.
//!
//! Decoders are synchronous state machines fed one message at a time (thin
//! async wrappers read a `tonic::Streaming`). They never trust a declared
//! length: every count is checked against the limits before anything is
//! allocated, every buffer grows only with what arrives and never past what
//! was declared, and every fragment is re-derived by
//! [`tessera_segment::Fragment::validate`] before it is used. Errors name the
//! offending field.
//!
//! Pure conversion: no servers, no clients, no I/O.
#![forbid(unsafe_code)]

pub mod convert;
pub mod fragment;
pub mod process;
pub mod report;
pub mod segment;
pub mod stream;

pub use convert::{
    decode_samples, encode_samples, operation_from_proto, operation_to_proto, segmentation,
    watermark,
};
pub use fragment::{FragmentBody, FragmentPart, fragment_header};
pub use process::{
    OutputDecoder, ProcessDecoder, ProcessJob, ProcessLimits, decode_output, histeq_mapping,
    output_messages, process_requests,
};
pub use segment::{
    DecodedSegmentation, SegmentDecoder, decode_segment, fragment_messages, region_map_from_proto,
    region_map_to_proto, segment_requests, summary_to_proto,
};

use tonic::Status;

/// Largest data chunk (pixels, samples, mapping) in any message.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Block indices per `BlockChunk` (at most 5 varint bytes each: 640 KiB).
pub const BLOCK_CHUNK: usize = 128 * 1024;
/// Largest message of the Segment and Process streams: a chunk, a region
/// map (one byte per block) or a block-list chunk, plus framing; far below
/// the platform's 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = CHUNK_BYTES + 64 * 1024;
/// Most regions (storage nodes) one segmentation may use.
pub const MAX_REGIONS: u32 = 16;
/// Most blocks a grid may have: the region map (one byte per block) then
/// fits one 1 MiB message.
pub const MAX_BLOCKS: u64 = CHUNK_BYTES as u64;

/// Why a message sequence was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Malformed or inconsistent: the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Declares more than the limits allow.
    #[error("{0}")]
    TooLarge(String),
    /// An error only a bug on this side can cause.
    #[error("{0}")]
    Internal(String),
}

impl WireError {
    /// The status for a *response* we could not accept from `peer` (an
    /// upstream service or an untrusted node): INTERNAL, naming the peer and
    /// the problem (a malformed answer is never the caller's fault).
    pub fn upstream(self, peer: &str) -> Status {
        tracing::warn!(peer, error = %self, "malformed response");
        Status::internal(format!("{peer} sent a malformed response: {self}"))
    }
}

/// For *requests*: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, or a generic
/// INTERNAL (the detail is logged).
impl From<WireError> for Status {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid(m) => Status::invalid_argument(m),
            WireError::TooLarge(m) => Status::resource_exhausted(m),
            WireError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

pub(crate) fn invalid(m: impl Into<String>) -> WireError {
    WireError::Invalid(m.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn statuses() {
        let s = Status::from(WireError::Invalid("start.x".into()));
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "start.x"));
        let s = Status::from(WireError::TooLarge("big".into()));
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s = Status::from(WireError::Internal("secret".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
        let s = WireError::Invalid("tile[0]".into()).upstream("storage node");
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("storage node") && s.message().contains("tile[0]"));
    }
}
