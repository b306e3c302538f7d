//! `tessera webhook set URL | show | clear` (study owner, issue 19): the
//! `https://` URL the keyserver POSTs to when a request is filed on your
//! studies or the glass is broken on one (request id, requester, purpose,
//! time; never patient data). Delivery is retried in the background and
//! its outcome written to the audit log (`tessera audit`).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;

use super::{ConnArgs, OutputArgs, Service, block_on, status_error};

/// `tessera webhook ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum WebhookCmd {
    /// Set your webhook (https:// only; the keyserver verifies the
    /// receiver against its configured CA bundle).
    Set(WebhookSetArgs),
    /// Your webhook, if any.
    Show(WebhookArgs),
    /// Remove your webhook.
    Clear(WebhookArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WebhookSetArgs {
    /// https://host[:port]/path
    pub url: String,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Runs a `tessera webhook` subcommand.
pub fn webhook(cmd: WebhookCmd) -> Result<()> {
    block_on(async move {
        let (conn, out) = match &cmd {
            WebhookCmd::Set(a) => (&a.conn, &a.out),
            WebhookCmd::Show(a) | WebhookCmd::Clear(a) => (&a.conn, &a.out),
        };
        let mut c = KeyServerClient::new(conn.channel(Service::Keyserver).await?);
        let (what, answer) = match &cmd {
            WebhookCmd::Set(a) => (
                "set webhook",
                c.set_webhook(conn.request(pb::SetWebhookRequest { url: a.url.clone() }))
                    .await,
            ),
            WebhookCmd::Show(_) => (
                "show webhook",
                c.get_webhook(conn.request(pb::GetWebhookRequest {})).await,
            ),
            WebhookCmd::Clear(_) => (
                "clear webhook",
                c.clear_webhook(conn.request(pb::ClearWebhookRequest {}))
                    .await,
            ),
        };
        let url = answer.map_err(|s| status_error(what, &s))?.into_inner().url;
        out.emit(&json!({ "webhook": url }), || {
            if url.is_empty() {
                println!("no webhook set");
            } else {
                println!("webhook: {url}");
            }
        })
    })
}
