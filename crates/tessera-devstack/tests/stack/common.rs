//! Fixtures the suite tests share: mutual-TLS clients of the running
//! DevStack as any development identity, and the request-approve flow.

use gateway_service::client as gw;
use tessera_devstack::DevStack;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::{ClientTls, TlsFiles};
use tonic::transport::Channel;

pub const OWNER: &str = "spiffe://tessera.local/user/owner";

/// A channel to `service` (an endpoints.toml name) as `who` (a PKI name).
pub async fn channel(stack: &DevStack, who: &str, service: &str) -> Channel {
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), who)).unwrap();
    tls.connect(stack.endpoints().get(service).unwrap())
        .await
        .unwrap()
}

pub async fn gateway(stack: &DevStack, who: &str) -> GatewayClient<Channel> {
    gw::client(channel(stack, who, "gateway").await)
}

pub async fn keyserver(stack: &DevStack, who: &str) -> KeyServerClient<Channel> {
    KeyServerClient::new(channel(stack, who, "keyserver").await)
}

/// `who` asks for access to `handle`, the owner approves `uses` uses for
/// ten minutes; returns the request id.
pub async fn grant(stack: &DevStack, who: &str, handle: &str, uses: u32) -> String {
    let req = gateway(stack, who)
        .await
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.into(),
            justification: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    keyserver(stack, "owner")
        .await
        .approve_request(ks::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 600,
            uses,
        })
        .await
        .unwrap();
    req.request_id
}
