//! DICOM through the gateway: `store-dicom` (files or directories of
//! `*.dcm`, one StoreDicom each) and `retrieve-dicom` (every instance of a
//! study written to a directory, byte-identical or de-identified as the
//! caller's role decides). Non-zero exit when any file is refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use gateway_service::client as gw;
use serde_json::{Value, json};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_tls::Channel;
use tonic::{Code, Status};

use super::gateway_cmd::gateway;
use super::owner_uri;
use super::{ConnArgs, OutputArgs, block_on, status_error};

#[derive(Args, Debug)]
pub struct StoreDicomArgs {
    /// DICOM Part 10 files, or directories (every *.dcm in one, sorted).
    #[arg(required = true, value_name = "FILE_OR_DIR")]
    pub paths: Vec<PathBuf>,
    /// The data owner who approves access: a name from the PKI or an
    /// identity URI.
    #[arg(long, default_value = "owner")]
    pub owner: String,
    /// Files in flight at once (default: two per core, 2..=16). With more
    /// than one, a study lists its instances in the order they were
    /// stored, which need not be the files' order: `--jobs 1` keeps it.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct RetrieveDicomArgs {
    /// The study handle (st-...).
    pub study: String,
    /// Your approved key request (one use retrieves the whole study).
    #[arg(long = "request", value_name = "ID")]
    pub request_id: String,
    /// Directory for the files (NNNN-<instance id>.dcm); created if needed,
    /// existing files are never overwritten.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The files named on the command line: plain files as given, directories
/// expanded to their `*.dcm` entries (case-insensitive), sorted by name.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()
                .with_context(|| format!("reading directory {}", p.display()))?
                .into_iter()
                .filter(|f| {
                    f.is_file() && f.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm"))
                })
                .collect();
            if found.is_empty() {
                bail!("{}: no *.dcm file in this directory", p.display());
            }
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(files)
}

/// A pixel handling in words.
pub fn pixel_words(v: i32) -> &'static str {
    match pb::PixelHandling::try_from(v) {
        Ok(pb::PixelHandling::Watermarked) => "watermarked shares",
        Ok(pb::PixelHandling::Sealed) => "sealed as stored",
        Ok(pb::PixelHandling::Unspecified) | Err(_) => "unspecified",
    }
}

fn pixel_name(v: i32) -> &'static str {
    match pb::PixelHandling::try_from(v) {
        Ok(pb::PixelHandling::Watermarked) => "watermarked",
        Ok(pb::PixelHandling::Sealed) => "sealed",
        Ok(pb::PixelHandling::Unspecified) | Err(_) => "unspecified",
    }
}

/// Largest file `store-dicom` reads (the gateway's own limit is lower).
const MAX_FILE_BYTES: u64 = 2 << 30;

/// What became of one file.
enum FileOutcome {
    Stored {
        r: pb::StoreDicomResponse,
        ms: f64,
    },
    Refused {
        why: String,
        /// The gateway's code, when it answered.
        code: Option<Code>,
    },
}

/// Reads `path` and stores it (bounded by `deadline`).
async fn store_one(
    mut client: GatewayClient<Channel>,
    owner: String,
    path: PathBuf,
    deadline: Duration,
) -> FileOutcome {
    let bytes = match tokio::fs::metadata(&path).await {
        Ok(m) if m.len() > MAX_FILE_BYTES => Err(anyhow!(
            "{} bytes, more than the 2 GiB a file may have",
            m.len()
        )),
        Ok(_) => tokio::fs::read(&path)
            .await
            .map_err(|e| anyhow!("reading: {e}")),
        Err(e) => Err(anyhow!("reading: {e}")),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => {
            return FileOutcome::Refused {
                why: e.to_string(),
                code: None,
            };
        }
    };
    let t = Instant::now();
    let r = match tokio::time::timeout(deadline, gw::store_dicom(&mut client, &owner, &bytes)).await
    {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {} s",
            deadline.as_secs()
        ))),
    };
    match r {
        Ok(r) => FileOutcome::Stored {
            r,
            ms: t.elapsed().as_secs_f64() * 1e3,
        },
        Err(s) => FileOutcome::Refused {
            why: status_error(&format!("store {}", path.display()), &s).to_string(),
            code: Some(s.code()),
        },
    }
}

