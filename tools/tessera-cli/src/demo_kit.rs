//! What both suite demos (`tessera demo` and `demo --input FILE.dcm`) use
//! to talk to the running suite (a leaf module: `suite_demo` calls
//! `demo_dicom`, both call this).

use anyhow::{Context, Result, anyhow};
use gateway_service::client as gw;
use tessera_devstack::DevStack;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};

use crate::demo::Steps;

pub(crate) const OWNER: &str = "spiffe://tessera.local/user/owner";

/// The nodes holding a stored object: its fragments' nodes, or its one
/// node when it is stored whole.
pub(crate) fn object_nodes(p: &pb::Placement) -> Vec<&str> {
    if p.fragments.is_empty() {
        vec![p.node.as_str()]
    } else {
        p.fragments.iter().map(|f| f.node.as_str()).collect()
    }
}

/// The suite's storage nodes, by name.
pub(crate) fn storage_nodes(stack: &DevStack) -> Vec<String> {
    stack
        .endpoints()
        .endpoints
        .keys()
        .filter(|n| n.starts_with("storage-"))
        .cloned()
        .collect()
}

pub(crate) async fn channel(stack: &DevStack, who: &str, service: &str) -> Result<Channel> {
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), who))?;
    // The server there must be that service (endpoints.toml names it).
    let expected = tessera_tls::Identity::parse_uri(&tessera_devstack::service_identity(service))?;
    Ok(tls
        .expecting(&expected)
        .connect(stack.endpoints().get(service)?)
        .await?)
}

pub(crate) async fn gateway(stack: &DevStack, who: &str) -> Result<GatewayClient<Channel>> {
    Ok(gw::client(channel(stack, who, "gateway").await?))
}

pub(crate) async fn keyserver(stack: &DevStack, who: &str) -> Result<KeyServerClient<Channel>> {
    Ok(KeyServerClient::new(
        channel(stack, who, "keyserver").await?,
    ))
}

/// The owner approves `rid` for 1 hour and `uses` uses.
pub(crate) async fn approve(stack: &DevStack, rid: &str, uses: u32) -> Result<ks::KeyRequest> {
    keyserver(stack, "owner")
        .await?
        .approve_request(ks::ApproveRequestRequest {
            request_id: rid.to_owned(),
            ttl_seconds: 3600,
            uses,
        })
        .await
        .context("approve")?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request in the answer"))
}

/// Step 4 of both demos: the owner approves the clinician's request `rid`,
/// and the clinician cannot approve its own request.
pub(crate) async fn approve_step(
    stack: &DevStack,
    rid: &str,
    uses: u32,
    steps: &mut Steps,
) -> Result<()> {
    let approved = approve(stack, rid, uses).await?;
    println!(
        "  approved: {} use(s) until {}",
        approved.uses_left,
        crate::client::utc(approved.expires_at_unix)
    );
    let self_approve = keyserver(stack, "clinician")
        .await?
        .approve_request(ks::ApproveRequestRequest {
            request_id: rid.to_owned(),
            ttl_seconds: 60,
            uses: 1,
        })
        .await;
    steps.check("the clinician cannot approve", self_approve.is_err());
    Ok(())
}
