//! `tessera demo`: the main job. The whole suite comes up in this process
//! on loopback (development PKI, keyserver, three storage nodes, watermark,
//! segmentation, gateway; real mutual TLS between them; redb files under
//! `OUT/suite`), and a sample study goes through every flow as the
//! different users would drive it. Every step is checked; the command exits
//! non-zero if one fails.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, PixelFormat, codec};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::segmentation::v1 as segpb;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::{ClientTls, TlsFiles};
use tonic::transport::Channel;

use crate::client::gateway_cmd::{print_report, tamper_map};
use crate::demo::{DemoArgs, Steps};

pub(crate) const OWNER: &str = "spiffe://tessera.local/user/owner";

async fn channel(stack: &DevStack, who: &str, service: &str) -> Result<Channel> {
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), who))?;
    // The server there must be that service (endpoints.toml names it).
    let expected = tessera_tls::Identity::parse_uri(&tessera_devstack::service_identity(service))?;
    Ok(tls
        .expecting(&expected)
        .connect(stack.endpoints().get(service)?)
        .await?)
}

pub(crate) async fn gateway(stack: &DevStack, who: &str) -> Result<GatewayClient<Channel>> {
    Ok(gw::client(channel(stack, who, "gateway").await?))
}

pub(crate) async fn keyserver(stack: &DevStack, who: &str) -> Result<KeyServerClient<Channel>> {
    Ok(KeyServerClient::new(
        channel(stack, who, "keyserver").await?,
    ))
}