/// `tessera store-dicom`: up to `--jobs` files in flight over one
/// connection; a line per stored file, one progress bar, the refused files
/// with their reasons at the end (and a non-zero exit).
pub fn store_dicom(a: StoreDicomArgs) -> Result<()> {
    let files = expand_paths(&a.paths)?;
    let owner = owner_uri(&a.owner);
    let jobs = a.jobs.unwrap_or_else(super::pipeline::default_jobs).max(1);
    block_on(async move {
        let client = gateway(&a.conn).await?;
        let deadline = Duration::from_secs(a.conn.timeout.max(1));
        let total = files.len();
        let width = total.to_string().len();
        let json = a.out.json;
        let bar = super::pipeline::files_bar(total, "store");
        let mut outcomes: Vec<Option<FileOutcome>> = Vec::with_capacity(total);
        outcomes.resize_with(total, || None);
        let not_sent = super::pipeline::in_flight(
            files.clone(),
            jobs,
            |_, path| store_one(client.clone(), owner.clone(), path, deadline),
            |i, outcome| {
                bar.inc(1);
                let go_on = match &outcome {
                    FileOutcome::Stored { r, ms } => {
                        super::pipeline::print_above(
                            &bar,
                            json,
                            &format!(
                                "[{:>width$}/{total}] {}: {} {} ({}, {}, {}; {} bytes, {ms:.0} ms)",
                                i + 1,
                                files[i].display(),
                                if r.duplicate {
                                    "duplicate of"
                                } else {
                                    "stored"
                                },
                                r.instance_id,
                                r.study_handle,
                                if r.new_study {
                                    "new study"
                                } else {
                                    "existing study"
                                },
                                pixel_words(r.pixels),
                                r.size
                            ),
                        );
                        true
                    }
                    FileOutcome::Refused { code, .. } => {
                        bar.set_message(format!("({} refused)", {
                            outcomes
                                .iter()
                                .flatten()
                                .filter(|o| matches!(o, FileOutcome::Refused { .. }))
                                .count()
                                + 1
                        }));
                        !code.is_some_and(super::pipeline::fatal)
                    }
                };
                outcomes[i] = Some(outcome);
                go_on
            },
        )
        .await;
        bar.finish_and_clear();
        let mut stored: Vec<Value> = Vec::new();
        let mut refused: Vec<(PathBuf, String)> = Vec::new();
        // Study handle -> (instances, new, duplicates), in file order.
        let mut studies: Vec<(String, usize, usize, usize)> = Vec::new();
        for (path, outcome) in files.iter().zip(outcomes) {
            match outcome {
                None => {}
                Some(FileOutcome::Refused { why, .. }) => refused.push((path.clone(), why)),
                Some(FileOutcome::Stored { r, .. }) => {
                    match studies.iter_mut().find(|s| s.0 == r.study_handle) {
                        Some(s) => {
                            s.1 += 1;
                            s.2 += usize::from(!r.duplicate);
                            s.3 += usize::from(r.duplicate);
                        }
                        None => studies.push((
                            r.study_handle.clone(),
                            1,
                            usize::from(!r.duplicate),
                            usize::from(r.duplicate),
                        )),
                    }
                    stored.push(json!({
                        "file": path,
                        "study": r.study_handle,
                        "instance": r.instance_id,
                        "new_study": r.new_study,
                        "duplicate": r.duplicate,
                        "pixels": pixel_name(r.pixels),
                        "transfer_syntax": r.transfer_syntax,
                        "bytes": r.size,
                        "sha256": hex::encode(&r.sha256),
                        "placements": r.placements.iter().map(|p| json!({
                            "share": p.share, "node": p.node, "object": p.object_id, "bytes": p.size,
                        })).collect::<Vec<_>>(),
                    }));
                }
            }
        }
        let value = json!({
            "owner": owner,
            "stored": stored,
            "refused": refused.iter().map(|(f, e)| json!({"file": f, "error": e})).collect::<Vec<_>>(),
            "studies": studies.iter().map(|(h, n, new, dup)| json!({
                "study": h, "instances": n, "new": new, "duplicates": dup,
            })).collect::<Vec<_>>(),
        });
        a.out.emit(&value, || {
            for (h, n, new, dup) in &studies {
                println!("study {h}: {n} instance(s) ({new} new, {dup} duplicate)");
            }
            let new: usize = studies.iter().map(|s| s.2).sum();
            println!(
                "{} of {total} file(s) accepted for {} ({new} new instance(s), {} duplicate(s))",
                stored.len(),
                super::short_identity(&owner),
                stored.len() - new
            );
        })?;
        if refused.is_empty() && not_sent == 0 {
            Ok(())
        } else {
            bail!(super::pipeline::refused_error(total, &refused, not_sent))
        }
    })
}

