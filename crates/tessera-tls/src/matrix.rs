//! The authorization matrix: every RPC of every Tessera service, the roles
//! the tower layer admits to it, and the rule its handler adds on top.
//!
//! This table is the single source: each service builds its [`Policy`]
//! from it ([`Policy::for_service`]), `docs/SECURITY.md` shows it rendered
//! by [`render_markdown`] (a test keeps the two equal), and the suite's
//! matrix test calls every RPC found in the protos' descriptors as every
//! kind of caller and asserts exactly this table (an RPC without a row, or a
//! row without an RPC, fails it).

use crate::authz::{Policy, Role};

/// One RPC's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Full gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    /// The roles the authorization layer admits.
    pub roles: &'static [Role],
    /// What the handler checks on top of the role (empty: nothing more).
    pub handler: &'static str,
}

use Role::{Admin, Clinician, Gateway, Owner, Researcher, Watermark};

const USERS: &[Role] = &[Owner, Clinician, Researcher];

const fn rule(path: &'static str, roles: &'static [Role], handler: &'static str) -> Rule {
    Rule {
        path,
        roles,
        handler,
    }
}

/// Every RPC of the suite (health and reflection excepted: see
/// [`crate::HEALTH_SERVICE_PREFIX`] and the runtime's reflection rule).
pub const MATRIX: &[Rule] = &[
    // Gateway ("CloudSec"): the users' entry point.
    rule(
        "/tessera.gateway.v1.Gateway/Store",
        &[Owner, Clinician],
        "the study's owner is the caller, or an owner who made the caller a delegate",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/StoreDicom",
        &[Owner, Clinician],
        "as Store; adding to an existing study needs the same owner",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/RequestAccess",
        USERS,
        "the study exists; the request is filed for the caller",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Retrieve",
        USERS,
        "an approved grant of the caller on the study (one use spent when the image is intact)",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/RetrieveDicom",
        USERS,
        "an approved grant of the caller on the study (one use spent when every instance is intact)",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Process",
        USERS,
        "an approved grant of the caller on the study (one use)",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Locate",
        USERS,
        "an approved grant of the caller on the study (not spent)",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/FetchShare",
        USERS,
        "an approved grant of the caller on the study (not spent); ciphertext only",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Verify",
        USERS,
        "the study's owner, a delegate of the owner, or a holder of an approved grant",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Delete",
        &[Owner],
        "the study's owner",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/FindDicomStudy",
        &[Owner, Clinician],
        "the owner asked about is the caller, or made the caller a delegate",
    ),
    rule(
        "/tessera.gateway.v1.Gateway/Repair",
        &[Admin],
        "· (fragments are ciphertext; no key is derived)",
    ),
    // Keyserver: keys, grants, delegation, audit.
    rule(
        "/tessera.keyserver.v1.KeyServer/RegisterStudy",
        &[Gateway],
        "",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/DeriveKey",
        &[Gateway, Watermark],
        "the purpose is one the keyserver config lists for the caller",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ForgetStudy",
        &[Gateway],
        "",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/RedeemGrant",
        &[Gateway],
        "",
    ),
    rule("/tessera.keyserver.v1.KeyServer/CheckGrant", &[Gateway], ""),
    rule(
        "/tessera.keyserver.v1.KeyServer/FindGrants",
        &[Gateway],
        "on_behalf_of's usable grants (DICOM query/retrieve)",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/CheckDelegate",
        &[Gateway],
        "",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/RequestKey",
        &[Owner, Clinician, Researcher, Gateway],
        "on_behalf_of only from the gateway",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/FetchKey",
        USERS,
        "the caller's own approved grant",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListRequests",
        &[Owner],
        "requests on the caller's studies",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ApproveRequest",
        &[Owner],
        "the study's owner, not the requester, once per request",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/DenyRequest",
        &[Owner],
        "the study's owner, once per request",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/RevokeGrant",
        &[Owner],
        "the study's owner",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/AddDelegate",
        &[Owner],
        "the caller's own delegates",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/RemoveDelegate",
        &[Owner],
        "the caller's own delegates",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListDelegates",
        &[Owner],
        "the caller's own delegates",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/VerifyAudit",
        &[Owner, Admin],
        "",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListAudit",
        &[Owner, Admin],
        "an owner sees entries about their own studies and requests",
    ),
    rule("/tessera.keyserver.v1.KeyServer/RotateMaster", &[Admin], ""),
    // Keyserver, access that fits clinical work (issue 19).
    rule(
        "/tessera.keyserver.v1.KeyServer/CreateStandingApproval",
        &[Owner],
        "the caller's own studies; never naming the caller; a configured purpose",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListStandingApprovals",
        &[Owner],
        "the caller's own approvals",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/UpdateStandingApproval",
        &[Owner],
        "the approval's owner",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/RevokeStandingApproval",
        &[Owner],
        "the approval's owner",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/BreakGlass",
        &[Owner, Clinician, Researcher, Gateway],
        "the `emergency` permission (keyserver config), a reason, break-glass not disabled by the owner; on_behalf_of only from the gateway",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/SetBreakGlass",
        &[Owner],
        "the caller's own studies",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListBreakGlass",
        &[Owner, Admin],
        "an owner sees uses on its own studies",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/MarkReviewed",
        &[Owner, Admin],
        "the study's owner or an admin",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ListGrants",
        USERS,
        "the caller's own grants, or (as owner) grants on its studies",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/WatchRequests",
        USERS,
        "requests on the caller's studies, or decisions on its own requests",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/SetWebhook",
        &[Owner],
        "the caller's own webhook; https:// only",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/GetWebhook",
        &[Owner],
        "the caller's own webhook",
    ),
    rule(
        "/tessera.keyserver.v1.KeyServer/ClearWebhook",
        &[Owner],
        "the caller's own webhook",
    ),
    // Watermark and segmentation: plaintext pixels, the gateway only.
    rule("/tessera.watermark.v1.Watermark/Protect", &[Gateway], ""),
    rule("/tessera.watermark.v1.Watermark/Restore", &[Gateway], ""),
    rule("/tessera.watermark.v1.Watermark/Verify", &[Gateway], ""),
    rule(
        "/tessera.watermark.v1.Watermark/ForgetStudy",
        &[Gateway],
        "",
    ),
    rule(
        "/tessera.segmentation.v1.Segmentation/Segment",
        &[Gateway],
        "",
    ),
    // Storage nodes (untrusted clouds): only the gateway writes, reads,
    // lists and processes; no node acts on another node.
    rule("/tessera.storage.v1.StorageNode/Put", &[Gateway], ""),
    rule("/tessera.storage.v1.StorageNode/Get", &[Gateway], ""),
    rule("/tessera.storage.v1.StorageNode/Stat", &[Gateway], ""),
    rule("/tessera.storage.v1.StorageNode/List", &[Gateway], ""),
    rule("/tessera.storage.v1.StorageNode/Delete", &[Gateway], ""),
    rule(
        "/tessera.storage.v1.StorageNode/NodeInfo",
        &[Gateway, Admin],
        "",
    ),
    rule("/tessera.storage.v1.StorageNode/Process", &[Gateway], ""),
];

