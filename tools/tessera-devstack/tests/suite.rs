//! The whole suite in-process over real mutual TLS: store, access request,
//! approval, retrieve bit-identical, re-identification by role, tamper
//! localization, region-wise processing, delete with crypto-shredding, a
//! stopped storage node, bad input, and no identity or pixels at rest on
//! the storage nodes.

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::segmentation::v1 as segpb;
use tessera_proto::storage::v1 as spb;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{gateway, grant, keyserver, objects, start, storage, total_objects};
use tessera_tls::TlsFiles;
use tonic::Code;

const PATIENT_NAME: &str = "Doe^Jane^Quincy";
const PATIENT_ID: &str = "PID-7731-XQ";

fn attrs() -> Vec<ks::Attribute> {
    [
        ("patient_id", PATIENT_ID),
        ("patient_name", PATIENT_NAME),
        ("birth_date", "19610412"),
    ]
    .into_iter()
    .map(|(n, v)| ks::Attribute {
        name: n.into(),
        value: v.into(),
    })
    .collect()
}

fn header(format: pb::ImageFormat, raw_spec: Option<wpb::ImageSpec>) -> pb::StoreHeader {
    pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: attrs(),
        format: format.into(),
        size: 0,
        raw_spec,
        roi: Some(wpb::Rect {
            x: 32,
            y: 48,
            width: 64,
            height: 64,
        }),
    }
}

fn slice16() -> Image {
    tessera_image::phantom::head_phantom(128, 160, 1, PixelFormat::gray16(12, false), 7).unwrap()
}

fn raw_spec(img: &Image) -> wpb::ImageSpec {
    tessera_wire::convert::watermark::spec_to_proto(img.spec())
}

