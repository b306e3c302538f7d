//! Every rule of [`decide`]: what it allows and each way it refuses (kind
//! and reason, as the caller and the audit record see them).

use super::*;

const GW: &str = "spiffe://tessera.local/service/gateway";
const WM: &str = "spiffe://tessera.local/service/watermark";
const ST: &str = "spiffe://tessera.local/service/storage-1";
const OWNER: &str = "spiffe://tessera.local/user/owner";
const CLIN: &str = "spiffe://tessera.local/user/clinician";
const CLIN2: &str = "spiffe://tessera.local/user/clinician2";

fn rules() -> Rules {
    Rules {
        gateway: GW.into(),
        derivers: vec![
            (GW.into(), vec!["dicom-*".into()]),
            (WM.into(), vec!["pixels".into()]),
            (ST.into(), vec![]),
        ],
        access: access::AccessRules::default(),
    }
}

/// Ok, or the refusal as (kind, reason).
fn ask(caller: &str, action: &Action<'_>) -> Result<(), (RefusalKind, String)> {
    decide(&rules(), caller, action).map_err(|r| (r.kind, r.reason))
}

fn denied(reason: &str) -> Result<(), (RefusalKind, String)> {
    Err((RefusalKind::Denied, reason.to_owned()))
}

fn precondition(reason: &str) -> Result<(), (RefusalKind, String)> {
    Err((RefusalKind::Precondition, reason.to_owned()))
}

fn approved(expires_at: u64, uses_left: u32) -> GrantState {
    GrantState::Approved {
        by: OWNER.into(),
        at: 1,
        expires_at,
        uses_granted: 5,
        uses_left,
    }
}

fn denied_state() -> GrantState {
    GrantState::Denied {
        by: OWNER.into(),
        at: 1,
        reason: "no".into(),
    }
}

fn revoked() -> GrantState {
    GrantState::Revoked {
        by: OWNER.into(),
        at: 2,
        reason: "no".into(),
        expires_at: 100,
        uses_granted: 5,
        uses_left: 5,
    }
}

#[test]
fn register_study_gateway_only() {
    assert_eq!(ask(GW, &Action::RegisterStudy), Ok(()));
    for who in [WM, ST, OWNER] {
        assert_eq!(
            ask(who, &Action::RegisterStudy),
            denied("only the gateway registers studies"),
            "{who}"
        );
    }
}

#[test]
fn derive_key_trusted_services_and_their_purposes() {
    for (who, purpose) in [(GW, "dicom-metadata"), (GW, "dicom-pixels"), (WM, "pixels")] {
        assert_eq!(
            ask(who, &Action::DeriveKey { purpose }),
            Ok(()),
            "{who} {purpose}"
        );
    }
    // Not a deriver at all (a user, an unlisted service).
    for who in [OWNER, "spiffe://tessera.local/service/segmentation"] {
        assert_eq!(
            ask(who, &Action::DeriveKey { purpose: "pixels" }),
            denied("only trusted services derive study keys"),
            "{who}"
        );
    }
    // A deriver outside its purposes (a storage node listed with none).
    for (who, purpose) in [
        (GW, "pixels"),
        (GW, "dicom"),
        (WM, "pixels-v2"),
        (WM, "dicom-pixels"),
        (ST, "pixels"),
    ] {
        assert_eq!(
            ask(who, &Action::DeriveKey { purpose }),
            denied(&format!(
                "this service may not derive keys for purpose {purpose}"
            )),
            "{who} {purpose}"
        );
    }
}

#[test]
fn purpose_patterns() {
    let p = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert!(purpose_allowed(&p(&["pixels"]), "pixels"));
    assert!(!purpose_allowed(&p(&["pixels"]), "pixels2"));
    assert!(purpose_allowed(&p(&["dicom-*"]), "dicom-"));
    assert!(purpose_allowed(&p(&["dicom-*"]), "dicom-x"));
    assert!(!purpose_allowed(&p(&["dicom-*"]), "dicom"));
    assert!(purpose_allowed(&p(&["*"]), "anything"));
    assert!(!purpose_allowed(&[], "pixels"));
}

