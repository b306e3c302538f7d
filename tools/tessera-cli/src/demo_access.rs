//! The demo's access step (issue 19), through the gateway as a hospital
//! system would drive it: a standing approval approves a care-team
//! request at once, a clinician with the `emergency` permission breaks the
//! glass with a written reason (another without it is refused), and the
//! owner reviews the break-glass use.

use anyhow::{Context, Result, anyhow};
use gateway_service::client as gw;
use tessera_devstack::DevStack;
use tessera_image::Image;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;

use crate::demo::Steps;
use crate::demo_kit::{gateway, keyserver};

const CLINICIAN2: &str = "spiffe://tessera.local/user/clinician2";

async fn ask(
    stack: &DevStack,
    who: &str,
    handle: &str,
    purpose: &str,
    reason: &str,
) -> Result<ks::KeyRequest, tonic::Status> {
    gateway(stack, who)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.to_owned(),
            justification: "ward round".into(),
            access_purpose: purpose.to_owned(),
            break_glass_reason: reason.to_owned(),
        })
        .await
        .map(|r| r.into_inner().request.unwrap_or_default())
}

/// Reads the study with `request` as `who`; true when bit-identical.
async fn reads(stack: &DevStack, who: &str, handle: &str, request: &str, image: &Image) -> bool {
    let Ok(mut c) = gateway(stack, who).await else {
        return false;
    };
    gw::retrieve(&mut c, handle, request)
        .await
        .is_ok_and(|(_, px)| px == image.to_le_bytes())
}

pub(crate) async fn flows(
    stack: &DevStack,
    handle: &str,
    image: &Image,
    steps: &mut Steps,
) -> Result<()> {
    let mut owner = keyserver(stack, "owner").await?;
    let sa = owner
        .create_standing_approval(ks::CreateStandingApprovalRequest {
            grantee_identity: CLINICIAN2.into(),
            access_purpose: "treatment".into(),
            ttl_seconds: 8 * 3600,
            budget: 10,
            grant_ttl_seconds: 3600,
            grant_uses: 2,
            ..Default::default()
        })
        .await
        .context("create standing approval")?
        .into_inner()
        .approval
        .ok_or_else(|| anyhow!("no approval in the answer"))?;
    println!(
        "  standing approval {}: clinician2, treatment, 8 h, budget 10 (2 uses per grant)",
        sa.approval_id
    );
    let auto = ask(stack, "clinician2", handle, "treatment", "").await;
    let auto = auto.context("clinician2 request")?;
    println!(
        "  clinician2 asks for treatment: {} approved at once by {}",
        auto.request_id, auto.standing_approval
    );
    steps.check(
        "a standing approval approves a matching request at once",
        auto.state == ks::RequestState::Approved as i32 && auto.standing_approval == sa.approval_id,
    );
    steps.check(
        "clinician2 reads the study with it",
        reads(stack, "clinician2", handle, &auto.request_id, image).await,
    );

    let refused = ask(stack, "clinician2", handle, "", "patient collapsed").await;
    if let Err(e) = &refused {
        println!(
            "  clinician2 breaks the glass: refused ({:?}: {})",
            e.code(),
            e.message()
        );
    }
    steps.check(
        "break-glass without the emergency permission is refused",
        matches!(&refused, Err(e) if e.code() == tonic::Code::PermissionDenied),
    );
    let reason = "cardiac arrest in the ED, owner unreachable";
    let bg = ask(stack, "clinician", handle, "", reason)
        .await
        .context("break glass")?;
    println!(
        "  BREAK-GLASS {} by clinician: open at once for {} use(s) until {}, reason \"{}\"",
        bg.request_id,
        bg.uses_left,
        crate::client::utc(bg.expires_at_unix),
        bg.break_glass_reason
    );
    steps.check(
        "break-glass opens the study at once, flagged",
        bg.break_glass && bg.state == ks::RequestState::Approved as i32,
    );
    steps.check(
        "the clinician reads the study under break-glass",
        reads(stack, "clinician", handle, &bg.request_id, image).await,
    );

    let review = |include_reviewed| ks::ListBreakGlassRequest { include_reviewed };
    let open = owner
        .list_break_glass(review(false))
        .await
        .context("review list")?
        .into_inner()
        .requests;
    println!("  owner's review list: {} use(s) to review", open.len());
    owner
        .mark_reviewed(ks::MarkReviewedRequest {
            request_id: bg.request_id.clone(),
        })
        .await
        .context("mark reviewed")?;
    let left = owner
        .list_break_glass(review(false))
        .await
        .context("review list")?
        .into_inner()
        .requests;
    println!(
        "  owner marks {} reviewed: {} left to review",
        bg.request_id,
        left.len()
    );
    steps.check(
        "the owner reviews the break-glass use",
        open.iter().any(|r| r.request_id == bg.request_id) && left.is_empty(),
    );
    let audit = owner
        .list_audit(ks::ListAuditRequest {
            from_seq: 1,
            limit: 1000,
        })
        .await
        .context("audit")?
        .into_inner()
        .entries;
    for e in audit.iter().filter(|e| {
        (e.event == "grant.approved" || e.event == "breakglass.reviewed")
            && (e.detail.contains("standing=") || e.detail.contains("break_glass=1"))
    }) {
        println!("  audit #{} {} {}", e.seq, e.event, e.detail);
    }
    steps.check(
        "the audit names the standing approval and marks the break-glass",
        audit.iter().any(|e| {
            e.event == "grant.approved"
                && e.detail.contains(&format!("standing={}", sa.approval_id))
        }) && audit.iter().any(|e| {
            e.event == "grant.approved"
                && e.detail.contains(&bg.request_id)
                && e.detail.contains("break_glass=1")
        }),
    );
    Ok(())
}
