//! Keyserver subcommands for study owners (and auditors): `tessera
//! requests`, `approve`, `deny`, `revoke`, `audit`, `delegate add|list|remove`. They call the keyserver
//! directly over mutual TLS as the `--as` identity; the keyserver decides
//! who may do what (owner of the study, never one's own request).

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::Channel;

use super::owner_uri;
use super::requests_view::{request_json, requests_table};
use super::{
    ConnArgs, OutputArgs, PAGE_SIZE, Service, Table, all_pages, block_on, parse_duration,
    short_identity, status_error, utc,
};

/// Largest keyserver message accepted (the server's own limit).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most audit entries one `ListAudit` call returns.
const AUDIT_PAGE_MAX: u32 = 1000;

#[derive(Args, Debug, Clone)]
pub struct RequestsArgs {
    /// Only this study's requests.
    #[arg(long, value_name = "STUDY_ID")]
    pub study: Option<String>,
    /// Also list decided requests (approved, denied, revoked).
    #[arg(long)]
    pub all: bool,
    /// Print new requests on your studies as they come (Ctrl-C to stop).
    #[arg(long, conflicts_with_all = ["study", "all"])]
    pub watch: bool,
    /// With --watch: decisions on your own requests instead.
    #[arg(long, requires = "watch")]
    pub mine: bool,
    /// With --watch: stop after N events.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ApproveArgs {
    /// The request to approve (rq-...).
    pub request_id: String,
    /// How long the grant lasts (90, 30s, 15m, 1h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// How many times the requester may use it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub uses: u32,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DecideArgs {
    /// The request (rq-...).
    pub request_id: String,
    /// Why (recorded with the request and shown to the requester).
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Recompute the hash chain and check the signed checkpoints instead of
    /// listing entries; exits non-zero if the log is broken.
    #[arg(long)]
    pub verify: bool,
    /// First entry to list (entries start at 1).
    #[arg(long = "from", value_name = "SEQ", default_value_t = 1)]
    pub from_seq: u64,
    /// Most entries to list (1..=1000).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(AUDIT_PAGE_MAX)))]
    pub limit: u32,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `tessera delegate ...`: who may store studies on your behalf.
#[derive(Subcommand, Debug, Clone)]
pub enum DelegateCmd {
    /// Let IDENTITY store studies on your behalf (through the gateway).
    Add(DelegateArgs),
    /// Your delegates.
    List(DelegateListArgs),
    /// Withdraw IDENTITY.
    Remove(DelegateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DelegateArgs {
    /// A user name (clinician) or a full identity
    /// (spiffe://tessera.local/service/pacs).
    pub identity: String,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DelegateListArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

async fn client(conn: &ConnArgs) -> Result<KeyServerClient<Channel>> {
    Ok(
        KeyServerClient::new(conn.channel(Service::Keyserver).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// `tessera requests`.
pub fn requests(a: RequestsArgs) -> Result<()> {
    block_on(async move {
        if a.watch {
            return super::access_cmd::watch(&a.conn, &a.out, a.mine, a.count).await;
        }
        let mut ks = client(&a.conn).await?;
        let list = all_pages(async |page_token| {
            let page = ks
                .list_requests(a.conn.request(pb::ListRequestsRequest {
                    study_id: a.study.clone().unwrap_or_default(),
                    include_decided: a.all,
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await
                .map_err(|s| status_error("list requests", &s))?
                .into_inner();
            Ok((page.requests, page.next_page_token))
        })
        .await?;
        let none = if a.all {
            "no requests"
        } else {
            "no pending requests"
        };
        a.out.emit_list(&list, request_json, none, |list| {
            print!("{}", requests_table(list).render());
        })
    })
}

/// `tessera approve`.
pub fn approve(a: ApproveArgs) -> Result<()> {
    if a.ttl.is_zero() {
        bail!("--ttl must be at least 1 second");
    }
    block_on(async move {
        let r = client(&a.conn)
            .await?
            .approve_request(a.conn.request(pb::ApproveRequestRequest {
                request_id: a.request_id.clone(),
                ttl_seconds: a.ttl.as_secs(),
                uses: a.uses,
            }))
            .await
            .map_err(|s| status_error("approve", &s))?
            .into_inner()
            .request;
        decided(&a.out, "approved", r)
    })
}

/// `tessera deny`.
pub fn deny(a: DecideArgs) -> Result<()> {
    block_on(async move {
        let r = client(&a.conn)
            .await?
            .deny_request(a.conn.request(pb::DenyRequestRequest {
                request_id: a.request_id.clone(),
                reason: a.reason.clone(),
            }))
            .await
            .map_err(|s| status_error("deny", &s))?
            .into_inner()
            .request;
        decided(&a.out, "denied", r)
    })
}

/// `tessera revoke`.
pub fn revoke(a: DecideArgs) -> Result<()> {
    block_on(async move {
        let r = client(&a.conn)
            .await?
            .revoke_grant(a.conn.request(pb::RevokeGrantRequest {
                request_id: a.request_id.clone(),
                reason: a.reason.clone(),
            }))
            .await
            .map_err(|s| status_error("revoke", &s))?
            .into_inner()
            .request;
        decided(&a.out, "revoked", r)
    })
}

fn decided(out: &OutputArgs, verb: &str, r: Option<pb::KeyRequest>) -> Result<()> {
    let Some(r) = r else {
        bail!("{verb}: the keyserver answered without the request");
    };
    out.emit(&request_json(&r), || {
        if r.expires_at_unix != 0 {
            println!(
                "{verb} {}: {} use(s) left until {}",
                r.request_id,
                r.uses_left,
                utc(r.expires_at_unix)
            );
        } else {
            println!("{verb} {}", r.request_id);
        }
        print!("{}", requests_table(std::slice::from_ref(&r)).render());
    })
}

/// `tessera audit`.
pub fn audit(a: AuditArgs) -> Result<()> {
    block_on(async move {
        let mut ks = client(&a.conn).await?;
        if a.verify {
            let v = ks
                .verify_audit(a.conn.request(pb::VerifyAuditRequest {}))
                .await
                .map_err(|s| status_error("verify audit", &s))?
                .into_inner();
            let value = json!({
                "ok": v.ok,
                "entries": v.entries,
                "first_broken_seq": v.first_broken_seq,
                "problem": v.problem,
                "head_hash": hex::encode(&v.head_hash),
                "checkpoints_verified": v.checkpoints_verified,
                "last_checkpoint_seq": v.last_checkpoint_seq,
                "audit_public_key": hex::encode(&v.audit_public_key),
                "acknowledged_broken_seq": v.acknowledged_broken_seq,
                "acknowledged_problem": v.acknowledged_problem,
            });
            a.out.emit(&value, || {
                if v.ok {
                    println!(
                        "audit log OK: {} entries, hash chain intact, head {} (signed)",
                        v.entries,
                        hex::encode(&v.head_hash)
                    );
                    // A checkpoint: the keyserver signs the hash of every
                    // checkpoint_every-th entry (1000 by default).
                    if v.checkpoints_verified == 0 {
                        println!(
                            "checkpoints: none yet. A checkpoint is the hash of every checkpoint_every-th entry (1000 by default) signed with the keyserver's audit key, so a cut or rewritten past shows; the first comes at entry checkpoint_every. Until then the signed head above covers the chain."
                        );
                    } else {
                        println!(
                            "checkpoints: {} signed checkpoint(s) verified, the last at entry {} (a checkpoint is the hash of every checkpoint_every-th entry, signed with the keyserver's audit key)",
                            v.checkpoints_verified, v.last_checkpoint_seq
                        );
                    }
                } else {
                    println!(
                        "audit log BROKEN at entry {}: {}",
                        v.first_broken_seq, v.problem
                    );
                }
                if v.acknowledged_broken_seq != 0 {
                    println!(
                        "acknowledged by an administrator (audit-recover): entry {}: {}",
                        v.acknowledged_broken_seq, v.acknowledged_problem
                    );
                }
                println!("signing key (Ed25519): {}", hex::encode(&v.audit_public_key));
            })?;
            if !v.ok {
                bail!(
                    "audit log broken at entry {}: {}",
                    v.first_broken_seq,
                    v.problem
                );
            }
            return Ok(());
        }
        // The keyserver caps a page at its message size, so a page may be
        // shorter than --limit: follow the pages until --limit entries or
        // the end of the log.
        let mut entries = Vec::new();
        let mut from_seq = a.from_seq;
        let next = loop {
            let want = a.limit.saturating_sub(entries.len() as u32);
            let page = ks
                .list_audit(a.conn.request(pb::ListAuditRequest {
                    from_seq,
                    limit: want,
                }))
                .await
                .map_err(|s| status_error("list audit", &s))?
                .into_inner();
            let got = page.entries.len() as u32;
            entries.extend(page.entries);
            let next = page.next_from_seq;
            if next == 0 || got >= want || next <= from_seq {
                break next;
            }
            from_seq = next;
        };
        let value = Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "timestamp_unix_ms": e.timestamp_unix_ms,
                        "actor": e.actor,
                        "event": e.event,
                        "study_id": e.study_id,
                        "detail": e.detail,
                        "prev_hash": hex::encode(&e.prev_hash),
                        "hash": hex::encode(&e.hash),
                    })
                })
                .collect(),
        );
        a.out.emit(&value, || {
            if entries.is_empty() {
                println!("no audit entries from {}", a.from_seq);
                return;
            }
            let mut t =
                Table::new(["SEQ", "TIME", "ACTOR", "EVENT", "STUDY", "DETAIL"]).max_cell(120);
            for e in &entries {
                t.row([
                    e.seq.to_string(),
                    utc(e.timestamp_unix_ms / 1000),
                    short_identity(&e.actor).to_owned(),
                    e.event.clone(),
                    e.study_id.clone(),
                    e.detail.clone(),
                ]);
            }
            print!("{}", t.render());
            // Where the next window starts, when more follow.
            if next != 0 {
                println!("(more may follow: --from {next})");
            }
        })
    })
}

/// `tessera delegate add|list|remove`.
pub fn delegate(cmd: DelegateCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            DelegateCmd::Add(a) => {
                let delegate = owner_uri(&a.identity);
                client(&a.conn)
                    .await?
                    .add_delegate(a.conn.request(pb::AddDelegateRequest {
                        delegate: delegate.clone(),
                    }))
                    .await
                    .map_err(|s| status_error("add delegate", &s))?;
                a.out.emit(&json!({"added": delegate}), || {
                    println!(
                        "{} may now store studies on your behalf",
                        short_identity(&delegate)
                    );
                })
            }
            DelegateCmd::Remove(a) => {
                let delegate = owner_uri(&a.identity);
                client(&a.conn)
                    .await?
                    .remove_delegate(a.conn.request(pb::RemoveDelegateRequest {
                        delegate: delegate.clone(),
                    }))
                    .await
                    .map_err(|s| status_error("remove delegate", &s))?;
                a.out.emit(&json!({"removed": delegate}), || {
                    println!("{} is no longer your delegate", short_identity(&delegate));
                })
            }
            DelegateCmd::List(a) => {
                let mut ks = client(&a.conn).await?;
                let list = all_pages(async |page_token| {
                    let page = ks
                        .list_delegates(a.conn.request(pb::ListDelegatesRequest {
                            page_size: PAGE_SIZE,
                            page_token,
                        }))
                        .await
                        .map_err(|s| status_error("list delegates", &s))?
                        .into_inner();
                    Ok((page.delegates, page.next_page_token))
                })
                .await?;
                a.out.emit_list(
                    &list,
                    |d| json!(d),
                    "no delegates",
                    |list| {
                        for d in list {
                            println!("{}", short_identity(d));
                        }
                    },
                )
            }
        }
    })
}
