//! Gateway subcommands: `store`, `request-key`, `retrieve` (through the
//! gateway, or `--local`: shares and key fetched by the user and restored
//! on this machine), `verify`, `process`, `delete`. Progress bars on
//! transfers; non-zero exit on any failure, including a study that does not
//! verify intact.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use gateway_service::client as gw;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tessera_image::{Image, ImageSpec, Rect, codec};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as kpb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::Channel;

use super::{ConnArgs, OutputArgs, Service, block_on, owner_uri, status_error};

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// The image: .png, .tif/.tiff, or raw little-endian words with --raw;
    /// several files are several studies (the same attributes), stored
    /// `--jobs` at a time.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Files in flight at once when several are given (default: two per
    /// core, 2..=16).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// The data owner who approves access: a name from the PKI (owner) or
    /// an identity URI.
    #[arg(long)]
    pub owner: String,
    /// Patient attribute NAME=VALUE (repeat); stays in the trusted zone.
    #[arg(long = "attr", value_name = "NAME=VALUE", required = true)]
    pub attrs: Vec<String>,
    /// Region of interest X,Y,WIDTH,HEIGHT (x, y of its top-left corner).
    #[arg(long, value_name = "X,Y,W,H")]
    pub roi: Option<String>,
    /// Raw little-endian words of WIDTHxHEIGHT, e.g. `--raw 512x512 --bits
    /// 16 --stored 12` (`--raw 512,512,16,12` is read alike).
    #[arg(long, value_name = "WxH")]
    pub raw: Option<String>,
    #[command(flatten)]
    pub layout: crate::image_cmd::RawLayout,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct RequestKeyArgs {
    /// The study handle (st-...).
    pub study: String,
    /// Why you need it (the owner sees it).
    #[arg(long, default_value = "")]
    pub why: String,
    /// Access purpose (treatment, research, ...; default: the keyserver's).
    /// A standing approval of the owner for it approves at once.
    #[arg(long, default_value = "")]
    pub purpose: String,
    /// Emergency access now (break-glass), with this written reason; needs
    /// the `emergency` permission; the owner is told and reviews it.
    #[arg(long, value_name = "REASON")]
    pub break_glass: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct RetrieveArgs {
    /// The study handle (st-...).
    pub study: String,
    /// Your approved key request; each retrieve (and each --local one)
    /// spends one of its uses.
    #[arg(long = "request", value_name = "ID")]
    pub request_id: String,
    /// Output: .png (one frame) or anything else for raw little-endian words.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Fetch the shares' ciphertext (relayed by the gateway) and the key
    /// from the keyserver and restore on this machine.
    #[arg(long)]
    pub local: bool,
    /// Write a tamper map PNG when the study does not verify intact. The
    /// gateway then sends the tampered pixels (one grant use is spent);
    /// the image itself is still not written.
    #[arg(long, value_name = "PNG")]
    pub map: Option<PathBuf>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The study handle (st-...).
    pub study: String,
    /// Your approved key request on the study (needed unless you own the
    /// study or are a delegate of its owner; not spent).
    #[arg(long = "request", value_name = "ID", default_value = "")]
    pub request_id: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ProcessArgs {
    /// The study handle (st-...).
    pub study: String,
    /// Your approved key request: processing spends one of its uses, like
    /// a retrieve.
    #[arg(long = "request", value_name = "ID")]
    pub request_id: String,
    /// gaussian, median, unsharp, sobel or histeq.
    #[arg(long, default_value = "gaussian")]
    pub op: String,
    /// Segmentation block edge.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output: .png (one frame) or raw little-endian words.
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The study handle (st-...).
    pub study: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub(crate) async fn gateway(conn: &ConnArgs) -> Result<GatewayClient<Channel>> {
    Ok(gw::client(conn.channel(Service::Gateway).await?))
}

fn transfer_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>10} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

fn numbers(field: &str, text: &str, min: usize, max: usize) -> Result<Vec<u32>> {
    let v = text
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow!("--{field} {text:?}: expected comma-separated numbers"))?;
    if !(min..=max).contains(&v.len()) {
        bail!("--{field} {text:?}: expected {min}..={max} numbers");
    }
    Ok(v)
}

fn spec_to_core(s: &wpb::ImageSpec) -> Result<ImageSpec> {
    tessera_wire::convert::watermark::spec_from_proto("spec", *s)
        .map_err(|e| anyhow!("the gateway sent a bad spec: {e}"))
}

/// Writes pixels as PNG (by extension) or raw words.
fn write_image(path: &Path, spec: ImageSpec, pixels: &[u8]) -> Result<()> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        let img = Image::from_le_bytes(spec, pixels)?;
        if img.frames() > 1 {
            bail!(
                "{} has {} frames; PNG holds one: write raw (another extension) instead",
                path.display(),
                img.frames()
            );
        }
        std::fs::write(path, codec::encode_png(&img, 0)?)
    } else {
        std::fs::write(path, pixels)
    }
    .with_context(|| format!("writing {}", path.display()))
}

