//! Study keys from the keyserver: `DeriveKey(study, attributes, "pixels",
//! operation)` over mutual TLS with this service's own certificate, every
//! derivation audited there. A restore key lives only for the request that
//! derived it. A protect key is kept for a short while per (study,
//! attributes) so that a series of slices costs one audited derivation, not
//! one durable audit commit per slice ([`ProtectKeyCache`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_cryptomark::StudyKey;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::Channel;
use tessera_tls::{ClientTls, Identity};
use tonic::{Code, Status};

use crate::config::KeyserverSection;
use crate::convert::{PURPOSE_PIXELS, StudyRef};
use crate::error::WatermarkError;

/// Why the key is derived (audited by the keyserver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Protect,
    Restore,
}

/// How long a derived protect key is reused: the bound on how late a
/// change at the keyserver (the study forgotten, the service's right
/// withdrawn) reaches protect. Restore keys are never kept.
pub const PROTECT_KEY_TTL: Duration = Duration::from_secs(30);
/// Most studies whose protect key is kept at once.
pub const PROTECT_KEY_STUDIES: usize = 256;

/// (study id, attributes in request order): a key derived for other
/// attributes is never reused, so the keyserver still checks them.
type CacheKey = (String, Vec<(String, String)>);

/// Protect keys derived in the last [`PROTECT_KEY_TTL`], per (study,
/// attributes), at most `capacity` studies (the oldest dropped first). Each
/// key is wiped when dropped (on expiry or eviction).
#[derive(Debug)]
pub struct ProtectKeyCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<CacheKey, (StudyKey, Instant)>>,
}

