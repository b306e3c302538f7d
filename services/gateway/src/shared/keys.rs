//! Study keys held by the gateway: the store-side cache (a series of
//! instances costs one keyserver derivation per study and [`KEY_TTL`]) and
//! per-study locks. Keys are wiped when dropped. The derivation itself
//! (`GatewayService::derive`, audited at the keyserver) is in the DICOM
//! flow, its only user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Study keys held by the gateway: the store-side key cache, and one lock
/// per DICOM study key so concurrent first instances of a study open it
/// once.
#[derive(Default)]
pub struct StudyKeys {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Store-side study keys, (study id, purpose) -> key and when it was
    /// derived: a series of instances costs one audited derivation per
    /// study and [`KEY_TTL`], not one per instance. Never used to open.
    protect_keys: Mutex<KeyCache>,
}

/// (study id, purpose) -> (key, derived at).
type KeyCache = HashMap<(String, &'static str), (Key, std::time::Instant)>;

/// How long a store-side study key is reused.
pub const KEY_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Most store-side keys held at once.
const MAX_CACHED_KEYS: usize = 1024;

impl StudyKeys {
    pub(crate) fn cached_key(&self, study: &str, purpose: &'static str) -> Option<Key> {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (k, at)| {
            let keep = at.elapsed() < KEY_TTL;
            if !keep {
                k.fill(0);
            }
            keep
        });
        m.get(&(study.to_owned(), purpose)).map(|(k, _)| k.clone())
    }

    pub(crate) fn cache_key(&self, study: &str, purpose: &'static str, key: Key) {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_CACHED_KEYS {
            m.insert(
                (study.to_owned(), purpose),
                (key, std::time::Instant::now()),
            );
        }
    }

    /// Drops a study's cached keys (delete, rollback).
    pub(crate) fn forget_keys(&self, study: &str) {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(s, _), (k, _)| {
            if s == study {
                k.fill(0);
                false
            } else {
                true
            }
        });
    }

    pub(crate) fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_owned()).or_default().clone()
    }
}

/// A study key from the keyserver: wiped when the last copy is dropped.
pub(crate) type Key = zeroize::Zeroizing<[u8; 32]>;
