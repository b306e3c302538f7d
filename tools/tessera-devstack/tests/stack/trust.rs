//! The gateway's trust rules on the live suite (issue 11, findings 2, 3, 4,
//! 9 and 10): who owns a stored study, who may verify it or find it, a
//! tampered image refused unless asked for, and users reading ciphertext
//! only through the gateway. `tessera dev up` (and `DevStack`) make
//! `clinician` a delegate of `owner`; `clinician2` is not one.

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::storage::v1 as spb;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{channel, gateway, grant, start, storage};
use tonic::Code;

const CLINICIAN: &str = "spiffe://tessera.local/user/clinician";

fn image() -> Image {
    tessera_image::phantom::head_phantom(96, 80, 1, PixelFormat::gray16(12, false), 3).unwrap()
}

fn header(owner: &str, img: &Image) -> pb::StoreHeader {
    pb::StoreHeader {
        owner: owner.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-TRUST-1".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 16,
            y: 16,
            width: 48,
            height: 32,
        }),
    }
}

async fn store(
    stack: &DevStack,
    who: &str,
    owner: &str,
    img: &Image,
) -> Result<pb::StoreResponse, tonic::Status> {
    gw::store(
        &mut gateway(stack, who).await,
        header(owner, img),
        &img.to_le_bytes(),
    )
    .await
}

