//! DICOM through the whole suite in-process over real mutual TLS: a
//! multi-instance study stored, retrieved byte-identical by a clinician and
//! de-identified for a researcher, duplicates, bad input with nothing left
//! behind, no identity on the storage nodes, delete; and (with
//! TESSERA_DICOM_DATA set, as `./x unit` does) every file of pydicom-data
//! stored and retrieved byte-identical or refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dicom_dictionary_std::tags;
use gateway_service::client as gw;
use sha2::{Digest, Sha256};
use tessera_devstack::{DevOptions, DevStack};
use tessera_dicom::synth::{StudyInfo, ct_slice};
use tessera_proto::gateway::v1 as pb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{gateway, grant, start, storage, total_objects};
use tonic::Code;

async fn retrieve_all(
    stack: &DevStack,
    who: &str,
    handle: &str,
    rid: &str,
) -> Result<Vec<(pb::DicomInstanceHeader, Vec<u8>)>, tonic::Status> {
    let mut out = Vec::new();
    gw::retrieve_dicom(&mut gateway(stack, who).await, handle, rid, |h, b| {
        out.push((h, b));
        Ok(())
    })
    .await?;
    Ok(out)
}

async fn verify_study(stack: &DevStack, handle: &str) -> pb::VerifyStudyResponse {
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

fn study() -> StudyInfo {
    StudyInfo {
        patient_name: "Quixote^Alonso^Q".into(),
        patient_id: "MRN-55102-ZZ".into(),
        patient_birth_date: "19470923".into(),
        study_date: "20260301".into(),
        institution: "Hospital de La Mancha".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.77".into(),
    }
}

fn slices(info: &StudyInfo, n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let px: Vec<u16> = (0..64 * 48u32)
                .map(|p| ((p * 7 + i * 131) % 4096) as u16)
                .collect();
            ct_slice(info, i, 48, 64, &px).unwrap()
        })
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dicom_study_round_trip_deidentify_duplicates_bad_input_delete() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let info = study();
    let files = slices(&info, 3);
    let mut clin = gateway(&stack, "clinician").await;

    // Three instances, one study handle; the first opens it.
    let mut handle = String::new();
    for (i, f) in files.iter().enumerate() {
        let r = gw::store_dicom(&mut clin, OWNER, f).await.unwrap();
        assert_eq!(r.new_study, i == 0);
        assert!(!r.duplicate);
        assert_eq!(r.pixels, pb::PixelHandling::Watermarked as i32);
        assert_eq!(r.sha256, Sha256::digest(f).to_vec());
        // Two pixel shares and the metadata object on three distinct nodes.
        assert_eq!(r.placements.len(), 3);
        let nodes: BTreeSet<_> = r.placements.iter().map(|p| p.node.clone()).collect();
        assert_eq!(nodes.len(), 3, "{:?}", r.placements);
        if i == 0 {
            handle = r.study_handle.clone();
        }
        assert_eq!(r.study_handle, handle);
    }
    let objects = total_objects(&stack, 3).await;
    assert_eq!(objects, 9);

    // The study is found by the values that identify it (owner and
    // clinician only).
    let find = pb::FindDicomStudyRequest {
        owner: OWNER.into(),
        patient_id: info.patient_id.clone(),
        study_instance_uid: info.study_uid(),
    };
    let found = clin
        .find_dicom_study(find.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (found.study_handle.as_str(), found.instances),
        (handle.as_str(), 3)
    );
    let e = gateway(&stack, "researcher")
        .await
        .find_dicom_study(find.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = clin
        .find_dicom_study(pb::FindDicomStudyRequest {
            patient_id: "someone else".into(),
            ..find.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The same instance again: answered as a duplicate, nothing written;
    // the same SOP Instance UID with other bytes: ALREADY_EXISTS.
    let again = gw::store_dicom(&mut clin, OWNER, &files[1]).await.unwrap();
    assert!(again.duplicate && !again.new_study);
    let mut altered = files[1].clone();
    let n = altered.len();
    altered[n - 1] ^= 1;
    let e = gw::store_dicom(&mut clin, OWNER, &altered)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(total_objects(&stack, 3).await, objects);

    // Bad input: refused with a clear error, nothing stored.
    for (bad, what) in [
        (files[0][..files[0].len() / 2].to_vec(), "truncated"),
        (b"not a dicom file at all, just text".repeat(10), "text"),
        (vec![0u8; 200], "zeros"),
    ] {
        let e = gw::store_dicom(&mut clin, OWNER, &bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("file:"), "{what}: {}", e.message());
    }
    let e = gw::store_dicom(
        &mut clin,
        "spiffe://tessera.local/service/gateway",
        &files[0],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(total_objects(&stack, 3).await, objects);
    // Neither an outsider nor a researcher may store.
    for who in ["outsider", "researcher"] {
        let e = gw::store_dicom(&mut gateway(&stack, who).await, OWNER, &files[0])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }

    // No grant, no files; the image RPCs refuse a DICOM study by name.
    let e = retrieve_all(&stack, "clinician", &handle, "rq-doesnotexist")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::NotFound | Code::PermissionDenied | Code::InvalidArgument
        ),
        "{e:?}"
    );
    let rid = grant(&stack, "clinician", &handle, 1).await;
    let e = gw::retrieve(&mut clin, &handle, &rid).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Clinician: every instance byte-identical, in store order, with identity.
    let got = retrieve_all(&stack, "clinician", &handle, &rid)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    for (i, ((h, bytes), f)) in got.iter().zip(&files).enumerate() {
        assert_eq!(bytes, f, "instance {i} must be byte-identical");
        assert!(!h.deidentified);
        assert_eq!((h.index, h.count), (i as u32, 3));
        assert!(h.report.as_ref().unwrap().intact);
        assert!(
            h.patient_attributes
                .iter()
                .any(|a| a.value == info.patient_name)
        );
    }
    // The grant had one use.
    let e = retrieve_all(&stack, "clinician", &handle, &rid)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Researcher: de-identified files, no identity, UIDs replaced
    // consistently across the study.
    let rrid = grant(&stack, "researcher", &handle, 1).await;
    let got = retrieve_all(&stack, "researcher", &handle, &rrid)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    let mut study_uids = BTreeSet::new();
    for (h, bytes) in &got {
        assert!(h.deidentified && h.patient_attributes.is_empty());
        for secret in [
            info.patient_name.as_str(),
            "Quixote",
            info.patient_id.as_str(),
            info.patient_birth_date.as_str(),
            info.institution.as_str(),
            info.uid_root.as_str(),
        ] {
            assert!(
                !contains(bytes, secret),
                "{secret:?} in a de-identified file"
            );
        }
        let obj = dicom_object::OpenFileOptions::new()
            .from_reader(&bytes[128..])
            .unwrap();
        let text = |t| {
            obj.element(t)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_string()
        };
        assert_eq!(text(tags::PATIENT_IDENTITY_REMOVED), "YES");
        assert!(text(tags::DEIDENTIFICATION_METHOD).len() > 4);
        let uid = text(tags::STUDY_INSTANCE_UID);
        assert!(uid.starts_with("2.25."), "{uid}");
        study_uids.insert(uid);
        // The pixels are the original ones.
        let px = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        assert_eq!(px.len(), 64 * 48 * 2);
    }
    assert_eq!(study_uids.len(), 1, "one study UID for the whole study");

    // Nothing identifying on the storage nodes' redb files.
    for i in 1..=3 {
        let raw = std::fs::read(stack.storage_db(&format!("storage-{i}")).unwrap()).unwrap();
        for secret in [
            "Quixote",
            info.patient_id.as_str(),
            info.institution.as_str(),
            info.uid_root.as_str(),
        ] {
            assert!(!contains(&raw, secret), "{secret:?} on storage-{i}");
        }
    }

    // Verify (no grant, nothing released): every instance intact.
    let v = verify_study(&stack, &handle).await;
    assert_eq!(v.instances.len(), 3);
    assert!(v.report.as_ref().unwrap().intact);
    assert!(v.instances.iter().all(|i| i.intact && i.problem.is_empty()));

    // A cloud alters one byte of instance 2's share 2 and another byte of
    // instance 3's metadata object: verify names both instances, and a
    // retrieve refuses with DATA_LOSS instead of returning altered files.
    let stored = |i: usize| {
        let files = &files;
        let mut c = clin.clone();
        async move { gw::store_dicom(&mut c, OWNER, &files[i]).await.unwrap() }
    };
    let (s2, s3) = (stored(1).await, stored(2).await);
    assert!(s2.duplicate && s3.duplicate);
    for (p, at) in [
        (s2.placements.iter().find(|p| p.share == 2).unwrap(), 0.5),
        (s3.placements.iter().find(|p| p.share == 0).unwrap(), 0.9),
    ] {
        let mut node = storage(&stack, &p.node).await;
        let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &p.object_id)
            .await
            .unwrap();
        let i = (bytes.len() as f64 * at) as usize;
        bytes[i] ^= 0x20;
        tessera_storage_client::replace_object(&mut node, &p.object_id, &bytes)
            .await
            .unwrap();
    }
    let v = verify_study(&stack, &handle).await;
    assert!(!v.report.as_ref().unwrap().intact);
    let bad: Vec<_> = v.instances.iter().filter(|i| !i.intact).collect();
    assert_eq!(bad.len(), 2, "{:?}", v.instances);
    assert_eq!(bad[0].instance_id, s2.instance_id);
    let r = bad[0].report.as_ref().unwrap();
    assert!(r.tampered_tile_count >= 1 && r.tampered_tiles.iter().all(|t| t.shares == vec![2]));
    assert_eq!(bad[1].instance_id, s3.instance_id);
    assert!(bad[1].problem.contains("metadata"), "{}", bad[1].problem);
    let rid = grant(&stack, "clinician", &handle, 1).await;
    let e = retrieve_all(&stack, "clinician", &handle, &rid)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains(&s2.instance_id), "{}", e.message());

    // Delete: every object and the keys go.
    let d = gateway(&stack, "owner")
        .await
        .delete(pb::DeleteStudyRequest {
            study_handle: handle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.removed.len(), 9);
    assert!(d.key_destroyed);
    assert_eq!(total_objects(&stack, 3).await, 0);
    let e = retrieve_all(&stack, "clinician", &handle, &rid)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Stored again after the delete: a new study.
    let r = gw::store_dicom(&mut clin, OWNER, &files[0]).await.unwrap();
    assert!(r.new_study && r.study_handle != handle);
    stack.shutdown().await;
}

