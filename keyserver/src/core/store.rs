//! Storage layout and record types. Everything the keyserver persists goes
//! through this module: the tables (the same on both backends of
//! [`kv`](crate::core::kv); in redb, `index` tables have `()` values and
//! `masters` u32 keys), the JSON records for studies and requests, and
//! small typed helpers.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes: `master_current` (u32), `audit_signing_key` (wrapped PKCS#8), `audit_public_key`, `audit_head` (signed head) |
//! | `masters` | version | KEK-wrapped master secret |
//! | `studies` | study id | JSON [`StudyRecord`] (a tombstone once forgotten) |
//! | `requests` | request id | JSON [`RequestRecord`] |
//! | `study_requests` | `study|request` | () |
//! | `owner_studies` | `owner|study` | () |
//! | `audit` | seq | audit record (see `audit.rs`) |
//! | `audit_checkpoints` | seq | signed head |
//! | `audit_recoveries` | seq | signed head of an `audit.recovered` entry |
//! | `delegates` | `owner|delegate` | () |
//! | `standing` | approval id | JSON [`StandingRecord`] |
//! | `owner_standing` | `owner|approval` | () |
//! | `owner_settings` | owner | JSON [`OwnerSettings`] |
//! | `requester_requests` | `requester|request` | () (requests filed since issue 19) |

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::core::crypto::Secret;
use crate::core::kv::{Key, KvRead, Tbl};
use crate::error::{KeyServerError, Result};

/// Small named values.
pub const META: Tbl = Tbl::Meta;
/// Master secrets by version.
pub const MASTERS: Tbl = Tbl::Masters;
/// Studies by id.
pub const STUDIES: Tbl = Tbl::Studies;
/// Key requests by id.
pub const REQUESTS: Tbl = Tbl::Requests;
/// Index: requests of a study.
pub const STUDY_REQUESTS: Tbl = Tbl::StudyRequests;
/// Index: studies of an owner.
pub const OWNER_STUDIES: Tbl = Tbl::OwnerStudies;
/// The hash-chained audit log.
pub const AUDIT: Tbl = Tbl::Audit;
/// Signed audit checkpoints.
pub const CHECKPOINTS: Tbl = Tbl::Checkpoints;
/// Signed recovery entries (`keyserver audit-recover`): breaks before the
/// last one were acknowledged by an administrator.
pub const AUDIT_RECOVERIES: Tbl = Tbl::AuditRecoveries;
/// Delegates: identities that may store studies on an owner's behalf.
pub const DELEGATES: Tbl = Tbl::Delegates;
/// Standing approvals by id.
pub const STANDING: Tbl = Tbl::Standing;
/// Index: standing approvals of an owner.
pub const OWNER_STANDING: Tbl = Tbl::OwnerStanding;
/// Per-owner access settings.
pub const OWNER_SETTINGS: Tbl = Tbl::OwnerSettings;
/// Index: requests of a requester.
pub const REQUESTER_REQUESTS: Tbl = Tbl::RequesterRequests;

/// Meta key: current master version.
pub const META_MASTER_CURRENT: &str = "master_current";
/// Meta key: KEK-wrapped Ed25519 PKCS#8.
pub const META_SIGNING_KEY: &str = "audit_signing_key";
/// Meta key: Ed25519 public key (informational; trust comes from the wrapped key).
pub const META_PUBLIC_KEY: &str = "audit_public_key";
/// Meta key: signed chain head.
pub const META_AUDIT_HEAD: &str = "audit_head";

/// Index key joining two ids; `|` appears in neither.
pub fn index_key(a: &str, b: &str) -> String {
    format!("{a}|{b}")
}

/// Range bounds covering every index key starting with `a|`.
pub fn index_range(a: &str) -> (String, String) {
    // '}' sorts right after '|'.
    (format!("{a}|"), format!("{a}}}"))
}

/// A registered study. No patient attribute is stored, only the commitment.
///
/// A forgotten study (`ForgetStudy`) stays as a tombstone: `salt` and
/// `commitment` are overwritten with zeros and `forgotten` is set, so the id
/// can never be registered again and lookups answer "study was deleted".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StudyRecord {
    /// Pseudonymous id.
    pub id: String,
    /// Owner identity (a user).
    pub owner: String,
    /// Random per-study HKDF salt.
    pub salt: Secret,
    /// HMAC commitment to the canonical attributes.
    pub commitment: Secret,
    /// Master secret version the study derives from, for ever.
    pub master_version: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// Identity that registered it (the gateway).
    pub registered_by: String,
    /// Set once the study's key material was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<Forgotten>,
}

impl StudyRecord {
    /// True for a tombstone left by `ForgetStudy`.
    pub fn is_forgotten(&self) -> bool {
        self.forgotten.is_some()
    }
}

/// When and for whom a study's key material was destroyed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Forgotten {
    /// Unix seconds.
    pub at: u64,
    /// Identity that called `ForgetStudy` (the gateway).
    pub by: String,
    /// The user the gateway acted for (the owner).
    pub on_behalf_of: String,
}

/// Where a key request stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state")]
pub enum GrantState {
    /// Waiting for the owner.
    Pending,
    /// Approved: the requester may fetch until `expires_at` while `uses_left > 0`.
    Approved {
        /// Approver.
        by: String,
        /// Unix seconds.
        at: u64,
        /// Unix seconds, exclusive.
        expires_at: u64,
        /// Uses granted.
        uses_granted: u32,
        /// Uses left.
        uses_left: u32,
    },
    /// Denied by the owner.
    Denied {
        /// Who denied.
        by: String,
        /// Unix seconds.
        at: u64,
        /// Reason given.
        reason: String,
    },
    /// Approved, then revoked.
    Revoked {
        /// Who revoked.
        by: String,
        /// Unix seconds.
        at: u64,
        /// Reason given.
        reason: String,
        /// Grant expiry at revocation.
        expires_at: u64,
        /// Uses granted.
        uses_granted: u32,
        /// Uses left at revocation.
        uses_left: u32,
    },
}