/// A readable PNG of any image (frame 0, first channel, windowed).
fn preview(img: &Image) -> Result<Vec<u8>> {
    Ok(codec::encode_png(img, 0)?)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> Result<()> {
    // `--input FILE`: checked before anything starts.
    let dicom = match &args.input {
        Some(path) => Some(crate::demo_dicom::Input::load(path)?),
        None => None,
    };
    let out_dir = args.out.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = |name: &str| out_dir.join(name);
    let suite_dir = out("suite");
    // Fresh every run: a new PKI, new keys, empty redb files.
    if suite_dir.exists() {
        std::fs::remove_dir_all(&suite_dir)
            .with_context(|| format!("clearing {}", suite_dir.display()))?;
    }
    let mut steps = Steps::new();
    let t0 = Instant::now();

    println!(
        "== 1. The suite on loopback: development PKI, keyserver, 3 storage nodes, watermark, segmentation, gateway"
    );
    let mut stack = DevStack::start(&suite_dir, &DevOptions::default())
        .await
        .map_err(|e| anyhow!("starting the suite: {e}"))?;
    for (name, addr) in &stack.endpoints().endpoints {
        println!("  {name:<13} {addr}");
    }
    println!(
        "  (mutual TLS everywhere; identities in {})",
        stack.pki_dir().display()
    );
    let result = match &dicom {
        Some(input) => crate::demo_dicom::flows(&stack, input, &out_dir, &mut steps).await,
        None => flows(&stack, &out_dir, &mut steps).await,
    };
    stack.shutdown().await;
    result?;

    println!();
    println!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    if steps.failed.is_empty() {
        println!("demo: every step held. Outputs in {}", out_dir.display());
        Ok(())
    } else {
        bail!(
            "demo: {} step(s) failed: {:?}",
            steps.failed.len(),
            steps.failed
        )
    }
}

async fn flows(stack: &DevStack, out_dir: &Path, steps: &mut Steps) -> Result<()> {
    let out = |name: &str| out_dir.join(name);

    println!(
        "== 2. The owner stores a 512x512 12-bit CT-like head slice (built-in phantom) with patient attributes"
    );
    let image = head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 7)?;
    std::fs::write(out("original.png"), preview(&image)?)?;
    // Raw words with their exact spec (12 bits stored of 16), as a modality
    // would send them; PNG has no BitsStored.
    let raw = image.to_le_bytes();
    let attributes = vec![
        ("patient_id", "PID-DEMO-0042"),
        ("patient_name", "Demo^Patient^Alex"),
        ("birth_date", "19700101"),
    ];
    let header = pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: attributes
            .iter()
            .map(|(n, v)| ks::Attribute {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect(),
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(
            image.spec(),
        )),
        roi: Some(wpb::Rect {
            x: 96,
            y: 40,
            width: 320,
            height: 432,
        }),
    };
    let t = Instant::now();
    let stored = gw::store(&mut gateway(stack, "owner").await?, header, &raw)
        .await
        .context("store")?;
    let handle = stored.study_handle.clone();
    println!(
        "  study handle {handle} (random pseudonym) in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    for p in &stored.placements {
        println!(
            "  share {} -> {} as {} ({} bytes)",
            p.share, p.node, p.object_id, p.size
        );
    }
    steps.check(
        "two shares on two distinct storage nodes",
        stored.placements.len() == 2 && stored.placements[0].node != stored.placements[1].node,
    );
    let mut clean = true;
    for p in &stored.placements {
        if let Some(db) = stack.storage_db(&p.node) {
            let raw = std::fs::read(&db)?;
            for (_, v) in &attributes {
                clean &= !raw.windows(v.len()).any(|w| w == v.as_bytes());
            }
        }
    }
    steps.check(
        "no patient attribute in any storage node's redb file",
        clean,
    );

    println!("== 3. A clinician asks for access; the request waits for the owner");
    let mut clin = gateway(stack, "clinician").await?;
    let req = clin
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.clone(),
            justification: "tumour board follow-up".into(),
        })
        .await
        .context("request access")?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request in the answer"))?;
    println!("  request {} by {}: pending", req.request_id, req.requester);
    let listed = keyserver(stack, "owner")
        .await?
        .list_requests(ks::ListRequestsRequest {
            study_id: handle.clone(),
            include_decided: false,
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
    let early = gw::retrieve(&mut clin, &handle, &req.request_id).await;
    if let Err(e) = &early {
        println!(
            "  retrieve before approval: refused ({:?}: {})",
            e.code(),
            e.message()
        );
    }
    steps.check(
        "retrieval before approval is refused",
        matches!(&early, Err(e) if e.code() == tonic::Code::PermissionDenied),
    );
    let outsider = gw::retrieve(
        &mut gateway(stack, "outsider").await?,
        &handle,
        &req.request_id,
    )
    .await;
    steps.check(
        "an identity without a role is refused",
        matches!(&outsider, Err(e) if e.code() == tonic::Code::PermissionDenied),
    );

    println!("== 4. The owner approves (1 hour, 3 uses)");
    let approved = keyserver(stack, "owner")
        .await?
        .approve_request(ks::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 3600,
            uses: 3,
        })
        .await
        .context("approve")?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request in the answer"))?;
    println!(
        "  approved: {} uses until unix {}",
        approved.uses_left, approved.expires_at_unix
    );
    let self_approve = keyserver(stack, "clinician")
        .await?
        .approve_request(ks::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 60,
            uses: 1,
        })
        .await;
    steps.check("the clinician cannot approve", self_approve.is_err());

    println!("== 5. The clinician retrieves: shares fetched, restored, verified, re-identified");
    let t = Instant::now();
    let (rh, pixels) = gw::retrieve(&mut clin, &handle, &req.request_id)
        .await
        .context("retrieve")?;
    println!("  retrieved in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    print_report(rh.report.as_ref().ok_or_else(|| anyhow!("no report"))?);
    for a in &rh.patient_attributes {
        println!("  identity: {} = {}", a.name, a.value);
    }
    steps.check(
        "restored pixels are bit-identical to the original",
        pixels == image.to_le_bytes(),
    );
    steps.check(
        "verification: every ROI block intact",
        rh.report.as_ref().is_some_and(|r| r.intact),
    );
    steps.check(
        "the clinician's role sees the patient identity",
        !rh.patient_attributes.is_empty(),
    );

    println!("== 6. Cloud B tampers with its share (one byte changed, checksum kept consistent)");
    let p2 = stored
        .placements
        .iter()
        .find(|p| p.share == 2)
        .ok_or_else(|| anyhow!("no share 2"))?;
    let mut node = tessera_storage_client::client(channel(stack, "gateway", &p2.node).await?);
    let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &p2.object_id).await?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    tessera_storage_client::replace_object(&mut node, &p2.object_id, &bytes).await?;
    println!("  {} now holds a modified {}", p2.node, p2.object_id);
    let refused = gw::retrieve(&mut clin, &handle, &req.request_id).await;
    if let Err(e) = &refused {
        println!("  retrieve: {:?}: {}", e.code(), e.message());
    }
    steps.check(
        "a plain retrieve of the tampered study is refused (DATA_LOSS, no use spent)",
        refused
            .as_ref()
            .is_err_and(|e| e.code() == tonic::Code::DataLoss),
    );
    let (th, tpixels) = gw::retrieve_with_progress(
        &mut clin,
        tessera_proto::gateway::v1::RetrieveRequest {
            study_handle: handle.clone(),
            key_request_id: req.request_id.clone(),
            allow_tampered: true,
        },
        |_, _| {},
    )
    .await
    .context("retrieve after tampering (allow_tampered, for the tamper map)")?;
    let report = th.report.clone().unwrap_or_default();
    print_report(&report);
    let restored = Image::from_le_bytes(image.spec().to_owned(), &tpixels)?;
    std::fs::write(out("tamper-map.png"), tamper_map(&restored, &report)?)?;
    println!("  wrote {}", out("tamper-map.png").display());
    steps.check(
        "exactly one tile flagged, in share 2",
        report.tampered_tile_count == 1
            && report
                .tampered_tiles
                .first()
                .is_some_and(|t| t.shares == vec![2]),
    );
    let tile_area = report
        .tampered_tiles
        .first()
        .and_then(|t| t.rect.as_ref())
        .map_or(0, |r| (r.width * r.height) as usize);
    let wrong = image
        .samples()
        .iter()
        .zip(restored.samples())
        .filter(|(a, b)| a != b)
        .count();
    steps.check(
        "every pixel outside the flagged tile restored exactly",
        wrong <= tile_area,
    );

    println!("== 7. Region-wise Gaussian filter across the storage nodes (GA-ES, paper 000)");
    let t = Instant::now();
    // Restore the clean share first (the owner stores the study again).
    let mut clean_bytes = bytes;
    clean_bytes[at] ^= 0x10;
    tessera_storage_client::replace_object(&mut node, &p2.object_id, &clean_bytes).await?;
    let (ph, result) = gw::process(
        &mut clin,
        pb::ProcessRequest {
            study_handle: handle.clone(),
            key_request_id: req.request_id.clone(),
            operation: segpb::Operation::Gaussian.into(),
            block_size: 16,
            seed: 1,
        },
    )
    .await
    .context("process")?;
    println!(
        "  {} regions in {:.0} ms",
        ph.regions,
        t.elapsed().as_secs_f64() * 1e3
    );
    for w in &ph.work {
        println!(
            "  region {} ({} blocks, {} samples incl. halo) processed on {}",
            w.region, w.blocks, w.samples_sent, w.node
        );
    }
    let local = tessera_segment::process_whole(&image, tessera_segment::Operation::Gaussian)?;
    let merged = Image::from_le_bytes(image.spec().to_owned(), &result)?;
    std::fs::write(out("gaussian-region-wise.png"), preview(&merged)?)?;
    steps.check(
        "region-wise result equals the local whole-image filter, bit for bit",
        merged == local,
    );
    let distinct: std::collections::BTreeSet<_> = ph.work.iter().map(|w| &w.node).collect();
    steps.check(
        "each region on a distinct storage node",
        distinct.len() == ph.work.len() && ph.work.len() > 1,
    );

    println!("== 8. The audit log at the keyserver");
    let audit = keyserver(stack, "owner")
        .await?
        .verify_audit(ks::VerifyAuditRequest {})
        .await?
        .into_inner();
    println!("  {} entries, chain ok = {}", audit.entries, audit.ok);
    steps.check("the audit chain verifies", audit.ok && audit.entries > 0);

    println!("== 9. The owner deletes the study: shares removed, key material destroyed");
    let d = gateway(stack, "owner")
        .await?
        .delete(pb::DeleteStudyRequest {
            study_handle: handle.clone(),
        })
        .await
        .context("delete")?
        .into_inner();
    let gone = gw::retrieve(&mut clin, &handle, &req.request_id).await;
    steps.check(
        "after delete: shares removed, key destroyed, study not found",
        d.key_destroyed
            && d.removed.len() == 2
            && matches!(&gone, Err(e) if e.code() == tonic::Code::NotFound),
    );
    Ok(())
}
