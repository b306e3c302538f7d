//! The gateway's one error type and its exhaustive mapping to `tonic::Status`.
//!
//! * malformed requests -> INVALID_ARGUMENT naming the field;
//! * over the configured limits -> RESOURCE_EXHAUSTED;
//! * unknown study handle -> NOT_FOUND; not the study's owner, or a role that
//!   may not do this -> PERMISSION_DENIED;
//! * an upstream service's refusal keeps its code and names the service
//!   (a refused grant at the keyserver stays PERMISSION_DENIED, a stopped
//!   storage node is UNAVAILABLE naming the node); an upstream refusing the
//!   gateway's own certificate is INTERNAL (a deployment fault, not the
//!   caller's).

use tonic::{Code, Status};

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("resource exhausted: {0}")]
    TooLarge(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Fewer healthy storage nodes than the placement needs, or a named node
    /// is unreachable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The same DICOM instance was stored before with other bytes.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The study is of another kind (an image vs. a DICOM study).
    #[error("failed precondition: {0}")]
    WrongKind(String),
    /// A stored share is gone or does not match what the vault recorded.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// Another service answered with an error.
    #[error("{service}: {}", status.message())]
    Upstream { service: String, status: Status },
    /// The identity vault failed (I/O, corrupt record, wrong key).
    #[error("vault: {0}")]
    Vault(String),
    #[error("internal: {0}")]
    Internal(String),
    /// The client's upload sent nothing for the stream idle timeout.
    #[error("deadline exceeded: {0}")]
    Idle(String),
}

impl GatewayError {
    /// Wraps an upstream answer, naming the service.
    /// A channel timeout (tonic's CANCELLED "Timeout expired") becomes
    /// DEADLINE_EXCEEDED naming the service.
    pub fn upstream(service: impl Into<String>, status: Status) -> Self {
        GatewayError::Upstream {
            service: service.into(),
            status: tessera_tls::deadline_status(status),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::InvalidArgument(_) => Code::InvalidArgument,
            GatewayError::TooLarge(_) => Code::ResourceExhausted,
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::PermissionDenied(_) => Code::PermissionDenied,
            GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::DataLoss(_) => Code::DataLoss,
            GatewayError::AlreadyExists(_) => Code::AlreadyExists,
            GatewayError::WrongKind(_) => Code::FailedPrecondition,
            GatewayError::Idle(_) => Code::DeadlineExceeded,
            GatewayError::Vault(_) | GatewayError::Internal(_) => Code::Internal,
            GatewayError::Upstream { status, .. } => match status.code() {
                // Our own certificate refused: a deployment fault.
                Code::Unauthenticated => Code::Internal,
                // A stream cut or an unknown failure upstream: try again.
                Code::Cancelled | Code::Unknown => Code::Unavailable,
                c @ (Code::Ok
                | Code::InvalidArgument
                | Code::DeadlineExceeded
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::ResourceExhausted
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::OutOfRange
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss) => {
                    if c == Code::Ok {
                        Code::Internal
                    } else {
                        c
                    }
                }
            },
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}

impl From<redb::Error> for GatewayError {
    fn from(e: redb::Error) -> Self {
        GatewayError::Vault(e.to_string())
    }
}

macro_rules! vault_from {
    ($($t:ty),*) => {$(
        impl From<$t> for GatewayError {
            fn from(e: $t) -> Self {
                GatewayError::Vault(e.to_string())
            }
        }
    )*};
}
vault_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_codes_keep_meaning_and_name_the_service() {
        let e = GatewayError::upstream("storage node storage-2", Status::unavailable("down"));
        let s: Status = e.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("storage-2"), "{}", s.message());
        let s: Status =
            GatewayError::upstream("keyserver", Status::permission_denied("pending")).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status =
            GatewayError::upstream("keyserver", Status::unauthenticated("no cert")).into();
        assert_eq!(s.code(), Code::Internal);
        let s: Status = GatewayError::InvalidArgument("header.owner: empty".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("header.owner"));
    }
}
