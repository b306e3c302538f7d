//! redb layout and record types. Everything the keyserver persists goes
//! through this module: the table definitions, the JSON records for studies
//! and requests, and small typed helpers.
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

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::core::crypto::Secret;
use crate::error::{KeyServerError, Result};

/// Small named values.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Master secrets by version.
pub const MASTERS: TableDefinition<u32, &[u8]> = TableDefinition::new("masters");
/// Studies by id.
pub const STUDIES: TableDefinition<&str, &[u8]> = TableDefinition::new("studies");
/// Key requests by id.
pub const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// Index: requests of a study.
pub const STUDY_REQUESTS: TableDefinition<&str, ()> = TableDefinition::new("study_requests");
/// Index: studies of an owner.
pub const OWNER_STUDIES: TableDefinition<&str, ()> = TableDefinition::new("owner_studies");
/// The hash-chained audit log.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Signed audit checkpoints.
pub const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_checkpoints");

/// Signed recovery entries (`keyserver audit-recover`): breaks before the
/// last one were acknowledged by an administrator.
pub const AUDIT_RECOVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_recoveries");
/// Delegates: identities that may store studies on an owner's behalf.
pub const DELEGATES: TableDefinition<&str, ()> = TableDefinition::new("delegates");

/// Standing approvals by id.
pub const STANDING: TableDefinition<&str, &[u8]> = TableDefinition::new("standing");
/// Index: standing approvals of an owner.
pub const OWNER_STANDING: TableDefinition<&str, ()> = TableDefinition::new("owner_standing");
/// Per-owner access settings.
pub const OWNER_SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("owner_settings");
/// Index: requests of a requester.
pub const REQUESTER_REQUESTS: TableDefinition<&str, ()> =
    TableDefinition::new("requester_requests");

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
pub fn get_json<T, Tb>(table: &Tb, key: &str) -> Result<Option<T>>
where
    T: DeserializeOwned,
    Tb: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key)? {
        None => Ok(None),
        Some(g) => serde_json::from_slice(g.value())
            .map(Some)
            .map_err(|e| KeyServerError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Reads raw bytes by string key.
pub fn get_bytes<Tb>(table: &Tb, key: &str) -> Result<Option<Vec<u8>>>
where
    Tb: ReadableTable<&'static str, &'static [u8]>,
{
    Ok(table.get(key)?.map(|g| g.value().to_vec()))
}

/// Second halves of index keys `a|b` for a given `a`.
pub fn index_scan<Tb>(table: &Tb, a: &str) -> Result<Vec<String>>
where
    Tb: ReadableTable<&'static str, ()>,
{
    let (lo, hi) = index_range(a);
    let mut out = Vec::new();
    for item in table.range(lo.as_str()..hi.as_str())? {
        let (k, _) = item?;
        if let Some((_, b)) = k.value().split_once('|') {
            out.push(b.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(STUDIES).unwrap();
            t.insert("st-1", to_json(&study).unwrap().as_slice())
                .unwrap();
            let mut ix = w.open_table(OWNER_STUDIES).unwrap();
            ix.insert(index_key("alice", "st-1").as_str(), ()).unwrap();
            ix.insert(index_key("alice", "st-2").as_str(), ()).unwrap();
            ix.insert(index_key("alicex", "st-3").as_str(), ()).unwrap();
            ix.insert(index_key("alic", "st-4").as_str(), ()).unwrap();
        }
        w.commit().unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(STUDIES).unwrap();
        assert_eq!(get_json::<StudyRecord, _>(&t, "st-1").unwrap(), Some(study));
        assert_eq!(get_json::<StudyRecord, _>(&t, "st-9").unwrap(), None);
        let ix = r.open_table(OWNER_STUDIES).unwrap();
        assert_eq!(index_scan(&ix, "alice").unwrap(), vec!["st-1", "st-2"]);
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