async fn store_raw(stack: &DevStack, who: &str, img: &Image) -> pb::StoreResponse {
    gw::store(
        &mut gateway(stack, who).await,
        header(pb::ImageFormat::Raw, Some(raw_spec(img))),
        &img.to_le_bytes(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_request_approve_retrieve_tamper_process_delete() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    // `dev up` makes clinician (not clinician2) a delegate of owner.
    let mut ks_gw = keyserver(&stack, "gateway").await;
    for (delegate, allowed) in [("clinician", true), ("clinician2", false)] {
        let r = ks_gw
            .check_delegate(ks::CheckDelegateRequest {
                owner: OWNER.into(),
                delegate: format!("spiffe://tessera.local/user/{delegate}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.allowed, allowed, "{delegate}");
    }
    let img = slice16();
    let stored = store_raw(&stack, "clinician", &img).await;
    let handle = stored.study_handle.clone();
    assert!(handle.starts_with("st-") && handle.len() == 35);
    assert_eq!(stored.placements.len(), 2);
    assert_ne!(stored.placements[0].node, stored.placements[1].node);

    // Retrieval needs an approved grant: none, then pending, refused.
    let mut clin = gateway(&stack, "clinician").await;
    let e = gw::retrieve(&mut clin, &handle, "rq-doesnotexist")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::NotFound | Code::InvalidArgument | Code::PermissionDenied
        ),
        "{e:?}"
    );
    let pending = clin
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.clone(),
            justification: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let e = gw::retrieve(&mut clin, &handle, &pending.request_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Approved: bit-identical, intact, identity shown to a clinician.
    let rid = grant(&stack, "clinician", &handle, 1).await;
    let (h, pixels) = gw::retrieve(&mut clin, &handle, &rid).await.unwrap();
    assert_eq!(
        pixels,
        img.to_le_bytes(),
        "restored pixels must be bit-identical"
    );
    assert!(h.report.as_ref().unwrap().intact);
    assert!(h.patient_attributes.iter().any(|a| a.value == PATIENT_NAME));
    // One use granted: a second retrieve is refused.
    let e = gw::retrieve(&mut clin, &handle, &rid).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Another user cannot ride on the clinician's grant.
    let rid2 = grant(&stack, "clinician", &handle, 3).await;
    let e = gw::retrieve(&mut gateway(&stack, "clinician2").await, &handle, &rid2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A researcher gets the pixels but never the identity.
    let rrid = grant(&stack, "researcher", &handle, 1).await;
    let (h, pixels) = gw::retrieve(&mut gateway(&stack, "researcher").await, &handle, &rrid)
        .await
        .unwrap();
    assert_eq!(pixels, img.to_le_bytes());
    assert!(h.patient_attributes.is_empty());

    // The outsider is refused everywhere.
    let mut out = gateway(&stack, "outsider").await;
    let e = gw::store(
        &mut out,
        header(pb::ImageFormat::Raw, Some(raw_spec(&img))),
        &img.to_le_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = out
        .verify(pb::VerifyStudyRequest {
            study_handle: handle.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = gw::retrieve(&mut out, &handle, &rid2).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Region-wise Gaussian across the storage nodes == local whole-image.
    let (ph, result) = gw::process(
        &mut clin,
        pb::ProcessRequest {
            study_handle: handle.clone(),
            key_request_id: rid2.clone(),
            operation: segpb::Operation::Gaussian.into(),
            block_size: 16,
            seed: 1,
        },
    )
    .await
    .unwrap();
    let local = tessera_segment::process_whole(&img, tessera_segment::Operation::Gaussian).unwrap();
    assert_eq!(
        result,
        local.to_le_bytes(),
        "region-wise == whole, bit for bit"
    );
    let nodes: std::collections::BTreeSet<_> = ph.work.iter().map(|w| w.node.clone()).collect();
    assert_eq!(nodes.len(), ph.work.len(), "each region on a distinct node");

    // Nothing identifying or any run of the pixels at rest on any node.
    let needle = img.to_le_bytes();
    for n in 1..=3 {
        let db = stack.storage_db(&format!("storage-{n}")).unwrap();
        let raw = std::fs::read(&db).unwrap();
        for bad in [PATIENT_NAME.as_bytes(), PATIENT_ID.as_bytes(), b"19610412"] {
            assert!(
                !raw.windows(bad.len()).any(|w| w == bad),
                "identity on storage-{n}"
            );
        }
        // 64-byte runs of the image taken every 4 KiB.
        for start in (0..needle.len() - 64).step_by(4096) {
            let run = &needle[start..start + 64];
            if run.iter().all(|&b| b == run[0]) {
                continue; // flat background
            }
            assert!(
                !raw.windows(64).any(|w| w == run),
                "pixels at rest on storage-{n}"
            );
        }
    }

    // A malicious cloud replaces share 2 with a flipped byte (it can keep
    // its own checksum consistent): verify names the tampered tile.
    let p2 = stored.placements.iter().find(|p| p.share == 2).unwrap();
    let mut node = storage(&stack, &p2.node).await;
    let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &p2.object_id)
        .await
        .unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    tessera_storage_client::replace_object(&mut node, &p2.object_id, &bytes)
        .await
        .unwrap();
    let report = gateway(&stack, "owner")
        .await
        .verify(pb::VerifyStudyRequest {
            study_handle: handle.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(!report.intact);
    assert!(
        report.tampered_tile_count >= 1 && report.tampered_tile_count <= 2,
        "{report:?}"
    );
    assert!(report.tampered_tiles.iter().all(|t| t.shares == vec![2]));

    // Delete: only the owner; then the shares and the key are gone.
    let e = clin
        .delete(pb::DeleteStudyRequest {
            study_handle: handle.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let d = gateway(&stack, "owner")
        .await
        .delete(pb::DeleteStudyRequest {
            study_handle: handle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.key_destroyed);
    assert_eq!(d.removed.len(), 2);
    let e = gw::retrieve(&mut clin, &handle, &rid2).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = node
        .stat(spb::StatRequest {
            object_id: p2.object_id.clone(),
            verify: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The keyserver no longer derives the study key.
    let e = keyserver(&stack, "watermark")
        .await
        .derive_key(ks::DeriveKeyRequest {
            study_id: handle.clone(),
            attributes: attrs(),
            purpose: "pixels".into(),
            operation: ks::Operation::Restore.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_nodes_bad_input_and_png() {
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let img = slice16();

    // PNG in, bit-identical pixels out (8-bit RGB too).
    let rgb = tessera_image::phantom::head_phantom(40, 30, 1, PixelFormat::RGB8, 3).unwrap();
    let png = tessera_image::codec::encode_png(&rgb, 0).unwrap();
    let stored = gw::store(
        &mut gateway(&stack, "owner").await,
        header(pb::ImageFormat::Png, None).tap_roi(None),
        &png,
    )
    .await
    .unwrap();
    let rid = grant(&stack, "clinician", &stored.study_handle, 1).await;
    let (h, pixels) = gw::retrieve(
        &mut gateway(&stack, "clinician").await,
        &stored.study_handle,
        &rid,
    )
    .await
    .unwrap();
    assert_eq!(pixels, rgb.to_le_bytes());
    assert_eq!(h.original_format, pb::ImageFormat::Png as i32);

    // Bad input: InvalidArgument naming the field, nothing stored.
    let before = total_objects(&stack, 3).await;
    let mut owner = gateway(&stack, "owner").await;
    let mut bad_owner = header(pb::ImageFormat::Raw, Some(raw_spec(&img)));
    bad_owner.owner = "spiffe://tessera.local/service/gateway".into();
    let mut bad_attr = header(pb::ImageFormat::Raw, Some(raw_spec(&img)));
    bad_attr.patient_attributes[0].name = "Patient ID".into();
    let mut bad_roi = header(pb::ImageFormat::Raw, Some(raw_spec(&img)));
    bad_roi.roi = Some(wpb::Rect {
        x: 100,
        y: 0,
        width: 64,
        height: 8,
    });
    for (h, data, field) in [
        (bad_owner, img.to_le_bytes(), "header.owner"),
        (
            bad_attr,
            img.to_le_bytes(),
            "header.patient_attributes[0].name",
        ),
        (bad_roi, img.to_le_bytes(), "header.roi"),
        (
            header(pb::ImageFormat::Png, None),
            b"not a png".to_vec(),
            "chunk",
        ),
        (
            header(pb::ImageFormat::Raw, Some(raw_spec(&img))),
            vec![0u8; 10],
            "header.size",
        ),
    ] {
        let e = gw::store(&mut owner, h, &data).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // A header that lies about the size.
    let mut msgs = gw::store_messages(
        header(pb::ImageFormat::Raw, Some(raw_spec(&img))),
        &img.to_le_bytes(),
    );
    msgs.pop();
    let e = owner.store(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = owner
        .verify(pb::VerifyStudyRequest {
            study_handle: "st-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("study_handle"));
    let after = total_objects(&stack, 3).await;
    assert_eq!(before, after, "refused stores leave nothing on the nodes");

    // One node stopped: stores avoid it; a study with a share there is
    // UNAVAILABLE naming the node.
    let a = store_raw(&stack, "owner", &img).await;
    let victim = a.placements[0].node.clone();
    assert!(stack.stop(&victim).await);
    let b = store_raw(&stack, "owner", &img).await;
    assert!(b.placements.iter().all(|p| p.node != victim));
    let e = owner
        .verify(pb::VerifyStudyRequest {
            study_handle: a.study_handle.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&victim), "{}", e.message());

    // Two nodes stopped: store fails cleanly, nothing left on the survivor.
    let second = b.placements.iter().map(|p| p.node.clone()).next().unwrap();
    let survivor = (1..=3)
        .map(|n| format!("storage-{n}"))
        .find(|n| *n != victim && *n != second)
        .unwrap();
    assert!(stack.stop(&second).await);
    let survivor_before = objects(&stack, &survivor).await.len();
    let e = gw::store(
        &mut owner,
        header(pb::ImageFormat::Raw, Some(raw_spec(&img))),
        &img.to_le_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&victim) && e.message().contains(&second),
        "{}",
        e.message()
    );
    assert_eq!(objects(&stack, &survivor).await.len(), survivor_before);

    // Restarted, everything is served again.
    stack.restart_storage(&victim).await.unwrap();
    stack.restart_storage(&second).await.unwrap();
    let r = owner
        .verify(pb::VerifyStudyRequest {
            study_handle: a.study_handle.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.report.unwrap().intact);
    stack.shutdown().await;
}

trait TapRoi {
    fn tap_roi(self, roi: Option<wpb::Rect>) -> Self;
}

impl TapRoi for pb::StoreHeader {
    fn tap_roi(mut self, roi: Option<wpb::Rect>) -> Self {
        self.roi = roi;
        self
    }
}

/// A gateway that died in the middle of a store (study registered, share 1
/// placed, vault record still pending) removes the leftovers when it comes
/// back: the share is deleted, the study forgotten at the keyserver, the
/// pending record dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_gateway_cleans_up_an_interrupted_store() {
    use gateway_service::vault::{
        SharePlacement, SpecRecord, StudyRecord, StudyState, Vault, load_key_file,
    };
    let (_tmp, mut stack) = start(&DevOptions::default()).await;
    let id = "st-0123456789abcdef0123456789abcdef".to_string();
    keyserver(&stack, "gateway")
        .await
        .register_study(ks::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs(),
            study_id: id.clone(),
        })
        .await
        .unwrap();
    let mut node = storage(&stack, "storage-1").await;
    tessera_storage_client::put_object(&mut node, &format!("{id}.s1"), b"half a study")
        .await
        .unwrap();

    // The crash: the gateway is gone with its intent record pending.
    assert!(stack.stop("gateway").await);
    let cfg = stack.gateway_config().unwrap().clone();
    {
        let key = load_key_file(&cfg.vault.key_file).unwrap();
        let vault = Vault::open(&cfg.vault.path, &key).unwrap();
        let placement = |share: u32, node: &str| SharePlacement {
            share,
            node: node.into(),
            instance_id: String::new(),
            object_id: format!("{id}.s{share}"),
            size: 0,
            sha256: String::new(),
            erasure: None,
        };
        vault
            .insert_new(&StudyRecord {
                study_id: id.clone(),
                state: StudyState::Pending,
                owner: OWNER.into(),
                stored_by: OWNER.into(),
                attributes: vec![("patient_id".into(), PATIENT_ID.into())],
                original_format: 3,
                spec: SpecRecord {
                    width: 4,
                    height: 4,
                    frames: 1,
                    bits_allocated: 8,
                    bits_stored: 8,
                    signed: false,
                    channels: 1,
                },
                header_json: String::new(),
                placements: vec![placement(1, "storage-1"), placement(2, "storage-2")],
                created_unix: 0,
                dicom_study_uid: String::new(),
                replica: String::new(),
            })
            .unwrap();
    }

    stack.restart_gateway().await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        let share = node
            .stat(spb::StatRequest {
                object_id: format!("{id}.s1"),
                verify: false,
            })
            .await;
        let key = keyserver(&stack, "watermark")
            .await
            .derive_key(ks::DeriveKeyRequest {
                study_id: id.clone(),
                attributes: attrs(),
                purpose: "pixels".into(),
                operation: ks::Operation::Restore.into(),
            })
            .await;
        if matches!(&share, Err(e) if e.code() == Code::NotFound)
            && matches!(&key, Err(e) if e.code() == Code::NotFound)
        {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "the share and the study's key material are removed");
    // And the intent record with them.
    assert!(stack.stop("gateway").await);
    let key = load_key_file(&cfg.vault.key_file).unwrap();
    let vault = Vault::open(&cfg.vault.path, &key).unwrap();
    assert!(vault.get(&id).unwrap().is_none());
    drop(vault);
    stack.shutdown().await;
}

/// A second gateway made from the stack's gateway config with `edit`
/// applied: its own listener and vault, no DICOM SCP, no DICOMweb.
async fn side_gateway(
    stack: &DevStack,
    vault: &std::path::Path,
    edit: impl FnOnce(&mut gateway_service::Config),
) -> gateway_service::RunningApp {
    let mut cfg = stack.gateway_config().unwrap().clone();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.dicom.scp = None;
    cfg.dicomweb = None;
    cfg.vault.path = vault.to_owned();
    edit(&mut cfg);
    gateway_service::App::build(&cfg)
        .unwrap()
        .spawn()
        .await
        .unwrap()
}

async fn store_via(
    stack: &DevStack,
    gateway: &gateway_service::RunningApp,
    img: &Image,
) -> Result<pb::StoreResponse, tonic::Status> {
    let tls = tessera_testkit::client_tls(&stack.pki_dir(), "owner");
    let ch = tls
        .expecting(&service_id("gateway"))
        .connect(&gateway.local_addr().to_string())
        .await
        .unwrap();
    gw::store(
        &mut gw::client(ch),
        header(pb::ImageFormat::Raw, Some(raw_spec(img))),
        &img.to_le_bytes(),
    )
    .await
}

fn service_id(name: &str) -> tessera_tls::Identity {
    tessera_tls::Identity::parse_uri(&tessera_devstack::service_identity(name)).unwrap()
}

/// Finding 5: every service certificate names localhost and chains to the
/// CA, so only the identity check keeps a storage node from answering as
/// the keyserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_refuses_a_storage_node_posing_as_the_keyserver() {
    let (tmp, mut stack) = start(&DevOptions::default()).await;
    let eps = stack.endpoints().clone();
    assert_eq!(
        eps.identity("keyserver"),
        Some("spiffe://tessera.local/service/keyserver")
    );
    let storage2 = eps.get("storage-2").unwrap().to_owned();
    let img = slice16();

    // Explicit identity (as `tessera dev up` writes it) and the default
    // from the section name both refuse storage-2's certificate.
    for explicit in [true, false] {
        let vault = tmp.path().join(format!("side-{explicit}.redb"));
        let side = side_gateway(&stack, &vault, |cfg| {
            cfg.keyserver.address = storage2.clone();
            if !explicit {
                cfg.keyserver.identity = None;
            }
        })
        .await;
        let e = store_via(&stack, &side, &img).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains(
                "expected spiffe://tessera.local/service/keyserver, \
                 the server presented spiffe://tessera.local/service/storage-2"
            ),
            "{e:?}"
        );
        side.shutdown(std::time::Duration::from_secs(5)).await;
    }

    // A storage node listed under another node's name is refused too.
    let vault = tmp.path().join("side-swap.redb");
    let side = side_gateway(&stack, &vault, |cfg| {
        let a = cfg.storage_nodes[0].address.clone();
        cfg.storage_nodes[0].address = cfg.storage_nodes[1].address.clone();
        cfg.storage_nodes[1].address = a;
        cfg.storage_nodes.truncate(2);
    })
    .await;
    let e = store_via(&stack, &side, &img).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the server presented"), "{e:?}");
    side.shutdown(std::time::Duration::from_secs(5)).await;

    // The right keyserver still works through the same code path.
    let vault = tmp.path().join("side-ok.redb");
    let side = side_gateway(&stack, &vault, |cfg| cfg.keyserver.identity = None).await;
    store_via(&stack, &side, &img).await.unwrap();
    side.shutdown(std::time::Duration::from_secs(5)).await;
    stack.shutdown().await;
}

/// A keyserver that accepts the TLS connection and every call, and never
/// answers.
#[derive(Clone)]
struct HungKeyserver;

impl tonic::server::NamedService for HungKeyserver {
    const NAME: &'static str = "tessera.keyserver.v1.KeyServer";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for HungKeyserver {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::pending()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_keyserver_is_deadline_exceeded_not_a_hang() {
    let (tmp, mut stack) = start(&DevOptions::default()).await;
    // The hung keyserver holds the real keyserver certificate.
    let tls = tessera_tls::ServerTls::from_files(
        &TlsFiles::from_pki_dir(&stack.pki_dir(), "keyserver"),
        tessera_tls::DEFAULT_TRUST_DOMAIN,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = listener.local_addr().unwrap();
    let incoming = tessera_tls::incoming(listener, &tls);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HungKeyserver)
            .serve_with_incoming(incoming),
    );

    let vault = tmp.path().join("side.redb");
    let side = side_gateway(&stack, &vault, |cfg| {
        cfg.keyserver.address = format!("localhost:{}", hung.port());
        cfg.upstream_timeouts.call_secs = 1;
    })
    .await;
    // The outer bound only turns a hang (the bug) into a failure.
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        store_via(&stack, &side, &slice16()),
    )
    .await
    .expect("the gateway waited on the hung keyserver without a deadline")
    .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("keyserver"), "{e:?}");
    side.shutdown(std::time::Duration::from_secs(5)).await;
    server.abort();
    stack.shutdown().await;
}
