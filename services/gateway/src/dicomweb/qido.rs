//! QIDO-RS: searches answered by the DIMSE C-FIND code
//! ([`GatewayService::dicom_find`]): the same keys, wildcard and range
//! matching, visibility and de-identified view; the answer in the DICOM
//! JSON model, paged with `limit` and `offset`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::Response;
use tessera_dicom::query::TagPair;

use super::json;
use super::web::{Caller, WebError, WebResult, WebState, query_params, with_type};
use crate::flows::dicom::query::vr_of;

/// Query keywords the index knows, with their tags.
const KEYWORDS: &[(&str, TagPair)] = &[
    ("PatientName", (0x0010, 0x0010)),
    ("PatientID", (0x0010, 0x0020)),
    ("PatientBirthDate", (0x0010, 0x0030)),
    ("PatientSex", (0x0010, 0x0040)),
    ("StudyInstanceUID", (0x0020, 0x000D)),
    ("StudyDate", (0x0008, 0x0020)),
    ("StudyTime", (0x0008, 0x0030)),
    ("AccessionNumber", (0x0008, 0x0050)),
    ("StudyID", (0x0020, 0x0010)),
    ("StudyDescription", (0x0008, 0x1030)),
    ("ReferringPhysicianName", (0x0008, 0x0090)),
    ("ModalitiesInStudy", (0x0008, 0x0061)),
    ("NumberOfStudyRelatedSeries", (0x0020, 0x1206)),
    ("NumberOfStudyRelatedInstances", (0x0020, 0x1208)),
    ("SeriesInstanceUID", (0x0020, 0x000E)),
    ("Modality", (0x0008, 0x0060)),
    ("SeriesNumber", (0x0020, 0x0011)),
    ("SeriesDescription", (0x0008, 0x103E)),
    ("SeriesDate", (0x0008, 0x0021)),
    ("NumberOfSeriesRelatedInstances", (0x0020, 0x1209)),
    ("SOPInstanceUID", (0x0008, 0x0018)),
    ("SOPClassUID", (0x0008, 0x0016)),
    ("InstanceNumber", (0x0020, 0x0013)),
];

/// The attributes answered at each level by default (PS3.18 Table
/// 6.7.1-2, as far as the index keeps them).
const STUDY_FIELDS: &[&str] = &[
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
];
const SERIES_FIELDS: &[&str] = &[
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "NumberOfSeriesRelatedInstances",
];
const INSTANCE_FIELDS: &[&str] = &["SOPClassUID", "SOPInstanceUID", "InstanceNumber"];

/// A keyword or `ggggeeee` tag.
pub(crate) fn tag_of(name: &str) -> Option<TagPair> {
    if let Some((_, t)) = KEYWORDS.iter().find(|(k, _)| *k == name) {
        return Some(*t);
    }
    if name.len() == 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let g = u16::from_str_radix(&name[..4], 16).ok()?;
        let e = u16::from_str_radix(&name[4..], 16).ok()?;
        return Some((g, e));
    }
    None
}

/// A parsed search: matching keys, return keys, paging.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Search {
    /// Every key sent to C-FIND (return keys with an empty value).
    pub(crate) keys: Vec<(TagPair, String)>,
    pub(crate) limit: Option<usize>,
    pub(crate) offset: usize,
}

/// Builds a search at `level` (STUDY, SERIES, IMAGE) from the query
/// parameters and the UIDs of the path.
pub(crate) fn search(
    level: &str,
    params: &[(String, String)],
    path: &[(TagPair, String)],
) -> Result<Search, String> {
    let mut keys: Vec<(TagPair, String)> = Vec::new();
    let mut set = |tag: TagPair, value: String| {
        if let Some(k) = keys.iter_mut().find(|(t, _)| *t == tag) {
            if !value.is_empty() {
                k.1 = value;
            }
        } else {
            keys.push((tag, value));
        }
    };
    let mut fields: Vec<&str> = STUDY_FIELDS.to_vec();
    if level != "STUDY" {
        fields.extend(SERIES_FIELDS);
    }
    if level == "IMAGE" {
        fields.extend(INSTANCE_FIELDS);
    }
    for f in fields {
        if let Some(t) = tag_of(f) {
            set(t, String::new());
        }
    }
    let (mut limit, mut offset) = (None, 0);
    for (name, value) in params {
        match name.as_str() {
            "limit" => {
                limit = Some(
                    value
                        .parse()
                        .map_err(|_| format!("limit={value:?}: a count"))?,
                )
            }
            "offset" => {
                offset = value
                    .parse()
                    .map_err(|_| format!("offset={value:?}: a count"))?
            }
            "includefield" => {
                for f in value.split(',').filter(|f| !f.is_empty() && *f != "all") {
                    let t = tag_of(f)
                        .ok_or_else(|| format!("includefield: unknown attribute {f:?}"))?;
                    set(t, String::new());
                }
            }
            "fuzzymatching" => {}
            other => {
                let t = tag_of(other).ok_or_else(|| {
                    format!("unknown query key {other:?} (a keyword or ggggeeee)")
                })?;
                set(t, value.clone());
            }
        }
    }
    for (t, v) in path {
        set(*t, v.clone());
    }
    Ok(Search {
        keys,
        limit,
        offset,
    })
}