/// `in-` + 32 lowercase hex: the only instance ids used in file names.
fn safe_instance_id(id: &str) -> bool {
    id.len() == 35
        && id.starts_with("in-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file name of instance `index` (0-based).
pub fn instance_file_name(index: u32, instance_id: &str) -> String {
    format!("{:04}-{instance_id}.dcm", u64::from(index) + 1)
}

/// Writes `bytes` to a new file; never replaces an existing one, removes
/// its own partial file on failure.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let r = f.write_all(bytes).and_then(|()| f.sync_all());
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// `tessera retrieve-dicom`.
pub fn retrieve_dicom(a: RetrieveDicomArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    block_on(async move {
        let mut client = gateway(&a.conn).await?;
        let mut written: Vec<(pb::DicomInstanceHeader, PathBuf)> = Vec::new();
        let mut local_error: Option<anyhow::Error> = None;
        let json_mode = a.output.json;
        let r = gw::retrieve_dicom(&mut client, &a.study, &a.request_id, |h, bytes| {
            let fail = |e: anyhow::Error, local: &mut Option<anyhow::Error>| {
                let s = Status::cancelled(e.to_string());
                *local = Some(e);
                Err(s)
            };
            if !safe_instance_id(&h.instance_id) {
                return fail(
                    anyhow!(
                        "the gateway sent an unexpected instance id {:?}",
                        h.instance_id
                    ),
                    &mut local_error,
                );
            }
            let path = a.out.join(instance_file_name(h.index, &h.instance_id));
            if let Err(e) = write_new(&path, &bytes) {
                let e = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow!("{} exists; refusing to overwrite it", path.display())
                } else {
                    anyhow!("writing {}: {e}", path.display())
                };
                return fail(e, &mut local_error);
            }
            let line = format!(
                "[{}/{}] {} ({} bytes, {}{})",
                h.index + 1,
                h.count,
                path.display(),
                bytes.len(),
                pixel_words(h.pixels),
                if h.deidentified {
                    ", de-identified"
                } else {
                    ""
                }
            );
            if json_mode {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            written.push((h, path));
            Ok(())
        })
        .await;
        if let Err(s) = r {
            let e = local_error.unwrap_or_else(|| status_error("retrieve-dicom", &s));
            if written.is_empty() {
                return Err(e);
            }
            bail!(
                "{e:#} ({} instance(s) written to {} before this)",
                written.len(),
                a.out.display()
            );
        }
        let deidentified = written.iter().filter(|(h, _)| h.deidentified).count();
        let all_deid = deidentified == written.len() && !written.is_empty();
        // The identity is the study's: shown once, from the first instance.
        let patient: BTreeMap<String, String> = written
            .first()
            .map(|(h, _)| {
                h.patient_attributes
                    .iter()
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let value = json!({
            "study": a.study,
            "out": a.out,
            "count": written.len(),
            "deidentified": all_deid,
            "instances": written.iter().map(|(h, p)| json!({
                "index": h.index,
                "instance": h.instance_id,
                "file": p,
                "bytes": h.size,
                "sha256": hex::encode(&h.sha256),
                "transfer_syntax": h.transfer_syntax,
                "pixels": pixel_name(h.pixels),
                "deidentified": h.deidentified,
                "intact": h.report.as_ref().map(|r| r.intact),
            })).collect::<Vec<_>>(),
            "patient": patient,
        });
        a.output.emit(&value, || {
            let how = if all_deid {
                "de-identified (PS3.15 Basic Profile; identity not shown to your role)".to_owned()
            } else if deidentified == 0 {
                "byte-identical to the stored files".to_owned()
            } else {
                format!("{deidentified} de-identified")
            };
            println!(
                "retrieved {} instance(s) of {} -> {}: {how}",
                written.len(),
                a.study,
                a.out.display()
            );
            let watermarked: Vec<_> = written
                .iter()
                .filter_map(|(h, _)| h.report.as_ref())
                .collect();
            if !watermarked.is_empty() {
                println!(
                    "integrity: {} of {} watermarked instance(s) intact",
                    watermarked.iter().filter(|r| r.intact).count(),
                    watermarked.len()
                );
            }
            for (n, v) in &patient {
                println!("  {n} = {v}");
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_checked_and_numbered() {
        let id = format!("in-{}", "0a".repeat(16));
        assert!(safe_instance_id(&id));
        assert_eq!(instance_file_name(0, &id), format!("0001-{id}.dcm"));
        assert_eq!(instance_file_name(12_344, &id), format!("12345-{id}.dcm"));
        for bad in [
            "in-../../etc/passwd",
            "in-0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A",
            "in-0a",
            "",
            "st-0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
        ] {
            assert!(!safe_instance_id(bad), "{bad}");
        }
    }

    #[test]
    fn directories_expand_to_sorted_dcm_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["b.dcm", "a.DCM", "c.txt", "d.dcm"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        std::fs::create_dir(d.join("sub.dcm")).unwrap();
        let got = expand_paths(&[d.to_owned(), d.join("c.txt")]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.DCM", "b.dcm", "d.dcm", "c.txt"]);
        let empty = d.join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = expand_paths(&[empty]).unwrap_err().to_string();
        assert!(e.contains("no *.dcm"), "{e}");
        assert!(expand_paths(&[d.join("missing")]).is_err());
    }

    #[test]
    fn write_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.dcm");
        write_new(&f, b"one").unwrap();
        let e = write_new(&f, b"two").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
    }
}
