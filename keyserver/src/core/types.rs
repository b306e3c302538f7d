//! What the core's operations return: plain values, no I/O.

use crate::core::audit::AuditEntry;
use crate::core::crypto::SecretKey;

/// Why a trusted service derives a key (audit only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Not said.
    Unspecified,
    /// Protecting (encrypting) a study.
    Protect,
    /// Restoring (decrypting) a study.
    Restore,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Protect => "protect",
            Self::Restore => "restore",
        }
    }
}

/// A derived key (wiped from memory when dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct Derived {
    /// 32 bytes.
    pub key: SecretKey,
    /// Master version it came from.
    pub master_version: u32,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Derived(v{}, <redacted>)", self.master_version)
    }
}

/// A key released to its requester (wiped from memory when dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct Released {
    /// 32 bytes.
    pub key: SecretKey,
    /// Study.
    pub study_id: String,
    /// Purpose label.
    pub purpose: String,
    /// Master version.
    pub master_version: u32,
    /// Grant expiry, Unix seconds.
    pub expires_at: u64,
    /// Uses left after this one.
    pub uses_left: u32,
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Released({}, uses_left={}, <redacted>)",
            self.study_id, self.uses_left
        )
    }
}

/// A grant the gateway redeemed (one use spent) or checked (nothing spent).
/// No key: the gateway serves the user itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    /// Study.
    pub study_id: String,
    /// Purpose label of the grant.
    pub purpose: String,
    /// Grant expiry, Unix seconds.
    pub expires_at: u64,
    /// Uses left (after this one, for a redemption).
    pub uses_left: u32,
}

/// What [`Core::forget_study`](crate::core::Core::forget_study) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForgetReport {
    /// Approved grants (valid, expired or used up) now revoked.
    pub grants_revoked: u32,
    /// Pending requests now denied.
    pub requests_denied: u32,
}

/// Most audit entries one [`Core::list_audit_page`](crate::core::Core::list_audit_page) examines (an owner's
/// page skips the entries it may not see).
pub const AUDIT_SCAN_MAX: usize = 20_000;

/// Whose view of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditScope {
    /// An administrator: every entry.
    All,
    /// An owner: entries about its studies (and their requests) and the
    /// entries it made itself.
    Owner(String),
}

/// A page of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// First seq of the next page, 0 when the log ends here.
    pub next_from_seq: u64,
}

/// What a requester asks for ([`crate::core::Core::request_access`]).
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The study.
    pub study_id: &'a str,
    /// The patient attributes its key is bound to.
    pub attributes: &'a [(String, String)],
    /// Key purpose label (derivation).
    pub purpose: &'a str,
    /// Access purpose (vocabulary); empty: the default.
    pub access_purpose: &'a str,
    /// Free text.
    pub justification: &'a str,
    /// Gateway only: the user asked for.
    pub on_behalf_of: &'a str,
}