/// Every pydicom-data file: stored and retrieved byte-identical when
/// tessera-dicom reads it, refused with INVALID_ARGUMENT otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_pydicom_data_file_round_trips_or_is_refused() {
    let dir = tessera_testkit::pydicom_data();
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 60);
    let mut clin = gateway(&stack, "clinician").await;
    // pydicom-data holds one instance in several transfer syntaxes (same
    // SOP Instance UID, other bytes): those are ALREADY_EXISTS in one
    // study, so they go in a later round after the earlier studies are
    // deleted.
    let (mut stored, mut refused, mut sealed, mut rounds) = (0, 0, 0, 0);
    let mut todo = paths.clone();
    while !todo.is_empty() {
        rounds += 1;
        assert!(rounds <= 24, "too many rounds: {todo:?}");
        let mut later = Vec::new();
        let mut by_sha: BTreeMap<Vec<u8>, PathBuf> = BTreeMap::new();
        let mut handles = BTreeSet::new();
        for p in todo {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap();
            let readable = tessera_dicom::split_for_store(&bytes, &Default::default()).is_ok();
            match gw::store_dicom(&mut clin, OWNER, &bytes).await {
                Ok(r) => {
                    assert!(readable, "{name}: stored but tessera-dicom refuses it");
                    assert!(!r.duplicate, "{name}: no file is given twice");
                    by_sha.insert(Sha256::digest(&bytes).to_vec(), p.clone());
                    if r.pixels == pb::PixelHandling::Sealed as i32 {
                        sealed += 1;
                    }
                    handles.insert(r.study_handle);
                    stored += 1;
                }
                Err(e) if e.code() == Code::AlreadyExists => later.push(p),
                Err(e) => {
                    assert!(!readable, "{name}: readable but refused: {e:?}");
                    assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
                    refused += 1;
                }
            }
        }
        let mut seen = 0;
        for h in &handles {
            let rid = grant(&stack, "clinician", h, 1).await;
            for (head, bytes) in retrieve_all(&stack, "clinician", h, &rid).await.unwrap() {
                let sha = Sha256::digest(&bytes).to_vec();
                let path = by_sha.get(&sha).unwrap_or_else(|| {
                    panic!("instance {} matches no stored file", head.instance_id)
                });
                assert_eq!(
                    bytes,
                    std::fs::read(path).unwrap(),
                    "{} must come back byte-identical",
                    path.display()
                );
                seen += 1;
            }
            gateway(&stack, "owner")
                .await
                .delete(pb::DeleteStudyRequest {
                    study_handle: h.clone(),
                })
                .await
                .unwrap();
        }
        assert_eq!(seen, by_sha.len());
        todo = later;
    }
    println!(
        "pydicom-data: {stored} stored and retrieved byte-identical ({sealed} with sealed pixels), {refused} refused, {rounds} rounds"
    );
    assert!(
        stored >= 60 && sealed >= 10,
        "{stored} stored, {sealed} sealed"
    );
    assert_eq!(total_objects(&stack, 3).await, 0);
    stack.shutdown().await;
}

