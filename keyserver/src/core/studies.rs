//! Study and master-secret transitions: register, derive, forget
//! (crypto-shredding), rotate. Each decision goes through [`gate`] first;
//! each change is one write job that also appends its audit entry.

use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use ring::rand::SystemRandom;

use crate::core::attrs::CanonicalAttributes;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::crypto::{Master, master_aad, random_secret};
use crate::core::gate::{Context, audit_study, authorize_in_txn};
use crate::core::ids::{StudyId, validate_label};
use crate::core::policy::{Action, Rpc};
use crate::core::store::{
    Forgotten, GrantState, MASTERS, META, META_MASTER_CURRENT, OWNER_STUDIES, REQUESTS,
    RequestRecord, STUDIES, STUDY_REQUESTS, StudyRecord, get_json, index_key, index_scan, to_json,
};
use crate::core::types::{Derived, ForgetReport, Operation};
use crate::core::{Core, deleted, forgotten_in_txn};
use crate::error::{KeyServerError, Result};

impl Core {
    /// Registers a study (gateway only). Returns the stored record.
    pub async fn register_study(
        &self,
        actor: &str,
        owner: &str,
        attributes: &[(String, String)],
        study_id: Option<&str>,
    ) -> Result<StudyRecord> {
        self.authorize(
            actor,
            Action::RegisterStudy,
            Context::rpc(audit_study(study_id.unwrap_or_default()), ""),
        )
        .await?;
        self.user_identity("owner", owner)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let id = match study_id {
            Some(s) if !s.is_empty() => StudyId::parse(s)?,
            _ => StudyId::random(&self.inner.rng)?,
        };
        let master = self.current_master()?;
        // The salt is stored in clear beside the study; no need to wipe it.
        let salt = *random_secret(&self.inner.rng)?;
        let rec = StudyRecord {
            id: id.as_str().to_owned(),
            owner: owner.to_owned(),
            salt,
            commitment: master.commitment(id.as_str(), &salt, &attrs),
            master_version: master.version,
            created_at: 0,
            registered_by: actor.to_owned(),
            forgotten: None,
        };
        let actor = actor.to_owned();
        let stored = self
            .inner
            .writer
            .submit(move |ctx| {
                let mut rec = rec;
                rec.created_at = ctx.now_secs();
                let txn = ctx.txn;
                if let Some(old) = get_json::<StudyRecord, _>(txn, STUDIES, &rec.id)? {
                    let why = if old.is_forgotten() {
                        format!("study {} was deleted; its id cannot be reused", rec.id)
                    } else {
                        format!("study {}", rec.id)
                    };
                    return Ok(Err(KeyServerError::AlreadyExists(why)));
                }
                txn.put_str(STUDIES, &rec.id, to_json(&rec)?.as_slice())?;
                txn.put_str(OWNER_STUDIES, &index_key(&rec.owner, &rec.id), &[])?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::StudyRegistered,
                    study: rec.id.clone(),
                    detail: format!("owner={} master_version={}", rec.owner, rec.master_version),
                })?;
                Ok(Ok(rec))
            })
            .await?;
        self.cache_study(Arc::new(stored.clone()));
        Ok(stored)
    }

    /// Derives a study key for a trusted service.
    pub async fn derive_key(
        &self,
        actor: &str,
        study_id: &str,
        attributes: &[(String, String)],
        purpose: &str,
        operation: Operation,
    ) -> Result<Derived> {
        let label = validate_label("purpose", purpose);
        let deriver = self.inner.rules.derivers.iter().any(|(d, _)| d == actor);
        // A malformed purpose from a deriver is bad input; from anyone else
        // the call is refused (and audited) before its input is looked at.
        if label.is_ok() || !deriver {
            let detail = if label.is_ok() {
                format!("purpose={purpose} operation={}", operation.as_str())
            } else {
                format!("operation={}", operation.as_str())
            };
            self.authorize(
                actor,
                Action::DeriveKey { purpose },
                Context::rpc(audit_study(study_id), detail),
            )
            .await?;
        }
        label?;
        let id = StudyId::parse(study_id)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let study = self.study(&id)?;
        let detail = format!("purpose={purpose} operation={}", operation.as_str());
        let master = self
            .check_attributes(
                actor,
                &study,
                &attrs,
                AuditEvent::DeriveRefused,
                detail.clone(),
            )
            .await?;
        let key = master.derive_study_key(&study.salt, &study.id, &attrs, purpose)?;
        let entry = NewEntry {
            actor: actor.to_owned(),
            event: AuditEvent::KeyDerived,
            study: study.id.clone(),
            detail: format!("{detail} master_version={}", master.version),
        };
        let r = self
            .inner
            .writer
            .submit(move |ctx| {
                if forgotten_in_txn(ctx.txn, &entry.study)? {
                    return Ok(Err(deleted(&entry.study)));
                }
                ctx.append(entry)?;
                Ok(Ok(()))
            })
            .await;
        if let Err(e) = r {
            if matches!(e, KeyServerError::NotFound(_)) {
                self.uncache_study(id.as_str());
            }
            return Err(e);
        }
        Ok(Derived {
            key,
            master_version: master.version,
        })
    }

    /// Gateway only, for the study's owner `on_behalf_of`: crypto-shredding.
    /// The study's salt and attribute commitment are overwritten (without
    /// them no key of the study can be derived again, even with the master
    /// secret and the attributes), a tombstone keeps the id so it is never
    /// registered again and lookups say "study was deleted", every approved
    /// grant is revoked and every pending request denied, and every held
    /// wrapped key is dropped; one `study.forgotten` audit record, in the
    /// same transaction. A second call answers `NotFound`.
    pub async fn forget_study(
        &self,
        actor: &str,
        study_id: &str,
        on_behalf_of: &str,
    ) -> Result<ForgetReport> {
        self.gateway_only(actor, Rpc::ForgetStudy, study_id, None)
            .await?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let actor = actor.to_owned();
        let asker = on_behalf_of.to_owned();
        let rules = self.inner.rules.clone();
        let (report, tombstone) = self
            .inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let now = ctx.now_secs();
                let Some(mut study) = get_json::<StudyRecord, _>(txn, STUDIES, sid.as_str())?
                else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "study {}",
                        sid.as_str()
                    ))));
                };
                if study.is_forgotten() {
                    return Ok(Err(deleted(&study.id)));
                }
                let action = Action::Forget {
                    owner: &study.owner,
                    on_behalf_of: &asker,
                };
                let audit = Context::rpc(study.id.clone(), format!("on_behalf_of={asker}"));
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit)? {
                    return Ok(Err(e));
                }
                study.salt = [0u8; 32];
                study.commitment = [0u8; 32];
                study.forgotten = Some(Forgotten {
                    at: now,
                    by: actor.clone(),
                    on_behalf_of: asker.clone(),
                });
                txn.put_str(STUDIES, &study.id, to_json(&study)?.as_slice())?;
                let rids = index_scan(txn, STUDY_REQUESTS, &study.id)?;
                let mut report = ForgetReport {
                    grants_revoked: 0,
                    requests_denied: 0,
                };
                let reason = "study forgotten".to_owned();
                for rid in rids {
                    let mut rec =
                        get_json::<RequestRecord, _>(txn, REQUESTS, &rid)?.ok_or_else(|| {
                            KeyServerError::Corrupt(format!("indexed request {rid} is missing"))
                        })?;
                    let mut changed = rec.wrapped_key.take().is_some();
                    match rec.state {
                        GrantState::Pending => {
                            rec.state = GrantState::Denied {
                                by: actor.clone(),
                                at: now,
                                reason: reason.clone(),
                            };
                            report.requests_denied = report.requests_denied.saturating_add(1);
                            changed = true;
                        }
                        GrantState::Approved {
                            expires_at,
                            uses_granted,
                            uses_left,
                            ..
                        } => {
                            rec.state = GrantState::Revoked {
                                by: actor.clone(),
                                at: now,
                                reason: reason.clone(),
                                expires_at,
                                uses_granted,
                                uses_left,
                            };
                            report.grants_revoked = report.grants_revoked.saturating_add(1);
                            changed = true;
                        }
                        GrantState::Denied { .. } | GrantState::Revoked { .. } => {}
                    }
                    if changed {
                        txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                    }
                }
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::StudyForgotten,
                    study: study.id.clone(),
                    detail: format!(
                        "on_behalf_of={asker} grants_revoked={} requests_denied={}",
                        report.grants_revoked, report.requests_denied
                    ),
                })?;
                Ok(Ok((report, study)))
            })
            .await?;
        self.cache_study(Arc::new(tombstone));
        Ok(report)
    }

    /// Adds a master secret version; new studies use it, old ones keep theirs.
    pub async fn rotate_master(&self, actor: &str) -> Result<u32> {
        self.ensure_chain_intact()?;
        let secret = random_secret(&self.inner.rng)?;
        let to_wrap = secret.clone();
        let kek = self.inner.kek.clone();
        let actor = actor.to_owned();
        let version = self
            .inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let next = u32::try_from(txn.read().last_num(MASTERS)? + 1)
                    .map_err(|_| KeyServerError::Corrupt("master versions exhausted".into()))?;
                let wrapped = kek.wrap(&SystemRandom::new(), &master_aad(next), &to_wrap[..])?;
                txn.put_num(MASTERS, u64::from(next), wrapped.as_slice())?;
                txn.put_str(META, META_MASTER_CURRENT, next.to_be_bytes().as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::MasterRotated,
                    study: String::new(),
                    detail: format!("master_version={next}"),
                })?;
                Ok(Ok(next))
            })
            .await?;
        self.inner
            .masters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(version, Arc::new(Master::new(version, secret)?));
        self.inner.current.store(version, Ordering::SeqCst);
        Ok(version)
    }
}
