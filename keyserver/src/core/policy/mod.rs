//! The keyserver's one decision function: who may do what to which object.
//!
//! The tower layer (tessera-tls) has already checked the caller's *role*
//! against `service::policy()`. The rules here are the finer ones that need
//! the caller's exact identity or the object: only the gateway registers
//! studies or acts for a user, only configured services derive (and only
//! their purposes), only the owner decides on requests and has a study
//! forgotten, nobody approves their own request, a request is decided once,
//! only the requester (or the gateway for it) uses a grant, and only while
//! it is approved, unexpired and not used up.
//!
//! [`decide`] is pure (no I/O): the facts it needs (owner, requester,
//! state, clock) are read by the caller and passed in the [`Action`]. The
//! core never calls it directly but through its gate (`core/gate.rs`),
//! which turns an answer of [`Refused`] into an audit record (caller, RPC,
//! reason) written **before** the reply (before the transaction, or inside
//! it for checks made there).

pub mod access;

use crate::core::audit::AuditEvent;
use crate::core::store::GrantState;
use crate::error::KeyServerError;

/// The RPCs whose caller the core checks (names as in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `RegisterStudy`.
    RegisterStudy,
    /// `DeriveKey`.
    DeriveKey,
    /// `RequestKey`.
    RequestKey,
    /// `ListRequests` (naming one study).
    ListRequests,
    /// `ApproveRequest`.
    ApproveRequest,
    /// `DenyRequest`.
    DenyRequest,
    /// `RevokeGrant`.
    RevokeGrant,
    /// `FetchKey`.
    FetchKey,
    /// `RedeemGrant`.
    RedeemGrant,
    /// `CheckGrant`.
    CheckGrant,
    /// `ForgetStudy`.
    ForgetStudy,
    /// `AddDelegate`.
    AddDelegate,
    /// `RemoveDelegate`.
    RemoveDelegate,
    /// `CheckDelegate`.
    CheckDelegate,
    /// `CreateStandingApproval`.
    CreateStandingApproval,
    /// `UpdateStandingApproval`.
    UpdateStandingApproval,
    /// `RevokeStandingApproval`.
    RevokeStandingApproval,
    /// `BreakGlass`.
    BreakGlass,
    /// `MarkReviewed`.
    MarkReviewed,
}

impl Rpc {
    /// The proto method name (what the audit record says).
    pub fn name(self) -> &'static str {
        match self {
            Self::RegisterStudy => "RegisterStudy",
            Self::DeriveKey => "DeriveKey",
            Self::RequestKey => "RequestKey",
            Self::ListRequests => "ListRequests",
            Self::ApproveRequest => "ApproveRequest",
            Self::DenyRequest => "DenyRequest",
            Self::RevokeGrant => "RevokeGrant",
            Self::FetchKey => "FetchKey",
            Self::RedeemGrant => "RedeemGrant",
            Self::CheckGrant => "CheckGrant",
            Self::ForgetStudy => "ForgetStudy",
            Self::AddDelegate => "AddDelegate",
            Self::RemoveDelegate => "RemoveDelegate",
            Self::CheckDelegate => "CheckDelegate",
            Self::CreateStandingApproval => "CreateStandingApproval",
            Self::UpdateStandingApproval => "UpdateStandingApproval",
            Self::RevokeStandingApproval => "RevokeStandingApproval",
            Self::BreakGlass => "BreakGlass",
            Self::MarkReviewed => "MarkReviewed",
        }
    }

    /// What the caller tried, for "only the gateway may ..." messages.
    pub fn verb(self) -> &'static str {
        match self {
            Self::RegisterStudy => "register studies",
            Self::DeriveKey => "derive keys",
            Self::RequestKey => "request keys",
            Self::ListRequests => "list requests",
            Self::ApproveRequest => "approve requests",
            Self::DenyRequest => "deny requests",
            Self::RevokeGrant => "revoke grants",
            Self::FetchKey => "fetch keys",
            Self::RedeemGrant => "redeem grants",
            Self::CheckGrant => "check grants",
            Self::ForgetStudy => "forget studies",
            Self::AddDelegate => "add delegates",
            Self::RemoveDelegate => "remove delegates",
            Self::CheckDelegate => "check delegates",
            Self::CreateStandingApproval => "create standing approvals",
            Self::UpdateStandingApproval => "change standing approvals",
            Self::RevokeStandingApproval => "revoke standing approvals",
            Self::BreakGlass => "break the glass",
            Self::MarkReviewed => "mark break-glass uses reviewed",
        }
    }

    /// The audit event a refusal of this RPC is recorded as.
    pub fn refused_event(self) -> AuditEvent {
        match self {
            Self::RegisterStudy => AuditEvent::RegisterRefused,
            Self::DeriveKey => AuditEvent::DeriveRefused,
            Self::RequestKey => AuditEvent::RequestRefused,
            // No event of its own: the listing refusal is an access refusal
            // (told apart from the layer's by the absence of `layer=authz`).
            Self::ListRequests => AuditEvent::AccessRefused,
            Self::ApproveRequest => AuditEvent::ApprovalRefused,
            Self::DenyRequest => AuditEvent::DenialRefused,
            Self::RevokeGrant => AuditEvent::RevokeRefused,
            Self::FetchKey => AuditEvent::FetchRefused,
            Self::RedeemGrant | Self::CheckGrant => AuditEvent::RedeemRefused,
            Self::ForgetStudy => AuditEvent::ForgetRefused,
            Self::AddDelegate | Self::RemoveDelegate | Self::CheckDelegate => {
                AuditEvent::DelegateRefused
            }
            Self::CreateStandingApproval
            | Self::UpdateStandingApproval
            | Self::RevokeStandingApproval => AuditEvent::StandingRefused,
            Self::BreakGlass => AuditEvent::BreakGlassRefused,
            Self::MarkReviewed => AuditEvent::ReviewRefused,
        }
    }
}

