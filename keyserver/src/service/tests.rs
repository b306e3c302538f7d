//! The edge's own checks: every error's status, the policy table.

use super::*;
use tonic::Code;

#[test]
fn every_error_has_its_status_and_internals_stay_generic() {
    let cases = [
        (
            KeyServerError::InvalidArgument("x".into()),
            Code::InvalidArgument,
        ),
        (KeyServerError::NotFound("x".into()), Code::NotFound),
        (
            KeyServerError::AlreadyExists("x".into()),
            Code::AlreadyExists,
        ),
        (
            KeyServerError::PermissionDenied("x".into()),
            Code::PermissionDenied,
        ),
        (KeyServerError::AttributeMismatch, Code::PermissionDenied),
        (
            KeyServerError::FailedPrecondition("x".into()),
            Code::FailedPrecondition,
        ),
        (KeyServerError::Kek("secret path".into()), Code::Internal),
        (
            KeyServerError::Storage("secret path".into()),
            Code::Internal,
        ),
        (
            KeyServerError::Audit("secret path".into()),
            Code::Unavailable,
        ),
        (KeyServerError::Crypto("secret path".into()), Code::Internal),
        (
            KeyServerError::Corrupt("secret path".into()),
            Code::DataLoss,
        ),
        (KeyServerError::Unavailable, Code::Unavailable),
        (
            KeyServerError::StoreUnavailable("secret path".into()),
            Code::Unavailable,
        ),
    ];
    for (e, code) in cases {
        let s = Status::from(e);
        assert_eq!(s.code(), code);
        assert!(!s.message().contains("secret path"), "{}", s.message());
    }
}

#[test]
fn policy_fails_closed_and_names_every_rpc() {
    let p = policy();
    for m in [
        "RegisterStudy",
        "DeriveKey",
        "RequestKey",
        "ListRequests",
        "ApproveRequest",
        "DenyRequest",
        "FetchKey",
        "RevokeGrant",
        "VerifyAudit",
        "ListAudit",
        "RotateMaster",
        "RedeemGrant",
        "CheckGrant",
        "ForgetStudy",
        "AddDelegate",
        "RemoveDelegate",
        "ListDelegates",
        "CheckDelegate",
        "FindGrants",
        "CreateStandingApproval",
        "ListStandingApprovals",
        "UpdateStandingApproval",
        "RevokeStandingApproval",
        "BreakGlass",
        "SetBreakGlass",
        "ListBreakGlass",
        "MarkReviewed",
        "ListGrants",
        "WatchRequests",
    ] {
        assert!(p.allowed(&format!("/{SERVICE}/{m}")).is_some(), "{m}");
    }
    assert!(p.allowed(&format!("/{SERVICE}/Unknown")).is_none());
    let approve = p.allowed(&format!("/{SERVICE}/ApproveRequest")).unwrap();
    assert!(approve.contains(&Role::Owner) && approve.len() == 1);
    let derive = p.allowed(&format!("/{SERVICE}/DeriveKey")).unwrap();
    assert!(!derive.contains(&Role::Clinician));
    for m in ["RedeemGrant", "CheckGrant", "ForgetStudy"] {
        let roles = p.allowed(&format!("/{SERVICE}/{m}")).unwrap();
        assert!(roles.len() == 1 && roles.contains(&Role::Gateway), "{m}");
    }
}