fn verify_req(handle: &str, rid: &str) -> pb::VerifyStudyRequest {
    pb::VerifyStudyRequest {
        study_handle: handle.into(),
        key_request_id: rid.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ownership_delegation_verify_tamper_and_share_relay() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let img = image();

    // Finding 3: the uploader cannot choose the owner. clinician2 is no
    // delegate of owner: refused, and nothing is stored.
    let e = store(&stack, "clinician2", OWNER, &img).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("delegate"), "{}", e.message());
    // A clinician cannot own a study (it could never approve a request).
    let e = store(&stack, "clinician", CLINICIAN, &img)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An empty owner is the caller: the owner stores for itself.
    let own = store(&stack, "owner", "", &img).await.unwrap();
    // The delegate stores for the owner.
    let stored = store(&stack, "clinician", OWNER, &img).await.unwrap();
    let handle = stored.study_handle.clone();

    // Finding 2: Verify needs the owner, a delegate, or a grant.
    let mut owner_gw = gateway(&stack, "owner").await;
    let r = owner_gw.verify(verify_req(&own.study_handle, "")).await;
    assert!(r.is_ok(), "{r:?}");
    let r = gateway(&stack, "clinician")
        .await
        .verify(verify_req(&handle, ""))
        .await;
    assert!(r.is_ok(), "the owner's delegate verifies: {r:?}");
    let mut c2 = gateway(&stack, "clinician2").await;
    let e = c2.verify(verify_req(&handle, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = gateway(&stack, "researcher")
        .await
        .verify(verify_req(&handle, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // With clinician2's own approved grant (not spent by verify).
    let rid = grant(&stack, "clinician2", &handle, 2).await;
    let report = c2
        .verify(verify_req(&handle, &rid))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(report.intact);
    // Another user's grant does not open it for the researcher.
    let e = gateway(&stack, "researcher")
        .await
        .verify(verify_req(&handle, &rid))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Finding 10: users read ciphertext only through the gateway, with a
    // grant; the relayed share is the node's object byte for byte.
    let e = gateway(&stack, "researcher")
        .await
        .fetch_share(pb::FetchShareRequest {
            study_handle: handle.clone(),
            key_request_id: rid.clone(),
            share: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let p1 = stored.placements.iter().find(|p| p.share == 1).unwrap();
    let mut relayed = Vec::new();
    let mut s = c2
        .fetch_share(pb::FetchShareRequest {
            study_handle: handle.clone(),
            key_request_id: rid.clone(),
            share: 1,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = s.message().await.unwrap() {
        relayed.extend_from_slice(&m.chunk);
    }
    let mut node = storage(&stack, &p1.node).await;
    let (_, at_node) = tessera_storage_client::get_object(&mut node, &p1.object_id)
        .await
        .unwrap();
    assert_eq!(relayed, at_node);
    let e = tessera_storage_client::client(channel(&stack, "clinician2", &p1.node).await)
        .get(spb::GetRequest {
            object_id: p1.object_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "users never reach a node");

    // Finding 9: a tampered image is refused with DATA_LOSS naming the
    // tiles, and the refusal spends no use.
    let p2 = stored.placements.iter().find(|p| p.share == 2).unwrap();
    let mut node2 = storage(&stack, &p2.node).await;
    let (_, mut bytes) = tessera_storage_client::get_object(&mut node2, &p2.object_id)
        .await
        .unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x08;
    tessera_storage_client::replace_object(&mut node2, &p2.object_id, &bytes)
        .await
        .unwrap();
    for _ in 0..3 {
        let e = gw::retrieve(&mut c2, &handle, &rid).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e:?}");
        assert!(e.message().contains("tiles ["), "{}", e.message());
    }
    // Two uses were granted and none spent: allow_tampered gets the image
    // with its report first, twice, then the grant is used up.
    for _ in 0..2 {
        let (h, _pixels) = gw::retrieve_with_progress(
            &mut c2,
            pb::RetrieveRequest {
                study_handle: handle.clone(),
                key_request_id: rid.clone(),
                allow_tampered: true,
            },
            |_, _| {},
        )
        .await
        .unwrap();
        let report = h.report.unwrap();
        assert!(!report.intact && report.tampered_tile_count >= 1);
    }
    let e = gw::retrieve_with_progress(
        &mut c2,
        pb::RetrieveRequest {
            study_handle: handle.clone(),
            key_request_id: rid.clone(),
            allow_tampered: true,
        },
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn find_dicom_study_only_for_the_owner_and_delegates() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let find = |owner: &str| pb::FindDicomStudyRequest {
        owner: owner.into(),
        patient_id: "P-NONE".into(),
        study_instance_uid: "1.2.3.4".into(),
    };
    // Finding 4: a clinician who is no delegate cannot probe the owner's
    // patients; the owner and its delegate get an honest NOT_FOUND.
    let e = gateway(&stack, "clinician2")
        .await
        .find_dicom_study(find(OWNER))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    for who in ["owner", "clinician"] {
        let e = gateway(&stack, who)
            .await
            .find_dicom_study(find(OWNER))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{who}: {e:?}");
    }
    stack.shutdown().await;
}

/// A CT slice whose Burned In Annotation is YES (the pixels may show a
/// name): written with dicom-object over a synthetic slice.
fn burned_in_slice() -> Vec<u8> {
    use dicom_dictionary_std::tags;
    let info = tessera_dicom::synth::StudyInfo {
        patient_name: "Burned^In".into(),
        patient_id: "MRN-BURN-1".into(),
        patient_birth_date: "19500101".into(),
        study_date: "20260301".into(),
        institution: "Test Hospital".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.91".into(),
    };
    let px: Vec<u16> = (0..32 * 24u32).map(|p| (p * 5 % 4096) as u16).collect();
    let file = tessera_dicom::synth::ct_slice(&info, 0, 24, 32, &px).unwrap();
    let mut obj = dicom_object::from_reader(&file[128..]).unwrap();
    obj.put(dicom_object::mem::InMemElement::new(
        tags::BURNED_IN_ANNOTATION,
        dicom_core::VR::CS,
        dicom_core::PrimitiveValue::from("YES"),
    ));
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

/// Finding 13: a researcher's (de-identified) copy of a Burned In
/// Annotation = YES instance is refused with a clear status, spending no
/// use; a clinician (re-identifying role) still gets the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burned_in_annotation_is_not_released_de_identified() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let file = burned_in_slice();
    let stored = gw::store_dicom(&mut gateway(&stack, "owner").await, OWNER, &file)
        .await
        .unwrap();
    let handle = stored.study_handle;
    let rid = grant(&stack, "researcher", &handle, 1).await;
    let mut res = gateway(&stack, "researcher").await;
    for _ in 0..2 {
        let e = gw::retrieve_dicom(&mut res, &handle, &rid, |_, _| Ok(()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("Burned In Annotation"),
            "{}",
            e.message()
        );
    }
    let crid = grant(&stack, "clinician", &handle, 1).await;
    let mut got = Vec::new();
    gw::retrieve_dicom(
        &mut gateway(&stack, "clinician").await,
        &handle,
        &crid,
        |_, f| {
            got.push(f);
            Ok(())
        },
    )
    .await
    .unwrap();
    assert_eq!(got, vec![file], "byte-identical for the clinician");
    stack.shutdown().await;
}
