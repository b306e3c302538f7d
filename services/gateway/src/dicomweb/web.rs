//! What every DICOMweb route shares: the state and the caller a handler
//! reads, the caller's admission to a route (403, audited), the error a
//! handler answers with, and header, body and query helpers.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_tls::{PeerInfo, Role, RoleMap};

use crate::error::GatewayError;
use crate::flows::dicom::query::DicomPeer;
use crate::shared::GatewayService;

/// What every route handler reads.
#[derive(Clone)]
pub(crate) struct WebState {
    pub(crate) service: GatewayService,
    pub(crate) roles: Arc<RoleMap>,
    /// Largest STOW-RS request body.
    pub(crate) max_request_bytes: u64,
}

/// The caller of a request: the identity of its connection's certificate.
#[derive(Clone)]
pub(crate) struct Caller(pub(crate) PeerInfo);

/// A refused or failed request: status and a readable reason.
pub(crate) struct WebError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let mut r = (self.0, format!("{}\n", self.1)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

impl From<GatewayError> for WebError {
    fn from(e: GatewayError) -> Self {
        let status = match &e {
            GatewayError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            GatewayError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::AlreadyExists(_) | GatewayError::WrongKind(_) => StatusCode::CONFLICT,
            GatewayError::Unavailable(_) | GatewayError::Upstream { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::DataLoss(_)
            | GatewayError::Vault(_)
            | GatewayError::Internal(_)
            | GatewayError::Idle(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        WebError(status, e.to_string())
    }
}

pub(crate) type WebResult<T> = std::result::Result<T, WebError>;

impl WebState {
    /// The caller as a DICOM peer, when `route` admits one of its roles;
    /// else 403 (logged as a refusal).
    pub(crate) fn peer(&self, caller: &Caller, route: &str) -> WebResult<DicomPeer> {
        let identity = caller.0.identity.uri();
        let roles = self.roles.roles_of(&caller.0.identity);
        let admitted: &[Role] = tessera_tls::matrix::dicomweb_roles(route);
        if !roles.iter().any(|r| admitted.contains(r)) {
            let reason = if roles.is_empty() {
                format!("{identity} holds no Tessera role")
            } else {
                format!(
                    "{route} admits {}; {identity} holds {}",
                    admitted
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            tessera_tls::security::refused(
                "gateway",
                &identity,
                &format!("dicomweb:{route}"),
                &reason,
            );
            return Err(WebError(StatusCode::FORBIDDEN, reason));
        }
        Ok(DicomPeer { identity, roles })
    }
}

/// A header's value as text.
pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A body of `bytes` with `content_type`.
pub(crate) fn with_type(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// The request's decoded query parameters, in order.
pub(crate) fn query_params(uri: &axum::http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    (None, _) | (_, None) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use crate::dicomweb::web::percent_decode;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("DOE%5EJ*"), "DOE^J*");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("20200101-20201231"), "20200101-20201231");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