/// The row of `path`, if the matrix has one.
pub fn rule_for(path: &str) -> Option<&'static Rule> {
    MATRIX.iter().find(|r| r.path == path)
}

impl Policy {
    /// The policy of one gRPC service (`tessera.storage.v1.StorageNode`):
    /// its rows of [`MATRIX`]. A method without a row stays refused.
    pub fn for_service(service: &str) -> Policy {
        let prefix = format!("/{service}/");
        MATRIX
            .iter()
            .filter(|r| r.path.starts_with(&prefix))
            .fold(Policy::new(), |p, r| {
                p.allow(r.path, r.roles.iter().copied())
            })
    }
}

/// The matrix as the Markdown table `docs/SECURITY.md` carries: one row per
/// RPC, one column per role, then the handler's rule.
/// The DICOMweb route groups of the gateway's HTTPS listener (not gRPC:
/// the gateway checks them itself, with the same role map).
pub const QIDO_RS: &str =
    "DICOMweb QIDO-RS: GET /studies, /series, /instances, /studies/{s}/series, …/instances";
pub const WADO_RS: &str =
    "DICOMweb WADO-RS: GET /studies/{s}[/series/{se}[/instances/{i}]][/metadata]";
pub const STOW_RS: &str = "DICOMweb STOW-RS: POST /studies";

