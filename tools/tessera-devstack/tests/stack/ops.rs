//! Operations on the live suite (issue 15): every service's admin listener
//! over real HTTP. `/metrics` counters move with the traffic sent (RPCs by
//! method and code, an authorization denial, the keyserver's derivations,
//! the storage nodes' objects), the gauges (pending key requests, audit
//! chain length and checkpoint age, gateway jobs, memory budget and
//! studies) read the state, `/live` and `/ready` answer 200, and
//! `/ready` turns 503 with a reason when the keyserver stops.

use bytes::Bytes;
use gateway_service::client as gw;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::{Image, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::storage::v1 as spb;
use tessera_proto::watermark::v1 as wpb;
use tonic::Code;

use tessera_testkit::OWNER;
use tessera_testkit::suite::{channel, gateway, grant};

const SERVICES: [&str; 6] = [
    "keyserver",
    "storage-1",
    "storage-2",
    "watermark",
    "segmentation",
    "gateway",
];

/// GET `http://ADMIN/path` of `service`: (status, body).
async fn get(stack: &DevStack, service: &str, path: &str) -> (u16, String) {
    let admin = stack
        .endpoints()
        .admin
        .get(service)
        .unwrap_or_else(|| panic!("no admin address for {service}"));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}{path}").parse().unwrap();
    let res = client.get(uri).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the sample `series` (name and labels exactly as printed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn rpc(method: &str, code: Code) -> String {
    format!(
        "tessera_rpc_requests_total{{method=\"{method}\",code=\"{}\"}}",
        code as i32
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_listeners_serve_metrics_live_and_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let mut stack = DevStack::start(tmp.path(), &DevOptions::default())
        .await
        .unwrap();
    // endpoints.toml names every admin listener.
    let saved = tessera_devstack::Endpoints::load(stack.dir()).unwrap();
    for s in SERVICES {
        assert!(saved.admin.contains_key(s), "{s} missing in {saved:?}");
        assert_eq!(get(&stack, s, "/live").await.0, 200, "{s} /live");
        let (code, why) = get(&stack, s, "/ready").await;
        assert_eq!(code, 200, "{s} /ready: {why}");
    }
    let (_, before) = get(&stack, "gateway", "/metrics").await;
    let store_ok = rpc("tessera.gateway.v1.Gateway/Store", Code::Ok);
    assert_eq!(sample(&before, &store_ok), 0.0, "{before}");

    // Traffic: a store and a retrieve through the gateway.
    let img =
        tessera_image::phantom::head_phantom(64, 48, 1, PixelFormat::gray16(12, false), 5).unwrap();
    let stored = store(&stack, &img).await;
    let rid = grant(&stack, "researcher", &stored.study_handle, 1).await;
    let (_, pixels) = gw::retrieve(
        &mut gateway(&stack, "researcher").await,
        &stored.study_handle,
        &rid,
    )
    .await
    .unwrap();
    assert_eq!(pixels.len(), img.to_le_bytes().len());
    // A second request the owner has not decided yet: pending.
    gateway(&stack, "clinician2")
        .await
        .request_access(pb::RequestAccessRequest {
            study_handle: stored.study_handle.clone(),
            justification: "ops gauge".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // And a call the authorization layer refuses: a user at a storage node.
    let e = tessera_proto::storage::v1::storage_node_client::StorageNodeClient::new(
        channel(&stack, "researcher", "storage-1").await,
    )
    .list(spb::ListRequest::default())
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let (code, gwm) = get(&stack, "gateway", "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(sample(&gwm, &store_ok), 1.0, "{gwm}");
    assert_eq!(
        sample(&gwm, &rpc("tessera.gateway.v1.Gateway/Retrieve", Code::Ok)),
        1.0,
        "{gwm}"
    );
    assert!(
        sample(
            &gwm,
            "tessera_rpc_duration_seconds_count{method=\"tessera.gateway.v1.Gateway/Store\"}"
        ) >= 1.0,
        "{gwm}"
    );
    assert_eq!(sample(&gwm, "tessera_gateway_studies_stored_total"), 1.0);
    // Gauges: nothing in flight once the calls have answered, one study.
    assert_eq!(
        sample(&gwm, "tessera_gateway_job_permits_in_use"),
        0.0,
        "{gwm}"
    );
    assert_eq!(
        sample(&gwm, "tessera_gateway_memory_budget_in_use_mib"),
        0.0,
        "{gwm}"
    );
    assert!(
        gwm.contains("# TYPE tessera_gateway_job_permits_in_use gauge"),
        "{gwm}"
    );
    assert!(
        gwm.contains("# TYPE tessera_gateway_memory_budget_in_use_mib gauge"),
        "{gwm}"
    );
    assert_eq!(sample(&gwm, "tessera_gateway_studies"), 1.0, "{gwm}");
    // No patient attribute leaks into metric labels.
    assert!(!gwm.contains("PID-OPS-1"), "{gwm}");

    let (_, ksm) = get(&stack, "keyserver", "/metrics").await;
    assert!(
        sample(&ksm, "tessera_keyserver_derivations_total") > 0.0,
        "{ksm}"
    );
    assert!(
        sample(&ksm, "tessera_keyserver_releases_total") >= 1.0,
        "{ksm}"
    );
    assert!(sample(&ksm, "tessera_keyserver_audit_commits_total") > 0.0);
    assert_eq!(sample(&ksm, "tessera_keyserver_audit_chain_broken"), 0.0);
    assert_eq!(
        sample(&ksm, "tessera_keyserver_pending_requests"),
        1.0,
        "{ksm}"
    );
    // Every audited job appended at least one entry.
    let chain = sample(&ksm, "tessera_keyserver_audit_chain_length");
    assert!(
        chain >= sample(&ksm, "tessera_keyserver_audit_commits_total") && chain > 0.0,
        "{ksm}"
    );
    // No checkpoint yet (one every 1000 entries): the age counts from the
    // first entry, made by this test a moment ago.
    let age = sample(&ksm, "tessera_keyserver_audit_checkpoint_age_seconds");
    assert!((0.0..600.0).contains(&age), "{ksm}");
    assert!(ksm.contains("# TYPE tessera_keyserver_audit_checkpoint_age_seconds gauge"));

    let (_, sm) = get(&stack, "storage-1", "/metrics").await;
    assert_eq!(
        sample(
            &sm,
            "tessera_authz_denials_total{reason=\"no role of the caller is admitted\",caller_kind=\"user\"}"
        ),
        1.0,
        "{sm}"
    );
    assert_eq!(
        sample(
            &sm,
            &rpc(
                "tessera.storage.v1.StorageNode/List",
                Code::PermissionDenied
            )
        ),
        1.0,
        "{sm}"
    );
    // The shares landed on some of the nodes.
    let (mut objects, mut bytes) = (0.0, 0.0);
    for node in ["storage-1", "storage-2", "storage-3"] {
        let (_, m) = get(&stack, node, "/metrics").await;
        objects += sample(&m, "tessera_storage_objects");
        bytes += sample(&m, "tessera_storage_bytes");
    }
    assert!(
        objects >= 2.0 && bytes > 0.0,
        "{objects} objects, {bytes} bytes"
    );
    let (_, wmm) = get(&stack, "watermark", "/metrics").await;
    assert!(
        sample(
            &wmm,
            &rpc("tessera.watermark.v1.Watermark/Protect", Code::Ok)
        ) >= 1.0,
        "{wmm}"
    );

    // A stopped keyserver: the gateway and the watermark service are not
    // ready (and say why); the storage nodes still are.
    assert!(stack.stop("keyserver").await);
    for s in ["gateway", "watermark"] {
        let (code, why) = get(&stack, s, "/ready").await;
        assert_eq!(code, 503, "{s}: {why}");
        assert!(why.contains("keyserver"), "{s}: {why}");
        assert_eq!(get(&stack, s, "/live").await.0, 200);
    }
    assert_eq!(get(&stack, "storage-1", "/ready").await.0, 200);
    stack.shutdown().await;
}

async fn store(stack: &DevStack, img: &Image) -> pb::StoreResponse {
    let header = pb::StoreHeader {
        owner: OWNER.into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "PID-OPS-1".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 8,
            y: 8,
            width: 32,
            height: 24,
        }),
    };
    gw::store(
        &mut gateway(stack, "owner").await,
        header,
        &img.to_le_bytes(),
    )
    .await
    .unwrap()
}
