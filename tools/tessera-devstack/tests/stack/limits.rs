//! One size limit end to end (issue 20), on the live suite with a small
//! limit (1 MiB, so the fixtures stay small): an image of exactly the limit
//! stores (erasure-coded, the nodes' cap derived from the limit) and
//! restores bit-identically, one frame more is refused; over-size uploads
//! are refused from their header (or a PNG's IHDR) while the client still
//! holds the rest back; a node cap below what the limit needs is
//! RESOURCE_EXHAUSTED naming the cap, never UNAVAILABLE.

use std::time::Duration;

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::suite::{gateway, grant, start};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const LIMIT: u64 = 1024 * 1024;

/// 256 x 256 16-bit words per frame: 8 frames are exactly [`LIMIT`].
fn frames(n: u32) -> Image {
    tessera_image::phantom::head_phantom(256, 256, n, PixelFormat::gray16(12, false), 5).unwrap()
}

fn header(img: &Image) -> pb::StoreHeader {
    pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-LIMIT-1".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: img.spec().byte_len() as u64,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 16,
            y: 16,
            width: 64,
            height: 64,
        }),
    }
}

/// Sends `first` on a Store stream and then nothing (the stream stays
/// open): the gateway must answer without the rest of the upload.
async fn store_holding_back(stack: &DevStack, first: Vec<pb::StoreRequest>) -> tonic::Status {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in first {
        tx.send(m).await.unwrap();
    }
    let mut client = gateway(stack, "owner").await;
    // The guard only keeps a broken gateway from hanging the test: the
    // answer must come while `tx` is still open.
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        client.store(ReceiverStream::new(rx)),
    )
    .await
    .expect("the gateway answered while the client still held the image back");
    drop(tx);
    r.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_of_exactly_the_limit_stores_and_one_frame_more_is_refused() {
    let opts = DevOptions {
        storage_nodes: 3,
        erasure: Some((2, 1)),
        max_image_bytes: LIMIT,
        ..DevOptions::default()
    };
    let (_tmp, stack) = start(&opts).await;

    let img = frames(8);
    assert_eq!(img.spec().byte_len() as u64, LIMIT);
    let stored = gw::store(
        &mut gateway(&stack, "owner").await,
        header(&img),
        &img.to_le_bytes(),
    )
    .await
    .unwrap_or_else(|s| panic!("an image of exactly the limit: {s}"));
    let rid = grant(&stack, "clinician", &stored.study_handle, 1).await;
    let (h, px) = gw::retrieve(
        &mut gateway(&stack, "clinician").await,
        &stored.study_handle,
        &rid,
    )
    .await
    .unwrap();
    assert!(h.report.unwrap().intact);
    assert_eq!(px, img.to_le_bytes(), "restored bit-identical");

    // One frame over: refused with the limit and its setting named.
    let over = frames(9);
    let e = gw::store(
        &mut gateway(&stack, "owner").await,
        header(&over),
        &over.to_le_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let want = format!(
        "the image is {} bytes, the limit is {LIMIT} (gateway.max_image_bytes)",
        LIMIT + LIMIT / 8
    );
    assert!(e.message().contains(&want), "{e:?}");

    // From the header alone: no chunk was sent, the stream is still open.
    let e = store_holding_back(
        &stack,
        vec![pb::StoreRequest {
            part: Some(pb::store_request::Part::Header(header(&over))),
        }],
    )
    .await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("gateway.max_image_bytes"), "{e:?}");

    // A PNG within the size limit whose IHDR declares 2048 x 2048 16-bit
    // samples: refused from its first bytes, the rest never sent.
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
    png.extend_from_slice(b"IHDR");
    png.extend_from_slice(&2048u32.to_be_bytes());
    png.extend_from_slice(&2048u32.to_be_bytes());
    png.extend_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0, 0]);
    png.resize(64, 0);
    let mut h = header(&img);
    h.format = pb::ImageFormat::Png.into();
    h.raw_spec = None;
    h.size = LIMIT / 2;
    let e = store_holding_back(
        &stack,
        vec![
            pb::StoreRequest {
                part: Some(pb::store_request::Part::Header(h)),
            },
            pb::StoreRequest {
                part: Some(pb::store_request::Part::Chunk(png)),
            },
        ],
    )
    .await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let want = format!("the PNG's IHDR declares is {} bytes", 2048u64 * 2048 * 2);
    assert!(e.message().contains(&want), "{e:?}");

    // StoreDicom: a declared size over the limit, nothing else sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::StoreDicomRequest {
        part: Some(pb::store_dicom_request::Part::Header(
            pb::StoreDicomHeader {
                owner: OWNER.into(),
                size: LIMIT + 1,
            },
        )),
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        gateway(&stack, "owner")
            .await
            .store_dicom(ReceiverStream::new(rx)),
    )
    .await
    .expect("StoreDicom answered from the header");
    drop(tx);
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let want = format!(
        "the DICOM file is {} bytes, the limit is {LIMIT} (gateway.max_image_bytes)",
        LIMIT + 1
    );
    assert!(e.message().contains(&want), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cap_below_the_limit_is_resource_exhausted_naming_it() {
    // Misconfigured on purpose: the nodes take at most 512 KiB per object,
    // the gateway accepts images of 1 MiB.
    let opts = DevOptions {
        storage_nodes: 3,
        max_image_bytes: LIMIT,
        storage_max_object_bytes: Some(LIMIT / 2),
        ..DevOptions::default()
    };
    let (_tmp, stack) = start(&opts).await;
    let img = frames(4);
    let e = gw::store(
        &mut gateway(&stack, "owner").await,
        header(&img),
        &img.to_le_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let need = gateway_service::sizes::node_object_bytes_needed(LIMIT, None);
    for want in [
        "storage-1 (524288)".to_string(),
        "per-object cap (storage max_object_bytes)".into(),
        format!("max_object_bytes >= {need}"),
    ] {
        assert!(e.message().contains(&want), "{want:?} in {e:?}");
    }
    // A small image still fits.
    let small = frames(1);
    gw::store(
        &mut gateway(&stack, "owner").await,
        header(&small),
        &small.to_le_bytes(),
    )
    .await
    .unwrap();
}
