//! The storage node's one error type and its one mapping to gRPC status.

/// Everything that can go wrong in the storage node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "malformed object id {0:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidId(String),
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object {0} already exists with different content")]
    Conflict(String),
    #[error("object {id} is {size} bytes; this node stores at most {max} per object")]
    TooLarge { id: String, size: u64, max: u64 },
    #[error("object {id} needs {needed} bytes; {available} of this node's capacity is left")]
    CapacityExceeded {
        id: String,
        needed: u64,
        available: u64,
    },
    #[error("object {id}: header declared {declared} bytes, stream carried {received}")]
    SizeMismatch {
        id: String,
        declared: u64,
        received: u64,
    },
    #[error("object {0}: uploaded bytes do not match the declared SHA-256")]
    DigestMismatch(String),
    #[error("sha256 must be empty or 32 bytes, got {0}")]
    BadDigestLength(usize),
    #[error("malformed put stream: {0}")]
    Protocol(&'static str),
    #[error("list limit/prefix invalid: {0}")]
    BadList(String),
    #[error("object {id} is corrupt: {detail}")]
    Corrupt { id: String, detail: String },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{max} downloads are being served; no slot freed within {waited_ms} ms")]
    Busy { max: usize, waited_ms: u64 },
    #[error("client stream: {0}")]
    Stream(tonic::Status),
    /// A malformed, oversized or unprocessable `Process` request (the
    /// message names the field), or an internal processing failure.
    #[error("process: {0}")]
    Process(#[from] tessera_wire::WireError),
    /// The caller holds the service role but is not in
    /// `process.allowed_callers`.
    #[error("{0} may not call Process")]
    CallerNotAllowed(String),
}

impl Error {
    pub(crate) fn db(e: impl Into<redb::Error>) -> Self {
        Self::Db(e.into())
    }
}

/// The node could not start (the database would not open): exit 1.
impl From<Error> for tessera_runtime::StartError {
    fn from(e: Error) -> Self {
        Self::other(e)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match e {
            Error::InvalidId(_)
            | Error::SizeMismatch { .. }
            | Error::DigestMismatch(_)
            | Error::BadDigestLength(_)
            | Error::Protocol(_)
            | Error::BadList(_) => Status::invalid_argument(e.to_string()),
            Error::NotFound(_) => Status::not_found(e.to_string()),
            Error::Conflict(_) => Status::already_exists(e.to_string()),
            Error::TooLarge { .. } | Error::CapacityExceeded { .. } | Error::Busy { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            // Bit rot or a damaged record: say which object, never serve it.
            Error::Corrupt { .. } => {
                tracing::error!(error = %e, "data loss");
                Status::data_loss(e.to_string())
            }
            // The client's own stream failed (cancelled, too large, ...):
            // hand its status back, with tonic's "message too large"
            // (OUT_OF_RANGE) reported as RESOURCE_EXHAUSTED like every
            // other limit.
            Error::Stream(status) => tessera_runtime::server::normalize_limit_status(status),
            // INVALID_ARGUMENT / RESOURCE_EXHAUSTED with the field named, or
            // a generic INTERNAL (logged).
            Error::Process(w) => w.into(),
            Error::CallerNotAllowed(_) => Status::permission_denied(e.to_string()),
            Error::Db(_) | Error::Task(_) | Error::Io { .. } => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal storage error")
            }
        }
    }
}
