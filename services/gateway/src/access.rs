//! Who may act on a study, beyond the role the authorization layer checked
//! (the rules are the "handler" column of `tessera_tls::matrix::MATRIX`):
//!
//! * storing for an owner: the owner, or a delegate the owner registered at
//!   the keyserver (`tessera delegate add`);
//! * finding an owner's DICOM study: the same;
//! * verifying a study: the owner, a delegate, or a holder of an approved
//!   grant on the study (checked, not spent).
//!
//! Every refusal goes to the security log (`tessera_tls::security`) with
//! caller, RPC and reason before the error is returned.

use tessera_proto::keyserver::v1 as kpb;

use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};
use crate::vault::StudyRecord;

/// gRPC path of an RPC of this service, for the security log.
pub(crate) fn rpc_path(method: &str) -> String {
    format!("/{}/{method}", crate::service::SERVICE)
}

/// Logs a handler-level refusal and returns it as PERMISSION_DENIED.
pub(crate) fn refuse(method: &str, caller: &str, reason: String) -> GatewayError {
    tessera_tls::security::refused("gateway", caller, &rpc_path(method), &reason);
    GatewayError::PermissionDenied(reason)
}

impl GatewayService {
    /// True when `caller` is `owner` or a delegate `owner` registered at the
    /// keyserver. A keyserver that cannot answer is an error, never a yes.
    pub(crate) async fn acts_for(&self, caller: &str, owner: &str) -> Result<bool> {
        if caller == owner {
            return Ok(true);
        }
        let mut ks = self.inner.up.keyserver.clone();
        let r = ks
            .check_delegate(kpb::CheckDelegateRequest {
                owner: owner.to_owned(),
                delegate: caller.to_owned(),
            })
            .await
            .map_err(|s| GatewayError::upstream("keyserver", s))?
            .into_inner();
        Ok(r.allowed)
    }

    /// Ok when `caller` may store for `owner`: as [`Self::require_acts_for`],
    /// and an owner storing for itself must hold the owner role (a study
    /// whose owner cannot approve requests could never be read).
    pub(crate) async fn require_store_for(
        &self,
        method: &str,
        caller: &str,
        roles: &std::collections::BTreeSet<tessera_tls::Role>,
        owner: &str,
    ) -> Result<()> {
        if caller == owner && !roles.contains(&tessera_tls::Role::Owner) {
            return Err(refuse(
                method,
                caller,
                format!(
                    "{caller} does not hold the owner role, so it cannot own a study: name the owner in header.owner (it must have made you a delegate)"
                ),
            ));
        }
        self.require_acts_for(method, caller, owner).await
    }

    /// Ok when `caller` may store for, or look up the studies of, `owner`.
    pub(crate) async fn require_acts_for(
        &self,
        method: &str,
        caller: &str,
        owner: &str,
    ) -> Result<()> {
        if self.acts_for(caller, owner).await? {
            Ok(())
        } else {
            Err(refuse(
                method,
                caller,
                format!(
                    "{caller} is neither {owner} nor a delegate of {owner} (the owner adds one with `tessera delegate add`)"
                ),
            ))
        }
    }

    /// Ok when `caller` may have `rec` verified: its owner, a delegate of
    /// the owner, or the holder of the approved grant `key_request_id`.
    pub(crate) async fn require_verify_access(
        &self,
        caller: &str,
        rec: &StudyRecord,
        key_request_id: &str,
    ) -> Result<()> {
        if self.acts_for(caller, &rec.owner).await? {
            return Ok(());
        }
        if key_request_id.is_empty() {
            return Err(refuse(
                "Verify",
                caller,
                format!(
                    "{caller} is not the owner of study {} nor a delegate; name an approved key request (key_request_id)",
                    rec.study_id
                ),
            ));
        }
        crate::convert::check_request_id("key_request_id", key_request_id)?;
        match self
            .check_grant(caller, key_request_id, &rec.study_id)
            .await
        {
            Ok(()) => Ok(()),
            Err(GatewayError::Upstream { status, .. })
                if status.code() == tonic::Code::PermissionDenied
                    || status.code() == tonic::Code::NotFound
                    || status.code() == tonic::Code::FailedPrecondition =>
            {
                Err(refuse(
                    "Verify",
                    caller,
                    format!(
                        "no valid grant of {caller} on study {}: {}",
                        rec.study_id,
                        status.message()
                    ),
                ))
            }
            Err(e) => Err(e),
        }
    }
}

/// The DATA_LOSS refusal of a tampered image: what is tampered, and how to
/// get it anyway.
pub(crate) fn tampered(
    study: &str,
    report: &tessera_proto::watermark::v1::VerificationReport,
) -> GatewayError {
    let tiles: Vec<String> = report
        .tampered_tiles
        .iter()
        .take(16)
        .map(|t| t.index.to_string())
        .collect();
    let blocks: Vec<String> = report
        .tampered_blocks
        .iter()
        .take(16)
        .map(|b| b.index.to_string())
        .collect();
    let more = |shown: usize, total: u64| {
        if total as usize > shown {
            format!(", ... ({total} in all)")
        } else {
            String::new()
        }
    };
    GatewayError::DataLoss(format!(
        "study {study} is tampered: tiles [{}{}], ROI blocks [{}{}]; nothing was returned and no grant use was spent (set allow_tampered to receive it with its report)",
        tiles.join(", "),
        more(tiles.len(), report.tampered_tile_count),
        blocks.join(", "),
        more(blocks.len(), report.tampered_block_count),
    ))
}
