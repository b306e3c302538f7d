//! WADO-RS: studies, series and instances as `multipart/related;
//! type="application/dicom"`, read by the DIMSE C-GET code
//! ([`GatewayService::dicom_retrieve_with`]): a usable grant of the caller
//! on every study selected (checked before anything is read, one use spent
//! per study once its first instance is rebuilt), byte-identical files for
//! roles that may re-identify and de-identified ones for the others.
//! `X-Tessera-Request: <request id>` names the grant to spend.
//!
//! `/metadata` answers the index's attributes of each instance in the
//! DICOM JSON model (no pixel data): what QIDO-RS answers with every
//! field, so it needs no grant.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tessera_dicom::query::TagPair;

use super::qido::tag_of;
use super::web::{Caller, WebError, WebResult, WebState, header_str, with_type};
use super::{json, multipart};
use crate::flows::dicom::query::vr_of;

const STUDY: TagPair = (0x0020, 0x000D);
const SERIES: TagPair = (0x0020, 0x000E);
const SOP: TagPair = (0x0008, 0x0018);

/// The grant header.
pub const REQUEST_HEADER: &str = "x-tessera-request";

fn not_found(keys: &[(TagPair, String)]) -> WebError {
    let what: Vec<String> = keys.iter().map(|(_, v)| v.clone()).collect();
    WebError(
        StatusCode::NOT_FOUND,
        format!(
            "no instance you may see under {}: if the study exists, ask its owner with `tessera request-key <study handle>` (RequestAccess)",
            what.join("/")
        ),
    )
}

async fn retrieve(
    st: &WebState,
    caller: &Caller,
    headers: &HeaderMap,
    keys: Vec<(TagPair, String)>,
) -> WebResult<Response> {
    let peer = st.peer(caller, ROUTE)?;
    let request = header_str(headers, REQUEST_HEADER).map(str::trim);
    let plan = st
        .service
        .dicom_retrieve_with(&peer, "dicomweb:WADO-RS", &keys, request)
        .await?;
    if plan.count == 0 {
        return Err(not_found(&keys));
    }
    let boundary = multipart::new_boundary();
    let ctype = multipart::content_type(&boundary, "application/dicom");
    let b = boundary.clone();
    let files = tokio_stream::wrappers::ReceiverStream::new(plan.files);
    let parts = tokio_stream::StreamExt::map(files, move |f| match f {
        Ok(bytes) => {
            let mut out = multipart::part_head(&b, "application/dicom", bytes.len());
            out.extend_from_slice(&bytes);
            out.extend_from_slice(b"\r\n");
            Ok(Bytes::from(out))
        }
        // Ends the body short: the client sees a broken answer, never a
        // silently missing instance.
        Err(reason) => Err(std::io::Error::other(reason)),
    });
    let closing = tokio_stream::once(Ok::<_, std::io::Error>(Bytes::from(multipart::closing(
        &boundary,
    ))));
    let body = Body::from_stream(tokio_stream::StreamExt::chain(parts, closing));
    tracing::info!(identity = %peer.identity, instances = plan.count, "WADO-RS retrieving");
    Ok(with_type(StatusCode::OK, &ctype, body))
}

/// The route name in the authorization table.
const ROUTE: &str = tessera_tls::matrix::WADO_RS;

async fn metadata(
    st: &WebState,
    caller: &Caller,
    path: Vec<(TagPair, String)>,
) -> WebResult<Response> {
    let peer = st.peer(caller, ROUTE)?;
    let mut keys: Vec<(TagPair, String)> = super::qido::all_keywords()
        .filter_map(tag_of)
        .filter(|t| !path.iter().any(|(p, _)| p == t))
        .map(|t| (t, String::new()))
        .collect();
    keys.extend(path.iter().cloned());
    let found = st.service.dicom_find(&peer, "IMAGE", &keys).await?;
    if found.is_empty() {
        return Err(not_found(&path));
    }
    let all: Vec<serde_json::Value> = found.iter().map(|a| json::dataset(a, vr_of)).collect();
    let body = serde_json::to_vec(&all)
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(with_type(
        StatusCode::OK,
        "application/dicom+json",
        Body::from(body),
    ))
}

pub(crate) async fn study(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> WebResult<Response> {
    retrieve(&st, &c, &headers, vec![(STUDY, study)]).await
}

pub(crate) async fn series(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> WebResult<Response> {
    retrieve(&st, &c, &headers, vec![(STUDY, study), (SERIES, series)]).await
}

pub(crate) async fn instance(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> WebResult<Response> {
    retrieve(
        &st,
        &c,
        &headers,
        vec![(STUDY, study), (SERIES, series), (SOP, sop)],
    )
    .await
}

pub(crate) async fn study_metadata(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(study): Path<String>,
) -> WebResult<Response> {
    metadata(&st, &c, vec![(STUDY, study)]).await
}

pub(crate) async fn series_metadata(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series)): Path<(String, String)>,
) -> WebResult<Response> {
    metadata(&st, &c, vec![(STUDY, study), (SERIES, series)]).await
}

pub(crate) async fn instance_metadata(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series, sop)): Path<(String, String, String)>,
) -> WebResult<Response> {
    metadata(&st, &c, vec![(STUDY, study), (SERIES, series), (SOP, sop)]).await
}
