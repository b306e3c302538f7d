//! The service's one error type and its exhaustive mapping to
//! `tonic::Status`.
//!
//! Status choices (documented in `README.md`):
//! * malformed input (start message, spec, header, share bytes) ->
//!   INVALID_ARGUMENT naming the field;
//! * more data than the configured limit -> RESOURCE_EXHAUSTED;
//! * shares that do not authenticate under the study key, belong to another
//!   object, or are swapped -> FAILED_PRECONDITION: the caller *was* allowed
//!   the key (the keyserver checked the attributes), but the shares and the
//!   study do not go together. Wrong attributes are PERMISSION_DENIED, from
//!   the keyserver's answer;
//! * keyserver unreachable -> UNAVAILABLE naming the keyserver.

use tessera_cryptomark::CryptomarkError;
use tessera_wire::WireError;
use tonic::Status;

/// Everything that can go wrong in the watermark service.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    /// Malformed request: the message names the field.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request declares or sends more than the configured limits.
    #[error("resource exhausted: {0}")]
    TooLarge(String),
    /// The caller holds the service role but is not an allowed caller.
    #[error("permission denied: {0}")]
    CallerNotAllowed(String),
    /// The core refused the image, header or shares.
    #[error(transparent)]
    Cryptomark(#[from] CryptomarkError),
    /// The keyserver refused to derive the key (attributes do not match the
    /// study, or this service may not derive).
    #[error("keyserver refused the key: {0}")]
    KeyDenied(String),
    /// The keyserver does not know the study.
    #[error("keyserver: {0}")]
    StudyNotFound(String),
    /// The keyserver refused the study id or attributes as malformed.
    #[error("keyserver: invalid argument: {0}")]
    KeyRequestInvalid(String),
    /// The keyserver could not be reached or is overloaded.
    #[error("keyserver unavailable: {0}")]
    KeyserverUnavailable(String),
    /// The keyserver answered something unexpected (bad key length, auth
    /// failure of our own certificate, internal error).
    #[error("keyserver failed: {0}")]
    KeyserverFailed(String),
    /// The request stream failed (client cancelled, message over the limit).
    #[error("request stream: {0}")]
    Stream(Status),
    /// A worker task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Spec and rectangle conversions (`tessera_wire`) name the field.
impl From<WireError> for WatermarkError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid(m) => WatermarkError::InvalidArgument(m),
            WireError::TooLarge(m) => WatermarkError::TooLarge(m),
            WireError::Internal(m) => WatermarkError::Internal(m),
        }
    }
}

impl From<WatermarkError> for Status {
    fn from(e: WatermarkError) -> Self {
        // Exhaustive on purpose: a new variant must choose its status here.
        match e {
            WatermarkError::InvalidArgument(m) => Status::invalid_argument(m),
            WatermarkError::TooLarge(m) => Status::resource_exhausted(m),
            WatermarkError::CallerNotAllowed(m) => Status::permission_denied(m),
            WatermarkError::Cryptomark(c) => cryptomark_status(c),
            WatermarkError::KeyDenied(m) => {
                Status::permission_denied(format!("keyserver refused the study key: {m}"))
            }
            WatermarkError::StudyNotFound(m) => Status::not_found(format!("keyserver: {m}")),
            WatermarkError::KeyRequestInvalid(m) => {
                Status::invalid_argument(format!("keyserver: {m}"))
            }
            WatermarkError::KeyserverUnavailable(m) => {
                tracing::warn!(error = %m, "keyserver unavailable");
                Status::unavailable("keyserver unavailable; try again later")
            }
            WatermarkError::Stream(s) => tessera_runtime::server::normalize_limit_status(s),
            e @ (WatermarkError::KeyserverFailed(_) | WatermarkError::Internal(_)) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

fn cryptomark_status(c: CryptomarkError) -> Status {
    match c {
        CryptomarkError::Image(_)
        | CryptomarkError::RoiOutside { .. }
        | CryptomarkError::ObjectId
        | CryptomarkError::HeaderCorrupt(_)
        | CryptomarkError::ShareFormat { .. }
        | CryptomarkError::ShareLength { .. }
        | CryptomarkError::ProfileMismatch { .. } => Status::invalid_argument(c.to_string()),
        CryptomarkError::WrongObject { .. }
        | CryptomarkError::SharesSwapped
        | CryptomarkError::KeyRejected { .. } => Status::failed_precondition(c.to_string()),
        CryptomarkError::KeyFormat(_) | CryptomarkError::Random => {
            tracing::error!(error = %c, "cryptomark internal error");
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
        let s = |e: WatermarkError| Status::from(e).code();
        assert_eq!(
            s(WatermarkError::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            s(WatermarkError::TooLarge("x".into())),
            Code::ResourceExhausted
        );
        assert_eq!(
            s(CryptomarkError::KeyRejected { share: 1 }.into()),
            Code::FailedPrecondition
        );
        assert_eq!(
            s(CryptomarkError::SharesSwapped.into()),
            Code::FailedPrecondition
        );
        assert_eq!(
            s(CryptomarkError::HeaderCorrupt("x".into()).into()),
            Code::InvalidArgument
        );
        assert_eq!(
            s(WatermarkError::KeyDenied("x".into())),
            Code::PermissionDenied
        );
        let un = Status::from(WatermarkError::KeyserverUnavailable("conn refused".into()));
        assert_eq!(un.code(), Code::Unavailable);
        assert!(un.message().contains("keyserver"));
        // Internal detail is not leaked.
        let int = Status::from(WatermarkError::KeyserverFailed("secret detail".into()));
        assert_eq!(int.code(), Code::Internal);
        assert!(!int.message().contains("secret"));
        assert_eq!(
            s(WatermarkError::Stream(Status::out_of_range(
                "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes"
            ))),
            Code::ResourceExhausted
        );
    }
}
