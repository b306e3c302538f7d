//! The query/retrieve rows of `tessera bench dicom`: one series of small CT
//! instances, copies of one real CT file given new UIDs at run time, sent
//! to the gateway's SCP over C-STORE, then fetched back over C-GET (our
//! SCU, the dev viewer AE `VIEWER` bound to the clinician) and over WADO-RS
//! (HTTPS with the clinician's certificate), every data set checked
//! byte-identical; each rate beside dicom-object parse + write of the same
//! files in the same run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use gateway_service::client as gw;
use gateway_service::dicomweb::multipart;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tessera_devstack::DevStack;
use tessera_dicom::Pixels;
use tessera_dicom::synth::{StudyInfo, ct_slice};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_scp::scu::get::GetRequest;
use tessera_scp::scu::{self, ScuOptions};
use tessera_scp::{QueryKey, StoreOutcome};
use tessera_tls::{ClientTls, Identity, TlsFiles};

use crate::bench_dicom_kit::{Row, cstore_ingest, parse_and_write};
use crate::bench_e2e::{bar, par_map, percentile};

/// Root of the series' UIDs: `.1` study, `.2` series, `.3.<n>` instances.
const ROOT: &str = "1.2.826.0.1.3680043.10.1137.318";
const PATIENT_ID: &str = "BENCH-QR-0300";
/// The dev AE title bound to the clinician (`tessera_devstack::DICOM_PEERS`).
const VIEWER_AE: &str = "VIEWER";

/// The series and what describes it.
pub(crate) struct QrSeries {
    /// What to print.
    pub source: String,
    pub files: Vec<Vec<u8>>,
    sop_class: String,
    transfer_syntax: String,
}

/// End of the file meta group of a Part 10 file (preamble, `DICM`, group
/// length first, as dicom-object and the SCP write them).
fn meta_end(f: &[u8]) -> Result<usize> {
    let group = f
        .get(140..144)
        .filter(|_| f.get(128..132) == Some(b"DICM"))
        .ok_or_else(|| anyhow!("not a Part 10 file"))?;
    let end = 144 + u32::from_le_bytes([group[0], group[1], group[2], group[3]]) as usize;
    if end > f.len() {
        bail!("file meta group past the end");
    }
    Ok(end)
}

fn dataset(f: &[u8]) -> Result<&[u8]> {
    Ok(&f[meta_end(f)?..])
}

/// pydicom's `CT_small.dcm` (39 KB; pydicom sits beside pydicom-data in
/// the same site-packages), else the smallest CT with native pixels in
/// `$TESSERA_DICOM_DATA`.
fn find_template(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let dir = PathBuf::from(std::env::var_os("TESSERA_DICOM_DATA")?);
    for p in [
        dir.join("CT_small.dcm"),
        dir.join("../../pydicom/data/test_files/CT_small.dcm"),
    ] {
        if p.is_file() {
            return Some(p);
        }
    }
    let mut paths: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
        .filter(|(_, p)| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm")))
        .collect();
    paths.sort();
    paths.into_iter().map(|(_, p)| p).find(|p| {
        std::fs::read(p).ok().is_some_and(|b| {
            tessera_dicom::split_for_store(&b, &Default::default())
                .is_ok_and(|s| s.subject.modality == "CT" && matches!(s.pixels, Pixels::Native(_)))
        })
    })
}

/// `template` with the series' UIDs for instance `i` (data set and file
/// meta), written back by dicom-object.
fn with_uids(template: &[u8], i: usize) -> Result<Vec<u8>> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .from_reader(
            template
                .get(128..)
                .ok_or_else(|| anyhow!("shorter than the preamble"))?,
        )
        .map_err(|e| anyhow!("dicom-object parse: {e}"))?;
    let sop = format!("{ROOT}.3.{}", i + 1);
    let ui = |tag, v: String| DataElement::new(tag, VR::UI, PrimitiveValue::from(v));
    obj.put(ui(tags::STUDY_INSTANCE_UID, format!("{ROOT}.1")));
    obj.put(ui(tags::SERIES_INSTANCE_UID, format!("{ROOT}.2")));
    obj.put(ui(tags::SOP_INSTANCE_UID, sop.clone()));
    obj.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from(PATIENT_ID),
    ));
    obj.update_meta(|m| {
        m.media_storage_sop_instance_uid = sop;
        m.update_information_group_length();
    });
    let mut out = Vec::with_capacity(template.len() + 64);
    obj.write_all(&mut out)
        .map_err(|e| anyhow!("dicom-object write: {e}"))?;
    Ok(out)
}

