//! Handler-level tests: the gateway's `Gateway` handlers called directly
//! (no gRPC server, no TLS in front), with the caller's identity and roles
//! set on the request as the authorization layer would, against the real
//! keyserver, watermark service and storage nodes of a `tessera-devstack`
//! suite started in-process. One round trip through the image flow and one
//! refusal per flow (image, DICOM, process, delete) plus the edge's own.

use std::collections::BTreeSet;

use bytes::Bytes;
use gateway_service::service::GatewayService;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_server::Gateway;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::{CallerRoles, ClientTls, Identity, Role, TlsFiles};
use tokio_stream::StreamExt;
use tonic::codec::Codec;
use tonic::{Code, Request, Streaming};

const OWNER: &str = "spiffe://tessera.local/user/owner";
const CLINICIAN: &str = "spiffe://tessera.local/user/clinician";

/// The suite plus a second gateway service (own vault) whose handlers the
/// tests call.
struct Kit {
    stack: DevStack,
    svc: GatewayService,
    _tmp: tempfile::TempDir,
}

async fn kit() -> Kit {
    let tmp = tempfile::tempdir().unwrap();
    let stack = DevStack::start(tmp.path(), &DevOptions::default())
        .await
        .unwrap();
    let mut cfg = stack.gateway_config().unwrap().clone();
    cfg.vault.path = tmp.path().join("handlers-vault.redb");
    let svc = gateway_service::App::build(&cfg).unwrap().service().clone();
    Kit {
        stack,
        svc,
        _tmp: tmp,
    }
}

/// A request as the authorization layer hands it on: the verified identity
/// and the caller's roles in its extensions.
fn req<T>(msg: T, who: &str, roles: &[Role]) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(Identity::parse_uri(who).unwrap());
    r.extensions_mut()
        .insert(CallerRoles(roles.iter().copied().collect::<BTreeSet<_>>()));
    r
}

/// A client-streaming request body of `msgs`, framed as gRPC frames.
fn streaming<M: prost::Message + Default + Send + 'static>(msgs: Vec<M>) -> Streaming<M> {
    let mut buf = Vec::new();
    for m in msgs {
        let b = m.encode_to_vec();
        buf.push(0);
        buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
        buf.extend_from_slice(&b);
    }
    let mut codec = tonic_prost::ProstCodec::<M, M>::default();
    Streaming::new_request(
        codec.decoder(),
        http_body_util::Full::new(Bytes::from(buf)),
        None,
        None,
    )
}

fn image() -> Image {
    tessera_image::phantom::head_phantom(64, 48, 1, PixelFormat::gray16(12, false), 3).unwrap()
}

fn store_msgs(img: &Image) -> Vec<pb::StoreRequest> {
    let bytes = img.to_le_bytes();
    let header = pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-HANDLER-1".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: bytes.len() as u64,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: None,
    };
    let mut msgs = vec![pb::StoreRequest {
        part: Some(pb::store_request::Part::Header(header)),
    }];
    for c in bytes.chunks(64 * 1024) {
        msgs.push(pb::StoreRequest {
            part: Some(pb::store_request::Part::Chunk(c.to_vec())),
        });
    }
    msgs
}

async fn approve(stack: &DevStack, request_id: &str) {
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), "owner")).unwrap();
    let ch = tls
        .connect(stack.endpoints().get("keyserver").unwrap())
        .await
        .unwrap();
    KeyServerClient::new(ch)
        .approve_request(ks::ApproveRequestRequest {
            request_id: request_id.into(),
            ttl_seconds: 600,
            uses: 1,
        })
        .await
        .unwrap();
}

