//! The keyserver's one error type. The gRPC edge maps it to `tonic::Status`
//! with an exhaustive match (see `service.rs`).

/// Everything that can go wrong in the keyserver.
#[derive(Debug, thiserror::Error)]
pub enum KeyServerError {
    /// Malformed input: bad id, bad identity, bad attribute, out-of-range value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Unknown study or request.
    #[error("not found: {0}")]
    NotFound(String),
    /// A study id that is already registered.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The caller may not do this (wrong identity, not the owner, self-approval, no valid grant).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The presented patient attributes do not match the study. Deliberately
    /// says nothing about which attribute is wrong.
    #[error("permission denied: attributes do not match the study")]
    AttributeMismatch,
    /// The request is not in a state that allows the operation.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The key-encryption key file is missing, unreadable, too open, or does
    /// not decrypt the stored secrets.
    #[error("key-encryption key: {0}")]
    Kek(String),
    /// The store failed (redb, or PostgreSQL answering with an error).
    #[error("storage: {0}")]
    Storage(String),
    /// The PostgreSQL store cannot be reached (or did not answer in time):
    /// nothing was done; retry later.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The audit record could not be made durable, so the operation did not happen.
    #[error("audit append failed: {0}")]
    Audit(String),
    /// A cryptographic primitive failed (RNG, AEAD, signature).
    #[error("crypto: {0}")]
    Crypto(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The keyserver is shutting down.
    #[error("keyserver is shutting down")]
    Unavailable,
}

/// Shorthand result type.
pub type Result<T, E = KeyServerError> = std::result::Result<T, E>;

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for KeyServerError {
            fn from(e: $t) -> Self {
                KeyServerError::Storage(e.to_string())
            }
        }
    )*};
}

storage_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