/// The identities the rules name (from the keyserver config).
#[derive(Debug, Clone)]
pub struct Rules {
    /// The gateway: registers studies, acts on a user's behalf.
    pub gateway: String,
    /// Services that derive keys, each with the purposes it may derive
    /// (`prefix-*` matches every purpose starting with `prefix-`).
    pub derivers: Vec<(String, Vec<String>)>,
    /// Purposes, break-glass permission ([`access`]).
    pub access: access::AccessRules,
}

/// What is being asked, with the facts the rule needs.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Register a study.
    RegisterStudy,
    /// Derive a key for `purpose`.
    DeriveKey {
        /// Key purpose label.
        purpose: &'a str,
    },
    /// Request a key, possibly for another user (`on_behalf_of` non-empty).
    RequestKey {
        /// The user the caller acts for, or empty.
        on_behalf_of: &'a str,
    },
    /// List the requests on a study owned by `owner`.
    ListRequests {
        /// The study's owner.
        owner: &'a str,
    },
    /// A gateway-only RPC (RedeemGrant, CheckGrant, ForgetStudy, CheckDelegate).
    GatewayOnly(Rpc),
    /// Use a grant: FetchKey (the caller is `user`), RedeemGrant and
    /// CheckGrant (the gateway, already admitted, acts for `user` on
    /// `study`).
    UseGrant {
        /// FetchKey, RedeemGrant or CheckGrant.
        rpc: Rpc,
        /// Who wants to use it.
        user: &'a str,
        /// The study it is to be used for (the gateway's RPCs), if said.
        study: Option<&'a str>,
        /// The request's requester.
        requester: &'a str,
        /// The request's study.
        grant_study: &'a str,
        /// The request's state.
        state: &'a GrantState,
        /// Unix seconds now.
        now: u64,
    },
    /// Forget (crypto-shred) a study owned by `owner` for `on_behalf_of`
    /// (the gateway, already admitted, acts for that user).
    Forget {
        /// The study's owner.
        owner: &'a str,
        /// The user the gateway acts for.
        on_behalf_of: &'a str,
    },
    /// An access purpose carried by a request (`rpc`): it must be in the
    /// configured vocabulary.
    Purpose {
        /// RequestKey or CreateStandingApproval.
        rpc: Rpc,
        /// The purpose, already defaulted.
        purpose: &'a str,
    },
    /// An owner creates a standing approval.
    CreateStanding {
        /// The identity it names, if it names one.
        grantee_identity: Option<&'a str>,
        /// Every study it lists is the caller's.
        studies_owned: bool,
    },
    /// An owner changes or revokes a standing approval made by `owner`.
    ChangeStanding {
        /// UpdateStandingApproval or RevokeStandingApproval.
        rpc: Rpc,
        /// Who made it.
        owner: &'a str,
        /// Revoked already.
        revoked: bool,
    },
    /// Use a grant approved by a standing approval (after [`Action::UseGrant`]):
    /// refused once that approval is revoked.
    StandingGrant {
        /// FetchKey, RedeemGrant or CheckGrant.
        rpc: Rpc,
        /// The approval is revoked.
        revoked: bool,
    },
    /// Break the glass on a study owned by `owner`.
    BreakGlass {
        /// The written reason.
        reason: &'a str,
        /// The study's owner.
        owner: &'a str,
        /// The owner forbade break-glass on its studies.
        disabled: bool,
    },
    /// Mark a break-glass use on a study owned by `owner` reviewed.
    Review {
        /// The study's owner.
        owner: &'a str,
        /// The caller is an admin.
        admin: bool,
        /// The request is a break-glass use.
        break_glass: bool,
        /// Reviewed already.
        reviewed: bool,
    },
    /// Approve, deny or revoke a request on a study owned by `owner`.
    Decide {
        /// ApproveRequest, DenyRequest or RevokeGrant.
        rpc: Rpc,
        /// The study's owner.
        owner: &'a str,
        /// Who asked for the key.
        requester: &'a str,
        /// The request's state now.
        state: &'a GrantState,
    },
}

