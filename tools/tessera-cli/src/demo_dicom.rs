//! `tessera demo --input FILE.dcm`: the suite demo's flows with a real DICOM
//! file instead of the built-in slice. The owner stores it over StoreDicom,
//! a clinician's request waits for the owner, the clinician gets the file
//! back byte for byte (SHA-256 checked), a researcher gets the
//! de-identified copy (the patient's name and ID gone, Patient Identity
//! Removed = YES, the pixels unchanged), the audit chain verifies and the
//! owner's delete removes every object. Each step is checked.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use dicom_core::header::Header;
use dicom_dictionary_std::tags;
use gateway_service::client as gw;
use sha2::{Digest, Sha256};
use tessera_devstack::DevStack;
use tessera_dicom::{Pixels, Subject};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tonic::Code;

use crate::client::dicom_cmd::pixel_words;
use crate::demo::Steps;
use crate::demo_kit::{
    OWNER, approve, approve_step, gateway, keyserver, object_nodes, storage_nodes,
};

/// Identifiers at least this long are searched for as bytes (and as
/// substrings of element values); shorter ones (a four-digit Patient ID
/// occurs in any megabyte of pixels, or inside "19000101", by chance) only
/// as whole element values.
const MIN_SEARCH_LEN: usize = 8;

/// Where the DICM magic sits in a Part 10 file.
const MAGIC_AT: usize = 128;

/// True when `bytes` is a DICOM Part 10 file (DICM after the preamble).
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(MAGIC_AT..MAGIC_AT + 4) == Some(b"DICM")
}

/// The demo's input file, read and parsed before the suite starts.
pub struct Input {
    path: PathBuf,
    bytes: Vec<u8>,
    subject: Subject,
    pixels: Pixels,
}

impl Input {
    /// Reads `path`; a clear error when it is not a DICOM file tessera
    /// reads.
    pub fn load(path: &Path) -> Result<Input> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if !is_dicom(&bytes) {
            bail!(
                "{}: not a DICOM Part 10 file (no DICM at byte 128); `tessera demo --input` takes a \
                 .dcm file. PNG/TIFF images go through `tessera store` (see `tessera demo` for the image flow)",
                path.display()
            );
        }
        let split = tessera_dicom::split_for_store(&bytes, &Default::default())
            .map_err(|e| anyhow!("{}: tessera cannot store this file: {e}", path.display()))?;
        Ok(Input {
            path: path.to_owned(),
            bytes,
            subject: split.subject,
            pixels: split.pixels,
        })
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The identifying strings searched for byte by byte: (what, value).
fn searchable(subject: &Subject) -> Vec<(&'static str, &str)> {
    [
        ("Patient Name", subject.patient_name.as_str()),
        ("Patient ID", subject.patient_id.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| v.len() >= MIN_SEARCH_LEN)
    .collect()
}

fn pixels_words(p: &Pixels) -> String {
    match p {
        Pixels::Native(img) => format!(
            "native {}x{}x{} {}-bit ({} stored), {} channel(s)",
            img.width(),
            img.height(),
            img.frames(),
            img.format().bits_allocated,
            img.format().bits_stored,
            img.channels()
        ),
        Pixels::Encapsulated(b) => format!("compressed, {} bytes as stored", b.len()),
        Pixels::Opaque { bytes, reason, .. } => {
            format!("native, kept as stored ({} bytes: {reason})", bytes.len())
        }
    }
}

/// A trimmed text element of a parsed file, `None` when absent.
fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_object::Tag) -> Option<String> {
    obj.element(tag).ok().and_then(|e| {
        e.to_str()
            .ok()
            .map(|v| v.trim_end_matches(['\0', ' ']).trim_start().to_owned())
    })
}

async fn retrieve_all(
    stack: &DevStack,
    who: &str,
    handle: &str,
    rid: &str,
) -> Result<Vec<(pb::DicomInstanceHeader, Vec<u8>)>, tonic::Status> {
    let mut client = gateway(stack, who)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut out = Vec::new();
    gw::retrieve_dicom(&mut client, handle, rid, |h, b| {
        out.push((h, b));
        Ok(())
    })
    .await?;
    Ok(out)
}

/// `who` asks for access to `handle`; returns the pending request.
async fn request(stack: &DevStack, who: &str, handle: &str, why: &str) -> Result<ks::KeyRequest> {
    gateway(stack, who)
        .await?
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.to_owned(),
            justification: why.to_owned(),
            ..Default::default()
        })
        .await
        .context("request access")?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request in the answer"))
}

