//! DICOMweb (PS3.18) on the gateway: QIDO-RS, WADO-RS and STOW-RS over
//! HTTPS with mutual TLS, off unless `[dicomweb] listen` is set.
//!
//! The listener reuses `tessera-tls`: the gRPC server's certificate, CA and
//! accept loop ([`tessera_tls::incoming_with`]), so a client without a
//! certificate of our CA, or without a Tessera identity in its URI SAN, is
//! dropped at the handshake. The identity's roles (`[server.access]`) then
//! decide each route ([`tessera_tls::matrix::DICOMWEB`]); an identity with
//! no role, or a role the route does not admit, is answered 403 and logged
//! as a refusal like a refused RPC.
//!
//! Behind the routes is the DIMSE query/retrieve code: the same visibility
//! (owner, delegate or grant holder), matching, de-identified view for
//! roles that may not re-identify, grant selection and spending
//! (`flows/dicom/query.rs`, `get_move.rs`), and StoreDicom's store path.

mod json;
pub mod multipart;
mod qido;
mod stow;
mod wado;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tessera_tls::{AcceptLimits, PeerInfo, Role, RoleMap, ServerTls};
use tokio_stream::StreamExt;

use crate::error::GatewayError;
use crate::flows::dicom::DicomPeer;
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

/// The DICOMweb listener while it serves.
pub struct RunningDicomWeb {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RunningDicomWeb {
    /// Stops accepting; open connections end with their requests.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Binds `listen` and serves DICOMweb with `tls` (the gRPC server's).
pub async fn spawn(
    listen: SocketAddr,
    tls: &ServerTls,
    service: GatewayService,
    roles: RoleMap,
    max_request_bytes: u64,
) -> std::io::Result<RunningDicomWeb> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let mut incoming =
        tessera_tls::incoming_with(listener, &tls.for_http1(), AcceptLimits::default());
    let router = router(WebState {
        service,
        roles: Arc::new(roles),
        max_request_bytes,
    });
    let task = tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let caller = Caller(conn.peer().clone());
            let app = router.clone().layer(axum::Extension(caller));
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), TowerToHyperService::new(app))
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "DICOMweb connection ended");
                }
            });
        }
    });
    tracing::info!(%addr, "serving DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over mutual TLS");
    Ok(RunningDicomWeb { addr, task })
}

fn router(state: WebState) -> Router {
    Router::new()
        .route("/studies", get(qido::studies).post(stow::store))
        .route("/studies/{study}", get(wado::study))
        .route("/studies/{study}/metadata", get(wado::study_metadata))
        .route("/studies/{study}/series", get(qido::study_series))
        .route("/studies/{study}/instances", get(qido::study_instances))
        .route("/studies/{study}/series/{series}", get(wado::series))
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(wado::series_metadata),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(qido::series_instances),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}",
            get(wado::instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(wado::instance_metadata),
        )
        .route("/series", get(qido::all_series))
        .route("/instances", get(qido::all_instances))
        .with_state(state)
}

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
    use super::percent_decode;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("DOE%5EJ*"), "DOE^J*");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("20200101-20201231"), "20200101-20201231");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