#[test]
fn request_key_for_oneself_or_by_the_gateway_for_a_user() {
    for who in [CLIN, OWNER, WM] {
        assert_eq!(ask(who, &Action::RequestKey { on_behalf_of: "" }), Ok(()));
    }
    assert_eq!(ask(GW, &Action::RequestKey { on_behalf_of: CLIN }), Ok(()));
    for who in [WM, CLIN] {
        assert_eq!(
            ask(
                who,
                &Action::RequestKey {
                    on_behalf_of: CLIN2
                }
            ),
            denied("only the gateway may request on behalf of a user"),
            "{who}"
        );
    }
}

#[test]
fn list_requests_owner_only() {
    assert_eq!(ask(OWNER, &Action::ListRequests { owner: OWNER }), Ok(()));
    for who in [CLIN, GW] {
        assert_eq!(
            ask(who, &Action::ListRequests { owner: OWNER }),
            denied("only the study owner lists its requests"),
            "{who}"
        );
    }
}

#[test]
fn gateway_only_rpcs() {
    for (rpc, verb) in [
        (Rpc::RedeemGrant, "redeem grants"),
        (Rpc::CheckGrant, "check grants"),
        (Rpc::ForgetStudy, "forget studies"),
        (Rpc::CheckDelegate, "check delegates"),
    ] {
        assert_eq!(ask(GW, &Action::GatewayOnly(rpc)), Ok(()));
        for who in [WM, ST, OWNER] {
            assert_eq!(
                ask(who, &Action::GatewayOnly(rpc)),
                denied(&format!("only the gateway may {verb}")),
                "{who} {rpc:?}"
            );
        }
    }
}

fn on_request(
    caller: &str,
    rpc: Rpc,
    requester: &str,
    state: &GrantState,
) -> Result<(), (RefusalKind, String)> {
    ask(
        caller,
        &Action::Decide {
            rpc,
            owner: OWNER,
            requester,
            state,
        },
    )
}

#[test]
fn approve_deny_revoke_allowed() {
    let pending = GrantState::Pending;
    assert_eq!(
        on_request(OWNER, Rpc::ApproveRequest, CLIN, &pending),
        Ok(())
    );
    assert_eq!(on_request(OWNER, Rpc::DenyRequest, CLIN, &pending), Ok(()));
    // An owner may deny (not approve) its own request.
    assert_eq!(on_request(OWNER, Rpc::DenyRequest, OWNER, &pending), Ok(()));
    // Revoking covers expired and used-up grants too.
    for state in [approved(100, 1), approved(1, 1), approved(100, 0)] {
        assert_eq!(on_request(OWNER, Rpc::RevokeGrant, CLIN, &state), Ok(()));
    }
}

#[test]
fn approve_deny_revoke_refusals() {
    let pending = GrantState::Pending;
    // Not the owner, whatever the state: who before what.
    for rpc in [Rpc::ApproveRequest, Rpc::DenyRequest, Rpc::RevokeGrant] {
        for state in [&pending, &approved(100, 1), &denied_state()] {
            assert_eq!(
                on_request(CLIN, rpc, CLIN, state),
                denied("only the study owner decides on its requests"),
                "{rpc:?}"
            );
        }
    }
    assert_eq!(
        on_request(OWNER, Rpc::ApproveRequest, OWNER, &pending),
        denied("nobody may approve their own request")
    );
    // Decided once.
    for rpc in [Rpc::ApproveRequest, Rpc::DenyRequest] {
        for (state, name) in [
            (approved(100, 1), "approved"),
            (denied_state(), "denied"),
            (revoked(), "revoked"),
        ] {
            assert_eq!(
                on_request(OWNER, rpc, CLIN, &state),
                precondition(&format!("request is {name}, not pending")),
                "{rpc:?} {name}"
            );
        }
    }
    for (state, name) in [
        (pending, "pending"),
        (denied_state(), "denied"),
        (revoked(), "revoked"),
    ] {
        assert_eq!(
            on_request(OWNER, Rpc::RevokeGrant, CLIN, &state),
            precondition(&format!(
                "request is {name}, only approved grants can be revoked"
            )),
            "{name}"
        );
    }
}

fn use_grant(
    rpc: Rpc,
    user: &str,
    study: Option<&str>,
    state: &GrantState,
    now: u64,
) -> Result<(), (RefusalKind, String)> {
    let caller = if rpc == Rpc::FetchKey { user } else { GW };
    ask(
        caller,
        &Action::UseGrant {
            rpc,
            user,
            study,
            requester: CLIN,
            grant_study: "st-a",
            state,
            now,
        },
    )
}

