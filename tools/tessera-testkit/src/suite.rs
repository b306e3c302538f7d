//! The whole suite in-process over real mutual TLS ([`DevStack`]), and what
//! its tests keep doing with it: clients of each service as any
//! development identity, the request-approve flow, the objects on a node.

use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::storage::v1 as spb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_tls::Channel;

/// A suite started with `opts` in a fresh temporary folder; keep the folder
/// alive as long as the stack runs.
pub async fn start(opts: &DevOptions) -> (tempfile::TempDir, DevStack) {
    let tmp = tempfile::tempdir().expect("a temporary folder");
    let stack = DevStack::start(tmp.path(), opts)
        .await
        .unwrap_or_else(|e| panic!("the suite did not start: {e}"));
    (tmp, stack)
}

/// A channel to `service` (an endpoints.toml name) as `who` (a PKI name).
pub async fn channel(stack: &DevStack, who: &str, service: &str) -> Channel {
    let addr = stack
        .endpoints()
        .get(service)
        .unwrap_or_else(|e| panic!("{e}"));
    crate::channel_to(&stack.pki_dir(), who, addr).await
}

/// The gateway as `who`.
pub async fn gateway(stack: &DevStack, who: &str) -> GatewayClient<Channel> {
    gw::client(channel(stack, who, "gateway").await)
}

/// The keyserver as `who`.
pub async fn keyserver(stack: &DevStack, who: &str) -> KeyServerClient<Channel> {
    KeyServerClient::new(channel(stack, who, "keyserver").await)
}

/// Storage node `node` as the gateway (the only role a node answers).
pub async fn storage(stack: &DevStack, node: &str) -> StorageNodeClient<Channel> {
    tessera_storage_client::client(channel(stack, "gateway", node).await)
}

/// `who` asks for access to `handle` (the request is pending), the owner
/// approves `uses` uses for ten minutes; returns the request id.
pub async fn grant(stack: &DevStack, who: &str, handle: &str, uses: u32) -> String {
    let req = gateway(stack, who)
        .await
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.into(),
            justification: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{who} RequestAccess to {handle}: {s}"))
        .into_inner()
        .request
        .expect("RequestAccess answers the request");
    assert_eq!(req.state, ks::RequestState::Pending as i32);
    keyserver(stack, "owner")
        .await
        .approve_request(ks::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 600,
            uses,
        })
        .await
        .unwrap_or_else(|s| panic!("owner ApproveRequest {}: {s}", req.request_id));
    req.request_id
}

/// The object ids a running node holds (listed as the gateway).
pub async fn objects(stack: &DevStack, node: &str) -> Vec<String> {
    storage(stack, node)
        .await
        .list(spb::ListRequest {
            prefix: String::new(),
            start_after: String::new(),
            limit: 1000,
        })
        .await
        .unwrap_or_else(|s| panic!("List on {node}: {s}"))
        .into_inner()
        .objects
        .into_iter()
        .map(|o| o.object_id)
        .collect()
}

/// Objects on storage-1 ..= storage-`nodes` together.
pub async fn total_objects(stack: &DevStack, nodes: usize) -> usize {
    let mut n = 0;
    for i in 1..=nodes {
        n += objects(stack, &format!("storage-{i}")).await.len();
    }
    n
}