/// A key request and its grant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestRecord {
    /// Request id.
    pub id: String,
    /// Study.
    pub study_id: String,
    /// Who will fetch the key.
    pub requester: String,
    /// Who presented the attributes (requester or gateway).
    pub presented_by: String,
    /// Key purpose label.
    pub purpose: String,
    /// Free text from the requester.
    pub justification: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Master version of the held key.
    pub master_version: u32,
    /// State.
    pub state: GrantState,
    /// The derived key, KEK-wrapped, held while the request can still lead to
    /// a release; dropped when denied, revoked, used up or seen expired.
    pub wrapped_key: Option<Vec<u8>>,
    /// Why the key is wanted (configured vocabulary); empty on requests
    /// filed before purposes existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_purpose: String,
    /// The standing approval that approved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing: Option<String>,
    /// Set on a break-glass grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlass>,
}

/// A break-glass use: its reason and its review.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BreakGlass {
    /// The written reason.
    pub reason: String,
    /// Who reviewed it (the owner or an admin), and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed: Option<(String, u64)>,
}

/// Who a standing approval names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Grantee {
    /// One identity.
    Identity(String),
    /// Every identity with this role (access config) or in this group.
    Role(String),
}

/// An owner's standing approval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StandingRecord {
    /// `sa-` id.
    pub id: String,
    /// The owner who made it (and whose studies it covers).
    pub owner: String,
    /// Who it approves.
    pub grantee: Grantee,
    /// For which access purpose.
    pub access_purpose: String,
    /// Which studies (empty: every study of the owner).
    pub studies: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, exclusive.
    pub expires_at: u64,
    /// Approvals it may still make (`None`: unlimited).
    pub budget_left: Option<u32>,
    /// Lifetime of each grant it approves, seconds.
    pub grant_ttl_secs: u64,
    /// Uses of each grant it approves.
    pub grant_uses: u32,
    /// Approvals made so far.
    pub approvals_made: u32,
    /// Unix seconds of its revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// Per-owner access settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerSettings {
    /// Break-glass refused on this owner's studies.
    #[serde(default)]
    pub break_glass_disabled: bool,
    /// The owner's webhook (an `https://` URL): told of new requests and
    /// break-glass uses on its studies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// Serializes a record.
pub fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| KeyServerError::Corrupt(e.to_string()))
}

/// Reads and deserializes a JSON record by string key.
pub fn get_json<T, R>(r: &R, t: Tbl, key: &str) -> Result<Option<T>>
where
    T: DeserializeOwned,
    R: KvRead + ?Sized,
{
    match r.get(t, Key::Str(key))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| KeyServerError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Reads raw bytes by string key.
pub fn get_bytes<R: KvRead + ?Sized>(r: &R, t: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
    r.get(t, Key::Str(key))
}

/// Second halves of index keys `a|b` for a given `a`.
pub fn index_scan<R: KvRead + ?Sized>(r: &R, t: Tbl, a: &str) -> Result<Vec<String>> {
    let (lo, hi) = index_range(a);
    let mut out = Vec::new();
    r.scan(
        t,
        std::ops::Bound::Included(Key::Str(&lo)),
        std::ops::Bound::Excluded(Key::Str(&hi)),
        &mut |k, _| {
            if let Some((_, b)) = k.text().split_once('|') {
                out.push(b.to_owned());
            }
            Ok(true)
        },
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::kv::{KvTxn, RedbRead, RedbWrite};
    use redb::{Database, ReadableDatabase};

    #[test]
    fn json_records_and_index_scans() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let study = StudyRecord {
            id: "st-1".into(),
            owner: "o".into(),
            salt: [1; 32],
            commitment: [2; 32],
            master_version: 1,
            created_at: 5,
            registered_by: "g".into(),
            forgotten: None,
        };
        let w = Box::new(RedbWrite(db.begin_write().unwrap()));
        {
            let t = w.as_write();
            t.put_str(STUDIES, "st-1", to_json(&study).unwrap().as_slice())
                .unwrap();
            for (a, b) in [
                ("alice", "st-1"),
                ("alice", "st-2"),
                ("alicex", "st-3"),
                ("alic", "st-4"),
            ] {
                t.put_str(OWNER_STUDIES, &index_key(a, b), &[]).unwrap();
            }
        }
        w.commit().unwrap();
        let r = RedbRead(db.begin_read().unwrap());
        assert_eq!(
            get_json::<StudyRecord, _>(&r, STUDIES, "st-1").unwrap(),
            Some(study)
        );
        assert_eq!(
            get_json::<StudyRecord, _>(&r, STUDIES, "st-9").unwrap(),
            None
        );
        assert_eq!(
            index_scan(&r, OWNER_STUDIES, "alice").unwrap(),
            vec!["st-1", "st-2"]
        );
    }

    #[test]
    fn records_without_the_tombstone_field_still_decode() {
        let old = r#"{"id":"st-1","owner":"o","salt":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"commitment":[2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2],"master_version":1,"created_at":5,"registered_by":"g"}"#;
        let rec: StudyRecord = serde_json::from_str(old).unwrap();
        assert!(!rec.is_forgotten());
        assert!(
            !String::from_utf8(to_json(&rec).unwrap())
                .unwrap()
                .contains("forgotten")
        );
    }

    #[test]
    fn grant_state_json_is_tagged() {
        let s = serde_json::to_string(&GrantState::Pending).unwrap();
        assert_eq!(s, r#"{"state":"Pending"}"#);
    }
}