impl QrSeries {
    /// `n` instances from `explicit` or [`find_template`], else (no
    /// pydicom-data) synthetic 64x64 CT slices.
    pub(crate) fn make(n: usize, explicit: Option<&Path>) -> Result<QrSeries> {
        let (source, files) = match find_template(explicit) {
            Some(path) => {
                let template =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
                let idx: Vec<usize> = (0..n).collect();
                let files = par_map(&idx, threads, |&i| with_uids(&template, i))?;
                let source = format!(
                    "{} ({} bytes), new UIDs per copy",
                    path.display(),
                    template.len()
                );
                (source, files)
            }
            None => {
                let info = StudyInfo {
                    patient_name: "Bench^Qr".into(),
                    patient_id: PATIENT_ID.into(),
                    patient_birth_date: "19600101".into(),
                    study_date: "20260401".into(),
                    institution: "Tessera Bench Hospital".into(),
                    uid_root: ROOT.into(),
                };
                let files = (0..n)
                    .map(|i| {
                        let px: Vec<u16> = (0..64 * 64u32)
                            .map(|p| ((p * 7 + i as u32 * 131) % 4096) as u16)
                            .collect();
                        Ok(ct_slice(&info, i as u32, 64, 64, &px)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let source = "synthetic 64x64 CT slices (TESSERA_DICOM_DATA unset or without a native CT; pass --qr-file)".to_owned();
                (source, files)
            }
        };
        let first = files.first().ok_or_else(|| anyhow!("no instance"))?;
        let obj = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .from_reader(&first[128..])
            .map_err(|e| anyhow!("dicom-object parse: {e}"))?;
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
        Ok(QrSeries {
            source,
            sop_class: trim(obj.meta().media_storage_sop_class_uid()),
            transfer_syntax: trim(obj.meta().transfer_syntax()),
            files,
        })
    }

    fn study_uid() -> String {
        format!("{ROOT}.1")
    }
}

/// Baseline, C-STORE, C-GET and WADO-RS of `series`, in that order.
pub(crate) async fn rows(stack: &DevStack, series: &QrSeries) -> Result<Vec<Row>> {
    let n = series.files.len();
    let bytes: u64 = series.files.iter().map(|f| f.len() as u64).sum();
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let t = Instant::now();
    par_map(&series.files, threads, |f| parse_and_write(f))?;
    let baseline = Row {
        name: format!("dicom-object parse + write, {threads} threads (baseline)"),
        n,
        bytes,
        wall: t.elapsed(),
        lat: Vec::new(),
    };
    let mut cstore = cstore_ingest(stack, &series.files, 1).await?;
    cstore.name = "C-STORE (tessera SCU), one association".into();
    let expected: HashMap<String, &[u8]> = series
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| Ok((format!("{ROOT}.3.{}", i + 1), dataset(f)?)))
        .collect::<Result<_>>()?;

    // The clinician's grant on the study (two uses: C-GET, WADO-RS).
    let pki = stack.pki_dir();
    let tls = |who: &str, service: &str| -> Result<ClientTls> {
        let expected = Identity::parse_uri(&tessera_devstack::service_identity(service))?;
        Ok(ClientTls::from_files(&TlsFiles::from_pki_dir(&pki, who))?.expecting(&expected))
    };
    let addr = |service: &str| -> Result<String> {
        Ok(stack
            .endpoints()
            .get(service)
            .map_err(|e| anyhow!("the suite has no {service} endpoint: {e}"))?
            .to_owned())
    };
    let mut clin = gw::client(
        tls("clinician", "gateway")?
            .connect(&addr("gateway")?)
            .await?,
    );
    let handle = clin
        .find_dicom_study(pb::FindDicomStudyRequest {
            owner: tessera_devstack::DICOM_OWNER.into(),
            patient_id: PATIENT_ID.into(),
            study_instance_uid: QrSeries::study_uid(),
        })
        .await
        .map_err(|s| anyhow!("FindDicomStudy: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .study_handle;
    let req = clin
        .request_access(pb::RequestAccessRequest {
            study_handle: handle,
            justification: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request"))?;
    KeyServerClient::new(
        tls("owner", "keyserver")?
            .connect(&addr("keyserver")?)
            .await?,
    )
    .approve_request(ks::ApproveRequestRequest {
        request_id: req.request_id.clone(),
        ttl_seconds: 3600,
        uses: 2,
    })
    .await?;

    let cget = c_get(&addr("dicom")?, series, &expected, bytes).await?;
    let wado = wado_rs(
        &tls("clinician", "gateway")?,
        &addr("dicomweb")?,
        &req.request_id,
        &expected,
        bytes,
    )
    .await?;
    Ok(vec![baseline, cstore, cget, wado])
}

async fn c_get(
    addr: &str,
    series: &QrSeries,
    expected: &HashMap<String, &[u8]>,
    bytes: u64,
) -> Result<Row> {
    let opts = ScuOptions {
        calling_ae: VIEWER_AE.into(),
        called_ae: tessera_devstack::DICOM_AE_TITLE.into(),
        max_pdu_length: 1 << 20,
        ..ScuOptions::default()
    };
    let request = GetRequest {
        level: "STUDY".into(),
        keys: vec![QueryKey {
            tag: (0x0020, 0x000D),
            value: QrSeries::study_uid(),
        }],
        storage_contexts: vec![(series.sop_class.clone(), series.transfer_syntax.clone())],
        max_instance_bytes: 64 << 20,
    };
    let n = expected.len();
    let pbar = bar(n, "c-get");
    let (mut lat, mut bad) = (Vec::with_capacity(n), 0usize);
    let t = Instant::now();
    let mut last = Instant::now();
    let out = scu::get::get(addr, &opts, &request, |r| {
        lat.push(last.elapsed());
        last = Instant::now();
        pbar.inc(1);
        if expected.get(&r.sop_instance_uid).copied() != Some(r.dataset()) {
            bad += 1;
        }
        StoreOutcome::Stored
    })
    .await
    .map_err(|e| anyhow!("C-GET: {e}"))?;
    let wall = t.elapsed();
    pbar.finish_and_clear();
    if out.status != 0 || out.received != n || bad > 0 {
        bail!(
            "C-GET: status {:#06x} ({}), {} of {n} instances, {bad} not byte-identical",
            out.status,
            out.error_comment.unwrap_or_default(),
            out.received
        );
    }
    Ok(Row {
        name: "C-GET (tessera SCU), one association (byte-identical checked)".into(),
        n,
        bytes,
        wall,
        lat,
    })
}

async fn wado_rs(
    tls: &ClientTls,
    addr: &str,
    request_id: &str,
    expected: &HashMap<String, &[u8]>,
    bytes: u64,
) -> Result<Row> {
    let n = expected.len();
    let t = Instant::now();
    let stream = tls
        .connect_http1(addr)
        .await
        .map_err(|e| anyhow!("DICOMweb {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    let driver = tokio::spawn(conn);
    let uri = format!("/studies/{}", QrSeries::study_uid());
    let rq = hyper::Request::get(uri.as_str())
        .header(hyper::header::HOST, addr)
        .header(
            hyper::header::ACCEPT,
            "multipart/related; type=\"application/dicom\"",
        )
        .header("x-tessera-request", request_id)
        .body(Empty::<Bytes>::new())?;
    let rsp = sender.send_request(rq).await.context("WADO-RS request")?;
    let status = rsp.status();
    let ctype = rsp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = rsp
        .into_body()
        .collect()
        .await
        .context("WADO-RS body")?
        .to_bytes();
    let wall = t.elapsed();
    drop(sender);
    driver.abort();
    if !status.is_success() {
        bail!(
            "WADO-RS {uri}: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    let parts = multipart::parse(&ctype, &body).map_err(|e| anyhow!("WADO-RS answer: {e}"))?;
    let mut seen = std::collections::HashSet::new();
    for p in &parts {
        let obj = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .from_reader(p.body.get(128..).unwrap_or_default())
            .map_err(|e| anyhow!("WADO-RS part: {e}"))?;
        let uid = obj
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches(['\0', ' '])
            .to_owned();
        if expected.get(&uid).copied() != Some(dataset(p.body)?) {
            bail!("WADO-RS: instance {uid} is not byte-identical to what was sent");
        }
        seen.insert(uid);
    }
    if seen.len() != n {
        bail!("WADO-RS gave {} distinct instances of {n}", seen.len());
    }
    Ok(Row {
        name: "WADO-RS, whole study, one request (byte-identical checked)".into(),
        n,
        bytes,
        wall,
        lat: Vec::new(),
    })
}

/// The rows as a table, each with its ratio to the first (the baseline).
pub(crate) fn print(rows: &[Row]) {
    let Some(base) = rows.first().map(Row::rate) else {
        return;
    };
    println!(
        "| query/retrieve | instances | instances/s | MB/s | p50 ms | p95 ms | ratio to local parse+write |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let mut lat = r.lat.clone();
        lat.sort();
        let (p50, p95) = if lat.is_empty() {
            (String::new(), String::new())
        } else {
            (
                format!("{:.1}", percentile(&lat, 0.5)),
                format!("{:.1}", percentile(&lat, 0.95)),
            )
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {p50} | {p95} | {:.3} |",
            r.name,
            r.n,
            r.rate(),
            r.bytes as f64 / r.wall.as_secs_f64().max(1e-9) / 1e6,
            r.rate() / base
        );
    }
}