/// The DICOMweb rows (rendered below the RPC table).
pub const DICOMWEB: &[Rule] = &[
    rule(
        QIDO_RS,
        USERS,
        "answers only about studies the caller owns, is a delegate for or holds a grant on (as C-FIND); de-identified values for roles that may not re-identify",
    ),
    rule(
        WADO_RS,
        USERS,
        "a usable grant of the caller on every study selected (X-Tessera-Request names it; one use spent per study, as C-GET); /metadata: the same grant checked, no use spent",
    ),
    rule(
        STOW_RS,
        &[Owner, Clinician],
        "as StoreDicom (X-Tessera-Owner: an owner who made the caller a delegate); body bounded by dicomweb.max_request_bytes",
    ),
];

/// The roles a DICOMweb route group admits (none for an unknown name:
/// failing closed).
pub fn dicomweb_roles(route: &str) -> &'static [Role] {
    DICOMWEB
        .iter()
        .find(|r| r.path == route)
        .map_or(&[], |r| r.roles)
}

pub fn render_markdown() -> String {
    let mut out = String::from("| RPC |");
    for r in Role::ALL {
        out.push_str(&format!(" {r} |"));
    }
    out.push_str(" and the handler checks |\n|---|");
    for _ in Role::ALL {
        out.push_str(":-:|");
    }
    out.push_str("---|\n");
    for rule in MATRIX.iter().chain(DICOMWEB) {
        let short = rule.path.trim_start_matches("/tessera.");
        out.push_str(&format!("| `{short}` |"));
        for r in Role::ALL {
            out.push_str(if rule.roles.contains(&r) {
                " yes |"
            } else {
                " · |"
            });
        }
        let h = if rule.handler.is_empty() {
            "·"
        } else {
            rule.handler
        };
        out.push_str(&format!(" {h} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn one_row_per_rpc() {
        let paths: BTreeSet<_> = MATRIX.iter().map(|r| r.path).collect();
        assert_eq!(paths.len(), MATRIX.len(), "a path is listed twice");
        for r in MATRIX {
            assert!(!r.roles.is_empty(), "{} admits nobody", r.path);
            assert!(
                r.path.starts_with("/tessera.") && r.path.matches('/').count() == 2,
                "{}",
                r.path
            );
        }
    }

    #[test]
    fn no_storage_identity_may_call_anything() {
        for r in MATRIX {
            assert!(!r.roles.contains(&Role::Storage), "{}", r.path);
            assert!(!r.roles.contains(&Role::Segmentation), "{}", r.path);
            assert!(!r.roles.contains(&Role::Keyserver), "{}", r.path);
        }
    }

    #[test]
    fn storage_writes_are_the_gateways_alone() {
        for m in ["Put", "Delete", "List", "Get", "Stat", "Process"] {
            let r = rule_for(&format!("/tessera.storage.v1.StorageNode/{m}")).unwrap();
            assert_eq!(r.roles, &[Role::Gateway], "{m}");
        }
    }

    /// docs/SECURITY.md shows the table rendered from this code. To refresh
    /// it after a change: `TESSERA_WRITE_SECURITY_MD=1 cargo test -p tessera-tls matrix`.
    #[test]
    fn security_md_shows_this_matrix() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/SECURITY.md");
        let doc = std::fs::read_to_string(path).expect("docs/SECURITY.md");
        let begin = "<!-- matrix:begin (generated by tessera-tls matrix.rs) -->\n";
        let end = "<!-- matrix:end -->";
        let (head, rest) = doc.split_once(begin).expect("matrix:begin marker");
        let (_, tail) = rest.split_once(end).expect("matrix:end marker");
        let want = format!("{head}{begin}{}{end}{tail}", render_markdown());
        if std::env::var_os("TESSERA_WRITE_SECURITY_MD").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        assert!(
            doc == want,
            "docs/SECURITY.md's matrix is stale: run TESSERA_WRITE_SECURITY_MD=1 cargo test -p tessera-tls matrix"
        );
    }
}
