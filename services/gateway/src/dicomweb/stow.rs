//! STOW-RS: `POST /studies` with `multipart/related;
//! type="application/dicom"`; each part stored exactly as StoreDicom and
//! C-STORE store it ([`GatewayService::store_dicom_file`]), for the caller
//! (or, with `X-Tessera-Owner`, for an owner who made the caller a
//! delegate). The body is bounded by `[dicomweb] max_request_bytes`:
//! refused with 413 from its Content-Length before it is read, or as soon
//! as it grows past the bound.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::multipart;
use super::web::{Caller, WebError, WebResult, WebState, header_str, with_type};
use crate::shared::with_vault;

/// The owner header (default: the caller).
pub const OWNER_HEADER: &str = "x-tessera-owner";

/// What happened to one part.
enum Outcome {
    Stored {
        class: String,
        sop: String,
    },
    /// `class` and `sop` as the part's file meta names them (empty when it
    /// has none).
    Failed {
        class: String,
        sop: String,
        status: u16,
        reason: String,
    },
}

/// Media Storage SOP Class UID and SOP Instance UID (0002,0002) and
/// (0002,0003) from a Part 10 file's meta group (always explicit VR little
/// endian), to name a part that could not be stored; `None` when the bytes
/// hold no readable meta group.
fn meta_uids(bytes: &[u8]) -> Option<(String, String)> {
    let mut at = match bytes.get(128..132) {
        Some(b"DICM") => 132,
        Some(_) | None => return None,
    };
    let (mut class, mut sop) = (None, None);
    while let Some(head) = bytes.get(at..at + 8) {
        let group = u16::from_le_bytes([head[0], head[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([head[2], head[3]]);
        let vr = &head[4..6];
        let (len, value_at) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            let l = bytes.get(at + 8..at + 12)?;
            (
                u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize,
                at + 12,
            )
        } else {
            (u16::from_le_bytes([head[6], head[7]]) as usize, at + 8)
        };
        let value = bytes.get(value_at..value_at.checked_add(len)?)?;
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match element {
            0x0002 => class = Some(text()),
            0x0003 => sop = Some(text()),
            _ => {}
        }
        at = value_at + len;
    }
    Some((class?, sop?))
}

/// The STOW-RS response data set (PS3.18 Table 10.5.3-1).
fn response(outcomes: &[Outcome]) -> Value {
    let mut stored = Vec::new();
    let mut failed = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Stored { class, sop } => stored.push(json!({
                "00081150": {"vr": "UI", "Value": [class]},
                "00081155": {"vr": "UI", "Value": [sop]},
            })),
            Outcome::Failed {
                class, sop, status, ..
            } => {
                let mut item = serde_json::Map::new();
                for (tag, uid) in [("00081150", class), ("00081155", sop)] {
                    item.insert(
                        tag.into(),
                        if uid.is_empty() {
                            json!({"vr": "UI"})
                        } else {
                            json!({"vr": "UI", "Value": [uid]})
                        },
                    );
                }
                item.insert("00081197".into(), json!({"vr": "US", "Value": [status]}));
                failed.push(Value::Object(item));
            }
        }
    }
    let mut ds = serde_json::Map::new();
    if !stored.is_empty() {
        ds.insert("00081199".into(), json!({"vr": "SQ", "Value": stored}));
    }
    if !failed.is_empty() {
        ds.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    Value::Object(ds)
}

/// 200 when every part was stored, 202 when some were, 409 when none.
fn status(outcomes: &[Outcome]) -> StatusCode {
    let failed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Failed { .. }))
        .count();
    if failed == 0 {
        StatusCode::OK
    } else if failed < outcomes.len() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CONFLICT
    }
}