fn report_json(r: &wpb::VerificationReport) -> Value {
    json!({
        "intact": r.intact,
        "roi_blocks": r.roi_blocks,
        "tiles": r.tiles,
        "tampered_block_count": r.tampered_block_count,
        "tampered_tile_count": r.tampered_tile_count,
        "tampered_blocks": r.tampered_blocks.iter().map(|b| {
            let rc = b.rect.unwrap_or_default();
            json!({"index": b.index, "frame": b.frame, "x": rc.x, "y": rc.y, "width": rc.width, "height": rc.height})
        }).collect::<Vec<_>>(),
        "tampered_tiles": r.tampered_tiles.iter().map(|t| {
            let rc = t.rect.unwrap_or_default();
            json!({"index": t.index, "frame": t.frame, "x": rc.x, "y": rc.y, "width": rc.width, "height": rc.height, "shares": t.shares})
        }).collect::<Vec<_>>(),
    })
}

/// The report in the one format of every command (see `crate::report`).
pub fn print_report(r: &wpb::VerificationReport, indent: &str) {
    crate::report::Summary::from(r).print(indent);
}

/// `tessera store`.
pub fn store(a: StoreArgs) -> Result<()> {
    let mut attributes = Vec::new();
    for kv in &a.attrs {
        let (n, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--attr {kv:?}: expected NAME=VALUE"))?;
        attributes.push(kpb::Attribute {
            name: n.trim().to_owned(),
            value: v.to_owned(),
        });
    }
    let roi = match &a.roi {
        Some(r) => {
            let v = numbers("roi", r, 4, 4)?;
            Some(wpb::Rect {
                x: v[0],
                y: v[1],
                width: v[2],
                height: v[3],
            })
        }
        None => None,
    };
    let raw_spec = match &a.raw {
        Some(r) => Some(tessera_wire::convert::watermark::spec_to_proto(
            &crate::image_cmd::raw_spec(r, &a.layout)?,
        )),
        None => None,
    };
    let header = |file: &Path| -> Result<pb::StoreHeader> {
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let format = match (&raw_spec, ext.as_str()) {
            (Some(_), _) => pb::ImageFormat::Raw,
            (None, "png") => pb::ImageFormat::Png,
            (None, "tif" | "tiff") => pb::ImageFormat::Tiff,
            (None, _) => bail!(
                "{}: give a .png or .tiff file, or raw pixels with --raw WxH --bits BITS --stored BITS",
                file.display()
            ),
        };
        Ok(pb::StoreHeader {
            owner: owner_uri(&a.owner),
            patient_attributes: attributes.clone(),
            format: format.into(),
            size: 0,
            raw_spec,
            roi,
        })
    };
    if let [one] = a.files.as_slice() {
        let file = std::fs::read(one).with_context(|| format!("reading {}", one.display()))?;
        let header = header(one)?;
        return block_on(async move {
            let bar = transfer_bar(file.len() as u64, "store");
            let b = bar.clone();
            let r = gw::store_with_progress(
                &mut gateway(&a.conn).await?,
                header,
                &file,
                move |sent, _| b.set_position(sent),
            )
            .await;
            bar.finish_and_clear();
            let r = r.map_err(|s| status_error("store", &s))?;
            a.out.emit(&stored_json(&r), || print_stored(&r))
        });
    }
    // Several files: every header checked before anything is sent.
    let headers = a
        .files
        .iter()
        .map(|f| header(f))
        .collect::<Result<Vec<_>>>()?;
    let jobs = a.jobs.unwrap_or_else(super::pipeline::default_jobs).max(1);
    block_on(async move {
        let client = gateway(&a.conn).await?;
        let total = a.files.len();
        let json = a.out.json;
        let bar = super::pipeline::files_bar(total, "store");
        let mut outcomes: Vec<Option<StoreOutcome>> = Vec::with_capacity(total);
        outcomes.resize_with(total, || None);
        let mut n_refused = 0usize;
        let work: Vec<(PathBuf, pb::StoreHeader)> = a.files.iter().cloned().zip(headers).collect();
        let not_sent = super::pipeline::in_flight(
            work,
            jobs,
            |_, (path, header)| {
                let mut client = client.clone();
                async move {
                    let file = tokio::fs::read(&path)
                        .await
                        .map_err(|e| (format!("reading: {e}"), None))?;
                    gw::store_with_progress(&mut client, header, &file, |_, _| {})
                        .await
                        .map_err(|s| {
                            (
                                status_error(&format!("store {}", path.display()), &s).to_string(),
                                Some(s.code()),
                            )
                        })
                }
            },
            |i, r| {
                bar.inc(1);
                let go_on = match &r {
                    Ok(r) => {
                        super::pipeline::print_above(
                            &bar,
                            json,
                            &format!("{}: stored {}", a.files[i].display(), r.study_handle),
                        );
                        true
                    }
                    Err((_, code)) => {
                        n_refused += 1;
                        bar.set_message(format!("({n_refused} refused)"));
                        !code.is_some_and(super::pipeline::fatal)
                    }
                };
                outcomes[i] = Some(r);
                go_on
            },
        )
        .await;
        bar.finish_and_clear();
        let mut stored = Vec::new();
        let mut refused: Vec<(PathBuf, String)> = Vec::new();
        for (path, outcome) in a.files.iter().zip(outcomes) {
            match outcome {
                None => {}
                Some(Ok(r)) => {
                    let mut v = stored_json(&r);
                    v["file"] = json!(path);
                    stored.push(v);
                }
                Some(Err((why, _))) => refused.push((path.clone(), why)),
            }
        }
        let value = json!({
            "stored": stored,
            "refused": refused.iter().map(|(f, e)| json!({"file": f, "error": e})).collect::<Vec<_>>(),
        });
        a.out.emit(&value, || {
            println!("{} of {total} file(s) stored", stored.len());
        })?;
        if refused.is_empty() && not_sent == 0 {
            Ok(())
        } else {
            bail!(super::pipeline::refused_error(total, &refused, not_sent))
        }
    })
}

/// A stored image, or why not (and the gateway's code when it answered).
type StoreOutcome = Result<pb::StoreResponse, (String, Option<tonic::Code>)>;

/// One stored image as JSON.
fn stored_json(r: &pb::StoreResponse) -> Value {
    json!({
        "study": r.study_handle,
        "placements": r.placements.iter().map(|p| json!({
            "share": p.share, "node": p.node, "object": p.object_id, "bytes": p.size,
            "fragments": p.fragments.iter().map(|f| json!({"index": f.index, "node": f.node, "bytes": f.size, "missing": f.missing})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// One stored image in words.
fn print_stored(r: &pb::StoreResponse) {
    println!("stored: {}", r.study_handle);
    for p in &r.placements {
        println!(
            "  share {} {} as {} ({} bytes)",
            p.share,
            where_stored(p),
            p.object_id,
            p.size
        );
    }
}

/// "on storage-2", or "as 5 fragments on storage-1, storage-4, ..." for an
/// erasure-coded object (missing fragments marked).
pub(crate) fn where_stored(p: &pb::Placement) -> String {
    if p.fragments.is_empty() {
        return format!("on {}", p.node);
    }
    let nodes: Vec<String> = p
        .fragments
        .iter()
        .map(|f| {
            if f.missing {
                format!("{} (missing)", f.node)
            } else {
                f.node.clone()
            }
        })
        .collect();
    format!("as {} fragments on {}", p.fragments.len(), nodes.join(", "))
}

/// `tessera request-key`.
pub fn request_key(a: RequestKeyArgs) -> Result<()> {
    block_on(async move {
        let r = gateway(&a.conn)
            .await?
            .request_access(a.conn.request(pb::RequestAccessRequest {
                study_handle: a.study.clone(),
                justification: a.why.clone(),
                access_purpose: a.purpose.clone(),
                break_glass_reason: a.break_glass.clone().unwrap_or_default(),
            }))
            .await
            .map_err(|s| status_error("request key", &s))?
            .into_inner()
            .request
            .ok_or_else(|| anyhow!("request key: the gateway answered without a request"))?;
        let value = super::requests_view::request_json(&r);
        a.out.emit(&value, || {
            let state = super::requests_view::state_name(r.state);
            if a.break_glass.is_some() {
                println!(
                    "BREAK-GLASS {}: study {} open for {} use(s) until {}; the owner is told and will review it",
                    r.request_id,
                    r.study_id,
                    r.uses_left,
                    super::utc(r.expires_at_unix)
                );
            } else if r.state == kpb::RequestState::Approved as i32 {
                println!(
                    "requested: {} (study {}, approved at once by standing approval {})",
                    r.request_id, r.study_id, r.standing_approval
                );
            } else {
                println!(
                    "requested: {} (study {}, {state}); the owner must approve it",
                    r.request_id, r.study_id
                );
            }
        })
    })
}

/// `tessera retrieve`.
pub fn retrieve(a: RetrieveArgs) -> Result<()> {
    block_on(async move {
        let (spec, report, attrs, pixels) = if a.local {
            retrieve_local(&a).await?
        } else {
            let bar = transfer_bar(0, "retrieve");
            let b = bar.clone();
            let request = pb::RetrieveRequest {
                study_handle: a.study.clone(),
                key_request_id: a.request_id.clone(),
                allow_tampered: a.map.is_some(),
            };
            let r = gw::retrieve_with_progress(
                &mut gateway(&a.conn).await?,
                request,
                move |got, total| {
                    b.set_length(total);
                    b.set_position(got);
                },
            )
            .await;
            bar.finish_and_clear();
            let (h, pixels) = r.map_err(|s| status_error("retrieve", &s))?;
            let spec = spec_to_core(h.spec.as_ref().ok_or_else(|| anyhow!("no spec"))?)?;
            (
                spec,
                h.report.unwrap_or_default(),
                h.patient_attributes,
                pixels,
            )
        };
        finish_retrieve(&a, spec, &report, &attrs, &pixels)
    })
}

fn finish_retrieve(
    a: &RetrieveArgs,
    spec: ImageSpec,
    report: &wpb::VerificationReport,
    attrs: &[kpb::Attribute],
    pixels: &[u8],
) -> Result<()> {
    let mut map_written = None;
    if let Some(map) = &a.map
        && !report.intact
    {
        let img = Image::from_le_bytes(spec, pixels)?;
        std::fs::write(map, tamper_map(&img, report)?)
            .with_context(|| format!("writing {}", map.display()))?;
        map_written = Some(map);
    }
    if !report.intact {
        let value = json!({"study": a.study, "report": report_json(report), "map": map_written});
        a.out.emit(&value, || {
            print_report(report, "");
            if let Some(m) = map_written {
                println!(
                    "wrote tamper map {} (tampered tiles orange, ROI blocks red; one use of {} spent)",
                    m.display(),
                    a.request_id
                );
            }
        })?;
        bail!(
            "retrieve: the study does not verify intact ({} tampered tile(s)); no image written",
            report.tampered_tile_count
        );
    }
    write_image(&a.output, spec, pixels)?;
    let identity = if a.local {
        "not fetched with --local"
    } else if attrs.is_empty() {
        "not shown to your role"
    } else {
        "shown"
    };
    let value = json!({
        "study": a.study,
        "output": a.output,
        "width": spec.width, "height": spec.height, "frames": spec.frames,
        "bits_allocated": spec.format.bits_allocated, "bits_stored": spec.format.bits_stored,
        "report": report_json(report),
        "patient": attrs.iter().map(|x| (x.name.clone(), Value::String(x.value.clone()))).collect::<serde_json::Map<_, _>>(),
        "identity": identity,
        "grant_use_spent": true,
    });
    a.out.emit(&value, || {
        println!(
            "retrieved {}: {}x{}x{} {}-bit ({} stored) -> {} (one use of {} spent)",
            a.study,
            spec.width,
            spec.height,
            spec.frames,
            spec.format.bits_allocated,
            spec.format.bits_stored,
            a.output.display(),
            a.request_id
        );
        print_report(report, "  ");
        if a.local {
            // The identity vault is in the gateway; --local talks to it
            // only for the public header and the shares.
            println!(
                "  identity: not fetched with --local (retrieve without --local shows it to the roles that may see it)"
            );
        } else if attrs.is_empty() {
            println!("  identity: not shown to your role");
        }
        for x in attrs {
            println!("  identity: {} = {}", x.name, x.value);
        }
    })
}

/// User-side restore (paper 003): the gateway gives the public header and
/// relays each share's ciphertext (users never reach a storage node); the
/// user's grant releases the key at the keyserver; the restore and
/// verification run here.
async fn retrieve_local(
    a: &RetrieveArgs,
) -> Result<(
    ImageSpec,
    wpb::VerificationReport,
    Vec<kpb::Attribute>,
    Vec<u8>,
)> {
    let loc = gateway(&a.conn)
        .await?
        .locate(a.conn.request(pb::LocateRequest {
            study_handle: a.study.clone(),
            key_request_id: a.request_id.clone(),
        }))
        .await
        .map_err(|s| status_error("locate", &s))?
        .into_inner();
    let header = tessera_cryptomark::Header::from_json(&loc.header_json)
        .map_err(|e| anyhow!("locate: the study header does not parse: {e}"))?;
    let mut gwc = gateway(&a.conn).await?;
    let mut shares: Vec<Vec<u8>> = Vec::with_capacity(2);
    for share in [1u32, 2] {
        if !loc.placements.iter().any(|p| p.share == share) {
            bail!("locate: no placement for share {share}");
        }
        let mut stream = gwc
            .fetch_share(a.conn.request(pb::FetchShareRequest {
                study_handle: a.study.clone(),
                key_request_id: a.request_id.clone(),
                share,
            }))
            .await
            .map_err(|s| status_error(&format!("fetch share {share}"), &s))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(m) = stream
            .message()
            .await
            .map_err(|s| status_error(&format!("fetch share {share}"), &s))?
        {
            data.extend_from_slice(&m.chunk);
        }
        shares.push(data);
    }
    let released = KeyServerClient::new(a.conn.channel(Service::Keyserver).await?)
        .fetch_key(a.conn.request(kpb::FetchKeyRequest {
            request_id: a.request_id.clone(),
        }))
        .await
        .map_err(|s| status_error("fetch key", &s))?
        .into_inner();
    let key: [u8; 32] = released.key.as_slice().try_into().map_err(|_| {
        anyhow!(
            "fetch key: the keyserver sent {} bytes, not 32",
            released.key.len()
        )
    })?;
    let key = tessera_cryptomark::StudyKey::from_bytes(key);
    let restored = tessera_cryptomark::restore(
        &header,
        &shares[0],
        &shares[1],
        tessera_cryptomark::RestoreKey::Secure(&key),
    )
    .map_err(|e| anyhow!("restore: {e}"))?;
    let report = tessera_wire::report::report_to_proto(&restored.report);
    let spec = *restored.image.spec();
    Ok((spec, report, Vec::new(), restored.image.to_le_bytes()))
}

/// The restored frame 0 in gray, tampered tiles orange, ROI blocks red
/// (the offline painter, fed the gateway's report).
pub fn tamper_map(img: &Image, report: &wpb::VerificationReport) -> Result<Vec<u8>> {
    let rect = |r: &Option<wpb::Rect>| {
        let r = r.unwrap_or_default();
        Rect::new(r.x, r.y, r.width, r.height)
    };
    crate::image_cmd::paint_tamper_map(
        img,
        report
            .tampered_tiles
            .iter()
            .filter(|t| t.frame == 0)
            .map(|t| rect(&t.rect)),
        report
            .tampered_blocks
            .iter()
            .filter(|b| b.frame == 0)
            .map(|b| rect(&b.rect)),
        None,
    )
}

/// `tessera verify`.
pub fn verify(a: VerifyArgs) -> Result<()> {
    block_on(async move {
        let v = gateway(&a.conn)
            .await?
            .verify(a.conn.request(pb::VerifyStudyRequest {
                study_handle: a.study.clone(),
                key_request_id: a.request_id.clone(),
            }))
            .await
            .map_err(|s| status_error("verify", &s))?
            .into_inner();
        let r = v.report.unwrap_or_default();
        a.out.emit(
            &json!({"study": a.study, "report": report_json(&r), "fragment_problems": v.fragment_problems}),
            || {
                print_report(&r, "");
                if !v.fragment_problems.is_empty() {
                    println!(
                        "storage: {} fragment(s) unusable; the study was rebuilt from the others (`tessera repair run` restores full redundancy):",
                        v.fragment_problems.len()
                    );
                    for p in &v.fragment_problems {
                        println!("  {p}");
                    }
                }
            },
        )?;
        if r.intact {
            Ok(())
        } else {
            bail!("verify: {} does not verify intact", a.study)
        }
    })
}

/// `tessera process`.
pub fn process(a: ProcessArgs) -> Result<()> {
    use tessera_proto::segmentation::v1::Operation as Op;
    let op = match a.op.as_str() {
        "gaussian" => Op::Gaussian,
        "median" => Op::Median,
        "unsharp" => Op::Unsharp,
        "sobel" => Op::Sobel,
        "histeq" => Op::Histeq,
        other => bail!("--op {other:?}: expected gaussian, median, unsharp, sobel or histeq"),
    };
    block_on(async move {
        let (h, pixels) = gw::process(
            &mut gateway(&a.conn).await?,
            pb::ProcessRequest {
                study_handle: a.study.clone(),
                key_request_id: a.request_id.clone(),
                operation: op.into(),
                block_size: a.block_size,
                seed: a.seed,
            },
        )
        .await
        .map_err(|s| status_error("process", &s))?;
        let spec = spec_to_core(h.spec.as_ref().ok_or_else(|| anyhow!("no spec"))?)?;
        write_image(&a.output, spec, &pixels)?;
        let value = json!({
            "study": a.study, "output": a.output, "regions": h.regions, "grant_use_spent": true,
            "work": h.work.iter().map(|w| json!({"region": w.region, "node": w.node, "blocks": w.blocks, "samples_sent": w.samples_sent})).collect::<Vec<_>>(),
        });
        a.out.emit(&value, || {
            println!(
                "processed {} ({}) in {} region(s) -> {} (one use of {} spent)",
                a.study,
                a.op,
                h.regions,
                a.output.display(),
                a.request_id
            );
            for w in &h.work {
                println!(
                    "  region {} on {}: {} blocks, {} samples sent (incl. halo)",
                    w.region, w.node, w.blocks, w.samples_sent
                );
            }
        })
    })
}

/// `tessera delete`.
pub fn delete(a: DeleteArgs) -> Result<()> {
    block_on(async move {
        let r = gateway(&a.conn)
            .await?
            .delete(a.conn.request(pb::DeleteStudyRequest {
                study_handle: a.study.clone(),
            }))
            .await
            .map_err(|s| status_error("delete", &s))?
            .into_inner();
        let value =
            json!({"study": a.study, "removed": r.removed.len(), "key_destroyed": r.key_destroyed});
        a.out.emit(&value, || {
            println!(
                "deleted {}: {} share(s) removed, key material destroyed: {}",
                a.study,
                r.removed.len(),
                r.key_destroyed
            );
        })
    })
}
