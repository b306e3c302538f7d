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

use axum::Router;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tessera_tls::{AcceptLimits, RoleMap, ServerTls};
use tokio_stream::StreamExt;

use crate::shared::GatewayService;
use web::{Caller, WebState};

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