impl ProtectKeyCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(study: &StudyRef) -> CacheKey {
        (
            study.study_id.clone(),
            study
                .attributes
                .iter()
                .map(|a| (a.name.clone(), a.value.clone()))
                .collect(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, (StudyKey, Instant)>> {
        // A panic while holding the lock leaves only whole entries behind.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key derived for exactly this study and these attributes, if it
    /// is still fresh.
    pub fn get(&self, study: &StudyRef, now: Instant) -> Option<StudyKey> {
        let key = Self::key(study);
        let mut entries = self.lock();
        match entries.get(&key) {
            Some((k, at)) if now.saturating_duration_since(*at) < self.ttl => Some(k.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Keeps `key`, derived at `now`; drops expired entries, then the
    /// oldest while over capacity.
    pub fn put(&self, study: &StudyRef, key: StudyKey, now: Instant) {
        let mut entries = self.lock();
        let ttl = self.ttl;
        entries.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        entries.insert(Self::key(study), (key, now));
        while entries.len() > self.capacity {
            let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            entries.remove(&oldest);
        }
    }

    /// Drops every key kept for `study_id` (whatever the attributes): the
    /// study was forgotten at the keyserver. Returns how many were kept.
    pub fn forget(&self, study_id: &str) -> usize {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|(id, _), _| id != study_id);
        before - entries.len()
    }

    /// Studies whose key is kept (expired ones included until the next put).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client of the keyserver. Cheap to clone; connects on first use and
/// reconnects, so the service starts even while the keyserver is down.
#[derive(Clone, Debug)]
pub struct KeyClient {
    client: KeyServerClient<Channel>,
    protect_keys: std::sync::Arc<ProtectKeyCache>,
}

impl KeyClient {
    /// Prepares a lazy channel on `tls` that accepts only `identity` at the
    /// other end, with the configured timeouts.
    pub fn new(
        cfg: &KeyserverSection,
        tls: &ClientTls,
        identity: &Identity,
    ) -> Result<Self, tessera_tls::TlsError> {
        let channel = tls
            .expecting(identity)
            .with_timeouts(cfg.timeouts())
            .connect_resolving(&cfg.address, cfg.resolve_secs, tessera_tls::dns_resolver())?;
        Ok(Self {
            client: KeyServerClient::new(channel),
            protect_keys: std::sync::Arc::new(ProtectKeyCache::new(
                PROTECT_KEY_TTL,
                PROTECT_KEY_STUDIES,
            )),
        })
    }

    /// The study's pixel key: for protect, the one derived for the same
    /// study and attributes within [`PROTECT_KEY_TTL`] if any; otherwise
    /// (and always for restore) derived, and audited, at the keyserver.
    pub async fn derive(&self, study: &StudyRef, why: Purpose) -> Result<StudyKey, WatermarkError> {
        match why {
            Purpose::Restore => self.derive_at_keyserver(study, why).await,
            Purpose::Protect => {
                if let Some(key) = self.protect_keys.get(study, Instant::now()) {
                    return Ok(key);
                }
                let key = self.derive_at_keyserver(study, why).await?;
                self.protect_keys.put(study, key.clone(), Instant::now());
                Ok(key)
            }
        }
    }

    /// Drops the protect keys kept for `study_id` (ForgetStudy).
    pub fn forget(&self, study_id: &str) -> usize {
        self.protect_keys.forget(study_id)
    }

    async fn derive_at_keyserver(
        &self,
        study: &StudyRef,
        why: Purpose,
    ) -> Result<StudyKey, WatermarkError> {
        let operation = match why {
            Purpose::Protect => ks::Operation::Protect,
            Purpose::Restore => ks::Operation::Restore,
        };
        // The channel carries the trace context of this RPC to the keyserver.
        let request = tonic::Request::new(ks::DeriveKeyRequest {
            study_id: study.study_id.clone(),
            attributes: study.attributes.clone(),
            purpose: PURPOSE_PIXELS.into(),
            operation: operation.into(),
        });
        let resp = self
            .client
            .clone()
            .derive_key(request)
            .await
            .map_err(|s| keyserver_error(tessera_tls::deadline_status(s)))?
            .into_inner();
        // The response's copy is wiped here, the StudyKey's when dropped.
        let raw = zeroize::Zeroizing::new(resp.key);
        let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            WatermarkError::KeyserverFailed(format!(
                "derived key is {} bytes, expected 32",
                raw.len()
            ))
        })?;
        Ok(StudyKey::from_bytes(bytes))
    }
}

/// Maps the keyserver's answer to ours. Exhaustive over gRPC codes.
fn keyserver_error(s: Status) -> WatermarkError {
    let m = s.message().to_owned();
    match s.code() {
        Code::PermissionDenied => WatermarkError::KeyDenied(m),
        Code::NotFound => WatermarkError::StudyNotFound(m),
        Code::InvalidArgument => WatermarkError::KeyRequestInvalid(m),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            WatermarkError::KeyserverUnavailable(format!("{:?}: {m}", s.code()))
        }
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => WatermarkError::KeyserverFailed(format!("{:?}: {m}", s.code())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(id: &str, attrs: &[(&str, &str)]) -> StudyRef {
        StudyRef {
            study_id: id.into(),
            attributes: attrs
                .iter()
                .map(|(n, v)| ks::Attribute {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_key_is_reused_only_for_the_same_study_and_attributes_while_fresh() {
        let cache = ProtectKeyCache::new(Duration::from_secs(30), 8);
        let t0 = Instant::now();
        let a = study("s1", &[("site", "x")]);
        cache.put(&a, StudyKey::from_bytes([1; 32]), t0);
        assert!(cache.get(&a, t0 + Duration::from_secs(29)) == Some(StudyKey::from_bytes([1; 32])));
        assert!(cache.get(&study("s1", &[("site", "y")]), t0).is_none());
        assert!(cache.get(&study("s2", &[("site", "x")]), t0).is_none());
        // Expired: gone, and removed.
        assert!(cache.get(&a, t0 + Duration::from_secs(30)).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn forget_drops_every_key_of_the_study_only() {
        let cache = ProtectKeyCache::new(Duration::from_secs(30), 8);
        let t0 = Instant::now();
        let (a1, a2, b) = (
            study("a", &[("k", "1")]),
            study("a", &[("k", "2")]),
            study("b", &[("k", "1")]),
        );
        cache.put(&a1, StudyKey::from_bytes([1; 32]), t0);
        cache.put(&a2, StudyKey::from_bytes([2; 32]), t0);
        cache.put(&b, StudyKey::from_bytes([3; 32]), t0);
        assert_eq!(cache.forget("a"), 2);
        assert!(cache.get(&a1, t0).is_none());
        assert!(cache.get(&a2, t0).is_none());
        assert!(cache.get(&b, t0) == Some(StudyKey::from_bytes([3; 32])));
        assert_eq!(cache.forget("a"), 0);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn capacity_drops_the_oldest() {
        let cache = ProtectKeyCache::new(Duration::from_secs(30), 2);
        let t0 = Instant::now();
        let (a, b, c) = (
            study("a", &[("k", "1")]),
            study("b", &[("k", "1")]),
            study("c", &[("k", "1")]),
        );
        cache.put(&a, StudyKey::from_bytes([1; 32]), t0);
        cache.put(
            &b,
            StudyKey::from_bytes([2; 32]),
            t0 + Duration::from_secs(1),
        );
        cache.put(
            &c,
            StudyKey::from_bytes([3; 32]),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(cache.len(), 2);
        let now = t0 + Duration::from_secs(3);
        assert!(cache.get(&a, now).is_none());
        assert!(cache.get(&b, now) == Some(StudyKey::from_bytes([2; 32])));
        assert!(cache.get(&c, now) == Some(StudyKey::from_bytes([3; 32])));
        // One more entry (same study, other attributes) evicts the oldest: b.
        cache.put(
            &study("b", &[("k", "2")]),
            StudyKey::from_bytes([4; 32]),
            now,
        );
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&b, now).is_none());
        assert!(cache.get(&c, now).is_some());
    }
}
