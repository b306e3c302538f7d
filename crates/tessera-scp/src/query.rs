//! Query/Retrieve (PS3.4 Annex C, Study Root) as data: command fields,
//! statuses, the query keys and the requests and outcomes a sink sees. The
//! protocol that carries them is `qr`'s; the identifier codec is
//! `identifier`'s.

use std::net::SocketAddr;

use dicom_dictionary_std::uids;
use tokio::sync::mpsc;

/// Command fields of Query/Retrieve.
pub(crate) const C_FIND_RQ: u16 = 0x0020;
pub(crate) const C_GET_RQ: u16 = 0x0010;
pub(crate) const C_MOVE_RQ: u16 = 0x0021;

/// Pending: a match or sub-operation progress follows.
pub const STATUS_PENDING: u16 = 0xFF00;
/// Refused: not authorized (PS3.7 C.5).
pub const STATUS_NOT_AUTHORIZED: u16 = 0x0124;
/// Refused: out of resources, unable to perform sub-operations.
pub const STATUS_SUBOPS_IMPOSSIBLE: u16 = 0xA702;
/// Refused: move destination unknown.
pub const STATUS_MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
/// Failed: identifier does not match SOP class.
pub const STATUS_IDENTIFIER_MISMATCH: u16 = 0xA900;
/// Warning: sub-operations complete, one or more failures or warnings.
pub const STATUS_SUBOPS_WARNING: u16 = 0xB000;
/// Cancelled by C-CANCEL.
pub const STATUS_CANCEL: u16 = 0xFE00;

/// Largest identifier accepted (a query is a few hundred bytes).
pub(crate) const MAX_IDENTIFIER_BYTES: u64 = 64 * 1024;

/// The Study Root SOP classes served.
pub(crate) fn is_study_root(sop_class: &str, field: u16) -> bool {
    match field {
        C_FIND_RQ => sop_class == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
        C_GET_RQ => sop_class == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET,
        C_MOVE_RQ => sop_class == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE,
        _ => false,
    }
}

/// One attribute of an identifier: a key of a request, a value of a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryKey {
    /// (group, element).
    pub tag: (u16, u16),
    /// The value as text (multiple values joined by `\`, padding trimmed);
    /// empty for a universal key or an empty return value.
    pub value: String,
}

/// A C-FIND request.
#[derive(Debug, Clone)]
pub struct FindRequest {
    pub calling_ae: String,
    /// On a DICOM TLS association, the client certificate's identity
    /// (`spiffe://...`): who the peer is, instead of its AE title.
    pub tls_identity: Option<String>,
    pub peer: SocketAddr,
    /// Query/Retrieve Level (0008,0052): `STUDY`, `SERIES` or `IMAGE`.
    pub level: String,
    /// Every other top-level attribute of the identifier (sequences are
    /// not matched and come back empty).
    pub keys: Vec<QueryKey>,
}

/// The sink's answer to a C-FIND.
#[derive(Debug, Clone)]
pub enum FindOutcome {
    /// One identifier per match (the level is added).
    Matches(Vec<Vec<QueryKey>>),
    /// Failure `status` with `reason` as its Error Comment.
    Refused { status: u16, reason: String },
}

/// Where retrieved instances go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrieveKind {
    /// C-GET: back over the same association.
    Get,
    /// C-MOVE to this (configured) destination AE title.
    Move { destination: String },
}

/// A C-GET or C-MOVE request.
#[derive(Debug, Clone)]
pub struct RetrieveRequest {
    pub calling_ae: String,
    /// On a DICOM TLS association, the client certificate's identity
    /// (`spiffe://...`): who the peer is, instead of its AE title.
    pub tls_identity: Option<String>,
    pub peer: SocketAddr,
    pub level: String,
    pub keys: Vec<QueryKey>,
    pub kind: RetrieveKind,
}

/// The sink's answer to a C-GET or C-MOVE.
#[derive(Debug)]
pub enum RetrieveOutcome {
    /// `count` Part 10 files will arrive on `files`, in order; an `Err`
    /// is one failed sub-operation (its reason is logged).
    Instances {
        count: usize,
        files: mpsc::Receiver<Result<Vec<u8>, String>>,
    },
    Refused {
        status: u16,
        reason: String,
    },
}