async fn answer(
    st: &WebState,
    caller: &Caller,
    level: &str,
    path: &[(TagPair, String)],
    req: &Uri,
) -> WebResult<Response> {
    let peer = st.peer(caller, tessera_tls::matrix::QIDO_RS)?;
    let s = search(level, &query_params(req), path)
        .map_err(|m| WebError(StatusCode::BAD_REQUEST, m))?;
    let found = st.service.dicom_find(&peer, level, &s.keys).await?;
    let page: Vec<serde_json::Value> = found
        .iter()
        .skip(s.offset)
        .take(s.limit.unwrap_or(usize::MAX))
        .map(|a| json::dataset(a, vr_of))
        .collect();
    tracing::info!(identity = %peer.identity, level, answers = page.len(), "QIDO-RS answered");
    let body = serde_json::to_vec(&page)
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(with_type(
        StatusCode::OK,
        "application/dicom+json",
        Body::from(body),
    ))
}

const STUDY: TagPair = (0x0020, 0x000D);
const SERIES: TagPair = (0x0020, 0x000E);

pub(crate) async fn studies(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "STUDY", &[], &req).await
}

pub(crate) async fn all_series(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "SERIES", &[], &req).await
}

pub(crate) async fn all_instances(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "IMAGE", &[], &req).await
}

pub(crate) async fn study_series(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(study): Path<String>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "SERIES", &[(STUDY, study)], &req).await
}

pub(crate) async fn study_instances(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path(study): Path<String>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "IMAGE", &[(STUDY, study)], &req).await
}

pub(crate) async fn series_instances(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    Path((study, series)): Path<(String, String)>,
    req: Uri,
) -> WebResult<Response> {
    answer(&st, &c, "IMAGE", &[(STUDY, study), (SERIES, series)], &req).await
}

#[cfg(test)]
mod tests {
    use crate::dicomweb::qido::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn a_search_sends_matching_and_return_keys() {
        let s = search(
            "SERIES",
            &[
                p("PatientName", "DOE*"),
                p("StudyDate", "20200101-20201231"),
                p("00080060", "CT"),
                p("includefield", "SeriesDate,InstanceNumber"),
                p("limit", "5"),
                p("offset", "2"),
            ],
            &[(STUDY, "1.2.3".into())],
        )
        .unwrap();
        assert_eq!((s.limit, s.offset), (Some(5), 2));
        let get = |t: TagPair| {
            s.keys
                .iter()
                .find(|(k, _)| *k == t)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get((0x0010, 0x0010)), Some("DOE*"));
        assert_eq!(get((0x0008, 0x0020)), Some("20200101-20201231"));
        assert_eq!(get((0x0008, 0x0060)), Some("CT"));
        assert_eq!(get(STUDY), Some("1.2.3"));
        assert_eq!(get(SERIES), Some(""), "series level returns its UID");
        assert_eq!(
            get((0x0020, 0x0013)),
            Some(""),
            "includefield adds a return key"
        );
        let tags: std::collections::BTreeSet<_> = s.keys.iter().map(|(t, _)| *t).collect();
        assert_eq!(tags.len(), s.keys.len(), "each key once");
    }

    #[test]
    fn refuses_unknown_keys_and_bad_paging() {
        assert!(search("STUDY", &[p("NoSuchKeyword", "x")], &[]).is_err());
        assert!(search("STUDY", &[p("limit", "-1")], &[]).is_err());
        assert!(search("STUDY", &[p("includefield", "Nope")], &[]).is_err());
        let s = search("STUDY", &[], &[]).unwrap();
        assert!(
            !s.keys.iter().any(|(t, _)| *t == SERIES),
            "study level: no series keys"
        );
    }
}
