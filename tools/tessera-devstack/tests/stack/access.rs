//! Access purposes and break-glass through the gateway (issue 19): a
//! hospital system that talks only to the gateway names the purpose of its
//! request (a standing approval for it approves at once) or asks for
//! emergency access with a written reason. Callers that name no purpose
//! keep the keyserver's default and the owner's approval.

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::suite::{gateway, keyserver, start};
use tonic::Code;

const CLINICIAN: &str = "spiffe://tessera.local/user/clinician";

async fn store(stack: &DevStack, img: &Image) -> String {
    let header = pb::StoreHeader {
        owner: String::new(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-ACCESS-1".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 8,
            y: 8,
            width: 32,
            height: 32,
        }),
    };
    gw::store(
        &mut gateway(stack, "owner").await,
        header,
        &img.to_le_bytes(),
    )
    .await
    .unwrap()
    .study_handle
}

async fn ask(
    stack: &DevStack,
    who: &str,
    handle: &str,
    purpose: &str,
    break_glass: &str,
) -> Result<ks::KeyRequest, tonic::Status> {
    gateway(stack, who)
        .await
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.into(),
            justification: "ward round".into(),
            access_purpose: purpose.into(),
            break_glass_reason: break_glass.into(),
        })
        .await
        .map(|r| r.into_inner().request.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purpose_standing_approval_and_break_glass_through_the_gateway() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let img =
        tessera_image::phantom::head_phantom(64, 48, 1, PixelFormat::gray16(12, false), 5).unwrap();
    let handle = store(&stack, &img).await;

    // No purpose: the keyserver's default, pending until the owner decides.
    let plain = ask(&stack, "clinician", &handle, "", "").await.unwrap();
    assert_eq!(plain.state, ks::RequestState::Pending as i32);
    assert_eq!(plain.access_purpose, "treatment");
    assert_eq!(plain.requester, CLINICIAN);
    // A purpose outside the vocabulary: refused with the vocabulary named.
    let e = ask(&stack, "clinician", &handle, "shopping", "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("research"), "{}", e.message());

    // A standing approval for research: a research request through the
    // gateway is approved at once and its grant reads the pixels.
    let sa = keyserver(&stack, "owner")
        .await
        .create_standing_approval(ks::CreateStandingApprovalRequest {
            grantee_identity: CLINICIAN.into(),
            access_purpose: "research".into(),
            ttl_seconds: 3600,
            grant_uses: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let auto = ask(&stack, "clinician", &handle, "research", "")
        .await
        .unwrap();
    assert_eq!(auto.state, ks::RequestState::Approved as i32);
    assert_eq!(auto.standing_approval, sa.approval_id);
    assert_eq!(auto.access_purpose, "research");
    let mut clin = gateway(&stack, "clinician").await;
    let (_, pixels) = gw::retrieve(&mut clin, &handle, &auto.request_id)
        .await
        .unwrap();
    assert_eq!(pixels, img.to_le_bytes());
    // The same purpose from clinician2 (not named): pending.
    let other = ask(&stack, "clinician2", &handle, "research", "")
        .await
        .unwrap();
    assert_eq!(other.state, ks::RequestState::Pending as i32);

    // Break-glass without the emergency permission: refused.
    let e = ask(&stack, "clinician2", &handle, "", "patient collapsed")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("emergency"), "{}", e.message());
    // With another purpose: refused at the gateway.
    let e = ask(
        &stack,
        "clinician",
        &handle,
        "research",
        "patient collapsed",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A reason too long: refused by the keyserver.
    let e = ask(&stack, "clinician", &handle, "", &"x".repeat(501))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The clinician breaks the glass: open at once, flagged, readable,
    // and on the owner's review list.
    let bg = ask(&stack, "clinician", &handle, "", "patient collapsed")
        .await
        .unwrap();
    assert_eq!(bg.state, ks::RequestState::Approved as i32);
    assert!(bg.break_glass);
    assert_eq!(bg.break_glass_reason, "patient collapsed");
    assert_eq!(bg.access_purpose, "emergency");
    assert_eq!(bg.requester, CLINICIAN);
    let (_, pixels) = gw::retrieve(&mut clin, &handle, &bg.request_id)
        .await
        .unwrap();
    assert_eq!(pixels, img.to_le_bytes());
    let mut owner = keyserver(&stack, "owner").await;
    let review = owner
        .list_break_glass(ks::ListBreakGlassRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(review.iter().any(|r| r.request_id == bg.request_id));
    // The keyserver's audit names the clinician, not the gateway, as the
    // one who broke the glass.
    let audit = owner
        .list_audit(ks::ListAuditRequest {
            from_seq: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let approved = audit
        .iter()
        .find(|e| e.event == "grant.approved" && e.detail.contains(&bg.request_id))
        .unwrap();
    assert_eq!(approved.actor, CLINICIAN);
    assert!(
        approved.detail.contains("break_glass=1"),
        "{}",
        approved.detail
    );

    // Disabled by the owner: refused through the gateway too.
    owner
        .set_break_glass(ks::SetBreakGlassRequest { disabled: true })
        .await
        .unwrap();
    let e = ask(&stack, "clinician", &handle, "", "patient collapsed")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("disabled"), "{}", e.message());
    stack.shutdown().await;
}