/// A study sent over C-STORE (our SCU against the gateway's SCP) lands in
/// one study for the configured owner and comes back byte-identical to the
/// file the SCP wrote (its file meta + the data set as sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c_store_study_lands_in_one_study_and_round_trips() {
    use tessera_scp::scu::{ScuError, ScuOptions, send_files};
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let addr = stack.endpoints().get("dicom").unwrap().to_owned();
    let mut info = study();
    info.uid_root = "1.2.826.0.1.3680043.10.1137.78".into();
    let files = slices(&info, 4);
    let opts = ScuOptions {
        calling_ae: "MODALITY".into(),
        called_ae: tessera_devstack::DICOM_AE_TITLE.into(),
        ..ScuOptions::default()
    };
    let mut calls = 0;
    let sent = send_files(&addr, &opts, &files, |_, _| calls += 1)
        .await
        .unwrap();
    assert_eq!(sent.len(), 4);
    assert!(sent.iter().all(|s| s.status == 0), "{sent:?}");
    assert!(calls >= 4);
    // Unknown calling AE title: the association is rejected.
    let intruder = ScuOptions {
        calling_ae: "INTRUDER".into(),
        ..opts.clone()
    };
    assert!(matches!(
        send_files(&addr, &intruder, &files[..1], |_, _| {}).await,
        Err(ScuError::Rejected { .. })
    ));
    // A data set that does not parse: 0xC000 with the gateway's reason.
    let mut broken = files[0].clone();
    let n = broken.len();
    broken.truncate(n - 64 * 48);
    let bad = send_files(&addr, &opts, &[broken], |_, _| {})
        .await
        .unwrap();
    assert_eq!(bad[0].status, 0xC000, "{bad:?}");
    assert!(bad[0].error_comment.is_some());

    let mut clin = gateway(&stack, "clinician").await;
    let found = clin
        .find_dicom_study(pb::FindDicomStudyRequest {
            owner: tessera_devstack::DICOM_OWNER.into(),
            patient_id: info.patient_id.clone(),
            study_instance_uid: info.study_uid(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.instances, 4);
    let rid = grant(&stack, "clinician", &found.study_handle, 1).await;
    let got = retrieve_all(&stack, "clinician", &found.study_handle, &rid)
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    let meta_end = |f: &[u8]| {
        let group = u32::from_le_bytes([f[140], f[141], f[142], f[143]]) as usize;
        144 + group
    };
    for ((_, bytes), f) in got.iter().zip(&files) {
        assert_eq!(
            &bytes[meta_end(bytes)..],
            &f[meta_end(f)..],
            "data set as sent"
        );
        assert!(
            contains(bytes, "MODALITY"),
            "the SCP records the source AE title"
        );
    }
    // The unauthenticated calling AE title is not who stored the study:
    // the configured Tessera identity (default: the gateway's own) is.
    let cfg = stack.gateway_config().unwrap().clone();
    assert!(stack.stop("gateway").await);
    let key = gateway_service::vault::load_key_file(&cfg.vault.key_file).unwrap();
    let vault = gateway_service::vault::Vault::open(&cfg.vault.path, &key).unwrap();
    let rec = vault.get(&found.study_handle).unwrap().unwrap();
    assert_eq!(rec.stored_by, "spiffe://tessera.local/service/gateway");
    drop(vault);
    stack.shutdown().await;
}

/// The DICOM store reuses the last NodeInfo probe for a moment. A node
/// stopped since: the put on it fails, the cached probe is forgotten and
/// the instance is placed again on the nodes that answer. The failed
/// attempt's record stays pending for the sweep (its object on the stopped
/// node could not be removed); its SOP Instance UID was freed.
#[tokio::test]
async fn a_store_placed_on_a_stale_probe_is_placed_again() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let mut info = study();
    info.uid_root = "1.2.826.0.1.3680043.10.1137.79".into();
    let files = slices(&info, 2);
    let mut clin = gateway(&stack, "clinician").await;
    // Three objects on the three nodes: the probe is cached now.
    let first = gw::store_dicom(&mut clin, OWNER, &files[0]).await.unwrap();
    assert_eq!(first.placements.len(), 3);
    let t0 = std::time::Instant::now();
    assert!(stack.stop("storage-3").await);
    assert!(
        t0.elapsed() < gateway_service::upstream::PLACEMENT_PROBE_TTL / 2,
        "the node stopped within the probe's TTL ({:?})",
        t0.elapsed()
    );
    // Placed on the cached probe (storage-3 among the nodes), refused,
    // placed again on storage-1 and -2.
    let second = gw::store_dicom(&mut clin, OWNER, &files[1]).await.unwrap();
    assert!(!second.duplicate);
    assert_eq!(second.study_handle, first.study_handle);
    let nodes: BTreeSet<_> = second.placements.iter().map(|p| p.node.clone()).collect();
    assert!(!nodes.contains("storage-3"), "{:?}", second.placements);
    // Stored once: the same file again is a duplicate.
    let again = gw::store_dicom(&mut clin, OWNER, &files[1]).await.unwrap();
    assert!(again.duplicate);
    // Both instances retrieved once the first's node is back.
    stack.restart_storage("storage-3").await.unwrap();
    let rid = grant(&stack, "clinician", &first.study_handle, 1).await;
    let got = retrieve_all(&stack, "clinician", &first.study_handle, &rid)
        .await
        .unwrap();
    assert_eq!(got.len(), 2);

    let cfg = stack.gateway_config().unwrap().clone();
    assert!(stack.stop("gateway").await);
    let key = gateway_service::vault::load_key_file(&cfg.vault.key_file).unwrap();
    let vault = gateway_service::vault::Vault::open(&cfg.vault.path, &key).unwrap();
    let states: Vec<_> = vault
        .instances(&first.study_handle)
        .unwrap()
        .into_iter()
        .map(|i| (i.sop_instance_uid, i.state))
        .collect();
    let pending: Vec<_> = states
        .iter()
        .filter(|(_, s)| *s == gateway_service::vault::StudyState::Pending)
        .collect();
    assert_eq!(
        pending.len(),
        1,
        "the failed attempt, for the sweep: {states:?}"
    );
    assert_eq!(states.len(), 3, "{states:?}");
    let sop = &pending[0].0;
    let committed = vault
        .instance_by_sop(&first.study_handle, sop)
        .unwrap()
        .unwrap();
    assert_eq!(
        committed.state,
        gateway_service::vault::StudyState::Committed,
        "the SOP Instance UID names the stored instance"
    );
    drop(vault);
    stack.shutdown().await;
}

