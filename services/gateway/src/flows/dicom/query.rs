//! The DICOM query index (C-FIND, and what C-GET/C-MOVE select): answered
//! from the vault's sealed instance records only, never from a storage
//! node, and only about studies the peer's Tessera identity owns, is a
//! delegate of the owner for, or holds a usable grant on (asked of the
//! keyserver with FindGrants). Roles that may not re-identify see, and
//! match against, the de-identified view: the same Basic Profile (mapped
//! UIDs, emptied names and IDs, removed or shifted dates) as the files
//! they retrieve.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_dicom::Profile;
use tessera_dicom::query::{TagPair, VR, deidentified_values, indexed, matches};
use tessera_proto::keyserver::v1 as kpb;
use tessera_tls::Role;

use super::{FORMAT_DICOM, PURPOSE_METADATA, profile_for};
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result, with_vault};
use crate::vault::{InstanceRecord, StudyRecord, StudyState};

const STUDY_UID: TagPair = (0x0020, 0x000D);
const SERIES_UID: TagPair = (0x0020, 0x000E);
const SOP_UID: TagPair = (0x0008, 0x0018);
const PATIENT_ID: TagPair = (0x0010, 0x0020);
const PATIENT_NAME: TagPair = (0x0010, 0x0010);
const MODALITY: TagPair = (0x0008, 0x0060);
/// Computed at query time.
const MODALITIES_IN_STUDY: TagPair = (0x0008, 0x0061);
const STUDY_SERIES: TagPair = (0x0020, 0x1206);
const STUDY_INSTANCES: TagPair = (0x0020, 0x1208);
const SERIES_INSTANCES: TagPair = (0x0020, 0x1209);

/// A DICOM peer: the Tessera identity its calling AE title is bound to
/// (`[[dicom.scp.peers]]`) and that identity's roles.
#[derive(Clone, Debug)]
pub struct DicomPeer {
    pub identity: String,
    pub roles: BTreeSet<Role>,
}

/// Why a study is visible to a peer.
#[derive(Clone, Debug)]
pub(crate) struct Visible {
    pub(crate) study: StudyRecord,
    /// The peer's usable grants on it, soonest expiry first (empty: seen
    /// as owner or delegate only).
    pub(crate) grants: Vec<kpb::FoundGrant>,
}

/// One instance as the peer sees it.
pub(crate) struct Seen {
    pub(crate) instance: InstanceRecord,
    pub(crate) values: BTreeMap<TagPair, String>,
}

/// The query level's unique key.
fn level_key(level: &str) -> Result<TagPair> {
    match level {
        "STUDY" => Ok(STUDY_UID),
        "SERIES" => Ok(SERIES_UID),
        "IMAGE" => Ok(SOP_UID),
        other => Err(GatewayError::InvalidArgument(format!(
            "Query/Retrieve Level {other:?}: STUDY, SERIES or IMAGE"
        ))),
    }
}

/// The VR a key is matched with.
pub(crate) fn vr_of(tag: TagPair) -> VR {
    match tag {
        MODALITIES_IN_STUDY => VR::CS,
        STUDY_SERIES | STUDY_INSTANCES | SERIES_INSTANCES => VR::IS,
        t => indexed(t).map_or(VR::LO, |(vr, _)| vr),
    }
}

