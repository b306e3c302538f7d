//! Erasure coding across five storage nodes (k = 3, m = 2), on the live
//! suite with real redb files: an image study and a DICOM study survive the
//! loss of any two nodes' databases, and fragments flipped on two nodes are
//! detected, named by Verify, and the studies still restore exactly. A
//! node that answers with another object's or another index's fragment is
//! caught; configurations that would let one cloud rebuild a share, or
//! need more nodes than there are, are refused.

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{gateway, grant, objects, start, storage};

fn options() -> DevOptions {
    DevOptions {
        storage_nodes: 5,
        erasure: Some((3, 2)),
        ..DevOptions::default()
    }
}

fn image() -> Image {
    tessera_image::phantom::head_phantom(160, 128, 1, PixelFormat::gray16(12, false), 11).unwrap()
}

fn dicom_file() -> Vec<u8> {
    let info = tessera_dicom::synth::StudyInfo {
        patient_name: "Durable^Dora".into(),
        patient_id: "MRN-EC-3".into(),
        patient_birth_date: "19800202".into(),
        study_date: "20260301".into(),
        institution: "Erasure General".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.93".into(),
    };
    let px: Vec<u16> = (0..48 * 40u32).map(|p| (p * 13 % 4096) as u16).collect();
    tessera_dicom::synth::ct_slice(&info, 0, 40, 48, &px).unwrap()
}

async fn store_image(stack: &DevStack, img: &Image) -> pb::StoreResponse {
    gw::store(
        &mut gateway(stack, "owner").await,
        pb::StoreHeader {
            owner: OWNER.into(),
            patient_attributes: vec![ks::Attribute {
                name: "patient_id".into(),
                value: "PID-EC-1".into(),
            }],
            format: pb::ImageFormat::Raw.into(),
            size: 0,
            raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
            roi: Some(wpb::Rect {
                x: 16,
                y: 16,
                width: 64,
                height: 64,
            }),
        },
        &img.to_le_bytes(),
    )
    .await
    .unwrap()
}

async fn retrieve_image(stack: &DevStack, handle: &str, rid: &str) -> Vec<u8> {
    let (h, px) = gw::retrieve(&mut gateway(stack, "clinician").await, handle, rid)
        .await
        .unwrap();
    assert!(h.report.unwrap().intact);
    px
}

async fn retrieve_dicom(stack: &DevStack, handle: &str, rid: &str) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    gw::retrieve_dicom(
        &mut gateway(stack, "clinician").await,
        handle,
        rid,
        |_, f| {
            files.push(f);
            Ok(())
        },
    )
    .await
    .unwrap();
    files
}