/// Our C-GET SCU against the gateway's SCP: a study sent over C-STORE is
/// refused to a viewer AE without a grant (0x0124, nothing received, the
/// refusal names how to ask), then, with a one-use grant, comes back over
/// C-GET with every data set byte-identical to what was sent, at the
/// study, series and image levels (the grant spent once per C-GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c_get_scu_retrieves_what_c_store_sent_byte_identical() {
    use dicom_dictionary_std::uids;
    use tessera_scp::scu::get::GetRequest;
    use tessera_scp::scu::{self, ScuOptions, send_files};
    use tessera_scp::{QueryKey, StoreOutcome};
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let addr = stack.endpoints().get("dicom").unwrap().to_owned();
    let mut info = study();
    info.uid_root = "1.2.826.0.1.3680043.10.1137.79".into();
    let files = slices(&info, 5);
    let modality = ScuOptions {
        calling_ae: "MODALITY".into(),
        called_ae: tessera_devstack::DICOM_AE_TITLE.into(),
        ..ScuOptions::default()
    };
    let sent = send_files(&addr, &modality, &files, |_, _| {})
        .await
        .unwrap();
    assert!(sent.iter().all(|s| s.status == 0), "{sent:?}");
    let meta_end = |f: &[u8]| {
        let group = u32::from_le_bytes([f[140], f[141], f[142], f[143]]) as usize;
        144 + group
    };
    let by_uid: BTreeMap<String, Vec<u8>> = files
        .iter()
        .zip(&sent)
        .map(|(f, s)| (s.sop_instance_uid.clone(), f[meta_end(f)..].to_vec()))
        .collect();
    let viewer = ScuOptions {
        calling_ae: "VIEWER".into(),
        ..modality.clone()
    };
    // ct_slice writes Explicit VR Little Endian.
    let ts = "1.2.840.10008.1.2.1".to_string();
    let request = |level: &str, keys: Vec<QueryKey>| GetRequest {
        level: level.into(),
        keys,
        storage_contexts: vec![(uids::CT_IMAGE_STORAGE.into(), ts.clone())],
        max_instance_bytes: 16 << 20,
    };
    let study_key = QueryKey {
        tag: (0x0020, 0x000D),
        value: info.study_uid(),
    };

    // No grant: refused before anything is read, with how to ask.
    let mut got = Vec::new();
    let refused = scu::get::get(
        &addr,
        &viewer,
        &request("STUDY", vec![study_key.clone()]),
        |r| {
            got.push(r);
            StoreOutcome::Stored
        },
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 0x0124, "{refused:?}");
    assert!(got.is_empty());
    assert!(
        refused
            .error_comment
            .as_deref()
            .is_some_and(|c| c.contains("request-key")),
        "{refused:?}"
    );

    // A grant of three uses: study, series, image level.
    let mut clin = gateway(&stack, "clinician").await;
    let found = clin
        .find_dicom_study(pb::FindDicomStudyRequest {
            owner: tessera_devstack::DICOM_OWNER.into(),
            patient_id: info.patient_id.clone(),
            study_instance_uid: info.study_uid(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.instances, 5);
    grant(&stack, "clinician", &found.study_handle, 3).await;

    let mut got = Vec::new();
    let whole = scu::get::get(
        &addr,
        &viewer,
        &request("STUDY", vec![study_key.clone()]),
        |r| {
            got.push(r);
            StoreOutcome::Stored
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (whole.status, whole.completed, whole.failed, whole.received),
        (0x0000, 5, 0, 5),
        "{whole:?}"
    );
    let seen: BTreeSet<String> = got.iter().map(|r| r.sop_instance_uid.clone()).collect();
    assert_eq!(seen.len(), 5);
    for r in &got {
        assert_eq!(r.transfer_syntax, ts);
        assert_eq!(
            r.dataset(),
            &by_uid[&r.sop_instance_uid][..],
            "data set byte-identical"
        );
        // The file we build is a Part 10 file dicom-object reads.
        dicom_object::OpenFileOptions::new()
            .from_reader(&r.file[128..])
            .unwrap();
    }

    // Image level, two instances; one refused by us (a failed
    // sub-operation: 0xB000, the other completed).
    let two: Vec<String> = sent
        .iter()
        .take(2)
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    let keys = vec![
        study_key.clone(),
        QueryKey {
            tag: (0x0020, 0x000E),
            value: format!("{}.2", info.uid_root),
        },
        QueryKey {
            tag: (0x0008, 0x0018),
            value: two.join("\\"),
        },
    ];
    let mut n = 0;
    let partial = scu::get::get(&addr, &viewer, &request("IMAGE", keys), |r| {
        n += 1;
        if r.sop_instance_uid == two[0] {
            StoreOutcome::Refused {
                status: 0xA700,
                reason: "test: out of room".into(),
            }
        } else {
            StoreOutcome::Stored
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (partial.status, partial.completed, partial.failed, n),
        (0xB000, 1, 1, 2),
        "{partial:?}"
    );

    // A storage context the stored syntax is not in: every sub-operation
    // fails at the SCP (nothing is transcoded), 0xA702.
    let mut other = request("STUDY", vec![study_key.clone()]);
    other.storage_contexts = vec![(uids::CT_IMAGE_STORAGE.into(), "1.2.840.10008.1.2".into())];
    let none = scu::get::get(&addr, &viewer, &other, |_| StoreOutcome::Stored)
        .await
        .unwrap();
    assert_eq!((none.status, none.received), (0xA702, 0), "{none:?}");

    // The grant is spent (three uses): refused again.
    let spent = scu::get::get(&addr, &viewer, &request("STUDY", vec![study_key]), |_| {
        StoreOutcome::Stored
    })
    .await
    .unwrap();
    assert_eq!(spent.status, 0x0124, "{spent:?}");
    stack.shutdown().await;
}

/// The AE-to-request rule (`[[dicom.scp.peers]] request`): the clinician
/// holds two one-use grants on the study; `VIEWER` is pinned to the one
/// that expires last. Its first C-GET spends that one, and its second is
/// refused although the other grant still has a use (without the rule the
/// gateway would take the one expiring first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_ae_spends_its_configured_request_only() {
    use dicom_dictionary_std::uids;
    use tessera_scp::scu::get::GetRequest;
    use tessera_scp::scu::{self, ScuOptions, send_files};
    use tessera_scp::{QueryKey, StoreOutcome};
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let addr = stack.endpoints().get("dicom").unwrap().to_owned();
    let mut info = study();
    info.uid_root = "1.2.826.0.1.3680043.10.1137.80".into();
    let files = slices(&info, 2);
    let opts = ScuOptions {
        calling_ae: "MODALITY".into(),
        called_ae: tessera_devstack::DICOM_AE_TITLE.into(),
        ..ScuOptions::default()
    };
    let sent = send_files(&addr, &opts, &files, |_, _| {}).await.unwrap();
    assert!(sent.iter().all(|s| s.status == 0), "{sent:?}");
    let handle = gateway(&stack, "clinician")
        .await
        .find_dicom_study(pb::FindDicomStudyRequest {
            owner: tessera_devstack::DICOM_OWNER.into(),
            patient_id: info.patient_id.clone(),
            study_instance_uid: info.study_uid(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_handle;
    // grant() approves for 600 s; the second request expires later.
    let first = grant(&stack, "clinician", &handle, 1).await;
    let req = gateway(&stack, "clinician")
        .await
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.clone(),
            justification: "pinned".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    tessera_testkit::suite::keyserver(&stack, "owner")
        .await
        .approve_request(tessera_proto::keyserver::v1::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 3000,
            uses: 1,
        })
        .await
        .unwrap();
    assert_ne!(first, req.request_id);

    let mut cfg = stack.gateway_config().unwrap().clone();
    let scp = cfg.dicom.scp.as_mut().unwrap();
    let viewer = scp
        .peers
        .iter_mut()
        .find(|p| p.ae_title == "VIEWER")
        .unwrap();
    viewer.request = Some(req.request_id.clone());
    assert!(stack.stop("gateway").await);
    stack.set_gateway_config(cfg);
    stack.restart_gateway().await.unwrap();
    let addr = stack.endpoints().get("dicom").unwrap().to_owned();

    let viewer = ScuOptions {
        calling_ae: "VIEWER".into(),
        ..opts.clone()
    };
    let request = GetRequest {
        level: "STUDY".into(),
        keys: vec![QueryKey {
            tag: (0x0020, 0x000D),
            value: info.study_uid(),
        }],
        storage_contexts: vec![(uids::CT_IMAGE_STORAGE.into(), "1.2.840.10008.1.2.1".into())],
        max_instance_bytes: 16 << 20,
    };
    let got = scu::get::get(&addr, &viewer, &request, |_| StoreOutcome::Stored)
        .await
        .unwrap();
    assert_eq!((got.status, got.received), (0x0000, 2), "{got:?}");
    let again = scu::get::get(&addr, &viewer, &request, |_| StoreOutcome::Stored)
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.received),
        (0x0124, 0),
        "the pinned request is spent; the other grant is not taken: {again:?}"
    );
    // The other grant was not touched: RetrieveDicom with it still works.
    let out = retrieve_all(&stack, "clinician", &handle, &first)
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    stack.shutdown().await;
}
