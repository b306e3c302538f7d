//! WADO-RS: studies, series and instances as `multipart/related;
//! type="application/dicom"`, read by the DIMSE C-GET code
//! ([`GatewayService::dicom_retrieve_with`]): a usable grant of the caller
//! on every study selected (checked before anything is read, one use spent
//! per study once its first instance is rebuilt), byte-identical files for
//! roles that may re-identify and de-identified ones for the others.
//! `X-Tessera-Request: <request id>` names the grant to spend.
//!
//! `/metadata` answers each instance's whole data set as that retrieve
//! would send it (identifying or de-identified), in the DICOM JSON model
//! without the pixel data: it needs the same usable grant, checked but not
//! spent (docs/DICOM.md, "WADO-RS metadata").

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tessera_dicom::query::TagPair;

use super::multipart;
use super::web::{Caller, WebError, WebResult, WebState, header_str, with_type};
use crate::flows::dicom::get_move::GrantUse;

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
        .dicom_retrieve_with(&peer, "dicomweb:WADO-RS", &keys, request, GrantUse::Spend)
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

/// `/metadata`: the same instances as the retrieve of the same path,
/// rebuilt under the same grant (checked, not spent) and the same view
/// (identifying or de-identified), each answered as its data set in the
/// DICOM JSON model without the pixel data.
async fn metadata(
    st: &WebState,
    caller: &Caller,
    headers: &HeaderMap,
    keys: Vec<(TagPair, String)>,
) -> WebResult<Response> {
    let peer = st.peer(caller, ROUTE)?;
    let request = header_str(headers, REQUEST_HEADER).map(str::trim);
    let mut plan = st
        .service
        .dicom_retrieve_with(
            &peer,
            "dicomweb:WADO-RS/metadata",
            &keys,
            request,
            GrantUse::Check,
        )
        .await?;
    if plan.count == 0 {
        return Err(not_found(&keys));
    }
    let failed = |what: String| {
        WebError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metadata of an instance: {what}"),
        )
    };
    let mut all = Vec::with_capacity(plan.count);
    while let Some(file) = plan.files.recv().await {
        let bytes = file.map_err(failed)?;
        let one = tokio::task::spawn_blocking(move || tessera_dicom::json::metadata(&bytes))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        all.push(one);
    }
    if all.len() != plan.count {
        return Err(failed(format!(
            "{} of {} instances read",
            all.len(),
            plan.count
        )));
    }
    let body = serde_json::to_vec(&all).map_err(|e| failed(e.to_string()))?;
    tracing::info!(identity = %peer.identity, instances = all.len(), "WADO-RS metadata answered (grant checked, no use spent)");
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
    headers: HeaderMap,
) -> WebResult<Response> {
    metadata(&st, &c, &headers, vec![(STUDY, study)]).await
}

pub(crate) async fn series_metadata(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> WebResult<Response> {
    metadata(&st, &c, &headers, vec![(STUDY, study), (SERIES, series)]).await
}

pub(crate) async fn instance_metadata(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> WebResult<Response> {
    metadata(
        &st,
        &c,
        &headers,
        vec![(STUDY, study), (SERIES, series), (SOP, sop)],
    )
    .await
}