/// Store, request access, approval, retrieve bit-identical, through the
/// handlers; then the delete flow: refused for a non-owner, done for the
/// owner, and the study is gone.
#[tokio::test]
async fn store_retrieve_round_trip_and_delete_through_the_handlers() {
    let k = kit().await;
    let img = image();
    let stored = k
        .svc
        .store(req(
            streaming(store_msgs(&img)),
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap()
        .into_inner();
    let handle = stored.study_handle.clone();
    assert!(handle.starts_with("st-"), "{handle}");
    assert_eq!(stored.placements.len(), 2);
    assert_ne!(stored.placements[0].node, stored.placements[1].node);

    let request = k
        .svc
        .request_access(req(
            pb::RequestAccessRequest {
                study_handle: handle.clone(),
                justification: "handler test".into(),
                ..Default::default()
            },
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    approve(&k.stack, &request.request_id).await;

    let mut out = k
        .svc
        .retrieve(req(
            pb::RetrieveRequest {
                study_handle: handle.clone(),
                key_request_id: request.request_id.clone(),
                allow_tampered: false,
            },
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap()
        .into_inner();
    let header = match out.next().await.unwrap().unwrap().part {
        Some(pb::retrieve_response::Part::Header(h)) => h,
        other => panic!("first message: {other:?}"),
    };
    assert!(header.report.unwrap().intact);
    let mut pixels = Vec::new();
    while let Some(m) = out.next().await {
        match m.unwrap().part {
            Some(pb::retrieve_response::Part::Chunk(c)) => pixels.extend_from_slice(&c),
            other => panic!("after the header: {other:?}"),
        }
    }
    assert_eq!(pixels, img.to_le_bytes(), "restored bit-identical");

    // Delete flow: only the owner deletes.
    let del = |who: &str, roles: &[Role]| {
        req(
            pb::DeleteStudyRequest {
                study_handle: handle.clone(),
            },
            who,
            roles,
        )
    };
    let e = k
        .svc
        .delete(del(CLINICIAN, &[Role::Clinician]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let gone = k
        .svc
        .delete(del(OWNER, &[Role::Owner]))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.key_destroyed);
    assert_eq!(gone.removed.len(), 2);
    let e = k
        .svc
        .locate(req(
            pb::LocateRequest {
                study_handle: handle,
                key_request_id: request.request_id,
            },
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// One refusal per flow, and the edge's: each stops before any upstream
/// call would matter.
#[tokio::test]
async fn each_flow_refuses_bad_requests() {
    let k = kit().await;

    // Edge: no verified identity on the request.
    let e = k
        .svc
        .request_access(Request::new(pb::RequestAccessRequest {
            study_handle: "st-00000000000000000000000000000000".into(),
            justification: String::new(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Image flow: a store whose stream does not start with its header.
    let e = k
        .svc
        .store(req(
            streaming(vec![pb::StoreRequest {
                part: Some(pb::store_request::Part::Chunk(vec![1, 2, 3])),
            }]),
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("header"), "{e:?}");

    // Image flow: a study that does not exist.
    let e = k
        .svc
        .retrieve(req(
            pb::RetrieveRequest {
                study_handle: "st-00000000000000000000000000000000".into(),
                key_request_id: "rq-00000000000000000000000000000000".into(),
                allow_tampered: false,
            },
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // DICOM flow: a file of zero bytes is refused before anything is read.
    let e = k
        .svc
        .store_dicom(req(
            streaming(vec![pb::StoreDicomRequest {
                part: Some(pb::store_dicom_request::Part::Header(
                    pb::StoreDicomHeader {
                        owner: OWNER.into(),
                        size: 0,
                    },
                )),
            }]),
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // DICOM flow: a lookup without a Study Instance UID.
    let e = k
        .svc
        .find_dicom_study(req(
            pb::FindDicomStudyRequest {
                owner: OWNER.into(),
                patient_id: "PID".into(),
                study_instance_uid: String::new(),
            },
            OWNER,
            &[Role::Owner],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Process flow: a malformed study handle.
    let e = k
        .svc
        .process(req(
            pb::ProcessRequest {
                study_handle: "not a handle".into(),
                ..Default::default()
            },
            CLINICIAN,
            &[Role::Clinician],
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Delete flow: a study that does not exist.
    let e = k
        .svc
        .delete(req(
            pb::DeleteStudyRequest {
                study_handle: "st-00000000000000000000000000000000".into(),
            },
            OWNER,
            &[Role::Owner],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Repair flow: evacuating a node the gateway does not know.
    let e = k
        .svc
        .repair(req(
            pb::RepairRequest {
                study_handle: String::new(),
                dry_run: true,
                evacuate_node: "storage-99".into(),
                page_size: 0,
                page_token: String::new(),
            },
            "spiffe://tessera.local/user/admin",
            &[Role::Admin],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("storage-99"), "{e:?}");
    // Repair paging: a page too large, a token without a page size, a
    // token that is no study handle.
    for (page_size, page_token, field) in [
        (1001, "", "page_size"),
        (0, "st-00000000000000000000000000000000", "page_token"),
        (10, "nope", "page_token"),
    ] {
        let e = k
            .svc
            .repair(req(
                pb::RepairRequest {
                    study_handle: String::new(),
                    dry_run: true,
                    evacuate_node: String::new(),
                    page_size,
                    page_token: page_token.into(),
                },
                "spiffe://tessera.local/user/admin",
                &[Role::Admin],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
}