pub(crate) async fn store(
    State(st): State<WebState>,
    axum::Extension(c): axum::Extension<Caller>,
    req: Request,
) -> WebResult<Response> {
    let peer = st.peer(&c, tessera_tls::matrix::STOW_RS)?;
    let max = st.max_request_bytes;
    let too_large = || {
        WebError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a STOW-RS request is at most {max} bytes (dicomweb.max_request_bytes)"),
        )
    };
    if let Some(len) = header_str(req.headers(), header::CONTENT_LENGTH.as_str())
        .and_then(|l| l.parse::<u64>().ok())
        && len > max
    {
        return Err(too_large());
    }
    let ctype = header_str(req.headers(), header::CONTENT_TYPE.as_str())
        .unwrap_or("")
        .to_owned();
    if multipart::parameter(&ctype, "type")
        .is_some_and(|t| !t.eq_ignore_ascii_case("application/dicom"))
    {
        return Err(WebError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {ctype:?}: only type=\"application/dicom\" parts are stored"),
        ));
    }
    let owner = header_str(req.headers(), OWNER_HEADER)
        .map(|o| o.trim().to_owned())
        .unwrap_or_else(|| peer.identity.clone());
    crate::convert::check_owner(OWNER_HEADER, &owner)?;
    st.service
        .require_store_for("StoreDicom", &peer.identity, &peer.roles, &owner)
        .await?;
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| too_large())?;
    let parts =
        multipart::parse(&ctype, &body).map_err(|m| WebError(StatusCode::BAD_REQUEST, m))?;
    let mut outcomes = Vec::with_capacity(parts.len());
    for part in parts {
        let mtype = multipart::media_type(&part.content_type);
        let (class, sop) = meta_uids(part.body).unwrap_or_default();
        if !mtype.is_empty() && mtype != "application/dicom" {
            outcomes.push(Outcome::Failed {
                class,
                sop,
                status: crate::scp::STATUS_CANNOT_UNDERSTAND,
                reason: format!("part of type {mtype:?}: application/dicom expected"),
            });
            continue;
        }
        let stored = match st.service.job_permit(part.body.len() as u64).await {
            Ok(_permit) => {
                st.service
                    .store_dicom_file(peer.identity.clone(), owner.clone(), part.body.to_vec())
                    .await
            }
            Err(e) => Err(e),
        };
        let outcome = match stored {
            Ok(r) => {
                let (study, id) = (r.study_handle.clone(), r.instance_id.clone());
                let rec = with_vault(&st.service.inner.vault, move |v| {
                    Ok(v.instances(&study)?
                        .into_iter()
                        .find(|i| i.instance_id == id))
                })
                .await?;
                let class = rec
                    .as_ref()
                    .and_then(|i| i.indexed.iter().find(|(t, _)| *t == (0x0008, 0x0016)))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let sop = rec.map(|i| i.sop_instance_uid).unwrap_or_default();
                tracing::info!(identity = %peer.identity, study = %r.study_handle, %sop, duplicate = r.duplicate, "STOW-RS stored");
                Outcome::Stored { class, sop }
            }
            Err(e) => {
                tracing::warn!(identity = %peer.identity, error = %e, "STOW-RS instance refused");
                Outcome::Failed {
                    class,
                    sop,
                    status: crate::scp::status_of(&e),
                    reason: e.to_string(),
                }
            }
        };
        outcomes.push(outcome);
    }
    if outcomes.is_empty() {
        return Err(WebError(
            StatusCode::BAD_REQUEST,
            "the request holds no instance".into(),
        ));
    }
    let reasons: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Outcome::Failed { reason, .. } => Some(format!("part {}: {reason}", i + 1)),
            Outcome::Stored { .. } => None,
        })
        .collect();
    let body = serde_json::to_vec(&response(&outcomes))
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut r = with_type(
        status(&outcomes),
        "application/dicom+json",
        Body::from(body),
    );
    if !reasons.is_empty() {
        // Warning (RFC 7234 §5.5): the reasons, readable next to the codes.
        let text = reasons.join("; ").replace(['"', '\r', '\n'], " ");
        if let Ok(v) = format!("299 tessera \"{text}\"").parse() {
            r.headers_mut().insert(header::WARNING, v);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use crate::dicomweb::stow::*;

    #[test]
    fn the_response_lists_stored_and_failed_instances() {
        let outcomes = [
            Outcome::Stored {
                class: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop: "1.2.3.4".into(),
            },
            Outcome::Failed {
                class: String::new(),
                sop: String::new(),
                status: 0xC000,
                reason: "not DICOM".into(),
            },
            Outcome::Failed {
                class: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop: "1.2.3.5".into(),
                status: 0x0124,
                reason: "not the owner".into(),
            },
        ];
        assert_eq!(status(&outcomes), StatusCode::ACCEPTED);
        assert_eq!(
            response(&outcomes),
            json!({
                "00081199": {"vr": "SQ", "Value": [{
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                }]},
                "00081198": {"vr": "SQ", "Value": [{
                    "00081150": {"vr": "UI"},
                    "00081155": {"vr": "UI"},
                    "00081197": {"vr": "US", "Value": [0xC000]},
                }, {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.5"]},
                    "00081197": {"vr": "US", "Value": [0x0124]},
                }]},
            })
        );
        assert_eq!(status(&outcomes[..1]), StatusCode::OK);
        assert_eq!(status(&outcomes[1..]), StatusCode::CONFLICT);
    }

    /// A Part 10 meta group: (0002,0001) OB, (0002,0002), (0002,0003).
    fn meta(class: &str, sop: &str) -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b.extend_from_slice(b"DICM");
        b.extend_from_slice(&[2, 0, 1, 0, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
        for (e, v) in [(2u8, class), (3u8, sop)] {
            let mut v = v.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(0);
            }
            b.extend_from_slice(&[2, 0, e, 0, b'U', b'I']);
            b.extend_from_slice(&(v.len() as u16).to_le_bytes());
            b.extend_from_slice(&v);
        }
        b.extend_from_slice(&[8, 0, 0x16, 0, b'U', b'I', 0, 0]);
        b
    }

    #[test]
    fn a_failed_part_is_named_by_its_meta_group() {
        assert_eq!(
            meta_uids(&meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3")),
            Some(("1.2.840.10008.5.1.4.1.1.2".into(), "1.2.3".into()))
        );
        assert_eq!(meta_uids(b"not dicom"), None);
        let cut = meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3");
        assert_eq!(meta_uids(&cut[..cut.len() - 14]), None);
    }
}
