//! Load spread (issue 20): the gateway's watermark channel balances over
//! every address its name resolves to. Two real watermark services (the
//! suite's and a second replica with the same identity) behind one name,
//! a resolver answering both, and the gateway's own upstream clients
//! (`Upstreams`, built from the suite's gateway config with
//! `resolve_secs`): both replicas serve calls, each connection checks the
//! watermark identity, and a replica the name stops resolving to gets no
//! more calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use gateway_service::upstream::Upstreams;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tessera_devstack::{DevOptions, DevStack};
use tessera_proto::watermark::v1 as wpb;
use tessera_runtime::{ConfigSource, load_config};

const FORGET: &str =
    "tessera_rpc_requests_total{method=\"tessera.watermark.v1.Watermark/ForgetStudy\",code=\"0\"}";

/// ForgetStudy calls a watermark replica answered OK (its /metrics).
async fn forgets(admin: &str) -> u64 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}/metrics").parse().unwrap();
    let body = client
        .get(uri)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(FORGET)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn forget_n(up: &Upstreams, n: u32) {
    for i in 0..n {
        up.watermark
            .clone()
            .forget_study(wpb::ForgetStudyRequest {
                study_id: format!("st-{i:032x}"),
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_balances_watermark_calls_over_every_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut stack = DevStack::start(tmp.path(), &DevOptions::default())
        .await
        .unwrap();
    // A second watermark replica: the same certificate and keyserver.
    let pki = stack.pki_dir();
    let d = pki.display();
    let ks = stack.endpoints().get("keyserver").unwrap().to_owned();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/watermark.crt\"\nkey = \"{d}/watermark.key\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [keyserver]\naddress = \"{ks}\"\nidentity = \"spiffe://tessera.local/service/keyserver\"\n\
         [keyserver.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/watermark.crt\"\nkey = \"{d}/watermark.key\"\n"
    );
    let cfg: watermark_service::Config = load_config(
        &ConfigSource::from_text(&text, BTreeMap::new()),
        watermark_service::config::ENV_PREFIX,
    )
    .unwrap();
    let second = watermark_service::App::build(&cfg)
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let first_port: u16 = stack
        .endpoints()
        .get("watermark")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let first: SocketAddr = ([127, 0, 0, 1], first_port).into();
    let admins = [
        stack.endpoints().admin["watermark"].clone(),
        second.admin_addr().unwrap().to_string(),
    ];

    // The gateway's upstream clients, watermark balanced, its name
    // resolving to both replicas.
    let addrs = Arc::new(Mutex::new(vec![first, second.local_addr()]));
    let seen = addrs.clone();
    let resolver: tessera_tls::Resolver = Arc::new(move |_host, _port| {
        let now = seen.lock().unwrap().clone();
        Box::pin(async move { Ok(now) })
    });
    let mut gw_cfg = stack.gateway_config().unwrap().clone();
    gw_cfg.watermark.resolve_secs = 1;
    let up = Upstreams::with_resolver(&gw_cfg, resolver).unwrap();

    let before = [forgets(&admins[0]).await, forgets(&admins[1]).await];
    forget_n(&up, 40).await;
    let after = [forgets(&admins[0]).await, forgets(&admins[1]).await];
    let served = [after[0] - before[0], after[1] - before[1]];
    eprintln!("40 ForgetStudy calls over two watermark replicas: {served:?}");
    assert_eq!(served[0] + served[1], 40);
    assert!(
        served[0] >= 5 && served[1] >= 5,
        "both replicas serve: {served:?}"
    );

    // The name now resolves to the second replica only: after the next
    // lookup, every call goes there.
    *addrs.lock().unwrap() = vec![second.local_addr()];
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let before = [forgets(&admins[0]).await, forgets(&admins[1]).await];
    forget_n(&up, 10).await;
    let after = [forgets(&admins[0]).await, forgets(&admins[1]).await];
    assert_eq!([after[0] - before[0], after[1] - before[1]], [0, 10]);

    second.shutdown(std::time::Duration::from_secs(1)).await;
    stack.shutdown().await;
}