#[test]
fn grant_use_allowed() {
    assert_eq!(
        use_grant(Rpc::FetchKey, CLIN, None, &approved(100, 1), 99),
        Ok(())
    );
    for rpc in [Rpc::RedeemGrant, Rpc::CheckGrant] {
        assert_eq!(
            use_grant(rpc, CLIN, Some("st-a"), &approved(100, 1), 99),
            Ok(())
        );
    }
}

#[test]
fn grant_use_refusals() {
    let ok = approved(100, 1);
    assert_eq!(
        use_grant(Rpc::FetchKey, CLIN2, None, &ok, 1),
        denied("only the requester may fetch this key")
    );
    for rpc in [Rpc::RedeemGrant, Rpc::CheckGrant] {
        assert_eq!(
            use_grant(rpc, OWNER, Some("st-a"), &ok, 1),
            denied("the grant belongs to another user")
        );
        assert_eq!(
            use_grant(rpc, CLIN, Some("st-b"), &ok, 1),
            denied("the grant is for another study")
        );
    }
    // The state, for every way of using a grant. Expiry is exclusive.
    for (rpc, study) in [
        (Rpc::FetchKey, None),
        (Rpc::RedeemGrant, Some("st-a")),
        (Rpc::CheckGrant, Some("st-a")),
    ] {
        for (state, now, reason) in [
            (GrantState::Pending, 1, "the request is pending approval"),
            (denied_state(), 1, "the request was denied"),
            (revoked(), 1, "the grant was revoked"),
            (approved(100, 1), 100, "the grant has expired"),
            (approved(100, 1), 101, "the grant has expired"),
            (approved(100, 0), 99, "the grant is used up"),
        ] {
            assert_eq!(
                use_grant(rpc, CLIN, study, &state, now),
                denied(reason),
                "{rpc:?} {reason}"
            );
        }
    }
    // Who is checked before the state.
    assert_eq!(
        use_grant(Rpc::FetchKey, CLIN2, None, &GrantState::Pending, 1),
        denied("only the requester may fetch this key")
    );
}

#[test]
fn forget_for_the_owner_only() {
    let forget = |on_behalf_of| {
        ask(
            GW,
            &Action::Forget {
                owner: OWNER,
                on_behalf_of,
            },
        )
    };
    assert_eq!(forget(OWNER), Ok(()));
    assert_eq!(
        forget(CLIN),
        denied("only the study owner may have it forgotten")
    );
}

#[test]
fn refusals_map_to_their_status_and_record() {
    assert!(matches!(
        Refused::denied("x").into_error(),
        KeyServerError::PermissionDenied(m) if m == "x"
    ));
    assert!(matches!(
        Refused::precondition("y").into_error(),
        KeyServerError::FailedPrecondition(m) if m == "y"
    ));
    // Each RPC names itself and its refusal event.
    for (rpc, name, event) in [
        (Rpc::RegisterStudy, "RegisterStudy", "register.refused"),
        (Rpc::DeriveKey, "DeriveKey", "derive.refused"),
        (Rpc::RequestKey, "RequestKey", "request.refused"),
        (Rpc::ListRequests, "ListRequests", "access.refused"),
        (Rpc::ApproveRequest, "ApproveRequest", "approval.refused"),
        (Rpc::DenyRequest, "DenyRequest", "deny.refused"),
        (Rpc::RevokeGrant, "RevokeGrant", "revoke.refused"),
        (Rpc::FetchKey, "FetchKey", "fetch.refused"),
        (Rpc::RedeemGrant, "RedeemGrant", "redeem.refused"),
        (Rpc::CheckGrant, "CheckGrant", "redeem.refused"),
        (Rpc::ForgetStudy, "ForgetStudy", "forget.refused"),
        (Rpc::AddDelegate, "AddDelegate", "delegate.refused"),
        (Rpc::RemoveDelegate, "RemoveDelegate", "delegate.refused"),
        (Rpc::CheckDelegate, "CheckDelegate", "delegate.refused"),
    ] {
        assert_eq!(rpc.name(), name);
        assert_eq!(rpc.refused_event().as_str(), event, "{name}");
    }
    assert_eq!(
        Action::ListRequests { owner: OWNER }.rpc(),
        Rpc::ListRequests
    );
    assert_eq!(Action::GatewayOnly(Rpc::CheckGrant).rpc(), Rpc::CheckGrant);
}
