//! The service's one error type and its exhaustive mapping to
//! `tonic::Status`.
//!
//! Status choices (documented in `README.md`):
//! * malformed input (start message, spec, pixel stream) and everything the
//!   core refuses about the request (block size, region counts, operation,
//!   empty image, parameters) -> INVALID_ARGUMENT naming the field;
//! * more data than the configured limit -> RESOURCE_EXHAUSTED;
//! * a caller with the service role that is not an allowed caller ->
//!   PERMISSION_DENIED;
//! * core errors that only a bug of ours can cause (a region map or
//!   fragment we built is inconsistent) and failed worker tasks -> INTERNAL
//!   with a generic message; the detail is logged.

use tessera_segment::SegmentError;
use tessera_wire::WireError;
use tonic::Status;

/// Everything that can go wrong in the segmentation service.
#[derive(Debug, thiserror::Error)]
pub enum SegmentationError {
    /// Malformed request: the message names the field.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request declares or sends more than the configured limits.
    #[error("resource exhausted: {0}")]
    TooLarge(String),
    /// The caller holds the service role but is not an allowed caller.
    #[error("permission denied: {0}")]
    CallerNotAllowed(String),
    /// The core refused the image or the parameters.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The request stream failed (client cancelled, message over the limit).
    #[error("request stream: {0}")]
    Stream(Status),
    /// A worker task failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<WireError> for SegmentationError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid(m) => SegmentationError::InvalidArgument(m),
            WireError::TooLarge(m) => SegmentationError::TooLarge(m),
            WireError::Internal(m) => SegmentationError::Internal(m),
        }
    }
}

impl From<SegmentationError> for Status {
    fn from(e: SegmentationError) -> Self {
        // Exhaustive on purpose: a new variant must choose its status here.
        match e {
            SegmentationError::InvalidArgument(m) => Status::invalid_argument(m),
            SegmentationError::TooLarge(m) => Status::resource_exhausted(m),
            SegmentationError::CallerNotAllowed(m) => Status::permission_denied(m),
            SegmentationError::Segment(s) => segment_status(s),
            SegmentationError::Stream(s) => tessera_runtime::server::normalize_limit_status(s),
            e @ SegmentationError::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

fn segment_status(s: SegmentError) -> Status {
    match s {
        SegmentError::Image(_)
        | SegmentError::EmptyImage { .. }
        | SegmentError::ZeroBlockSize
        | SegmentError::BlockTooLarge { .. }
        | SegmentError::ZeroRegions
        | SegmentError::TooManyRegions { .. }
        | SegmentError::NotEnoughEntropyLevels { .. }
        | SegmentError::UnknownOperation(_)
        | SegmentError::Parameter(_) => Status::invalid_argument(s.to_string()),
        // We build the region map, fragments and outputs ourselves and never
        // run an exhaustive search: these mean a bug here, not bad input.
        SegmentError::NeedsMapping(_)
        | SegmentError::RegionMap(_)
        | SegmentError::Fragment(_)
        | SegmentError::Histogram(_)
        | SegmentError::Merge(_)
        | SegmentError::SearchSpaceTooLarge(_) => {
            tracing::error!(error = %s, "segment internal error");
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn statuses() {
        let s = |e: SegmentationError| Status::from(e).code();
        assert_eq!(
            s(SegmentationError::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            s(SegmentationError::TooLarge("x".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            s(SegmentationError::CallerNotAllowed("x".into())),
            Code::PermissionDenied
        );
        for e in [
            SegmentError::ZeroBlockSize,
            SegmentError::ZeroRegions,
            SegmentError::TooManyRegions {
                requested: 5,
                blocks: 4,
            },
            SegmentError::UnknownOperation("blur".into()),
            SegmentError::EmptyImage {
                width: 0,
                height: 1,
            },
            SegmentError::Parameter("x".into()),
        ] {
            assert_eq!(s(e.into()), Code::InvalidArgument);
        }
        // Internal detail is not leaked.
        let int = Status::from(SegmentationError::from(SegmentError::RegionMap(
            "secret detail".into(),
        )));
        assert_eq!(int.code(), Code::Internal);
        assert!(!int.message().contains("secret"));
        let int = Status::from(SegmentationError::Internal("secret".into()));
        assert_eq!(int.code(), Code::Internal);
        assert!(!int.message().contains("secret"));
        assert_eq!(
            s(SegmentationError::Stream(Status::out_of_range(
                "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes"
            ))),
            Code::ResourceExhausted
        );
    }
}
