//! Caller allow-lists: the identities that may call a service (or one RPC),
//! narrowing what the [`crate::Policy`] already admitted by role.
//!
//! Every Tessera service holds the `service` role, so a role alone would let
//! a storage node call the watermark service or another node's `Process`.
//! Services that see plaintext therefore also name exactly who may call
//! them, in a config setting such as `watermark.allowed_callers`.

use tonic::{Request, Status};

use crate::authz::caller;
use crate::identity::Identity;

/// The identity URIs allowed to call, and the config setting they came
/// from (named in logs and validation errors). Fails closed: a request
/// without an identity, or with one not listed, is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerAllowList {
    setting: String,
    callers: Vec<String>,
}

impl CallerAllowList {
    /// `callers` from the config setting `setting` (e.g.
    /// `"process.allowed_callers"`); see [`Self::validate`].
    pub fn new(setting: impl Into<String>, callers: Vec<String>) -> Self {
        Self {
            setting: setting.into(),
            callers,
        }
    }

    /// The config check: at least one identity, each a well-formed SPIFFE
    /// URI. The message names `setting` (and the bad entry).
    pub fn validate(setting: &str, callers: &[String]) -> Result<(), String> {
        if callers.is_empty() {
            return Err(format!("{setting} must name at least one identity"));
        }
        for c in callers {
            Identity::parse_uri(c).map_err(|e| format!("{setting}: {c:?}: {e}"))?;
        }
        Ok(())
    }

    /// The config setting the list came from.
    pub fn setting(&self) -> &str {
        &self.setting
    }

    /// The allowed identity URIs.
    pub fn callers(&self) -> &[String] {
        &self.callers
    }

    /// True when `who` is listed.
    pub fn allows(&self, who: &Identity) -> bool {
        self.callers.contains(&who.uri())
    }

    /// Ok when the request's caller is listed. A request without an identity
    /// is UNAUTHENTICATED; an unlisted caller is logged and refused with
    /// `denied(caller_uri)`, the service's own permission-denied error.
    #[allow(clippy::result_large_err)]
    pub fn check<T, E: Into<Status>>(
        &self,
        request: &Request<T>,
        denied: impl FnOnce(String) -> E,
    ) -> Result<(), Status> {
        let who = caller(request)?;
        if self.allows(who) {
            Ok(())
        } else {
            tracing::warn!(caller = %who, "caller not in {}", self.setting);
            Err(denied(who.uri()).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "spiffe://tessera.local/service/gateway";
    const NODE: &str = "spiffe://tessera.local/service/storage-1";

    fn request_from(uri: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(u) = uri {
            r.extensions_mut().insert(Identity::parse_uri(u).unwrap());
        }
        r
    }

    fn list() -> CallerAllowList {
        CallerAllowList::new("watermark.allowed_callers", vec![GATEWAY.to_owned()])
    }

    fn denied(who: String) -> Status {
        Status::permission_denied(format!("{who} may not call X"))
    }

    #[test]
    fn listed_callers_pass_others_are_denied() {
        let l = list();
        assert!(l.check(&request_from(Some(GATEWAY)), denied).is_ok());
        let e = l.check(&request_from(Some(NODE)), denied).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(e.message(), format!("{NODE} may not call X"));
        assert!(l.allows(&Identity::parse_uri(GATEWAY).unwrap()));
        assert!(!l.allows(&Identity::parse_uri(NODE).unwrap()));
        assert_eq!(l.setting(), "watermark.allowed_callers");
        assert_eq!(l.callers(), [GATEWAY.to_owned()]);
    }

    #[test]
    fn no_identity_is_unauthenticated_and_never_reaches_denied() {
        let e = list()
            .check(&request_from(None), |_| -> Status {
                panic!("denied must not be asked without an identity")
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn an_empty_list_allows_nobody() {
        let l = CallerAllowList::new("x.allowed_callers", vec![]);
        let e = l.check(&request_from(Some(GATEWAY)), denied).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn validation_names_the_setting_and_the_entry() {
        assert_eq!(
            CallerAllowList::validate("process.allowed_callers", &[]).unwrap_err(),
            "process.allowed_callers must name at least one identity"
        );
        let e = CallerAllowList::validate(
            "process.allowed_callers",
            &[GATEWAY.to_owned(), "gateway".to_owned()],
        )
        .unwrap_err();
        assert!(
            e.starts_with("process.allowed_callers: \"gateway\": "),
            "{e}"
        );
        assert!(CallerAllowList::validate("s", &[GATEWAY.to_owned(), NODE.to_owned()]).is_ok());
    }
}
