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
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tessera_tls::{AcceptLimits, RoleMap, ServerTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::shared::GatewayService;
use web::{Caller, WebState};

/// The DICOMweb listener while it serves.
pub struct RunningDicomWeb {
    pub addr: SocketAddr,
    refusals: Arc<Refusals>,
    task: tokio::task::JoinHandle<()>,
    /// Reloads the TLS material when its files change (`[server]
    /// tls_reload_secs`), as the gRPC listener does.
    watching: Option<tokio::task::JoinHandle<()>>,
}

/// Requests refused so far (beside the security log, which names the
/// caller and reason of each 403), for `/metrics`.
#[derive(Default)]
pub struct Refusals {
    /// 401 and 403: no role for the route, no grant, not the owner.
    pub forbidden: AtomicU64,
    /// 413: a STOW-RS body over `[dicomweb] max_request_bytes`.
    pub too_large: AtomicU64,
}

async fn count_refusal(State(r): State<Arc<Refusals>>, res: Response) -> Response {
    match res.status() {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            r.forbidden.fetch_add(1, Ordering::Relaxed);
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            r.too_large.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    res
}

impl RunningDicomWeb {
    /// The refusal counters (for `/metrics`).
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// Stops accepting; open connections end with their requests.
    pub async fn stop(self) {
        if let Some(w) = self.watching {
            w.abort();
        }
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Binds `listen` and serves DICOMweb with `tls` (the gRPC server's
/// files), reloading them every `tls_reload` if set.
pub async fn spawn(
    listen: SocketAddr,
    tls: &ServerTls,
    tls_reload: Option<Duration>,
    service: GatewayService,
    roles: RoleMap,
    max_request_bytes: u64,
) -> std::io::Result<RunningDicomWeb> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let mut incoming =
        tessera_tls::incoming_with(listener, &tls.for_http1(), AcceptLimits::default());
    let refusals = Arc::new(Refusals::default());
    let router = router(WebState {
        service,
        roles: Arc::new(roles),
        max_request_bytes,
    })
    .layer(axum::middleware::map_response_with_state(
        refusals.clone(),
        count_refusal,
    ));
    let task = tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let caller = Caller(conn.peer().clone());
            let app = router.clone().layer(axum::Extension(caller));
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), TowerToHyperService::new(app))
                    .without_shutdown()
                    .await;
                match served {
                    Ok(parts) => linger(parts.io.into_inner()).await,
                    Err(e) => tracing::debug!(error = %e, "DICOMweb connection ended"),
                }
            });
        }
    });
    tracing::info!(%addr, "serving DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over mutual TLS");
    let watching = tls_reload.map(|every| tls.watch(every));
    Ok(RunningDicomWeb {
        addr,
        refusals,
        task,
        watching,
    })
}

/// How long, and for how many bytes, a closed connection still reads what
/// its client sends.
const LINGER: Duration = Duration::from_secs(10);
const LINGER_BYTES: usize = 64 << 20;

/// Lingering close (as web servers do): a request answered before its body
/// was read (403, 413) ends the connection with the client still sending.
/// Closing at once would reset it, and a reset discards the answer the
/// client has not read yet; so the write side is closed (TLS close_notify,
/// then FIN) and what still arrives is read and dropped until the client
/// closes, for at most [`LINGER`] and [`LINGER_BYTES`].
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
    if io.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = vec![0u8; 16 << 10];
        let mut read = 0usize;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
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
