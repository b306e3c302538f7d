//! Gateway replicas in the dev stack (`DevOptions::gateway_replicas`, what
//! `tessera bench replicas` runs): two gateways on one identity vault on a
//! real PostgreSQL server; a study stored through one is found, granted and
//! retrieved bit-identical through the other. Several replicas on the redb
//! file are refused (one process holds that file).

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack, service_identity};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_testkit::OWNER;
use tessera_testkit::postgres::Postgres;
use tessera_testkit::suite::{channel, gateway, grant, start};

fn image() -> Image {
    tessera_image::phantom::head_phantom(128, 128, 1, PixelFormat::gray16(12, false), 9).unwrap()
}

fn header(img: &Image) -> pb::StoreHeader {
    pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-REPLICA-1".into(),
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

#[tokio::test]
async fn two_gateway_replicas_share_one_vault_on_postgresql() {
    let pg = Postgres::start();
    let opts = DevOptions {
        vault_postgres_url: Some(pg.create_db("replicas")),
        gateway_replicas: 2,
        ..DevOptions::default()
    };
    let (_dir, mut stack) = start(&opts).await;
    // The replica answers as the gateway.
    let gateway_id = service_identity("gateway");
    assert_eq!(
        stack.endpoints().identity("gateway-2"),
        Some(gateway_id.as_str())
    );
    assert_ne!(
        stack.endpoints().get("gateway-2").unwrap(),
        stack.endpoints().get("gateway").unwrap()
    );

    let img = image();
    let mut second = gw::client(channel(&stack, "owner", "gateway-2").await);
    let stored = gw::store(&mut second, header(&img), &img.to_le_bytes())
        .await
        .expect("store through gateway-2");
    // The vault rows are in the database, not in a redb file.
    let rows = pg.psql("replicas", "SELECT count(*) FROM vault_studies");
    assert_eq!(rows.trim(), "1", "studies rows: {rows}");
    assert!(!stack.dir().join("data/vault.redb").exists());

    // Granted and retrieved through the first gateway, then the second.
    let rid = grant(&stack, "clinician", &stored.study_handle, 2).await;
    let mut first = gateway(&stack, "clinician").await;
    let (_, px) = gw::retrieve(&mut first, &stored.study_handle, &rid)
        .await
        .expect("retrieve through gateway");
    assert_eq!(px, img.to_le_bytes());
    let mut second = gw::client(channel(&stack, "clinician", "gateway-2").await);
    let (_, px) = gw::retrieve(&mut second, &stored.study_handle, &rid)
        .await
        .expect("retrieve through gateway-2");
    assert_eq!(px, img.to_le_bytes());
    stack.shutdown().await;
}

#[tokio::test]
async fn replicas_on_the_redb_vault_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DevOptions {
        gateway_replicas: 2,
        ..DevOptions::default()
    };
    let err = match DevStack::start(tmp.path(), &opts).await {
        Ok(mut stack) => {
            stack.shutdown().await;
            panic!("two gateways on one redb vault started");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("PostgreSQL"), "{err}");
}
