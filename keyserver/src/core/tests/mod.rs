//! Unit tests of the core against a real database in a temporary
//! directory, with an injected clock. Shared helpers here; the tests by
//! concern in the submodules.

use std::path::Path;
use std::sync::Arc;

use redb::ReadOnlyDatabase;

use super::*;
use crate::core::attrs::CanonicalAttributes;
use crate::core::clock::ManualClock;
use crate::core::store::{Forgotten, GrantState, REQUESTS, RequestRecord};
use crate::core::types::{Derived, ForgetReport, Operation};

mod chain;
mod flows;
mod forget;
mod redeem;

const GW: &str = "spiffe://tessera.local/service/gateway";
const WM: &str = "spiffe://tessera.local/service/watermark";
const STORAGE: &str = "spiffe://tessera.local/service/storage-1";
const OWNER: &str = "spiffe://tessera.local/user/owner";
const CLIN: &str = "spiffe://tessera.local/user/clinician";
const CLIN2: &str = "spiffe://tessera.local/user/clinician2";

fn attrs(id: &str) -> Vec<(String, String)> {
    vec![
        ("patient_id".into(), id.into()),
        ("birth_date".into(), "19700101".into()),
    ]
}

fn open_with(path: &Path, kek: [u8; 32], clock: Arc<dyn Clock>, every: u64) -> Result<Core> {
    Core::open(
        CoreConfig {
            store: StoreAt::Redb(path.to_owned()),
            kek: Kek::from_bytes(&kek)?,
            trust_domain: "tessera.local".into(),
            gateway_identity: GW.into(),
            derivers: vec![(GW.into(), vec!["*".into()]), (WM.into(), vec!["*".into()])],
            checkpoint_every: every,
            max_grant_ttl_secs: 3600,
            max_grant_uses: 10,
            access: Default::default(),
        },
        clock,
    )
}

fn setup() -> (tempfile::TempDir, Arc<ManualClock>, Core) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_secs(1_000_000));
    let core = open_with(&dir.path().join("ks.redb"), [7; 32], clock.clone(), 3).unwrap();
    (dir, clock, core)
}

fn events(core: &Core) -> Vec<String> {
    core.list_audit(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn audit_len(core: &Core) -> usize {
    core.list_audit(1, 10_000).unwrap().len()
}

fn stored_study(core: &Core, id: &str) -> StudyRecord {
    let r = core.inner.store.read().unwrap();
    get_json(r.as_ref(), STUDIES, id).unwrap().unwrap()
}

fn stored_request(core: &Core, id: &str) -> RequestRecord {
    let r = core.inner.store.read().unwrap();
    get_json(r.as_ref(), REQUESTS, id).unwrap().unwrap()
}