/// The owner approves `rid` for one RetrieveDicom within an hour.
fn refused(r: &Result<Vec<(pb::DicomInstanceHeader, Vec<u8>)>, tonic::Status>) -> bool {
    matches!(r, Err(e) if e.code() == Code::PermissionDenied)
}

pub async fn flows(
    stack: &DevStack,
    input: &Input,
    out_dir: &Path,
    steps: &mut Steps,
) -> Result<()> {
    let out = |name: &str| out_dir.join(name);
    let subject = &input.subject;
    let sha = Sha256::digest(&input.bytes).to_vec();

    println!(
        "== 2. The owner stores {} over StoreDicom ({} bytes)",
        input.path.display(),
        input.bytes.len()
    );
    println!(
        "  modality {:?}, SOP class {}, pixels: {}",
        subject.modality,
        subject.sop_class_uid,
        pixels_words(&input.pixels)
    );
    let mut owner = gateway(stack, "owner").await?;
    let t = Instant::now();
    let stored = gw::store_dicom(&mut owner, OWNER, &input.bytes)
        .await
        .map_err(|s| crate::client::status_error("store-dicom", &s))?;
    let handle = stored.study_handle.clone();
    println!(
        "  study handle {handle}, instance {} in {:.0} ms ({}, {})",
        stored.instance_id,
        t.elapsed().as_secs_f64() * 1e3,
        pixel_words(stored.pixels),
        stored.transfer_syntax
    );
    for p in &stored.placements {
        let what = if p.share == 0 {
            "sealed metadata".to_owned()
        } else {
            format!("pixel share {}", p.share)
        };
        println!(
            "  {what} ({} bytes) -> {}",
            p.size,
            object_nodes(p).join(", ")
        );
    }
    steps.check(
        "a new study; the gateway's SHA-256 of the stored file equals the input's",
        stored.new_study && !stored.duplicate && stored.sha256 == sha,
    );
    steps.check(
        "metadata and pixel objects each spread as fragments over distinct storage nodes",
        !stored.placements.is_empty()
            && stored.placements.iter().all(|p| {
                let n = object_nodes(p);
                let distinct: std::collections::BTreeSet<_> = n.iter().collect();
                n.len() > 1 && distinct.len() == n.len()
            }),
    );
    let secrets = searchable(subject);
    if secrets.is_empty() {
        println!(
            "  (the file's Patient Name and Patient ID are empty or shorter than {MIN_SEARCH_LEN} characters: too short to search the storage nodes' bytes for)"
        );
    }
    let nodes = storage_nodes(stack);
    let mut clean = !nodes.is_empty();
    for node in &nodes {
        let db = stack
            .storage_db(node)
            .ok_or_else(|| anyhow!("{node}: no redb file"))?;
        let raw = std::fs::read(&db).with_context(|| format!("reading {}", db.display()))?;
        for (what, v) in &secrets {
            if contains(&raw, v) {
                println!("  {what} found in {}", db.display());
                clean = false;
            }
        }
    }
    steps.check(
        "no Patient Name / Patient ID in any storage node's redb file",
        clean,
    );
    let again = gw::store_dicom(&mut owner, OWNER, &input.bytes).await;
    steps.check(
        "the same file again is answered as a duplicate (nothing written)",
        matches!(&again, Ok(r) if r.duplicate && r.study_handle == handle && r.instance_id == stored.instance_id),
    );

    println!("== 3. A clinician asks for access; the request waits for the owner");
    let req = request(stack, "clinician", &handle, "tumour board follow-up").await?;
    println!("  request {} by {}: pending", req.request_id, req.requester);
    let listed = keyserver(stack, "owner")
        .await?
        .list_requests(ks::ListRequestsRequest {
            study_id: handle.clone(),
            include_decided: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .requests;
    steps.check(
        "the owner sees the pending request",
        listed
            .iter()
            .any(|r| r.request_id == req.request_id && r.state == ks::RequestState::Pending as i32),
    );
    let early = retrieve_all(stack, "clinician", &handle, &req.request_id).await;
    if let Err(e) = &early {
        println!(
            "  retrieve before approval: refused ({:?}: {})",
            e.code(),
            e.message()
        );
    }
    steps.check("retrieval before approval is refused", refused(&early));
    let outsider = retrieve_all(stack, "outsider", &handle, &req.request_id).await;
    steps.check("an identity without a role is refused", refused(&outsider));

    println!("== 4. The owner approves (1 hour, 1 use: one retrieve of the whole study)");
    approve_step(stack, &req.request_id, 1, steps).await?;

    println!("== 5. The clinician retrieves the study: the original file, byte for byte");
    let t = Instant::now();
    let got = retrieve_all(stack, "clinician", &handle, &req.request_id)
        .await
        .map_err(|s| crate::client::status_error("retrieve-dicom", &s))?;
    println!(
        "  {} instance(s) in {:.0} ms",
        got.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let clinician_ok = match got.as_slice() {
        [(h, bytes)] => {
            std::fs::write(out("clinician.dcm"), bytes)?;
            println!(
                "  wrote {} (SHA-256 {}), de-identified: {}",
                out("clinician.dcm").display(),
                hex::encode(Sha256::digest(bytes)),
                h.deidentified
            );
            if let Some(r) = &h.report {
                crate::report::Summary::from(r).print("  ");
            }
            for a in &h.patient_attributes {
                println!("  identity: {} = {}", a.name, a.value);
            }
            Some((Sha256::digest(bytes).to_vec() == sha, !h.deidentified))
        }
        _ => None,
    };
    steps.check(
        "SHA-256 of the retrieved file equals the input's (byte-identical)",
        clinician_ok.is_some_and(|(same, _)| same),
    );
    steps.check(
        "the clinician's role gets the original, not the de-identified copy",
        clinician_ok.is_some_and(|(_, original)| original),
    );
    let reuse = retrieve_all(stack, "clinician", &handle, &req.request_id).await;
    steps.check(
        "the grant is used up: a second retrieve is refused",
        refused(&reuse),
    );

    println!(
        "== 6. A researcher asks, the owner approves, the researcher retrieves: de-identified"
    );
    let rreq = request(stack, "researcher", &handle, "retrospective cohort").await?;
    approve(stack, &rreq.request_id, 1).await?;
    println!("  request {} approved", rreq.request_id);
    let got = retrieve_all(stack, "researcher", &handle, &rreq.request_id)
        .await
        .map_err(|s| crate::client::status_error("retrieve-dicom (researcher)", &s))?;
    match got.as_slice() {
        [(h, bytes)] => {
            std::fs::write(out("researcher.dcm"), bytes)?;
            println!(
                "  wrote {} ({} bytes), de-identified: {}",
                out("researcher.dcm").display(),
                bytes.len(),
                h.deidentified
            );
            steps.check(
                "marked de-identified, no identity attributes",
                h.deidentified && h.patient_attributes.is_empty(),
            );
            researcher_checks(input, bytes, steps);
        }
        other => {
            steps.check(
                &format!("one instance for the researcher (got {})", other.len()),
                false,
            );
        }
    }

    println!("== 7. The audit log at the keyserver");
    let audit = keyserver(stack, "owner")
        .await?
        .verify_audit(ks::VerifyAuditRequest {})
        .await?
        .into_inner();
    println!("  {} entries, chain ok = {}", audit.entries, audit.ok);
    steps.check("the audit chain verifies", audit.ok && audit.entries > 0);

    println!("== 8. The owner deletes the study: every object removed, key material destroyed");
    let d = owner
        .delete(pb::DeleteStudyRequest {
            study_handle: handle.clone(),
        })
        .await
        .context("delete")?
        .into_inner();
    println!(
        "  {} object(s) removed, key destroyed: {}",
        d.removed.len(),
        d.key_destroyed
    );
    let gone = retrieve_all(stack, "researcher", &handle, &rreq.request_id).await;
    steps.check(
        "after delete: every object removed, key destroyed, study not found",
        d.key_destroyed
            && d.removed.len() == stored.placements.len()
            && matches!(&gone, Err(e) if e.code() == Code::NotFound),
    );
    Ok(())
}

/// Opaque native words in little-endian byte order.
fn little_endian(bytes: &[u8], big_endian: bool, word_bytes: u8) -> Vec<u8> {
    let mut le = bytes.to_vec();
    let w = usize::from(word_bytes).max(1);
    if big_endian && w > 1 {
        for word in le.chunks_exact_mut(w) {
            word.reverse();
        }
    }
    le
}

/// The same pixel values: native samples equal, compressed bytes equal,
/// opaque words equal once in one byte order (a de-identified copy is
/// written little endian whatever the original's transfer syntax).
fn same_pixel_values(a: &Pixels, b: &Pixels) -> bool {
    match (a, b) {
        (Pixels::Native(x), Pixels::Native(y)) => x == y,
        (Pixels::Encapsulated(x), Pixels::Encapsulated(y)) => x == y,
        (
            Pixels::Opaque {
                bytes: xb,
                big_endian: xe,
                word_bytes: xw,
                ..
            },
            Pixels::Opaque {
                bytes: yb,
                big_endian: ye,
                word_bytes: yw,
                ..
            },
        ) => xw == yw && little_endian(xb, *xe, *xw) == little_endian(yb, *ye, *yw),
        (Pixels::Native(_) | Pixels::Encapsulated(_) | Pixels::Opaque { .. }, _) => false,
    }
}

/// The element values with text VRs of `obj` and its sequences, each
/// split at backslashes and trimmed: (tag, value).
fn text_values(obj: &dicom_object::InMemDicomObject, out: &mut Vec<(dicom_object::Tag, String)>) {
    const TEXT_VRS: [&str; 17] = [
        "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
        "UR", "UT",
    ];
    for e in obj.iter() {
        if let Some(items) = e.value().items() {
            for item in items {
                text_values(item, out);
            }
        } else if TEXT_VRS.contains(&e.vr().to_string())
            && let Ok(v) = e.to_str()
        {
            for part in v.split('\\') {
                out.push((
                    e.tag(),
                    part.trim_end_matches(['\0', ' ']).trim_start().to_owned(),
                ));
            }
        }
    }
}

/// The researcher's file: the patient's name and ID in no element value
/// (and, when long enough to be meaningful, nowhere in its bytes), Patient
/// Identity Removed = YES, the pixels as in the input.
fn researcher_checks(input: &Input, bytes: &[u8], steps: &mut Steps) {
    let subject = &input.subject;
    let parsed = bytes
        .get(MAGIC_AT..)
        .ok_or_else(|| anyhow!("shorter than the preamble"))
        .and_then(|b| {
            dicom_object::OpenFileOptions::new()
                .from_reader(b)
                .map_err(|e| anyhow!("{e}"))
        });
    let obj = match parsed {
        Ok(o) => o,
        Err(e) => {
            println!("  the de-identified file does not parse: {e}");
            steps.check("the de-identified file parses", false);
            return;
        }
    };
    let mut values = Vec::new();
    text_values(&obj, &mut values);
    let mut absent = true;
    for (what, tag, original) in [
        ("Patient Name", tags::PATIENT_NAME, &subject.patient_name),
        ("Patient ID", tags::PATIENT_ID, &subject.patient_id),
    ] {
        let now = text(&obj, tag).unwrap_or_default();
        if original.is_empty() {
            println!("  {what}: empty in the input; now {now:?}");
            continue;
        }
        let long = original.len() >= MIN_SEARCH_LEN;
        let hits: Vec<String> = values
            .iter()
            .filter(|(_, v)| {
                if long {
                    v.contains(original.as_str())
                } else {
                    v == original
                }
            })
            .map(|(t, _)| t.to_string())
            .collect();
        let in_bytes = long && contains(bytes, original);
        println!(
            "  {what}: {original:?} -> {now:?}; {}{}",
            if hits.is_empty() {
                "in no element value".to_owned()
            } else {
                format!("still in {}", hits.join(", "))
            },
            match (long, in_bytes) {
                (true, false) => ", nowhere in the file's bytes",
                (true, true) => ", STILL in the file's bytes",
                (false, _) => " (too short to search the bytes for)",
            }
        );
        absent &= hits.is_empty() && !in_bytes;
    }
    steps.check(
        "the original Patient Name and Patient ID are absent",
        absent,
    );
    let removed = text(&obj, tags::PATIENT_IDENTITY_REMOVED);
    println!(
        "  (0012,0062) Patient Identity Removed = {:?}; (0012,0063) method = {:?}",
        removed.as_deref().unwrap_or(""),
        text(&obj, tags::DEIDENTIFICATION_METHOD).unwrap_or_default()
    );
    steps.check(
        "(0012,0062) Patient Identity Removed = YES",
        removed.as_deref() == Some("YES"),
    );
    let same_pixels = tessera_dicom::split_for_store(bytes, &Default::default())
        .is_ok_and(|s| same_pixel_values(&s.pixels, &input.pixels));
    steps.check("the pixels are the original ones", same_pixels);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_and_non_dicom_inputs() {
        let mut f = vec![0u8; 132];
        assert!(!is_dicom(&f));
        f[128..].copy_from_slice(b"DICM");
        assert!(is_dicom(&f));
        assert!(!is_dicom(b"DICM"));
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("x.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n not really").unwrap();
        let e = Input::load(&png).err().unwrap().to_string();
        assert!(e.contains("not a DICOM Part 10 file"), "{e}");
        let half = dir.path().join("half.dcm");
        std::fs::write(&half, &f).unwrap();
        let e = Input::load(&half).err().unwrap().to_string();
        assert!(e.contains("cannot store this file"), "{e}");
    }

    #[test]
    fn opaque_pixels_compare_in_one_byte_order() {
        let opaque = |bytes: &[u8], big_endian| Pixels::Opaque {
            bytes: bytes.to_vec(),
            big_endian,
            word_bytes: 2,
            reason: "test".into(),
        };
        assert!(same_pixel_values(
            &opaque(&[1, 2, 3, 4], true),
            &opaque(&[2, 1, 4, 3], false)
        ));
        assert!(!same_pixel_values(
            &opaque(&[1, 2, 3, 4], true),
            &opaque(&[1, 2, 3, 4], false)
        ));
        assert!(!same_pixel_values(
            &opaque(&[1, 2], false),
            &Pixels::Encapsulated(vec![1, 2])
        ));
    }

    #[test]
    fn short_identifiers_are_not_searched_as_bytes() {
        let s = Subject {
            patient_name: "Doe^Jo".into(),
            patient_id: "P1".into(),
            ..Subject::default()
        };
        assert!(searchable(&s).is_empty());
        let s = Subject {
            patient_name: "Quixote^Alonso".into(),
            ..s
        };
        assert_eq!(searchable(&s), vec![("Patient Name", "Quixote^Alonso")]);
        assert!(!contains(b"abc", ""));
    }
}