/// What the index knows of an instance stored before it kept attributes.
fn fallback_values(study: &StudyRecord, inst: &InstanceRecord) -> Vec<(TagPair, String)> {
    let attr = |n: &str| {
        study
            .attributes
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    let mut v = vec![
        (STUDY_UID, study.dicom_study_uid.clone()),
        (SOP_UID, inst.sop_instance_uid.clone()),
    ];
    if let Some(p) = attr("patient_id") {
        v.push((PATIENT_ID, p));
    }
    if let Some(p) = attr("patient_name") {
        v.push((PATIENT_NAME, p));
    }
    v
}

impl GatewayService {
    /// The committed DICOM studies `peer` may hear about.
    pub(crate) async fn visible_studies(&self, peer: &DicomPeer) -> Result<Vec<Visible>> {
        let studies = with_vault(&self.inner.vault, |v| {
            let mut out = Vec::new();
            for id in v.committed_ids()? {
                if let Some(r) = v.get(&id)?
                    && r.state == StudyState::Committed
                    && r.original_format == FORMAT_DICOM
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await?;
        let mut ks = self.inner.up.keyserver.clone();
        // Every page of the peer's grants.
        let mut grants = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = ks
                .find_grants(kpb::FindGrantsRequest {
                    on_behalf_of: peer.identity.clone(),
                    study_id: String::new(),
                    page_size: 500,
                    page_token: std::mem::take(&mut page_token),
                })
                .await
                .map_err(|s| GatewayError::upstream("keyserver", s))?
                .into_inner();
            grants.extend(page.grants);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let mut acts: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for study in studies {
            let mine: Vec<kpb::FoundGrant> = grants
                .iter()
                .filter(|g| g.study_id == study.study_id)
                .cloned()
                .collect();
            let owner_side = match acts.get(&study.owner) {
                Some(a) => *a,
                None => {
                    let a = self.acts_for(&peer.identity, &study.owner).await?;
                    acts.insert(study.owner.clone(), a);
                    a
                }
            };
            if owner_side || !mine.is_empty() {
                out.push(Visible {
                    study,
                    grants: mine,
                });
            }
        }
        Ok(out)
    }

    /// The profile a peer's view is made with (None: it may re-identify).
    async fn view_profile(&self, peer: &DicomPeer, study: &StudyRecord) -> Result<Option<Profile>> {
        let reidentify = peer
            .roles
            .iter()
            .any(|r| self.inner.limits.reidentify_roles.contains(r));
        if reidentify {
            return Ok(None);
        }
        let kmeta = self
            .derive(study, PURPOSE_METADATA, kpb::Operation::Restore)
            .await?;
        Ok(Some(profile_for(&kmeta, self.inner.limits.temporal)))
    }

    /// Every visible instance matching `keys` (a C-FIND identifier's
    /// attributes other than the level), grouped by study.
    pub(crate) async fn matching_instances(
        &self,
        peer: &DicomPeer,
        keys: &[(TagPair, String)],
    ) -> Result<Vec<(Visible, Vec<Seen>)>> {
        let mut out = Vec::new();
        for vis in self.visible_studies(peer).await? {
            let instances = self.committed_instances(&vis.study).await?;
            if instances.is_empty() {
                continue;
            }
            let profile = self.view_profile(peer, &vis.study).await?;
            let mut seen: Vec<Seen> = instances
                .into_iter()
                .map(|inst| {
                    let base = if inst.indexed.is_empty() {
                        fallback_values(&vis.study, &inst)
                    } else {
                        inst.indexed.clone()
                    };
                    let view = match &profile {
                        None => base,
                        Some(p) => deidentified_values(&base, p),
                    };
                    Seen {
                        values: view.into_iter().collect(),
                        instance: inst,
                    }
                })
                .collect();
            add_counts(&mut seen);
            seen.retain(|s| {
                keys.iter().all(|(tag, key)| {
                    key.is_empty()
                        || !known(*tag)
                        || matches(
                            vr_of(*tag),
                            key,
                            s.values.get(tag).map_or("", String::as_str),
                        )
                })
            });
            if !seen.is_empty() {
                out.push((vis, seen));
            }
        }
        Ok(out)
    }

    /// C-FIND: one identifier per matching study, series or instance, with
    /// the requested attributes (and the unique keys down to the level).
    pub async fn dicom_find(
        &self,
        peer: &DicomPeer,
        level: &str,
        keys: &[(TagPair, String)],
    ) -> Result<Vec<Vec<(TagPair, String)>>> {
        let unique = level_key(level)?;
        let found = self.matching_instances(peer, keys).await?;
        let mut answers = Vec::new();
        let mut done: BTreeSet<String> = BTreeSet::new();
        for (_, seen) in &found {
            for s in seen {
                let id = s.values.get(&unique).cloned().unwrap_or_default();
                if !done.insert(format!("{}|{id}", s.instance.study_id)) {
                    continue;
                }
                let mut answer: Vec<(TagPair, String)> = keys
                    .iter()
                    .map(|(tag, _)| (*tag, s.values.get(tag).cloned().unwrap_or_default()))
                    .collect();
                let mut required = vec![STUDY_UID];
                if unique != STUDY_UID {
                    required.push(SERIES_UID);
                }
                if unique == SOP_UID {
                    required.push(SOP_UID);
                }
                for t in required {
                    if !answer.iter().any(|(k, _)| *k == t) {
                        answer.push((t, s.values.get(&t).cloned().unwrap_or_default()));
                    }
                }
                answers.push(answer);
            }
        }
        tracing::info!(identity = %peer.identity, level, answers = answers.len(), "DICOM C-FIND answered");
        Ok(answers)
    }
}

/// Whether the index can match on `tag` (other keys match anything and
/// come back empty).
fn known(tag: TagPair) -> bool {
    indexed(tag).is_some()
        || matches!(
            tag,
            MODALITIES_IN_STUDY | STUDY_SERIES | STUDY_INSTANCES | SERIES_INSTANCES
        )
}

/// Modalities in Study and the instance/series counts, per study (one
/// call holds one study's instances).
fn add_counts(seen: &mut [Seen]) {
    let modalities: BTreeSet<String> = seen
        .iter()
        .filter_map(|s| s.values.get(&MODALITY).cloned())
        .filter(|m| !m.is_empty())
        .collect();
    let mut per_series: HashMap<String, usize> = HashMap::new();
    for s in seen.iter() {
        *per_series
            .entry(s.values.get(&SERIES_UID).cloned().unwrap_or_default())
            .or_default() += 1;
    }
    let total = seen.len();
    let modalities = modalities.into_iter().collect::<Vec<_>>().join("\\");
    for s in seen.iter_mut() {
        let series = s.values.get(&SERIES_UID).cloned().unwrap_or_default();
        s.values.insert(MODALITIES_IN_STUDY, modalities.clone());
        s.values.insert(STUDY_SERIES, per_series.len().to_string());
        s.values.insert(STUDY_INSTANCES, total.to_string());
        s.values.insert(
            SERIES_INSTANCES,
            per_series.get(&series).copied().unwrap_or(0).to_string(),
        );
    }
}
