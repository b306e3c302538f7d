//! `tessera demo`: the main job. The whole suite comes up in this process
//! on loopback (development PKI, keyserver, five storage nodes (every
//! object erasure-coded 3+2 across them), watermark,
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
use tessera_proto::segmentation::v1 as segpb;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::Channel;

use crate::client::gateway_cmd::{print_report, tamper_map};
use crate::demo::{DemoArgs, Steps};
use crate::demo_kit::{OWNER, approve_step, channel, gateway, keyserver, storage_nodes};

/// A repair pass over every study, as the admin.
async fn repair(admin: &mut GatewayClient<Channel>) -> Result<pb::RepairResponse> {
    Ok(admin
        .repair(pb::RepairRequest {
            study_handle: String::new(),
            dry_run: false,
            evacuate_node: String::new(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .context("repair")?
        .into_inner())
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
    let since = crate::demo::run_started();

    println!(
        "== 1. The suite on loopback: development PKI, keyserver, 5 storage nodes (5 clouds, every object erasure-coded 3+2), watermark, segmentation, gateway (gRPC, and its DICOM C-STORE SCP as `dicom`)"
    );
    let mut stack = DevStack::start(&suite_dir, &DevOptions::dev_up())
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
        None => flows(&mut stack, &out_dir, &mut steps).await,
    };
    stack.shutdown().await;
    result?;

    println!();
    println!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    if steps.failed.is_empty() {
        println!("demo: every step held.");
        crate::demo::print_outputs(
            &out_dir,
            since,
            &[("suite", "this run's PKI and redb files")],
        )?;
        Ok(())
    } else {
        bail!(
            "demo: {} step(s) failed: {:?}",
            steps.failed.len(),
            steps.failed
        )
    }
}

async fn flows(stack: &mut DevStack, out_dir: &Path, steps: &mut Steps) -> Result<()> {
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
        let nodes: Vec<&str> = p.fragments.iter().map(|f| f.node.as_str()).collect();
        println!(
            "  share {} ({} bytes) -> {} fragments on {}",
            p.share,
            p.size,
            p.fragments.len(),
            nodes.join(", ")
        );
    }
    let spread = |p: &pb::Placement| {
        let distinct: std::collections::BTreeSet<&str> =
            p.fragments.iter().map(|f| f.node.as_str()).collect();
        p.fragments.len() == 5 && distinct.len() == 5
    };
    steps.check(
        "two shares, each as 5 fragments (3 data + 2 parity) on 5 distinct clouds",
        stored.placements.len() == 2 && stored.placements.iter().all(spread),
    );
    let nodes = storage_nodes(stack);
    let mut clean = nodes.len() == 5;
    for node in &nodes {
        let db = stack
            .storage_db(node)
            .ok_or_else(|| anyhow!("{node}: no redb file"))?;
        let raw = std::fs::read(&db).with_context(|| format!("reading {}", db.display()))?;
        for (_, v) in &attributes {
            clean &= !raw.windows(v.len()).any(|w| w == v.as_bytes());
        }
    }
    steps.check(
        "no patient attribute in any of the 5 storage nodes' redb files",
        clean,
    );

    println!("== 3. A clinician asks for access; the request waits for the owner");
    let mut clin = gateway(stack, "clinician").await?;
    let req = clin
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.clone(),
            justification: "tumour board follow-up".into(),
            ..Default::default()
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

    println!("== 4. The owner approves (1 hour, 5 uses)");
    approve_step(stack, &req.request_id, 5, steps).await?;

    println!("== 5. The clinician retrieves: shares fetched, restored, verified, re-identified");
    let t = Instant::now();
    let (rh, pixels) = gw::retrieve(&mut clin, &handle, &req.request_id)
        .await
        .context("retrieve")?;
    println!("  retrieved in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    print_report(
        rh.report.as_ref().ok_or_else(|| anyhow!("no report"))?,
        "  ",
    );
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

    println!("== 6. Clouds fail: one corrupts its fragment, two lose their disks");
    let p2 = stored
        .placements
        .iter()
        .find(|p| p.share == 2)
        .ok_or_else(|| anyhow!("no share 2"))?;
    let victim = p2
        .fragments
        .first()
        .ok_or_else(|| anyhow!("share 2 has no fragments"))?;
    let mut node = tessera_storage_client::client(channel(stack, "gateway", &victim.node).await?);
    let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &victim.object_id).await?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    tessera_storage_client::replace_object(&mut node, &victim.object_id, &bytes).await?;
    println!(
        "  {} now holds a modified {} (fragment {} of share 2)",
        victim.node, victim.object_id, victim.index
    );
    let mut owner_gw = gateway(stack, "owner").await?;
    let v = owner_gw
        .verify(pb::VerifyStudyRequest {
            study_handle: handle.clone(),
            key_request_id: String::new(),
        })
        .await
        .context("verify")?
        .into_inner();
    for p in &v.fragment_problems {
        println!("  verify: {p}");
    }
    steps.check(
        "verify names the corrupt fragment, the study itself intact",
        v.fragment_problems.len() == 1
            && v.fragment_problems[0].contains(&victim.node)
            && v.fragment_problems[0].contains("corrupt")
            && v.report.as_ref().is_some_and(|r| r.intact),
    );
    let (_, px) = gw::retrieve(&mut clin, &handle, &req.request_id)
        .await
        .context("retrieve with a corrupt fragment")?;
    steps.check(
        "the clinician still retrieves it bit-identical (rebuilt from the other fragments)",
        px == image.to_le_bytes(),
    );
    let mut admin = gateway(stack, "admin").await?;
    let repaired = repair(&mut admin).await?;
    steps.check(
        "repair rebuilds the corrupt fragment in place",
        repaired.fragments_corrupt == 1 && repaired.fragments_rebuilt == 1,
    );
    let lost: Vec<String> = nodes
        .iter()
        .filter(|n| **n != victim.node)
        .take(2)
        .cloned()
        .collect();
    for n in &lost {
        let db = stack
            .storage_db(n)
            .ok_or_else(|| anyhow!("{n}: no redb file"))?;
        stack.stop(n).await;
        std::fs::remove_file(&db).with_context(|| format!("removing {}", db.display()))?;
        println!("  {n} lost its disk ({} deleted)", db.display());
    }
    let v = owner_gw
        .verify(pb::VerifyStudyRequest {
            study_handle: handle.clone(),
            key_request_id: String::new(),
        })
        .await
        .context("verify with 2 clouds down")?
        .into_inner();
    println!(
        "  verify with 2 of 5 clouds down: {} fragments unusable, study intact = {}",
        v.fragment_problems.len(),
        v.report.as_ref().is_some_and(|r| r.intact)
    );
    steps.check(
        "with 2 of 5 clouds gone, verify still restores the study intact and names the 4 lost fragments",
        v.fragment_problems.len() == 4 && v.report.as_ref().is_some_and(|r| r.intact),
    );
    for n in &lost {
        stack
            .restart_storage(n)
            .await
            .map_err(|e| anyhow!("restarting {n}: {e}"))?;
    }
    println!("  {} back with new, empty disks", lost.join(" and "));
    let t = Instant::now();
    let repaired = repair(&mut admin).await?;
    println!(
        "  repair: {} fragments checked, {} missing, {} rebuilt in {:.0} ms",
        repaired.fragments_checked,
        repaired.fragments_missing,
        repaired.fragments_rebuilt,
        t.elapsed().as_secs_f64() * 1e3
    );
    let scrub = admin
        .repair(pb::RepairRequest {
            study_handle: String::new(),
            dry_run: true,
            evacuate_node: String::new(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .context("scrub")?
        .into_inner();
    steps.check(
        "repair rebuilds the 4 lost fragments; a scrub then finds 0 missing, 0 corrupt",
        repaired.fragments_rebuilt == 4
            && scrub.fragments_missing == 0
            && scrub.fragments_corrupt == 0
            && scrub.fragments_unreachable == 0,
    );

    println!(
        "== 7. Share 2 altered on its way to the clinician: the watermark localizes it (local restore, paper 003)"
    );
    let loc = clin
        .locate(pb::LocateRequest {
            study_handle: handle.clone(),
            key_request_id: req.request_id.clone(),
        })
        .await
        .context("locate")?
        .into_inner();
    let header = tessera_cryptomark::Header::from_json(&loc.header_json)
        .map_err(|e| anyhow!("locate: the header does not parse: {e}"))?;
    let mut shares = Vec::new();
    for share in [1u32, 2] {
        let mut stream = clin
            .fetch_share(pb::FetchShareRequest {
                study_handle: handle.clone(),
                key_request_id: req.request_id.clone(),
                share,
            })
            .await
            .with_context(|| format!("fetch share {share}"))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(m) = stream.message().await? {
            data.extend_from_slice(&m.chunk);
        }
        shares.push(data);
    }
    let released = keyserver(stack, "clinician")
        .await?
        .fetch_key(ks::FetchKeyRequest {
            request_id: req.request_id.clone(),
        })
        .await
        .context("fetch key")?
        .into_inner();
    let key: [u8; 32] = released
        .key
        .as_slice()
        .try_into()
        .map_err(|_| anyhow!("fetch key: not 32 bytes"))?;
    let key = tessera_cryptomark::StudyKey::from_bytes(key);
    let mut altered = shares[1].clone();
    let at = altered.len() / 2;
    altered[at] ^= 0x10;
    let restored = tessera_cryptomark::restore(
        &header,
        &shares[0],
        &altered,
        tessera_cryptomark::RestoreKey::Secure(&key),
    )
    .map_err(|e| anyhow!("restore: {e}"))?;
    let report = tessera_wire::report::report_to_proto(&restored.report);
    print_report(&report, "  ");
    std::fs::write(out("tamper-map.png"), tamper_map(&restored.image, &report)?)?;
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
        .zip(restored.image.samples())
        .filter(|(a, b)| a != b)
        .count();
    steps.check(
        "every pixel outside the flagged tile restored exactly",
        wrong <= tile_area,
    );

    println!("== 8. Region-wise Gaussian filter across the storage nodes (GA-ES, paper 000)");
    let t = Instant::now();
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

    println!(
        "== 9. Access that fits a hospital's day: a standing approval, break-glass and its review"
    );
    crate::demo_access::flows(stack, &handle, &image, steps).await?;

    println!("== 10. The audit log at the keyserver");
    let audit = keyserver(stack, "owner")
        .await?
        .verify_audit(ks::VerifyAuditRequest {})
        .await?
        .into_inner();
    println!("  {} entries, chain ok = {}", audit.entries, audit.ok);
    steps.check("the audit chain verifies", audit.ok && audit.entries > 0);

    println!("== 11. The owner deletes the study: every fragment removed, key material destroyed");
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
        "after delete: both shares' fragments removed, key destroyed, study not found",
        d.key_destroyed
            && d.removed.len() == 2
            && d.removed.iter().all(|p| p.fragments.len() == 5)
            && matches!(&gone, Err(e) if e.code() == tonic::Code::NotFound),
    );
    Ok(())
}