async fn verify(stack: &DevStack, handle: &str) -> pb::VerifyStudyResponse {
    gateway(stack, "owner")
        .await
        .verify(pb::VerifyStudyRequest {
            study_handle: handle.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn repair(stack: &DevStack, dry_run: bool, evacuate: &str) -> pb::RepairResponse {
    gateway(stack, "admin")
        .await
        .repair(pb::RepairRequest {
            study_handle: String::new(),
            dry_run,
            evacuate_node: evacuate.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Empties a node: stop it, delete its redb file, start it again (a new,
/// empty disk in the same cloud).
async fn lose_disk(stack: &mut DevStack, node: &str) {
    let db = stack.storage_db(node).unwrap();
    assert!(stack.stop(node).await, "{node} was running");
    std::fs::remove_file(&db).unwrap();
    stack.restart_storage(node).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_two_of_five_nodes_lost_or_corrupt() {
    let (_tmp, mut stack) = start(&options()).await;
    let img = image();
    let stored = store_image(&stack, &img).await;
    let file = dicom_file();
    let dstored = gw::store_dicom(&mut gateway(&stack, "owner").await, OWNER, &file)
        .await
        .unwrap();

    // Every object is 3 + 2 fragments on 5 distinct nodes.
    for p in &stored.placements {
        assert!(p.node.is_empty(), "{p:?}");
        let nodes: std::collections::BTreeSet<_> = p.fragments.iter().map(|f| &f.node).collect();
        assert_eq!(p.fragments.len(), 5);
        assert_eq!(nodes.len(), 5, "one fragment per node: {p:?}");
        assert!(p.fragments.iter().all(|f| !f.missing));
    }
    let rid = grant(&stack, "clinician", &stored.study_handle, 10).await;
    let drid = grant(&stack, "clinician", &dstored.study_handle, 10).await;
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    assert_eq!(
        retrieve_dicom(&stack, &dstored.study_handle, &drid).await,
        vec![file.clone()]
    );

    // Two disks lost (their redb files deleted): everything still reads
    // bit-identical / byte-identical; Verify names the missing fragments.
    lose_disk(&mut stack, "storage-2").await;
    lose_disk(&mut stack, "storage-4").await;
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    assert_eq!(
        retrieve_dicom(&stack, &dstored.study_handle, &drid).await,
        vec![file.clone()]
    );
    let v = verify(&stack, &stored.study_handle).await;
    assert!(v.report.unwrap().intact);
    // Verify checks every fragment: exactly those on the two lost nodes
    // (one per share on each) are named missing.
    assert_eq!(v.fragment_problems.len(), 4, "{:?}", v.fragment_problems);
    for pr in &v.fragment_problems {
        assert!(
            pr.contains("missing") && (pr.contains("on storage-2") || pr.contains("on storage-4")),
            "{pr}"
        );
    }

    // Scrub sees the 2 lost disks' fragments; repair rebuilds them onto
    // the replaced (empty) nodes; a second scrub finds nothing missing.
    let scrub = repair(&stack, true, "").await;
    assert!(scrub.fragments_missing >= 4, "{scrub:?}");
    assert_eq!(scrub.fragments_corrupt, 0, "{scrub:?}");
    assert_eq!(scrub.fragments_rebuilt, 0, "a dry run changes nothing");
    let fixed = repair(&stack, false, "").await;
    assert_eq!(
        fixed.fragments_rebuilt, scrub.fragments_missing,
        "{fixed:?}"
    );
    assert!(fixed.failures.is_empty(), "{:?}", fixed.failures);
    let clean = repair(&stack, true, "").await;
    assert_eq!(
        (
            clean.fragments_missing,
            clean.fragments_corrupt,
            clean.fragments_unreachable
        ),
        (0, 0, 0),
        "{clean:?}"
    );
    assert!(
        verify(&stack, &stored.study_handle)
            .await
            .fragment_problems
            .is_empty()
    );
    // After repair, two *other* disks lost: still everything readable.
    lose_disk(&mut stack, "storage-3").await;
    lose_disk(&mut stack, "storage-5").await;
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    assert_eq!(
        retrieve_dicom(&stack, &dstored.study_handle, &drid).await,
        vec![file.clone()]
    );
    assert!(repair(&stack, false, "").await.failures.is_empty());

    // Three nodes lost at once: below k: a clear DATA_LOSS naming the
    // fragments, never wrong pixels.
    for n in ["storage-1", "storage-2", "storage-4"] {
        lose_disk(&mut stack, n).await;
    }
    let r = gw::retrieve(
        &mut gateway(&stack, "clinician").await,
        &stored.study_handle,
        &rid,
    )
    .await;
    let Err(e) = r else {
        panic!("a study with 3 of 5 fragments lost was returned");
    };
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
    assert!(e.message().contains("fragments needed"), "{}", e.message());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_and_swapped_fragments_are_detected() {
    let (_tmp, mut stack) = start(&options()).await;
    let img = image();
    let stored = store_image(&stack, &img).await;
    let other = store_image(&stack, &img).await;
    let rid = grant(&stack, "clinician", &stored.study_handle, 10).await;

    // Flip one byte in the data fragments 0 and 1 of share 1 (on two
    // nodes), keeping each node's own checksum consistent.
    let s1 = stored.placements.iter().find(|p| p.share == 1).unwrap();
    for index in [0u32, 1] {
        let f = s1.fragments.iter().find(|f| f.index == index).unwrap();
        let mut node = storage(&stack, &f.node).await;
        let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &f.object_id)
            .await
            .unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x40;
        tessera_storage_client::replace_object(&mut node, &f.object_id, &bytes)
            .await
            .unwrap();
    }
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    let v = verify(&stack, &stored.study_handle).await;
    let corrupt: Vec<_> = v
        .fragment_problems
        .iter()
        .filter(|p| p.contains("corrupt"))
        .collect();
    assert_eq!(corrupt.len(), 2, "{:?}", v.fragment_problems);
    for index in [0, 1] {
        assert!(
            corrupt
                .iter()
                .any(|p| p.contains(&format!("{}.s1 fragment {index} ", stored.study_handle))),
            "{corrupt:?}"
        );
    }

    // A node answers with another study's fragment 2 (same index) in place
    // of this one's: its recorded SHA-256 does not match: detected, and the
    // study still restores exactly from the remaining fragments.
    let s2 = stored.placements.iter().find(|p| p.share == 2).unwrap();
    let o2 = other.placements.iter().find(|p| p.share == 2).unwrap();
    let mine = s2.fragments.iter().find(|f| f.index == 2).unwrap();
    let theirs = o2.fragments.iter().find(|f| f.index == 2).unwrap();
    let mut tn = storage(&stack, &theirs.node).await;
    let (_, foreign) = tessera_storage_client::get_object(&mut tn, &theirs.object_id)
        .await
        .unwrap();
    let mut mn = storage(&stack, &mine.node).await;
    tessera_storage_client::replace_object(&mut mn, &mine.object_id, &foreign)
        .await
        .unwrap();
    let v = verify(&stack, &stored.study_handle).await;
    assert!(
        v.fragment_problems.iter().any(|p| p
            .contains(&format!("{}.s2 fragment 2 ", stored.study_handle))
            && p.contains("corrupt")),
        "{:?}",
        v.fragment_problems
    );
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_or_impossible_schemes_are_refused() {
    for (nodes, k, m, why) in [(5, 1, 2, "at least 2"), (3, 3, 2, "need 5 storage nodes")] {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DevOptions {
            storage_nodes: nodes,
            erasure: Some((k, m)),
            ..DevOptions::default()
        };
        let e = match DevStack::start(tmp.path(), &opts).await {
            Ok(mut s) => {
                s.shutdown().await;
                panic!("{k}+{m} on {nodes} nodes was accepted");
            }
            Err(e) => e.to_string(),
        };
        assert!(e.contains(why), "{k}+{m}: {e}");
    }
    // m = 0 is allowed (no redundancy, still no whole share on one node).
    let opts = DevOptions {
        storage_nodes: 2,
        erasure: Some((2, 0)),
        ..DevOptions::default()
    };
    let (_tmp, mut stack) = start(&opts).await;
    let img = image();
    let stored = store_image(&stack, &img).await;
    let rid = grant(&stack, "clinician", &stored.study_handle, 1).await;
    assert_eq!(
        retrieve_image(&stack, &stored.study_handle, &rid).await,
        img.to_le_bytes()
    );
    stack.shutdown().await;
}

/// Drain: with 2 + 2 fragments on 5 nodes there is a spare node for every
/// object; every fragment on storage-3 is rebuilt elsewhere and the node is
/// left empty; the studies still read exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_moves_every_fragment_off_a_node() {
    let opts = DevOptions {
        storage_nodes: 5,
        erasure: Some((2, 2)),
        ..DevOptions::default()
    };
    let (_tmp, mut stack) = start(&opts).await;
    let img = image();
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(store_image(&stack, &img).await.study_handle);
    }
    let before = objects(&stack, "storage-3").await;
    assert!(
        !before.is_empty(),
        "storage-3 holds fragments before the drain"
    );
    let drained = repair(&stack, false, "storage-3").await;
    assert_eq!(
        drained.fragments_moved as usize,
        before.len(),
        "{drained:?}"
    );
    assert!(drained.failures.is_empty(), "{:?}", drained.failures);
    let left = objects(&stack, "storage-3").await;
    assert!(left.is_empty(), "left on the drained node: {left:?}");
    // The node can now go: the studies read without it.
    assert!(stack.stop("storage-3").await);
    for h in &handles {
        let rid = grant(&stack, "clinician", h, 1).await;
        assert_eq!(retrieve_image(&stack, h, &rid).await, img.to_le_bytes());
    }
    let clean = repair(&stack, true, "").await;
    assert_eq!(
        clean.fragments_missing + clean.fragments_corrupt + clean.fragments_unreachable,
        0,
        "{clean:?}"
    );
    assert!(clean.next_page_token.is_empty(), "unpaged: one answer");
    // The same scrub in pages of two studies: two answers that add up.
    let (mut token, mut pages, mut studies, mut checked) = (String::new(), 0, 0, 0);
    loop {
        let page = gateway(&stack, "admin")
            .await
            .repair(pb::RepairRequest {
                study_handle: String::new(),
                dry_run: true,
                evacuate_node: String::new(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        studies += page.studies;
        checked += page.fragments_checked;
        assert!(page.studies <= 2, "{page:?}");
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(page.next_page_token > token, "tokens move forward");
        token = page.next_page_token;
    }
    assert_eq!((pages, studies), (2, clean.studies));
    assert_eq!(checked, clean.fragments_checked);
    stack.shutdown().await;
}

/// The gateway's background repairer (here every second, at its bounded
/// rate) brings a replaced, empty node's fragments back without anyone
/// running `repair`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_background_repairer_rebuilds_a_lost_disk() {
    let opts = DevOptions {
        repair_interval_secs: Some(1),
        ..options()
    };
    let (_tmp, mut stack) = start(&opts).await;
    let img = image();
    let stored = store_image(&stack, &img).await;
    lose_disk(&mut stack, "storage-3").await;
    assert!(
        !verify(&stack, &stored.study_handle)
            .await
            .fragment_problems
            .is_empty(),
        "the lost disk's fragments are missing at first"
    );
    // Wait (bounded) for a background pass to rebuild them.
    let mut healed = false;
    for _ in 0..120 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        if verify(&stack, &stored.study_handle)
            .await
            .fragment_problems
            .is_empty()
        {
            healed = true;
            break;
        }
    }
    assert!(
        healed,
        "no background pass rebuilt the fragments within 30 s"
    );
    let scrub = repair(&stack, true, "").await;
    assert_eq!(
        scrub.fragments_missing + scrub.fragments_corrupt,
        0,
        "{scrub:?}"
    );
    stack.shutdown().await;
}

/// Failure domains: 5 nodes in zones of 2, 2 and 1, objects as 2 + 1
/// fragments. Placement spreads each object across the zones first (one
/// fragment per zone; picking 3 of the 5 nodes by rendezvous order alone
/// would do so for only 4 objects in 10), so a whole zone down (both its
/// nodes) still leaves every study readable; repair then finds the zone's
/// fragments unreachable, and a scrub after its return finds nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_zone_down_loses_no_study() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DevOptions {
        storage_nodes: 5,
        erasure: Some((2, 1)),
        nodes_per_zone: 2,
        ..DevOptions::default()
    };
    let mut stack = DevStack::start(tmp.path(), &opts).await.unwrap();
    let zone_of = |node: &str| -> usize {
        let i: usize = node.trim_start_matches("storage-").parse().unwrap();
        (i - 1) / 2
    };
    let img = image();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let stored = store_image(&stack, &img).await;
        for p in &stored.placements {
            assert_eq!(p.fragments.len(), 3, "{p:?}");
            let mut per_zone = [0usize; 3];
            for f in &p.fragments {
                per_zone[zone_of(&f.node)] += 1;
            }
            assert!(
                per_zone == [1, 1, 1],
                "{}: fragments per zone {per_zone:?}: not spread across the zones first",
                p.object_id
            );
        }
        handles.push(stored.study_handle);
    }
    // zone-a (storage-1 and storage-2) goes down as a whole.
    assert!(stack.stop("storage-1").await);
    assert!(stack.stop("storage-2").await);
    for h in &handles {
        let rid = grant(&stack, "clinician", h, 1).await;
        assert_eq!(retrieve_image(&stack, h, &rid).await, img.to_le_bytes());
        let v = verify(&stack, h).await;
        assert!(v.report.unwrap().intact);
        assert!(
            v.fragment_problems
                .iter()
                .all(|p| p.contains("storage-1") || p.contains("storage-2")),
            "{:?}",
            v.fragment_problems
        );
    }
    let scrub = repair(&stack, true, "").await;
    assert!(scrub.fragments_unreachable > 0, "{scrub:?}");
    stack.restart_storage("storage-1").await.unwrap();
    stack.restart_storage("storage-2").await.unwrap();
    let clean = repair(&stack, true, "").await;
    assert_eq!(
        clean.fragments_missing + clean.fragments_corrupt + clean.fragments_unreachable,
        0,
        "{clean:?}"
    );
    stack.shutdown().await;
}