impl Action<'_> {
    /// The RPC this action belongs to.
    pub fn rpc(&self) -> Rpc {
        match self {
            Self::RegisterStudy => Rpc::RegisterStudy,
            Self::DeriveKey { .. } => Rpc::DeriveKey,
            Self::RequestKey { .. } => Rpc::RequestKey,
            Self::ListRequests { .. } => Rpc::ListRequests,
            Self::GatewayOnly(r) | Self::Decide { rpc: r, .. } | Self::UseGrant { rpc: r, .. } => {
                *r
            }
            Self::Forget { .. } => Rpc::ForgetStudy,
            Self::Purpose { rpc: r, .. }
            | Self::ChangeStanding { rpc: r, .. }
            | Self::StandingGrant { rpc: r, .. } => *r,
            Self::CreateStanding { .. } => Rpc::CreateStandingApproval,
            Self::BreakGlass { .. } => Rpc::BreakGlass,
            Self::Review { .. } => Rpc::MarkReviewed,
        }
    }
}

/// A refusal: what the caller is told and what the audit record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// PermissionDenied (who) or FailedPrecondition (state).
    pub kind: RefusalKind,
    /// Human reason, also written to the audit record.
    pub reason: String,
}

/// Which status a refusal maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The caller may not do this.
    Denied,
    /// The object is not in a state that allows it (e.g. decided already).
    Precondition,
    /// The request is malformed (e.g. a purpose outside the vocabulary).
    Invalid,
}

impl Refused {
    fn denied(reason: impl Into<String>) -> Self {
        Self {
            kind: RefusalKind::Denied,
            reason: reason.into(),
        }
    }
    fn precondition(reason: impl Into<String>) -> Self {
        Self {
            kind: RefusalKind::Precondition,
            reason: reason.into(),
        }
    }
    fn invalid(reason: impl Into<String>) -> Self {
        Self {
            kind: RefusalKind::Invalid,
            reason: reason.into(),
        }
    }
    /// The error returned to the caller.
    pub fn into_error(self) -> KeyServerError {
        match self.kind {
            RefusalKind::Denied => KeyServerError::PermissionDenied(self.reason),
            RefusalKind::Precondition => KeyServerError::FailedPrecondition(self.reason),
            RefusalKind::Invalid => KeyServerError::InvalidArgument(self.reason),
        }
    }
}

/// True when `purpose` is one of `allowed` (exact, or `prefix*`).
pub fn purpose_allowed(allowed: &[String], purpose: &str) -> bool {
    allowed.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => purpose.starts_with(prefix),
        None => p == purpose,
    })
}

fn state_name(s: &GrantState) -> &'static str {
    match s {
        GrantState::Pending => "pending",
        GrantState::Approved { .. } => "approved",
        GrantState::Denied { .. } => "denied",
        GrantState::Revoked { .. } => "revoked",
    }
}

