//! The authorization matrix against the live suite: every RPC found in the
//! protos' descriptors, called as every kind of caller, is admitted or
//! refused by the authorization layer exactly as
//! `tessera_tls::matrix::MATRIX` says. An RPC without a row, or a row
//! without an RPC, fails the test; so does a layer that admits a caller the
//! table refuses, or refuses one it admits.
//!
//! The requests are empty messages (every field at its default): an
//! admitted caller then meets the handler's own checks (INVALID_ARGUMENT,
//! NOT_FOUND, PERMISSION_DENIED with a reason, ...), which are not the
//! layer's refusal: that one carries the `tessera-refused-by: authz`
//! metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message;
use tessera_devstack::DevOptions;
use tessera_testkit::suite::start;
use tessera_tls::Channel;
use tessera_tls::matrix::{MATRIX, rule_for};
use tessera_tls::security::REFUSED_BY_HEADER;
use tessera_tls::{ClientTls, DEFAULT_TRUST_DOMAIN, Identity, Role, RoleMap, TlsFiles};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// Every caller of the development PKI (kind, name). Their roles come from
/// the same development role map the suite runs with (`outsider` has none).
const CALLERS: &[(&str, &str)] = &[
    ("user", "owner"),
    ("user", "clinician"),
    ("user", "researcher"),
    ("user", "admin"),
    ("user", "outsider"),
    ("service", "gateway"),
    ("service", "watermark"),
    ("service", "segmentation"),
    ("service", "keyserver"),
    ("service", "storage-1"),
    ("service", "storage-2"),
];

fn roles_of(kind: &str, name: &str) -> BTreeSet<Role> {
    let id = Identity::new(DEFAULT_TRUST_DOMAIN, kind, name).unwrap();
    RoleMap::dev_default(DEFAULT_TRUST_DOMAIN).roles_of(&id)
}

/// A Tessera RPC from the descriptors.
#[derive(Debug)]
struct Rpc {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

fn rpcs_from_descriptors() -> Vec<Rpc> {
    let set = prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        if !package.starts_with("tessera.") {
            continue;
        }
        for service in &file.service {
            for m in &service.method {
                out.push(Rpc {
                    path: format!("/{package}.{}/{}", service.name(), m.name()),
                    client_streaming: m.client_streaming(),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    out
}

/// The endpoint name (in endpoints.toml) that serves `path`.
fn endpoint_of(path: &str) -> &'static str {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match service {
        "tessera.gateway.v1.Gateway" => "gateway",
        "tessera.keyserver.v1.KeyServer" => "keyserver",
        "tessera.watermark.v1.Watermark" => "watermark",
        "tessera.segmentation.v1.Segmentation" => "segmentation",
        // storage-2's own identity is among the callers: it must not act on
        // storage-1 (nor on itself: no RPC admits the storage role).
        "tessera.storage.v1.StorageNode" => "storage-1",
        other => panic!("no endpoint for service {other}"),
    }
}

/// Calls `rpc` with one empty message; returns the status (OK as `Ok`).
async fn call(channel: Channel, rpc: &Rpc) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(rpc.path.as_str()).unwrap();
    let codec = ProstCodec::<(), ()>::default();
    let one = || tokio_stream::iter(vec![()]);
    match (rpc.client_streaming, rpc.server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(()), path, codec)
            .await
            .map(drop),
        (false, true) => {
            let mut s = grpc
                .server_streaming(tonic::Request::new(()), path, codec)
                .await?
                .into_inner();
            // A live feed (WatchRequests) stays open once admitted: a stream
            // still open after 2 s passed the authorization layer.
            let drain = async {
                while s.message().await?.is_some() {}
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(2), drain)
                .await
                .unwrap_or(Ok(()))
        }
        (true, false) => grpc
            .client_streaming(tonic::Request::new(one()), path, codec)
            .await
            .map(drop),
        (true, true) => {
            let mut s = grpc
                .streaming(tonic::Request::new(one()), path, codec)
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
    }
}

fn refused_by_layer(r: &Result<(), Status>) -> bool {
    match r {
        Ok(()) => false,
        Err(s) => {
            matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated)
                && s.metadata()
                    .get(REFUSED_BY_HEADER)
                    .is_some_and(|v| v == "authz")
        }
    }
}

#[test]
fn every_rpc_has_exactly_one_row() {
    let rpcs: BTreeSet<String> = rpcs_from_descriptors()
        .into_iter()
        .map(|r| r.path)
        .collect();
    let rows: BTreeSet<String> = MATRIX.iter().map(|r| r.path.to_owned()).collect();
    let missing: Vec<_> = rpcs.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&rpcs).collect();
    assert!(missing.is_empty(), "RPCs without a matrix row: {missing:?}");
    assert!(stale.is_empty(), "matrix rows without an RPC: {stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_suite_enforces_the_matrix() {
    let opts = DevOptions {
        base_port: Some(0),
        ..DevOptions::default()
    };
    let (_dir, mut stack) = start(&opts).await;
    let rpcs = rpcs_from_descriptors();
    // The role map gives every kind of caller the role the matrix names.
    assert_eq!(
        roles_of("service", "storage-2"),
        BTreeSet::from([Role::Storage])
    );
    assert_eq!(
        roles_of("service", "gateway"),
        BTreeSet::from([Role::Gateway])
    );
    assert!(roles_of("user", "outsider").is_empty());
    assert!(rpcs.len() >= 36, "descriptors list {} RPCs", rpcs.len());

    let mut channels: BTreeMap<(&str, &str), Channel> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut calls = 0usize;
    for rpc in &rpcs {
        let rule =
            rule_for(&rpc.path).unwrap_or_else(|| panic!("{} has no row in the matrix", rpc.path));
        let endpoint = endpoint_of(&rpc.path);
        for (kind, caller) in CALLERS {
            let roles = roles_of(kind, caller);
            let ch = match channels.get(&(*caller, endpoint)) {
                Some(c) => c.clone(),
                None => {
                    let tls =
                        ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), caller))
                            .unwrap();
                    let c = tls
                        .connect(stack.endpoints().get(endpoint).unwrap())
                        .await
                        .unwrap();
                    channels.insert((*caller, endpoint), c.clone());
                    c
                }
            };
            let admitted = roles.iter().any(|r| rule.roles.contains(r));
            let r = tokio::time::timeout(Duration::from_secs(30), call(ch, rpc))
                .await
                .unwrap_or_else(|_| panic!("{} as {caller}: no answer in 30 s", rpc.path));
            calls += 1;
            let refused = refused_by_layer(&r);
            if refused == admitted {
                wrong.push(format!(
                    "{} as {caller}: the matrix says {}, the suite answered {:?}",
                    rpc.path,
                    if admitted { "admit" } else { "refuse" },
                    r.as_ref().err().map(|s| (s.code(), s.message().to_owned()))
                ));
            }
        }
    }
    stack.shutdown().await;
    assert!(
        wrong.is_empty(),
        "{} of {calls} calls disagree with the matrix:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(calls, rpcs.len() * CALLERS.len());
}