/// The decision: `Ok` when `caller` may do `action`.
pub fn decide(rules: &Rules, caller: &str, action: &Action<'_>) -> Result<(), Refused> {
    let gateway = caller == rules.gateway;
    match *action {
        Action::RegisterStudy if !gateway => {
            Err(Refused::denied("only the gateway registers studies"))
        }
        Action::DeriveKey { purpose } => match rules.derivers.iter().find(|(id, _)| id == caller) {
            None => Err(Refused::denied("only trusted services derive study keys")),
            Some((_, allowed)) if !purpose_allowed(allowed, purpose) => Err(Refused::denied(
                format!("this service may not derive keys for purpose {purpose}"),
            )),
            Some(_) => Ok(()),
        },
        Action::RequestKey { on_behalf_of } if !on_behalf_of.is_empty() && !gateway => Err(
            Refused::denied("only the gateway may request on behalf of a user"),
        ),
        Action::ListRequests { owner } if owner != caller => {
            Err(Refused::denied("only the study owner lists its requests"))
        }
        Action::GatewayOnly(rpc) if !gateway => Err(Refused::denied(format!(
            "only the gateway may {}",
            rpc.verb()
        ))),
        Action::Decide {
            rpc,
            owner,
            requester,
            state,
        } => {
            if owner != caller {
                return Err(Refused::denied(
                    "only the study owner decides on its requests",
                ));
            }
            let pending = *state == GrantState::Pending;
            let approved = matches!(state, GrantState::Approved { .. });
            match rpc {
                Rpc::ApproveRequest if requester == caller => {
                    Err(Refused::denied("nobody may approve their own request"))
                }
                Rpc::ApproveRequest | Rpc::DenyRequest if !pending => Err(Refused::precondition(
                    format!("request is {}, not pending", state_name(state)),
                )),
                Rpc::RevokeGrant if !approved => Err(Refused::precondition(format!(
                    "request is {}, only approved grants can be revoked",
                    state_name(state)
                ))),
                Rpc::ApproveRequest
                | Rpc::DenyRequest
                | Rpc::RevokeGrant
                | Rpc::RegisterStudy
                | Rpc::DeriveKey
                | Rpc::RequestKey
                | Rpc::ListRequests
                | Rpc::FetchKey
                | Rpc::RedeemGrant
                | Rpc::CheckGrant
                | Rpc::ForgetStudy
                | Rpc::AddDelegate
                | Rpc::RemoveDelegate
                | Rpc::CheckDelegate
                | Rpc::CreateStandingApproval
                | Rpc::UpdateStandingApproval
                | Rpc::RevokeStandingApproval
                | Rpc::BreakGlass
                | Rpc::MarkReviewed => Ok(()),
            }
        }
        Action::UseGrant {
            rpc,
            user,
            study,
            requester,
            grant_study,
            state,
            now,
        } => {
            if requester != user {
                return Err(Refused::denied(if rpc == Rpc::FetchKey {
                    "only the requester may fetch this key"
                } else {
                    "the grant belongs to another user"
                }));
            }
            if study.is_some_and(|s| s != grant_study) {
                return Err(Refused::denied("the grant is for another study"));
            }
            match state {
                GrantState::Pending => Err(Refused::denied("the request is pending approval")),
                GrantState::Denied { .. } => Err(Refused::denied("the request was denied")),
                GrantState::Revoked { .. } => Err(Refused::denied("the grant was revoked")),
                GrantState::Approved { expires_at, .. } if now >= *expires_at => {
                    Err(Refused::denied("the grant has expired"))
                }
                GrantState::Approved { uses_left: 0, .. } => {
                    Err(Refused::denied("the grant is used up"))
                }
                GrantState::Approved { .. } => Ok(()),
            }
        }
        Action::Forget {
            owner,
            on_behalf_of,
        } if owner != on_behalf_of => Err(Refused::denied(
            "only the study owner may have it forgotten",
        )),
        Action::Purpose { purpose, .. } if !rules.access.known(purpose) => {
            Err(Refused::invalid(format!(
                "access purpose {purpose:?} is not one of: {}",
                rules.access.purposes.join(", ")
            )))
        }
        Action::CreateStanding {
            grantee_identity,
            studies_owned,
        } => {
            if grantee_identity == Some(caller) {
                Err(Refused::denied(
                    "nobody may approve their own requests, not even in advance",
                ))
            } else if !studies_owned {
                Err(Refused::denied(
                    "a standing approval covers only the caller's own studies",
                ))
            } else {
                Ok(())
            }
        }
        Action::ChangeStanding { owner, .. } if owner != caller => Err(Refused::denied(
            "only its owner changes a standing approval",
        )),
        Action::ChangeStanding { revoked: true, .. } => {
            Err(Refused::precondition("the standing approval is revoked"))
        }
        Action::StandingGrant { revoked: true, .. } => Err(Refused::denied(
            "the standing approval of this grant was revoked",
        )),
        Action::BreakGlass {
            reason,
            owner,
            disabled,
        } => {
            if !rules.access.may_break_glass(caller) {
                Err(Refused::denied("the caller has no emergency permission"))
            } else if reason.trim().is_empty() || reason.chars().count() > access::REASON_MAX {
                Err(Refused::invalid(format!(
                    "a break-glass reason is required, 1..={} characters",
                    access::REASON_MAX
                )))
            } else if owner == caller {
                Err(Refused::denied(
                    "an owner needs no break-glass on its own study",
                ))
            } else if disabled {
                Err(Refused::denied(
                    "the owner has disabled break-glass on its studies",
                ))
            } else {
                Ok(())
            }
        }
        Action::Review {
            owner,
            admin,
            break_glass,
            reviewed,
        } => {
            if owner != caller && !admin {
                Err(Refused::denied(
                    "only the study owner or an admin reviews break-glass uses",
                ))
            } else if !break_glass {
                Err(Refused::precondition(
                    "the request is not a break-glass use",
                ))
            } else if reviewed {
                Err(Refused::precondition("reviewed already"))
            } else {
                Ok(())
            }
        }
        Action::RegisterStudy
        | Action::Purpose { .. }
        | Action::ChangeStanding { .. }
        | Action::StandingGrant { .. }
        | Action::RequestKey { .. }
        | Action::ListRequests { .. }
        | Action::GatewayOnly(_)
        | Action::Forget { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests;
